"""The peers' metrics (cell-eval, GEARS, Systema, PerturBench, hit discovery) as JAX kernels.

Every kernel is pure and jit-able; data are positional, options keyword-only. Three kinds:

* **Per-perturbation, elementwise over genes** — ``(..., G)`` kernels like
  :mod:`vcjax.metrics`: :func:`mae` (cell-eval), :func:`direction_agreement` and
  :func:`pearson_delta_top20` (GEARS), :func:`cosine_delta` (PerturBench).
* **Cross-perturbation** — take whole ``(P, G)`` matrices and are vectorised with matrix
  products, blocked ``lax.map`` reductions and sorts (no Python loop over
  perturbations): :func:`pds` (cell-eval ``discrimination_score_l1``), :func:`rank`
  (PerturBench), :func:`centroid_accuracy` (Systema), :func:`de_overlap_at_k` and
  :func:`de_direction_agreement` (cell-eval DE), :func:`hit_recall_at_budget`,
  :func:`hit_recall_at_fdr`.
* **Distribution-level** (predictions are cells) — :func:`energy_distance` and
  :func:`mmd` between predicted and true cells of one perturbation, computed in fixed-size
  blocks of pairs with padding masks (no recompilation for different cell numbers within
  a padded size).

Host-level helpers (NumPy / AnnData edge): :func:`pseudobulk`, :func:`celleval_de_table`
(cell-eval's per-perturbation Wilcoxon DE table) and :func:`celleval_metrics` (the four
cell-eval-compatible columns from cell matrices), :func:`distribution_distances`.

Definitions, sources and what each metric rewards are in ``docs/metrics.md``; the
cell-eval conventions are in docs/metrics.md §9.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp
from jax.typing import ArrayLike

from vcjax.metrics import cosine_delta, mae, pearson_delta_topk
from vcjax.stats import bh_fdr, log2_fold_change, mannwhitney_vs_control

__all__ = [
    # per-perturbation (..., G)
    "mae",
    "cosine_delta",
    "direction_agreement",
    "pearson_delta_top20",
    # cross-perturbation (P, G)
    "pds",
    "rank",
    "perturbed_centroid",
    "centroid_accuracy",
    "de_overlap_at_k",
    "de_direction_agreement",
    "hit_recall_at_budget",
    "hit_recall_at_fdr",
    # distributions
    "energy_distance",
    "mmd",
    "rbf_bandwidth",
    # host helpers
    "pseudobulk",
    "celleval_de_table",
    "celleval_metrics",
    "distribution_distances",
]


def _float(*arrays: ArrayLike) -> list[jax.Array]:
    dtype = jnp.result_type(jnp.float32, *arrays)
    return [jnp.asarray(a, dtype=dtype) for a in arrays]


# --------------------------------------------------------------------------- (..., G) kernels


def direction_agreement(
    pred: ArrayLike,
    truth: ArrayLike,
    reference: ArrayLike,
    *,
    pred_reference: ArrayLike | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Fraction of genes whose predicted change has the true direction (GEARS).

    .. math:: \frac{1}{|S|} \sum_{g \in S}
              \mathbb 1\big[\operatorname{sign}(\hat y_g - \hat r_g) = \operatorname{sign}(y_g - r_g)\big]

    ``sign(0) = 0``, so a gene with no true change counts as correct only when the
    prediction has no change either (GEARS ``frac_correct_direction_*``).

    Args:
      pred: predicted profiles ``(..., G)``.
      truth: true profiles ``(..., G)``.
      reference: reference of the truth (GEARS: the control mean), ``(..., G)``.
      pred_reference: reference of the prediction; defaults to ``reference``
        (cell-eval uses the prediction's own control here).
      where: gene set ``S`` as a boolean mask ``(..., G)``; GEARS uses the top-20 DEGs
        (``frac_correct_direction_top20_non_dropout``) or all genes (``..._all``). With the
        truth's Wilcoxon DEGs at FDR < 0.05 this equals cell-eval's ``de_direction_match``.

    Returns:
      ``(...)``. NaN when ``S`` is empty.

    References:
      Roohani et al., GEARS, Nat. Biotechnol. (2024), ``gears/inference.py``.
    """
    pred, truth, reference = _float(pred, truth, reference)
    pref = reference if pred_reference is None else jnp.asarray(pred_reference, pred.dtype)
    agree = (jnp.sign(pred - pref) == jnp.sign(truth - reference)).astype(pred.dtype)
    if where is None:
        return jnp.mean(agree, axis=-1)
    m = jnp.broadcast_to(jnp.asarray(where, bool), agree.shape).astype(pred.dtype)
    n = jnp.sum(m, axis=-1)
    return jnp.where(n > 0, jnp.sum(agree * m, axis=-1) / jnp.maximum(n, 1.0), jnp.nan)


def pearson_delta_top20(
    pred: ArrayLike, truth: ArrayLike, reference: ArrayLike, scores: ArrayLike, *, k: int = 20
) -> jax.Array:
    r"""GEARS Pearson Δ on the top-``k`` DEGs: ``corr(ŷ_D - r_D, y_D - r_D)``.

    ``D`` = the ``k`` genes with the largest ``scores`` (GEARS: ``|score|`` of scanpy's
    ``rank_genes_groups`` of the perturbation vs control, ``rankby_abs=True``); ``r`` is the
    control mean. Ties go to the lower gene index.

    Args:
      pred, truth, reference: ``(..., G)``.
      scores: DE ranking score per gene (larger = more DE), ``(..., G)``.
      k: number of DEGs (20 in GEARS).

    Returns:
      ``(...)``. NaN when a delta is constant on ``D`` (GEARS reports 0 there) or ``k > G``.

    References:
      GEARS ``pearson_delta_top20_de``; delegates to
      :func:`vcjax.metrics.pearson_delta_topk`.
    """
    return pearson_delta_topk(pred, truth, reference, scores, k=k)


# --------------------------------------------------------------------------- cross-perturbation


def _exclusion(exclude: ArrayLike | None, p: int, g: int) -> jax.Array | None:
    """(P, G) 0/1 float mask of kept genes per *row* (prediction), or None."""
    if exclude is None:
        return None
    ex = jnp.asarray(exclude, jnp.int32)
    return (jnp.arange(g)[None, :] != ex[:, None]).astype(jnp.float32)


def _pairwise_distance(
    pred: jax.Array, truth: jax.Array, keep: jax.Array | None, distance: str, block: int
) -> jax.Array:
    """D[p, q] = distance(pred_p, truth_q) over the genes kept for row p, (P, Q)."""
    if keep is not None:
        keep = keep.astype(pred.dtype)
    if distance == "l1":

        def row(args):
            x, k = args
            diff = jnp.abs(x[None, :] - truth)
            return jnp.sum(diff if keep is None else diff * k[None, :], axis=-1)

        ks = keep if keep is not None else jnp.zeros((pred.shape[0], 1), pred.dtype)
        return jax.lax.map(row, (pred, ks), batch_size=block)
    if keep is None:
        dot = pred @ truth.T
        pn = jnp.sum(pred * pred, axis=-1)[:, None]
        tn = jnp.broadcast_to(jnp.sum(truth * truth, axis=-1)[None, :], dot.shape)
    else:
        # genes differ per row: the kept-gene mask multiplies the prediction side
        dot = (pred * keep) @ truth.T
        pn = jnp.sum(pred * pred * keep, axis=-1)[:, None]
        tn = keep @ (truth * truth).T
    if distance == "l2":
        return jnp.sqrt(jnp.maximum(pn + tn - 2.0 * dot, 0.0))
    if distance == "cosine":
        den = jnp.sqrt(pn * tn)
        sim = jnp.where(den > 0, dot / jnp.where(den > 0, den, 1.0), 0.0)
        return 1.0 - sim
    raise ValueError(f"unknown distance {distance!r}")


@partial(jax.jit, static_argnames=("distance", "block_size"))
def pds(
    pred_delta: ArrayLike,
    truth_delta: ArrayLike,
    *,
    exclude: ArrayLike | None = None,
    distance: str = "l1",
    block_size: int = 64,
) -> jax.Array:
    r"""Perturbation discrimination score (cell-eval ``discrimination_score_l1``).

    For prediction ``p``: ``d_q = dist(Δ̂_p, Δ_q)`` to every true delta ``q`` (the target gene
    of ``p`` left out of every ``d_q``), ``rank_p = #{q : d_q < d_p}`` (0-based, only strictly
    closer perturbations count), and

    .. math:: \mathrm{PDS}_p = 1 - \mathrm{rank}_p / P \in \{1/P, \dots, 1\}

    1 is best (the own truth is the closest).

    Args:
      pred_delta: predicted deltas ``(P, G)``; cell-eval: pred pseudobulk minus the
        **prediction's own** control pseudobulk.
      truth_delta: true deltas ``(P, G)`` in the same perturbation order (real pseudobulk
        minus real control).
      exclude: ``(P,)`` int gene index left out for each perturbation (its target gene,
        when the label is a gene name), ``-1`` for none.
      distance: ``"l1"`` (cell-eval's PDS, blocked ``lax.map``, O(P²G)), ``"l2"`` or
        ``"cosine"`` (``discrimination_score_l2`` / ``_cosine``, one matrix product;
        a zero vector has cosine similarity 0).
      block_size: rows per block of the L1 distance computation (memory ``block·P·G``).

    Returns:
      ``(P,)`` scores. cell-eval breaks exact distance ties with an unstable argsort; here
      ties never count against ``p``.

    References:
      cell-eval 0.8.2 ``metrics/_anndata.py::discrimination_score``; docs/metrics.md §9.
    """
    pred, truth = _float(pred_delta, truth_delta)
    p, g = pred.shape
    keep = _exclusion(exclude, p, g)
    d = _pairwise_distance(pred, truth, keep, distance, block_size)
    own = jnp.diagonal(d)
    rank_ = jnp.sum(d < own[:, None], axis=1)
    return 1.0 - rank_.astype(pred.dtype) / p


@partial(jax.jit, static_argnames=("metric",))
def rank(pred: ArrayLike, truth: ArrayLike, *, metric: str = "cosine") -> jax.Array:
    r"""PerturBench rank metric: how the matching prediction ranks for each true perturbation.

    With ``S[r, q] = sim(pred_r, truth_q)`` for all pairs (one matrix product), for each
    true perturbation ``q``:

    .. math:: \mathrm{rank}_q = \frac{\#\{r : S[r,q] \succ S[q,q]\}
              + \tfrac12 \#\{r \ne q : S[r,q] = S[q,q]\}}{P}

    where ``≻`` is "more similar". PerturBench shuffles before a stable sort; ties count ½
    here, the expectation under that shuffle. 0 is best, ~0.5 is random.

    Args:
      pred: ``(P, G)`` predicted profiles (PerturBench: log fold changes vs control).
      truth: ``(P, G)`` true profiles, same perturbation order.
      metric: ``"cosine"`` (PerturBench default), ``"pearson"`` (cosine of gene-centred
        rows), ``"mse"`` or ``"rmse"`` (distances; same ranking).

    Returns:
      ``(P,)`` normalised ranks in ``[0, (P-1)/P]``. Rows with a zero vector (cosine) or a
      constant one (pearson) get similarity 0.

    References:
      Wu et al., PerturBench (2024), ``analysis/benchmarks/metrics.py::rank_helper``.
    """
    pred, truth = _float(pred, truth)
    p, g = pred.shape
    if metric == "pearson":
        pred = pred - jnp.mean(pred, axis=-1, keepdims=True)
        truth = truth - jnp.mean(truth, axis=-1, keepdims=True)
    dot = pred @ truth.T  # (pred r, truth q)
    pn = jnp.sum(pred * pred, axis=-1)
    tn = jnp.sum(truth * truth, axis=-1)
    if metric in ("cosine", "pearson"):
        den = jnp.sqrt(pn[:, None] * tn[None, :])
        score = jnp.where(den > 0, dot / jnp.where(den > 0, den, 1.0), 0.0)
    elif metric in ("mse", "rmse"):
        score = -(pn[:, None] + tn[None, :] - 2.0 * dot) / g  # higher = more similar
    else:
        raise ValueError(f"unknown metric {metric!r}")
    own = jnp.diagonal(score)[None, :]
    better = jnp.sum(score > own, axis=0)
    ties = jnp.sum(score == own, axis=0) - 1
    return (better + 0.5 * ties).astype(pred.dtype) / p


def perturbed_centroid(pseudobulks: ArrayLike, *, mask: ArrayLike | None = None) -> jax.Array:
    r"""Systema reference: the mean of the perturbations' pseudobulks (control excluded).

    .. math:: \bar\mu = \frac{1}{P} \sum_p \mu_p

    Centroid-referenced deltas ``x - \bar\mu`` remove the systematic variation shared by all
    perturbed cells; use them with :func:`vcjax.metrics.pearson_delta` (Systema's
    "Pearson Δ vs perturbed centroid") or pass ``reference=perturbed_centroid(...)`` to any
    Δ metric.

    Args:
      pseudobulks: ``(P, G)`` per-perturbation means (true data, control row excluded).
      mask: optional ``(P,)`` boolean rows to include.

    Returns:
      ``(G,)``; NaN when no row is included.

    References:
      Viñas Torné et al., Systema, Nat. Biotechnol. (2025),
      ``evaluation/eval_utils.py::average_of_perturbation_centroids``.
    """
    (x,) = _float(pseudobulks)
    if mask is None:
        return jnp.mean(x, axis=0)
    m = jnp.asarray(mask, x.dtype)[:, None]
    n = jnp.sum(m)
    return jnp.where(n > 0, jnp.sum(x * m, axis=0) / jnp.maximum(n, 1.0), jnp.nan)


@jax.jit
def centroid_accuracy(pred: ArrayLike, truth: ArrayLike) -> jax.Array:
    r"""Systema centroid accuracy: share of other true centroids farther than the own one.

    .. math:: \mathrm{acc}_p = \frac{\#\{q : \|\hat y_p - y_q\|_2 > \|\hat y_p - y_p\|_2\}}{P - 1}

    Euclidean, on profiles or on deltas with a common reference (the same ranking). Ties
    count as not farther (Systema uses a strict ``>``). 1 is best, ~0.5 is random.

    Args:
      pred: ``(P, G)`` predicted profiles; truth: ``(P, G)`` true centroids (same order).

    Returns:
      ``(P,)``; NaN when ``P < 2``.

    References:
      Systema ``evaluation/centroid_accuracy.py::calculate_centroid_accuracies``.
    """
    pred, truth = _float(pred, truth)
    p = pred.shape[0]
    mu = jnp.mean(truth, axis=0)  # centring reduces cancellation in the Gram expansion
    d = _pairwise_distance(pred - mu, truth - mu, None, "l2", 1)
    own = jnp.diagonal(d)[:, None]
    farther = jnp.sum(d > own, axis=1).astype(pred.dtype)
    return farther / (p - 1) if p > 1 else jnp.full((p,), jnp.nan, pred.dtype)


def _set_ranks(lfc: jax.Array, in_set: jax.Array) -> jax.Array:
    """0-based position of each gene in its row's set ordered by |lfc| desc (ties: gene
    order); genes outside the set get G."""
    g = lfc.shape[-1]
    key = jnp.where(in_set, -jnp.abs(lfc), jnp.inf)
    key = jnp.where(in_set & jnp.isnan(key), jnp.inf, key)
    order = jnp.argsort(key, axis=-1, stable=True)
    pos = jnp.argsort(order, axis=-1, stable=True)
    return jnp.where(in_set, pos, g)


@partial(jax.jit, static_argnames=("k", "mode"))
def de_overlap_at_k(
    truth_fdr: ArrayLike,
    truth_lfc: ArrayLike,
    pred_fdr: ArrayLike,
    pred_lfc: ArrayLike,
    *,
    k: int | None = None,
    alpha: float = 0.05,
    mode: str = "overlap",
) -> jax.Array:
    r"""DE gene overlap / precision at k (cell-eval ``overlap_at_N`` and friends).

    ``T`` (truth DEGs) = genes with ``truth_fdr < alpha``, ``Pd`` (predicted DEGs) = genes
    with ``pred_fdr < alpha``, each ordered by ``|lfc|`` descending (ties in gene order).

    * ``mode="overlap"``, ``k=None`` (cell-eval ``overlap_at_N``):
      ``|T ∩ Pd[:|T|]| / |T|``.
    * ``mode="overlap"``, ``k`` given (``overlap_at_k``): ``k' = min(k, |T|)``,
      ``|T[:k'] ∩ Pd[:k']| / k'``.
    * ``mode="precision"``: ``k' = |Pd|`` (``k=None``) or ``min(k, |Pd|)``,
      ``|T[:k'] ∩ Pd[:k']| / k'``.

    The FDRs are compared in float32, as cell-eval does.

    Args:
      truth_fdr, truth_lfc: ``(P, G)`` BH FDR and log2 fold change of the true DE test
        (each perturbation vs control; :func:`celleval_de_table`).
      pred_fdr, pred_lfc: the same for the prediction (vs the prediction's own control).
      k: list length (static); None for ``N``.
      alpha: FDR threshold (strict ``<``).
      mode: ``"overlap"`` or ``"precision"``.

    Returns:
      ``(P,)`` in ``[0, 1]``. **0** (not NaN, for cell-eval parity) when ``k' = 0`` or when
      the prediction has no DEG.

    References:
      cell-eval 0.8.2 ``_types/_de.py::compute_overlap``; docs/metrics.md §9.
    """
    t_set = jnp.asarray(truth_fdr, jnp.float32) < alpha
    p_set = jnp.asarray(pred_fdr, jnp.float32) < alpha
    t_rank = _set_ranks(jnp.asarray(truth_lfc, jnp.float32), t_set)
    p_rank = _set_ranks(jnp.asarray(pred_lfc, jnp.float32), p_set)
    n_t = jnp.sum(t_set, axis=-1)
    n_p = jnp.sum(p_set, axis=-1)
    if mode == "overlap":
        base = n_t
    elif mode == "precision":
        base = n_p
    else:
        raise ValueError(f"unknown mode {mode!r}")
    k_eff = base if k is None else jnp.minimum(base, k)
    hit = (t_rank < k_eff[..., None]) & (p_rank < k_eff[..., None])
    num = jnp.sum(hit, axis=-1).astype(jnp.float32)
    ok = (k_eff > 0) & (n_p > 0) & (n_t > 0)
    return jnp.where(ok, num / jnp.maximum(k_eff, 1), 0.0)


@jax.jit
def de_direction_agreement(
    truth_fdr: ArrayLike, truth_lfc: ArrayLike, pred_lfc: ArrayLike, *, alpha: float = 0.05
) -> jax.Array:
    r"""Share of truth DEGs whose predicted log fold change has the true sign
    (cell-eval ``de_direction_match``).

    .. math:: \frac{1}{|T|} \sum_{g \in T} \mathbb 1[\operatorname{sign} \mathrm{lfc}^{pred}_g
              = \operatorname{sign} \mathrm{lfc}^{true}_g], \quad T = \{g : \mathrm{fdr}^{true}_g < \alpha\}

    ``pred_lfc`` covers all genes (significant or not); ``sign(0) = 0``, ``sign(±inf) = ±1``.
    Equivalent to :func:`direction_agreement` of the pseudobulks on ``T`` with each side
    referenced to its own control.

    Returns:
      ``(P,)``; NaN when ``|T| = 0`` (cell-eval: null).

    References:
      cell-eval 0.8.2 ``metrics/_de.py::DEDirectionMatch``.
    """
    t_set = jnp.asarray(truth_fdr, jnp.float32) < alpha
    tl = jnp.asarray(truth_lfc, jnp.float32)
    pl = jnp.asarray(pred_lfc, jnp.float32)
    agree = (jnp.sign(tl) == jnp.sign(pl)) & t_set
    n = jnp.sum(t_set, axis=-1)
    return jnp.where(n > 0, jnp.sum(agree, axis=-1) / jnp.maximum(n, 1), jnp.nan)


def _tie_group_counts(scores: jax.Array, other: jax.Array) -> tuple[jax.Array, ...]:
    """Sort rows by score (desc); return sorted scores, sorted `other`, and for every
    position the number of elements / `other`-sum strictly above its tie group and in it."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    s = jnp.take_along_axis(scores, order, axis=-1)
    o = jnp.take_along_axis(other, order, axis=-1)
    n = s.shape[-1]
    # tie groups: first/last index of each equal-score run
    idx = jnp.broadcast_to(jnp.arange(n), s.shape)
    new = jnp.concatenate([jnp.ones_like(s[..., :1], bool), s[..., 1:] != s[..., :-1]], axis=-1)
    is_end = jnp.concatenate([new[..., 1:], jnp.ones_like(s[..., :1], bool)], axis=-1)
    ax = s.ndim - 1
    start = jax.lax.cummax(jnp.where(new, idx, 0), axis=ax)
    end = jax.lax.cummin(jnp.where(is_end, idx, n), axis=ax, reverse=True)
    csum = jnp.cumsum(o, axis=-1)
    zero = jnp.zeros_like(csum[..., :1])
    csum0 = jnp.concatenate([zero, csum], axis=-1)  # csum0[i] = sum of o[:i]
    above = jnp.take_along_axis(csum0, start, axis=-1)
    through = jnp.take_along_axis(csum0, end + 1, axis=-1)
    return s, start, end, above, through


def hit_recall_at_budget(scores: ArrayLike, is_hit: ArrayLike, *, budget: int) -> jax.Array:
    r"""Recall of true hits among the ``budget`` perturbations with the largest predicted score.

    .. math:: \mathrm{recall} = \frac{\#\{\text{true hits in the top } B\}}{\#\{\text{true hits}\}}

    Ties at the cut-off are split fairly: a tie group straddling position ``B`` contributes
    its hits in proportion to the places left (the expectation over random tie-breaking).
    NaN scores rank last.

    Args:
      scores: ``(..., P)`` predicted hit scores (e.g. the predicted effect size ``‖Δ̂_p‖``,
        the number of predicted DEGs, or ``-log p``).
      is_hit: ``(..., P)`` boolean true hits (e.g. perturbations with ≥ 1 truth DEG).
      budget: number of perturbations that would be followed up, ``0 ≤ B``.

    Returns:
      ``(...)``; NaN when there is no true hit.
    """
    (s,) = _float(scores)
    s = jnp.where(jnp.isnan(s), -jnp.inf, s)
    h = jnp.asarray(is_hit, s.dtype)
    n = s.shape[-1]
    b = min(max(int(budget), 0), n)
    total = jnp.sum(h, axis=-1)
    if b == 0:
        return jnp.where(total > 0, 0.0, jnp.nan)
    _, start, end, above, through = _tie_group_counts(s, h)
    # the tie group containing position b-1
    st = start[..., b - 1]
    en = end[..., b - 1]
    ab = above[..., b - 1]
    th = through[..., b - 1]
    size = (en - st + 1).astype(s.dtype)
    taken = (b - st).astype(s.dtype)
    got = ab + (th - ab) * taken / size
    return jnp.where(total > 0, got / jnp.maximum(total, 1.0), jnp.nan)


def hit_recall_at_fdr(scores: ArrayLike, is_hit: ArrayLike, *, fdr: float = 0.1) -> jax.Array:
    r"""Largest recall of true hits over score thresholds whose false discovery rate ≤ ``fdr``.

    For a threshold ``t`` the called set is ``{p : score_p ≥ t}`` (a tie group is called or
    not as a whole), ``FDP(t) = #non-hits called / #called`` and
    ``recall(t) = #hits called / #hits``:

    .. math:: \mathrm{recall@FDR}_\alpha = \max_{t : \mathrm{FDP}(t) \le \alpha} \mathrm{recall}(t)

    (0 when no threshold qualifies). This is the recall at precision ``1 - α`` of the
    precision–recall curve.

    Args:
      scores: ``(..., P)`` predicted hit scores (larger = more likely a hit); NaN ranks last.
      is_hit: ``(..., P)`` boolean true hits.
      fdr: the tolerated false discovery proportion ``α``.

    Returns:
      ``(...)``; NaN when there is no true hit.
    """
    (s,) = _float(scores)
    s = jnp.where(jnp.isnan(s), -jnp.inf, s)
    h = jnp.asarray(is_hit, s.dtype)
    total = jnp.sum(h, axis=-1)
    _, _, end, _, through = _tie_group_counts(s, h)
    # threshold at each position's tie group: everything up to its end is called
    called = (end + 1).astype(s.dtype)
    tp = through
    fdp = (called - tp) / called
    recall = jnp.where(fdp <= fdr, tp, 0.0)
    best = jnp.max(recall, axis=-1)
    return jnp.where(total > 0, best / jnp.maximum(total, 1.0), jnp.nan)


# --------------------------------------------------------------------------- distributions


def _pad_rows(x: jax.Array, mask: jax.Array | None, block: int) -> tuple[jax.Array, jax.Array]:
    n = x.shape[0]
    m = jnp.ones((n,), x.dtype) if mask is None else jnp.asarray(mask, x.dtype)
    pad = (-n) % block
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, x.shape[1]), x.dtype)], axis=0)
        m = jnp.concatenate([m, jnp.zeros((pad,), x.dtype)], axis=0)
    return x.reshape(-1, block, x.shape[1]), m.reshape(-1, block)


def _block_sum(
    a: jax.Array, am: jax.Array, b: jax.Array, bm: jax.Array, fn, same: bool
) -> jax.Array:
    """Σ_{i,j} am_i bm_j fn(‖a_i - b_j‖²) over (nblocks, block, G) inputs, one
    (block × block) tile at a time. ``same``: a is b, so exact self-pairs are set to 0."""
    an = jnp.sum(a * a, axis=-1)
    bn = jnp.sum(b * b, axis=-1)
    nb_b = b.shape[0]

    def row_block(args):
        i, ai, ami, ani = args

        def col_block(j, acc):
            bj, bmj, bnj = b[j], bm[j], bn[j]
            d2 = jnp.maximum(ani[:, None] + bnj[None, :] - 2.0 * ai @ bj.T, 0.0)
            if same:
                eye = (i == j) & jnp.eye(ai.shape[0], dtype=bool)
                d2 = jnp.where(eye, 0.0, d2)
            w = ami[:, None] * bmj[None, :]
            return acc + jnp.sum(w * fn(d2))

        return jax.lax.fori_loop(0, nb_b, col_block, jnp.zeros((), a.dtype))

    ids = jnp.arange(a.shape[0])
    return jnp.sum(jax.lax.map(row_block, (ids, a, am, an)))


def _sqrt0(d2: jax.Array) -> jax.Array:
    pos = d2 > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, d2, 1.0)), 0.0)


def _prep(x, y, x_mask, y_mask, block):
    x, y = _float(x, y)
    center = (
        jnp.mean(y, axis=0)
        if y_mask is None
        else (
            jnp.sum(y * jnp.asarray(y_mask, y.dtype)[:, None], axis=0)
            / jnp.maximum(jnp.sum(jnp.asarray(y_mask, y.dtype)), 1.0)
        )
    )
    xb, xm = _pad_rows(x - center, x_mask, block)
    yb, ym = _pad_rows(y - center, y_mask, block)
    return xb, xm, yb, ym


@partial(jax.jit, static_argnames=("block_size",))
def energy_distance(
    x: ArrayLike,
    y: ArrayLike,
    *,
    x_mask: ArrayLike | None = None,
    y_mask: ArrayLike | None = None,
    block_size: int = 128,
) -> jax.Array:
    r"""Energy distance between two cell sets (V-statistic, Euclidean).

    .. math:: E = 2\,\overline{\|x - y\|} - \overline{\|x - x'\|} - \overline{\|y - y'\|}

    with means over all pairs, self-pairs included (as cell-eval's ``pearson_edistance``
    and scPerturb's ``edist`` with Euclidean distance; scPerturb's default uses squared
    distances). ``E ≥ 0``, 0 iff the empirical distributions coincide.

    Pairwise distances are computed in ``block_size × block_size`` tiles (Gram expansion
    after centring on the ``y`` mean; exact self-pairs set to 0), so memory is
    ``O(block² + (n + m)·G)``. Pad the cell matrices to a fixed number of rows and pass
    masks to reuse one compiled kernel for different cell numbers.

    Args:
      x: predicted cells ``(n, G)``; y: true cells ``(m, G)`` (log-normalised expression).
      x_mask, y_mask: optional ``(n,)`` / ``(m,)`` 0/1 masks of real (non-padding) rows.
      block_size: tile size (static).

    Returns:
      scalar; NaN when either set is empty.

    References:
      Székely & Rizzo (2013); Peidli et al., scPerturb, Nat. Methods (2024).
    """
    xb, xm, yb, ym = _prep(x, y, x_mask, y_mask, block_size)
    nx, ny = jnp.sum(xm), jnp.sum(ym)
    sxy = _block_sum(xb, xm, yb, ym, _sqrt0, False)
    sxx = _block_sum(xb, xm, xb, xm, _sqrt0, True)
    syy = _block_sum(yb, ym, yb, ym, _sqrt0, True)
    ok = (nx > 0) & (ny > 0)
    nxs, nys = jnp.maximum(nx, 1.0), jnp.maximum(ny, 1.0)
    e = 2.0 * sxy / (nxs * nys) - sxx / (nxs * nxs) - syy / (nys * nys)
    return jnp.where(ok, e, jnp.nan)


def rbf_bandwidth(
    x: ArrayLike, y: ArrayLike, *, x_mask: ArrayLike | None = None, y_mask: ArrayLike | None = None
) -> jax.Array:
    r"""Default RBF bandwidth of :func:`mmd`: ``σ² = ½ · mean pairwise ‖z - z'‖²`` of the pooled sample.

    In closed form ``σ² = Σ_g Var_g(z)`` (population variance of the pooled cells ``z = x ∪ y``
    per gene), i.e. the "mean heuristic": the kernel's length scale is the typical distance
    between two cells. O((n + m) G), deterministic, no median over all pairs.
    """
    x, y = _float(x, y)
    xm = jnp.ones(x.shape[0], x.dtype) if x_mask is None else jnp.asarray(x_mask, x.dtype)
    ym = jnp.ones(y.shape[0], y.dtype) if y_mask is None else jnp.asarray(y_mask, y.dtype)
    z = jnp.concatenate([x, y], axis=0)
    w = jnp.concatenate([xm, ym])
    n = jnp.maximum(jnp.sum(w), 1.0)
    mu = jnp.sum(z * w[:, None], axis=0) / n
    return jnp.sum(w[:, None] * jnp.square(z - mu), axis=None) / n


@partial(jax.jit, static_argnames=("block_size",))
def mmd(
    x: ArrayLike,
    y: ArrayLike,
    *,
    sigma: ArrayLike | None = None,
    x_mask: ArrayLike | None = None,
    y_mask: ArrayLike | None = None,
    block_size: int = 128,
) -> jax.Array:
    r"""Squared maximum mean discrepancy with an RBF kernel (biased V-statistic).

    .. math:: \mathrm{MMD}^2 = \overline{k(x, x')} + \overline{k(y, y')} - 2\,\overline{k(x, y)},
              \quad k(a, b) = \exp\!\big(-\|a - b\|^2 / (2\sigma^2)\big)

    Bandwidth rule (``sigma=None``): ``σ² = Σ_g Var_g`` of the pooled cells
    (:func:`rbf_bandwidth`, half the mean pairwise squared distance). Same tiling and
    masks as :func:`energy_distance`.

    Args:
      x: predicted cells ``(n, G)``; y: true cells ``(m, G)``.
      sigma: kernel bandwidth σ (scalar); default from :func:`rbf_bandwidth`.
      x_mask, y_mask: optional 0/1 row masks.
      block_size: tile size (static).

    Returns:
      scalar ``≥ 0`` (up to rounding); NaN when either set is empty or σ = 0.

    References:
      Gretton et al., JMLR (2012).
    """
    xb, xm, yb, ym = _prep(x, y, x_mask, y_mask, block_size)
    if sigma is None:
        s2 = rbf_bandwidth(x, y, x_mask=x_mask, y_mask=y_mask)
    else:
        s2 = jnp.square(jnp.asarray(sigma, xb.dtype))
    ok_s = s2 > 0
    inv = 1.0 / (2.0 * jnp.where(ok_s, s2, 1.0))

    def kern(d2):
        return jnp.exp(-d2 * inv)

    nx, ny = jnp.sum(xm), jnp.sum(ym)
    kxy = _block_sum(xb, xm, yb, ym, kern, False)
    kxx = _block_sum(xb, xm, xb, xm, kern, True)
    kyy = _block_sum(yb, ym, yb, ym, kern, True)
    nxs, nys = jnp.maximum(nx, 1.0), jnp.maximum(ny, 1.0)
    val = kxx / (nxs * nxs) + kyy / (nys * nys) - 2.0 * kxy / (nxs * nys)
    return jnp.where((nx > 0) & (ny > 0) & ok_s, val, jnp.nan)


# --------------------------------------------------------------------------- host helpers


def _dense(x) -> np.ndarray:
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x)


def pseudobulk(cells, labels: Sequence, perts: Sequence[str], *, dtype=np.float64) -> np.ndarray:
    """Mean expression of each label in ``perts``, ``(len(perts), G)`` (host, NumPy).

    One product of a sparse ``(len(perts), n_cells)`` indicator with the cells (dense or
    sparse, never densified), accumulated in ``dtype``. NaN rows for labels without cells.
    """
    labels = np.asarray(labels).astype(str)
    codes = pd.Index(list(perts)).get_indexer(labels)
    keep = np.flatnonzero(codes >= 0)
    indicator = sp.csr_matrix(
        (np.ones(keep.size, dtype), (codes[keep], keep)), shape=(len(perts), labels.size)
    )
    x = cells if sp.issparse(cells) else np.asarray(cells)
    if x.dtype != dtype:
        x = x.astype(dtype)
    sums = indicator @ x
    sums = np.asarray(sums.toarray() if sp.issparse(sums) else sums, dtype)
    counts = np.bincount(codes[keep], minlength=len(perts)).astype(dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def celleval_de_table(
    cells,
    labels: Sequence,
    *,
    control: str = "non-targeting",
    perts: Sequence[str] | None = None,
    gene_block: int = 2048,
) -> dict[str, np.ndarray]:
    """cell-eval's per-perturbation DE table: Wilcoxon vs control, BH FDR, log2 fold change.

    Each perturbation's cells are tested against the control cells of the **same** object
    (:func:`vcjax.wilcoxon.mannwhitney_vs_control`: asymptotic, tie- and
    continuity-corrected, two-sided; pdex ``mode="ref"``), the FDR is Benjamini–Hochberg
    over all genes of that perturbation, and ``lfc = log2(expm1(mean_pert) /
    expm1(mean_ctrl))`` (pdex ``geometric_mean=True, is_log1p=True, epsilon=0``). As
    cell-eval, lfc / p / fdr are returned rounded to float32.

    Input must already be log1p-normalised (cell-eval normalises integer count matrices
    itself before this step).

    Args:
      cells: ``(N, G)`` expression (dense or scipy sparse).
      labels: ``(N,)`` perturbation label of each cell.
      control: the control label.
      perts: perturbations to test (default: sorted unique labels without the control).
      gene_block: genes per device call (the last block is padded, so one compilation).

    Returns:
      dict with ``perts`` (list), ``pvalue``, ``fdr``, ``lfc``, ``statistic`` (``(P, G)``
      float32) and ``n_cells`` (``(P,)``).
    """
    x = _dense(cells)
    x = x.astype(np.float32) if x.dtype != np.float64 else x
    labels = np.asarray(labels).astype(str)
    if perts is None:
        perts = sorted(set(labels) - {control})
    perts = list(perts)
    index = {p: i for i, p in enumerate(perts)}
    codes = np.array([index.get(lab, -1) for lab in labels], dtype=np.int32)
    is_ctrl = labels == control
    if not is_ctrl.any():
        raise ValueError(f"no control cells labelled {control!r}")
    sel = codes >= 0
    group_x, group_lab, ctrl_x = x[sel], codes[sel], x[is_ctrl]
    g = x.shape[1]
    n_p = len(perts)
    width = min(gene_block, g)
    pv = np.empty((n_p, g), np.float64)
    st = np.empty((n_p, g), np.float64)
    for s0 in range(0, g, width):
        cols = np.arange(s0, min(s0 + width, g))
        pad = width - len(cols)
        gx, cx = group_x[:, cols], ctrl_x[:, cols]
        if pad:
            gx = np.pad(gx, ((0, 0), (0, pad)))
            cx = np.pad(cx, ((0, 0), (0, pad)))
        res = mannwhitney_vs_control(gx, group_lab, cx, n_groups=n_p)
        pv[:, cols] = np.asarray(res.pvalue)[:, : len(cols)]
        st[:, cols] = np.asarray(res.statistic)[:, : len(cols)]
    fdr = np.asarray(bh_fdr(pv))
    means = pseudobulk(x, labels, perts + [control])
    lfc = np.asarray(log2_fold_change(means[:-1], means[-1]))
    n_cells = np.bincount(group_lab, minlength=n_p)
    return {
        "perts": perts,
        "pvalue": pv.astype(np.float32),
        "fdr": fdr.astype(np.float32),
        "lfc": lfc.astype(np.float32),
        "statistic": st.astype(np.float32),
        "n_cells": n_cells,
    }


def celleval_metrics(
    real_cells,
    real_labels: Sequence,
    pred_cells,
    pred_labels: Sequence,
    genes: Sequence[str],
    *,
    control: str = "non-targeting",
    alpha: float = 0.05,
) -> dict[str, np.ndarray | list]:
    """cell-eval's ``pds``/``overlap_at_N``/``de_direction_match``/``mae`` from cell matrices.

    Follows cell-eval 0.8.2's conventions exactly (docs/metrics.md §9): pseudobulks
    are per-label means; truth deltas use the real control, **prediction deltas the
    prediction's own control**; the PDS leaves out the gene named like the perturbation;
    DE runs separately on real and pred, each vs its own control.

    Args:
      real_cells, real_labels: true cells ``(N, G)`` (log1p) and their labels.
      pred_cells, pred_labels: predicted cells ``(N', G)`` and labels; must include
        control cells.
      genes: var names (same order in both objects).
      control: the control label.
      alpha: DEG threshold on the FDR.

    Returns:
      dict of ``perts`` (sorted perturbation labels) and ``(P,)`` arrays ``pds``,
      ``de_overlap_at_k``, ``de_direction_agreement``, ``mae``, plus the two DE tables
      (``de_real``, ``de_pred``).
    """
    real_labels = np.asarray(real_labels).astype(str)
    pred_labels = np.asarray(pred_labels).astype(str)
    perts = sorted(set(real_labels) - {control})
    if set(pred_labels) - {control} != set(perts):
        raise ValueError("real and predicted data must have the same perturbation labels")
    names = perts + [control]
    real_pb = pseudobulk(real_cells, real_labels, names, dtype=np.float32)
    pred_pb = pseudobulk(pred_cells, pred_labels, names, dtype=np.float32)
    truth_delta = real_pb[:-1] - real_pb[-1]
    pred_delta = pred_pb[:-1] - pred_pb[-1]
    gidx = {gname: i for i, gname in enumerate(map(str, genes))}
    exclude = np.array([gidx.get(p, -1) for p in perts], dtype=np.int32)
    de_real = celleval_de_table(real_cells, real_labels, control=control, perts=perts)
    de_pred = celleval_de_table(pred_cells, pred_labels, control=control, perts=perts)
    return {
        "perts": perts,
        "pds": np.asarray(pds(pred_delta, truth_delta, exclude=exclude)),
        "de_overlap_at_k": np.asarray(
            de_overlap_at_k(
                de_real["fdr"], de_real["lfc"], de_pred["fdr"], de_pred["lfc"], alpha=alpha
            )
        ),
        "de_direction_agreement": np.asarray(
            de_direction_agreement(de_real["fdr"], de_real["lfc"], de_pred["lfc"], alpha=alpha)
        ),
        "mae": np.asarray(mae(pred_pb[:-1], real_pb[:-1])),
        "de_real": de_real,
        "de_pred": de_pred,
    }


def distribution_distances(
    pred_cells,
    pred_labels: Sequence,
    true_cells,
    true_labels: Sequence,
    perts: Sequence[str],
    *,
    metric: str = "energy",
    block_size: int = 128,
    sigma: float | None = None,
) -> np.ndarray:
    """Per-perturbation :func:`energy_distance` or :func:`mmd` between predicted and true cells.

    Host helper: streams one perturbation at a time; each cell set is padded to a bucket of
    rows (``block_size`` times a power of two) with masks, so the kernel compiles once per
    bucket, not once per perturbation.

    Returns:
      ``(P,)`` float64; NaN for a perturbation without predicted or true cells.
    """
    px, tx = _dense(pred_cells), _dense(true_cells)
    pl = np.asarray(pred_labels).astype(str)
    tl = np.asarray(true_labels).astype(str)

    def bucket(n: int) -> int:
        nb = max(1, -(-n // block_size))
        return block_size * (1 << (nb - 1).bit_length())

    def padded(a: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
        out = np.zeros((rows, a.shape[1]), np.float32)
        out[: len(a)] = a
        m = np.zeros(rows, np.float32)
        m[: len(a)] = 1
        return out, m

    out = np.full(len(perts), np.nan)
    for i, p in enumerate(perts):
        a, b = px[pl == p], tx[tl == p]
        if len(a) == 0 or len(b) == 0:
            continue
        (xa, ma), (yb, mb) = padded(a, bucket(len(a))), padded(b, bucket(len(b)))
        if metric == "energy":
            v = energy_distance(xa, yb, x_mask=ma, y_mask=mb, block_size=block_size)
        elif metric == "mmd":
            v = mmd(xa, yb, sigma=sigma, x_mask=ma, y_mask=mb, block_size=block_size)
        else:
            raise ValueError(f"unknown metric {metric!r}")
        out[i] = float(v)
    return out
