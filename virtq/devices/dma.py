"""Device-visible buffers for zero-copy I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from virtq.errors import RegionBoundsError
from virtq.transport.base import DmaArena
from virtq.types import Iova


@dataclass(frozen=True, eq=False, slots=True)
class DmaBuffer:
    """``length`` bytes at ``offset`` of a :class:`~virtq.transport.DmaArena`: the device
    reads and writes them directly (no copy).  Get one from a device driver's
    ``alloc_buffer()``; :meth:`slice` carves smaller ones out of it."""

    arena: DmaArena
    offset: int
    length: int
    #: The device address of the first byte (computed once: drivers read it per request).
    iova: Iova = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "iova", self.arena.addr(self.offset))

    def view(self) -> memoryview:
        """A zero-copy view of the bytes (release it before the device driver closes)."""
        return self.arena.region.view(self.offset, self.length)

    def slice(self, offset: int, length: int) -> DmaBuffer:
        if offset < 0 or length <= 0 or offset + length > self.length:
            raise RegionBoundsError(offset, length, self.length)
        return DmaBuffer(self.arena, self.offset + offset, length)

    def read(self) -> bytes:
        return bytes(self.arena.region.view(self.offset, self.length))

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        if offset < 0 or offset + len(data) > self.length:
            raise RegionBoundsError(offset, len(data), self.length)
        self.arena.region.view(self.offset + offset, len(data))[:] = data
