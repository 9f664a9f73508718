"""The Wilcoxon rank-sum test of many groups against one control on sparse cells (host).

The same test as :func:`vcjax.stats.mannwhitney_vs_control` (cell-eval's DE test, see
:mod:`vcjax.stats._wilcoxon` for the statistic), for a scipy sparse ``(N, G)`` matrix of
cells, without densifying it: only the stored non-zero values are sorted, and each group's
zeros are one run per gene, counted rather than sorted.

For one gene, with the control ``c`` (dense: it is small) and a group's values ``x``:

* ``U = ½ Σ_runs a (2R - b)`` over the runs of equal values of the group (value ``v``,
  length ``a``; ``R = #{c <= v}``, ``b = #{c == v}``), and the tie term
  ``T = Σ_{v∈ctrl} (b_v³ - b_v) + Σ_runs a (a² - 1 + 3b (a + b))``, as in the dense test.
* The runs of the non-zero values come from one sort of the stored entries by
  ``(gene, group, value)`` (the stored entries are grouped by gene and, with the cells put in
  group order first, by group, so the sort has little to do); the zero run of a group has
  ``a = n_group - (stored non-zeros of the group)`` and the lookups ``R, b`` of the value 0.
* ``R`` and ``b`` come from the dense test's per-gene tables of the sorted control
  (one table read and a short branchless search per run).

Counts are exact integers (int64, sums in float64 below 2⁵³); the finishing arithmetic is
the dense test's. Explicitly stored zeros (and ``-0.0``) count as zeros. Cost: a sort of
the stored non-zeros of the perturbed cells and a lookup per run, i.e. ``O(nnz log)``
instead of the dense ``O(N G log n)``.

Non-negative cells (log1p data, where the zeros are the smallest value) are counted by
:func:`vcjax.stats._wilcoxon_split.mannwhitney_counts_passes` instead, with one pass: the
same integers from a gene-major (CSC) layout in small gene blocks, about twice as fast and
without the reordered copies of every stored entry. Cells with negative values take the
sort above.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import scipy.sparse as sp

from vcjax._host import host_threads
from vcjax.stats._wilcoxon import MannWhitneyResult, _run_terms, mannwhitney_from_counts_jit
from vcjax.stats._wilcoxon_split import EXCLUDED, mannwhitney_counts_passes

__all__ = ["mannwhitney_vs_control_sparse"]

# stored non-zeros per block of genes (a block's temporaries: a few tens of MB)
_BLOCK_NNZ = 1 << 20


def _keys(vals: np.ndarray, uint) -> np.ndarray:
    """Order-preserving unsigned keys of floats (1-D; ``-0.0`` and ``+0.0`` get one key)."""
    k = (vals + vals.dtype.type(0)).view(uint)  # a copy; -0.0 + 0.0 = +0.0
    top = uint(8 * k.itemsize - 1)
    flip = k >> top  # 1 for negative values
    np.negative(flip, out=flip)  # all bits for negative values, else 0
    flip |= uint(1) << top  # ... else the sign bit
    k ^= flip
    return k


def _block(
    vals: np.ndarray,
    gene: np.ndarray,
    tag: np.ndarray,
    w: int,
    sizes: np.ndarray,
    m: int,
    lap,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``(2U, T)`` of a block of ``w`` genes, each ``(w, n_groups)`` float64.

    The block's stored entries: non-zero values ``vals``, their gene in the block ``gene``
    and their cell's ``tag``: 0 for a control cell, ``1 + group`` for a group's cell,
    ``n_groups + 1`` for a cell in neither (sorted with the others, then dropped). ``m``:
    the number of control cells; ``w`` below ``2**(32 - tag bits)``.

    One sort of the block's stored values by a uint64 key ``(gene, value, tag)``: a run of
    equal keys is a group's run of equal values (length ``a``), and a value's control
    entries (tag 0) come first among that value's entries, so the control entries counted
    up to a run, less those of earlier genes, are ``#{c <= v}`` over the stored control
    values (the control's zeros are added for ``v > 0``).
    """
    n_groups = sizes.size
    ng = n_groups + 2  # tags
    u64 = np.uint64
    if vals.dtype == np.float32:
        keys = _keys(vals, np.uint32)
        zero_key = int(_keys(np.zeros(1, np.float32), np.uint32)[0])
    else:  # float64: the ranks of the distinct values (the value 0 among them) as keys
        uniq, inv = np.unique(np.append(_keys(vals, u64), _keys(np.zeros(1), u64)),
                              return_inverse=True)  # fmt: skip
        keys, zero_key = inv[:-1].astype(np.uint32), int(inv[-1])
        del uniq, inv
    tb = int(ng - 1).bit_length()  # bits of a tag
    comp = gene.astype(u64)
    comp <<= u64(32 + tb)
    k = keys.astype(u64)
    del keys
    k <<= u64(tb)
    comp |= k
    del k
    comp |= tag.astype(u64)
    lap("keys")
    comp.sort()
    lap("sort")
    n = comp.size
    new = np.empty(n, bool)
    new[:1] = True
    np.not_equal(comp[1:], comp[:-1], out=new[1:])
    nr = int(np.count_nonzero(new))
    if nr < n:  # ties within a group: runs longer than 1
        st = np.flatnonzero(new)
        rc = comp[st]
        a = np.diff(st, append=n).astype(np.int64)  # run lengths
        del st
    else:
        rc, a = comp, None
    del new
    tag = (rc & u64((1 << tb) - 1)).astype(np.int32)
    vk = rc >> u64(tb)  # (gene, value) of each run, increasing
    del rc, comp
    ctrl = np.flatnonzero(tag == 0)  # the control's runs (a small share)
    ca = np.zeros(nr, np.int64)
    ca[ctrl] = 1 if a is None else a[ctrl]
    cum = np.cumsum(ca)  # control entries up to and including each run
    # where each gene's runs start, and its first run with a value > 0 (after 0's runs)
    gstart = np.searchsorted(vk, np.arange(w + 1, dtype=u64) << u64(32))
    gpos = np.searchsorted(vk, (np.arange(w, dtype=u64) << u64(32)) | u64(zero_key), "right")
    cum0 = np.concatenate([[0], cum])
    c_per_gene = cum0[gstart[1:]] - cum0[gstart[:-1]]
    z_c = m - c_per_gene  # the control's zeros
    neg_c = cum0[gpos] - cum0[gstart[:-1]]  # its negative values
    # #{c <= v} = cum - (control entries of earlier genes) [+ z_c when v > 0]
    off = np.empty(2 * w, np.int64)
    off[0::2] = cum0[gstart[:-1]]
    off[1::2] = cum0[gstart[:-1]] - z_c
    lens = np.empty(2 * w, np.int64)
    lens[0::2] = gpos - gstart[:-1]
    lens[1::2] = gstart[1:] - gpos
    r = cum
    r -= np.repeat(off, lens)
    del cum
    # b = #{c == v}: the control run that starts the run's (gene, value), if any; only
    # runs that are not first in their value can have one
    later = np.flatnonzero(vk[1:] == vk[:-1]) + 1
    gene = (vk >> u64(32)).astype(np.int32)
    del vk
    # the first run of each later run's value: later runs come in chains of consecutive
    # indices, each chain right after its value's first run
    chain = np.ones(later.size, bool)
    chain[1:] = later[1:] != later[:-1] + 1
    first_of = later[np.flatnonzero(chain)][np.cumsum(chain) - 1] - 1
    is_grp = tag[later] != 0
    tb_later = later[is_grp]  # group runs after a run of the same value
    b_val = ca[first_of[is_grp]]
    lap("runs")
    seg = gene.astype(np.int64)
    seg *= ng
    seg += tag  # control runs go to tag 0, dropped below
    nseg = w * ng
    keep = slice(1, n_groups + 1)
    u2 = 2 * r
    if a is not None:
        u2 *= a
    if tb_later.size:  # a (2R - b): subtract a b for the runs tied with control values
        u2[tb_later] -= b_val * (1 if a is None else a[tb_later])
    u = np.bincount(seg, weights=u2, minlength=nseg).reshape(w, ng)[:, keep]
    if a is None:
        nnz = np.bincount(seg, minlength=nseg).reshape(w, ng)[:, keep]
        tied = tb_later
        at, bt = np.ones(tied.size, np.int64), b_val
    else:
        nnz = np.bincount(seg, weights=a, minlength=nseg).reshape(w, ng)[:, keep]
        bb = np.zeros(nr, np.int64)
        bb[tb_later] = b_val
        tied = np.flatnonzero(((a > 1) | (bb > 0)) & (tag != 0))
        at, bt = a[tied], bb[tied]
    # tie terms: only runs with a > 1 or a tied control value contribute
    _, tt = _run_terms(at, r[tied], bt)
    t = np.bincount(seg[tied], weights=tt, minlength=nseg).reshape(w, ng)[:, keep]
    # each group's zeros: one run per gene with R0 = #{c <= 0}, b0 = #{c == 0}
    a0 = sizes[None, :] - nnz.astype(np.int64)
    u2_0, tt_0 = _run_terms(a0, (neg_c + z_c)[:, None], z_c[:, None])
    cc = ca[ctrl]
    const = np.bincount(gene[ctrl], weights=cc * (cc * cc - 1), minlength=w)
    const += z_c * (z_c * z_c - 1)
    u = u + u2_0
    t = t + tt_0 + const[:, None]
    lap("sums")
    return u, t


def _is_mask(control) -> bool:
    """``control`` is a boolean row mask of the cells (else a matrix of control cells)."""
    return isinstance(control, np.ndarray) and control.ndim == 1 and control.dtype == bool


def _grouping(labels, control, n_groups: int):
    """``(labels, valid, extra)``: the labels as int64; which cells are in a group (a label
    in ``[0, n_groups)`` and not a control row); the control cells as a sparse matrix when
    they are given apart (None for a row mask)."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    valid = (labels >= 0) & (labels < n_groups)
    extra = None
    if _is_mask(control):
        valid &= ~control
    else:
        extra = control if sp.issparse(control) else sp.csr_matrix(np.asarray(control))
    return labels, valid, extra


def _sparse_counts(
    cells,
    labels: np.ndarray,
    control,
    n_groups: int,
    *,
    threads: int | None = None,
    profile: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U``, tie term ``T`` (``(n_groups, G)`` float64, exact) and group sizes.

    ``control``: a matrix of control cells, or a boolean ``(N,)`` mask of the control rows
    of ``cells`` (those are then in no group). ``profile``, when given, accumulates thread
    CPU seconds per stage.
    """
    labels, valid, extra = _grouping(labels, control, n_groups)
    sizes = np.bincount(labels[valid], minlength=n_groups)
    g = cells.shape[1]
    u = np.zeros((n_groups, g))
    ties = np.zeros((n_groups, g))
    if g == 0 or not valid.any():
        return u, ties, sizes
    tdt = np.uint16 if n_groups + 2 <= np.iinfo(np.uint16).max else np.int32
    tags = np.where(valid, labels + 1, n_groups + 1).astype(tdt)
    X = cells
    if extra is None:
        tags[control] = 0
        m = int(control.sum())
    else:
        m = control.shape[0]
    # the stored entries (value, gene, cell's tag) of every cell, control cells included
    parts = [(sp.csr_matrix(X) if not sp.isspmatrix_csc(X) else X, tags)]
    if extra is not None:
        parts.append((extra, np.zeros(extra.shape[0], tags.dtype)))
    vals, gene, tag = [], [], []
    for mat, tg in parts:
        if sp.isspmatrix_csc(mat):
            gene.append(np.repeat(np.arange(g, dtype=np.int32), np.diff(mat.indptr)))
            tag.append(tg[mat.indices])
        else:
            gene.append(mat.indices)
            tag.append(np.repeat(tg, np.diff(mat.indptr)))
        vals.append(mat.data)
    vals, gene, tag = (np.concatenate(a) if len(a) > 1 else a[0] for a in (vals, gene, tag))
    if vals.dtype not in (np.float32, np.float64):
        vals = vals.astype(np.float32)
    nz = vals != 0  # stored zeros are zeros
    if not nz.all():
        vals, gene, tag = vals[nz], gene[nz], tag[nz]
    del nz
    threads = host_threads() if threads is None else threads
    nblocks = max(threads, -(-vals.size // _BLOCK_NNZ))
    nblocks = min(g, -(-nblocks // threads) * threads)
    # the block's genes must fit the key: 32 value bits and the tag bits leave the rest
    width = min(-(-g // nblocks), 1 << (31 - int(n_groups + 1).bit_length()))
    bounds = [(s, min(s + width, g)) for s in range(0, g, width)]
    # the entries grouped by block: a stable radix sort of the block numbers
    block = gene // width
    block = block.astype(
        np.uint8 if len(bounds) <= 256 else np.uint16 if len(bounds) <= 65536 else np.int64
    )
    order = np.argsort(block, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(block, minlength=len(bounds)))])
    del block
    vals, gene, tag = vals[order], gene[order], tag[order]  # (the sort is stable)
    del order

    def run(i):
        t = [time.thread_time()]

        def lap(name):
            if profile is not None:
                t1 = time.thread_time()
                profile[name] = profile.get(name, 0.0) + t1 - t[0]
                t[0] = t1

        g0, g1 = bounds[i]
        sl = slice(starts[i], starts[i + 1])
        return _block(vals[sl], gene[sl] - g0, tag[sl], g1 - g0, sizes, m, lap)

    if threads > 1 and len(bounds) > 1:
        with ThreadPoolExecutor(min(threads, len(bounds))) as ex:
            out = list(ex.map(run, range(len(bounds))))
    else:
        out = [run(i) for i in range(len(bounds))]
    for (g0, g1), (u2, tt) in zip(bounds, out):
        u[:, g0:g1] = u2.T / 2
        ties[:, g0:g1] = tt.T
    return u, ties, sizes


def _counts(cells, labels, control, n_groups: int):
    """``(U, T, sizes)`` of :func:`_sparse_counts`; for non-negative values (log1p data) from
    :func:`vcjax.stats._wilcoxon_split.mannwhitney_counts_passes` (one pass), which counts
    the same integers in a gene-major layout at about half the cost."""
    labels, valid, extra = _grouping(labels, control, n_groups)
    stored = [
        m.data if m.format in ("csr", "csc", "coo") else sp.csr_matrix(m).data
        for m in ([cells] if extra is None else [cells, extra])
    ]
    if (
        cells.shape[1] == 0
        or not valid.any()
        or not all(d.dtype.kind in "fiu" and bool(np.all(d >= 0)) for d in stored)
    ):  # negative (or NaN) values: zeros are not the minimum
        return _sparse_counts(cells, labels, control if extra is None else extra, n_groups)
    roles = np.where(valid, labels, EXCLUDED).astype(np.int32)
    parts = [cells]
    if extra is None:
        roles[control] = -1
    else:
        roles = np.concatenate([roles, np.full(extra.shape[0], -1, np.int32)])
        parts.append(extra)
    got = mannwhitney_counts_passes(parts, roles[None], n_groups=[n_groups])
    return got.u, got.ties, got.n.astype(np.int64)


def mannwhitney_vs_control_sparse(
    cells,
    labels,
    control,
    *,
    n_groups: int,
    continuity: bool = True,
    tie_correct: bool = True,
) -> MannWhitneyResult:
    r""":func:`vcjax.stats.mannwhitney_vs_control` for scipy sparse cells (host, eager).

    .. math:: U_{pg} = \sum_{i \in p} \big(\#\{c_g < x_{ig}\} + \tfrac12 \#\{c_g = x_{ig}\}\big)

    Only the stored non-zeros are sorted; each group's zeros in a gene are one run whose
    length is counted (module docstring). The counts equal the dense test's exactly, so
    the results are the same numbers.

    Args:
      cells: ``(N, G)`` scipy sparse matrix (any format; float32, else float64).
      labels: integer group of each cell, ``(N,)``; cells outside ``[0, n_groups)`` are
        ignored.
      control: the control cells ``(m, G)`` (dense or sparse), or a boolean ``(N,)`` mask
        of the control cells among ``cells``' rows.
      n_groups: number of groups.
      continuity, tie_correct: as :func:`vcjax.stats.mannwhitney_vs_control`.

    Returns:
      :class:`vcjax.stats.MannWhitneyResult` with ``(n_groups, G)`` arrays, float32 (float64
      when ``cells`` is float64 and x64 is enabled).
    """
    if not sp.issparse(cells):
        raise TypeError("mannwhitney_vs_control_sparse: cells must be a scipy sparse matrix")
    if _is_mask(control):
        if control.size != cells.shape[0]:
            raise ValueError(
                f"the control mask has {control.size} entries but there are {cells.shape[0]} cells"
            )
        m = int(control.sum())
    elif control.shape[1] != cells.shape[1]:
        raise ValueError(
            f"control has {control.shape[1]} genes but the cells have {cells.shape[1]}"
        )
    else:
        m = control.shape[0]
    u, ties, n = _counts(cells, labels, control, n_groups)
    wide = cells.dtype == np.float64 and jax.config.jax_enable_x64
    dtype = np.float64 if wide else np.float32
    return mannwhitney_from_counts_jit(
        u.astype(dtype),
        ties.astype(dtype),
        n.astype(dtype),
        m=m,
        continuity=continuity,
        tie_correct=tie_correct,
    )
