"""The pieces every vcjax HTML page shares: style, number format, tables, embedded figures."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "CSS",
    "NAME_CHARS",
    "Raw",
    "fig_to_img",
    "fmt",
    "html_table",
    "layout",
    "name_cell",
    "pyplot",
    "short",
]

#: names longer than this are shortened (with "…") in figure labels.
NAME_CHARS = 24

# Responsive: nothing is wider than the viewport (no sideways scroll at 800 px): tables wrap
# their cells (long words break anywhere), long names are cut with an ellipsis and keep the
# full name in their title (hover), figures scale down to the column width.
CSS = """
*{box-sizing:border-box}
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1240px;
padding:0 16px;color:#222;background:#fff;line-height:1.4;font-size:15px;overflow-wrap:break-word}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:16px}table{border-collapse:collapse;margin:8px 0;font-size:13px;max-width:100%}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f3f3f3;overflow-wrap:break-word}td{white-space:nowrap}
td:first-child{white-space:normal;overflow-wrap:anywhere}
td:first-child,th:first-child{text-align:left}table.small{font-size:12px}
.note{color:#8a5a00;font-size:14px}img{max-width:100%;height:auto;display:block}
figure{margin:8px 0;max-width:100%}figcaption{font-size:14px;color:#333;margin-top:4px}
.meta{color:#555;font-size:14px}nav{line-height:1.9}nav a{margin-right:12px;white-space:nowrap}
.nm{display:inline-block;max-width:16em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;
vertical-align:bottom}.nm.full{white-space:normal;max-width:none;overflow:visible}
.verdict{font-size:16px;background:#f6f8fa;border-left:4px solid #d62728;padding:8px 12px}
.iv{white-space:nowrap}small{color:#555}
dl.glossary dt{font-weight:600;margin-top:6px}dl.glossary dd{margin-left:16px}
details summary{cursor:pointer;font-weight:600}
@media (max-width:900px){body{font-size:14px;margin:12px auto}table{font-size:12px}
th,td{padding:2px 4px}.nm{max-width:11em}}
"""


class Raw(str):
    """A table cell that is already HTML (not escaped by :func:`html_table`)."""


def short(name: object, n: int = NAME_CHARS) -> str:
    """``name`` cut to ``n`` characters with a trailing "…" (for figure labels)."""
    s = str(name)
    return s if len(s) <= n else s[: n - 1] + "…"


def name_cell(name: object, *, full: bool = False) -> Raw:
    """A name cut by CSS (ellipsis) when long, the full name on hover (``title``); with
    ``full=True`` shown whole, wrapping (the table where names are looked up)."""
    s = html.escape(str(name))
    cls = "nm full" if full else "nm"
    return Raw(f'<span class="{cls}" title="{s}">{s}</span>')


def fig_to_img(
    fig, alt: str, *, caption: str | None = None, attrs: dict[str, object] | None = None
) -> str:
    """The figure as an embedded PNG; with ``caption`` or ``attrs`` wrapped in a ``<figure>``
    (``attrs`` become its ``data-*`` attributes, e.g. the count of off-axis points)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    img = f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'
    if caption is None and not attrs:
        return img
    data = "".join(
        f' data-{html.escape(str(k))}="{html.escape(str(v))}"' for k, v in (attrs or {}).items()
    )
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure{data}>{img}{cap}</figure>"


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
    if isinstance(x, Raw):
        return str(x)
    if isinstance(x, (float, np.floating)):
        if not np.isfinite(x):
            return "—"
        ax = abs(float(x))
        if ax != 0 and (ax < 1e-3 or ax >= 1e5):
            return f"{x:.3g}"
        return f"{x:.4f}" if ax < 10 else f"{x:.2f}"
    return html.escape(str(x))


def html_table(df: pd.DataFrame, *, max_rows: int = 200, cls: str = "") -> str:
    # headers may wrap after an underscore (technical_<wbr>duplicate), never inside a number
    head = "".join(f"<th>{html.escape(str(c)).replace('_', '_<wbr>')}</th>" for c in df.columns)
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
