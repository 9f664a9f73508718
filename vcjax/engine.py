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

With several devices (GPUs, or CPU devices from
``XLA_FLAGS=--xla_force_host_platform_device_count=N``) each chunk is sharded over a 1-D
mesh on its row axis with :class:`jax.sharding.NamedSharding`; results are identical to
one device up to float rounding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from vcjax import metrics as M

__all__ = ["MetricSpec", "METRICS", "score", "default_chunk_size", "available_metrics", "row_map"]


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """How the engine calls a kernel.

    Attributes:
      fn: ``fn(pred, truth, reference, weights, mask, *, k, strict) -> (...)`` on one row.
      needs: which optional inputs must be given (``"weights"``, ``"mask"``).
      higher_is_better: orientation (used by calibration).
      perfect: the value of a perfect prediction.
    """

    fn: Callable[..., jax.Array]
    needs: tuple[str, ...] = ()
    higher_is_better: bool = True
    perfect: float = 1.0


METRICS: dict[str, MetricSpec] = {
    "mse": MetricSpec(lambda p, t, r, w, m, **_: M.mse(p, t), (), False, 0.0),
    "wmse": MetricSpec(lambda p, t, r, w, m, **_: M.wmse(p, t, w), ("weights",), False, 0.0),
    "mae": MetricSpec(lambda p, t, r, w, m, **_: M.mae(p, t), (), False, 0.0),
    "pearson_delta": MetricSpec(lambda p, t, r, w, m, **_: M.pearson_delta(p, t, r)),
    "pearson_delta_degs": MetricSpec(
        lambda p, t, r, w, m, **_: M.pearson_delta_degs(p, t, r, m), ("mask",)
    ),
    "pearson_delta_topk": MetricSpec(
        lambda p, t, r, w, m, *, k, **_: M.pearson_delta_topk(p, t, r, w, k=k), ("weights",)
    ),
    "r2_delta": MetricSpec(
        lambda p, t, r, w, m, *, strict, **_: M.r2_delta(p, t, r, strict=strict)
    ),
    "r2w_delta": MetricSpec(
        lambda p, t, r, w, m, *, strict, **_: M.r2w_delta(p, t, r, w, strict=strict), ("weights",)
    ),
    "cosine_delta": MetricSpec(lambda p, t, r, w, m, **_: M.cosine_delta(p, t, r)),
}


def available_metrics(*, weights: bool, mask: bool) -> tuple[str, ...]:
    """Names of the registered metrics whose inputs are available."""
    have = {"weights": weights, "mask": mask}
    return tuple(n for n, s in METRICS.items() if all(have[x] for x in s.needs))


def default_chunk_size(n_genes: int, n_devices: int = 1) -> int:
    """Rows per chunk: about 2**21 elements per input array, a multiple of the device count."""
    rows = max(8, min(1024, (1 << 21) // max(n_genes, 1)))
    rows = 1 << (rows.bit_length() - 1)  # power of two
    return max(n_devices, (rows // n_devices) * n_devices)


def _mesh(devices: Sequence[jax.Device] | None) -> Mesh | None:
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) <= 1:
        return None
    return Mesh(np.asarray(devices), ("rows",))


@functools.lru_cache(maxsize=64)
def _chunk_fn(
    names: tuple[str, ...], per_row: tuple[bool, ...], k: int, strict: bool
) -> Callable[..., dict[str, jax.Array]]:
    """A jitted function scoring one chunk; cached on the static configuration."""

    def one_row(pred, truth, reference, weights, mask):
        return {
            n: METRICS[n].fn(pred, truth, reference, weights, mask, k=k, strict=strict)
            for n in names
        }

    in_axes = tuple(0 if r else None for r in per_row)
    return jax.jit(jax.vmap(one_row, in_axes=in_axes))


def _as_rows(x: ArrayLike | None, n_rows: int, n_genes: int, name: str) -> tuple[object, bool]:
    """Validate an input; return it and whether it has a per-perturbation row axis."""
    if x is None:
        return None, False
    if not isinstance(x, jax.Array):
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


def _dtype_of(*xs) -> np.dtype:
    """float32, or float64 when an input is float64 and x64 is enabled."""
    dt = np.result_type(np.float32, *[x.dtype for x in xs if x is not None])
    return np.dtype(jax.dtypes.canonicalize_dtype(dt))


def row_map(
    fn: Callable[..., Mapping[str, jax.Array]],
    row_inputs: Sequence[np.ndarray | jax.Array],
    *,
    chunk_size: int,
    devices: Sequence[jax.Device] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Apply a jitted chunk function over the leading axis of ``row_inputs`` in padded chunks.

    ``fn(*chunks) -> dict`` must map arrays of leading size ``chunk_size`` to arrays whose
    leading axis is the row axis. The last chunk is padded with zeros (so a new number of
    rows never recompiles) and the padding is cut off the results.
    """
    n = int(row_inputs[0].shape[0])
    mesh = _mesh(devices)
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec("rows"))
    outs: list[dict[str, jax.Array]] = []
    for start in range(0, max(n, 1), chunk_size):
        stop = min(start + chunk_size, n)
        chunk = []
        for x in row_inputs:
            part = x[start:stop]
            if stop - start < chunk_size:
                pad = [(0, chunk_size - (stop - start))] + [(0, 0)] * (part.ndim - 1)
                part = (
                    np.pad(np.asarray(part), pad)
                    if not isinstance(part, jax.Array)
                    else jnp.pad(part, pad)
                )
            chunk.append(jax.device_put(part, sharding) if sharding is not None else part)
        outs.append(fn(*chunk))
        if progress is not None:
            progress(stop - start)
    keys = outs[0].keys() if outs else ()
    return {key: np.concatenate([np.asarray(o[key]) for o in outs])[:n] for key in keys}


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
      pred: predictions ``(P, G)`` (or ``(G,)``, the same prediction for every row).
      truth: true profiles ``(P, G)``.
      reference: the delta reference, ``(G,)`` or ``(P, G)``. Which vector to use is the
        caller's decision; :func:`vcjax.evaluate` uses ``u_ALL`` of half 1 (METRICS.md §2).
      weights: gene weights ``(P, G)`` or ``(G,)`` (e.g. :func:`vcjax.deg.minmax_weights`);
        needed by ``wmse``, ``r2w_delta`` and ``pearson_delta_topk``.
      mask: boolean gene subsets ``(P, G)`` (e.g. the DEG sets) for ``pearson_delta_degs``.
      metrics: names from :data:`METRICS`; default: every metric whose inputs are given.
      k: genes used by ``pearson_delta_topk``.
      strict: passed to the R² kernels (NaN instead of sklearn's forced values).
      chunk_size: rows per chunk; default :func:`default_chunk_size`. The compiled function
        depends on ``(chunk_size, G)``, not on ``P``.
      devices: devices to shard each chunk over (default: all of ``jax.devices()``).
      progress: optional callback receiving the number of rows finished after each chunk.

    Returns:
      ``dict`` metric name → ``(P,)`` array (float32, or float64 under x64 with float64
      inputs).
    """
    truth_arr = truth if isinstance(truth, jax.Array) else np.asarray(truth)
    if truth_arr.ndim != 2:
        raise ValueError(f"truth must be (P, G), got shape {tuple(truth_arr.shape)}")
    n_rows, n_genes = truth_arr.shape
    names = (
        tuple(metrics)
        if metrics is not None
        else available_metrics(weights=weights is not None, mask=mask is not None)
    )
    for name in names:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; available: {sorted(METRICS)}")
        missing = [x for x in METRICS[name].needs if {"weights": weights, "mask": mask}[x] is None]
        if missing:
            raise ValueError(f"metric {name!r} needs {', '.join(missing)}")
    inputs = {
        "pred": _as_rows(pred, n_rows, n_genes, "pred"),
        "truth": (truth_arr, True),
        "reference": _as_rows(reference, n_rows, n_genes, "reference"),
        "weights": _as_rows(weights, n_rows, n_genes, "weights"),
        "mask": _as_rows(mask, n_rows, n_genes, "mask"),
    }
    dtype = _dtype_of(*(v for v, _ in inputs.values() if v is not None and v.dtype != bool))
    order = ("pred", "truth", "reference", "weights", "mask")
    arrays, per_row = [], []
    for key in order:
        x, rows = inputs[key]
        if x is None:
            x = np.zeros((n_genes,), dtype)  # placeholder for an unused input
        elif key == "mask":
            x = x.astype(bool)
        elif x.dtype != dtype:
            x = x.astype(dtype)
        arrays.append(x)
        per_row.append(rows)
    n_dev = len(jax.devices() if devices is None else devices)
    chunk = chunk_size or default_chunk_size(n_genes, n_dev)
    if chunk % n_dev:
        raise ValueError(f"chunk_size {chunk} must be a multiple of the device count {n_dev}")
    fn = _chunk_fn(names, tuple(per_row), int(k), bool(strict))
    shared = [
        x if not isinstance(x, np.ndarray) else jnp.asarray(x)
        for x, r in zip(arrays, per_row)
        if not r
    ]
    row_inputs = [x for x, r in zip(arrays, per_row) if r]

    def call(*rows):
        it_rows, it_shared = iter(rows), iter(shared)
        args = [next(it_rows) if r else next(it_shared) for r in per_row]
        return fn(*args)

    out = row_map(call, row_inputs, chunk_size=chunk, devices=devices, progress=progress)
    return {name: jnp.asarray(out[name]) for name in names}
