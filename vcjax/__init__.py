"""vcjax: JAX-accelerated, calibrated metrics for virtual-cell (perturbation-response) models.

The public surface:

* :func:`vcjax.evaluate` — a model's predictions against calibrated baselines, one tidy table;
* :func:`vcjax.score` — every metric kernel over P perturbations at once (chunked, jitted);
* :func:`vcjax.confidence` — per-gene / per-pathway / per-perturbation confidence (0–100);
* :mod:`vcjax.metrics` — the per-perturbation kernels (MSE, WMSE, Pearson(Δ), R²w(Δ), ...);
* :mod:`vcjax.data` / :mod:`vcjax.deg` — AnnData → sufficient statistics → DEG weights;
* :mod:`vcjax.baselines`, :mod:`vcjax.bootstrap`, :mod:`vcjax.losses`, :mod:`vcjax.peers`,
  :mod:`vcjax.simulate`.

``vcjax.evaluate`` and ``vcjax.confidence`` are the functions; their modules stay importable
as ``vcjax.evaluate``/``vcjax.confidence`` through ``from vcjax.evaluate import ...``.
"""

from vcjax import baselines, data, deg, engine, metrics
from vcjax.confidence import confidence
from vcjax.data import GroupStats, SplitStats, VcjaxInputError, group_stats, read_h5ad, split_halves
from vcjax.deg import rank_genes
from vcjax.engine import score
from vcjax.evaluate import calibration_card, evaluate, summarize
from vcjax.simulate import population_means, simulate_screen

__version__ = "0.1.0"

__all__ = [
    "GroupStats",
    "SplitStats",
    "VcjaxInputError",
    "baselines",
    "calibration_card",
    "confidence",
    "data",
    "deg",
    "engine",
    "evaluate",
    "group_stats",
    "metrics",
    "population_means",
    "rank_genes",
    "read_h5ad",
    "score",
    "simulate_screen",
    "split_halves",
    "summarize",
]


def __getattr__(name: str):
    # modules with heavier or optional imports load on first use
    import importlib

    if name in {"bootstrap", "losses", "peers", "wilcoxon", "gene_sets", "report", "cli", "distributed"}:
        return importlib.import_module(f"vcjax.{name}")
    raise AttributeError(f"module 'vcjax' has no attribute {name!r}")
