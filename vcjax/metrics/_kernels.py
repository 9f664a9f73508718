"""Per-perturbation metric kernels.

Every function here is pure, jit-able and differentiable. Inputs are arrays of shape
``(..., G)`` (genes on the last axis); leading dimensions broadcast, so a ``(G,)``
reference can be scored against ``(P, G)`` predictions. Data arguments are positional,
options keyword-only. The kernels never loop over perturbations: batching lives in
:mod:`vcjax.engine`.

Definitions follow docs/metrics.md §5 (the Diversity-by-Design code path, Mejia, Miller et
al. 2025, arXiv:2506.22641), including its edge cases:

* Pearson correlations are NaN when either vector is constant on the genes considered or
  fewer than 2 genes are considered; results are clipped to ``[-1, 1]``.
* R² follows scikit-learn's ``r2_score(force_finite=True)``: a zero residual gives 1.0, a
  zero denominator with a non-zero residual gives 0.0. ``strict=True`` returns NaN for both
  forced values (the ratio is undefined when the truth is constant).
* Weighted metrics return NaN when all weights are zero (``Σw = 0``) — upstream either
  raises or divides 0/0 there.
* Any reduction over fewer genes than it needs (an empty ``where`` mask, ``k > G``) is NaN.

The perturbation-level gates of DbD (metrics forced to NaN when a perturbation has no
DEGs, or for the data-mean baseline) are applied by :func:`vcjax.evaluate`, not here.

Numerics: float32 by default, float64 when an input is float64 and x64 is enabled. Means
are taken first and deviations summed second (two-pass). Divisions inside ``jnp.where``
use the double-``where`` trick so gradients are finite everywhere, including perfect
predictions, constant truths and zero weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vcjax.metrics._moments import (
    cosine_from_moments,
    pearson_from_moments,
    r2_from_moments,
    safe_div,
)

__all__ = [
    "mse",
    "wmse",
    "mae",
    "pearson",
    "pearson_delta",
    "pearson_delta_degs",
    "pearson_delta_topk",
    "r2",
    "r2_delta",
    "r2w_delta",
    "cosine",
    "cosine_delta",
    "topk_mask",
    "topk_indices",
]


def _float_dtype(*arrays: ArrayLike | None) -> jnp.dtype:
    """float32, or float64 when an input is float64 and x64 is enabled."""
    present = [a for a in arrays if a is not None]
    return jnp.result_type(jnp.float32, *present)


def _cast(*arrays: ArrayLike | None) -> list[jax.Array | None]:
    dtype = _float_dtype(*arrays)
    return [None if a is None else jnp.asarray(a, dtype=dtype) for a in arrays]


def _mask(where: ArrayLike | None, like: jax.Array) -> jax.Array | None:
    """The gene mask as 0/1 floats broadcast to ``like``; None (all genes) when ``where`` is None."""
    if where is None:
        return None
    return jnp.broadcast_to(jnp.asarray(where, dtype=bool), like.shape).astype(like.dtype)


def _sum(v: jax.Array, m: jax.Array | None) -> jax.Array:
    """Sum over genes of ``v``, restricted to the 0/1 mask ``m`` when given."""
    return jnp.sum(v if m is None else m * v, axis=-1)


def _count(m: jax.Array | None, like: jax.Array) -> jax.Array:
    """Number of selected genes (``G`` when there is no mask)."""
    if m is None:
        return jnp.full(like.shape[:-1], like.shape[-1], dtype=like.dtype)
    return jnp.sum(m, axis=-1)


# --------------------------------------------------------------------------- errors


def mse(pred: ArrayLike, truth: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    r"""Mean squared error over genes, on the raw (pseudobulk) profiles.

    .. math:: \mathrm{MSE} = \frac{1}{G} \sum_g (\hat y_g - y_g)^2

    Args:
      pred: predicted profiles, ``(..., G)``.
      truth: true profiles, ``(..., G)``.
      where: optional boolean gene mask ``(..., G)``; the mean is over the selected genes.

    Returns:
      ``(...)`` array. NaN when no gene is selected.

    References:
      docs/metrics.md §5 (DbD ``analyses/common.py``).
    """
    pred, truth = _cast(pred, truth)
    err = jnp.square(pred - truth)
    m = _mask(where, err)
    n = _count(m, err)
    return safe_div(_sum(err, m), n, n > 0)


def mae(pred: ArrayLike, truth: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    r"""Mean absolute error over genes, :math:`\frac{1}{G}\sum_g |\hat y_g - y_g|`.

    Args / Returns as :func:`mse`. NaN when no gene is selected. The gradient of ``|x|``
    at 0 is taken as 0.
    """
    pred, truth = _cast(pred, truth)
    err = jnp.abs(pred - truth)
    m = _mask(where, err)
    n = _count(m, err)
    return safe_div(_sum(err, m), n, n > 0)


def wmse(
    pred: ArrayLike, truth: ArrayLike, weights: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""Weighted mean squared error with weights normalised to sum 1 over genes.

    .. math:: \mathrm{WMSE} = \sum_g \frac{w_g}{\sum_{g'} w_{g'}} (\hat y_g - y_g)^2

    With the DbD DEG weights (:func:`vcjax.deg.minmax_weights`), this concentrates the
    error on each perturbation's own differentially expressed genes. The result is
    invariant to scaling the weights.

    Args:
      pred: predicted profiles, ``(..., G)``.
      truth: true profiles, ``(..., G)``.
      weights: non-negative gene weights, ``(..., G)`` (need not sum to 1).
      where: optional boolean gene mask, applied on top of the weights.

    Returns:
      ``(...)`` array. NaN when the (masked) weights sum to 0.

    References:
      docs/metrics.md §5; Mejia, Miller et al., *Diversity by Design* (2025).
    """
    pred, truth, weights = _cast(pred, truth, weights)
    err = jnp.square(pred - truth)
    m = _mask(where, err)
    w = jnp.broadcast_to(weights, err.shape) if m is None else weights * m
    sw = jnp.sum(w, axis=-1)
    return safe_div(jnp.sum(w * err, axis=-1), sw, sw > 0)


# --------------------------------------------------------------------------- correlation


def pearson(x: ArrayLike, y: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    r"""Sample Pearson correlation over genes (the last axis), two-pass.

    .. math:: r = \frac{\sum_g (x_g-\bar x)(y_g-\bar y)}
                     {\sqrt{\sum_g (x_g-\bar x)^2 \sum_g (y_g-\bar y)^2}}

    Args:
      x, y: ``(..., G)`` arrays.
      where: optional boolean gene mask; the correlation uses the selected genes only.

    Returns:
      ``(...)`` array in ``[-1, 1]``. NaN when fewer than 2 genes are selected or either
      vector is constant on them (as ``np.corrcoef``).
    """
    x, y = _cast(x, y)
    x, y = jnp.broadcast_arrays(x, y)
    m = _mask(where, x)
    n = _count(m, x)
    n_safe = jnp.maximum(n, 1.0)
    mx = _sum(x, m) / n_safe
    my = _sum(y, m) / n_safe
    dx = x - mx[..., None]
    dy = y - my[..., None]
    if m is not None:
        dx, dy = dx * m, dy * m
    sxx = jnp.sum(dx * dx, axis=-1)
    syy = jnp.sum(dy * dy, axis=-1)
    sxy = jnp.sum(dx * dy, axis=-1)
    return pearson_from_moments(sxx, syy, sxy, n, mx, my)


def pearson_delta(
    pred: ArrayLike, truth: ArrayLike, reference: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""Pearson correlation of deltas, :math:`\mathrm{corr}(\hat y - r, y - r)` over genes.

    Both deltas are taken against the same ``reference`` (in DbD: ``u_ALL`` of half 1,
    the mean of all perturbations; against ``u_NTC`` this is the classic, control-biased
    "Pearson Δ").

    Args:
      pred: predicted profiles ``(..., G)``.
      truth: true profiles ``(..., G)``.
      reference: the delta reference ``(..., G)``, e.g. a ``(G,)`` vector.
      where: optional boolean gene mask.

    Returns:
      ``(...)``; NaN rules of :func:`pearson`.

    References:
      docs/metrics.md §5 ("Pearson Δ"); Mejia, Miller et al. (2025).
    """
    pred, truth, reference = _cast(pred, truth, reference)
    return pearson(pred - reference, truth - reference, where=where)


def pearson_delta_degs(
    pred: ArrayLike, truth: ArrayLike, reference: ArrayLike, mask: ArrayLike
) -> jax.Array:
    """Pearson correlation of deltas on a gene subset (e.g. the significant DEGs, docs/metrics.md §3).

    Equal to ``pearson_delta(pred, truth, reference, where=mask)``. NaN when the subset has
    fewer than 2 genes or a delta is constant on it; 2 genes always give ±1.
    """
    return pearson_delta(pred, truth, reference, where=mask)


_TOPK_BLOCKS = (32, 16, 64)  # block sizes tried by topk_indices, preferred first
_TOPK_MIN_GENES = 4096  # below this a single lax.top_k is as fast (per-row overhead)


def _nan_lowest(s: jax.Array) -> jax.Array:
    return jnp.where(jnp.isnan(s), -jnp.inf, s)


def _block_max(blocks: jax.Array) -> jax.Array:
    """Max over the last axis with NaN lowest.

    Masking NaN first (``where``) makes the max reduction several times slower on
    XLA:CPU, and XLA's unmasked max does not reliably propagate NaN there (vector max
    instructions drop it or not by operand order). So a chunk is tested for NaN with a
    sum (NaN propagates through addition; an ``inf - inf`` only costs the slow path) and
    only a chunk holding one pays for the masked max (``lax.cond``; under ``vmap`` both
    branches run, with the same result).
    """
    has_nan = jnp.isnan(jnp.sum(blocks))
    return jax.lax.cond(
        has_nan,
        lambda b: jnp.max(_nan_lowest(b), axis=-1),
        lambda b: jnp.max(b, axis=-1),
        blocks,
    )


def topk_indices(scores: jax.Array, k: int) -> jax.Array:
    """Indices ``(..., k)`` of the ``k`` largest ``scores`` (NaN lowest, ties to the lower index).

    Exactly the set ``lax.top_k`` returns, found without a full top-k over long rows: the
    row is cut into blocks of ``B`` genes; ranking genes by ``(value desc, index asc)`` (a
    strict total order), the top ``k`` genes lie in the ``k`` blocks whose best gene ranks
    highest (a gene outside them is preceded by the ``k`` best genes of those blocks).
    Blocks are contiguous, so ``lax.top_k`` on the block maxima ranks them in that order,
    and a final ``top_k`` over the ``k·B`` candidates, kept in gene order, breaks ties
    towards the lower gene index as on the full row. The returned order is unspecified.
    """
    g = scores.shape[-1]
    fits = [b for b in _TOPK_BLOCKS if 4 * k * b <= g] if g >= _TOPK_MIN_GENES else []
    if not fits:
        return jax.lax.top_k(_nan_lowest(scores), k)[1]
    block = next((b for b in fits if g % b == 0), fits[0])
    n_blocks = -(-g // block)
    s = scores
    if n_blocks * block != g:  # pad with -inf: padding ranks after every real gene
        pad = [(0, 0)] * (s.ndim - 1) + [(0, n_blocks * block - g)]
        s = jnp.pad(s, pad, constant_values=-jnp.inf)
    blocks = s.reshape(s.shape[:-1] + (n_blocks, block))
    _, best = jax.lax.top_k(_block_max(blocks), k)
    best = jnp.sort(best, axis=-1)  # candidates in gene order
    cand = _nan_lowest(jnp.take_along_axis(blocks, best[..., None], axis=-2))
    _, pos = jax.lax.top_k(cand.reshape(cand.shape[:-2] + (k * block,)), k)
    return jnp.take_along_axis(best, pos // block, axis=-1) * block + pos % block


def topk_mask(scores: ArrayLike, *, k: int) -> jax.Array:
    """Boolean mask of the ``k`` largest ``scores`` along the last axis.

    Ties are broken towards the lower gene index (as a stable descending sort). NaN scores
    rank below every number. Requires ``1 <= k <= G`` (checked by callers).
    """
    scores = jnp.asarray(scores)
    idx = topk_indices(scores, k)
    flat_idx = idx.reshape(-1, k)
    rows = jnp.arange(flat_idx.shape[0])[:, None]
    g = scores.shape[-1]
    out = jnp.zeros((flat_idx.shape[0], g), dtype=bool).at[rows, flat_idx].set(True)
    return out.reshape(scores.shape)


def pearson_delta_topk(
    pred: ArrayLike, truth: ArrayLike, reference: ArrayLike, weights: ArrayLike, *, k: int = 20
) -> jax.Array:
    """Pearson correlation of deltas on the ``k`` genes with the largest ``weights``.

    Pass the DEG weights, or ``|t|`` as docs/metrics.md §6 does (the
    ranking is the same). Ties go to the lower gene index.

    Returns:
      ``(...)``; all-NaN when ``k`` is larger than the number of genes or ``k < 2``.
    """
    pred, truth, reference, weights = _cast(pred, truth, reference, weights)
    g = pred.shape[-1]
    shape = jnp.broadcast_shapes(pred.shape, truth.shape, reference.shape, weights.shape)[:-1]
    if k > g or k < 2:
        return jnp.full(shape, jnp.nan, dtype=pred.dtype)
    weights = jnp.broadcast_to(weights, shape + (g,))
    return pearson_delta(pred, truth, reference, where=topk_mask(weights, k=k))


# --------------------------------------------------------------------------- R²


def r2(
    truth: ArrayLike,
    pred: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    strict: bool = False,
) -> jax.Array:
    r"""Coefficient of determination over genes, scikit-learn ``r2_score`` semantics.

    .. math:: R^2 = 1 - \frac{\sum_g w_g (y_g - \hat y_g)^2}{\sum_g w_g (y_g - \bar y_w)^2},
              \quad \bar y_w = \frac{\sum_g w_g y_g}{\sum_g w_g}

    Note the argument order: **truth first**, as ``r2_score(y_true, y_pred)``.

    Edge cases (``force_finite=True``): residual 0 → 1.0 (even with a zero denominator);
    zero denominator (constant truth, or all weight on one value) with a non-zero residual
    → 0.0. With ``strict=True`` both forced values become NaN when the denominator is 0.
    NaN when fewer than 2 genes are selected or the weights sum to 0.
    """
    truth, pred, weights = _cast(truth, pred, weights)
    truth, pred = jnp.broadcast_arrays(truth, pred)
    m = _mask(where, truth)
    n = _count(m, truth)
    if weights is None:
        w = jnp.ones_like(truth) if m is None else m
    else:
        w = jnp.broadcast_to(weights, truth.shape) if m is None else m * weights
    sw = jnp.sum(w, axis=-1)
    ok = (n >= 2) & (sw > 0)
    mean = jnp.sum(w * truth, axis=-1) / jnp.where(ok, sw, 1.0)
    num = jnp.sum(w * jnp.square(truth - pred), axis=-1)
    den = jnp.sum(w * jnp.square(truth - mean[..., None]), axis=-1)
    return r2_from_moments(num, den, sw, mean, ok, strict=strict)


def r2_delta(
    pred: ArrayLike,
    truth: ArrayLike,
    reference: ArrayLike,
    *,
    where: ArrayLike | None = None,
    strict: bool = False,
) -> jax.Array:
    r"""R² of deltas, :math:`R^2(y - r,\ \hat y - r)` (truth delta first, sklearn semantics).

    Args:
      pred, truth, reference: ``(..., G)`` arrays (data positional as everywhere in vcjax;
        internally the truth delta is the "y_true" of ``r2_score``).
      where: optional gene mask.
      strict: NaN instead of sklearn's forced 1.0/0.0 when the truth delta is constant.

    Returns:
      ``(...)``; see :func:`r2` for the NaN rules.

    References:
      docs/metrics.md §5 ("R² Δ").
    """
    pred, truth, reference = _cast(pred, truth, reference)
    return r2(truth - reference, pred - reference, where=where, strict=strict)


def r2w_delta(
    pred: ArrayLike,
    truth: ArrayLike,
    reference: ArrayLike,
    weights: ArrayLike,
    *,
    where: ArrayLike | None = None,
    strict: bool = False,
) -> jax.Array:
    r"""Weighted R² of deltas, R²w(Δ): ``r2_score(Δ, Δ̂, sample_weight=w)`` over genes.

    .. math:: R^2_w = 1 - \frac{\sum_g w_g(\Delta_g - \hat\Delta_g)^2}
                               {\sum_g w_g(\Delta_g - \bar\Delta_w)^2}

    with :math:`\Delta = y - r`, :math:`\hat\Delta = \hat y - r`. With the DbD DEG weights
    this scores each perturbation on its own DEGs and is not fooled by predicting the
    dataset mean. Invariant to scaling the weights; uniform weights give :func:`r2_delta`.

    Returns:
      ``(...)``; NaN when the weights sum to 0 or fewer than 2 genes are selected; forced
      values as :func:`r2` (``strict=True`` makes them NaN).

    References:
      docs/metrics.md §5 ("weighted R² Δ"); Mejia, Miller et al. (2025).
    """
    pred, truth, reference, weights = _cast(pred, truth, reference, weights)
    return r2(truth - reference, pred - reference, weights=weights, where=where, strict=strict)


# --------------------------------------------------------------------------- cosine


def cosine(x: ArrayLike, y: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    r"""Cosine similarity over genes, :math:`\frac{x\cdot y}{\|x\|\,\|y\|}`.

    NaN when either vector is zero on the selected genes.
    """
    x, y = _cast(x, y)
    x, y = jnp.broadcast_arrays(x, y)
    m = _mask(where, x)
    sxx = _sum(x * x, m)
    syy = _sum(y * y, m)
    sxy = _sum(x * y, m)
    return cosine_from_moments(sxx, syy, sxy)


def cosine_delta(
    pred: ArrayLike, truth: ArrayLike, reference: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""Cosine similarity of deltas, :math:`\cos(\hat y - r,\ y - r)` (PerturBench).

    NaN when either delta is identically zero.
    """
    pred, truth, reference = _cast(pred, truth, reference)
    return cosine(pred - reference, truth - reference, where=where)
