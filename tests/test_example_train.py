"""Smoke/regression tests of examples/train_wmse_vs_mse.py and examples/regime_study.py on
small simulated screens (seconds each)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import warnings

import numpy as np
import pytest

import vcjax
from tests.conftest import ROOT

pytest.importorskip("flax")


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location(
        "train_wmse_vs_mse", ROOT / "examples" / "train_wmse_vs_mse.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def screen(ex):
    return ex.prepare_screen(ex.simulated_adata(seed=3, small=True), source="simulated")


def test_folds_hold_out_only_covered_perturbations(ex, screen):
    folds = ex.make_folds(screen.names, n_folds=2, seed=0)
    held = np.concatenate(folds)
    assert len(held) == len(set(held.tolist())) > 0
    assert any("+" in screen.names[i] for i in held)  # some zero-shot combinations
    for h in folds:
        train = set(range(len(screen.names))) - set(h.tolist())
        seen = {g for q in train for g in ex.targets_of(screen.names[q])}
        for q in h:
            assert set(ex.targets_of(screen.names[q])) <= seen
    vocab, x = ex.multi_hot(["A+B", "B", "C"])
    assert vocab == ["A", "B", "C"]
    np.testing.assert_array_equal(x, [[1, 1, 0], [0, 1, 0], [0, 0, 1]])


def test_training_decreases_loss_and_weighting_matters(ex, screen):
    folds = ex.make_folds(screen.names, n_folds=2, seed=0)
    runs = ex.build_runs(screen, folds[:1], seeds=(0,))
    n_train = int(runs.mask[0].sum())
    assert n_train == len(screen.names) - len(folds[0])
    # training weights come from the training perturbations only: (n_train, G) in [0, 1]
    w = runs.w[0][:n_train]
    assert w.shape == (n_train, len(screen.genes)) and w.min() >= 0 and w.max() == 1
    vocab, xall = ex.multi_hot(screen.names)
    model = ex.PerturbationMLP(len(vocab), len(screen.genes), emb_dim=8, hidden=32)
    params, hist = ex.train_runs(runs, model, loss=ex.LOSSES, steps=40, lr=1e-2)
    assert hist.shape == (2, 40) and np.all(np.isfinite(hist))
    pred = ex.predict(params, model, xall, np.concatenate([runs.offset] * 2))
    hists, preds = dict(zip(ex.LOSSES, hist)), dict(zip(ex.LOSSES, pred))
    for loss in ex.LOSSES:
        assert hists[loss][-1] < 0.5 * hists[loss][0], (loss, hists[loss][[0, -1]])
    # same init and data, different objective: different loss values and different models
    assert not np.allclose(hists["mse"], hists["wmse"])
    assert np.abs(preds["mse"] - preds["wmse"]).max() > 1e-4
    # the metrics of a prediction come from vcjax.engine.score, with the DbD DEG gate
    held = folds[0]
    df = ex.per_perturbation_metrics(screen, held, preds["wmse"][held])
    assert list(df.columns) == ["perturbation", "r2w_delta", "wmse", "pearson_delta"]
    no_degs = ~screen.eval_degs[held].any(axis=1)
    assert df["wmse"].isna().to_numpy()[no_degs].all()
    assert ex.diversity(screen.pb_h1, screen.pb_h1) == pytest.approx(1.0)


# --------------------------------------------------------------------------- regime study


@pytest.fixture(scope="module")
def rs():
    spec = importlib.util.spec_from_file_location(
        "regime_study", ROOT / "examples" / "regime_study.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def study(rs):
    grid = dataclasses.replace(
        rs.QUICK, capacities=(4,), losses=("mse", "wmse"), steps=100, eval_every=20,
        n_boot=20, div_boot=200,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # n_boot=20 is rough on purpose
        return grid, rs.run_study(grid, verbose=False)


def test_regime_leaderboard_equals_evaluate(rs, study):
    """The sweep's leaderboard value of a run is evaluate's mean calibrated R²w(Δ) of it."""
    grid, out = study
    reg = out["regimes"][0]
    board = out["boards"].set_index(["regime", "model"])
    for run in ("mse/k4/s0", "wmse/k4/s1"):
        pred = out["preds"][reg.name][run]
        t = vcjax.evaluate(reg.test_screen, pred)
        rows = t[(t.source == "model") & (t.metric == "r2w_delta")]
        assert len(rows) == grid.n_test
        want = np.nanmean(rows.calibrated.to_numpy(np.float64))
        assert np.isfinite(want)
        got = board.loc[(reg.name, run), "value"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        lb = board.loc[(reg.name, run)]
        assert lb.ci_low <= lb.value <= lb.ci_high and 0 <= lb.p_best <= 1


def test_regime_diversity_and_paired_difference_numpy_reference(rs, study):
    grid, out = study
    reg = out["regimes"][0]
    truth = np.concatenate([s.truth for s in reg.test_screen.strata]).astype(np.float64)
    runs = out["runs"].set_index("run")
    divs = {}
    for run, pred in out["preds"][reg.name].items():
        p = pred.astype(np.float64)
        num = ((p - p.mean(0)) ** 2).sum() / len(p)  # Σ_g Var_p, centred, ddof 0
        den = ((truth - truth.mean(0)) ** 2).sum() / len(truth)
        divs[run] = num / den
        np.testing.assert_allclose(runs.loc[run, "diversity"], divs[run], rtol=1e-5)
    s = out["summary"].set_index("loss")
    for col, per_run in (("diversity", divs), ("cal_r2w_delta", runs.cal_r2w_delta)):
        mean = {
            loss: np.mean([per_run[f"{loss}/k4/s{i}"] for i in range(grid.seeds)])
            for loss in ("mse", "wmse")
        }
        np.testing.assert_allclose(s.loc["wmse", f"d_{col}"], mean["wmse"] - mean["mse"],
                                   rtol=1e-5, atol=1e-7)  # fmt: skip
        lo, hi = s.loc["wmse", f"d_{col}_lo"], s.loc["wmse", f"d_{col}_hi"]
        assert lo < hi and lo <= s.loc["wmse", f"d_{col}"] <= hi
    # the R²w(Δ) interval: the sweep's shared resamples, paired run by run (NumPy reference:
    # seed-averaged difference per resample, bias-centred, 2.5 % / 97.5 % quantiles)
    res = out["sweeps"][reg.name]
    smp = res.resampled[("r2w_delta", True, "mean")].astype(np.float64)  # (runs, B)
    pos = {n: i for i, n in enumerate(res.models)}
    seeds = range(grid.seeds)
    d = smp[[pos[f"wmse/k4/s{i}"] for i in seeds]].mean(0) - smp[
        [pos[f"mse/k4/s{i}"] for i in seeds]
    ].mean(0)
    est = s.loc["wmse", "d_cal_r2w_delta"]
    lo, hi = np.quantile(d - (np.nanmean(d) - est), [0.025, 0.975])
    np.testing.assert_allclose(
        [s.loc["wmse", "d_cal_r2w_delta_lo"], s.loc["wmse", "d_cal_r2w_delta_hi"]],
        [min(lo, est), max(hi, est)], rtol=1e-6, atol=1e-9,
    )  # fmt: skip


def test_regime_early_stopping_keeps_the_best_validation_step(rs, study):
    """The kept parameters are those of the best validation chunk, and their recorded score
    is evaluate's mean calibrated R²w(Δ) of the validation combinations."""
    grid, out = study
    reg = out["regimes"][0]
    h = out["hist"][4]
    val = h["val"]  # (runs, chunks)
    assert val.shape == (2 * grid.seeds, grid.steps // grid.eval_every)
    np.testing.assert_array_equal(h["best_chunk"], np.argmax(val, axis=1))
    np.testing.assert_array_equal(h["best_val"], val.max(axis=1))
    early = np.flatnonzero(h["best_chunk"] < val.shape[1] - 1)
    assert early.size  # some run stopped early: its kept parameters are not the last ones
    for j in (early[0], len(val) - 1):
        t = vcjax.evaluate(reg.val_screen, h["val_pred"][j])
        rows = t[(t.source == "model") & (t.metric == "r2w_delta")]
        want = np.nanmean(rows.calibrated.to_numpy(np.float64))
        np.testing.assert_allclose(h["best_val"][j], want, rtol=1e-4, atol=1e-5)
    # the two objectives train different models from the same initialisation
    p = out["preds"][reg.name]
    assert np.abs(p["mse/k4/s0"] - p["wmse/k4/s0"]).max() > 1e-3
    r = out["runs"]
    assert set(r.best_step) <= set(range(grid.eval_every, grid.steps + 1, grid.eval_every))
