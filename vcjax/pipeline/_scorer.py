"""A prepared truth as a pure JAX function: the metrics of a ``(P, G)`` prediction on device.

:func:`scorer` (``screen.scorer(...)``) returns a :class:`Scorer`, a frozen pytree holding the
truth-side arrays of a :class:`~vcjax.pipeline.Screen` (truth, Δ reference, control mean,
DEG weights and sets, top-k weights, the DbD gate and, for calibration, the baselines'
values) on the device. Calling it on a prediction gives ``{metric: (P,)}``, the same values
as :func:`vcjax.evaluate`'s model rows (the kernels of :mod:`vcjax.metrics`, the same gates
and calibration), with no host round trip: it can be ``jax.jit``-ed, ``jax.vmap``-ed over
models and differentiated (``jax.grad``), e.g. for on-device validation metrics or a loss in
a training loop. Being a pytree, a scorer can be passed to a jitted function as an argument
(its arrays are then inputs, not constants baked into the program)::

    score = screen.scorer(metrics=("r2w_delta", "wmse"), calibrated=True)

    @jax.jit
    def validate(score, pred):
        return jnp.nanmedian(score(pred)["r2w_delta"])

    validate(score, pred)  # pred: (P, G) in screen.perturbations × screen.genes order
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from vcjax._errors import VcjaxInputError
from vcjax._host import working_dtype
from vcjax.metrics import DEFAULT_METRICS, KERNELS, METRICS, metric_spec
from vcjax.pipeline._baselines import NEGATIVES, POSITIVE
from vcjax.pipeline._calibrate import calibrate
from vcjax.pipeline._scoring import gate, score_sources
from vcjax.pipeline._screen import Screen
from vcjax.pipeline._spec import ScoreSpec

__all__ = ["Scorer", "scorer"]


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: jax.jit(scorer) works
class Scorer:
    """The metrics of one prediction against a prepared truth, as a pure JAX function.

    Made by :func:`scorer`; call it on a ``(..., P, G)`` prediction (rows in
    ``screen.perturbations`` order, columns in ``screen.genes`` order) to get
    ``{metric: (..., P)}``. Array fields are pytree leaves; the options are static.

    Attributes:
      truth: ``(P, G)`` the truth (the split's half-2 pseudobulk).
      reference: ``(P, G)`` the Δ reference of each row.
      control: ``(P, G)`` the control mean of each row (``*_ctrl`` metrics).
      weights: ``(P, G)`` DEG weights, or None.
      mask: ``(P, G)`` DEG sets, or None.
      topk_weights: ``(P, G)`` what ranks the top-k genes (``|t|`` or the weights), or None.
      no_deg: ``(P,)`` rows without a DEG (DbD's gate), or None.
      baselines: ``{source: {metric: (P,)}}`` the gated baseline values calibration needs,
        or None when not calibrated.
      metrics: the metric names (static).
      k: genes of ``pearson_delta_topk`` (static).
      strict: R² rule for a constant true delta (static).
      calibrated: return calibrated values (static).
    """

    truth: jax.Array
    reference: jax.Array
    control: jax.Array
    weights: jax.Array | None
    mask: jax.Array | None
    topk_weights: jax.Array | None
    no_deg: jax.Array | None
    baselines: Mapping[str, Mapping[str, jax.Array]] | None
    metrics: tuple[str, ...] = dataclasses.field(metadata=dict(static=True), default=())
    k: int = dataclasses.field(metadata=dict(static=True), default=20)
    strict: bool = dataclasses.field(metadata=dict(static=True), default=False)
    calibrated: bool = dataclasses.field(metadata=dict(static=True), default=False)

    def raw(self, predictions: ArrayLike) -> dict[str, jax.Array]:
        """``{metric: (..., P)}`` before calibration (gated as :func:`vcjax.evaluate`)."""
        pred = jnp.asarray(predictions, self.truth.dtype)
        if pred.shape[-2:] != self.truth.shape:
            raise VcjaxInputError(
                f"the prediction must be (..., P, G) = (..., {self.truth.shape[0]}, "
                f"{self.truth.shape[1]}) in screen.perturbations × screen.genes order; "
                f"got {pred.shape}"
            )
        out = {}
        for name in self.metrics:
            spec = METRICS[name]
            fn = KERNELS[spec.kernel][0]
            ref = self.control if spec.reference == "control" else self.reference
            w = self.topk_weights if spec.kernel == "pearson_delta_topk" else self.weights
            value = fn(pred, self.truth, ref, w, self.mask, k=self.k, strict=self.strict)
            out[name] = gate(name, value, no_deg=self.no_deg, undefined=False, xp=jnp)
        return out

    def __call__(self, predictions: ArrayLike) -> dict[str, jax.Array]:
        """``{metric: (..., P)}``: raw or, for a calibrated scorer, calibrated values."""
        values = self.raw(predictions)
        if not self.calibrated:
            return values
        shape = next(iter(values.values())).shape
        sources = {
            s: {m: jnp.broadcast_to(v, shape) for m, v in d.items()}
            for s, d in (self.baselines or {}).items()
        }
        return calibrate({"model": values, **sources}, xp=jnp)["model"]


jax.tree_util.register_dataclass(
    Scorer,
    data_fields=[
        "truth", "reference", "control", "weights", "mask", "topk_weights", "no_deg",
        "baselines",
    ],
    meta_fields=["metrics", "k", "strict", "calibrated"],
)  # fmt: skip


def scorer(
    screen: Screen,
    *,
    metrics: Sequence[str] | None = None,
    calibrated: bool = False,
    k: int = 20,
    strict: bool = False,
    gate: bool = True,
) -> Scorer:
    """The prepared truth of ``screen`` as a pure, jit-, vmap- and grad-compatible scorer.

    Args:
      screen: the prepared truth (:func:`vcjax.prepare`).
      metrics: core metric names (default: every core metric the screen supports; the
        peers' metrics are host-side and not available here).
      calibrated: return values calibrated between the best negative baseline (0) and the
        technical duplicate (1), as :func:`vcjax.evaluate`'s ``calibrated`` column.
      k: genes of ``pearson_delta_topk``.
      strict: R² of a constant true delta is NaN (``True``) or scikit-learn's forced value.
      gate: apply DbD's NaN gates (no significant DEG) as :func:`vcjax.evaluate` does.

    Returns:
      A :class:`Scorer`: ``scorer(pred)`` maps a ``(..., P, G)`` prediction in
      ``screen.perturbations`` × ``screen.genes`` order to ``{metric: (..., P)}``.
    """
    names = list(DEFAULT_METRICS if metrics is None else metrics)
    for m in names:
        if not metric_spec(m).is_core:
            raise VcjaxInputError(
                f"metric {m!r} is computed on the host (vcjax.peers) and has no jit-able "
                f"scorer; the scorer's metrics are {', '.join(DEFAULT_METRICS)}"
            )
    strata = screen.strata
    have_w = all(s.weights is not None for s in strata)
    have_m = all(s.deg_mask is not None for s in strata)
    usable = []
    for m in names:
        needs = METRICS[m].needs
        if ("weights" in needs and not have_w) or ("mask" in needs and not have_m):
            if metrics is not None:
                raise VcjaxInputError(
                    f"metric {m!r} needs DEG {'weights' if 'weights' in needs else 'sets'}, "
                    f"which this screen was prepared without (weights={screen.spec.weights_kind!r})"
                )
            continue
        usable.append(m)
    dtype = working_dtype()

    def rows(get) -> np.ndarray:
        parts = []
        for s in strata:
            a = np.asarray(get(s), np.float64)
            parts.append(np.broadcast_to(a, (len(s.perturbations), len(s.genes))))
        return np.concatenate(parts)

    def dev(a, dt=dtype):
        return None if a is None else jnp.asarray(np.asarray(a, dt))

    topk = None
    if "pearson_delta_topk" in usable:
        topk = rows(lambda s: np.abs(s.scores) if s.scores is not None else s.weights)
    no_deg = None
    if gate and all(s.no_degs is not None for s in strata):
        no_deg = np.concatenate([np.asarray(s.no_degs, bool) for s in strata])
    baselines = None
    if calibrated:
        score = ScoreSpec(metrics=tuple(usable), k=k, strict=strict, gate=gate)
        per = [
            score_sources(
                s,
                screen.spec,
                {b: s.baselines[b] for b in _CALIBRATION if b in s.baselines},
                usable,
                score,
            )  # fmt: skip
            for s in strata
        ]
        baselines = {
            b: {m: dev(np.concatenate([p[b][m] for p in per])) for m in usable}
            for b in _CALIBRATION
            if all(b in p for p in per)
        }
    return Scorer(
        truth=dev(rows(lambda s: s.truth)),
        reference=dev(rows(lambda s: s.reference)),
        control=dev(rows(lambda s: s.u_ntc)),
        weights=dev(rows(lambda s: s.weights)) if have_w else None,
        mask=dev(rows(lambda s: s.deg_mask), bool) if have_m else None,
        topk_weights=dev(topk),
        no_deg=dev(no_deg, bool),
        baselines=baselines,
        metrics=tuple(usable),
        k=int(k),
        strict=bool(strict),
        calibrated=bool(calibrated),
    )


#: the baselines calibration reads (:func:`vcjax.pipeline.calibrate`)
_CALIBRATION = (*NEGATIVES, POSITIVE)
