"""Reading cells: ``.h5ad`` files, row chunks of any matrix layout, normalisation, group sums.

A dense, CSR, CSC or *backed* matrix is read in row chunks (:func:`iter_chunks`); an
in-memory sparse matrix is never densified and its chunks are zero-copy views
(:class:`CSRView`). :func:`normalize_chunk` applies docs/metrics.md §1's normalisation
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
    "CSRView",
    "add_group_sums",
    "as_f64",
    "chunk_values",
    "csr_rows",
    "grouped_sums",
    "in_memory_csr",
    "is_csr",
    "iter_chunks",
    "locate",
    "normalize_chunk",
    "read_h5ad",
    "sorted_unique",
]

TARGET_SUM = 1e4


def read_h5ad(path: str | os.PathLike, *, backed: bool = False):
    """``anndata.read_h5ad`` with clear errors (missing file, not an h5ad, empty).

    Args:
      path: file path.
      backed: open X read-only on disk (``backed="r"``) instead of loading it.

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
        bad = np.diff(indices[a:b]) <= 0
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


def add_group_sums(S: np.ndarray, SS: np.ndarray, codes: np.ndarray, chunk) -> None:
    """``S[c] += Σ_{i: codes_i = c} x_i`` and ``SS[c] += Σ x_i²`` for one chunk, in place.

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
        SS += ind @ (chunk * chunk)
        return
    indptr, indices, data = chunk.indptr, chunk.indices, chunk.data
    S_flat, SS_flat = S.reshape(-1), SS.reshape(-1)
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
            np.add.at(SS_flat, flat, d * d)
        r0 = r1


#: non-zeros gathered per block of :func:`grouped_sums`
_GROUP_BLOCK_NNZ = 1 << 21


def grouped_sums(
    X,
    codes: np.ndarray,
    S: np.ndarray,
    SS: np.ndarray,
    cells: tuple[int, int],
    *,
    normalise: bool,
    advance=None,
) -> None:
    """Group sums of an in-memory canonical CSR matrix, accumulated group by group.

    The cells ``cells[0] … cells[1] - 1`` are ordered by accumulator row (a stable sort, so
    each group keeps dataset order); blocks of consecutive groups with about
    :data:`_GROUP_BLOCK_NNZ` non-zeros are gathered (row slices) into one CSR matrix
    whose rows are the *groups*, and ``toarray`` adds every group's entries into its
    accumulator row in one sequential pass (each output row stays in cache, where a
    scatter in dataset order misses it at nearly every non-zero). Every entry of ``S`` and
    ``SS`` is the same float64 sequence of additions in dataset order as a cell-by-cell
    scatter, so the result is identical to it. ``S`` and ``SS`` must be zero on entry; the
    two passes of a block run in two threads (SciPy releases the GIL there).
    """
    from concurrent.futures import ThreadPoolExecutor

    first, last = cells
    n_acc, G = S.shape
    order = first + np.argsort(codes[first:last], kind="stable")
    gstart = np.searchsorted(codes[order], np.arange(n_acc + 1))
    ip, data, indices = X.indptr, X.data, X.indices
    starts, stops = ip[order], ip[order + 1]
    cum = np.zeros(order.size + 1, dtype=np.int64)
    np.cumsum(stops - starts, out=cum[1:])
    g_cum = cum[gstart]  # non-zeros before each group (in sorted order)
    # sorted positions where a row does not directly follow the previous one in memory:
    # runs of adjacent rows (cells stored by condition) are gathered as one slice
    brk = np.flatnonzero(starts[1:] != stops[:-1]) + 1
    starts, stops = starts.tolist(), stops.tolist()

    def gather(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.searchsorted(brk, [r0 + 1, r1])
        seg = [r0, *brk[lo:hi].tolist(), r1]
        spans = [(starts[a], stops[b - 1]) for a, b in zip(seg[:-1], seg[1:])]
        d = np.concatenate([data[a:b] for a, b in spans], dtype=np.float64)
        ix = np.concatenate([indices[a:b] for a, b in spans])
        if normalise:  # the gathered rows as one CSR view, normalised row by row
            rows = CSRView(d, ix, cum[r0 : r1 + 1] - cum[r0], (r1 - r0, G))
            d = normalize_chunk(rows).data
        return d, ix

    def todense(d, ix, gip, out) -> None:
        sp.csr_matrix((d, ix, gip), shape=out.shape).toarray(out=out)

    with ThreadPoolExecutor(max_workers=1) as pool:
        g0 = 0
        while g0 < n_acc:
            g1 = int(np.searchsorted(g_cum, g_cum[g0] + _GROUP_BLOCK_NNZ, side="right")) - 1
            g1 = min(n_acc, max(g1, g0 + 1))
            r0, r1 = int(gstart[g0]), int(gstart[g1])
            if g1 == g0 + 1 and g_cum[g1] - g_cum[g0] > _GROUP_BLOCK_NNZ:
                # one large group: its rows in parts, added in order into its single row
                lo = r0
                while lo < r1:
                    hi = int(np.searchsorted(cum, cum[lo] + _GROUP_BLOCK_NNZ, side="right")) - 1
                    hi = min(r1, max(hi, lo + 1))
                    if cum[hi] > cum[lo]:
                        d, ix = gather(lo, hi)
                        np.add.at(S[g0], ix, d)
                        np.add.at(SS[g0], ix, d * d)
                    lo = hi
            elif g_cum[g1] > g_cum[g0]:
                d, ix = gather(r0, r1)
                gip = g_cum[g0 : g1 + 1] - g_cum[g0]
                job = pool.submit(todense, d, ix, gip, S[g0:g1])
                todense(d * d, ix, gip, SS[g0:g1])
                job.result()
            if advance is not None:
                advance(r1 - r0)
            g0 = g1
