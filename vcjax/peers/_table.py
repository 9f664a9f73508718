"""The peers' metrics of one prediction as per-perturbation arrays for the evaluation table.

Which inputs each peer metric gets inside an evaluation; the definitions, sources and NaN
rules are in :mod:`vcjax.peers._kernels` and ``docs/metrics.md``. Everything here takes
plain arrays (the truth side is the pipeline's business).

Per-perturbation metrics computed from pseudobulk profiles (model and every baseline):

* ``pearson_delta_top20`` — Pearson(Δ vs control) on the 20 genes with the largest ``|t|``
  (GEARS; the DEG ranking is the evaluation's t-test);
* ``direction_agreement`` — fraction of those 20 genes whose predicted change vs control
  has the true sign (GEARS);
* ``pearson_delta_centroid`` — Pearson of deltas against the perturbed centroid (Systema);
* ``centroid_accuracy`` — Systema's centroid accuracy;
* ``rank`` — PerturBench's cosine rank of deltas vs control (0 best);
* ``pds`` — perturbation discrimination score, L1 on deltas vs control, the target gene left
  out when the perturbation is named after a gene.

Dataset-level metrics, one value: ``hit_recall_at_budget`` (budget = 10 % of the
perturbations, at least 1) and ``hit_recall_at_fdr`` (FDR 0.1), where a true hit is a
perturbation with at least one DEG and the predicted hit score is the norm of the predicted
delta vs control.

Cell-level metrics, only for a model given as predicted cells: ``de_overlap_at_k``,
``de_direction_agreement`` (and ``pds``, replacing the pseudobulk one) exactly as cell-eval
0.8.2 computes them when the predicted cells include control cells, and ``energy_distance``
and ``mmd`` between predicted and true cells (all truth cells of each perturbation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import jax
import numpy as np
import pandas as pd

from vcjax.metrics import METRICS, pearson_delta, topk_mask
from vcjax.peers import _kernels as peers
from vcjax.peers._kernels import _as_matrix, _celleval_values, _log2_fold_change
from vcjax.stats import mannwhitney_from_counts_jit

__all__ = [
    "CELL_METRICS",
    "DATASET_METRICS",
    "PEER_METRICS",
    "TRUTH_CONTROL_METRICS",
    "TRUTH_CONTROL_NOTE",
    "available",
    "pred_control_note",
    "score_cells",
    "score_dataset",
    "score_pseudobulk",
    "score_pseudobulk_sources",
]

#: the note on a cell-level metric whose prediction side used the truth's control cells
TRUTH_CONTROL_NOTE = "prediction DE vs the truth's control cells (the predicted cells have none)"
#: the cell-level metrics that read the prediction's control cells when it has some
TRUTH_CONTROL_METRICS = ("de_overlap_at_k", "de_direction_agreement", "pds")

#: every peer metric of the registry; the dataset-level ones; those needing predicted cells
PEER_METRICS = tuple(n for n, m in METRICS.items() if not m.is_core)
DATASET_METRICS = tuple(n for n in PEER_METRICS if METRICS[n].level == "dataset")
CELL_METRICS = tuple(n for n in PEER_METRICS if "cells" in METRICS[n].needs)


def available(*, cells: bool, pred_control: bool | None = None) -> list[str]:
    """The peer metrics that a prediction allows (``cells``: given as predicted cells).

    ``pred_control`` (whether those include control cells) no longer changes the answer:
    without them the cell-level DE metrics use the truth's control cells (with a note,
    :data:`TRUTH_CONTROL_NOTE`). It is accepted for callers that pass it."""
    have = {"cells": cells}
    return [n for n in PEER_METRICS if all(have[x] for x in METRICS[n].needs)]


def score_pseudobulk(
    names: Sequence[str],
    pred: np.ndarray,
    *,
    truth: np.ndarray,
    u_ntc: np.ndarray,
    scores: np.ndarray | None,
    genes: Sequence[str],
    perts: Sequence[str],
) -> dict[str, np.ndarray]:
    """Per-perturbation peer metrics of one ``(P, G)`` prediction.

    Args:
      names: the metrics wanted (others are ignored).
      pred, truth: ``(P, G)`` predicted and true pseudobulks.
      u_ntc: ``(G,)`` the control mean.
      scores: ``(P, G)`` DEG t-scores, or None (then the top-20 metrics are left out).
      genes, perts: gene and perturbation names (a perturbation named like a gene leaves
        that gene out of ``pds``).

    Returns:
      ``{metric: (P,)}`` float64.
    """
    got = score_pseudobulk_sources(
        names, {"pred": pred}, truth=truth, u_ntc=u_ntc, scores=scores, genes=genes, perts=perts
    )
    return got["pred"]


_PSEUDOBULK = ("pearson_delta_top20", "direction_agreement", "pearson_delta_centroid",
               "centroid_accuracy", "rank", "pds")  # fmt: skip


@partial(jax.jit, static_argnames=("names",))
def _pseudobulk_kernel(pred, truth, u_ntc, pred_delta, truth_delta, where, centroid, *, names):
    """The pseudobulk peer metrics of one prediction in one compiled call, but ``pds``:
    that one is :func:`vcjax.peers.pds`'s own jitted call, which the cell-level path
    makes with the same shapes and dtypes, so one compilation serves both."""
    out = {}
    if "pearson_delta_top20" in names:
        out["pearson_delta_top20"] = pearson_delta(pred, truth, u_ntc, where=where)
    if "direction_agreement" in names:
        out["direction_agreement"] = peers.direction_agreement(pred, truth, u_ntc, where=where)
    if "pearson_delta_centroid" in names:
        out["pearson_delta_centroid"] = pearson_delta(pred, truth, centroid)
    if "centroid_accuracy" in names:
        out["centroid_accuracy"] = peers.centroid_accuracy(pred, truth)
    if "rank" in names:
        out["rank"] = peers.rank(pred_delta, truth_delta)
    return out


_topk_mask = jax.jit(topk_mask, static_argnames=("k",))
_centroid = jax.jit(peers.perturbed_centroid)


def _pseudobulk_plan(names: Sequence[str], *, scores: bool, n_genes: int) -> tuple[str, ...]:
    """The metrics :func:`_pseudobulk_kernel` computes for ``names``: without DEG scores
    the top-20 metrics are left out, and ``pearson_delta_top20`` is NaN when ``G < 20``
    (pearson_delta_topk's rule: ``k > G``)."""
    want = [n for n in _PSEUDOBULK if n in names]
    if not scores:
        want = [n for n in want if n not in ("pearson_delta_top20", "direction_agreement")]
    if n_genes < 20 and "pearson_delta_top20" in want:
        want.remove("pearson_delta_top20")
    return tuple(want)


def warm_up(
    names: Sequence[str],
    *,
    n_perts: int,
    n_genes: int,
    scores: bool,
    cells: bool,
    n_control: int | None = None,
) -> None:
    """Compile (ahead of time, no computation) the kernels that :func:`score_pseudobulk_sources`
    and, with ``cells``, :func:`score_cells` will call for ``P = n_perts`` perturbations and
    ``G = n_genes`` genes, so that a caller can overlap their compilation with other work
    (the compiled functions land in JAX's caches). ``n_control``: the true control cells
    (the truth's Wilcoxon finishing step is compiled for that number).
    """
    f32 = np.dtype(jax.dtypes.canonicalize_dtype(np.float64))
    pg = jax.ShapeDtypeStruct((n_perts, n_genes), f32)
    g1 = jax.ShapeDtypeStruct((n_genes,), f32)
    want = _pseudobulk_plan(names, scores=scores, n_genes=n_genes)
    top = "pearson_delta_top20" in want or "direction_agreement" in want
    ex = jax.ShapeDtypeStruct((n_perts,), np.int32)
    kernel = tuple(n for n in want if n != "pds")
    if kernel:
        mask = jax.ShapeDtypeStruct((n_perts, n_genes), bool) if top else None
        cen = g1 if "pearson_delta_centroid" in want else None
        delta = pg if "rank" in want else None
        _pseudobulk_kernel.lower(pg, pg, g1, delta, delta, mask, cen, names=kernel).compile()
    if "pds" in want or (cells and "pds" in names):
        peers.pds.lower(pg, pg, exclude=ex).compile()
    if "pearson_delta_centroid" in want:
        _centroid.lower(pg).compile()
    if top:
        _topk_mask.lower(
            jax.ShapeDtypeStruct((n_perts, n_genes), np.float32), k=min(20, n_genes)
        ).compile()
    if not cells:
        return
    if "de_overlap_at_k" in names or "de_direction_agreement" in names:
        _log2_fold_change.lower(pg, g1).compile()
        if n_control:
            p32 = jax.ShapeDtypeStruct((n_perts, n_genes), np.float32)
            n = jax.ShapeDtypeStruct((n_perts,), np.float32)
            mannwhitney_from_counts_jit.lower(
                p32, p32, n, m=int(n_control), continuity=True, tie_correct=True
            ).compile()


def score_pseudobulk_sources(
    names: Sequence[str],
    preds: Mapping[str, np.ndarray],
    *,
    truth: np.ndarray,
    u_ntc: np.ndarray,
    scores: np.ndarray | None,
    genes: Sequence[str],
    perts: Sequence[str],
) -> dict[str, dict[str, np.ndarray]]:
    """:func:`score_pseudobulk` of several ``(P, G)`` predictions against one truth.

    The truth's side (top-20 gene mask, perturbed centroid, deltas, the genes left out
    of ``pds``) is computed once, and each prediction's metrics in one compiled call
    (compiled once for all predictions).

    Returns:
      ``{source: {metric: (P,)}}`` float64.
    """
    g = truth.shape[1]
    want = list(_pseudobulk_plan(names, scores=scores is not None, n_genes=g))
    if not want or not preds:
        return {s: {} for s in preds}
    top20 = "pearson_delta_top20" in names and scores is not None
    where = centroid = exclude = None
    if "pearson_delta_top20" in want or "direction_agreement" in want:
        where = _topk_mask(np.abs(scores), k=min(20, g))
    if "pearson_delta_centroid" in want:
        centroid = _centroid(truth)
    if "pds" in want:
        gidx = {gene: i for i, gene in enumerate(genes)}
        exclude = np.array([gidx.get(p, -1) for p in perts], dtype=np.int32)
    truth_delta = truth - u_ntc if ("rank" in want or "pds" in want) else None
    kernel = tuple(n for n in want if n != "pds")
    out = {}
    for source, pred in preds.items():
        pred_delta = pred - u_ntc if truth_delta is not None else None
        got = {}
        if kernel:
            got = _pseudobulk_kernel(pred, truth, u_ntc, pred_delta, truth_delta, where,
                                     centroid, names=kernel)  # fmt: skip
        if "pds" in want:
            got["pds"] = peers.pds(pred_delta, truth_delta, exclude=exclude)
        res = {n: np.asarray(v, float) for n, v in got.items()}
        if top20:
            res.setdefault("pearson_delta_top20", np.full(truth.shape[0], np.nan))
        out[source] = res
    return out


def score_dataset(
    names: Sequence[str], pred: np.ndarray, *, u_ntc: np.ndarray, deg_mask: np.ndarray | None
) -> dict[str, float]:
    """Dataset-level hit-discovery metrics of one prediction (empty without DEG sets)."""
    if deg_mask is None:
        return {}
    hits = deg_mask.any(axis=1)
    effect = np.linalg.norm(np.asarray(pred) - u_ntc, axis=1)
    budget = max(1, int(round(0.1 * len(hits))))
    at_budget, at_fdr = peers.hit_recalls_host(effect, hits, budget=budget, fdr=0.1)
    got = {"hit_recall_at_budget": at_budget, "hit_recall_at_fdr": at_fdr}
    return {n: v for n, v in got.items() if n in names}


def score_cells(
    names: Sequence[str],
    *,
    pred_cells,
    pred_labels: np.ndarray,
    truth_cells,
    truth_labels: np.ndarray,
    genes: Sequence[str],
    perts: Sequence[str],
    control: str,
) -> dict[str, np.ndarray]:
    """Cell-level metrics of a model given as predicted cells, rows in ``perts`` order.

    Args:
      names: the metrics wanted.
      pred_cells, pred_labels: predicted cells ``(N', G)`` (dense or scipy sparse, genes in
        the truth's order; never densified whole) and their condition labels.
      truth_cells, truth_labels: true cells ``(N, G)`` and their labels.
      genes, perts, control: gene names, perturbations (row order), the control label.

    Returns:
      ``{metric: (P,)}``. The cell-eval DE metrics and the cell-level ``pds`` follow
      cell-eval 0.8.2 when the predicted cells include control cells; without them the
      prediction's DE test and deltas use the truth's control cells
      (:data:`TRUTH_CONTROL_NOTE`, see :func:`pred_control_note`). A perturbation without
      predicted cells gets NaN.
    """
    perts = list(perts)
    P = len(perts)
    pred_labels = np.asarray(pred_labels).astype(str)
    truth_labels = np.asarray(truth_labels).astype(str)
    pred_cells, truth_cells = _as_matrix(pred_cells), _as_matrix(truth_cells)
    dist = [n for n in ("energy_distance", "mmd") if n in names]
    ce = [n for n in ("de_overlap_at_k", "de_direction_agreement", "pds") if n in names]

    def celleval() -> dict[str, np.ndarray]:
        if not ce or not bool(np.any(truth_labels == control)):
            return {}
        have = set(np.unique(pred_labels)) & set(np.unique(truth_labels))
        common = [p for p in perts if p in have]
        if not common:
            return {}
        res = _celleval_values(
            truth_cells, truth_labels, pred_cells, pred_labels, genes, common,
            control=control, alpha=0.05, de=any(n != "pds" for n in ce), with_mae=False,
        )  # fmt: skip
        idx = pd.Index(common).get_indexer(perts)
        # -1 (absent) reads the NaN appended
        return {name: np.append(np.asarray(res[name], float), np.nan)[idx] for name in ce}

    # one after the other: both keep the cores busy (the distances' GEMMs are multithreaded
    # on the host), and beside each other they ran slower than in turn
    out = celleval()
    if dist:
        res = peers.cell_distances(pred_cells, pred_labels, truth_cells, truth_labels, perts)
        for name, key in (("energy_distance", "energy"), ("mmd", "mmd")):
            if name in names:
                out[name] = np.asarray(res[key], float)
    return {n: v for n, v in out.items() if v.shape == (P,)}


def pred_control_note(names: Sequence[str], pred_labels: np.ndarray, control: str) -> dict:
    """``{metric: note}`` for the cell-level metrics of :func:`score_cells` that use the
    truth's control cells because the predicted cells have none (empty otherwise)."""
    if bool(np.any(np.asarray(pred_labels).astype(str) == control)):
        return {}
    return {n: TRUTH_CONTROL_NOTE for n in TRUTH_CONTROL_METRICS if n in names}
