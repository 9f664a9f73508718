"""Vectorised Wilcoxon rank-sum test vs scipy.stats.mannwhitneyu and scanpy."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
import scipy.stats as ss

from vcjax.stats import _wilcoxon as W
from vcjax.stats import bh_fdr, log2_fold_change, mannwhitney_vs_control


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


def _mixed(seed=0, g=23, m=60, sizes=(1, 0, 17, 33, 5, 50, 2, 17)):
    """Unequal groups (padded slots), ties within and across groups, negative values, ±0."""
    rng = np.random.default_rng(seed)
    lab = np.repeat(np.arange(len(sizes)), sizes)
    lab = np.concatenate([lab, [-1, len(sizes), 99]])  # ignored labels
    cells = np.round(rng.normal(size=(lab.size, g)), 1) + 0.3 * lab[:, None] * (lab[:, None] >= 0)
    ctrl = np.round(rng.normal(size=(m, g)), 1)
    cells[:, 0], ctrl[:, 0] = 0.0, -0.0  # +0 and -0 tie
    cells[:, 1], ctrl[:, 1] = 2.5, 2.5  # all equal
    cells[::3, 2] = -0.0
    ctrl[:, 3] = rng.normal(size=m)  # continuous: no ties with the cells
    perm = rng.permutation(lab.size)
    return cells[perm], lab[perm], ctrl, len(sizes)


@pytest.mark.parametrize(
    "dtype,sizes",
    [
        (np.float32, None),
        (np.float64, None),
        (np.float32, tuple(range(41))),  # > 32 distinct sizes: padded slots
    ],
)
def test_host_paths_agree_exactly(dtype, sizes, monkeypatch):
    """NumPy lookup vs XLA lookup, one block vs many (threads, a short last block), and
    both against a direct count."""
    cells, lab, ctrl, k = _mixed() if sizes is None else _mixed(g=6, sizes=sizes)
    if sizes is not None:
        assert W._layout(lab, k)[0].pad.size > 0
    cells, ctrl = cells.astype(dtype), ctrl.astype(dtype)
    with jax.enable_x64(dtype == np.float64):
        ref = W._host_counts(cells, lab, ctrl, k, xla=False, threads=1)
        monkeypatch.setattr(W, "_BLOCK_ELEMENTS", 5 * (ctrl.shape[0] + cells.shape[0]))
        for xla in (False, True):
            got = W._host_counts(cells, lab, ctrl, k, xla=xla, threads=2)
            for a, b in zip(ref, got):
                np.testing.assert_array_equal(a, b)
    u, ties, n = ref
    np.testing.assert_array_equal(n, np.bincount(lab[(lab >= 0) & (lab < k)], minlength=k))
    for p in range(k):  # U and the tie term against a direct computation
        x = cells[lab == p].astype(np.float64)
        for j in range(cells.shape[1]):
            c = ctrl[:, j].astype(np.float64)
            want_u = np.sum(x[:, j][:, None] > c) + 0.5 * np.sum(x[:, j][:, None] == c)
            _, t = np.unique(np.concatenate([x[:, j], c]), return_counts=True)
            want_t = np.sum(t.astype(np.float64) ** 3 - t) if len(x) else 0.0
            assert u[p, j] == want_u and ties[p, j] == want_t, (p, j)


@pytest.mark.parametrize("continuity,tie_correct", [(True, True), (False, False), (False, True)])
def test_host_path_matches_xla_path_float64(continuity, tie_correct):
    """The CPU (NumPy) and accelerator (XLA sort) implementations give the same results."""
    cells, lab, ctrl, k = _mixed(seed=1)
    kw = dict(n_groups=k, continuity=continuity, tie_correct=tie_correct)
    with jax.enable_x64(True):
        host = mannwhitney_vs_control(cells, lab, ctrl, **kw)
        dev = W._mannwhitney(cells, lab, ctrl, path="jax", **kw)
        for name in host._fields:
            a, b = np.asarray(getattr(host, name)), np.asarray(getattr(dev, name))
            assert a.dtype == b.dtype == np.float64
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=0, equal_nan=True, err_msg=name)
    host32 = mannwhitney_vs_control(cells.astype(np.float32), lab, ctrl.astype(np.float32), **kw)
    dev32 = W._mannwhitney(cells.astype(np.float32), lab, ctrl.astype(np.float32), path="jax", **kw)
    np.testing.assert_array_equal(np.asarray(host32.statistic), np.asarray(dev32.statistic))
    np.testing.assert_allclose(
        np.asarray(host32.pvalue), np.asarray(dev32.pvalue), rtol=1e-4, atol=1e-7, equal_nan=True
    )


def test_traced_calls_use_the_callback():
    """Under jit / vmap on CPU the NumPy counts run through pure_callback."""
    cells, lab, ctrl, k = _mixed(seed=2, g=7)
    cells, ctrl = cells.astype(np.float32), ctrl.astype(np.float32)
    eager = mannwhitney_vs_control(cells, lab, ctrl, n_groups=k)
    jitted = jax.jit(lambda c, l, r: mannwhitney_vs_control(c, l, r, n_groups=k))(cells, lab, ctrl)
    for name in eager._fields:
        np.testing.assert_array_equal(
            np.asarray(getattr(eager, name)), np.asarray(getattr(jitted, name))
        )
    batched = jax.vmap(lambda r: mannwhitney_vs_control(cells, lab, r, n_groups=k))(
        np.stack([ctrl, ctrl[::-1] + 1])
    )
    np.testing.assert_array_equal(np.asarray(batched.statistic[0]), np.asarray(eager.statistic))


def test_no_control_cells_and_no_group_cells():
    cells, lab, ctrl, k = _mixed(seed=3, g=5)
    with jax.enable_x64(True):
        for c, l, r in [(cells, lab, ctrl[:0]), (cells[:0], lab[:0], ctrl)]:
            host = mannwhitney_vs_control(c, l, r, n_groups=k)
            dev = W._mannwhitney(c, l, r, n_groups=k, continuity=True, tie_correct=True, path="jax")
            for name in host._fields:
                np.testing.assert_array_equal(
                    np.asarray(getattr(host, name)), np.asarray(getattr(dev, name))
                )


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
