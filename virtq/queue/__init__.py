"""Driver-side virtqueues over memory you own."""

from virtq.queue.split import Buffer, SplitQueue, SplitRingView

__all__ = ["Buffer", "SplitQueue", "SplitRingView"]
