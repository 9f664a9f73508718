"""The metric registry: every fact about a metric that code outside its kernel needs.

One entry per metric name the evaluation table can hold. Calibration reads the orientation,
scoring reads which reference and inputs a metric takes and which DbD gates apply to it, the
report reads the label; nothing else keeps its own list of metric names.

* ``kernel``: the core kernel that computes it (:func:`vcjax.metrics.fused_scores`); a
  ``*_ctrl`` metric runs the kernel of its base metric against the control mean. ``None``
  for the peers' metrics, which :mod:`vcjax.peers` computes.
* ``reference``: ``"delta"`` (the evaluation's Δ reference, ``u_ALL`` of half 1 by default),
  ``"control"`` (``u_NTC``) or ``"none"`` (raw pseudobulks: MSE, WMSE, MAE).
* ``gated_by_degs``: NaN for a perturbation without significant DEGs (DbD's ``|D| > 0``
  gate, docs/metrics.md §5).
* ``undefined_for``: sources whose prediction carries no perturbation-specific Δ against a
  ``u_ALL``-type reference (the dataset mean), for which the metric is NaN there (DbD's
  special case). Against the control mean the same source has a defined Δ, so the gate
  does not apply.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import numpy as np

from vcjax._errors import VcjaxInputError, preview
from vcjax.metrics import _kernels as K

__all__ = [
    "DEFAULT_METRICS",
    "KERNELS",
    "METRICS",
    "MetricSpec",
    "higher_is_better",
    "gate",
    "metric_bounds",
    "kernel_metrics",
    "label",
    "metric_spec",
]

Reference = Literal["delta", "control", "none"]


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """What the pipeline needs to know about one metric.

    Attributes:
      name: the metric's name in tables.
      higher_is_better: orientation (calibration, paired comparisons, ranks).
      label: display label (report, command line).
      kind: ``"error"`` (an error of the raw profiles: MSE, WMSE, MAE; CellSimBench takes the
        dataset mean as their negative), ``"similarity"``, ``"distance"`` (between cell
        distributions) or ``"rank"``.
      kernel: the core kernel computing it, or None (a peer metric).
      reference: which Δ reference it takes (module docstring).
      needs: optional inputs it needs: ``"weights"`` (DEG weights), ``"mask"`` (DEG sets);
        for peer metrics ``"cells"`` (a model given as predicted cells; the cell-eval DE
        metrics use the truth's control cells when those have none).
      gated_by_degs: NaN where a perturbation has no significant DEG.
      undefined_for: sources for which it is NaN against a ``u_ALL``-type reference.
      level: ``"perturbation"`` (one value per perturbation) or ``"dataset"`` (one value).
      bounds: the closed range ``(low, high)`` of its values (±inf where open): [−1, 1] for
        a correlation, [0, ∞) for an error or distance, (−∞, 1] for an R², [0, 1] for a
        fraction. Bootstrap intervals are kept inside it (:func:`vcjax.stats.interval`).
    """

    name: str
    higher_is_better: bool
    label: str
    kind: Literal["error", "similarity", "distance", "rank"] = "similarity"
    kernel: str | None = None
    reference: Reference = "delta"
    needs: tuple[str, ...] = ()
    gated_by_degs: bool = False
    undefined_for: tuple[str, ...] = ()
    level: Literal["perturbation", "dataset"] = "perturbation"
    bounds: tuple[float, float] = (-math.inf, math.inf)

    @property
    def is_core(self) -> bool:
        """Computed by the core kernels (the engine and the bootstrap), not the peer table."""
        return self.kernel is not None


#: how :func:`vcjax.metrics.fused_scores` and one-row callers run each core kernel:
#: ``fn(pred, truth, reference, weights, mask, *, k, strict)`` and the inputs it needs.
KERNELS: Mapping[str, tuple[Callable[..., jax.Array], tuple[str, ...]]] = {
    "mse": (lambda p, t, r, w, m, **_: K.mse(p, t), ()),
    "wmse": (lambda p, t, r, w, m, **_: K.wmse(p, t, w), ("weights",)),
    "mae": (lambda p, t, r, w, m, **_: K.mae(p, t), ()),
    "pearson_delta": (lambda p, t, r, w, m, **_: K.pearson_delta(p, t, r), ()),
    "pearson_delta_degs": (lambda p, t, r, w, m, **_: K.pearson_delta_degs(p, t, r, m), ("mask",)),
    "pearson_delta_topk": (
        lambda p, t, r, w, m, *, k, **_: K.pearson_delta_topk(p, t, r, w, k=k),
        ("weights",),
    ),
    "r2_delta": (lambda p, t, r, w, m, *, strict, **_: K.r2_delta(p, t, r, strict=strict), ()),
    "r2w_delta": (
        lambda p, t, r, w, m, *, strict, **_: K.r2w_delta(p, t, r, w, strict=strict),
        ("weights",),
    ),
    "cosine_delta": (lambda p, t, r, w, m, **_: K.cosine_delta(p, t, r), ()),
}


_CORR = (-1.0, 1.0)  # a correlation or cosine
_ERROR = (0.0, math.inf)  # an error or a distance
_R2 = (-math.inf, 1.0)
_FRACTION = (0.0, 1.0)
#: the range of each core kernel
_KERNEL_BOUNDS = {
    "mse": _ERROR, "wmse": _ERROR, "mae": _ERROR, "pearson_delta": _CORR,
    "pearson_delta_degs": _CORR, "pearson_delta_topk": _CORR, "r2_delta": _R2,
    "r2w_delta": _R2, "cosine_delta": _CORR,
}  # fmt: skip


def _core(name, hib, label, *, kernel=None, reference="delta", **kw) -> MetricSpec:
    kernel = kernel or name
    kind = "similarity" if hib else "error"
    return MetricSpec(
        name, hib, label, kind, kernel, reference, KERNELS[kernel][1],
        bounds=_KERNEL_BOUNDS[kernel], **kw,
    )  # fmt: skip


_DATA_MEAN = ("dataset_mean",)

_ENTRIES = (
    _core("mse", False, "MSE", reference="none"),
    _core("wmse", False, "WMSE", reference="none", gated_by_degs=True),
    _core("mae", False, "MAE", reference="none"),
    _core("pearson_delta", True, "Pearson(Δ)", undefined_for=_DATA_MEAN),
    _core(
        "pearson_delta_degs",
        True,
        "Pearson(Δ) on DEGs",
        gated_by_degs=True,
        undefined_for=_DATA_MEAN,
    ),
    _core("pearson_delta_topk", True, "Pearson(Δ) top-k", undefined_for=_DATA_MEAN),
    _core("r2_delta", True, "R²(Δ)"),
    _core("r2w_delta", True, "R²w(Δ)", gated_by_degs=True),
    _core("cosine_delta", True, "cosine(Δ)"),
    _core(
        "pearson_delta_ctrl",
        True,
        "Pearson(Δ vs control)",
        kernel="pearson_delta",
        reference="control",
    ),
    _core("r2_delta_ctrl", True, "R²(Δ vs control)", kernel="r2_delta", reference="control"),
    # the peers' metrics (vcjax.peers): pseudobulk, dataset-level and cell-level
    MetricSpec("pearson_delta_top20", True, "Pearson(Δ vs control) top-20 (GEARS)", bounds=_CORR),
    MetricSpec("direction_agreement", True, "direction agreement top-20 (GEARS)", bounds=_FRACTION),
    MetricSpec("pearson_delta_centroid", True, "Pearson(Δ vs centroid) (Systema)", bounds=_CORR),
    MetricSpec("centroid_accuracy", True, "centroid accuracy (Systema)", bounds=_FRACTION),
    MetricSpec("rank", False, "cosine rank (PerturBench)", "rank", bounds=_FRACTION),
    MetricSpec("pds", True, "discrimination score L1", bounds=_FRACTION),
    MetricSpec(
        "hit_recall_at_budget", True, "hit recall at budget", level="dataset", bounds=_FRACTION
    ),
    MetricSpec(
        "hit_recall_at_fdr", True, "hit recall at FDR 0.1", level="dataset", bounds=_FRACTION
    ),
    MetricSpec(
        "de_overlap_at_k",
        True,
        "DE overlap (cell-eval)",
        needs=("cells",),
        bounds=_FRACTION,
    ),  # fmt: skip
    MetricSpec(
        "de_direction_agreement",
        True,
        "DE direction match (cell-eval)",
        needs=("cells",),
        bounds=_FRACTION,
    ),
    MetricSpec(
        "energy_distance", False, "energy distance", "distance", needs=("cells",), bounds=_ERROR
    ),
    MetricSpec("mmd", False, "MMD", "distance", needs=("cells",)),  # unbiased MMD² can be < 0
)

#: every metric the evaluation table can hold, by name.
METRICS: Mapping[str, MetricSpec] = {m.name: m for m in _ENTRIES}

#: the default metric set: the core metrics against the Δ reference, plus two
#: control-referenced ones that show the control bias (``*_ctrl``: deltas against u_NTC).
DEFAULT_METRICS: tuple[str, ...] = tuple(m.name for m in _ENTRIES if m.is_core)


def metric_spec(name: str) -> MetricSpec:
    """The registry entry of ``name``; an unknown name raises, listing the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise VcjaxInputError(
            f"unknown metric {name!r}; available: {preview(sorted(METRICS), 40)}"
        ) from None


def higher_is_better(name: str) -> bool:
    """Orientation of a metric (errors such as MSE are lower-is-better)."""
    return metric_spec(name).higher_is_better


def metric_bounds(name: str, *, calibrated: bool = False) -> tuple[float, float]:
    """The range of ``name``'s values (:attr:`MetricSpec.bounds`); calibrated values, and
    names not registered, are unbounded."""
    spec = METRICS.get(name)
    return (-math.inf, math.inf) if calibrated or spec is None else spec.bounds


def label(name: str) -> str:
    """Display label of a metric (its name when it is not registered)."""
    spec = METRICS.get(name)
    return name if spec is None else spec.label


def kernel_metrics(*, weights: bool = True, mask: bool = True) -> tuple[str, ...]:
    """Names of the core kernels whose inputs are available (what the engine scores)."""
    have = {"weights": weights, "mask": mask}
    return tuple(n for n, (_, needs) in KERNELS.items() if all(have[x] for x in needs))


def gate(metric: str, value, *, no_deg, undefined, xp: Any = np):
    """DbD's NaN gates on ``value`` (``(..., P)``) of one metric.

    Args:
      metric: the metric (its registry entry says which gates apply).
      value: the values.
      no_deg: ``(..., P)`` bool, perturbations without a DEG, or None (no DEG sets).
      undefined: bool (or a bool array broadcastable to ``value``): the source is one the
        metric is undefined for (the dataset mean against a ``u_ALL``-type reference).
      xp: NumPy or ``jax.numpy``.
    """
    spec = METRICS[metric]
    if spec.gated_by_degs and no_deg is not None:
        value = xp.where(no_deg, xp.nan, value)
    if spec.undefined_for:
        value = xp.where(undefined, xp.nan, value)
    return value
