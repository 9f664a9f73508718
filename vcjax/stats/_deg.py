"""Differential expression from sufficient statistics: t, p, BH, logFC, DEG weights and sets.

Closed form, ``O(P × G)``: every per-perturbation test only needs the group's and the
reference's ``(n, mean, var)``, and the "rest" of a group is ``total_perturbed − group``
(sums of the :class:`vcjax.data.GroupStats`), never an ``O(P²)`` loop.

The core formulas are pure ``jax.numpy`` functions (jit/vmap-able; the bootstrap calls them
on resampled moments in float32). :func:`rank_genes` evaluates the same formulas, operation
for operation, in NumPy float64 on the host (no compilation; row blocks in a few threads),
so that the results reproduce scanpy 1.11 ``tl.rank_genes_groups`` (docs/metrics.md §3):
float32 scores and weights bit-identical, p-values to ~1e-12. The tests hold the JAX and
the host versions to each other and to scanpy.

References:
  docs/metrics.md §3 (DbD, Mejia, Miller et al., arXiv:2506.22641); scanpy 1.11
  ``tools/_rank_genes_groups.py``; scipy ``ttest_ind_from_stats``; statsmodels
  ``multipletests(method="fdr_bh")``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from vcjax._errors import VcjaxInputError
from vcjax._host import run_blocks
from vcjax.data import GroupStats, moments

__all__ = [
    "t_from_moments",
    "t_from_moments_host",
    "t_test_vs_rest",
    "t_test_vs_rest_host",
    "pvalues",
    "pvalues_host",
    "student_t_pvalues_fast",
    "benjamini_hochberg",
    "benjamini_hochberg_host",
    "benjamini_hochberg_in_jit",
    "minmax_weights_host",
    "log_fold_change",
    "minmax_weights",
    "DEGResult",
    "rank_genes",
]

Method = Literal["t-test_overestim_var", "t-test"]


def t_from_moments(
    mean_g: ArrayLike,
    var_g: ArrayLike,
    n_g: ArrayLike,
    mean_r: ArrayLike,
    var_r: ArrayLike,
    n_r: ArrayLike,
    *,
    method: Method = "t-test_overestim_var",
) -> tuple[jax.Array, jax.Array]:
    """Welch t statistic and Welch–Satterthwaite degrees of freedom from moments.

    With ``a = s_g²/n_g`` and ``b = s_r²/m``::

        t = (x̄_g − x̄_r) / sqrt(a + b)
        ν = (a + b)² / (a²/(n_g − 1) + b²/(m − 1)),   ν := 1 where NaN

    ``m = n_r`` for ``"t-test"`` and ``m = n_g`` for ``"t-test_overestim_var"`` (scanpy's
    variance over-estimation, docs/metrics.md §3). As in scanpy → scipy, the variances pass
    through ``sqrt`` and are squared again (``std**2``), so a tiny negative variance from
    cancellation gives NaN (scanpy then stores ``t = 0``).

    Args:
      mean_g, var_g, n_g: group mean, unbiased variance, size (broadcastable).
      mean_r, var_r, n_r: reference (rest/control) mean, variance, size.
      method: ``"t-test_overestim_var"`` (DbD default) or ``"t-test"``.

    Returns:
      ``(t, dof)``; dtype follows the floating inputs. NaN ``t`` where both variances are
      zero and the means equal (or ``n < 2``); ``±inf`` when both variances are zero and the
      means differ.
    """
    if method not in ("t-test_overestim_var", "t-test"):
        raise VcjaxInputError(f"unknown method {method!r}; use 't-test_overestim_var' or 't-test'")
    mean_g = jnp.asarray(mean_g)
    mean_r = jnp.asarray(mean_r)
    dtype = jnp.result_type(mean_g, mean_r, jnp.asarray(var_g), jnp.asarray(var_r))
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    n_g = jnp.asarray(n_g).astype(dtype)
    m = n_g if method == "t-test_overestim_var" else jnp.asarray(n_r).astype(dtype)
    sd_g = jnp.sqrt(jnp.asarray(var_g, dtype))
    sd_r = jnp.sqrt(jnp.asarray(var_r, dtype))
    a = sd_g**2 / n_g
    b = sd_r**2 / m
    dof = (a + b) ** 2 / (a**2 / (n_g - 1) + b**2 / (m - 1))
    dof = jnp.where(jnp.isnan(dof), jnp.ones_like(dof), dof)
    t = (mean_g.astype(dtype) - mean_r.astype(dtype)) / jnp.sqrt(a + b)
    return t, dof


def pvalues(t: ArrayLike, dof: ArrayLike) -> jax.Array:
    """Two-sided Student-t p-value ``P(|T_ν| ≥ |t|) = I_{ν/(ν+t²)}(ν/2, 1/2)``.

    Args:
      t: t statistics.
      dof: degrees of freedom ``ν`` (broadcastable).

    Returns:
      p-values in ``[0, 1]``; NaN where ``t`` is NaN; 0 for ``t = ±inf``.
    """
    t = jnp.asarray(t)
    dof = jnp.asarray(dof, t.dtype)
    x = dof / (dof + t * t)
    x = jnp.where(jnp.isinf(t), jnp.zeros_like(x), x)
    return jax.scipy.special.betainc(dof / 2, jnp.full_like(dof, 0.5), x)


def benjamini_hochberg(p: ArrayLike, *, axis: int = -1) -> jax.Array:
    """Benjamini–Hochberg adjusted p-values along ``axis``, as statsmodels ``fdr_bh``.

    Sort ascending, ``q_(i) = p_(i) · n/i``, running minimum from the largest rank down,
    cap at 1, unsort. NaN inputs sort last (treat them as 1 beforehand, as scanpy does).

    Args:
      p: p-values.
      axis: the axis holding the family of tests.

    Returns:
      Adjusted p-values, same shape and dtype as ``p``.
    """
    p = jnp.moveaxis(jnp.asarray(p), axis, -1)
    iota = jax.lax.broadcasted_iota(jnp.int32, p.shape, p.ndim - 1)
    ps, order = jax.lax.sort_key_val(p, iota, dimension=p.ndim - 1, is_stable=True)
    n = ps.shape[-1]
    q = jax.lax.cummin(ps * _bh_scale(n, ps.dtype), axis=ps.ndim - 1, reverse=True)
    q = jnp.minimum(q, 1)
    # unsort with one scatter instead of a second argsort
    flat_rows = jnp.arange(q.size // max(n, 1), dtype=jnp.int32)[:, None] * n
    dest = (order.reshape(-1, n) + flat_rows).reshape(-1)
    out = jnp.zeros(q.size, q.dtype).at[dest].set(q.reshape(-1), unique_indices=True)
    return jnp.moveaxis(out.reshape(q.shape), -1, axis)


def log_fold_change(mean_g: ArrayLike, mean_r: ArrayLike) -> jax.Array:
    """scanpy's logFC ``log2((expm1(x̄_g) + 1e-9) / (expm1(x̄_r) + 1e-9))`` (natural-log data)."""
    mean_g = jnp.asarray(mean_g)
    mean_r = jnp.asarray(mean_r)
    return jnp.log2((jnp.expm1(mean_g) + 1e-9) / (jnp.expm1(mean_r) + 1e-9))


def minmax_weights(scores: ArrayLike) -> jax.Array:
    """DbD DEG weights ``minmax(|t|)²`` over the last axis (docs/metrics.md §3, quirks kept).

    ``s = |t|``, ``lo = min s``, ``hi = max s``; if ``hi == lo``: all 0 when ``hi == 0`` else
    all 1; otherwise ``w = (s − lo)/(hi − lo)``; NaN → 0 (so a NaN score zeroes the whole
    row, and an infinite score gives ``inf/inf`` → the whole row 0, as upstream); then
    ``w²``. Arithmetic in the scores' dtype (float32 for scanpy-stored scores).

    Args:
      scores: ``(..., G)`` t-scores.

    Returns:
      ``(..., G)`` weights in ``[0, 1]``.
    """
    s = jnp.abs(jnp.asarray(scores))
    if not jnp.issubdtype(s.dtype, jnp.floating):
        s = s.astype(jnp.float32)
    lo = jnp.min(s, axis=-1, keepdims=True)
    hi = jnp.max(s, axis=-1, keepdims=True)
    same = hi == lo
    span = jnp.where(same, jnp.ones_like(hi), hi - lo)
    # XLA rewrites ``x / broadcast(y)`` as ``x * broadcast(1/y)`` (one extra rounding); the
    # barrier keeps a true IEEE division so the float32 weights are bit-identical to numpy.
    span = jax.lax.optimization_barrier(jnp.broadcast_to(span, s.shape))
    w = jnp.where(same, jnp.where(hi == 0, 0, 1).astype(s.dtype), (s - lo) / span)
    w = jnp.where(jnp.isnan(w), jnp.zeros_like(w), w)
    return w * w


@dataclasses.dataclass(frozen=True)
class DEGResult:
    """Per-perturbation DE results, gene-aligned (rows follow ``names``, columns ``genes``).

    Attributes:
      names: perturbation labels (control excluded).
      genes: gene names.
      scores: ``(P, G)`` float32 t (NaN → 0, rounded to float32 as scanpy stores it).
      pvals: ``(P, G)`` float64 two-sided p (NaN → 1).
      pvals_adj: ``(P, G)`` float64 BH per perturbation over genes.
      logfc: ``(P, G)`` float32 scanpy logFC.
      covariate: per-row covariate value or ``None``.
      n: ``(P,)`` group sizes.
    """

    names: tuple[str, ...]
    genes: tuple[str, ...]
    scores: np.ndarray
    pvals: np.ndarray
    pvals_adj: np.ndarray
    logfc: np.ndarray
    covariate: tuple[str, ...] | None = None
    n: np.ndarray | None = None

    def weights(self) -> np.ndarray:
        """``(P, G)`` float32 DEG weights :func:`minmax_weights` of the float32 scores.

        Computed on the host (:func:`minmax_weights_host`, bit-identical to the JAX kernel).
        """
        return minmax_weights_host(np.asarray(self.scores, np.float32))

    def deg_mask(self, *, alpha: float = 0.05) -> np.ndarray:
        """``(P, G)`` bool DEG sets ``pvals_adj < alpha`` and ``logFC ≠ 0`` (docs/metrics.md §3)."""
        return (self.pvals_adj < alpha) & (self.logfc != 0)

    def topk_mask(self, k: int) -> np.ndarray:
        """``(P, G)`` bool: the ``k`` largest ``|score|`` per row, ties to the lower gene index."""
        G = self.scores.shape[1]
        if not 0 <= k <= G:
            raise VcjaxInputError(f"topk_mask: k={k} must be in [0, {G}]")
        order = np.argsort(-np.abs(self.scores.astype(np.float64)), axis=1, kind="stable")
        mask = np.zeros(self.scores.shape, dtype=bool)
        np.put_along_axis(mask, order[:, :k], True, axis=1)
        return mask

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise VcjaxInputError(f"{name!r} not among the DE results") from None


def rank_genes(
    stats: GroupStats,
    *,
    method: Method = "t-test_overestim_var",
    vs: Literal["rest", "control"] = "rest",
) -> DEGResult:
    """Per-perturbation t-tests from group statistics (scanpy ``rank_genes_groups`` parity).

    ``vs="rest"``: each perturbation against all *other perturbed* cells of its covariate,
    control excluded (``rest = total_perturbed − group``, from sums); ``vs="control"``:
    against the control group of its covariate. Computed in float64 on the host.

    Args:
      stats: :class:`vcjax.data.GroupStats` (may include the control group).
      method: ``"t-test_overestim_var"`` (DbD) or ``"t-test"`` (Welch).
      vs: ``"rest"`` or ``"control"``.

    Returns:
      :class:`DEGResult` with one row per perturbation (order of ``stats``, control removed).
    """
    if method not in ("t-test_overestim_var", "t-test"):
        raise VcjaxInputError(f"unknown method {method!r}; use 't-test_overestim_var' or 't-test'")
    if vs not in ("rest", "control"):
        raise VcjaxInputError(f"vs must be 'rest' or 'control', got {vs!r}")
    is_ctrl = np.array([nm == stats.control for nm in stats.names], dtype=bool)
    pert = np.flatnonzero(~is_ctrl)
    if pert.size == 0:
        raise VcjaxInputError("rank_genes: no perturbed groups")
    covs = stats.covariate if stats.covariate is not None else ("",) * stats.n_groups
    covs_arr = np.asarray(covs, dtype=object)
    small = [stats.names[i] for i in pert if stats.n[i] < 2]
    if small:
        raise VcjaxInputError(f"rank_genes: groups with fewer than 2 cells: {small[:5]}")

    if vs == "rest":
        scores, pvals, pvals_adj, logfc = _per_covariate(stats, pert, covs_arr[pert], method)
    else:
        if stats.control is None:
            raise VcjaxInputError("rank_genes(vs='control'): stats have no control group")
        ctrl_of = {covs_arr[i]: i for i in np.flatnonzero(is_ctrl)}
        missing = [cv for cv in dict.fromkeys(covs_arr[pert]) if cv not in ctrl_of]
        if missing:
            raise VcjaxInputError(
                f"rank_genes(vs='control'): no control in covariate {missing[0]!r}"
            )
        ref = np.array([ctrl_of[cv] for cv in covs_arr[pert]], dtype=np.int64)
        if np.any(stats.n[ref] < 2):
            raise VcjaxInputError("rank_genes(vs='control'): control group has fewer than 2 cells")
        scores, pvals, pvals_adj, logfc = _welch_blocks(
            stats.n[pert].astype(np.float64),
            stats.n[ref].astype(np.float64),
            lambda blk: (stats.sum[pert[blk]], stats.sumsq[pert[blk]]),
            lambda blk: (stats.sum[ref[blk]], stats.sumsq[ref[blk]]),
            n_genes=stats.n_genes,
            method=method,
        )
    return DEGResult(
        names=tuple(stats.names[i] for i in pert),
        genes=stats.genes,
        scores=scores,
        pvals=pvals,
        pvals_adj=pvals_adj,
        logfc=logfc,
        covariate=None if stats.covariate is None else tuple(stats.covariate[i] for i in pert),
        n=stats.n[pert].copy(),
    )


def _per_covariate(stats: GroupStats, pert: np.ndarray, covs: np.ndarray, method: Method):
    """:func:`t_test_vs_rest_host` within each covariate value, rows in ``pert`` order."""
    values = list(dict.fromkeys(covs))
    if len(values) == 1:
        return t_test_vs_rest_host(stats.n, stats.sum, stats.sumsq, pert, method=method)
    P, G = pert.size, stats.n_genes
    out = (
        np.empty((P, G), np.float32),
        np.empty((P, G), np.float64),
        np.empty((P, G), np.float64),
        np.empty((P, G), np.float32),
    )
    for cv in values:
        at = np.flatnonzero(covs == cv)
        got = t_test_vs_rest_host(stats.n, stats.sum, stats.sumsq, pert[at], method=method)
        for dst, src in zip(out, got):
            dst[at] = src
    return out


def t_test_vs_rest_host(
    n: np.ndarray, s: np.ndarray, q: np.ndarray, rows: np.ndarray, *, method: Method
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each group of ``rows`` against the other groups of ``rows`` (scanpy ``reference="rest"``).

    ``rest = total − group`` from the float64 sums; the totals are accumulated row by row,
    NumPy's own order for ``sum(axis=0)``, without copying the sums. The host twin of
    :func:`t_test_vs_rest`, in float64 with scipy's p-values and statsmodels' BH.

    Args:
      n: ``(C,)`` cells per group.
      s, q: ``(C, G)`` per-group sums and sums of squares.
      rows: the groups tested (the perturbations, control excluded).
      method: ``"t-test_overestim_var"`` or ``"t-test"``.

    Returns:
      ``(scores, pvals, pvals_adj, logfc)``, each ``(len(rows), G)``: float32 t (NaN → 0),
      float64 p (NaN → 1), float64 BH over genes, float32 scanpy logFC.
    """
    rows = np.asarray(rows, dtype=np.int64)
    n_g = np.asarray(n)[rows].astype(np.float64)
    n_r = np.asarray(n)[rows].sum() - n_g
    if np.any(n_r < 2):
        raise VcjaxInputError(
            "rank_genes(vs='rest'): the rest has fewer than 2 cells (one perturbation per covariate?)"
        )
    tot_s = np.zeros(s.shape[1])
    tot_q = np.zeros(s.shape[1])
    for r in rows:
        tot_s += s[r]
        tot_q += q[r]
    return _welch_blocks(
        n_g,
        n_r,
        lambda blk: (s[rows[blk]], q[rows[blk]]),
        lambda blk: (tot_s[None, :] - s[rows[blk]], tot_q[None, :] - q[rows[blk]]),
        n_genes=s.shape[1],
        method=method,
    )


def _welch_blocks(n_g, n_r, group, reference, *, n_genes: int, method: Method):
    """The t-tests of groups against references in float64 row blocks on the host threads.

    ``group(blk)`` and ``reference(blk)`` give the ``(sum, sumsq)`` rows of a block of
    tested groups and of their references; ``n_g``, ``n_r`` their sizes.
    """
    P, G = n_g.size, n_genes
    scores = np.empty((P, G), np.float32)
    logfc = np.empty((P, G), np.float32)
    pvals = np.empty((P, G), np.float64)
    pvals_adj = np.empty((P, G), np.float64)

    def block(r0: int, r1: int) -> None:
        blk = np.arange(r0, r1)
        s_g, ss_g = group(blk)
        s_r, ss_r = reference(blk)
        mg, vg = moments(n_g[blk], s_g, ss_g)
        mr, vr = moments(n_r[blk], s_r, ss_r)
        t, dof = t_from_moments_host(mg, vg, n_g[blk, None], mr, vr, n_r[blk, None], method=method)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            logfc[r0:r1] = np.log2((np.expm1(mg) + 1e-9) / (np.expm1(mr) + 1e-9))
        # scipy's ``2·stdtr(ν, −|t|)`` (what scanpy calls; equal to :func:`pvalues` to
        # ~1e-12), much faster on CPU than XLA's float64 betainc
        p = pvalues_host(t, dof)
        p[np.isnan(p)] = 1.0
        pvals[r0:r1] = p
        pvals_adj[r0:r1] = _bh_rows(p)
        scores[r0:r1] = np.where(np.isnan(t), 0.0, t)

    run_blocks(block, P, G)
    return scores, pvals, pvals_adj, logfc


def student_t_pvalues_fast(t: ArrayLike, dof: ArrayLike) -> jax.Array:
    """Two-sided Student-t p-values by Hill's (1970) normalising expansion.

    With ``a = ν − ½``, ``b = 48a²``, ``y = a·ln(1 + t²/ν)``::

        z = √y · (1 + (y + 3)/b − (0.4y³ + 3.3y² + 24y + 85.5) / (b (0.8y² + 100 + b)))
        p = 2 Φ(−z)

    Relative error vs the exact ``I_{ν/(ν+t²)}(ν/2, ½)`` (measured over ``|t| ≤ 40``):
    < 2.5e-3 for ``ν ≥ 8``, < 8e-4 for ``ν ≥ 20``, < 4e-5 for ``ν ≥ 50``, < 5e-7 for
    ``ν ≥ 100``; much cheaper than ``betainc`` on CPU (``benchmarks/RESULTS.md``). NaN
    where ``t`` is NaN; 0 for ``t = ±inf``.
    """
    t = jnp.asarray(t)
    nu = jnp.asarray(dof, t.dtype)
    a = nu - 0.5
    b = 48.0 * a * a
    y = a * jnp.log1p(t * t / nu)
    z = (
        ((((-0.4 * y - 3.3) * y - 24.0) * y - 85.5) / (0.8 * y * y + 100.0 + b) + y + 3.0) / b + 1.0
    ) * jnp.sqrt(y)
    p = 2.0 * jax.scipy.special.ndtr(-z)
    return jnp.where(jnp.isinf(t), jnp.zeros_like(p), p)


def benjamini_hochberg_in_jit(p: jax.Array) -> jax.Array:
    """:func:`benjamini_hochberg` over the genes of every row, inside the jit.

    On CPU it runs on the host (:func:`jax.pure_callback` to :func:`benjamini_hochberg_host`):
    XLA:CPU's sort is generic (a comparator call per comparison), much slower than NumPy's,
    and made BH most of a resample (``benchmarks/RESULTS.md``). The host version does
    the same arithmetic in the same dtype, so the results are bit-identical (tested). On
    accelerators, and for float64, :func:`benjamini_hochberg` as it is (a
    callback runs on an XLA thread, where a ``jax.enable_x64`` context does not hold, and
    its float64 values would be cast to float32 there).
    """
    if jax.default_backend() != "cpu" or p.dtype != jnp.float32:
        return benjamini_hochberg(p)
    return jax.pure_callback(
        benjamini_hochberg_host,
        jax.ShapeDtypeStruct(p.shape, p.dtype),
        p,
        vmap_method="broadcast_all",
    )


def t_test_vs_rest(
    n: ArrayLike,
    s: jax.Array,
    q: jax.Array,
    rows: tuple[int, ...],
    *,
    method: Method = "t-test_overestim_var",
    pvalue: Literal["fast", "exact"] = "exact",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`t_test_vs_rest_host` in ``jax.numpy``, over a leading batch of resamples.

    The same statistic: each group of ``rows`` against the sum of the other groups of
    ``rows``, moments in scanpy's order, :func:`t_from_moments`, p-values exact
    (:func:`pvalues`) or by Hill's expansion (:func:`student_t_pvalues_fast`), NaN p → 1,
    BH over genes (:func:`benjamini_hochberg_in_jit`), NaN t → 0.

    Args:
      n: ``(C,)`` cells per group (equal in every resample).
      s, q: ``(b, C, G)`` per-group sums and sums of squares.
      rows: the tested groups (static).
      method, pvalue: the test and how its p-values are computed.

    Returns:
      ``(scores, pvals_adj, logfc)``, each ``(b, len(rows), G)``; scores and logFC float32.
    """
    idx = np.asarray(rows)
    n = jnp.asarray(n).astype(s.dtype)
    in_rows = np.zeros(s.shape[-2], dtype=bool)
    in_rows[idx] = True
    keep = jnp.asarray(in_rows)
    ng = n[idx]
    nr = jnp.sum(jnp.where(keep, n, 0)) - ng
    sg, qg = s[:, idx], q[:, idx]
    sr = jnp.sum(jnp.where(keep[None, :, None], s, 0), axis=1, keepdims=True) - sg
    qr = jnp.sum(jnp.where(keep[None, :, None], q, 0), axis=1, keepdims=True) - qg
    mg, vg = moments(ng, sg, qg, xp=jnp)
    mr, vr = moments(nr, sr, qr, xp=jnp)
    t, dof = t_from_moments(mg, vg, ng[:, None], mr, vr, nr[:, None], method=method)
    p = student_t_pvalues_fast(t, dof) if pvalue == "fast" else pvalues(t, dof)
    p = jnp.where(jnp.isnan(p), jnp.ones_like(p), p)
    padj = benjamini_hochberg_in_jit(p)
    scores = jnp.where(jnp.isnan(t), jnp.zeros_like(t), t).astype(jnp.float32)
    return scores, padj, log_fold_change(mg, mr).astype(jnp.float32)


# ------------------------------------------------------------------ host twins


def t_from_moments_host(
    mg, vg, n_g, mr, vr, n_r, *, method: Method
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`t_from_moments` in NumPy float64: the same operations in the same order."""
    m = n_g if method == "t-test_overestim_var" else n_r
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a = np.sqrt(vg) ** 2 / n_g
        b = np.sqrt(vr) ** 2 / m
        dof = (a + b) ** 2 / (a**2 / (n_g - 1) + b**2 / (m - 1))
        dof[np.isnan(dof)] = 1.0
        t = (mg - mr) / np.sqrt(a + b)
    return t, dof


def _bh_scale(n: int, dtype) -> np.ndarray:
    """BH's ``n / i`` for ranks ``i = 1..n`` as a constant in ``dtype``.

    ``q_(i) = p_(i) · (n/i)``: a product with a constant, which XLA compiles as written
    (it may turn a division into a product with a reciprocal, depending on shapes), so
    :func:`benjamini_hochberg` and the host :func:`benjamini_hochberg_host` round alike.
    """
    return np.dtype(dtype).type(n) / np.arange(1, n + 1, dtype=dtype)


_SORT_ELEMENTS = 1 << 15  # p-values per lexsort (its passes stay in cache)


def _row_order(p: np.ndarray) -> np.ndarray:
    """Flat positions that sort each row of a C-ordered, non-negative, NaN-free 2-D float
    array ascending (ties in any order).

    Non-negative float bits sort as unsigned integers, so one :func:`numpy.lexsort` of
    their 16-bit digits and the row (NumPy sorts 16-bit keys by radix) orders a few rows at
    a time. The whole BH then took 37 against 51 ms for 1,000 × 2,000 float32 p-values (a
    sort of packed (bits, gene) uint64 keys before) and 79 against 132 ms for 300 × 8,000
    float64 ones (an argsort before).
    """
    R, n = p.shape
    bits = p.view(np.uint32 if p.itemsize == 4 else np.uint64)
    rows = max(1, min(_SORT_ELEMENTS // max(n, 1), 1 << 16))
    shifts = [bits.dtype.type(k) for k in range(0, 8 * p.itemsize, 16)]
    out = np.empty(R * n, np.intp)
    for r0 in range(0, R, rows):
        b = bits[r0 : r0 + rows].reshape(-1)
        keys = [(b >> k).astype(np.uint16) for k in shifts]
        keys.append(np.repeat(np.arange(b.size // n, dtype=np.uint16), n))
        o = out[r0 * n : r0 * n + b.size]
        o[:] = np.lexsort(keys)
        o += r0 * n
    return out


def _bh_rows(p: np.ndarray) -> np.ndarray:
    """BH over the last axis of a 2-D block, in ``p``'s dtype (see :func:`benjamini_hochberg_host`)."""
    n = p.shape[-1]
    # -0.0 -> +0.0, so signed zeros tie as in a float sort; C order, rows contiguous
    p = np.add(p, p.dtype.type(0), order="C")
    if p.dtype in (np.float32, np.float64) and (p >= 0).all():  # no NaN, no negatives
        flat = _row_order(p)
    else:  # NaN sorts last, as in the XLA kernel; the order of ties does not matter
        flat = np.argsort(p, axis=-1)
        flat += (np.arange(p.shape[0], dtype=np.intp) * n)[:, None]
        flat = flat.reshape(-1)
    ps = p.reshape(-1)[flat].reshape(p.shape)
    if p.dtype == np.float64:  # statsmodels' own arithmetic (the float64 evaluate path)
        q = ps / (np.arange(1, n + 1, dtype=np.float64) / n)
    else:  # the XLA kernel's (the float32 bootstrap path)
        q = ps * _bh_scale(n, p.dtype)
    # min(1, running minimum) = running minimum of min(1, ·): capped first, both in place
    np.minimum(q, p.dtype.type(1), out=q)
    rev = q[..., ::-1]
    np.minimum.accumulate(rev, axis=-1, out=rev)
    # unsorted by one flat scatter (put_along_axis builds index grids)
    out = np.empty(p.shape, p.dtype)  # C order, so that its flat view is row after row
    out.reshape(-1)[flat] = q.reshape(-1)
    return out


def benjamini_hochberg_host(p: np.ndarray) -> np.ndarray:
    """:func:`benjamini_hochberg` over the last axis in NumPy (statsmodels ``fdr_bh``).

    In ``p``'s dtype. Float64 uses statsmodels' arithmetic ``p_(i) / (i/n)`` exactly (within
    1 ulp of the XLA kernel); float32 uses the XLA kernel's ``p_(i) · (n/i)``, so it is
    bit-identical to :func:`benjamini_hochberg` (both tested). Row blocks run on the host
    threads. Tied p-values all receive the adjusted value of the last of them, so the
    order of ties never matters.
    """
    p = np.asarray(p)
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    n = p.shape[-1] if p.ndim else 1
    flat = p.reshape(-1, n)
    out = np.empty_like(flat)

    def block(r0: int, r1: int) -> None:
        out[r0:r1] = _bh_rows(flat[r0:r1])

    run_blocks(block, flat.shape[0], n)
    return out.reshape(p.shape)


def minmax_weights_host(scores: np.ndarray) -> np.ndarray:
    """:func:`minmax_weights` in NumPy over the last axis, bit-identical to the JAX kernel.

    The same IEEE operations in the scores' dtype (float32 for stored scores): ``|t|``, row
    min and max, a true division by the span, NaN → 0, square.
    """
    s = np.abs(np.asarray(scores))
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float32)
    G = s.shape[-1] if s.ndim else 1
    s2 = s.reshape(-1, G)
    out = np.empty(s2.shape, s.dtype)

    def block(r0: int, r1: int) -> None:
        x = s2[r0:r1]
        lo = np.min(x, axis=-1, keepdims=True)
        hi = np.max(x, axis=-1, keepdims=True)
        same = hi == lo
        span = np.where(same, np.ones_like(hi), hi - lo)
        flat = np.where(hi == 0, 0, 1).astype(x.dtype)
        with np.errstate(invalid="ignore", divide="ignore"):
            w = np.where(same, flat, (x - lo) / span)
        w[np.isnan(w)] = 0
        np.multiply(w, w, out=out[r0:r1])

    run_blocks(block, s2.shape[0], G)
    return out.reshape(s.shape)


def pvalues_host(t: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """Two-sided Student-t p-values on the host (scipy ``stdtr``), same definition as
    :func:`pvalues`."""
    from scipy import special

    with np.errstate(invalid="ignore"):
        return 2.0 * special.stdtr(dof, -np.abs(t))
