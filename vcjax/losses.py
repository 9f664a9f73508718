"""Training losses built on the :mod:`vcjax.metrics` kernels (optax conventions).

Every loss here calls the same kernel that scores a model, so a model trained with
:func:`wmse_loss` optimises exactly the WMSE that :func:`vcjax.evaluate` reports, and
``1 - r2w_loss`` *is* :func:`vcjax.metrics.r2w_delta` wherever the metric is defined.

Conventions (as ``optax.losses``):

* inputs are ``(..., G)`` arrays with genes on the last axis and any leading batch
  dimensions; the losses reduce over genes only and return one value per example, shape
  ``(...)``. The caller reduces over the batch (``jnp.mean``). :func:`gears_loss` is the
  exception by definition: it is a *minibatch* loss (per-condition averaging over the cells
  of a batch), so it reduces the cell axis too and returns ``(...)`` for ``(..., B, G)``.
* data are positional, options keyword-only; all options are static Python values, so
  every loss is ``jax.jit``-, ``jax.vmap``- and ``jax.grad``/``jax.jacfwd``-compatible.
* a loss is never NaN for finite inputs, and its gradient is finite there, including
  perfect predictions, all-zero weights and constant targets. Where the underlying metric
  is undefined **on finite inputs** (NaN by the rules of docs/metrics.md §5: no selected
  gene, ``Σw = 0``, a constant true delta, fewer than 2 genes), the loss uses a documented
  finite fallback (see each function).
* non-finite inputs propagate: a NaN or ±Inf anywhere in an example's predictions,
  targets, reference, weights or control (genes outside ``where`` included: the kernels
  multiply by the mask) gives a NaN loss — or +Inf where that is the exact value, e.g. an
  infinite prediction in a squared error — and a non-finite gradient, never a fallback.
  A diverging model therefore never logs a finite loss. The only inputs that are ignored
  are :func:`gears_loss`'s padding cells (``cell_mask=False``), which are not data.

References:
  docs/metrics.md §5 (metrics) and §8 (GEARS loss); Mejia, Miller et al., *Diversity by
  Design: Addressing Mode Collapse Improves scRNA-seq Perturbation Modeling on
  Well-Calibrated Metrics*, arXiv:2506.22641 (2025); Roohani, Huang & Leskovec, *GEARS*,
  Nat. Biotechnol. 42:927–935 (2024).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vcjax import metrics as M

__all__ = ["mse_loss", "wmse_loss", "r2w_loss", "gears_loss"]

Fallback = Literal["unweighted", "zero"]


def _check_fallback(fallback: str) -> None:
    if fallback not in ("unweighted", "zero"):
        raise ValueError(f"fallback must be 'unweighted' or 'zero', got {fallback!r}")


def _all_finite(*arrays: ArrayLike | None) -> jax.Array:
    """Per example: True where every value of every input (all genes) is finite.

    The inputs broadcast to a common ``(..., G)`` shape; the result has shape ``(...)``.
    """
    present = [jnp.asarray(a) for a in arrays if a is not None]
    shape = jnp.broadcast_shapes(*(a.shape for a in present))
    ok = jnp.ones(shape[:-1], bool)
    for a in present:
        ok = ok & jnp.all(jnp.broadcast_to(jnp.isfinite(a), shape), axis=-1)
    return ok


def _fallback(value: jax.Array, finite: jax.Array, replacement: ArrayLike = 0.0) -> jax.Array:
    """The loss ``value`` with its finite fallback where it is NaN **on finite inputs**.

    ``finite`` (per example, :func:`_all_finite`) says whether the example's inputs are all
    finite. There a NaN ``value`` (the metric is undefined) becomes ``replacement``
    (0 by default; the kernels' NaN branches carry zero gradient). Elsewhere ``value`` is
    returned as it is — NaN or ±Inf from the non-finite input — and if it happened to be
    finite it is made NaN (value only: the gradient is left to the kernel, which is itself
    non-finite there), so a non-finite input never yields a finite loss.
    """
    value = jnp.asarray(value)
    undefined = finite & jnp.isnan(value)
    out = jnp.where(undefined, jnp.asarray(replacement, value.dtype), value)
    poison = jnp.where(finite | ~jnp.isfinite(out), 0.0, jnp.nan).astype(out.dtype)
    return out + jax.lax.stop_gradient(poison)


def _weight_sum(weights: ArrayLike, *arrays: ArrayLike, where: ArrayLike | None) -> jax.Array:
    """``Σ_g w_g`` over the selected genes, at the broadcast example shape of ``arrays``."""
    shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in (weights, *arrays)))
    w = jnp.broadcast_to(jnp.asarray(weights), shape)
    if where is not None:
        w = jnp.where(jnp.broadcast_to(jnp.asarray(where, bool), shape), w, 0)
    return jnp.sum(w, axis=-1)


# --------------------------------------------------------------------------- MSE / WMSE


def mse_loss(
    predictions: ArrayLike, targets: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""Mean squared error over genes, per example: :func:`vcjax.metrics.mse`.

    .. math:: \ell = \frac{1}{G} \sum_g (\hat y_g - y_g)^2

    Args:
      predictions: predicted profiles ``(..., G)``.
      targets: target profiles ``(..., G)``.
      where: optional boolean gene mask broadcastable to ``(..., G)``; the mean is over the
        selected genes.

    Returns:
      ``(...)`` per-example loss. An example with no selected gene has loss 0 (the metric
      is NaN there) and zero gradient, when its inputs are finite. A NaN anywhere in the
      example gives NaN, an infinite prediction or target +Inf (``Inf − Inf``: NaN).

    References:
      docs/metrics.md §5 ("MSE").
    """
    finite = _all_finite(predictions, targets)
    return _fallback(M.mse(predictions, targets, where=where), finite)


def wmse_loss(
    predictions: ArrayLike,
    targets: ArrayLike,
    weights: ArrayLike,
    *,
    where: ArrayLike | None = None,
    fallback: Fallback = "unweighted",
) -> jax.Array:
    r"""Weighted MSE with weights normalised per example: :func:`vcjax.metrics.wmse`.

    .. math:: \ell = \sum_g \frac{w_g}{\sum_{g'} w_{g'}} (\hat y_g - y_g)^2

    With the DbD DEG weights ``w_p = minmax(|t_p|)²`` (:func:`vcjax.deg.minmax_weights`) each
    perturbation's error is concentrated on its own differentially expressed genes, which
    is the paper's remedy for mode collapse. The loss is invariant to scaling the weights,
    and every example has the same total weight.

    Args:
      predictions: predicted profiles ``(..., G)``.
      targets: target profiles ``(..., G)``.
      weights: non-negative gene weights broadcastable to ``(..., G)``; need not sum to 1.
      where: optional boolean gene mask, applied on top of the weights.
      fallback: what an example whose (selected) weights sum to 0 contributes, where the
        metric is NaN: ``"unweighted"`` (default) — the plain :func:`mse_loss` on the
        selected genes (uniform weights); ``"zero"`` — loss 0 with zero gradient. (A
        negative weight sum, outside the weights' domain, is treated the same way.)

    Returns:
      ``(...)`` per-example loss, finite for finite inputs. Non-finite inputs propagate
      (module docstring): a NaN prediction, target or weight gives NaN, never a fallback;
      an infinite error on a gene with positive weight gives +Inf.

    References:
      docs/metrics.md §5 ("WMSE"); Mejia, Miller et al., arXiv:2506.22641 (2025).
    """
    _check_fallback(fallback)
    finite = _all_finite(predictions, targets, weights)
    value = M.wmse(predictions, targets, weights, where=where)
    if fallback == "unweighted":
        # sw <= 0 is False for a NaN sum (a non-finite weight): the kernel's NaN is kept
        sw = _weight_sum(weights, predictions, targets, where=where)
        value = jnp.where(sw <= 0, M.mse(predictions, targets, where=where), value)
    return _fallback(value, finite)


# --------------------------------------------------------------------------- R²w(Δ)


def r2w_loss(
    predictions: ArrayLike,
    targets: ArrayLike,
    reference: ArrayLike,
    weights: ArrayLike,
    *,
    where: ArrayLike | None = None,
    fallback: Fallback = "unweighted",
) -> jax.Array:
    r"""One minus the weighted R² of deltas: ``1 - vcjax.metrics.r2w_delta``.

    .. math:: \ell = 1 - R^2_w(\Delta) =
              \frac{\sum_g w_g(\Delta_g - \hat\Delta_g)^2}{\sum_g w_g(\Delta_g - \bar\Delta_w)^2},
              \quad \Delta = y - r,\ \hat\Delta = \hat y - r,\
              \bar\Delta_w = \frac{\sum_g w_g \Delta_g}{\sum_g w_g}

    i.e. a weighted squared error normalised by the weighted spread of the true delta, so
    every perturbation counts with the same scale whatever the size of its effect. The
    numerator does not depend on ``reference``; the denominator does (unless the reference
    is constant across genes).

    Finite fallbacks (the loss is never NaN for finite inputs; they never apply to an
    example with a non-finite input, whose loss is NaN or +Inf — e.g. an infinite
    prediction on a weighted gene):

    * ``Σ_g w_g = 0`` (NaN metric): ``fallback="unweighted"`` (default, as CellSimBench's
      ``weighted_r2``) uses the unweighted ``1 - R²(Δ)`` on the selected genes;
      ``fallback="zero"`` gives loss 0 with zero gradient.
    * a constant true delta (zero denominator) follows scikit-learn's forced values as the
      metric does: loss 0 for an exact prediction, else 1, both with zero gradient.
    * fewer than 2 selected genes: loss 0, zero gradient.

    Args:
      predictions: predicted profiles ``(..., G)``.
      targets: target profiles ``(..., G)``.
      reference: the delta reference broadcastable to ``(..., G)`` (DbD: ``u_ALL``, the mean
        of the per-condition means).
      weights: non-negative gene weights broadcastable to ``(..., G)``.
      where: optional boolean gene mask.
      fallback: ``"unweighted"`` or ``"zero"``, see above.

    Returns:
      ``(...)`` per-example loss in ``[0, ∞)``; 0 is a perfect prediction.

    References:
      docs/metrics.md §5 ("weighted R² Δ"); Mejia, Miller et al., arXiv:2506.22641 (2025);
      CellSimBench ``cellsimbench/core/data_manager.py`` (unweighted fallback).
    """
    _check_fallback(fallback)
    finite = _all_finite(predictions, targets, reference, weights)
    r2w = M.r2w_delta(predictions, targets, reference, weights, where=where)
    if fallback == "unweighted":
        # sw <= 0 is False for a NaN sum (a non-finite weight): the kernel's NaN is kept
        sw = _weight_sum(weights, predictions, targets, reference, where=where)
        r2w = jnp.where(sw <= 0, M.r2_delta(predictions, targets, reference, where=where), r2w)
    return _fallback(1.0 - r2w, finite)


# --------------------------------------------------------------------------- GEARS


def gears_loss(
    predictions: ArrayLike,
    targets: ArrayLike,
    conditions: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    scale: float = 100.0,
    mode: Literal["mse", "default"] = "mse",
    control: ArrayLike | None = None,
    gamma: float = 2.0,
    direction_lambda: float = 1e-3,
    where: ArrayLike | None = None,
    cell_mask: ArrayLike | None = None,
) -> jax.Array:
    r"""The GEARS training loss with optional DbD DEG weights (docs/metrics.md §8).

    For a minibatch of cells ``i`` with condition ``p(i)``, ``B`` the distinct conditions in
    the batch, ``n_p`` the batch cells of ``p`` and ``G'_i`` the genes used for cell ``i``:

    .. math::
       L = \frac{1}{|B|} \sum_{p \in B} \frac{1}{n_p} \sum_{i: p(i)=p}
           \Big[ \frac{1}{G'_i}\sum_g \lambda_{ig}\, |\hat y_{ig} - y_{ig}|^{e}
           + \mathrm{DIR}_i \Big]

    with ``λ = scale · w`` (DbD: ``100 · w_p``, the §3.2 weights **not** normalised; ``λ = 1``
    without weights), ``e = 2`` in ``mode="mse"`` and the autofocus exponent ``e = 2 + γ``
    in ``mode="default"`` (original GEARS, ``γ = 2``), where also

    .. math:: \mathrm{DIR}_i = \frac{1}{G'_i}\sum_g \lambda_{ig}\,\lambda_{dir}
              \big(\operatorname{sign}(y_{ig} - c_g) - \operatorname{sign}(\hat y_{ig} - c_g)\big)^2

    with ``c`` the control mean. The sign term has zero gradient (as in PyTorch).

    Per-condition averaging is done without Python loops or a static number of
    conditions: ``n_{p(i)} = Σ_j [p(j) = p(i)]`` over the batch and
    ``|B| = Σ_i 1/n_{p(i)}``, so the loss is jit-able for any labels.

    Args:
      predictions: predicted cells ``(..., B, G)``.
      targets: target cells ``(..., B, G)``.
      conditions: integer condition ids ``(..., B)`` (e.g. from ``np.unique(labels,
        return_inverse=True)``); only equality matters.
      weights: DEG weights ``w`` broadcastable to ``(..., B, G)`` — per cell, i.e. the
        caller gathers ``w_table[conditions]`` — or None for ``λ = 1``.
      scale: ``λ = scale · weights`` (100 in DbD/GEARS). Ignored without weights.
      mode: ``"mse"`` (DbD "WMSE loss" with weights, plain MSE without) or ``"default"``
        (GEARS autofocus + direction loss).
      control: control mean ``(G,)`` (or broadcastable), required for ``mode="default"``.
      gamma: autofocus exponent increment, ``e = 2 + γ`` (``mode="default"``), ``γ >= 0``.
      direction_lambda: weight of the direction term (``mode="default"``).
      where: optional boolean gene mask ``(..., B, G)`` — GEARS' "retained (non-dropout)
        genes" of each cell's condition; ``G'_i`` is its count. Default: all genes.
      cell_mask: optional boolean ``(..., B)``: cells that are padding (False) are ignored,
        also in ``|B|`` and ``n_p``.

    Returns:
      ``(...)`` the minibatch loss (a scalar for a single ``(B, G)`` batch). 0 for a batch
      with no valid cell; cells with no selected gene contribute 0.

    References:
      docs/metrics.md §8 (DbD ``analyses/modeling_metrics/gears_icml.py::loss_fct``); Roohani et
      al., GEARS (2024); Mejia, Miller et al., arXiv:2506.22641 (2025).
    """
    if mode not in ("mse", "default"):
        raise ValueError(f"mode must be 'mse' or 'default', got {mode!r}")
    if mode == "default" and control is None:
        raise ValueError("gears_loss(mode='default') needs control= (the control mean)")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    pred = jnp.asarray(predictions)
    dtype = jnp.result_type(jnp.float32, pred, targets)
    pred = pred.astype(dtype)
    y = jnp.asarray(targets, dtype)
    pred, y = jnp.broadcast_arrays(pred, y)
    if pred.ndim < 2:
        raise ValueError(f"gears_loss expects (..., B, G) cells, got shape {pred.shape}")
    shape = pred.shape
    gene_mask = None if where is None else jnp.broadcast_to(jnp.asarray(where, bool), shape)
    # λ = scale·w in the weights' own precision (DbD multiplies its float32 weights by 100
    # in float32), then promoted
    lam = (
        None
        if weights is None
        else jnp.broadcast_to((scale * jnp.asarray(weights)).astype(dtype), shape)
    )

    zero = jnp.zeros((), dtype)

    def mean_over_genes(s: jax.Array) -> jax.Array:
        """``(1/G'_i) Σ_g λ_ig s_ig²`` per cell, on the metric kernels.

        Without weights this is :func:`vcjax.metrics.mse` of ``s`` against 0; with weights it
        is the normalised :func:`vcjax.metrics.wmse` times the mean weight ``Σλ/G'`` (λ is
        *not* normalised in GEARS). A cell with ``Σλ = 0`` or no selected gene gives 0.
        """
        if lam is None:
            return _fallback(M.mse(s, zero, where=gene_mask), finite)
        sum_lam = _weight_sum(lam, s, where=gene_mask)
        count = (
            jnp.full(shape[:-1], shape[-1], dtype)
            if gene_mask is None
            else jnp.sum(gene_mask, axis=-1).astype(dtype)
        )
        wm = _fallback(M.wmse(s, zero, lam, where=gene_mask), finite)
        return wm * (sum_lam / jnp.where(count > 0, count, 1.0))

    # per cell: are its predictions, targets, weights (and control) all finite?
    finite = _all_finite(pred, y, lam, None if mode == "mse" else control)

    # λ|d|^e = λ s² with s = |d|^(e/2); integer powers stay exact (s = d for e = 2, d² for 4)
    d = pred - y
    half = (2.0 if mode == "mse" else 2.0 + float(gamma)) / 2.0
    if float(half).is_integer():
        s = jax.lax.integer_pow(d, int(half))
    else:
        s = jnp.abs(d) ** half  # half > 1: finite zero gradient at d = 0
    per_cell = mean_over_genes(s)
    if mode == "default":
        c = jnp.asarray(control, dtype)
        direction = jnp.sign(y - c) - jnp.sign(pred - c)  # zero gradient, as torch.sign
        per_cell = per_cell + direction_lambda * mean_over_genes(direction)

    cond = jnp.asarray(conditions)
    valid = (
        jnp.ones(shape[:-1], dtype)
        if cell_mask is None
        else jnp.broadcast_to(jnp.asarray(cell_mask, bool), shape[:-1]).astype(dtype)
    )
    same = (cond[..., :, None] == cond[..., None, :]).astype(dtype)  # (..., B, B)
    n_same = jnp.einsum("...ij,...j->...i", same, valid)  # n_{p(i)} among valid cells
    inv_n = valid / jnp.where(n_same > 0, n_same, 1.0)
    n_conditions = jnp.sum(inv_n, axis=-1)  # |B|
    # padding cells (cell_mask False) are not data: their values, finite or not, are ignored
    total = jnp.sum(jnp.where(valid > 0, inv_n * per_cell, 0.0), axis=-1)
    return jnp.where(n_conditions > 0, total / jnp.where(n_conditions > 0, n_conditions, 1.0), 0.0)
