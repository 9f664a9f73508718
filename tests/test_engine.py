"""The batching engine: equals the per-row reference, pads without recompiling, validates."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests import reference as R
from tests.conftest import load_fixture
from vcjax import engine


def _case(rng, p, g):
    truth = rng.normal(size=(p, g)).astype(np.float32)
    pred = (truth + rng.normal(scale=0.7, size=(p, g))).astype(np.float32)
    ref = rng.normal(scale=0.2, size=g).astype(np.float32)
    w = (rng.random((p, g)) ** 4).astype(np.float32)
    mask = rng.random((p, g)) < 0.2
    return pred, truth, ref, w, mask


@pytest.mark.parametrize("p,chunk", [(1, 8), (13, 8), (16, 8), (37, 16)])
def test_score_matches_reference(p, chunk):
    rng = np.random.default_rng(p)
    pred, truth, ref, w, mask = _case(rng, p, 30)
    out = engine.score(pred, truth, reference=ref, weights=w, mask=mask, k=6, chunk_size=chunk)
    want = R.reference_scores(pred, truth, ref, w, mask, k=6)
    assert set(out) == set(want)
    for name, v in out.items():
        assert v.shape == (p,)
        np.testing.assert_allclose(
            np.asarray(v, np.float64), want[name], rtol=2e-4, atol=2e-5, err_msg=name
        )


def test_score_fixture_float64(fixture_name):
    _, exp = load_fixture(fixture_name)
    with jax.enable_x64(True):
        out = engine.score(
            exp["pred_techdup"],
            exp["truth"],
            reference=exp["u_all_half1"],
            weights=exp["weights"],
            mask=exp["deg_mask"],
            chunk_size=4,
        )
    assert out["r2w_delta"].dtype == np.float64
    np.testing.assert_allclose(
        np.asarray(out["r2w_delta"]), exp["metric__techdup__wr2_delta"], rtol=1e-10
    )
    np.testing.assert_allclose(np.asarray(out["mse"]), exp["metric__techdup__mse"], rtol=1e-10)
    has_deg = exp["deg_mask"].sum(1) > 1
    np.testing.assert_allclose(
        np.asarray(out["pearson_delta_degs"])[has_deg],
        exp["metric__techdup__pearson_delta_degs"][has_deg],
        rtol=1e-10,
    )


def test_broadcast_prediction_and_per_row_reference():
    rng = np.random.default_rng(5)
    pred, truth, ref, w, _ = _case(rng, 9, 20)
    refs = np.tile(ref, (9, 1))
    a = engine.score(
        pred[0], truth, reference=refs, weights=w[0], metrics=["r2w_delta", "wmse"], chunk_size=4
    )
    b = R.reference_scores(np.tile(pred[0], (9, 1)), truth, ref, np.tile(w[0], (9, 1)))
    np.testing.assert_allclose(np.asarray(a["r2w_delta"]), b["r2w_delta"], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(a["wmse"]), b["wmse"], rtol=2e-4)


def test_no_recompile_across_p_sharing_a_chunk_size():
    rng = np.random.default_rng(6)
    metrics = ("mse", "r2w_delta")
    engine._chunk_fn.cache_clear()
    for p in (3, 17, 40, 64, 65):
        pred, truth, ref, w, _ = _case(rng, p, 24)
        engine.score(pred, truth, reference=ref, weights=w, metrics=metrics, chunk_size=16)
    fn = engine._chunk_fn(metrics, (True, True, False, True, False), 20, False)
    assert fn._cache_size() == 1  # one compilation for all five P


def test_validation_errors():
    rng = np.random.default_rng(7)
    pred, truth, ref, w, _ = _case(rng, 4, 10)
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        engine.score(pred, truth, reference=ref, metrics=["nope"])
    with pytest.raises(ValueError, match="needs weights"):
        engine.score(pred, truth, reference=ref, metrics=["wmse"])
    with pytest.raises(ValueError, match="reference has 9 genes"):
        engine.score(pred, truth, reference=ref[:9])
    with pytest.raises(ValueError, match=r"pred has shape \(3, 10\)"):
        engine.score(pred[:3], truth, reference=ref)


def test_default_metrics_depend_on_inputs():
    rng = np.random.default_rng(8)
    pred, truth, ref, w, mask = _case(rng, 4, 10)
    assert set(engine.score(pred, truth, reference=ref)) == {
        "mse",
        "mae",
        "pearson_delta",
        "r2_delta",
        "cosine_delta",
    }
    assert "pearson_delta_degs" in engine.score(pred, truth, reference=ref, mask=mask)


def test_chunk_size_defaults():
    assert engine.default_chunk_size(8192) == 256
    assert engine.default_chunk_size(20000, 4) % 4 == 0
