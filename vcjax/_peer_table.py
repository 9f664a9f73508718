"""The peers' metrics (:mod:`vcjax.peers`) as rows of the :func:`vcjax.evaluate` table.

Orchestration only: which inputs each peer metric gets inside an evaluation. Definitions,
sources and NaN rules are in :mod:`vcjax.peers` and ``docs/metrics.md``.

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

Dataset-level metrics, one row with ``perturbation = "(all)"``: ``hit_recall_at_budget``
(budget = 10 % of the perturbations, at least 1) and ``hit_recall_at_fdr`` (FDR 0.1), where
a true hit is a perturbation with at least one DEG and the predicted hit score is the norm
of the predicted delta vs control.

Cell-level metrics, only for a model given as predicted cells: ``de_overlap_at_k``,
``de_direction_agreement`` (and ``pds``, replacing the pseudobulk one) exactly as cell-eval
0.8.2 computes them when the predicted cells include control cells, and ``energy_distance``
and ``mmd`` between predicted and true cells (all truth cells of each perturbation).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vcjax import peers
from vcjax.metrics import topk_mask

ALL = "(all)"

#: name → higher is better
PSEUDOBULK = {
    "pearson_delta_top20": True,
    "direction_agreement": True,
    "pearson_delta_centroid": True,
    "centroid_accuracy": True,
    "rank": False,
    "pds": True,
}
DATASET = {"hit_recall_at_budget": True, "hit_recall_at_fdr": True}
CELLS = {
    "de_overlap_at_k": True,
    "de_direction_agreement": True,
    "energy_distance": False,
    "mmd": False,
}
TABLE_METRICS: dict[str, bool] = {**PSEUDOBULK, **DATASET, **CELLS}


def higher_is_better(metric: str) -> bool:
    return TABLE_METRICS[metric]


def _is_cells(pred, key: str) -> bool:
    return (
        hasattr(pred, "obs") and key in pred.obs.columns and not pred.obs[key].astype(str).is_unique
    )


def available(pred, key: str, control: str) -> list[str]:
    """The peer metrics that these inputs allow."""
    names = list(PSEUDOBULK) + list(DATASET)
    if pred is not None and _is_cells(pred, key):
        names += (
            ["de_overlap_at_k", "de_direction_agreement"]
            if _has_control(pred, key, control)
            else []
        )
        names += ["energy_distance", "mmd"]
    return names


def _has_control(pred, key: str, control: str) -> bool:
    return bool((pred.obs[key].astype(str) == control).any())


def _dense_cells(adata, *, layer, normalization: str, mask=None) -> np.ndarray:
    from vcjax.data import _normalize_chunk

    X = adata.X if layer is None else adata.layers[layer]
    if mask is not None:
        X = X[np.flatnonzero(mask)]
    if normalization == "log1p_cp10k":
        X = _normalize_chunk(X)
    return X.toarray() if hasattr(X, "toarray") else np.asarray(X, dtype=np.float64)


def score_pseudobulk(names, pred: np.ndarray, ctx) -> dict[str, np.ndarray]:
    """Per-perturbation peer metrics of one ``(P, G)`` prediction."""
    out: dict[str, np.ndarray] = {}
    truth, ntc = ctx.truth, ctx.u_ntc
    P = truth.shape[0]
    scores = np.abs(ctx.scores) if ctx.scores is not None else None
    if "pearson_delta_top20" in names and scores is not None:
        out["pearson_delta_top20"] = np.asarray(
            peers.pearson_delta_top20(pred, truth, ntc, scores, k=20), float
        )
    if "direction_agreement" in names and scores is not None:
        k = min(20, truth.shape[1])
        where = topk_mask(scores, k=k)
        out["direction_agreement"] = np.asarray(
            peers.direction_agreement(pred, truth, ntc, where=where), float
        )
    if "pearson_delta_centroid" in names:
        from vcjax.metrics import pearson_delta

        centroid = np.asarray(peers.perturbed_centroid(truth))
        out["pearson_delta_centroid"] = np.asarray(pearson_delta(pred, truth, centroid), float)
    if "centroid_accuracy" in names:
        out["centroid_accuracy"] = np.asarray(peers.centroid_accuracy(pred, truth), float)
    if "rank" in names:
        out["rank"] = np.asarray(peers.rank(pred - ntc, truth - ntc), float)
    if "pds" in names:
        gidx = {g: i for i, g in enumerate(ctx.genes)}
        exclude = np.array([gidx.get(p, -1) for p in ctx.perts])
        out["pds"] = np.asarray(peers.pds(pred - ntc, truth - ntc, exclude=exclude), float)
    for name in DATASET:
        if name in names:
            out[name] = np.full(P, np.nan)  # filled by score_dataset
    return out


def score_dataset(names, pred: np.ndarray, ctx) -> dict[str, float]:
    """Dataset-level hit-discovery metrics of one prediction."""
    if ctx.deg_mask is None:
        return {}
    hits = ctx.deg_mask.any(axis=1)
    effect = np.linalg.norm(np.asarray(pred) - ctx.u_ntc, axis=1)
    out = {}
    if "hit_recall_at_budget" in names:
        budget = max(1, int(round(0.1 * len(ctx.perts))))
        out["hit_recall_at_budget"] = float(peers.hit_recall_at_budget(effect, hits, budget=budget))
    if "hit_recall_at_fdr" in names:
        out["hit_recall_at_fdr"] = float(peers.hit_recall_at_fdr(effect, hits, fdr=0.1))
    return out


def score_cells(names, pred_adata, ctx) -> dict[str, np.ndarray]:
    """Cell-level metrics of a model given as predicted cells (NaN-free only where defined)."""
    key, control = ctx.options["key"], ctx.control
    want = [n for n in names if n in CELLS or n == "pds"]
    if not want or not _is_cells(pred_adata, key):
        return {}
    norm = ctx.options.get("normalization", "none")
    truth_cells = _dense_cells(
        ctx.adata, layer=ctx.options.get("layer"), normalization=norm, mask=ctx.cell_mask
    )
    labels = ctx.adata.obs[key].astype(str).to_numpy()
    if ctx.cell_mask is not None:
        labels = labels[ctx.cell_mask]
    pred_norm = ctx.options.get("pred_normalization", "none")
    pred_cells = _dense_cells(
        pred_adata, layer=ctx.options.get("pred_layer"), normalization=pred_norm
    )
    pos = {g: i for i, g in enumerate(map(str, pred_adata.var_names))}
    pred_cells = pred_cells[:, [pos[g] for g in ctx.genes]]
    pred_labels = pred_adata.obs[key].astype(str).to_numpy()
    out: dict[str, np.ndarray] = {}
    if any(
        n in want for n in ("de_overlap_at_k", "de_direction_agreement", "pds")
    ) and _has_control(pred_adata, key, control):
        res = peers.celleval_metrics(
            truth_cells, labels, pred_cells, pred_labels, list(ctx.genes), control=control
        )
        order = {p: i for i, p in enumerate(res["perts"])}
        idx = [order.get(p) for p in ctx.perts]
        for name in ("de_overlap_at_k", "de_direction_agreement", "pds"):
            if name in want:
                vals = np.asarray(res[name], float)
                out[name] = np.array([vals[i] if i is not None else np.nan for i in idx])
    for name, metric in (("energy_distance", "energy"), ("mmd", "mmd")):
        if name in want:
            out[name] = np.asarray(
                peers.distribution_distances(
                    pred_cells, pred_labels, truth_cells, labels, list(ctx.perts), metric=metric
                ),
                float,
            )
    return out


def score(names, source: str, pred: np.ndarray, ctx, pred_object=None) -> Mapping[str, np.ndarray]:
    """All requested peer metrics of one source, ``{metric: (P,)}`` (dataset-level as scalars)."""
    res = score_pseudobulk(names, pred, ctx)
    if source == "model" and pred_object is not None:
        res.update(score_cells(names, pred_object, ctx))
    for name in CELLS:
        if name in names and name not in res:
            res[name] = np.full(len(ctx.perts), np.nan)
    return res
