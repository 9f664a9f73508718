"""The peers' metrics (cell-eval, GEARS, Systema, PerturBench, hit discovery) in the same engine.

The kernels (:func:`pds`, :func:`de_overlap_at_k`, :func:`energy_distance`, ...) are pure
JAX functions on arrays; :func:`celleval_protocol` (with :func:`celleval_truth` /
:func:`celleval_scores` to prepare the truth once) gives every per-perturbation metric of
cell-eval 0.8.2's ``full`` profile under its names; :func:`score_pseudobulk`, :func:`score_dataset` and
:func:`score_cells` give one prediction's values as the evaluation table holds them.
Definitions and sources: ``docs/metrics.md`` §2.
"""

from vcjax.peers._celleval import (
    CELLEVAL_METRICS,
    CellEvalTruth,
    celleval_normalize,
    celleval_protocol,
    celleval_scores,
    celleval_truth,
    de_auc,
    energy_to_control,
    masked_ranks,
    masked_spearman,
)
from vcjax.peers._kernels import (
    celleval_de_table,
    celleval_metrics,
    centroid_accuracy,
    cosine_delta,
    de_direction_agreement,
    de_overlap_at_k,
    direction_agreement,
    distribution_distances,
    energy_distance,
    hit_recall_at_budget,
    hit_recall_at_fdr,
    mae,
    mmd,
    pds,
    pearson_delta_top20,
    perturbed_centroid,
    pseudobulk,
    rank,
    rbf_bandwidth,
)
from vcjax.peers._table import (
    CELL_METRICS,
    DATASET_METRICS,
    PEER_METRICS,
    available,
    score_cells,
    score_dataset,
    score_pseudobulk,
)
from vcjax.peers._vcc2026 import (
    VCC2026_MEMBERS,
    VCC2026_METRICS,
    Vcc2026Truth,
    vcc2026_composite,
    vcc2026_scores,
    vcc2026_truth,
)

__all__ = [
    "VCC2026_MEMBERS",
    "VCC2026_METRICS",
    "Vcc2026Truth",
    "vcc2026_composite",
    "vcc2026_scores",
    "vcc2026_truth",
    "CELLEVAL_METRICS",
    "CELL_METRICS",
    "CellEvalTruth",
    "celleval_normalize",
    "celleval_protocol",
    "celleval_scores",
    "celleval_truth",
    "de_auc",
    "energy_to_control",
    "masked_ranks",
    "masked_spearman",
    "DATASET_METRICS",
    "PEER_METRICS",
    "available",
    "celleval_de_table",
    "celleval_metrics",
    "centroid_accuracy",
    "cosine_delta",
    "de_direction_agreement",
    "de_overlap_at_k",
    "direction_agreement",
    "distribution_distances",
    "energy_distance",
    "hit_recall_at_budget",
    "hit_recall_at_fdr",
    "mae",
    "mmd",
    "pds",
    "pearson_delta_top20",
    "perturbed_centroid",
    "pseudobulk",
    "rank",
    "rbf_bandwidth",
    "score_cells",
    "score_dataset",
    "score_pseudobulk",
]
