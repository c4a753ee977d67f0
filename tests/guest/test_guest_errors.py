"""Each thing that goes wrong on real systems, on the real kernel, with its message."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from tests.guest.conftest import guest_kernel_module
from virtq._sys import vfio as _vfio
from virtq.devices.rng import RngDevice
from virtq.errors import ArgumentError
from virtq.iova import BumpAllocator
from virtq.memory import AnonymousRegion, IovaRangeError
from virtq.transport import DmaArena
from virtq.transport.vfio_pci import (
    DeviceBoundError,
    FeaturesRefusedError,
    GroupNotViableError,
    NotVirtioError,
    PciSysfs,
    QueueSizeError,
    VfioPciTransport,
    VfioPermissionError,
)
from virtq.types import Iova

NR_FINIT_MODULE = 313  # x86-64


def test_device_bound_to_another_driver(rng_address):
    sysfs = PciSysfs()
    sysfs.bind(rng_address, "virtio-pci")  # what the guest kernel did at boot
    try:
        with pytest.raises(DeviceBoundError) as info:
            VfioPciTransport.open(rng_address)
        assert info.value.driver == "virtio-pci"
        assert f"{rng_address} is bound to virtio-pci, not vfio-pci" in str(info.value)
        assert "bind=True" in str(info.value)
        # ... and bind=True takes it over.
        with RngDevice.open_vfio(rng_address, bind=True, poll=True) as rng:
            assert len(rng.read(16)) == 16
        assert sysfs.driver(rng_address) == "vfio-pci"
    finally:
        sysfs.bind(rng_address)


def test_no_permission_on_the_group_node(rng_address):
    os.seteuid(65534)  # nobody; the real uid stays 0 so it can be undone
    try:
        with pytest.raises(VfioPermissionError) as info:
            VfioPciTransport.open(rng_address)
    finally:
        os.seteuid(0)
    assert isinstance(info.value, PermissionError) and info.value.errno == errno.EACCES
    msg = str(info.value)
    assert "opening VFIO group /dev/vfio/" in msg and "Permission denied" in msg
    assert "run as root" in msg and "chown" in msg


def test_group_not_viable():
    """Group 9 (q35's LPC bridge, SATA and SMBus functions): bind lpc_ich to the LPC
    bridge, hand the SMBus function to vfio-pci, and the group cannot be used."""
    sysfs = PciSysfs()
    module = guest_kernel_module("drivers/mfd/lpc_ich.ko")
    if sysfs.driver(sysfs.find(0x8086, 0x2918)[0]) is None:
        fd = os.open(module, os.O_RDONLY | os.O_CLOEXEC)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.syscall(NR_FINIT_MODULE, fd, b"", 0) == 0, os.strerror(ctypes.get_errno())
        finally:
            os.close(fd)
    lpc = sysfs.find(0x8086, 0x2918)[0]
    smbus = sysfs.find(0x8086, 0x2930)[0]
    assert sysfs.driver(lpc) == "lpc_ich"
    assert sysfs.iommu_group(lpc) == sysfs.iommu_group(smbus)
    # Not virtio: bind=True refuses to touch it, so bind it by hand.
    with pytest.raises(NotVirtioError, match="refusing to rebind"):
        VfioPciTransport.open(smbus, bind=True)
    sysfs.bind(smbus)
    try:
        with pytest.raises(GroupNotViableError) as info:
            VfioPciTransport.open(smbus)
        err = info.value
        assert err.members[lpc] == "lpc_ich" and err.members[smbus] == "vfio-pci"
        msg = str(err)
        assert f"IOMMU group {err.group} of {smbus} is not viable" in msg
        assert f"{lpc} (lpc_ich) is bound to a kernel driver" in msg
        assert "must be bound to vfio-pci or to no driver" in msg
    finally:
        (sysfs.devices / smbus / "driver_override").write_text("\n")
        (sysfs.devices / smbus / "driver" / "unbind").write_text(smbus)


@pytest.mark.parametrize(("base", "limit"), [(0xFEE0_0000, 0xFF00_0000),
                                             (0x80_0000_0000, 0x81_0000_0000)],
                         ids=["msi-window", "above-39-bit"])
def test_iova_outside_the_allowed_ranges(rng_address, base, limit):
    with pytest.raises(IovaRangeError) as info:
        RngDevice.open_vfio(rng_address, iova_allocator=BumpAllocator(base, limit), poll=True)
    msg = str(info.value)
    assert f"[{base:#x}," in msg and "outside the IOMMU's usable ranges" in msg
    assert "0x0-0xfedfffff" in msg and "0xfef00000-0x7fffffffff" in msg
    # The kernel agrees: asked directly, MAP_DMA refuses the span too.
    with VfioPciTransport.open(rng_address, poll=True) as t, AnonymousRegion(4096) as region:
        with pytest.raises(OSError, match="VFIO_IOMMU_MAP_DMA") as raw:
            _vfio.iommu_map_dma(t.container.fd, region.host_addr, base, 4096)
        assert raw.value.errno == errno.EINVAL


def test_device_that_never_sets_features_ok(rng_address):
    """QEMU's device with iommu_platform=on refuses any feature set without
    ACCESS_PLATFORM: FEATURES_OK does not stay set."""
    with VfioPciTransport.open(rng_address, poll=True) as t:
        with pytest.raises(FeaturesRefusedError) as info:
            t.negotiate_exact(1 << 32)  # VERSION_1 only
        assert info.value.features == 1 << 32
        assert not info.value.status & 0x08
        assert "did not accept features 0x100000000" in str(info.value)
        assert "FEATURES_OK did not stay set" in str(info.value)
        assert t.function.status & 0x80, "FAILED was set"


def test_queue_size_the_device_does_not_allow(rng_address):
    with pytest.raises(QueueSizeError) as info:
        RngDevice.open_vfio(rng_address, queue_size=16, poll=True)
    assert (info.value.size, info.value.maximum) == (16, 8)
    assert "queue 0 allows at most 8 entries; 16 were asked for" in str(info.value)


def test_second_open_of_the_same_group_is_busy(rng_address):
    with VfioPciTransport.open(rng_address, poll=True):
        with pytest.raises(OSError, match="already open") as info:
            VfioPciTransport.open(rng_address, poll=True)
        assert info.value.errno == errno.EBUSY
        assert "already open" in str(info.value)



def test_free_dma_refuses_an_arena_it_did_not_allocate(rng_address):
    """free_dma() of an arena it did not allocate, of its own arena twice, or of the arena a
    queue lives in: an ArgumentError each time, never a raw ValueError."""
    with RngDevice.open_vfio(rng_address, poll=True) as rng:
        t = rng.transport
        extra = t.alloc_dma(4096)
        t.free_dma(extra)
        with pytest.raises(ArgumentError, match="not allocated"):
            t.free_dma(extra)  # twice
        with AnonymousRegion(4096) as region, \
                pytest.raises(ArgumentError, match="not allocated"):
            t.free_dma(DmaArena(region, Iova(0x1000)))  # someone else's
        with pytest.raises(ArgumentError, match="queue"):
            t.free_dma(rng.arena)  # the request queue lives in it
        assert len(rng.read(16)) == 16  # the device is still fine
