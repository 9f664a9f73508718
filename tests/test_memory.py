"""vcjax._memory: freed large buffers are reused inside the block, and only there."""

import resource

import numpy as np
import pytest

from vcjax import _memory

pytestmark = pytest.mark.skipif(_memory._glibc() is None, reason="needs glibc")

_MB = 1 << 20


@pytest.fixture(autouse=True)
def _small_pages():
    """NumPy madvises its large buffers to huge pages; count 4 KiB faults instead."""
    from numpy._core import multiarray

    old = multiarray._set_madvise_hugepage(False)
    yield
    multiarray._set_madvise_hugepage(old)


def _refault_count(n_bytes: int) -> int:
    """Minor page faults of touching a fresh ``n_bytes`` buffer after freeing one as big."""
    a = np.ones(n_bytes // 8)
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = np.ones(n_bytes // 8)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del b
    return after - before


def test_large_buffers_are_recycled_inside_the_block_only():
    n = 256 * _MB  # 65,536 pages of 4 KiB
    outside = _refault_count(n)
    with _memory.recycle_large_buffers() as active:
        assert active
        _refault_count(n)  # grows the heap once
        inside = _refault_count(n)
    after = _refault_count(n)
    assert outside > 0.5 * n / 4096  # a fresh mmap every time (glibc's default)
    assert inside < 0.05 * n / 4096  # the freed block is reused
    assert after > 0.5 * n / 4096  # defaults restored on exit


def test_nested_blocks_and_opt_out(monkeypatch):
    n = 128 * _MB
    with _memory.recycle_large_buffers():
        with _memory.recycle_large_buffers():
            pass
        _refault_count(n)
        assert _refault_count(n) < 0.05 * n / 4096  # still active after the inner exit
    monkeypatch.setenv("VCJAX_MALLOC_TUNING", "0")
    with _memory.recycle_large_buffers() as active:
        assert not active
        assert _refault_count(n) > 0.5 * n / 4096
