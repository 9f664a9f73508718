"""The cell bootstrap: cells resampled within condition-halves, the whole truth side re-derived.

The cells of every condition (each perturbation *and* the control group) are resampled
with replacement *within each technical-duplicate half*, so every group keeps its size. A
resample is represented by integer multiplicity weights ``w_ri`` on the cells (one
multinomial draw per group-half, :func:`multiplicity_weights`): the resampled sufficient
statistics are ``Σ_i w_ri x_i`` and ``Σ_i w_ri x_i²`` per group, a weights ``@`` cells
product, never a copy of the data per resample. Everything else is the point estimate's
own code on the resampled sums: :func:`vcjax.pipeline.derive` (truth, Δ reference,
``u_NTC``, ``u_ALL``, the DEG t-tests, weights and sets, every baseline — the null with the
*same* derangement as the point estimate), :func:`vcjax.metrics.fused_scores` for every
metric of the model and of every baseline on the *same* resamples (paired), and
:func:`vcjax.pipeline.gate` for DbD's gates. The model's prediction is fixed.

NaN rules: resamples in which a value is NaN (an undefined metric, a gate that fired in
that resample) are ignored for that row; the fraction ignored is reported in the column
``boot_nan_frac``. A row whose point estimate is NaN gets NaN intervals, as does a row with
no finite resample.

Comparisons: for each baseline ``b`` and metric, rows with ``source = "model-vs-<b>"``,
``value = s·(m_model − m_b)`` with ``s = +1`` for higher-is-better metrics and ``−1`` for
errors, so **positive always means the model is better**; ``ci_low``/``ci_high`` are the
interval of the paired resampled differences and ``win_rate`` is the fraction of the
resamples (both values finite) in which the model is strictly better.

BCa acceleration: a jackknife over cells would need one full evaluation per cell, so ``a`` is
estimated from the resample distribution as ``a = γ*/6`` (:func:`vcjax.stats.bca_interval`).

Reproducibility: resample ``r`` of stratum (covariate value) ``j`` uses the key
``fold_in(fold_in(PRNGKey(seed), j), r)``, so the same seed gives identical intervals and
the results do not depend on the chunk size (resamples evaluated at once). Peak memory of
the resampling is ``O(chunk × groups × genes)`` plus the cell matrix (held once, dense, in
the blocked layout below) and is independent of ``n_boot``; the stored resampled values
are ``n_boot × rows`` (float32, float64 under x64).

Layout: the cells of each group-half are cut into blocks of ``L`` cells (zero-padded), so
the resampled sums are one batched ``(chunk × L) @ (L × 2G)`` product per block; a
group-half takes its first block and adds its others (only large groups, such as the
controls, have more than one). The values are not centred before squaring, so a gene that
is zero in every drawn cell of a group has a variance of exactly 0, as in
:func:`vcjax.data.group_stats` (float32 variances of log-normalised data lose about
``eps · E[x²]/Var[x]`` relative precision to cancellation).

References:
  Efron & Tibshirani (1993), *An Introduction to the Bootstrap*, ch. 14 and 22.
  Hill, G. W. (1970). Algorithm 395: Student's t-distribution. CACM 13, 617–619.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from vcjax import engine
from vcjax._errors import VcjaxInputError
from vcjax._host import aligned_empty, device_array, run_blocks, working_dtype
from vcjax.data import iter_chunks, normalize_chunk
from vcjax.metrics import (
    METRICS,
    fused_scores,
    gate,
    higher_is_better,
    metric_bounds,
    pearson_delta,
    topk_indices,
)
from vcjax.pipeline._align import Prediction
from vcjax.pipeline._calibrate import calibrate
from vcjax.pipeline._derive import DEG, Derived, Fixed, Plan, Sums, deg_arrays, derive
from vcjax.pipeline._scoring import usable_metrics
from vcjax.pipeline._screen import Screen, Stratum
from vcjax.pipeline._spec import BootSpec, ScoreSpec, TruthSpec
from vcjax.stats import (
    draw_within_groups,
    interval,
    jackknife_acceleration,
    per_cell_groups,
    win_rate,
)

__all__ = [
    "add_intervals",
    "Resampler",
    "default_chunk",
    "multiplicity_weights",
    "resampled_truth",
    "resampler",
    "resampled_group_moments",
    "stratum_key",
    "stratum_samples",
    "summary_intervals",
    "sums_scorer",
]

log = logging.getLogger("vcjax")


# =========================================================================== keys & weights


def stratum_key(seed: int, index: int) -> jax.Array:
    """The key of stratum (covariate value) ``index``: ``fold_in(PRNGKey(seed), index)``."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), index)


@functools.partial(jax.jit, static_argnames="n")
def _resample_keys(key: jax.Array, start, *, n: int) -> jax.Array:
    """The keys ``fold_in(key, r)`` of resamples ``r = start .. start + n - 1`` (one compiled
    function per ``n``, not a retrace per chunk)."""
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(start + jnp.arange(n))


@functools.partial(jax.jit, static_argnames=("n_cells",))
def _weights_chunk(
    keys: jax.Array, starts: jax.Array, sizes: jax.Array, *, n_cells: int
) -> jax.Array:
    def one(k):
        idx = draw_within_groups(k, starts, sizes)
        return jnp.zeros((n_cells,), jnp.int32).at[idx].add(1)

    return jax.vmap(one)(keys)


def multiplicity_weights(
    key: jax.Array, group_sizes: ArrayLike, n_boot: int, *, start: int = 0
) -> jax.Array:
    """Integer multiplicity weights of ``n_boot`` within-group bootstrap resamples.

    The cells are ordered group by group (the first ``group_sizes[0]`` cells are group 0,
    …). Resample ``r`` (key ``fold_in(key, start + r)``) draws, for each group of ``n``
    cells, ``n`` cells uniformly with replacement among that group's cells; ``w_ri`` is the
    number of times cell ``i`` was drawn, so ``Σ_{i∈g} w_ri = n_g`` (a multinomial
    ``Mult(n_g, 1/n_g)`` per group). ``Σ_i w_ri f(x_i)`` is then the resampled sum of any
    per-cell quantity.

    Args:
      key: a ``jax.random`` key.
      group_sizes: ``(C,)`` cells per group.
      n_boot: number of resamples.
      start: index of the first resample (resample ``r`` depends only on ``key`` and
        ``start + r``, so chunks of resamples can be generated independently).

    Returns:
      ``(n_boot, N)`` int32 weights, ``N = Σ group_sizes``.
    """
    starts, sizes = per_cell_groups(np.asarray(group_sizes))
    keys = _resample_keys(key, start, n=n_boot)
    return _weights_chunk(keys, device_array(starts), device_array(sizes), n_cells=int(starts.size))


def resampled_group_moments(
    X: ArrayLike, codes: ArrayLike, weights: ArrayLike, *, n_groups: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-group weighted count, sum and sum of squares for each resample.

    .. math:: n_{rc} = \\sum_{i: c(i)=c} w_{ri},\\quad S_{rc} = \\sum_{i: c(i)=c} w_{ri} x_i,
              \\quad Q_{rc} = \\sum_{i: c(i)=c} w_{ri} x_i^2

    A product ``(B × N) @ (N × G)`` per group via a one-hot matrix: meant for user-sized
    arrays (for whole screens :func:`stratum_samples` uses a blocked layout).

    Args:
      X: ``(N, G)`` cell values.
      codes: ``(N,)`` integer group code per cell (``0..C−1``).
      weights: ``(B, N)`` multiplicities (e.g. :func:`multiplicity_weights`).
      n_groups: ``C``; default ``max(codes) + 1``.

    Returns:
      ``(n, S, Q)`` with shapes ``(B, C)``, ``(B, C, G)``, ``(B, C, G)``.
    """
    X = jnp.asarray(X)
    codes_np = np.asarray(codes)
    C = int(n_groups if n_groups is not None else codes_np.max() + 1)
    w = jnp.asarray(weights).astype(
        X.dtype if jnp.issubdtype(X.dtype, jnp.floating) else jnp.float32
    )
    onehot = jax.nn.one_hot(jnp.asarray(codes_np), C, dtype=w.dtype)  # (N, C)
    wc = w[:, :, None] * onehot[None]  # (B, N, C)
    n = jnp.sum(wc, axis=1)
    S = jnp.einsum("bnc,ng->bcg", wc, X)
    Q = jnp.einsum("bnc,ng->bcg", wc, X * X)
    return n, S, Q


# =========================================================================== cell layout


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The cells of one stratum in the blocked layout (device arrays ``Xm``, ``Xe``)."""

    n1: np.ndarray  # (C,)
    n2: np.ndarray  # (C,)
    sizes: np.ndarray  # (2C,) cells per group-half (code 2c + half − 1)
    n_cells: int
    pos: np.ndarray  # (N,) slot of each sorted cell: first blocks, then the extra blocks
    extra_gh: np.ndarray  # (ne,) group-half of each extra block
    L: int
    Xm: jax.Array  # (2C, L, 2G) [x, x²] of each group-half's first block, zero padding
    Xe: jax.Array  # (ne, L, 2G) the further blocks of the large group-halves


def _block_size(sizes: np.ndarray) -> int:
    med = float(np.median(sizes[sizes > 0])) if np.any(sizes > 0) else 8.0
    return int(min(512, max(8, 8 * math.ceil(med / 8))))


def _block_slots(sizes: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Slots of the cells (sorted by group-half) in the blocked layout, and the group-half of
    each extra block. Group-half ``h`` has its first block at ``h`` (an empty one keeps an
    all-padding block), and its further blocks after all the first blocks, in order."""
    n_gh = sizes.size
    extra = np.maximum(0, -(-sizes // L) - 1)
    extra_start = n_gh + np.concatenate([[0], np.cumsum(extra)[:-1]]).astype(np.int64)
    gh = np.repeat(np.arange(n_gh), sizes)
    j = np.arange(gh.size) - np.repeat(np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
    k = j // L
    block = np.where(k == 0, gh, extra_start[gh] + k - 1)
    return block * L + j % L, np.repeat(np.arange(n_gh), extra).astype(np.int32)


def _fill_rows(n_genes: int) -> int:
    """Cells per write into the layout: about 2**24 values, 256..8192 rows."""
    return int(min(8192, max(256, (1 << 24) // max(n_genes, 1))))


def _cell_values(cells, cell_rows: np.ndarray, pos: np.ndarray, *, rows_per: int):
    """Yield ``(slots, x)``: a few thousand cells' values (rows, G) and their slots, reading
    the matrix once. A dense in-memory matrix that needs no normalisation is gathered in
    layout order, in its own dtype; anything else (sparse, backed, counts) is streamed in
    row chunks by the reader of ``group_stats``."""
    adata = cells.open()
    X = adata.layers[cells.layer] if cells.layer is not None else adata.X
    if isinstance(X, np.ndarray) and cells.normalization != "log1p_cp10k":
        for i in range(0, cell_rows.size, rows_per):
            yield pos[i : i + rows_per], X[cell_rows[i : i + rows_per]]
        return
    slot_of = np.full(adata.n_obs, -1, dtype=np.int64)
    slot_of[cell_rows] = pos
    for start, stop, chunk in iter_chunks(X, rows_per):
        sl = slot_of[start:stop]
        sel = np.flatnonzero(sl >= 0)
        if sel.size == 0:
            continue
        part = chunk[sel]
        if cells.normalization == "log1p_cp10k":
            part = normalize_chunk(part)
        yield sl[sel], part.toarray() if sp.issparse(part) else part


def _write_runs(Xm: np.ndarray, Xe: np.ndarray, slots: np.ndarray, x) -> None:
    """Write cells ``x`` and their squares at ``slots`` (below ``len(Xm)``: ``Xm``, the rest
    ``Xe``), run by run of consecutive slots (whole-row copies, no fancy indexing)."""
    G = Xm.shape[1] // 2
    cut = np.flatnonzero((np.diff(slots) != 1) | (slots[1:] == Xm.shape[0])) + 1
    for a, b in zip(np.r_[0, cut], np.r_[cut, slots.size], strict=True):
        s0 = int(slots[a])
        buf, s0 = (Xm, s0) if s0 < Xm.shape[0] else (Xe, s0 - Xm.shape[0])
        dst = buf[s0 : s0 + (b - a)]
        dst[:, :G] = x[a:b]
        # the square of the stored (rounded) value, as in the point estimate's sums of squares
        np.multiply(dst[:, :G], dst[:, :G], out=dst[:, G:])


def _read_layout(stratum: Stratum, *, dtype) -> _Layout:
    """Stream the stratum's cells once into the blocked layout, checked against its sums.

    The blocks are written in aligned host buffers that the device adopts without a copy;
    their sums must give the point estimate's group sums.
    """
    cells = stratum.cells
    C = len(stratum.groups)
    rows = np.flatnonzero(cells.codes >= 0)
    gh = 2 * cells.codes[rows].astype(np.int64) + (cells.half[rows].astype(np.int64) - 1)
    order = np.argsort(gh, kind="stable")
    cell_rows, gh_sorted = rows[order], gh[order]
    sizes = np.bincount(gh_sorted, minlength=2 * C).astype(np.int64)
    h1, h2 = stratum.stats.half1, stratum.stats.half2
    n1, n2 = np.asarray(h1.n, dtype=np.int64), np.asarray(h2.n, dtype=np.int64)
    if not (np.array_equal(sizes[0::2], n1) and np.array_equal(sizes[1::2], n2)):
        raise VcjaxInputError("bootstrap: the cells found do not match the screen's group sizes")
    L = _block_size(sizes)
    pos, extra_gh = _block_slots(sizes, L)
    G = len(stratum.genes)
    # the layout in 64-byte aligned host buffers, which the device adopts without a copy;
    # zero pages, so the padding slots (the end of each group-half's last block) need no
    # write
    n_main = 2 * C * L
    Xm = aligned_empty((n_main, 2 * G), np.dtype(dtype), zeros=True)
    Xe = aligned_empty((extra_gh.size * L, 2 * G), np.dtype(dtype), zeros=True)
    # each batch of cells is written (a worker thread) while the next is read (this one)
    with ThreadPoolExecutor(max_workers=1) as writer:
        job = None
        for slots, x in _cell_values(cells, cell_rows, pos, rows_per=_fill_rows(G)):
            if job is not None:
                job.result()
            job = writer.submit(_write_runs, Xm, Xe, slots, x)
        if job is not None:
            job.result()
    Xm, Xe = Xm.reshape(2 * C, L, 2 * G), Xe.reshape(-1, L, 2 * G)
    # the cells as written must give the point estimate's group sums (row blocks of
    # group-halves on the host threads: the same additions, in the same order, per entry)
    sums = np.empty((2 * C, G))

    def check(r0: int, r1: int) -> None:
        Xm[r0:r1, :, :G].sum(1, dtype=np.float64, out=sums[r0:r1])

    run_blocks(check, 2 * C, L * G)
    np.add.at(sums, extra_gh, Xe[..., :G].sum(1, dtype=np.float64))
    want = np.empty_like(sums)
    want[0::2], want[1::2] = h1.sum, h2.sum
    scale = np.sqrt((h1.sumsq + h2.sumsq).sum(0) + 1.0)
    if not np.allclose(sums / scale, want / scale, atol=1e-3 if dtype == np.float32 else 1e-8):
        raise VcjaxInputError(
            "bootstrap: re-reading the cells does not reproduce the screen's group sums "
            "(another file, layer or normalisation?)"
        )
    return _Layout(
        n1,
        n2,
        sizes,
        int(cell_rows.size),
        pos,
        extra_gh,
        L,
        jax.device_put(Xm),
        jax.device_put(Xe),  # adopted, not copied
    )


# ================================================================== the compiled resampler


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of the jitted chunk function (hashable)."""

    G: int
    plan: Plan
    deg: str  # "refit", "frozen", "array" (fixed user weights) or "none"
    sources: tuple[str, ...]
    metrics: tuple[str, ...]
    k: int
    strict: bool
    gate: bool
    uall: bool  # the Δ reference is u_ALL-type (DbD's data-mean gate applies)
    derangement: tuple[int, ...] | None
    additive: tuple[tuple[int, ...], ...]
    n_cells: int = 0  # the cell layout (not needed to score given sums)
    n_slots: int = 0
    sub_batch: int = 1 << 30  # resamples per metric sub-batch
    refit_batch: int = 1 << 30  # resamples per DEG-refit sub-batch

    def fixed(self, arrs: Mapping[str, jax.Array]) -> Fixed:
        return Fixed(
            reference=arrs.get("reference"),
            weights=arrs.get("weights"),
            derangement=None if self.derangement is None else np.asarray(self.derangement),
            additive=np.asarray(self.additive, dtype=np.int32),
        )


def _sums(cfg: _Config, S: jax.Array, arrs: Mapping[str, jax.Array]) -> Sums:
    """Resample-major ``(b, 2C, 2G)`` sums (half 1 and 2 interleaved; Σx then Σx²) as Sums."""
    G = cfg.G
    return Sums(
        arrs["n1"], arrs["n2"], S[:, 0::2, :G], S[:, 0::2, G:], S[:, 1::2, :G], S[:, 1::2, G:]
    )


def _refit_needs(cfg: _Config) -> tuple[str, ...]:
    """The per-resample DEG arrays the metric stage reads."""
    need = ["weights", "mask"]
    if "pearson_delta_topk" in cfg.metrics:
        need.append("scores")
    if "interpolated_duplicate" in cfg.sources:
        need.append("pvals_adj")
    return tuple(need)


def _refit(cfg: _Config, S: jax.Array, arrs: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The DEG arrays of resampled sums (:func:`vcjax.pipeline.deg_arrays`), those needed."""
    deg = deg_arrays(_sums(cfg, S, arrs), cfg.plan, xp=jnp)
    return {k: getattr(deg, k) for k in _refit_needs(cfg)}


def resampled_truth(
    cfg: _Config,
    sums: Sums,
    arrs: Mapping[str, jax.Array],
    refit: Mapping[str, jax.Array] | None = None,
) -> Derived:
    """:func:`vcjax.pipeline.derive` of resampled sums (the DEG arrays from ``refit`` when
    given, the point estimate's when frozen, else derived here)."""
    deg = None
    if cfg.deg == "refit" and refit is not None:
        deg = DEG(refit.get("scores"), refit.get("pvals_adj"), refit["weights"], refit["mask"])
    elif cfg.deg == "frozen":
        deg = DEG(*(arrs[f"deg_{k}"][None] for k in DEG._fields))
    return derive(sums, cfg.plan, cfg.fixed(arrs), xp=jnp, deg=deg)


def _resample_values(
    cfg: _Config,
    sums: Sums,
    arrs: Mapping[str, jax.Array],
    refit: Mapping[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """Every metric of every source, ``(sources, b, P)``, for sums with ``b`` resamples."""
    d = resampled_truth(cfg, sums, arrs, refit)
    preds = {"model": arrs["model"][None]} if "model" in cfg.sources else {}
    preds.update(d.baselines)
    return source_values(cfg, d, preds)


def source_values(cfg: _Config, d: Derived, preds: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Every metric of the sources ``cfg.sources`` (predictions ``preds``, each broadcastable
    to ``(b, P, G)``) against the resampled truth ``d``: ``{metric: (sources, b, P)}``, gated."""
    truth, ref, G = d.truth, d.reference, cfg.G
    mask = None if d.deg is None else d.deg.mask
    # All sources through each kernel at once: predictions stacked on a leading source axis
    # (one trace per metric, not per source × metric).
    stack = jnp.stack([jnp.broadcast_to(preds[s], truth.shape) for s in cfg.sources])
    stack, truth, ref = jax.lax.optimization_barrier((stack, truth, ref))
    lead = stack.shape[:3]

    def flat(x):  # one float dtype throughout, as engine.score casts its inputs
        x = x if x.dtype == bool else x.astype(stack.dtype)
        return jnp.broadcast_to(x, stack.shape).reshape(-1, G)

    def fused(names, reference, weights=None, mask=None):
        if not names:
            return {}
        w = flat(weights) if weights is not None else jnp.zeros((G,), stack.dtype)
        mk = flat(mask) if mask is not None else jnp.zeros((G,), bool)
        got = fused_scores(
            tuple(names), cfg.k, cfg.strict, flat(stack), flat(truth[None]), flat(reference), w, mk
        )
        return {n: v.reshape(lead) for n, v in got.items()}

    specs = {m: METRICS[m] for m in cfg.metrics}
    core = [m for m, s in specs.items() if s.reference != "control" and m != "pearson_delta_topk"]
    ctrl = [m for m, s in specs.items() if s.reference == "control"]
    weights = None if d.weights is None else d.weights[None]
    values = fused(core, ref[None, :, None], weights, None if mask is None else mask[None])
    got = fused(sorted({specs[m].kernel for m in ctrl}), d.u_ntc[None, :, None])
    values.update({m: got[specs[m].kernel] for m in ctrl})
    if "pearson_delta_topk" in specs:
        # the k genes depend on the resample and perturbation only: select them once and
        # gather every source's values there (not one top-k per source)
        topk_w = jnp.abs(d.deg.scores) if d.deg is not None else d.weights
        if cfg.k > G or cfg.k < 2:
            values["pearson_delta_topk"] = jnp.full(lead, jnp.nan, stack.dtype)
        else:
            idx = topk_indices(jnp.broadcast_to(topk_w, truth.shape), cfg.k)  # (b, P, k)
            ref_k = ref[jnp.arange(ref.shape[0])[:, None, None], idx]
            values["pearson_delta_topk"] = pearson_delta(
                jnp.take_along_axis(stack, idx[None], axis=-1),
                jnp.take_along_axis(truth, idx, axis=-1)[None],
                ref_k[None].astype(stack.dtype),
            )
    no_deg = None if mask is None else ~jnp.any(mask, axis=-1)[None]
    undefined = jnp.asarray([cfg.uall and s == "dataset_mean" for s in cfg.sources])[:, None, None]
    out: dict[str, jax.Array] = {}
    for m in cfg.metrics:
        v = jnp.broadcast_to(values[m], lead)
        out[m] = gate(m, v, no_deg=no_deg, undefined=undefined, xp=jnp) if cfg.gate else v
    return out


def _over_resamples(fn, batch: int, S: jax.Array, *rest):
    """``fn(S_r, *rest_r)`` over sub-batches of ``batch`` resamples (bounded memory).

    ``S`` is group-major ``(2C, b, 2G)``, as the cell product gives it; each sub-batch is
    sliced and turned resample-major ``(batch, 2C, 2G)`` on its own (in cache), never the
    whole chunk. ``rest`` are resample-major ``(b, ...)``; outputs are resample-major.
    ``batch`` is lowered to a divisor of ``b``.
    """
    b = S.shape[1]
    batch = max(d for d in range(1, min(batch, b) + 1) if b % d == 0)
    if batch == b:
        return fn(jnp.swapaxes(S, 0, 1), *rest)

    def body(i):
        s = jax.lax.dynamic_slice_in_dim(S, i * batch, batch, axis=1)
        r = jax.tree.map(lambda v: jax.lax.dynamic_slice_in_dim(v, i * batch, batch), rest)
        return fn(jnp.swapaxes(s, 0, 1), *r)

    out = jax.lax.map(body, jnp.arange(b // batch))
    return jax.tree.map(lambda v: v.reshape(b, *v.shape[2:]), out)


@functools.lru_cache(maxsize=16)
def _chunk_fn(cfg: _Config, devices: tuple[jax.Device, ...] = (), extra: Callable | None = None):
    """The resampler of one chunk of resamples: ``(keys (b, ...), arrs) -> values``.

    With ``extra`` (a module-level function ``extra(cfg, derived, arrs) -> pytree`` of
    resample-major arrays), it returns ``(values, extra_out)``: what the sweep contracts
    its models with, from the same resampled truth.

    Two jitted stages: (1) the resampled group sums and, with refitted weights, the DEG
    arrays (:func:`_refit`); (2) every metric of every source (:func:`_resample_values`).
    They are compiled apart because XLA:CPU's two fusion emitters suit them differently:
    the classic one vectorises the metric kernels' row reductions, but emits the
    t-test/p-value chain much slower than the newer one (``benchmarks/RESULTS.md``).

    With several ``devices`` the resample axis is sharded over a 1-D mesh
    (:func:`jax.shard_map`): each device draws and scores its own resamples from a
    replicated copy of the cells, so ``b`` must be a multiple of the device count.
    Resample ``r`` depends only on its key, so the values equal one device's.
    """

    def draw(keys, arrs):
        Xm, Xe = arrs["Xm"], arrs["Xe"]

        def weights_one(k):
            idx = draw_within_groups(k, arrs["starts"], arrs["per"])
            w = jnp.zeros((cfg.n_cells,), jnp.int32).at[idx].add(1)
            return jnp.zeros((cfg.n_slots,), Xm.dtype).at[arrs["pos"]].set(w.astype(Xm.dtype))

        W = jax.vmap(weights_one)(keys)  # (b, slots)
        b, n_gh, L = keys.shape[0], Xm.shape[0], Xm.shape[1]
        dims = (((2,), (1,)), ((1,), (0,)))  # block-batched (b, L) @ (L, 2G)
        # group-half sums, group-major (2C, b, 2G): the product of every group-half's first
        # block, plus the product of the further blocks of the large ones (the controls)
        # added in place (each stage turns its own sub-batches around)
        S = jax.lax.dot_general(W[:, : n_gh * L].reshape(b, n_gh, L), Xm, dims)
        if Xe.shape[0]:
            Se = jax.lax.dot_general(W[:, n_gh * L :].reshape(b, Xe.shape[0], L), Xe, dims)
            S = S.at[arrs["extra_gh"]].add(Se)
        refit = {}
        if cfg.deg == "refit":
            refit = _over_resamples(lambda s: _refit(cfg, s, arrs), cfg.refit_batch, S)
        return S, refit

    def score(S, refit, arrs):
        def one(s, r):  # values are (sources, b, P): resamples first while sub-batched
            d = resampled_truth(cfg, _sums(cfg, s, arrs), arrs, r)
            preds = {"model": arrs["model"][None]} if "model" in cfg.sources else {}
            preds.update(d.baselines)
            values = {k: jnp.swapaxes(v, 0, 1) for k, v in source_values(cfg, d, preds).items()}
            return values if extra is None else (values, extra(cfg, d, arrs))

        out = _over_resamples(one, cfg.sub_batch, S, refit)
        values = out if extra is None else out[0]
        values = {k: jnp.swapaxes(v, 0, 1) for k, v in values.items()}
        return values if extra is None else (values, out[1])

    if len(devices) > 1:
        mesh = Mesh(np.asarray(devices), ("resamples",))
        rs, rep = PartitionSpec("resamples"), PartitionSpec()
        # the host BH sort (pure_callback) carries no replication info: check_vma off
        rs1 = PartitionSpec(None, "resamples")  # group sums are (2C, b, 2G)
        draw = jax.shard_map(
            draw, mesh=mesh, in_specs=(rs, rep), out_specs=(rs1, rs), check_vma=False
        )
        values_spec = PartitionSpec(None, "resamples")  # values are (sources, b, P)
        score = jax.shard_map(
            score,
            mesh=mesh,
            in_specs=(rs1, rs, rep),
            out_specs=values_spec if extra is None else (values_spec, rs),
            check_vma=False,
        )
    fresh = jax.jit(draw)
    # the group sums and refit arrays of the previous chunk, donated: the next chunk's are
    # written into their buffers instead of newly mapped memory (page faults and zeroing
    # were a fifth of the CPU time)
    recycle = jax.jit(
        lambda keys, arrs, spare: draw(keys, arrs), donate_argnums=2, keep_unused=True
    )
    score = jax.jit(score, compiler_options=engine.compiler_options())

    def run(keys, arrs, spare=None):
        S, refit = fresh(keys, arrs) if spare is None else recycle(keys, arrs, spare)
        return score(S, refit, arrs), (S, refit)

    return run


def default_chunk(n_perts: int, n_genes: int, n_sources: int) -> int:
    """Resamples per chunk (the cells product): about 2**28 elements of group sums, 1..32.

    The product reads the whole cell matrix once per chunk, so its cost per resample falls
    as the chunk grows (``benchmarks/RESULTS.md``); the group sums of a chunk take
    ``chunk × 2(P+1) × 2G`` floats (1 GiB in float32 at that size and 32 resamples).
    """
    return int(max(1, min(32, (1 << 28) // max(1, 4 * (n_perts + 1) * n_genes))))


def default_sub_batch(n_perts: int, n_genes: int, n_sources: int) -> int:
    """Resamples per metric sub-batch: about 2**21 elements per ``(sources, b, P, G)`` stack."""
    return int(max(1, (1 << 21) // max(1, n_perts * n_genes * max(n_sources, 1))))


def default_refit_batch(n_perts: int, n_genes: int) -> int:
    """Resamples per DEG-refit sub-batch: about 2**23 elements per ``(b, P, G)`` array (larger
    than the metric stage's: the t-test chain streams, with no reuse to keep in cache; at
    P = 1000, G = 2000, 4 resamples were ~6 % faster than 8 and 16 ~10 % slower)."""
    return int(max(1, (1 << 23) // max(1, n_perts * n_genes)))


def _auto_pvalue(spec: TruthSpec, n1, n2, rows: Sequence[int]) -> str:
    """``"fast"`` when every DEG test has ``ν ≥ 30`` (groups of at least 31 cells), else exact."""
    nd = (np.asarray(n1) + np.asarray(n2)) if spec.weights_from == "all" else np.asarray(n1)
    npert = np.asarray([nd[r] for r in rows])
    min_dof = npert.min() - 1
    if spec.deg_method == "t-test":
        min_dof = min(min_dof, (npert.sum() - npert.max()) - 1)
    return "fast" if min_dof >= 30 else "exact"


def _static(
    stratum: Stratum,
    spec: TruthSpec,
    *,
    model: np.ndarray | None,
    metrics: Sequence[str],
    score: ScoreSpec,
    refit_weights: bool,
    pvalue: str,
) -> tuple[_Config, dict[str, Any]]:
    """The configuration and the resample-independent device arrays of one stratum's
    resampled scoring (everything but the cells)."""
    dtype = working_dtype()
    kind = spec.weights_kind
    deg = {"deg": "refit" if refit_weights else "frozen", "array": "array"}.get(kind, "none")
    plan = stratum.plan(spec)
    if pvalue == "auto":
        pvalue = _auto_pvalue(spec, stratum.stats.half1.n, stratum.stats.half2.n, plan.rows)
    fixed = stratum.fixed(spec)
    cfg = _Config(
        G=len(stratum.genes),
        plan=dataclasses.replace(plan, deg_strategy=pvalue),
        deg=deg,
        sources=(("model",) if model is not None else ()) + tuple(stratum.derived.baselines),
        metrics=tuple(usable_metrics(metrics, stratum)),
        k=int(score.k),
        strict=bool(score.strict),
        gate=bool(score.gate),
        uall=spec.uall_reference,
        derangement=None if fixed.derangement is None else tuple(map(int, fixed.derangement)),
        additive=tuple(tuple(map(int, r)) for r in fixed.additive),
    )
    arrs: dict[str, Any] = dict(
        n1=np.asarray(stratum.stats.half1.n).astype(dtype),
        n2=np.asarray(stratum.stats.half2.n).astype(dtype),
    )
    if fixed.reference is not None:
        arrs["reference"] = np.asarray(fixed.reference, dtype=dtype)
    if model is not None:
        arrs["model"] = np.asarray(model, dtype=dtype)
    if deg == "frozen":
        arrs.update({f"deg_{k}": v[0] for k, v in stratum.derived.deg._asdict().items()})
    elif deg == "array":
        arrs["weights"] = np.asarray(fixed.weights, dtype=np.float32)
    return cfg, arrs


def _setup(
    stratum: Stratum,
    spec: TruthSpec,
    *,
    model: np.ndarray | None,
    metrics: Sequence[str],
    score: ScoreSpec,
    boot: BootSpec,
):
    """Static configuration, device arrays and cell layout of one stratum's resampler."""
    cfg, arrs = _static(
        stratum,
        spec,
        model=model,
        metrics=metrics,
        score=score,
        refit_weights=boot.refit_weights,
        pvalue=boot.pvalue,
    )
    lay = _read_layout(stratum, dtype=working_dtype())
    cfg = dataclasses.replace(
        cfg,
        n_cells=lay.n_cells,
        n_slots=int((lay.Xm.shape[0] + lay.Xe.shape[0]) * lay.L),
    )
    starts, per = per_cell_groups(lay.sizes)
    arrs.update(
        starts=starts,
        per=per,
        pos=lay.pos.astype(np.int32),
        Xm=lay.Xm,
        Xe=lay.Xe,
        extra_gh=lay.extra_gh,
    )
    return cfg, {k: device_array(v) for k, v in arrs.items()}


def sums_scorer(
    stratum: Stratum,
    spec: TruthSpec,
    *,
    model: np.ndarray | None,
    metrics: Sequence[str],
    score: ScoreSpec = ScoreSpec(),
    pvalue: str = "exact",
) -> tuple[Callable[[Sums], dict[str, jax.Array]], tuple[str, ...]]:
    """The resampler's scoring of any group sums: what every bootstrap resample goes through.

    Args:
      stratum, spec: the prepared truth and its options.
      model: the model's ``(P, G)`` prediction, or None.
      metrics: the metrics to score (those the stratum cannot score are left out).
      score: the scoring options.
      pvalue: the DEG p-values: ``"exact"``, ``"fast"`` or ``"auto"``.

    Returns:
      ``(fn, sources)``: ``fn(sums)`` maps :class:`~vcjax.pipeline.Sums` with ``b`` sets of
      sums (counts may differ from the stratum's) to ``{metric: (len(sources), b, P)}``,
      jitted; the DEG weights are derived from the given sums.
    """
    cfg, arrs = _static(
        stratum, spec, model=model, metrics=metrics, score=score, refit_weights=True, pvalue=pvalue
    )
    arrs = {k: device_array(v) for k, v in arrs.items() if k not in ("n1", "n2")}
    fn = jax.jit(lambda sums: _resample_values(cfg, sums, arrs))
    return fn, cfg.sources


@dataclasses.dataclass
class Resampler:
    """One stratum's compiled resampler: :meth:`run` scores chunk after chunk of resamples.

    Resample ``r`` depends only on ``fold_in(stratum_key(seed, index), r)``, so chunks can be
    run in any order and with any chunk size.
    """

    cfg: _Config
    fn: Callable
    arrs: dict[str, jax.Array]
    key: jax.Array
    chunk: int
    #: reuse the last chunk's group-sum and refit buffers for the next (they stay held
    #: between chunks: turn off where several resamplers take turns)
    recycle: bool = True
    _spare: Any = dataclasses.field(default=None, repr=False)

    @property
    def sources(self) -> tuple[str, ...]:
        return self.cfg.sources

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.cfg.metrics

    @property
    def pvalue(self) -> str:
        return self.cfg.plan.deg_strategy

    def run(self, start: int):
        """The outputs of resamples ``start … start + chunk − 1`` (values are ``(sources,
        chunk, P)``; a last partial chunk is padded with further resamples, which the caller
        drops)."""
        keys = _resample_keys(self.key, start, n=self.chunk)
        out, spare = self.fn(keys, self.arrs, self._spare)
        self._spare = spare if self.recycle else None
        return out


def resampler(
    stratum: Stratum,
    spec: TruthSpec,
    *,
    model: np.ndarray | None,
    metrics: Sequence[str],
    score: ScoreSpec,
    boot: BootSpec,
    index: int = 0,
    devices: Sequence[jax.Device] | None = None,
    extra: Callable | None = None,
    extra_arrays: Mapping[str, Any] | None = None,
    recycle: bool = True,
) -> Resampler:
    """The compiled resampler of one stratum (see :func:`stratum_samples` for the options).

    ``extra`` and ``extra_arrays``: a further output of every chunk computed from the same
    resampled truth (:func:`_chunk_fn`), and the constant arrays it reads. ``recycle``:
    :attr:`Resampler.recycle`.
    """
    cfg, arrs = _setup(stratum, spec, model=model, metrics=metrics, score=score, boot=boot)
    arrs.update({k: device_array(v) for k, v in (extra_arrays or {}).items()})
    P = len(stratum.perturbations)
    chunk = int(boot.chunk_size or default_chunk(P, cfg.G, len(cfg.sources)))
    devices = tuple(jax.devices() if devices is None else devices)
    n_dev = len(devices)
    chunk = -(-chunk // n_dev) * n_dev  # a multiple of the device count
    cfg = dataclasses.replace(
        cfg,
        sub_batch=min(chunk // n_dev, default_sub_batch(P, cfg.G, len(cfg.sources))),
        refit_batch=min(chunk // n_dev, default_refit_batch(P, cfg.G)),
    )
    fn = _chunk_fn(cfg, devices if n_dev > 1 else (), extra)
    if n_dev > 1:
        arrs = jax.device_put(
            arrs, NamedSharding(Mesh(np.asarray(devices), ("resamples",)), PartitionSpec())
        )
    return Resampler(cfg, fn, arrs, stratum_key(boot.seed, index), chunk, recycle=recycle)


def stratum_samples(
    stratum: Stratum,
    spec: TruthSpec,
    *,
    model: np.ndarray | None,
    metrics: Sequence[str],
    score: ScoreSpec,
    boot: BootSpec,
    index: int = 0,
    progress: bool | Callable[[int], None] = False,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Resampled metric values of one stratum (the engine of :func:`add_intervals`).

    Args:
      stratum: the prepared truth of one covariate value.
      spec: the screen's truth options.
      model: the model's ``(P, G)`` prediction, or None (baselines only).
      metrics: the metrics to resample (those the stratum cannot score are left out).
      score: the scoring options (``k``, ``strict``, ``gate``).
      boot: the resampling options; resample ``r`` uses
        ``fold_in(stratum_key(boot.seed, index), r)``; ``boot.pvalue="auto"`` takes Hill's
        expansion (:func:`vcjax.stats.student_t_pvalues_fast`) when every DEG test has
        ``ν ≥ 30`` (group sizes ≥ 31), else exact p-values.
      index: the stratum's position in its screen.
      progress: True for log messages, or a callback receiving resamples done.
      devices: devices to shard the resamples of each chunk over (default: all of
        ``jax.devices()``); the chunk is rounded up to a multiple of their number. Each
        device holds a copy of the cell matrix.

    Returns:
      ``{"values": {source: {metric: (n_boot, P)}}, "calibrated": same, "perts", "metrics",
      "sources", "seconds", "pvalue", "chunk"}``.
    """
    rs = resampler(
        stratum,
        spec,
        model=model,
        metrics=metrics,
        score=score,
        boot=boot,
        index=index,
        devices=devices,
    )
    sources, metrics, dtype = rs.sources, rs.metrics, working_dtype()
    P, n_boot = len(stratum.perturbations), int(boot.n_boot)
    store = {(s, m): np.empty((n_boot, P), dtype=dtype) for s in sources for m in metrics}
    cal_store = {(s, m): np.empty((n_boot, P), dtype=dtype) for s in sources for m in metrics}
    t0 = time.perf_counter()
    pending = rs.run(0) if n_boot > 0 else None
    for start in range(0, n_boot, rs.chunk):
        b = min(rs.chunk, n_boot - start)
        out = pending
        # the next chunk is dispatched before this one is read back: the device computes
        # it while the host calibrates and stores this one
        pending = rs.run(start + rs.chunk) if start + rs.chunk < n_boot else None
        vals = {s: {m: np.asarray(out[m], dtype=np.float64)[i, :b] for m in metrics}
                for i, s in enumerate(sources)}  # fmt: skip
        cal = calibrate(vals)
        for s in sources:
            for m in metrics:
                store[(s, m)][start : start + b] = vals[s][m]
                cal_store[(s, m)][start : start + b] = cal[s].get(m, np.full((b, P), np.nan))
        if callable(progress):
            progress(b)
        elif progress:
            log.info("bootstrap: %d/%d resamples", start + b, n_boot)
    return dict(
        values={s: {m: store[(s, m)] for m in metrics} for s in sources},
        calibrated={s: {m: cal_store[(s, m)] for m in metrics} for s in sources},
        perts=stratum.perturbations,
        metrics=metrics,
        sources=sources,
        seconds=time.perf_counter() - t0,
        pvalue=rs.pvalue,
        chunk=rs.chunk,
    )


# =========================================================================== table API


_INTERVAL_COLUMNS = (
    "ci_low",
    "ci_high",
    "calibrated_ci_low",
    "calibrated_ci_high",
    "boot_nan_frac",
    "win_rate",
)


def add_intervals(
    table: pd.DataFrame,
    screen: Screen,
    prediction: Prediction | None,
    *,
    score: ScoreSpec,
    boot: BootSpec,
    progress: bool = False,
) -> pd.DataFrame:
    """Cell-bootstrap intervals for an :func:`vcjax.evaluate` table.

    Adds the columns ``ci_low``, ``ci_high`` (interval of ``value``),
    ``calibrated_ci_low``, ``calibrated_ci_high`` (interval of ``calibrated``, the
    calibration recomputed per resample), ``boot_nan_frac`` (fraction of resamples in
    which the value was NaN and therefore ignored) and ``win_rate``; and appends, for every
    baseline ``b``, rows ``source = "model-vs-<b>"`` with ``value = s·(m_model − m_b)``
    (``s = +1`` higher-is-better, ``−1`` for errors: **positive = model better**), the
    interval of the paired resampled difference and ``win_rate`` = fraction of resamples
    (both finite) in which the model is strictly better (NaN on non-comparison rows).

    Metrics not computed by the resampler (peer metrics from ``metrics="all"``) get NaN
    intervals; they are listed in ``table.attrs["bootstrap"]["unsupported"]``.

    Args:
      table: the tidy table of :func:`vcjax.evaluate` for ``screen`` and ``prediction``.
      screen: the prepared truth.
      prediction: the model's aligned prediction, or None.
      score: the scoring options the table was made with.
      boot: the resampling options. ``boot.target="expected"`` (default): intervals for
        ``E[θ̂]``, the metric's expected value for a screen of this size (the resamples are
        centred by the bootstrap bias estimate, :func:`vcjax.stats.center_samples`);
        ``"population"``: plain percentile/BCa of the raw resamples, aimed at the
        infinite-cell value (valid only when the bias is small relative to the spread;
        metrics scored against a noisy truth are biased, see validation/README.md).
      progress: log progress.

    Returns:
      A new DataFrame (the input rows first, in order, then the comparison rows).
    """
    out = table.copy()
    for col in _INTERVAL_COLUMNS:
        out[col] = np.nan
    has_cov = "covariate" in out.columns
    comp_frames = []
    info: dict[str, Any] = dict(
        n_boot=int(boot.n_boot),
        ci=float(boot.ci),
        method=boot.method,
        refit_weights=bool(boot.refit_weights),
        seed=int(boot.seed),
        target=boot.target,
        unsupported=[],
        seconds=0.0,
    )
    kw = dict(ci=boot.ci, method=boot.method, target=boot.target)
    metrics = list(dict.fromkeys(table["metric"]))
    for j, stratum in enumerate(screen.strata):
        res = stratum_samples(
            stratum,
            screen.spec,
            model=None if prediction is None else prediction.matrices[j],
            metrics=metrics,
            score=score,
            boot=boot,
            index=j,
            progress=progress,
        )
        info["seconds"] += res["seconds"]
        info["pvalue"] = res["pvalue"]
        pert_pos = {p: i for i, p in enumerate(stratum.perturbations)}
        sel = (
            np.ones(len(out), dtype=bool)
            if not has_cov
            else (out["covariate"] == stratum.covariate).to_numpy()
        )
        sub = out[sel]
        for (source, metric), idx in sub.groupby(["source", "metric"], sort=False).groups.items():
            if source not in res["values"] or metric not in res["values"][source]:
                if metric not in info["unsupported"]:
                    info["unsupported"].append(metric)
                continue
            ridx = np.asarray([pert_pos[p] for p in out.loc[idx, "perturbation"]])
            samp = res["values"][source][metric][:, ridx].T
            lo, hi = interval(
                samp, out.loc[idx, "value"].to_numpy(float), bounds=metric_bounds(metric), **kw
            )
            out.loc[idx, "ci_low"], out.loc[idx, "ci_high"] = lo, hi
            out.loc[idx, "boot_nan_frac"] = np.mean(~np.isfinite(samp), axis=1)
            csamp = res["calibrated"][source][metric][:, ridx].T
            clo, chi = interval(csamp, out.loc[idx, "calibrated"].to_numpy(float), **kw)
            out.loc[idx, "calibrated_ci_low"], out.loc[idx, "calibrated_ci_high"] = clo, chi
        if "model" in res["values"]:
            comp_frames += _paired_rows(
                sub, res, pert_pos, stratum.covariate if has_cov else None, kw
            )
    if comp_frames:
        comp = pd.concat(comp_frames, ignore_index=True)[list(out.columns)]
        out = pd.concat([out, comp], ignore_index=True)
    out.attrs = dict(table.attrs)
    out.attrs["bootstrap"] = info
    return out


def _paired_rows(sub: pd.DataFrame, res, pert_pos, covariate, kw) -> list[pd.DataFrame]:
    """The ``model-vs-<baseline>`` rows of one stratum."""
    frames = []
    for metric in res["metrics"]:
        sgn = 1.0 if higher_is_better(metric) else -1.0
        mrows = sub[(sub["source"] == "model") & (sub["metric"] == metric)]
        if mrows.empty:
            continue
        ridx = np.asarray([pert_pos[p] for p in mrows["perturbation"]])
        m_s = res["values"]["model"][metric][:, ridx].T
        m_v = mrows["value"].to_numpy(float)
        for source in res["sources"]:
            if source == "model":
                continue
            brows = sub[(sub["source"] == source) & (sub["metric"] == metric)].set_index(
                "perturbation"
            )
            b_v = brows.loc[list(mrows["perturbation"]), "value"].to_numpy(float)
            b_notes = brows.loc[list(mrows["perturbation"]), "note"].to_numpy()
            b_s = res["values"][source][metric][:, ridx].T
            d_s = sgn * (m_s - b_s)
            d_v = sgn * (m_v - b_v)
            lo, hi = interval(d_s, d_v, **kw)
            fin = np.isfinite(d_s)
            win = win_rate(sgn * m_s, sgn * b_s)
            frame = {
                "perturbation": mrows["perturbation"].to_numpy(),
                "metric": metric,
                "source": f"model-vs-{source}",
                "value": d_v,
                "calibrated": np.nan,
                "note": np.where(mrows["note"].to_numpy() != "", mrows["note"].to_numpy(), b_notes),
                "ci_low": lo,
                "ci_high": hi,
                "calibrated_ci_low": np.nan,
                "calibrated_ci_high": np.nan,
                "boot_nan_frac": np.mean(~fin, axis=1),
                "win_rate": np.where(np.isfinite(d_v), win, np.nan),
            }
            if covariate is not None:
                frame["covariate"] = covariate
            frames.append(pd.DataFrame(frame))
    return frames


def summary_intervals(
    table: pd.DataFrame,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    statistic: str = "mean",
    method: str = "percentile",
    column: str = "value",
    target: str = "population",
) -> pd.DataFrame:
    """Intervals for dataset-level summaries by resampling perturbations.

    Per (source, metric[, covariate]) the NaN-skipping mean or median of ``column`` over
    perturbations, with a bootstrap interval from resampling the perturbations with
    replacement. The same perturbation indices are used for every (source, metric) of a
    covariate (paired), so ``model-vs-<b>`` rows give intervals for mean differences. BCa
    uses the jackknife over perturbations for the acceleration. ``target="expected"``
    centres the resamples as :func:`add_intervals` does (no effect for the mean).

    Returns:
      DataFrame with ``source``, ``metric`` [``covariate``], ``statistic``, ``value``,
      ``ci_low``, ``ci_high``, ``n`` (finite perturbations).
    """
    if statistic not in ("mean", "median"):
        raise ValueError("statistic must be 'mean' or 'median'")
    stat = np.nanmean if statistic == "mean" else np.nanmedian
    keys = ["source", "metric"] + (["covariate"] if "covariate" in table.columns else [])
    rows = []
    rng_cache: dict[Any, np.ndarray] = {}
    for gkey, sub in table.groupby(keys, sort=False, dropna=False):
        v = sub[column].to_numpy(float)
        P = v.size
        ck = (P, gkey[2] if len(keys) == 3 else None)
        if ck not in rng_cache:
            rng = np.random.default_rng([seed, P])
            rng_cache[ck] = rng.integers(0, P, size=(n_boot, P))
        idx = rng_cache[ck]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            est = stat(v) if np.isfinite(v).any() else np.nan
            samp = stat(v[idx], axis=1)
            acc = None
            if method == "bca" and P > 1:
                jk = np.array([stat(np.delete(v, i)) for i in range(P)])
                acc = jackknife_acceleration(jk[None])[0]
        source, metric = str(gkey[0]), str(gkey[1])
        bounds = metric_bounds(
            metric, calibrated=column != "value" or source.startswith("model-vs-")
        )
        lo, hi = interval(
            samp[None], np.array([est]), ci=ci, method=method, acceleration=acc, target=target,
            bounds=bounds,
        )  # fmt: skip
        row = dict(zip(keys, gkey if isinstance(gkey, tuple) else (gkey,)))
        row.update(
            statistic=statistic, value=est, ci_low=lo[0], ci_high=hi[0], n=int(np.isfinite(v).sum())
        )
        rows.append(row)
    return pd.DataFrame(rows)
