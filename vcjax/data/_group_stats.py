"""Per-condition sufficient statistics in one streaming pass, and the technical-duplicate split.

:func:`group_stats` reads a dense, CSR, CSC or *backed* AnnData once in row chunks and
returns the per-condition cell counts, sums and sums of squares (float64), optionally for
the two halves of a split (:func:`split_halves`). A sparse matrix is never densified; the
cost is ``O(nnz)``. Raw counts are normalised on the fly (``normalize="auto"``, docs/metrics.md
§1). Every input problem raises :class:`vcjax.VcjaxInputError` with a one-line message that
names the culprit (gene, cell, label, column or option).

References:
  docs/metrics.md §1–§3 (DbD, Mejia, Miller et al., arXiv:2506.22641); scanpy 1.11
  ``tl.rank_genes_groups`` for the variance convention.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from vcjax._errors import VcjaxInputError, preview
from vcjax.data._read import (
    _READ_NNZ,
    Scratch,
    add_group_sums,
    add_grouped,
    as_f64,
    chunk_values,
    csr_source,
    iter_chunks,
    locate,
    normalize_chunk,
)
from vcjax.data._scale import EvidenceSample
from vcjax.data._stats import GroupStats, SplitStats

__all__ = ["group_stats", "split_halves", "obs_labels"]

logger = logging.getLogger("vcjax")


def split_halves(labels: Sequence[str] | np.ndarray, *, seed: int = 42) -> np.ndarray:
    """The DbD technical-duplicate split (docs/metrics.md §2).

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


def obs_labels(adata, col: str, what: str) -> np.ndarray:
    """``adata.obs[col]`` as an object array of strings; a missing column or value raises."""
    if col not in adata.obs.columns:
        raise VcjaxInputError(
            f"{what} column {col!r} not in adata.obs; available: {preview(adata.obs.columns, 20)}"
        )
    values = adata.obs[col]
    if values.isna().any():
        bad = adata.obs_names[np.flatnonzero(values.isna().to_numpy())[0]]
        raise VcjaxInputError(f"{what} column {col!r} has missing values (e.g. cell {bad!r})")
    return np.asarray(values.astype(str), dtype=object)


def _all_integer(vals: np.ndarray, piece: int = 1 << 20) -> bool:
    """Whether every (finite) value is a whole number; stops at the first piece that is not
    (log-normalised data is told from its first values)."""
    if vals.dtype.kind in "biu":
        return True
    for a in range(0, vals.size, piece):
        p = vals[a : a + piece]
        if not np.array_equal(np.floor(p), p):
            return False
    return True


class _ChunkValidator:
    """Checks the chunks of one pass in dataset order and decides ``normalize="auto"``.

    State: ``mode`` is None while ``"auto"`` is undecided (every value seen so far was 0),
    then ``"log1p_cp10k"`` (raw counts) or ``"none"``; ``decided_at`` is the first cell of
    the chunk that decided it. Raises on NaN/inf, on negative integers (corrupted counts),
    on negative values where counts are normalised, and when ``"auto"`` decided "counts"
    but a later chunk holds non-integers.
    """

    def __init__(self, normalize: str | None, genes: Sequence[str], cells) -> None:
        self.auto = normalize == "auto"
        self.mode: str | None = {"log1p_cp10k": "log1p_cp10k", None: "none"}.get(normalize)
        self.decided_at: int | None = None
        self.genes, self.cells = genes, cells

    def _where(self, chunk, start: int, bad: np.ndarray) -> str:
        r, c = locate(chunk, bad)
        return f"gene {self.genes[c]!r}, cell {self.cells[start + r]!r}"

    def __call__(self, start: int, chunk) -> None:
        """Check one chunk (cells ``start …``) in dataset order.

        Any run of consecutive cells can be checked once the mode is decided; while
        ``"auto"`` is undecided, pass whole chunks of ``chunk_cells`` cells (the decision
        is per chunk). The common case costs two reductions (min and max) per chunk: the
        masks that name a culprit are computed only to raise.
        """
        vals = chunk_values(chunk)
        lo = hi = 0.0
        if vals.size:
            lo, hi = vals.min(), vals.max()  # NaN propagates; ±inf shows in one of them
            if not (np.isfinite(lo) and np.isfinite(hi)):
                bad = ~np.isfinite(vals)
                raise VcjaxInputError(
                    f"non-finite value {as_f64(vals[bad][0])} at {self._where(chunk, start, bad)}"
                )
        if self.mode == "none":
            return
        has_neg = bool(lo < 0)
        if self.mode is None:  # auto, undecided
            integer = _all_integer(vals)
            if has_neg and integer:
                neg = vals < 0
                raise VcjaxInputError(
                    f"negative value {as_f64(vals[neg][0])} at {self._where(chunk, start, neg)} "
                    "in integer-valued data (raw counts must be >= 0)"
                )
            if lo != 0 or hi != 0:
                counts = integer and not has_neg
                self.mode = "log1p_cp10k" if counts else "none"
                self.decided_at = start
                logger.info(
                    "group_stats: values %s; normalization=%s",
                    "look like raw counts" if counts else "are not raw counts",
                    self.mode,
                )
            return
        # mode == "log1p_cp10k"
        if self.auto and (has_neg or not _all_integer(vals)):
            bad = (vals < 0) | (vals != np.floor(vals))
            raise VcjaxInputError(
                f"normalize='auto': cells before {self.cells[self.decided_at]!r} onward looked "
                f"like raw counts but {self._where(chunk, start, bad)} has "
                f"{as_f64(vals[bad][0])!r}; pass normalize=None or 'log1p_cp10k' explicitly"
            )
        if has_neg:
            neg = vals < 0
            raise VcjaxInputError(
                f"negative value {as_f64(vals[neg][0])} at {self._where(chunk, start, neg)}; "
                "counts are expected when normalising"
            )

    def settles(self, start: int, part) -> bool:
        """Decide ``"auto"`` from the first cells of an undecided chunk when they suffice.

        A finite non-integer value anywhere in a chunk makes it "not raw counts", whatever
        the rest holds: when ``part`` (the chunk's first cells) has one, the mode becomes
        ``"none"`` (decided at ``start``) and the rest of the chunk need not be held to
        decide. Returns whether it did; non-finite values raise as in :meth:`__call__`.
        """
        if self.mode is not None:
            return True
        vals = chunk_values(part)
        if not vals.size:
            return False
        lo, hi = vals.min(), vals.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            self(start, part)  # raises, naming the culprit
        if _all_integer(vals):
            return False
        self.mode, self.decided_at = "none", start
        logger.info("group_stats: values are not raw counts; normalization=none")
        return True

    def normalization(self) -> str:
        """What was done: ``"log1p_cp10k"`` or ``"none"`` (all-zero ``"auto"`` data: none)."""
        if self.mode is None:
            logger.info("group_stats: all values are zero; normalization=none")
            return "none"
        return self.mode


def _accumulate(X, codes, n_acc: int, check, cells, *, chunk_cells: int, sumsq: bool, advance):
    """``(S, SS, sample)``: the float64 sums (and sums of squares, None unless ``sumsq``) of
    the cells ``cells[0] … cells[1] - 1`` per accumulator row ``codes``, checked by ``check``
    in dataset order on the way, and the scale evidence's sample
    (:class:`~vcjax.data._scale.EvidenceSample`) taken from the same blocks when the pass
    covers every cell (else None).

    A CSR matrix, in memory or backed (:func:`vcjax.data._read.csr_source`), is read once
    in row blocks of about :data:`~vcjax.data._read._READ_NNZ` non-zeros (whole chunks of
    ``chunk_cells`` cells while ``normalize="auto"`` is undecided) that are checked,
    normalised and added group by group (:func:`~vcjax.data._read.add_grouped`) before the
    next is read; a dense or backed CSC matrix goes chunk by chunk through
    :func:`~vcjax.data._read.add_group_sums`. Both give every sum the same float64
    additions in dataset order.
    """
    from concurrent.futures import ThreadPoolExecutor

    first, last = cells
    G = X.shape[1]
    # zeroed here, by this thread, rather than as lazy zero pages (``np.zeros``): the pool
    # thread that adds S would otherwise fault its pages in while this one faults SS's,
    # and the first block's additions ran ~10x slower (~50 ms of a 0.14 s pass)
    S = np.empty((n_acc, G), dtype=np.float64)
    S.fill(0)
    SS = None
    if sumsq:
        SS = np.empty((n_acc, G), dtype=np.float64)
        SS.fill(0)
    sample = EvidenceSample(X.shape) if (first, last) == (0, X.shape[0]) else None
    src = csr_source(X)
    if src is None:
        for start, stop, chunk in iter_chunks(X, chunk_cells, (first, last), views=True):
            check(start, chunk)
            if sample is not None:
                sample.feed(start, stop, lambda a, b, c=chunk: c[a:b].copy())
            if check.mode == "log1p_cp10k":
                chunk = normalize_chunk(chunk)
            add_group_sums(S, SS, codes[start:stop], chunk)
            if advance is not None:
                advance(stop - start)
        return S, SS, sample
    scratch = Scratch()
    with ThreadPoolExecutor(max_workers=1) as pool:
        start = first
        while start < last:
            if check.mode is None:  # undecided: the decision is per chunk of chunk_cells
                end = min(start + chunk_cells, last)
                stop = src.stop_for(start, end, _READ_NNZ)
                block = src.rows(start, stop, scratch)
                if stop < end and not check.settles(start, block):
                    # no non-integer in the chunk's first block: the decision needs it all
                    stop = end
                    block = src.rows(start, stop, scratch)
            else:
                stop = src.stop_for(start, last, _READ_NNZ)
                block = src.rows(start, stop, scratch)
            check(start, block)
            if sample is not None:
                sample.feed(start, stop, block.copy_rows)
            add_grouped(
                S, SS, codes[start:stop], block,
                normalise=check.mode == "log1p_cp10k", pool=pool if sumsq else None,
                scratch=scratch,
            )  # fmt: skip
            if advance is not None:
                advance(stop - start)
            start = stop
    return S, SS, sample


def _groups(adata, key: str, control: str | None, covariate: str | None):
    """Per-cell group codes, and per group its condition name and covariate value."""
    labels = obs_labels(adata, key, "condition")
    if control is not None and not np.any(labels == control):
        raise VcjaxInputError(
            f"control label {control!r} not found in obs[{key!r}]; labels present: "
            f"{preview(pd.unique(labels), 8)}"
        )
    if covariate is None:
        codes, uniq = pd.factorize(labels)
        return np.asarray(codes, dtype=np.int64), tuple(str(x) for x in uniq), None
    cov = obs_labels(adata, covariate, "covariate")
    codes, uniq = pd.factorize(pd.MultiIndex.from_arrays([cov, labels]))
    g_cov = tuple(str(c) for c, _ in uniq)
    g_names = tuple(str(nm) for _, nm in uniq)
    if control is not None:
        for cv in dict.fromkeys(g_cov):
            if not any(c == cv and nm == control for c, nm in zip(g_cov, g_names, strict=True)):
                raise VcjaxInputError(
                    f"covariate {covariate}={cv!r} has no control cells ({control!r})"
                )
    return np.asarray(codes, dtype=np.int64), g_names, g_cov


def _halves(adata, split: str | np.ndarray) -> np.ndarray:
    """The per-cell half (1 or 2) from an ``obs`` column name or an array."""
    if isinstance(split, str):
        if split not in adata.obs.columns:
            raise VcjaxInputError(
                f"split column {split!r} not in adata.obs; available: {preview(adata.obs.columns, 20)}"
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
        raise VcjaxInputError(
            f"split values must be 1 or 2; cell {adata.obs_names[i]!r} has {half[i]!r}"
        )
    return half


def _kept_groups(
    n: np.ndarray,
    names: Sequence[str],
    cov: Sequence[str] | None,
    control: str | None,
    *,
    min_cells: int,
    drop_small: bool,
) -> np.ndarray:
    """``(C,)`` bool: the groups with at least ``min_cells`` cells (the others raise, or are
    dropped with a warning when ``drop_small``)."""
    small = np.flatnonzero(n < min_cells)
    keep = np.ones(n.size, dtype=bool)
    if not small.size:
        return keep
    desc = [(f"{cov[i]}/" if cov is not None else "") + f"{names[i]} ({n[i]})" for i in small]
    if not drop_small:
        raise VcjaxInputError(
            f"{small.size} group(s) have fewer than min_cells={min_cells} cells: "
            f"{preview(desc)}; pass drop_small=True to drop them"
        )
    if control is not None and any(names[i] == control for i in small):
        raise VcjaxInputError(
            f"control group {control!r} has fewer than min_cells={min_cells} cells"
        )
    warnings.warn(
        f"dropping {small.size} group(s) with fewer than {min_cells} cells: {preview(desc)}",
        stacklevel=3,
    )
    keep[small] = False
    return keep


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
    sumsq: bool = True,
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
      sumsq: accumulate the sums of squares; False (means only, e.g. pseudobulks): the
        ``sumsq`` of the result is a read-only all-NaN view (so is its ``var``).

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
            f"duplicated gene names in var_names: {preview(dup)}; call adata.var_names_make_unique()"
        )
    codes, g_names, g_cov = _groups(adata, key, control, covariate)
    C = len(g_names)
    # accumulator rows: with a split, half 1 of every group, then half 2 (two blocks)
    acc_codes = codes if split is None else (_halves(adata, split) - 1) * C + codes
    n_acc = C if split is None else 2 * C
    n_full = np.bincount(codes, minlength=C).astype(np.int64)
    keep = _kept_groups(n_full, g_names, g_cov, control, min_cells=min_cells, drop_small=drop_small)
    if layer is not None and layer not in adata.layers:
        raise VcjaxInputError(f"layer {layer!r} not found; layers: {preview(list(adata.layers))}")
    X = adata.layers[layer] if layer is not None else adata.X
    if X is None:
        raise VcjaxInputError("adata.X is None; pass layer=")
    G = len(genes)
    if X.shape != (adata.n_obs, G):
        raise VcjaxInputError(f"matrix shape {X.shape} != AnnData shape {adata.shape}")
    if rows is not None:
        first, last = int(rows[0]), int(rows[1])
        if not 0 <= first <= last <= adata.n_obs:
            raise ValueError(f"rows {rows} outside 0..{adata.n_obs}")
    else:
        first, last = 0, adata.n_obs

    check = _ChunkValidator(normalize, genes, adata.obs_names)
    bar = task = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        task = bar.add_task(f"group_stats [{key}]", total=last - first)
        bar.start()
    try:
        S, SS, sample = _accumulate(
            X, acc_codes, n_acc, check, (first, last), chunk_cells=chunk_cells, sumsq=sumsq,
            advance=None if bar is None else (lambda k: bar.update(task, advance=k)),
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.stop()
    normalization = check.normalization()
    scale = None if sample is None else sample.evidence(normalization=normalization)

    def make(n, s, ss) -> GroupStats:
        idx = np.flatnonzero(keep)
        names = tuple(g_names[i] for i in idx)
        if not keep.all():  # else keep the (contiguous) accumulators as they are
            s = s[idx]
            ss = ss[idx] if ss is not None else None
        if ss is None:
            ss = np.broadcast_to(np.float64(np.nan), s.shape)
        return GroupStats(
            names=names,
            genes=genes,
            n=np.asarray(n, dtype=np.int64)[idx],
            sum=s,
            sumsq=ss,
            control=control if control in names else None,
            covariate=None if g_cov is None else tuple(g_cov[i] for i in idx),
            normalization=normalization,
            scale=scale,
        )

    if split is None:
        return make(n_full, S, SS)
    n_half = np.bincount(acc_codes, minlength=n_acc).astype(np.int64)
    SS1, SS2 = (None, None) if SS is None else (SS[:C], SS[C:])
    return SplitStats(half1=make(n_half[:C], S[:C], SS1), half2=make(n_half[C:], S[C:], SS2))
