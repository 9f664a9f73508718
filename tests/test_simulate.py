"""Tests of the seeded screen simulator (vcjax.simulate), against plain float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from vcjax.simulate import _sample_nb_chunk, population_means, simulate_screen


def _lognorm(counts) -> np.ndarray:
    """Independent float64 reference: ln(1 + 1e4 · x / Σx), dense."""
    x = counts.toarray().astype(np.float64) if sp.issparse(counts) else np.asarray(counts, float)
    return np.log1p(1e4 * x / x.sum(axis=1, keepdims=True))


def _group_means(adata, lx: np.ndarray, key: str = "condition") -> dict[str, np.ndarray]:
    labels = adata.obs[key].to_numpy()
    return {c: lx[labels == c].mean(axis=0) for c in adata.obs[key].cat.categories}


@pytest.fixture(scope="module")
def small():
    return simulate_screen(seed=3)


def test_deterministic_and_seed_dependent():
    kw = dict(n_perturbations=8, n_genes=120, cells_per_perturbation=(20, 40), n_control=50)
    a, b = simulate_screen(**kw, seed=7), simulate_screen(**kw, seed=7)
    c = simulate_screen(**kw, seed=8)
    assert (a.X != b.X).nnz == 0
    assert (a.layers["counts"] != b.layers["counts"]).nnz == 0
    assert a.obs.equals(b.obs)
    np.testing.assert_array_equal(a.uns["simulation"]["effects"], b.uns["simulation"]["effects"])
    np.testing.assert_array_equal(
        a.uns["simulation"]["population_means"], b.uns["simulation"]["population_means"]
    )
    assert a.shape != c.shape or (a.X != c.X).nnz > 0
    assert not np.array_equal(a.uns["simulation"]["effects"], c.uns["simulation"]["effects"])
    # thread count does not change the draws (one seed child per chunk of cells)
    d = simulate_screen(**kw, seed=7, n_threads=1)
    assert (a.X != d.X).nnz == 0


def test_shapes_labels_and_counts(small):
    a = small
    sim = a.uns["simulation"]
    P = 24 + 6
    assert a.shape == (300 + P * 100, 500)
    assert list(a.var_names[:2]) == ["GENE0000", "GENE0001"]
    cats = list(a.obs["condition"].cat.categories)
    assert cats[0] == "control" and len(cats) == P + 1
    assert cats[1:] == list(sim["perturbations"])
    vc = a.obs["condition"].value_counts()
    assert vc["control"] == 300 and (vc.drop("control") == 100).all()
    # single perturbations are named after real genes
    singles = [p for p in sim["perturbations"] if "+" not in p]
    assert len(singles) == 24 and set(singles) <= set(a.var_names)
    # counts: CSR float32, non-negative integers, X == counts layer in counts mode
    for m in (a.X, a.layers["counts"]):
        assert sp.isspmatrix_csr(m) and m.dtype == np.float32
    d = a.layers["counts"].data
    assert (d > 0).all() and np.array_equal(d, np.round(d))
    assert (a.X != a.layers["counts"]).nnz == 0 and a.X is not a.layers["counts"]
    np.testing.assert_allclose(a.obs["n_counts"], np.asarray(a.X.sum(axis=1)).ravel())
    assert 1000 < a.obs["n_counts"].median() < 4000
    assert sim["effects"].shape == (P, 500) and sim["effects"].dtype == np.float32
    assert sim["population_means"].shape == (P + 1, 500)
    assert sim["is_null"].sum() == round(0.1 * 24)


def test_lognormalised_mode_matches_counts():
    a = simulate_screen(n_perturbations=4, n_genes=80, n_control=40, n_combinations=1, counts=False)
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32
    np.testing.assert_allclose(a.X.toarray(), _lognorm(a.layers["counts"]), rtol=1e-5, atol=1e-5)


def test_shared_shift_recovered():
    # deep sequencing so that ln(1 + cp10k) ≈ ln(cp10k) on the shift genes
    a = simulate_screen(
        n_perturbations=10, n_genes=200, mean_counts=40000, n_combinations=0, n_control=1500,
        cells_per_perturbation=150, seed=1,
    )  # fmt: skip
    sim = a.uns["simulation"]
    lx = _lognorm(a.layers["counts"])
    ctrl = (a.obs["condition"] == "control").to_numpy()
    diff = lx[~ctrl].mean(axis=0) - lx[ctrl].mean(axis=0)
    shift = sim["shared_shift"].astype(np.float64)
    on = np.isin(a.var_names, sim["shift_genes"])
    assert on.sum() == 30 and np.allclose(np.abs(shift[on]), 0.4) and (shift[~on] == 0).all()
    # log-space difference ≈ ±shared_shift, after removing the global offset that the
    # per-cell renormalisation (cp10k) adds to every gene (estimated on the other genes)
    offset = np.median(diff[~on])
    assert abs(offset) < 0.15
    err = diff[on] - offset - shift[on]
    assert np.max(np.abs(err)) < 0.08 and np.mean(np.abs(err)) < 0.03
    assert np.mean(np.abs(diff[~on] - offset)) < 0.1  # the other genes move much less
    # it is shared: every perturbation (null ones included) carries it with the right sign
    for p in sim["perturbations"]:
        dp = lx[(a.obs["condition"] == p).to_numpy()].mean(axis=0) - lx[ctrl].mean(axis=0)
        assert np.corrcoef(dp[on], shift[on])[0, 1] > 0.8


def test_effect_genes_recovered_and_nulls_flat(small):
    a = small
    sim = a.uns["simulation"]
    lx = _lognorm(a.layers["counts"])
    labels = a.obs["condition"].to_numpy()
    means = _group_means(a, lx)
    ctrl = means["control"]
    var_c = lx[labels == "control"].var(axis=0, ddof=1) / (labels == "control").sum()
    pm = population_means(a)
    shift = sim["shared_shift"] != 0
    n_checked = n_null = 0
    for p, eff, null in zip(sim["perturbations"], sim["effects"], sim["is_null"]):
        delta = np.abs(means[p] - ctrl)
        hit = eff != 0
        if null:
            assert not hit.any()
            # nothing beyond the shared shift: the observed delta vs control is the expected
            # shift-only delta up to sampling noise, on every gene (Welch z-scores)
            sel = labels == p
            se = np.sqrt(lx[sel].var(axis=0, ddof=1) / sel.sum() + var_c)
            expect = (pm.loc[p] - pm.loc["control"]).to_numpy()
            z = (means[p] - ctrl - expect) / np.where(se > 0, se, np.inf)
            assert np.abs(z).max() < 5.0 and z.std() < 1.3
            assert np.abs(expect[~shift]).max() < 0.05 < np.abs(expect[shift]).min()
            n_null += 1
            continue
        assert hit.sum() >= 8
        n_checked += 1
        assert np.median(delta[hit]) > 3 * np.median(delta[~hit & ~shift])
        if "+" not in p:  # the target gene (named like the perturbation) is knocked down
            g = list(a.var_names).index(p)
            assert eff[g] == pytest.approx(-2.0) and means[p][g] < ctrl[g] - 0.5
    assert n_checked >= 25 and n_null == 2


def test_combinations(small):
    sim = small.uns["simulation"]
    perts = list(sim["perturbations"])
    combos = [p for p in perts if "+" in p]
    assert len(combos) == 6 and len(set(combos)) == 6
    eff = dict(zip(perts, sim["effects"].astype(np.float64)))
    for j, c in enumerate(combos):
        a, b = c.split("+")
        assert a in perts and b in perts and a != b
        inter = eff[c] - eff[a] - eff[b]
        assert 1 <= np.count_nonzero(np.abs(inter) > 1e-6) <= 2
        np.testing.assert_allclose(inter, sim["interaction"][j], atol=1e-6)


def test_covariate_mode_has_own_controls():
    a = simulate_screen(
        n_perturbations=5, n_genes=100, n_control=60, cells_per_perturbation=30,
        n_combinations=1, covariate="cell_type", n_covariates=3, seed=2,
    )  # fmt: skip
    tab = a.obs.groupby(["cell_type", "condition"], observed=False).size().unstack()
    assert list(tab.index) == ["cell_type_0", "cell_type_1", "cell_type_2"]
    assert (tab["control"] == 60).all() and (tab.drop(columns="control") == 30).all().all()
    pm = population_means(a)
    assert pm.index.names == ["cell_type", "condition"] and pm.shape == (3 * 7, 100)
    base = a.uns["simulation"]["baseline_log_abundance"]
    assert base.shape == (3, 100) and not np.allclose(base[1], base[0])
    # each line's own control differs from line 0's control as its baseline offset says
    lx = _lognorm(a.layers["counts"])
    ctl = [
        lx[
            (
                (a.obs["cell_type"] == f"cell_type_{l}") & (a.obs["condition"] == "control")
            ).to_numpy()
        ].mean(axis=0)
        for l in range(3)
    ]
    exp_d = pm.loc[("cell_type_1", "control")] - pm.loc[("cell_type_0", "control")]
    assert np.corrcoef(ctl[1] - ctl[0], exp_d)[0, 1] > 0.6


def test_population_means_match_empirical_pseudobulk():
    a = simulate_screen(
        n_perturbations=3, n_genes=120, n_control=2000, cells_per_perturbation=2000,
        n_combinations=0, seed=5,
    )  # fmt: skip
    pm = population_means(a)
    means = _group_means(a, _lognorm(a.layers["counts"]))
    err = np.stack([means[c] - pm.loc[c].to_numpy() for c in pm.index])
    labels = a.obs["condition"].to_numpy()
    lx = _lognorm(a.layers["counts"])
    se = np.stack(
        [lx[labels == c].std(axis=0, ddof=1) / np.sqrt((labels == c).sum()) for c in pm.index]
    )
    z = err / se
    # errors are sampling noise (z ~ N(0, 1)); the truth's bias (library total taken as its
    # expectation) is a small fraction of one standard error
    assert 0.8 < z.std() < 1.25 and np.abs(z).max() < 5.0
    assert abs(z.mean()) < 0.5 and abs(err.mean()) < 0.01
    # expected composition sums to 1 and genes can be subset
    freq = population_means(a, which="frequency")
    np.testing.assert_allclose(freq.sum(axis=1), 1.0, rtol=1e-5)
    assert list(population_means(a[:, :10]).columns) == list(a.var_names[:10])


@pytest.mark.parametrize("dispersion", [0.0, 0.3])
def test_negative_binomial_sampler_pmf(dispersion):
    rng = np.random.default_rng(0)
    n = 60_000
    q = np.array([[0.2, 1.5, 4.0, 25.0]], dtype=np.float32)  # low, inverse-CDF tail, γ–Poisson
    x = _sample_nb_chunk(rng, np.ones(n, np.float32), np.zeros(n, np.int64), q, dispersion)
    x = x.toarray()
    for g, m in enumerate(q[0].astype(np.float64)):
        k = np.arange(0, int(m + 8 * np.sqrt(m + dispersion * m * m)) + 10)
        if dispersion > 0:
            r = 1 / dispersion
            pmf = stats.nbinom.pmf(k, r, r / (r + m))
        else:
            pmf = stats.poisson.pmf(k, m)
        obs = np.bincount(x[:, g].astype(int), minlength=k.size)[: k.size]
        keep = pmf * n > 20  # chi-square on well-populated cells
        chi2 = np.sum((obs[keep] - n * pmf[keep]) ** 2 / (n * pmf[keep]))
        assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-4, (m, chi2)
        assert abs(x[:, g].mean() / m - 1) < 0.03


def test_h5ad_roundtrip(tmp_path, small):
    import anndata as ad

    path = tmp_path / "sim.h5ad"
    small.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(
        population_means(back).to_numpy(), population_means(small).to_numpy()
    )
    assert back.uns["simulation"]["params"]["covariate"] == ""


def test_invalid_arguments():
    with pytest.raises(ValueError):
        simulate_screen(n_perturbations=3, n_combinations=4)
    with pytest.raises(ValueError):
        simulate_screen(n_genes=20, n_perturbations=30)
