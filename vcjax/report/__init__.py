"""One self-contained HTML report of an evaluation table, and the figures it is made of."""

from vcjax.report._figures import plot_pathway_heatmap
from vcjax.report._html import (
    SOURCE_ORDER,
    build_report,
    load_per_gene,
    sidecar_path,
    write_report,
)

__all__ = [
    "SOURCE_ORDER",
    "build_report",
    "load_per_gene",
    "plot_pathway_heatmap",
    "sidecar_path",
    "write_report",
]
