"""Per-perturbation metric kernels, the fused multi-metric pass and the metric registry.

Every kernel is pure, jit-able and differentiable on ``(..., G)`` arrays (genes on the last
axis). :func:`fused_scores` computes several core metrics of a block of rows from shared
moments; :data:`METRICS` holds each metric's orientation, reference, inputs and DbD gates.
Definitions and NaN rules: ``docs/metrics.md``.
"""

from vcjax.metrics._fused import fused_scores
from vcjax.metrics._kernels import (
    cosine,
    cosine_delta,
    mae,
    mse,
    pearson,
    pearson_delta,
    pearson_delta_degs,
    pearson_delta_topk,
    r2,
    r2_delta,
    r2w_delta,
    topk_indices,
    topk_mask,
    wmse,
)
from vcjax.metrics._moments import (
    cosine_from_moments,
    negligible,
    pearson_from_moments,
    r2_from_moments,
    safe_div,
)
from vcjax.metrics._registry import (
    DEFAULT_METRICS,
    KERNELS,
    METRICS,
    MetricSpec,
    gate,
    higher_is_better,
    kernel_metrics,
    label,
    metric_bounds,
    metric_spec,
)

__all__ = [
    "DEFAULT_METRICS",
    "KERNELS",
    "METRICS",
    "MetricSpec",
    "cosine",
    "cosine_delta",
    "cosine_from_moments",
    "fused_scores",
    "gate",
    "higher_is_better",
    "kernel_metrics",
    "label",
    "metric_bounds",
    "mae",
    "metric_spec",
    "mse",
    "negligible",
    "pearson",
    "pearson_delta",
    "pearson_delta_degs",
    "pearson_delta_topk",
    "pearson_from_moments",
    "r2",
    "r2_delta",
    "r2_from_moments",
    "r2w_delta",
    "safe_div",
    "topk_indices",
    "topk_mask",
    "wmse",
]
