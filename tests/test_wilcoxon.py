"""Vectorised Wilcoxon rank-sum test vs scipy.stats.mannwhitneyu and scanpy."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
import scipy.stats as ss

from vcjax.wilcoxon import bh_fdr, log2_fold_change, mannwhitney_vs_control


def _data(seed=0, g=25, m=70, sizes=(3, 12, 40, 1, 0, 7), lam=0.8):
    """Poisson counts (many ties, many zeros), shuffled cell order."""
    rng = np.random.default_rng(seed)
    ctrl = rng.poisson(lam, (m, g)).astype(np.float64)
    cells, labels = [], []
    for p, n in enumerate(sizes):
        cells.append(rng.poisson(lam * (1 + 0.4 * p), (n, g)).astype(np.float64))
        labels += [p] * n
    cells = np.concatenate(cells)
    labels = np.array(labels)
    # a gene that is 0 everywhere, and one with half-integer log-like values
    cells[:, 0] = 0
    ctrl[:, 0] = 0
    cells[:, 1] = np.log1p(cells[:, 1])
    ctrl[:, 1] = np.log1p(ctrl[:, 1])
    perm = rng.permutation(len(labels))
    return cells[perm], labels[perm], ctrl


@pytest.mark.parametrize("continuity", [True, False])
def test_matches_scipy_mannwhitneyu_float64(continuity):
    cells, labels, ctrl = _data()
    sizes = np.bincount(labels, minlength=6)
    with jax.enable_x64(True):
        r = mannwhitney_vs_control(cells, labels, ctrl, n_groups=6, continuity=continuity)
        stat, pv, n = (np.asarray(a) for a in (r.statistic, r.pvalue, r.n))
    np.testing.assert_array_equal(n, sizes)
    for p in range(6):
        x = cells[labels == p]
        if len(x) == 0:
            assert np.isnan(stat[p]).all() and np.isnan(pv[p]).all()
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = ss.mannwhitneyu(x, ctrl, method="asymptotic", use_continuity=continuity, axis=0)
        np.testing.assert_array_equal(stat[p], want.statistic)
        np.testing.assert_allclose(pv[p], want.pvalue, rtol=1e-11, atol=0, equal_nan=True)
    # all values equal (gene 0): p = 1 with continuity (scipy / pdex), NaN without
    if continuity:
        assert np.all(pv[sizes > 0, 0] == 1.0)
    else:
        assert np.all(np.isnan(pv[sizes > 0, 0]))


def test_float32_default_close_to_scipy():
    cells, labels, ctrl = _data(seed=3, g=40, m=150, sizes=(30, 60, 5))
    r = mannwhitney_vs_control(
        cells.astype(np.float32), labels, ctrl.astype(np.float32), n_groups=3
    )
    assert r.pvalue.dtype == np.float32
    for p in range(3):
        want = ss.mannwhitneyu(cells[labels == p], ctrl, method="asymptotic", axis=0)
        np.testing.assert_array_equal(np.asarray(r.statistic[p]), want.statistic)
        np.testing.assert_allclose(np.asarray(r.pvalue[p]), want.pvalue, rtol=2e-5, atol=1e-30)


def test_zscore_sign_and_ignored_labels():
    rng = np.random.default_rng(1)
    ctrl = rng.normal(size=(50, 4))
    up = rng.normal(size=(20, 4)) + 3.0
    cells = np.concatenate([up, rng.normal(size=(5, 4)) + 100])
    labels = np.array([0] * 20 + [-1] * 3 + [7] * 2)  # out-of-range labels are ignored
    r = mannwhitney_vs_control(cells, labels, ctrl, n_groups=1)
    assert np.all(np.asarray(r.zscore) > 3)
    assert np.asarray(r.n)[0] == 20
    want = ss.mannwhitneyu(up, ctrl, method="asymptotic", axis=0)
    np.testing.assert_allclose(np.asarray(r.statistic[0]), want.statistic)


def test_bh_fdr_matches_scipy():
    rng = np.random.default_rng(2)
    p = rng.uniform(size=(4, 50)) ** 3
    p[0, :5] = p[0, 5]  # ties
    with jax.enable_x64(True):
        got = np.asarray(bh_fdr(p))
    np.testing.assert_allclose(got, ss.false_discovery_control(p, axis=-1), rtol=1e-12)


def test_log2_fold_change_rules():
    g = np.array([[0.0, 0.0, 1.0, 2.0, 0.5]])
    c = np.array([0.0, 1.0, 0.0, 1.0, 0.5])
    with jax.enable_x64(True):
        got = np.asarray(log2_fold_change(g, c))
    want = np.array([0.0, -np.inf, np.inf, np.log2(np.expm1(2.0) / np.expm1(1.0)), 0.0])
    np.testing.assert_allclose(got[0], want)


def test_matches_scanpy_rank_genes_groups_wilcoxon():
    sc = pytest.importorskip("scanpy")
    import anndata as ad
    import pandas as pd

    cells, labels, ctrl = _data(seed=5, g=30, m=80, sizes=(15, 25, 9))
    x = np.concatenate([ctrl, cells]).astype(np.float32)
    names = np.array(["ctrl"] * len(ctrl) + [f"g{i}" for i in labels])
    adata = ad.AnnData(x, obs=pd.DataFrame({"grp": pd.Categorical(names)}))
    adata.var_names = [f"v{i}" for i in range(x.shape[1])]
    for tie_correct in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.tl.rank_genes_groups(
                adata,
                "grp",
                reference="ctrl",
                method="wilcoxon",
                n_genes=x.shape[1],
                tie_correct=tie_correct,
            )
        rg = adata.uns["rank_genes_groups"]
        r = mannwhitney_vs_control(
            cells.astype(np.float32),
            labels,
            ctrl.astype(np.float32),
            n_groups=3,
            continuity=False,
            tie_correct=tie_correct,
        )
        z, pv = np.asarray(r.zscore), np.asarray(r.pvalue)
        for p in range(3):
            order = [int(v[1:]) for v in np.asarray(rg["names"][f"g{p}"]).astype(str)]
            # gene v0 is 0 everywhere: scanpy turns its 0/0 score into 0 and p into 1
            ok = np.array(order) != 0
            want_z = np.asarray(rg["scores"][f"g{p}"], np.float64)
            np.testing.assert_allclose(z[p, order][ok], want_z[ok], rtol=1e-5, atol=1e-5)
            want_p = np.asarray(rg["pvals"][f"g{p}"], np.float64)
            np.testing.assert_allclose(pv[p, order][ok], want_p[ok], rtol=1e-4, atol=1e-12)
