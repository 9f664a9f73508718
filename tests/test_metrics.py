"""Metric kernels against the oracle fixtures, a float64 NumPy reference and properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests import reference as R
from tests.conftest import load_fixture
from vcjax import metrics as M

SOURCES = ["techdup", "control", "datamean", "noisy", "additive"]
GATED = ("wmse", "wr2_delta", "pearson_delta_degs")  # NaN when a perturbation has no DEGs


def _fixture_metrics(exp, src):
    p, y, r, w = exp[f"pred_{src}"], exp["truth"], exp["u_all_half1"], exp["weights"]
    mask, ntc = exp["deg_mask"], exp["u_ntc"]
    got = {
        "mse": M.mse(p, y),
        "wmse": M.wmse(p, y, w),
        "pearson_delta": M.pearson_delta(p, y, r),
        "pearson_delta_degs": M.pearson_delta_degs(p, y, r, mask),
        "r2_delta": M.r2_delta(p, y, r),
        "wr2_delta": M.r2w_delta(p, y, r, w),
        "ext_pearson_deltactrl": M.pearson_delta(p, y, ntc),
        "ext_r2_deltactrl": M.r2_delta(p, y, ntc),
        "ext_pearson_delta_topk": M.pearson_delta_topk(p, y, r, np.abs(exp["t_scores"]), k=10),
    }
    got = {k: np.array(v, dtype=np.float64) for k, v in got.items()}
    no_deg = exp["deg_mask"].sum(1) == 0
    for k in GATED:
        got[k][no_deg] = np.nan
    if src == "datamean":  # DbD forces Pearson of the data-mean baseline to NaN
        for k in ("pearson_delta", "pearson_delta_degs", "ext_pearson_delta_topk"):
            got[k][:] = np.nan
    return got


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_kernels_match_oracle_fixtures(fixture_name, x64):
    _, exp = load_fixture(fixture_name)
    checked = 0
    with jax.enable_x64(x64):
        for src in SOURCES:
            if f"pred_{src}" not in exp:
                continue
            for name, value in _fixture_metrics(exp, src).items():
                want = exp[f"metric__{src}__{name}"]
                np.testing.assert_array_equal(
                    np.isnan(value), np.isnan(want), err_msg=f"{src}/{name} NaNs"
                )
                if x64:
                    # upstream normalises the WMSE weights in float32 (docs/metrics.md §3)
                    rtol = 1e-6 if name == "wmse" else 1e-10
                    atol = 0 if name == "wmse" else 1e-10
                else:
                    rtol, atol = 1e-5, 1e-5
                np.testing.assert_allclose(
                    value, want, rtol=rtol, atol=atol, err_msg=f"{src}/{name}"
                )
                checked += 1
    assert checked >= 36


def _random_case(rng, p=7, g=40, dtype=np.float64):
    truth = rng.normal(size=(p, g))
    pred = truth + rng.normal(scale=0.5, size=(p, g))
    ref = rng.normal(scale=0.3, size=(g,))
    w = rng.random((p, g)) ** 3
    mask = rng.random((p, g)) < 0.3
    return [a.astype(dtype) if a.dtype != bool else a for a in (pred, truth, ref, w, mask)]


def _grid(r):
    return np.round(r * 8) / 8


ADVERSARIAL = {
    "perfect": lambda p, t, r, w, m: (t.copy(), t, r, w, m),
    # r on a 1/8 grid so that (r + 0.75) - r is exactly 0.75: an exactly constant delta
    "constant_truth": lambda p, t, r, w, m: (
        p,
        np.tile(_grid(r) + 0.75, (t.shape[0], 1)),
        _grid(r),
        w,
        m,
    ),
    "constant_truth_perfect": lambda p, t, r, w, m: (
        (np.tile(_grid(r) + 0.75, (t.shape[0], 1)),) * 2 + (_grid(r), w, m)
    ),
    "zero_weights": lambda p, t, r, w, m: (p, t, r, np.zeros_like(w), m),
    "one_weight": lambda p, t, r, w, m: (p, t, r, np.eye(t.shape[0], t.shape[1]), m),
    "empty_mask": lambda p, t, r, w, m: (p, t, r, w, np.zeros_like(m)),
    "one_gene_mask": lambda p, t, r, w, m: (p, t, r, w, np.eye(t.shape[0], t.shape[1], dtype=bool)),
    "two_gene_mask": lambda p, t, r, w, m: (
        p,
        t,
        r,
        w,
        np.eye(t.shape[0], t.shape[1], dtype=bool) | np.eye(t.shape[0], t.shape[1], 1, dtype=bool),
    ),
    "pred_is_reference": lambda p, t, r, w, m: (np.tile(r, (t.shape[0], 1)), t, r, w, m),
    "large_offset": lambda p, t, r, w, m: (p + 100.0, t + 100.0, r + 100.0, w, m),
}


@pytest.mark.parametrize("case", ["random", *ADVERSARIAL])
@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_kernels_match_numpy_reference(case, x64):
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    args = _random_case(rng)
    if case != "random":
        args = ADVERSARIAL[case](*args)
    pred, truth, ref, w, mask = args
    want = R.reference_scores(pred, truth, ref, w, mask, k=5)
    tol = dict(rtol=1e-10, atol=1e-10) if x64 else dict(rtol=2e-4, atol=2e-5)
    with jax.enable_x64(x64):
        got = {
            "mse": M.mse(pred, truth),
            "mae": M.mae(pred, truth),
            "wmse": M.wmse(pred, truth, w),
            "pearson_delta": M.pearson_delta(pred, truth, ref),
            "pearson_delta_degs": M.pearson_delta_degs(pred, truth, ref, mask),
            "pearson_delta_topk": M.pearson_delta_topk(pred, truth, ref, w, k=5),
            "r2_delta": M.r2_delta(pred, truth, ref),
            "r2w_delta": M.r2w_delta(pred, truth, ref, w),
            "cosine_delta": M.cosine_delta(pred, truth, ref),
        }
    for name, value in got.items():
        value = np.asarray(value, dtype=np.float64)
        np.testing.assert_array_equal(
            np.isnan(value), np.isnan(want[name]), err_msg=f"{case}/{name}"
        )
        np.testing.assert_allclose(value, want[name], err_msg=f"{case}/{name}", **tol)


def test_strict_r2_is_nan_for_constant_truth():
    truth = np.tile(np.linspace(0, 1, 6), (2, 1)) * 0 + 3.0
    pred = truth + np.array([[0.0], [0.1]])
    ref = np.zeros(6)
    np.testing.assert_array_equal(np.asarray(M.r2_delta(pred, truth, ref)), [1.0, 0.0])
    assert np.all(np.isnan(np.asarray(M.r2_delta(pred, truth, ref, strict=True))))
    assert np.all(np.isnan(np.asarray(M.r2w_delta(pred, truth, ref, np.ones(6), strict=True))))


def test_documented_nan_rules():
    rng = np.random.default_rng(1)
    p, t, r = rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), rng.normal(size=5)
    assert np.all(np.isnan(np.asarray(M.pearson_delta_topk(p, t, r, np.ones(5), k=6))))  # k > G
    assert np.all(np.isnan(np.asarray(M.wmse(p, t, np.zeros(5)))))  # Σw = 0
    assert np.all(np.isnan(np.asarray(M.r2w_delta(p, t, r, np.zeros(5)))))
    assert np.all(np.isnan(np.asarray(M.pearson_delta_degs(p, t, r, np.zeros(5, bool)))))
    assert np.all(np.isnan(np.asarray(M.r2_delta(p[:, :1], t[:, :1], r[:1]))))  # G < 2
    two = np.array([True, True, False, False, False])
    assert np.allclose(np.abs(np.asarray(M.pearson_delta_degs(p, t, r, two))), 1.0)


def test_broadcast_reference_and_leading_dims():
    rng = np.random.default_rng(2)
    p, t = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 3, 8))
    r = rng.normal(size=8)
    full = np.asarray(M.r2_delta(p, t, np.broadcast_to(r, p.shape)))
    assert full.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(M.r2_delta(p, t, r)), full, rtol=1e-6)
    np.testing.assert_allclose(full, R.ref_r2_delta(p, t, r), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- properties (hypothesis)

finite = st.floats(-5, 5, allow_nan=False, width=64)


@st.composite
def cases(draw):
    g = draw(st.integers(3, 24))
    arr = hnp.arrays(np.float64, (g,), elements=finite)
    pred, truth, ref = draw(arr), draw(arr), draw(arr)
    w = draw(hnp.arrays(np.float64, (g,), elements=st.floats(0.01, 1.0)))
    perm = draw(st.permutations(range(g)))
    return pred, truth, ref, w, np.asarray(perm)


@settings(max_examples=30, deadline=None)
@given(cases(), st.floats(0.1, 100.0))
def test_properties(case, scale):
    pred, truth, ref, w, perm = case
    with jax.enable_x64(True):
        for fn, args in [
            (M.wmse, (pred, truth, w)),
            (M.r2w_delta, (pred, truth, ref, w)),
            (M.pearson_delta, (pred, truth, ref)),
            (M.r2_delta, (pred, truth, ref)),
            (M.mse, (pred, truth)),
        ]:
            base = np.asarray(fn(*args))
            permuted = np.asarray(fn(*(a[perm] for a in args)))
            np.testing.assert_allclose(permuted, base, rtol=1e-9, atol=1e-9, equal_nan=True)
        # weight scaling invariance
        np.testing.assert_allclose(
            np.asarray(M.wmse(pred, truth, w * scale)),
            np.asarray(M.wmse(pred, truth, w)),
            rtol=1e-9,
        )
        np.testing.assert_allclose(
            np.asarray(M.r2w_delta(pred, truth, ref, w * scale)),
            np.asarray(M.r2w_delta(pred, truth, ref, w)),
            rtol=1e-8,
            atol=1e-8,
        )
        # uniform weights reduce R²w to R²
        np.testing.assert_allclose(
            np.asarray(M.r2w_delta(pred, truth, ref, np.full_like(w, scale))),
            np.asarray(M.r2_delta(pred, truth, ref)),
            rtol=1e-8,
            atol=1e-8,
        )
        # perfect prediction
        assert float(M.wmse(truth, truth, w)) == 0.0
        assert float(M.r2w_delta(truth, truth, ref, w)) == 1.0


def test_jit_equals_eager():
    rng = np.random.default_rng(3)
    pred, truth, ref, w, mask = _random_case(rng, dtype=np.float32)
    for fn, args in [
        (M.wmse, (pred, truth, w)),
        (M.r2w_delta, (pred, truth, ref, w)),
        (M.pearson_delta_degs, (pred, truth, ref, mask)),
        (M.cosine_delta, (pred, truth, ref)),
    ]:
        np.testing.assert_allclose(
            np.asarray(jax.jit(fn)(*args)), np.asarray(fn(*args)), rtol=1e-6, atol=1e-7
        )
    f = jax.jit(lambda p, t, r, w: M.pearson_delta_topk(p, t, r, w, k=4))
    np.testing.assert_allclose(
        np.asarray(f(pred, truth, ref, w)),
        np.asarray(M.pearson_delta_topk(pred, truth, ref, w, k=4)),
        rtol=1e-6,
    )


GRAD_CASES = {
    "perfect": lambda t, r, w: (t, t, r, w),
    "constant_truth": lambda t, r, w: (t + 0.1, jnp.full_like(t, 2.0), r, w),
    "zero_weights": lambda t, r, w: (t + 0.1, t, r, jnp.zeros_like(w)),
    "pred_is_reference": lambda t, r, w: (r, t, r, w),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients_are_finite(case):
    rng = np.random.default_rng(4)
    t = jnp.asarray(rng.normal(size=12), jnp.float32)
    r = jnp.asarray(rng.normal(size=12), jnp.float32)
    w = jnp.asarray(rng.random(12), jnp.float32)
    pred, truth, ref, weights = GRAD_CASES[case](t, r, w)
    fns = {
        "mse": lambda p: M.mse(p, truth),
        "mae": lambda p: M.mae(p, truth),
        "wmse": lambda p: M.wmse(p, truth, weights),
        "pearson_delta": lambda p: M.pearson_delta(p, truth, ref),
        "r2_delta": lambda p: M.r2_delta(p, truth, ref),
        "r2w_delta": lambda p: M.r2w_delta(p, truth, ref, weights),
        "cosine_delta": lambda p: M.cosine_delta(p, truth, ref),
        "pearson_delta_topk": lambda p: M.pearson_delta_topk(p, truth, ref, w, k=5),
    }
    for name, f in fns.items():
        g = jax.grad(lambda p, f=f: jnp.nan_to_num(f(p)))(pred)
        assert np.all(np.isfinite(np.asarray(g))), f"{case}/{name}"
        jf = jax.jacfwd(lambda p, f=f: jnp.nan_to_num(f(p)))(pred)
        assert np.all(np.isfinite(np.asarray(jf))), f"{case}/{name} (jacfwd)"
    # the gradient of WMSE is the analytic one
    if case != "zero_weights":
        g = jax.grad(lambda p: M.wmse(p, truth, weights))(pred)
        want = 2 * weights / jnp.sum(weights) * (pred - truth)
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("g,k", [(4096, 20), (5003, 7), (8192, 2)])
def test_topk_mask_blocked_path_exact(g, k):
    """The blocked top-k used for long rows selects exactly lax.top_k's genes (ties, NaN)."""
    rng = np.random.default_rng(g)
    s = rng.integers(0, 5, size=(6, g)).astype(np.float32)  # heavy ties
    s[1] = rng.normal(size=g)
    s[2, rng.random(g) < 0.7] = np.nan
    s[3] = np.nan
    s[4] = 1.0
    s[5, rng.random(g) < 0.999] = -np.inf
    np.testing.assert_array_equal(np.asarray(M.topk_mask(s, k=k)), R.ref_topk_mask(s, k))


def test_fused_scores_gradient_equals_the_kernels():
    """fused_scores is differentiable (its variadic row reduction has a custom JVP whose
    tangents are plain sums) and its gradients equal the kernels' (float64)."""
    from vcjax.metrics import _kernels as K
    from vcjax.metrics import fused_scores

    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        P, G = 6, 50
        pred, truth = (jnp.asarray(rng.normal(size=(P, G))) for _ in range(2))
        ref = jnp.asarray(rng.normal(size=G))
        w = jnp.asarray(np.abs(rng.normal(size=(P, G))))
        mask = jnp.asarray(rng.random((P, G)) < 0.3)
        kernels = {
            "mse": lambda p: K.mse(p, truth),
            "wmse": lambda p: K.wmse(p, truth, w),
            "mae": lambda p: K.mae(p, truth),
            "pearson_delta": lambda p: K.pearson_delta(p, truth, ref),
            "pearson_delta_degs": lambda p: K.pearson_delta_degs(p, truth, ref, mask),
            "r2_delta": lambda p: K.r2_delta(p, truth, ref),
            "r2w_delta": lambda p: K.r2w_delta(p, truth, ref, w),
            "cosine_delta": lambda p: K.cosine_delta(p, truth, ref),
        }
        names = tuple(kernels)
        for m, kernel in kernels.items():
            fused = jax.grad(
                lambda p, m=m: fused_scores(names, 20, False, p, truth, ref, w, mask)[m].sum()
            )
            want = np.asarray(jax.grad(lambda p, f=kernel: f(p).sum())(pred))
            got = np.asarray(fused(pred))
            assert np.all(np.isfinite(got)), m
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=m)


@pytest.mark.parametrize("scale", [1.0, 0.1, 1e-3])
def test_r2w_constant_true_delta_is_detected_whatever_the_weights(scale):
    """A constant true Δ (23 genes, weights 0.01·scale) is a zero denominator, whatever
    the rounding of its weighted mean: sklearn's forced 0.0 for a wrong prediction, never
    −1e30 (hypothesis found scale 0.1 with a 4-ulp tolerance)."""
    with jax.enable_x64(True):
        truth = np.full(23, 0.9)
        ref = np.full(23, 0.01)
        w = np.full(23, 0.01) * scale
        assert float(M.r2w_delta(np.zeros(23), truth, ref, w)) == 0.0
        assert float(M.r2w_delta(truth, truth, ref, w)) == 1.0
        assert np.isnan(float(M.r2w_delta(np.zeros(23), truth, ref, w, strict=True)))
    got = M.r2w_delta(
        np.zeros(23, np.float32), truth.astype(np.float32), ref.astype(np.float32),
        (w * scale).astype(np.float32),
    )  # fmt: skip
    assert float(got) == 0.0
