"""The HTML report: self-contained, every section, fallbacks, per-gene data, a real browser."""

from __future__ import annotations

import base64
import html.parser
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from vcjax import _io
from vcjax import stats as ST
from vcjax.report import _html as R
from vcjax.report._page import fmt

SOURCES = ("model", "technical_duplicate", "dataset_mean", "control_mean", "null")
HIGHER = {
    "mse": False,
    "wmse": False,
    "r2w_delta": True,
    "pearson_delta_ctrl": True,
    "pearson_delta": True,
}


def fake_table(
    n_perts: int = 5,
    metrics=("mse", "wmse", "r2w_delta", "pearson_delta_ctrl"),
    sources=SOURCES,
    seed: int = 0,
    intervals: str | None = None,
) -> pd.DataFrame:
    """A tidy table shaped like vcjax.evaluate's, with calibration computed the same way."""
    rng = np.random.default_rng(seed)
    perts = [f"P{i}" for i in range(n_perts)]
    level = {
        "technical_duplicate": 0.9,
        "model": 0.6,
        "dataset_mean": 0.2,
        "control_mean": 0.1,
        "null": 0.0,
    }
    rows = []
    for m in metrics:
        vals = {}
        for s in sources:
            good = np.clip(level[s] + rng.normal(0, 0.05, n_perts), 0, 1)
            vals[s] = good if HIGHER[m] else 1.0 - good
        negs = np.stack([vals[s] for s in ("dataset_mean", "control_mean", "null") if s in vals])
        best = negs.max(0) if HIGHER[m] else negs.min(0)
        span = vals["technical_duplicate"] - best if "technical_duplicate" in vals else np.nan
        for s in sources:
            rows.append(
                pd.DataFrame(
                    {
                        "perturbation": perts,
                        "metric": m,
                        "source": s,
                        "value": vals[s],
                        "calibrated": (vals[s] - best) / span,
                        "note": "",
                    }
                )
            )
    df = pd.concat(rows, ignore_index=True)
    if intervals == "value":
        df["ci_low"], df["ci_high"] = df["value"] - 0.05, df["value"] + 0.05
    elif intervals == "calibrated":
        df["calibrated_ci_low"], df["calibrated_ci_high"] = (
            df["calibrated"] - 0.1,
            df["calibrated"] + 0.1,
        )
    df.attrs.update(backend="cpu", reference="perturbed")
    return df


def fake_per_gene(
    perts, n_genes: int = 6, sources=("model", "technical_duplicate", "dataset_mean")
):
    rng = np.random.default_rng(1)
    P = len(perts)
    out = {
        "perturbations": np.asarray(perts),
        "genes": np.array([[f"G{j}_{i}" for j in range(n_genes)] for i in range(P)]),
        "weight": np.sort(rng.random((P, n_genes)), axis=1)[:, ::-1],
        "deg": rng.random((P, n_genes)) > 0.5,
        "truth_delta": rng.normal(size=(P, n_genes)),
        "sources": np.asarray(sources),
        "reference": np.asarray("perturbed"),
    }
    for s in sources:
        out[f"delta__{s}"] = out["truth_delta"] + rng.normal(0, 0.3, (P, n_genes))
        out[f"pearson_ctrl__{s}"] = rng.random(P)
    return out


class _Checker(html.parser.HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.imgs = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


def _check_html(text: str) -> _Checker:
    c = _Checker()
    c.feed(text)
    assert not c.errors, c.errors[:3]
    assert c.stack == [], c.stack
    # self-contained: no external resource of any kind
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert not re.search(r'(src|href)="(?!data:|#)', text), re.findall(
        r'(?:src|href)="[^"]{0,40}', text
    )[:3]
    for img in c.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        png = base64.b64decode(img["src"].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    return c


def test_report_has_every_section_and_is_self_contained(tmp_path):
    table = fake_table(intervals="calibrated")
    genes = fake_per_gene(sorted(set(table["perturbation"])))
    R.write_report(table, tmp_path / "r.html", per_gene=genes, title="a <b>&</b> title")
    assert {p.name for p in tmp_path.iterdir()} == {"r.html"}  # atomic: no temporary left
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    c = _check_html(text)
    assert len(c.imgs) == 5  # per perturbation, vs baselines, control bias, worst, best
    for anchor in ("summary", "card", "perturbations", "baselines", "control-bias", "genes"):
        assert f'id="{anchor}"' in text
    assert "a &lt;b&gt;&amp;&lt;/b&gt; title" in text
    assert (
        "Intervals from the table&#x27;s bootstrap" in text
        or "Intervals from the table's bootstrap" in text
    )
    # worst and best by the model's calibrated R²w(Δ)
    sub = table[(table.metric == "r2w_delta") & (table.source == "model")].set_index(
        "perturbation"
    )["calibrated"]
    assert f'worst: <span class="nm" title="{sub.idxmin()}">' in text
    assert f'best: <span class="nm" title="{sub.idxmax()}">' in text
    # summary medians are the table's
    med = table[(table.metric == "wmse") & (table.source == "dataset_mean")]["value"].median()
    assert fmt(med) in text


def test_report_fallbacks_are_stated():
    # no control-referenced Pearson, no per-gene data, no intervals
    table = fake_table(metrics=("mse", "r2w_delta"), n_perts=3)
    text = R.build_report(table)
    _check_html(text)
    assert "Not available: the table has neither Pearson(Δ vs control)" in text
    assert "No per-gene data" in text and "--genes" in text
    assert "No intervals in the table" in text
    # control-referenced Pearson from the per-gene data instead
    genes = fake_per_gene(["P0", "P1", "P2"])
    text = R._section_control_bias(table.assign(unit=table["perturbation"]), list(SOURCES), genes)
    assert "taken from the per-gene data" in text and "data:image/png" in text
    # ... or, lacking both, Pearson(Δ) against the table's own reference, said to be no substitute
    t2 = fake_table(metrics=("pearson_delta", "r2w_delta"), n_perts=3)
    text = R._section_control_bias(t2.assign(unit=t2["perturbation"]), list(SOURCES), None)
    assert "does not show the control bias" in text and "data:image/png" in text
    # raw-value intervals are mapped through the calibration, and say so
    text = R._section_per_perturbation(
        fake_table(intervals="value", metrics=("r2w_delta",), n_perts=3).assign(
            unit=lambda d: d.perturbation
        ),
        list(SOURCES),
        ["r2w_delta"],
    )
    assert "mapped through each perturbation's calibration" in text


def test_report_baselines_only_and_covariates():
    table = fake_table(
        sources=SOURCES[1:], metrics=("wmse", "r2w_delta", "pearson_delta_ctrl"), n_perts=4
    )
    table["covariate"] = np.where(table["perturbation"].isin(["P0", "P1"]), "K562", "RPE1")
    genes = fake_per_gene(["P0", "P1", "P2", "P3"], sources=("technical_duplicate", "dataset_mean"))
    text = R.build_report(table, per_gene=genes)
    _check_html(text)
    assert "No model in this table" in text
    assert "technical duplicate&#x27;s" in text or "technical duplicate's" in text
    assert "perturbations</th><td>4" in text


def test_paired_comparison_rows_are_summarised_not_plotted():
    """Compact: one row per baseline, one cell per headline metric, "median [interval]"
    then the counts of perturbations whose own interval is above/below 0 and the win rate."""
    table = fake_table(n_perts=4, metrics=("wmse",))
    comp = pd.DataFrame(
        {
            "perturbation": ["P0", "P1", "P2", "P3"],
            "metric": "wmse",
            "source": "model-vs-dataset_mean",
            "value": [0.5, 0.4, -0.1, np.nan],
            "calibrated": np.nan,
            "note": "",
            "ci_low": [0.1, -0.2, -0.3, np.nan],
            "ci_high": [0.9, 0.8, -0.05, np.nan],
            "win_rate": [0.99, 0.8, 0.1, np.nan],
        }
    )
    text = R._section_paired(comp)
    assert 'id="paired"' in text
    row = re.search(
        r'<tr><td><span class="nm" title="dataset_mean">dataset_mean</span></td>(.*?)</tr>', text
    )
    cells = re.findall(r"<td>(.*?)</td>", row.group(1))
    assert len(cells) == 1  # one headline metric: one cell
    assert cells[0].startswith(fmt(np.median([0.5, 0.4, -0.1])) + ' <span class="iv">[')
    assert "1↑ 1↓ of 3" in cells[0]  # lo > 0 on P0, hi < 0 on P2
    assert f"win {np.mean([0.99, 0.8, 0.1]):.2f}" in cells[0]
    assert R._section_paired(comp.iloc[:0]) == ""
    # in a full table the comparison rows are not a source of the summary
    summary = R._section_summary(table, R._sources(table))
    assert "model-vs" not in summary


def test_report_rejects_a_non_table():
    with pytest.raises(ValueError, match="missing column"):
        R.build_report(pd.DataFrame({"a": [1]}))
    with pytest.raises(ValueError, match="empty"):
        R.build_report(fake_table().iloc[:0])


def test_sidecar_path_and_roundtrip(tmp_path):
    assert R.sidecar_path("out/results.parquet") == "out/results.genes.npz"
    assert R.sidecar_path("results.csv.gz") == "results.genes.npz"
    genes = fake_per_gene(["P0", "P1"])
    _io.write_npz(tmp_path / "g.genes.npz", genes)
    back = R.load_per_gene(tmp_path / "g.genes.npz")
    assert set(back) == set(genes)
    for k, v in genes.items():
        np.testing.assert_array_equal(back[k], v)
    with pytest.raises(FileNotFoundError):
        R.load_per_gene(tmp_path / "missing.npz")


def test_per_gene_data_against_numpy():
    """Deltas on the top genes and the control-referenced Pearson, from an independent
    float64 NumPy computation of the split pseudobulks (docs/metrics.md §1, §2)."""
    import anndata as ad

    import vcjax
    from vcjax.data import split_halves
    from vcjax.simulate import simulate_screen

    truth = simulate_screen(
        seed=0,
        n_perturbations=6,
        n_genes=80,
        cells_per_perturbation=12,
        n_control=30,
        n_combinations=2,
        shared_shift_genes=8,
        effect_genes=4,
    )
    X = truth.X.toarray().astype(np.float64)
    X = np.log1p(1e4 * X / X.sum(1, keepdims=True))
    lab = truth.obs["condition"].astype(str).to_numpy()
    half = np.asarray(split_halves(lab, seed=42))
    conds = list(pd.unique(lab))
    h1 = {c: X[(lab == c) & (half == 1)].mean(0) for c in conds}
    h2 = {c: X[(lab == c) & (half == 2)].mean(0) for c in conds}
    full = {c: X[lab == c].mean(0) for c in conds}
    u_all_h1 = np.mean([h1[c] for c in conds], axis=0)
    u_ntc = full["control"]
    perts = [c for c in conds if c != "control"]
    pred_m = np.stack(
        [full[p] + 0.05 * np.sin(np.arange(X.shape[1]) + i) for i, p in enumerate(perts)]
    )
    pred = ad.AnnData(
        pred_m,
        obs=pd.DataFrame({"condition": perts}, index=perts),
        var=pd.DataFrame(index=truth.var_names.copy()),
    )

    g = vcjax.per_gene_data(truth, pred, key="condition", control="control", top_n=10)
    assert list(g["perturbations"]) == perts
    assert list(g["sources"]) == ["model", "technical_duplicate", "dataset_mean", "control_mean"]
    gene_pos = {n: j for j, n in enumerate(truth.var_names)}
    for i, p in enumerate(perts):
        idx = [gene_pos[n] for n in g["genes"][i]]
        np.testing.assert_allclose(
            g["truth_delta"][i], (h2[p] - u_all_h1)[idx], rtol=1e-9, atol=1e-12
        )
        np.testing.assert_allclose(
            g["delta__model"][i], (pred_m[i] - u_all_h1)[idx], rtol=1e-9, atol=1e-12
        )
        np.testing.assert_allclose(
            g["delta__technical_duplicate"][i], (h1[p] - u_all_h1)[idx], rtol=1e-9, atol=1e-12
        )
        assert np.all(np.diff(g["weight"][i]) <= 0)  # top genes by DEG weight, descending
        r = np.corrcoef(pred_m[i] - u_ntc, h2[p] - u_ntc)[0, 1]
        np.testing.assert_allclose(g["pearson_ctrl__model"][i], r, rtol=1e-9)
        r = np.corrcoef(h1[p] - u_ntc, h2[p] - u_ntc)[0, 1]
        np.testing.assert_allclose(g["pearson_ctrl__technical_duplicate"][i], r, rtol=1e-9)
    assert np.all(np.isnan(g["pearson_ctrl__control_mean"]))  # constant Δ̂ = 0
    # the same quantity through vcjax.evaluate's engine
    table = vcjax.evaluate(
        truth,
        pred,
        key="condition",
        control="control",
        baselines=("control_mean", "dataset_mean", "null", "technical_duplicate"),
    )
    eng = table[(table.metric == "pearson_delta_ctrl") & (table.source == "model")].set_index(
        "perturbation"
    )
    np.testing.assert_allclose(
        eng.loc[perts, "value"], g["pearson_ctrl__model"], rtol=1e-5, atol=1e-6
    )


CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package 'chromium')")
def test_report_renders_in_headless_chromium(tmp_path):
    from matplotlib.image import imread

    table = fake_table(n_perts=12, intervals="value")
    genes = fake_per_gene(sorted(set(table["perturbation"])))
    page = tmp_path / "report.html"
    R.write_report(table, page, per_gene=genes)
    shot = tmp_path / "shot.png"
    res = _chromium(
        tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", page.resolve().as_uri()
    )
    assert shot.exists(), res.stderr[-2000:]
    img = imread(shot)
    assert img.shape[0] == 2000 and img.shape[1] == 1280
    gray = img[..., :3].mean(axis=2)
    assert gray.std() > 0.05  # not blank
    # the embedded figures were drawn: a good share of the page is neither white nor text-grey
    assert (gray < 0.9).mean() > 0.02


# ---------------------------------------------------------------------------- issue #19, part 7


def with_comparisons(table: pd.DataFrame, *, half_width: float = 0.02) -> pd.DataFrame:
    """``model-vs-<b>`` rows from the point values: s·(model − b) ± ``half_width``."""
    frames = []
    for (metric, source), g in table.groupby(["metric", "source"], sort=False):
        if source == "model":
            continue
        m = table[(table.metric == metric) & (table.source == "model")].set_index("perturbation")
        g = g.set_index("perturbation")
        sgn = 1.0 if HIGHER[metric] else -1.0
        d = sgn * (m.loc[g.index, "value"] - g["value"]).to_numpy(float)
        frames.append(
            pd.DataFrame(
                {
                    "perturbation": g.index,
                    "metric": metric,
                    "source": f"model-vs-{source}",
                    "value": d,
                    "calibrated": np.nan,
                    "note": "",
                    "ci_low": d - half_width,
                    "ci_high": d + half_width,
                    "win_rate": np.where(d - half_width > 0, 1.0, 0.5),
                }
            )
        )
    out = pd.concat([table.assign(ci_low=np.nan, ci_high=np.nan, win_rate=np.nan), *frames])
    out.attrs = dict(table.attrs)
    return out.reset_index(drop=True)


def _positions(text: str, *needles: str) -> list[int]:
    pos = [text.find(n) for n in needles]
    assert all(p >= 0 for p in pos), [n for n, p in zip(needles, pos) if p < 0]
    return pos


def test_verdict_first_metadata_last_collapsed():
    table = with_comparisons(fake_table(n_perts=6))
    text = R.build_report(table)
    _check_html(text)
    v, summary, glossary, run, meta = _positions(
        text, 'id="verdict"', 'id="summary"', 'id="glossary"', 'id="run"', 'class="meta"><tr>'
    )
    assert v < summary < glossary < run < meta  # verdict first, run information at the end
    # the metadata table sits in a collapsed <details>, nothing of it before the verdict
    assert text.rfind("<details>", 0, meta) > run and "<details open" not in text[run:meta]
    assert "<th>backend</th>" not in text[:v]
    assert '<meta name="viewport"' in text


def _medians(table, metric="r2w_delta"):
    t = table[~table.source.str.startswith("model-vs-") & (table.metric == metric)]
    return t.groupby("source")["calibrated"].median()


def test_verdict_for_a_clearly_better_model():
    table = with_comparisons(fake_table(n_perts=8, seed=3))
    v = R.verdict(table)
    # independent: every per-perturbation interval vs each rival is above 0 -> better than all
    comp = table[table.source.str.startswith("model-vs-") & (table.metric == "r2w_delta")]
    rivals = ["dataset_mean", "control_mean", "null"]  # report order; the duplicate is a ceiling
    for b in rivals:
        assert (comp[comp.source == f"model-vs-{b}"]["ci_low"] > 0).all()
    assert v["text"].startswith(
        f"The model is better than every baseline ({', '.join(rivals)}) on R²w(Δ): the 95 % "
        "interval of each paired difference excludes 0."
    )
    med = _medians(table)
    best = med[rivals].idxmax()
    assert v["best"] == best and f"against the strongest baseline, {best}," in v["text"]
    d = comp[comp.source == f"model-vs-{best}"]["value"].to_numpy(float)
    assert f"median paired difference is {fmt(np.median(d))} [" in v["text"]
    assert f"median calibrated R²w(Δ) is {fmt(med['model'])}: " in v["text"]
    assert 0.05 < med["model"] < 1
    assert f"{100 * med['model']:.0f} % of the way from the best trivial baseline" in v["text"]
    assert v["rows"]["technical_duplicate"]["status"] == "worse"  # a ceiling, not a rival
    html_text = R.build_report(table)
    assert 'data-status="better"' in html_text
    # the headline table: the best rival's row with its median and interval
    row = re.search(rf'title="{best}">{best}</span></td>(.*?)</tr>', html_text).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[0] == fmt(med[best]) and cells[2].startswith(fmt(np.median(d)) + " ")
    assert cells[3] == f"{len(d)} / 0 of {len(d)}"


def test_verdict_for_a_collapsed_model():
    """A model that predicts the dataset mean: not distinguishable from it (the paired
    differences are 0 ± noise), better than the weaker baselines, worse than the ceiling."""
    base = fake_table(n_perts=10, seed=5)
    rng = np.random.default_rng(0)
    for m in base.metric.unique():
        dm = (base.metric == m) & (base.source == "dataset_mean")
        mo = (base.metric == m) & (base.source == "model")
        base.loc[mo, ["value", "calibrated"]] = base.loc[dm, ["value", "calibrated"]].to_numpy()
    table = with_comparisons(base, half_width=0.3)
    cm = table.source == "model-vs-dataset_mean"
    table.loc[cm, "value"] = rng.normal(0, 0.01, cm.sum())  # 0 ± noise
    table.loc[cm, "ci_low"] = table.loc[cm, "value"] - 0.3
    table.loc[cm, "ci_high"] = table.loc[cm, "value"] + 0.3
    v = R.verdict(table)
    comp = table[table.source.str.startswith("model-vs-") & (table.metric == "r2w_delta")]
    # independent: every per-perturbation interval vs dataset_mean contains 0
    g = comp[comp.source == "model-vs-dataset_mean"]
    assert ((g.ci_low < 0) & (g.ci_high > 0)).all()
    assert v["rows"]["dataset_mean"]["status"] == "indistinguishable"
    assert re.search(
        r"not distinguishable from [^(]*dataset_mean[^(]* \(the interval contains 0\)", v["text"]
    )
    assert "better than every baseline" not in v["text"]
    # the others, independently: the median of n differences each ± 0.3 (a 95 % cell
    # interval, sd 0.3/1.96) has a spread of about 1.2533·sd/√n plus the spread over
    # perturbations; decide only where the call is clear
    for b in ("control_mean", "null"):
        d = comp[comp.source == f"model-vs-{b}"]["value"].to_numpy(float)
        half = 1.96 * np.hypot(1.2533 * 0.3 / 1.96, 1.2533 * d.std()) / np.sqrt(d.size)
        m = np.median(d)
        if abs(m) > 1.3 * half:
            assert v["rows"][b]["status"] == ("better" if m > 0 else "worse"), b
        elif abs(m) < 0.7 * half:
            assert v["rows"][b]["status"] == "indistinguishable", b
    assert v["rows"]["technical_duplicate"]["status"] == "worse"
    assert 'data-status="mixed"' in R.build_report(table)
    c = _medians(table)["model"]
    assert abs(c) < 0.05 and "no better than the best trivial baseline" in v["text"]


def test_verdict_without_bootstrap_says_so():
    table = fake_table(n_perts=5)
    v = R.verdict(table)
    assert not v["has_intervals"]
    assert v["text"].startswith("No bootstrap was run, so there are no intervals")
    # point differences from the table itself
    w = table[table.metric == "r2w_delta"].pivot(
        index="perturbation", columns="source", values="value"
    )
    assert v["rows"]["null"]["median"] == pytest.approx(np.median(w["model"] - w["null"]))
    assert np.isnan(v["rows"]["null"]["low"])
    assert "no bootstrap" not in R.verdict(with_comparisons(table))["text"].lower()
    text = R.build_report(table)
    assert "No bootstrap was run: point estimates only" in text
    assert R.verdict(fake_table(sources=SOURCES[1:]))["text"].startswith("No model in this table")


def test_paired_summary_interval_combines_perturbations_and_cells():
    """n equal differences d, each with a cell-bootstrap interval d ± 1.96σ: the interval of
    the median spans about ±1.96·1.2533·σ/√n (the median of n normals)."""
    n, d, sig = 400, 0.5, 1.0
    z = 1.959963984540054
    r = ST.paired_summary(np.full(n, d), np.full(n, d - z * sig), np.full(n, d + z * sig))
    half = z * 1.2533 * sig / np.sqrt(n)
    assert r["median"] == d and r["n"] == n
    assert r["low"] == pytest.approx(d - half, rel=0.05)
    assert r["high"] == pytest.approx(d + half, rel=0.05)
    # without cell noise: the perturbation bootstrap of the median alone
    v = np.random.default_rng(1).normal(0.2, 0.1, 200)
    r = ST.paired_summary(v, v, v)
    rng = np.random.default_rng(0)
    meds = np.median(v[rng.integers(0, v.size, (2000, v.size))], axis=1)
    assert (r["low"], r["high"]) == pytest.approx(tuple(np.quantile(meds, [0.025, 0.975])))
    assert r["better"] == int((v > 0).sum()) and r["worse"] == int((v < 0).sum())


def test_glossary_explains_every_source_and_the_jargon():
    sources = (*SOURCES, "loo_mean", "interpolated_duplicate", "additive")
    table = fake_table(n_perts=4)
    extra = []
    for s in ("loo_mean", "interpolated_duplicate", "additive"):
        e = table[table.source == "dataset_mean"].copy()
        e["source"] = s
        extra.append(e)
    table = pd.concat([table, *extra], ignore_index=True)
    text = R.build_report(table)
    gl = text[text.index('id="glossary"') :]
    terms = re.findall(r"<dt>(.*?)</dt>", gl)
    for s in sources:
        assert s in terms, s
    for t in ("u_ALL", "calibrated", "DRF", "Δ"):
        assert t in terms
    # definitions from docs/metrics.md §4 and §7
    import html as _html

    gl = _html.unescape(gl)
    assert "the mean of the other perturbations' pseudobulks" in gl
    assert "α·duplicate + (1 − α)·loo_mean" in gl and "α = 1 − the gene's adjusted" in gl
    assert "Values above 1 mean the prediction is closer to the truth" in gl
    assert "dynamic range fraction" in gl
    # metric rows use the registry labels
    from vcjax.metrics import label

    assert f"<dt>{_html.escape(label('r2w_delta'))} <small>(r2w_delta)</small></dt>" in text


def test_long_names_are_truncated_with_the_full_name_on_hover():
    long = "GENE0017_with_a_very_long_guide_identifier_ABCDEFGHIJKLMNOP"
    table = fake_table(n_perts=4)
    table["perturbation"] = table["perturbation"].replace("P1", long)
    worst = (table.perturbation == long) & (table.source == "model")
    table.loc[worst, "calibrated"] = -0.5
    genes = fake_per_gene(sorted(set(table["perturbation"])))
    text = R.build_report(table, per_gene=genes)
    _check_html(text)
    # headings and narrow tables: cut by CSS with an ellipsis, whole in the title (hover)
    worst = re.search(r"<h3>worst: (.*?)</h3>", text).group(1)
    assert worst == f'<span class="nm" title="{long}">{long}</span>'  # P1 is the worst here
    css = re.search(r"\.nm\{([^}]*)\}", text).group(1)
    assert "text-overflow:ellipsis" in css and "overflow:hidden" in css and "max-width" in css
    # the per-perturbation table: the full name, wrapping, and in the title
    tab = text[text.index("Table: per perturbation") :]
    assert f'<td><span class="nm full" title="{long}">{long}</span></td>' in tab
    full = re.search(r"\.nm\.full\{([^}]*)\}", text).group(1)
    assert "white-space:normal" in full and "max-width:none" in full
    # in figure labels: shortened with an ellipsis
    from vcjax.report._page import NAME_CHARS, short

    assert short(long) == long[: NAME_CHARS - 1] + "…" and short("P1") == "P1"


def test_layout_has_no_fixed_widths():
    text = R.build_report(with_comparisons(fake_table(n_perts=6)), per_gene=fake_per_gene(
        [f"P{i}" for i in range(6)]))  # fmt: skip
    css = re.search(r"<style>(.*?)</style>", text, re.S).group(1)
    assert re.search(r"img\{[^}]*max-width:100%", css)
    assert re.search(r"figure\{[^}]*max-width:100%", css)
    assert re.search(r"table\{[^}]*max-width:100%", css)
    assert "@media (max-width:900px)" in css
    # no element asks for a width in pixels, images carry no width attribute
    body_css = css.split("@media")[0].replace("max-width:1240px", "")
    assert not re.search(r"width:\s*\d{3,}px", body_css)
    assert not re.search(r"<img[^>]*\swidth=", text)
    # headers can wrap after an underscore, numbers never wrap
    assert "technical_<wbr>duplicate" in text and re.search(r"td\{[^}]*white-space:nowrap", css)


def _count_off_axis_calibrated(values: np.ndarray) -> int:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    lo = max(min(-0.2, np.percentile(v, 2) - 0.1), -3.0)
    hi = min(max(1.2, np.percentile(v, 98) + 0.1), 3.0)
    return int(np.sum((v < lo) | (v > hi)))


def test_off_axis_points_are_drawn_and_counted():
    table = fake_table(n_perts=30, metrics=("r2w_delta", "pearson_delta_ctrl"), seed=2)
    sel = (table.metric == "r2w_delta") & (table.source == "model")
    cal = table.loc[sel, "calibrated"].to_numpy(float).copy()
    cal[:3] = [-12.0, -4.5, 9.0]  # far off on both sides
    table.loc[sel, "calibrated"] = cal
    # raw R²w(Δ) far below −2 for some baseline points (control-bias figure)
    nsel = (table.metric == "r2w_delta") & (table.source == "null")
    raw = table.loc[nsel, "value"].to_numpy(float).copy()
    raw[:5] = [-2.5, -7.0, -30.0, np.nan, -1.9]
    table.loc[nsel, "value"] = raw
    text = R.build_report(table)
    figs = re.findall(r'<figure data-off-axis="(\d+)"><img alt="([^"]*)"', text)
    by_alt = {alt: int(n) for n, alt in figs}
    expect = _count_off_axis_calibrated(cal)
    assert expect == 3
    assert by_alt["per-perturbation R²w(Δ)"] == expect
    assert f"off axis ({expect})" not in text  # the legend is in the PNG; the caption says it
    assert f"{expect} points lie beyond the axis, drawn as a triangle" in text
    # control bias: R²w(Δ) below −2 where Pearson(Δ vs control) is defined
    w = lambda m: table[table.metric == m].pivot(  # noqa: E731
        index="perturbation", columns="source", values="value"
    )
    x, y = w("pearson_delta_ctrl"), w("r2w_delta")
    ok = np.isfinite(x.to_numpy()) & np.isfinite(y.to_numpy())
    n_below = int(np.sum(ok & (y.to_numpy() < -2)))
    assert n_below == 3
    assert by_alt["control bias"] == n_below
    assert f"{n_below} points below R²w(Δ) = −2 drawn as ▼" in text
    # the helper that draws them returns the same count
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    assert R._off_axis(ax, cal, np.arange(cal.size), xlim=R.calibrated_limits(cal)) == expect
    plt.close(fig)


def test_delta_axis_has_units():
    assert R._delta_units({"normalization": "log1p_cp10k", "reference": "perturbed"}) == (
        "Δ log1p(counts per 10k) vs u_ALL (half 1)"
    )
    assert R._delta_units({"normalization": "none", "reference": "control"}) == (
        "Δ expression (input as given) vs control mean"
    )
    table = fake_table(n_perts=4)
    table.attrs["normalization"] = "log1p_cp10k"
    text = R.build_report(table, per_gene=fake_per_gene([f"P{i}" for i in range(4)]))
    assert "y axis: Δ log1p(counts per 10k) vs u_ALL (half 1)." in text


def test_calibrated_above_one_is_explained():
    table = fake_table(n_perts=5)
    sel = (table.metric == "r2w_delta") & (table.source == "model")
    table.loc[sel, "calibrated"] = 1.3
    text = R.build_report(table)
    assert (
        "A calibrated score above 1 means the model is closer to the truth than the technical duplicate"
        in text
    )
    assert "Values above 1 (shaded) are not an error" in text


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package 'chromium')")
@pytest.mark.parametrize("width", [800, 1400])
def test_report_has_no_sideways_scroll_in_chromium(tmp_path, width):
    """At 800 and 1,400 px the laid-out page is no wider than the window (a probe script,
    added to a copy of the page only, writes the document's scroll width into the DOM)."""
    long = "GENE0017_with_a_very_long_guide_identifier_" + "ABCDEFGHIJKLMNOP" * 8
    table = with_comparisons(fake_table(n_perts=12, intervals="value"))
    table["perturbation"] = table["perturbation"].replace("P3", long)
    worst = (table.perturbation == long) & (table.source == "model")
    table.loc[worst, "calibrated"] = -0.5  # its name heads the per-gene view
    genes = fake_per_gene(sorted(set(table["perturbation"])))
    text = R.build_report(table, per_gene=genes)
    assert f"worst: {long}" in text or f'title="{long}"' in text
    probe = text.replace(
        "</body>",
        "<script>document.body.setAttribute('data-sw', document.documentElement.scrollWidth"
        " + 'x' + window.innerWidth)</script></body>",
    )
    page = tmp_path / "probe.html"
    page.write_text(probe, encoding="utf-8")
    res = _chromium(
        tmp_path, "--hide-scrollbars", f"--window-size={width},2000", "--dump-dom",
        page.resolve().as_uri(),
    )  # fmt: skip
    m = re.search(r'data-sw="(\d+)x(\d+)"', res.stdout)
    assert m, res.stderr[-2000:]
    scroll, inner = int(m.group(1)), int(m.group(2))
    assert inner == width and scroll <= inner, (scroll, inner)
