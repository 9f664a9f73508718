"""Sufficient statistics past one machine: each JAX process reads its own slice of cells.

Start JAX's distributed runtime on every host first::

    import jax
    jax.distributed.initialize(coordinator_address="host0:1234", num_processes=N, process_id=i)

then :func:`group_stats_distributed` on every process: process ``i`` of ``N`` streams cells
``[i·n/N, (i+1)·n/N)`` of the (backed) ``.h5ad`` and the per-group sums and sums of squares
are added across processes with a JAX collective (``process_allgather``), so every process
ends with the global :class:`~vcjax.data.GroupStats` — identical to a single-process
:func:`vcjax.data.group_stats` up to the order of float64 additions. Group labels (``obs``)
are small and read in full by every process; the expression matrix is read once in total.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from vcjax import data as D

__all__ = ["process_rows", "group_stats_distributed"]


def process_rows(
    n_cells: int, *, index: int | None = None, count: int | None = None
) -> tuple[int, int]:
    """The contiguous cell range ``(first, last)`` that process ``index`` of ``count`` reads."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return index * n_cells // count, (index + 1) * n_cells // count


def _allreduce_sum(x: np.ndarray) -> np.ndarray:
    """Sum a host array over all JAX processes (float64 kept on the host)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    # allgather the float64 bits as two uint32 words so no precision is lost on devices
    # that lack float64; then sum on the host in a fixed process order (deterministic).
    words = np.ascontiguousarray(x, dtype=np.float64).view(np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(words, tiled=False))
    parts = gathered.reshape((jax.process_count(),) + words.shape).view(np.float64)
    return parts.sum(axis=0).reshape(x.shape)


def _sum_stats(st: D.GroupStats) -> D.GroupStats:
    return dataclasses.replace(st, sum=_allreduce_sum(st.sum), sumsq=_allreduce_sum(st.sumsq))


def group_stats_distributed(adata, key: str, *, control: str | None, **kwargs):
    """:func:`vcjax.data.group_stats` over all JAX processes, each reading its own cells.

    Args:
      adata: an AnnData (preferably backed, ``anndata.read_h5ad(path, backed="r")``) or a
        path to an ``.h5ad`` file, opened backed.
      key, control, kwargs: as :func:`vcjax.data.group_stats` (``rows`` is set here).

    Returns:
      The global :class:`~vcjax.data.GroupStats` (or :class:`~vcjax.data.SplitStats`) on
      every process.
    """
    if isinstance(adata, (str, os.PathLike)):
        adata = D.read_h5ad(adata, backed=True)
    rows = process_rows(adata.n_obs)
    st = D.group_stats(adata, key, control=control, rows=rows, **kwargs)
    if isinstance(st, D.SplitStats):
        return D.SplitStats(_sum_stats(st.half1), _sum_stats(st.half2))
    return _sum_stats(st)
