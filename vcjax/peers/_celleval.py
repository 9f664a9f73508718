"""cell-eval 0.8.2's protocol: every per-perturbation metric of its ``full`` profile.

``cell_eval.MetricsEvaluator(pred, real, control_pert=..., pert_col=...).compute(profile="full")``
reports, per perturbation, the metrics listed in :data:`CELLEVAL_METRICS` (docs/metrics.md
§13). This module computes the same numbers under the same names, vectorised over
perturbations:

* **inputs** (:func:`celleval_normalize`): each side on its own, as cell-eval does — a matrix
  without a fractional part above 1e-3 is taken for counts and normalised to the median
  total count of its cells then ``log1p`` (scanpy's ``normalize_total`` + ``log1p``, the
  median over the non-zero totals for a dense matrix, over all totals for a sparse one);
  a matrix with fractions must lie in ``[0, 15)`` (log1p scale) or it is an error;
* **pseudobulks**: the mean of all cells of each label, rounded to the matrix's float type
  (polars' ``group_by().mean()``); deltas are pseudobulk minus the **same object's** control
  pseudobulk (the prediction's deltas use the prediction's own control cells);
* **DE** (both sides): each perturbation's cells against the same object's control cells,
  two-sided asymptotic Wilcoxon rank-sum test with tie and continuity corrections, BH over
  the genes of that perturbation, ``lfc = log2(expm1(mean_p) / expm1(mean_c))`` (pdex
  0.3.0, ``epsilon=0``, ``0/0 → 0``), rounded to float32
  (:func:`vcjax.peers.celleval_de_table`). A gene is a DEG when ``fdr < 0.05`` (float32).

Then, per perturbation ``p`` (``T``: truth DEGs, ``D``: predicted DEGs, each ranked by
``|lfc|`` descending, ties in gene order):

* ``overlap_at_N`` — ``|T ∩ D[:|T|]| / |T|``; ``overlap_at_k`` (k = 50, 100, 200, 500) with
  ``k' = min(k, |T|)``: ``|T[:k'] ∩ D[:k']| / k'``; ``precision_at_N`` / ``precision_at_k``
  the same with ``|D|`` in place of ``|T|``; 0 when ``k' = 0`` (:func:`de_overlap_at_k`);
* ``de_direction_match`` — share of ``T`` whose predicted lfc has the true sign;
* ``de_spearman_lfc_sig`` — Spearman correlation (average ranks) of true and predicted lfc
  over ``T``;
* ``de_sig_genes_recall`` — ``|T ∩ D| / |T|``;
* ``de_nsig_counts_real`` / ``de_nsig_counts_pred`` — ``|T|`` and ``|D|``;
* ``pr_auc`` / ``roc_auc`` — average precision and ROC AUC of the score
  ``-log10(clip(fdr_pred, 1e-10, 1))`` (float32) for the labels ``g ∈ T`` over all genes;
* ``pearson_delta``, ``mse_delta``, ``mae_delta`` — on the deltas; ``mse``, ``mae`` — on the
  pseudobulks themselves;
* ``discrimination_score_{l1,l2,cosine}`` — ``1 - rank_p / P``, ``rank_p`` the number of true
  deltas strictly closer to the predicted delta of ``p`` than its own (the gene named like the
  perturbation left out; :func:`pds`);
* dataset-level values that cell-eval repeats on every perturbation's row:
  ``de_spearman_sig`` — Spearman correlation of ``|T|`` and ``|D|`` over the perturbations
  with ``|T| > 0`` (1.0 when there is none) — and ``pearson_edistance`` — the Pearson
  correlation over perturbations of the energy distance between each perturbation's cells
  and the control cells, truth against prediction (Euclidean, means over all pairs).

NaN where cell-eval reports null or NaN: the DE metrics over ``T`` when ``|T| = 0``, the
AUCs when every gene or none is in ``T``, correlations of a constant vector or of fewer than
two values. cell-eval's ``clustering_agreement`` (Leiden clusterings of the pseudobulks,
igraph) is not reproduced (:data:`NOT_REPRODUCED`).

Two conventions that differ from cell-eval only on exact ties (documented, not silent):
the discrimination scores count only strictly closer perturbations (cell-eval's argsort puts
equal distances in an unspecified order), and the AUC scores are ranked from the float32
FDR values, where polars' float32 ``log10`` can merge two values one unit in the last place
apart into a tie.

References:
  cell-eval 0.8.2 (``metrics/_impl.py``, ``metrics/_de.py``, ``metrics/_anndata.py``,
  ``_types/_de.py``, ``_evaluator.py``); pdex 0.3.0; docs/metrics.md §9, §10, §13.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax.typing import ArrayLike
from scipy.stats import rankdata

from vcjax._errors import VcjaxInputError, preview
from vcjax.metrics import mae as _mae
from vcjax.metrics import mse as _mse
from vcjax.metrics import pearson
from vcjax.peers._kernels import (
    _block_sum,
    _pad_rows,
    _sqrt0,
    _tie_group_counts,
    celleval_de_table,
    de_direction_agreement,
    de_overlap_at_k,
    pds,
    pseudobulk,
)

__all__ = [
    "CELLEVAL_METRICS",
    "CELLEVAL_VERSION",
    "DATASET_LEVEL",
    "DE_METRICS",
    "HIGHER_IS_BETTER",
    "NOT_REPRODUCED",
    "CellEvalTruth",
    "celleval_normalize",
    "celleval_protocol",
    "celleval_scores",
    "celleval_truth",
    "de_auc",
    "energy_to_control",
    "masked_ranks",
    "masked_spearman",
]

CELLEVAL_VERSION = "0.8.2"
#: cell-eval's DEG threshold (``fdr < 0.05``, compared in float32)
FDR_THRESHOLD = 0.05
#: the list lengths of ``overlap_at_k`` / ``precision_at_k`` (None: ``N``)
_TOP_K = (None, 50, 100, 200, 500)

#: the metrics computed from the two DE tables, in cell-eval's column order
DE_METRICS = (
    *(f"overlap_at_{k or 'N'}" for k in _TOP_K),
    *(f"precision_at_{k or 'N'}" for k in _TOP_K),
    "de_spearman_sig",
    "de_direction_match",
    "de_spearman_lfc_sig",
    "de_sig_genes_recall",
    "de_nsig_counts_real",
    "de_nsig_counts_pred",
    "pr_auc",
    "roc_auc",
)
#: the metrics computed from the pseudobulks
PSEUDOBULK_METRICS = (
    "pearson_delta",
    "mse",
    "mae",
    "mse_delta",
    "mae_delta",
    "discrimination_score_l1",
    "discrimination_score_l2",
    "discrimination_score_cosine",
)
#: every metric of cell-eval 0.8.2's ``full`` profile reproduced here, in its column order
CELLEVAL_METRICS = (*DE_METRICS, *PSEUDOBULK_METRICS, "pearson_edistance")
#: one value for the whole data set, repeated by cell-eval on every perturbation's row
DATASET_LEVEL = ("de_spearman_sig", "pearson_edistance")
#: in cell-eval's ``full`` profile but not reproduced (Leiden clustering through igraph)
NOT_REPRODUCED = ("clustering_agreement",)
#: orientation (cell-eval's ``best_value``: ONE → True, ZERO → False, NONE → None)
HIGHER_IS_BETTER: dict[str, bool | None] = {
    **{m: True for m in CELLEVAL_METRICS},
    "mse": False,
    "mae": False,
    "mse_delta": False,
    "mae_delta": False,
    "de_nsig_counts_real": None,
    "de_nsig_counts_pred": None,
}


# --------------------------------------------------------------------------- normalisation


def _as_matrix(cells):
    """Dense ndarray or CSR; float16 → float32 (cell-eval casts it for numba)."""
    if sp.issparse(cells):
        x = cells.tocsr() if cells.format != "csr" else cells
    else:
        x = np.asarray(cells)
    if x.dtype == np.float16:
        x = x.astype(np.float32)
    return x


def celleval_normalize(cells, *, which: str = "data"):
    """What cell-eval 0.8.2 does to a matrix before scoring it (``_convert_to_normlog``).

    Counts — no value with a fractional part above ``1e-3`` — are normalised like scanpy's
    ``normalize_total`` (target: the median total count per cell; the median over cells
    with a non-zero total for a dense matrix, over every cell for a sparse one; integer
    matrices become float32) and ``log1p``-transformed. A matrix with fractional values is
    taken as log1p-normalised and must lie in ``[0, 15)``.

    Args:
      cells: ``(N, G)`` dense array or scipy sparse matrix.
      which: the side's name for the error messages (``"truth"``, ``"prediction"``).

    Returns:
      ``(matrix, normalization)``: the matrix scored (dense or CSR; a new array when it
      was normalised) and ``"log1p_median"`` or ``"none"``.

    Raises:
      VcjaxInputError: fractional values below 0 or at least 15 (not log1p-normalised).
    """
    x = _as_matrix(cells)
    vals = x.data if sp.issparse(x) else x
    if vals.size == 0 or not np.issubdtype(vals.dtype, np.number):
        raise VcjaxInputError(f"the {which} matrix is empty or not numeric ({vals.dtype})")
    frac = np.modf(vals)[0] if np.issubdtype(vals.dtype, np.floating) else np.zeros(1)
    if bool(np.any(frac > 1e-3)):
        implicit_zero = sp.issparse(x) and x.nnz < x.shape[0] * x.shape[1]
        lo, hi = float(vals.min()), float(vals.max())
        if implicit_zero:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        if lo < 0:
            raise VcjaxInputError(
                f"the {which} values have fractions and a negative minimum {lo:.3g}: cell-eval "
                "takes counts (integers) or log1p-normalised values (in [0, 15))"
            )
        if hi >= 15.0:
            raise VcjaxInputError(
                f"the {which} values have fractions and a maximum {hi:.3g} >= 15: cell-eval "
                "takes counts (integers) or log1p-normalised values (in [0, 15)), not a mix"
            )
        return x, "none"
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        x = x.astype(np.float32)
    else:
        x = x.copy()
    if sp.issparse(x):
        totals = np.asarray(x.sum(axis=1), dtype=np.float64).ravel().astype(x.dtype)
        target = np.median(totals)
    else:
        totals = x.sum(axis=1)
        target = np.median(totals[totals > 0])
    factor = totals / target
    factor = np.where(factor == 0, np.ones_like(factor), factor)  # empty cells stay 0
    if sp.issparse(x):
        x.data /= np.repeat(factor, np.diff(x.indptr))
        np.log1p(x.data, out=x.data)
    else:
        x /= factor[:, None]
        np.log1p(x, out=x)
    return x, "log1p_median"


# --------------------------------------------------------------------------- JAX kernels


def masked_ranks(values: ArrayLike, mask: ArrayLike) -> jax.Array:
    r"""Average ranks (1-based, ties share their mean rank) of each row's masked entries.

    .. math:: \mathrm{rank}_g = \#\{h \in S : v_h < v_g\} + \tfrac12 (\#\{h \in S : v_h = v_g\} + 1)

    over the set ``S`` of the row's masked genes (one sort per row). Entries outside the
    mask get ranks above ``|S|`` (ignore them).

    Args:
      values: ``(..., G)``, not NaN on the mask (``±inf`` rank first/last).
      mask: ``(..., G)`` boolean.

    Returns:
      ``(..., G)`` ranks in the values' float dtype.
    """
    v = jnp.asarray(values)
    v = v.astype(jnp.result_type(jnp.float32, v))
    m = jnp.broadcast_to(jnp.asarray(mask, bool), v.shape)
    g = v.shape[-1]
    ax = v.ndim - 1
    order = jnp.argsort(jnp.where(m, v, jnp.nan), axis=-1, stable=True)  # members first
    s = jnp.take_along_axis(v, order, axis=-1)
    sm = jnp.take_along_axis(m, order, axis=-1)
    idx = jnp.broadcast_to(jnp.arange(g), v.shape)
    first = jnp.ones_like(sm[..., :1])
    new = jnp.concatenate([first, (s[..., 1:] != s[..., :-1]) | (sm[..., 1:] != sm[..., :-1])], -1)
    is_end = jnp.concatenate([new[..., 1:], first], axis=-1)
    start = jax.lax.cummax(jnp.where(new, idx, 0), axis=ax)
    end = jax.lax.cummin(jnp.where(is_end, idx, g), axis=ax, reverse=True)
    ranked = ((start + end).astype(v.dtype) / 2.0) + 1.0
    flat = ranked.reshape(-1, g)
    rows = jnp.arange(flat.shape[0])[:, None]
    back = jnp.zeros_like(flat).at[rows, order.reshape(-1, g)].set(flat)
    return back.reshape(v.shape)


@jax.jit
def masked_spearman(x: ArrayLike, y: ArrayLike, mask: ArrayLike) -> jax.Array:
    r"""Spearman correlation of ``x`` and ``y`` over each row's masked genes.

    The Pearson correlation of the average ranks (:func:`masked_ranks`) within the mask (as
    polars' ``corr(method="spearman")`` and ``scipy.stats.spearmanr``).

    Returns:
      ``(...)``; NaN with fewer than two masked genes or constant ranks.
    """
    m = jnp.asarray(mask, bool)
    return pearson(masked_ranks(x, m), masked_ranks(y, m), where=m)


@jax.jit
def de_auc(scores: ArrayLike, labels: ArrayLike) -> tuple[jax.Array, jax.Array]:
    r"""ROC AUC and average precision of ``scores`` for the binary ``labels`` of each row.

    ROC AUC with ties counting ½ (the trapezoid of sklearn's ``roc_curve``):

    .. math:: \mathrm{AUC} = \frac{1}{n_1 n_0} \sum_{g:\,y_g=1}
              \big(\#\{h : y_h = 0, s_h < s_g\} + \tfrac12 \#\{h : y_h = 0, s_h = s_g\}\big)

    Average precision (sklearn's ``average_precision_score``): the thresholds are the
    distinct scores in decreasing order, a tie group called as a whole,

    .. math:: \mathrm{AP} = \sum_t \frac{\Delta \mathrm{TP}_t}{n_1} \cdot
              \frac{\mathrm{TP}_t}{\#\{g : s_g \ge t\}}

    Args:
      scores: ``(..., G)`` (larger = more likely positive).
      labels: ``(..., G)`` boolean.

    Returns:
      ``(roc_auc, average_precision)``, each ``(...)``; NaN when a row has no positive or
      no negative label (cell-eval's rule).
    """
    s = jnp.asarray(scores)
    s = s.astype(jnp.result_type(jnp.float32, s))
    y = jnp.asarray(labels, s.dtype)
    g = s.shape[-1]
    n1 = jnp.sum(y, axis=-1)
    n0 = g - n1
    ok = (n1 > 0) & (n0 > 0)
    # one sort (descending) with tie groups: per position, the positives above its group
    # and through its end; everything else follows from the group's bounds
    _, start, end, above, through = _tie_group_counts(s, y)
    ys = jnp.take_along_axis(y, jnp.argsort(-s, axis=-1, stable=True), axis=-1)
    size = (end - start + 1).astype(s.dtype)
    neg_above = start.astype(s.dtype) - above
    neg_tied = size - (through - above)
    neg_below = n0[..., None] - neg_above - neg_tied
    roc = jnp.sum(ys * (neg_below + 0.5 * neg_tied), axis=-1) / jnp.where(ok, n1 * n0, 1.0)
    pos = jnp.broadcast_to(jnp.arange(g), s.shape)
    called = (end + 1).astype(s.dtype)
    terms = jnp.where(pos == end, (through - above) * through / called, 0.0)
    ap = jnp.sum(terms, axis=-1) / jnp.where(ok, n1, 1.0)
    return jnp.where(ok, roc, jnp.nan), jnp.where(ok, ap, jnp.nan)


def _bucket(n: int, lo: int = 8) -> int:
    """Smallest ``m · 2^k >= n`` with ``m`` in 4..7 (at most 25 % padding), at least ``lo``:
    padded sizes from a few buckets, so few compilations."""
    n = max(int(n), lo)
    k = max(0, n.bit_length() - 3)
    return -(-n // (1 << k)) * (1 << k)


@partial(jax.jit, static_argnames=("batch",))
def _group_energy_terms(xg, mg, ctrl, cmask, *, batch: int):
    """Per padded group ``(n, G)``: Σ_ij ‖x_i − x_j‖ and Σ_i Σ_c ‖x_i − c‖ (masked rows)."""
    cn = jnp.sum(ctrl * ctrl, axis=-1)

    def one(args):
        x, m = args
        xn = jnp.sum(x * x, axis=-1)
        dxx = _sqrt0(jnp.maximum(xn[:, None] + xn[None, :] - 2.0 * x @ x.T, 0.0))
        dxx = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, dxx)
        sxx = m @ dxx @ m
        dxc = _sqrt0(jnp.maximum(xn[:, None] + cn[None, :] - 2.0 * x @ ctrl.T, 0.0))
        sxc = m @ (dxc @ cmask)
        return sxx, sxc

    return jax.lax.map(one, (xg, mg), batch_size=batch)


def _rows(x, idx: np.ndarray, dtype) -> np.ndarray:
    """Rows ``idx`` of a dense or CSR matrix as a dense ``dtype`` array."""
    out = x[idx]
    return np.asarray(out.toarray() if sp.issparse(out) else out, dtype)


@jax.jit
def _self_energy(cb, cm):
    """Σ_ij ‖c_i − c_j‖ over ``(nblocks, block, G)`` masked rows."""
    return _block_sum(cb, cm, cb, cm, _sqrt0, True)


def energy_to_control(
    cells,
    labels: Sequence,
    perts: Sequence[str],
    *,
    control: str,
    block_size: int = 128,
    max_elements: int = 1 << 24,
) -> np.ndarray:
    r"""Energy distance between each perturbation's cells and the control cells.

    .. math:: E_p = 2\,\overline{\|x - c\|} - \overline{\|x - x'\|} - \overline{\|c - c'\|}

    Euclidean, every mean over all pairs with self-pairs (cell-eval's ``_edistance`` with
    sklearn's ``pairwise_distances``). Vectorised: the perturbations' cells are laid out as
    padded ``(P, n_max, G)`` groups (in blocks of at most ``max_elements`` values), every
    pairwise distance from one Gram product after centring on the control mean; the
    control's own term once, in ``block_size`` tiles. Padded sizes come from a few buckets
    (at most 25 % padding), so a truth and its predictions share compilations.

    Args:
      cells: ``(N, G)`` log1p-normalised cells (dense or sparse).
      labels: ``(N,)`` labels.
      perts: the perturbations, in output order.
      control: the control label.
      block_size: rows per tile of the control's own term.
      max_elements: padded group values per device call.

    Returns:
      ``(P,)`` float64; NaN for a perturbation without cells.
    """
    x = cells.tocsr() if sp.issparse(cells) else np.asarray(cells)  # rows gathered per block
    dtype = np.dtype(jnp.result_type(jnp.float32, x.dtype))
    labels = np.asarray(labels).astype(str)
    index = {p: i for i, p in enumerate(perts)}
    codes = np.array([index.get(lab, -1) for lab in labels], np.int64)
    ctrl = _rows(x, np.flatnonzero(labels == control), dtype)
    center = ctrl.mean(axis=0, dtype=np.float64).astype(dtype)
    n_c = ctrl.shape[0]
    c_pad = _bucket(n_c, block_size)
    ctrl_p = np.zeros((c_pad, x.shape[1]), dtype)
    ctrl_p[:n_c] = ctrl - center
    cmask = (np.arange(c_pad) < n_c).astype(dtype)
    ctrl_j, cmask_j = jnp.asarray(ctrl_p), jnp.asarray(cmask)
    cb, cm = _pad_rows(ctrl_j, cmask_j, block_size)
    scc = float(_self_energy(cb, cm))
    n_p = len(perts)
    sizes = np.bincount(codes[codes >= 0], minlength=n_p)
    n_max = _bucket(sizes.max(initial=1))
    sel = np.flatnonzero(codes >= 0)
    sel = sel[np.argsort(codes[sel], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    step = max(1, min(n_p, max_elements // max(1, n_max * x.shape[1])))
    step = 1 << (step.bit_length() - 1)  # a power of two: the block shape is shared
    sxx = np.zeros(n_p)
    sxc = np.zeros(n_p)
    slot = np.arange(n_max)[None, :]
    for p0 in range(0, n_p, step):  # blocks of perturbations (memory), not one by one
        p1 = min(p0 + step, n_p)
        sz = np.zeros(step, np.int64)
        st = np.zeros(step, np.int64)
        sz[: p1 - p0], st[: p1 - p0] = sizes[p0:p1], starts[p0:p1]
        valid = slot < sz[:, None]
        rows = np.where(valid, st[:, None] + slot, 0)
        xg = _rows(x, sel[np.minimum(rows, max(sel.size - 1, 0))].ravel(), dtype)
        xg = xg.reshape(step, n_max, -1) - center
        xg[~valid] = 0.0
        a, b = _group_energy_terms(
            jnp.asarray(xg), jnp.asarray(valid, dtype), ctrl_j, cmask_j, batch=min(8, step)
        )
        sxx[p0:p1] = np.asarray(a)[: p1 - p0]
        sxc[p0:p1] = np.asarray(b)[: p1 - p0]
    n = sizes.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = 2.0 * sxc / (n * n_c) - sxx / (n * n) - scc / (n_c * n_c)
    return np.where(sizes > 0, e, np.nan)


# --------------------------------------------------------------------------- host side


@dataclasses.dataclass(frozen=True, eq=False)
class CellEvalTruth:
    """The truth side of cell-eval's protocol, computed once and read for every prediction.

    Attributes:
      perts: the perturbations, sorted (cell-eval's order), control excluded.
      genes: the gene names, in the matrix's order.
      control: the control label.
      pseudobulk: ``(P + 1, G)`` means of the (normalised) truth cells, the control last,
        in the matrix's float type (cell-eval's polars means).
      fdr, lfc: ``(P, G)`` float32 DE table of the truth (None when no DE metric is asked).
      edistance: ``(P,)`` energy distances to the control (None when not asked).
      exclude: ``(P,)`` index of the gene named like each perturbation (-1: none).
      normalization: ``"log1p_median"`` (counts normalised as cell-eval does) or ``"none"``.
      metrics: the metrics this truth was prepared for.
    """

    perts: tuple[str, ...]
    genes: tuple[str, ...]
    control: str
    pseudobulk: np.ndarray
    fdr: np.ndarray | None
    lfc: np.ndarray | None
    edistance: np.ndarray | None
    exclude: np.ndarray
    normalization: str
    metrics: tuple[str, ...]

    @property
    def n_deg(self) -> np.ndarray | None:
        """``(P,)`` truth DEGs per perturbation (``fdr < 0.05``), None without DE."""
        return None if self.fdr is None else (self.fdr < np.float32(FDR_THRESHOLD)).sum(axis=1)


def _resolve(metrics: Sequence[str] | str | None) -> tuple[str, ...]:
    if metrics is None or (isinstance(metrics, str) and metrics == "all"):
        return CELLEVAL_METRICS
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    bad = [m for m in names if m not in CELLEVAL_METRICS]
    if bad:
        hint = " (not reproduced: Leiden clustering)" if set(bad) <= set(NOT_REPRODUCED) else ""
        raise VcjaxInputError(
            f"unknown cell-eval metric(s) {preview(bad)}{hint}; known: {', '.join(CELLEVAL_METRICS)}"
        )
    return tuple(m for m in CELLEVAL_METRICS if m in names)


def _labels(labels, n: int, which: str) -> np.ndarray:
    out = np.asarray(labels).astype(str)
    if out.shape != (n,):
        raise VcjaxInputError(f"the {which} labels have shape {out.shape}; expected ({n},)")
    return out


def celleval_truth(
    real_cells,
    real_labels: Sequence,
    genes: Sequence[str],
    *,
    control: str = "non-targeting",
    metrics: Sequence[str] | str | None = None,
) -> CellEvalTruth:
    """Prepare the truth side of cell-eval's protocol once (:class:`CellEvalTruth`).

    Args:
      real_cells: ``(N, G)`` measured cells: counts or log1p-normalised values (dense or
        sparse; :func:`celleval_normalize`).
      real_labels: ``(N,)`` perturbation label of each cell.
      genes: the ``G`` gene names.
      control: the control label (its cells are required).
      metrics: the cell-eval metrics to prepare for (default: all of
        :data:`CELLEVAL_METRICS`); the DE table is computed only for DE metrics, the
        energy distances only for ``pearson_edistance``.

    Returns:
      :class:`CellEvalTruth`.
    """
    names = _resolve(metrics)
    x, norm = celleval_normalize(real_cells, which="truth")
    labels = _labels(real_labels, x.shape[0], "truth")
    genes = tuple(map(str, genes))
    if len(genes) != x.shape[1]:
        raise VcjaxInputError(f"{len(genes)} gene names for a truth matrix of {x.shape[1]} genes")
    if control not in set(labels):
        raise VcjaxInputError(f"the truth has no control cells labelled {control!r}")
    perts = tuple(sorted(set(labels) - {control}))
    if not perts:
        raise VcjaxInputError("the truth has no perturbation besides the control")
    pb = pseudobulk(x, labels, [*perts, control], dtype=np.float64).astype(_pb_dtype(x))
    fdr = lfc = edist = None
    if any(m in DE_METRICS for m in names):
        de = celleval_de_table(x, labels, control=control, perts=list(perts))
        fdr, lfc = de["fdr"], de["lfc"]
    if "pearson_edistance" in names:
        edist = energy_to_control(x, labels, perts, control=control)
    gidx = {g: i for i, g in enumerate(genes)}
    exclude = np.array([gidx.get(p, -1) for p in perts], np.int32)
    return CellEvalTruth(perts, genes, control, pb, fdr, lfc, edist, exclude, norm, names)


def _pb_dtype(x) -> np.dtype:
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def _pearson_host(a: np.ndarray, b: np.ndarray) -> float:
    """scipy.stats.pearsonr's value over P values (NaN: non-finite, constant or < 2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    den = np.sqrt((da * da).sum() * (db * db).sum())
    return float((da * db).sum() / den) if den > 0 else float("nan")


def _spearman_host(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation (average ranks) over P values; NaN when constant or < 2."""
    return _pearson_host(rankdata(a), rankdata(b))


def celleval_scores(
    truth: CellEvalTruth,
    pred_cells,
    pred_labels: Sequence,
    *,
    genes: Sequence[str] | None = None,
    metrics: Sequence[str] | str | None = None,
) -> dict:
    """Score one prediction of cells under cell-eval's protocol against a prepared truth.

    Args:
      truth: from :func:`celleval_truth`.
      pred_cells: ``(N', G)`` predicted cells, counts or log1p values, **with control cells**
        (the prediction's deltas and DE tests use them, as cell-eval's).
      pred_labels: ``(N',)`` their labels: the truth's perturbations and control, no other.
      genes: the prediction's gene names (default: the truth's, in its order); reordered to
        the truth's order by name.
      metrics: a subset of the truth's metrics (default: all it was prepared for).

    Returns:
      ``{"perts": [...], "metrics": {name: (P,) float64}, "n_deg": {"truth": (P,),
      "prediction": (P,)} or None, "normalization": str}``; dataset-level metrics
      (:data:`DATASET_LEVEL`) repeat their value on every row, as cell-eval's table.
    """
    names = truth.metrics if metrics is None else _resolve(metrics)
    missing = [m for m in names if m not in truth.metrics]
    if missing:
        raise VcjaxInputError(f"the truth was not prepared for {preview(missing)}")
    x, norm = celleval_normalize(pred_cells, which="prediction")
    labels = _labels(pred_labels, x.shape[0], "prediction")
    if genes is not None:
        x = _reorder_genes(x, [str(g) for g in genes], truth.genes)
    elif x.shape[1] != len(truth.genes):
        raise VcjaxInputError(
            f"the prediction has {x.shape[1]} genes; the truth has {len(truth.genes)}"
        )
    perts, control = list(truth.perts), truth.control
    have = set(labels)
    if control not in have:
        raise VcjaxInputError(
            f"cell-eval needs the prediction's own control cells: no predicted cell is "
            f"labelled {control!r}"
        )
    lack = [p for p in perts if p not in have]
    if lack:
        raise VcjaxInputError(f"the prediction has no cells of perturbation(s) {preview(lack)}")
    extra = sorted(have - set(perts) - {control})
    if extra:
        raise VcjaxInputError(
            f"the prediction has perturbation(s) the truth lacks: {preview(extra)} (cell-eval "
            "requires the same perturbations on both sides)"
        )
    out: dict[str, np.ndarray] = {}
    n_p = len(perts)
    pb = pseudobulk(x, labels, [*perts, control], dtype=np.float64).astype(_pb_dtype(x))
    tpb = truth.pseudobulk
    bulk = tuple(m for m in names if m in PSEUDOBULK_METRICS)
    if bulk:
        # deltas are differences in the matrix's float type, as cell-eval's; scored in float64
        with jax.enable_x64(True):
            got = _bulk_kernel(
                *(np.asarray(a, np.float64) for a in (pb[:-1], tpb[:-1])),
                *(np.asarray(a, np.float64) for a in (pb[:-1] - pb[-1], tpb[:-1] - tpb[-1])),
                truth.exclude,
                names=bulk,
                block=_l1_block(*pb.shape),
            )
        out.update({k: np.asarray(v) for k, v in got.items()})
    n_deg = None
    if any(m in DE_METRICS for m in names):
        de = celleval_de_table(x, labels, control=control, perts=perts)
        out.update(_de_metrics(truth.fdr, truth.lfc, de["fdr"], de["lfc"], names))
        thr = np.float32(FDR_THRESHOLD)
        n_deg = {"truth": (truth.fdr < thr).sum(1), "prediction": (de["fdr"] < thr).sum(1)}
    if "pearson_edistance" in names:
        d_pred = energy_to_control(x, labels, perts, control=control)
        out["pearson_edistance"] = np.full(n_p, _pearson_host(truth.edistance, d_pred))
    metrics_out = {m: np.asarray(out[m], np.float64).reshape(n_p) for m in names}
    return {"perts": perts, "metrics": metrics_out, "n_deg": n_deg, "normalization": norm}


def _reorder_genes(x, genes: list[str], want: tuple[str, ...]):
    if tuple(genes) == want:
        return x
    idx = {g: i for i, g in enumerate(genes)}
    lack = [g for g in want if g not in idx]
    if lack:
        raise VcjaxInputError(f"the prediction lacks gene(s) {preview(lack)} of the truth")
    cols = np.array([idx[g] for g in want])
    return x[:, cols]


def _l1_block(p: int, g: int, budget: int = 1 << 25) -> int:
    """Rows per block of the L1 discrimination distances: ``block · P · G`` float64 values
    within ``budget`` (a power of two, so few compilations)."""
    rows = max(1, budget // max(1, p * g))
    return min(64, 1 << (rows.bit_length() - 1))


@partial(jax.jit, static_argnames=("names", "block"))
def _bulk_kernel(pred, true, pred_delta, true_delta, exclude, *, names, block=64):
    """The pseudobulk metrics of cell-eval (one compilation for all of them)."""
    out = {}
    if "pearson_delta" in names:
        out["pearson_delta"] = pearson(pred_delta, true_delta)
    for name, fn, a, b in (
        ("mse", _mse, pred, true),
        ("mae", _mae, pred, true),
        ("mse_delta", _mse, pred_delta, true_delta),
        ("mae_delta", _mae, pred_delta, true_delta),
    ):
        if name in names:
            out[name] = fn(a, b)
    for dist in ("l1", "l2", "cosine"):
        name = f"discrimination_score_{dist}"
        if name in names:
            out[name] = pds(
                pred_delta, true_delta, exclude=exclude, distance=dist, block_size=block
            )
    return out


@partial(jax.jit, static_argnames=("names",))
def _de_kernel(t_fdr, t_lfc, p_fdr, p_lfc, score, *, names):
    """The per-perturbation DE metrics of cell-eval from the two ``(P, G)`` float32 tables
    (one compilation for all of them)."""
    out = {}
    t_set = t_fdr < FDR_THRESHOLD
    for mode in ("overlap", "precision"):
        for k in _TOP_K:
            name = f"{mode}_at_{k or 'N'}"
            if name in names:
                out[name] = de_overlap_at_k(
                    t_fdr, t_lfc, p_fdr, p_lfc, k=k, alpha=FDR_THRESHOLD, mode=mode
                )
    if "de_direction_match" in names:
        out["de_direction_match"] = de_direction_agreement(t_fdr, t_lfc, p_lfc, alpha=FDR_THRESHOLD)
    if "de_spearman_lfc_sig" in names:
        wide = jnp.result_type(float)  # float64 under x64
        out["de_spearman_lfc_sig"] = masked_spearman(t_lfc.astype(wide), p_lfc.astype(wide), t_set)
    if "pr_auc" in names or "roc_auc" in names:
        out["roc_auc"], out["pr_auc"] = de_auc(score, t_set)
    return out


def _de_metrics(t_fdr, t_lfc, p_fdr, p_lfc, names) -> dict[str, np.ndarray]:
    """The DE-table metrics of cell-eval (``(P, G)`` float32 tables of both sides)."""
    thr = np.float32(FDR_THRESHOLD)
    t_set, p_set = t_fdr < thr, p_fdr < thr
    n_t, n_p = t_set.sum(1), p_set.sum(1)
    # cell-eval's AUC score: -log10(clip(fdr, 1e-10, 1)) in float32 (polars: ln(q) / ln(10),
    # each rounded to float32); only its order and ties matter
    q = np.clip(p_fdr.astype(np.float32), np.float32(1e-10), np.float32(1.0))
    score = -(np.log(q.astype(np.float64)).astype(np.float32) / np.float32(np.log(10.0)))
    kernel = tuple(m for m in names if m in _DE_KERNEL)
    out: dict[str, np.ndarray] = {}
    if kernel:
        with jax.enable_x64(True):
            got = _de_kernel(
                *(np.asarray(a, np.float32) for a in (t_fdr, t_lfc, p_fdr, p_lfc)),
                score.astype(np.float64),
                names=kernel,
            )
        out.update({k: np.asarray(v, np.float64) for k, v in got.items()})
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(n_t > 0, (t_set & p_set).sum(1) / np.maximum(n_t, 1), np.nan)
    out["de_sig_genes_recall"] = recall
    out["de_nsig_counts_real"] = n_t.astype(np.float64)
    out["de_nsig_counts_pred"] = n_p.astype(np.float64)
    has = n_t > 0  # cell-eval: over the perturbations with a truth DEG; 1.0 when none has
    rho = _spearman_host(n_t[has], n_p[has]) if has.any() else 1.0
    out["de_spearman_sig"] = np.full(n_t.size, rho)
    return {k: v for k, v in out.items() if k in names}


#: the DE metrics of :func:`_de_kernel` (the others are counts on the host)
_DE_KERNEL = (
    *(f"{m}_at_{k or 'N'}" for m in ("overlap", "precision") for k in _TOP_K),
    "de_direction_match",
    "de_spearman_lfc_sig",
    "pr_auc",
    "roc_auc",
)


def celleval_protocol(
    real_cells,
    real_labels: Sequence,
    pred_cells,
    pred_labels: Sequence,
    genes: Sequence[str],
    *,
    control: str = "non-targeting",
    pred_genes: Sequence[str] | None = None,
    metrics: Sequence[str] | str | None = None,
) -> dict:
    """cell-eval 0.8.2's per-perturbation metrics of one prediction (truth prepared here).

    ``celleval_scores(celleval_truth(real_cells, real_labels, genes, control=control),
    pred_cells, pred_labels)``; for several predictions prepare the truth once.

    Returns:
      ``{"perts": [...], "metrics": {cell-eval name: (P,) float64}, ...}``
      (:func:`celleval_scores`).
    """
    truth = celleval_truth(real_cells, real_labels, genes, control=control, metrics=metrics)
    return celleval_scores(truth, pred_cells, pred_labels, genes=pred_genes)
