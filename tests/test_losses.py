"""Losses: equality with the metric kernels, float64 references, GEARS fixtures, gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import FIXTURES
from vcjax import losses as L
from vcjax import metrics as M

G = 12


def _data(seed: int = 0, shape=(3, 4)):
    rng = np.random.default_rng(seed)
    pred = rng.normal(size=shape + (G,)).astype(np.float32)
    truth = rng.normal(size=shape + (G,)).astype(np.float32)
    ref = rng.normal(size=(G,)).astype(np.float32)
    w = (rng.uniform(size=shape + (G,)) ** 2).astype(np.float32)
    return pred, truth, ref, w


# ----------------------------------------------------------------- numpy references


def _np_wmse(p, y, w):
    p, y, w = (np.asarray(a, np.float64) for a in (p, y, w))
    return np.sum(w * (p - y) ** 2, -1) / np.sum(w, -1)


def _np_r2w(p, y, r, w):
    p, y, r, w = (np.asarray(a, np.float64) for a in (p, y, r, w))
    dy, dp = y - r, p - r
    m = np.sum(w * dy, -1, keepdims=True) / np.sum(w, -1, keepdims=True)
    return 1 - np.sum(w * (dy - dp) ** 2, -1) / np.sum(w * (dy - m) ** 2, -1)


def _np_gears(pred, y, perts, lam, *, mode, ctrl=None, gamma=2.0, where=None, dl=1e-3):
    """Loop-over-conditions reference, written as the GEARS loss_fct (docs/metrics.md §8)."""
    pred, y = np.asarray(pred, np.float64), np.asarray(y, np.float64)
    perts = np.asarray(perts)
    lam = np.ones_like(pred) if lam is None else np.broadcast_to(lam, pred.shape)
    where = np.ones(pred.shape, bool) if where is None else where
    total, ups = 0.0, list(dict.fromkeys(perts.tolist()))
    e = 2.0 if mode == "mse" else 2.0 + gamma
    for p in ups:
        idx = np.flatnonzero(perts == p)
        for i in idx:
            g = where[i]
            term = np.sum(lam[i, g] * np.abs(pred[i, g] - y[i, g]) ** e) / g.sum()
            if mode == "default":
                s = (np.sign(y[i, g] - ctrl[g]) - np.sign(pred[i, g] - ctrl[g])) ** 2
                term += np.sum(lam[i, g] * dl * s) / g.sum()
            total += term / len(idx)
    return total / len(ups)


# ------------------------------------------------------------ equality with metrics


def test_losses_equal_metric_kernels():
    pred, truth, ref, w = _data()
    np.testing.assert_array_equal(L.mse_loss(pred, truth), M.mse(pred, truth))
    np.testing.assert_array_equal(L.wmse_loss(pred, truth, w), M.wmse(pred, truth, w))
    np.testing.assert_allclose(
        L.r2w_loss(pred, truth, ref, w), 1.0 - M.r2w_delta(pred, truth, ref, w), rtol=0, atol=0
    )
    mask = np.arange(G) % 3 != 0
    np.testing.assert_array_equal(
        L.wmse_loss(pred, truth, w, where=mask), M.wmse(pred, truth, w, where=mask)
    )
    assert L.mse_loss(pred, truth).shape == (3, 4)


def test_losses_match_float64_reference():
    pred, truth, ref, w = _data(1)
    np.testing.assert_allclose(
        L.mse_loss(pred, truth), np.mean((pred.astype(float) - truth) ** 2, -1), rtol=2e-6
    )
    np.testing.assert_allclose(L.wmse_loss(pred, truth, w), _np_wmse(pred, truth, w), rtol=2e-6)
    np.testing.assert_allclose(
        L.r2w_loss(pred, truth, ref, w), 1 - _np_r2w(pred, truth, ref, w), rtol=2e-5
    )
    # scale invariance of the normalised weights
    np.testing.assert_allclose(
        L.wmse_loss(pred, truth, 7.0 * w), L.wmse_loss(pred, truth, w), rtol=1e-6
    )


# ------------------------------------------------------------------ fallbacks


def test_zero_weight_fallbacks_are_finite_and_documented():
    pred, truth, ref, w = _data(2, shape=(4,))
    w = w.copy()
    w[1] = 0.0  # example 1 has Σw = 0: the metric is NaN
    assert np.isnan(M.wmse(pred, truth, w)[1]) and np.isnan(M.r2w_delta(pred, truth, ref, w)[1])
    lw = L.wmse_loss(pred, truth, w)
    np.testing.assert_allclose(lw[1], M.mse(pred[1], truth[1]), rtol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(lw)[[0, 2, 3]], np.asarray(M.wmse(pred, truth, w))[[0, 2, 3]]
    )
    assert float(L.wmse_loss(pred, truth, w, fallback="zero")[1]) == 0.0
    lr = L.r2w_loss(pred, truth, ref, w)
    np.testing.assert_allclose(lr[1], 1.0 - M.r2_delta(pred[1], truth[1], ref), rtol=1e-6)
    assert float(L.r2w_loss(pred, truth, ref, w, fallback="zero")[1]) == 0.0
    # fewer than 2 selected genes, empty mask: finite zero
    one = np.zeros(G, bool)
    one[0] = True
    assert float(L.r2w_loss(pred[0], truth[0], ref, w[0], where=one)) == 0.0
    assert float(L.mse_loss(pred[0], truth[0], where=np.zeros(G, bool))) == 0.0
    with pytest.raises(ValueError):
        L.wmse_loss(pred, truth, w, fallback="nan")


def test_r2w_loss_constant_truth_delta_forced_values():
    _, _, ref, w = _data(3, shape=())
    truth = ref + 0.5  # constant true delta: zero denominator
    assert float(L.r2w_loss(ref + 0.3, truth, ref, w)) == pytest.approx(1.0)
    assert float(L.r2w_loss(truth, truth, ref, w)) == 0.0


# ------------------------------------------------------------------ gradients


def _edge_cases():
    pred, truth, ref, w = _data(4, shape=())
    zero_w = np.zeros_like(w)
    return {
        "generic": (pred, truth, ref, w),
        "perfect": (truth, truth, ref, w),
        "zero_weights": (pred, truth, ref, zero_w),
        "perfect_zero_weights": (truth, truth, ref, zero_w),
        "constant_target": (pred, np.full_like(truth, 1.5), ref, w),
        "constant_delta": (pred, ref + 0.7, ref, w),
        "perfect_constant_delta": (ref + 0.7, ref + 0.7, ref, w),
        "one_weight": (pred, truth, ref, np.eye(G, dtype=np.float32)[3]),
        "all_zero": (np.zeros(G, np.float32), np.zeros(G, np.float32), np.zeros(G, np.float32), w),
    }


LOSSES = {
    "mse": lambda p, t, r, w: L.mse_loss(p, t),
    "wmse": lambda p, t, r, w: L.wmse_loss(p, t, w),
    "wmse_zero": lambda p, t, r, w: L.wmse_loss(p, t, w, fallback="zero"),
    "r2w": lambda p, t, r, w: L.r2w_loss(p, t, r, w),
    "r2w_zero": lambda p, t, r, w: L.r2w_loss(p, t, r, w, fallback="zero"),
    "gears_mse": lambda p, t, r, w: L.gears_loss(p[None], t[None], jnp.zeros(1, int), weights=w),
    "gears_default": lambda p, t, r, w: L.gears_loss(
        p[None], t[None], jnp.zeros(1, int), weights=w, mode="default", control=r
    ),
    "gears_plain": lambda p, t, r, w: L.gears_loss(p[None], t[None], jnp.zeros(1, int)),
    "gears_gamma1": lambda p, t, r, w: L.gears_loss(
        p[None], t[None], jnp.zeros(1, int), mode="default", control=r, gamma=1.0
    ),
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_values_and_gradients_finite(loss):
    """Every edge case at once (vmapped over cases): finite values, grad == jacfwd, finite."""
    fn = LOSSES[loss]
    cases = _edge_cases()
    p, t, r, w = (jnp.asarray(np.stack(x)) for x in zip(*cases.values()))
    values = jax.jit(jax.vmap(fn))(p, t, r, w)
    assert np.all(np.isfinite(values)), dict(zip(cases, np.asarray(values)))
    argnums = (0, 1, 3)  # predictions, targets, weights
    rev = jax.jit(jax.vmap(jax.grad(fn, argnums=argnums)))(p, t, r, w)
    fwd = jax.jit(jax.vmap(jax.jacfwd(fn, argnums=argnums)))(p, t, r, w)
    for a, g, jf in zip(argnums, rev, fwd):
        g, jf = np.asarray(g), np.asarray(jf)
        for k, case in enumerate(cases):
            assert np.all(np.isfinite(g[k])), (loss, case, a, g[k])
            assert np.all(np.isfinite(jf[k])), (loss, case, a, jf[k])
            scale = max(1.0, float(np.max(np.abs(jf[k]))))
            np.testing.assert_allclose(g[k], jf[k], rtol=1e-4, atol=1e-5 * scale)
    # a perfect prediction is a stationary point of every loss
    k = list(cases).index("perfect")
    np.testing.assert_allclose(np.asarray(rev[0])[k], 0.0, atol=1e-6)


def test_gradient_matches_finite_differences():
    pred, truth, ref, w = (a.astype(np.float64) for a in _data(5, shape=()))
    with jax.enable_x64(True):
        for name in ("wmse", "r2w", "gears_default"):
            fn = LOSSES[name]
            g = np.asarray(jax.jit(jax.grad(fn))(pred, truth, ref, w))
            eps = 1e-6
            shifted = jax.jit(jax.vmap(fn, in_axes=(0, None, None, None)))
            fd = (
                np.asarray(shifted(pred + eps * np.eye(G), truth, ref, w))
                - np.asarray(shifted(pred - eps * np.eye(G), truth, ref, w))
            ) / (2 * eps)
            np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------ jit / vmap


def test_jit_and_vmap_compatible():
    pred, truth, ref, w = _data(6)
    for name, fn in LOSSES.items():
        if name.startswith("gears"):
            continue
        eager = fn(pred, truth, ref, w)
        np.testing.assert_allclose(jax.jit(fn)(pred, truth, ref, w), eager, rtol=1e-6)
        vm = jax.vmap(fn, in_axes=(0, 0, None, 0))(pred, truth, ref, w)
        np.testing.assert_allclose(vm, eager, rtol=1e-6)
    # gears: (K, B, G) batches vmapped vs looped, under jit with static options
    rng = np.random.default_rng(7)
    P = rng.normal(size=(3, 6, G)).astype(np.float32)
    Y = rng.normal(size=(3, 6, G)).astype(np.float32)
    C = rng.integers(0, 3, size=(3, 6))
    gl = jax.jit(functools.partial(L.gears_loss, mode="default", control=ref))
    batched = gl(P, Y, C, weights=w[0, :1])
    looped = [gl(P[k], Y[k], C[k], weights=w[0, :1]) for k in range(3)]
    np.testing.assert_allclose(batched, looped, rtol=1e-6)
    np.testing.assert_allclose(
        jax.vmap(lambda a, b, c: gl(a, b, c, weights=w[0, :1]))(P, Y, C), looped, rtol=1e-6
    )


# ------------------------------------------------------------------ GEARS


@pytest.mark.parametrize("ds", ["ds1_sparse", "ds2_double"])
def test_gears_loss_fixture_parity(ds):
    e = np.load(FIXTURES / f"{ds}_expected.npz")
    names = list(e["perts"])
    perts = e["gears_batch_perts"]
    ids = np.array([names.index(p) for p in perts])
    w = e["weights"][ids]  # float32 §3.2 weights; λ = 100·w inside the loss
    want = {
        "mse": e["gears__loss_weighted_mse"],
        "default": e["gears__loss_weighted_default"],
        "plain": e["gears__loss_unweighted_mse_allgenes"],
    }
    for x64, rtol in ((True, 1e-8), (False, 2e-6)):
        with jax.enable_x64(x64):
            dt = np.float64 if x64 else np.float32
            p = jnp.asarray(e["gears_batch_pred"], dt)
            y = jnp.asarray(e["gears_batch_y"], dt)
            ctrl = jnp.asarray(e["u_ntc"], dt)
            got = {
                "mse": L.gears_loss(p, y, ids, weights=w, mode="mse"),
                "default": L.gears_loss(p, y, ids, weights=w, mode="default", control=ctrl),
                "plain": L.gears_loss(p, y, ids),
            }
            for k in want:
                np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=rtol, err_msg=k)


def test_gears_loss_matches_loop_reference_with_masks():
    rng = np.random.default_rng(8)
    B = 10
    pred = rng.normal(size=(B, G))
    y = rng.normal(size=(B, G))
    ctrl = rng.normal(size=G)
    perts = rng.choice(["a", "b", "c"], size=B)
    ids = np.unique(perts, return_inverse=True)[1]
    table = rng.uniform(size=(3, G)) ** 2
    lam = table[ids]
    retain = rng.uniform(size=(3, G)) > 0.3  # per-condition retained genes
    where = retain[ids]
    with jax.enable_x64(True):
        cases = [
            ("mse", 2.0, None, None),
            ("mse", 2.0, lam, where),
            ("default", 2.0, lam, None),
            ("default", 2.0, None, where),
            ("default", 1.5, lam, where),
        ]
        for mode, gamma, weights, wh in cases:
            got = L.gears_loss(
                pred, y, ids, weights=weights, scale=1.0, mode=mode, control=ctrl,
                gamma=gamma, where=wh,
            )  # fmt: skip
            ref = _np_gears(pred, y, perts, weights, mode=mode, ctrl=ctrl, gamma=gamma, where=wh)
            np.testing.assert_allclose(float(got), ref, rtol=1e-10)
        # scale multiplies the weights (λ = 100·w by default)
        np.testing.assert_allclose(
            L.gears_loss(pred, y, ids, weights=lam),
            100.0 * L.gears_loss(pred, y, ids, weights=lam, scale=1.0),
            rtol=1e-12,
        )
        # per-condition averaging: padding cells are ignored, cell order does not matter
        pad = np.concatenate([pred, rng.normal(size=(3, G))])
        ypad = np.concatenate([y, rng.normal(size=(3, G))])
        idpad = np.concatenate([ids, [0, 7, 7]])
        valid = np.r_[np.ones(B, bool), np.zeros(3, bool)]
        np.testing.assert_allclose(
            L.gears_loss(pad, ypad, idpad, cell_mask=valid), L.gears_loss(pred, y, ids), rtol=1e-12
        )
        perm = rng.permutation(B)
        np.testing.assert_allclose(
            L.gears_loss(pred[perm], y[perm], ids[perm]), L.gears_loss(pred, y, ids), rtol=1e-12
        )
        # each condition counts once, however many cells it has in the batch
        two = L.gears_loss(pred[:2], y[:2], np.array([0, 1]))
        dup = L.gears_loss(pred[[0, 0, 0, 1]], y[[0, 0, 0, 1]], np.array([0, 0, 0, 1]))
        np.testing.assert_allclose(two, dup, rtol=1e-12)
        assert float(L.gears_loss(pred, y, ids, cell_mask=np.zeros(B, bool))) == 0.0


def test_gears_loss_rejects_bad_options():
    x = np.zeros((2, G), np.float32)
    with pytest.raises(ValueError):
        L.gears_loss(x, x, np.zeros(2, int), mode="default")  # no control
    with pytest.raises(ValueError):
        L.gears_loss(x, x, np.zeros(2, int), mode="focal")
    with pytest.raises(ValueError):
        L.gears_loss(x, x, np.zeros(2, int), mode="default", control=x[0], gamma=-1.0)


# ------------------------------------------------------------ non-finite inputs


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_non_finite_inputs_propagate(loss):
    """A NaN/±Inf anywhere in an example's predictions, targets or weights gives a
    non-finite loss (never the finite fallback of an undefined metric) and a non-finite
    gradient; the clean examples keep their values (one vmapped call over every case)."""
    fn = LOSSES[loss]
    pred, truth, ref, w = _data(11, shape=(12,))
    p, t, ww = pred.copy(), truth.copy(), w.copy()
    cases = [(arr, bad) for arr in (p, t, ww) for bad in (np.nan, np.inf, -np.inf)]
    for k, (arr, bad) in enumerate(cases):  # example k corrupted; examples 9-11 clean
        arr[k, 5] = bad
    vf = jax.vmap(fn, (0, 0, None, 0))
    values = np.asarray(jax.jit(vf)(p, t, ref, ww))
    grads = np.asarray(jax.jit(jax.vmap(jax.grad(fn), (0, 0, None, 0)))(p, t, ref, ww))
    clean_values = np.asarray(vf(pred, truth, ref, w))
    takes_weights = loss not in ("mse", "gears_plain", "gears_gamma1")
    for k, (arr, bad) in enumerate(cases):
        if arr is ww and not takes_weights:
            np.testing.assert_allclose(values[k], clean_values[k], rtol=1e-6)
            continue
        assert not np.isfinite(values[k]), (loss, k, bad, values[k])
        assert not np.all(np.isfinite(grads[k])), (loss, k, bad)
    np.testing.assert_allclose(values[9:], clean_values[9:], rtol=1e-6)
    assert np.all(np.isfinite(grads[9:]))


def test_nan_prediction_is_not_a_perfect_loss():
    """The issue's case: a diverging model (NaN prediction) must not log loss 0, also where
    the finite fallback would apply (all-zero weights, no selected gene)."""
    pred, truth, ref, w = _data(12, shape=())
    pred = pred.copy()
    pred[3] = np.nan
    zero_w = np.zeros_like(w)
    no_gene = np.zeros(G, bool)
    for value in (
        L.mse_loss(pred, truth),
        L.mse_loss(pred, truth, where=no_gene),
        L.wmse_loss(pred, truth, w),
        L.wmse_loss(pred, truth, zero_w),
        L.wmse_loss(pred, truth, zero_w, fallback="zero"),
        L.r2w_loss(pred, truth, ref, zero_w),
        L.r2w_loss(pred, truth, ref, w, fallback="zero"),
        L.gears_loss(pred[None], truth[None], jnp.zeros(1, int), weights=w),
    ):
        assert np.isnan(float(value))
    # an infinite prediction on a weighted gene is an infinitely bad squared error
    inf_pred = np.asarray(_data(12, shape=())[0]).copy()
    inf_pred[3] = np.inf
    assert float(L.mse_loss(inf_pred, truth)) == np.inf
    assert float(L.wmse_loss(inf_pred, truth, w)) == np.inf


def test_gears_padding_cells_are_ignored_even_if_non_finite():
    pred, truth, _, w = _data(13, shape=(5,))
    ids = np.array([0, 0, 1, 2, 2])
    mask = np.array([True, True, True, True, False])
    want = float(L.gears_loss(pred[:4], truth[:4], ids[:4], weights=w[:4]))
    pred = pred.copy()
    pred[4] = np.nan
    got = float(L.gears_loss(pred, truth, ids, weights=w, cell_mask=mask))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    pred[0, 0] = np.nan  # a NaN in a real cell does propagate
    assert np.isnan(float(L.gears_loss(pred, truth, ids, weights=w, cell_mask=mask)))
