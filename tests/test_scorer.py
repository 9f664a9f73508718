"""screen.scorer: the prepared truth as a pure JAX function, equal to evaluate's model rows,
jit-, vmap- (over models) and grad-compatible, with and without a covariate."""

from __future__ import annotations

import functools

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import vcjax
from vcjax import VcjaxInputError
from vcjax.metrics import DEFAULT_METRICS

KW = dict(key="condition", control="control")
SIM = dict(
    n_perturbations=8, n_genes=90, cells_per_perturbation=30, n_control=60, n_combinations=2,
    effect_genes=6, shared_shift_genes=8,
)  # fmt: skip


@functools.cache
def _screen(covariate: bool):
    extra = dict(covariate="cell_line", n_covariates=2) if covariate else {}
    adata = vcjax.simulate_screen(seed=6, **SIM, **extra)
    return vcjax.prepare(adata, covariate="cell_line" if covariate else None, **KW)


def _pred(screen, seed=0, noise=0.15):
    half = np.concatenate([s.baselines["technical_duplicate"] for s in screen.strata])
    return half + np.random.default_rng(seed).normal(0, noise, half.shape)


def _as_adata(screen, pred):
    obs = {screen.spec.key: list(screen.perturbations)}
    if screen.spec.covariate is not None:
        obs[screen.spec.covariate] = list(screen.covariates)
    a = ad.AnnData(
        pred.astype(np.float32),
        obs=pd.DataFrame(obs, index=[f"r{i}" for i in range(len(pred))]),
    )
    a.var_names = list(screen.genes)
    return a


@pytest.mark.parametrize("covariate", [False, True])
def test_scorer_equals_evaluate_model_rows(covariate):
    screen = _screen(covariate)
    pred = _pred(screen)
    table = vcjax.evaluate(screen, _as_adata(screen, pred))
    rows = table[table["source"] == "model"]
    keys = ["covariate", "perturbation"] if covariate else ["perturbation"]
    order = (
        pd.MultiIndex.from_arrays([list(screen.covariates), list(screen.perturbations)])
        if covariate
        else pd.Index(list(screen.perturbations))
    )
    raw = jax.jit(screen.scorer())(pred)
    cal = screen.scorer(calibrated=True)(pred)
    assert set(raw) == set(DEFAULT_METRICS)
    for m in DEFAULT_METRICS:
        want = rows[rows["metric"] == m].set_index(keys).reindex(order)
        for got, col in ((raw[m], "value"), (cal[m], "calibrated")):
            got, exp = np.asarray(got, np.float64), want[col].to_numpy(float)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(exp), err_msg=f"{m} {col}")
            ok = ~np.isnan(exp)
            assert ok.any(), (m, col)
            # float32 round-off; calibrated values divide it by the (duplicate − negative)
            # span, which is tiny for some rows (a calibrated value of −92 here)
            tol = 2e-5 if col == "value" else 1e-4
            np.testing.assert_allclose(got[ok], exp[ok], rtol=tol, atol=1e-5, err_msg=f"{m} {col}")


def test_scorer_gates_like_evaluate():
    """Perturbations without a DEG are NaN for the gated metrics, as in evaluate."""
    screen = _screen(False)
    (s,) = screen.strata
    assert s.no_degs is not None
    out = screen.scorer()(_pred(screen))
    gated = [m for m in DEFAULT_METRICS if vcjax.metrics.METRICS[m].gated_by_degs]
    for m in gated:
        assert np.all(np.isnan(np.asarray(out[m])[s.no_degs])), m
    ungated = screen.scorer(gate=False)(_pred(screen))
    if s.no_degs.any():
        assert np.isfinite(np.asarray(ungated["mse"])[s.no_degs]).all()


def test_scorer_vmaps_over_models_and_is_a_pytree():
    screen = _screen(False)
    sc = screen.scorer(metrics=("r2w_delta", "wmse", "pearson_delta"), calibrated=True)
    preds = np.stack([_pred(screen, seed=i) for i in range(3)])
    batched = jax.jit(jax.vmap(sc))(preds)
    for i in range(3):
        one = sc(preds[i])
        for m in one:
            # float32: XLA may order the vmapped reductions differently (a few ulp), and the
            # calibration divides by the positive-negative gap (seen: 5e-6 relative on an
            # AVX-512 CPU); a wrong batching would be off by orders more
            np.testing.assert_allclose(batched[m][i], one[m], rtol=2e-5, equal_nan=True)

    # the scorer passed as an argument: its arrays are inputs of the program, not constants
    @jax.jit
    def validate(score, pred):
        return jnp.nanmean(score(pred)["r2w_delta"])

    v = validate(sc, preds[0])
    np.testing.assert_allclose(v, np.nanmean(np.asarray(sc(preds[0])["r2w_delta"])), rtol=1e-6)
    leaves = jax.tree_util.tree_leaves(sc)
    assert any(leaf.shape == (len(screen.perturbations), len(screen.genes)) for leaf in leaves)


def test_scorer_gradient_matches_finite_differences():
    """grad of a validation objective (mean calibrated R²w(Δ) over defined rows) w.r.t. the
    prediction equals central differences in float64."""
    screen = _screen(False)
    with jax.enable_x64(True):
        sc = screen.scorer(metrics=("r2w_delta",), calibrated=True)
        sc = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64) if a.dtype == jnp.float32 else a, sc
        )
        pred = jnp.asarray(_pred(screen), jnp.float64)
        ok = np.isfinite(np.asarray(sc(pred)["r2w_delta"]))

        def objective(p):
            return jnp.sum(jnp.where(ok, sc(p)["r2w_delta"], 0.0))

        g = np.asarray(jax.grad(objective)(pred))
        assert np.all(np.isfinite(g))
        rng = np.random.default_rng(1)
        for _ in range(5):
            i, j = rng.integers(pred.shape[0]), rng.integers(pred.shape[1])
            e = jnp.zeros_like(pred).at[i, j].set(1e-6)
            fd = (float(objective(pred + e)) - float(objective(pred - e))) / 2e-6
            np.testing.assert_allclose(g[i, j], fd, rtol=1e-5, atol=1e-8)


def test_scorer_bad_inputs():
    screen = _screen(False)
    with pytest.raises(VcjaxInputError, match="host"):
        screen.scorer(metrics=("energy_distance",))
    sc = screen.scorer(metrics=("mse",))
    with pytest.raises(VcjaxInputError, match=r"\(\.\.\., P, G\)"):
        sc(np.zeros((3, len(screen.genes))))
