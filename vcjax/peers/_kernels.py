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

from vcjax.data import grouped_sums
from vcjax.metrics import cosine_delta, mae, pearson_delta_topk
from vcjax.stats import (
    benjamini_hochberg_host,
    log2_fold_change,
    mannwhitney_vs_control,
    mannwhitney_vs_control_sparse,
)

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
    "hit_recalls_host",
    "de_metrics_host",
    # distributions
    "energy_distance",
    "mmd",
    "rbf_bandwidth",
    # host helpers
    "pseudobulk",
    "celleval_de_table",
    "celleval_metrics",
    "cell_distances",
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


# genes per step of the L1 distances (unrolled: each step is one elementwise loop)
_L1_GENES = 16


def _l1_distance(pred: jax.Array, truth: jax.Array, keep: jax.Array | None, block: int):
    """D[p, q] = Σ_g keep[p, g] |pred[p, g] - truth[q, g]|, (P, Q).

    Blocks of ``block`` rows (``lax.map``); each block's ``(block, Q)`` sums are
    accumulated over the genes in a ``fori_loop``, ``_L1_GENES`` genes per step written
    out as a sum of elementwise terms (one fused, vectorised loop over the ``(block, Q)``
    tile per step; XLA compiles a reduction over a gene axis far less well).
    """
    p, g = pred.shape
    q = truth.shape[0]
    block = -(-p // -(-p // max(1, block)))  # equal blocks of at most `block` rows
    step = _L1_GENES
    gpad = (-g) % step
    rpad = (-p) % block
    ns = (g + gpad) // step
    if keep is None:
        keep = jnp.ones_like(pred)
    # padded genes have keep = 0; padded rows are dropped
    xt = jnp.pad(pred, ((0, rpad), (0, gpad))).T.reshape(ns, step, p + rpad)
    yt = jnp.pad(truth, ((0, 0), (0, gpad))).T.reshape(ns, step, q)
    kt = jnp.pad(keep, ((0, rpad), (0, gpad))).T.reshape(ns, step, p + rpad)
    nb = (p + rpad) // block

    def rows(i):
        def body(j, acc):
            x = jax.lax.dynamic_slice_in_dim(xt[j], i * block, block, axis=1)  # (step, block)
            k = jax.lax.dynamic_slice_in_dim(kt[j], i * block, block, axis=1)
            y = yt[j]
            for u in range(step):
                acc = acc + jnp.abs(x[u][:, None] - y[u][None, :]) * k[u][:, None]
            return acc

        return jax.lax.fori_loop(0, ns, body, jnp.zeros((block, q), pred.dtype))

    out = jax.lax.map(rows, jnp.arange(nb))
    return out.reshape(nb * block, q)[:p]


def _pairwise_distance(
    pred: jax.Array, truth: jax.Array, keep: jax.Array | None, distance: str, block: int
) -> jax.Array:
    """D[p, q] = distance(pred_p, truth_q) over the genes kept for row p, (P, Q)."""
    if keep is not None:
        keep = keep.astype(pred.dtype)
    if distance == "l1":
        return _l1_distance(pred, truth, keep, block)
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
    block_size: int = 256,
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
      block_size: rows per block of the L1 distance computation (memory ``block·P``).

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


def hit_recalls_host(
    scores: np.ndarray, is_hit: np.ndarray, *, budget: int, fdr: float = 0.1
) -> tuple[float, float]:
    """:func:`hit_recall_at_budget` and :func:`hit_recall_at_fdr` of one ``(P,)`` score
    vector, in NumPy (the same tie groups and rules; no compilation for a few hundred
    numbers). Scores are ranked in the engine's float dtype, as the kernels rank them.

    Returns:
      ``(recall at budget, recall at FDR)``; NaN when there is no true hit.
    """
    wdt = np.dtype(jax.dtypes.canonicalize_dtype(np.float64))
    s = np.asarray(scores, wdt)
    s = np.where(np.isnan(s), -np.inf, s)
    h = np.asarray(is_hit, bool).astype(np.float64)
    total = h.sum()
    n = s.size
    if total == 0 or n == 0:
        return float("nan"), float("nan")
    order = np.argsort(-s, kind="stable")
    ss, hh = s[order], h[order]
    idx = np.arange(n)
    new = np.ones(n, bool)
    new[1:] = ss[1:] != ss[:-1]
    is_end = np.append(new[1:], True)
    start = np.maximum.accumulate(np.where(new, idx, 0))
    end = np.minimum.accumulate(np.where(is_end, idx, n)[::-1])[::-1]
    csum0 = np.concatenate([[0.0], np.cumsum(hh)])
    above, through = csum0[start], csum0[end + 1]
    b = min(max(int(budget), 0), n)
    if b == 0:
        at_budget = 0.0
    else:
        st, en = start[b - 1], end[b - 1]
        got = above[b - 1] + (through[b - 1] - above[b - 1]) * (b - st) / (en - st + 1)
        at_budget = got / total
    called = (end + 1).astype(np.float64)
    fdp = (called - through) / called
    at_fdr = np.max(np.where(fdp <= fdr, through, 0.0)) / total
    return float(at_budget), float(at_fdr)


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


@jax.jit
def _centred_gram(z: jax.Array, my: jax.Array) -> jax.Array:
    """``(B, R, R)`` Gram matrices of ``z`` (``(B, R, G)``) after centring each batch
    element on the mean of its rows with ``my = 1`` (the true cells)."""
    (z,) = _float(z)
    my = jnp.asarray(my, z.dtype)

    def one(args):  # one perturbation at a time: XLA's CPU GEMM beats its batched dot
        zb, mb = args
        zb = zb - (mb @ zb) / jnp.maximum(jnp.sum(mb), 1.0)
        return zb @ zb.T

    return jax.lax.map(one, (z, my))


def _centred_gram_host(z: np.ndarray, my: np.ndarray) -> np.ndarray:
    """:func:`_centred_gram` in NumPy (float32 ``z``), for the CPU backend.

    There the two run at the same speed (both call a CPU GEMM per batch element), but the
    jitted one compiles once per ``(B, R)`` shape, ~0.2 s each, on a first call's critical
    path; the host one compiles nothing.
    """
    mean = (my[:, None, :] @ z) / np.maximum(my.sum(-1), 1.0)[:, None, None]
    zc = z - mean
    return zc @ zc.transpose(0, 2, 1)


def _distances_from_gram(
    gram: np.ndarray, mx: np.ndarray, my: np.ndarray, s2: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Energy distance and RBF MMD² of each batch element from its Gram matrix (host).

    The arithmetic of :func:`energy_distance` and :func:`mmd` (Gram expansion
    ``‖a - b‖² = a·a + b·b - 2 a·b``, exact self-pairs 0, V-statistics), in float64 from
    the float32 Gram; the default RBF σ² is :func:`rbf_bandwidth`'s pooled variance,
    ``Σ_i w_i ‖z_i‖² / n - ‖Σ_i w_i z_i‖² / n²``, from the same Gram matrix.
    """
    k = np.asarray(gram, np.float64)
    mx, my = mx.astype(np.float64), my.astype(np.float64)
    sq = np.diagonal(k, axis1=1, axis2=2)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * k
    np.maximum(d2, 0.0, out=d2)
    r = d2.shape[1]
    d2[:, np.arange(r), np.arange(r)] = 0.0
    nx, ny = mx.sum(-1), my.sum(-1)
    nxs, nys = np.maximum(nx, 1.0), np.maximum(ny, 1.0)

    def pair_sums(v):
        vx = np.einsum("brs,bs->br", v, mx)
        vy = np.einsum("brs,bs->br", v, my)
        return (vx * mx).sum(-1), (vy * mx).sum(-1), (vy * my).sum(-1)

    sxx, sxy, syy = pair_sums(np.sqrt(d2))
    ok = (nx > 0) & (ny > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        energy = np.where(
            ok, 2.0 * sxy / (nxs * nys) - sxx / (nxs * nxs) - syy / (nys * nys), np.nan
        )
        if s2 is None:
            w = mx + my
            n = np.maximum(nx + ny, 1.0)
            s2v = (w * sq).sum(-1) / n - np.einsum("br,brs,bs->b", w, k, w) / (n * n)
        else:
            s2v = np.full(k.shape[0], float(s2))
        ok_s = s2v > 0
        kern = np.exp(-d2 / (2.0 * np.where(ok_s, s2v, 1.0))[:, None, None])
        kxx, kxy, kyy = pair_sums(kern)
        val = kxx / (nxs * nxs) + kyy / (nys * nys) - 2.0 * kxy / (nxs * nys)
    return energy, np.where(ok & ok_s, val, np.nan)


# --------------------------------------------------------------------------- host helpers


def _dense(x) -> np.ndarray:
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x)


def pseudobulk(cells, labels: Sequence, perts: Sequence[str], *, dtype=np.float64) -> np.ndarray:
    """Mean expression of each label in ``perts``, ``(len(perts), G)`` (host, NumPy).

    Each label's cells summed in float64 in dataset order (:func:`vcjax.data.grouped_sums`:
    sparse cells never densified nor copied), then divided in ``dtype``. NaN rows for
    labels without cells.
    """
    labels = np.asarray(labels).astype(str)
    codes = pd.Index(list(perts)).get_indexer(labels)
    sums = grouped_sums(cells, codes, len(perts)).astype(dtype, copy=False)
    counts = np.bincount(codes[codes >= 0], minlength=len(perts)).astype(dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def _as_matrix(x):
    """Cells as a scipy CSR matrix (sparse input) or a NumPy array, float32 unless float64.

    A CSR matrix gets one index dtype (int32 where it fits: an ``.h5ad`` often has int64
    ``indptr`` and int32 ``indices``, and SciPy then copies all the indices to int64 on
    every row selection)."""
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        if x.indptr.dtype != x.indices.dtype and x.nnz < np.iinfo(np.int32).max:
            x = sp.csr_matrix(
                (x.data, x.indices.astype(np.int32, copy=False), x.indptr.astype(np.int32)),
                shape=x.shape,
            )
    else:
        x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    return x


def _rows(x, rows: np.ndarray):
    return x[rows] if rows.size != x.shape[0] or np.any(rows != np.arange(x.shape[0])) else x


_log2_fold_change = jax.jit(log2_fold_change)


def _bh_fdr_host(pvalue: np.ndarray) -> np.ndarray:
    """:func:`vcjax.stats.bh_fdr` on the host, bit-identical (NumPy sorts; XLA's CPU sort
    is slow): Benjamini–Hochberg per row in the engine's float dtype, NaN kept."""
    wdt = np.dtype(jax.dtypes.canonicalize_dtype(np.float64))
    p = np.asarray(pvalue, wdt)
    nan = np.isnan(p)
    q = benjamini_hochberg_host(np.where(nan, 1.0, p).astype(wdt))
    q[nan] = np.nan
    return q


def _set_ranks_host(lfc: np.ndarray, in_set: np.ndarray) -> np.ndarray:
    """:func:`_set_ranks` in NumPy (the same keys and stable order)."""
    key = np.where(in_set, -np.abs(lfc), np.float32(np.inf)).astype(np.float32)
    key[in_set & np.isnan(key)] = np.inf
    order = np.argsort(key, axis=-1, kind="stable")
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(key.shape[-1]), key.shape), -1)
    return np.where(in_set, pos, key.shape[-1])


def de_metrics_host(
    truth_fdr: np.ndarray,
    truth_lfc: np.ndarray,
    pred_fdr: np.ndarray,
    pred_lfc: np.ndarray,
    *,
    alpha: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`de_overlap_at_k` (``k = None``, ``mode="overlap"``) and
    :func:`de_direction_agreement` in NumPy, the same numbers (float32 comparisons and
    keys, stable sorts in gene order): XLA's CPU sort is slow on ``(P, G)`` tables.

    Returns:
      ``(overlap, direction)``, each ``(P,)`` float32.
    """
    a = np.float32(alpha)
    tf, pf = np.asarray(truth_fdr, np.float32), np.asarray(pred_fdr, np.float32)
    tl, pl = np.asarray(truth_lfc, np.float32), np.asarray(pred_lfc, np.float32)
    t_set, p_set = tf < a, pf < a
    n_t, n_p = t_set.sum(-1), p_set.sum(-1)
    k = n_t[..., None]
    hit = (_set_ranks_host(tl, t_set) < k) & (_set_ranks_host(pl, p_set) < k)
    num = hit.sum(-1)
    ok = (n_t > 0) & (n_p > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        overlap = np.where(ok, num / np.maximum(n_t, 1), 0.0).astype(np.float32)
        agree = ((np.sign(tl) == np.sign(pl)) & t_set).sum(-1)
        direction = np.where(n_t > 0, agree / np.maximum(n_t, 1), np.nan).astype(np.float32)
    return overlap, direction


def celleval_de_table(
    cells,
    labels: Sequence,
    *,
    control: str = "non-targeting",
    perts: Sequence[str] | None = None,
    gene_block: int = 2048,
    control_cells=None,
) -> dict[str, np.ndarray]:
    """cell-eval's per-perturbation DE table: Wilcoxon vs control, BH FDR, log2 fold change.

    Each perturbation's cells are tested against the control cells of the **same** object
    (:func:`vcjax.stats.mannwhitney_vs_control`: asymptotic, tie- and continuity-corrected,
    two-sided; pdex ``mode="ref"``), or against ``control_cells`` when given; the FDR is
    Benjamini–Hochberg over all genes of that perturbation, and ``lfc = log2(expm1(mean_pert)
    / expm1(mean_ctrl))`` (pdex ``geometric_mean=True, is_log1p=True, epsilon=0``). As
    cell-eval, lfc / p / fdr are returned rounded to float32.

    Sparse cells are tested without densifying them
    (:func:`vcjax.stats.mannwhitney_vs_control_sparse`, the same numbers); dense cells in
    blocks of ``gene_block`` genes. Input must already be log1p-normalised (cell-eval
    normalises integer count matrices itself before this step).

    Args:
      cells: ``(N, G)`` expression (dense or scipy sparse).
      labels: ``(N,)`` perturbation label of each cell.
      control: the control label.
      perts: perturbations to test (default: sorted unique labels without the control).
      gene_block: genes per device call of the dense test (the last block is padded, so
        one compilation).
      control_cells: ``(m, G)`` control cells to test against instead of ``cells``' own
        (e.g. the truth's, for predicted cells without control cells); default: the cells
        labelled ``control``.

    Returns:
      dict with ``perts`` (list), ``pvalue``, ``fdr``, ``lfc``, ``statistic`` (``(P, G)``
      float32) and ``n_cells`` (``(P,)``).
    """
    x = _as_matrix(cells)
    labels = np.asarray(labels).astype(str)
    if perts is None:
        perts = sorted(set(labels) - {control})
    perts = list(perts)
    codes = pd.Index(perts).get_indexer(labels).astype(np.int32)
    codes[labels == control] = -1
    if control_cells is None:
        is_ctrl = labels == control
        if not is_ctrl.any():
            raise ValueError(f"no control cells labelled {control!r}")
        ctrl = _rows(x, np.flatnonzero(is_ctrl))
    else:
        ctrl = _as_matrix(control_cells).astype(x.dtype)
        if ctrl.shape[0] == 0 or ctrl.shape[1] != x.shape[1]:
            raise ValueError(f"control_cells must be (m > 0, {x.shape[1]}), got {ctrl.shape}")
    means = pseudobulk(x, labels, perts)
    ctrl_mean = pseudobulk(ctrl, np.zeros(ctrl.shape[0], int), ["0"])[0]
    return _de_table(
        x, codes, is_ctrl if control_cells is None else ctrl, ctrl, perts, means, ctrl_mean,
        gene_block=gene_block,
    )  # fmt: skip


def _de_table(x, codes, control, ctrl, perts, means, ctrl_mean, *, gene_block: int = 2048):
    """:func:`celleval_de_table` from its parts: ``codes`` (each cell's perturbation, -1
    for none), ``control`` (a row mask of ``x`` or a matrix), ``ctrl`` (the control cells),
    and the float64 means of the perturbations and of the control."""
    g = x.shape[1]
    n_p = len(perts)
    if sp.issparse(x):
        res = mannwhitney_vs_control_sparse(x, codes, control, n_groups=n_p)
        pv = np.asarray(res.pvalue, np.float64)
        st = np.asarray(res.statistic, np.float64)
    else:
        sel = np.flatnonzero(codes >= 0)
        group_x, group_lab = x[sel], codes[sel]
        ctrl_x = _dense(ctrl).astype(x.dtype)
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
    fdr = _bh_fdr_host(pv)
    lfc = np.asarray(_log2_fold_change(means, ctrl_mean))
    n_cells = np.bincount(codes[codes >= 0], minlength=n_p)
    return {
        "perts": perts,
        "pvalue": pv.astype(np.float32),
        "fdr": fdr.astype(np.float32),
        "lfc": lfc.astype(np.float32),
        "statistic": st.astype(np.float32),
        "n_cells": n_cells,
    }


def _celleval_values(
    real,
    real_labels: np.ndarray,
    pred,
    pred_labels: np.ndarray,
    genes: Sequence[str],
    perts: list[str],
    *,
    control: str,
    alpha: float,
    de: bool = True,
    with_mae: bool = True,
) -> dict:
    """cell-eval's values for ``perts`` (each with real and predicted cells): ``pds``,
    ``mae`` (``with_mae``), the two DE metrics and tables (``de``)."""
    own = bool(np.any(pred_labels == control))
    names = perts + [control]
    # one pass per matrix: float64 means of every perturbation and the control (exact sums
    # of float32 values), shared by the deltas (rounded to float32, as cell-eval's
    # pseudobulks) and the DE tables' fold changes
    real_mean = pseudobulk(real, real_labels, names)
    pred_mean = pseudobulk(pred, pred_labels, names)
    real_pb = real_mean.astype(np.float32)
    pred_pb = pred_mean.astype(np.float32)
    pred_ctrl = pred_pb[-1] if own else real_pb[-1]
    gidx = {gname: i for i, gname in enumerate(map(str, genes))}
    exclude = np.array([gidx.get(p, -1) for p in perts], dtype=np.int32)
    out = {
        "perts": perts,
        "pred_control": "own" if own else "truth",
        "pds": np.asarray(
            pds(pred_pb[:-1] - pred_ctrl, real_pb[:-1] - real_pb[-1], exclude=exclude)
        ),
    }
    if with_mae:
        out["mae"] = np.asarray(mae(pred_pb[:-1], real_pb[:-1]))
    if de:
        index = pd.Index(perts)
        tables = []
        for x, lab, mean, ctrl_mean in (
            (real, real_labels, real_mean[:-1], real_mean[-1]),
            (pred, pred_labels, pred_mean[:-1], pred_mean[-1] if own else real_mean[-1]),
        ):
            codes = index.get_indexer(lab).astype(np.int32)
            is_ctrl = lab == control
            codes[is_ctrl] = -1
            if is_ctrl.any():
                ctrl, control_arg = _rows(x, np.flatnonzero(is_ctrl)), is_ctrl
            else:  # the prediction without control cells: the truth's
                ctrl = _rows(real, np.flatnonzero(real_labels == control))
                control_arg = ctrl
            tables.append(_de_table(x, codes, control_arg, ctrl, perts, mean, ctrl_mean))
        de_real, de_pred = tables
        out["de_overlap_at_k"], out["de_direction_agreement"] = de_metrics_host(
            de_real["fdr"], de_real["lfc"], de_pred["fdr"], de_pred["lfc"], alpha=alpha
        )
        out["de_real"], out["de_pred"] = de_real, de_pred
    return out


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
    DE runs separately on real and pred, each vs its own control. Predicted cells without
    control cells (which cell-eval refuses) use the real control cells instead, for the
    prediction's deltas and its DE test (``pred_control = "truth"`` in the result).
    Sparse matrices are never densified.

    Args:
      real_cells, real_labels: true cells ``(N, G)`` (log1p, dense or sparse) and labels.
      pred_cells, pred_labels: predicted cells ``(N', G)`` and labels.
      genes: var names (same order in both objects).
      control: the control label.
      alpha: DEG threshold on the FDR.

    Returns:
      dict of ``perts`` (sorted perturbation labels), ``pred_control`` (``"own"`` or
      ``"truth"``) and ``(P,)`` arrays ``pds``, ``de_overlap_at_k``,
      ``de_direction_agreement``, ``mae``, plus the two DE tables (``de_real``,
      ``de_pred``).
    """
    real_labels = np.asarray(real_labels).astype(str)
    pred_labels = np.asarray(pred_labels).astype(str)
    perts = sorted(set(real_labels) - {control})
    if set(pred_labels) - {control} != set(perts):
        raise ValueError("real and predicted data must have the same perturbation labels")
    return _celleval_values(
        _as_matrix(real_cells), real_labels, _as_matrix(pred_cells), pred_labels, genes, perts,
        control=control, alpha=alpha,
    )  # fmt: skip


def _size_class(n: np.ndarray) -> np.ndarray:
    """Rows ``n`` rounded up to ``2^k · {8, 10, 12, 14} / 8`` (at least 16): few shapes."""
    n = np.maximum(np.asarray(n, np.int64), 16)
    q = np.left_shift(1, np.maximum(np.frexp(n)[1] - 3, 0))  # 2^(bit_length - 3)
    return -(-n // q) * q


def cell_distances(
    pred_cells,
    pred_labels: Sequence,
    true_cells,
    true_labels: Sequence,
    perts: Sequence[str],
    *,
    sigma: float | None = None,
    chunk_bytes: int = 1 << 24,
    max_rows: int = 2048,
    block_size: int = 128,
) -> dict[str, np.ndarray]:
    """Per-perturbation :func:`energy_distance` and :func:`mmd` of predicted vs true cells.

    Batched: the perturbations are sorted by their cell numbers and taken in chunks, each
    perturbation's predicted and true cells padded to one row count per chunk (a few
    distinct shapes in all, so a few compilations on an accelerator; on the CPU backend a
    chunk holds perturbations of one cell number, unpadded), one call per chunk
    of about ``chunk_bytes`` of cells computes their Gram matrices (centred on the true
    cells' mean; on the device, or by NumPy on the CPU backend, where a GEMM costs the
    same and compiles nothing), and both distances come from them on the host
    (:func:`_distances_from_gram`).
    Sparse cells are densified a chunk at a time only.
    Perturbations with more than ``max_rows`` cells in all go to the tiled single-pair
    kernels (``block_size`` tiles) one at a time.

    Returns:
      ``{"energy": (P,), "mmd": (P,)}`` float64; NaN for a perturbation without predicted
      or true cells.
    """
    perts = list(perts)
    n_p = len(perts)
    index = pd.Index(perts)
    mats, codes = [], []
    for x, lab in ((pred_cells, pred_labels), (true_cells, true_labels)):
        mats.append(_as_matrix(x))
        codes.append(index.get_indexer(np.asarray(lab).astype(str)))
    nx, ny = (np.bincount(c[c >= 0], minlength=n_p) for c in codes)
    g = mats[0].shape[1]
    out = {"energy": np.full(n_p, np.nan), "mmd": np.full(n_p, np.nan)}
    todo = np.flatnonzero((nx > 0) & (ny > 0))
    host = jax.default_backend() == "cpu"
    # a device compiles one Gram kernel per (batch, rows) shape: perturbations are padded to
    # a few row counts; the host's GEMMs compile nothing, so there each takes its own count
    size = nx + ny if host else _size_class(nx + ny)
    big = todo[size[todo] > max_rows]
    todo = todo[size[todo] <= max_rows]
    todo = todo[np.argsort(size[todo], kind="stable")]  # chunk order
    # each side's cells in chunk order: a chunk's cells are a contiguous run of these
    rank = np.full(n_p + 1, -1)
    rank[todo] = np.arange(todo.size)
    sides = []
    for x, c, n in zip(mats, codes, (nx, ny)):
        r_of = rank[np.where(c >= 0, c, n_p)]
        rows = np.flatnonzero(r_of >= 0)
        rows = rows[np.argsort(r_of[rows], kind="stable")]
        sides.append((x, rows, np.concatenate([[0], np.cumsum(n[todo])])))
    s2 = None if sigma is None else float(sigma) ** 2
    gram_of = _centred_gram_host if host else _centred_gram
    pending = []

    def finish(J, gram, mx, my):
        e, m = _distances_from_gram(gram, mx, my, s2)
        out["energy"][J] = e[: J.size]
        out["mmd"][J] = m[: J.size]

    pos = 0
    for r in np.unique(size[todo]):
        r = int(r)
        n_class = int(np.sum(size[todo] == r))
        b = max(1, min(n_class, chunk_bytes // (r * g * 4)))
        b = 1 << (b.bit_length() - 1)  # a power of two: few shapes
        for c0 in range(pos, pos + n_class, b):
            c1 = min(c0 + b, pos + n_class)
            J = todo[c0:c1]
            base = np.arange(J.size) * r
            buf, masks = None, []
            for side, ((cells, rows, off), n) in enumerate(zip(sides, (nx, ny))):
                k = n[J]
                dest = np.repeat(base + (0 if side == 0 else nx[J]), k)
                dest += np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)  # increasing
                src = rows[off[c0] : off[c1]]
                if sp.issparse(cells):
                    # the chunk's cells (a SciPy row gather) as a (b·r, G) CSR matrix whose
                    # rows are `dest` (the other rows empty), densified by SciPy's C loop
                    sub = cells[src]
                    cnt = np.zeros(b * r + 1, np.int64)
                    cnt[dest + 1] = np.diff(sub.indptr)
                    part = sp.csr_matrix(
                        (sub.data, sub.indices, np.cumsum(cnt)), shape=(b * r, g)
                    ).toarray()
                    del sub
                else:
                    part = np.zeros((b * r, g), cells.dtype)
                    part[dest] = cells[src]
                if buf is None:
                    buf = part.astype(np.float32, copy=False)
                else:
                    buf += part  # the sides' rows are disjoint
                del part
                m = np.zeros(b * r, np.float32)
                m[dest] = 1
                masks.append(m)
            mx, my = masks
            mx, my = mx.reshape(b, r), my.reshape(b, r)
            # on a device, this chunk's Gram matrices are computed while the host fills
            # the next (dispatch is asynchronous); on the CPU backend, NumPy's GEMM in turn
            pending.append((J, gram_of(buf.reshape(b, r, g), my), mx, my))
            if len(pending) > 1:
                finish(*pending.pop(0))
        pos += n_class
    for item in pending:
        finish(*item)
    for i in big:  # huge perturbations: the tiled kernels, one at a time
        a, t = (_dense(x[np.flatnonzero(c == i)]) for x, c in zip(mats, codes))
        out["energy"][i] = float(energy_distance(a, t, block_size=block_size))
        out["mmd"][i] = float(mmd(a, t, sigma=sigma, block_size=block_size))
    return out


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

    Host helper over :func:`cell_distances` (batched over perturbations, sparse cells
    densified a chunk at a time).

    Returns:
      ``(P,)`` float64; NaN for a perturbation without predicted or true cells.
    """
    if metric not in ("energy", "mmd"):
        raise ValueError(f"unknown metric {metric!r}")
    res = cell_distances(
        pred_cells, pred_labels, true_cells, true_labels, perts, sigma=sigma,
        block_size=block_size,
    )  # fmt: skip
    return res[metric]
