"""On which scale are a matrix's values? Evidence from a sample of rows, and a verdict.

A prediction scored on another scale than the truth gives numbers that look like numbers
(a median R²w of −15) and mean nothing. :func:`scale_evidence` reads a few blocks of rows of
any matrix (dense, in-memory sparse or backed; never the whole matrix at once) and records
what its values look like; :func:`compare_scales` says, in one line naming that evidence,
when two matrices cannot be on the same scale.

The evidence and what it tells:

* **integers**: ``frac_integer``, the share of the non-zero values that are whole numbers.
  Raw counts are all integers (≥ 98 % with ``max ≥ 2``: ``"counts"``); normalised data
  almost never is.
* **range**: ``max``. ``log1p`` of per-cell-normalised counts stays below ``log1p(1e6) ≈
  13.8`` even at a CPM target sum; linear (CP10k, CPM) values and raw counts reach hundreds
  or thousands. ``max > 20`` (:data:`LOG_MAX`) without integers: ``"linear"``.
* **sign**: ``negative_share = Σ|x⁻| / Σ|x|``. z-scored or centred data (and Δ/log-fold
  predictions) have about as much negative mass as positive (≈ 0.5); a log-scale model's
  noise around zero a few percent at most. ``≥ 0.2`` (:data:`CENTRED_SHARE`):
  ``"centred"``.
* **per-row totals** (cells only: a pseudobulk mean has no per-cell total):
  ``total_spread`` and ``expm1_total_spread``, the coefficients of variation of the row
  sums of ``x`` and of ``expm1(x)``. Counts normalised per cell (no log) have constant row
  sums (``"linear"`` whatever the range); ``log1p`` of them has constant ``expm1`` sums
  (``"log1p"``), when the genes are the whole transcriptome that was normalised.

Otherwise (non-negative, not integers, ``max ≤ 20``) the kind is ``"log1p"``; all-zero
samples are ``"unknown"``. Scales are compared by family: ``counts`` and ``linear`` are both
linear-scale, ``log1p`` is log-scale, ``centred`` is neither; a matrix that vcjax normalised
(``normalization="log1p_cp10k"``) is compared as ``log1p``. Limitation: raw-count means of a
shallow screen (every gene's mean below 20) are not told apart from log1p means.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import scipy.sparse as sp

from vcjax.data._read import csr_row_block

__all__ = [
    "CENTRED_SHARE",
    "KINDS",
    "LOG_MAX",
    "ScaleEvidence",
    "compare_scales",
    "scale_evidence",
]

#: the kinds :func:`scale_evidence` infers
KINDS = ("counts", "log1p", "linear", "centred", "unknown")
#: the largest value a log1p-normalised matrix plausibly holds
LOG_MAX = 20.0
#: the negative share of the mass from which values are centred (z-scored, Δ, log-fold)
CENTRED_SHARE = 0.2
#: share of integer non-zero values from which values are raw counts
COUNTS_INTEGER = 0.98
#: coefficient of variation of the row totals below which the totals are constant
CONSTANT_TOTAL = 1e-3

_FAMILY = {"counts": "linear", "linear": "linear", "log1p": "log", "centred": "centred"}
_LABEL = {
    "counts": "raw counts?",
    "linear": "linear scale, e.g. CP10k or counts means?",
    "log1p": "log1p-normalised",
    "centred": "z-scored or centred?",
    "unknown": "all zero",
}


@dataclasses.dataclass(frozen=True)
class ScaleEvidence:
    """What a sample of a matrix's rows looks like, and the scale inferred from it.

    Attributes:
      kind: ``"counts"``, ``"log1p"``, ``"linear"``, ``"centred"`` or ``"unknown"`` (of the
        values as given, before any normalisation).
      form: ``"cells"`` (one row per cell) or ``"pseudobulk"`` (one row per perturbation).
      max, min: the largest and smallest sampled value.
      frac_integer: the share of non-zero sampled values that are whole numbers (NaN: none).
      has_negative: whether a sampled value is below zero.
      negative_share: ``Σ|x⁻| / Σ|x|`` over the sample (NaN when all zero).
      total_spread: coefficient of variation of the row sums (NaN for pseudobulk rows).
      expm1_total_spread: the same of ``expm1(x)`` row sums (NaN for pseudobulk rows, or
        with negative or very large values).
      n_rows: rows sampled; ``n_total_rows``: rows of the matrix.
      normalization: what vcjax did to the values before scoring (``"none"`` or
        ``"log1p_cp10k"``).
    """

    kind: str
    form: str
    max: float
    min: float
    frac_integer: float
    has_negative: bool
    negative_share: float
    total_spread: float
    expm1_total_spread: float
    n_rows: int
    n_total_rows: int
    normalization: str = "none"

    @property
    def scored_kind(self) -> str:
        """The kind of the values that are scored (``"log1p"`` once vcjax normalised them)."""
        return "log1p" if self.normalization == "log1p_cp10k" else self.kind

    def summary(self) -> str:
        """The deciding evidence in a few words, e.g. ``"max 3,412 and 98% integers"``."""
        k = self.kind
        if k == "counts":
            return f"max {_num(self.max)} and {self.frac_integer:.0%} integers"
        if k == "centred":
            return f"min {_num(self.min)}, {self.negative_share:.0%} of the mass negative"
        if k == "linear" and self.max <= LOG_MAX:
            return f"max {_num(self.max)} with constant row totals"
        if k == "unknown":
            return "every sampled value 0"
        return f"max {_num(self.max)}"

    def describe(self) -> str:
        """The evidence, the scale it suggests and what vcjax did, e.g. ``"max 3,412 and 98%
        integers (raw counts?)"`` or ``"log1p-normalised by vcjax from raw counts (max 278
        and 100% integers)"``."""
        if self.normalization == "log1p_cp10k":
            return f"log1p-normalised by vcjax from raw counts ({self.summary()})"
        return f"{self.summary()} ({_LABEL[self.kind]})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields (NaN as None)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not np.isfinite(v):
                v = None
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScaleEvidence:
        """The inverse of :meth:`to_dict` (unknown keys ignored)."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in d.items():
            if k in names:
                kw[k] = float("nan") if v is None and names[k].type == "float" else v
        return cls(**kw)


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _row_blocks(n_rows: int, n_cols: int, max_values: int, n_blocks: int):
    """``(start, stop)`` of up to ``n_blocks`` row blocks spread over the matrix."""
    per = max(1, max_values // max(1, n_cols) // n_blocks)
    if n_rows <= per * n_blocks:
        return [(0, n_rows)]
    starts = np.linspace(0, n_rows - per, n_blocks).astype(np.int64)
    return [(int(s), int(s) + per) for s in starts]


def _block(X, a: int, b: int):
    """Rows ``a:b`` of ``X`` as a float64 ndarray or CSR matrix (no densifying of sparse).

    CSR rows, in memory or backed, are read directly (:func:`vcjax.data._read.csr_row_block`).
    """
    rows = csr_row_block(X, a, b)
    if rows is not None:
        return rows
    chunk = X[a:b]
    if sp.issparse(chunk):
        chunk = sp.csr_matrix(chunk, dtype=np.float64)
        chunk.sum_duplicates()
        return chunk
    if hasattr(chunk, "to_memory"):  # a backed sub-dataset
        return _block(chunk.to_memory(), 0, b - a)
    chunk = np.asarray(chunk, dtype=np.float64)
    return chunk.reshape(b - a, -1)


def scale_evidence(
    X,
    *,
    form: str = "cells",
    normalization: str = "none",
    max_values: int = 1 << 22,
    n_blocks: int = 16,
) -> ScaleEvidence:
    """The :class:`ScaleEvidence` of ``X`` from up to ``n_blocks`` blocks of rows.

    Args:
      X: ``(N, G)`` dense array, SciPy sparse matrix, or a backed AnnData matrix (h5py
        dataset or anndata's sparse dataset); any object with row slices ``X[a:b]``.
      form: ``"cells"`` or ``"pseudobulk"`` (per-row totals are only evidence for cells).
      normalization: what vcjax does to the values before scoring, recorded as given.
      max_values: matrix entries read at most (the blocks' rows × G); sparse blocks hold
        only their non-zeros.
      n_blocks: blocks of consecutive rows, spread evenly (cheap on backed files).

    Returns:
      The evidence and the inferred kind (module docstring).
    """
    if form not in ("cells", "pseudobulk"):
        raise ValueError(f"form must be 'cells' or 'pseudobulk', got {form!r}")
    sample = EvidenceSample(X.shape, form=form, max_values=max_values, n_blocks=n_blocks)
    for a, b in sample.ranges:
        sample.add(_block(X, a, b))
    return sample.evidence(normalization=normalization)


class EvidenceSample:
    """The rows :func:`scale_evidence` samples, and its evidence accumulated block by block.

    ``ranges`` are the row blocks of the sample; :meth:`add` takes them in order (each as a
    float64 ndarray or canonical float64 CSR matrix), or :meth:`feed` takes any row blocks
    of a pass over the whole matrix in order and keeps the sampled rows (so a streaming
    pass, :func:`vcjax.data.group_stats`, records the evidence without reading the sample
    again); :meth:`evidence` gives the :class:`ScaleEvidence`, the same as
    :func:`scale_evidence` of the matrix.
    """

    def __init__(self, shape, *, form: str = "cells", max_values: int = 1 << 22,
                 n_blocks: int = 16) -> None:  # fmt: skip
        self.n, self.G = int(shape[0]), int(shape[1])
        self.form = form
        self.ranges = _row_blocks(self.n, self.G, max_values, n_blocks)
        self.vmax, self.vmin = -np.inf, np.inf
        self.n_nonzero = self.n_int = 0
        self.neg_mass = self.abs_mass = 0.0
        self.totals: list[np.ndarray] = []
        self.e_totals: list[np.ndarray] = []
        self.e_ok = True
        self.n_read = 0
        self._next = 0  # the next range to complete
        self._pieces: list = []  # rows of that range seen so far

    @property
    def complete(self) -> bool:
        """Whether every sampled range has been added."""
        return self._next >= len(self.ranges)

    def feed(self, start: int, stop: int, rows) -> None:
        """Rows ``start:stop`` of a pass in row order: ``rows(a, b)`` gives rows ``a:b``
        (``start <= a < b <= stop``) as a float64 ndarray or canonical float64 CSR matrix
        that does not share memory with buffers the pass reuses."""
        while not self.complete:
            a, b = self.ranges[self._next]
            lo, hi = max(a, start), min(b, stop)
            if lo >= stop or hi <= lo:
                return
            if lo != a + sum(p.shape[0] for p in self._pieces):
                raise ValueError("EvidenceSample.feed: rows must come in order, each once")
            self._pieces.append(rows(lo - start, hi - start))
            if hi < b:
                return
            pieces, self._pieces = self._pieces, []
            if len(pieces) == 1:
                chunk = pieces[0]
            elif sp.issparse(pieces[0]):
                chunk = sp.vstack(pieces, format="csr")
            else:
                chunk = np.vstack(pieces)
            self.add(chunk)

    def add(self, chunk) -> None:
        """The next sampled range (``ranges[k]``), whole."""
        a, b = self.ranges[self._next]
        self._next += 1
        G = self.G
        self.n_read += b - a
        if sp.issparse(chunk):
            vals = chunk.data
            if vals.size < (b - a) * G:  # implicit zeros
                self.vmax, self.vmin = max(self.vmax, 0.0), min(self.vmin, 0.0)
            rows = np.asarray(chunk.sum(axis=1)).ravel()
        else:
            vals = chunk.ravel()
            rows = chunk.sum(axis=1)
        vals = vals[np.isfinite(vals)]
        if vals.size:
            self.vmax = max(self.vmax, float(vals.max()))
            self.vmin = min(self.vmin, float(vals.min()))
        nz = vals[vals != 0]
        self.n_nonzero += nz.size
        self.n_int += int(np.count_nonzero(nz == np.round(nz)))
        self.neg_mass += float(-nz[nz < 0].sum())
        self.abs_mass += float(np.abs(nz).sum())
        if self.form == "cells":
            self.totals.append(rows)
            if self.e_ok and (self.vmin < 0 or self.vmax > 50):
                self.e_ok = False
            if self.e_ok:
                ev = np.expm1(chunk.data) if sp.issparse(chunk) else np.expm1(chunk)
                if sp.issparse(chunk):
                    e = sp.csr_matrix((ev, chunk.indices, chunk.indptr), shape=chunk.shape)
                    self.e_totals.append(np.asarray(e.sum(axis=1)).ravel())
                else:
                    self.e_totals.append(ev.sum(axis=1))

    def evidence(self, *, normalization: str = "none") -> ScaleEvidence:
        """The :class:`ScaleEvidence` of the ranges added."""
        vmax, vmin = self.vmax, self.vmin
        if not np.isfinite(vmax):
            vmax = vmin = 0.0
        nnz = self.n_nonzero
        frac_int = self.n_int / nnz if nnz else float("nan")
        neg_share = self.neg_mass / self.abs_mass if self.abs_mass > 0 else float("nan")
        cells = self.form == "cells"
        spread = _spread(self.totals) if cells else float("nan")
        e_spread = _spread(self.e_totals) if (cells and self.e_ok) else float("nan")
        kind = _classify(vmax, frac_int, neg_share, spread, nnz)
        return ScaleEvidence(
            kind=kind,
            form=self.form,
            max=float(vmax),
            min=float(vmin),
            frac_integer=float(frac_int),
            has_negative=bool(vmin < 0),
            negative_share=float(neg_share),
            total_spread=float(spread),
            expm1_total_spread=float(e_spread),
            n_rows=int(self.n_read),
            n_total_rows=self.n,
            normalization=normalization,
        )


def _spread(parts: list[np.ndarray]) -> float:
    if not parts:
        return float("nan")
    t = np.concatenate(parts)
    t = t[t != 0]  # empty cells stay empty under any normalisation
    if t.size < 2:
        return float("nan")
    mean = t.mean()
    return float(t.std() / abs(mean)) if mean != 0 else float("nan")


def _classify(vmax: float, frac_int: float, neg_share: float, spread: float, nnz: int) -> str:
    if nnz == 0:
        return "unknown"
    if neg_share >= CENTRED_SHARE:
        return "centred"
    if frac_int >= COUNTS_INTEGER and vmax >= 2:
        return "counts"
    if vmax > LOG_MAX or (np.isfinite(spread) and spread < CONSTANT_TOTAL):
        return "linear"
    return "log1p"


def compare_scales(truth: ScaleEvidence, pred: ScaleEvidence) -> str | None:
    """One line naming the evidence when ``pred`` and ``truth`` are on different scales.

    Compares the scales that are scored (:attr:`ScaleEvidence.scored_kind`) by family:
    ``counts``/``linear`` (linear scale), ``log1p`` (log scale), ``centred``. Unknown
    (all-zero) samples never mismatch.

    Returns:
      e.g. ``"prediction max 3,412 and 98% integers (raw counts?) vs truth max 8.1
      (log1p-normalised)"``, or None when the scales agree.
    """
    ft, fp = _FAMILY.get(truth.scored_kind), _FAMILY.get(pred.scored_kind)
    if ft is None or fp is None or ft == fp:
        return None
    return f"prediction {pred.describe()} vs truth {truth.describe()}"
