"""vcjax: JAX-accelerated, calibrated metrics for virtual-cell (perturbation-response) models.

Prepare the truth once, score many predictions against it:

* :func:`prepare` — one streaming pass over a screen → an immutable :class:`Screen`
  (statistics, truth, Δ reference, DEG weights, baselines; :meth:`Screen.save` / ``load``);
* :func:`evaluate` — a model's predictions against calibrated baselines, one tidy table,
  with bootstrap intervals and paired comparisons;
* :func:`sweep` — many models against one truth on shared resamples → a
  :class:`SweepResult` (leaderboard with rank intervals and ``p_best``, pairwise wins);
* :func:`confidence` — per-gene / per-pathway / per-perturbation confidence (0–100);
* :func:`score` — every metric kernel over P perturbations at once (chunked, jitted);
* the layers beneath: :mod:`vcjax.metrics` (kernels and the metric registry),
  :mod:`vcjax.engine` (batching), :mod:`vcjax.stats` (DE tests, intervals),
  :mod:`vcjax.data` (AnnData → sufficient statistics), :mod:`vcjax.pipeline`,
  :mod:`vcjax.uncertainty`, :mod:`vcjax.peers`, :mod:`vcjax.losses`, :mod:`vcjax.simulate`;
  :mod:`vcjax.report` and :mod:`vcjax.cli` load on first use.
"""

from vcjax import data, engine, losses, metrics, peers, pipeline, simulate, stats, uncertainty
from vcjax._errors import VcjaxInputError
from vcjax._version import __version__
from vcjax.data import GroupStats, SplitStats, group_stats, read_h5ad, split_halves
from vcjax.engine import score
from vcjax.metrics import DEFAULT_METRICS
from vcjax.pipeline import (
    DEFAULT_BASELINES,
    Prediction,
    Screen,
    SweepResult,
    add_intervals,
    align,
    calibration_card,
    evaluate,
    per_gene_data,
    prepare,
    summarize,
    summary_intervals,
    sweep,
)
from vcjax.simulate import population_means, simulate_screen
from vcjax.stats import bootstrap_metric, rank_genes
from vcjax.uncertainty import confidence

__all__ = [
    "__version__",
    "DEFAULT_BASELINES",
    "DEFAULT_METRICS",
    "GroupStats",
    "Prediction",
    "Screen",
    "SplitStats",
    "VcjaxInputError",
    "add_intervals",
    "align",
    "bootstrap_metric",
    "calibration_card",
    "confidence",
    "data",
    "engine",
    "evaluate",
    "group_stats",
    "losses",
    "metrics",
    "peers",
    "per_gene_data",
    "pipeline",
    "population_means",
    "prepare",
    "rank_genes",
    "read_h5ad",
    "score",
    "simulate",
    "simulate_screen",
    "split_halves",
    "stats",
    "summarize",
    "summary_intervals",
    "sweep",
    "SweepResult",
    "uncertainty",
]


def __getattr__(name: str):
    # the report (matplotlib), the command line and the multi-host helpers load on first use
    if name in ("report", "cli", "distributed"):
        import importlib

        return importlib.import_module(f"vcjax.{name}")
    raise AttributeError(f"module 'vcjax' has no attribute {name!r}")
