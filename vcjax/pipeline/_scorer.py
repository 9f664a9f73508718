"""A prepared truth as a pure JAX function: the metrics of a ``(P, G)`` prediction on device.

:func:`scorer` (``screen.scorer(...)``) returns a :class:`Scorer`, a frozen pytree holding the
truth-side arrays of a :class:`~vcjax.pipeline.Screen` (truth, Δ reference, control mean,
DEG weights and sets, top-k weights, the DbD gate and, for calibration, the baselines'
values) on the device. Calling it on a prediction gives ``{metric: (P,)}``, the same values
as :func:`vcjax.evaluate`'s model rows (the kernels of :mod:`vcjax.metrics`, the same gates
and calibration), with no host round trip: it can be ``jax.jit``-ed, ``jax.vmap``-ed over
models and differentiated (``jax.grad``), e.g. for on-device validation metrics or a loss in
a training loop. A call is compiled with the scorer's arrays as inputs; inside your own
``jax.jit``, pass the scorer as an argument (it is a pytree) rather than closing over it, so
that its ``(P, G)`` arrays stay inputs and are not baked into your program as constants
(which XLA would then try to fold at compile time)::

    score = screen.scorer(metrics=("r2w_delta", "wmse"), calibrated=True)

    @jax.jit
    def validate(score, pred):
        return jnp.nanmedian(score(pred)["r2w_delta"])

    validate(score, pred)  # pred: (P, G) in screen.perturbations × screen.genes order
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from vcjax._errors import VcjaxInputError
from vcjax._host import device_array, working_dtype
from vcjax.engine import compiler_options
from vcjax.metrics import (
    DEFAULT_METRICS,
    METRICS,
    fused_scores,
    metric_spec,
    pearson_delta,
    topk_indices,
)
from vcjax.metrics import (
    gate as apply_gates,
)
from vcjax.pipeline._baselines import NEGATIVES, POSITIVE
from vcjax.pipeline._calibrate import calibrate

if TYPE_CHECKING:  # _screen builds scorers (Screen.scorer): no runtime import back
    from vcjax.pipeline._screen import Screen

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
      topk_index: ``(P, k)`` the top-k genes of each row (by ``|t|`` or the weights, ties
        to the lower index), chosen once from the truth, or None.
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
    topk_index: jax.Array | None
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
        if pred.ndim > 2:  # (..., P, G): the fused pass works on one (P, G) at a time
            lead = pred.shape[:-2]
            flat = jax.vmap(self.raw)(pred.reshape((-1,) + self.truth.shape))
            return {m: v.reshape(lead + v.shape[-1:]) for m, v in flat.items()}
        values = {}
        # the metrics against the Δ reference, then those against the control mean, each in
        # one fused two-pass reduction (metrics.fused_scores: the engine's arithmetic)
        for ref, names in (
            (self.reference, [m for m in self.metrics if METRICS[m].reference != "control"]),
            (self.control, [m for m in self.metrics if METRICS[m].reference == "control"]),
        ):
            kernels = tuple(
                dict.fromkeys(METRICS[m].kernel for m in names if m != "pearson_delta_topk")
            )
            if kernels:
                got = fused_scores(
                    kernels, self.k, self.strict, pred, self.truth, ref,
                    _or_unused(self.weights, pred), _or_unused(self.mask, pred),
                )  # fmt: skip
                values.update(
                    {m: got[METRICS[m].kernel] for m in names if METRICS[m].kernel in kernels}
                )
            if "pearson_delta_topk" in names:
                values["pearson_delta_topk"] = self._topk(pred, ref)
        return {
            m: apply_gates(m, values[m], no_deg=self.no_deg, undefined=False, xp=jnp)
            for m in self.metrics
        }

    def _topk(self, pred: jax.Array, ref: jax.Array) -> jax.Array:
        """Pearson(Δ) on each row's top-k genes, gathered (the selection depends on the
        truth only, so it was made once)."""
        if self.topk_index is None:  # k > G or k < 2: NaN, as the kernel
            return jnp.full(pred.shape[:-1], jnp.nan, pred.dtype)
        idx = jnp.broadcast_to(self.topk_index, pred.shape[:-1] + self.topk_index.shape[-1:])

        def take(a):
            return jnp.take_along_axis(jnp.broadcast_to(a, pred.shape), idx, axis=-1)

        return pearson_delta(take(pred), take(self.truth), take(ref))

    def __call__(self, predictions: ArrayLike) -> dict[str, jax.Array]:
        """``{metric: (..., P)}``: raw or, for a calibrated scorer, calibrated values.

        Compiled with the scorer's arrays as inputs (never as constants of the program)."""
        return _apply(self, predictions)

    def values(self, predictions: ArrayLike) -> dict[str, jax.Array]:
        """What :meth:`__call__` returns, traced in the caller's context."""
        values = self.raw(predictions)
        if not self.calibrated:
            return values
        shape = next(iter(values.values())).shape
        sources = {
            s: {m: jnp.broadcast_to(v, shape) for m, v in d.items()}
            for s, d in (self.baselines or {}).items()
        }
        return calibrate({"model": values, **sources}, xp=jnp)["model"]


def _or_unused(a: jax.Array | None, like: jax.Array) -> jax.Array:
    """``a``, or a placeholder where the screen has none (no metric reads it then)."""
    return jnp.zeros((), like.dtype) if a is None else a


def _apply(scorer: Scorer, predictions: jax.Array) -> dict[str, jax.Array]:
    """Compiled on concrete inputs; traced inline inside the caller's jit/vmap/grad."""
    if any(
        isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((scorer, predictions))
    ):
        return scorer.values(predictions)
    return _compiled()(scorer, predictions)


@functools.lru_cache(maxsize=1)
def _compiled():
    """``Scorer.values`` jitted with the engine's compiler options (on CPU, the emitters
    that vectorise the fused row reductions)."""
    return jax.jit(lambda scorer, pred: scorer.values(pred), compiler_options=compiler_options())


jax.tree_util.register_dataclass(
    Scorer,
    data_fields=[
        "truth", "reference", "control", "weights", "mask", "topk_index", "no_deg",
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
        return None if a is None else device_array(np.asarray(a, dt))

    topk = None
    n_genes = len(screen.genes)
    if "pearson_delta_topk" in usable and 2 <= k <= n_genes:
        rank_by = rows(lambda s: np.abs(s.scores) if s.scores is not None else s.weights)
        topk = np.asarray(topk_indices(device_array(np.asarray(rank_by, dtype)), int(k)), np.int32)
    no_deg = None
    if gate and all(s.no_degs is not None for s in strata):
        no_deg = np.concatenate([np.asarray(s.no_degs, bool) for s in strata])
    plain = Scorer(
        truth=dev(rows(lambda s: s.truth)),
        reference=dev(rows(lambda s: s.reference)),
        control=dev(rows(lambda s: s.u_ntc)),
        weights=dev(rows(lambda s: s.weights)) if have_w else None,
        mask=dev(rows(lambda s: s.deg_mask), bool) if have_m else None,
        topk_index=dev(topk, np.int32),
        no_deg=dev(no_deg, bool),
        baselines=None,
        metrics=tuple(usable),
        k=int(k),
        strict=bool(strict),
        calibrated=False,
    )
    if not calibrated:
        return plain
    # the baselines calibration reads, scored by the same arithmetic (and DbD's rule that a
    # u_ALL-type reference leaves some metrics undefined for the dataset mean)
    baselines = {}
    for b in _CALIBRATION:
        if not all(b in st.baselines for st in strata):
            continue
        values = plain.raw(device_array(np.asarray(rows(lambda st, b=b: st.baselines[b]), dtype)))
        baselines[b] = {
            m: jnp.where(screen.spec.uall_reference and b in METRICS[m].undefined_for, jnp.nan, v)
            for m, v in values.items()
        }
    return dataclasses.replace(plain, baselines=baselines, calibrated=True)


#: the baselines calibration reads (:func:`vcjax.pipeline.calibrate`)
_CALIBRATION = (*NEGATIVES, POSITIVE)
