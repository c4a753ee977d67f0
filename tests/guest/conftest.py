"""Tests that drive real virtio-pci devices through VFIO, inside the vfio-guest VM.

They run only there (``VIRTQ_GUEST=1``, set by ``scripts/vfio-guest``); on the host this
directory collects nothing, and ``tests/test_vfio_guest.py`` boots the guest to run it.
Devices are found by vendor:device id, never by PCI address (the harness's 9p devices shift
the addresses).
"""

from __future__ import annotations

import os
import platform
import select
from pathlib import Path

import pytest

from virtq.transport.vfio_pci import PciSysfs, VfioPciTransport, find_virtio_devices

IN_GUEST = os.environ.get("VIRTQ_GUEST") == "1"
# Outside the guest there is no /dev/vfio and no device to test: collect nothing here.
collect_ignore_glob = [] if IN_GUEST else ["test_*.py"]

#: Where the harness writes the disk image QEMU serves as virtio-blk (the writable share).
GUEST_OUT = Path(os.environ.get("VIRTQ_GUEST_OUT", "/mnt/vg/out"))
DISK_IMAGE = GUEST_OUT / "disk.img"
SECTOR = 512


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "noiommu_boot: needs a guest booted with iommu=off (run separately)")
    config.addinivalue_line(
        "markers", "packed_boot: needs devices that offer RING_PACKED (--devopt packed=on)")


def pattern_sector(sector: int) -> bytes:
    """What the harness (vfio_virtio.py --make-disk) writes into each sector of disk.img:
    the line ``virtq-test-disk sector NNNNNNNN\\n`` repeated and cut at 512 bytes."""
    line = b"virtq-test-disk sector %08d\n" % sector
    return (line * (SECTOR // len(line) + 1))[:SECTOR]


def pattern(first: int, count: int) -> bytes:
    return b"".join(pattern_sector(s) for s in range(first, first + count))



class MsixCounter:
    """Counts the MSI-X messages of queue ``queue``'s vector: installed as the transport's
    wait, it sleeps on the vector's eventfd as that wait does, but keeps the eventfd's count
    instead of dropping it."""

    def __init__(self, t: VfioPciTransport, queue: int = 0) -> None:
        efd = t.eventfd(queue)
        assert efd is not None
        self.efd = efd
        self.signals = 0
        t.wait = self.wait  # type: ignore[method-assign]

    def wait(self, timeout: float | None) -> bool:
        if not select.select([self.efd], [], [], timeout)[0]:
            return False
        self.signals += os.eventfd_read(self.efd)
        return True

    def settle(self, expected: int) -> int:
        """The count once ``expected`` messages came, or none came for 5 s: under TCG the
        device often completes before the driver looks, so many reads never block -- but
        every completion still raises its message, and the last may be in flight still."""
        while self.signals < expected and self.wait(5.0):
            pass
        return self.signals


@pytest.fixture(scope="session")
def rng_address() -> str:
    found = find_virtio_devices(4)
    assert found, "no modern virtio-rng (1af4:1044) in the guest"
    return found[0]


@pytest.fixture(scope="session")
def blk_address() -> str:
    found = find_virtio_devices(2)
    assert found, "no modern virtio-blk (1af4:1042) in the guest"
    return found[0]


@pytest.fixture(scope="session", autouse=True)
def _bound_to_vfio() -> None:
    """Bind the virtio-rng and virtio-blk functions to vfio-pci once (tests that need
    another binding restore this one).  Without an IOMMU (the noiommu boot) there is
    nothing to bind."""
    sysfs = PciSysfs()
    for device_type in (4, 2):
        for address in find_virtio_devices(device_type):
            if sysfs.iommu_group(address) is not None:
                sysfs.bind(address)


@pytest.fixture
def hugepages() -> int:
    """At least 32 free 2 MiB hugepages -- a BlkDevice arena takes 9 -- reserved here if
    needed (as root; the guest has 960 MB)."""
    want = 32
    path = Path("/proc/sys/vm/nr_hugepages")
    free = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
    missing = want - int(free.read_text())
    if missing > 0:
        path.write_text(str(int(path.read_text()) + missing))
    assert int(free.read_text()) >= want, f"the guest could not reserve {want} hugepages"
    return want


def guest_kernel_module(relative: str) -> Path:
    """A module of the guest's own kernel, from the unpacked package the harness caches
    (visible in the guest through the read-only host root)."""
    root = Path(os.environ["VIRTQ_VG_KERNEL"]) / "lib" / "modules" / platform.release()
    return root / "kernel" / relative
