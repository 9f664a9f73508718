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
    VOID = {"meta", "img", "br", "hr", "link", "input"}

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
    assert f"worst: {sub.idxmin()}" in text and f"best: {sub.idxmax()}" in text
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
    row = re.search(r"<tr><td>WMSE</td><td>dataset_mean</td>(.*?)</tr>", text).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[0] == fmt(0.4) and cells[1] == "1/3" and cells[2] == "1/3"
    assert cells[3] == fmt(np.mean([0.99, 0.8, 0.1]))
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
    float64 NumPy computation of the split pseudobulks (METRICS.md §2, §6)."""
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
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        page.resolve().as_uri(),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.exists(), res.stderr[-2000:]
    img = imread(shot)
    assert img.shape[0] == 2000 and img.shape[1] == 1280
    gray = img[..., :3].mean(axis=2)
    assert gray.std() > 0.05  # not blank
    # the embedded figures were drawn: a good share of the page is neither white nor text-grey
    assert (gray < 0.9).mean() > 0.02
