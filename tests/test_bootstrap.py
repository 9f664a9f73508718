"""The cell bootstrap (vcjax.pipeline): multiplicity-weight resampling equals an explicit per-resample loop,
reproducibility, chunk invariance, intervals vs scipy, and a small coverage check."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pandas as pd
import pytest
import scipy.stats

from tests.conftest import load_fixture
from vcjax import data as D
from vcjax import pipeline as PL
from vcjax import stats as ST
from vcjax.metrics import DEFAULT_METRICS

SCORE = PL.ScoreSpec(k=10)


def _screen(adata, **kw):
    return PL.prepare(adata, key="condition", control="control", normalize=None, **kw)


def _samples(
    screen, model, *, n_boot, seed, refit=True, chunk=None, pvalue="auto", metrics=DEFAULT_METRICS
):
    (stratum,) = screen.strata
    boot = PL.BootSpec(
        n_boot=n_boot, seed=seed, refit_weights=refit, chunk_size=chunk, pvalue=pvalue
    )
    return PL.stratum_samples(
        stratum, screen.spec, model=model, metrics=metrics, score=SCORE, boot=boot
    )


def _reference_loop(adata, screen, model, *, n_boot, seed, metrics, refit=True):
    """Materialise every resample explicitly and run the point-estimate code path on it
    (the host derivation and the engine's scoring) against the resampled sums."""
    (stratum,) = screen.strata
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X, dtype=np.float64)
    names = list(stratum.groups)
    code = stratum.cells.codes.astype(int)
    half = stratum.cells.half.astype(int)
    gh = 2 * code + half - 1
    order = np.argsort(gh, kind="stable")
    Xs, ghs = X[order], gh[order]
    sizes = np.bincount(ghs, minlength=2 * len(names))
    W = np.asarray(PL.multiplicity_weights(PL.stratum_key(seed, 0), sizes, n_boot))
    plan, fixed = stratum.plan(screen.spec), stratum.fixed(screen.spec)
    out = []
    for r in range(n_boot):
        Xr = np.repeat(Xs, W[r], axis=0)  # the resample, materialised
        cr = np.repeat(ghs, W[r])
        S = np.zeros((2 * len(names), X.shape[1]))
        Q = np.zeros_like(S)
        np.add.at(S, cr, Xr)
        np.add.at(Q, cr, Xr * Xr)
        n = np.bincount(cr, minlength=2 * len(names))
        halves = [
            D.GroupStats(tuple(names), stratum.genes, n[h::2], S[h::2], Q[h::2], "control")
            for h in (0, 1)
        ]
        sums = PL.Sums(
            halves[0].n, halves[1].n, *(a[None] for a in (S[0::2], Q[0::2], S[1::2], Q[1::2]))
        )
        derived = PL.derive(sums, plan, fixed, deg=None if refit else stratum.derived.deg)
        rs = dataclasses.replace(stratum, stats=D.SplitStats(*halves), derived=derived)
        preds = {"model": model, **rs.baselines}
        out.append(PL.score_sources(rs, screen.spec, preds, list(metrics), SCORE))
    return out


@pytest.fixture(scope="module")
def ds1():
    adata, exp = load_fixture("ds1_sparse")
    return adata, np.asarray(exp["pred_noisy"], dtype=np.float64)


@pytest.mark.parametrize("refit", [True, False])
def test_weights_equal_explicit_loop_float64(ds1, refit):
    adata, model = ds1
    n_boot, seed = 6, 3
    with jax.enable_x64(True):
        screen = _screen(adata)
        res = _samples(
            screen, model, n_boot=n_boot, seed=seed, refit=refit, pvalue="exact", chunk=4
        )
        ref = _reference_loop(
            adata, screen, model, n_boot=n_boot, seed=seed, metrics=DEFAULT_METRICS, refit=refit
        )
    checked = 0
    worst = 0.0
    for r in range(n_boot):
        for source, d in ref[r].items():
            for metric, want in d.items():
                got = res["values"][source][metric][r]
                np.testing.assert_array_equal(
                    np.isnan(got), np.isnan(want), err_msg=f"{source}/{metric}/{r}"
                )
                ok = np.isfinite(want)
                np.testing.assert_allclose(
                    got[ok], want[ok], rtol=1e-6, atol=1e-7, err_msg=f"{source}/{metric}"
                )
                if ok.any():
                    worst = max(worst, float(np.max(np.abs(got[ok] - want[ok]))))
                checked += ok.sum()
    assert checked > 500
    assert worst < 1e-7


def test_multiplicity_weights_are_within_group_multinomial():
    sizes = np.array([3, 5, 1, 4])
    W = np.asarray(PL.multiplicity_weights(jax.random.PRNGKey(0), sizes, 2000))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for g in range(sizes.size):
        block = W[:, bounds[g] : bounds[g + 1]]
        assert np.all(block.sum(1) == sizes[g])
        # each cell's count is Binomial(n, 1/n): mean 1, variance 1 - 1/n
        np.testing.assert_allclose(block.mean(0), 1.0, atol=0.1)
        np.testing.assert_allclose(block.var(0), 1 - 1 / sizes[g], atol=0.15)
    # chunks are independent of how they are cut
    W2 = np.asarray(PL.multiplicity_weights(jax.random.PRNGKey(0), sizes, 7, start=5))
    np.testing.assert_array_equal(W2, W[5:12])


def test_resampled_group_moments_matches_numpy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 5))
    codes = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1, 2])
    W = rng.integers(0, 3, size=(4, 12))
    with jax.enable_x64(True):
        n, S, Q = PL.resampled_group_moments(X, codes, W)
    for r in range(4):
        for c in range(3):
            sel = codes == c
            np.testing.assert_allclose(n[r, c], W[r, sel].sum())
            np.testing.assert_allclose(S[r, c], (W[r, sel, None] * X[sel]).sum(0), rtol=1e-12)
            np.testing.assert_allclose(Q[r, c], (W[r, sel, None] * X[sel] ** 2).sum(0), rtol=1e-12)


def test_seed_reproducible_and_chunk_invariant(ds1):
    adata, model = ds1
    screen = _screen(adata)
    a = _samples(screen, model, n_boot=10, seed=1, chunk=3)
    b = _samples(screen, model, n_boot=10, seed=1, chunk=10)
    c = _samples(screen, model, n_boot=10, seed=2, chunk=3)
    differs = False
    for s in a["values"]:
        for m in a["values"][s]:
            np.testing.assert_allclose(
                a["values"][s][m], b["values"][s][m], rtol=2e-6, atol=1e-6, equal_nan=True
            )
            x, y = a["values"][s][m], c["values"][s][m]
            if np.any(np.isfinite(x) & (np.abs(x - y) > 1e-6)):
                differs = True
    assert differs


def test_add_intervals_via_evaluate(ds1):
    adata, model = ds1
    exp = load_fixture("ds1_sparse")[1]
    pred = (list(exp["perts"]), model, list(exp["genes"]))
    kw = dict(key="condition", control="control", normalize=None, k=10, seed=0)
    with pytest.warns(UserWarning, match="fewer than 100 resamples"):
        t1 = PL.evaluate(adata, pred, n_boot=40, ci_method="bca", **kw)
    t2 = PL.evaluate(adata, pred, n_boot=40, ci_method="bca", **kw)
    pd.testing.assert_frame_equal(t1, t2)
    base = t1[~t1.source.str.startswith("model-vs-")]
    ok = base["value"].notna() & base["ci_low"].notna()
    assert ok.sum() > 100
    assert (base.loc[ok, "ci_low"] <= base.loc[ok, "ci_high"]).all()
    # every interval contains its estimate and lies in its metric's range
    inside = (base.loc[ok, "ci_low"] <= base.loc[ok, "value"]) & (
        base.loc[ok, "value"] <= base.loc[ok, "ci_high"]
    )
    assert inside.all(), base.loc[ok][~inside]
    _assert_in_range(base)
    cal = base["calibrated"].notna() & base["calibrated_ci_low"].notna()
    assert (base.loc[cal, "calibrated_ci_low"] <= base.loc[cal, "calibrated"]).all()
    assert (base.loc[cal, "calibrated"] <= base.loc[cal, "calibrated_ci_high"]).all()
    comp = t1[t1.source.str.startswith("model-vs-")]
    assert set(comp.source) == {f"model-vs-{b}" for b in PL.DEFAULT_BASELINES}
    # orientation: positive = model better
    m = t1[(t1.source == "model") & (t1.metric == "mse")].set_index("perturbation")["value"]
    c = t1[(t1.source == "control_mean") & (t1.metric == "mse")].set_index("perturbation")["value"]
    d = comp[(comp.source == "model-vs-control_mean") & (comp.metric == "mse")].set_index(
        "perturbation"
    )["value"]
    np.testing.assert_allclose(d.loc[m.index], (c - m).loc[m.index])
    w = comp["win_rate"].dropna()
    assert ((w >= 0) & (w <= 1)).all()
    assert base["win_rate"].isna().all()
    assert t1["calibrated_ci_low"].notna().any()


#: each core metric's closed range, written out independently of the registry
RANGES = {
    "mse": (0.0, np.inf),
    "wmse": (0.0, np.inf),
    "mae": (0.0, np.inf),
    "pearson_delta": (-1.0, 1.0),
    "pearson_delta_degs": (-1.0, 1.0),
    "pearson_delta_topk": (-1.0, 1.0),
    "pearson_delta_ctrl": (-1.0, 1.0),
    "cosine_delta": (-1.0, 1.0),
    "r2_delta": (-np.inf, 1.0),
    "r2w_delta": (-np.inf, 1.0),
    "r2_delta_ctrl": (-np.inf, 1.0),
}


def _assert_in_range(table):
    for metric, rows in table[table["ci_low"].notna()].groupby("metric"):
        lo, hi = RANGES[metric]
        assert (rows["ci_low"] >= lo).all() and (rows["ci_high"] <= hi).all(), (metric, rows)


def test_metric_bounds_follow_the_metric_ranges():
    """The registry's range of each core metric is the one written out here."""
    from vcjax.metrics import metric_bounds

    for metric, rng in RANGES.items():
        assert metric_bounds(metric) == rng, metric
        assert metric_bounds(metric, calibrated=True) == (-np.inf, np.inf)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_intervals_stay_in_range_and_contain_the_estimate(method):
    """Skewed resamples against a range's end (what the issue found on Norman 2019): the
    bias shift carries ends past the range; with ``bounds`` every interval is clipped to
    the range and contains its estimate, and is otherwise the unbounded interval."""
    rng = np.random.default_rng(9)
    B = 400
    cases = {
        # correlations near 1 whose resamples are biased low (a noisy truth)
        (-1.0, 1.0): (
            np.array([0.999, 0.98, 1.0]),
            1 - rng.gamma(1.0, [[0.02], [0.05], [0.01]], (3, B)),
        ),
        # errors near 0 with right-skewed resamples above the estimate
        (0.0, np.inf): (
            np.array([0.001, 0.01, 0.0]),
            rng.gamma(0.5, [[0.02], [0.05], [0.01]], (3, B)),
        ),
        # R² near 1 with long left tails
        (-np.inf, 1.0): (np.array([1.0, 0.97, 0.5]), 1 - rng.lognormal(-3, 2, (3, B))),
    }
    for bounds, (est, samp) in cases.items():
        samp = np.clip(samp, *bounds)
        lo, hi = ST.interval(samp, est, ci=0.95, method=method, target="expected", bounds=bounds)
        assert np.all(lo <= est) and np.all(est <= hi), (bounds, lo, est, hi)
        assert np.all(lo >= bounds[0]) and np.all(hi <= bounds[1]), (bounds, lo, hi)
        raw_lo, raw_hi = ST.interval(samp, est, ci=0.95, method=method, target="expected")
        assert ((raw_lo < bounds[0]) | (raw_hi > bounds[1])).any(), (bounds, raw_lo, raw_hi)
        np.testing.assert_array_equal(lo, np.minimum(np.clip(raw_lo, *bounds), est))
        np.testing.assert_array_equal(hi, np.maximum(np.clip(raw_hi, *bounds), est))
    # against NumPy: the centred percentile interval, widened to its estimate; NaN estimate
    s = rng.normal(size=(4, 300))
    e = np.array([0.1, -0.2, np.nan, 5.0])
    lo, hi = ST.interval(s, e, ci=0.9, method="percentile", target="expected")
    c = s - (s.mean(axis=1) - np.nan_to_num(e))[:, None]
    for i in (0, 1, 3):
        q = np.quantile(c[i], [0.05, 0.95])
        np.testing.assert_allclose([lo[i], hi[i]], [min(q[0], e[i]), max(q[1], e[i])], rtol=1e-12)
    assert np.isnan(lo[2]) and np.isnan(hi[2])
    # an estimate outside the uncentred resamples' interval is still contained
    lo, hi = ST.interval(s, e, ci=0.9, method="percentile", target="population")
    assert lo[3] < 5.0 and hi[3] == 5.0


def test_ties_within_float32_noise():
    a = np.array([1.0, 0.5, 1e-9, 100.0, np.nan, -np.inf, -np.inf, np.inf])
    b = np.array([1.0 + 5e-8, 0.5 + 1e-7, 0.0, 100.0 + 1e-6, np.nan, 0.3, -np.inf, 1e30])
    np.testing.assert_array_equal(
        ST.ties(a, b), [True, False, True, True, False, False, True, False]
    )
    assert ST.TIE_TOL == 6e-8


def test_win_rate_counts_ties_as_half():
    """Paired resamples: a win counts 1, a tie within float32 noise ½ (a model equal to a
    baseline wins 0.5, not 0), non-finite pairs are left out; against a NumPy loop."""
    rng = np.random.default_rng(10)
    a = rng.normal(size=(5, 50)).astype(np.float32).astype(np.float64)
    b = rng.normal(size=(5, 50)).astype(np.float32).astype(np.float64)
    b[1] = a[1]  # identical
    b[2] = a[2] * (1 + 3e-8)  # float32 round-off apart
    a[3, :10] = np.nan
    b[4] = np.nan
    got = ST.win_rate(a, b)
    for i in range(4):
        keep = np.isfinite(a[i]) & np.isfinite(b[i])
        d = np.abs(a[i] - b[i]) <= 6e-8 * np.maximum(1, np.maximum(abs(a[i]), abs(b[i])))
        want = np.mean(np.where(d, 0.5, (a[i] > b[i]).astype(float))[keep])
        np.testing.assert_allclose(got[i], want, rtol=1e-12)
    np.testing.assert_allclose(got[1:3], 0.5)
    assert np.isnan(got[4])


def test_percentile_matches_numpy():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(3, 501))
    s[1, :7] = np.nan
    lo, hi = ST.percentile_interval(s, ci=0.9)
    for i in range(3):
        v = s[i][np.isfinite(s[i])]
        np.testing.assert_allclose([lo[i], hi[i]], np.quantile(v, [0.05, 0.95]), rtol=1e-12)


@pytest.mark.parametrize("method", ["percentile", "BCa"])
def test_bootstrap_metric_vs_scipy(method):
    rng = np.random.default_rng(2)
    x = rng.exponential(size=60)  # skewed: BCa and percentile differ
    ours = ST.bootstrap_metric(
        lambda a: a.mean(), x, n_boot=20000, seed=0, method=method.lower(), chunk_size=5000
    )
    sp = scipy.stats.bootstrap((x,), np.mean, n_resamples=20000, method=method, random_state=0)
    se = sp.standard_error
    assert abs(ours.ci_low - sp.confidence_interval.low) < 0.05 * se * 4
    assert abs(ours.ci_high - sp.confidence_interval.high) < 0.05 * se * 4
    # BCa with a given jackknife acceleration equals the textbook formula on the same samples
    if method == "BCa":
        n = x.size
        jk = np.array([np.delete(x, i).mean() for i in range(n)])
        d = jk.mean() - jk
        a = (d**3).sum() / (6 * ((d**2).sum()) ** 1.5)
        th = ours.samples
        z0 = scipy.stats.norm.ppf(np.mean(th < x.mean()))
        q = [
            scipy.stats.norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))
            for z in scipy.stats.norm.ppf([0.025, 0.975])
        ]
        np.testing.assert_allclose([ours.ci_low, ours.ci_high], np.quantile(th, q), rtol=1e-7)


def test_bca_default_acceleration_is_skewness_over_six():
    rng = np.random.default_rng(3)
    s = rng.gamma(2.0, size=(1, 4000))
    est = np.array([2.0])
    a = scipy.stats.skew(s[0]) / 6
    lo1, hi1 = ST.bca_interval(s, est)
    lo2, hi2 = ST.bca_interval(s, est, acceleration=np.array([a]))
    np.testing.assert_allclose([lo1, hi1], [lo2, hi2], rtol=1e-10)


def test_fast_pvalues_close_to_exact():
    t = np.linspace(-12, 12, 2001)
    for nu in (30.0, 60.0, 200.0):
        p = scipy.stats.t.sf(np.abs(t), nu) * 2
        fast = np.asarray(ST.student_t_pvalues_fast(t, np.full_like(t, nu)))
        np.testing.assert_allclose(fast, p, rtol=2e-4, atol=1e-300)
    assert float(ST.student_t_pvalues_fast(np.inf, 40.0)) == 0.0


def test_summary_intervals_mean_and_median():
    rng = np.random.default_rng(4)
    rows = []
    for src, mu in (("model", 0.5), ("control_mean", 0.1)):
        for i in range(200):
            rows.append(
                dict(
                    perturbation=f"p{i}",
                    metric="r2w_delta",
                    source=src,
                    value=mu + rng.normal(scale=0.2),
                )
            )
    t = pd.DataFrame(rows)
    out = PL.summary_intervals(t, n_boot=2000, seed=0)
    for _, r in out.iterrows():
        v = t[t.source == r.source]["value"]
        se = v.std() / np.sqrt(v.size)
        assert abs(r.value - v.mean()) < 1e-12
        assert abs((r.ci_high - r.ci_low) - 2 * 1.96 * se) < 0.2 * 2 * 1.96 * se
    med = PL.summary_intervals(t, n_boot=500, seed=0, statistic="median", method="bca")
    assert (med.ci_low < med.value).all() and (med.value < med.ci_high).all()


def test_small_coverage_check():
    """Mean of Gaussian cells: percentile and BCa 90% intervals cover ~90% of the time."""
    from validation.coverage import coverage_of_mean

    cov = coverage_of_mean(n_rep=300, n_cells=40, n_boot=400, ci=0.9, seed=0)
    for method in ("percentile", "bca"):
        assert 0.84 <= cov[method] <= 0.95, cov


@pytest.mark.slow
def test_coverage_validation_small():
    """Small version of validation/coverage.py (the full run is reported in its README)."""
    from validation.coverage import run

    table = run(n_rep=30, n_boot=300, n_estimand=3000, verbose=False)
    exp = table[table.method.str.contains("target=expected")]
    assert len(exp) == 6
    assert (exp.sane == 1.0).all(), exp  # in range and containing the estimate
    assert (exp.coverage_E > 0.85).all() and (exp.coverage_E < 0.995).all(), exp
    pop = table[table.method == "percentile (target=population)"].set_index("metric")
    # Pearson(Δ) against a noisy truth is biased: raw intervals miss the population value
    assert pop.loc["pearson_delta", "coverage_population"] < 0.5


def test_host_bh_bit_identical_to_xla_bh():
    """The float32 host BH (a radix lexsort of the bits; the bootstrap's on CPU) equals
    stats.benjamini_hochberg bit for bit: long ties, ±0, exact 0 and 1, NaN (sorted last),
    many row blocks on threads. (Float64 is statsmodels' arithmetic: tests/test_deg.py.)"""
    rng = np.random.default_rng(5)
    p = (rng.random((300, 777)) ** 3).astype(np.float32)
    p[0, :300] = 0.5  # long tie
    p[1, ::2], p[1, 1::2] = -0.0, 0.0  # signed zeros tie
    p[2, :40] = 0.0
    p[3, :200] = 1.0
    p[4] = rng.integers(0, 3, 777) / 2
    want = np.asarray(jax.jit(ST.benjamini_hochberg)(p))
    np.testing.assert_array_equal(ST.benjamini_hochberg_host(p), want)
    p[5, :40] = np.nan  # the generic (argsort) path
    want = np.asarray(jax.jit(ST.benjamini_hochberg)(p))
    np.testing.assert_array_equal(ST.benjamini_hochberg_host(p), want)
    # NaN sorts last and the running minimum carries it down the row, in both
    assert np.isnan(want[5]).all() and not np.isnan(want[6]).any()
    # rows of a transposed or strided array (as ``x[:, idx]`` gives) come back in place
    for view in (np.asfortranarray(p), p[::2, ::3], p.T.copy().T):
        want = np.asarray(jax.jit(ST.benjamini_hochberg)(np.ascontiguousarray(view)))
        np.testing.assert_array_equal(ST.benjamini_hochberg_host(view), want)


@pytest.mark.parametrize("x64", [False, True])
def test_resampler_bh_equals_deg_bh(x64):
    """BH inside the resampler (host argsort on CPU) is bit-identical to deg's, and both
    equal statsmodels-style BH computed in float64 NumPy."""
    rng = np.random.default_rng(6)
    with jax.enable_x64(x64):
        dt = np.float64 if x64 else np.float32
        p = rng.random((3, 5, 400)).astype(dt)
        p[0, 0, :150] = 1.0
        p[1, 2, ::3] = p[1, 2, 0]
        p[2, 1] = 0.25
        got = np.asarray(jax.jit(ST.benjamini_hochberg_in_jit)(p))
        want = np.asarray(jax.jit(ST.benjamini_hochberg)(p))
    np.testing.assert_array_equal(got, want)
    q = p.astype(np.float64).reshape(-1, 400)
    o = np.argsort(q, axis=1)
    s = np.take_along_axis(q, o, 1) * 400 / np.arange(1, 401)
    ref = np.empty_like(q)
    np.put_along_axis(ref, o, np.minimum(1, np.minimum.accumulate(s[:, ::-1], 1)[:, ::-1]), 1)
    np.testing.assert_allclose(got.reshape(-1, 400), ref, rtol=1e-6 if not x64 else 1e-13)


@pytest.mark.parametrize("form", ["dense", "csr", "counts"])
def test_blocked_layout_holds_every_cell_once(form):
    """The resampler's cell layout: each group-half's cells, in order, in its first block and
    then its extra blocks, their squares beside them, zeros elsewhere (uneven groups, a
    group over four blocks, a one-cell half; dense, CSR, and counts normalised)."""
    import anndata as ad
    import scipy.sparse as sps

    from vcjax.pipeline import _bootstrap as B

    rng = np.random.default_rng(11)
    sizes = {"control": 230, "A": 9, "B": 40, "C": 17, "D": 2}
    names = np.repeat(list(sizes), list(sizes.values()))
    rng.shuffle(names)
    G = 7
    counts = rng.poisson(2.0, (names.size, G)).astype(np.float32)
    counts[:, 0] += 1  # no empty cell
    obs = pd.DataFrame({"condition": names}, index=[f"c{i}" for i in range(names.size)])
    X = {"dense": np.log1p(counts), "csr": sps.csr_matrix(np.log1p(counts)), "counts": counts}
    adata = ad.AnnData(X=X[form], obs=obs)
    adata.var_names = [f"g{j}" for j in range(G)]
    norm = "log1p_cp10k" if form == "counts" else None
    screen = PL.prepare(adata, key="condition", control="control", normalize=norm)
    (stratum,) = screen.strata
    lay = B._read_layout(stratum, dtype=np.float32)
    Xm, Xe, L = np.asarray(lay.Xm), np.asarray(lay.Xe), lay.L
    values = np.log1p(1e4 * counts / counts.sum(1, keepdims=True)) if norm else np.log1p(counts)
    values = values.astype(np.float32)
    cells = stratum.cells
    gh = 2 * cells.codes.astype(int) + cells.half.astype(int) - 1
    assert (lay.sizes == np.bincount(gh, minlength=lay.sizes.size)).all()
    extra_seen = 0
    for h, n in enumerate(lay.sizes):
        want = values[np.flatnonzero(gh == h)]  # dataset order within the group-half
        blocks = [Xm[h]] + [Xe[e] for e in np.flatnonzero(lay.extra_gh == h)]
        extra_seen += len(blocks) - 1
        assert len(blocks) == max(1, -(-n // L))
        got = np.concatenate(blocks)
        np.testing.assert_allclose(got[:n, :G], want, rtol=1e-6)
        np.testing.assert_array_equal(got[:n, G:], got[:n, :G] * got[:n, :G])
        assert not got[n:].any()
    assert extra_seen == Xe.shape[0] >= 4
