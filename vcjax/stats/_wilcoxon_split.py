r"""Exact Mann–Whitney counts on sparse non-negative data, for several groupings at once.

The test is :func:`vcjax.stats.mannwhitney_vs_control`'s (two-sided asymptotic U with tie
and continuity corrections); this module only counts ``U`` and the tie term ``T`` faster
when

* the values are **non-negative and mostly zero** (log1p-CPM of counts): the zeros of a
  gene form one tie group at the bottom, handled in closed form, so the work is on the
  stored (non-zero) entries only;
* the **same cells are tested under several groupings** ("passes": e.g. all real cells,
  and the two halves of each of five random splits, each half against its own control):
  each gene's stored values are sorted **once**, and every pass is a few linear scans of
  that order.

Definitions. For one gene and one pass, let a group ``p`` have ``n`` cells, ``z_p`` of them
zero, and its control ``m`` cells, ``z_c`` of them zero. Over the sorted stored values of
the gene (all cells of the pass), let ``L_i`` be the number of non-zero control values
strictly below value ``x_i`` and ``b_i`` the number equal to it. Then

.. math::

    2U = \sum_{i\in p,\,x_i>0} (2 L_i + b_i) + 2 (n - z_p) z_c + z_p z_c,

(each non-zero group value beats the ``z_c`` control zeros, each zero half-beats them), and
the tie term ``T = Σ_v (t_v³ - t_v)`` over the distinct values ``v`` of the pooled sample,
``t_v = a_v + b_v`` (``a_v`` group count, ``b_v`` control count), is

.. math::

    T = \underbrace{\sum_{v>0} (b_v^3 - b_v) + (z_c^3 - z_c)}_{\text{control only}}
      + z_p (z_p^2 - 1 + 3 z_c (z_p + z_c))
      + \sum_{v>0,\,a_v>0} a_v (a_v^2 - 1 + 3 b_v (a_v + b_v)).

The last sum is 0 for a value held by one cell only (``a = 1, b = 0``), so it runs over the
stored values that occur more than once in the gene (a few). All counts are exact int64
(``U`` and ``T`` are returned as exact float64), so the p-values from
``vcjax.stats._wilcoxon.mannwhitney_from_counts`` are those of the dense implementation, bit for bit.

Cost per gene block: one sort of the stored values by (gene, value), then per pass a
cumulative count of each control along that order and two ``bincount`` over the group
entries: ``O(nnz log nnz + passes · nnz)``, against a dense sort of every cell per pass.

Layout of the groupings: ``roles[k, i]`` is cell ``i``'s role in pass ``k``: a group id
``>= 0``, ``-1`` for the pass's control, or :data:`EXCLUDED`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from vcjax._host import host_threads

__all__ = ["EXCLUDED", "PassCounts", "mannwhitney_counts_passes"]

#: role of a cell that takes no part in a pass
EXCLUDED = np.iinfo(np.int32).min
_BLOCK_NNZ = 1 << 18  # stored entries per block of genes (its temporaries stay in cache)


class PassCounts(NamedTuple):
    """Exact counts, rows ``(pass, group)`` flattened: row ``offsets[k] + p``.

    Attributes:
      u: ``(R, G)`` float64, the Mann–Whitney ``U`` of each group (exact).
      ties: ``(R, G)`` float64, the tie term ``T`` (exact).
      n: ``(R,)`` cells per group.
      m: ``(R,)`` control cells of the group's pass.
      offsets: ``(K + 1,)`` first row of each pass.
    """

    u: np.ndarray
    ties: np.ndarray
    n: np.ndarray
    m: np.ndarray
    offsets: np.ndarray


def _blocks(counts: np.ndarray, block_nnz: int) -> list[tuple[int, int]]:
    """Contiguous gene ranges of about ``block_nnz`` stored entries (and < 65,536 genes)."""
    ends = np.cumsum(counts)
    out, start = [], 0
    while start < counts.size:
        base = ends[start - 1] if start else 0
        stop = int(np.searchsorted(ends, base + block_nnz, side="left")) + 1
        stop = min(max(stop, start + 1), start + 32768, counts.size)
        out.append((start, stop))
        start = stop
    return out


class _Order(NamedTuple):
    """A gene block's stored entries sorted by (gene, value) and their tie runs.

    Within a run of equal values, entries are ordered by class with the control class
    last, so a group entry's count of control entries before it is the run's.
    """

    cells: np.ndarray  # (nb,) cell of each entry, in (gene, value) order
    gene: np.ndarray  # (nb,) gene (block-local) of each entry
    gfirst: np.ndarray  # (w,) first position of each gene
    gend: np.ndarray  # (w,) one past its last position
    pos: np.ndarray  # positions of the entries of runs of >= 2 entries, ascending
    seg_start: np.ndarray  # first index (into pos) of each (run, class) segment
    seg_class: np.ndarray  # class of each such segment
    seg_gene: np.ndarray  # gene of each such segment
    seg_ctrl: np.ndarray  # the control-class segment of the same run, or -1
    ctrl_seg: np.ndarray  # the control-class segments
    ctrl_gene: np.ndarray  # their genes


def _value_order(v: np.ndarray, gl: np.ndarray, w: int) -> np.ndarray:
    """Permutation sorting the entries by (gene, value), ties in input order (stable).

    One :func:`numpy.lexsort` of three 16-bit keys: the block-local gene and the two halves
    of the value's float32 bits (positive floats: the bits are monotone). NumPy sorts
    16-bit keys by radix, linear in the entries, where one comparison sort of packed
    64-bit keys (gene, bits, position) took 3x as long on a gene block. Float32 rounding
    is monotone, so only entries whose float32 keys collide while their values differ
    (rare) need a second look, sorted by their float64 values.
    """
    if w > 1 << 16:  # pragma: no cover - blocks hold < 32,768 genes (:func:`_blocks`)
        order = np.argsort(v, kind="stable")
        return order[np.argsort(gl[order], kind="stable")]
    f = v.astype(np.float32).view(np.uint32)
    order = np.lexsort((f.astype(np.uint16), (f >> 16).astype(np.uint16), gl.astype(np.uint16)))
    hi = gl[order].astype(np.uint64) << np.uint64(32)
    hi |= f[order]
    vs = v[order]
    clash = np.flatnonzero((hi[1:] == hi[:-1]) & (vs[1:] != vs[:-1]))
    if clash.size:  # float32 ties between different values: order those keys by value
        hv = np.unique(hi[clash])
        a, b = np.searchsorted(hi, hv, "left"), np.searchsorted(hi, hv, "right")
        sel = np.repeat(a - np.cumsum(np.concatenate([[0], (b - a)[:-1]])), b - a)
        sel += np.arange(sel.size)
        sub = np.lexsort((vs[sel], hi[sel]))
        order[sel] = order[sel][sub]
    return order


def _gather(parts, offsets, gidx: np.ndarray, transform):
    """Values, cells and block-local genes of genes ``gidx`` (ascending) of the stacked CSC
    parts. The transform (values, cells) -> values is applied; zeros are dropped."""
    vs, cs, gs = [], [], []
    w = gidx.size
    contiguous = w == 0 or int(gidx[-1]) - int(gidx[0]) + 1 == w
    for x, off in zip(parts, offsets):
        ln = (x.indptr[gidx + 1] - x.indptr[gidx]).astype(np.int64)
        if contiguous:
            lo, hi = (int(x.indptr[gidx[0]]), int(x.indptr[gidx[-1] + 1])) if w else (0, 0)
            idx = slice(lo, hi)
        else:
            st = x.indptr[gidx].astype(np.int64)
            idx = np.repeat(st - (np.cumsum(ln) - ln), ln) + np.arange(int(ln.sum()))
        cs.append(x.indices[idx].astype(np.int64) + off)
        vs.append(x.data[idx])
        gs.append(np.repeat(np.arange(w, dtype=np.int64), ln))
    v, cells, gl = (np.concatenate(z) for z in (vs, cs, gs))
    v = v.astype(np.float64) if transform is None else transform(v, cells)
    if v.size and v.min() <= 0:
        if v.min() < 0:
            raise ValueError(
                "mannwhitney_counts_passes: negative values; zeros must be the minimum"
            )
        keep = v > 0
        v, cells, gl = v[keep], cells[keep], gl[keep]
    return v, cells, gl


def _sorted_block(v, cells_in, gl, w: int, classes, ctrl_class: int) -> _Order:
    nb = v.size
    order = _value_order(v, gl, w)
    vs = v[order]
    cells = cells_in[order]
    cnt = np.bincount(gl, minlength=w).astype(np.int64)
    gl = np.repeat(np.arange(w, dtype=np.int64), cnt)  # sorted: gene-major
    gfirst = (np.cumsum(cnt) - cnt).astype(np.int32)
    gend = (gfirst + cnt).astype(np.int32)
    new = np.empty(nb + 1, bool)
    new[:1] = True
    new[nb:] = True
    np.not_equal(vs[1:], vs[:-1], out=new[1:nb])
    new[gfirst[cnt > 0]] = True
    bounds = np.flatnonzero(new).astype(np.int32)  # run starts, then nb
    rlen = np.diff(bounds)
    multi = rlen > 1
    pos = np.flatnonzero(np.repeat(multi, rlen)).astype(np.int32)
    top = int(classes.max(initial=0)) + 1
    cls = classes[cells]
    cls = np.where(cls == ctrl_class, top, cls)  # the control class sorts last
    # entries of multi-entry runs grouped by (run, class)
    run_of = np.repeat(np.arange(int(multi.sum()), dtype=np.int64), rlen[multi])
    key = run_of * (top + 1) + cls[pos]
    srt = np.argsort(key, kind="stable")
    key = key[srt]
    cells[pos] = cells[pos[srt]]  # within each run: entries by class, control last
    cls[pos] = cls[pos[srt]]
    first = np.empty(key.size, bool)
    first[:1] = True
    np.not_equal(key[1:], key[:-1], out=first[1:])
    seg_start = np.flatnonzero(first)
    seg_run = key[seg_start] // (top + 1)
    seg_cl = key[seg_start] % (top + 1)
    is_ctrl = seg_cl == top
    ctrl_seg = np.flatnonzero(is_ctrl)
    run_ctrl = np.full(int(multi.sum()), -1, np.int64)
    run_ctrl[seg_run[ctrl_seg]] = ctrl_seg
    seg_gene = gl[pos[seg_start]]
    seg_cls = np.where(is_ctrl, ctrl_class, seg_cl)
    return _Order(
        cells, gl.astype(np.int32), gfirst, gend, pos, seg_start, seg_cls, seg_gene,
        run_ctrl[seg_run], ctrl_seg, seg_gene[ctrl_seg],
    )  # fmt: skip


_SHIFT = 40  # a second count packed above this bit in one reduceat


def _pass_counts(o: _Order, role, cls_group, n_grp: int, n_cells: np.ndarray, m: int):
    """``(2U, T)`` of one pass on a sorted gene block: ``(n_grp, w)`` int64 each.

    ``cls_group``: class -> group id of the pass (``n_grp`` for a class that is none).
    Group ids times ``w`` plus the gene must fit int32 (``n_grp * w < 2**31``).
    """
    w = o.gfirst.size
    nb = o.cells.size
    rv = role[o.cells]
    cum = np.zeros(nb + 1, np.int32)  # cum[i]: control entries before position i
    np.cumsum(rv == -1, out=cum[1:])
    size = n_grp * w + 1

    def bins(cl, gene):
        gid = cls_group[cl]
        return np.where(gid < n_grp, gid * w + gene, n_grp * w)

    # Σ (2L + b + 2 base) over a group's entries: 2 cum at each entry (the control entries
    # of its run come after it) plus b per entry of a tied run (added below)
    ge = np.flatnonzero(rv >= 0)
    gb = rv[ge] * w + o.gene[ge]
    s2 = 2 * np.bincount(gb, weights=cum[ge], minlength=size).astype(np.int64)
    nnzp = np.bincount(gb, minlength=size).astype(np.int64)
    base = cum[o.gfirst].astype(np.int64)
    zc = m - (cum[o.gend] - base)  # control zeros per gene
    const = zc * zc * zc - zc  # the control's own ties: its zeros, its tied runs (below)
    tie = np.zeros(size, np.int64)
    if o.seg_start.size:
        rm = rv[o.pos]
        cnt = np.add.reduceat((rm >= 0) + ((rm == -1).astype(np.int64) << _SHIFT), o.seg_start)
        a = cnt & ((1 << _SHIFT) - 1)  # group members of each segment
        bc = cnt >> _SHIFT  # control members (control-class segments)
        bcc = bc[o.ctrl_seg]
        np.add.at(const, o.ctrl_gene, bcc * bcc * bcc - bcc)
        hit = np.flatnonzero(a > 0)
        if hit.size:
            a = a[hit]
            sc = o.seg_ctrl[hit]
            b = np.where(sc >= 0, bc[np.maximum(sc, 0)], 0)
            sb = bins(o.seg_class[hit], o.seg_gene[hit])
            np.add.at(s2, sb, a * b)  # b for each tied member: 2L + b
            np.add.at(tie, sb, a * (a * a - 1 + 3 * a * b + 3 * b * b))
    s2 = s2[:-1].reshape(n_grp, w)
    nnzp = nnzp[:-1].reshape(n_grp, w)
    zp = n_cells[:, None] - nnzp
    u2 = s2 - 2 * nnzp * base + 2 * nnzp * zc + zp * zc
    t = const[None, :] + zp * (zp * zp - 1 + 3 * zc * (zp + zc)) + tie[:-1].reshape(n_grp, w)
    return u2, t


_SPLIT_NNZ = 1 << 22  # a CSR part with more stored entries is converted in row pieces

try:  # SciPy's kernel of ``tocsc``, into arrays the caller allocates
    from scipy.sparse._sparsetools import csr_tocsc as _csr_tocsc
except ImportError:  # pragma: no cover - a SciPy without it: converted whole
    _csr_tocsc = None


def _kernel_types(p) -> bool:
    """Whether SciPy's kernel takes ``p``'s index and value types as they are."""
    return p.indices.dtype in (np.int32, np.int64) and (
        p.dtype.kind in "iuf" and p.dtype != np.float16
    )


def _csc_parts(parts: list, threads: int) -> list:
    """The parts as CSC matrices (the gene-block gathers read columns).

    A large CSR part is converted in ``threads`` row pieces at once (SciPy's conversion is
    one sequential pass, run without the GIL): consecutive pieces stack to the same rows,
    and the counts do not depend on how the rows are split into parts.
    """
    out = []
    for p in parts:
        big = sp.issparse(p) and p.format == "csr" and p.nnz > _SPLIT_NNZ
        if not (big and threads > 1 and _csr_tocsc is not None and _kernel_types(p)):
            out.append(sp.csc_matrix(p))
            continue
        ip, g, idx = p.indptr, p.shape[1], p.indices.dtype
        cuts = np.linspace(0, p.shape[0], threads + 1).astype(np.int64)
        jobs = []
        for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
            lo, hi = int(ip[a]), int(ip[b])
            # the piece's CSC arrays are allocated here, not in the worker threads (whose
            # malloc arenas kept ~50 MB more at the peak of a metrics="all" call)
            csc = (np.empty(g + 1, idx), np.empty(hi - lo, idx), np.empty(hi - lo, p.dtype))
            rows = (b - a, g, (ip[a : b + 1] - lo).astype(idx), p.indices[lo:hi], p.data[lo:hi])
            jobs.append((rows, csc))
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda job: _csr_tocsc(*job[0], *job[1]), jobs))
        for rows, (cp, ci, cd) in jobs:
            out.append(sp.csc_matrix((cd, ci, cp), shape=(rows[0], g), copy=False))
    return out


#: genes per call of a ``finish`` function (a fixed shape: one compilation for XLA)
FINISH_WIDTH = 2048


def mannwhitney_counts_passes(
    x,
    roles: np.ndarray,
    *,
    classes: np.ndarray | None = None,
    n_groups=None,
    genes: np.ndarray | None = None,
    transform=None,
    finish=None,
    threads: int | None = None,
    block_nnz: int = _BLOCK_NNZ,
) -> PassCounts:
    """Exact Mann–Whitney ``U`` and tie terms of every group of every pass, every gene.

    Args:
      x: ``(N, G)`` non-negative values, scipy sparse or dense, or a list of such
        matrices (same genes) stacked vertically without being copied together.
      roles: ``(K, N)`` int: per pass, each cell's group id (``>= 0``), ``-1`` for the
        pass's control, any other negative value (e.g. :data:`EXCLUDED`) for no part.
      classes: ``(N,)`` non-negative int, a partition of the cells such that in every
        pass each group lies in one class, each class holds at most one group, and every
        control cell of every pass lies in one class of its own (e.g. the perturbation
        label when the passes split labels into halves). Default: ``roles[0]`` (its
        control one class, its excluded cells another).
      n_groups: ``(K,)`` groups per pass (default: the largest group id + 1).
      genes: ascending indices of the genes to test (default: all); the results' columns.
      transform: ``f(values, cells) -> values``, applied to the stored values a gene
        block at a time (e.g. log1p-CPM from counts without a transformed copy of ``x``);
        it must keep zeros zero and values non-negative.
      finish: ``f(u, ties, n, m) -> (R, W)`` applied to :data:`FINISH_WIDTH` genes at a
        time (zero-padded; e.g. the p-values); the result then holds its output in
        ``u`` and ``ties`` is None, and no ``(R, G)`` count arrays are kept.
      threads: worker threads over gene blocks (default: :func:`vcjax._host.host_threads`).
      block_nnz: stored entries per gene block.

    Returns:
      :class:`PassCounts`; a group with no cells has ``n = 0`` (its ``U``, ``T`` are 0).
    """
    threads = host_threads() if threads is None else threads
    parts = _csc_parts(list(x) if isinstance(x, (list, tuple)) else [x], threads)
    g = parts[0].shape[1]
    if any(p.shape[1] != g for p in parts):
        raise ValueError("mannwhitney_counts_passes: the parts of x have different genes")
    row_off = np.concatenate([[0], np.cumsum([p.shape[0] for p in parts])]).astype(np.int64)
    roles = np.atleast_2d(np.asarray(roles, np.int32))
    k_pass, n_cells = roles.shape
    if n_cells != row_off[-1]:
        raise ValueError(
            f"mannwhitney_counts_passes: roles for {n_cells} cells, x has {row_off[-1]} rows"
        )
    if n_groups is None:
        n_grp = np.array([int(r.max(initial=-1)) + 1 for r in roles], np.int64)
    else:
        n_grp = np.asarray(n_groups, np.int64).reshape(k_pass)
    if classes is None:
        r0 = roles[0].astype(np.int64)
        classes = np.where(r0 >= 0, r0, np.where(r0 == -1, n_grp[0], n_grp[0] + 1))
    classes = np.asarray(classes, np.int64).reshape(n_cells)
    if classes.size and classes.min() < 0:
        raise ValueError("mannwhitney_counts_passes: classes must be non-negative")
    n_cls = int(classes.max(initial=0)) + 1
    ctrl_cls = np.unique(classes[(roles == -1).any(axis=0)])
    if ctrl_cls.size > 1:
        raise ValueError("mannwhitney_counts_passes: the control cells span several classes")
    ctrl_class = int(ctrl_cls[0]) if ctrl_cls.size else n_cls
    n_per, m_per, cls_group = [], [], []
    for k, r in enumerate(roles):
        gr = r >= 0
        if gr.any() and int(r.max()) >= n_grp[k]:
            raise ValueError(f"mannwhitney_counts_passes: pass {k} has a group id >= n_groups")
        pairs = np.unique(r[gr].astype(np.int64) * n_cls + classes[gr])
        if (
            pairs.size != np.unique(r[gr]).size
            or pairs.size != np.unique(classes[gr]).size
            or (classes[gr] == ctrl_class).any()
        ):
            raise ValueError(
                f"mannwhitney_counts_passes: pass {k}'s groups do not map one to one onto "
                "classes other than the control's"
            )
        cg = np.full(n_cls + 1, n_grp[k], np.int64)
        cg[pairs % n_cls] = pairs // n_cls
        cls_group.append(cg)
        n_per.append(np.bincount(r[gr], minlength=int(n_grp[k])).astype(np.int64))
        m_per.append(int((r == -1).sum()))
    offsets = np.concatenate([[0], np.cumsum(n_grp)]).astype(np.int64)
    rows = int(offsets[-1])
    n = np.concatenate(n_per).astype(np.float64) if rows else np.zeros(0)
    m = np.repeat(np.asarray(m_per, np.float64), n_grp)
    gsel = np.arange(g) if genes is None else np.asarray(genes, np.int64).reshape(-1)
    if gsel.size and (gsel.min() < 0 or gsel.max() >= g or (np.diff(gsel) <= 0).any()):
        raise ValueError("mannwhitney_counts_passes: genes must be ascending indices of x's genes")
    g = gsel.size
    counts = sum(np.diff(p.indptr)[gsel] for p in parts)
    width = g if finish is None else FINISH_WIDTH
    out = np.zeros((rows, g))
    ties = np.zeros((rows, g)) if finish is None else None
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        for c0 in range(0, g, max(width, 1)):
            c1 = min(c0 + width, g)
            u_c = np.zeros((rows, width)) if finish is not None else out
            t_c = np.zeros((rows, width)) if finish is not None else ties
            shift = c0 if finish is not None else 0

            def run(b, u_c=u_c, t_c=t_c, shift=shift):
                g0, g1 = b
                v, cells, gl = _gather(parts, row_off[:-1], gsel[g0:g1], transform)
                o = _sorted_block(v, cells, gl, g1 - g0, classes, ctrl_class)
                for k in range(k_pass):
                    u2, t = _pass_counts(
                        o, roles[k], cls_group[k], int(n_grp[k]), n_per[k], m_per[k]
                    )
                    u_c[offsets[k] : offsets[k + 1], g0 - shift : g1 - shift] = u2 / 2
                    t_c[offsets[k] : offsets[k + 1], g0 - shift : g1 - shift] = t

            blocks = [(b0 + c0, b1 + c0) for b0, b1 in _blocks(counts[c0:c1], block_nnz)]
            if pool is not None and len(blocks) > 1:
                list(pool.map(run, blocks))
            else:
                for b in blocks:
                    run(b)
            if finish is not None:
                out[:, c0:c1] = np.asarray(finish(u_c, t_c, n, m))[:, : c1 - c0]
    finally:
        if pool is not None:
            pool.shutdown()
    return PassCounts(out, ties, n, m, offsets)
