"""vcjax.stats (differential expression): t/p/BH/logFC/weights vs the DbD fixtures, scanpy, scipy and statsmodels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import load_fixture
from vcjax import data
from vcjax import stats as deg
from vcjax.data import VcjaxInputError
from vcjax.stats import _deg

ad = pytest.importorskip("anndata")
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.PerformanceWarning")


# -------------------------------------------------------------------- fixtures
def test_fixture_parity(fixture_name):
    adata, exp = load_fixture(fixture_name)
    st = data.group_stats(adata, "condition", control="control")
    res = deg.rank_genes(st)
    assert list(res.names) == [str(p) for p in exp["perts"]]
    assert res.scores.dtype == np.float32 and res.logfc.dtype == np.float32
    np.testing.assert_array_equal(res.scores, exp["t_scores"])  # bit-identical float32
    np.testing.assert_array_equal(res.weights(), exp["weights"])  # bit-identical float32
    np.testing.assert_allclose(res.pvals, exp["pvals"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.pvals_adj, exp["pvals_adj"], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(res.logfc, exp["logfoldchanges"])
    np.testing.assert_array_equal(res.deg_mask(), exp["deg_mask"])
    np.testing.assert_array_equal(deg.rank_genes(st).weights(), exp["weights"])
    # rank_genes on stats without the control gives the same (control excluded from rest)
    res2 = deg.rank_genes(st.perturbed())
    np.testing.assert_array_equal(res2.scores, res.scores)


# ---------------------------------------------------------------------- scanpy
def scanpy_de(adata, key, *, method, reference, groups):
    sc = pytest.importorskip("scanpy")
    sc.tl.rank_genes_groups(
        adata, key, method=method, reference=reference, n_genes=adata.n_vars, use_raw=False
    )
    rg = adata.uns["rank_genes_groups"]
    gidx = {g: j for j, g in enumerate(adata.var_names)}
    out = {}
    for field in ("scores", "pvals", "pvals_adj", "logfoldchanges"):
        M = np.empty((len(groups), adata.n_vars), dtype=np.float64)
        for i, grp in enumerate(groups):
            cols = [gidx[g] for g in rg["names"][grp]]
            M[i, cols] = rg[field][grp]
        out[field] = M
    out["scores"] = out["scores"].astype(np.float32)
    return out


def compare_to_scanpy(adata, key, control, *, method, vs, exact_frac=0.999):
    st = data.group_stats(adata, key, control=control, normalize=None)
    res = deg.rank_genes(st, method=method, vs=vs)
    perts = list(res.names)
    if vs == "rest":
        sub = adata[adata.obs[key].astype(str) != control].copy()
        ref = scanpy_de(sub, key, method=method, reference="rest", groups=perts)
    else:
        ref = scanpy_de(adata.copy(), key, method=method, reference=control, groups=perts)
    s = res.scores.astype(np.float64)
    r = ref["scores"].astype(np.float64)
    np.testing.assert_allclose(s, r, rtol=1e-4, atol=1e-5)
    frac = np.mean(res.scores == ref["scores"])
    assert frac >= exact_frac, f"only {frac:.5f} of float32 scores bit-identical"
    np.testing.assert_allclose(res.pvals, ref["pvals"], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(res.pvals_adj, ref["pvals_adj"], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(res.logfc, ref["logfoldchanges"], rtol=1e-5, atol=1e-5)
    w_ref = np.asarray(deg.minmax_weights(ref["scores"]))
    np.testing.assert_allclose(res.weights(), w_ref, atol=1e-5)
    return res, ref


METHODS = ["t-test_overestim_var", "t-test"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("vs", ["rest", "control"])
def test_scanpy_parity_fixtures(fixture_name, method, vs):
    adata, _ = load_fixture(fixture_name)
    res, ref = compare_to_scanpy(adata, "condition", "control", method=method, vs=vs, exact_frac=1)
    np.testing.assert_array_equal(res.scores, ref["scores"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("vs", ["rest", "control"])
def test_scanpy_parity_norman19(shared_data, method, vs):
    adata = data.read_h5ad(shared_data("norman19_perturbench_devel.h5ad"))
    compare_to_scanpy(adata, "condition", "control", method=method, vs=vs)


@pytest.mark.parametrize("vs", ["rest", "control"])
def test_scanpy_parity_papalexi_counts(shared_data, vs):
    sc = pytest.importorskip("scanpy")
    adata = data.read_h5ad(shared_data("papalexi21_thp1_eccite_sceptredata.h5ad"))
    # 8 perturbations + control keep the scanpy side fast (per-cell normalisation is unaffected)
    keep = ["non-targeting", "SPI1", "MYC", "CUL3", "BRD4", "IFNGR2", "JAK2", "STAT1", "CMTM6"]
    adata = adata[adata.obs["perturbation"].isin(keep)].copy()
    st = data.group_stats(adata, "perturbation", control="non-targeting")  # auto → normalise
    assert st.normalization == "log1p_cp10k"
    norm = adata.copy()
    norm.X = norm.X.astype(np.float64)
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    st_ref = data.group_stats(norm, "perturbation", control="non-targeting", normalize=None)
    np.testing.assert_allclose(st.mean, st_ref.mean, rtol=1e-12, atol=1e-12)
    res, ref = compare_to_scanpy(
        norm, "perturbation", "non-targeting", method="t-test_overestim_var", vs=vs
    )
    res_auto = deg.rank_genes(st, vs=vs)
    np.testing.assert_allclose(res_auto.scores, res.scores, rtol=1e-5, atol=1e-5)


def test_covariate_rank_genes_within_cell_type(shared_data):
    adata = data.read_h5ad(shared_data("mcfaline23_perturbench_devel.h5ad"))
    st = data.group_stats(adata, "condition", control="control", covariate="cell_type")
    res = deg.rank_genes(st)
    assert len(res.names) == 27
    for ct in ("A172", "U87MG"):
        sub = adata[adata.obs["cell_type"] == ct].copy()
        rows = [i for i, c in enumerate(res.covariate) if c == ct]
        perts = [res.names[i] for i in rows]
        nc = sub[sub.obs["condition"] != "control"].copy()
        ref = scanpy_de(
            nc, "condition", method="t-test_overestim_var", reference="rest", groups=perts
        )
        np.testing.assert_allclose(res.scores[rows], ref["scores"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res.pvals[rows], ref["pvals"], rtol=1e-7, atol=1e-12)
        # equals rank_genes on that covariate alone
        alone = deg.rank_genes(st.for_covariate(ct))
        np.testing.assert_array_equal(alone.scores, res.scores[rows])
    ctrl = deg.rank_genes(st, vs="control")
    assert ctrl.scores.shape == (27, 500)


# ------------------------------------------------------------- pure formulas
def test_t_from_moments_vs_scipy_and_float32_jit():
    from scipy import stats

    rng = np.random.default_rng(0)
    mg, mr = rng.normal(size=(2, 4, 30))
    vg, vr = rng.gamma(2.0, size=(2, 4, 30))
    ng = np.array([3, 10, 40, 7])[:, None]
    nr = np.array([50, 20, 300, 9])[:, None]
    with jax.enable_x64(True):
        for method, nobs2 in (("t-test", nr), ("t-test_overestim_var", ng)):
            t, dof = deg.t_from_moments(mg, vg, ng, mr, vr, nr, method=method)
            tr, pr = stats.ttest_ind_from_stats(
                mg, np.sqrt(vg), ng, mr, np.sqrt(vr), nobs2, equal_var=False
            )
            np.testing.assert_allclose(np.asarray(t), tr, rtol=1e-13)
            np.testing.assert_allclose(np.asarray(deg.pvalues(t, dof)), pr, rtol=1e-10, atol=1e-14)
    f = jax.jit(jax.vmap(lambda *a: deg.t_from_moments(*a)))
    t32, d32 = f(*(jnp.asarray(x, jnp.float32) for x in (mg, vg, ng, mr, vr, nr)))
    assert t32.dtype == jnp.float32
    tr, _ = stats.ttest_ind_from_stats(mg, np.sqrt(vg), ng, mr, np.sqrt(vr), ng, equal_var=False)
    np.testing.assert_allclose(np.asarray(t32), tr, rtol=1e-5)
    p32 = deg.pvalues(t32, d32)
    assert p32.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(p32)))


def test_t_edge_cases():
    with jax.enable_x64(True):
        t, dof = deg.t_from_moments(
            np.array([1.0, 1.0, 2.0]), np.zeros(3), 5, np.array([1.0, 2.0, 0.0]), np.zeros(3), 5
        )
        t = np.asarray(t)
        assert np.isnan(t[0]) and t[1] == -np.inf and t[2] == np.inf
        np.testing.assert_array_equal(np.asarray(dof), 1.0)
        p = np.asarray(deg.pvalues(t, dof))
        assert np.isnan(p[0]) and p[1] == 0 and p[2] == 0
        assert float(deg.pvalues(0.0, 7.0)) == pytest.approx(1.0, abs=1e-15)


def test_benjamini_hochberg_vs_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(1)
    p = rng.random((5, 200)) ** 3
    p[:, :20] = p[:, 20:40]  # ties
    p[0, 5] = 1.0
    with jax.enable_x64(True):
        q = np.asarray(deg.benjamini_hochberg(p))
        q0 = np.asarray(deg.benjamini_hochberg(p.T, axis=0)).T
    ref = np.array([multitest.multipletests(row, method="fdr_bh")[1] for row in p])
    np.testing.assert_allclose(q, ref, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(q0, q)
    assert q.max() <= 1.0


def np_minmax(t):
    s = np.abs(np.asarray(t, dtype=np.float32))
    lo, hi = s.min(), s.max()
    with np.errstate(invalid="ignore", divide="ignore"):
        if hi == lo:
            w = np.full_like(s, 0.0 if hi == 0 else 1.0)
        else:
            w = (s - lo) / (hi - lo)
    w = np.nan_to_num(w, nan=0.0)
    return w * w


@pytest.mark.parametrize(
    "row",
    [
        [0.0, 0.0, 0.0],
        [2.5, -2.5, 2.5],
        [1.0, np.nan, 3.0],
        [1.0, np.inf, -3.0],
        [0.3, -7.1, 2.2, 0.0, 5.5],
    ],
)
def test_minmax_weights_quirks(row):
    t = np.asarray(row, dtype=np.float32)
    w = np.asarray(deg.minmax_weights(t))
    np.testing.assert_array_equal(w, np_minmax(t))
    assert w.dtype == np.float32


def test_minmax_weights_bit_exact_random():
    rng = np.random.default_rng(2)
    t = (rng.standard_t(3, size=(40, 257)) * 5).astype(np.float32)
    w = np.asarray(jax.jit(deg.minmax_weights)(t))
    np.testing.assert_array_equal(w, np.stack([np_minmax(r) for r in t]))
    assert (w == 1).sum() == 40 and (w == 0).sum() >= 40


def test_topk_and_deg_mask():
    scores = np.array([[1.0, -3.0, 3.0, 0.5], [0.0, 0.0, 2.0, -2.0]], dtype=np.float32)
    res = deg.DEGResult(
        names=("a", "b"),
        genes=("g0", "g1", "g2", "g3"),
        scores=scores,
        pvals=np.full((2, 4), 0.01),
        pvals_adj=np.array([[0.01, 0.04, 0.06, 0.01], [0.5, 0.01, 0.01, 0.01]]),
        logfc=np.array([[1, -1, 2, 0], [1, 1, 0, -1]], dtype=np.float32),
    )
    np.testing.assert_array_equal(
        res.topk_mask(2), [[False, True, True, False], [False, False, True, True]]
    )
    np.testing.assert_array_equal(
        res.topk_mask(3), [[True, True, True, False], [True, False, True, True]]
    )
    np.testing.assert_array_equal(
        res.deg_mask(), [[True, True, False, False], [False, True, False, True]]
    )


def test_rank_genes_errors():
    adata, _ = load_fixture("ds1_sparse")
    st = data.group_stats(adata, "condition", control="control")
    with pytest.raises(VcjaxInputError, match="unknown method 'wilcoxon'"):
        deg.rank_genes(st, method="wilcoxon")
    with pytest.raises(VcjaxInputError, match="vs must be"):
        deg.rank_genes(st, vs="all")
    with pytest.raises(VcjaxInputError, match="no control group"):
        deg.rank_genes(st.perturbed(), vs="control")
    with pytest.raises(VcjaxInputError, match="rest has fewer than 2 cells"):
        deg.rank_genes(st.select(["P1", "control"]))


# ------------------------------------------------------ host twins (issue 9)
def test_host_twins_equal_the_jax_kernels(monkeypatch):
    """rank_genes' NumPy twins reproduce the JAX kernels (x64) exactly or to 1 ulp."""
    rng = np.random.default_rng(11)
    P, G = 13, 57
    ng = rng.integers(2, 40, size=(P, 1)).astype(np.float64)
    nr = rng.integers(2, 400, size=(P, 1)).astype(np.float64)
    mg, mr = rng.gamma(1.0, size=(P, G)), rng.gamma(1.0, size=(P, G))
    vg, vr = rng.gamma(0.5, size=(P, G)), rng.gamma(0.5, size=(P, G))
    vg[0, :5] = 0.0  # zero variances: NaN/inf t
    vr[0, :5] = 0.0
    mg[0, :2] = mr[0, :2]
    for method in ("t-test_overestim_var", "t-test"):
        t_h, dof_h = deg.t_from_moments_host(mg, vg, ng, mr, vr, nr, method=method)
        with jax.enable_x64(True):
            t_j, dof_j = deg.t_from_moments(
                mg, vg, np.broadcast_to(ng, mg.shape), mr, vr, np.broadcast_to(nr, mg.shape),
                method=method,
            )  # fmt: skip
            t_j, dof_j = np.asarray(t_j), np.asarray(dof_j)
        np.testing.assert_array_equal(np.isnan(t_h), np.isnan(t_j))
        np.testing.assert_allclose(t_h, t_j, rtol=4e-16, atol=0)
        np.testing.assert_allclose(dof_h, dof_j, rtol=4e-16, atol=0)
    p = rng.uniform(size=(P, G))
    p[:, ::7] = p[:, :1]  # ties
    p[1] = 1.0
    with jax.enable_x64(True):
        q_j = np.asarray(deg.benjamini_hochberg(p))
    q_h = deg.benjamini_hochberg_host(p)
    np.testing.assert_allclose(q_h, q_j, rtol=1e-15, atol=0)  # XLA may use 1/ecdf: 1 ulp
    # a Fortran-ordered input (as ``x[:, idx]`` gives) is the same family row by row
    np.testing.assert_array_equal(deg.benjamini_hochberg_host(np.asfortranarray(p)), q_h)
    # the rows sorted two at a time (several lexsorts per block) give the same values
    monkeypatch.setattr(_deg, "_SORT_ELEMENTS", 2 * G)
    np.testing.assert_array_equal(deg.benjamini_hochberg_host(p), q_h)
    try:
        from statsmodels.stats import multitest
    except ImportError:  # pragma: no cover
        multitest = None
    if multitest is not None:  # the host version is statsmodels' arithmetic, exactly
        ref = np.array([multitest.multipletests(row, method="fdr_bh")[1] for row in p])
        np.testing.assert_array_equal(q_h, ref)
    s = (rng.standard_t(3, size=(P, G)) * 4).astype(np.float32)
    s[2] = 0.0
    s[3] = 2.5
    s[4, 3] = np.nan
    s[5, 1] = np.inf
    np.testing.assert_array_equal(deg.minmax_weights_host(s), np.asarray(deg.minmax_weights(s)))


def test_rank_genes_blocks_and_threads_do_not_change_results(monkeypatch):
    adata, _ = load_fixture("ds1_sparse")
    st = data.group_stats(adata, "condition", control="control")
    ref = deg.rank_genes(st)
    from vcjax import _host

    monkeypatch.setattr(_host, "BLOCK_ELEMENTS", 7)  # one row per block
    for threads in (1, 3):
        monkeypatch.setattr(_host, "host_threads", lambda n=threads: n)
        got = deg.rank_genes(st)
        for f in ("scores", "pvals", "pvals_adj", "logfc"):
            np.testing.assert_array_equal(getattr(got, f), getattr(ref, f))
        np.testing.assert_array_equal(got.weights(), ref.weights())
