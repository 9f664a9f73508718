"""Vectorised Wilcoxon rank-sum (Mann–Whitney U) tests of many groups against one control.

This is the DE test of cell-eval 0.8.2 (``pdex`` ``mode="ref"`` → ``numba_mwu``), which
equals ``scipy.stats.mannwhitneyu(group, control, method="asymptotic")`` per gene: the
normal approximation with tie correction and a continuity correction of 0.5, two-sided,
p clipped to ``[0, 1]`` (CELLEVAL_METRICS.md §0). With ``continuity=False`` and
``tie_correct=False`` the z-score is scanpy's ``rank_genes_groups(method="wilcoxon")``
score against a reference group.

Algorithm (no ranking of the pooled sample per group, no loop over groups). For one gene,
let ``c`` be the control values sorted once (ascending) and ``x_i`` the values of the
group's cells:

* ``L_i = #{c < x_i}`` and ``R_i = #{c <= x_i}`` by ``searchsorted`` (left / right), and
  ``b_i = R_i - L_i`` is the number of control values tied with ``x_i``.
* ``U = Σ_i (L_i + b_i / 2)``: each group value beats the smaller control values and
  half-beats the tied ones. This is ``R_1 - n(n+1)/2`` with mid-ranks.
* Tie term ``T = Σ_v (t_v³ - t_v)`` over the distinct values ``v`` of the pooled sample,
  ``t_v = a_v + b_v`` (``a_v`` group count, ``b_v`` control count). Expanding the cube,
  ``T = Σ_{j∈ctrl} (b_j² - 1) + Σ_{i∈group} (a_i² - 1 + 3 a_i b_i + 3 b_i²)``: a
  control-only constant per gene plus a sum over the group's own cells, where ``a_i`` is
  the size of ``x_i``'s run of equal values inside its group (from one sort of all cells
  by ``(group, value)``).
* ``μ = nm/2``, ``σ² = nm/12 · ((N+1) - T / (N(N-1)))``, ``N = n + m``;
  ``p = min(1, 2 Φ(-(|U - μ| - 0.5) / σ))`` (scipy's formula: ``U`` enters as
  ``max(U₁, U₂) = μ + |U - μ|``).

Cost per gene: one sort of the control, one sort of the perturbed cells and two binary
searches per perturbed cell, ``O((N_cells + m) log m)``, shared by all groups.

NaN rules: a group with no cells gives NaN statistics and p-values. When every value of
a group and of the control is equal (``σ = 0``), ``p = 1`` with the continuity
correction (as scipy / pdex) and NaN without it; the z-score is 0 there.

Precision: the counts are exact in float32 up to ``n·m < 2²⁴``; the tie term is rounded
to float32, so p-values carry about ``1e-6 · (1 + z²)`` relative error, and p-values
below ~1e-38 (``|z| > 13``) underflow to 0 in float32. Run under ``jax.enable_x64()``
with float64 inputs for float64 p-values.

References:
  Mann & Whitney (1947); scipy.stats.mannwhitneyu; cell-eval 0.8.2 / pdex 0.3.0
  (CELLEVAL_METRICS.md §0); scanpy ``tl.rank_genes_groups`` (``method="wilcoxon"``).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr
from jax.typing import ArrayLike

__all__ = ["MannWhitneyResult", "mannwhitney_vs_control", "bh_fdr", "log2_fold_change"]


class MannWhitneyResult(NamedTuple):
    """Per (group, gene) results, each ``(n_groups, G)``.

    Attributes:
      statistic: ``U`` of the group (scipy's ``statistic`` for ``mannwhitneyu(group, ctrl)``).
      zscore: ``(U - μ ∓ ½) / σ`` (continuity correction towards 0 when enabled); scanpy's
        wilcoxon ``scores`` with ``continuity=False``.
      pvalue: two-sided asymptotic p-value.
      n: cells per group, ``(n_groups,)``.
    """

    statistic: jax.Array
    zscore: jax.Array
    pvalue: jax.Array
    n: jax.Array


def _run_lengths(new_run: jax.Array) -> jax.Array:
    """Length of the run each element belongs to, given a (N, G) mask of run starts."""
    n = new_run.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)[:, None]
    start = jax.lax.cummax(jnp.where(new_run, idx, 0), axis=0)
    is_end = jnp.concatenate([new_run[1:], jnp.ones_like(new_run[:1])], axis=0)
    end = jax.lax.cummin(jnp.where(is_end, idx, n), axis=0, reverse=True)
    return end - start + 1


_searchsorted_cols = {
    side: jax.vmap(partial(jnp.searchsorted, side=side), in_axes=(1, 1), out_axes=1)
    for side in ("left", "right")
}


@partial(jax.jit, static_argnames=("n_groups", "continuity", "tie_correct"))
def mannwhitney_vs_control(
    cells: ArrayLike,
    labels: ArrayLike,
    control: ArrayLike,
    *,
    n_groups: int,
    continuity: bool = True,
    tie_correct: bool = True,
) -> MannWhitneyResult:
    r"""Two-sided Mann–Whitney U test of every group against the control, for every gene.

    .. math:: U_{pg} = \sum_{i \in p} \big(\#\{c_g < x_{ig}\} + \tfrac12 \#\{c_g = x_{ig}\}\big),
              \quad z = \frac{|U - nm/2| - \tfrac12}{\sigma}, \quad p = \min(1, 2\Phi(-z))

    Args:
      cells: perturbed cells, ``(N, G)`` (any order).
      labels: integer group of each cell, ``(N,)``, values in ``[0, n_groups)``. Cells with
        a label outside that range are ignored.
      control: control cells, ``(m, G)``.
      n_groups: number of groups (static).
      continuity: apply the 0.5 continuity correction (scipy / cell-eval default).
      tie_correct: apply the tie correction to the variance (scipy / cell-eval: yes;
        scanpy's default: no).

    Returns:
      :class:`MannWhitneyResult` with ``(n_groups, G)`` arrays.

    References:
      scipy.stats.mannwhitneyu(method="asymptotic"); CELLEVAL_METRICS.md §0.
    """
    dtype = jnp.result_type(jnp.float32, cells, control)
    cells = jnp.asarray(cells, dtype)
    control = jnp.asarray(control, dtype)
    labels = jnp.asarray(labels, jnp.int32)
    valid = (labels >= 0) & (labels < n_groups)
    labels = jnp.where(valid, labels, n_groups)  # invalid cells go to a dropped segment
    m = control.shape[0]
    g = cells.shape[1]

    # control: sorted once per gene, and its own tie runs
    ctrl = jnp.sort(control, axis=0)
    ctrl_new = jnp.concatenate([jnp.ones((1, g), bool), ctrl[1:] != ctrl[:-1]], axis=0)
    bc = _run_lengths(ctrl_new).astype(dtype)
    ctrl_ties = jnp.sum(bc * bc - 1.0, axis=0)  # Σ_j (b_j² - 1) = Σ_v (b_v³ - b_v)

    # group cells sorted by (label, value): label order is the same in every gene column
    lab2d = jnp.broadcast_to(labels[:, None], cells.shape)
    lab_s, x = jax.lax.sort((lab2d, cells), dimension=0, num_keys=2)
    seg = lab_s[:, 0]
    new = jnp.concatenate(
        [jnp.ones((1, g), bool), (x[1:] != x[:-1]) | (lab_s[1:] != lab_s[:-1])], axis=0
    )
    a = _run_lengths(new).astype(dtype)
    left = _searchsorted_cols["left"](ctrl, x).astype(dtype)
    right = _searchsorted_cols["right"](ctrl, x).astype(dtype)
    b = right - left

    nseg = n_groups + 1
    u = jax.ops.segment_sum(left + 0.5 * b, seg, num_segments=nseg)[:n_groups]
    ties = jax.ops.segment_sum(a * a - 1.0 + 3.0 * a * b + 3.0 * b * b, seg, num_segments=nseg)
    ties = ties[:n_groups] + ctrl_ties
    n = jax.ops.segment_sum(jnp.ones_like(seg, dtype=dtype), seg, num_segments=nseg)[:n_groups]

    nn = n[:, None]
    big_n = nn + m
    mu = nn * m / 2.0
    var = nn * m / 12.0 * (big_n + 1.0)
    if tie_correct:
        denom = jnp.where(big_n > 1, big_n * (big_n - 1.0), 1.0)
        var = nn * m / 12.0 * ((big_n + 1.0) - ties / denom)
    # σ² = 0 exactly when every value is tied; the tie term carries rounding, so treat a
    # variance within a few ulps of the untied variance's scale as zero
    scale = nn * m / 12.0 * (big_n + 1.0)
    pos = var > 16 * jnp.finfo(dtype).eps * scale
    var = jnp.where(pos, var, 0.0)
    sigma = jnp.sqrt(var)
    safe_sigma = jnp.where(pos, sigma, 1.0)
    d = u - mu
    cc = 0.5 if continuity else 0.0
    # scipy: z = (max(U1, U2) - mu - cc) / sigma, which is negative when |d| < cc
    z_abs = jnp.where(
        pos, (jnp.abs(d) - cc) / safe_sigma, jnp.where(jnp.abs(d) > cc, jnp.inf, -jnp.inf)
    )
    if not continuity:
        z_abs = jnp.where(pos | (d != 0), z_abs, jnp.nan)
    p = jnp.clip(2.0 * ndtr(-z_abs), 0.0, 1.0)
    zscore = jnp.where(pos, (d - cc * jnp.sign(d)) / safe_sigma, 0.0)
    empty = nn == 0
    nan = jnp.array(jnp.nan, dtype)
    return MannWhitneyResult(
        statistic=jnp.where(empty, nan, u),
        zscore=jnp.where(empty, nan, zscore),
        pvalue=jnp.where(empty, nan, p),
        n=n,
    )


def bh_fdr(pvalues: ArrayLike) -> jax.Array:
    r"""Benjamini–Hochberg adjusted p-values over the last axis (genes).

    .. math:: q_{(i)} = \min\big(1, \min_{j \ge i} p_{(j)} \, G / j\big)

    Equal to ``scipy.stats.false_discovery_control(p)`` row by row. NaN p-values are
    treated as 1 for the ranking and stay NaN in the output.

    Args:
      pvalues: ``(..., G)``.

    Returns:
      ``(..., G)`` adjusted p-values.
    """
    p = jnp.asarray(pvalues)
    p = jnp.asarray(p, jnp.result_type(jnp.float32, p))
    isnan = jnp.isnan(p)
    q = jnp.where(isnan, 1.0, p)
    g = q.shape[-1]
    order = jnp.argsort(q, axis=-1)
    qs = jnp.take_along_axis(q, order, axis=-1)
    ranks = jnp.arange(1, g + 1, dtype=q.dtype)
    adj = jax.lax.cummin(qs * g / ranks, axis=q.ndim - 1, reverse=True)
    adj = jnp.minimum(adj, 1.0)
    inv = jnp.argsort(order, axis=-1)
    out = jnp.take_along_axis(adj, inv, axis=-1)
    return jnp.where(isnan, jnp.nan, out)


def log2_fold_change(group_mean: ArrayLike, control_mean: ArrayLike) -> jax.Array:
    r"""cell-eval / pdex log2 fold change from log1p pseudobulk means (``epsilon = 0``).

    .. math:: \mathrm{lfc} = \log_2 \frac{\mathrm{expm1}(\bar x_{\mathrm{pert}})}
                                          {\mathrm{expm1}(\bar x_{\mathrm{ctrl}})}

    (the geometric mean of counts from the mean of log1p values). ``0/0`` gives 0, a
    one-sided zero gives ``±inf``. ``sign(lfc) = sign(x̄_pert - x̄_ctrl)``.

    Args:
      group_mean, control_mean: ``(..., G)`` means of log1p expression.

    Returns:
      ``(..., G)``.
    """
    gm = jnp.expm1(jnp.asarray(group_mean))
    cm = jnp.expm1(jnp.asarray(control_mean))
    lfc = jnp.log2(gm) - jnp.log2(cm)
    both_zero = (gm == 0) & (cm == 0)
    return jnp.where(both_zero | jnp.isnan(lfc), 0.0, lfc)
