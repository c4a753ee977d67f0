"""Public test helpers: a device-side peer, a hostile device, a hostile driver (for testing
back-ends), conformance suites."""

from virtq.testing.conformance import check_iova_allocator, check_memory_region
from virtq.testing.device import DeviceQueue, DriverProtocolError, Segment
from virtq.testing.embedded import BackendProcess, Faults, VhostUserBlkBackend
from virtq.testing.hostile import HostileDevice, PackedHostileDevice
from virtq.testing.hostile_driver import Buf, GuestMemory, HostileDriver, RawRing
from virtq.testing.packed_device import PackedDeviceQueue
from virtq.testing.testpmd import PortStats, TestPmd

__all__ = [
    "BackendProcess",
    "Buf",
    "DeviceQueue",
    "DriverProtocolError",
    "Faults",
    "GuestMemory",
    "HostileDevice",
    "HostileDriver",
    "PackedDeviceQueue",
    "PackedHostileDevice",
    "PortStats",
    "RawRing",
    "Segment",
    "TestPmd",
    "VhostUserBlkBackend",
    "check_iova_allocator",
    "check_memory_region",
]
