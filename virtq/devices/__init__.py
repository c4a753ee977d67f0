"""Device drivers over any transport."""

from virtq.devices.blk import BlkDevice, BlkRequest
from virtq.devices.dma import DmaBuffer
from virtq.devices.errors import BlkIOError, BlkUnsupportedError
from virtq.devices.net import NetDevice, NetTimeoutError

__all__ = [
    "BlkDevice",
    "BlkIOError",
    "BlkRequest",
    "BlkUnsupportedError",
    "DmaBuffer",
    "NetDevice",
    "NetTimeoutError",
]
