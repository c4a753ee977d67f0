"""virtq: the driver side of virtio, in Python.

Own a virtqueue in memory you allocated, hand it to a device (a vhost-user backend, a PCI
device through VFIO, or the in-process test peer), post buffers, notify, collect completions
-- zero-copy over the shared memory.

Layers (each importable on its own; a lower one never imports a higher one):
``virtq.layout`` (ring arithmetic) < ``virtq.abi`` / ``virtq._sys`` < ``virtq.memory`` /
``virtq.iova`` < ``virtq.queue`` < transports, devices, ``virtq.testing``.
"""

from virtq.errors import (
    ArgumentError,
    DeviceError,
    DeviceProtocolError,
    HugepagesUnavailableError,
    IovaError,
    IovaExhaustedError,
    LayoutError,
    QueueBrokenError,
    QueueFullError,
    QueueStateError,
    RegionBoundsError,
    RegionBusyError,
    RegionClosedError,
    VirtqError,
    VirtqOSError,
    VirtqTimeoutError,
    VirtqUsageError,
)
from virtq.types import HostAddr, Iova, Offset

__version__ = "0.1.0.dev0"

__all__ = [
    "ArgumentError",
    "DeviceError",
    "DeviceProtocolError",
    "HostAddr",
    "HugepagesUnavailableError",
    "Iova",
    "IovaError",
    "IovaExhaustedError",
    "LayoutError",
    "Offset",
    "QueueBrokenError",
    "QueueFullError",
    "QueueStateError",
    "RegionBoundsError",
    "RegionBusyError",
    "RegionClosedError",
    "VirtqError",
    "VirtqOSError",
    "VirtqTimeoutError",
    "VirtqUsageError",
    "__version__",
]
