"""Figures that stand alone (matplotlib :class:`~matplotlib.figure.Figure`, no pyplot state)."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["plot_pathway_heatmap"]


def plot_pathway_heatmap(
    df: pd.DataFrame,
    *,
    value: str = "confidence",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool | None = None,
    title: str | None = None,
):
    """Heat map of a ``level="pathway"`` table: gene sets × perturbations.

    Rows are gene sets labelled ``name (present/total)``; columns perturbations (with the
    covariate appended when present). NaN cells are grey. Built on
    :class:`matplotlib.figure.Figure` (no pyplot state), ready for ``fig.savefig`` or a
    report.

    Args:
      df: output of :func:`vcjax.confidence` with ``level="pathway"``.
      value: column to show (``confidence`` 0–100 by default; e.g. ``r2w_delta``).
      cmap: matplotlib colour map.
      vmin, vmax: colour limits (default 0–100 for ``confidence``, else the data range).
      annotate: write values in the cells (default: when the grid has at most 400 cells).
      title: figure title.

    Returns:
      ``matplotlib.figure.Figure``.
    """
    import matplotlib
    from matplotlib.figure import Figure

    need = {"perturbation", "gene_set", value}
    if not need <= set(df.columns):
        raise ValueError(
            f"plot_pathway_heatmap needs columns {sorted(need)} (a level='pathway' table)"
        )
    d = df.copy()
    if "covariate" in d.columns:
        d["perturbation"] = d["perturbation"].astype(str) + " | " + d["covariate"].astype(str)
    sets = list(dict.fromkeys(d["gene_set"]))
    perts = list(dict.fromkeys(d["perturbation"]))
    grid = d.pivot_table(
        index="gene_set", columns="perturbation", values=value, aggfunc="mean", dropna=False
    )
    grid = grid.reindex(index=sets, columns=perts)
    data = np.ma.masked_invalid(grid.to_numpy(np.float64))
    if value == "confidence":
        vmin = 0.0 if vmin is None else vmin
        vmax = 100.0 if vmax is None else vmax
    labels = sets
    if {"n_present", "n_genes"} <= set(d.columns):
        first = d.drop_duplicates("gene_set").set_index("gene_set")
        labels = [
            f"{s} ({int(first.at[s, 'n_present'])}/{int(first.at[s, 'n_genes'])})" for s in sets
        ]
    S, P = data.shape
    fig = Figure(figsize=(max(4.0, 0.32 * P + 3.5), max(2.5, 0.32 * S + 1.6)), layout="constrained")
    ax = fig.add_subplot()
    cm = matplotlib.colormaps[cmap].with_extremes(bad="#d0d0d0")
    im = ax.imshow(data, aspect="auto", cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(P), labels=perts, rotation=90, fontsize=7)
    ax.set_yticks(range(S), labels=labels, fontsize=7)
    ax.set_xlabel("perturbation")
    ax.set_ylabel("gene set (present/total genes)")
    if annotate is None:
        annotate = S * P <= 400
    if annotate:
        lo, hi = im.get_clim()
        for i in range(S):
            for j in range(P):
                if data.mask is not np.ma.nomask and data.mask[i, j]:
                    continue
                v = float(data[i, j])
                frac = (v - lo) / (hi - lo) if hi > lo else 0.5
                ax.text(
                    j,
                    i,
                    f"{v:.0f}" if value == "confidence" else f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if frac < 0.5 else "black",
                )
    cbar = fig.colorbar(im, ax=ax, shrink=0.8)
    cbar.set_label(value)
    ax.set_title(title or f"per-pathway {value}", fontsize=9)
    return fig
