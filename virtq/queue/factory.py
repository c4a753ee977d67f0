"""Ring-format-independent construction: the layout of a queue's memory, and the queue.

Device drivers call these instead of naming a ring format: a split ring (VIRTIO 1.2 §2.7)
or a packed ring (§2.8) is chosen here, and no line of device code changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from virtq.errors import ArgumentError
from virtq.layout import PackedLayout, SplitLayout
from virtq.memory import MemoryRegion
from virtq.queue.interface import DriverQueue
from virtq.queue.packed import PackedQueue, PackedSlotQueue
from virtq.queue.slots import SlotQueue
from virtq.queue.split import InOrderSplitQueue, SplitQueue
from virtq.types import Iova

#: The ring formats virtq implements.
RING_FORMATS = ("split", "packed")
#: Either format's layout.
RingLayout = SplitLayout | PackedLayout


def ring_layout(size: int, *, indirect_size: int = 0, buffer_size: int = 0,
                ring: str = "split") -> RingLayout:
    """Where the parts of a ``size``-entry ring of format ``ring`` live in its memory
    (page-aligned, so layouts can be stacked with ``shifted()``), with ``indirect_size``
    indirect-table entries per descriptor (split) or buffer id (packed) and ``buffer_size``
    bytes of buffer per slot.  Raises :class:`~virtq.errors.LayoutError` for a size the
    format does not allow (split: a power of two), :class:`ArgumentError` for a format."""
    if ring == "split":
        return SplitLayout.compute(size, indirect_size=indirect_size, buffer_size=buffer_size)
    if ring == "packed":
        return PackedLayout.compute(size, indirect_size=indirect_size, buffer_size=buffer_size)
    raise ArgumentError("ring", ring, f"must be one of {RING_FORMATS}")


def make_queue(region: MemoryRegion, layout: RingLayout, *, iova: Iova,
               event_idx: bool = False, indirect: bool = False, in_order: bool = False,
               start_index: int | None = None) -> DriverQueue[Any]:
    """The driver queue for ``layout`` (its format decides which) over ``region``, whose
    byte 0 the device sees at ``iova``.  ``start_index``: the format's start (split:
    avail index; packed: ``position | wrap << 15``); None: the format's default.  Raises
    :class:`~virtq.errors.ArgumentError` for another kind of layout, and what the queue's
    constructor raises."""
    if isinstance(layout, PackedLayout):
        return PackedQueue(region, layout, iova=iova, event_idx=event_idx, indirect=indirect,
                           in_order=in_order,
                           start_index=1 << 15 if start_index is None else start_index)
    if isinstance(layout, SplitLayout):
        cls = InOrderSplitQueue if in_order else SplitQueue
        return cls(region, layout, iova=iova, event_idx=event_idx, indirect=indirect,
                   start_index=0 if start_index is None else start_index)
    raise ArgumentError("layout", layout, "must be a SplitLayout or a PackedLayout")


def make_slot_queue(region: MemoryRegion, layout: RingLayout, *, iova: Iova,
                    slots: Sequence[int], slot_size: int, writable: bool,
                    event_idx: bool = False, in_order: bool = False,
                    start_index: int | None = None) -> SlotQueue | PackedSlotQueue:
    """A queue of fixed one-buffer slots (``SlotQueue`` or ``PackedSlotQueue``, by the
    layout's format): the same ``submit``/``reap`` API either way.  Raises
    :class:`~virtq.errors.ArgumentError` for another kind of layout, and what the queue's
    constructor raises."""
    if isinstance(layout, PackedLayout):
        return PackedSlotQueue(region, layout, iova=iova, slots=slots, slot_size=slot_size,
                               writable=writable, event_idx=event_idx, in_order=in_order,
                               start_index=1 << 15 if start_index is None else start_index)
    if isinstance(layout, SplitLayout):
        return SlotQueue(region, layout, iova=iova, slots=slots, slot_size=slot_size,
                         writable=writable, event_idx=event_idx, in_order=in_order,
                         start_index=0 if start_index is None else start_index)
    raise ArgumentError("layout", layout, "must be a SplitLayout or a PackedLayout")


__all__ = ["RING_FORMATS", "RingLayout", "make_queue", "make_slot_queue", "ring_layout"]
