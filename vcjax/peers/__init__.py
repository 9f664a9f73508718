"""The peers' metrics (cell-eval, GEARS, Systema, PerturBench, hit discovery) in the same engine.

The kernels (:func:`pds`, :func:`de_overlap_at_k`, :func:`energy_distance`, ...) are pure
JAX functions on arrays; :func:`score_pseudobulk`, :func:`score_dataset` and
:func:`score_cells` give one prediction's values as the evaluation table holds them.
Definitions and sources: ``docs/metrics.md`` §2.
"""

from vcjax.peers._kernels import (
    cell_distances,
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
    hit_recalls_host,
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
    TRUTH_CONTROL_METRICS,
    TRUTH_CONTROL_NOTE,
    available,
    pred_control_note,
    score_cells,
    score_dataset,
    score_pseudobulk,
    score_pseudobulk_sources,
)

__all__ = [
    "CELL_METRICS",
    "DATASET_METRICS",
    "PEER_METRICS",
    "TRUTH_CONTROL_METRICS",
    "TRUTH_CONTROL_NOTE",
    "available",
    "cell_distances",
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
    "hit_recalls_host",
    "mae",
    "mmd",
    "pds",
    "pearson_delta_top20",
    "perturbed_centroid",
    "pred_control_note",
    "pseudobulk",
    "rank",
    "rbf_bandwidth",
    "score_cells",
    "score_dataset",
    "score_pseudobulk",
    "score_pseudobulk_sources",
]
