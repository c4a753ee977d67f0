"""IOVA reservation strategies.

An :class:`IovaAllocator` only *reserves* device-visible address ranges; making the device
actually see memory there is a :class:`~virtq.iova.DmaMapper`'s job (VFIO ``MAP_DMA``, a
vhost-user memory table, or nothing).  Keeping them apart lets every strategy be tested
without an IOMMU.

Ranges are half-open ``[start, end)`` throughout; VFIO reports inclusive ends, so use
:meth:`RangeAllocator.from_inclusive` for those.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from virtq.errors import ArgumentError, IovaError, IovaExhaustedError
from virtq.layout import align_up, is_power_of_two
from virtq.types import HostAddr, Iova

DEFAULT_ALIGN = 4096


@runtime_checkable
class IovaAllocator(Protocol):
    """Hands out disjoint, aligned IOVA ranges.

    ``host_addr`` is the host address of the memory that will live at the IOVA; only
    strategies that derive the IOVA from it (identity) need it, the others ignore it.
    ``tag`` separates allocations into windows for strategies that support it (the seed's
    ``alloc_iova(size, tag)``); others ignore it.
    """

    def alloc(
        self, size: int, *, align: int = DEFAULT_ALIGN, tag: int = 0,
        host_addr: HostAddr | None = None,
    ) -> Iova:
        """Reserve ``size`` bytes at an IOVA aligned to ``align`` and return it.  Raises
        :class:`~virtq.errors.ArgumentError` for a bad size, alignment or tag, and
        :class:`~virtq.errors.IovaExhaustedError` when no aligned range of that size is free."""
        ...

    def free(self, iova: Iova) -> None:
        """Give back the range that :meth:`alloc` returned at ``iova``.  Raises
        :class:`~virtq.errors.IovaError` when nothing is allocated there (a double free)."""
        ...


def check_request(size: int, align: int) -> None:
    """Check an allocation request.  Raises :class:`~virtq.errors.ArgumentError` unless ``size``
    is a positive int and ``align`` a power of two."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ArgumentError("size", size, "IOVA allocation size must be a positive int")
    if not isinstance(align, int) or not is_power_of_two(align):
        raise ArgumentError("align", align, "alignment must be a power of two")


class IdentityAllocator:
    """IOVA == host address.

    For vhost-user backends that share the frontend's address space view (memory table with
    ``guest_phys_addr == userspace_addr``) and for no-IOMMU setups.  Tracks live ranges so a
    double free or an overlap is an error rather than silent aliasing.
    """

    def __init__(self) -> None:
        self._live: dict[int, int] = {}

    def alloc(
        self, size: int, *, align: int = DEFAULT_ALIGN, tag: int = 0,
        host_addr: HostAddr | None = None,
    ) -> Iova:
        """Return ``host_addr`` itself as the IOVA.  Raises :class:`~virtq.errors.ArgumentError`
        for a bad request, a missing or misaligned ``host_addr``, and
        :class:`~virtq.errors.IovaError` when the range overlaps a live one."""
        check_request(size, align)
        if host_addr is None:
            raise ArgumentError("host_addr", None, "IdentityAllocator needs the host address")
        if host_addr % align:
            raise ArgumentError("host_addr", host_addr, f"not aligned to {align:#x}")
        end = host_addr + size
        for start, length in self._live.items():
            if start < end and host_addr < start + length:
                raise IovaError(
                    f"[{host_addr:#x}, {end:#x}) overlaps live [{start:#x}, {start + length:#x})"
                )
        self._live[host_addr] = size
        return Iova(host_addr)

    def free(self, iova: Iova) -> None:
        """Forget the range at ``iova``.  Raises :class:`~virtq.errors.IovaError` when it is not
        allocated."""
        if self._live.pop(iova, None) is None:
            raise IovaError(f"IOVA {iova:#x} is not allocated")


class BumpAllocator:
    """Hands out increasing addresses from ``[base, limit)``; never reuses a hole.

    The simplest strategy, for a fixed set of long-lived queues.  ``free`` validates and
    forgets; once every allocation is freed the allocator rewinds to ``base``.
    """

    def __init__(self, base: int, limit: int) -> None:
        if not 0 <= base < limit:
            raise ArgumentError("limit", limit, f"must be greater than base {base:#x} >= 0")
        self.base = base
        self.limit = limit
        self._next = base
        self._live: dict[int, int] = {}

    def alloc(
        self, size: int, *, align: int = DEFAULT_ALIGN, tag: int = 0,
        host_addr: HostAddr | None = None,
    ) -> Iova:
        """The next aligned ``size`` bytes after the last allocation.  Raises
        :class:`~virtq.errors.ArgumentError` for a bad request and
        :class:`~virtq.errors.IovaExhaustedError` past ``limit``."""
        check_request(size, align)
        start = align_up(self._next, align)
        if start + size > self.limit:
            raise IovaExhaustedError(size, align, max(0, self.limit - start))
        self._next = start + size
        self._live[start] = size
        return Iova(start)

    def free(self, iova: Iova) -> None:
        """Forget the range at ``iova`` (the space comes back only when every range is freed).
        Raises :class:`~virtq.errors.IovaError` when it is not allocated."""
        if self._live.pop(iova, None) is None:
            raise IovaError(f"IOVA {iova:#x} is not allocated")
        if not self._live:
            self._next = self.base


class RangeAllocator:
    """First-fit over a set of allowed windows, with free and coalescing.

    Feed it the IOVA ranges the IOMMU allows (``VFIO_IOMMU_GET_INFO``'s
    ``IOVA_RANGE`` capability); reserved holes (the x86 MSI window at 0xFEE00000) are then
    never handed out.
    """

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        spans = sorted((int(s), int(e)) for s, e in ranges)
        for start, end in spans:
            if not 0 <= start < end:
                raise ArgumentError("ranges", (start, end), "each range needs 0 <= start < end")
        # Merge touching/overlapping windows; _starts/_ends are the free spans, sorted.
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in spans:
            if self._ends and start <= self._ends[-1]:
                self._ends[-1] = max(self._ends[-1], end)
            else:
                self._starts.append(start)
                self._ends.append(end)
        if not self._starts:
            raise ArgumentError("ranges", [], "at least one range is needed")
        self.windows: tuple[tuple[int, int], ...] = tuple(
            zip(self._starts, self._ends, strict=True)
        )
        self._live: dict[int, int] = {}

    @classmethod
    def from_inclusive(cls, ranges: Iterable[tuple[int, int]]) -> RangeAllocator:
        """From ``(start, last)`` pairs with an inclusive end, as VFIO reports them."""
        return cls((start, last + 1) for start, last in ranges)

    def largest_free(self) -> int:
        """The size of the largest free span, in bytes (0 when everything is taken)."""
        return max((e - s for s, e in zip(self._starts, self._ends, strict=True)), default=0)

    def alloc(
        self, size: int, *, align: int = DEFAULT_ALIGN, tag: int = 0,
        host_addr: HostAddr | None = None,
    ) -> Iova:
        """The first free span that holds ``size`` bytes at ``align``, lowest address first.
        Raises :class:`~virtq.errors.ArgumentError` for a bad request and
        :class:`~virtq.errors.IovaExhaustedError` when no span fits."""
        check_request(size, align)
        for i, (span_start, span_end) in enumerate(zip(self._starts, self._ends, strict=True)):
            start = align_up(span_start, align)
            if start + size <= span_end:
                self._take(i, start, start + size)
                self._live[start] = size
                return Iova(start)
        raise IovaExhaustedError(size, align, self.largest_free())

    def _take(self, i: int, start: int, end: int) -> None:
        span_start, span_end = self._starts[i], self._ends[i]
        del self._starts[i], self._ends[i]
        if end < span_end:
            self._starts.insert(i, end)
            self._ends.insert(i, span_end)
        if span_start < start:
            self._starts.insert(i, span_start)
            self._ends.insert(i, start)

    def free(self, iova: Iova) -> None:
        """Give back the range at ``iova``, merging it with free neighbours.  Raises
        :class:`~virtq.errors.IovaError` when it is not allocated."""
        size = self._live.pop(iova, None)
        if size is None:
            raise IovaError(f"IOVA {iova:#x} is not allocated")
        start, end = int(iova), iova + size
        i = bisect.bisect_left(self._starts, start)
        # Coalesce with the free span that ends where this one starts, and the one after.
        if i > 0 and self._ends[i - 1] == start:
            i -= 1
            start = self._starts[i]
            del self._starts[i], self._ends[i]
        if i < len(self._starts) and self._starts[i] == end:
            end = self._ends[i]
            del self._starts[i], self._ends[i]
        self._starts.insert(i, start)
        self._ends.insert(i, end)


class TaggedAllocator:
    """One disjoint window per tag: ``[base + tag * window, base + (tag + 1) * window)``.

    This is the seed's ``alloc_iova(size, tag)``: crosvm keyed each queue's IOVA range by a
    tag (0 = rx, 1 = tx) so ranges stay distinct and can be found and released by name.
    """

    def __init__(self, base: int, window: int, *, tags: int = 256) -> None:
        if window <= 0 or tags <= 0 or base < 0:
            raise ArgumentError("window", window, "window and tags must be positive, base >= 0")
        self.base = base
        self.window = window
        self.tags = tags
        self._windows: dict[int, RangeAllocator] = {}

    def _for_tag(self, tag: int) -> RangeAllocator:
        if not isinstance(tag, int) or not 0 <= tag < self.tags:
            raise ArgumentError("tag", tag, f"must be in 0..{self.tags - 1}")
        alloc = self._windows.get(tag)
        if alloc is None:
            start = self.base + tag * self.window
            alloc = self._windows[tag] = RangeAllocator([(start, start + self.window)])
        return alloc

    def alloc(
        self, size: int, *, align: int = DEFAULT_ALIGN, tag: int = 0,
        host_addr: HostAddr | None = None,
    ) -> Iova:
        """Reserve ``size`` bytes in ``tag``'s window (first fit).  Raises
        :class:`~virtq.errors.ArgumentError` for a tag outside ``0..tags-1`` or a bad request,
        and :class:`~virtq.errors.IovaExhaustedError` when the window is full."""
        return self._for_tag(tag).alloc(size, align=align)

    def free(self, iova: Iova) -> None:
        """Give back the range at ``iova`` to its tag's window.  Raises
        :class:`~virtq.errors.IovaError` when it is not allocated."""
        tag = (iova - self.base) // self.window
        if iova < self.base or tag not in self._windows:
            raise IovaError(f"IOVA {iova:#x} is not allocated")
        self._windows[tag].free(iova)
