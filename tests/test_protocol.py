"""Protocols (``evaluate(..., protocol=)``): cell-eval 0.8.2's metrics against independent
float64 NumPy/scipy references, against cell-eval itself (``peers``), the errors, and sweeps.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sps
import scipy.stats as ss
from scipy.spatial.distance import cdist

import vcjax
from vcjax import peers
from vcjax._errors import VcjaxInputError
from vcjax.peers import _celleval as ce

CTRL = "non-targeting"


def _screen(seed=0, g=36, n_ctrl=(60, 50), n_per=(24, 20), noise=0.8, counts=False):
    """Real and predicted cells (both with control cells); labels partly gene names."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i:02d}" for i in range(g)]
    perts = ["G03", "G10", "G17", "G25", "pertA", "pertB", "pertC", "pertZ"]  # Z: no effect
    base = rng.gamma(2.0, 1.5, g)
    eff = np.zeros((len(perts), g))
    for i, p in enumerate(perts[:-1]):
        idx = rng.choice(g, 6, replace=False)
        eff[i, idx] = rng.normal(scale=1.3, size=6)
        if p in genes:
            eff[i, genes.index(p)] = -2.0

    def make(nc, npert, noise_, scale):
        xs = [rng.poisson(base, (nc, g))]
        lab = [CTRL] * nc
        for i, p in enumerate(perts):
            e = eff[i] * scale + noise_ * rng.normal(size=g)
            xs.append(rng.poisson(base * np.exp(e), (npert, g)))
            lab += [p] * npert
        c = np.concatenate(xs)
        if counts:
            return c.astype(np.int64), np.array(lab)
        x = np.log1p(c / np.maximum(c.sum(1, keepdims=True), 1) * 1e3)
        return x.astype(np.float32), np.array(lab)

    xr, lr = make(n_ctrl[0], n_per[0], 0.0, 1.0)
    xp, lp = make(n_ctrl[1], n_per[1], noise, 0.7)
    return genes, xr, lr, xp, lp


# --------------------------------------------------------------------------- references


def _ref_de(x, lab, perts):
    """scipy Mann-Whitney (asymptotic) per perturbation vs control, BH by hand, lfc."""
    x = x.astype(np.float64)
    ctrl = x[lab == CTRL]
    fdr, lfc = [], []
    for p in perts:
        xp = x[lab == p]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pv = ss.mannwhitneyu(xp, ctrl, method="asymptotic", axis=0).pvalue
        pv = np.where(np.isnan(pv), 1.0, np.clip(pv, 0, 1))  # constant gene: p = 1 (pdex)
        g = pv.size
        order = np.argsort(pv)
        adj = pv[order] * g / np.arange(1, g + 1)
        adj = np.minimum.accumulate(adj[::-1])[::-1]
        q = np.empty(g)
        q[order] = np.minimum(adj, 1.0)
        fdr.append(q)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.log2(np.expm1(xp.mean(0)) / np.expm1(ctrl.mean(0)))
        lfc.append(np.where(np.isnan(v), 0.0, v))
    return np.array(fdr), np.array(lfc)


def _ordered(s, lfc):
    """Genes of set ``s`` by |lfc| descending, ties in gene order."""
    idx = np.flatnonzero(s)
    return idx[np.argsort(-np.abs(lfc[idx]), kind="stable")]


def _roc_pairs(score, y):
    pos, neg = score[y], score[~y]
    if pos.size == 0 or neg.size == 0:
        return np.nan
    d = pos[:, None] - neg[None, :]
    return ((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size


def _ap_thresholds(score, y):
    if y.sum() == 0 or y.all():
        return np.nan
    ap, prev = 0.0, 0.0
    for t in np.sort(np.unique(score))[::-1]:
        called = score >= t
        tp = (called & y).sum()
        ap += (tp - prev) / y.sum() * tp / called.sum()
        prev = tp
    return ap


def _edist(x, lab, perts):
    c = x[lab == CTRL].astype(np.float64)
    scc = cdist(c, c).mean()
    out = []
    for p in perts:
        a = x[lab == p].astype(np.float64)
        out.append(2 * cdist(a, c).mean() - cdist(a, a).mean() - scc)
    return np.array(out)


def _reference(genes, xr, lr, xp, lp):
    """cell-eval 0.8.2's per-perturbation metrics from their definitions, float64, loops."""
    perts = sorted(set(lr) - {CTRL})
    names = [*perts, CTRL]
    rb = np.stack([xr[lr == p].astype(np.float64).mean(0) for p in names])
    pb = np.stack([xp[lp == p].astype(np.float64).mean(0) for p in names])
    td, pd_ = rb[:-1] - rb[-1], pb[:-1] - pb[-1]
    t_fdr, t_lfc = _ref_de(xr, lr, perts)
    p_fdr, p_lfc = _ref_de(xp, lp, perts)
    P = len(perts)
    out = {m: np.full(P, np.nan) for m in ce.CELLEVAL_METRICS}
    for i, p in enumerate(perts):
        ts, ps = t_fdr[i] < 0.05, p_fdr[i] < 0.05
        T, D = _ordered(ts, t_lfc[i]), _ordered(ps, p_lfc[i])
        for k in (None, 50, 100, 200, 500):
            for mode, base in (("overlap", T.size), ("precision", D.size)):
                ke = base if k is None else min(k, base)
                v = len(set(T[:ke]) & set(D[:ke])) / ke if ke else 0.0
                out[f"{mode}_at_{k or 'N'}"][i] = v
        out["de_nsig_counts_real"][i] = T.size
        out["de_nsig_counts_pred"][i] = D.size
        if T.size:
            out["de_direction_match"][i] = np.mean(np.sign(t_lfc[i, ts]) == np.sign(p_lfc[i, ts]))
            out["de_sig_genes_recall"][i] = (ts & ps).sum() / ts.sum()
            if T.size > 1:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out["de_spearman_lfc_sig"][i] = ss.spearmanr(t_lfc[i, ts], p_lfc[i, ts])[0]
        score = -np.log10(np.clip(p_fdr[i], 1e-10, 1.0))
        out["roc_auc"][i] = _roc_pairs(score, ts)
        out["pr_auc"][i] = _ap_thresholds(score, ts)
        out["pearson_delta"][i] = np.corrcoef(pd_[i], td[i])[0, 1]
        out["mse"][i] = np.mean((pb[i] - rb[i]) ** 2)
        out["mae"][i] = np.mean(np.abs(pb[i] - rb[i]))
        out["mse_delta"][i] = np.mean((pd_[i] - td[i]) ** 2)
        out["mae_delta"][i] = np.mean(np.abs(pd_[i] - td[i]))
        keep = np.array([gname != p for gname in genes])
        for dist, metric in (("l1", "cityblock"), ("l2", "euclidean"), ("cosine", "cosine")):
            d = cdist(td[:, keep], pd_[i : i + 1, keep], metric=metric).ravel()
            out[f"discrimination_score_{dist}"][i] = 1 - (d < d[i]).sum() / P
    n_t, n_p = out["de_nsig_counts_real"], out["de_nsig_counts_pred"]
    has = n_t > 0
    out["de_spearman_sig"][:] = ss.spearmanr(n_t[has], n_p[has])[0] if has.any() else 1.0
    e_r, e_p = _edist(xr, lr, perts), _edist(xp, lp, perts)
    out["pearson_edistance"][:] = np.corrcoef(e_r, e_p)[0, 1]
    return perts, out, (t_fdr, p_fdr)


@pytest.fixture(scope="module")
def pair():
    return _screen()


@pytest.fixture(scope="module")
def truth(pair):
    genes, xr, lr, _, _ = pair
    return peers.celleval_truth(xr, lr, genes, control=CTRL)


@pytest.fixture(scope="module")
def ours(pair, truth):
    _, _, _, xp, lp = pair
    return peers.celleval_scores(truth, xp, lp)


@pytest.fixture(scope="module")
def reference(pair):
    return _reference(*pair)


def test_every_metric_named_and_non_trivial(ours, reference):
    perts, ref, _ = reference
    assert ours["perts"] == perts
    assert list(ours["metrics"]) == list(ce.CELLEVAL_METRICS)
    # the screen exercises the metrics: DEGs on both sides, scores that vary, and a
    # perturbation without truth DEGs (NaN where cell-eval reports null, 0 for overlaps)
    n_t = ref["de_nsig_counts_real"]
    assert (n_t[:-1] > 0).all() and n_t[-1] == 0 and (ref["de_nsig_counts_pred"] > 0).all()
    assert np.isnan(ours["metrics"]["de_direction_match"][-1])
    assert ours["metrics"]["overlap_at_N"][-1] == 0
    for m in ("overlap_at_N", "pr_auc", "discrimination_score_l1", "pearson_delta"):
        assert np.nanmax(ref[m]) > np.nanmin(ref[m]), m


@pytest.mark.parametrize("metric", ce.CELLEVAL_METRICS)
def test_metric_against_numpy_reference(ours, reference, metric):
    _, ref, _ = reference
    got, want = ours["metrics"][metric], ref[metric]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=metric)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0, equal_nan=True, err_msg=metric)


def test_de_tables_and_deg_counts_match_scipy(truth, reference):
    _, _, (t_fdr, _) = reference
    np.testing.assert_allclose(truth.fdr, t_fdr, rtol=2e-4, atol=1e-7)
    np.testing.assert_array_equal(truth.n_deg, (t_fdr < 0.05).sum(1))


def test_masked_spearman_and_auc_kernels_with_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, (6, 30)).astype(float)  # many ties
    y = rng.integers(0, 4, (6, 30)).astype(float)
    m = rng.random((6, 30)) < 0.6
    got = np.asarray(peers.masked_spearman(x, y, m))
    want = [ss.spearmanr(x[i, m[i]], y[i, m[i]])[0] for i in range(6)]
    np.testing.assert_allclose(got, want, atol=1e-6)
    lab = rng.random((6, 30)) < 0.3
    lab[5] = False  # no positive: undefined
    roc, ap = map(np.asarray, peers.de_auc(x, lab))
    np.testing.assert_allclose(roc, [_roc_pairs(x[i], lab[i]) for i in range(6)], atol=1e-6)
    np.testing.assert_allclose(ap, [_ap_thresholds(x[i], lab[i]) for i in range(6)], atol=1e-6)
    assert np.isnan(roc[5]) and np.isnan(ap[5])


@pytest.mark.parametrize("form", ["dense", "csr"])
def test_counts_normalised_as_celleval(form):
    """Counts → scanpy normalize_total (median total: of the non-zero totals for a dense
    matrix, of every total for a sparse one) then log1p; log1p input is left alone."""
    rng = np.random.default_rng(2)
    c = rng.poisson(2.0, (40, 15)).astype(np.int64)
    c[3] = 0  # an empty cell: it stays 0, and moves the sparse median
    x = sps.csr_matrix(c) if form == "csr" else c
    got, how = peers.celleval_normalize(x)
    assert how == "log1p_median"
    got = got.toarray() if sps.issparse(got) else got
    tot = c.sum(1).astype(np.float64)
    target = np.median(tot if form == "csr" else tot[tot > 0])
    factor = np.where(tot > 0, tot / target, 1.0)
    np.testing.assert_allclose(got, np.log1p(c / factor[:, None]), rtol=1e-6, atol=1e-6)
    lg = np.log1p(c).astype(np.float32)
    same, how = peers.celleval_normalize(lg)
    assert how == "none" and np.array_equal(same, lg)
    with pytest.raises(VcjaxInputError, match="maximum .* >= 15"):
        peers.celleval_normalize(lg * 10 + 0.5)
    with pytest.raises(VcjaxInputError, match="negative"):
        peers.celleval_normalize(lg - 1.5)


def test_counts_input_equals_normalised_input(pair):
    """Integer counts on either side give the values of their normalised matrices."""
    genes, xr, lr, xp, lp = _screen(seed=3, counts=True)
    a = peers.celleval_protocol(xr, lr, xp, lp, genes, control=CTRL, metrics=["mae"])
    nr, _ = peers.celleval_normalize(xr)
    npred, _ = peers.celleval_normalize(xp)
    b = peers.celleval_protocol(nr, lr, npred, lp, genes, control=CTRL, metrics=["mae"])
    np.testing.assert_allclose(a["metrics"]["mae"], b["metrics"]["mae"], rtol=1e-6)
    assert a["normalization"] == "log1p_median"


# --------------------------------------------------------------------------- evaluate


def _adata(x, lab, genes):
    obs = pd.DataFrame({"target": pd.Categorical(lab)}, index=[f"c{i}" for i in range(len(lab))])
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes))


def test_evaluate_table(pair, truth, ours):
    genes, _, _, xp, lp = pair
    t = vcjax.evaluate(truth, _adata(xp, lp, genes), key="target", protocol="cell-eval")
    assert t.attrs["protocol"] == "cell-eval"
    assert list(t.columns) == ["perturbation", "metric", "source", "value", "calibrated", "note"]
    assert (t["source"] == "model").all() and t["calibrated"].isna().all()
    per = t[t["perturbation"] != "(all)"]
    for m in ce.CELLEVAL_METRICS:
        rows = per[per["metric"] == m]
        if m in ce.DATASET_LEVEL:
            assert rows.empty
            (v,) = t.loc[t["metric"] == m, "value"]
            assert v == pytest.approx(ours["metrics"][m][0], nan_ok=True)
            continue
        assert list(rows["perturbation"]) == ours["perts"]
        np.testing.assert_array_equal(rows["value"].to_numpy(), ours["metrics"][m])


# --------------------------------------------------------------------------- errors


def test_unknown_protocol_lists_the_known_ones(pair, truth):
    genes, _, _, xp, lp = pair
    with pytest.raises(
        VcjaxInputError, match=r"unknown protocol 'celleval'; known: dbd, cell-eval"
    ):
        vcjax.evaluate(truth, _adata(xp, lp, genes), key="target", protocol="celleval")
    with pytest.raises(VcjaxInputError, match="unknown protocol"):
        vcjax.sweep(truth, {"a": _adata(xp, lp, genes)}, key="target", protocol="nope")


@pytest.mark.parametrize(
    "option", [dict(reference="control"), dict(weights="uniform"), dict(n_boot=10),
               dict(normalize=None), dict(covariate="cell_type")],
)  # fmt: skip
def test_option_fixed_by_protocol_is_named(pair, truth, option):
    genes, _, _, xp, lp = pair
    (name,) = option
    with pytest.raises(VcjaxInputError, match=rf"fixes {name}= .*leave {name} at its default"):
        vcjax.evaluate(truth, _adata(xp, lp, genes), key="target", protocol="cell-eval", **option)


def test_prediction_without_control_cells_names_the_label(pair, truth):
    genes, _, _, xp, lp = pair
    keep = lp != CTRL
    with pytest.raises(VcjaxInputError, match=r"own control cells.*'non-targeting'"):
        vcjax.evaluate(truth, _adata(xp[keep], lp[keep], genes), key="target", protocol="cell-eval")


def test_pseudobulk_prediction_is_refused(pair, truth):
    genes, _, _, xp, lp = pair
    names = sorted(set(lp))
    bulk = pd.DataFrame([xp[lp == p].mean(0) for p in names], index=names, columns=genes)
    with pytest.raises(VcjaxInputError, match="needs predicted cells with control cells"):
        vcjax.evaluate(truth, bulk, key="target", protocol="cell-eval")
    one_row = _adata(bulk.to_numpy(np.float32), names, genes)
    with pytest.raises(VcjaxInputError, match="one row per perturbation"):
        vcjax.evaluate(truth, one_row, key="target", protocol="cell-eval")


def test_cli_protocol_errors(tmp_path, pair):
    from typer.testing import CliRunner

    from vcjax.cli import app

    genes, xr, lr, xp, lp = pair
    _adata(xr, lr, genes).write_h5ad(tmp_path / "real.h5ad")
    _adata(xp, lp, genes).write_h5ad(tmp_path / "pred.h5ad")
    base = ["score", "--truth", str(tmp_path / "real.h5ad"), "--pred", str(tmp_path / "pred.h5ad"),
            "-k", "target", "-c", CTRL, "--out", str(tmp_path / "o.csv")]  # fmt: skip
    r = CliRunner().invoke(app, [*base, "--protocol", "celleval"])
    assert r.exit_code == 2 and "unknown protocol 'celleval'; known: dbd, cell-eval" in r.output
    r = CliRunner().invoke(app, [*base, "--protocol", "cell-eval", "--reference", "control"])
    assert r.exit_code == 2
    assert "--protocol cell-eval fixes --reference" in r.output
    assert "leave out --reference" in r.output
    r = CliRunner().invoke(app, [*base, "--protocol", "cell-eval", "--report", "x.html"])
    assert r.exit_code == 2 and "leave out --report" in r.output
    assert not (tmp_path / "o.csv").exists()


# --------------------------------------------------------------------------- sweep


def test_sweep_equals_per_model_evaluate(pair, truth):
    genes, _, _, xp, lp = pair
    _, _, _, xq, lq = _screen(seed=0, noise=0.3)  # the same truth, a closer prediction
    models = {"a": _adata(xp, lp, genes), "b": _adata(xq, lq, genes)}
    res = vcjax.sweep(truth, models, key="target", protocol="cell-eval", n_boot=40, seed=3)
    assert res.info["protocol"] == "cell-eval" and res.info["resample"] == "perturbations"
    for name, pred in models.items():
        t = vcjax.evaluate(truth, pred, key="target", protocol="cell-eval")
        s = res.table[res.table["model"] == name].drop(columns="model").reset_index(drop=True)
        want = t.drop(columns="source").reset_index(drop=True)
        pd.testing.assert_frame_equal(s, want, check_dtype=False)
    lb = res.leaderboard("mae", calibrated=False)
    means = res.table[res.table["metric"] == "mae"].groupby("model")["value"].mean()
    np.testing.assert_allclose(lb.loc[["a", "b"], "value"], means.loc[["a", "b"]])
    assert lb.index[0] == means.idxmin()  # mae: lower is better
    assert np.isfinite(lb["ci_low"]).all() and (lb["ci_low"] <= lb["value"]).all()
    assert res.resampled[("mae", False, "mean")].shape == (2, 40)
    assert ("pearson_edistance", False, "mean") not in res.resampled  # dataset-level
    with pytest.raises(VcjaxInputError, match="not calibrated: pass calibrated=False"):
        res.leaderboard("mae")
    with pytest.raises(VcjaxInputError, match="resamples perturbations only"):
        vcjax.sweep(truth, models, key="target", protocol="cell-eval", resample="cells")


# --------------------------------------------------------------------------- cell-eval itself


@pytest.mark.peers
def test_parity_with_cell_eval_full_profile(tmp_path):
    """Every per-perturbation metric of cell-eval 0.8.2's ``full`` profile, on a pair whose
    prediction has its own control cells, equals vcjax's within 1e-4 (log1p input), and
    again with integer counts on both sides (cell-eval normalises them itself)."""
    pytest.importorskip("cell_eval")
    from cell_eval import MetricsEvaluator

    worst = {}
    for counts in (False, True):
        genes, xr, lr, xp, lp = _screen(seed=5, g=50, counts=counts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ev = MetricsEvaluator(
                adata_pred=_adata(xp, lp, genes),
                adata_real=_adata(xr, lr, genes),
                control_pert=CTRL,
                pert_col="target",
                outdir=str(tmp_path / f"out{counts}"),
                num_threads=1,
            )
            res, _ = ev.compute(
                profile="full", skip_metrics=list(ce.NOT_REPRODUCED), write_csv=False
            )
        theirs = res.to_pandas().set_index("perturbation").sort_index()
        mine = peers.celleval_protocol(xr, lr, xp, lp, genes, control=CTRL)
        assert list(theirs.index) == mine["perts"]
        assert set(theirs.columns) == set(ce.CELLEVAL_METRICS)
        for m in ce.CELLEVAL_METRICS:
            want = theirs[m].to_numpy(np.float64)
            got = mine["metrics"][m]
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=m)
            diff = np.abs(got - want)
            worst[m] = max(worst.get(m, 0.0), float(np.nanmax(diff, initial=0.0)))
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, equal_nan=True, err_msg=m)
    print("max |vcjax - cell-eval| per metric:", worst)


# ------------------------------------------------------------------ vcc2026


def _vcc_adata(x, lab, genes, *, key="target"):
    obs = pd.DataFrame({key: pd.Categorical(lab)}, index=[f"c{i}" for i in range(len(lab))])
    return ad.AnnData(sps.csr_matrix(x.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes))


@pytest.fixture(scope="module")
def vcc_pair():
    from tests.test_vcc2026 import _screen as vcc_screen

    xr, lr, genes = vcc_screen(1)
    models = {}
    for seed in (2, 3):
        xp, lp, _ = vcc_screen(seed, jitter=True)
        models[f"m{seed}"] = _vcc_adata(xp, lp, genes)
    truth = vcc2026_truth_of(xr, lr, genes)
    return _vcc_adata(xr, lr, genes), models, truth


def vcc2026_truth_of(x, lab, genes):
    return peers.vcc2026_truth(sps.csr_matrix(x), pd.Categorical(lab), genes)


def test_vcc2026_protocol_table_is_the_kernels(vcc_pair):
    """evaluate(protocol='vcc2026'): per-perturbation rows are vcc2026_scores' metrics; the
    (all) rows hold each member's aggregate, its calibrated score and avg_score."""
    real, models, truth = vcc_pair
    pred = models["m2"]
    table = vcjax.evaluate(real, pred, protocol="vcc2026")
    res = peers.vcc2026_scores(truth, pred.X, pred.obs["target"].astype(str).to_numpy())
    assert table.attrs["protocol"] == "vcc2026"
    per = table[table["perturbation"] != "(all)"]
    for m, v in res["metrics"].items():
        got = per[per["metric"] == m].set_index("perturbation")["value"].reindex(res["perts"])
        np.testing.assert_array_equal(np.isnan(got.to_numpy()), np.isnan(v))
        np.testing.assert_allclose(got.to_numpy(), v, rtol=0, atol=1e-12, equal_nan=True)
    overall = table[table["perturbation"] == "(all)"].set_index("metric")
    assert overall.loc["avg_score", "value"] == pytest.approx(res["score"], abs=1e-12)
    for m, s in res["member_scores"].items():
        assert overall.loc[m, "calibrated"] == pytest.approx(s, abs=1e-12)
        assert overall.loc[m, "value"] == pytest.approx(res["aggregates"][m], abs=1e-12)
    # the composite is the mean of the members' calibrated scores
    members = overall.drop(index="avg_score")["calibrated"]
    assert overall.loc["avg_score", "value"] == pytest.approx(members.mean(), abs=1e-12)


def test_vcc2026_protocol_sweep_ranks_on_the_composite(vcc_pair):
    """A sweep's avg_score per model is evaluate's; its resamples are the composite of the
    same perturbation draws (recomputed here), and the leaderboard ranks on them."""
    from vcjax.pipeline._sweep import _perturbation_counts

    real, models, truth = vcc_pair
    res = vcjax.sweep(real, models, protocol="vcc2026", n_boot=40, seed=3)
    board = res.leaderboard("avg_score")
    for name, pred in models.items():
        t = vcjax.evaluate(real, pred, protocol="vcc2026")
        want = t[(t["metric"] == "avg_score")]["value"].iloc[0]
        assert board.loc[name, "value"] == pytest.approx(want, abs=1e-12)
    P = len(truth.perts)
    counts = np.stack([_perturbation_counts(3, b, P) for b in range(40)])
    lab = models["m3"].obs["target"].astype(str).to_numpy()
    got = peers.vcc2026_scores(truth, models["m3"].X, lab)
    want = peers.vcc2026_composite(truth, got["metrics"], counts)["score"]
    m = res.models.index("m3")
    np.testing.assert_allclose(res.resampled[("avg_score", True, "mean")][m], want, atol=1e-12)
    assert np.isfinite(board["ci_low"]).all() and board["p_best"].sum() == pytest.approx(1.0)
    assert (board["ci_low"] <= board["value"]).all() and (board["value"] <= board["ci_high"]).all()
    # a member's calibrated leaderboard is higher-is-better, its raw one the metric's own way
    lower = res.leaderboard("de_wilcoxon_lfc_nmae", calibrated=False)
    assert lower["value"].is_monotonic_increasing


def test_vcc2026_protocol_errors(vcc_pair):
    real, models, _ = vcc_pair
    lognorm = real.copy()
    lognorm.X = sps.csr_matrix(np.log1p(lognorm.X.toarray()))
    with pytest.raises(VcjaxInputError, match="raw integer counts"):
        vcjax.evaluate(lognorm, models["m2"], protocol="vcc2026")
    with pytest.raises(VcjaxInputError, match="raw integer counts"):
        pred = models["m2"].copy()
        pred.X = sps.csr_matrix(np.log1p(pred.X.toarray()))
        vcjax.evaluate(real, pred, protocol="vcc2026")
    with pytest.raises(VcjaxInputError, match="vcc2026"):
        vcjax.evaluate(real, models["m2"], protocol="vcc-2026")
    with pytest.raises(VcjaxInputError, match="fixes reference="):
        vcjax.evaluate(real, models["m2"], protocol="vcc2026", reference="control")
