"""Packed virtqueue layout (VIRTIO 1.2 §2.8).

=============================  =========  =======  ======================================
part                           alignment  size     notes
=============================  =========  =======  ======================================
descriptor ring                16         16 * N   ``struct pvirtq_desc`` [N] (descriptor
                                                   area)
driver event suppression       4          4        written by the driver (driver area,
                                                   §2.8.10)
device event suppression       4          4        written by the device (device area)
per-slot buffers (optional)    see split  B * N    ``buffer_size`` bytes each
indirect tables (optional)     16         16*K*N   one table of K entries per buffer id
=============================  =========  =======  ======================================

A packed queue size need not be a power of two; it must be in 1..32768 (§2.8 "Packed
Virtqueues": up to 2**15 entries).  Buffer ids are 0..N-1, so one indirect table per id
covers every chain in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from virtq.errors import LayoutError
from virtq.layout._align import align_up, is_count
from virtq.layout.split import (
    DESC_ALIGN,
    DESC_SIZE,
    MAX_BUFFER_SIZE,
    buffer_align,
    check_page_size,
)
from virtq.types import Offset

MAX_PACKED_QUEUE_SIZE = 32768
EVENT_SUPPRESS_ALIGN = 4
EVENT_SUPPRESS_SIZE = 4


@dataclass(frozen=True, slots=True)
class PackedLayout:
    """Byte offsets of a packed virtqueue's parts inside one region (all from byte 0)."""

    queue_size: int
    desc: Offset
    driver_event: Offset
    device_event: Offset
    buffers: Offset | None
    buffer_size: int
    indirect: Offset | None
    indirect_size: int
    nbytes: int
    page_size: int

    @classmethod
    def compute(cls, queue_size: int, *, buffer_size: int = 0, indirect_size: int = 0,
                page_size: int = 4096) -> PackedLayout:
        """Lay out a packed ring of ``queue_size`` entries (1..32768, any number).

        ``buffer_size``: bytes of fixed buffer per slot (0 = none).  ``indirect_size``:
        entries of the indirect table reserved per buffer id (0 = none).  Raises
        :class:`~virtq.errors.LayoutError`."""
        if not is_count(queue_size, 1, MAX_PACKED_QUEUE_SIZE):
            raise LayoutError("queue_size", queue_size, "packed queue size must be in 1..32768")
        check_page_size(page_size)
        if not is_count(buffer_size, 0, MAX_BUFFER_SIZE):  # one descriptor: le32 len
            raise LayoutError("buffer_size", buffer_size, "must be an int in 0..2**32-1")
        if not is_count(indirect_size, 0, MAX_PACKED_QUEUE_SIZE):
            raise LayoutError("indirect_size", indirect_size, "must be in 0..32768")
        desc = 0
        driver_event = align_up(desc + DESC_SIZE * queue_size, EVENT_SUPPRESS_ALIGN)
        device_event = align_up(driver_event + EVENT_SUPPRESS_SIZE, EVENT_SUPPRESS_ALIGN)
        end = device_event + EVENT_SUPPRESS_SIZE
        buffers: int | None = None
        if buffer_size:
            buffers = align_up(end, buffer_align(buffer_size, page_size))
            end = buffers + buffer_size * queue_size
        indirect: int | None = None
        if indirect_size:
            indirect = align_up(end, DESC_ALIGN)
            end = indirect + DESC_SIZE * indirect_size * queue_size
        return cls(
            queue_size=queue_size,
            desc=Offset(desc),
            driver_event=Offset(driver_event),
            device_event=Offset(device_event),
            buffers=None if buffers is None else Offset(buffers),
            buffer_size=buffer_size,
            indirect=None if indirect is None else Offset(indirect),
            indirect_size=indirect_size,
            nbytes=align_up(end, page_size),
            page_size=page_size,
        )

    def shifted(self, offset: int) -> PackedLayout:
        """The same layout placed ``offset`` bytes into a larger region (a multiple of the
        page size, so every alignment holds).  Raises :class:`~virtq.errors.LayoutError`
        otherwise."""
        if offset < 0 or offset % self.page_size:
            raise LayoutError("offset", offset, f"must be a multiple of page_size "
                              f"{self.page_size}")
        return replace(
            self,
            desc=Offset(self.desc + offset),
            driver_event=Offset(self.driver_event + offset),
            device_event=Offset(self.device_event + offset),
            buffers=None if self.buffers is None else Offset(self.buffers + offset),
            indirect=None if self.indirect is None else Offset(self.indirect + offset),
            nbytes=self.nbytes + offset,
        )

    def buffer(self, slot: int) -> Offset:
        """Offset of slot ``slot``'s fixed buffer.  Raises :class:`~virtq.errors.LayoutError`
        when the layout has no buffer area or ``slot`` is out of range."""
        if self.buffers is None:
            raise LayoutError("buffer_size", 0, "this layout has no per-slot buffers")
        if not 0 <= slot < self.queue_size:
            raise LayoutError("slot", slot, f"must be in 0..{self.queue_size - 1}")
        return Offset(self.buffers + slot * self.buffer_size)

    def indirect_table(self, buffer_id: int) -> Offset:
        """Offset of the indirect descriptor table reserved for ``buffer_id``.  Raises
        :class:`~virtq.errors.LayoutError` when the layout reserves no indirect tables or
        ``buffer_id`` is out of range."""
        if self.indirect is None:
            raise LayoutError("indirect_size", 0, "this layout reserves no indirect tables")
        if not 0 <= buffer_id < self.queue_size:
            raise LayoutError("buffer_id", buffer_id, f"must be in 0..{self.queue_size - 1}")
        return Offset(self.indirect + buffer_id * DESC_SIZE * self.indirect_size)
