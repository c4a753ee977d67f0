"""Ring-format-independent construction: the layout of a queue's memory, and the queue.

Device drivers call these instead of naming a ring format: today every queue is a split
ring (VIRTIO 1.2 §2.7); a packed ring (§2.8) plugs in here without a line of device code
changing.
"""

from __future__ import annotations

from typing import Any

from virtq.errors import ArgumentError
from virtq.layout import SplitLayout
from virtq.memory import MemoryRegion
from virtq.queue.split import SplitQueue
from virtq.types import Iova

#: The ring formats virtq implements.
RING_FORMATS = ("split",)


def ring_layout(size: int, *, indirect_size: int = 0, buffer_size: int = 0,
                ring: str = "split") -> SplitLayout:
    """Where the parts of a ``size``-entry ring live in its memory (page-aligned, so
    layouts can be stacked with ``shifted()``), with ``indirect_size`` indirect-table
    entries per descriptor and ``buffer_size`` bytes of buffer per descriptor.  Raises
    :class:`~virtq.errors.LayoutError` for a size the format does not allow."""
    if ring not in RING_FORMATS:
        raise ArgumentError("ring", ring, f"must be one of {RING_FORMATS}")
    return SplitLayout.compute(size, indirect_size=indirect_size, buffer_size=buffer_size)


def make_queue(region: MemoryRegion, layout: SplitLayout, *, iova: Iova,
               event_idx: bool = False, indirect: bool = False,
               start_index: int = 0) -> SplitQueue[Any]:
    """The driver queue for ``layout`` over ``region`` (whose byte 0 the device sees at
    ``iova``)."""
    return SplitQueue(region, layout, iova=iova, event_idx=event_idx, indirect=indirect,
                      start_index=start_index)


__all__ = ["RING_FORMATS", "make_queue", "ring_layout"]
