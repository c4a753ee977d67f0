"""Driver-side virtqueues over memory you own."""

from virtq.queue.slots import SlotQueue
from virtq.queue.split import Buffer, SplitQueue, SplitRingView
from virtq.queue.userqueue import DescTableAddrs, UsedBuffer, UserQueue

__all__ = ["Buffer", "DescTableAddrs", "SlotQueue", "SplitQueue", "SplitRingView", "UsedBuffer",
           "UserQueue"]
