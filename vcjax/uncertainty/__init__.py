"""Confidence: per gene, per pathway and per perturbation, and scores of a model's own uncertainty.

:func:`confidence` is the entry point (a :class:`~vcjax.pipeline.Screen` or a truth screen,
and a prediction); the scoring rules it builds on (:func:`gene_confidence`,
:func:`gaussian_crps`, :func:`uncertainty_scores`, ...) are pure JAX functions.
"""

from vcjax.uncertainty._confidence import PATHWAY_REASONS, confidence, detection_value
from vcjax.uncertainty._scores import (
    BANDS,
    LEVELS,
    UncertaintyScores,
    confidence_band,
    confidence_score,
    ensemble_crps,
    gaussian_crps,
    gaussian_nll,
    gene_confidence,
    interval_covered,
    replicate_noise,
    spearman,
    uncertainty_scores,
)

__all__ = [
    "BANDS",
    "LEVELS",
    "PATHWAY_REASONS",
    "UncertaintyScores",
    "confidence",
    "confidence_band",
    "confidence_score",
    "detection_value",
    "ensemble_crps",
    "gaussian_crps",
    "gaussian_nll",
    "gene_confidence",
    "interval_covered",
    "replicate_noise",
    "spearman",
    "uncertainty_scores",
]
