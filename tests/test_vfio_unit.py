"""VFIO and virtio-pci pieces that run without /dev/vfio: the ioctl tables, the capability
parsers (on bytes recorded from the guest's real devices, tests/data/vfio/), sysfs error
paths on a fake tree, the virtio-pci register protocol against a register model, and
RngDevice over an in-process device.  The real devices are exercised in the guest
(tests/guest/, run by tests/test_vfio_guest.py)."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest

from virtq._sys import vfio
from virtq.abi import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1
from virtq.devices.rng import RngDevice, RngTimeoutError
from virtq.errors import (
    ArgumentError,
    DeviceProtocolError,
    IovaError,
    QueueBrokenError,
    VirtqError,
    VirtqOSError,
    VirtqTimeoutError,
)
from virtq.layout import SplitLayout
from virtq.memory import AnonymousRegion, IovaRangeError, VfioContainer
from virtq.memory.vfio import check_iova_span
from virtq.queue import QueueState, SplitQueue
from virtq.testing import DeviceQueue
from virtq.transport import DmaArena, Transport
from virtq.transport.vfio_pci import (
    COMMON_CFG,
    VIRTIO_MSI_NO_VECTOR,
    BadCapabilityError,
    DeviceBoundError,
    DeviceResetTimeoutError,
    FeaturesRefusedError,
    NoIommuGroupError,
    NoSuchDeviceError,
    NotVirtioError,
    PciSysfs,
    QueueSizeError,
    VectorRefusedError,
    VfioNotFoundError,
    VfioPciTransport,
    VirtioPciFunction,
    find_virtio_devices,
    normalize_address,
    parse_virtio_caps,
    walk_capabilities,
)
from virtq.transport.vfio_pci.caps import check_windows
from virtq.types import Iova

DATA = Path(__file__).parent / "data" / "vfio"
RNG_CONFIG = (DATA / "virtio-rng-pci.config").read_bytes()
BLK_CONFIG = (DATA / "virtio-blk-pci.config").read_bytes()
IOMMU_INFO = (DATA / "iommu-info.bin").read_bytes()
QEMU_RANGES = ((0, 0xFEDF_FFFF), (0xFEF0_0000, 0x7F_FFFF_FFFF))


# -- ioctl tables and structures ----------------------------------------------------------


def test_ioctl_numbers_match_the_kernel_uapi():
    # _IO(';', 100 + n): include/uapi/linux/vfio.h
    expected = {
        "VFIO_GET_API_VERSION": 0x3B64, "VFIO_CHECK_EXTENSION": 0x3B65,
        "VFIO_SET_IOMMU": 0x3B66, "VFIO_GROUP_GET_STATUS": 0x3B67,
        "VFIO_GROUP_SET_CONTAINER": 0x3B68, "VFIO_GROUP_UNSET_CONTAINER": 0x3B69,
        "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A, "VFIO_DEVICE_GET_INFO": 0x3B6B,
        "VFIO_DEVICE_GET_REGION_INFO": 0x3B6C, "VFIO_DEVICE_GET_IRQ_INFO": 0x3B6D,
        "VFIO_DEVICE_SET_IRQS": 0x3B6E, "VFIO_DEVICE_RESET": 0x3B6F,
        "VFIO_IOMMU_GET_INFO": 0x3B70, "VFIO_IOMMU_MAP_DMA": 0x3B71,
        "VFIO_IOMMU_UNMAP_DMA": 0x3B72,
    }
    assert {e.name: e.request for e in vfio.IOCTLS} == expected
    assert {e.fd for e in vfio.IOCTLS} == {"container", "group", "device"}
    for name, number in expected.items():
        assert getattr(vfio, name) == number


def test_structures_have_the_kernel_sizes_and_fill_argsz():
    for cls, size in vfio.STRUCT_SIZES.items():
        assert ctypes.sizeof(cls) == size, cls.__name__
    assert vfio.DmaMap(iova=0x1000).argsz == 32
    assert vfio.RegionInfo(index=7).argsz == 32
    assert vfio.IommuType1Info().argsz == 24
    assert vfio.IrqSet(argsz=28).argsz == 28  # an explicit argsz (header + data) is kept
    # Field offsets the kernel reads (vfio_iommu_type1_dma_map: vaddr @8, iova @16, size @24).
    assert vfio.DmaMap.vaddr.offset == 8
    assert vfio.DmaMap.iova.offset == 16
    assert vfio.DmaMap.size.offset == 24
    assert vfio.RegionInfo.size.offset == 16
    assert vfio.IommuType1Info.iova_pgsizes.offset == 8


def test_errors_keep_the_errno_and_say_what_was_attempted():
    err = vfio.vfio_error(errno.EACCES, "opening /dev/vfio/7", "run as root")
    assert isinstance(err, PermissionError) and isinstance(err, VirtqError)
    assert isinstance(err, VirtqOSError)
    assert err.errno == errno.EACCES
    assert "opening /dev/vfio/7" in str(err) and "run as root" in str(err)
    assert isinstance(vfio.vfio_error(errno.ENOENT, "x"), FileNotFoundError)
    other = vfio.vfio_error(errno.EBUSY, "x")
    assert type(other) is vfio.VfioOSError and other.errno == errno.EBUSY


# -- capability chains (recorded VFIO answers) ---------------------------------------------


def test_iommu_info_from_the_guest():
    info = vfio.parse_iommu_info(IOMMU_INFO)
    assert info.flags == vfio.VFIO_IOMMU_INFO_PGSIZES | vfio.VFIO_IOMMU_INFO_CAPS
    assert info.page_sizes == 0x4020_1000  # 4 KiB, 2 MiB, 1 GiB
    assert info.page_size_list() == [4096, 2 << 20, 1 << 30]
    assert info.min_page_size == 4096
    # The x86 MSI window 0xFEE00000-0xFEEFFFFF is carved out; 39-bit address width on top.
    assert info.iova_ranges == QEMU_RANGES
    assert info.dma_avail == 65535


def _info_with_caps(caps: list[tuple[int, bytes]], *, next_override: dict[int, int] | None = None
                    ) -> bytes:
    """A type1 info buffer with a chain of (id, body) capabilities."""
    buf = bytearray(24)
    offsets = []
    for _cap_id, body in caps:
        offsets.append(len(buf))
        buf += bytes(8) + body
    for i, (cap_id, _body) in enumerate(caps):
        nxt = offsets[i + 1] if i + 1 < len(caps) else 0
        if next_override and i in next_override:
            nxt = next_override[i]
        struct.pack_into("<HHI", buf, offsets[i], cap_id, 1, nxt)
    struct.pack_into("<IIQII", buf, 0, len(buf), 3, 0x1000, offsets[0] if caps else 0, 0)
    return bytes(buf)


def test_iommu_info_chain_errors_are_caught():
    ranges = struct.pack("<II", 1, 0) + struct.pack("<QQ", 0x1000, 0xFFFF)
    good = _info_with_caps([(vfio.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, ranges)])
    assert vfio.parse_iommu_info(good).iova_ranges == ((0x1000, 0xFFFF),)
    looped = _info_with_caps([(99, b""), (98, b"")], next_override={1: 24})
    with pytest.raises(vfio.CapChainError, match="loops"):
        vfio.parse_iommu_info(looped)
    outside = _info_with_caps([(99, b"")], next_override={0: 4096})
    with pytest.raises(vfio.CapChainError, match="does not fit"):
        vfio.parse_iommu_info(outside)
    too_many = _info_with_caps([(vfio.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
                                 struct.pack("<II", 5, 0) + bytes(16))])
    with pytest.raises(vfio.CapChainError, match="5 ranges"):
        vfio.parse_iommu_info(too_many)
    # No capability chain (kernels before 5.4): no ranges, nothing refused.
    bare = struct.pack("<IIQII", 24, 1, 0x1000, 0, 0)
    assert vfio.parse_iommu_info(bare).iova_ranges == ()


def test_region_info_from_the_guest_and_sparse_areas():
    bar = vfio.parse_region_info((DATA / "virtio-rng-pci.bar4.region-info").read_bytes())
    assert (bar.index, bar.size, bar.offset) == (4, 0x4000, 4 << 40)
    assert bar.readable and bar.writable and bar.mmappable and bar.sparse is None
    # A BAR that also holds the MSI-X table gets a SPARSE_MMAP capability instead.
    head = struct.pack("<IIIIQQ", 32 + 8 + 8 + 32, 0xF, 1, 32, 0x8000, 1 << 40)
    cap = struct.pack("<HHIII", vfio.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, 0, 2, 0)
    areas = struct.pack("<QQQQ", 0, 0x1000, 0x3000, 0x5000)
    sparse = vfio.parse_region_info(head + cap + areas)
    assert sparse.sparse == ((0, 0x1000), (0x3000, 0x5000))
    assert "sparse" in sparse.describe()


# -- virtio capabilities (recorded config space) ----------------------------------------


@pytest.mark.parametrize(("config", "device", "vtype"), [(RNG_CONFIG, 0x1044, 4),
                                                         (BLK_CONFIG, 0x1042, 2)])
def test_virtio_caps_of_the_guest_devices(config, device, vtype):
    caps = parse_virtio_caps(config)
    assert (caps.vendor, caps.device, caps.revision) == (0x1AF4, device, 1)
    assert caps.virtio_device_type == vtype
    # QEMU puts all four windows in BAR 4, 4 KiB apart, notify multiplier 4.
    assert (caps.common.bar, caps.common.offset, caps.common.length) == (4, 0x0000, 0x1000)
    assert (caps.isr.bar, caps.isr.offset) == (4, 0x1000)
    assert (caps.device_cfg.bar, caps.device_cfg.offset) == (4, 0x2000)
    assert (caps.notify.bar, caps.notify.offset) == (4, 0x3000)
    assert caps.notify_off_multiplier == 4
    assert caps.pci_cfg is not None and caps.pci_cfg.position == 0x84
    assert caps.msix is not None and caps.msix.table_size == 2 and caps.msix.table_bar == 1
    assert [pos for pos, _ in caps.chain] == [0x98, 0x84, 0x70, 0x60, 0x50, 0x40]
    check_windows(caps, {4: 0x4000})
    with pytest.raises(BadCapabilityError, match="outside BAR 4"):
        check_windows(caps, {4: 0x3800})
    assert "notify_off_multiplier=4" in caps.describe()


def _patched(config: bytes, offset: int, data: bytes) -> bytes:
    buf = bytearray(config)
    buf[offset : offset + len(data)] = data
    return bytes(buf)


def test_malformed_capability_lists_are_refused():
    # 0x98 (MSI-X) -> 0x84 -> 0x70 (notify) -> 0x60 -> 0x50 -> 0x40 (common) -> 0
    with pytest.raises(BadCapabilityError, match="loops"):
        parse_virtio_caps(_patched(RNG_CONFIG, 0x41, bytes([0x98])))
    with pytest.raises(BadCapabilityError, match="outside"):
        parse_virtio_caps(_patched(RNG_CONFIG, 0x41, bytes([0x20])))
    with pytest.raises(BadCapabilityError, match="cap_len 8"):
        parse_virtio_caps(_patched(RNG_CONFIG, 0x42, bytes([8])))
    with pytest.raises(BadCapabilityError, match="notify_off_multiplier 3"):
        parse_virtio_caps(_patched(RNG_CONFIG, 0x70 + 16, struct.pack("<I", 3)))
    with pytest.raises(BadCapabilityError, match="4-aligned"):
        parse_virtio_caps(_patched(RNG_CONFIG, 0x40 + 8, struct.pack("<I", 2)))
    with pytest.raises(BadCapabilityError, match="need 256"):
        parse_virtio_caps(RNG_CONFIG[:128])
    # A reserved BAR number makes the driver ignore the structure (§4.1.4): here the only
    # common one, so the device looks legacy-only.
    with pytest.raises(NotVirtioError, match="common"):
        parse_virtio_caps(_patched(RNG_CONFIG, 0x40 + 4, bytes([7])))
    with pytest.raises(NotVirtioError, match="not a virtio-pci function"):
        parse_virtio_caps(_patched(RNG_CONFIG, 0, struct.pack("<H", 0x8086)))
    # No capability list at all.
    no_caps = _patched(RNG_CONFIG, 0x06, struct.pack("<H", 0))
    assert walk_capabilities(no_caps) == []
    with pytest.raises(NotVirtioError):
        parse_virtio_caps(no_caps)


def test_first_capability_of_a_type_wins():
    # Point the MSI-X capability's "next" at a copy of the common cap with another offset:
    # the list order is 0x98 -> 0xA8 (copy) -> 0x84 ..., so the copy comes first and wins.
    cfg = bytearray(RNG_CONFIG)
    cfg[0xA8 : 0xA8 + 16] = cfg[0x40 : 0x40 + 16]
    struct.pack_into("<I", cfg, 0xA8 + 8, 0x800)
    cfg[0xA9] = 0x84
    cfg[0x99] = 0xA8
    caps = parse_virtio_caps(bytes(cfg))
    assert caps.common.offset == 0x800 and caps.common.position == 0xA8
    assert len([c for c in caps.virtio_caps if c.name == "common"]) == 2


# -- IOVA ranges ----------------------------------------------------------------------


def test_iova_spans_are_checked_against_the_reported_ranges():
    check_iova_span(QEMU_RANGES, 0x1000_0000, 0x10_0000)
    check_iova_span(QEMU_RANGES, 0xFEF0_0000, 0x1000)
    check_iova_span(QEMU_RANGES, 0x7F_FFFF_F000, 0x1000)
    for iova, size in ((0xFEE0_0000, 0x1000), (0xFEDF_F000, 0x2000), (0x80_0000_0000, 0x1000),
                       (0x7F_FFFF_F000, 0x2000)):
        with pytest.raises(IovaRangeError) as info:
            check_iova_span(QEMU_RANGES, iova, size)
        assert isinstance(info.value, IovaError)
        assert "0xfef00000-0x7fffffffff" in str(info.value)
        assert info.value.iova == iova
    check_iova_span((), 0xFEE0_0000, 0x1000)  # nothing reported: the kernel decides


def test_container_without_vfio_says_what_to_load(tmp_path):
    with pytest.raises(VfioNotFoundError) as info:
        VfioContainer(str(tmp_path / "vfio"))
    assert info.value.errno == errno.ENOENT
    assert "modprobe vfio-pci" in str(info.value) and "intel_iommu=on" in str(info.value)


# -- sysfs (a fake tree) -------------------------------------------------------------------


def _fake_sysfs(root: Path, devices: dict[str, dict[str, object]]) -> Path:
    """``devices``: address -> {"ids": (vendor, device), "driver": name|None,
    "group": n|None}."""
    pci = root / "bus" / "pci"
    (pci / "devices").mkdir(parents=True)
    (pci / "drivers_probe").write_text("")
    for address, spec in devices.items():
        d = pci / "devices" / address
        d.mkdir()
        vendor, device = spec["ids"]  # type: ignore[misc]
        (d / "vendor").write_text(f"0x{vendor:04x}\n")
        (d / "device").write_text(f"0x{device:04x}\n")
        (d / "driver_override").write_text("(null)\n")
        driver = spec.get("driver")
        if driver:
            drv = pci / "drivers" / str(driver)
            drv.mkdir(parents=True, exist_ok=True)
            (drv / "unbind").write_text("")
            os.symlink(drv, d / "driver")
        group = spec.get("group")
        if group is not None:
            g = root / "kernel" / "iommu_groups" / str(group) / "devices"
            g.mkdir(parents=True, exist_ok=True)
            os.symlink(d, g / address)
            os.symlink(g.parent, d / "iommu_group")
    (pci / "drivers" / "vfio-pci").mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def fake_sys(tmp_path):
    return _fake_sysfs(tmp_path / "sys", {
        "0000:00:07.0": {"ids": (0x1AF4, 0x1044), "driver": "virtio-pci", "group": 7},
        "0000:00:08.0": {"ids": (0x1AF4, 0x1042), "driver": "vfio-pci", "group": 8},
        "0000:00:03.0": {"ids": (0x1AF4, 0x1009), "driver": "virtio-pci", "group": 3},
        "0000:00:02.0": {"ids": (0x8086, 0x10D3), "driver": "e1000e", "group": 2},
        "0000:00:05.0": {"ids": (0x1AF4, 0x1044), "driver": None, "group": None},
    })


def test_pci_addresses_are_normalised():
    assert normalize_address("00:07.0") == "0000:00:07.0"
    assert normalize_address("0000:00:1F.3") == "0000:00:1f.3"
    assert normalize_address(" 1:2:3.4 ") == "0001:02:03.4"
    for bad in ("7.0", "0000:00:20.0", "00:07.8", "", "0000:00:07"):
        with pytest.raises(ArgumentError):
            normalize_address(bad)


def test_devices_are_found_by_vendor_and_device_id(fake_sys):
    sysfs = PciSysfs(fake_sys)
    assert sysfs.find(0x1AF4, 0x1044) == ["0000:00:05.0", "0000:00:07.0"]
    assert find_virtio_devices(2, sysfs_root=str(fake_sys)) == ["0000:00:08.0"]
    assert sysfs.driver("0000:00:05.0") is None
    assert sysfs.iommu_group("0000:00:07.0") == 7
    assert sysfs.group_members(7) == ["0000:00:07.0"]


def test_open_error_no_such_device(fake_sys):
    with pytest.raises(NoSuchDeviceError, match=r"no PCI device 0000:00:09\.0"):
        VfioPciTransport.open("00:09.0", sysfs_root=str(fake_sys))


def test_open_error_no_iommu_group(fake_sys):
    with pytest.raises(NoIommuGroupError) as info:
        VfioPciTransport.open("0000:00:05.0", sysfs_root=str(fake_sys), bind=True)
    msg = str(info.value)
    assert "has no IOMMU group" in msg and "intel_iommu=on" in msg and "vfio-pci" in msg


def test_open_error_bound_to_another_driver(fake_sys):
    with pytest.raises(DeviceBoundError) as info:
        VfioPciTransport.open("0000:00:07.0", sysfs_root=str(fake_sys))
    assert info.value.driver == "virtio-pci"
    msg = str(info.value)
    assert "bound to virtio-pci, not vfio-pci" in msg and "bind=True" in msg
    assert "driver_override" in msg


def test_bind_refuses_a_device_that_is_not_virtio(fake_sys):
    with pytest.raises(NotVirtioError, match="refusing to rebind"):
        VfioPciTransport.open("0000:00:02.0", sysfs_root=str(fake_sys), bind=True)
    assert PciSysfs(fake_sys).driver("0000:00:02.0") == "e1000e"  # untouched


def test_bind_writes_override_unbind_probe_and_checks_the_result(fake_sys):
    # The fake drivers_probe does not rebind anything, so the check after it must fail.
    with pytest.raises(DeviceBoundError, match=r"binding 0000:00:07\.0 to vfio-pci failed"):
        VfioPciTransport.open("0000:00:07.0", sysfs_root=str(fake_sys), bind=True)
    pci = fake_sys / "bus" / "pci"
    assert (pci / "devices" / "0000:00:07.0" / "driver_override").read_text() == "vfio-pci"
    assert (pci / "drivers" / "virtio-pci" / "unbind").read_text() == "0000:00:07.0"
    assert (pci / "drivers_probe").read_text() == "0000:00:07.0"


def test_bind_needs_the_driver_loaded(fake_sys):
    shutil.rmtree(fake_sys / "bus" / "pci" / "drivers" / "vfio-pci")
    with pytest.raises(VirtqError, match="modprobe vfio-pci"):
        PciSysfs(fake_sys).bind("0000:00:07.0")


def test_open_error_group_node_missing(fake_sys, tmp_path):
    # Bound to vfio-pci, but no /dev/vfio/8 (e.g. the module was reloaded).
    with pytest.raises(VfioNotFoundError) as info:
        VfioPciTransport.open("0000:00:08.0", sysfs_root=str(fake_sys),
                              vfio_dir=str(tmp_path / "dev-vfio"))
    assert info.value.errno == errno.ENOENT
    assert "opening VFIO group" in str(info.value) and "bound to vfio-pci" in str(info.value)


# -- the register protocol against a model of a virtio-pci function ---------------------


class FakeFunction:
    """Common configuration of a virtio-pci function, as a register model.  Every access is
    checked to have the register's own width (64-bit fields: two 32-bit halves)."""

    def __init__(self, *, features: int, queue_max: tuple[int, ...] = (8,), vectors: int = 2,
                 refuse_without: int = 1 << VIRTIO_F_ACCESS_PLATFORM, reset_reads: int = 2,
                 generation_bumps: int = 0) -> None:
        self.features = features
        self.queue_max = queue_max
        self.vectors = vectors
        self.refuse_without = refuse_without
        self.reset_reads = reset_reads
        self.generation_bumps = generation_bumps
        self.by_offset = {}
        for name, (offset, width) in COMMON_CFG.items():
            if width == 8:
                self.by_offset[offset] = (name + "_lo", 4)
                self.by_offset[offset + 4] = (name + "_hi", 4)
            else:
                self.by_offset[offset] = (name, width)
        self.log: list[tuple[str, str, int]] = []
        self.status = 0x0F
        self.pending_reset = 0
        self.dfselect = self.gfselect = 0
        self.driver_features = 0
        self.generation = 0
        self.select = 0
        registers = ("enable", "desc_lo", "desc_hi", "driver_lo", "driver_hi", "device_lo",
                     "device_hi")
        self.queues = [{"size": m, "vector": VIRTIO_MSI_NO_VECTOR, **dict.fromkeys(registers, 0)}
                       for m in queue_max]
        self.config_vector = VIRTIO_MSI_NO_VECTOR

    def _reg(self, offset: int, width: int) -> str:
        name, natural = self.by_offset[offset]
        assert width == natural, f"{name} accessed with width {width}, not {natural}"
        return name

    def read(self, offset: int, width: int) -> int:
        name = self._reg(offset, width)
        self.log.append(("r", name, width))
        q = self.queues[self.select] if self.select < len(self.queues) else None
        if name == "device_status":
            if self.pending_reset:
                self.pending_reset -= 1
                return 0x0F
            return self.status
        if name == "device_feature":
            return self.features >> (32 * self.dfselect) & 0xFFFF_FFFF
        if name == "num_queues":
            return len(self.queues)
        if name == "config_generation":
            value = self.generation
            if self.generation_bumps:  # the next read sees a change
                self.generation_bumps -= 1
                self.generation += 1
            return value
        if name == "config_msix_vector":
            return self.config_vector
        if q is None:
            return 0
        key = name.removeprefix("queue_")
        if key == "notify_off":
            return self.select
        if key == "msix_vector":
            return q["vector"]
        return q[key]

    def write(self, offset: int, width: int, value: int) -> None:
        name = self._reg(offset, width)
        self.log.append(("w", name, value))
        if name == "device_status":
            if value == 0:
                self.status = 0
                self.pending_reset = self.reset_reads
                self.queues = [dict(q, size=m, vector=VIRTIO_MSI_NO_VECTOR, enable=0)
                               for q, m in zip(self.queues, self.queue_max, strict=True)]
            elif value & 8 and not self.status & 8:
                # QEMU: FEATURES_OK is not set if a required feature is missing.
                if self.driver_features & self.refuse_without == self.refuse_without:
                    self.status = value
                else:
                    self.status = value & ~8
            else:
                self.status = value
        elif name == "device_feature_select":
            self.dfselect = value
        elif name == "driver_feature_select":
            self.gfselect = value
        elif name == "driver_feature":
            shift = 32 * self.gfselect
            self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)
                                    | value << shift)
        elif name == "queue_select":
            self.select = value
        elif name == "config_msix_vector":
            self.config_vector = value if value < self.vectors else VIRTIO_MSI_NO_VECTOR
        elif name.startswith("queue_"):
            q = self.queues[self.select]
            key = name.removeprefix("queue_")
            if key == "msix_vector":
                q["vector"] = value if value < self.vectors else VIRTIO_MSI_NO_VECTOR
            else:
                q[key] = value


class FakeDeviceConfig:
    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.widths: list[tuple[int, int]] = []

    def read(self, offset: int, width: int) -> int:
        assert offset % width == 0, "unaligned config access"
        self.widths.append((offset, width))
        return int.from_bytes(self.data[offset : offset + width], "little")

    def write(self, offset: int, width: int, value: int) -> None:
        self.data[offset : offset + width] = value.to_bytes(width, "little")


RNG_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM | 1 << 28 | 1 << 29


def test_reset_features_and_queue_setup_follow_the_spec_order():
    dev = FakeFunction(features=RNG_FEATURES)
    fn = VirtioPciFunction(dev, name="rng")
    fn.reset()
    assert fn.status == 0
    fn.add_status(1)
    fn.add_status(2)
    assert fn.device_features() == RNG_FEATURES
    wanted = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM
    fn.accept_features(wanted)
    assert dev.driver_features == wanted and fn.status == 0x0B
    assert fn.queue_max(0) == 8 and fn.queue_max(1) == 0
    notify_off = fn.configure_queue(0, 8, desc=0x1_2345_6000, driver=0x1000, device=0x2000,
                                    vector=1)
    assert notify_off == 0
    q = dev.queues[0]
    assert (q["desc_lo"], q["desc_hi"], q["vector"], q["enable"]) == (0x2345_6000, 1, 1, 0)
    # 64-bit addresses as two 32-bit writes, low half first (§4.1.3.1).
    writes = [name for op, name, _ in dev.log if op == "w"]
    assert writes.index("queue_desc_lo") + 1 == writes.index("queue_desc_hi")
    fn.enable_queue(0)
    assert q["enable"] == 1
    # queue_enable comes after every other queue register (§4.1.4.3.2).
    writes = [name for op, name, _ in dev.log if op == "w"]
    assert writes[-1] == "queue_enable"
    fn.driver_ok()
    assert fn.status == 0x0F


def test_features_refused_when_access_platform_is_missing():
    dev = FakeFunction(features=RNG_FEATURES)
    fn = VirtioPciFunction(dev, name="virtio device at 0000:00:07.0")
    fn.reset()
    with pytest.raises(FeaturesRefusedError) as info:
        fn.accept_features(1 << VIRTIO_F_VERSION_1)
    assert info.value.features == 1 << VIRTIO_F_VERSION_1
    assert "did not accept features 0x100000000" in str(info.value)
    assert "FEATURES_OK did not stay set" in str(info.value)
    assert dev.status & 0x80, "the driver sets FAILED after a refusal"


def test_queue_size_above_the_maximum_is_refused():
    fn = VirtioPciFunction(FakeFunction(features=RNG_FEATURES), name="rng")
    fn.reset()
    with pytest.raises(QueueSizeError) as info:
        fn.configure_queue(0, 16, desc=0, driver=0, device=0)
    assert (info.value.size, info.value.maximum) == (16, 8)
    assert "allows at most 8 entries; 16 were asked for" in str(info.value)
    with pytest.raises(QueueSizeError, match="has no queue 3"):
        fn.configure_queue(3, 8, desc=0, driver=0, device=0)


def test_msix_vector_is_verified_by_read_back():
    dev = FakeFunction(features=RNG_FEATURES, vectors=1)
    fn = VirtioPciFunction(dev, name="rng")
    fn.reset()
    with pytest.raises(VectorRefusedError, match="refused MSI-X vector 0x1 for queue 0"):
        fn.configure_queue(0, 8, desc=0, driver=0, device=0, vector=1)
    fn.set_config_vector(VIRTIO_MSI_NO_VECTOR)
    with pytest.raises(ArgumentError):
        fn.set_config_vector(0x800)


def test_reset_that_never_completes_times_out():
    fn = VirtioPciFunction(FakeFunction(features=RNG_FEATURES, reset_reads=10**9), name="rng")
    with pytest.raises(DeviceResetTimeoutError, match="after a reset"):
        fn.reset(timeout=0.01)


def test_device_config_reads_natural_widths_and_retries_on_generation_change():
    config = struct.pack("<QII", 2048, 0x1000, 0x80) + bytes(8)
    dev = FakeFunction(features=RNG_FEATURES, generation_bumps=1)
    cfg = FakeDeviceConfig(config)
    fn = VirtioPciFunction(dev, cfg, len(config), name="blk")
    assert fn.read_config(0, 16) == config[:16]
    # The first pass saw the generation move and was repeated: 2 x four 32-bit reads.
    assert cfg.widths == [(0, 4), (4, 4), (8, 4), (12, 4)] * 2
    cfg.widths.clear()
    assert fn.read_config(1, 5) == config[1:6]
    assert cfg.widths == [(1, 1), (2, 2), (4, 2)]
    with pytest.raises(ArgumentError):
        fn.read_config(20, 8)
    fn.write_config(8, struct.pack("<I", 7))
    assert cfg.data[8:12] == struct.pack("<I", 7)


# -- RngDevice over an in-process device ----------------------------------------------------


class LoopbackRng:
    """A Transport whose device is in this process: each kick fills every posted buffer with
    a counter pattern, writing at most ``chunk`` bytes of it (as a real device may)."""

    def __init__(self, *, chunk: int = 1 << 30, queue_max: int = 8, silent: bool = False
                 ) -> None:
        self.chunk = chunk
        self.silent = silent  # a device that never completes anything
        self.queue_max = queue_max
        self.arenas: list[DmaArena] = []
        self.device: DeviceQueue | None = None
        self.queue: SplitQueue | None = None
        self.counter = 0
        self.accepted = 0
        self.closed = False
        self.device_type = 4

    @property
    def device_features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1

    def negotiate(self, wanted: int) -> int:
        self.accepted = (wanted | 1 << VIRTIO_F_VERSION_1) & self.device_features
        return self.accepted

    def num_queues(self) -> int:
        return 1

    def max_queue_size(self, index: int) -> int:
        return self.queue_max if index == 0 else 0

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def alloc_dma(self, nbytes: int) -> DmaArena:
        arena = DmaArena(AnonymousRegion(nbytes), Iova(0x10_0000 * (len(self.arenas) + 1)))
        self.arenas.append(arena)
        return arena

    polling = True

    def attach_queue(self, index: int, queue: SplitQueue) -> None:
        if queue.size > self.queue_max:
            raise QueueSizeError("too big", index=index, size=queue.size,
                                 maximum=self.queue_max)
        self.device = DeviceQueue(queue.region, queue.layout, iova=queue.iova)
        self.queue = queue

    def start(self) -> None:
        pass

    def notify(self, index: int) -> None:
        assert self.device is not None
        while not self.silent and (got := self.device.pop()) is not None:
            head, segments = got
            seg = segments[0]
            n = min(seg.length, self.chunk)
            data = bytes((self.counter + i) & 0xFF for i in range(n))
            self.counter += n
            self.device.write(seg.iova, data)
            self.device.push(head, n)

    def wait(self, timeout: float | None) -> bool:
        return False

    def notification_fds(self) -> list[int]:
        return []

    def drain_notifications(self) -> bool:
        return False

    def check_alive(self) -> None:
        pass

    def stop_queue(self, index: int) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        if self.queue is not None:
            self.queue.close()
        if self.device is not None:
            self.device.close()
        for arena in self.arenas:
            arena.region.close()


def test_rng_reads_exactly_n_bytes_across_partial_completions():
    t = LoopbackRng(chunk=24)
    assert isinstance(t, Transport)
    with RngDevice(t, buffer_size=64) as rng:
        assert rng.queue.size == 8
        data = rng.read(1000)
        assert data == bytes(i & 0xFF for i in range(1000))
        assert rng.read(0) == b""
        assert len(rng.read(7)) == 7
    assert t.closed


def test_rng_zero_length_completion_is_a_protocol_error():
    """VIRTIO 1.2 §5.4.6.1: the device MUST place one or more bytes.  A device that
    completes with used.len 0 forever made read() spin forever; now it is a device error
    that breaks the queue."""
    t = LoopbackRng(chunk=0)
    with RngDevice(t, buffer_size=64) as rng:
        with pytest.raises(DeviceProtocolError, match=r"used\.len") as info:
            rng.read(100)
        assert info.value.value == 0
        assert rng.queue.state is QueueState.BROKEN
        with pytest.raises(QueueBrokenError) as again:
            rng.read(1)
        assert again.value.__cause__ is info.value


def test_rng_read_ends_within_its_timeout_when_the_device_never_answers():
    t = LoopbackRng(silent=True)
    with RngDevice(t, buffer_size=64) as rng:
        result: list[BaseException] = []

        def read() -> None:
            try:
                rng.read(100, timeout=0.2)
            except BaseException as exc:
                result.append(exc)

        worker = threading.Thread(target=read)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), "read() ignored its timeout"
        assert len(result) == 1 and isinstance(result[0], RngTimeoutError)
        assert isinstance(result[0], TimeoutError) and isinstance(result[0], VirtqTimeoutError)
        with pytest.raises(ArgumentError):
            rng.read(1, timeout=-1)


def test_rng_queue_size_is_checked_by_the_transport():
    t = LoopbackRng(queue_max=8)
    with pytest.raises(QueueSizeError):
        RngDevice(t, queue_size=16)
    assert t.closed, "a failed set-up closes the transport"


def test_rng_refuses_another_device_type():
    t = LoopbackRng()
    t.device_type = 2
    with pytest.raises(ArgumentError, match="not an entropy device"):
        RngDevice(t)


def test_layout_helpers_used_by_rng():
    layout = SplitLayout.compute(8, buffer_size=64)
    assert layout.buffer(1) - layout.buffer(0) == 64
