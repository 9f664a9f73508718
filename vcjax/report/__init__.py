"""Self-contained HTML reports: of an evaluation table, and of a sweep; and their figures."""

from vcjax.report._figures import plot_pathway_heatmap
from vcjax.report._html import (
    GLOSSARY,
    SOURCE_ORDER,
    build_report,
    load_per_gene,
    sidecar_path,
    verdict,
    write_report,
)
from vcjax.report._sweep import build_sweep_report, write_sweep_report

__all__ = [
    "GLOSSARY",
    "SOURCE_ORDER",
    "build_report",
    "build_sweep_report",
    "load_per_gene",
    "plot_pathway_heatmap",
    "sidecar_path",
    "verdict",
    "write_report",
    "write_sweep_report",
]
