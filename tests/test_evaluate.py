"""evaluate(): parity with the oracle fixtures, baselines against NumPy, calibration, errors."""

from __future__ import annotations

import anndata as ad
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tests.conftest import load_fixture
from vcjax import VcjaxInputError
from vcjax.pipeline import calibration_card, drf_table, evaluate, prepare, summarize

SOURCES = {
    "model": "noisy",
    "technical_duplicate": "techdup",
    "control_mean": "control",
    "dataset_mean": "datamean",
    "additive": "additive",
}
METRICS = {
    "mse": "mse",
    "wmse": "wmse",
    "pearson_delta": "pearson_delta",
    "pearson_delta_degs": "pearson_delta_degs",
    "r2_delta": "r2_delta",
    "r2w_delta": "wr2_delta",
    "pearson_delta_ctrl": "ext_pearson_deltactrl",
    "r2_delta_ctrl": "ext_r2_deltactrl",
    "pearson_delta_topk": "ext_pearson_delta_topk",
}


def _values(table, source, metric, perts, column="value"):
    sub = table[(table.source == source) & (table.metric == metric)].set_index("perturbation")
    return sub.loc[list(perts), column].to_numpy(dtype=float)


@pytest.fixture(scope="module", params=["ds1_sparse", "ds2_double"])
def fixture_eval(request):
    adata, exp = load_fixture(request.param)
    pred = (list(exp["perts"]), exp["pred_noisy"], list(exp["genes"]))
    with jax.enable_x64(True):
        table = evaluate(adata, pred, key="condition", control="control", normalize=None, k=10)
    return adata, exp, table


def test_evaluate_matches_fixtures_float64(fixture_eval):
    _, exp, table = fixture_eval
    n = 0
    for source, fs in SOURCES.items():
        for metric, fm in METRICS.items():
            key = f"metric__{fs}__{fm}"
            if key not in exp:
                continue
            got = _values(table, source, metric, exp["perts"])
            want = exp[key]
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=key)
            rtol = 1e-6 if metric == "wmse" else 1e-9
            np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-9, err_msg=key)
            n += 1
    assert n >= 36


def test_drf_matches_fixtures(fixture_eval):
    _, exp, table = fixture_eval
    for metric, fm in list(METRICS.items())[:6]:
        got = drf_table(table, metric).loc[list(exp["perts"])].to_numpy()
        np.testing.assert_allclose(
            got, exp[f"calib__drf_{fm}"], rtol=1e-6, atol=1e-7, err_msg=metric
        )
        got = drf_table(table, metric, negative="control_mean").loc[list(exp["perts"])].to_numpy()
        np.testing.assert_allclose(
            got, exp[f"calib__drfctrl_{fm}"], rtol=1e-6, atol=1e-7, err_msg=metric
        )


def test_evaluate_float32_default_matches_fixtures(fixture_name):
    adata, exp = load_fixture(fixture_name)
    table = evaluate(
        adata,
        (list(exp["perts"]), exp["pred_noisy"], list(exp["genes"])),
        key="condition",
        control="control",
        normalize=None,
    )
    for metric in ("mse", "wmse", "r2w_delta", "pearson_delta"):
        got = _values(table, "model", metric, exp["perts"])
        np.testing.assert_allclose(
            got, exp[f"metric__noisy__{METRICS[metric]}"], rtol=1e-5, atol=1e-5
        )


def _numpy_baselines(adata, exp, seed=0):
    """Independent construction of every baseline from the cell matrix with NumPy masks."""
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    cond = adata.obs["condition"].astype(str).to_numpy()
    half = adata.obs["half"].to_numpy()
    conds = list(dict.fromkeys(cond))
    perts = [c for c in conds if c != "control"]
    mean = lambda sel: X[sel].mean(0)  # noqa: E731
    h1 = {c: mean((cond == c) & (half == 1)) for c in conds}
    full = {c: mean(cond == c) for c in conds}
    u_h1 = np.mean([h1[c] for c in conds], axis=0)
    u_full = np.mean([full[c] for c in conds], axis=0)
    out = {
        "truth": np.stack([mean((cond == p) & (half == 2)) for p in perts]),
        "technical_duplicate": np.stack([h1[p] for p in perts]),
        "control_mean": np.tile(full["control"], (len(perts), 1)),
        "dataset_mean": np.tile(u_full, (len(perts), 1)),
        "loo_mean": np.stack([np.mean([full[q] for q in perts if q != p], axis=0) for p in perts]),
    }
    add = np.full((len(perts), X.shape[1]), np.nan)
    for i, p in enumerate(perts):
        parts = p.split("+")
        if len(parts) == 2 and all(s in perts for s in parts):
            add[i] = u_h1 + sum(h1[s] - u_h1 for s in parts)
    out["additive"] = add
    return perts, out


def test_baselines_against_numpy(fixture_name):
    adata, exp = load_fixture(fixture_name)
    perts, want = _numpy_baselines(adata, exp)
    assert perts == list(exp["perts"])
    np.testing.assert_allclose(want["truth"], exp["truth"], rtol=1e-12)
    (ctx,) = prepare(adata, key="condition", control="control", normalize=None).strata
    np.testing.assert_allclose(ctx.truth, want["truth"], rtol=1e-12, atol=1e-12)
    for name in ("technical_duplicate", "control_mean", "dataset_mean", "loo_mean", "additive"):
        np.testing.assert_allclose(
            ctx.baselines[name], want[name], rtol=1e-12, atol=1e-12, err_msg=name
        )
    if "pred_additive" in exp:
        np.testing.assert_allclose(
            ctx.baselines["additive"], exp["pred_additive"], rtol=1e-12, atol=1e-12
        )
    # the null baseline: another perturbation's half-1 profile, never its own
    null = ctx.baselines["null"]
    dup = ctx.baselines["technical_duplicate"]
    match = [int(np.flatnonzero(np.all(np.isclose(dup, row), axis=1))[0]) for row in null]
    assert sorted(match) == list(range(len(perts)))
    assert all(m != i for i, m in enumerate(match))
    # interpolated duplicate: alpha = 1 - padj between the duplicate and the leave-one-out mean
    alpha = 1 - ctx.pvals_adj
    np.testing.assert_allclose(
        ctx.baselines["interpolated_duplicate"],
        alpha * dup + (1 - alpha) * want["loo_mean"],
        rtol=1e-12,
    )


def test_calibration_anchors(fixture_eval):
    _, exp, table = fixture_eval
    dup = table[table.source == "technical_duplicate"]
    ok = dup["calibrated"].notna()
    assert ok.sum() > 20
    assert np.all(dup.loc[ok, "calibrated"].to_numpy() == 1.0)
    # the best negative is exactly 0 wherever the calibration is defined
    for metric in table.metric.unique():
        w = table[table.metric == metric].pivot(
            index="perturbation", columns="source", values="calibrated"
        )
        negs = w[["control_mean", "dataset_mean", "null"]]
        defined = w["technical_duplicate"].notna()
        if defined.any():
            best = negs[defined].max(axis=1)  # calibrated is oriented: higher is better
            np.testing.assert_array_equal(best.to_numpy(), 0.0)


def test_error_metric_calibration_orientation():
    from vcjax.pipeline import calibrate

    vals = {
        "technical_duplicate": {"mse": np.array([1.0, 5.0])},
        "control_mean": {"mse": np.array([3.0, 4.0])},
        "dataset_mean": {"mse": np.array([2.0, np.nan])},
        "model": {"mse": np.array([1.5, 1.0])},
    }
    cal = calibrate(vals)
    np.testing.assert_allclose(cal["model"]["mse"], [0.5, np.nan])  # 2nd: duplicate no better
    np.testing.assert_allclose(cal["dataset_mean"]["mse"], [0.0, np.nan])


def test_seed_reproducible_and_gene_order(fixture_name):
    adata, exp = load_fixture(fixture_name)
    perts, genes = list(exp["perts"]), list(exp["genes"])
    a = evaluate(
        adata,
        (perts, exp["pred_noisy"], genes),
        key="condition",
        control="control",
        normalize=None,
        seed=3,
    )
    b = evaluate(
        adata,
        (perts, exp["pred_noisy"], genes),
        key="condition",
        control="control",
        normalize=None,
        seed=3,
    )
    pd.testing.assert_frame_equal(a, b)
    order = np.random.default_rng(0).permutation(len(genes))
    prow = np.random.default_rng(1).permutation(len(perts))
    df = pd.DataFrame(
        exp["pred_noisy"][prow][:, order],
        index=np.array(perts)[prow],
        columns=np.array(genes)[order],
    )
    c = evaluate(adata, df, key="condition", control="control", normalize=None, seed=3)
    pd.testing.assert_frame_equal(a, c)
    # a different seed changes the null baseline only
    d = evaluate(
        adata,
        (perts, exp["pred_noisy"], genes),
        key="condition",
        control="control",
        normalize=None,
        seed=4,
    )
    same = a.source != "null"
    np.testing.assert_array_equal(a.loc[same, "value"].to_numpy(), d.loc[same, "value"].to_numpy())


def test_prediction_as_cells_is_pseudobulked(fixture_name):
    adata, exp = load_fixture(fixture_name)
    perts, genes = list(exp["perts"]), list(exp["genes"])
    rng = np.random.default_rng(0)
    reps = 3
    noise = rng.normal(scale=0.05, size=(len(perts), reps, len(genes)))
    noise -= noise.mean(1, keepdims=True)  # cell means equal the profile exactly
    cells = (exp["pred_noisy"][:, None, :] + noise).reshape(-1, len(genes))
    pred = ad.AnnData(
        cells,
        obs=pd.DataFrame(
            {"condition": np.repeat(perts, reps)}, index=[f"c{i}" for i in range(len(cells))]
        ),
    )
    pred.var_names = genes
    a = evaluate(
        adata, pred, key="condition", control="control", normalize=None, pred_normalize=None
    )
    b = evaluate(
        adata, (perts, exp["pred_noisy"], genes), key="condition", control="control", normalize=None
    )
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_bad_predictions_raise_clear_errors(fixture_name):
    adata, exp = load_fixture(fixture_name)
    perts, genes, P = list(exp["perts"]), list(exp["genes"]), exp["pred_noisy"]
    kw = dict(key="condition", control="control", normalize=None)
    with pytest.raises(VcjaxInputError, match=r"lacks 1 of \d+ perturbations: " + perts[-1]):
        evaluate(adata, (perts[:-1], P[:-1], genes), **kw)
    with pytest.raises(VcjaxInputError, match=r"lacks 2 of the truth's 50 genes: G00, G01"):
        evaluate(adata, (perts, P[:, 2:], genes[2:]), **kw)
    with pytest.raises(VcjaxInputError, match="share no genes"):
        evaluate(adata, (perts, P, [g + "x" for g in genes]), **kw)
    with pytest.raises(VcjaxInputError, match="duplicated perturbation names"):
        evaluate(adata, ([perts[0]] + perts[:-1], P, genes), **kw)
    bad = P.copy()
    bad[1, 3] = np.nan
    with pytest.raises(VcjaxInputError, match=f"perturbation '{perts[1]}', gene '{genes[3]}'"):
        evaluate(adata, (perts, bad, genes), **kw)
    with pytest.raises(VcjaxInputError, match="control label 'ctrl'"):
        evaluate(adata, (perts, P, genes), key="condition", control="ctrl", normalize=None)
    with pytest.raises(VcjaxInputError, match="'cond' not in obs"):
        evaluate(adata, (perts, P, genes), key="cond", control="control", normalize=None)


def test_summaries(fixture_eval):
    _, _, table = fixture_eval
    s = summarize(table)
    row = s[(s.source == "model") & (s.metric == "mse")].iloc[0]
    vals = table[(table.source == "model") & (table.metric == "mse")]["value"]
    assert row.value_median == pytest.approx(vals.median())
    assert row.value_mean == pytest.approx(vals.mean())
    card = calibration_card(table)
    assert set(card.metric) >= {"mse", "wmse", "r2w_delta"}
    d = drf_table(table, "wmse")
    assert card.set_index("metric").loc["wmse", "drf_median"] == pytest.approx(np.nanmedian(d))


def test_norman19_control_bias_evidence(shared_data):
    """The paper's point on real data: the dataset mean looks good under control-referenced
    Pearson(Δ) and unweighted MSE, but calibrates to ~0 under R²w(Δ) vs u_ALL and WMSE."""
    adata = ad.read_h5ad(shared_data("norman19_perturbench_devel.h5ad"))
    table = evaluate(adata, None, key="condition", control="control")
    s = summarize(table).set_index(["source", "metric"])
    dm = lambda m, c="value_median": s.loc[("dataset_mean", m), c]  # noqa: E731
    dup = lambda m, c="value_median": s.loc[("technical_duplicate", m), c]  # noqa: E731
    null = lambda m: s.loc[("null", m), "value_median"]  # noqa: E731
    # control-referenced Pearson rewards the dataset mean, which carries no
    # perturbation-specific signal: it beats another perturbation's real profile (null)
    # and reaches a large fraction of the technical duplicate's score
    assert dm("pearson_delta_ctrl") > 0.3
    assert dm("pearson_delta_ctrl") > null("pearson_delta_ctrl")
    assert dm("pearson_delta_ctrl") / dup("pearson_delta_ctrl") > 0.3
    # signal dilution: WMSE separates the dataset mean from the duplicate far more than MSE
    assert dm("wmse") / dup("wmse") > 3 * dm("mse") / dup("mse")
    # under the DbD metrics the dataset mean is no better than useless, the duplicate is 1
    assert dm("r2w_delta") < 0.0 < 0.9 < dup("r2w_delta")
    assert dm("r2w_delta", "calibrated_median") <= 0.0
    assert dm("wmse", "calibrated_median") <= 0.0
    assert dup("r2w_delta", "calibrated_median") == 1.0
    assert dup("wmse", "calibrated_median") == 1.0


def test_peer_metrics_in_the_table():
    """metrics="all" adds the peers' metrics, wired to the right inputs."""
    from vcjax import peers
    from vcjax.simulate import simulate_screen

    adata = simulate_screen(
        seed=2, n_perturbations=10, n_genes=120, cells_per_perturbation=40, n_control=80
    )
    # a model given as cells, control included: cell-level metrics become available
    rng = np.random.default_rng(0)
    half = adata[rng.random(adata.n_obs) < 0.5].copy()
    table = evaluate(adata, half, key="condition", control="control", metrics="all")
    names = set(table.metric)
    assert {
        "pds",
        "rank",
        "centroid_accuracy",
        "pearson_delta_top20",
        "direction_agreement",
        "hit_recall_at_budget",
        "hit_recall_at_fdr",
        "de_overlap_at_k",
        "de_direction_agreement",
        "energy_distance",
        "mmd",
    } <= names
    (ctx,) = prepare(adata, key="condition", control="control").strata
    dup = ctx.baselines["technical_duplicate"]
    got = _values(table, "technical_duplicate", "rank", ctx.perturbations)
    np.testing.assert_allclose(
        got, np.asarray(peers.rank(dup - ctx.u_ntc, ctx.truth - ctx.u_ntc)), rtol=1e-6
    )
    got = _values(table, "technical_duplicate", "centroid_accuracy", ctx.perturbations)
    np.testing.assert_allclose(got, np.asarray(peers.centroid_accuracy(dup, ctx.truth)), rtol=1e-6)
    # cell-level metrics of the model equal cell-eval's definitions computed directly
    X = np.log1p(adata.X.toarray() / adata.X.toarray().sum(1, keepdims=True) * 1e4)
    Xp = np.log1p(half.X.toarray() / half.X.toarray().sum(1, keepdims=True) * 1e4)
    res = peers.celleval_metrics(
        X,
        adata.obs["condition"].astype(str).to_numpy(),
        Xp,
        half.obs["condition"].astype(str).to_numpy(),
        list(adata.var_names),
        control="control",
    )
    _assert_cell_de_rows(table, res, ctx.perturbations)
    # baselines are profiles, not cells: their cell-level metrics are undefined
    assert (
        table[(table.source == "dataset_mean") & (table.metric == "energy_distance")]["value"]
        .isna()
        .all()
    )
    # dataset-level rows
    hits = table[(table.metric == "hit_recall_at_budget")]
    assert set(hits.perturbation) == {"(all)"}
    defined = hits[hits.source != "additive"]  # additive is NaN for singles: not scorable
    assert defined.value.between(0, 1).all() and hits[hits.source == "additive"].value.isna().all()


def _assert_cell_de_rows(table, res, perts, *, note=None):
    """The model's cell-level DE rows (and the cell-level PDS) equal ``res``, the direct
    :func:`vcjax.peers.celleval_metrics` result; with ``note``, every row carries it."""
    order = [list(res["perts"]).index(p) for p in perts]
    for name in ("de_overlap_at_k", "de_direction_agreement", "pds"):
        if note is not None:
            rows = table[(table.source == "model") & (table.metric == name)]
            assert (rows.note == note).all(), name
        np.testing.assert_allclose(
            _values(table, "model", name, perts),
            np.asarray(res[name], float)[order],
            rtol=1e-5,
            atol=1e-6,
            err_msg=name,
        )


def test_cell_de_metrics_without_predicted_control_cells():
    """Predicted cells without control cells: the cell-level DE metrics (and the cell-level
    PDS) use the truth's control cells, and their rows say so."""
    from vcjax import peers
    from vcjax.simulate import simulate_screen

    adata = simulate_screen(
        seed=2, n_perturbations=10, n_genes=120, cells_per_perturbation=40, n_control=80
    )
    rng = np.random.default_rng(1)
    lab = adata.obs["condition"].astype(str).to_numpy()
    pred = adata[(rng.random(adata.n_obs) < 0.5) & (lab != "control")].copy()
    table = evaluate(adata, pred, key="condition", control="control", metrics="all")
    (ctx,) = prepare(adata, key="condition", control="control").strata
    X = np.log1p(adata.X.toarray() / adata.X.toarray().sum(1, keepdims=True) * 1e4)
    Xp = np.log1p(pred.X.toarray() / pred.X.toarray().sum(1, keepdims=True) * 1e4)
    res = peers.celleval_metrics(
        X, lab, Xp, pred.obs["condition"].astype(str).to_numpy(), list(adata.var_names),
        control="control",
    )  # fmt: skip
    assert res["pred_control"] == "truth"
    _assert_cell_de_rows(table, res, ctx.perturbations, note=peers.TRUTH_CONTROL_NOTE)
    other = table[(table.source == "model") & (table.metric == "energy_distance")]
    assert (other.note == "").all()


# ---------------------------------------------------- compilation cache (issue 9)
_CACHE_SCRIPT = r"""
import json, os, sys
import jax
from tests.conftest import load_fixture
from vcjax import evaluate
from vcjax.engine import enable_compilation_cache
out = {}
mode = sys.argv[1]
out["dir"] = enable_compilation_cache()
out["again"] = enable_compilation_cache()
out["jax_dir"] = jax.config.jax_compilation_cache_dir
out["min_time"] = jax.config.jax_persistent_cache_min_compile_time_secs
if mode == "off":  # then a user who configured a cache themselves (a new decision)
    import vcjax._host
    vcjax._host._cache_state.clear()
    del os.environ["VCJAX_COMPILATION_CACHE"]
    jax.config.update("jax_compilation_cache_dir", sys.argv[2])
    out["user_dir"] = enable_compilation_cache()
    out["user_min_time"] = jax.config.jax_persistent_cache_min_compile_time_secs
if mode == "vcjax":
    adata, exp = load_fixture("ds1_sparse")
    pred = (list(exp["perts"]), exp["pred_noisy"], list(exp["genes"]))
    evaluate(adata, pred, key="condition", control="control", normalize=None)
    out["files"] = len(os.listdir(out["dir"]))
print(json.dumps(out))
"""


def _cache_run(mode, env_value, *args):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), VCJAX_COMPILATION_CACHE=env_value)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    res = subprocess.run(
        [sys.executable, "-c", _CACHE_SCRIPT, mode, *args],
        capture_output=True, text=True, env=env, cwd=root, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_compilation_cache_enabled_by_default_and_opt_out(tmp_path):
    folder = tmp_path / "cache"
    got = _cache_run("vcjax", str(folder))
    assert got["dir"] == got["again"] == got["jax_dir"] == str(folder)
    assert got["min_time"] == 0.0 and got["files"] > 0  # every vcjax kernel is cached
    off = _cache_run("off", "0", str(tmp_path / "mine"))
    assert off["dir"] is None and off["jax_dir"] is None and off["min_time"] == 1.0
    assert off["user_dir"] == str(tmp_path / "mine")
    assert off["user_min_time"] == 1.0  # a user's own cache settings are left alone


def test_engine_arrays_are_aligned_and_reused():
    from vcjax.engine import engine_array as _engine_array

    x = np.arange(3 * 70, dtype=np.float64).reshape(3, 70)
    y = _engine_array(x, np.dtype(np.float32))
    assert y.dtype == np.float32 and y.flags.c_contiguous and y.ctypes.data % 64 == 0
    np.testing.assert_array_equal(y, x.astype(np.float32))
    assert _engine_array(y, np.dtype(np.float32)) is y
    b = _engine_array(np.broadcast_to(x[0], (5, 70)), np.dtype(np.float32))
    assert b.shape == (5, 70) and b.flags.c_contiguous


def test_interpolated_duplicate_formula_nan_rule_and_broadcasting():
    """α·duplicate + (1 − α)·negative with α = 1 − p_adj, NaN p → α = 0, for row-wise
    p-values and for one p-value vector shared by every row (NumPy broadcasting)."""
    from vcjax import pipeline as B

    rng = np.random.default_rng(3)
    dup, neg = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    for padj in (rng.uniform(size=(4, 6)), rng.uniform(size=6)):
        padj = padj.copy()
        padj[..., 1] = np.nan
        a = 1.0 - np.where(np.isnan(padj), 1.0, padj)
        got = B.interpolated_duplicate(dup, neg, padj)
        np.testing.assert_array_equal(got, a * dup + (1.0 - a) * neg)
        np.testing.assert_array_equal(got[:, 1], neg[:, 1])
    # a profile shared by every row against row-wise p-values
    got = B.interpolated_duplicate(dup[0], neg, padj_rows := rng.uniform(size=(4, 6)))
    a = 1.0 - padj_rows
    np.testing.assert_array_equal(got, a * dup[0] + (1.0 - a) * neg)
