"""The pieces every vcjax HTML page shares: style, number format, tables, embedded figures."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["CSS", "fig_to_img", "fmt", "html_table", "layout", "pyplot"]


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1240px;
color:#222;background:#fff;line-height:1.4}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:15px}table{border-collapse:collapse;margin:8px 0;font-size:12px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}table.small{font-size:11px}
.note{color:#8a5a00;font-size:13px}img{max-width:100%;height:auto}
.meta{color:#555;font-size:13px}nav a{margin-right:12px}
"""


def fig_to_img(fig, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def layout(
    fig,
    *,
    left: float = 1.4,
    right: float = 0.2,
    bottom: float = 0.6,
    top: float = 0.4,
    wspace: float = 0.5,
    hspace: float = 0.6,
) -> None:
    """Fixed margins in inches (much cheaper than ``tight_layout`` on large figures)."""
    W, H = fig.get_size_inches()
    nrows, ncols = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    pw = max((W - left - right - (ncols - 1) * wspace) / ncols, 0.5)
    ph = max((H - top - bottom - (nrows - 1) * hspace) / nrows, 0.5)
    fig.subplots_adjust(
        left=left / W,
        right=1 - right / W,
        bottom=bottom / H,
        top=1 - top / H,
        wspace=wspace / pw,
        hspace=hspace / ph,
    )


def fmt(x: Any) -> str:
    if isinstance(x, (float, np.floating)):
        if not np.isfinite(x):
            return "—"
        ax = abs(float(x))
        if ax != 0 and (ax < 1e-3 or ax >= 1e5):
            return f"{x:.3g}"
        return f"{x:.4f}" if ax < 10 else f"{x:.2f}"
    return html.escape(str(x))


def html_table(df: pd.DataFrame, *, max_rows: int = 200, cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for _, row in df.head(max_rows).iterrows():
        rows.append("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row.to_numpy()) + "</tr>")
    more = (
        f'<p class="note">{len(df) - max_rows} more rows not shown.</p>'
        if len(df) > max_rows
        else ""
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{more}'


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
