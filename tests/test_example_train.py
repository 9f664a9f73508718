"""Smoke test of examples/train_wmse_vs_mse.py on a small simulated screen (a few seconds)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

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
