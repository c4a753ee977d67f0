"""Public test helpers: a device-side peer, a hostile device, a fake FUSE daemon,
conformance suites."""

from virtq.testing.conformance import check_iova_allocator, check_memory_region
from virtq.testing.device import DeviceQueue, DriverProtocolError, Segment
from virtq.testing.embedded import BackendProcess, Faults, VhostUserBlkBackend
from virtq.testing.fake_fs import FakeFsDaemon
from virtq.testing.hostile import HostileDevice
from virtq.testing.testpmd import PortStats, TestPmd

__all__ = [
    "BackendProcess",
    "DeviceQueue",
    "DriverProtocolError",
    "FakeFsDaemon",
    "Faults",
    "HostileDevice",
    "PortStats",
    "Segment",
    "TestPmd",
    "VhostUserBlkBackend",
    "check_iova_allocator",
    "check_memory_region",
]
