"""Host-side plumbing shared by the layers: worker threads, aligned buffers, the compilation cache.

Nothing here knows a formula. :func:`run_blocks` runs a row-block function in a few threads
(NumPy and SciPy release the GIL); :func:`aligned_empty` and :func:`engine_array` give the
64-byte aligned, C-contiguous host buffers that XLA:CPU adopts without a copy, and
:func:`device_array` places a host array without compiling anything;
:func:`enable_compilation_cache` turns on JAX's persistent compilation cache for vcjax's
kernels once per process.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable

import jax
import numpy as np

__all__ = [
    "ALIGN",
    "CACHE_ENV",
    "aligned_empty",
    "device_array",
    "engine_array",
    "enable_compilation_cache",
    "host_threads",
    "run_blocks",
    "working_dtype",
]

log = logging.getLogger("vcjax")

#: elements per row block of :func:`run_blocks` (about 1 MB per float64 temporary)
BLOCK_ELEMENTS = 1 << 17

ALIGN = 64  # bytes; XLA:CPU adopts host buffers this aligned without a copy


def host_threads() -> int:
    """Worker threads for host row blocks: the usable CPUs, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def run_blocks(fn: Callable[[int, int], None], n_rows: int, n_cols: int) -> None:
    """``fn(r0, r1)`` over row blocks of about :data:`BLOCK_ELEMENTS` elements.

    NumPy and SciPy ufuncs release the GIL, so the blocks run in a small thread pool; each
    block writes only its own rows, so the result does not depend on the scheduling.
    """
    rows = max(1, BLOCK_ELEMENTS // max(n_cols, 1))
    bounds = [(r, min(r + rows, n_rows)) for r in range(0, n_rows, rows)]
    workers = min(host_threads(), len(bounds))
    if workers <= 1:
        for r0, r1 in bounds:
            fn(r0, r1)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as ex:
        for fut in [ex.submit(fn, r0, r1) for r0, r1 in bounds]:
            fut.result()


def device_array(x) -> jax.Array:
    """``x`` as a jax.Array (on the default device), without compiling anything.

    ``jnp.asarray`` of a host array compiles a staging function for each new shape and
    dtype (10-60 ms each, on a first call's critical path); ``jax.device_put`` places it
    directly, with the same dtype canonicalisation. A jax.Array is returned as it is.
    """
    return x if isinstance(x, jax.Array) else jax.device_put(np.asarray(x))


def working_dtype() -> np.dtype:
    """The engine's float dtype: float32, or float64 when x64 is enabled."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, *, zeros: bool = False) -> np.ndarray:
    """An uninitialised C-contiguous array whose data pointer is 64-byte aligned.

    ``zeros``: filled with zeros, from ``calloc``: a large buffer comes as fresh zero pages,
    so its zeros cost nothing until a page is first written.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = (np.zeros if zeros else np.empty)(nbytes + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off : off + nbytes].view(dtype).reshape(shape)


def engine_array(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` as a C-contiguous, 64-byte aligned array of ``dtype`` (a copy only if needed).

    What :func:`vcjax.engine.score` streams to the device without a further copy.
    """
    x = np.asarray(x)
    if x.dtype == dtype and x.flags.c_contiguous and x.ctypes.data % ALIGN == 0:
        return x
    out = aligned_empty(x.shape, dtype)
    np.copyto(out, x, casting="unsafe")
    return out


#: environment variable: ``0``/``off`` disables vcjax's persistent compilation cache; any
#: other value is the folder to use instead of ``~/.cache/vcjax/jax``.
CACHE_ENV = "VCJAX_COMPILATION_CACHE"
_cache_state: dict[str, str | None] = {}
_CACHE_MAX_BYTES = 1 << 30  # least recently used entries are evicted beyond this


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache for vcjax's kernels, once per process.

    The first :func:`vcjax.evaluate` in a fresh process otherwise spends most of its time
    compiling the metric kernels; with the cache, a later process loads them from disk.
    Nothing is changed when the user configured a cache already (``JAX_COMPILATION_CACHE_DIR``,
    ``jax.config.update("jax_compilation_cache_dir", ...)``), when JAX's cache is disabled
    (``jax_enable_compilation_cache=False``), or when ``VCJAX_COMPILATION_CACHE=0``. Else the
    folder is ``$VCJAX_COMPILATION_CACHE`` if set, or ``$XDG_CACHE_HOME/vcjax/jax``
    (default ``~/.cache/vcjax/jax``), and compilations of any duration are cached (JAX's
    default threshold, 1 s, would skip every vcjax kernel); with the ``filelock`` package
    installed the folder is capped at 1 GiB (least recently used entries evicted; JAX's
    default is no limit). Like any JAX compilation cache, the folder must only be writable
    by users you trust.

    Returns:
      The cache folder in use, or None when no cache is used.
    """
    if "dir" in _cache_state:
        return _cache_state["dir"]
    setting = os.environ.get(CACHE_ENV, "").strip()
    configured = jax.config.jax_compilation_cache_dir
    path: str | None
    if setting.lower() in ("0", "off", "false", "no", "none"):
        path = configured or None
    elif configured:
        path = configured
    elif not jax.config.jax_enable_compilation_cache:
        path = None
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = setting or os.path.join(base, "vcjax", "jax")
        try:
            os.makedirs(path, exist_ok=True)
            writable = os.access(path, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            log.info("compilation cache folder %s is not writable; not caching", path)
            path = None
        else:
            jax.config.update("jax_compilation_cache_dir", path)
            if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default
                jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            if (
                jax.config.jax_compilation_cache_max_size == -1
                and importlib.util.find_spec("filelock") is not None
            ):
                # JAX's default is unbounded; its LRU eviction needs the filelock package
                jax.config.update("jax_compilation_cache_max_size", _CACHE_MAX_BYTES)
            # JAX decides whether to use the cache at its first compilation: if that came
            # before this call, make it decide again.
            from jax.experimental.compilation_cache import compilation_cache as cc

            cc.reset_cache()
            log.info("JAX compilation cache: %s", path)
    _cache_state["dir"] = path
    return path
