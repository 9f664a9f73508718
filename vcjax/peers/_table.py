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

from collections.abc import Sequence

import numpy as np

from vcjax.metrics import METRICS, pearson_delta, topk_mask
from vcjax.peers import _kernels as peers

__all__ = [
    "CELL_METRICS",
    "DATASET_METRICS",
    "PEER_METRICS",
    "available",
    "score_cells",
    "score_dataset",
    "score_pseudobulk",
]

#: every peer metric of the registry; the dataset-level ones; those needing predicted cells
PEER_METRICS = tuple(n for n, m in METRICS.items() if not m.is_core)
DATASET_METRICS = tuple(n for n in PEER_METRICS if METRICS[n].level == "dataset")
CELL_METRICS = tuple(n for n in PEER_METRICS if "cells" in METRICS[n].needs)


def available(*, cells: bool, pred_control: bool) -> list[str]:
    """The peer metrics that a prediction allows (``cells``: given as predicted cells;
    ``pred_control``: those include control cells)."""
    have = {"cells": cells, "pred_control": pred_control}
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
    out: dict[str, np.ndarray] = {}
    abs_t = None if scores is None else np.abs(scores)
    if "pearson_delta_top20" in names and abs_t is not None:
        out["pearson_delta_top20"] = np.asarray(
            peers.pearson_delta_top20(pred, truth, u_ntc, abs_t, k=20), float
        )
    if "direction_agreement" in names and abs_t is not None:
        where = topk_mask(abs_t, k=min(20, truth.shape[1]))
        out["direction_agreement"] = np.asarray(
            peers.direction_agreement(pred, truth, u_ntc, where=where), float
        )
    if "pearson_delta_centroid" in names:
        centroid = np.asarray(peers.perturbed_centroid(truth))
        out["pearson_delta_centroid"] = np.asarray(pearson_delta(pred, truth, centroid), float)
    if "centroid_accuracy" in names:
        out["centroid_accuracy"] = np.asarray(peers.centroid_accuracy(pred, truth), float)
    if "rank" in names:
        out["rank"] = np.asarray(peers.rank(pred - u_ntc, truth - u_ntc), float)
    if "pds" in names:
        gidx = {g: i for i, g in enumerate(genes)}
        exclude = np.array([gidx.get(p, -1) for p in perts])
        out["pds"] = np.asarray(peers.pds(pred - u_ntc, truth - u_ntc, exclude=exclude), float)
    return out


def score_dataset(
    names: Sequence[str], pred: np.ndarray, *, u_ntc: np.ndarray, deg_mask: np.ndarray | None
) -> dict[str, float]:
    """Dataset-level hit-discovery metrics of one prediction (empty without DEG sets)."""
    if deg_mask is None:
        return {}
    hits = deg_mask.any(axis=1)
    effect = np.linalg.norm(np.asarray(pred) - u_ntc, axis=1)
    out = {}
    if "hit_recall_at_budget" in names:
        budget = max(1, int(round(0.1 * len(hits))))
        out["hit_recall_at_budget"] = float(peers.hit_recall_at_budget(effect, hits, budget=budget))
    if "hit_recall_at_fdr" in names:
        out["hit_recall_at_fdr"] = float(peers.hit_recall_at_fdr(effect, hits, fdr=0.1))
    return out


def score_cells(
    names: Sequence[str],
    *,
    pred_cells: np.ndarray,
    pred_labels: np.ndarray,
    truth_cells: np.ndarray,
    truth_labels: np.ndarray,
    genes: Sequence[str],
    perts: Sequence[str],
    control: str,
) -> dict[str, np.ndarray]:
    """Cell-level metrics of a model given as predicted cells, rows in ``perts`` order.

    Args:
      names: the metrics wanted.
      pred_cells, pred_labels: dense predicted cells ``(N', G)`` (genes in the truth's order)
        and their condition labels.
      truth_cells, truth_labels: dense true cells ``(N, G)`` and their labels.
      genes, perts, control: gene names, perturbations (row order), the control label.

    Returns:
      ``{metric: (P,)}``; the cell-eval DE metrics (and the cell-level ``pds``) only when
      the predicted cells include control cells.
    """
    out: dict[str, np.ndarray] = {}
    if any(n in names for n in ("de_overlap_at_k", "de_direction_agreement", "pds")) and bool(
        np.any(pred_labels == control)
    ):
        res = peers.celleval_metrics(
            truth_cells, truth_labels, pred_cells, pred_labels, list(genes), control=control
        )
        order = {p: i for i, p in enumerate(res["perts"])}
        idx = [order.get(p) for p in perts]
        for name in ("de_overlap_at_k", "de_direction_agreement", "pds"):
            if name in names:
                vals = np.asarray(res[name], float)
                out[name] = np.array([vals[i] if i is not None else np.nan for i in idx])
    for name, metric in (("energy_distance", "energy"), ("mmd", "mmd")):
        if name in names:
            out[name] = np.asarray(
                peers.distribution_distances(
                    pred_cells, pred_labels, truth_cells, truth_labels, list(perts), metric=metric
                ),
                float,
            )
    return out
