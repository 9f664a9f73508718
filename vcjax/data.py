"""AnnData edge: per-condition sufficient statistics in one streaming pass.

Everything downstream of the cell matrix (pseudobulks, reference vectors, t-tests, DEG
weights, bootstrap) only needs, per condition ``c``, the cell count ``n_c`` and the per-gene
sums ``Σ_{i∈S_c} x_i`` and ``Σ_{i∈S_c} x_i²``. :func:`group_stats` computes them from a
dense, CSR, CSC or *backed* AnnData in a single pass over row chunks; a sparse matrix is
never densified, and the cost is ``O(nnz)`` (group sums are a sparse one-hot indicator
``(groups × chunk) @ chunk``). Accumulation is float64.

Preprocessing follows METRICS.md §1 step 2: raw counts are normalised per cell to a total
of 1e4 over **all** genes of the matrix and transformed with the natural ``log1p``:
``X_ig = ln(1 + 1e4 · counts_ig / Σ_g' counts_ig')`` (cells with zero total stay zero, as in
``scanpy.pp.normalize_total``).

All input problems raise :class:`VcjaxInputError` with a one-line message naming the culprit.

References:
  METRICS.md §1–§2 (DbD, Mejia, Miller et al., arXiv:2506.22641); scanpy 1.11
  ``tl.rank_genes_groups`` for the variance convention.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "VcjaxInputError",
    "GroupStats",
    "SplitStats",
    "group_stats",
    "split_halves",
    "pseudobulk",
    "reference_vector",
    "read_h5ad",
]

logger = logging.getLogger("vcjax")

TARGET_SUM = 1e4
NORMALIZATIONS = ("log1p_cp10k", "none")


class VcjaxInputError(ValueError):
    """Invalid user input (AnnData content, labels, options). The message names the culprit."""


def _preview(items: Sequence[Any], k: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(str(x)) for x in items[:k])
    return shown + (f", ... ({len(items)} in total)" if len(items) > k else "")


def _mean(n: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``Σx/n`` per group (NaN where ``n == 0``); the ``mean`` of :func:`_moments`, alone."""
    n = np.asarray(n, dtype=np.float64)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return s / n


def _moments(n: np.ndarray, s: np.ndarray, ss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance from (n, Σx, Σx²), in scanpy's order of operations.

    ``mean = Σx/n``; ``var = (Σx²/n − mean²) · (n/(n−1))`` (scanpy ``_get_mean_var``).
    NaN where ``n < 2`` (variance) or ``n == 0`` (mean).
    """
    n = np.asarray(n, dtype=np.float64)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s / n
        var = ss / n - mean**2
        var = var * (n / (n - 1))
    var = np.where(n < 2, np.nan, var)
    return mean, var


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """Per-group sufficient statistics ``(n, Σx, Σx²)``.

    Attributes:
      names: condition label per group, order of first appearance in ``obs``.
      genes: gene names (``var_names``).
      n: ``(C,)`` int64 cell counts.
      sum: ``(C, G)`` float64 per-gene sums.
      sumsq: ``(C, G)`` float64 per-gene sums of squares.
      control: the control label (present in ``names``) or ``None``.
      covariate: per-group covariate value (e.g. cell type) or ``None``.
      normalization: what :func:`group_stats` did: ``"log1p_cp10k"`` or ``"none"``.
    """

    names: tuple[str, ...]
    genes: tuple[str, ...]
    n: np.ndarray
    sum: np.ndarray
    sumsq: np.ndarray
    control: str | None
    covariate: tuple[str, ...] | None = None
    normalization: str = "none"

    def __post_init__(self) -> None:
        C, G = len(self.names), len(self.genes)
        if np.shape(self.n) != (C,) or np.shape(self.sum) != (C, G):
            raise VcjaxInputError(
                f"GroupStats: shapes n{np.shape(self.n)} sum{np.shape(self.sum)} do not match "
                f"{C} groups x {G} genes"
            )
        if np.shape(self.sumsq) != (C, G):
            raise VcjaxInputError(f"GroupStats: sumsq shape {np.shape(self.sumsq)} != ({C}, {G})")
        if self.covariate is not None and len(self.covariate) != C:
            raise VcjaxInputError("GroupStats: covariate must have one value per group")

    # ------------------------------------------------------------------ moments
    @property
    def mean(self) -> np.ndarray:
        """``(C, G)`` float64 pseudobulk ``Σx/n`` (NaN for empty groups)."""
        return _mean(self.n, self.sum)

    @property
    def var(self) -> np.ndarray:
        """``(C, G)`` unbiased variance ``(E[x²]−E[x]²)·n/(n−1)`` as scanpy (NaN for n<2)."""
        return _moments(self.n, self.sum, self.sumsq)[1]

    @property
    def n_groups(self) -> int:
        return len(self.names)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    # ---------------------------------------------------------------- selection
    def index(self, name: str, covariate: str | None = None) -> int:
        """Position of group ``name`` (and ``covariate`` when stats have covariates)."""
        hits = [
            i
            for i, nm in enumerate(self.names)
            if nm == name and (covariate is None or self.covariate[i] == covariate)
        ]
        if not hits:
            where = f" in covariate {covariate!r}" if covariate is not None else ""
            raise VcjaxInputError(
                f"group {name!r}{where} not found; groups: {_preview(self.names)}"
            )
        if len(hits) > 1:
            raise VcjaxInputError(
                f"group {name!r} occurs in several covariates {_preview([self.covariate[i] for i in hits])}; "
                "pass covariate="
            )
        return hits[0]

    def _take(self, idx: np.ndarray) -> GroupStats:
        idx = np.asarray(idx, dtype=np.int64)
        names = tuple(self.names[i] for i in idx)
        control = self.control if self.control in names else None
        cov = None if self.covariate is None else tuple(self.covariate[i] for i in idx)
        return dataclasses.replace(
            self,
            names=names,
            n=self.n[idx],
            sum=self.sum[idx],
            sumsq=self.sumsq[idx],
            control=control,
            covariate=cov,
        )

    def select(self, which: Sequence[str] | np.ndarray) -> GroupStats:
        """Subset of groups by a boolean mask ``(C,)``, integer positions, or names.

        Names select every group carrying that condition label (all covariates), in the
        order the names are given.
        """
        arr = np.asarray(which)
        if arr.dtype == bool:
            if arr.shape != (self.n_groups,):
                raise VcjaxInputError(
                    f"select: boolean mask has shape {arr.shape}, expected ({self.n_groups},)"
                )
            return self._take(np.flatnonzero(arr))
        if arr.size and np.issubdtype(arr.dtype, np.integer):
            return self._take(arr.ravel())
        idx: list[int] = []
        names = np.asarray(self.names, dtype=object)
        for nm in [str(x) for x in np.atleast_1d(arr)]:
            hits = np.flatnonzero(names == nm)
            if hits.size == 0:
                raise VcjaxInputError(
                    f"select: group {nm!r} not found; groups: {_preview(self.names)}"
                )
            idx.extend(hits.tolist())
        return self._take(np.asarray(idx, dtype=np.int64))

    def perturbed(self) -> GroupStats:
        """The stats without the control group(s)."""
        return self._take(np.flatnonzero([nm != self.control for nm in self.names]))

    def for_covariate(self, value: str) -> GroupStats:
        """The groups of one covariate value (``covariate`` kept)."""
        if self.covariate is None:
            raise VcjaxInputError("for_covariate: these stats have no covariate")
        idx = np.flatnonzero([c == value for c in self.covariate])
        if idx.size == 0:
            raise VcjaxInputError(
                f"for_covariate: covariate {value!r} not found; values: "
                f"{_preview(list(dict.fromkeys(self.covariate)))}"
            )
        out = self._take(idx)
        if self.control is not None and out.control is None:
            out = dataclasses.replace(out, control=None)
        return out

    def covariate_values(self) -> tuple[str, ...]:
        """Distinct covariate values in order of first appearance (``()`` if none)."""
        return () if self.covariate is None else tuple(dict.fromkeys(self.covariate))

    def __add__(self, other: GroupStats) -> GroupStats:
        if not isinstance(other, GroupStats):
            return NotImplemented
        if (
            other.names != self.names
            or other.genes != self.genes
            or other.covariate != self.covariate
        ):
            raise VcjaxInputError("GroupStats.__add__: groups, genes or covariates differ")
        if other.normalization != self.normalization:
            raise VcjaxInputError(
                f"GroupStats.__add__: normalization {self.normalization!r} vs {other.normalization!r}"
            )
        return dataclasses.replace(
            self, n=self.n + other.n, sum=self.sum + other.sum, sumsq=self.sumsq + other.sumsq
        )


@dataclasses.dataclass(frozen=True)
class SplitStats:
    """Statistics of the two technical-duplicate halves (same groups, same order)."""

    half1: GroupStats
    half2: GroupStats

    @property
    def full(self) -> GroupStats:
        """All cells: ``half1 + half2``."""
        return self.half1 + self.half2


# --------------------------------------------------------------------------- I/O
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


# ------------------------------------------------------------------ half split
def split_halves(labels: Sequence[str] | np.ndarray, *, seed: int = 42) -> np.ndarray:
    """The DbD technical-duplicate split (METRICS.md §2).

    Seeds NumPy's legacy Mersenne-Twister with ``seed`` once (a private
    ``np.random.RandomState``, so the global state is untouched, same stream), then for each
    condition in order of first appearance: its cell indices in dataset order are shuffled
    in place and the first ``⌊n/2⌋`` go to half 1, the rest to half 2.

    Args:
      labels: ``(N,)`` condition label per cell.
      seed: the seed (42 in DbD).

    Returns:
      ``(N,)`` int8 array of 1/2.
    """
    labels = np.asarray(labels, dtype=object)
    codes, uniques = pd.factorize(labels, use_na_sentinel=False)
    rs = np.random.RandomState(seed)
    half = np.zeros(labels.shape[0], dtype=np.int8)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    for c in range(len(uniques)):
        idx = order[bounds[c] : bounds[c + 1]].copy()
        rs.shuffle(idx)
        k = idx.size // 2
        half[idx[:k]] = 1
        half[idx[k:]] = 2
    return half


# ----------------------------------------------------------------- chunk reader
def _is_backed_sparse(X) -> bool:
    return type(X).__name__ in ("CSRDataset", "CSCDataset", "_CSRDataset", "_CSCDataset") or (
        hasattr(X, "format") and hasattr(X, "to_memory") and not sp.issparse(X)
    )


@dataclasses.dataclass(frozen=True)
class _CSRView:
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


def _is_csr(chunk) -> bool:
    return isinstance(chunk, _CSRView) or sp.issparse(chunk)


def _csr_rows(X, start: int, stop: int, dtype=np.float64) -> _CSRView:
    """Rows ``start:stop`` of an in-memory CSR matrix, zero-copy.

    ``data`` is converted to ``dtype`` only when it differs (``None``: as stored);
    ``indptr`` is rebased (``O(rows)``).
    """
    ip = X.indptr
    a, b = int(ip[start]), int(ip[stop])
    indptr = ip[start : stop + 1] - ip[start]
    data = X.data[a:b] if dtype is None else np.asarray(X.data[a:b], dtype=dtype)
    return _CSRView(data, X.indices[a:b], indptr, (stop - start, X.shape[1]))


def _f64(x) -> np.float64:
    """A reported value as float64 (what the values are converted to for the sums)."""
    return np.float64(x)


def _in_memory_csr(X):
    """``X`` as in-memory CSR when it is an in-memory sparse matrix, else None.

    CSC is converted once (row slices of CSC cost ``O(nnz)`` each; the conversion costs
    ``O(nnz)`` memory, never dense); duplicate entries are summed once.
    """
    if not sp.issparse(X):
        return None
    if X.format != "csr":
        X = X.tocsr() if X.format == "csc" else sp.csr_matrix(X)
    if not _sorted_unique(X.indptr, X.indices):
        X = X.copy()
        X.sum_duplicates()
    return X


def _sorted_unique(indptr: np.ndarray, indices: np.ndarray, block: int = 1 << 20) -> bool:
    """True when column indices strictly increase within every row (so no duplicates).

    SciPy's ``has_canonical_format`` in blocks of NumPy operations (about 3x faster).
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


def _iter_chunks(
    X, chunk_cells: int, rows: tuple[int, int] | None = None, *, views: bool = False
) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(start, stop, chunk)`` with chunk a float64 ndarray or canonical CSR.

    ``rows = (first, last)`` restricts the pass to cells ``first … last - 1``. Chunks of an
    in-memory matrix share memory with it where possible (float64 data is not copied):
    treat them as read-only. ``views=True`` yields in-memory CSR rows as :class:`_CSRView`
    (what :func:`group_stats` consumes) instead of SciPy matrices.
    """
    first, n = (0, X.shape[0]) if rows is None else rows
    csr = _in_memory_csr(X)
    if csr is None and _is_backed_sparse(X) and getattr(X, "format", "csr") == "csc":
        warnings.warn(
            "backed CSC matrix: row chunks are slow; store X as CSR for streaming",
            stacklevel=3,
        )
    for start in range(first, n, chunk_cells):
        stop = min(start + chunk_cells, n)
        if csr is not None:
            chunk = _csr_rows(csr, start, stop)
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


def _chunk_values(chunk) -> np.ndarray:
    return chunk.data if _is_csr(chunk) else chunk.ravel()


def _locate(chunk, bad_flat: np.ndarray) -> tuple[int, int]:
    """(row, col) within the chunk of the first True in the value-array mask."""
    k = int(np.flatnonzero(bad_flat)[0])
    if _is_csr(chunk):
        row = int(np.searchsorted(chunk.indptr, k, side="right") - 1)
        return row, int(chunk.indices[k])
    return divmod(k, chunk.shape[1])


def _normalize_chunk(chunk):
    """``ln(1 + 1e4·x/Σ_g x)`` per row; rows with zero total stay zero."""
    if isinstance(chunk, _CSRView):
        # SciPy's ``csr.sum(axis=1)``: reduceat over the non-empty rows
        totals = np.zeros(chunk.shape[0])
        nonempty = np.flatnonzero(np.diff(chunk.indptr))
        if nonempty.size:
            totals[nonempty] = np.add.reduceat(chunk.data, chunk.indptr[nonempty])
    else:
        totals = np.asarray(chunk.sum(axis=1)).ravel()
    with np.errstate(divide="ignore"):
        scale = np.where(totals > 0, TARGET_SUM / totals, 0.0)
    if _is_csr(chunk):
        view = isinstance(chunk, _CSRView)
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


#: non-zeros per scatter block of :func:`_add_group_sums` (keeps its temporaries in cache)
_SCATTER_NNZ = 1 << 20


def _add_group_sums(S: np.ndarray, SS: np.ndarray, codes: np.ndarray, chunk) -> None:
    """``S[c] += Σ_{i: codes_i = c} x_i`` and ``SS[c] += Σ x_i²`` for one chunk, in place.

    A CSR chunk (canonical: no duplicate entries) is scattered non-zero by non-zero into
    the flat accumulators with ``np.add.at`` (``O(nnz)``, no indicator product, no
    intermediate ``(groups × G)`` matrix); a dense chunk goes through a sparse one-hot
    indicator product. Float64 throughout; each cell is added in dataset order.
    """
    n_acc, G = S.shape
    m = chunk.shape[0]
    if not _is_csr(chunk):
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


#: non-zeros gathered per block of :func:`_grouped_sums`
_GROUP_BLOCK_NNZ = 1 << 21


def _grouped_sums(
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
            rows = _CSRView(d, ix, cum[r0 : r1 + 1] - cum[r0], (r1 - r0, G))
            d = _normalize_chunk(rows).data
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


# ----------------------------------------------------------------- main entry
def _obs_labels(adata, col: str, what: str) -> np.ndarray:
    if col not in adata.obs.columns:
        raise VcjaxInputError(
            f"{what} column {col!r} not in adata.obs; available: {_preview(adata.obs.columns, 20)}"
        )
    values = adata.obs[col]
    if values.isna().any():
        bad = adata.obs_names[np.flatnonzero(values.isna().to_numpy())[0]]
        raise VcjaxInputError(f"{what} column {col!r} has missing values (e.g. cell {bad!r})")
    return np.asarray(values.astype(str), dtype=object)


def group_stats(
    adata,
    key: str,
    *,
    control: str | None,
    layer: str | None = None,
    normalize: str | None = "auto",
    covariate: str | None = None,
    split: str | np.ndarray | None = None,
    chunk_cells: int = 16384,
    min_cells: int = 2,
    drop_small: bool = False,
    progress: bool = False,
    rows: tuple[int, int] | None = None,
) -> GroupStats | SplitStats:
    """Per-condition ``(n, Σx, Σx²)`` in one streaming pass over the cells.

    Args:
      adata: AnnData, in memory (dense ndarray, CSR, CSC) or backed (``backed="r"``).
      key: ``obs`` column holding the condition label.
      control: the control label (must occur in ``obs[key]``); ``None`` for no control.
      layer: read ``adata.layers[layer]`` instead of ``X``.
      normalize: ``"auto"``: if every value is a non-negative integer (raw counts), apply
        ``ln(1 + 1e4·x/Σ_g x)`` per cell, else use values as they are; ``"log1p_cp10k"``:
        always normalise (counts must be non-negative); ``None``/``"none"``: trust input.
      covariate: ``obs`` column (e.g. ``cell_type``); groups become (covariate, condition)
        pairs and each covariate must contain the control.
      split: technical-duplicate halves: an ``obs`` column name or an ``(N,)`` array of 1/2
        (e.g. :func:`split_halves`). Returns :class:`SplitStats` then.
      chunk_cells: rows per chunk (memory is ``O(chunk_cells × G)`` dense or the chunk's nnz).
      min_cells: groups with fewer cells raise (or are dropped when ``drop_small``).
      drop_small: drop small groups with a warning instead of raising.
      progress: show a rich progress bar over chunks.
      rows: ``(first, last)``: accumulate the sums over cells ``first … last - 1`` only,
        while groups, counts ``n`` and validation use all cells. For multi-host use
        (:func:`vcjax.distributed.group_stats_distributed`): each process reads its slice
        and the sums are added across processes.

    Returns:
      :class:`GroupStats` (groups in order of first appearance), or :class:`SplitStats`.

    Raises:
      VcjaxInputError: missing columns/labels, empty data, duplicated genes, NaN/inf,
        negative values where counts are expected, too-small groups, inconsistent values.
    """
    if adata is None or adata.n_obs == 0 or adata.n_vars == 0:
        shape = None if adata is None else adata.shape
        raise VcjaxInputError(f"empty AnnData (shape {shape})")
    if normalize == "none":
        normalize = None
    if normalize not in ("auto", "log1p_cp10k", None):
        raise VcjaxInputError(f"normalize must be 'auto', 'log1p_cp10k' or None, got {normalize!r}")
    if chunk_cells < 1:
        raise VcjaxInputError(f"chunk_cells must be >= 1, got {chunk_cells}")

    genes = tuple(str(g) for g in adata.var_names)
    if len(set(genes)) != len(genes):
        dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
        raise VcjaxInputError(
            f"duplicated gene names in var_names: {_preview(dup)}; call adata.var_names_make_unique()"
        )
    cells = adata.obs_names

    labels = _obs_labels(adata, key, "condition")
    if control is not None and not np.any(labels == control):
        raise VcjaxInputError(
            f"control label {control!r} not found in obs[{key!r}]; labels present: "
            f"{_preview(pd.unique(labels), 8)}"
        )
    if covariate is not None:
        cov = _obs_labels(adata, covariate, "covariate")
        pairs = pd.MultiIndex.from_arrays([cov, labels])
        codes, uniq = pd.factorize(pairs)
        g_cov = tuple(str(c) for c, _ in uniq)
        g_names = tuple(str(nm) for _, nm in uniq)
        if control is not None:
            for cv in dict.fromkeys(g_cov):
                if not any(c == cv and nm == control for c, nm in zip(g_cov, g_names, strict=True)):
                    raise VcjaxInputError(
                        f"covariate {covariate}={cv!r} has no control cells ({control!r})"
                    )
    else:
        codes, uniq = pd.factorize(labels)
        g_names = tuple(str(x) for x in uniq)
        g_cov = None
    codes = np.asarray(codes, dtype=np.int64)
    C = len(g_names)

    if split is not None:
        if isinstance(split, str):
            if split not in adata.obs.columns:
                raise VcjaxInputError(
                    f"split column {split!r} not in adata.obs; available: {_preview(adata.obs.columns, 20)}"
                )
            half = np.asarray(adata.obs[split])
        else:
            half = np.asarray(split)
        if half.shape != (adata.n_obs,):
            raise VcjaxInputError(f"split has shape {half.shape}, expected ({adata.n_obs},)")
        try:
            half = half.astype(np.int64)
        except (TypeError, ValueError) as exc:
            raise VcjaxInputError(f"split values must be 1 or 2: {exc}") from exc
        bad = ~np.isin(half, (1, 2))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise VcjaxInputError(f"split values must be 1 or 2; cell {cells[i]!r} has {half[i]!r}")
        # accumulator rows: half 1 of every group, then half 2 (two contiguous blocks)
        acc_codes = (half - 1) * C + codes
        n_acc = 2 * C
    else:
        acc_codes = codes
        n_acc = C

    # Group sizes and the min_cells rule (before reading any value).
    n_full = np.bincount(codes, minlength=C).astype(np.int64)
    small = np.flatnonzero(n_full < min_cells)
    keep = np.ones(C, dtype=bool)
    if small.size:
        desc = [
            (f"{g_cov[i]}/" if g_cov is not None else "") + f"{g_names[i]} ({n_full[i]})"
            for i in small
        ]
        if not drop_small:
            raise VcjaxInputError(
                f"{small.size} group(s) have fewer than min_cells={min_cells} cells: "
                f"{_preview(desc)}; pass drop_small=True to drop them"
            )
        if control is not None and any(g_names[i] == control for i in small):
            raise VcjaxInputError(
                f"control group {control!r} has fewer than min_cells={min_cells} cells"
            )
        warnings.warn(
            f"dropping {small.size} group(s) with fewer than {min_cells} cells: {_preview(desc)}",
            stacklevel=2,
        )
        keep[small] = False

    if layer is not None and layer not in adata.layers:
        raise VcjaxInputError(f"layer {layer!r} not found; layers: {_preview(list(adata.layers))}")
    X = adata.layers[layer] if layer is not None else adata.X
    if X is None:
        raise VcjaxInputError("adata.X is None; pass layer=")
    G = len(genes)
    if X.shape != (adata.n_obs, G):
        raise VcjaxInputError(f"matrix shape {X.shape} != AnnData shape {adata.shape}")

    S = np.zeros((n_acc, G), dtype=np.float64)
    SS = np.zeros((n_acc, G), dtype=np.float64)
    mode: str | None = {"log1p_cp10k": "log1p_cp10k", None: "none"}.get(normalize)
    decided_at = None
    if rows is not None:
        first, last = int(rows[0]), int(rows[1])
        if not 0 <= first <= last <= adata.n_obs:
            raise ValueError(f"rows {rows} outside 0..{adata.n_obs}")
        rows = (first, last)
    n_chunks = -(-((rows[1] - rows[0]) if rows else adata.n_obs) // chunk_cells)

    def check(start: int, chunk) -> None:
        """Validate one chunk (dataset order) and decide ``normalize="auto"``."""
        nonlocal mode, decided_at
        vals = _chunk_values(chunk)
        finite = np.isfinite(vals)
        if not finite.all():
            r, c = _locate(chunk, ~finite)
            raise VcjaxInputError(
                f"non-finite value {_f64(vals[~finite][0])} at gene {genes[c]!r}, cell {cells[start + r]!r}"
            )
        if mode is None or mode == "log1p_cp10k":
            neg = vals < 0
            is_counts = (not neg.any()) and bool(np.all(vals == np.floor(vals)))
            if mode is None and neg.any() and bool(np.all(vals == np.floor(vals))):
                # integers with negative entries: corrupted counts, not log-normalised data
                r, c = _locate(chunk, neg)
                raise VcjaxInputError(
                    f"negative value {_f64(vals[neg][0])} at gene {genes[c]!r}, cell "
                    f"{cells[start + r]!r} in integer-valued data (raw counts must be >= 0)"
                )
            if mode is None:  # auto, undecided
                if vals.size and np.any(vals != 0):
                    mode = "log1p_cp10k" if is_counts else "none"
                    decided_at = start
                    logger.info(
                        "group_stats: values %s; normalization=%s",
                        "look like raw counts" if is_counts else "are not raw counts",
                        mode,
                    )
            elif normalize == "auto" and mode == "log1p_cp10k" and not is_counts:
                bad = neg | (vals != np.floor(vals))
                r, c = _locate(chunk, bad)
                raise VcjaxInputError(
                    f"normalize='auto': cells before {cells[decided_at]!r} onward looked like raw "
                    f"counts but gene {genes[c]!r}, cell {cells[start + r]!r} has "
                    f"{_f64(vals[bad][0])!r}; pass normalize=None or 'log1p_cp10k' explicitly"
                )
            if mode == "log1p_cp10k" and neg.any():
                r, c = _locate(chunk, neg)
                raise VcjaxInputError(
                    f"negative value {_f64(vals[neg][0])} at gene {genes[c]!r}, cell "
                    f"{cells[start + r]!r}; counts are expected when normalising"
                )

    csr = _in_memory_csr(X)
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        task = bar.add_task(f"group_stats [{key}]", total=n_chunks * (2 if csr is not None else 1))
        bar.start()
    try:
        if csr is not None:
            # In memory: validate in dataset order (views, no copies), then accumulate the
            # cells group by group (cache-friendly, see _grouped_sums).
            first, last = rows if rows is not None else (0, adata.n_obs)
            raw = None if csr.data.dtype.kind in "fiu" else np.float64  # checks on stored values
            for start in range(first, last, chunk_cells):
                stop = min(start + chunk_cells, last)
                check(start, _csr_rows(csr, start, stop, dtype=raw))
                if bar is not None:
                    bar.update(task, advance=1)
            advance = None if bar is None else (lambda k: bar.update(task, advance=k / chunk_cells))
            _grouped_sums(
                csr,
                acc_codes,
                S,
                SS,
                (first, last),
                normalise=mode == "log1p_cp10k",
                advance=advance,
            )
        else:
            for start, stop, chunk in _iter_chunks(X, chunk_cells, rows, views=True):
                check(start, chunk)
                if mode == "log1p_cp10k":
                    chunk = _normalize_chunk(chunk)
                _add_group_sums(S, SS, acc_codes[start:stop], chunk)
                if bar is not None:
                    bar.update(task, advance=1)
    finally:
        if bar is not None:
            bar.stop()
    if mode is None:  # auto and every value was zero
        mode = "none"
        logger.info("group_stats: all values are zero; normalization=none")

    def make(n, s, ss) -> GroupStats:
        idx = np.flatnonzero(keep)
        names = tuple(g_names[i] for i in idx)
        if not keep.all():  # else keep the (contiguous) accumulators as they are
            s, ss = s[idx], ss[idx]
        return GroupStats(
            names=names,
            genes=genes,
            n=np.asarray(n, dtype=np.int64)[idx],
            sum=s,
            sumsq=ss,
            control=control if control in names else None,
            covariate=None if g_cov is None else tuple(g_cov[i] for i in idx),
            normalization=mode,
        )

    if split is None:
        return make(n_full, S, SS)
    n_acc_counts = np.bincount(acc_codes, minlength=n_acc).astype(np.int64)
    return SplitStats(
        half1=make(n_acc_counts[:C], S[:C], SS[:C]),
        half2=make(n_acc_counts[C:], S[C:], SS[C:]),
    )


# --------------------------------------------------------------- derived views
def pseudobulk(stats: GroupStats) -> np.ndarray:
    """``(C, G)`` per-group means ``μ_c = Σ_{i∈S_c} x_i / n_c`` (METRICS.md §1)."""
    return stats.mean


def reference_vector(stats: GroupStats, reference: str | Any = "perturbed") -> np.ndarray:
    """The Δ reference vector ``(G,)`` (METRICS.md §2).

    Args:
      stats: group statistics of one covariate (use :meth:`GroupStats.for_covariate`).
      reference:
        ``"perturbed"`` (default, DbD ``u_ALL``): mean over all conditions of the
        per-condition means, control included as one condition;
        ``"perturbed_no_control"``: the same without control;
        ``"perturbed_cells"``: mean over all non-control cells;
        ``"control"``: ``u_NTC``, the control mean;
        or an explicit ``(G,)`` array.

    Returns:
      ``(G,)`` float64.
    """
    if stats.covariate is not None and len(stats.covariate_values()) > 1:
        raise VcjaxInputError(
            f"reference_vector: stats span {len(stats.covariate_values())} covariates "
            f"({_preview(stats.covariate_values())}); call stats.for_covariate(value) first"
        )
    G = stats.n_genes
    if not isinstance(reference, str):
        ref = np.asarray(reference, dtype=np.float64)
        if ref.shape != (G,):
            raise VcjaxInputError(f"reference array has shape {ref.shape}, expected ({G},)")
        if not np.all(np.isfinite(ref)):
            raise VcjaxInputError("reference array contains NaN or inf")
        return ref
    is_ctrl = np.array([nm == stats.control for nm in stats.names], dtype=bool)
    if reference == "perturbed":
        return stats.mean.mean(axis=0)
    if reference == "perturbed_no_control":
        if not (~is_ctrl).any():
            raise VcjaxInputError("reference 'perturbed_no_control': no perturbed groups")
        return stats.mean[~is_ctrl].mean(axis=0)
    if reference == "perturbed_cells":
        n = stats.n[~is_ctrl].sum()
        if n == 0:
            raise VcjaxInputError("reference 'perturbed_cells': no perturbed cells")
        return stats.sum[~is_ctrl].sum(axis=0) / n
    if reference == "control":
        if stats.control is None:
            raise VcjaxInputError("reference 'control': stats have no control group")
        return stats.mean[stats.index(stats.control)]
    raise VcjaxInputError(
        f"unknown reference {reference!r}; use 'perturbed', 'perturbed_no_control', "
        "'perturbed_cells', 'control' or a (G,) array"
    )
