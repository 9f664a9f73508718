"""Statistics from sufficient statistics and resamples: DE tests, FDR, DEG weights, intervals.

* differential expression (:func:`rank_genes`, scanpy parity; :func:`t_from_moments`,
  :func:`pvalues`, :func:`benjamini_hochberg`, :func:`log_fold_change`,
  :func:`minmax_weights` as ``jax.numpy`` kernels, with host twins for float64 parity);
* the Wilcoxon rank-sum test against control (:func:`mannwhitney_vs_control`, cell-eval's;
  :func:`mannwhitney_vs_control_sparse` for sparse cells, without densifying them);
* bootstrap interval maths (:func:`interval`, in the statistic's range,
  :func:`percentile_interval`, :func:`bca_interval`, :func:`center_samples`, the tie
  tolerance :data:`TIE_TOL`, :func:`win_rate`) and :func:`bootstrap_metric` for any statistic.
"""

from vcjax.stats._deg import (
    DEGResult,
    benjamini_hochberg,
    benjamini_hochberg_host,
    benjamini_hochberg_in_jit,
    log_fold_change,
    minmax_weights,
    minmax_weights_host,
    pvalues,
    pvalues_host,
    rank_genes,
    student_t_pvalues_fast,
    t_from_moments,
    t_from_moments_host,
    t_test_vs_rest,
    t_test_vs_rest_host,
)
from vcjax.stats._intervals import (
    TIE_TOL,
    BootstrapResult,
    bca_interval,
    bootstrap_metric,
    center_samples,
    draw_within_groups,
    interval,
    jackknife_acceleration,
    paired_summary,
    per_cell_groups,
    percentile_interval,
    ties,
    win_rate,
)
from vcjax.stats._wilcoxon import (
    MannWhitneyResult,
    bh_fdr,
    log2_fold_change,
    mannwhitney_from_counts,
    mannwhitney_from_counts_jit,
    mannwhitney_vs_control,
)
from vcjax.stats._wilcoxon_sparse import mannwhitney_vs_control_sparse

__all__ = [
    "TIE_TOL",
    "BootstrapResult",
    "DEGResult",
    "MannWhitneyResult",
    "bca_interval",
    "benjamini_hochberg",
    "benjamini_hochberg_host",
    "benjamini_hochberg_in_jit",
    "bh_fdr",
    "bootstrap_metric",
    "center_samples",
    "draw_within_groups",
    "interval",
    "jackknife_acceleration",
    "log2_fold_change",
    "log_fold_change",
    "mannwhitney_from_counts",
    "mannwhitney_from_counts_jit",
    "mannwhitney_vs_control",
    "mannwhitney_vs_control_sparse",
    "paired_summary",
    "minmax_weights",
    "minmax_weights_host",
    "per_cell_groups",
    "percentile_interval",
    "pvalues",
    "pvalues_host",
    "rank_genes",
    "student_t_pvalues_fast",
    "t_from_moments",
    "t_from_moments_host",
    "t_test_vs_rest",
    "t_test_vs_rest_host",
    "ties",
    "win_rate",
]
