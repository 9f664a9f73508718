"""The batching engine: equals the per-row reference, pads without recompiling, validates."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests import reference as R
from tests.conftest import load_fixture
from vcjax import engine
from vcjax.metrics import KERNELS


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
    sub = engine._sub_rows(16, 24)
    fn = engine._chunk_fn(metrics, (True, True, False, True, False), 20, False, sub)
    assert fn._cache_size() == 1  # one compilation for all five P


@pytest.mark.parametrize("shared", [False, True])
def test_blocked_passes_match_reference(monkeypatch, shared):
    """Chunks cut into row blocks (``lax.map`` over the fused passes) score every row right.

    Blocks of 4 rows in chunks of 16 (forced: at these G one block would hold the chunk);
    ragged last chunk, per-row or shared reference and weights, top-k beside the blocks.
    """
    if jax.default_backend() != "cpu":
        pytest.skip("row blocks are used on CPU only")
    monkeypatch.setattr(engine, "_CPU_BLOCK_ELEMENTS", 4 * 30)
    assert engine._sub_rows(16, 30) == 4 and engine._sub_rows(6, 30) == 2
    assert engine._sub_rows(16, 30, n_devices=2) == 16
    rng = np.random.default_rng(11)
    pred, truth, ref, w, mask = _case(rng, 37, 30)
    refs = ref if shared else ref + rng.normal(scale=0.1, size=(37, 30)).astype(np.float32)
    ws = w[0] if shared else w
    out = engine.score(pred, truth, reference=refs, weights=ws, mask=mask, k=6, chunk_size=16)
    want = R.reference_scores(
        pred, truth, np.broadcast_to(refs, pred.shape), np.broadcast_to(ws, pred.shape), mask, k=6
    )
    assert set(out) == set(want)
    for name, v in out.items():
        np.testing.assert_allclose(
            np.asarray(v, np.float64), want[name], rtol=2e-4, atol=2e-5, err_msg=name
        )


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
    assert engine.default_chunk_size(8192, backend="cpu") == 128  # 3 x 4 MiB: cache-sized
    assert engine.default_chunk_size(8192, backend="gpu") == 256
    assert engine.default_chunk_size(2000, backend="cpu") == 512
    assert engine.default_chunk_size(10, backend="gpu") == 1024  # capped
    for n_dev in (1, 3, 4):
        rows = engine.default_chunk_size(20000, n_dev)
        assert rows % n_dev == 0 and rows >= n_dev


def _kernels(pred, truth, ref, w, mask, k, strict):
    """Every engine metric from the public kernels of vcjax.metrics (the definitions)."""
    from vcjax import metrics as M

    return {
        "mse": M.mse(pred, truth),
        "wmse": M.wmse(pred, truth, w),
        "mae": M.mae(pred, truth),
        "pearson_delta": M.pearson_delta(pred, truth, ref),
        "pearson_delta_degs": M.pearson_delta_degs(pred, truth, ref, mask),
        "pearson_delta_topk": M.pearson_delta_topk(pred, truth, ref, w, k=k),
        "r2_delta": M.r2_delta(pred, truth, ref, strict=strict),
        "r2w_delta": M.r2w_delta(pred, truth, ref, w, strict=strict),
        "cosine_delta": M.cosine_delta(pred, truth, ref),
    }


def _edge_rows(rng, g):
    """Rows that hit every NaN / forced-value rule, stacked with random ones."""
    pred, truth, ref, w, mask = _case(rng, 12, g)
    grid = np.round(ref * 8) / 8
    ref = grid
    pred[0] = truth[0]  # perfect
    truth[1] = grid + 0.75  # constant truth delta
    truth[2] = grid + 0.75
    pred[2] = truth[2]  # constant and perfect
    w[3] = 0  # zero weights
    w[4] = 0
    w[4, 5] = 1  # one weight
    mask[5] = False  # empty mask
    mask[6] = False
    mask[6, :2] = True  # two genes
    pred[7] = ref  # prediction is the reference (zero delta)
    pred[8], truth[8] = pred[8] + 100, truth[8] + 100  # large offset
    w[9] = np.round(w[9] * 3) / 3  # many tied weights for top-k
    w[10, ::3] = np.nan  # NaN weights rank lowest in top-k
    return pred, truth, ref, w, mask


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("g,k", [(40, 5), (4500, 7)])
def test_fused_engine_equals_kernels(g, k, strict):
    """The fused engine path (shared moments) equals the kernels to float32 rounding."""
    rng = np.random.default_rng(g + k)
    pred, truth, ref, w, mask = _edge_rows(rng, g)
    w_clean = np.nan_to_num(w)  # NaN weights only for top-k (others propagate NaN)
    got = engine.score(pred, truth, reference=ref, weights=w_clean, mask=mask, k=k, strict=strict)
    want = _kernels(pred, truth, ref, w_clean, mask, k, strict)
    for name in want:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        np.testing.assert_allclose(a, b, rtol=3e-6, atol=3e-6, equal_nan=True, err_msg=name)
    # top-k with NaN weights (NaN ranks lowest) through the engine's gather path
    got = engine.score(pred, truth, reference=ref, weights=w, metrics=["pearson_delta_topk"], k=k)
    from vcjax import metrics as M

    want = M.pearson_delta_topk(pred, truth, ref, w, k=k)
    np.testing.assert_allclose(
        np.asarray(got["pearson_delta_topk"]), np.asarray(want), rtol=3e-6, atol=3e-6
    )


def test_fused_engine_shared_inputs_and_subsets():
    """Shared (G,) weights / mask / prediction and every single-metric subset."""
    rng = np.random.default_rng(11)
    pred, truth, ref, w, mask = _case(rng, 10, 50)
    want = _kernels(pred[0], truth, ref, w[0], mask[0], 4, False)
    for name in KERNELS:
        got = engine.score(
            pred[0], truth, reference=ref, weights=w[0], mask=mask[0], metrics=[name], k=4
        )
        np.testing.assert_allclose(
            np.asarray(got[name]), np.asarray(want[name]), rtol=3e-6, atol=3e-6, err_msg=name
        )


def test_float64_inputs_cast_per_chunk_and_small_p_chunk():
    rng = np.random.default_rng(12)
    pred, truth, ref, w, _ = _case(rng, 5, 30)
    a = engine.score(pred.astype(np.float64), truth.astype(np.float64), reference=ref, weights=w)
    b = engine.score(pred, truth, reference=ref, weights=w)
    for name in b:
        assert a[name].dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


def test_host_arrays_reach_the_device_without_compiling(caplog):
    """``device_array`` (and the engine's shared vectors and results) place host arrays
    with ``device_put``: the values and canonical dtypes of ``jnp.asarray``, a jax.Array
    passed through as it is, and no compilation (``jnp.asarray`` of a host array compiles
    a staging function per new shape in this JAX, 10-60 ms each on a first call)."""
    import logging

    import jax.numpy as jnp

    from vcjax._host import device_array

    rng = np.random.default_rng(3)
    host = [
        rng.normal(size=(7, 13)),  # float64: float32 unless x64
        rng.integers(0, 9, size=(5, 11)),
        rng.uniform(size=(3, 17)) < 0.5,
    ]
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG, logger="jax"):
        placed = [device_array(a) for a in host]
        # the capture works: a new jitted function logs its compilation
        jax.jit(lambda v: v * 3 + 1)(np.ones(19, np.float32)).block_until_ready()
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert len(compiles) == 1 and "lambda" in compiles[0], compiles
    for a, d in zip(host, placed):
        want = jnp.asarray(a)
        assert isinstance(d, jax.Array) and d.dtype == want.dtype and d.shape == a.shape
        np.testing.assert_array_equal(np.asarray(d), np.asarray(want))
    assert device_array(placed[0]) is placed[0]

    # the engine's results take the same route: a second call with a new number of rows
    # (the same compiled chunk function) compiles nothing
    pred, truth = rng.normal(size=(2, 6, 23)).astype(np.float32)
    ref = np.zeros(23, np.float32)
    engine.score(pred, truth, reference=ref, metrics=["mse"], chunk_size=8)
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG, logger="jax"):
        got = engine.score(pred[:5], truth[:5], reference=ref, metrics=["mse"], chunk_size=8)
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
    np.testing.assert_allclose(np.asarray(got["mse"]), ((pred - truth)[:5] ** 2).mean(1), rtol=1e-6)


def test_aligned_buffers():
    """``aligned_empty``: 64-byte aligned, C-contiguous, of the shape and dtype asked; with
    ``zeros`` every element is 0 (the bootstrap's layout relies on it for its padding
    slots), however large the buffer."""
    from vcjax._host import ALIGN, aligned_empty

    for shape, dtype in (((5, 7), np.float32), ((3, 1 << 20), np.float64), ((0, 4), np.int32)):
        for zeros in (False, True):
            a = aligned_empty(shape, dtype, zeros=zeros)
            assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
            assert a.ctypes.data % ALIGN == 0 or a.size == 0
            if zeros:
                assert not np.any(a)
