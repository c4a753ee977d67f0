"""Packed virtqueue layout (VIRTIO 1.2 §2.8).

=============================  =========  =======  ======================================
part                           alignment  size     notes
=============================  =========  =======  ======================================
descriptor ring                16         16 * N   ``struct pvirtq_desc`` [N]
driver event suppression       4          4        written by the driver (§2.8.10)
device event suppression       4          4        written by the device
=============================  =========  =======  ======================================

A packed queue size need not be a power of two; it must be in 1..32768 (§2.8 "Packed
Virtqueues": up to 2**15 entries).
"""

from __future__ import annotations

from dataclasses import dataclass

from virtq.errors import LayoutError
from virtq.layout._align import align_up
from virtq.layout.split import DESC_SIZE, check_page_size
from virtq.types import Offset

MAX_PACKED_QUEUE_SIZE = 32768
EVENT_SUPPRESS_ALIGN = 4
EVENT_SUPPRESS_SIZE = 4


@dataclass(frozen=True, slots=True)
class PackedLayout:
    """Byte offsets of a packed virtqueue's parts inside one region (all from byte 0): the
    descriptor ring, then the driver and device event suppression structures (VIRTIO 1.2
    §2.8.10)."""
    queue_size: int
    desc: Offset
    driver_event: Offset
    device_event: Offset
    nbytes: int
    page_size: int

    @classmethod
    def compute(cls, queue_size: int, *, page_size: int = 4096) -> PackedLayout:
        """Lay out a packed ring of ``queue_size`` entries (any size in 1..32768: a packed ring
        need not be a power of two).  Raises :class:`~virtq.errors.LayoutError` for a size
        outside that range or a bad ``page_size``."""
        if not isinstance(queue_size, int) or not 1 <= queue_size <= MAX_PACKED_QUEUE_SIZE:
            raise LayoutError("queue_size", queue_size, "packed queue size must be in 1..32768")
        check_page_size(page_size)
        desc = 0
        driver_event = align_up(desc + DESC_SIZE * queue_size, EVENT_SUPPRESS_ALIGN)
        device_event = align_up(driver_event + EVENT_SUPPRESS_SIZE, EVENT_SUPPRESS_ALIGN)
        end = device_event + EVENT_SUPPRESS_SIZE
        return cls(
            queue_size=queue_size,
            desc=Offset(desc),
            driver_event=Offset(driver_event),
            device_event=Offset(device_event),
            nbytes=align_up(end, page_size),
            page_size=page_size,
        )
