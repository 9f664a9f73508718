"""The fused multi-metric pass: every core metric of a block of rows from shared per-row moments.

:func:`fused_scores` equals the kernels of :mod:`vcjax.metrics._kernels` up to float
rounding (the same two-pass centred sums and the same finishing steps,
:mod:`vcjax.metrics._moments`), but reads its inputs twice in total instead of several times
per metric. :mod:`vcjax.engine` batches it over chunks of perturbations; the bootstrap calls it
on stacked sources and resamples inside its own jit.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from vcjax.metrics._kernels import pearson_delta, topk_indices
from vcjax.metrics._moments import (
    cosine_from_moments,
    pearson_from_moments,
    r2_from_moments,
    safe_div,
)

__all__ = ["fused_scores", "row_sums"]


def row_sums(terms: Sequence[jax.Array]) -> list[jax.Array]:
    """``[jnp.sum(t, -1) for t in terms]`` as ONE variadic reduction.

    XLA:CPU does not fuse sibling reductions into one loop: separate ``jnp.sum`` calls
    materialise every shared intermediate (``pred - reference`` …) and re-read the inputs
    once per sum. A single ``lax.reduce`` over a tuple of operands is one fused loop that
    reads each input element once and updates every accumulator.
    """
    shape = jnp.broadcast_shapes(*(t.shape for t in terms))
    return list(_fused_sums(*(jnp.broadcast_to(t, shape) for t in terms)))


@jax.custom_jvp
def _fused_sums(*ops: jax.Array) -> tuple[jax.Array, ...]:
    init = tuple(jnp.zeros((), t.dtype) for t in ops)
    last = (ops[0].ndim - 1,)
    return jax.lax.reduce(ops, init, lambda a, b: tuple(x + y for x, y in zip(a, b)), last)


@_fused_sums.defjvp
def _fused_sums_jvp(primals, tangents):
    # a sum is linear: the tangents are sums too, taken one by one with jnp.sum (which JAX
    # can transpose, for jax.grad; the variadic reduce has no transpose rule)
    return _fused_sums(*primals), tuple(jnp.sum(t, axis=-1) for t in tangents)


def _gather(a: jax.Array, idx: jax.Array) -> jax.Array:
    """``a[..., idx]`` row-wise for ``a`` of shape ``(G,)`` or ``(C, G)`` and ``idx`` ``(C, k)``."""
    if a.ndim == 1:
        return a[idx]
    return jnp.take_along_axis(a, idx, axis=-1)


def fused_scores(
    names: tuple[str, ...],
    k: int,
    strict: bool,
    pred: jax.Array,
    truth: jax.Array,
    reference: jax.Array,
    weights: jax.Array,
    mask: jax.Array,
) -> dict[str, jax.Array]:
    """All requested core metrics of one chunk from shared per-row moments.

    Equal to the kernels of :mod:`vcjax.metrics` up to float rounding (same two-pass
    centred sums, same finishing steps ``metrics._*_from_moments``), but the inputs are
    read twice in total instead of several times per metric: pass 1 is one variadic
    reduction giving every mean and uncentred sum, pass 2 one giving every centred sum.
    ``pearson_delta_topk`` gathers its ``k`` genes (exact top-k, ties to the lower index)
    and runs the kernel on them. Inputs are ``(C, G)`` or shared ``(G,)`` arrays already in
    the working float dtype (``mask`` bool); outputs are ``(C,)``.
    """
    want = set(names)
    dtype = truth.dtype
    n_rows, g = truth.shape
    n = jnp.full((n_rows,), g, dtype)
    x = pred - reference  # predicted delta
    y = truth - reference  # true delta
    pass1: dict[str, jax.Array] = {}

    if want & {"mse", "mae", "wmse"}:
        e = pred - truth
        if "mse" in want:
            pass1["e2"] = e * e
        if "mae" in want:
            pass1["ae"] = jnp.abs(e)
        if "wmse" in want:
            pass1["we2"] = weights * (e * e)
    if want & {"wmse", "r2w_delta"}:
        pass1["sw"] = weights
    if want & {"pearson_delta", "r2_delta"}:
        pass1["sy"] = y
    if "pearson_delta" in want:
        pass1["sx"] = x
    if want & {"r2_delta", "r2w_delta"}:
        d = y - x  # the "truth - pred" of r2_score on deltas, as metrics.r2 computes it
        if "r2_delta" in want:
            pass1["d2"] = d * d
        if "r2w_delta" in want:
            pass1["wd2"] = weights * (d * d)
    if "r2w_delta" in want:
        pass1["swy"] = weights * y
    if "cosine_delta" in want:
        pass1.update(cxx=x * x, cyy=y * y, cxy=x * y)
    if "pearson_delta_degs" in want:
        m = mask.astype(dtype)
        pass1.update(sm=m, smx=m * x, smy=m * y)
    s = dict(zip(pass1, row_sums(list(pass1.values())))) if pass1 else {}

    # pass 2: centred sums around the pass-1 means
    pass2: dict[str, jax.Array] = {}
    if want & {"pearson_delta", "r2_delta"}:
        my = s["sy"] / jnp.maximum(n, 1.0)
        dy = y - my[:, None]
        pass2["yy"] = dy * dy
        if "pearson_delta" in want:
            mx = s["sx"] / jnp.maximum(n, 1.0)
            dx = x - mx[:, None]
            pass2.update(xx=dx * dx, xy=dx * dy)
    if "r2w_delta" in want:
        w_ok = (n >= 2) & (s["sw"] > 0)
        mw = s["swy"] / jnp.where(w_ok, s["sw"], 1.0)
        pass2["wyy"] = weights * jnp.square(y - mw[:, None])
    if "pearson_delta_degs" in want:
        nm = s["sm"]
        mxm = s["smx"] / jnp.maximum(nm, 1.0)
        mym = s["smy"] / jnp.maximum(nm, 1.0)
        dxm = (x - mxm[:, None]) * m
        dym = (y - mym[:, None]) * m
        pass2.update(mxx=dxm * dxm, myy=dym * dym, mxy=dxm * dym)
    s.update(zip(pass2, row_sums(list(pass2.values()))) if pass2 else {})

    out: dict[str, jax.Array] = {}
    positive = n > 0
    if "mse" in want:
        out["mse"] = safe_div(s["e2"], n, positive)
    if "mae" in want:
        out["mae"] = safe_div(s["ae"], n, positive)
    if "wmse" in want:
        out["wmse"] = safe_div(s["we2"], s["sw"], s["sw"] > 0)
    if "pearson_delta" in want:
        out["pearson_delta"] = pearson_from_moments(s["xx"], s["yy"], s["xy"], n, mx, my)
    if "pearson_delta_degs" in want:
        out["pearson_delta_degs"] = pearson_from_moments(s["mxx"], s["myy"], s["mxy"], nm, mxm, mym)
    if "r2_delta" in want:
        ok = n >= 2
        out["r2_delta"] = r2_from_moments(s["d2"], s["yy"], n, my, ok, strict=strict)
    if "r2w_delta" in want:
        out["r2w_delta"] = r2_from_moments(s["wd2"], s["wyy"], s["sw"], mw, w_ok, strict=strict)
    if "cosine_delta" in want:
        out["cosine_delta"] = cosine_from_moments(s["cxx"], s["cyy"], s["cxy"])
    if "pearson_delta_topk" in want:
        if k > g or k < 2:
            out["pearson_delta_topk"] = jnp.full((n_rows,), jnp.nan, dtype)
        else:
            idx = topk_indices(jnp.broadcast_to(weights, truth.shape), k)
            out["pearson_delta_topk"] = pearson_delta(
                _gather(pred, idx), _gather(truth, idx), _gather(reference, idx)
            )
    return {name: out[name] for name in names}
