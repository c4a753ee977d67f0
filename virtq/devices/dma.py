"""Device-visible buffers for zero-copy I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from virtq.errors import ArgumentError, RegionBoundsError
from virtq.transport.base import DmaArena
from virtq.types import Iova

#: A descriptor's length is a u32 (§2.7.5), so no buffer the device is given may be longer.
MAX_BUFFER = (1 << 32) - 1


def byte_view(data: Any, name: str = "data") -> memoryview:
    """``data`` (bytes, bytearray, memoryview, array, anything with the buffer protocol) as
    a flat byte view: ``len()`` then counts bytes, whatever the item format.  Raises
    :class:`ArgumentError` for an object without the buffer protocol or a non-contiguous
    one."""
    try:
        view = data if isinstance(data, memoryview) else memoryview(data)
    except TypeError:
        raise ArgumentError(name, type(data).__name__,
                            "must be bytes-like (bytes, bytearray, memoryview, array)") from None
    if view.format == "B" and view.ndim == 1 and view.c_contiguous:
        return view
    try:
        return view.cast("B")
    except TypeError as err:  # not C-contiguous
        raise ArgumentError(name, view, f"must be a contiguous buffer ({err})") from None


@dataclass(frozen=True, eq=False, slots=True)
class DmaBuffer:
    """``length`` bytes at ``offset`` of a :class:`~virtq.transport.DmaArena`: the device
    reads and writes them directly (no copy).  Get one from a device driver's
    ``alloc_buffer()``; :meth:`slice` carves smaller ones out of it.

    A buffer belongs to the transport that allocated its arena (``owner``): only that
    transport's device may be given it.  Raises :class:`ArgumentError` /
    :class:`~virtq.errors.RegionBoundsError` when it would not lie inside its arena."""

    arena: DmaArena
    offset: int
    length: int
    #: The device address of the first byte (computed once: drivers read it per request).
    iova: Iova = field(init=False)
    #: The transport whose device may use it (the arena's owner).
    owner: object = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.arena, DmaArena):
            raise ArgumentError("arena", self.arena, "must be a DmaArena (see alloc_buffer())")
        if self.offset.__class__ is not int or self.length.__class__ is not int:
            raise ArgumentError("offset/length", (self.offset, self.length), "must be ints")
        if not 0 < self.length <= MAX_BUFFER:
            raise ArgumentError("length", self.length, f"must be in 1..{MAX_BUFFER}")
        if self.offset < 0 or self.offset + self.length > self.arena.nbytes:
            raise RegionBoundsError(self.offset, self.length, self.arena.nbytes)
        object.__setattr__(self, "iova", self.arena.addr(self.offset))
        object.__setattr__(self, "owner", self.arena.owner)

    def view(self) -> memoryview:
        """A zero-copy view of the bytes (release it before the device driver closes)."""
        return self.arena.region.view(self.offset, self.length)

    def slice(self, offset: int, length: int) -> DmaBuffer:
        """``length`` bytes at ``offset`` of this buffer, as a buffer of their own.  Raises
        :class:`~virtq.errors.ArgumentError` for non-int values and
        :class:`~virtq.errors.RegionBoundsError` for a range outside the buffer."""
        if offset.__class__ is not int or length.__class__ is not int:
            raise ArgumentError("offset/length", (offset, length), "must be ints")
        if offset < 0 or length <= 0 or offset + length > self.length:
            raise RegionBoundsError(offset, length, self.length)
        return DmaBuffer(self.arena, self.offset + offset, length)

    def read(self) -> bytes:
        """A copy of the bytes."""
        return bytes(self.arena.region.view(self.offset, self.length))

    def write(self, data: Any, offset: int = 0) -> None:
        """Copy bytes-like ``data`` in at ``offset`` (any item format: bytes are bytes).  Raises
        :class:`~virtq.errors.ArgumentError` for data without the buffer protocol and
        :class:`~virtq.errors.RegionBoundsError` when it does not fit at ``offset``."""
        view = byte_view(data)
        if offset.__class__ is not int or offset < 0 or offset + len(view) > self.length:
            raise RegionBoundsError(offset, len(view), self.length)
        self.arena.region.view(self.offset + offset, len(view))[:] = view

    def overlaps(self, other: DmaBuffer) -> bool:
        """Whether the two share any byte."""
        return (self.arena is other.arena and self.offset < other.offset + other.length
                and other.offset < self.offset + self.length)
