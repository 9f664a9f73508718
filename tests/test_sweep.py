"""Sweeps (vcjax.sweep): many models against one prepared truth on shared resamples.

Held to: vcjax.evaluate (point values and, for a seed, the same intervals), the bootstrap's
direct per-model path in float64 (the contractions), independent NumPy aggregates and ranks
of the resampled values, and the invariants a leaderboard promises (p_best sums to 1,
identical models tie, the truth's other half wins)."""

from __future__ import annotations

import anndata as ad
import jax
import numpy as np
import pandas as pd
import pytest

import vcjax
from vcjax import VcjaxInputError
from vcjax import pipeline as PL
from vcjax.pipeline import _contract, _sweep

KW = dict(key="condition", control="control")


@pytest.fixture(scope="module")
def sim():
    adata = vcjax.simulate_screen(
        n_perturbations=10, n_genes=120, cells_per_perturbation=36, n_control=90,
        n_combinations=2, effect_genes=6, shared_shift_genes=10, seed=4,
    )  # fmt: skip
    screen = vcjax.prepare(adata, **KW)
    return adata, screen


def _models(screen, seed=1):
    """Models of known quality: the truth's other half, a noisy and a shrunk copy of it."""
    (s,) = screen.strata
    half = np.asarray(s.baselines["technical_duplicate"], np.float64)
    mean = np.broadcast_to(s.u_all_full, half.shape)
    rng = np.random.default_rng(seed)
    P, G = list(screen.perturbations), list(screen.genes)
    return {
        "other_half": (P, half, G),
        "noisy": (P, half + rng.normal(0, 0.25, half.shape), G),
        "shrunk": (P, mean + 0.4 * (half - mean), G),
    }


@pytest.fixture(scope="module")
def swept(sim):
    _, screen = sim
    return vcjax.sweep(screen, _models(screen), n_boot=24, seed=5)


def test_point_values_and_intervals_equal_evaluate(sim, swept):
    _, screen = sim
    for name, pred in _models(screen).items():
        ev = vcjax.evaluate(screen, pred, n_boot=24, seed=5)
        ev = ev[ev["source"] == "model"]
        got = swept.table[swept.table["model"] == name]
        m = got.merge(ev, on=["perturbation", "metric"], suffixes=("", "_ev"), validate="1:1")
        assert len(m) == len(got) == len(ev)
        for col, tol in (
            ("value", 1e-6),
            ("calibrated", 1e-6),
            ("ci_low", 2e-6),
            ("ci_high", 2e-6),
        ):
            a, b = m[col].to_numpy(float), m[f"{col}_ev"].to_numpy(float)
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{name} {col}")
            ok = ~np.isnan(a)
            np.testing.assert_allclose(a[ok], b[ok], rtol=tol, atol=tol, err_msg=f"{name} {col}")
        assert (m["note"] == m["note_ev"]).all()
    # the baselines, scored once, are evaluate's baseline rows
    ev = vcjax.evaluate(screen, None)
    b = swept.baselines.merge(ev, on=["perturbation", "metric", "source"], suffixes=("", "_ev"))
    assert len(b) == len(ev) == len(swept.baselines)
    np.testing.assert_allclose(b["value"], b["value_ev"], rtol=1e-12, equal_nan=True)


def test_contractions_equal_the_direct_bootstrap_in_float64(sim):
    """Every model on every resample: the contractions (centred on the point estimate)
    against the bootstrap's direct per-model kernels, both in float64."""
    _, screen = sim
    models = {
        k: (p, np.asarray(m, np.float32).astype(np.float64), g)
        for k, (p, m, g) in _models(screen).items()
    }
    with jax.enable_x64(True):
        res = vcjax.sweep(screen, models, n_boot=6, seed=2, chunk_size=3)
        (s,) = screen.strata
        boot = PL.BootSpec(n_boot=6, seed=2, chunk_size=3)
        for i, (name, (_, m, _)) in enumerate(models.items()):
            direct = PL.stratum_samples(
                s,
                screen.spec,
                model=m,
                metrics=res.info["metrics"],
                score=PL.ScoreSpec(),
                boot=boot,
            )["values"]["model"]
            for metric in res.info["metrics"]:
                v = np.asarray(direct[metric], np.float64)  # (B, P)
                want = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in v])
                got = res.resampled[(metric, False, "mean")][i]
                np.testing.assert_allclose(
                    got, want, rtol=1e-9, atol=1e-12, err_msg=f"{name} {metric}"
                )


def test_contraction_blocks_with_a_tail(sim, monkeypatch):
    """Perturbations contracted in blocks with a remainder give the one-block values."""
    _, screen = sim
    with jax.enable_x64(True):
        one = vcjax.sweep(screen, _models(screen), n_boot=4, seed=0)
        monkeypatch.setattr(_contract, "_BLOCK_ELEMENTS", 3 * 3 * 120)  # rows 10 = 3·3 + 1
        _contract._model_fn.cache_clear()
        try:
            blocks = vcjax.sweep(screen, _models(screen), n_boot=4, seed=0)
        finally:
            _contract._model_fn.cache_clear()
    for key, v in one.resampled.items():
        np.testing.assert_allclose(
            blocks.resampled[key], v, rtol=1e-11, atol=1e-13, err_msg=str(key)
        )


def test_leaderboard_against_numpy(swept):
    lb = swept.leaderboard("r2w_delta")
    B = swept.info["n_boot"]
    samples = swept.resampled[("r2w_delta", True, "mean")]  # (M, B)
    point = swept.aggregates[("r2w_delta", True, "mean")]
    names = swept.models
    # value: the mean over perturbations of the calibrated point estimates
    for i, n in enumerate(names):
        v = swept.table.query("model == @n and metric == 'r2w_delta'")["calibrated"]
        assert lb.loc[n, "value"] == pytest.approx(np.nanmean(v), rel=1e-12)
        assert point[i] == pytest.approx(np.nanmean(v), rel=1e-12)
    # p_best: share of resamples each model is the best (no ties among these models)
    best = np.argmax(samples, axis=0)
    for i, n in enumerate(names):
        assert lb.loc[n, "p_best"] == pytest.approx(np.mean(best == i))
    assert lb["p_best"].sum() == pytest.approx(1.0)
    # rank interval: quantiles of the per-resample ranks
    ranks = (-samples).argsort(0).argsort(0) + 1
    for i, n in enumerate(names):
        assert lb.loc[n, "rank_low"] <= lb.loc[n, "rank"] <= lb.loc[n, "rank_high"]
        assert lb.loc[n, "rank_low"] >= ranks[i].min() and lb.loc[n, "rank_high"] <= ranks[i].max()
    # the interval is evaluate's: percentile of samples centred on the estimate
    centred = samples - (samples.mean(1) - point)[:, None]
    lo = np.quantile(centred, 0.025, axis=1)
    np.testing.assert_allclose(lb.loc[names, "ci_low"], lo, rtol=1e-9)
    # pairwise: P(row beats column) from the same resamples; complementary; diagonal 0.5
    pw = swept.pairwise("r2w_delta")
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            want = 0.5 if i == j else np.mean(samples[i] > samples[j])
            assert pw.loc[a, b] == pytest.approx(want)
            assert pw.loc[a, b] + pw.loc[b, a] == pytest.approx(1.0)
    assert lb.index[0] == "other_half" and lb.attrs["n_boot"] == B


def test_other_half_wins(swept):
    lb = swept.leaderboard("r2w_delta")
    assert lb.index[0] == "other_half"
    assert lb.loc["other_half", "p_best"] >= 0.9
    assert lb.loc["shrunk", "differs_from_best"] is True or lb.loc["shrunk", "differs_from_best"]
    # lower-is-better metrics rank the same way round (uncalibrated WMSE: smaller wins)
    w = swept.leaderboard("wmse", calibrated=False)
    assert w.index[0] == "other_half" and (np.diff(w["value"].to_numpy()) >= 0).all()


def test_undefined_models_have_no_rank(swept):
    """A model whose aggregate is NaN (e.g. every perturbation gated) is not ranked: rank,
    rank interval and p_best are missing and it comes last; with no defined model at all
    nothing is ranked (a leaderboard of ranks 1–M over NaN values would mislead)."""
    import dataclasses

    key = ("r2w_delta", True, "mean")
    agg, smp = dict(swept.aggregates), dict(swept.resampled)
    agg[key] = swept.aggregates[key].copy()
    smp[key] = swept.resampled[key].copy()
    i = swept.models.index("other_half")
    agg[key][i] = np.nan
    smp[key][i] = np.nan
    lb = dataclasses.replace(swept, aggregates=agg, resampled=smp).leaderboard("r2w_delta")
    assert lb.index[-1] == "other_half"
    assert lb.loc["other_half", ["rank", "rank_low", "rank_high"]].isna().all()
    assert np.isnan(lb.loc["other_half", "p_best"])
    assert list(lb["rank"].iloc[:-1]) == [1, 2]
    assert lb["p_best"].sum() == pytest.approx(1.0)
    agg[key][:] = np.nan
    smp[key][:] = np.nan
    lb = dataclasses.replace(swept, aggregates=agg, resampled=smp).leaderboard("r2w_delta")
    assert lb["rank"].isna().all() and lb["p_best"].isna().all()
    assert lb["differs_from_best"].isna().all()


def test_identical_models_tie(sim):
    _, screen = sim
    m = _models(screen)
    res = vcjax.sweep(
        screen, {"a": m["noisy"], "b": m["noisy"], "c": m["shrunk"]}, n_boot=10, seed=1
    )
    lb = res.leaderboard("r2w_delta")
    assert lb.loc["a", "rank"] == lb.loc["b", "rank"]
    assert lb.loc["a", "p_best"] == lb.loc["b", "p_best"]
    assert lb["p_best"].sum() == pytest.approx(1.0)
    pw = res.pairwise("r2w_delta")
    assert pw.loc["a", "b"] == 0.5 and pw.loc["b", "a"] == 0.5
    # without resamples too: tied point estimates share rank 1 and p_best
    pt = vcjax.sweep(screen, {"a": m["noisy"], "b": m["noisy"]}).leaderboard("r2w_delta")
    assert list(pt["rank"]) == [1, 1] and list(pt["p_best"]) == [0.5, 0.5]
    assert pt["ci_low"].isna().all()


def test_model_forms_and_storage_agree(sim):
    """A mapping, a lazy generator, an (M, P, G) array, the disk spill and one-model blocks
    give the same result; the same seed gives the same resamples, another seed others."""
    _, screen = sim
    models = _models(screen)
    kw = dict(n_boot=8, seed=3)
    ref = vcjax.sweep(screen, models, **kw)
    arr = np.stack([np.asarray(m, np.float32) for _, m, _ in models.values()])
    exact = [  # the same values through the same products: bit for bit
        vcjax.sweep(screen, ((k, v) for k, v in models.items()), **kw),
        vcjax.sweep(screen, arr, names=list(models), **kw),
        vcjax.sweep(screen, models, memory_budget=0, **kw),
    ]
    for v in exact:
        assert v.models == ref.models
        pd.testing.assert_frame_equal(v.table, ref.table, check_exact=True)
        for key, x in ref.resampled.items():
            np.testing.assert_array_equal(v.resampled[key], x, err_msg=str(key))
    # one model per product: another summation order, float32 noise only
    one = vcjax.sweep(screen, models, model_chunk=1, **kw)
    pd.testing.assert_frame_equal(one.table, ref.table, rtol=1e-5, atol=1e-5)
    again = vcjax.sweep(screen, models, **kw)
    for key, x in ref.resampled.items():
        np.testing.assert_array_equal(again.resampled[key], x)
    other = vcjax.sweep(screen, models, n_boot=8, seed=4)
    assert not np.allclose(
        other.resampled[("mse", False, "mean")], ref.resampled[("mse", False, "mean")]
    )


def test_perturbation_resampling_against_numpy(sim):
    _, screen = sim
    res = vcjax.sweep(screen, _models(screen), n_boot=12, seed=7, resample="perturbations")
    v = res.point_values[("r2w_delta", True)]  # (M, P)
    R = v.shape[1]
    for b in range(12):
        counts = np.bincount(np.random.default_rng([7, 0x5EED, b]).integers(0, R, R), minlength=R)
        ok = np.isfinite(v)
        want = (np.where(ok, v, 0) * counts).sum(1) / (ok * counts).sum(1)
        np.testing.assert_allclose(
            res.resampled[("r2w_delta", True, "mean")][:, b], want, rtol=1e-12
        )
        # the weighted median: the middle of the drawn rows
        for i in range(v.shape[0]):
            drawn = np.repeat(v[i], counts)
            drawn = drawn[np.isfinite(drawn)]
            got = res.resampled[("r2w_delta", True, "median")][i, b]
            assert got == pytest.approx(np.median(drawn), rel=1e-12)
    assert "ci_low" not in res.table.columns  # no per-perturbation intervals in this mode
    lb = res.leaderboard("r2w_delta", baselines=True)
    assert np.isfinite(lb.loc["[dataset_mean]", "ci_low"])


def test_both_resampling_runs_and_is_paired(sim):
    _, screen = sim
    res = vcjax.sweep(screen, _models(screen), n_boot=6, seed=1, resample="both")
    lb = res.leaderboard("r2w_delta")
    assert lb["p_best"].sum() == pytest.approx(1.0)
    s = res.resampled[("r2w_delta", True, "mean")]
    cells = vcjax.sweep(screen, _models(screen), n_boot=6, seed=1).resampled[
        ("r2w_delta", True, "mean")
    ]
    assert not np.allclose(s, cells)  # the perturbation draw changes the aggregates


def test_aggregate_matches_numpy():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3, 5, 40)).astype(np.float32)
    v[0, 0, :] = np.nan
    v[1, :, ::3] = np.nan
    v[2, 1, 5] = np.inf
    for how, fn in (("mean", np.nanmean), ("median", np.nanmedian)):
        got = _sweep._aggregate(v, how)
        w = np.where(np.isfinite(v), v.astype(np.float64), np.nan)
        with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
            want = fn(w, axis=-1)
        np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)


def test_bad_inputs(sim):
    _, screen = sim
    m = _models(screen)
    with pytest.raises(VcjaxInputError, match="no model to score"):
        vcjax.sweep(screen, {})
    with pytest.raises(VcjaxInputError, match="duplicated model name 'a'"):
        vcjax.sweep(screen, [("a", m["noisy"]), ("a", m["shrunk"])])
    P, mat, G = m["noisy"]
    short = (P[:-2], mat[:-2], G)
    with pytest.raises(VcjaxInputError, match=r"model 'short': .*" + P[-1].replace("+", r"\+")):
        vcjax.sweep(screen, {"ok": m["noisy"], "short": short})
    with pytest.raises(VcjaxInputError, match="needs names"):
        vcjax.sweep(screen, np.zeros((2, len(P), len(G))))
    with pytest.raises(VcjaxInputError, match="resample must be one of"):
        vcjax.sweep(screen, m, resample="genes")
    with pytest.raises(VcjaxInputError, match="was not scored"):
        vcjax.sweep(screen, m).leaderboard("not_a_metric")
    res = vcjax.sweep(screen, {"ok": m["noisy"], "short": short}, on_error="skip", n_boot=4)
    assert res.models == ["ok"] and "short" in res.errors and P[-1] in res.errors["short"]
    assert list(res.leaderboard().index) == ["ok"]


def test_covariate_sweep_equals_evaluate():
    adata = vcjax.simulate_screen(
        n_perturbations=5, n_genes=80, cells_per_perturbation=14, n_control=30, n_combinations=2,
        shared_shift_genes=8, effect_genes=4, covariate="cell_line", n_covariates=2, seed=3,
    )  # fmt: skip
    screen = vcjax.prepare(adata, covariate="cell_line", **KW)
    rows = [(s.covariate, p) for s in screen.strata for p in s.perturbations]
    rng = np.random.default_rng(0)
    base = np.concatenate([s.baselines["technical_duplicate"] for s in screen.strata])
    pred = base + rng.normal(0, 0.2, base.shape)
    obs = pd.DataFrame(
        {"condition": [p for _, p in rows], "cell_line": [c for c, _ in rows]},
        index=[f"row{i}" for i in range(len(rows))],
    )
    pa = ad.AnnData(pred.astype(np.float32), obs=obs)
    pa.var_names = list(screen.genes)
    res = vcjax.sweep(screen, {"m": pa}, n_boot=6, seed=0)
    ev = vcjax.evaluate(screen, pa, n_boot=6, seed=0)
    ev = ev[ev["source"] == "model"]
    j = res.table.merge(ev, on=["perturbation", "metric", "covariate"], suffixes=("", "_ev"))
    assert len(j) == len(res.table) == len(ev)
    np.testing.assert_allclose(j["value"], j["value_ev"], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(j["ci_high"], j["ci_high_ev"], rtol=2e-6, atol=2e-6, equal_nan=True)


def test_save_round_trip(swept, tmp_path):
    path = tmp_path / "sweep.parquet"
    swept.save(path)
    back = pd.read_parquet(path)
    models = back[back["source"] == "model"]
    assert len(models) == len(swept.table) and len(back) == len(swept.table) + len(swept.baselines)
    np.testing.assert_allclose(
        models["ci_low"].to_numpy(float), swept.table["ci_low"], equal_nan=True
    )


def test_sweep_report_opens_with_the_verdict(swept):
    from vcjax.report import build_sweep_report

    text = build_sweep_report(swept)
    lb = swept.leaderboard("r2w_delta")
    best = lb.index[0]
    first = text.index('id="leaderboard"')
    assert first < text.index('id="pairwise"') < text.index('id="differences"')
    verdict = text[first : text.index("</p>", first)]
    assert f"<b>{best}</b> is best" in verdict
    assert f"p_best {lb.loc[best, 'p_best']:.2f}" in verdict
    assert "data:image/png;base64," in text and "<script" not in text
