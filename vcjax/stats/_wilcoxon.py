"""Vectorised Wilcoxon rank-sum (Mann–Whitney U) tests of many groups against one control.

This is the DE test of cell-eval 0.8.2 (``pdex`` ``mode="ref"`` → ``numba_mwu``), which
equals ``scipy.stats.mannwhitneyu(group, control, method="asymptotic")`` per gene: the
normal approximation with tie correction and a continuity correction of 0.5, two-sided,
p clipped to ``[0, 1]`` (docs/metrics.md §10). With ``continuity=False`` and
``tie_correct=False`` the z-score is scanpy's ``rank_genes_groups(method="wilcoxon")``
score against a reference group.

Statistic (no ranking of the pooled sample per group, no loop over groups). For one gene,
let ``c`` be the control values sorted once and ``x_i`` the values of a group's cells:

* ``R_i = #{c <= x_i}``, ``b_i = #{c == x_i}`` (control values tied with ``x_i``) and
  ``L_i = R_i - b_i = #{c < x_i}``.
* ``U = Σ_i (L_i + b_i / 2) = ½ Σ_i (2 R_i - b_i)``: each group value beats the smaller
  control values and half-beats the tied ones (``R_1 - n(n+1)/2`` with mid-ranks).
* Tie term ``T = Σ_v (t_v³ - t_v)`` over the distinct values ``v`` of the pooled sample,
  ``t_v = a_v + b_v`` (``a_v`` group count, ``b_v`` control count):
  ``T = Σ_{v∈ctrl} (b_v³ - b_v) + Σ_{v∈group} a_v (a_v² - 1 + 3 b_v (a_v + b_v))``, a
  control-only constant per gene plus a sum over the group's distinct values.
* ``μ = nm/2``, ``σ² = nm/12 · ((N+1) - T / (N(N-1)))``, ``N = n + m``;
  ``p = min(1, 2 Φ(-(|U - μ| - 0.5) / σ))`` (scipy's formula: ``U`` enters as
  ``max(U₁, U₂) = μ + |U - μ|``).

Everything depends on a group's values only through its *runs* (distinct values ``v`` with
their counts ``a_v``) and ``R, b`` at ``v``, so the work is: find the runs of every group,
and look each run's value up in the gene's sorted control. Two implementations, chosen by
backend and tested against each other:

* **CPU** (``jax.default_backend() == "cpu"``): XLA:CPU's sort is generic (a comparator
  call per comparison, much slower than NumPy's, ``benchmarks/RESULTS.md``) and so is
  ``searchsorted``
  (a while loop of gathers), so the counting runs on the host, genes in cache-sized
  blocks on a few threads (NumPy releases the GIL):

  1. Floats become order-preserving unsigned integer keys (``+0.0 == -0.0``).
  2. *Cells*: put in group order once (labels are the same for every gene). Each group is
     a contiguous column slot of the ``(genes, cells)`` key matrix, its size rounded up
     by < 1/8 (padding keys sort last and are dropped) and slots ordered by size, so one
     ``np.sort`` of a ``(genes, k, size)`` view sorts ``k`` groups of every gene at once.
     Runs are where the key changes or a slot starts (``np.flatnonzero``).
  3. *Control*: sorted once per gene; its distinct values with ``#{c <= d}`` and
     ``#{c == d}`` are packed per gene, plus a bucket table: ``(max(v, lo) - lo) >> s``
     (monotone in ``v``; ``lo`` the gene's second smallest value, ``s`` fitting its span
     into 2-4 buckets per control cell, at most 4096) → the first distinct value in that
     bucket or after it. A bucket holds few distinct values, so a run's lookup is one
     table read plus a branchless binary search of ``⌈log₂(max bucket + 1)⌉`` steps (3
     on the benchmark data, against 10 for a plain search).
  4. The lookups and the per-run terms ``a (2R - b)`` and ``a (a² - 1 + 3b(a+b))`` run
     as two small XLA computations (fused loops instead of NumPy's pass per operation; from a
     :func:`jax.pure_callback` the NumPy version instead, as calling JAX there can
     deadlock), the sums per group are ``np.add.reduceat`` over the runs. All counts are
     exact int64.

  Eager calls run this directly; traced calls (e.g. under a user's ``jax.jit`` or
  ``vmap``) through :func:`jax.pure_callback`.
* **Accelerators**: JAX. The control is sorted once per gene, all cells are sorted by
  ``(group, value)`` with a two-key ``lax.sort``, ``L`` and ``R`` come from
  ``searchsorted`` and the within-group run lengths ``a_i`` from run-start/-end scans; the
  tie term is the same sum written per cell, ``Σ_{i∈group} (a_i² - 1 + 3 a_i b_i +
  3 b_i²)``, and the sums are ``segment_sum`` over groups.

The finishing arithmetic (``μ``, ``σ``, ``z``, ``p``) is the same JAX code for both, in the
input dtype.

Cost per gene: one sort of the control, the cells sorted within their groups
(``O(N log n)``) and one lookup per run, shared by all groups.

NaN rules: a group with no cells gives NaN statistics and p-values. When every value of
a group and of the control is equal (``σ = 0``), ``p = 1`` with the continuity
correction (as scipy / pdex) and NaN without it; the z-score is 0 there. Inputs must not
contain NaN (the result is unspecified then).

Precision: on CPU, ``U`` and the tie term are exact integers (int64), rounded once to the
input dtype; on accelerators, the counts are exact in float32 up to ``n·m < 2²⁴`` and the
tie term is accumulated in the input dtype. In float32, p-values carry about
``1e-6 · (1 + z²)`` relative error and p-values below ~1e-38 (``|z| > 13``) underflow to
0. Run under ``jax.enable_x64()`` with float64 inputs for float64 p-values.

References:
  Mann & Whitney (1947); scipy.stats.mannwhitneyu; cell-eval 0.8.2 / pdex 0.3.0
  (docs/metrics.md §10); scanpy ``tl.rank_genes_groups`` (``method="wilcoxon"``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr
from jax.typing import ArrayLike

from vcjax._host import host_threads
from vcjax.stats._deg import benjamini_hochberg

__all__ = ["MannWhitneyResult", "mannwhitney_vs_control", "bh_fdr", "log2_fold_change"]


class MannWhitneyResult(NamedTuple):
    """Per (group, gene) results, each ``(n_groups, G)``.

    Attributes:
      statistic: ``U`` of the group (scipy's ``statistic`` for ``mannwhitneyu(group, ctrl)``).
      zscore: ``(U - μ ∓ ½) / σ`` (continuity correction towards 0 when enabled); scanpy's
        wilcoxon ``scores`` with ``continuity=False``.
      pvalue: two-sided asymptotic p-value.
      n: cells per group, ``(n_groups,)``.
    """

    statistic: jax.Array
    zscore: jax.Array
    pvalue: jax.Array
    n: jax.Array


# ============================================================================ NumPy (CPU)

# elements (genes × (control + cells)) per block of genes: a block's arrays stay in cache
_BLOCK_ELEMENTS = 1 << 19
_NB_PER_CELL = 2  # (2m, 4m] buckets per gene, at most 4096
_HOST_THREADS = host_threads()


def _float_keys_t(x: np.ndarray, uint) -> np.ndarray:
    """``(w, n)`` unsigned integer keys in the order of the floats ``x.T`` (``x``: ``(n, w)``).

    ``-0.0`` and ``+0.0`` get one key. The transposition goes 256 rows at a time (cache).
    """
    n, w = x.shape
    out = np.empty((w, n), uint)
    f = out.view(x.dtype)
    for r in range(0, n, 256):
        f[:, r : r + 256] = x[r : r + 256].T
    f += x.dtype.type(0)  # -0.0 + 0.0 = +0.0
    sint = np.int32 if out.dtype == np.uint32 else np.int64
    sign = out.view(sint) >> (8 * out.itemsize - 1)  # -1 for negative values, else 0
    sign |= np.iinfo(sint).min  # negative: flip all bits, else only the sign bit
    out ^= sign.view(out.dtype)
    return out


class _Layout(NamedTuple):
    """Cells in group order: each non-empty group a contiguous segment ("slot").

    Slots are ordered by size, so equal-size slots are adjacent and one sort of a
    ``(genes, k, size)`` view sorts ``k`` of them. With more than 32 distinct group sizes,
    a group of ``s`` cells gets a slot of ``s`` rounded up to ``2^k · {8..16} / 8``
    (padding < 1/8, at most 8 sizes per octave); the padding positions hold the largest
    key (sorted last, a run of its own that is dropped).
    """

    rows: np.ndarray  # (n,) row of `cells` at each layout position (padding: row 0)
    pad: np.ndarray  # positions of the padding
    seg_group: np.ndarray  # (S,) group of each slot
    seg_start: np.ndarray  # (S,) first position of each slot
    classes: tuple[tuple[int, int, int], ...]  # (first position, slots, size) per size


def _slot_size(sizes: np.ndarray) -> np.ndarray:
    q = np.left_shift(1, np.maximum(np.frexp(sizes)[1] - 4, 0))  # 2^(bit_length - 4)
    return -(-sizes // q) * q


def _layout(labels: np.ndarray, n_groups: int) -> tuple[_Layout, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer):
        labels = labels.astype(np.int64)
    cell = np.flatnonzero((labels >= 0) & (labels < n_groups))
    lab = labels[cell].astype(np.intp)
    sizes = np.bincount(lab, minlength=n_groups)
    # few distinct sizes: one sort each; else sizes rounded up (padding < 1/8) to fewer
    slots = sizes if np.unique(sizes).size <= 32 else _slot_size(sizes)
    seg_group = np.lexsort((np.arange(n_groups), slots))
    seg_group = seg_group[sizes[seg_group] > 0]
    seg_of_group = np.empty(n_groups, np.intp)
    seg_of_group[seg_group] = np.arange(seg_group.size)
    seg_size, seg_slot = sizes[seg_group], slots[seg_group]
    seg_start = (np.cumsum(seg_slot) - seg_slot).astype(np.intp)
    ordered = cell[np.argsort(seg_of_group[lab], kind="stable")]
    dest = np.arange(ordered.size) + np.repeat(
        seg_start - (np.cumsum(seg_size) - seg_size), seg_size
    )
    rows = np.zeros(int(seg_slot.sum()), np.intp)
    rows[dest] = ordered
    is_pad = np.ones(rows.size, bool)
    is_pad[dest] = False
    change = np.flatnonzero(np.diff(seg_slot)) + 1
    firsts = np.concatenate([[0], change]).astype(np.intp)
    lasts = np.concatenate([change, [seg_slot.size]]).astype(np.intp)
    classes = tuple(
        (int(seg_start[f]), int(e - f), int(seg_slot[f])) for f, e in zip(firsts, lasts) if e > f
    )
    return _Layout(rows, np.flatnonzero(is_pad), seg_group, seg_start, classes), sizes


def _bucketed(n: int) -> int:
    """``n`` rounded up to a power of two (at least 1024): few distinct shapes for XLA."""
    return max(1024, 1 << (n - 1).bit_length())


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, x.dtype)
    out[: x.size] = x
    return out


class _Control(NamedTuple):
    """Lookup tables of the sorted distinct control values of a block of genes.

    Gene ``j``'s distinct values (keys, ascending) are ``tab[1 + j * stride:][:u_j]``;
    ``le`` holds ``#{c <= d}`` for each (so ``#{c == d}`` is ``le[i] - le[i - 1]``). Each
    gene's row is padded with ``(kmax, 0)`` for at least ``2**steps - 1`` entries (and
    ``tab[0]`` is padding), so ``pos - 1`` below a gene's first value and
    ``pos + step - 1`` past its last one read padding. A value ``v`` of gene ``j`` falls in
    bucket ``min((max(v, lo_j) - lo_j) >> shift_j, nb - 1)`` (monotone in ``v``);
    ``start[j * nb + bucket]`` is the ``tab`` index of the gene's first distinct value in
    that bucket or later, and a bucket holds fewer than ``2**steps`` distinct values.
    """

    tab: np.ndarray
    le: np.ndarray  # int32
    lo: np.ndarray  # (w,) keys
    shift: np.ndarray  # (w,) keys' dtype
    start: np.ndarray  # (w * nb,) int32
    steps: int
    const: np.ndarray  # (w,) Σ_v (b_v³ - b_v), int64


def _control_tables(ctrl: np.ndarray, uint, nb: int) -> _Control:
    """:class:`_Control` of ``ctrl`` (``(m, w)`` values of ``w`` genes, ``m > 0``)."""
    m, w = ctrl.shape
    genes = np.arange(w)
    ck = _float_keys_t(ctrl, uint)
    ck.sort(axis=1)
    newc = np.empty((w, m), bool)
    newc[:, :1] = True
    np.not_equal(ck[:, 1:], ck[:, :-1], out=newc[:, 1:])
    cst = np.flatnonzero(newc)  # runs of equal values = the distinct values
    clen = np.diff(cst, append=w * m)
    per_gene = np.count_nonzero(newc, axis=1)  # >= 1
    gfirst = np.cumsum(per_gene) - per_gene
    const = np.add.reduceat(clen * (clen * clen - 1), gfirst)
    dkey = ck.reshape(-1)[cst]
    dgene = np.repeat(genes, per_gene)
    # buckets: lo = the second smallest value (the gap after the smallest, often 0, would
    # take most buckets), shift = the smallest that fits the span into nb buckets
    lo = dkey[gfirst + (per_gene > 1)]
    span = dkey[gfirst + per_gene - 1] - lo
    shift = np.maximum(np.frexp(span.astype(np.float64))[1] - (nb.bit_length() - 1), 0)
    shift = shift.astype(uint)
    dbuck = np.maximum(dkey, lo[dgene])
    dbuck -= lo[dgene]
    dbuck >>= shift[dgene]
    # bucket sizes shifted by one: their running sum, plus the row bases, is `start`
    occ = np.bincount(dgene * nb + dbuck.astype(np.intp) + 1, minlength=w * nb + 1)
    steps = int(occ.max()).bit_length()  # a bucket's values and one past them
    stride = int(per_gene.max()) + (1 << steps)
    occ = occ[: w * nb]
    occ[0] += 1  # tab[0] is padding
    occ[nb::nb] += stride - per_gene[:-1]  # the previous gene's padding
    start = np.cumsum(occ, dtype=np.int32)
    dest = np.arange(cst.size) + np.repeat(1 + genes * stride - gfirst, per_gene)
    size = _bucketed(1 + w * stride)
    tab = np.full(size, np.iinfo(uint).max, uint)
    le = np.zeros(size, np.int32)
    tab[dest] = dkey
    le[dest] = cst + clen - dgene * m
    return _Control(tab, le, lo, shift, start, steps, const)


class _Runs(NamedTuple):
    """Runs of equal values within the slots of a block of ``w`` genes, gene-major.

    Run ``i`` covers ``xs[st[i]:st[i + 1]]`` of the flattened ``(w, n)`` keys (each slot
    sorted); ``st`` is padded with ``w·n`` (empty runs) to :func:`_bucketed` length + 1.
    """

    count: int
    n: int
    xs: np.ndarray  # (w * n,) keys
    st: np.ndarray  # int32
    first: np.ndarray  # (w * S,) index of the first run of each (gene, slot)


def _group_runs(grp: np.ndarray, lay: _Layout, uint) -> _Runs:
    """:class:`_Runs` of ``grp`` (``(n, w)`` values, rows in layout order)."""
    n, w = grp.shape
    xs = _float_keys_t(grp, uint)
    if lay.pad.size:
        xs[:, lay.pad] = np.iinfo(uint).max
    for first, k, size in lay.classes:  # one sort per group size: each slot sorted
        xs[:, first : first + k * size].reshape(w, k, size).sort(axis=-1)
    new = np.empty((w, n), bool)
    np.not_equal(xs[:, 1:], xs[:, :-1], out=new[:, 1:])
    new[:, lay.seg_start] = True
    starts = np.flatnonzero(new)
    first = np.searchsorted(starts, (np.arange(w)[:, None] * n + lay.seg_start).reshape(-1))
    st = np.full(_bucketed(starts.size) + 1, w * n, np.int32)
    st[: starts.size] = starts
    return _Runs(starts.size, n, xs.reshape(-1), st, first)


def _run_fields(runs: _Runs, xp=np):
    """Per run: value (key), length ``a`` (0 for padding) and gene; NumPy: unpadded."""
    st = runs.st if xp is not np else runs.st[: runs.count + 1]
    a = st[1:] - st[:-1]
    st = st[:-1]
    vals = runs.xs[st] if xp is np else jnp.take(runs.xs, st, mode="clip")
    kmax = np.dtype(vals.dtype).type(np.iinfo(vals.dtype).max)
    a = a * (vals != kmax)  # drop the slot padding (only a NaN key equals it)
    return vals, a, st // runs.n


def _lookup(ct, vals, gene, *, nb: int, steps: int, xp=np):
    """``R = #{c <= v}`` and ``b = #{c == v}`` of every run (NumPy or jax.numpy)."""
    lo = ct.lo[gene]
    bk = xp.minimum((xp.maximum(vals, lo) - lo) >> ct.shift[gene], nb - 1)
    pos = ct.start[gene * nb + bk.astype(xp.int32)]
    for step in (1 << i for i in range(steps - 1, -1, -1)):
        pos = pos + xp.where(ct.tab[pos + step - 1] <= vals, step, 0)  # branchless search
    pos = pos - 1  # the last distinct control value <= v
    r = ct.le[pos]
    return r, xp.where(ct.tab[pos] == vals, r - ct.le[pos - 1], 0)


@partial(jax.jit, static_argnames=("n", "nb", "steps"))
def _lookup_xla(st, xs, lo, shift, start, tab, le, *, n: int, nb: int, steps: int):
    """:func:`_run_fields` and :func:`_lookup` in XLA: a few fused loops instead of
    NumPy's pass per operation."""
    vals, a, gene = _run_fields(_Runs(0, n, xs, st, None), jnp)
    ct = _Control(tab, le, lo, shift, start, steps, None)
    return (a, *_lookup(ct, vals, gene, nb=nb, steps=steps, xp=jnp))


def _run_terms(a, r, b, xp=np):
    """Per run ``(a (2R - b), a (a² - 1 + 3 b (a + b)))`` in int64."""
    a, r, b = (z.astype(xp.int64) for z in (a, r, b))
    return a * (2 * r - b), a * (a * a - 1 + 3 * b * (a + b))


# a separate jit: fused with _lookup_xla, XLA recomputes the lookups per output
_run_terms_xla = jax.jit(partial(_run_terms, xp=jnp))


def _block_counts(ctrl, grp, lay: _Layout, uint, nb: int, width: int, xla: bool, lap):
    """Exact ``(2U, T)`` per (gene, segment) of one block of genes, ``(w, S)`` int64."""
    t0 = time.thread_time()
    m, w = ctrl.shape
    runs = _group_runs(grp, lay, uint)
    t0 = lap("group sort + runs", t0)
    nr = runs.count
    if m == 0:
        _, a, _ = _run_fields(runs)
        u2, tt = _run_terms(a, np.zeros_like(a), np.zeros_like(a))
    else:
        ct = _control_tables(ctrl, uint, nb)
        t0 = lap("control sort + tables", t0)
        if xla:
            if w < width:  # the last block: the same shapes as the others
                lo, shift, start = (_padded(ct.lo, width), _padded(ct.shift, width),
                                    _padded(ct.start, width * nb))  # fmt: skip
                ct = ct._replace(lo=lo, shift=shift, start=start)
            # x64 for the int64 terms and uint64 keys (worker threads do not inherit the
            # caller's jax.enable_x64 context)
            with jax.enable_x64(True):
                arb = _lookup_xla(
                    runs.st, runs.xs, ct.lo, ct.shift, ct.start, ct.tab, ct.le,
                    n=runs.n, nb=nb, steps=ct.steps,
                )  # fmt: skip
                u2, tt = (np.asarray(z)[:nr] for z in _run_terms_xla(*arb))
            t0 = lap("lookup + terms (xla)", t0)
        else:
            vals, a, gene = _run_fields(runs)
            r, b = _lookup(ct, vals, gene.astype(np.intp), nb=nb, steps=ct.steps)
            u2, tt = _run_terms(a, r, b)
            t0 = lap("lookup + terms (numpy)", t0)
    nseg = lay.seg_start.size
    u2 = np.add.reduceat(u2, runs.first).reshape(w, nseg)
    tt = np.add.reduceat(tt, runs.first).reshape(w, nseg)
    if m:
        tt += ct.const[:, None]
    lap("sums", t0)
    return u2, tt


def _host_counts(
    cells: np.ndarray,
    labels: np.ndarray,
    control: np.ndarray,
    n_groups: int,
    *,
    xla: bool = True,
    threads: int | None = None,
    profile: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U``, tie term ``T`` (both ``(n_groups, G)`` float64, exact) and ``n`` on the host.

    ``cells`` and ``control`` are float32 or float64 (the same). NumPy does the sorts and
    the run extraction (genes in cache-sized blocks, on ``threads`` threads); the per-run
    lookup and arithmetic run in XLA (``xla=True``; not from inside a callback) or NumPy.
    ``profile``, when given, accumulates thread CPU seconds per stage (XLA's own threads
    are not counted).
    """
    t0 = time.thread_time()
    m, g = control.shape
    lay, sizes = _layout(labels, n_groups)
    u = np.zeros((n_groups, g))
    ties = np.zeros((n_groups, g))
    n = lay.rows.size
    if g == 0 or n == 0:
        return u, ties, sizes
    uint = np.uint32 if control.dtype == np.float32 else np.uint64
    nb = 1 << max(4, min(12, (_NB_PER_CELL * m).bit_length()))  # buckets per gene
    threads = _HOST_THREADS if threads is None else threads
    # cache-sized blocks of genes, a multiple of `threads` of them (balanced)
    nblocks = -(-g * (m + n) // _BLOCK_ELEMENTS)
    nblocks = min(g, -(-nblocks // threads) * threads)
    width = -(-g // nblocks)
    blocks = [slice(s, min(s + width, g)) for s in range(0, g, width)]

    def lap(name, t0):
        t1 = time.thread_time()
        if profile is not None:
            profile[name] = profile.get(name, 0.0) + t1 - t0
        return t1

    lap("layout", t0)

    rows = lay.rows
    if cells.nbytes <= 1 << 28:  # layout order once, else block by block
        cells, rows = cells[rows], slice(None)

    def run(s):
        return _block_counts(control[:, s], cells[rows, s], lay, uint, nb, width, xla, lap)

    if threads > 1 and len(blocks) > 1:
        with ThreadPoolExecutor(min(threads, len(blocks))) as ex:
            out = list(ex.map(run, blocks))
    else:
        out = [run(s) for s in blocks]
    u[lay.seg_group] = np.concatenate([o[0] for o in out]).T / 2
    ties[lay.seg_group] = np.concatenate([o[1] for o in out]).T
    return u, ties, sizes


def _host_counts_cb(cells, labels, control, *, n_groups: int):
    """:func:`_host_counts` for :func:`jax.pure_callback`: results in the input dtype."""
    cells, control = np.asarray(cells), np.asarray(control)
    u, ties, n = _host_counts(cells, np.asarray(labels), control, n_groups, xla=False)
    dt = cells.dtype
    return u.astype(dt), ties.astype(dt), n.astype(dt)


# ============================================================================== JAX


def _run_lengths(new_run: jax.Array) -> jax.Array:
    """Length of the run each element belongs to, given a (N, G) mask of run starts."""
    n = new_run.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)[:, None]
    start = jax.lax.cummax(jnp.where(new_run, idx, 0), axis=0)
    is_end = jnp.concatenate([new_run[1:], jnp.ones_like(new_run[:1])], axis=0)
    end = jax.lax.cummin(jnp.where(is_end, idx, n), axis=0, reverse=True)
    return end - start + 1


_searchsorted_cols = {
    side: jax.vmap(partial(jnp.searchsorted, side=side), in_axes=(1, 1), out_axes=1)
    for side in ("left", "right")
}


def _jax_counts(cells: jax.Array, labels: jax.Array, control: jax.Array, n_groups: int):
    """``U``, tie term and ``n`` in the input dtype, with XLA sorts (accelerator path)."""
    dtype = cells.dtype
    valid = (labels >= 0) & (labels < n_groups)
    labels = jnp.where(valid, labels, n_groups)  # invalid cells go to a dropped segment
    g = cells.shape[1]

    # control: sorted once per gene, and its own tie runs
    ctrl = jnp.sort(control, axis=0)
    ctrl_new = jnp.concatenate([jnp.ones((1, g), bool), ctrl[1:] != ctrl[:-1]], axis=0)
    bc = _run_lengths(ctrl_new).astype(dtype)
    ctrl_ties = jnp.sum(bc * bc - 1.0, axis=0)  # Σ_j (b_j² - 1) = Σ_v (b_v³ - b_v)

    # group cells sorted by (label, value): label order is the same in every gene column
    lab2d = jnp.broadcast_to(labels[:, None], cells.shape)
    lab_s, x = jax.lax.sort((lab2d, cells), dimension=0, num_keys=2)
    seg = lab_s[:, 0]
    new = jnp.concatenate(
        [jnp.ones((1, g), bool), (x[1:] != x[:-1]) | (lab_s[1:] != lab_s[:-1])], axis=0
    )
    a = _run_lengths(new).astype(dtype)
    left = _searchsorted_cols["left"](ctrl, x).astype(dtype)
    right = _searchsorted_cols["right"](ctrl, x).astype(dtype)
    b = right - left

    nseg = n_groups + 1
    u = jax.ops.segment_sum(left + 0.5 * b, seg, num_segments=nseg)[:n_groups]
    ties = jax.ops.segment_sum(a * a - 1.0 + 3.0 * a * b + 3.0 * b * b, seg, num_segments=nseg)
    ties = ties[:n_groups] + ctrl_ties
    n = jax.ops.segment_sum(jnp.ones_like(seg, dtype=dtype), seg, num_segments=nseg)[:n_groups]
    return u, ties, n


def mannwhitney_from_counts(
    u: jax.Array, ties: jax.Array, n: jax.Array, m: int, continuity: bool, tie_correct: bool
) -> MannWhitneyResult:
    """The Mann–Whitney result of every (group, gene) from its counts: ``u`` (``U`` of each
    group against the ``m`` control cells), ``ties`` (the tie term ``Σ t(t² − 1)`` of the
    pooled values) and ``n`` the group sizes: z-scores and two-sided normal p-values with
    scipy's continuity and tie corrections. What every test path of this module (dense,
    sparse, split) ends with; :data:`mannwhitney_from_counts_jit` is its jitted form."""
    dtype = u.dtype
    nn = n[:, None]
    big_n = nn + m
    mu = nn * m / 2.0
    var = nn * m / 12.0 * (big_n + 1.0)
    if tie_correct:
        denom = jnp.where(big_n > 1, big_n * (big_n - 1.0), 1.0)
        var = nn * m / 12.0 * ((big_n + 1.0) - ties / denom)
    # σ² = 0 exactly when every value is tied; the tie term carries rounding, so treat a
    # variance within a few ulps of the untied variance's scale as zero
    scale = nn * m / 12.0 * (big_n + 1.0)
    pos = var > 16 * jnp.finfo(dtype).eps * scale
    var = jnp.where(pos, var, 0.0)
    sigma = jnp.sqrt(var)
    safe_sigma = jnp.where(pos, sigma, 1.0)
    d = u - mu
    cc = 0.5 if continuity else 0.0
    # scipy: z = (max(U1, U2) - mu - cc) / sigma, which is negative when |d| < cc
    z_abs = jnp.where(
        pos, (jnp.abs(d) - cc) / safe_sigma, jnp.where(jnp.abs(d) > cc, jnp.inf, -jnp.inf)
    )
    if not continuity:
        z_abs = jnp.where(pos | (d != 0), z_abs, jnp.nan)
    p = jnp.clip(2.0 * ndtr(-z_abs), 0.0, 1.0)
    zscore = jnp.where(pos, (d - cc * jnp.sign(d)) / safe_sigma, 0.0)
    empty = nn == 0
    nan = jnp.array(jnp.nan, dtype)
    return MannWhitneyResult(
        statistic=jnp.where(empty, nan, u),
        zscore=jnp.where(empty, nan, zscore),
        pvalue=jnp.where(empty, nan, p),
        n=n,
    )


#: :func:`mannwhitney_from_counts` under ``jax.jit`` (``m`` and the corrections static)
mannwhitney_from_counts_jit = jax.jit(
    mannwhitney_from_counts, static_argnames=("m", "continuity", "tie_correct")
)


@partial(jax.jit, static_argnames=("n_groups", "continuity", "tie_correct", "path"))
def _mannwhitney(
    cells: ArrayLike,
    labels: ArrayLike,
    control: ArrayLike,
    *,
    n_groups: int,
    continuity: bool,
    tie_correct: bool,
    path: str,
) -> MannWhitneyResult:
    """The whole test in one jit; ``path``: ``"jax"`` (XLA sorts) or ``"host"`` (callback)."""
    dtype = jnp.result_type(jnp.float32, cells, control)
    cells = jnp.asarray(cells, dtype)
    control = jnp.asarray(control, dtype)
    labels = jnp.asarray(labels, jnp.int32)
    g = cells.shape[1]
    if path == "host":
        out = (
            jax.ShapeDtypeStruct((n_groups, g), dtype),
            jax.ShapeDtypeStruct((n_groups, g), dtype),
            jax.ShapeDtypeStruct((n_groups,), dtype),
        )
        cb = partial(_host_counts_cb, n_groups=n_groups)
        u, ties, n = jax.pure_callback(cb, out, cells, labels, control, vmap_method="sequential")
    else:
        u, ties, n = _jax_counts(cells, labels, control, n_groups)
    return mannwhitney_from_counts(u, ties, n, control.shape[0], continuity, tie_correct)


def mannwhitney_vs_control(
    cells: ArrayLike,
    labels: ArrayLike,
    control: ArrayLike,
    *,
    n_groups: int,
    continuity: bool = True,
    tie_correct: bool = True,
) -> MannWhitneyResult:
    r"""Two-sided Mann–Whitney U test of every group against the control, for every gene.

    .. math:: U_{pg} = \sum_{i \in p} \big(\#\{c_g < x_{ig}\} + \tfrac12 \#\{c_g = x_{ig}\}\big),
              \quad z = \frac{|U - nm/2| - \tfrac12}{\sigma}, \quad p = \min(1, 2\Phi(-z))

    On CPU the counting runs on the host (NumPy sorts and small XLA lookups when called
    eagerly; NumPy through :func:`jax.pure_callback` when traced), elsewhere in JAX (XLA
    sorts); see the module docstring. Jittable and vmappable.

    Args:
      cells: perturbed cells, ``(N, G)`` (any order).
      labels: integer group of each cell, ``(N,)``, values in ``[0, n_groups)``. Cells with
        a label outside that range are ignored.
      control: control cells, ``(m, G)``.
      n_groups: number of groups (static).
      continuity: apply the 0.5 continuity correction (scipy / cell-eval default).
      tie_correct: apply the tie correction to the variance (scipy / cell-eval: yes;
        scanpy's default: no).

    Returns:
      :class:`MannWhitneyResult` with ``(n_groups, G)`` arrays.

    References:
      scipy.stats.mannwhitneyu(method="asymptotic"); docs/metrics.md §10.
    """
    kw = dict(n_groups=n_groups, continuity=continuity, tie_correct=tie_correct)
    if jax.default_backend() != "cpu":
        return _mannwhitney(cells, labels, control, path="jax", **kw)
    if any(isinstance(a, jax.core.Tracer) for a in (cells, labels, control)):
        return _mannwhitney(cells, labels, control, path="host", **kw)
    dtype = jnp.result_type(jnp.float32, cells, control)
    control = np.asarray(control, dtype)
    u, ties, n = _host_counts(np.asarray(cells, dtype), np.asarray(labels), control, n_groups)
    return mannwhitney_from_counts_jit(
        u.astype(dtype),
        ties.astype(dtype),
        n.astype(dtype),
        m=control.shape[0],
        continuity=continuity,
        tie_correct=tie_correct,
    )


def bh_fdr(pvalues: ArrayLike) -> jax.Array:
    r"""Benjamini–Hochberg adjusted p-values over the last axis (genes).

    .. math:: q_{(i)} = \min\big(1, \min_{j \ge i} p_{(j)} \, G / j\big)

    Equal to ``scipy.stats.false_discovery_control(p)`` row by row: it is
    :func:`vcjax.stats.benjamini_hochberg` with NaN p-values treated as 1 for the ranking,
    and they stay NaN in the output.

    Args:
      pvalues: ``(..., G)``.

    Returns:
      ``(..., G)`` adjusted p-values.
    """
    p = jnp.asarray(pvalues)
    p = jnp.asarray(p, jnp.result_type(jnp.float32, p))
    isnan = jnp.isnan(p)
    out = benjamini_hochberg(jnp.where(isnan, 1.0, p))
    return jnp.where(isnan, jnp.nan, out)


def log2_fold_change(group_mean: ArrayLike, control_mean: ArrayLike) -> jax.Array:
    r"""cell-eval / pdex log2 fold change from log1p pseudobulk means (``epsilon = 0``).

    .. math:: \mathrm{lfc} = \log_2 \frac{\mathrm{expm1}(\bar x_{\mathrm{pert}})}
                                          {\mathrm{expm1}(\bar x_{\mathrm{ctrl}})}

    (the geometric mean of counts from the mean of log1p values). ``0/0`` gives 0, a
    one-sided zero gives ``±inf``. ``sign(lfc) = sign(x̄_pert - x̄_ctrl)``.

    Args:
      group_mean, control_mean: ``(..., G)`` means of log1p expression.

    Returns:
      ``(..., G)``.
    """
    gm = jnp.expm1(jnp.asarray(group_mean))
    cm = jnp.expm1(jnp.asarray(control_mean))
    lfc = jnp.log2(gm) - jnp.log2(cm)
    both_zero = (gm == 0) & (cm == 0)
    return jnp.where(both_zero | jnp.isnan(lfc), 0.0, lfc)
