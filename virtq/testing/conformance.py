"""Conformance suites any memory backend or IOVA strategy -- including yours -- can run.

Each ``check_*`` function takes a zero-argument factory, exercises the object through its
protocol only, and raises ``AssertionError`` naming the broken rule.  virtq's own tests run
them over every built-in backend and strategy.
"""

from __future__ import annotations

import functools
import gc
import random
from collections.abc import Callable

from virtq.errors import (
    IovaError,
    IovaExhaustedError,
    RegionBoundsError,
    RegionBusyError,
    RegionClosedError,
    VirtqError,
)
from virtq.iova import IovaAllocator
from virtq.memory import MemoryRegion


def _raises(exc: type[BaseException], fn: Callable[[], object], rule: str) -> BaseException:
    try:
        fn()
    except exc as caught:
        return caught
    except BaseException as other:  # pragma: no cover - reported as a failure
        raise AssertionError(f"{rule}: raised {type(other).__name__}: {other}") from other
    raise AssertionError(f"{rule}: nothing was raised")


def check_memory_region(factory: Callable[[], MemoryRegion]) -> None:
    """Check the :class:`~virtq.memory.MemoryRegion` contract."""
    region = factory()
    try:
        n = region.nbytes
        assert n > 0, "nbytes must be positive"
        assert region.host_addr > 0 and region.host_addr % 4096 == 0, "host_addr page-aligned"
        assert not region.closed
        whole = region.view()
        assert len(whole) == n and not whole.readonly, "view() spans the region, writable"
        assert bytes(whole[:64]) == bytes(64), "fresh memory reads as zero"
        # Zero-copy: a write through one view is seen through another.
        pattern = bytes(random.randrange(256) for _ in range(64))
        region.view(n - 64, 64)[:] = pattern
        assert bytes(whole[n - 64 :]) == pattern, "views alias the same bytes"
        assert bytes(region.view(10, 0)) == b"", "empty view allowed"
        for offset, length in ((-1, 1), (0, n + 1), (n, 1), (n - 1, 2), (5, -1)):
            _raises(RegionBoundsError, functools.partial(region.view, offset, length),
                    f"view({offset}, {length}) out of bounds")
        # Closing under a live view must be refused, never unmap under it.
        _raises(RegionBusyError, region.close, "close() with a live view")
        assert not region.closed, "a refused close leaves the region open"
        whole[0] = 0xA5  # still mapped
        whole.release()
    finally:
        gc.collect()
        region.close()
    assert region.closed
    region.close()  # idempotent
    _raises(RegionClosedError, region.view, "view() after close()")
    _raises(RegionClosedError, lambda: region.host_addr, "host_addr after close()")
    # Context manager.
    with factory() as r2:
        r2.view(0, 8)[:] = b"virtqvq!"
    assert r2.closed, "__exit__ closes"


def check_iova_allocator(
    factory: Callable[[], IovaAllocator], *, span: int, needs_host_addr: bool = False
) -> None:
    """Check the :class:`~virtq.iova.IovaAllocator` contract.

    ``span`` is how many bytes the allocator can hand out in total (so exhaustion can be
    provoked); ``needs_host_addr`` for strategies that derive the IOVA from it (identity).
    """
    alloc = factory()
    fake_host = 0x7F00_0000_0000
    next_host = [fake_host]

    def take(size: int, align: int = 4096) -> int:
        host = None
        if needs_host_addr:
            host = next_host[0] = (next_host[0] + align - 1) & ~(align - 1)
            next_host[0] += size
        return int(alloc.alloc(size, align=align, host_addr=host))  # type: ignore[arg-type]

    live: dict[int, int] = {}
    for size, align in ((4096, 4096), (100, 16), (8192, 8192), (1, 1), (4096, 65536)):
        iova = take(size, align)
        assert iova % align == 0, f"alignment {align:#x} honoured (got {iova:#x})"
        for other, osize in live.items():
            assert iova + size <= other or other + osize <= iova, "allocations never overlap"
        live[iova] = size
    for iova in list(live):
        alloc.free(iova)  # type: ignore[arg-type]
        del live[iova]
    _raises(IovaError, lambda: alloc.free(0x1234_5000), "free of an unknown IOVA")  # type: ignore[arg-type]
    again = take(4096)
    alloc.free(again)  # type: ignore[arg-type]
    _raises(IovaError, lambda: alloc.free(again), "double free")  # type: ignore[arg-type]
    for bad_size in (0, -4096):
        _raises(VirtqError, functools.partial(take, bad_size), f"size {bad_size} rejected")
    _raises(VirtqError, lambda: take(4096, 3), "non-power-of-two alignment rejected")
    if not needs_host_addr:
        err = _raises(IovaExhaustedError, lambda: take(span + 4096), "exhaustion")
        assert isinstance(err, IovaExhaustedError) and err.size == span + 4096
        # After freeing everything the full span is usable again.
        whole = take(span, 4096)
        alloc.free(whole)  # type: ignore[arg-type]
