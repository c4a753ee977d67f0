"""virtio-blk through VFIO: capacity, the host's pattern, write/read-back, a hand-built
3-descriptor chain, and IOVAs chosen by a RangeAllocator over the ranges the IOMMU reports."""

from __future__ import annotations

import os
import struct

import pytest

from tests.guest.conftest import DISK_IMAGE, SECTOR, pattern
from virtq.abi import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from virtq.devices.blk import BlkDevice
from virtq.errors import ArgumentError
from virtq.iova import RangeAllocator
from virtq.layout import SplitLayout
from virtq.memory import AnonymousRegion, HugepageRegion, MemfdRegion
from virtq.queue import SplitQueue
from virtq.testing import check_memory_region
from virtq.transport.vfio_pci import VfioPciTransport

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1


def guest_physical(vaddr: int) -> int:
    """The guest-physical address behind ``vaddr`` (root can read PFNs in pagemap)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(vaddr // 4096 * 8)
        (entry,) = struct.unpack("<Q", f.read(8))
    assert entry >> 63 & 1, "page not present"
    return (entry & ((1 << 55) - 1)) * 4096 + vaddr % 4096


@pytest.mark.parametrize("poll", [True, False], ids=["poll", "msix"])
def test_capacity_and_the_hosts_pattern(blk_address, poll):
    with BlkDevice.open_vfio(blk_address, poll=poll) as blk:
        assert blk.capacity == DISK_IMAGE.stat().st_size // SECTOR
        # The image was written by the harness on the host; the device reads it into memory
        # we own, at IOVAs we chose -- through the vIOMMU (iommu_platform=on).
        assert blk.read(0, 8 * SECTOR) == pattern(0, 8)
        assert blk.read(1000, 64 * SECTOR) == pattern(1000, 64)
        last = blk.capacity - 8
        assert blk.read(last, 8 * SECTOR) == pattern(last, 8)


@pytest.mark.parametrize("poll", [True, False], ids=["poll", "msix"])
def test_write_then_read_back(blk_address, poll):
    payload = os.urandom(16 * SECTOR)
    with BlkDevice.open_vfio(blk_address, poll=poll) as blk:
        sector = 64 if poll else 128
        blk.write(sector, payload)
        assert blk.read(sector, len(payload)) == payload
        blk.flush()
    # The write reached the host's image file (the writable share QEMU serves it from).
    with open(DISK_IMAGE, "rb") as f:
        f.seek(sector * SECTOR)
        assert f.read(len(payload)) == payload


def test_a_three_descriptor_chain_by_hand(blk_address):
    """Header (device-readable) + data + status (device-writable), straight on the
    transport and a SplitQueue: the layout of §5.2.6."""
    with VfioPciTransport.open(blk_address) as t:
        t.negotiate(0)
        layout = SplitLayout.compute(16)
        arena = t.alloc_dma(layout.nbytes + 3 * 4096)
        q = SplitQueue(arena.region, layout, iova=arena.iova)
        t.attach_queue(0, q)
        t.start()
        mem = arena.region.view()
        try:
            hdr, data, status = layout.nbytes, layout.nbytes + 4096, layout.nbytes + 2 * 4096
            struct.pack_into("<IIQ", mem, hdr, VIRTIO_BLK_T_IN, 0, 200)
            mem[status] = 0xFF
            head = q.add([(arena.addr(hdr), 16)],
                         [(arena.addr(data), 4096), (arena.addr(status), 1)], "read")
            with q.ring() as ring:
                d0 = ring.desc[head]
                d1 = ring.desc[d0.next]
                d2 = ring.desc[d1.next]
                assert (d0.flags, d1.flags, d2.flags) == (
                    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_WRITE)
                assert (d0.addr, d1.addr, d2.addr) == (
                    arena.iova + hdr, arena.iova + data, arena.iova + status)
                del d0, d1, d2
            if q.publish():
                t.notify(0)
            done = []
            while not done:
                done = q.drain_used()
                if not done:
                    t.wait(1.0)
            assert done == [("read", 4097)]
            assert mem[status] == 0
            assert bytes(mem[data : data + 4096]) == pattern(200, 8)
        finally:
            mem.release()


def test_iovas_from_a_range_allocator_over_the_reported_ranges(blk_address):
    with VfioPciTransport.open(blk_address, poll=True) as probe:
        ranges = probe.iova_ranges
    # What the kernel reports for intel-iommu: the MSI window is a hole, 39-bit top.
    assert len(ranges) >= 2
    assert not any(s <= 0xFEE0_0000 <= e for s, e in ranges)
    allocator = RangeAllocator.from_inclusive(ranges)
    # IOVA 0 is usable for the IOMMU, but QEMU takes a ring at address 0 for "queue not
    # configured"; the transport refuses it rather than let every kick be ignored.
    with pytest.raises(ArgumentError, match="IOVA 0"):
        BlkDevice.open_vfio(blk_address, iova_allocator=allocator)
    assert allocator._live == {}, "the failed open freed its IOVA"
    allocator.alloc(4096)  # keep page 0 out of the way: the next arena starts above it
    with BlkDevice.open_vfio(blk_address, iova_allocator=allocator) as blk:
        iova = blk.arena.iova
        assert any(s <= iova and iova + blk.arena.nbytes - 1 <= e for s, e in ranges)
        assert iova in allocator._live
        assert blk.read(0, 8 * SECTOR) == pattern(0, 8)
    assert iova not in allocator._live, "close() freed the IOVA"


@pytest.mark.parametrize("window", [(0x7F_0000_0000, 0x7F_4000_0000),
                                    (0xF000_0000, 0xFEE0_0000)],
                         ids=["top-of-39-bit", "just-below-msi-window"])
def test_dma_goes_through_the_viommu_at_our_iovas(blk_address, window):
    """Buffers at IOVAs far from any guest-physical address the 1 GiB guest has: if the
    device bypassed the IOMMU the pattern could not arrive."""
    allocator = RangeAllocator([window])
    with BlkDevice.open_vfio(blk_address, iova_allocator=allocator) as blk:
        arena = blk.arena
        assert window[0] <= arena.iova < window[1]
        assert guest_physical(arena.region.host_addr) != arena.iova
        assert blk.read(16, 8 * SECTOR) == pattern(16, 8)
        blk.write(300, pattern(5, 8))
        assert blk.read(300, 8 * SECTOR) == pattern(5, 8)


def test_default_iovas_stay_above_the_floor_inside_the_ranges(blk_address):
    with BlkDevice.open_vfio(blk_address) as blk:
        t = blk.transport
        assert isinstance(t, VfioPciTransport)
        iova = blk.arena.iova
        assert iova >= 1 << 20
        assert any(s <= iova and iova + blk.arena.nbytes - 1 <= e for s, e in t.iova_ranges)


@pytest.mark.parametrize("backend", ["anonymous", "hugepage", "memfd"])
def test_memory_backends_mapped_and_used_for_dma(blk_address, hugepages, backend):
    factory = {"anonymous": AnonymousRegion, "hugepage": HugepageRegion,
               "memfd": MemfdRegion}[backend]
    with BlkDevice.open_vfio(blk_address, memory=factory) as blk:
        assert type(blk.arena.region.inner) is factory  # type: ignore[attr-defined]
        if backend == "hugepage":
            assert blk.arena.iova % (2 << 20) == 0
        # Zero-copy: the device writes straight into a buffer of the chosen backend.
        # (alloc_buffer hands out the whole arena, rounded to the backend's page size.)
        buf = blk.alloc_buffer(8 * SECTOR).slice(0, 8 * SECTOR)
        blk.submit_read(40, into=buf).wait()
        assert buf.read() == pattern(40, 8)
        buf.write(pattern(77, 8))
        blk.submit_write(500, buf).wait()
        assert blk.read(500, 8 * SECTOR) == pattern(77, 8)


@pytest.mark.parametrize("backend", [AnonymousRegion, HugepageRegion])
def test_vfio_dma_region_keeps_the_memory_region_contract(blk_address, hugepages, backend):
    with VfioPciTransport.open(blk_address, poll=True) as t:
        allocator = RangeAllocator(t.container.usable_ranges())
        check_memory_region(lambda: t.container.map_region(backend(64 * 1024), allocator,
                                                           own=True))
        assert t.container.mappings == {}
        assert allocator._live == {}


def test_capacity_reads_match_a_second_open(blk_address):
    with BlkDevice.open_vfio(blk_address, poll=True) as a:
        first = a.capacity
    with BlkDevice.open_vfio(blk_address, poll=True) as b:
        assert b.capacity == first
        assert b.get_id() is not None

