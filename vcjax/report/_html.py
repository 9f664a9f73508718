"""A self-contained HTML report of an :func:`vcjax.evaluate` table.

One HTML file, no external assets: figures are embedded as base64 PNG, styles inline, no
scripts. Sections:

1. run information and the per (source, metric) summary;
2. the calibration card (can each metric tell the technical duplicate from trivial
   baselines on this data set? :func:`vcjax.calibration_card`);
3. per-perturbation calibrated scores of the model, sorted, with intervals when the table
   has them (0 = best negative/null baseline, 1 = technical duplicate);
4. model vs baselines, per metric (distribution over perturbations);
5. the control-bias view: Pearson(Δ vs control) against R²w(Δ vs u_ALL) per perturbation
   and source (docs/metrics.md §6): a trivial baseline can look good on the first and not on
   the second;
6. per-gene errors on the top DEGs of the worst and the best perturbation, from per-gene
   data (:func:`vcjax.pipeline.per_gene_data`, written by ``vcjax score --report`` as a side-car
   ``.genes.npz``, or computed from the h5ad files).

Example::

    table = vcjax.evaluate(truth, pred, key="condition", control="control")
    genes = vcjax.pipeline.per_gene_data(truth, pred, key="condition", control="control")
    vcjax.report.write_report(table, "report.html", per_gene=genes)
"""

from __future__ import annotations

import datetime as _dt
import html
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from vcjax._io import TABLE_FORMATS, atomic_path
from vcjax.metrics import METRICS, label
from vcjax.pipeline import NEGATIVES, calibration_card, wide
from vcjax.report._figures import plot_pathway_heatmap
from vcjax.report._page import CSS, fig_to_img, html_table, layout, pyplot

__all__ = [
    "SOURCE_ORDER",
    "load_per_gene",
    "build_report",
    "write_report",
    "sidecar_path",
]

#: display order of the sources (others follow in table order).
SOURCE_ORDER = (
    "model",
    "technical_duplicate",
    "interpolated_duplicate",
    "additive",
    "loo_mean",
    "dataset_mean",
    "control_mean",
    "null",
)
_COLORS = {
    "model": "#d62728",
    "technical_duplicate": "#2ca02c",
    "interpolated_duplicate": "#98df8a",
    "additive": "#9467bd",
    "loo_mean": "#8c564b",
    "dataset_mean": "#1f77b4",
    "control_mean": "#ff7f0e",
    "null": "#7f7f7f",
    "truth": "#000000",
}
_HEADLINE = ("r2w_delta", "wmse", "pearson_delta_degs", "pearson_delta", "r2_delta", "mse")


def _color(source: str, i: int = 0) -> str:
    if source in _COLORS:
        return _COLORS[source]
    cycle = ["#17becf", "#bcbd22", "#e377c2", "#aec7e8", "#ffbb78"]
    return cycle[i % len(cycle)]


def _higher_is_better(metric: str) -> bool:
    """Orientation from the registry (a metric it does not know is shown higher-is-better)."""
    spec = METRICS.get(metric)
    return True if spec is None else spec.higher_is_better


def sidecar_path(table_path: str | os.PathLike) -> str:
    """The per-gene side-car of a results table: ``results.parquet`` → ``results.genes.npz``."""
    p = os.fspath(table_path)
    low = p.lower()
    for ext in sorted(TABLE_FORMATS, key=len, reverse=True):
        if low.endswith(ext):
            return p[: -len(ext)] + ".genes.npz"
    return p + ".genes.npz"


# ---------------------------------------------------------------------------- per-gene data


def load_per_gene(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a per-gene side-car written by :func:`vcjax.pipeline.per_gene_data` + ``np.savez``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"per-gene file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read per-gene file {path}: {exc}") from exc
    need = {"perturbations", "genes", "truth_delta", "sources"}
    if not need <= set(data):
        raise ValueError(f"per-gene file {path} lacks {sorted(need - set(data))}")
    return data


# ---------------------------------------------------------------------------- helpers


def _units(table: pd.DataFrame) -> pd.Series:
    if "covariate" in table.columns:
        return table["covariate"].astype(str) + "/" + table["perturbation"].astype(str)
    return table["perturbation"].astype(str)


def _sources(table: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(table["source"].astype(str)))
    return [s for s in SOURCE_ORDER if s in present] + [s for s in present if s not in SOURCE_ORDER]


def _wide(table: pd.DataFrame, metric: str, column: str = "value") -> pd.DataFrame:
    return wide(table, metric, column, index=["unit"])


# ---------------------------------------------------------------------------- sections


def _section_summary(table: pd.DataFrame, sources: list[str]) -> str:
    metrics = list(dict.fromkeys(table["metric"]))
    med = table.groupby(["metric", "source"], sort=False)["value"].median().unstack("source")
    med = med.reindex(index=metrics, columns=sources)
    med.insert(0, "metric", [label(m) for m in med.index])
    out = [
        '<h2 id="summary">Summary: median over perturbations</h2>',
        "<p>Raw metric values; lower is better for MSE/WMSE/MAE, higher for the others.</p>",
        html_table(med.reset_index(drop=True)),
    ]
    if "model" in sources:
        cal = table[table["source"] == "model"].groupby("metric", sort=False)["calibrated"]
        calt = pd.DataFrame(
            {
                "metric": [label(m) for m in cal.median().index],
                "calibrated median": cal.median().to_numpy(),
                "calibrated mean": cal.mean().to_numpy(),
                "perturbations": cal.apply(lambda v: int(np.isfinite(v).sum())).to_numpy(),
            }
        )
        out += [
            "<h3>Model, calibrated (0 = best negative/null baseline, 1 = technical duplicate)</h3>",
            html_table(calt),
        ]
    return "\n".join(out)


def _section_card(table: pd.DataFrame) -> str:
    if "technical_duplicate" not in set(table["source"]):
        return (
            '<h2 id="card">Calibration card</h2><p class="note">The table has no technical '
            "duplicate: no calibration card.</p>"
        )
    try:
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                card = calibration_card(table.drop(columns=["unit"]))
    except Exception as exc:  # noqa: BLE001 - the rest of the report still renders
        return f'<h2 id="card">Calibration card</h2><p class="note">not available: {html.escape(str(exc))}</p>'
    card = card.copy()
    card["metric"] = [label(m) for m in card["metric"]]
    return "\n".join(
        [
            '<h2 id="card">Calibration card</h2>',
            "<p>Dynamic range fraction (DRF, CellSimBench) of the technical duplicate against the "
            "negative baseline, median/mean/IQR over perturbations; <em>discrimination</em>: the "
            "fraction of perturbations where the duplicate beats every negative/null baseline. "
            "A metric with a low DRF or discrimination cannot tell signal from a trivial "
            "prediction on this data set.</p>",
            html_table(card),
        ]
    )


def _interval_columns(table: pd.DataFrame) -> tuple[str, str, bool] | None:
    """(low, high, on_calibrated_scale) interval columns, if any."""
    for lo, hi in (
        ("calibrated_ci_low", "calibrated_ci_high"),
        ("calibrated_low", "calibrated_high"),
    ):
        if lo in table.columns and hi in table.columns:
            return lo, hi, True
    if "ci_low" in table.columns and "ci_high" in table.columns:
        return "ci_low", "ci_high", False
    return None


def _neg_and_span(table: pd.DataFrame, metric: str) -> tuple[pd.Series, pd.Series]:
    """Best negative/null value and (duplicate − it), per unit (the calibration's affine map)."""
    w = _wide(table, metric)
    hib = _higher_is_better(metric)
    negs = [w[s] for s in NEGATIVES if s in w]
    if not negs or "technical_duplicate" not in w:
        nan = pd.Series(np.nan, index=w.index)
        return nan, nan
    stack = pd.concat(negs, axis=1)
    neg = stack.max(axis=1, skipna=True) if hib else stack.min(axis=1, skipna=True)
    return neg, w["technical_duplicate"] - neg


def _section_per_perturbation(table: pd.DataFrame, sources: list[str], headline: list[str]) -> str:
    plt = pyplot()
    has_model = "model" in sources
    intervals = _interval_columns(table)
    metrics = headline[:4]
    if not metrics:
        return ""
    units = list(dict.fromkeys(table["unit"]))
    n_units = len(units)
    show_labels = n_units <= 80
    height = min(max(2.5, 0.17 * n_units + 1.2), 22)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), height), squeeze=False)
    note = ""
    for ax, metric in zip(axes[0], metrics):
        if has_model:
            sub = table[(table["metric"] == metric) & (table["source"] == "model")].set_index(
                "unit"
            )
            y = sub["calibrated"].astype(float)
            lo = hi = None
            if intervals is not None:
                a, b, on_cal = intervals
                if on_cal:
                    lo, hi = sub[a].astype(float), sub[b].astype(float)
                else:
                    neg, span = _neg_and_span(table, metric)
                    lo = (sub[a].astype(float) - neg.reindex(sub.index)) / span.reindex(sub.index)
                    hi = (sub[b].astype(float) - neg.reindex(sub.index)) / span.reindex(sub.index)
                    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
                    note = (
                        " Intervals: the bootstrap interval of the raw value mapped through each "
                        "perturbation's calibration (baselines held at their point values)."
                    )
            order = y.sort_values(na_position="first").index
            pos = np.arange(len(order))
            ax.axvline(0, color=_COLORS["dataset_mean"], lw=1, ls="--", label="best negative (0)")
            ax.axvline(
                1, color=_COLORS["technical_duplicate"], lw=1, ls="--", label="tech. duplicate (1)"
            )
            if lo is not None:
                lo_, hi_ = lo.reindex(order).to_numpy(float), hi.reindex(order).to_numpy(float)
                yy = y.reindex(order).to_numpy(float)
                ax.errorbar(
                    yy,
                    pos,
                    xerr=[np.clip(yy - lo_, 0, None), np.clip(hi_ - yy, 0, None)],
                    fmt="none",
                    ecolor="#999999",
                    elinewidth=1,
                    capsize=0,
                )
            ax.plot(
                y.reindex(order).to_numpy(float),
                pos,
                "o",
                color=_COLORS["model"],
                ms=4,
                label="model",
            )
            ax.set_xlabel(f"calibrated {label(metric)}")
            vals = y.to_numpy(float)
            finite = vals[np.isfinite(vals)]
            if finite.size:
                lo_lim = min(-0.2, np.percentile(finite, 2) - 0.1)
                hi_lim = max(1.2, np.percentile(finite, 98) + 0.1)
                ax.set_xlim(max(lo_lim, -3), min(hi_lim, 3))
        else:
            w = _wide(table, metric)
            order = (
                w["technical_duplicate"].sort_values(na_position="first").index
                if "technical_duplicate" in w
                else w.index
            )
            pos = np.arange(len(order))
            for i, s in enumerate(c for c in sources if c in w):
                ax.plot(
                    w[s].reindex(order).to_numpy(float), pos, "o", ms=3, color=_color(s, i), label=s
                )
            ax.set_xlabel(label(metric))
        ax.set_yticks(pos)
        ax.set_yticklabels(list(order) if show_labels else [""] * len(order), fontsize=7)
        ax.set_title(label(metric), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    layout(fig, left=1.4 if show_labels else 0.3, wspace=1.5 if show_labels else 0.3)
    img = fig_to_img(fig, "per-perturbation scores")
    if has_model:
        text = (
            "Each perturbation's calibrated score: 0 is the best of the negative/null baselines "
            "(control mean, dataset mean, null), 1 the technical duplicate; sorted, worst at "
            "the bottom. NaN (undefined) scores are not drawn."
        )
        text += " Intervals from the table's bootstrap." if intervals and intervals[2] else note
        if intervals is None:
            text += " No intervals in the table (run with --n-boot N for them)."
    else:
        text = (
            "No model in this table (baselines only): per-perturbation raw values of every "
            "baseline, sorted by the technical duplicate."
        )
    if not show_labels:
        text += f" ({n_units} perturbations: labels omitted.)"
    return f'<h2 id="perturbations">Per-perturbation scores</h2><p>{text}</p>{img}'


def _section_vs_baselines(table: pd.DataFrame, sources: list[str]) -> str:
    plt = pyplot()
    metrics = list(dict.fromkeys(table["metric"]))
    ncol = min(4, len(metrics))
    nrow = -(-len(metrics) // ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(4.0 * ncol, 0.35 * len(sources) * nrow + 1.4 * nrow), squeeze=False
    )
    for ax, metric in zip(axes.ravel(), metrics):
        w = _wide(table, metric)
        srcs = sources
        data = [w[s].to_numpy(float) if s in w else np.array([]) for s in srcs]
        data = [d[np.isfinite(d)] for d in data]
        pos = np.arange(len(srcs))[::-1]
        ok = [i for i, d in enumerate(data) if d.size]
        if ok:  # few artists per panel: one collection each for boxes, medians and points
            q = np.array([np.percentile(data[i], [25, 50, 75]) for i in ok])
            cols = [_color(srcs[i], i) for i in ok]
            ax.barh(
                pos[ok],
                q[:, 2] - q[:, 0],
                left=q[:, 0],
                height=0.6,
                color=cols,
                alpha=0.35,
                edgecolor=cols,
            )
            ax.scatter(q[:, 1], pos[ok], marker="|", s=120, c="black", linewidths=1.5, zorder=3)
            xs = np.concatenate([data[i] for i in ok])
            ys = np.concatenate(
                [pos[i] + (np.random.default_rng(i).random(data[i].size) - 0.5) * 0.3 for i in ok]
            )
            cs = sum(([_color(srcs[i], i)] * data[i].size for i in ok), [])
            ax.scatter(xs, ys, s=4, c=cs, alpha=0.8, linewidths=0, zorder=2)
        for i, d in enumerate(data):
            if not d.size:
                ax.text(
                    0.02,
                    pos[i],
                    "undefined",
                    va="center",
                    fontsize=7,
                    color="#888888",
                    transform=ax.get_yaxis_transform(),
                )
        ax.set_yticks(pos)
        ax.set_yticklabels(srcs if ax.get_subplotspec().is_first_col() else [], fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        arrow = "↑ better" if _higher_is_better(metric) else "↓ better"
        ax.set_title(f"{label(metric)} ({arrow})", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes.ravel()[len(metrics) :]:
        ax.axis("off")
    layout(fig, left=1.5, wspace=0.3, hspace=0.65, bottom=0.4)
    return (
        '<h2 id="baselines">Model vs baselines, per metric</h2><p>Distribution over '
        "perturbations of each source's raw value (bar: quartiles; black tick: median; dots: "
        "perturbations). "
        "A metric is informative on this data set when the technical duplicate clearly "
        f"separates from the dataset mean and control mean.</p>{fig_to_img(fig, 'model vs baselines')}"
    )


def _section_paired(comp: pd.DataFrame) -> str:
    """Paired model-vs-baseline bootstrap comparisons (``source = "model-vs-<b>"`` rows)."""
    if comp.empty:
        return ""
    rows = []
    for (metric, source), g in comp.groupby(["metric", "source"], sort=False):
        v = g["value"].to_numpy(float)
        lo = g["ci_low"].to_numpy(float) if "ci_low" in g else np.full(len(g), np.nan)
        hi = g["ci_high"].to_numpy(float) if "ci_high" in g else np.full(len(g), np.nan)
        win = g["win_rate"].to_numpy(float) if "win_rate" in g else np.full(len(g), np.nan)
        fin = np.isfinite(v)
        with np.errstate(all="ignore"):
            rows.append(
                {
                    "metric": label(metric),
                    "baseline": source.removeprefix("model-vs-"),
                    "median difference": np.nanmedian(v) if fin.any() else np.nan,
                    "model better (CI > 0)": f"{int(np.sum(lo > 0))}/{int(fin.sum())}",
                    "model worse (CI < 0)": f"{int(np.sum(hi < 0))}/{int(fin.sum())}",
                    "mean win rate": np.nanmean(win) if np.isfinite(win).any() else np.nan,
                }
            )
    return "\n".join(
        [
            '<h2 id="paired">Model vs each baseline, paired bootstrap</h2>',
            "<p>Per perturbation, the difference model − baseline oriented so that positive means the "
            "model is better (errors are negated), with its paired bootstrap interval; counted are "
            "the perturbations whose interval excludes 0. Win rate: the fraction of resamples in "
            "which the model is strictly better.</p>",
            html_table(pd.DataFrame(rows)),
        ]
    )


def _section_control_bias(
    table: pd.DataFrame, sources: list[str], per_gene: Mapping[str, np.ndarray] | None
) -> str:
    plt = pyplot()
    notes = []
    xs: dict[str, pd.Series] = {}
    metrics = set(table["metric"])
    if "pearson_delta_ctrl" in metrics:
        w = _wide(table, "pearson_delta_ctrl")
        xs = {s: w[s] for s in sources if s in w}
        xlabel = label("pearson_delta_ctrl")
    elif per_gene is not None and any(k.startswith("pearson_ctrl__") for k in per_gene):
        idx = pd.Index(np.asarray(per_gene["perturbations"], dtype=str))
        xs = {
            k.split("__", 1)[1]: pd.Series(np.asarray(v, float), index=idx)
            for k, v in per_gene.items()
            if k.startswith("pearson_ctrl__")
        }
        xlabel = label("pearson_delta_ctrl")
        notes.append(
            "The table has no control-referenced Pearson (pearson_delta_ctrl); it was taken "
            "from the per-gene data (all genes) for the sources listed there."
        )
    elif "pearson_delta" in metrics:
        w = _wide(table, "pearson_delta")
        xs = {s: w[s] for s in sources if s in w}
        xlabel = label("pearson_delta") + " vs u_ALL (no control-referenced Pearson available)"
        notes.append(
            "The table has no control-referenced Pearson (pearson_delta_ctrl) and no per-gene "
            "data were given: the x axis shows Pearson(Δ) against the table's own reference "
            "instead, which does not show the control bias. Re-run with the default metrics."
        )
    if "r2w_delta" in metrics:
        ymetric = "r2w_delta"
    elif "r2_delta" in metrics:
        ymetric = "r2_delta"
        notes.append(
            "The table has no R²w(Δ) (no DEG weights?): the y axis shows unweighted R²(Δ)."
        )
    else:
        ymetric = None
    if not xs or ymetric is None:
        return (
            '<h2 id="control-bias">Control bias</h2><p class="note">Not available: the table has '
            f"neither Pearson(Δ vs control) nor R²(Δ) metrics ({', '.join(sorted(metrics))}). "
            + " ".join(notes)
            + "</p>"
        )
    wy = _wide(table, ymetric)
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    rows = []
    for i, s in enumerate(src for src in sources if src in xs and src in wy):
        x = xs[s].reindex(wy.index).to_numpy(float)
        y = wy[s].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        rows.append(
            {
                "source": s,
                "median x": np.nanmedian(x) if np.isfinite(x).any() else np.nan,
                "median y": np.nanmedian(y) if np.isfinite(y).any() else np.nan,
                "points drawn": int(ok.sum()),
            }
        )
        if ok.any():
            ax.scatter(
                x[ok],
                np.clip(y[ok], -2, None),
                s=14 if s != "model" else 22,
                alpha=0.75,
                color=_color(s, i),
                label=s,
                edgecolors="none",
            )
    ax.axhline(0, color="#bbbbbb", lw=0.8)
    ax.set_xlabel(xlabel)
    ref = str(table.attrs.get("reference", "perturbed"))
    ref = {"perturbed": "u_ALL", "control": "control"}.get(ref, ref)
    ax.set_ylabel(f"{label(ymetric)} vs {ref} (clipped at −2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    layout(fig, left=0.8, bottom=0.6, top=0.2)
    summ = pd.DataFrame(rows).rename(
        columns={
            "median x": f"median {xlabel.split(' (')[0]}",
            "median y": f"median {label(ymetric)}",
        }
    )
    text = (
        "Each dot is a perturbation scored by one source. Deltas against the control mean share "
        "the systematic shift of all perturbed cells away from control, so Pearson(Δ vs control) "
        "rewards predictions that only reproduce that shift (e.g. the dataset mean, which "
        "carries no perturbation-specific information). R²w(Δ) against u_ALL, weighted by DEG "
        "strength, does not: a prediction that only reproduces the shift lands bottom-right "
        "(high on x, near or below 0 on y), the technical duplicate top-right. "
        "Pearson is undefined for the control mean against control (constant Δ̂ = 0)."
    )
    return "\n".join(
        [
            '<h2 id="control-bias">Control bias</h2>',
            f"<p>{text}</p>",
            "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes),
            fig_to_img(fig, "control bias"),
            html_table(summ),
        ]
    )


def _pick_worst_best(
    table: pd.DataFrame, headline: list[str], perts: Sequence[str]
) -> tuple[str, list[tuple[str, str]]]:
    """(explanation, [(label, perturbation)]) for the worst and best perturbation."""
    metric = headline[0] if headline else None
    if metric is None:
        return "", []
    if "model" in set(table["source"]):
        sub = table[(table["metric"] == metric) & (table["source"] == "model")]
        col, who = "calibrated", "the model's calibrated"
    else:
        sub = table[(table["metric"] == metric) & (table["source"] == "technical_duplicate")]
        col, who = "value", "the technical duplicate's"
    s = sub.set_index("perturbation")[col].astype(float)
    s = s[s.index.isin(list(perts))].dropna()
    if col == "value" and not _higher_is_better(metric):
        s = -s
    if s.empty:
        return "", []
    worst, best = s.idxmin(), s.idxmax()
    why = f"by {who} {label(metric)}"
    picks = [("worst", worst)] + ([("best", best)] if best != worst else [])
    return why, picks


def _section_per_gene(
    table: pd.DataFrame,
    headline: list[str],
    per_gene: Mapping[str, np.ndarray] | None,
    per_gene_note: str | None,
) -> str:
    head = '<h2 id="genes">Per-gene errors on the top DEGs</h2>'
    if per_gene is None:
        msg = per_gene_note or (
            "No per-gene data: pass the side-car written by <code>vcjax score --report</code> "
            "(<code>--genes results.genes.npz</code>) or the h5ad files (<code>--truth</code>, "
            "<code>--pred</code>, <code>--key</code>, <code>--control</code>) to "
            "<code>vcjax report</code>."
        )
        return f'{head}<p class="note">{msg}</p>'
    plt = pyplot()
    perts = [str(p) for p in per_gene["perturbations"]]
    why, picks = _pick_worst_best(table, headline, perts)
    if not picks:
        return f'{head}<p class="note">No perturbation with a defined score to pick.</p>'
    sources = [str(s) for s in per_gene["sources"]]
    parts = [
        head,
        f"<p>Worst and best perturbation {html.escape(why)}; the genes with the largest "
        "DEG weight (filled markers: significant DEGs). Truth Δ in black, each source's "
        f"predicted Δ in colour (Δ against {html.escape(str(per_gene.get('reference', 'the reference')))}).</p>",
    ]
    for which, pert in picks:
        i = perts.index(pert)
        genes = [str(g) for g in per_gene["genes"][i]]
        truth = np.asarray(per_gene["truth_delta"][i], float)
        deg = (
            np.asarray(per_gene["deg"][i], bool)
            if "deg" in per_gene
            else np.zeros(len(genes), bool)
        )
        weight = (
            np.asarray(per_gene["weight"][i], float)
            if "weight" in per_gene
            else np.full(len(genes), np.nan)
        )
        x = np.arange(len(genes))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.38 * len(genes) + 2), 3.6))
        for j, s in enumerate(sources):
            d = np.asarray(per_gene[f"delta__{s}"][i], float)
            off = (j - (len(sources) - 1) / 2) * 0.12
            ax.plot(
                x + off,
                d,
                "o",
                ms=5 if s == "model" else 4,
                color=_color(s, j),
                label=s,
                alpha=0.85,
            )
        ax.plot(x[deg], truth[deg], "s", color="black", ms=6, label="truth (DEG)")
        ax.plot(x[~deg], truth[~deg], "s", mfc="white", mec="black", ms=6, label="truth")
        ax.axhline(0, color="#bbbbbb", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(genes, rotation=70, fontsize=7)
        ax.set_ylabel("Δ")
        ax.set_title(f"{which}: {pert}", fontsize=10)
        ax.legend(fontsize=7, ncol=3, loc="best")
        ax.grid(axis="y", alpha=0.3)
        layout(fig, left=0.7, bottom=1.3, top=0.35)
        parts.append(f"<h3>{html.escape(which)}: {html.escape(pert)}</h3>")
        parts.append(fig_to_img(fig, f"per-gene {which}"))
        tab = pd.DataFrame(
            {"gene": genes, "weight": weight, "DEG": np.where(deg, "yes", ""), "truth Δ": truth}
        )
        for s in sources:
            tab[f"{s} error"] = np.asarray(per_gene[f"delta__{s}"][i], float) - truth
        parts.append(html_table(tab, cls="small"))
    return "\n".join(parts)


def build_report(
    table: pd.DataFrame,
    *,
    per_gene: Mapping[str, np.ndarray] | None = None,
    per_gene_note: str | None = None,
    title: str = "vcjax evaluation report",
    metrics: Sequence[str] | None = None,
    pathways: pd.DataFrame | None = None,
) -> str:
    """The report as one self-contained HTML string.

    Args:
      table: an :func:`vcjax.evaluate` table (in memory, or read back from CSV or
        parquet): columns ``perturbation, metric, source, value, calibrated`` and optionally
        ``ci_low, ci_high``, ``covariate``, ``note``.
      per_gene: :func:`vcjax.pipeline.per_gene_data` output (or :func:`load_per_gene`), for the per-gene
        view; None leaves that section with a note.
      per_gene_note: text shown in place of the per-gene view when ``per_gene`` is None.
      title: page title.
      metrics: headline metrics for the per-perturbation view (default: up to four of
        R²w(Δ), WMSE, Pearson(Δ) on DEGs, Pearson(Δ), R²(Δ), MSE).
      pathways: a :func:`vcjax.confidence` table at ``level="pathway"``, shown as a
        per-pathway confidence heatmap.

    Returns:
      The HTML document.
    """
    need = {"perturbation", "metric", "source", "value"}
    missing = need - set(table.columns)
    if missing:
        raise ValueError(f"not an evaluate table: missing column(s) {', '.join(sorted(missing))}")
    if table.empty:
        raise ValueError("the table is empty")
    table = table.copy()
    table["source"] = table["source"].astype(str)
    table["metric"] = table["metric"].astype(str)
    table["value"] = pd.to_numeric(table["value"], errors="coerce")
    if "calibrated" not in table.columns:
        table["calibrated"] = np.nan
    table["calibrated"] = pd.to_numeric(table["calibrated"], errors="coerce")
    table["unit"] = _units(table)
    attrs = dict(table.attrs)
    paired = table["source"].str.startswith("model-vs-")
    comparisons = table[paired]
    table = table[~paired]
    table.attrs = attrs
    sources = _sources(table)
    present = list(dict.fromkeys(table["metric"]))
    headline = [m for m in (metrics or _HEADLINE) if m in present] or present[:4]

    n_p = table["unit"].nunique()
    info = {
        "perturbations": n_p,
        "metrics": ", ".join(present),
        "sources": ", ".join(sources),
    }
    for k in (
        "backend",
        "reference",
        "normalization",
        "key",
        "control",
        "truth",
        "pred",
        "n_boot",
        "ci",
        "seed",
        "vcjax_version",
        "created",
    ):
        if k in attrs and attrs[k] not in (None, ""):
            info[k] = attrs[k]
    info.setdefault("created", _dt.datetime.now().isoformat(timespec="seconds"))
    meta = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in info.items()
    )
    sections = [
        _section_summary(table, sources),
        _section_card(table),
        _section_per_perturbation(table, sources, headline),
        _section_vs_baselines(table, sources),
        _section_paired(comparisons),
        _section_control_bias(table, sources, per_gene),
        _section_per_gene(table, headline, per_gene, per_gene_note),
        _section_pathways(pathways),
    ]
    anchors = [
        ("summary", "summary"),
        ("card", "calibration card"),
        ("perturbations", "per perturbation"),
        ("baselines", "vs baselines"),
        ("paired", "paired bootstrap"),
        ("control-bias", "control bias"),
        ("genes", "per gene"),
        ("pathways", "pathways"),
    ]
    body = "\n".join(sections)
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in anchors if f'id="{a}"' in body)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><nav>{nav}</nav>"
        f'<table class="meta">{meta}</table>'
        + body
        + '<p class="meta">Generated by vcjax. Metric definitions: docs/metrics.md (the '
        "Diversity-by-Design code path); calibration: 0 = best negative/null baseline, "
        "1 = technical duplicate.</p>"
        "</body></html>\n"
    )


def _section_pathways(pathways: pd.DataFrame | None) -> str:
    """Per-pathway confidence heatmap (gene sets × perturbations), when given."""
    if pathways is None or pathways.empty:
        return ""
    fig = plot_pathway_heatmap(pathways)
    return (
        '<section id="pathways"><h2>Per-pathway confidence</h2>'
        "<p>Mean per-gene confidence (0–100; 100 = indistinguishable from a technical "
        "replicate) over each gene set's genes present in the data; labels give present/total "
        "genes.</p>" + fig_to_img(fig, "per-pathway confidence heatmap") + "</section>"
    )


def write_report(table: pd.DataFrame, path: str | os.PathLike, **kwargs) -> None:
    """:func:`build_report` written atomically to ``path`` (keyword arguments passed on)."""
    text = build_report(table, **kwargs)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
