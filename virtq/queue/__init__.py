"""Driver-side virtqueues over memory you own.

Devices and transports see a queue only through :class:`DriverQueue` / :class:`VirtQueue`
(``virtq.queue.interface``); :class:`SplitQueue` and :class:`SlotQueue` implement them over
one split-ring core, :class:`UserQueue` is the seed's buffer-pool API on top.
"""

from virtq.queue._splitcore import SplitRingView
from virtq.queue.factory import (
    RING_FORMATS,
    RingLayout,
    make_queue,
    make_slot_queue,
    ring_layout,
)
from virtq.queue.interface import Buffer, ChainTemplate, DriverQueue, QueueState, VirtQueue
from virtq.queue.packed import PackedQueue, PackedSlotQueue, PackedTemplate
from virtq.queue.slots import SlotQueue
from virtq.queue.split import InOrderSplitQueue, SplitQueue, SplitTemplate
from virtq.queue.userqueue import DescTableAddrs, UsedBuffer, UserQueue

__all__ = [
    "RING_FORMATS",
    "Buffer",
    "ChainTemplate",
    "DescTableAddrs",
    "DriverQueue",
    "InOrderSplitQueue",
    "PackedQueue",
    "PackedSlotQueue",
    "PackedTemplate",
    "QueueState",
    "RingLayout",
    "SlotQueue",
    "SplitQueue",
    "SplitRingView",
    "SplitTemplate",
    "UsedBuffer",
    "UserQueue",
    "VirtQueue",
    "make_queue",
    "make_slot_queue",
    "ring_layout",
]
