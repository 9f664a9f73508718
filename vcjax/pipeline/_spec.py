"""How to prepare the truth, how to score, how to resample: three frozen option sets.

:class:`TruthSpec` is everything that fixes the truth side of an evaluation (it is what a
:class:`~vcjax.pipeline.Screen` was built with and what it saves); :class:`ScoreSpec` is
how predictions are scored against it; :class:`BootSpec` is how the cell bootstrap
resamples. Each validates its values once, when it is made, with one-line errors naming the
option at fault.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal

import numpy as np

from vcjax._errors import VcjaxInputError
from vcjax.data import REFERENCES

__all__ = [
    "DEFAULT_BASELINES",
    "ROUGH_N_BOOT",
    "UALL_REFERENCES",
    "BootSpec",
    "ScoreSpec",
    "TruthSpec",
    "warn_if_rough",
]

#: every baseline, in the order tables list them (what each one is: docs/metrics.md §4).
DEFAULT_BASELINES = (
    "control_mean",
    "dataset_mean",
    "null",
    "technical_duplicate",
    "additive",
    "loo_mean",
    "interpolated_duplicate",
)
#: the references that are a mean over perturbations (u_ALL-type): against them the
#: dataset mean has no perturbation-specific Δ, and DbD leaves its Pearson metrics undefined.
UALL_REFERENCES = ("perturbed", "perturbed_no_control", "perturbed_cells")

Method = Literal["t-test_overestim_var", "t-test"]


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise VcjaxInputError(f"{name} must be one of {shown}; got {value!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class TruthSpec:
    """How the truth side is prepared (see :func:`vcjax.evaluate` for each option).

    Attributes:
      key: ``obs`` column with the condition labels.
      control: the control label.
      reference: the Δ reference: a name of :data:`vcjax.data.REFERENCES` or a ``(G,)`` array.
      weights: ``"deg"`` (DbD's DEG weights), ``"uniform"``/None (none), or a ``(P, G)`` array.
      weights_from: ``"all"`` cells (the paper's) or ``"half1"`` (stricter).
      deg_method: ``"t-test_overestim_var"`` (the paper's) or ``"t-test"`` (Welch).
      baselines: the baselines built (:data:`DEFAULT_BASELINES`).
      split: the technical-duplicate split: an ``obs`` column, an ``(N,)`` array of 1/2,
        or None for the paper's seeded split.
      split_seed: the seed of that split (42 in DbD).
      seed: the seed of the null baseline's derangement.
      layer: the AnnData layer read instead of ``X``.
      normalize: ``"auto"``, ``"log1p_cp10k"`` or None (docs/metrics.md §1).
      covariate: ``obs`` column: everything is prepared within each of its values.
      drop_small: drop conditions with fewer than 2 cells instead of failing.
    """

    key: str
    control: str
    reference: str | np.ndarray = "perturbed"
    weights: str | np.ndarray | None = "deg"
    weights_from: Literal["all", "half1"] = "all"
    deg_method: Method = "t-test_overestim_var"
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    split: str | np.ndarray | None = None
    split_seed: int = 42
    seed: int = 0
    layer: str | None = None
    normalize: str | None = "auto"
    covariate: str | None = None
    drop_small: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise VcjaxInputError(f"key must be an obs column name, got {self.key!r}")
        if not isinstance(self.control, str):
            raise VcjaxInputError(f"control must be a label (a string), got {self.control!r}")
        if isinstance(self.reference, str):
            _choice("reference", self.reference, REFERENCES)
        else:
            object.__setattr__(self, "reference", np.asarray(self.reference, dtype=np.float64))
        if isinstance(self.weights, str):
            _choice("weights", self.weights, ("deg", "uniform"))
        elif self.weights is not None:
            object.__setattr__(self, "weights", np.asarray(self.weights, dtype=np.float32))
        _choice("weights_from", self.weights_from, ("all", "half1"))
        _choice("deg_method", self.deg_method, ("t-test_overestim_var", "t-test"))
        baselines = (self.baselines,) if isinstance(self.baselines, str) else tuple(self.baselines)
        for b in baselines:
            _choice("baseline", b, DEFAULT_BASELINES)
        object.__setattr__(self, "baselines", tuple(dict.fromkeys(baselines)))
        _choice(
            "normalize",
            "none" if self.normalize is None else self.normalize,
            ("auto", "log1p_cp10k", "none"),
        )
        if self.normalize == "none":
            object.__setattr__(self, "normalize", None)
        if self.split is not None and not isinstance(self.split, str):
            object.__setattr__(self, "split", np.asarray(self.split))

    @property
    def reference_name(self) -> str:
        """The reference's name, or ``"array"`` for a given vector."""
        return self.reference if isinstance(self.reference, str) else "array"

    @property
    def weights_kind(self) -> Literal["deg", "array", "none"]:
        """``"deg"`` (DEG weights and sets), ``"array"`` (given weights) or ``"none"``."""
        if isinstance(self.weights, str):
            return "deg" if self.weights == "deg" else "none"
        return "none" if self.weights is None else "array"

    @property
    def uall_reference(self) -> bool:
        """Whether the Δ reference is a mean over perturbations (DbD's data-mean gate applies)."""
        return self.reference_name in UALL_REFERENCES

    def options(self) -> dict[str, Any]:
        """The options as JSON-safe values (arrays are named, not written out)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = (
                "array" if isinstance(v, np.ndarray) else (list(v) if isinstance(v, tuple) else v)
            )
        return out


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """How predictions are scored against a prepared truth.

    Attributes:
      metrics: metric names (None: :data:`vcjax.metrics.DEFAULT_METRICS`; ``"all"`` adds
        every peer metric the prediction allows).
      k: genes of ``pearson_delta_topk`` (largest ``|t|``).
      strict: NaN instead of sklearn's forced R² values for constant truths.
      gate: apply DbD's NaN gates (no DEGs; data-mean Pearson against u_ALL).
      chunk_size: rows per engine chunk (None: the engine's choice).
    """

    metrics: tuple[str, ...] | str | None = None
    k: int = 20
    strict: bool = False
    gate: bool = True
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        m = self.metrics
        if m is not None and not (isinstance(m, str) and m == "all"):
            object.__setattr__(self, "metrics", (m,) if isinstance(m, str) else tuple(m))
        if int(self.k) < 1:
            raise VcjaxInputError(f"k must be >= 1, got {self.k}")
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise VcjaxInputError(f"chunk_size must be >= 1, got {self.chunk_size}")


#: below this many resamples the interval ends are rough (a 95 % interval's ends are the
#: 2.5th and 97.5th percentiles: 2–3 resamples each at 100)
ROUGH_N_BOOT = 100


def warn_if_rough(n_boot: int, *, stacklevel: int = 3) -> None:
    """A ``UserWarning`` when ``0 < n_boot < ROUGH_N_BOOT``."""
    if 0 < int(n_boot) < ROUGH_N_BOOT:
        warnings.warn(
            f"n_boot={int(n_boot)}: with fewer than {ROUGH_N_BOOT} resamples the interval "
            "ends are rough (1000 is usual for reported intervals)",
            UserWarning,
            stacklevel=stacklevel,
        )


@dataclasses.dataclass(frozen=True)
class BootSpec:
    """How the cell bootstrap resamples (see :func:`vcjax.pipeline.add_intervals`).

    Attributes:
      n_boot: resamples.
      ci: interval level in (0, 1).
      method: ``"percentile"`` or ``"bca"``.
      refit_weights: recompute the DEG weights and sets per resample.
      seed: resample ``r`` of stratum ``j`` uses ``fold_in(fold_in(PRNGKey(seed), j), r)``.
      chunk_size: resamples per jitted call (a memory knob; results do not depend on it).
      pvalue: DEG p-values in the resamples: ``"auto"``, ``"fast"`` or ``"exact"``.
      target: ``"expected"`` or ``"population"`` (what the interval is for).
    """

    n_boot: int
    ci: float = 0.95
    method: Literal["percentile", "bca"] = "percentile"
    refit_weights: bool = True
    seed: int = 0
    chunk_size: int | None = None
    pvalue: Literal["auto", "fast", "exact"] = "auto"
    target: Literal["expected", "population"] = "expected"

    def __post_init__(self) -> None:
        if int(self.n_boot) < 2:
            raise VcjaxInputError(f"n_boot must be >= 2 for intervals, got {self.n_boot}")
        if not 0 < float(self.ci) < 1:
            raise VcjaxInputError(f"ci must be in (0, 1), got {self.ci}")
        _choice("ci_method", self.method, ("percentile", "bca"))
        _choice("pvalue", self.pvalue, ("auto", "fast", "exact"))
        _choice("target", self.target, ("expected", "population"))
