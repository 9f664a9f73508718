"""Reading cells: ``.h5ad`` files, row chunks of any matrix layout, normalisation, group sums.

A dense, CSR, CSC or *backed* matrix is read in row chunks (:func:`iter_chunks`); an
in-memory sparse matrix is never densified and its chunks are zero-copy views
(:class:`CSRView`). A CSR matrix, in memory or backed, is read by :class:`CSRSource` in
large row blocks (a backed one straight from its ``data``/``indices``/``indptr`` arrays on
disk, never the whole matrix at once), which :func:`add_grouped` adds into group sums. :func:`normalize_chunk` applies docs/metrics.md §1's normalisation
``X_ig = ln(1 + 1e4 · counts_ig / Σ_g' counts_ig')`` (over **all** genes of the matrix;
cells with zero total stay zero, as in ``scanpy.pp.normalize_total``).
:func:`add_group_sums` and :func:`grouped_sums` accumulate per-group sums and sums of
squares in float64.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp

from vcjax._errors import VcjaxInputError

__all__ = [
    "TARGET_SUM",
    "CSRSource",
    "CSRView",
    "Scratch",
    "add_group_sums",
    "add_grouped",
    "as_f64",
    "backed_csr_group",
    "chunk_values",
    "csr_row_block",
    "csr_rows",
    "csr_source",
    "in_memory_csr",
    "is_csr",
    "iter_chunks",
    "locate",
    "normalize_chunk",
    "open_h5ad",
    "read_h5ad",
    "sorted_unique",
]

TARGET_SUM = 1e4


def read_h5ad(path: str | os.PathLike, *, backed: bool = False):
    """``anndata.read_h5ad`` with clear errors (missing file, not an h5ad, empty).

    Args:
      path: file path.
      backed: open X read-only on disk (``backed="r"``) instead of loading it (``obs``,
        ``var`` and the layers are read; ``X`` is streamed later, see :class:`CSRSource`).

    Returns:
      The AnnData object.
    """
    import anndata as ad

    path = os.fspath(path)
    if not os.path.exists(path):
        raise VcjaxInputError(f"h5ad file not found: {path}")
    if os.path.isdir(path):
        raise VcjaxInputError(f"expected an .h5ad file, got a directory: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic != b"\x89HDF\r\n\x1a\n":
        raise VcjaxInputError(f"not an HDF5/h5ad file: {path}")
    try:
        adata = ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise VcjaxInputError(f"cannot read h5ad {path}: {type(exc).__name__}: {exc}") from exc
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise VcjaxInputError(
            f"empty AnnData in {path}: {adata.n_obs} cells x {adata.n_vars} genes"
        )
    return adata


def open_h5ad(path: str | os.PathLike):
    """An ``.h5ad`` file for one streaming pass (:func:`vcjax.data.group_stats`).

    Backed (:func:`read_h5ad` with ``backed=True``: ``obs``, ``var`` and the layers are
    read, ``X`` stays on disk) when ``X`` is CSR or dense, or absent; read whole when ``X``
    is CSC, whose rows cannot be streamed (every row block would read all of it).
    """
    adata = read_h5ad(path, backed=True)
    X = adata.X
    if X is not None and is_backed_sparse(X) and getattr(X, "format", "csr") != "csr":
        adata = adata.to_memory()
    return adata


def is_backed_sparse(X) -> bool:
    return type(X).__name__ in ("CSRDataset", "CSCDataset", "_CSRDataset", "_CSCDataset") or (
        hasattr(X, "format") and hasattr(X, "to_memory") and not sp.issparse(X)
    )


@dataclasses.dataclass(frozen=True)
class CSRView:
    """Rows of an in-memory CSR matrix: views of its ``data``/``indices`` (no copy).

    What :func:`group_stats` reads chunk by chunk. Building a SciPy matrix on the views
    would copy ``indices`` (SciPy prunes views of larger arrays), and ``X[start:stop]``
    copies every non-zero of the slice.
    """

    data: np.ndarray  # float64 (or as stored, for validation only)
    indices: np.ndarray
    indptr: np.ndarray  # rebased: indptr[0] == 0
    shape: tuple[int, int]

    def tocsr(self) -> sp.csr_matrix:
        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=self.shape)

    def copy_rows(self, a: int, b: int) -> sp.csr_matrix:
        """Rows ``a:b`` as a float64 CSR matrix that owns its arrays (canonical when the
        view is)."""
        lo, hi = int(self.indptr[a]), int(self.indptr[b])
        G = self.shape[1]
        idx = np.int32 if max(hi - lo, G) < np.iinfo(np.int32).max else np.int64
        m = sp.csr_matrix(
            (
                np.array(self.data[lo:hi], dtype=np.float64),
                np.array(self.indices[lo:hi], dtype=idx),
                (self.indptr[a : b + 1] - lo).astype(idx),
            ),
            shape=(b - a, G),
        )
        return m


def is_csr(chunk) -> bool:
    return isinstance(chunk, CSRView) or sp.issparse(chunk)


def csr_rows(X, start: int, stop: int, dtype=np.float64) -> CSRView:
    """Rows ``start:stop`` of an in-memory CSR matrix, zero-copy.

    ``data`` is converted to ``dtype`` only when it differs (``None``: as stored);
    ``indptr`` is rebased (``O(rows)``).
    """
    ip = X.indptr
    a, b = int(ip[start]), int(ip[stop])
    indptr = ip[start : stop + 1] - ip[start]
    data = X.data[a:b] if dtype is None else np.asarray(X.data[a:b], dtype=dtype)
    return CSRView(data, X.indices[a:b], indptr, (stop - start, X.shape[1]))


def as_f64(x) -> np.float64:
    """A reported value as float64 (what the values are converted to for the sums)."""
    return np.float64(x)


def in_memory_csr(X):
    """``X`` as in-memory CSR when it is an in-memory sparse matrix, else None.

    CSC is converted once (row slices of CSC cost ``O(nnz)`` each; the conversion costs
    ``O(nnz)`` memory, never dense); duplicate entries are summed once.
    """
    if not sp.issparse(X):
        return None
    if X.format != "csr":
        X = X.tocsr() if X.format == "csc" else sp.csr_matrix(X)
    if not sorted_unique(X.indptr, X.indices):
        X = X.copy()
        X.sum_duplicates()
    return X


def sorted_unique(indptr: np.ndarray, indices: np.ndarray, block: int = 1 << 20) -> bool:
    """True when column indices strictly increase within every row (so no duplicates).

    SciPy's ``has_canonical_format``, in blocks of NumPy operations.
    """
    n = indices.size
    for a in range(0, n, block):
        b = min(n, a + block + 1)  # blocks overlap by one so every pair is compared
        seg = indices[a:b]
        bad = seg[1:] <= seg[:-1]
        # pairs that straddle a row boundary k (a < k < b) are not compared
        lo, hi = np.searchsorted(indptr, [a + 1, b])
        bad[indptr[lo:hi] - 1 - a] = False
        if bad.any():
            return False
    return True


def iter_chunks(
    X, chunk_cells: int, rows: tuple[int, int] | None = None, *, views: bool = False
) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(start, stop, chunk)`` with chunk a float64 ndarray or canonical CSR.

    ``rows = (first, last)`` restricts the pass to cells ``first … last - 1``. Chunks of an
    in-memory matrix share memory with it where possible (float64 data is not copied):
    treat them as read-only. ``views=True`` yields in-memory CSR rows as :class:`CSRView`
    (what :func:`group_stats` consumes) instead of SciPy matrices.
    """
    first, n = (0, X.shape[0]) if rows is None else rows
    csr = in_memory_csr(X)
    if csr is None and is_backed_sparse(X) and getattr(X, "format", "csr") == "csc":
        warnings.warn(
            "backed CSC matrix: row chunks are slow; store X as CSR for streaming",
            stacklevel=3,
        )
    for start in range(first, n, chunk_cells):
        stop = min(start + chunk_cells, n)
        if csr is not None:
            chunk = csr_rows(csr, start, stop)
            if not views:
                chunk = chunk.tocsr()
                chunk.has_canonical_format = True
        else:
            chunk = X[start:stop]
            if sp.issparse(chunk):
                chunk = sp.csr_matrix(chunk, dtype=np.float64)
                chunk.sum_duplicates()
            else:
                chunk = np.asarray(chunk, dtype=np.float64)
                if chunk.ndim != 2:
                    chunk = chunk.reshape(stop - start, -1)
        yield start, stop, chunk


def chunk_values(chunk) -> np.ndarray:
    return chunk.data if is_csr(chunk) else chunk.ravel()


def locate(chunk, bad_flat: np.ndarray) -> tuple[int, int]:
    """(row, col) within the chunk of the first True in the value-array mask."""
    k = int(np.flatnonzero(bad_flat)[0])
    if is_csr(chunk):
        row = int(np.searchsorted(chunk.indptr, k, side="right") - 1)
        return row, int(chunk.indices[k])
    return divmod(k, chunk.shape[1])


def normalize_chunk(chunk):
    """``ln(1 + 1e4·x/Σ_g x)`` per row; rows with zero total stay zero."""
    if isinstance(chunk, CSRView):
        # SciPy's ``csr.sum(axis=1)``: reduceat over the non-empty rows
        totals = np.zeros(chunk.shape[0])
        nonempty = np.flatnonzero(np.diff(chunk.indptr))
        if nonempty.size:
            totals[nonempty] = np.add.reduceat(chunk.data, chunk.indptr[nonempty])
    else:
        totals = np.asarray(chunk.sum(axis=1)).ravel()
    with np.errstate(divide="ignore"):
        scale = np.where(totals > 0, TARGET_SUM / totals, 0.0)
    if is_csr(chunk):
        view = isinstance(chunk, CSRView)
        if not view:
            chunk = sp.csr_matrix(chunk)
        row = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))
        data = np.log1p(chunk.data * scale[row])
        if view:
            return dataclasses.replace(chunk, data=data)
        out = sp.csr_matrix((data, chunk.indices, chunk.indptr), shape=chunk.shape)
        out.has_canonical_format = chunk.has_canonical_format
        return out
    return np.log1p(chunk * scale[:, None])


#: non-zeros per scatter block of :func:`add_group_sums` (keeps its temporaries in cache)
_SCATTER_NNZ = 1 << 20


def add_group_sums(S: np.ndarray, SS: np.ndarray | None, codes: np.ndarray, chunk) -> None:
    """``S[c] += Σ_{i: codes_i = c} x_i`` and ``SS[c] += Σ x_i²`` (``SS`` None: not
    accumulated) for one chunk, in place.

    A CSR chunk (canonical: no duplicate entries) is scattered non-zero by non-zero into
    the flat accumulators with ``np.add.at`` (``O(nnz)``, no indicator product, no
    intermediate ``(groups × G)`` matrix); a dense chunk goes through a sparse one-hot
    indicator product. Float64 throughout; each cell is added in dataset order.
    """
    n_acc, G = S.shape
    m = chunk.shape[0]
    if not is_csr(chunk):
        ind = sp.csr_matrix((np.ones(m), (codes, np.arange(m))), shape=(n_acc, m))
        S += ind @ chunk
        if SS is not None:
            SS += ind @ (chunk * chunk)
        return
    indptr, indices, data = chunk.indptr, chunk.indices, chunk.data
    S_flat = S.reshape(-1)
    row_base = codes.astype(np.int64) * G
    r0 = 0
    while r0 < m:
        # rows r0:r1 holding about _SCATTER_NNZ non-zeros (at least one row)
        target = int(indptr[r0]) + _SCATTER_NNZ
        r1 = max(r0 + 1, min(m, int(np.searchsorted(indptr, target, side="right")) - 1))
        a, b = int(indptr[r0]), int(indptr[r1])
        if b > a:
            flat = np.repeat(row_base[r0:r1], np.diff(indptr[r0 : r1 + 1]))
            flat += indices[a:b]
            d = data[a:b]
            np.add.at(S_flat, flat, d)
            if SS is not None:
                np.add.at(SS.reshape(-1), flat, d * d)
        r0 = r1


# ------------------------------------------------------------------ CSR row blocks, streamed

#: non-zeros read from a backed file per block of :meth:`CSRSource.rows`
_READ_NNZ = 1 << 22
#: non-zeros gathered per block of :func:`add_grouped` (its float64 temporaries)
_GROUP_BLOCK_NNZ = 1 << 21


def backed_csr_group(X):
    """The on-disk group (``data``/``indices``/``indptr``) of a backed CSR matrix, or None.

    anndata's backed sparse dataset keeps its h5py (or zarr) group in ``.group``; reading
    its three arrays directly skips anndata's per-slice work.
    """
    if not is_backed_sparse(X) or getattr(X, "format", None) != "csr":
        return None
    group = getattr(X, "group", None)
    try:
        if group is None or any(k not in group for k in ("data", "indices", "indptr")):
            return None
    except TypeError:
        return None
    return group


class Scratch:
    """Work arrays reused from block to block of one pass (a fresh large array costs its
    page faults at every block). Views handed out are valid until the next request of the
    same name."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        a = self._arrays.get(name)
        if a is None or a.size < n or a.dtype != dtype:
            a = np.empty(n, dtype=dtype)
            self._arrays[name] = a
        return a[:n]


def _read_range(ds, a: int, b: int, scratch: Scratch | None, name: str) -> np.ndarray:
    """``ds[a:b]`` of an on-disk array, into ``scratch``'s buffer when it is an h5py dataset."""
    if scratch is None or b <= a or not hasattr(ds, "read_direct"):
        return ds[a:b]
    out = scratch.get(name, b - a, ds.dtype)
    ds.read_direct(out, np.s_[a:b], np.s_[0 : b - a])
    return out


class CSRSource:
    """A CSR matrix in memory or on disk, read as :class:`CSRView` row blocks.

    In memory (CSR, CSC converted once, canonicalised once by :func:`in_memory_csr`) a
    block is a zero-copy view; on disk (anndata's backed CSR) a block is one read of its
    rows' ``data`` and ``indices`` (``indptr`` is read once, ``O(N)``), canonicalised only
    when its column indices are unsorted or repeated. Values are as stored (float64 for
    kinds other than float/int); the caller converts.

    Use :func:`csr_source`, which returns None for the layouts it does not read (dense,
    backed CSC).
    """

    def __init__(self, data, indices, indptr: np.ndarray, shape, *, canonical: bool):
        self.data, self.indices = data, indices
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.shape = (int(shape[0]), int(shape[1]))
        self.canonical = canonical
        self.backed = not isinstance(data, np.ndarray)

    def stop_for(self, start: int, last: int, nnz: int) -> int:
        """The end of the block from ``start`` that holds about ``nnz`` non-zeros (at least
        one row, at most ``last``)."""
        ip = self.indptr
        stop = int(np.searchsorted(ip, ip[start] + nnz, side="right")) - 1
        return min(last, max(stop, start + 1))

    def rows(self, start: int, stop: int, scratch: Scratch | None = None) -> CSRView:
        """Rows ``start:stop`` in canonical form (sorted, unique column indices per row).

        ``scratch``: read a backed block into its buffers (valid until the next block).
        """
        ip = self.indptr
        a, b = int(ip[start]), int(ip[stop])
        if self.backed:
            data = _read_range(self.data, a, b, scratch, "read_data")
            indices = _read_range(self.indices, a, b, scratch, "read_indices")
        else:
            data, indices = self.data[a:b], self.indices[a:b]
        if data.dtype.kind not in "fiu":
            data = np.asarray(data, dtype=np.float64)
        indptr = ip[start : stop + 1] - a
        shape = (stop - start, self.shape[1])
        if not self.canonical and not sorted_unique(indptr, indices):
            m = sp.csr_matrix((np.asarray(data, dtype=np.float64), indices, indptr), shape=shape)
            m.sum_duplicates()
            return CSRView(m.data, m.indices, np.asarray(m.indptr, dtype=np.int64), shape)
        return CSRView(data, indices, indptr, shape)


def csr_source(X) -> CSRSource | None:
    """A :class:`CSRSource` of an in-memory sparse or backed CSR matrix; None otherwise."""
    csr = in_memory_csr(X)
    if csr is not None:
        return CSRSource(csr.data, csr.indices, csr.indptr, csr.shape, canonical=True)
    group = backed_csr_group(X)
    if group is None:
        return None
    indptr = np.asarray(group["indptr"][...], dtype=np.int64)
    if indptr.shape != (X.shape[0] + 1,):
        raise VcjaxInputError(
            f"backed CSR matrix: indptr has {indptr.size} entries for {X.shape[0]} rows"
        )
    return CSRSource(group["data"], group["indices"], indptr, X.shape, canonical=False)


def csr_row_block(X, a: int, b: int) -> sp.csr_matrix | None:
    """Rows ``a:b`` of an in-memory or backed CSR matrix as a canonical float64 CSR matrix
    that owns its arrays, reading or copying only those rows; None for other layouts.

    (SciPy's ``X[a:b]`` on a matrix whose ``indices`` and ``indptr`` dtypes differ, as
    anndata reads them, first converts the whole ``indices`` array: ``O(nnz)`` per slice.)
    """
    if sp.issparse(X) and X.format == "csr":
        data, indices = X.data, X.indices
        indptr = np.asarray(X.indptr[a : b + 1], dtype=np.int64)
    else:
        group = backed_csr_group(X)
        if group is None:
            return None
        data, indices = group["data"], group["indices"]
        indptr = np.asarray(group["indptr"][a : b + 1], dtype=np.int64)
    lo, hi = int(indptr[0]), int(indptr[-1])
    indptr = indptr - lo
    G = int(X.shape[1])
    idx = np.int32 if max(hi - lo, G) < np.iinfo(np.int32).max else np.int64
    m = sp.csr_matrix(
        (
            np.array(data[lo:hi], dtype=np.float64),  # a copy: sorting below is in place
            np.array(indices[lo:hi], dtype=idx),
            indptr.astype(idx),
        ),
        shape=(b - a, G),
    )
    m.sum_duplicates()
    return m


try:  # SciPy's kernel of ``toarray``, which adds each entry into the output array
    from scipy.sparse._sparsetools import csr_todense as _csr_todense
except ImportError:  # pragma: no cover - a SciPy without it: np.add.at, same additions
    _csr_todense = None


def _add_rows(out: np.ndarray, gip: np.ndarray, ix: np.ndarray, d: np.ndarray) -> None:
    """``out[r, ix[k]] += d[k]`` for the entries ``gip[r] … gip[r+1]-1`` of each row ``r``,
    in order (SciPy's ``csr_todense``, without ``toarray``'s zeroing of ``out``)."""
    rows, G = out.shape
    if _csr_todense is not None:
        _csr_todense(rows, G, gip, ix, d, out)
        return
    flat = np.repeat(np.arange(rows, dtype=np.int64) * G, np.diff(gip))
    flat += ix
    np.add.at(out.reshape(-1), flat, d)


def add_grouped(
    S: np.ndarray,
    SS: np.ndarray | None,
    codes: np.ndarray,
    block: CSRView,
    *,
    normalise: bool,
    pool=None,
    scratch: Scratch | None = None,
) -> None:
    """``S[c] += Σ_{i: codes_i = c} x_i`` (and ``SS[c] += Σ x_i²``) over a canonical CSR block.

    The block's rows are ordered by accumulator row (a stable sort: each group keeps
    dataset order), their non-zeros gathered as float64 (runs of adjacent rows as one slice)
    into a CSR matrix whose rows are the *groups*, and each group's entries are added into
    its row of ``S`` in one pass (the row stays in cache, where a scatter in dataset order
    misses it at nearly every non-zero). Every entry of ``S``/``SS`` receives the same
    float64 additions in dataset order as a cell-by-cell scatter, so the sums do not depend
    on the blocks. ``normalise``: ``ln(1 + 1e4·x/Σ_g x)`` per row first
    (:func:`normalize_chunk`). ``pool``: an executor that adds ``S`` while this thread adds
    ``SS``. Blocks of about :data:`_GROUP_BLOCK_NNZ` non-zeros bound the temporaries
    (``scratch``: reused from call to call).
    """
    scratch = Scratch() if scratch is None else scratch
    m, G = block.shape
    ip = block.indptr
    r0 = 0
    while r0 < m:
        r1 = int(np.searchsorted(ip, ip[r0] + _GROUP_BLOCK_NNZ, side="right")) - 1
        r1 = min(m, max(r1, r0 + 1))
        if ip[r1] > ip[r0]:
            a, b = int(ip[r0]), int(ip[r1])
            part = CSRView(block.data[a:b], block.indices[a:b], ip[r0 : r1 + 1] - a, (r1 - r0, G))
            _add_grouped_part(S, SS, codes[r0:r1], part, normalise, pool, scratch)
        r0 = r1


def grouped_sums(X, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """``(n_groups, G)`` float64 sums of the rows of an in-memory matrix by group.

    Row ``i`` is added to group ``codes[i]``; rows with a code outside ``[0, n_groups)``
    are left out. Every sum receives its rows' values as float64 additions in dataset order
    (the numbers of an indicator product): a sparse matrix goes block by block through
    :func:`add_grouped`, with no float64 copy of it; a dense one is converted to float64
    and goes through :func:`add_group_sums` whole.
    """
    codes = np.asarray(codes, dtype=np.int64).reshape(-1)
    if codes.shape != (X.shape[0],):
        raise ValueError(f"{codes.size} group codes for {X.shape[0]} rows")
    codes = np.where((codes >= 0) & (codes < n_groups), codes, n_groups)  # the extra row
    S = np.zeros((n_groups + 1, X.shape[1]), dtype=np.float64)
    src = csr_source(X) if sp.issparse(X) else None
    if src is None:
        add_group_sums(S, None, codes, np.asarray(X, dtype=np.float64))
        return S[:n_groups]
    scratch = Scratch()
    start, last = 0, X.shape[0]
    while start < last:
        stop = src.stop_for(start, last, _READ_NNZ)
        add_grouped(S, None, codes[start:stop], src.rows(start, stop, scratch),
                    normalise=False, scratch=scratch)  # fmt: skip
        start = stop
    return S[:n_groups]


def _add_grouped_part(S, SS, codes, part: CSRView, normalise: bool, pool, scratch) -> None:
    n_acc, G = S.shape
    vals = part.data
    if normalise:
        vals = normalize_chunk(dataclasses.replace(part, data=np.asarray(vals, np.float64))).data
    ip = part.indptr
    lens = np.diff(ip)
    order = np.argsort(codes, kind="stable")
    starts, stops = ip[:-1][order], ip[1:][order]
    # sorted positions where a row does not directly follow the previous one in the block
    brk = np.flatnonzero(starts[1:] != stops[:-1]) + 1
    nnz = int(ip[-1])
    d = scratch.get("gather_data", nnz, np.float64)
    idx_dtype = part.indices.dtype if part.indices.dtype in (np.int32, np.int64) else np.int64
    ix = scratch.get("gather_indices", nnz, idx_dtype)
    if brk.size == 0:  # rows already by group: one slice
        d[:] = vals[int(starts[0]) : int(stops[-1])]
        ix[:] = part.indices[int(starts[0]) : int(stops[-1])]
    else:
        first = np.concatenate([[0], brk]).tolist()
        last = np.concatenate([brk - 1, [order.size - 1]]).tolist()
        a_s, b_s = starts.tolist(), stops.tolist()
        spans = [(a_s[i], b_s[j]) for i, j in zip(first, last)]
        np.concatenate([vals[a:b] for a, b in spans], out=d)
        np.concatenate([part.indices[a:b] for a, b in spans], out=ix)
    gip = np.zeros(n_acc + 1, dtype=ix.dtype)
    np.cumsum(np.bincount(codes, weights=lens, minlength=n_acc).astype(ix.dtype), out=gip[1:])
    # only the accumulator rows this part touches
    g0 = int(codes.min())
    g1 = int(codes.max()) + 1
    gip = gip[g0 : g1 + 1]
    if SS is None:
        _add_rows(S[g0:g1], gip, ix, d)
        return
    job = pool.submit(_add_rows, S[g0:g1], gip, ix, d) if pool is not None else None
    if job is None:
        _add_rows(S[g0:g1], gip, ix, d)
    _add_rows(SS[g0:g1], gip, ix, np.multiply(d, d, out=scratch.get("squares", nnz, np.float64)))
    if job is not None:
        job.result()
