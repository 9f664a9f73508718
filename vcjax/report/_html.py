"""A self-contained HTML report of an :func:`vcjax.evaluate` table.

One HTML file, no external assets: figures are embedded as base64 PNG, styles inline, no
scripts; the layout has no sideways scroll down to 800 px (tables wrap, long names are cut
with an ellipsis and keep the full name on hover, figures scale to the column). Sections:

0. the verdict (:func:`verdict`): is the model better than each baseline on the headline
   metric (calibrated R²w(Δ)), by how much (median paired difference), how sure (its
   interval over perturbations and cells, from the ``model-vs-<baseline>`` rows, and the
   win rate); without a bootstrap it says so;
1. the per (source, metric) summary;
2. the calibration card (can each metric tell the technical duplicate from trivial
   baselines on this data set? :func:`vcjax.calibration_card`);
3. per-perturbation calibrated scores of the model, sorted, with intervals when the table
   has them (0 = best negative/null baseline, 1 = technical duplicate), and their table;
4. model vs baselines, per metric (distribution over perturbations);
5. the paired comparisons, one row per baseline, "median [interval]" per headline metric;
6. the control-bias view: Pearson(Δ vs control) against R²w(Δ vs u_ALL) per perturbation
   and source (docs/metrics.md §6): a trivial baseline can look good on the first and not on
   the second;
7. per-gene errors on the top DEGs of the worst and the best perturbation, from per-gene
   data (:func:`vcjax.pipeline.per_gene_data`, written by ``vcjax score --report`` as a side-car
   ``.genes.npz``, or computed from the h5ad files);
8. a glossary (baselines, u_ALL, Δ, calibrated, DRF, the metrics) and, collapsed, the run
   information.

Points beyond a figure's axis are drawn as triangles on its edge and counted (legend,
caption and the ``<figure data-off-axis="n">`` attribute).

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
from vcjax.pipeline import BASELINE_ROLES, NEGATIVES, calibration_card, wide
from vcjax.report._figures import plot_pathway_heatmap
from vcjax.report._page import (
    CSS,
    Raw,
    fig_to_img,
    fmt,
    html_table,
    layout,
    name_cell,
    pyplot,
    short,
)
from vcjax.stats import paired_summary

__all__ = [
    "GLOSSARY",
    "SOURCE_ORDER",
    "calibrated_limits",
    "fence_limits",
    "verdict",
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


#: plain-language definitions (docs/metrics.md §2, §4, §7) of the report's terms.
GLOSSARY: dict[str, str] = {
    "model": "the predictions being evaluated.",
    "technical_duplicate": (
        "the perturbation's own half-1 pseudobulk (its cells are split in two halves; the truth "
        "is half 2). A second measurement of the same perturbation: the positive baseline and "
        "the noise ceiling, calibrated to 1."
    ),
    "interpolated_duplicate": (
        "per gene α·duplicate + (1 − α)·loo_mean with α = 1 − the gene's adjusted DEG p-value "
        "(NaN → α = 0): the technical duplicate on significant genes, the leave-one-out mean "
        "elsewhere. Positive baseline (CellSimBench's interpolated control)."
    ),
    "additive": (
        "for a combination A+B: u + (μ_A − u) + (μ_B − u) from half-1 means, u = u_ALL (half "
        "1); undefined for single perturbations or when a part is not in the screen. The "
        "reference for combinations."
    ),
    "loo_mean": (
        "leave-one-out mean: the mean of the other perturbations' pseudobulks (all cells). "
        "Negative baseline: what an average perturbation looks like, with no information "
        "about this one."
    ),
    "dataset_mean": (
        "u_ALL over all cells: the mean of every condition's pseudobulk, control included. "
        "Negative baseline: the same prediction for every perturbation."
    ),
    "control_mean": "the mean of all control cells (u_NTC): predicts no effect. Negative baseline.",
    "null": (
        "another perturbation's half-1 pseudobulk (a seeded derangement): a real profile of "
        "the wrong perturbation, the chance level for perturbation specificity."
    ),
    "u_ALL": (
        "the mean of the per-condition pseudobulks, control counted as one condition; the "
        "half-1 u_ALL is the default Δ reference, so Δ = expression − u_ALL is the change "
        "relative to the average perturbation."
    ),
    "Δ": (
        "a pseudobulk minus the Δ reference (u_ALL of half 1 by default), in the table's "
        "expression units."
    ),
    "calibrated": (
        "(m − m_neg)/(m_dup − m_neg) per metric and perturbation: 0 at the best of control_mean, "
        "dataset_mean and null, 1 at the technical duplicate, higher is better for every metric. "
        "Values above 1 mean the prediction is closer to the truth than a second measurement "
        "of the same cells: the duplicate is itself noisy (it has half the cells), so a good, "
        "smooth prediction can beat it, especially on perturbations with few cells."
    ),
    "DRF": (
        "dynamic range fraction (CellSimBench): how much of the metric's range separates the "
        "technical duplicate from the negative baseline, (m_pos − m_neg)/((1 − m_neg) + 1e-6) "
        "for higher-is-better metrics, (m_neg − m_pos)/(m_neg + 1e-6) for errors, clipped to "
        "[−1, 1]. Near 0: the metric cannot tell signal from a trivial prediction."
    ),
    "win rate": (
        "the fraction of bootstrap resamples in which the model is strictly better than the "
        "baseline on that perturbation."
    ),
}

#: what the default metrics measure (docs/metrics.md §5, §6).
_METRIC_WORDS: dict[str, str] = {
    "mse": "mean squared error of the raw pseudobulks over all genes; dominated by the many "
    "genes that do not change.",
    "wmse": "squared error weighted by the perturbation's DEG weights: closeness on its own DEGs.",
    "mae": "mean absolute error of the raw pseudobulks.",
    "pearson_delta": "correlation over genes of predicted and true Δ (vs u_ALL): the pattern "
    "of change relative to the average perturbation.",
    "pearson_delta_degs": "Pearson(Δ) on the significant DEGs only.",
    "pearson_delta_topk": "Pearson(Δ) on the top-k DEGs by |t|.",
    "r2_delta": "R² of the true Δ by the predicted Δ: magnitude and pattern of the change.",
    "r2w_delta": "R²(Δ) weighted by DEG strength: magnitude and pattern on the DEGs (the "
    "headline metric).",
    "cosine_delta": "cosine of predicted and true Δ: direction, ignoring scale.",
    "pearson_delta_ctrl": "Pearson(Δ) against the control mean: the classic, control-biased "
    "version (rewards reproducing the shift all perturbations share).",
    "r2_delta_ctrl": "R²(Δ) against the control mean.",
}

#: baselines that estimate the noise ceiling (shown as references, not as rivals to beat).
_CEILINGS = tuple(s for s, r in BASELINE_ROLES.items() if r == "positive")


def _ci_level(attrs: Mapping) -> float:
    boot = attrs.get("bootstrap")
    if isinstance(boot, Mapping) and boot.get("ci") is not None:
        return float(boot["ci"])
    try:
        return float(attrs.get("ci", 0.95) or 0.95)
    except (TypeError, ValueError):
        return 0.95


def _interval_text(med: float, lo: float, hi: float) -> str:
    if not np.isfinite(lo) or not np.isfinite(hi):
        return fmt(med)
    return f'{fmt(med)} <span class="iv">[{fmt(lo)}, {fmt(hi)}]</span>'


def _summarise_rows(g: pd.DataFrame, ci: float) -> dict[str, float]:
    """:func:`paired_summary` of a set of ``model-vs-<b>`` rows."""

    def col(c: str) -> np.ndarray | None:
        return g[c].to_numpy(float) if c in g else None

    return paired_summary(
        g["value"].to_numpy(float), col("ci_low"), col("ci_high"), col("win_rate"), ci=ci
    )


def _differences(table: pd.DataFrame, comparisons: pd.DataFrame, metric: str) -> dict[str, dict]:
    """Per baseline: the paired-difference summary (:func:`paired_summary`) on ``metric``.

    From the ``model-vs-<b>`` rows when the table has them (with intervals), else from the
    point values, ``s·(m_model − m_b)`` (``s = −1`` for errors: positive = model better).
    """
    ci = _ci_level(table.attrs)
    out: dict[str, dict] = {}
    comp = comparisons[comparisons["metric"] == metric] if not comparisons.empty else comparisons
    if not comp.empty:
        for source, g in comp.groupby("source", sort=False):
            r = _summarise_rows(g, ci)
            out[str(source).removeprefix("model-vs-")] = r
        return out
    w = _wide(table, metric)
    if "model" not in w:
        return out
    sgn = 1.0 if _higher_is_better(metric) else -1.0
    for s in w.columns:
        if s != "model":
            out[str(s)] = paired_summary(sgn * (w["model"] - w[s]).to_numpy(float), ci=ci)
    return out


def verdict(table: pd.DataFrame, *, metric: str | None = None) -> dict:
    """Is the model better than the baselines, by how much, how sure (the report's verdict).

    Args:
      table: an :func:`vcjax.evaluate` table, with or without ``model-vs-<b>`` rows.
      metric: the headline metric (default R²w(Δ), else the first of the report's
        headline metrics present).

    Returns:
      dict with ``metric``, ``has_intervals``, ``calibrated_median`` (the model's),
      ``rows`` (per source: ``median calibrated`` and ``median``, the difference summary of
      :func:`paired_summary` and ``status``: ``"better"``/``"worse"`` when the interval of
      the median difference excludes 0, ``"indistinguishable"`` when it contains it,
      ``"point"`` without intervals), ``best`` (the baseline, noise ceilings excluded, with
      the highest median calibrated score) and ``text`` (the sentence, plain text).
    """
    t = table.copy()
    t["source"] = t["source"].astype(str)
    if "unit" not in t.columns:
        t["unit"] = _units(t)
    if "calibrated" not in t.columns:
        t["calibrated"] = np.nan
    paired = t["source"].str.startswith("model-vs-")
    comp, t = t[paired], t[~paired]
    t.attrs = dict(table.attrs)
    present = list(dict.fromkeys(t["metric"]))
    if metric is None:
        metric = next((m for m in _HEADLINE if m in present), present[0] if present else None)
    ml = label(metric) if metric else "?"
    res: dict = dict(metric=metric, has_intervals=False, calibrated_median=np.nan, rows={})
    res["best"], res["text"], res["headline"], res["detail"] = None, "", "", ""
    sources = _sources(t)
    if metric is None or "model" not in sources:
        res["text"] = res["headline"] = (
            "No model in this table (baselines only): there is nothing to judge."
        )
        return res
    sub = t[t["metric"] == metric]
    cal = sub.groupby("source")["calibrated"].median()
    raw = sub.groupby("source")["value"].median()
    diffs = _differences(t, comp, metric)
    res["has_intervals"] = any(np.isfinite(d["low"]) for d in diffs.values())
    res["calibrated_median"] = float(cal.get("model", np.nan))
    for s in sources:
        d = diffs.get(s, paired_summary(np.array([])))
        if s == "model":
            status = ""
        elif np.isfinite(d["low"]) and d["low"] > 0:
            status = "better"
        elif np.isfinite(d["high"]) and d["high"] < 0:
            status = "worse"
        elif np.isfinite(d["low"]):
            status = "indistinguishable"
        elif np.isfinite(d["median"]):
            status = "point"
        else:
            status = "undefined"
        res["rows"][s] = dict(
            d, status=status, calibrated=float(cal.get(s, np.nan)), value=float(raw.get(s, np.nan))
        )
    rivals = [s for s in sources if s != "model" and s not in _CEILINGS]
    rivals = [s for s in rivals if res["rows"][s]["status"] != "undefined"]
    if not rivals:
        res["text"] = res["headline"] = f"No baseline has a defined {ml} to compare the model with."
        return res
    best = max(rivals, key=lambda s: np.nan_to_num(res["rows"][s]["calibrated"], nan=-np.inf))
    res["best"] = best
    pct = f"{100 * _ci_level(table.attrs):.0f} %"
    by = {k: [s for s in rivals if res["rows"][s]["status"] == k] for k in
          ("better", "worse", "indistinguishable", "point")}  # fmt: skip
    names = lambda xs: ", ".join(xs)  # noqa: E731
    if not res["has_intervals"]:
        above = [s for s in rivals if res["rows"][s]["median"] > 0]
        text = (
            f"No bootstrap was run, so there are no intervals and how sure any comparison is "
            f"cannot be said (score with --n-boot N, e.g. 1000). On the point estimates the "
            f"model's median paired difference in {ml} is positive against "
            + (f"{len(above)} of {len(rivals)} baselines" if above else "no baseline")
            + (f" ({names(above)})" if above and len(above) < len(rivals) else "")
            + "."
        )
    elif len(by["better"]) == len(rivals):
        text = (
            f"The model is better than every baseline ({names(rivals)}) on {ml}: the {pct} "
            "interval of each paired difference excludes 0."
        )
    else:
        parts = []
        if by["better"]:
            parts.append(
                f"better than {names(by['better'])} (the {pct} interval of the paired "
                "difference is above 0)"
            )
        if by["indistinguishable"]:
            parts.append(
                f"not distinguishable from {names(by['indistinguishable'])} (the interval "
                "contains 0)"
            )
        if by["worse"]:
            parts.append(f"worse than {names(by['worse'])} (the interval is below 0)")
        text = f"On {ml} the model is " + "; ".join(parts) + "."
    r = res["rows"][best]
    res["headline"] = text
    text = (
        f"Its median calibrated {ml} is {fmt(res['calibrated_median'])}: "
        f"{_calibrated_words(res['calibrated_median'])}; against the strongest baseline, {best}, the "
        f"median paired difference is {fmt(r['median'])}"
    )
    if np.isfinite(r["low"]):
        text += f" [{fmt(r['low'])}, {fmt(r['high'])}]"
    text += f" in {ml} over {r['n']} perturbations (positive = model better)."
    res["detail"] = text
    res["text"] = res["headline"] + " " + text
    return res


def _calibrated_words(c: float) -> str:
    """What a calibrated score means, in words (0 = best trivial baseline, 1 = duplicate)."""
    if not np.isfinite(c):
        return "undefined"
    if c > 1.0:
        return "closer to the truth than the technical duplicate (1)"
    if c >= 0.05:
        return (
            f"{100 * c:.0f} % of the way from the best trivial baseline (0) to the technical "
            "duplicate (1)"
        )
    if c > -0.05:
        return "no better than the best trivial baseline (0; the technical duplicate is 1)"
    return "below the best trivial baseline (0; the technical duplicate is 1)"


def _section_verdict(table: pd.DataFrame, comparisons: pd.DataFrame, metric: str | None) -> str:
    t = pd.concat([table, comparisons], ignore_index=True) if not comparisons.empty else table
    t.attrs = dict(table.attrs)
    v = verdict(t, metric=metric)
    head = '<section id="verdict"><h2>Verdict</h2>'
    if v["metric"] is None or not v["rows"]:
        return f'{head}<p class="verdict">{html.escape(v["text"])}</p></section>'
    ml = label(v["metric"])
    pct = f"{100 * _ci_level(table.attrs):.0f} %"
    rows = []
    order = ["model"] + sorted(
        (s for s in v["rows"] if s != "model"),
        key=lambda s: (s in _CEILINGS, -np.nan_to_num(v["rows"][s]["calibrated"], nan=-np.inf)),
    )
    for s in order:
        r = v["rows"][s]
        role = " (noise ceiling)" if s in _CEILINGS else ""
        mark = {"better": " ✔ model better", "worse": " ✘ model worse",
                "indistinguishable": " ≈ not distinguishable"}.get(r["status"], "")  # fmt: skip
        bw = (
            f"{r['better']} / {r['worse']} of {r['n']}"
            if s != "model" and np.isfinite(r["better"])
            else "—"
        )
        rows.append(
            {
                "source": Raw(name_cell(s) + (f"<small>{role}</small>" if role else "")),
                f"median calibrated {ml}": r["calibrated"],
                f"median {ml}": r["value"],
                f"model − source, median [{pct} interval]": Raw(
                    "—"
                    if s == "model"
                    else _interval_text(r["median"], r["low"], r["high"])
                    + (f"<small>{mark}</small>" if mark else "")
                ),
                "perturbations model better / worse": bw,
                "mean win rate": r["win_rate"] if s != "model" else np.nan,
            }
        )
    how = (
        f"Paired difference: per perturbation, the model's {ml} minus the source's (oriented so "
        "that positive means the model is better), median over perturbations; its interval "
        "resamples the perturbations and, within each, draws from that perturbation's "
        "cell-bootstrap interval (the <code>model-vs-&lt;baseline&gt;</code> rows), so it "
        "covers both another draw of cells and of perturbations. Better / worse: perturbations "
        "whose own interval excludes 0. Noise ceilings are shown for scale, not as rivals."
        if v["has_intervals"]
        else "No bootstrap was run: point estimates only (no intervals, no win rates)."
    )
    above1 = ""
    if np.isfinite(v["calibrated_median"]) and v["calibrated_median"] > 1:
        above1 = (
            " A calibrated score above 1 means the model is closer to the truth than the "
            "technical duplicate, which is itself a noisy measurement (half the cells)."
        )
    return "\n".join(
        [
            head,
            f'<p class="verdict" data-status="{html.escape(_status_word(v))}">'
            f"<b>{html.escape(v['headline'], quote=False)}</b> {html.escape(v['detail'], quote=False)}"
            f"{html.escape(above1, quote=False)}</p>",
            html_table(pd.DataFrame(rows), cls="headline"),
            f'<p class="meta">{how} Terms: see the <a href="#glossary">glossary</a>.</p>',
            "</section>",
        ]
    )


def _status_word(v: dict) -> str:
    """One word for the verdict: better / worse / mixed / indistinguishable / unknown."""
    st = {r["status"] for s, r in v["rows"].items() if s != "model" and s not in _CEILINGS}
    st.discard("undefined")
    if not st or "point" in st:
        return "unknown"
    return st.pop() if len(st) == 1 else "mixed"


def _section_glossary(sources: Sequence[str], metrics: Sequence[str]) -> str:
    terms = [s for s in sources if s in GLOSSARY]
    terms += ["u_ALL", "Δ", "calibrated", "DRF", "win rate"]
    items = "".join(f"<dt>{html.escape(t)}</dt><dd>{html.escape(GLOSSARY[t])}</dd>" for t in terms)
    mets = "".join(
        f"<dt>{html.escape(label(m))} <small>({html.escape(m)})</small></dt>"
        f"<dd>{html.escape(_METRIC_WORDS.get(m, ''))} "
        f"{'Higher' if _higher_is_better(m) else 'Lower'} is better.</dd>"
        for m in metrics
        if m in _METRIC_WORDS
    )
    return (
        '<section id="glossary"><h2>Glossary</h2><dl class="glossary">'
        + items
        + mets
        + '</dl><p class="meta">Exact definitions: docs/metrics.md (§2 references, §4 '
        "baselines, §7 calibration and DRF).</p></section>"
    )


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


def calibrated_limits(values: np.ndarray) -> tuple[float, float]:
    """The calibrated axis of the per-perturbation figure: at least [−0.2, 1.2], widened to
    the 2nd/98th percentiles ± 0.1, never beyond [−3, 3]; values outside are off-axis."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if not v.size:
        return -0.2, 1.2
    lo = max(min(-0.2, float(np.percentile(v, 2)) - 0.1), -3.0)
    hi = min(max(1.2, float(np.percentile(v, 98)) + 0.1), 3.0)
    return lo, hi


def fence_limits(values: np.ndarray) -> tuple[float, float] | None:
    """Axis limits that keep far outliers from squashing a panel: the data range within the
    fences ``[Q1 − 3·IQR, Q3 + 3·IQR]`` (padded 4 %); None when nothing lies outside."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size < 4:
        return None
    q1, q3 = np.percentile(v, [25, 75])
    iqr = q3 - q1
    if iqr <= 0:
        return None
    inside = v[(v >= q1 - 3 * iqr) & (v <= q3 + 3 * iqr)]
    if inside.size == v.size:
        return None
    lo, hi = float(inside.min()), float(inside.max())
    pad = 0.04 * (hi - lo if hi > lo else 1.0)
    return lo - pad, hi + pad


def _off_axis(ax, x, y, *, xlim=None, ylim=None, color="#444444", ms=7.0) -> int:
    """Draw the points of (x, y) outside the limits as triangles on the edge they cross
    (◀ ▶ ▼ ▲); returns how many."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    n = 0
    for lim, axis in ((xlim, 0), (ylim, 1)):
        if lim is None:
            continue
        v = x if axis == 0 else y
        lo, hi = lim
        inset = 0.012 * (hi - lo)
        for side, mask, mk in (
            (lo + inset, ok & (v < lo), "<" if axis == 0 else "v"),
            (hi - inset, ok & (v > hi), ">" if axis == 0 else "^"),
        ):
            if mask.any():
                px = (
                    np.full(mask.sum(), side)
                    if axis == 0
                    else np.clip(x[mask], *(xlim or (-np.inf, np.inf)))
                )
                py = y[mask] if axis == 0 else np.full(mask.sum(), side)
                ax.plot(
                    px, py, mk, color=color, mec="black", mew=0.6, ms=ms, zorder=4, clip_on=False
                )
                n += int(mask.sum())
            ok = ok & ~mask
    return n


def _section_per_perturbation(table: pd.DataFrame, sources: list[str], headline: list[str]) -> str:
    plt = pyplot()
    has_model = "model" in sources
    intervals = _interval_columns(table)
    metrics = headline[:4]
    if not metrics:
        return ""
    metric = metrics[0]
    units = list(dict.fromkeys(table["unit"]))
    n_units = len(units)
    show_labels = n_units <= 80
    height = min(max(3.0, 0.2 * n_units + 1.3), 24)
    fig, ax = plt.subplots(figsize=(8.5, height))
    note = ""
    n_off = 0
    cols: dict[str, pd.Series] = {}
    if has_model:
        sub = table[(table["metric"] == metric) & (table["source"] == "model")].set_index("unit")
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
        xlim = calibrated_limits(y.to_numpy(float))
        ax.axvspan(1, xlim[1], color=_COLORS["technical_duplicate"], alpha=0.07, lw=0)
        ax.axvline(
            0, color=_COLORS["dataset_mean"], lw=1.2, ls="--", label="0: best trivial baseline"
        )
        ax.axvline(
            1, color=_COLORS["technical_duplicate"], lw=1.2, ls="--", label="1: technical duplicate"
        )
        yy = y.reindex(order).to_numpy(float)
        if lo is not None:
            lo_, hi_ = lo.reindex(order).to_numpy(float), hi.reindex(order).to_numpy(float)
            inb = (yy >= xlim[0]) & (yy <= xlim[1])
            ax.hlines(
                pos[inb],
                np.clip(lo_[inb], *xlim),
                np.clip(hi_[inb], *xlim),
                color="#999999",
                lw=1.2,
                label=f"{100 * _ci_level(table.attrs):.0f} % interval",
            )
        inside = (yy >= xlim[0]) & (yy <= xlim[1])
        for p_nan in pos[~np.isfinite(yy)]:
            ax.text(xlim[0], p_nan, " undefined (NaN)", va="center", fontsize=8, color="#888888")
        ax.plot(yy[inside], pos[inside], "o", color=_COLORS["model"], ms=5, label="model")
        n_off = _off_axis(ax, yy, pos, xlim=xlim, color=_COLORS["model"])
        if n_off:
            ax.plot([], [], ">", color=_COLORS["model"], mec="black", mew=0.6, ms=7,
                    label=f"off axis ({n_off}): value in the table")  # fmt: skip
        ax.set_xlim(*xlim)
        ax.set_xlabel(f"calibrated {label(metric)}  (0 = best trivial baseline, 1 = duplicate)")
        for m in metrics:
            s2 = table[(table["metric"] == m) & (table["source"] == "model")].set_index("unit")
            cols[m] = s2["calibrated"].astype(float)
            if intervals is not None and intervals[2]:
                cols[f"{m}__lo"] = s2[intervals[0]].astype(float)
                cols[f"{m}__hi"] = s2[intervals[1]].astype(float)
    else:
        w = _wide(table, metric)
        order = (
            w["technical_duplicate"].sort_values(na_position="first").index
            if "technical_duplicate" in w
            else w.index
        )
        pos = np.arange(len(order))
        lim = fence_limits(w.to_numpy(float).ravel())
        for i, s in enumerate(c for c in sources if c in w):
            v = w[s].reindex(order).to_numpy(float)
            inb = np.ones(v.shape, bool) if lim is None else (v >= lim[0]) & (v <= lim[1])
            ax.plot(v[inb], pos[inb], "o", ms=4, color=_color(s, i), label=s)
            if lim is not None:
                n_off += _off_axis(ax, v, pos, xlim=lim, color=_color(s, i), ms=6)
        if lim is not None:
            ax.set_xlim(*lim)
            if n_off:
                ax.plot(
                    [], [], ">", color="#777777", mec="black", ms=6, label=f"off axis ({n_off})"
                )
        ax.set_xlabel(label(metric))
        for m in metrics:
            cols[m] = _wide(table, m).get("technical_duplicate", pd.Series(dtype=float))
    ax.set_yticks(pos)
    ax.set_yticklabels([short(u) for u in order] if show_labels else [""] * len(order), fontsize=9)
    ax.tick_params(axis="x", labelsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=9, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, frameon=False)
    layout(fig, left=2.0 if show_labels else 0.4, right=0.3, bottom=0.7, top=0.6)
    if has_model:
        text = (
            f"Each perturbation's calibrated {label(metric)}: 0 is the best of the negative/null "
            "baselines (control mean, dataset mean, null), 1 the technical duplicate; sorted, "
            "worst at the bottom. Values above 1 (shaded) are not an error: the model is "
            "closer to the truth than the technical duplicate, a second measurement from only "
            "half of the cells that is itself noisy. NaN (undefined) scores are not drawn."
        )
        text += " Intervals from the table's bootstrap." if intervals and intervals[2] else note
        n_nan = int((~np.isfinite(yy)).sum())
        if n_nan:
            notes = (
                sub["note"].reindex(order).astype(str)
                if "note" in sub
                else pd.Series([], dtype=str)
            )
            notes = notes[~np.isfinite(yy)]
            why = notes[notes.str.strip() != ""].value_counts()
            text += f" {n_nan} of {len(yy)} perturbations have no defined score" + (
                f" (most often: {why.index[0]})." if len(why) else "."
            )
        if intervals is None:
            text += " No intervals in the table (run with --n-boot N for them)."
    else:
        text = (
            "No model in this table (baselines only): per-perturbation raw values of every "
            "baseline, sorted by the technical duplicate."
        )
    if n_off:
        text += (
            f" {n_off} point{'s lie' if n_off > 1 else ' lies'} beyond the axis, drawn as a "
            "triangle on the edge (exact values in the table below)."
        )
    if not show_labels:
        text += f" ({n_units} perturbations: labels omitted.)"
    elif any(len(str(u)) > len(short(u)) for u in order):
        text += " Long names are shortened with “…” (full names in the table)."
    img = fig_to_img(
        fig,
        f"per-perturbation {label(metric)}",
        caption=html.escape(text, quote=False),
        attrs={"off-axis": n_off},
    )
    # the per-perturbation values of the headline metrics, full names
    rows = []
    for u in reversed(list(order)):
        row: dict = {"perturbation": name_cell(u, full=True)}
        for m in metrics:
            v = cols.get(m, pd.Series(dtype=float)).get(u, np.nan)
            if f"{m}__lo" in cols:
                row[label(m)] = Raw(
                    _interval_text(
                        v, cols[f"{m}__lo"].get(u, np.nan), cols[f"{m}__hi"].get(u, np.nan)
                    )
                )
            else:
                row[label(m)] = v
        rows.append(row)
    what = "model, calibrated" if has_model else "technical duplicate, raw"
    tab = (
        f"<details><summary>Table: per perturbation ({what}), best first</summary>"
        + html_table(pd.DataFrame(rows), max_rows=2000, cls="small")
        + "</details>"
    )
    return f'<h2 id="perturbations">Per-perturbation scores</h2>{img}{tab}'


def _section_vs_baselines(
    table: pd.DataFrame, sources: list[str], headline: Sequence[str] = ()
) -> str:
    plt = pyplot()
    present = list(dict.fromkeys(table["metric"]))
    metrics = [m for m in headline if m in present] + [m for m in present if m not in headline]
    ncol = min(2, len(metrics))
    nrow = -(-len(metrics) // ncol)
    ph = 0.32 * len(sources) + 0.9
    fig, axes = plt.subplots(nrow, ncol, figsize=(9.0, ph * nrow + 0.5), squeeze=False)
    n_off = 0
    for ax, metric in zip(axes.ravel(), metrics):
        w = _wide(table, metric)
        srcs = sources
        data = [w[s].to_numpy(float) if s in w else np.array([]) for s in srcs]
        data = [d[np.isfinite(d)] for d in data]
        pos = np.arange(len(srcs))[::-1]
        ok = [i for i, d in enumerate(data) if d.size]
        lim = fence_limits(np.concatenate(data)) if ok else None
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
            ax.scatter(q[:, 1], pos[ok], marker="|", s=140, c="black", linewidths=1.8, zorder=3)
            xs = np.concatenate([data[i] for i in ok])
            ys = np.concatenate(
                [pos[i] + (np.random.default_rng(i).random(data[i].size) - 0.5) * 0.3 for i in ok]
            )
            cs = np.array(sum(([_color(srcs[i], i)] * data[i].size for i in ok), []))
            inb = np.ones(xs.shape, bool) if lim is None else (xs >= lim[0]) & (xs <= lim[1])
            ax.scatter(xs[inb], ys[inb], s=6, c=cs[inb], alpha=0.8, linewidths=0, zorder=2)
            if lim is not None:
                k = _off_axis(ax, xs, ys, xlim=lim, color="#555555", ms=5)
                n_off += k
                ax.set_xlim(*lim)
                ax.set_title(f"{k} off axis ◀▶", fontsize=8, loc="right", color="#555555")
        for i, d in enumerate(data):
            if not d.size:
                ax.text(
                    0.02,
                    pos[i],
                    "undefined",
                    va="center",
                    fontsize=8,
                    color="#888888",
                    transform=ax.get_yaxis_transform(),
                )
        ax.set_yticks(pos)
        ax.set_yticklabels(
            [short(s, 22) for s in srcs] if ax.get_subplotspec().is_first_col() else [], fontsize=9
        )
        ax.tick_params(axis="x", labelsize=9)
        arrow = "↑ better" if _higher_is_better(metric) else "↓ better"
        ax.set_title(f"{label(metric)} ({arrow})", fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    for ax in axes.ravel()[len(metrics) :]:
        ax.axis("off")
    layout(fig, left=1.9, right=0.25, wspace=0.35, hspace=0.55, bottom=0.35, top=0.35)
    text = (
        "Distribution over perturbations of each source's raw value (bar: quartiles; black "
        "tick: median; dots: perturbations). A metric is informative on this data set when the "
        "technical duplicate clearly separates from the dataset mean and control mean."
    )
    if n_off:
        text += (
            f" {n_off} far outlier{'s' if n_off > 1 else ''} (beyond 3 IQR of the panel) "
            "drawn as triangles on the axis edge."
        )
    return '<h2 id="baselines">Model vs baselines, per metric</h2>' + fig_to_img(
        fig, "model vs baselines", caption=html.escape(text, quote=False), attrs={"off-axis": n_off}
    )


def _section_paired(
    comp: pd.DataFrame,
    headline: Sequence[str] = ("r2w_delta", "wmse", "pearson_delta_degs"),
    *,
    ci: float = 0.95,
) -> str:
    """Paired model-vs-baseline bootstrap comparisons (``source = "model-vs-<b>"`` rows):
    one row per baseline, one column per headline metric, "median [interval]"."""
    if comp.empty:
        return ""
    present = list(dict.fromkeys(comp["metric"]))
    metrics = [m for m in headline if m in present][:3] or present[:3]
    baselines = list(dict.fromkeys(comp["source"]))
    rows = []
    for source in baselines:
        row: dict = {"baseline": name_cell(source.removeprefix("model-vs-"))}
        for metric in metrics:
            g = comp[(comp["source"] == source) & (comp["metric"] == metric)]
            r = _summarise_rows(g, ci)
            if not r["n"]:
                row[label(metric)] = "—"
                continue
            detail = (
                f"{r['better']}↑ {r['worse']}↓ of {r['n']}"
                if np.isfinite(r["better"])
                else f"n {r['n']}"
            )
            if np.isfinite(r["win_rate"]):
                detail += f" · win {r['win_rate']:.2f}"
            row[label(metric)] = Raw(
                _interval_text(r["median"], r["low"], r["high"]) + f"<br><small>{detail}</small>"
            )
        rows.append(row)
    pct = f"{100 * ci:.0f} %"
    return "\n".join(
        [
            '<h2 id="paired">Model vs each baseline, paired bootstrap</h2>',
            "<p>Per perturbation, the difference model − baseline, oriented so that positive "
            "means the model is better (errors are negated); each cell: the median over "
            f"perturbations with its {pct} interval (resampling perturbations and cells, as in "
            "the verdict), then how many perturbations have their own interval above (↑) or "
            "below (↓) 0, and the mean win rate (fraction of resamples in which the model is "
            "strictly better).</p>",
            html_table(pd.DataFrame(rows), cls="paired"),
        ]
    )


#: the control-bias figure's lower y limit (R²w(Δ) below it is drawn on the edge).
_YMIN = -2.0


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
    fig, ax = plt.subplots(figsize=(8.0, 5.6))
    rows = []
    n_off = 0
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
                "below −2": Raw("0"),
            }
        )
        if ok.any():
            inb = ok & (y >= _YMIN)
            k = _off_axis(ax, x, y, ylim=(_YMIN, 1.0 + 1e-9), color=_color(s, i), ms=6)
            n_off += k
            rows[-1]["below −2"] = Raw(str(k))
            ax.scatter(
                x[inb],
                y[inb],
                s=16 if s != "model" else 26,
                alpha=0.75,
                color=_color(s, i),
                label=f"{short(s, 22)}" + (f" ({k} ▼ off axis)" if k else ""),
                edgecolors="none",
            )
    ax.axhline(0, color="#bbbbbb", lw=0.8)
    ax.set_ylim(_YMIN - 0.05, 1.05)
    ax.set_xlabel(xlabel, fontsize=10)
    ref = str(table.attrs.get("reference", "perturbed"))
    ref = {"perturbed": "u_ALL", "control": "control"}.get(ref, ref)
    ax.set_ylabel(f"{label(ymetric)} vs {ref}", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, frameon=False)
    layout(fig, left=0.8, bottom=0.6, top=0.75)
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
    if n_off:
        text += (
            f" {n_off} point{'s' if n_off > 1 else ''} below {label(ymetric)} = −2 "
            "drawn as ▼ on the bottom edge (counted in the legend and the table)."
        )
    return "\n".join(
        [
            '<h2 id="control-bias">Control bias</h2>',
            f"<p>{text}</p>",
            "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes),
            fig_to_img(fig, "control bias", attrs={"off-axis": n_off}),
            html_table(summ),
        ]
    )


def _delta_units(attrs: Mapping, per_gene: Mapping | None = None) -> str:
    """The Δ axis label with its units: "Δ log1p(counts per 10k) vs u_ALL (half 1)"."""
    norm = str(attrs.get("normalization", "") or "")
    unit = {
        "log1p_cp10k": "log1p(counts per 10k)",
        "none": "expression (input as given)",
    }.get(norm, "expression (table's units)")
    ref = attrs.get("reference")
    if ref is None and per_gene is not None and "reference" in per_gene:
        ref = str(np.asarray(per_gene["reference"]))
    ref = {
        "perturbed": "u_ALL (half 1)",
        "control": "control mean",
        "perturbed_no_control": "mean of perturbations (half 1)",
        "perturbed_cells": "mean of perturbed cells (half 1)",
    }.get(str(ref), str(ref) if ref is not None else "the Δ reference")
    return f"Δ {unit} vs {ref}"


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
    units = _delta_units(table.attrs, per_gene)
    parts = [
        head,
        f"<p>Worst and best perturbation {html.escape(why)}; the genes with the largest "
        "DEG weight (filled markers: significant DEGs). Truth Δ in black, each source's "
        f"predicted Δ in colour; y axis: {html.escape(units)}.</p>",
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
        fig, ax = plt.subplots(figsize=(min(max(6.0, 0.3 * len(genes) + 1.5), 9.0), 4.0))
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
        ax.set_xticklabels([short(g, 14) for g in genes], rotation=70, fontsize=9)
        ax.set_ylabel(units.replace(" vs ", "\nvs "), fontsize=9)
        ax.legend(fontsize=8, ncol=6, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
        ax.grid(axis="y", alpha=0.3)
        layout(fig, left=0.9, bottom=1.3, top=0.55)
        parts.append(f"<h3>{html.escape(which)}: {name_cell(pert)}</h3>")
        parts.append(fig_to_img(fig, f"per-gene {which}"))
        tab = pd.DataFrame(
            {
                "gene": [name_cell(g) for g in genes],
                "weight": weight,
                "DEG": np.where(deg, "yes", ""),
                "truth Δ": truth,
            }
        )
        for s in sources:
            tab[f"{s} error"] = np.asarray(per_gene[f"delta__{s}"][i], float) - truth
        parts.append(
            f"<details><summary>Table: the {len(genes)} genes ({html.escape(which)})</summary>"
            + html_table(tab, cls="small")
            + "</details>"
        )
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
        _section_verdict(table, comparisons, headline[0] if headline else None),
        _section_summary(table, sources),
        _section_card(table),
        _section_per_perturbation(table, sources, headline),
        _section_vs_baselines(table, sources, headline),
        _section_paired(comparisons, headline, ci=_ci_level(attrs)),
        _section_control_bias(table, sources, per_gene),
        _section_per_gene(table, headline, per_gene, per_gene_note),
        _section_pathways(pathways),
        _section_glossary(sources, present),
        '<section id="run"><h2>Run information</h2><details><summary>'
        f"{len(info)} fields: options, inputs, versions</summary>"
        f'<table class="meta">{meta}</table></details></section>',
    ]
    anchors = [
        ("verdict", "verdict"),
        ("summary", "summary"),
        ("card", "calibration card"),
        ("perturbations", "per perturbation"),
        ("baselines", "vs baselines"),
        ("paired", "paired bootstrap"),
        ("control-bias", "control bias"),
        ("genes", "per gene"),
        ("pathways", "pathways"),
        ("glossary", "glossary"),
        ("run", "run information"),
    ]
    body = "\n".join(sections)
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in anchors if f'id="{a}"' in body)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><nav>{nav}</nav>"
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
        "<p>Per gene set: the prediction's R²w(Δ) on the set's genes as a share of the "
        "technical duplicate's, 0–100 (100 = as good as a technical duplicate, 0 = none of the "
        "set's gene-specific response, i.e. R²w(Δ) ≤ 0); grey = undefined (no DEG, no weight, "
        "a constant truth, or a duplicate no better than 0: the pathway table's "
        "<code>reason</code>). Labels give present/total genes.</p>"
        + fig_to_img(fig, "per-pathway confidence heatmap")
        + "</section>"
    )


def write_report(table: pd.DataFrame, path: str | os.PathLike, **kwargs) -> None:
    """:func:`build_report` written atomically to ``path`` (keyword arguments passed on)."""
    text = build_report(table, **kwargs)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
