"""Device drivers over any transport."""

from virtq.devices.blk import BlkDevice, BlkRequest
from virtq.devices.dma import DmaBuffer
from virtq.devices.errors import BlkIOError, BlkUnsupportedError
from virtq.devices.net import NetDevice, NetTimeoutError
from virtq.devices.rng import RngDevice, RngTimeoutError
from virtq.transport.reconnect import ReconnectError, ReconnectPolicy

__all__ = [
    "BlkDevice",
    "BlkIOError",
    "BlkRequest",
    "BlkUnsupportedError",
    "DmaBuffer",
    "NetDevice",
    "NetTimeoutError",
    "ReconnectError",
    "ReconnectPolicy",
    "RngDevice",
    "RngTimeoutError",
]
