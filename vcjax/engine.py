"""The batching engine: many perturbations through the metric kernels at once.

This is the one place where batching lives. :func:`score` cuts the perturbation axis into
fixed-size chunks, pads the last one, and runs one jitted function per chunk that
``vmap``\\ s every requested kernel over the chunk's rows and fuses them, so each chunk of
``pred``, ``truth`` and ``weights`` is read from memory once for all metrics.

Why a host loop over chunks rather than one ``lax.map`` over all of them: the compiled
function then depends only on ``(chunk_size, G)`` and the metric set, never on ``P``, so a
screen of a new size never recompiles, and peak device memory is
``O(chunk_size × G)`` plus the shared vectors — inputs stay in host memory (NumPy) and are
streamed chunk by chunk. Dispatch is asynchronous, so the transfer of chunk ``i + 1``
overlaps the computation of chunk ``i``.

With several accelerators each chunk is sharded over a 1-D mesh on its row axis with
:class:`jax.sharding.NamedSharding`. Several CPU devices (``jax.config.update(
"jax_num_cpu_devices", N)`` or ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set
before JAX starts) are instead dealt whole chunks in turn, so that N chunks are computed
at once (see :func:`_round_robin`). Either way results are identical to one device up to
float rounding.

On CPU each chunk's fused passes run over blocks of rows small enough for the core's cache
(:func:`_sub_rows`), and host inputs are copied (when misaligned) into a small ring of
reused aligned buffers; a jax.Array on the CPU is streamed from a zero-copy view.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from vcjax._host import ALIGN, aligned_empty, device_array, enable_compilation_cache, engine_array
from vcjax.metrics import KERNELS, fused_scores, kernel_metrics

__all__ = [
    "Rows",
    "enable_compilation_cache",
    "engine_array",
    "score",
    "score_groups",
    "default_chunk_size",
    "chunk_rows",
    "row_map",
    "shards_per_chunk",
    "compiler_options",
    "dtype_of",
]


class Rows:
    """A ``(n_rows, n_cols)`` matrix given by its row blocks, never held whole.

    ``fetch(r0, r1)`` returns rows ``r0:r1`` as a ``(r1 - r0, n_cols)`` array of ``dtype``.
    :func:`score` and :func:`row_map` stream it chunk by chunk like a NumPy input (each
    chunk fetched, cast and copied into the reused aligned buffers), so a prediction
    derived from smaller arrays — a baseline built from group sums — is scored without
    its ``(P, G)`` matrix ever existing; ``np.asarray(rows)`` builds the whole matrix.
    A fetch must not depend on the order or the number of calls (every chunk is fetched
    once per :func:`score` call).
    """

    ndim = 2

    def __init__(self, fetch: Callable[[int, int], np.ndarray], shape, dtype) -> None:
        self.fetch = fetch
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            r0, r1, _ = key.indices(self.shape[0])
            return np.asarray(self.fetch(r0, max(r0, r1)), self.dtype)
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        n, g = self.shape
        out = np.empty((n, g), self.dtype if dtype is None else dtype)
        step = max(1, (1 << 20) // max(g, 1))
        for r0 in range(0, n, step):
            r1 = min(r0 + step, n)
            out[r0:r1] = self.fetch(r0, r1)
        return out

    def __repr__(self) -> str:
        return f"Rows(shape={self.shape}, dtype={self.dtype})"


def default_chunk_size(n_genes: int, n_devices: int = 1, *, backend: str | None = None) -> int:
    """Rows per chunk, a power of two and a multiple of the device count.

    About ``2**20`` elements per input array on CPU and ``2**21`` on accelerators. On CPU
    the size is set by the cache: the fused kernel reads each chunk twice (two-pass
    moments), and a chunk of ``pred``, ``truth`` and ``weights`` that fits in a typical
    last-level cache (3 × 4 MiB in float32) makes the second read a cache hit
    (``benchmarks/RESULTS.md``).
    """
    backend = jax.default_backend() if backend is None else backend
    budget = 1 << (20 if backend == "cpu" else 21)
    rows = max(8, min(1024, budget // max(n_genes, 1)))
    rows = 1 << (rows.bit_length() - 1)  # power of two
    return max(n_devices, (rows // n_devices) * n_devices)


def chunk_rows(n_rows: int, n_genes: int, n_devices: int = 1) -> int:
    """The chunk :func:`score` uses for ``n_rows`` rows by default.

    :func:`default_chunk_size`, but no larger than the next power of two >= ``n_rows``
    (rounded up to the device count): small screens are not padded to a full chunk, and
    the number of distinct compiled shapes stays logarithmic in ``P``.
    """
    small = max(n_devices, 1 << max(n_rows - 1, 0).bit_length())
    return min(default_chunk_size(n_genes, n_devices), -(-small // n_devices) * n_devices)


def _mesh(devices: Sequence[jax.Device] | None) -> Mesh | None:
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) <= 1:
        return None
    return Mesh(np.asarray(devices), ("rows",))


def _round_robin(devices: Sequence[jax.Device] | None) -> list[jax.Device] | None:
    """The devices to deal whole chunks to in turn, or None to shard each chunk instead.

    Several CPU devices (``jax.config.update("jax_num_cpu_devices", n)`` or
    ``XLA_FLAGS=--xla_force_host_platform_device_count=n``, before JAX starts) are served
    whole chunks in turn: XLA:CPU runs one device's programs one after another, and the
    fused reductions on one core, so two devices are two chunks computed at once, where
    sharding every chunk over a mesh was slower than one device (``benchmarks/RESULTS.md``).
    Accelerators keep the mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) > 1 and all(d.platform == "cpu" for d in devices):
        return devices
    return None


def shards_per_chunk(devices: Sequence[jax.Device] | None = None) -> int:
    """How many devices one chunk is split over: 1 when chunks are dealt whole."""
    devices = list(jax.devices() if devices is None else devices)
    return 1 if _round_robin(devices) is not None else len(devices)


#: elements per input of one block of the two-pass reductions on CPU (see _sub_rows)
_CPU_BLOCK_ELEMENTS = 1 << 17


def _sub_rows(n_rows: int, n_genes: int, n_devices: int = 1, platform: str | None = None) -> int:
    """Rows per block of the fused passes inside a chunk of ``n_rows`` rows.

    On one CPU device the reductions of :func:`vcjax.metrics.fused_scores` run on one core at its memory
    bandwidth, and the second (centred) pass re-reads what the first read. A block of about
    ``2**17`` elements per input is still in cache when the second pass reads it
    (``benchmarks/RESULTS.md``). Elsewhere (accelerators, several devices) the chunk is one
    block. ``n_devices`` is the number of devices one chunk is sharded over, ``platform``
    theirs (default: JAX's default backend). Always a divisor of ``n_rows``.
    """
    platform = jax.default_backend() if platform is None else platform
    if n_devices > 1 or platform != "cpu":
        return n_rows
    want = max(1, _CPU_BLOCK_ELEMENTS // max(n_genes, 1))
    want = 1 << (want.bit_length() - 1)
    return math.gcd(n_rows, want)


@functools.lru_cache(maxsize=64)
def _chunk_fn(
    names: tuple[str, ...], per_row: tuple[bool, ...], k: int, strict: bool, sub_rows: int = 0
) -> Callable[..., dict[str, jax.Array]]:
    """A jitted function scoring one chunk; cached on the static configuration.

    The arguments are ``(pred, truth, reference, weights, mask)``, each ``(C, G)`` where
    ``per_row`` says so and ``(G,)`` otherwise (``truth`` is always per row). With
    ``0 < sub_rows < C`` the metrics other than ``pearson_delta_topk`` run over blocks of
    ``sub_rows`` rows in a ``lax.map`` (see :func:`_sub_rows`); the top-k selection, whose
    cost is per call rather than per byte, runs on the whole chunk.
    """
    if not per_row[1]:
        raise ValueError("truth must have a row axis")
    topk = tuple(n for n in names if n == "pearson_delta_topk")
    rest = tuple(n for n in names if n != "pearson_delta_topk")

    def chunk(pred, truth, reference, weights, mask):
        args = (pred, truth, reference, weights, mask)
        n_rows = truth.shape[0]
        if not (0 < sub_rows < n_rows and n_rows % sub_rows == 0 and rest):
            return fused_scores(names, k, strict, *args)
        rows = [a for a, r in zip(args, per_row) if r]

        def block(xs):
            it = iter(xs)
            return fused_scores(
                rest, k, strict, *[next(it) if r else a for a, r in zip(args, per_row)]
            )

        blocks = [a.reshape((n_rows // sub_rows, sub_rows) + a.shape[1:]) for a in rows]
        out = {n: v.reshape(n_rows) for n, v in jax.lax.map(block, blocks).items()}
        if topk:
            out.update(fused_scores(topk, k, strict, *args))
        return {n: out[n] for n in names}

    return jax.jit(chunk, compiler_options=compiler_options())


# XLA:CPU's newer fusion emitters compile the variadic row reductions of fused_scores to
# scalar loops; its classic emitters vectorise them (same float32 semantics: no fast-math;
# benchmarks/RESULTS.md). Only used when the option exists and the backend is CPU.
_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


@functools.lru_cache(maxsize=1)
def compiler_options() -> dict[str, object] | None:
    if jax.default_backend() != "cpu":
        return None
    try:
        # a NumPy argument: jnp.ones would compile two more (eager) functions
        probe = jax.jit(lambda v: jnp.sum(v, axis=-1), compiler_options=_CPU_OPTIONS)
        probe(np.ones((2, 3), np.float32)).block_until_ready()
    except Exception:  # an XLA without the option: keep its defaults
        return None
    return dict(_CPU_OPTIONS)


def _as_rows(x: ArrayLike | None, n_rows: int, n_genes: int, name: str) -> tuple[object, bool]:
    """Validate an input; return it and whether it has a per-perturbation row axis."""
    if x is None:
        return None, False
    if not isinstance(x, (jax.Array, Rows)):
        x = np.asarray(x)
    if x.ndim == 1:
        if x.shape[0] != n_genes:
            raise ValueError(f"{name} has {x.shape[0]} genes, expected {n_genes}")
        return x, False
    if x.ndim != 2 or x.shape != (n_rows, n_genes):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, expected ({n_rows}, {n_genes}) or ({n_genes},)"
        )
    return x, True


def dtype_of(*xs) -> np.dtype:
    """float32, or float64 when an input is float64 and x64 is enabled."""
    dt = np.result_type(np.float32, *[x.dtype for x in xs if x is not None])
    return np.dtype(jax.dtypes.canonicalize_dtype(dt))


def _host_chunk(
    x: np.ndarray, start: int, stop: int, rows: int, dtype, out: np.ndarray | None = None
) -> np.ndarray:
    """Rows ``start:stop`` of ``x`` as an aligned, contiguous ``(rows, ...)`` array.

    Zero-padded to ``rows`` and cast to ``dtype`` (when given) in the same single copy, into
    ``out`` when it is given (an aligned buffer of that shape and dtype, reused between
    chunks: fresh memory costs the kernel's page zeroing, about as much as the copy);
    returned without copying when the slice already qualifies. Aligned host memory lets
    ``jax.device_put`` on CPU adopt the buffer instead of copying it (a misaligned one
    costs a copy there that is several times slower than this NumPy one).
    """
    part = x[start:stop]
    dtype = part.dtype if dtype is None else np.dtype(dtype)
    if (
        stop - start == rows
        and part.dtype == dtype
        and part.flags.c_contiguous
        and part.ctypes.data % ALIGN == 0
    ):
        return part
    shape = (rows,) + part.shape[1:]
    if out is None or out.shape != shape or out.dtype != dtype:
        out = aligned_empty(shape, dtype)
    np.copyto(out[: stop - start], part, casting="unsafe")
    if stop - start < rows:
        out[stop - start :] = 0
    return out


def _host_view(x: jax.Array) -> np.ndarray | None:
    """A zero-copy NumPy view of a jax.Array held whole by one CPU device, else None.

    Such an input is then streamed like a NumPy one: its chunks are adopted in place by
    ``device_put`` instead of being sliced by one dispatched XLA operation each.
    """
    try:
        devices = x.devices()
        if len(devices) != 1 or next(iter(devices)).platform != "cpu":
            return None
        view = np.asarray(x)  # zero-copy for a CPU buffer
    except Exception:  # deleted, or not viewable: keep the device path
        return None
    return view


#: chunks in flight at once (at least one per device dealt to) when host buffers are reused
_IN_FLIGHT = 2


def row_map(
    fn: Callable[..., Mapping[str, jax.Array]],
    row_inputs: Sequence[np.ndarray | jax.Array],
    *,
    chunk_size: int,
    devices: Sequence[jax.Device] | None = None,
    progress: Callable[[int], None] | None = None,
    dtypes: Sequence[np.dtype | None] | None = None,
) -> dict[str, np.ndarray]:
    """Apply a jitted chunk function over the leading axis of ``row_inputs`` in padded chunks.

    ``fn(*chunks) -> dict`` must map arrays of leading size ``chunk_size`` to arrays whose
    leading axis is the row axis. The last chunk is padded with zeros (so a new number of
    rows never recompiles) and the padding is cut off the results. Host (NumPy) inputs are
    streamed chunk by chunk, cast to ``dtypes`` (one per input; None keeps its dtype) in the
    same copy (a :class:`Rows` input is fetched chunk by chunk, never whole); each chunk is
    placed on ``devices`` (sharded over its rows when there are several accelerators, dealt
    whole in turn to several CPU devices) before ``fn`` is called.
    """
    n = int(row_inputs[0].shape[0])
    dtypes = [None] * len(row_inputs) if dtypes is None else list(dtypes)
    cycle = _round_robin(devices)  # where chunk i goes: cycle[i % len(cycle)]
    if cycle is None:
        mesh = _mesh(devices)
        if mesh is not None:
            cycle = [NamedSharding(mesh, PartitionSpec("rows"))]
        else:
            cycle = [(jax.devices() if devices is None else list(devices))[0]]
    in_flight = max(_IN_FLIGHT, len(cycle))
    inputs = []
    for x in row_inputs:
        if isinstance(x, jax.Array):
            view = _host_view(x)
            x = x if view is None else view
        inputs.append(x)
    # Host chunks that need a copy go into a ring of reused buffers, one ring per input;
    # a buffer is rewritten only once the call that read it has finished (device_put adopts
    # aligned host memory on CPU, so the call reads the buffer itself).
    # Results are copied to the host as their calls finish, before any buffer is reused
    # (a result could alias an input chunk).
    rings: list[list[np.ndarray | None]] = [[None] * (in_flight + 1) for _ in inputs]
    outs: list[dict[str, np.ndarray]] = []
    pending: collections.deque[Mapping[str, jax.Array]] = collections.deque()
    for i, start in enumerate(range(0, max(n, 1), chunk_size)):
        stop = min(start + chunk_size, n)
        slot = i % (in_flight + 1)
        target = cycle[i % len(cycle)]
        if len(pending) > in_flight - 1:
            outs.append({k: np.array(v) for k, v in pending.popleft().items()})
        chunk = []
        for x, dt, ring in zip(inputs, dtypes, rings):
            if isinstance(x, jax.Array):
                part = x[start:stop]
                if dt is not None and part.dtype != dt:
                    part = part.astype(dt)
                if stop - start < chunk_size:
                    pad = [(0, chunk_size - (stop - start))] + [(0, 0)] * (part.ndim - 1)
                    part = jnp.pad(part, pad)
            else:
                lazy = isinstance(x, Rows)
                x = x if lazy else np.asarray(x)
                part = _host_chunk(x, start, stop, chunk_size, dt, ring[slot])
                if lazy or not np.may_share_memory(part, x):
                    ring[slot] = part
            chunk.append(jax.device_put(part, target))
        pending.append(fn(*chunk))
        if progress is not None:
            progress(stop - start)
    outs.extend({k: np.array(v) for k, v in o.items()} for o in pending)
    keys = outs[0].keys() if outs else ()
    return {key: np.concatenate([o[key] for o in outs])[:n] for key in keys}


def score(
    pred: ArrayLike,
    truth: ArrayLike,
    *,
    reference: ArrayLike,
    weights: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    metrics: Iterable[str] | None = None,
    k: int = 20,
    strict: bool = False,
    chunk_size: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, jax.Array]:
    """Score P perturbations at once with every requested metric kernel.

    Args:
      pred: predictions ``(P, G)`` (or ``(G,)``, the same prediction for every row). Every
        ``(P, G)`` input may be a :class:`Rows`, fetched chunk by chunk.
      truth: true profiles ``(P, G)``.
      reference: the delta reference, ``(G,)`` or ``(P, G)``. Which vector to use is the
        caller's decision; :func:`vcjax.evaluate` uses ``u_ALL`` of half 1 (docs/metrics.md §2).
      weights: gene weights ``(P, G)`` or ``(G,)`` (e.g. :func:`vcjax.deg.minmax_weights`);
        needed by ``wmse``, ``r2w_delta`` and ``pearson_delta_topk``.
      mask: boolean gene subsets ``(P, G)`` (e.g. the DEG sets) for ``pearson_delta_degs``.
      metrics: core kernel names (:data:`vcjax.metrics.KERNELS`); default: every kernel
        whose inputs are given.
      k: genes used by ``pearson_delta_topk``.
      strict: passed to the R² kernels (NaN instead of sklearn's forced values).
      chunk_size: rows per chunk; default :func:`default_chunk_size`, or the next power of
        two >= P when that is smaller. The compiled function depends on ``(chunk_size, G)``,
        not on ``P``.
      devices: devices to shard each chunk over (default: all of ``jax.devices()``).
      progress: optional callback receiving the number of rows finished after each chunk.

    Returns:
      ``dict`` metric name → ``(P,)`` array (float32, or float64 under x64 with float64
      inputs).
    """
    return score_groups(
        pred,
        truth,
        [dict(reference=reference, weights=weights, mask=mask, metrics=metrics)],
        k=k,
        strict=strict,
        chunk_size=chunk_size,
        devices=devices,
        progress=progress,
    )[0]


def score_groups(
    pred: ArrayLike,
    truth: ArrayLike,
    groups: Sequence[Mapping[str, object]],
    *,
    k: int = 20,
    strict: bool = False,
    chunk_size: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, jax.Array]]:
    """:func:`score` of one prediction under several sets of options, in one pass.

    Each group is a mapping with the keyword arguments of :func:`score` that may differ
    between the calls — ``reference`` (required), ``weights``, ``mask``, ``metrics`` — and
    gives the same values as ``score(pred, truth, **group, k=k, ...)`` (the same compiled
    chunk function), but each chunk of ``pred``, ``truth`` and of every other row input is
    fetched, cast and placed once for all the groups: a prediction is read once, however
    many references and weightings score it.

    Returns:
      One ``dict`` metric name → ``(P,)`` array per group, in order.
    """
    truth_arr = truth if isinstance(truth, (jax.Array, Rows)) else np.asarray(truth)
    if truth_arr.ndim != 2:
        raise ValueError(f"truth must be (P, G), got shape {tuple(truth_arr.shape)}")
    if not groups:
        return []
    n_rows, n_genes = truth_arr.shape
    pred_in = _as_rows(pred, n_rows, n_genes, "pred")
    devs = list(jax.devices() if devices is None else devices)
    dealt = _round_robin(devs)
    n_dev = shards_per_chunk(devs)
    chunk = chunk_rows(n_rows, n_genes, n_dev) if chunk_size is None else chunk_size
    if chunk % n_dev:
        raise ValueError(f"chunk_size {chunk} must be a multiple of the device count {n_dev}")
    sub = _sub_rows(chunk, n_genes, n_dev, devs[0].platform)
    order = ("pred", "truth", "reference", "weights", "mask")
    # the row inputs of every group, each distinct (array, dtype) streamed once
    row_inputs: list[object] = []
    row_dtypes: list[np.dtype] = []
    slot_of: dict[tuple[int, np.dtype], int] = {}
    plans = []
    for group in groups:
        unknown = set(group) - {"reference", "weights", "mask", "metrics"}
        if unknown:
            raise TypeError(f"unexpected group option(s) {sorted(unknown)}")
        weights, mask = group.get("weights"), group.get("mask")
        metrics = group.get("metrics")
        names = (
            tuple(metrics)
            if metrics is not None
            else kernel_metrics(weights=weights is not None, mask=mask is not None)
        )
        for name in names:
            if name not in KERNELS:
                raise ValueError(f"unknown metric {name!r}; available: {sorted(KERNELS)}")
            missing = [x for x in KERNELS[name][1] if {"weights": weights, "mask": mask}[x] is None]
            if missing:
                raise ValueError(f"metric {name!r} needs {', '.join(missing)}")
        inputs = {
            "pred": pred_in,
            "truth": (truth_arr, True),
            "reference": _as_rows(group["reference"], n_rows, n_genes, "reference"),
            "weights": _as_rows(weights, n_rows, n_genes, "weights"),
            "mask": _as_rows(mask, n_rows, n_genes, "mask"),
        }
        dtype = dtype_of(*(v for v, _ in inputs.values() if v is not None and v.dtype != bool))
        used = {"pred", "truth", "reference"}
        used |= {x for name in names for x in KERNELS[name][1]}
        args: list[object] = []  # per input: the slot of a row input, or the shared vector
        per_row = []
        for key in order:
            x, rows = inputs[key]
            want = np.dtype(bool) if key == "mask" else dtype
            if x is None or key not in used:  # placeholder for an unused input (never read)
                x, rows = np.zeros((n_genes,), want), False
            elif not rows and x.dtype != want:
                x = x.astype(want)  # shared (G,) vectors: cast once
            per_row.append(rows)
            if rows:
                slot = slot_of.setdefault((id(x), want), len(row_inputs))
                if slot == len(row_inputs):
                    row_inputs.append(x)
                    row_dtypes.append(want)
                args.append(slot)
            else:
                args.append(x if not isinstance(x, np.ndarray) else device_array(x))
        fn = _chunk_fn(names, tuple(per_row), int(k), bool(strict), sub)
        shared = [a for a, r in zip(args, per_row) if not r]
        # chunks dealt to devices in turn find the shared vectors already there
        shared_on = {d: [jax.device_put(x, d) for x in shared] for d in dealt or ()}
        plans.append((names, fn, args, per_row, shared_on))

    def call(*rows):
        out = {}
        for g, (_names, fn, args, per_row, shared_on) in enumerate(plans):
            on = shared_on.get(next(iter(rows[0].devices()))) if shared_on else None
            it_shared = iter(on) if on is not None else None
            full = []
            for a, r in zip(args, per_row):
                if r:
                    full.append(rows[a])
                else:
                    full.append(a if it_shared is None else next(it_shared))
            out.update({(g, name): v for name, v in fn(*full).items()})
        return out

    out = row_map(
        call,
        row_inputs,
        chunk_size=chunk,
        devices=devices,
        progress=progress,
        dtypes=row_dtypes,
    )
    return [{name: device_array(out[(g, name)]) for name in p[0]} for g, p in enumerate(plans)]
