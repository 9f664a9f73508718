"""Exact sparse multi-pass Mann-Whitney counts (vcjax.stats._wilcoxon_split).

References: a brute-force float64 NumPy count of U (all group x control pairs) and of the
tie term (np.unique over the pooled sample), and scipy.stats.mannwhitneyu for the p-values.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats as st

import vcjax.stats._wilcoxon_split as W
from vcjax.stats._wilcoxon import mannwhitney_from_counts


def _ref_counts(x, role, n_groups):
    """U and tie term of each group of one pass against its control, gene by gene."""
    ctrl = x[role == -1]
    g = x.shape[1]
    u = np.zeros((n_groups, g))
    t = np.zeros((n_groups, g))
    for p in range(n_groups):
        a = x[role == p]
        for j in range(g):
            d = a[:, j][:, None] - ctrl[:, j][None, :]
            u[p, j] = (d > 0).sum() + 0.5 * (d == 0).sum()
            _, k = np.unique(np.concatenate([a[:, j], ctrl[:, j]]), return_counts=True)
            t[p, j] = (k**3 - k).sum()
    return u, t


def _screen(seed, n=160, g=13, p=5):
    """log1p-CPM-like values with many ties (three library sizes), zeros, special genes."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(0.6, 2.0, size=g)[None, :] * rng.uniform(0.5, 1.5, (n, 1)))
    lib = rng.choice([5.0, 10.0, 20.0], size=n)
    x = np.log1p(counts / lib[:, None])
    x[:, 3] = 0.0  # all zero
    x[:, 5] = 1.0  # one value, no zeros
    x[:, 6] = np.where(rng.random(n) < 0.5, 2.0, 0.0)  # two values
    lab = rng.integers(-1, p, size=n)  # -1: control
    return x, lab


def _passes(lab, p, rng, k=3):
    """The whole data, then the two halves of k random splits (a third of cells left out)."""
    roles = [np.where(lab >= 0, lab, -1)]
    for _ in range(k):
        h = rng.integers(0, 3, lab.size)
        for half in (0, 1):
            roles.append(np.where(h == half, np.where(lab >= 0, lab, -1), W.EXCLUDED))
    return np.array(roles, np.int32)


@pytest.mark.parametrize("seed,block", [(0, 1 << 18), (1, 40), (2, 3)])
def test_counts_exact_against_bruteforce(seed, block):
    p = 5
    x, lab = _screen(seed, p=p)
    roles = _passes(lab, p, np.random.default_rng(seed + 10))
    res = W.mannwhitney_counts_passes(
        sp.csr_matrix(x), roles, classes=lab + 1, n_groups=[p] * len(roles), block_nnz=block
    )
    for k, r in enumerate(roles):
        u, t = _ref_counts(x, r, p)
        rows = slice(res.offsets[k], res.offsets[k + 1])
        np.testing.assert_array_equal(res.u[rows], u, err_msg=f"U, pass {k}")
        np.testing.assert_array_equal(res.ties[rows], t, err_msg=f"T, pass {k}")
        np.testing.assert_array_equal(res.n[rows], np.bincount(r[r >= 0], minlength=p))
        assert (res.m[rows] == (r == -1).sum()).all()


def test_pvalues_match_scipy():
    p = 4
    x, lab = _screen(5, n=200, g=9, p=p)
    res = W.mannwhitney_counts_passes(sp.csr_matrix(x), lab[None], n_groups=[p])
    with jax.enable_x64(True):
        pv = np.asarray(
            mannwhitney_from_counts(res.u, res.ties, res.n, int(res.m[0]), True, True).pvalue
        )
    assert pv.dtype == np.float64
    ctrl = x[lab == -1]
    for q in range(p):
        for j in range(x.shape[1]):
            a = x[lab == q, j]
            if np.ptp(np.concatenate([a, ctrl[:, j]])) == 0:
                assert pv[q, j] == 1.0  # every value equal: p = 1 (scipy gives NaN)
                continue
            want = st.mannwhitneyu(a, ctrl[:, j], method="asymptotic", use_continuity=True)
            np.testing.assert_allclose(pv[q, j], want.pvalue, rtol=1e-12, atol=1e-300)


def test_parts_transform_genes_finish_equal_plain_call(monkeypatch):
    monkeypatch.setattr(W, "FINISH_WIDTH", 3)  # several zero-padded finishing windows
    rng = np.random.default_rng(3)
    counts = rng.poisson(1.0, (70, 11)).astype(np.float32)
    lib = counts.sum(axis=1) + 1.0
    lab = np.r_[np.full(20, -1), rng.integers(0, 4, 50)]
    plain = W.mannwhitney_counts_passes(
        sp.csr_matrix(np.log1p(counts / lib[:, None])), lab[None], n_groups=[4]
    )
    genes = np.array([0, 2, 3, 4, 7, 10])
    got = W.mannwhitney_counts_passes(
        [sp.csr_matrix(counts[:33]), sp.csc_matrix(counts[33:])],  # stacked, not copied
        lab[None],
        n_groups=[4],
        genes=genes,
        transform=lambda v, cells: np.log1p(v.astype(np.float64) / lib[cells]),
        finish=lambda u, t, n, m: u * 1e6 + t,
    )
    assert got.ties is None
    np.testing.assert_array_equal(got.u, (plain.u * 1e6 + plain.ties)[:, genes])


def test_large_csr_converted_in_row_pieces(monkeypatch):
    """A CSR part above the size threshold is converted to CSC in row pieces on the host
    threads: the pieces stack back to the same rows (the same columns, entry for entry),
    and the counts equal the brute-force ones, over several passes."""
    x, lab = _screen(8, n=170, g=9, p=4)
    csr = sp.csr_matrix(x)
    monkeypatch.setattr(W, "_SPLIT_NNZ", 0)
    pieces = W._csc_parts([csr], 3)
    assert len(pieces) == 3 and all(q.format == "csc" for q in pieces)
    np.testing.assert_array_equal(sp.vstack(pieces).toarray(), x)
    counts = sp.csr_matrix(np.random.default_rng(10).poisson(1.0, (50, 7)).astype(np.int32))
    pieces = W._csc_parts([counts], 2)  # raw counts (integers) too
    assert len(pieces) == 2 and pieces[0].dtype == np.int32
    np.testing.assert_array_equal(sp.vstack(pieces).toarray(), counts.toarray())
    roles = _passes(lab, 4, np.random.default_rng(9), k=2)
    res = W.mannwhitney_counts_passes(csr, roles, n_groups=[4] * len(roles), threads=3)
    for k, role in enumerate(roles):
        u, t = _ref_counts(x, role, 4)
        rows = slice(res.offsets[k], res.offsets[k + 1])
        np.testing.assert_array_equal(res.u[rows], u)
        np.testing.assert_array_equal(res.ties[rows], t)


def test_values_closer_than_float32():
    """The sort keys use float32 bits: distinct float64 values that collide are reordered."""
    rng = np.random.default_rng(4)
    x = rng.choice([1.0, 2.0, 3.0], size=(150, 5)) + rng.integers(0, 4, (150, 5)) * 1e-12
    x[rng.random(x.shape) < 0.3] = 0.0
    lab = rng.integers(-1, 3, 150)
    res = W.mannwhitney_counts_passes(sp.csr_matrix(x), lab[None], n_groups=[3])
    u, t = _ref_counts(x, lab, 3)
    np.testing.assert_array_equal(res.u, u)
    np.testing.assert_array_equal(res.ties, t)


def test_empty_group_and_degenerate_inputs():
    x, lab = _screen(6, n=60, g=7, p=3)
    res = W.mannwhitney_counts_passes(sp.csr_matrix(x), lab[None], n_groups=[5])
    assert res.n[3] == 0 and res.n[4] == 0 and (res.u[3:] == 0).all()
    u, t = _ref_counts(x, lab, 3)
    np.testing.assert_array_equal(res.u[:3], u)
    np.testing.assert_array_equal(res.ties[:3], t)
    z = W.mannwhitney_counts_passes(sp.csr_matrix((10, 3)), np.r_[[-1] * 4, [0] * 6][None])
    assert (z.u == 12.0).all() and (z.ties == 10**3 - 10).all()  # all tied at zero


def test_validation():
    x, lab = _screen(7, n=40, g=7, p=2)
    with pytest.raises(ValueError, match="negative"):
        W.mannwhitney_counts_passes(sp.csr_matrix(-x), lab[None])
    with pytest.raises(ValueError, match="roles for 39 cells"):
        W.mannwhitney_counts_passes(sp.csr_matrix(x), lab[None, :-1])
    with pytest.raises(ValueError, match="one to one"):
        W.mannwhitney_counts_passes(sp.csr_matrix(x), lab[None], classes=np.zeros(40, int))
    with pytest.raises(ValueError, match="several classes"):
        cls = np.arange(40)
        W.mannwhitney_counts_passes(sp.csr_matrix(x), lab[None], classes=cls)
    with pytest.raises(ValueError, match="ascending"):
        W.mannwhitney_counts_passes(sp.csr_matrix(x), lab[None], genes=[2, 1])
