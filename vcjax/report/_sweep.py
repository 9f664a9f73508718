"""A self-contained HTML report of a sweep (:func:`vcjax.sweep`): which model is best, and
how sure that is.

Sections, verdict first:

1. the leaderboard: one sentence naming the best model and the models that cannot be told
   from it, the table (aggregate, interval, rank, rank interval, ``p_best``) with the
   baselines below it, and the same as a forest plot;
2. the win-probability heatmap: P(row model beats column model) over the shared
   resamples;
3. the perturbations on which the two best models differ most.

Example::

    res = vcjax.sweep(screen, models, n_boot=1000)
    vcjax.report.write_sweep_report(res, "sweep.html")
"""

from __future__ import annotations

import datetime as _dt
import html
import os
from typing import Any

import numpy as np
import pandas as pd

from vcjax._io import atomic_path
from vcjax.metrics import label
from vcjax.report._page import CSS, fig_to_img, fmt, html_table, pyplot

__all__ = ["build_sweep_report", "write_sweep_report"]

#: models drawn in the forest plot and the heatmap (the best ones)
MAX_DRAWN = 30


def _verdict(lb: pd.DataFrame, *, metric_label: str, n_boot: int) -> str:
    models = lb[~lb.index.astype(str).str.startswith("[")]
    if models["rank"].isna().all():
        return (
            f"<p>No model has a defined mean {html.escape(metric_label)}: every perturbation "
            "is NaN for every model (see the notes, e.g. DbD's no-DEG gate), so nothing is "
            "ranked.</p>"
        )
    best = str(models.index[0])
    if n_boot == 0 or models["differs_from_best"].isna().all():
        return (
            f"<p><b>{html.escape(best)}</b> has the best mean {html.escape(metric_label)}. "
            "Without resamples there is no interval: run the sweep with n_boot &gt; 0 to see "
            "how sure that is.</p>"
        )
    tied = [str(n) for n, d in models["differs_from_best"].items() if n != best and d is False]
    p = float(models.loc[best, "p_best"])
    text = (
        f"<p><b>{html.escape(best)}</b> is best on mean {html.escape(metric_label)} in "
        f"{100 * p:.0f} % of {n_boot} resamples (p_best {p:.2f}). "
    )
    if tied:
        shown = ", ".join(html.escape(t) for t in tied[:8]) + (" …" if len(tied) > 8 else "")
        text += (
            f"{len(tied)} other model{'s' if len(tied) > 1 else ''} cannot be told from it "
            f"(the paired interval of the difference contains 0): {shown}.</p>"
        )
    else:
        text += "Every other model is distinguishably worse (paired intervals exclude 0).</p>"
    return text


def _forest(lb: pd.DataFrame, *, metric_label: str):
    plt = pyplot()
    models = lb[~lb.index.astype(str).str.startswith("[")].head(MAX_DRAWN)
    base = lb[lb.index.astype(str).str.startswith("[")]
    n = len(models)
    fig, ax = plt.subplots(figsize=(8.5, 0.9 + 0.28 * n))
    y = np.arange(n)[::-1]
    v = models["value"].to_numpy(float)
    lo, hi = models["ci_low"].to_numpy(float), models["ci_high"].to_numpy(float)
    has_ci = np.isfinite(lo) & np.isfinite(hi)
    ax.errorbar(
        v[has_ci], y[has_ci], xerr=[v[has_ci] - lo[has_ci], hi[has_ci] - v[has_ci]],
        fmt="o", color="#d62728", ecolor="#d62728", capsize=3, ms=4,
    )  # fmt: skip
    ax.plot(v[~has_ci], y[~has_ci], "o", color="#d62728", ms=4)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{name}  (p_best {p:.2f})" for name, p in models["p_best"].items()])
    styles = {"[technical_duplicate]": "#2ca02c", "[dataset_mean]": "#1f77b4",
              "[control_mean]": "#ff7f0e"}  # fmt: skip
    for name, color in styles.items():
        if name in base.index and np.isfinite(base.loc[name, "value"]):
            ax.axvline(base.loc[name, "value"], color=color, ls="--", lw=1, label=name.strip("[]"))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.set_xlabel(metric_label)
    ax.set_ylim(-0.7, n - 0.3)
    ax.grid(axis="x", alpha=0.3)
    fig.subplots_adjust(left=0.32, right=0.98, top=0.98, bottom=max(0.08, 0.5 / (0.9 + 0.28 * n)))
    return fig


def _heatmap(pw: pd.DataFrame, order: list[str]):
    plt = pyplot()
    names = [n for n in order if n in pw.index][:MAX_DRAWN]
    m = pw.loc[names, names].to_numpy(float)
    k = len(names)
    size = 2.2 + 0.32 * k
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_yticklabels(names, fontsize=8)
    if k <= 15:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(m[i, j] - 0.5) > 0.35 else "black")  # fmt: skip
    ax.set_xlabel("column model")
    ax.set_ylabel("row model")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="P(row beats column)")
    fig.subplots_adjust(left=0.3, bottom=0.34, right=0.88, top=0.97)
    return fig


def _differences(result, metric: str, order: list[str], n: int = 15):
    """The perturbations on which the two best models differ most (raw point estimates:
    comparable across perturbations, where a calibrated value is scaled by each
    perturbation's own baselines)."""
    if len(order) < 2:
        return "", None
    a, b = order[0], order[1]
    t = result.table[result.table["metric"] == metric]
    keys = ["perturbation"] + (["covariate"] if "covariate" in t.columns else [])
    wide = t[t["model"].isin([a, b])].pivot_table(index=keys, columns="model", values="value")
    if a not in wide or b not in wide:
        return "", None
    wide = wide[[a, b]].dropna()
    if wide.empty:
        return "", None
    wide["difference"] = wide[a] - wide[b]
    top = wide.reindex(wide["difference"].abs().sort_values(ascending=False).index).head(n)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    ax.plot(wide[b], wide[a], "o", color="#999", ms=3, alpha=0.6, label="perturbation")
    ax.plot(top[b], top[a], "o", color="#d62728", ms=5, label=f"{len(top)} largest differences")
    lo = float(np.nanmin(wide[[a, b]].to_numpy()))
    hi = float(np.nanmax(wide[[a, b]].to_numpy()))
    ax.plot([lo, hi], [lo, hi], color="#444", lw=0.8)
    ax.set_xlabel(f"{b}: {label(metric)}")
    ax.set_ylabel(f"{a}: {label(metric)}")
    ax.legend(fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.16, bottom=0.12, right=0.97, top=0.97)
    tab = top.reset_index()
    return html_table(tab, cls="small"), fig


def build_sweep_report(
    result,
    *,
    metric: str = "r2w_delta",
    calibrated: bool = True,
    aggregate: str = "mean",
    title: str = "vcjax sweep report",
    meta: dict[str, Any] | None = None,
) -> str:
    """The sweep report as one self-contained HTML string.

    Args:
      result: a :class:`vcjax.SweepResult`.
      metric, calibrated, aggregate: the leaderboard's ranking (as
        :meth:`~vcjax.SweepResult.leaderboard`).
      title: page title.
      meta: extra run information shown at the top (truth file, command…).
    """
    lb = result.leaderboard(metric, calibrated=calibrated, aggregate=aggregate, baselines=True)
    name = ("calibrated " if calibrated else "") + label(metric)
    n_boot = int(result.info.get("n_boot", 0))
    resample = result.info.get("resample", "cells")
    order = [str(n) for n in lb.index if not str(n).startswith("[")]
    shown = lb.reset_index().rename(columns={"index": "model"})
    is_model = ~shown["model"].astype(str).str.startswith("[")
    ranked = is_model & shown["rank"].notna()  # a model with an undefined value has no rank
    shown["rank"] = [str(int(r)) if m else "" for r, m in zip(shown["rank"], ranked)]
    shown["rank interval"] = [
        f"{int(a)}–{int(b)}" if m else ""
        for a, b, m in zip(shown["rank_low"], shown["rank_high"], ranked)
    ]
    shown["p_best"] = [f"{p:.3f}" if m else "" for p, m in zip(shown["p_best"], ranked)]
    shown["differs from best"] = shown["differs_from_best"].map({True: "yes", False: "no"})
    shown["differs from best"] = shown["differs from best"].fillna("")
    shown = shown[["model", "rank", "value", "ci_low", "ci_high", "rank interval", "p_best",
                   "differs from best"]]  # fmt: skip
    meaning = {
        "cells": "cells resampled within every condition-half (the truth re-derived, DEG "
        "weights refitted, per resample): how much each number would move with another draw "
        "of the same cell populations, for these perturbations",
        "perturbations": "perturbations resampled with replacement: how much an aggregate "
        "would move had another set of perturbations been screened",
        "both": "cells and perturbations resampled together",
    }[resample]
    sections = [
        '<section id="leaderboard"><h2>Leaderboard</h2>',
        _verdict(lb, metric_label=name, n_boot=n_boot),
        f'<p class="meta">{aggregate.capitalize()} of {html.escape(name)} over perturbations. '
        f"Intervals ({100 * float(result.info.get('ci', 0.95)):.0f} %) and rank intervals from "
        f"{n_boot} paired resamples — {html.escape(meaning)}; every model and baseline saw the "
        "same resamples. p_best: share of resamples in which the model is best (ties shared). "
        "Baselines in brackets.</p>",
        html_table(shown, max_rows=60),
        fig_to_img(_forest(lb, metric_label=name), "leaderboard forest plot"),
        "</section>",
    ]
    if len(order) >= 2:
        pw = result.pairwise(metric, calibrated=calibrated, aggregate=aggregate)
        sections += [
            '<section id="pairwise"><h2>Win probabilities</h2>',
            "<p>P(row model beats column model) on the same resamples (ties count half)"
            + (f"; the best {MAX_DRAWN} models" if len(order) > MAX_DRAWN else "")
            + ".</p>",
            fig_to_img(_heatmap(pw, order), "win-probability heatmap"),
            "</section>",
        ]
        tab, fig = _differences(result, metric, order)
        if fig is not None:
            sections += [
                '<section id="differences"><h2>Where the top two differ</h2>',
                f"<p>Per perturbation, {html.escape(label(metric))} (raw, not calibrated) of "
                f"{html.escape(order[0])} against {html.escape(order[1])} (point estimates); "
                "the largest differences in red and listed below.</p>",
                fig_to_img(fig, "top two models per perturbation"),
                tab,
                "</section>",
            ]
    if result.errors:
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
            for k, v in result.errors.items()
        )
        sections.append(
            '<section id="errors"><h2>Models left out</h2><table><thead><tr><th>model</th>'
            f"<th>error</th></tr></thead><tbody>{rows}</tbody></table></section>"
        )
    info = {
        "models": len(order),
        "perturbations": int(next(iter(result.point_values.values())).shape[1])
        if result.point_values
        else 0,
    }
    for k in ("n_boot", "ci", "seed", "resample", "reference", "normalization", "backend"):
        if k in result.info:
            info[k] = result.info[k]
    info.update(meta or {})
    info.setdefault("created", _dt.datetime.now().isoformat(timespec="seconds"))
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(fmt(v) if isinstance(v, float) else str(v))}</td></tr>"
        for k, v in info.items()
    )
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{body}"
        f'<h2>Run</h2><table class="meta">{rows}</table>'
        '<p class="meta">Generated by vcjax. Metric definitions: docs/metrics.md; '
        "calibration: 0 = best negative/null baseline, 1 = technical duplicate.</p>"
        "</body></html>\n"
    )


def write_sweep_report(result, path: str | os.PathLike, **kwargs) -> None:
    """:func:`build_sweep_report` written atomically to ``path``."""
    text = build_sweep_report(result, **kwargs)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
