"""Tests of vcjax.confidence and vcjax.gene_sets against numpy/scipy references and synthetic truths."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.stats as st
from scipy import integrate

from vcjax import data as GS
from vcjax import uncertainty as C
from vcjax.report import plot_pathway_heatmap

ALPHA, DEC = 0.05, 3.0
REPLICATE_MEAN = 100 * (1 - ALPHA / (DEC * math.log(10)))  # 99.276


# ----------------------------------------------------------------------------- synthetic screen

P_SYN, G_SYN, N_CELLS, SD = 8, 150, 40, 0.3


def _population(seed=0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(2.0, 4.0, G_SYN)
    effects = rng.normal(0.0, 1.5, (P_SYN, G_SYN))
    effects[:, : G_SYN // 3] *= 0.05  # a third of the genes barely respond
    return base, base + effects


@pytest.fixture(scope="module")
def screen():
    """Dense Gaussian cells: control + P perturbations with known population means, plus an
    independent second sample (20 cells, the size of a half) of every perturbation."""
    base, mu = _population()
    rng = np.random.default_rng(1)
    blocks, labels = [rng.normal(base, SD, (N_CELLS, G_SYN))], ["control"] * N_CELLS
    perts = [f"P{i}" for i in range(P_SYN)]
    for i, p in enumerate(perts):
        blocks.append(rng.normal(mu[i], SD, (N_CELLS, G_SYN)))
        labels += [p] * N_CELLS
    X = np.vstack(blocks)
    genes = [f"G{j}" for j in range(G_SYN)]
    adata = ad.AnnData(
        X,
        obs=pd.DataFrame({"condition": labels}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=genes),
    )
    rng2 = np.random.default_rng(2)
    replicate = np.stack(
        [rng2.normal(mu[i], SD, (N_CELLS // 2, G_SYN)).mean(0) for i in range(P_SYN)]
    )
    rep_df = pd.DataFrame(replicate, index=perts, columns=genes)
    shuffled = pd.DataFrame(replicate[np.roll(np.arange(P_SYN), 1)], index=perts, columns=genes)
    return dict(
        adata=adata,
        mu=pd.DataFrame(mu, index=perts, columns=genes),
        replicate=rep_df,
        shuffled=shuffled,
        perts=perts,
        genes=genes,
    )


KW = dict(key="condition", control="control", normalize=None)


# ----------------------------------------------------------------------------- kernels


def test_confidence_score_formula_and_replicate_mean():
    p = np.array([1.0, 0.5, 0.05, 0.01, 0.001, 5e-5, 1e-9, 0.0, np.nan])
    ref = 100 * np.clip(1 + np.log10(np.maximum(p, 1e-300) / ALPHA) / DEC, 0, 1)
    ref[7] = 0.0
    got = np.asarray(C.confidence_score(p, alpha=ALPHA, decades=DEC), np.float64)
    np.testing.assert_allclose(got[:-1], ref[:-1], atol=1e-4)
    assert np.isnan(got[-1])
    # exact mean under a uniform p-value (a replicate): 100(1 − α/(D ln 10))
    u = (np.arange(200000) + 0.5) / 200000
    mean = float(np.mean(np.asarray(C.confidence_score(u), np.float64)))
    assert abs(mean - REPLICATE_MEAN) < 0.01


def test_gene_confidence_matches_scipy():
    rng = np.random.default_rng(0)
    v1, v2 = rng.uniform(0.1, 2, (5, 40)), rng.uniform(0.1, 2, (5, 40))
    n1, n2 = np.array([3, 10, 20, 50, 200.0])[:, None], np.array([4, 10, 21, 50, 201.0])[:, None]
    se, dof = C.replicate_noise(v2, n2, v1, n1)
    a, b = v1 / n1, v2 / n2
    np.testing.assert_allclose(np.asarray(se), np.sqrt(a + b), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(dof), (a + b) ** 2 / (a**2 / (n1 - 1) + b**2 / (n2 - 1)), rtol=1e-4
    )
    se_p, dof_p = C.replicate_noise(v2, n2)
    np.testing.assert_allclose(np.asarray(se_p), np.sqrt(b), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dof_p), np.broadcast_to(n2 - 1, b.shape))

    truth = rng.normal(size=(5, 40))
    pred = truth + np.asarray(se) * rng.normal(0, 2, (5, 40))
    z, p, c = C.gene_confidence(pred, truth, se, dof)
    z_ref = (pred - truth) / np.sqrt(a + b)
    p_ref = 2 * st.t.sf(np.abs(z_ref), np.asarray(dof, np.float64))
    np.testing.assert_allclose(np.asarray(z), z_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(p), p_ref, rtol=2e-3, atol=1e-6)
    c_ref = 100 * np.clip(1 + np.log10(p_ref / ALPHA) / DEC, 0, 1)
    np.testing.assert_allclose(np.asarray(c), c_ref, atol=0.05)
    # zero noise → NaN, not inf
    z0, p0, c0 = C.gene_confidence(1.0, 0.0, 0.0, 10.0)
    assert np.isnan(z0) and np.isnan(p0) and np.isnan(c0)


def test_gaussian_nll_crps_match_scipy():
    y = np.array([0.3, -1.2, 2.5, 0.0, 4.0])
    mu = np.array([0.0, 0.5, 2.0, 0.0, -1.0])
    var = np.array([1.0, 0.25, 4.0, 0.01, 2.0])
    nll = np.asarray(C.gaussian_nll(y, mu, var), np.float64)
    np.testing.assert_allclose(nll, -st.norm.logpdf(y, mu, np.sqrt(var)), rtol=1e-5)
    crps = np.asarray(C.gaussian_crps(y, mu, var), np.float64)
    for i in range(len(y)):  # CRPS = ∫ (F(x) − 1{x ≥ y})² dx
        sd = math.sqrt(var[i])
        f = lambda x, i=i, sd=sd: (st.norm.cdf(x, mu[i], sd) - (x >= y[i])) ** 2  # noqa: E731
        ref = (
            integrate.quad(f, mu[i] - 12 * sd, y[i], limit=200)[0]
            + integrate.quad(f, y[i], mu[i] + 12 * sd, limit=200)[0]
        )
        assert abs(crps[i] - ref) < 1e-5 * max(1, ref)
    assert float(C.gaussian_crps(1.0, 0.25, 0.0)) == pytest.approx(0.75)
    assert np.isnan(C.gaussian_nll(1.0, 0.0, 0.0)) and np.isnan(C.gaussian_crps(1.0, 0.0, -1.0))


def test_ensemble_crps_brute_force_and_mixture():
    rng = np.random.default_rng(3)
    E = 7
    ens = rng.normal(size=(E, 4, 6))
    ens[2] = ens[1]  # ties
    y = rng.normal(size=(4, 6))
    t1 = np.abs(ens - y).mean(0)
    pair = np.abs(ens[:, None] - ens[None]).sum((0, 1))
    np.testing.assert_allclose(
        np.asarray(C.ensemble_crps(y, ens)), t1 - pair / (2 * E * E), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(C.ensemble_crps(y, ens, fair=True)), t1 - pair / (2 * E * (E - 1)), atol=1e-5
    )
    # the standard estimator is the CRPS of the empirical distribution (integral form)
    xs = np.sort(ens[:, 0, 0])
    F = lambda x: np.searchsorted(xs, x, side="right") / E  # noqa: E731
    grid = np.linspace(min(xs.min(), y[0, 0]) - 1, max(xs.max(), y[0, 0]) + 1, 400001)
    ref = np.trapezoid((F(grid) - (grid >= y[0, 0])) ** 2, grid)
    assert abs(float(C.ensemble_crps(y, ens)[0, 0]) - ref) < 1e-4
    # with kernel noise: CRPS of the Gaussian mixture, by quadrature
    tau2 = 0.3
    got = float(C.ensemble_crps(y[:1, :1], ens[:, :1, :1], noise_var=tau2)[0, 0])
    m = ens[:, 0, 0]
    Fm = lambda x: st.norm.cdf(x, m, math.sqrt(tau2)).mean()  # noqa: E731
    f = lambda x: (Fm(x) - (x >= y[0, 0])) ** 2  # noqa: E731
    ref = (
        integrate.quad(f, -15, y[0, 0], limit=400)[0] + integrate.quad(f, y[0, 0], 15, limit=400)[0]
    )
    assert abs(got - ref) < 1e-5
    # τ² = 0 through the kernel path equals the sorted estimator
    np.testing.assert_allclose(
        np.asarray(C.ensemble_crps(y, ens, noise_var=0.0)), t1 - pair / (2 * E * E), atol=1e-5
    )


def test_spearman_matches_scipy_with_ties_and_mask():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 5, (6, 30)).astype(float)  # many ties
    y = x + rng.normal(0, 2, (6, 30))
    mask = rng.random((6, 30)) > 0.3
    got = np.asarray(C.spearman(x, y, where=mask), np.float64)
    for i in range(6):
        ref = st.spearmanr(x[i, mask[i]], y[i, mask[i]]).statistic
        assert abs(got[i] - ref) < 1e-5
    assert np.isnan(C.spearman(np.ones(10), np.arange(10.0)))


# ----------------------------------------------------------------------------- model uncertainty


def test_uncertainty_scores_calibrated_gaussian_and_reference():
    rng = np.random.default_rng(5)
    P, G = 40, 300
    mean = rng.normal(size=(P, G))
    var = rng.uniform(0.05, 2.0, (P, G))
    truth = mean + np.sqrt(var) * rng.normal(size=(P, G))
    u = C.uncertainty_scores(truth, mean, var, chunk_size=16)  # 3 chunks, last one padded
    for lv in (0.5, 0.8, 0.9, 0.95):
        assert abs(u.overall[f"coverage_{lv * 100:g}"] - lv) < 0.015
    assert abs(u.overall["mean_sq_z"] - 1) < 0.05
    assert u.overall["spearman"] > 0.3  # larger σ, larger errors
    # per-row values against numpy/scipy
    nll_ref = -st.norm.logpdf(truth, mean, np.sqrt(var)).mean(1)
    np.testing.assert_allclose(u.per_row["nll"], nll_ref, rtol=1e-4)
    sd = np.sqrt(var)
    z = (truth - mean) / sd
    crps_ref = (sd * (z * (2 * st.norm.cdf(z) - 1) + 2 * st.norm.pdf(z) - 1 / np.sqrt(np.pi))).mean(
        1
    )
    np.testing.assert_allclose(u.per_row["crps"], crps_ref, rtol=1e-4)
    cov_ref = (np.abs(z) <= st.norm.ppf(0.95)).mean(1)
    np.testing.assert_allclose(u.per_row["coverage_90"], cov_ref, atol=1e-6)
    sp_ref = [st.spearmanr(sd[i], np.abs(truth[i] - mean[i])).statistic for i in range(P)]
    np.testing.assert_allclose(u.per_row["spearman"], sp_ref, atol=2e-4)  # float32 ranks
    sp_all = st.spearmanr(sd.ravel(), np.abs(truth - mean).ravel()).statistic
    assert abs(u.overall["spearman"] - sp_all) < 1e-9
    # an overconfident model (σ² / 4) under-covers and has mean_sq_z ≈ 4
    o = C.uncertainty_scores(truth, mean, var / 4)
    assert o.overall["coverage_90"] < 0.6 and abs(o.overall["mean_sq_z"] - 4) < 0.3
    assert o.overall["nll"] > u.overall["nll"]


def test_uncertainty_scores_ensemble_and_mask():
    rng = np.random.default_rng(6)
    E, P, G = 12, 10, 80
    centre = rng.normal(size=(P, G))
    ens = centre + rng.normal(size=(E, P, G))
    truth = centre + rng.normal(size=(P, G))
    mask = rng.random(G) > 0.4
    u = C.uncertainty_scores(truth, ensemble=ens, where=mask, per_gene=True)
    t1 = np.abs(ens - truth).mean(0)
    pair = np.abs(ens[:, None] - ens[None]).sum((0, 1))
    crps_gene = t1 - pair / (2 * E * E)
    np.testing.assert_allclose(u.per_gene["crps"], crps_gene, atol=1e-5)
    np.testing.assert_allclose(u.per_row["crps"], crps_gene[:, mask].mean(1), atol=1e-5)
    m, v = ens.mean(0), ens.var(0, ddof=1)
    nll = -st.norm.logpdf(truth, m, np.sqrt(v))
    np.testing.assert_allclose(u.per_row["nll"], nll[:, mask].mean(1), rtol=1e-4)
    assert (u.per_row["n_genes"] == mask.sum()).all()
    # with measurement noise τ²: mixture CRPS; τ² = 0 reproduces the plain estimator
    un = C.uncertainty_scores(truth, ensemble=ens, noise_var=np.zeros((P, G)), where=mask)
    np.testing.assert_allclose(un.per_row["crps"], u.per_row["crps"], atol=1e-5)
    with pytest.raises(ValueError):
        C.uncertainty_scores(truth, m, -v)


# ----------------------------------------------------------------------------- GMT


def test_gmt_parsing_and_coverage(tmp_path):
    path = tmp_path / "sets.gmt"
    path.write_text(
        "SET_A\tdesc\tG1\tG2\tG2\tMISSING1\t\n"
        "\n"
        "SET_B\thttp://x\tG3\n"
        "SET_EMPTY\tnothing\n"
        "SET_NONE\tdesc\tNOPE1\tNOPE2\n"
    )
    sets = GS.read_gmt(path)
    assert sets == {
        "SET_A": ["G1", "G2", "MISSING1"],
        "SET_B": ["G3"],
        "SET_EMPTY": [],
        "SET_NONE": ["NOPE1", "NOPE2"],
    }
    gsm = GS.gene_set_masks(path, ["G0", "G1", "G2", "G3"])
    np.testing.assert_array_equal(
        gsm.masks, [[0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    )
    np.testing.assert_allclose(gsm.coverage[[0, 1, 3]], [2 / 3, 1.0, 0.0])
    assert np.isnan(gsm.coverage[2])
    assert gsm.missing["SET_A"] == ["MISSING1"]
    assert GS.gene_set_masks({"s": ["g1"]}, ["G1"], case_sensitive=False).n_present[0] == 1
    bad = tmp_path / "bad.gmt"
    bad.write_text("S\td\tA\nS\td\tB\n")
    with pytest.raises(ValueError, match="defined twice"):
        GS.read_gmt(bad)
    out = GS.write_gmt(sets, tmp_path / "round.gmt")
    assert GS.read_gmt(out) == sets


def test_example_gmt_overlaps_norman(shared_data):
    sets = GS.read_gmt(GS.example_gmt_path())
    assert len(sets) >= 5
    adata = ad.read_h5ad(shared_data("norman19_perturbench_devel.h5ad"), backed="r")
    gsm = GS.gene_set_masks(sets, adata.var_names)
    real = [i for i, n in enumerate(gsm.names) if n != "NOT_IN_NORMAN19"]
    assert (gsm.coverage[real] > 0.5).all() and (gsm.coverage[real] < 1).all()  # each lacks a gene
    assert gsm.coverage[gsm.names.index("NOT_IN_NORMAN19")] == 0


# ----------------------------------------------------------------------------- end to end


def test_gene_level_replicate_about_100_shuffled_low(screen):
    rep = C.confidence(screen["adata"], screen["replicate"], level="gene", **KW)
    assert list(rep.columns[:4]) == ["perturbation", "gene", "pred", "truth"]
    assert len(rep) == P_SYN * G_SYN
    # an independent replicate is distributed as the replicate noise: mean ≈ 99.28
    assert abs(rep["confidence"].mean() - REPLICATE_MEAN) < 1.0
    assert abs(rep["z"].std() - 1) < 0.1
    dup = C.confidence(screen["adata"], "technical_duplicate", level="gene", **KW)
    assert abs(dup["confidence"].mean() - REPLICATE_MEAN) < 1.0
    shuf = C.confidence(screen["adata"], screen["shuffled"], level="gene", **KW)
    resp = shuf["gene"].isin(screen["genes"][G_SYN // 3 :])  # genes that respond
    assert shuf["confidence"].mean() < 50
    assert shuf.loc[resp, "confidence"].mean() < 20
    # numpy reference of z from the cells
    a = screen["adata"]
    half = __import__("vcjax").split_halves(a.obs["condition"].to_numpy(), seed=42)
    p, g = "P3", 7
    sel = (a.obs["condition"] == p).to_numpy()
    x1, x2 = a.X[sel & (half == 1), g], a.X[sel & (half == 2), g]
    se_ref = math.sqrt(x1.var(ddof=1) / x1.size + x2.var(ddof=1) / x2.size)
    row = rep[(rep.perturbation == p) & (rep.gene == f"G{g}")].iloc[0]
    assert row["truth"] == pytest.approx(x2.mean(), rel=1e-9)
    assert row["z"] == pytest.approx(
        (screen["replicate"].loc[p, f"G{g}"] - x2.mean()) / se_ref, rel=1e-4
    )


def test_pathway_level(screen):
    sets = {
        "early": screen["genes"][:10],
        "late": screen["genes"][-12:] + ["NOT_THERE"],
        "absent": ["X1", "X2"],
    }
    df = C.confidence(
        screen["adata"],
        screen["replicate"],
        level="pathway",
        gene_sets=sets,
        n_boot=64,
        weights="uniform",
        **KW,
    )
    assert len(df) == P_SYN * 3
    late = df[df.gene_set == "late"]
    assert (late["coverage"] == 12 / 13).all() and (late["n_present"] == 12).all()
    assert df.loc[df.gene_set == "absent", ["confidence", "r2w_delta"]].isna().all().all()
    # point estimate = the kernel on the set (uniform weights) = numpy R² of deltas on the set
    from vcjax import prepare

    (ctx,) = prepare(screen["adata"], weights="uniform", **KW).strata
    idx = [screen["genes"].index(g) for g in sets["late"][:-1]]
    i = ctx.perturbations.index("P2")
    d_t = ctx.truth[i, idx] - ctx.reference[idx]
    d_p = screen["replicate"].loc["P2"].to_numpy()[idx] - ctx.reference[idx]
    ref = 1 - np.sum((d_t - d_p) ** 2) / np.sum((d_t - d_t.mean()) ** 2)
    got = late[late.perturbation == "P2"].iloc[0]
    assert got["r2w_delta"] == pytest.approx(ref, abs=1e-4)
    assert got["wmse"] == pytest.approx(
        np.mean((ctx.truth[i, idx] - screen["replicate"].loc["P2"].to_numpy()[idx]) ** 2), rel=1e-4
    )
    ok = late[["r2w_delta_ci_low", "r2w_delta_ci_high"]].notna().all(axis=1)
    assert ok.all()
    assert (late["r2w_delta_ci_low"] <= late["r2w_delta_ci_high"]).all()
    assert late["confidence"].mean() > 90
    fig = plot_pathway_heatmap(df)
    img = fig.axes[0].images[0].get_array()
    assert img.shape == (3, P_SYN)
    assert np.ma.is_masked(img[2, 0])  # the absent set is grey


def test_perturbation_level_matches_evaluate_and_bands(screen):
    from vcjax import evaluate

    ev = evaluate(screen["adata"], screen["shuffled"], **KW)
    df = C.confidence(
        screen["adata"],
        screen["shuffled"],
        level="perturbation",
        n_boot=64,
        interval="parametric",
        **KW,
    )
    ref = ev[(ev.source == "model") & (ev.metric == "r2w_delta")].set_index("perturbation")
    got = df.set_index("perturbation")
    np.testing.assert_allclose(
        got["value"], ref.loc[got.index, "value"], rtol=1e-5, atol=1e-6, equal_nan=True
    )
    np.testing.assert_allclose(
        got["calibrated"], ref.loc[got.index, "calibrated"], rtol=1e-5, atol=1e-6, equal_nan=True
    )
    assert (df["band"] == "low").mean() >= 0.75
    good = C.confidence(
        screen["adata"],
        screen["replicate"],
        level="perturbation",
        n_boot=64,
        interval="parametric",
        pred_var=np.full((P_SYN, G_SYN), SD**2 / 20),
        **KW,
    )
    assert (good["band"] == "high").mean() >= 0.75
    assert (good["ci_low"] <= good["calibrated"] + 1e-9).mean() >= 0.75
    assert good["gene_confidence"].mean() > 97
    # the replicate's own sampling variance is the right predictive variance: ~90 % coverage
    assert abs(good.attrs["uncertainty"]["coverage_90"] - 0.9) < 0.05
    for col in ("coverage_90", "nll", "crps", "spearman", "mean_sq_z"):
        assert col in good.columns


def test_confidence_band_rules():
    c = np.array([0.9, 0.9, 0.6, 0.3, 0.3, np.nan, 0.8])
    lo = np.array([0.6, 0.4, 0.5, 0.1, 0.1, np.nan, np.nan])
    hi = np.array([1.0, 1.0, 0.7, 0.45, 0.6, np.nan, np.nan])
    assert list(C.confidence_band(c, lo, hi)) == [
        "high",
        "medium",
        "medium",
        "low",
        "medium",
        "undefined",
        "high",
    ]


def test_norman_duplicate_gene_confidence(shared_data):
    adata = ad.read_h5ad(shared_data("norman19_perturbench_devel.h5ad"))
    dup = C.confidence(
        adata,
        "technical_duplicate",
        key="condition",
        control="control",
        level="perturbation",
        n_boot=0,
    )
    null = C.confidence(
        adata, "null", key="condition", control="control", level="perturbation", n_boot=0
    )
    assert dup["gene_confidence"].mean() > 97
    assert dup["gene_confidence_degs"].mean() > 90
    assert null["gene_confidence_degs"].mean() < dup["gene_confidence_degs"].mean() - 30


@pytest.mark.slow
def test_perturbation_cell_bootstrap_matches_evaluate(screen):
    from vcjax import evaluate

    df = C.confidence(
        screen["adata"],
        screen["replicate"],
        level="perturbation",
        n_boot=50,
        interval="bootstrap",
        **KW,
    )
    pred = (screen["perts"], screen["replicate"].to_numpy(), screen["genes"])
    ev = evaluate(screen["adata"], pred, n_boot=50, **KW)
    ref = (
        ev[(ev.source == "model") & (ev.metric == "r2w_delta")]
        .set_index("perturbation")
        .loc[screen["perts"]]
    )
    got = df.set_index("perturbation").loc[screen["perts"]]
    np.testing.assert_allclose(got["ci_low"], ref["calibrated_ci_low"], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got["ci_high"], ref["calibrated_ci_high"], rtol=1e-6, equal_nan=True)


# ------------------------------------------------- pathway score: calibrated, NaN where undefined

# The pathway score (module docstring of vcjax.uncertainty._confidence): per set,
# calibrated = R²w(Δ)(pred) / R²w(Δ)(duplicate), confidence = 100·clip(calibrated, 0, 1).
RESP = [f"G{j}" for j in range(50, 150)]  # genes with large effects in the fixture
FLAT = [f"G{j}" for j in range(50)]  # genes that barely respond


def _diluted(screen):
    """Weights like DEG weights (1 on responding genes, 0.001 elsewhere, 0 on G0–G1) and
    sets of 2 responding + 10 flat genes: the flat genes dominate an unweighted gene mean,
    the responding ones R²w(Δ)."""
    from vcjax import prepare

    base = prepare(screen["adata"], weights="uniform", **KW)
    (st,) = base.strata
    w = np.full((len(st.perturbations), G_SYN), 1e-3)
    w[:, 50:] = 1.0
    w[:, :2] = 0.0
    sets = {f"D{k}": RESP[2 * k : 2 * k + 2] + FLAT[2 + 10 * k : 12 + 10 * k] for k in range(4)}
    sets.update(
        NOWEIGHT=["G0", "G1"],  # no weight
        ONE=["G0", "G60"],  # one weighted gene
        FLATTRUTH=["G140", "G141", "G142"],  # made constant below
    )
    return prepare(screen["adata"], weights=w, **KW), st.perturbations, sets


@pytest.fixture(scope="module")
def diluted(screen):
    a = screen["adata"].copy()
    a.X[:, 140:143] = 1.0  # a constant gene: every cell 1.0 (truth constant on FLATTRUTH)
    scr, perts, sets = _diluted(dict(screen, adata=a))
    rep = screen["replicate"].loc[list(perts)]
    kw = dict(level="pathway", gene_sets=sets, n_boot=64)
    return dict(
        sets=sets,
        screen=scr,
        perts=perts,
        mean=C.confidence(scr, "dataset_mean", **kw),
        rep=C.confidence(scr, rep.to_numpy(), **kw),
    )


def test_pathway_undefined_sets_are_nan_with_reason(diluted):
    for df in (diluted["mean"], diluted["rep"]):
        by = df.set_index(["gene_set", "perturbation"])
        for name, why in (
            ("NOWEIGHT", "no_weight"),
            ("ONE", "too_few_genes"),
            ("FLATTRUTH", "constant_truth"),
        ):
            rows = by.loc[name]
            assert rows["confidence"].isna().all(), name  # never 100
            assert (rows["reason"] == why).all(), (name, rows["reason"].unique())
            assert rows["calibrated"].isna().all() and rows["r2w_delta"].isna().all()
            assert (rows["band"] == "undefined").all()
        d = df[df.gene_set.str.startswith("D")]
        assert d["reason"].isin(["", "duplicate_not_better"]).all()
        assert (d["reason"] == "").sum() >= 28
        assert (d["confidence"].notna() == (d["reason"] == "")).all()


def test_pathway_negative_r2_against_good_duplicate_scores_low(diluted):
    df = diluted["mean"]
    bad = (df["r2w_delta"] < 0) & (df["r2w_delta_duplicate"] > 0.5)
    assert bad.sum() >= 16  # most (perturbation, D-set) pairs
    assert (df.loc[bad, "confidence"] == 0).all()
    assert (df.loc[bad, "band"] != "high").all()
    # the diluted unweighted gene mean would have said ~80: the flat genes are right
    assert df.loc[bad, "gene_confidence"].median() > 75


def test_pathway_dataset_mean_far_below_a_good_model(diluted):
    d = diluted["mean"][diluted["mean"].gene_set.str.startswith("D")]
    r = diluted["rep"][diluted["rep"].gene_set.str.startswith("D")]
    assert d["confidence"].median() < 5  # NaN skipped
    assert r["confidence"].median() > 80
    assert r["confidence"].median() - d["confidence"].median() > 75
    # numpy float64 reference of the score: R²w(Δ) ratio on the set, clipped
    (st,) = diluted["screen"].strata
    i, s = 3, "D1"
    idx = [int(g[1:]) for g in diluted["sets"][s]]
    w = np.asarray(st.weights, np.float64)[i, idx]
    dt = st.truth[i, idx] - st.reference[idx]

    def r2(p):
        dp = p[idx] - st.reference[idx]
        mu = np.sum(w * dt) / w.sum()
        return 1 - np.sum(w * (dt - dp) ** 2) / np.sum(w * (dt - mu) ** 2)

    dup = np.asarray(st.baselines["technical_duplicate"], np.float64)[i]
    got = r[(r.perturbation == st.perturbations[i]) & (r.gene_set == s)].iloc[0]
    assert got["r2w_delta_duplicate"] == pytest.approx(r2(dup), abs=2e-4)
    assert got["calibrated"] == pytest.approx(got["r2w_delta"] / r2(dup), rel=1e-3)
    assert got["confidence"] == pytest.approx(100 * np.clip(got["calibrated"], 0, 1), abs=1e-9)


def _contains(df, col, lo_ok=-np.inf, hi_ok=np.inf):
    est, lo, hi = df[col], df[col + "_ci_low"], df[col + "_ci_high"]
    fin = est.notna()
    assert (lo[fin].notna() & hi[fin].notna()).all(), col
    assert (lo[~fin].isna() & hi[~fin].isna()).all(), col
    assert ((lo[fin] <= est[fin]) & (est[fin] <= hi[fin])).all(), col
    assert (lo[fin] >= lo_ok).all() and (hi[fin] <= hi_ok).all(), col


def test_pathway_intervals_contain_estimate_and_stay_in_range(diluted, screen):
    # three sets and n_boot=64, as test_pathway_level (one compile)
    sets = {"late": screen["genes"][-12:], "mixed": screen["genes"][40:55], "few": RESP[:3]}
    from vcjax import prepare

    (st,) = prepare(screen["adata"], weights="uniform", **KW).strata
    oracle = pd.DataFrame(st.truth, index=list(st.perturbations), columns=list(st.genes))
    frames = []
    for pred in (oracle, screen["replicate"], screen["shuffled"]):  # oracle: R²w = 1, WMSE = 0
        frames.append(
            C.confidence(
                screen["adata"],
                pred,
                level="pathway",
                gene_sets=sets,
                n_boot=64,
                weights="uniform",
                **KW,
            )
        )
    assert (frames[0]["r2w_delta"] == 1).all()
    for df in frames + [diluted["mean"], diluted["rep"]]:
        _contains(df, "r2w_delta", hi_ok=1.0)
        _contains(df, "wmse", lo_ok=0.0)
        _contains(df, "calibrated")
    # perturbation level, parametric draws: the interval holds the calibrated estimate
    per = C.confidence(
        screen["adata"],
        screen["replicate"],
        level="perturbation",
        n_boot=64,
        interval="parametric",
        **KW,
    )
    fin = per["calibrated"].notna()
    assert ((per["ci_low"] <= per["calibrated"]) & (per["calibrated"] <= per["ci_high"]))[fin].all()


def test_deg_weighted_gene_confidence_summaries(diluted, screen):
    scr = diluted["screen"]
    (st,) = scr.strata
    rep = screen["replicate"].loc[list(st.perturbations)].to_numpy()
    gene = C.confidence(scr, rep, level="gene")
    per = C.confidence(scr, rep, level="perturbation", n_boot=0).set_index("perturbation")
    w = np.asarray(st.weights, np.float64)
    c = gene["confidence"].to_numpy(np.float64).reshape(w.shape)
    np.testing.assert_allclose(gene["weight"].to_numpy().reshape(w.shape), w, rtol=1e-6)
    fin = np.isfinite(c)
    ref = np.sum(np.where(fin, w * c, 0), 1) / np.sum(np.where(fin, w, 0), 1)
    np.testing.assert_allclose(
        per.loc[list(st.perturbations), "gene_confidence_weighted"], ref, rtol=1e-6
    )
    np.testing.assert_allclose(
        per.loc[list(st.perturbations), "gene_confidence"], np.nanmean(c, 1), rtol=1e-6
    )
    # per set: weighted and unweighted means over the set's genes
    pw = diluted["rep"].set_index(["perturbation", "gene_set"])
    idx = [int(g[1:]) for g in diluted["sets"]["D2"]]
    for i, p in enumerate(st.perturbations):
        row = pw.loc[(p, "D2")]
        ww, cc = w[i, idx], c[i, idx]
        assert row["gene_confidence_weighted"] == pytest.approx(
            np.sum(ww * cc) / np.sum(ww), rel=1e-6
        )
        assert row["gene_confidence"] == pytest.approx(cc.mean(), rel=1e-6)
    # the weighted summary sees what the unweighted one dilutes
    dm = C.confidence(scr, "dataset_mean", level="perturbation", n_boot=0)
    assert dm["gene_confidence_weighted"].mean() < 25
    assert dm["gene_confidence"].mean() > dm["gene_confidence_weighted"].mean() + 20


@pytest.mark.slow
def test_norman_pathway_confidence(shared_data):
    from vcjax import prepare
    from vcjax.pipeline import known_models

    scr = prepare(
        shared_data("norman19_perturbench_devel.h5ad"), key="condition", control="control"
    )
    good = known_models(scr)["other half + noise"]
    kw = dict(level="pathway", gene_sets="example", n_boot=50)
    dm = C.confidence(scr, "dataset_mean", **kw)
    dup = C.confidence(scr, "technical_duplicate", **kw)
    noisy = C.confidence(scr, good, **kw)
    for df in (dm, dup, noisy):
        bad = (df["r2w_delta"] < 0) & (df["r2w_delta_duplicate"] > 0.5)
        assert (df.loc[bad, "confidence"] == 0).all()
    assert dm["confidence"].median() < 5  # over the defined sets (NaN skipped)
    for df in (dm, dup, noisy):
        undefined = df["reason"] != ""
        assert undefined.sum() > 100 and df.loc[undefined, "confidence"].isna().all()
        assert df.loc[~undefined, "confidence"].notna().all()
        _contains(df, "r2w_delta", hi_ok=1.0)
        _contains(df, "calibrated")
    # measured (n_boot irrelevant): medians over the 52 defined sets 0 / 100, means 3.7 / 100
    assert dm.loc[dm.reason == "", "confidence"].median() < 5
    assert dup.loc[dup.reason == "", "confidence"].median() == 100
    assert dm.loc[dm.reason == "", "confidence"].mean() < 10
    assert noisy.loc[noisy.reason == "", "confidence"].mean() > 15  # between the two
