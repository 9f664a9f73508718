"""vcjax.data: streaming sufficient statistics vs fixtures and an independent numpy brute force."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from tests.conftest import grouped_adata, load_fixture
from vcjax import data
from vcjax.data import VcjaxInputError, _read

ad = pytest.importorskip("anndata")


# ----------------------------------------------------------------- brute force
def brute_stats(X, labels, *, normalize: bool, cov=None):
    """Independent float64 reference: dense matrix, boolean masks, explicit loops."""
    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    if normalize:
        tot = X.sum(axis=1, keepdims=True)
        X = np.log(1.0 + np.divide(1e4 * X, tot, out=np.zeros_like(X), where=tot > 0))
    keys = list(labels) if cov is None else list(zip(cov, labels, strict=True))
    order = list(dict.fromkeys(keys))
    n, s, ss = [], [], []
    for k in order:
        m = np.array([kk == k for kk in keys])
        n.append(m.sum())
        s.append(X[m].sum(axis=0))
        ss.append((X[m] ** 2).sum(axis=0))
    return order, np.array(n), np.array(s), np.array(ss)


def make_adata(rng, n_cells=203, n_genes=37, counts=True, density=0.3):
    """The shared small screen, one all-zero cell, float64."""
    return grouped_adata(rng, counts=counts, n_cells=n_cells, n_genes=n_genes, density=density)


def as_format(adata, fmt, tmp_path):
    a = adata.copy()
    if fmt == "dense":
        a.X = a.X.toarray()
    elif fmt == "csc":
        a.X = sp.csc_matrix(a.X)
    elif fmt in ("backed_csr", "backed_dense"):
        if fmt == "backed_dense":
            a.X = a.X.toarray()
        path = tmp_path / f"{fmt}.h5ad"
        a.write_h5ad(path)
        return ad.read_h5ad(path, backed="r")
    return a


FORMATS = ["dense", "csr", "csc", "backed_csr", "backed_dense"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("counts", [True, False])
def test_group_stats_matches_brute_force(fmt, counts, tmp_path):
    rng = np.random.default_rng(1)
    adata = make_adata(rng, counts=counts)
    ref = brute_stats(adata.X, adata.obs["cond"].astype(str), normalize=counts)
    a = as_format(adata, fmt, tmp_path)
    st = data.group_stats(a, "cond", control="ctrl", chunk_cells=17)
    assert st.normalization == ("log1p_cp10k" if counts else "none")
    assert list(st.names) == ref[0]
    assert st.genes == tuple(adata.var_names)
    np.testing.assert_array_equal(st.n, ref[1])
    np.testing.assert_allclose(st.sum, ref[2], rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(st.sumsq, ref[3], rtol=1e-12, atol=1e-10)
    # one big chunk gives the same up to rounding
    st1 = data.group_stats(a, "cond", control="ctrl", chunk_cells=10**6)
    np.testing.assert_allclose(st1.sum, st.sum, rtol=1e-12, atol=1e-10)
    if fmt.startswith("backed"):
        a.file.close()


def test_moments_and_methods():
    rng = np.random.default_rng(2)
    adata = make_adata(rng, counts=False)
    st = data.group_stats(adata, "cond", control="ctrl")
    X = adata.X.toarray()
    lab = adata.obs["cond"].astype(str).to_numpy()
    for i, nm in enumerate(st.names):
        x = X[lab == nm]
        np.testing.assert_allclose(st.mean[i], x.mean(0), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(st.var[i], x.var(0, ddof=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(st.sum / st.n[:, None], st.mean)
    # select / perturbed / index / add
    assert st.perturbed().control is None and "ctrl" not in st.perturbed().names
    assert st.select(["g2", "ctrl"]).names == ("g2", "ctrl")
    assert st.select(["g2", "ctrl"]).control == "ctrl"
    mask = np.array([nm.startswith("g") for nm in st.names])
    assert st.select(mask).names == tuple(nm for nm in st.names if nm.startswith("g"))
    assert st.names[st.index("g3")] == "g3"
    two = st + st
    np.testing.assert_array_equal(two.sum, 2 * st.sum)
    np.testing.assert_array_equal(two.mean, st.mean)
    # n < 2 → NaN variance
    one = dataclass_replace_n(st)
    assert np.isnan(one.var[0]).all()


def dataclass_replace_n(st):
    import dataclasses

    n = st.n.copy()
    n[0] = 1
    return dataclasses.replace(st, n=n)


def test_reference_vectors():
    rng = np.random.default_rng(3)
    adata = make_adata(rng, counts=False)
    st = data.group_stats(adata, "cond", control="ctrl")
    X = adata.X.toarray()
    lab = adata.obs["cond"].astype(str).to_numpy()
    conds = list(dict.fromkeys(lab))
    means = np.array([X[lab == c].mean(0) for c in conds])
    np.testing.assert_allclose(data.reference_vector(st), means.mean(0), atol=1e-13)
    np.testing.assert_allclose(
        data.reference_vector(st, "perturbed_no_control"),
        means[[c != "ctrl" for c in conds]].mean(0),
        atol=1e-13,
    )
    np.testing.assert_allclose(
        data.reference_vector(st, "perturbed_cells"), X[lab != "ctrl"].mean(0), atol=1e-13
    )
    np.testing.assert_allclose(
        data.reference_vector(st, "control"), X[lab == "ctrl"].mean(0), atol=1e-13
    )
    v = np.arange(st.n_genes, dtype=float)
    np.testing.assert_array_equal(data.reference_vector(st, v), v)
    with pytest.raises(VcjaxInputError, match="shape"):
        data.reference_vector(st, v[:-1])
    with pytest.raises(VcjaxInputError, match="unknown reference 'nope'"):
        data.reference_vector(st, "nope")


# -------------------------------------------------------------------- fixtures
def test_fixture_pseudobulks_and_references(fixture_name):
    adata, exp = load_fixture(fixture_name)
    conds = [str(c) for c in exp["conditions"]]
    for split in ("half", data.split_halves(adata.obs["condition"].to_numpy())):
        ss = data.group_stats(adata, "condition", control="control", split=split)
        assert list(ss.full.names) == conds
        assert ss.full.normalization == "none"
        np.testing.assert_allclose(ss.full.mean, exp["pseudobulk_full"], rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(ss.half1.mean, exp["pseudobulk_half1"], rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(ss.half2.mean, exp["pseudobulk_half2"], rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(data.reference_vector(ss.full), exp["u_all_full"], atol=1e-13)
        np.testing.assert_allclose(data.reference_vector(ss.half1), exp["u_all_half1"], atol=1e-13)
        np.testing.assert_allclose(
            data.reference_vector(ss.full, "control"), exp["u_ntc"], atol=1e-13
        )
        perts = [str(p) for p in exp["perts"]]
        truth = ss.half2.select(perts).mean
        np.testing.assert_allclose(truth, exp["truth"], atol=1e-13)


def test_split_halves_reproduces_fixture(fixture_name):
    adata, exp = load_fixture(fixture_name)
    state = np.random.get_state()  # noqa: NPY002 - checking the legacy global RNG
    h = data.split_halves(adata.obs["condition"].to_numpy(), seed=42)
    after = np.random.get_state()  # noqa: NPY002
    assert np.array_equal(after[1], state[1]) and after[2] == state[2]  # global RNG untouched
    assert h.dtype == np.int8
    np.testing.assert_array_equal(h, adata.obs["half"].to_numpy())
    np.testing.assert_array_equal(h == 1, exp["in_half1"])
    # a different seed gives a different split (the test can fail)
    assert not np.array_equal(data.split_halves(adata.obs["condition"].to_numpy(), seed=1), h)


def test_split_halves_sizes():
    labels = np.array(["a"] * 3 + ["b"] * 2 + ["c"] * 7)
    h = data.split_halves(labels)
    assert [(h[labels == c] == 1).sum() for c in "abc"] == [1, 1, 3]


def test_counts_layer_auto_normalises_to_X(fixture_name):
    adata, exp = load_fixture(fixture_name)
    st = data.group_stats(adata, "condition", control="control", layer="counts")
    assert st.normalization == "log1p_cp10k"
    np.testing.assert_allclose(st.mean, exp["pseudobulk_full"], rtol=1e-12, atol=1e-12)
    forced = data.group_stats(adata, "condition", control="control", normalize=None, layer="counts")
    assert forced.normalization == "none"
    assert not np.allclose(forced.mean, exp["pseudobulk_full"])


def test_covariate_mcfaline(shared_data):
    path = shared_data("mcfaline23_perturbench_devel.h5ad")
    adata = data.read_h5ad(path)
    st = data.group_stats(adata, "condition", control="control", covariate="cell_type")
    lab = adata.obs["condition"].astype(str).to_numpy()
    cov = adata.obs["cell_type"].astype(str).to_numpy()
    order, n, s, ss = brute_stats(adata.X, lab, normalize=False, cov=cov)
    assert list(zip(st.covariate, st.names, strict=True)) == order
    assert st.normalization == "none"
    np.testing.assert_array_equal(st.n, n)
    np.testing.assert_allclose(st.sum, s, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(st.sumsq, ss, rtol=1e-12, atol=1e-10)
    assert set(st.covariate_values()) == {"A172", "T98G", "U87MG"}
    sub = st.for_covariate("T98G")
    assert set(sub.covariate) == {"T98G"} and sub.control == "control"
    m = cov == "T98G"
    np.testing.assert_allclose(
        data.reference_vector(sub, "control"),
        adata.X[m & (lab == "control")].toarray().mean(0),
        atol=1e-12,
    )
    with pytest.raises(VcjaxInputError, match="for_covariate"):
        data.reference_vector(st)
    # a covariate without control cells
    bad = adata[~((cov == "U87MG") & (lab == "control"))].copy()
    with pytest.raises(VcjaxInputError, match="'U87MG' has no control"):
        data.group_stats(bad, "condition", control="control", covariate="cell_type")


def test_progress_bar_runs():
    rng = np.random.default_rng(4)
    adata = make_adata(rng)
    st = data.group_stats(adata, "cond", control="ctrl", progress=True, chunk_cells=50)
    assert st.n.sum() == adata.n_obs


# ---------------------------------------------------------------------- errors
def test_errors_name_the_culprit(tmp_path):
    rng = np.random.default_rng(5)
    adata = make_adata(rng)
    with pytest.raises(VcjaxInputError, match="'nokey' not in adata.obs.*'cond'"):
        data.group_stats(adata, "nokey", control="ctrl")
    with pytest.raises(VcjaxInputError, match="control label 'NT' not found.*'ctrl'"):
        data.group_stats(adata, "cond", control="NT")
    dup = adata.copy()
    dup.var_names = ["G1"] + list(dup.var_names[1:])
    with pytest.raises(VcjaxInputError, match="duplicated gene names.*'G1'"):
        data.group_stats(dup, "cond", control="ctrl")
    for bad_value, word in ((np.nan, "nan"), (np.inf, "inf")):
        b = adata.copy()
        X = b.X.toarray()
        X[7, 4] = bad_value
        b.X = sp.csr_matrix(X)
        with pytest.raises(
            VcjaxInputError, match=f"non-finite value {word} at gene 'G4', cell 'c7'"
        ):
            data.group_stats(b, "cond", control="ctrl", chunk_cells=5)
        b.X = X
        with pytest.raises(VcjaxInputError, match="gene 'G4', cell 'c7'"):
            data.group_stats(b, "cond", control="ctrl")
    neg = adata.copy()
    X = neg.X.toarray()
    X[9, 3] = -1.0
    neg.X = X
    with pytest.raises(VcjaxInputError, match="negative value -1.0 at gene 'G3', cell 'c9'"):
        data.group_stats(neg, "cond", control="ctrl", normalize="log1p_cp10k")
    # auto: counts in the first chunk, non-integers later
    mixed = adata.copy()
    X = mixed.X.toarray()
    X[150, 2] = 0.5
    mixed.X = X
    with pytest.raises(VcjaxInputError, match="looked like raw counts.*gene 'G2', cell 'c150'"):
        data.group_stats(mixed, "cond", control="ctrl", chunk_cells=20)
    # small groups: g0 has 2 cells, g1 has 3
    with pytest.raises(VcjaxInputError, match="fewer than min_cells=3.*'g0 \\(2\\)'"):
        data.group_stats(adata, "cond", control="ctrl", min_cells=3)
    with pytest.warns(UserWarning, match="dropping 1 group"):
        st = data.group_stats(adata, "cond", control="ctrl", min_cells=3, drop_small=True)
    assert "g0" not in st.names and "g1" in st.names
    with pytest.raises(VcjaxInputError, match="empty AnnData"):
        data.group_stats(adata[:0].copy(), "cond", control="ctrl")
    with pytest.raises(VcjaxInputError, match="layer 'raw' not found"):
        data.group_stats(adata, "cond", control="ctrl", layer="raw")
    with pytest.raises(VcjaxInputError, match="split values must be 1 or 2; cell 'c0'"):
        data.group_stats(adata, "cond", control="ctrl", split=np.zeros(adata.n_obs, int))
    with pytest.raises(VcjaxInputError, match="normalize must be"):
        data.group_stats(adata, "cond", control="ctrl", normalize="log2")
    with pytest.raises(VcjaxInputError, match="not found"):
        data.read_h5ad(tmp_path / "missing.h5ad")
    (tmp_path / "junk.h5ad").write_text("hello")
    with pytest.raises(VcjaxInputError, match="not an HDF5/h5ad file"):
        data.read_h5ad(tmp_path / "junk.h5ad")
    with pytest.raises(VcjaxInputError, match="group 'zz' not found"):
        data.group_stats(adata, "cond", control="ctrl").index("zz")


def test_split_stats_sum_to_full():
    rng = np.random.default_rng(6)
    adata = make_adata(rng, counts=False)
    ss = data.group_stats(adata, "cond", control="ctrl", split=None)
    h = data.split_halves(adata.obs["cond"].to_numpy())
    sp2 = data.group_stats(adata, "cond", control="ctrl", split=h, chunk_cells=13)
    np.testing.assert_array_equal(sp2.half1.n + sp2.half2.n, ss.n)
    np.testing.assert_allclose(sp2.full.sum, ss.sum, rtol=1e-12, atol=1e-12)
    X = adata.X.toarray()
    lab = adata.obs["cond"].astype(str).to_numpy()
    for i, nm in enumerate(sp2.half1.names):
        np.testing.assert_allclose(
            sp2.half1.sum[i], X[(lab == nm) & (h == 1)].sum(0), rtol=1e-12, atol=1e-12
        )


def test_auto_rejects_negative_integer_counts():
    import anndata as ad
    import scipy.sparse as sp

    from vcjax.data import VcjaxInputError, group_stats

    X = np.array([[1, 2, 0], [3, 0, 1], [0, -2, 4], [5, 1, 1]], dtype=np.float32)
    a = ad.AnnData(sp.csr_matrix(X))
    a.obs["c"] = ["control", "control", "A", "A"]
    a.obs_names = [f"cell{i}" for i in range(4)]
    a.var_names = ["g0", "g1", "g2"]
    with pytest.raises(VcjaxInputError, match=r"negative value -2.0 at gene 'g1', cell 'cell2'"):
        group_stats(a, "c", control="control")


# ------------------------------------------------------- streaming fast paths (issue 9)
def test_sorted_unique_matches_scipy_canonical_check():
    rng = np.random.default_rng(7)
    for trial in range(200):
        m = sp.random(
            int(rng.integers(1, 30)),
            int(rng.integers(1, 25)),
            density=float(rng.uniform(0, 0.7)),
            format="csr",
            random_state=trial,
        )
        m.sort_indices()
        block = int(rng.integers(1, 17))  # blocks that cut rows anywhere
        assert _read.sorted_unique(m.indptr, m.indices, block) is True
        rows = np.flatnonzero(np.diff(m.indptr) >= 2)
        if rows.size:
            bad = m.copy()
            i = bad.indptr[rows[0]]
            bad.indices[i + 1] = bad.indices[i]  # a duplicate entry within a row
            assert _read.sorted_unique(bad.indptr, bad.indices, block) is False
            bad.indices[i], bad.indices[i + 1] = m.indices[i + 1], m.indices[i]  # unsorted
            assert _read.sorted_unique(bad.indptr, bad.indices, block) is False


@pytest.mark.parametrize("counts,by_condition", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"split": "halves"},
        {"rows": (17, 180)},
        {"covariate": "batch", "split": "halves", "drop_small": True},
    ],
)
def test_in_memory_csr_equals_backed_bit_for_bit(counts, by_condition, kw, tmp_path, monkeypatch):
    """Group-ordered accumulation (in memory) == dataset-order scatter (backed), exactly.

    Tiny blocks force every code path: multi-group blocks and groups split over several
    parts (added into their row with ``np.add.at``); cells stored by condition give runs
    of adjacent rows, gathered as one slice.
    """
    rng = np.random.default_rng(3)
    a = make_adata(rng, counts=counts)
    if by_condition:
        a = a[np.argsort(a.obs["cond"].astype(str).to_numpy(), kind="stable")].copy()
    kw = dict(kw)
    if kw.get("split") == "halves":
        kw["split"] = data.split_halves(a.obs["cond"].astype(str).to_numpy())
    b = as_format(a, "backed_csr", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # drop_small's warning
        ref = data.group_stats(b, "cond", control="ctrl", chunk_cells=29, **kw)
    for block in (1 << 21, 150, 7):
        monkeypatch.setattr(_read, "_GROUP_BLOCK_NNZ", block)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = data.group_stats(a, "cond", control="ctrl", chunk_cells=29, **kw)
        pairs = (
            [(got, ref)]
            if isinstance(got, data.GroupStats)
            else [
                (got.half1, ref.half1),
                (got.half2, ref.half2),
            ]
        )
        for g, r in pairs:
            assert g.names == r.names and g.normalization == r.normalization
            np.testing.assert_array_equal(g.n, r.n)
            np.testing.assert_array_equal(g.sum, r.sum)
            np.testing.assert_array_equal(g.sumsq, r.sumsq)


def test_duplicate_entries_are_summed_before_squaring():
    rng = np.random.default_rng(4)
    a = make_adata(rng, counts=True)
    X = a.X.tocoo()
    # split every entry in two halves: same matrix, duplicated coordinates
    dup = sp.csr_matrix(
        (np.concatenate([X.data * 0.25, X.data * 0.75]),
         (np.concatenate([X.row, X.row]), np.concatenate([X.col, X.col]))),
        shape=X.shape,
    )  # fmt: skip
    dup.has_canonical_format = False
    # csr_matrix((data, (i, j))) sums duplicates; rebuild one that keeps them
    order = np.lexsort((np.concatenate([X.col, X.col]), np.concatenate([X.row, X.row])))
    rows = np.concatenate([X.row, X.row])[order]
    raw = sp.csr_matrix(
        (np.concatenate([X.data * 0.25, X.data * 0.75])[order],
         np.concatenate([X.col, X.col])[order],
         np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=X.shape[0]))])),
        shape=X.shape,
    )  # fmt: skip
    assert not _read.sorted_unique(raw.indptr, raw.indices)
    b = a.copy()
    b.X = raw
    want = data.group_stats(a, "cond", control="ctrl", normalize=None)
    got = data.group_stats(b, "cond", control="ctrl", normalize=None)
    np.testing.assert_allclose(got.sumsq, want.sumsq, rtol=1e-12)
    np.testing.assert_allclose(got.sum, want.sum, rtol=1e-12)
    assert dup.nnz == X.nnz  # the constructor from coordinates had summed them


def test_chunks_are_views_and_do_not_modify_x():
    rng = np.random.default_rng(5)
    a = make_adata(rng, counts=False)
    X = a.X.astype(np.float64)
    before = X.copy()
    chunks = list(_read.iter_chunks(X, 50))
    assert all(sp.issparse(c) and c.has_canonical_format for _, _, c in chunks)
    np.testing.assert_array_equal(sp.vstack([c for _, _, c in chunks]).toarray(), X.toarray())
    views = list(_read.iter_chunks(X, 50, views=True))
    assert np.shares_memory(views[1][2].data, X.data)  # zero-copy
    data.group_stats(a, "cond", control="ctrl", normalize="log1p_cp10k")
    np.testing.assert_array_equal(X.toarray(), before.toarray())
