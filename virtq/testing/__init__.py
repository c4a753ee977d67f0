"""Public test helpers: a device-side peer, a hostile device, conformance suites."""

from virtq.testing.conformance import check_iova_allocator, check_memory_region
from virtq.testing.device import DeviceQueue, DriverProtocolError, Segment
from virtq.testing.embedded import BackendProcess, Faults, VhostUserBlkBackend
from virtq.testing.hostile import HostileDevice, PackedHostileDevice
from virtq.testing.packed_device import PackedDeviceQueue
from virtq.testing.testpmd import PortStats, TestPmd

__all__ = [
    "BackendProcess",
    "DeviceQueue",
    "DriverProtocolError",
    "Faults",
    "HostileDevice",
    "PackedDeviceQueue",
    "PackedHostileDevice",
    "PortStats",
    "Segment",
    "TestPmd",
    "VhostUserBlkBackend",
    "check_iova_allocator",
    "check_memory_region",
]
