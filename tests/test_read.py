"""The streamed read path: CSR row blocks (in memory or straight from an .h5ad's arrays)
into group sums and pseudobulks, the checks and the scale evidence on the same pass.

References are independent: a float64 cell-by-cell loop in dataset order (the sums must be
equal to it bit for bit, whatever the blocks), a dense float64 brute force with NumPy's own
sums (to rounding), and :func:`vcjax.data.scale_evidence` of the whole matrix.
"""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tests.conftest import grouped_adata
from vcjax import data
from vcjax.data import VcjaxInputError, _read

ad = pytest.importorskip("anndata")


def make_adata(rng, *, counts: bool, n_cells=203, n_genes=37, density=0.3):
    """The shared small screen, two all-zero cells, float32 (as files store it)."""
    return grouped_adata(
        rng, counts=counts, n_cells=n_cells, n_genes=n_genes, density=density,
        empty_rows=(5, 100), dtype=np.float32,
    )  # fmt: skip


def write_csr(path, adata, data_, indices, indptr):
    """``adata`` (obs/var) with X replaced by raw CSR arrays, written as anndata does."""
    ad.AnnData(obs=adata.obs, var=adata.var).write_h5ad(path)
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array(adata.shape, dtype=np.int64)
        g.create_dataset("data", data=data_)
        g.create_dataset("indices", data=indices)
        g.create_dataset("indptr", data=indptr)
    return path


def sequential_sums(X, codes, n_acc, *, normalise):
    """Float64 sums in dataset order, cell by cell (each entry: ((0 + x1) + x2) + …); the
    per-cell total of the normalisation is summed left to right over the stored entries."""
    X = sp.csr_matrix(X)
    X.sum_duplicates()
    G = X.shape[1]
    S = np.zeros((n_acc, G))
    SS = np.zeros((n_acc, G))
    for i in range(X.shape[0]):
        a, b = X.indptr[i], X.indptr[i + 1]
        cols, v = X.indices[a:b], X.data[a:b].astype(np.float64)
        if normalise and v.size:
            total = np.add.accumulate(v)[-1]
            v = np.log1p(v * (1e4 / total)) if total > 0 else np.zeros_like(v)
        row = np.zeros(G)
        row[cols] = v
        S[codes[i]] += row
        SS[codes[i]] += row * row
    return S, SS


def codes_of(adata, split=None):
    lab = adata.obs["cond"].astype(str).to_numpy()
    codes, names = pd.factorize(lab)
    if split is None:
        return codes, len(names), list(names)
    return (np.asarray(split) - 1) * len(names) + codes, 2 * len(names), list(names)


def backed(adata, tmp_path, name="x.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


# ------------------------------------------------------------------------------ the sums


@pytest.mark.parametrize("counts", [True, False])
@pytest.mark.parametrize("with_split", [False, True])
def test_streamed_sums_equal_a_cell_by_cell_loop_bit_for_bit(
    counts, with_split, tmp_path, monkeypatch
):
    """In memory and backed, with blocks of any size (a few non-zeros to all), the sums are
    the float64 additions of a cell-by-cell loop in dataset order, exactly."""
    rng = np.random.default_rng(0)
    a = make_adata(rng, counts=counts)
    split = data.split_halves(a.obs["cond"].astype(str).to_numpy()) if with_split else None
    codes, n_acc, names = codes_of(a, split)
    S, SS = sequential_sums(a.X, codes, n_acc, normalise=counts)
    b = backed(a, tmp_path)
    for read_nnz, group_nnz in ((1 << 22, 1 << 21), (40, 7)):
        monkeypatch.setattr(_read, "_READ_NNZ", read_nnz)
        monkeypatch.setattr(_read, "_GROUP_BLOCK_NNZ", group_nnz)
        import vcjax.data._group_stats as gs

        monkeypatch.setattr(gs, "_READ_NNZ", read_nnz)
        for adata in (a, b):
            st = data.group_stats(adata, "cond", control="ctrl", split=split, chunk_cells=29)
            halves = [st] if split is None else [st.half1, st.half2]
            C = len(names)
            for h, part in enumerate(halves):
                assert list(part.names) == names
                np.testing.assert_array_equal(part.sum, S[h * C : (h + 1) * C])
                np.testing.assert_array_equal(part.sumsq, SS[h * C : (h + 1) * C])
    b.file.close()


def test_grouped_sums_are_the_cell_by_cell_float64_additions(monkeypatch):
    """``data.grouped_sums`` of a CSR (canonical or not, in blocks of any size), a CSC and
    a dense matrix: the float64 additions of a cell-by-cell loop in dataset order, exactly;
    rows with a code outside the groups are left out, an empty group sums to 0."""
    rng = np.random.default_rng(3)
    a = make_adata(rng, counts=False)
    codes, n_acc, _ = codes_of(a)
    codes = codes.copy()
    codes[::7] = -1  # in no group
    codes[3::11] = n_acc + 2  # past the groups
    codes[codes == 1] = -1  # group 1 empty
    S, _ = sequential_sums(a.X, np.where((codes >= 0) & (codes < n_acc), codes, n_acc),
                           n_acc + 1, normalise=False)  # fmt: skip
    want = S[:n_acc]
    assert np.all(want[1] == 0) and want.any()
    X = sp.csr_matrix(a.X)
    shuffled = X.copy()  # the same entries, columns unsorted within rows
    for i in range(X.shape[0]):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        perm = rng.permutation(hi - lo)
        shuffled.indices[lo:hi] = X.indices[lo:hi][perm]
        shuffled.data[lo:hi] = X.data[lo:hi][perm]
    shuffled.has_sorted_indices = False
    for read_nnz, group_nnz in ((1 << 22, 1 << 21), (40, 7)):
        monkeypatch.setattr(_read, "_READ_NNZ", read_nnz)
        monkeypatch.setattr(_read, "_GROUP_BLOCK_NNZ", group_nnz)
        for m in (X, shuffled, X.tocsc(), X.toarray()):
            got = data.grouped_sums(m, codes, n_acc)
            assert got.dtype == np.float64
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="codes"):
        data.grouped_sums(X, codes[:-1], n_acc)


def test_cells_stored_by_condition_and_a_row_slice(tmp_path):
    """Rows already grouped (gathered as one slice) and ``rows=`` (a process's slice)."""
    rng = np.random.default_rng(1)
    a = make_adata(rng, counts=True)
    a = a[np.argsort(a.obs["cond"].astype(str).to_numpy(), kind="stable")].copy()
    codes, n_acc, _ = codes_of(a)
    b = backed(a, tmp_path)
    for rows in (None, (17, 180)):
        sel = np.zeros(a.n_obs, bool)
        sel[slice(*(rows or (0, a.n_obs)))] = True
        X = a.X.toarray()
        X[~sel] = 0.0  # cells outside the slice add nothing
        S, SS = sequential_sums(sp.csr_matrix(X), codes, n_acc, normalise=True)
        for adata in (a, b):
            st = data.group_stats(adata, "cond", control="ctrl", rows=rows, chunk_cells=50)
            np.testing.assert_array_equal(st.sum, S)
            np.testing.assert_array_equal(st.sumsq, SS)
            assert (st.scale is None) == (rows is not None)  # a partial pass samples nothing
    b.file.close()


def test_unsorted_duplicated_int_counts_on_disk_against_brute_force(tmp_path):
    """A backed CSR file with int32 counts, unsorted column indices, repeated entries and
    empty rows: duplicates summed before squaring and normalising, as in memory."""
    rng = np.random.default_rng(2)
    a = make_adata(rng, counts=True)
    X = a.X.tocsr()
    data_, indices, lens = [], [], []
    for i in range(X.shape[0]):
        cols = X.indices[X.indptr[i] : X.indptr[i + 1]]
        vals = X.data[X.indptr[i] : X.indptr[i + 1]].astype(np.int32)
        order = rng.permutation(cols.size)  # unsorted
        cols, vals = cols[order], vals[order]
        if cols.size and i % 3 == 0:  # split one entry of every third cell in two
            cols = np.concatenate([cols, cols[:1]])
            first = vals[0]
            vals = np.concatenate([[first - first // 2], vals[1:], [first // 2]]).astype(np.int32)
        data_.append(vals)
        indices.append(cols.astype(np.int32))
        lens.append(cols.size)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    path = write_csr(
        tmp_path / "raw.h5ad", a, np.concatenate(data_), np.concatenate(indices), indptr
    )
    b = ad.read_h5ad(path, backed="r")
    assert not _read.sorted_unique(indptr, np.concatenate(indices))
    dense = a.X.toarray().astype(np.float64)
    tot = dense.sum(1, keepdims=True)
    norm = np.log1p(np.divide(1e4 * dense, tot, out=np.zeros_like(dense), where=tot > 0))
    lab = a.obs["cond"].astype(str).to_numpy()
    st = data.group_stats(b, "cond", control="ctrl", chunk_cells=37)
    assert st.normalization == "log1p_cp10k"
    for i, g in enumerate(st.names):
        np.testing.assert_allclose(st.sum[i], norm[lab == g].sum(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(st.sumsq[i], (norm[lab == g] ** 2).sum(0), rtol=1e-12)
    mem = data.group_stats(a, "cond", control="ctrl", chunk_cells=37)
    np.testing.assert_allclose(st.sum, mem.sum, rtol=1e-13, atol=1e-13)
    b.file.close()


def test_a_group_with_no_cells_in_a_half(tmp_path):
    """Every cell of g2 in half 1: half 2's sums are zero, its mean NaN (n = 0)."""
    rng = np.random.default_rng(3)
    a = make_adata(rng, counts=False)
    lab = a.obs["cond"].astype(str).to_numpy()
    split = np.where(np.arange(a.n_obs) % 2 == 0, 1, 2)
    split[lab == "g2"] = 1
    b = backed(a, tmp_path)
    st = data.group_stats(b, "cond", control="ctrl", split=split)
    i = st.half2.names.index("g2")
    assert st.half2.n[i] == 0 and not st.half2.sum[i].any() and not st.half2.sumsq[i].any()
    assert np.isnan(st.half2.mean[i]).all()
    dense = a.X.toarray().astype(np.float64)
    np.testing.assert_allclose(st.half1.sum[i], dense[lab == "g2"].sum(0), rtol=1e-12)
    b.file.close()


def test_add_rows_without_scipys_kernel_is_the_same(monkeypatch):
    """The ``np.add.at`` fallback (a SciPy without ``csr_todense``) adds in the same order."""
    rng = np.random.default_rng(4)
    a = make_adata(rng, counts=True)
    want = data.group_stats(a, "cond", control="ctrl")
    monkeypatch.setattr(_read, "_csr_todense", None)
    got = data.group_stats(a, "cond", control="ctrl")
    np.testing.assert_array_equal(got.sum, want.sum)
    np.testing.assert_array_equal(got.sumsq, want.sumsq)


def test_means_only(tmp_path):
    """``sumsq=False`` (the pseudobulk of predicted cells): the same sums, no squares."""
    rng = np.random.default_rng(5)
    a = make_adata(rng, counts=True)
    b = backed(a, tmp_path)
    for adata in (a, b):
        full = data.group_stats(adata, "cond", control=None)
        means = data.group_stats(adata, "cond", control=None, sumsq=False)
        np.testing.assert_array_equal(means.sum, full.sum)
        np.testing.assert_array_equal(means.mean, full.mean)
        assert np.isnan(means.sumsq).all() and np.isnan(means.var).all()
    b.file.close()


def test_a_backed_pass_reads_bounded_blocks(tmp_path, monkeypatch):
    """Streamed, never the matrix at once: each read holds at most the block budget plus
    one row (log values settle ``normalize="auto"`` on the first block of a chunk)."""
    rng = np.random.default_rng(6)
    a = make_adata(rng, counts=False, n_cells=203, n_genes=37, density=0.5)
    b = backed(a, tmp_path)
    import vcjax.data._group_stats as gs

    budget = 64
    monkeypatch.setattr(gs, "_READ_NNZ", budget)
    sizes = []
    real = _read._read_range

    def spy(ds, lo, hi, scratch, name):
        sizes.append(hi - lo)
        return real(ds, lo, hi, scratch, name)

    monkeypatch.setattr(_read, "_read_range", spy)
    st = data.group_stats(b, "cond", control="ctrl")
    row_max = int(np.diff(a.X.indptr).max())
    assert sizes and max(sizes) <= budget + row_max
    assert sum(sizes) == 2 * a.X.nnz  # data and indices, each non-zero read once
    np.testing.assert_allclose(st.sum, data.group_stats(a, "cond", control="ctrl").sum, rtol=1e-13)
    b.file.close()


# ------------------------------------------------------------------------------ the checks


def test_auto_decides_per_chunk_whatever_the_blocks(tmp_path, monkeypatch):
    """``normalize="auto"`` decides on each chunk of ``chunk_cells`` cells as a whole, in
    memory (dense: chunk by chunk) and streamed in blocks smaller than a chunk."""
    import vcjax.data._group_stats as gs

    monkeypatch.setattr(gs, "_READ_NNZ", 30)  # several blocks per chunk
    rng = np.random.default_rng(7)
    base = make_adata(rng, counts=True)
    X0 = base.X.toarray()
    cases = {
        "non-integer in the chunk's first block": ((3, 1, 0.5), "none"),
        "non-integer late in the first chunk": ((45, 2, 0.5), "none"),
        "negative integer then a non-integer": ([(2, 1, -2.0), (45, 2, 0.5)], "none"),
    }
    for _, (edits, mode) in cases.items():
        X = X0.copy()
        for i, j, v in edits if isinstance(edits, list) else [edits]:
            X[i, j] = v
        for fmt in ("dense", "backed"):
            a = base.copy()
            a.X = X if fmt == "dense" else sp.csr_matrix(X)
            adata = a if fmt == "dense" else backed(a, tmp_path, f"{fmt}.h5ad")
            st = data.group_stats(adata, "cond", control="ctrl", chunk_cells=60)
            assert st.normalization == mode
            if fmt == "backed":
                adata.file.close()
    # counts in the first chunk, a non-integer in the second: the same one-line error
    X = X0.copy()
    X[150, 2] = 0.5
    msgs = []
    for fmt in ("dense", "csr", "backed"):
        a = base.copy()
        a.X = X if fmt == "dense" else sp.csr_matrix(X)
        adata = backed(a, tmp_path, "late.h5ad") if fmt == "backed" else a
        with pytest.raises(VcjaxInputError, match="looked like raw counts") as err:
            data.group_stats(adata, "cond", control="ctrl", chunk_cells=60)
        msgs.append(str(err.value))
        if fmt == "backed":
            adata.file.close()
    assert msgs[0] == msgs[1] == msgs[2]
    assert "cells before 'c0' onward" in msgs[0] and "gene 'G2', cell 'c150'" in msgs[0]


@pytest.mark.parametrize("bad,word", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_non_finite_values_named_the_same_streamed(bad, word, tmp_path, monkeypatch):
    import vcjax.data._group_stats as gs

    monkeypatch.setattr(gs, "_READ_NNZ", 50)
    rng = np.random.default_rng(8)
    a = make_adata(rng, counts=False)
    X = a.X.toarray()
    X[120, 4] = bad
    a.X = sp.csr_matrix(X)
    for adata in (a, backed(a, tmp_path)):
        with pytest.raises(
            VcjaxInputError, match=f"non-finite value {word} at gene 'G4', cell 'c120'"
        ):
            data.group_stats(adata, "cond", control="ctrl", chunk_cells=40)


def test_negative_counts_named_streamed(tmp_path):
    rng = np.random.default_rng(9)
    a = make_adata(rng, counts=True)
    X = a.X.toarray()
    X[9, 3] = -1.0
    a.X = sp.csr_matrix(X)
    b = backed(a, tmp_path)
    with pytest.raises(
        VcjaxInputError, match="negative value -1.0 at gene 'G3', cell 'c9' in integer"
    ):
        data.group_stats(b, "cond", control="ctrl")
    with pytest.raises(
        VcjaxInputError, match="negative value -1.0 at gene 'G3', cell 'c9'; counts"
    ):
        data.group_stats(b, "cond", control="ctrl", normalize="log1p_cp10k")
    b.file.close()


# ------------------------------------------------------------------------------ the evidence


@pytest.mark.parametrize("counts", [True, False])
def test_scale_evidence_of_the_pass_equals_scale_evidence(counts, tmp_path, monkeypatch):
    """The evidence recorded on the pass (any blocks, any layout) is
    :func:`vcjax.data.scale_evidence` of the matrix, field for field."""
    import vcjax.data._group_stats as gs

    rng = np.random.default_rng(10)
    a = make_adata(rng, counts=counts, n_cells=203, n_genes=37)
    b = backed(a, tmp_path)
    dense = a.copy()
    dense.X = a.X.toarray()
    csc = a.copy()
    csc.X = sp.csc_matrix(a.X)
    for read_nnz in (1 << 22, 37):
        monkeypatch.setattr(gs, "_READ_NNZ", read_nnz)
        for adata in (a, b, dense, csc):
            st = data.group_stats(adata, "cond", control="ctrl", chunk_cells=23)
            want = data.scale_evidence(adata.X, normalization=st.normalization)
            assert st.scale == want
            assert st.scale.kind == ("counts" if counts else "log1p")
    # a sample of blocks smaller than the matrix (max_values forces 16 spread blocks)
    s = data._scale.EvidenceSample(a.shape, max_values=16 * 37 * 3)
    assert len(s.ranges) == 16
    for start in range(0, a.n_obs, 10):  # fed in blocks that cut the ranges anywhere
        stop = min(a.n_obs, start + 10)
        s.feed(start, stop, lambda i, j, s0=start: a.X[s0 + i : s0 + j].astype(np.float64))
    assert s.complete
    assert s.evidence() == data.scale_evidence(a.X, max_values=16 * 37 * 3)
    b.file.close()


def test_scale_evidence_rows_of_a_mixed_dtype_csr_are_read_directly(monkeypatch):
    """anndata reads CSR with int32 indices and int64 indptr; SciPy's row slice of such a
    matrix converts all of indices (``O(nnz)`` per slice): the sample reads only its rows."""
    rng = np.random.default_rng(11)
    a = make_adata(rng, counts=False)
    X = sp.csr_matrix(a.X)
    X.indptr = X.indptr.astype(np.int64)
    want = data.scale_evidence(sp.csr_matrix(a.X.toarray()))

    def no_getitem(self, key):
        raise AssertionError("row slice of the whole matrix")

    monkeypatch.setattr(type(X), "__getitem__", no_getitem)
    assert data.scale_evidence(X) == want


# ------------------------------------------------------------------------------ evaluate


def test_evaluate_from_paths_equals_in_memory_and_leaves_no_file_open(tmp_path):
    """``evaluate(truth.h5ad, pred.h5ad)`` (streamed) == the in-memory AnnData objects,
    table and input record; the files can be rewritten while the screen is alive."""
    import vcjax

    sim = dict(n_perturbations=5, n_genes=60, n_control=20, n_combinations=1,
               shared_shift_genes=6, effect_genes=4)  # fmt: skip
    truth = vcjax.simulate_screen(seed=1, cells_per_perturbation=12, **sim)
    truth.X = sp.csr_matrix(truth.X)
    rng = np.random.default_rng(12)
    pred = truth[rng.permutation(truth.n_obs)].copy()  # the model's cells: noisy counts
    pred.X = sp.csr_matrix(pred.X.toarray() + rng.poisson(1.0, pred.shape))
    tp, pp = tmp_path / "truth.h5ad", tmp_path / "pred.h5ad"
    truth.write_h5ad(tp)
    pred.write_h5ad(pp)
    kw = dict(key="condition", control="control")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # raw counts normalised
        want = vcjax.evaluate(truth, pred, **kw)
        got = vcjax.evaluate(tp, pp, **kw)
        screen = vcjax.prepare(tp, **kw)
    pd.testing.assert_frame_equal(got, want)
    assert got.attrs["inputs"] == want.attrs["inputs"]
    truth.write_h5ad(tp)  # no handle left open by the screen
    assert screen.strata[0].cells.open().n_obs == truth.n_obs


def test_open_h5ad_streams_csr_and_dense_and_reads_csc_whole(tmp_path):
    """A path's X stays on disk when its rows can be streamed (CSR, dense); CSC is read
    whole (each row block of a backed CSC reads all of it). Same sums either way."""
    rng = np.random.default_rng(13)
    a = make_adata(rng, counts=True)
    want = data.group_stats(a, "cond", control="ctrl")
    for fmt, X in (("csr", a.X), ("dense", a.X.toarray()), ("csc", sp.csc_matrix(a.X))):
        b = a.copy()
        b.X = X
        b.write_h5ad(tmp_path / f"{fmt}.h5ad")
        opened = data.open_h5ad(tmp_path / f"{fmt}.h5ad")
        assert opened.isbacked == (fmt != "csc")
        got = data.group_stats(opened, "cond", control="ctrl")
        np.testing.assert_array_equal(got.sum, want.sum)
        np.testing.assert_array_equal(got.sumsq, want.sumsq)
        if opened.isbacked:
            opened.file.close()
