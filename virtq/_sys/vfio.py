"""Linux VFIO bindings (``include/uapi/linux/vfio.h``), declared as tables.

Three file descriptors, three sets of ioctls:

* the **container** (``/dev/vfio/vfio``): API version, extensions, the IOMMU model, the
  IOMMU's page sizes and usable IOVA ranges, DMA map/unmap;
* a **group** (``/dev/vfio/<n>``, one per IOMMU group): viability, joining a container,
  handing out device fds;
* a **device**: regions (BARs, config space), interrupts.

Every request is ``_IO(';', 100 + n)``: the ioctl number carries no size.  The kernel learns
the size from each structure's leading ``argsz`` field instead, which is how it extends a
structure without new numbers -- and how it reports that a capability chain did not fit
(it answers with a larger ``argsz``; the caller asks again with a buffer that big).  The
structures below therefore fill ``argsz`` themselves (:class:`ArgszStructure`).

Nothing here holds policy: callers (``virtq.memory.vfio``, ``virtq.transport.vfio_pci``)
decide what to open, and turn the :class:`VfioOSError`\\ s raised here into messages with
their own context.  The pure parsers (:func:`iter_caps`, :func:`parse_iommu_info`,
:func:`parse_region_info`) run on plain bytes so they are tested without a kernel.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from virtq._sys import libc
from virtq.errors import VirtqError, VirtqOSError

# -- errors ----------------------------------------------------------------------------------


class VfioOSError(VirtqOSError):
    """The kernel refused a VFIO operation.  ``errno`` is the kernel's; ``what`` says what was
    attempted and ``hint`` what usually fixes it."""

    def __init__(self, err: int, what: str, hint: str = "") -> None:
        message = f"{what}: {os.strerror(err)}"
        if hint:
            message += f" -- {hint}"
        super().__init__(err, message)
        self.what = what
        self.hint = hint


class VfioPermissionError(VfioOSError, PermissionError):
    """EACCES/EPERM from VFIO: also a :class:`PermissionError`."""


class VfioNotFoundError(VfioOSError, FileNotFoundError):
    """ENOENT/ENODEV from VFIO (no such device node, group or device): also a
    :class:`FileNotFoundError`."""


def vfio_error(err: int, what: str, hint: str = "") -> VfioOSError:
    """The right :class:`VfioOSError` subclass for ``err``."""
    if err in (_errno.EACCES, _errno.EPERM):
        return VfioPermissionError(err, what, hint)
    if err in (_errno.ENOENT, _errno.ENODEV):
        return VfioNotFoundError(err, what, hint)
    return VfioOSError(err, what, hint)


# -- ioctl numbers ---------------------------------------------------------------------------

VFIO_TYPE = ord(";")  # 0x3b
VFIO_BASE = 100
_IOC_TYPESHIFT = 8  # asm-generic/ioctl.h: _IO(type, nr) = type << 8 | nr (no size, no dir)


def _io(n: int) -> int:
    return VFIO_TYPE << _IOC_TYPESHIFT | (VFIO_BASE + n)


@dataclass(frozen=True)
class VfioIoctl:
    """One row of the ioctl table: the kernel's name, its number, which fd it goes to, and
    what it takes."""

    name: str
    request: int
    fd: str  # "container" | "group" | "device"
    arg: str


VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_UNSET_CONTAINER = _io(5)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_INFO = _io(7)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_GET_IRQ_INFO = _io(9)
VFIO_DEVICE_SET_IRQS = _io(10)
VFIO_DEVICE_RESET = _io(11)
VFIO_IOMMU_GET_INFO = _io(12)  # container fd (same number as DEVICE_PCI_HOT_RESET_INFO)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)

IOCTLS: tuple[VfioIoctl, ...] = (
    VfioIoctl("VFIO_GET_API_VERSION", VFIO_GET_API_VERSION, "container", "none; returns 0"),
    VfioIoctl("VFIO_CHECK_EXTENSION", VFIO_CHECK_EXTENSION, "container",
              "int by value (IOMMU type); returns > 0 if supported"),
    VfioIoctl("VFIO_SET_IOMMU", VFIO_SET_IOMMU, "container", "int by value (IOMMU type)"),
    VfioIoctl("VFIO_GROUP_GET_STATUS", VFIO_GROUP_GET_STATUS, "group", "vfio_group_status"),
    VfioIoctl("VFIO_GROUP_SET_CONTAINER", VFIO_GROUP_SET_CONTAINER, "group",
              "pointer to int32 container fd"),
    VfioIoctl("VFIO_GROUP_UNSET_CONTAINER", VFIO_GROUP_UNSET_CONTAINER, "group", "none"),
    VfioIoctl("VFIO_GROUP_GET_DEVICE_FD", VFIO_GROUP_GET_DEVICE_FD, "group",
              "NUL-terminated device name; returns the device fd"),
    VfioIoctl("VFIO_DEVICE_GET_INFO", VFIO_DEVICE_GET_INFO, "device", "vfio_device_info"),
    VfioIoctl("VFIO_DEVICE_GET_REGION_INFO", VFIO_DEVICE_GET_REGION_INFO, "device",
              "vfio_region_info (+ capability chain)"),
    VfioIoctl("VFIO_DEVICE_GET_IRQ_INFO", VFIO_DEVICE_GET_IRQ_INFO, "device", "vfio_irq_info"),
    VfioIoctl("VFIO_DEVICE_SET_IRQS", VFIO_DEVICE_SET_IRQS, "device",
              "vfio_irq_set + int32 eventfds"),
    VfioIoctl("VFIO_DEVICE_RESET", VFIO_DEVICE_RESET, "device", "none"),
    VfioIoctl("VFIO_IOMMU_GET_INFO", VFIO_IOMMU_GET_INFO, "container",
              "vfio_iommu_type1_info (+ capability chain)"),
    VfioIoctl("VFIO_IOMMU_MAP_DMA", VFIO_IOMMU_MAP_DMA, "container",
              "vfio_iommu_type1_dma_map"),
    VfioIoctl("VFIO_IOMMU_UNMAP_DMA", VFIO_IOMMU_UNMAP_DMA, "container",
              "vfio_iommu_type1_dma_unmap; size unmapped written back"),
)
IOCTL_NAMES = {entry.request: entry.name for entry in IOCTLS}

# -- constants -------------------------------------------------------------------------------

VFIO_API_VERSION = 0

# IOMMU models (CHECK_EXTENSION / SET_IOMMU).  type1v2 is type1 with sane unmap semantics
# (partial unmaps of a mapping are refused instead of silently splitting it).
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8
IOMMU_TYPES = {VFIO_TYPE1_IOMMU: "type1", VFIO_TYPE1v2_IOMMU: "type1v2",
               VFIO_NOIOMMU_IOMMU: "noiommu"}

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_CAPS = 1 << 7

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3

# vfio-pci region and interrupt indices (VFIO_PCI_*_INDEX).
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2

VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1


# -- structures ------------------------------------------------------------------------------


class ArgszStructure(ctypes.LittleEndianStructure):
    """A VFIO argument structure whose first field, ``argsz``, defaults to its own size."""

    argsz: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.argsz:
            self.argsz = ctypes.sizeof(self)


class GroupStatus(ArgszStructure):
    """``struct vfio_group_status``."""

    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32))


class DeviceInfo(ArgszStructure):
    """``struct vfio_device_info`` (``cap_offset`` since Linux 4.18 made it 24 bytes)."""

    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class RegionInfo(ArgszStructure):
    """``struct vfio_region_info``: ``offset`` is where the region sits in the device fd
    (for pread/pwrite/mmap); vfio-pci puts region ``i`` at ``i << 40``."""

    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
    )


class IrqInfo(ArgszStructure):
    """``struct vfio_irq_info``."""

    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    )


class IrqSet(ArgszStructure):
    """``struct vfio_irq_set`` header; the data (here: int32 eventfds) follows it."""

    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("start", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    )


class InfoCapHeader(ctypes.LittleEndianStructure):
    """``struct vfio_info_cap_header``: ``next`` is an offset from the start of the whole
    info buffer (not from this header); 0 ends the chain."""

    _fields_ = (("id", ctypes.c_uint16), ("version", ctypes.c_uint16), ("next", ctypes.c_uint32))


class IovaRange(ctypes.LittleEndianStructure):
    """``struct vfio_iova_range``: ``end`` is inclusive."""

    _fields_ = (("start", ctypes.c_uint64), ("end", ctypes.c_uint64))


class SparseMmapArea(ctypes.LittleEndianStructure):
    """``struct vfio_region_sparse_mmap_area``: offset within the region, size."""

    _fields_ = (("offset", ctypes.c_uint64), ("size", ctypes.c_uint64))


class IommuType1Info(ArgszStructure):
    """``struct vfio_iommu_type1_info``: ``iova_pgsizes`` is a bitmap of the page sizes the
    IOMMU can map (bit n set: 2**n bytes)."""

    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova_pgsizes", ctypes.c_uint64),
        ("cap_offset", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class DmaMap(ArgszStructure):
    """``struct vfio_iommu_type1_dma_map``."""

    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    )


class DmaUnmap(ArgszStructure):
    """``struct vfio_iommu_type1_dma_unmap``; the kernel writes the unmapped size back."""

    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    )


#: Sizes the kernel ABI fixes; asserted at import so a ctypes padding surprise cannot
#: reach the kernel.
STRUCT_SIZES: dict[type[ctypes.Structure], int] = {
    GroupStatus: 8,
    DeviceInfo: 24,
    RegionInfo: 32,
    IrqInfo: 16,
    IrqSet: 20,
    InfoCapHeader: 8,
    IovaRange: 16,
    SparseMmapArea: 16,
    IommuType1Info: 24,
    DmaMap: 32,
    DmaUnmap: 24,
}
for _cls, _size in STRUCT_SIZES.items():
    assert ctypes.sizeof(_cls) == _size, (_cls.__name__, ctypes.sizeof(_cls), _size)

_CAP_HEADER = ctypes.sizeof(InfoCapHeader)
_MAX_CAPS = 64  # a chain longer than this is a loop or garbage

# -- pure parsers ----------------------------------------------------------------------------


class CapChainError(VirtqError, ValueError):
    """A VFIO capability chain points outside its buffer or loops."""


def iter_caps(buf: bytes | bytearray | memoryview, first: int) -> Iterator[tuple[int, int, int]]:
    """Walk a ``vfio_info_cap_header`` chain in an info buffer: yields ``(id, version,
    offset)``.  Offsets are from the start of ``buf``.  Raises :class:`CapChainError` for a
    header that does not fit or a chain that revisits an offset."""
    data = bytes(buf)
    seen: set[int] = set()
    offset = first
    while offset:
        if offset in seen or len(seen) >= _MAX_CAPS:
            raise CapChainError(f"capability chain loops at offset {offset:#x}")
        if offset < 0 or offset + _CAP_HEADER > len(data):
            raise CapChainError(
                f"capability at offset {offset:#x} does not fit the {len(data)}-byte buffer")
        seen.add(offset)
        header = InfoCapHeader.from_buffer_copy(data, offset)
        yield header.id, header.version, offset
        offset = header.next


@dataclass(frozen=True)
class IommuInfo:
    """What ``VFIO_IOMMU_GET_INFO`` reports for a type1 container."""

    flags: int
    #: Bitmap of mappable page sizes (bit n: 2**n bytes); 0 if the kernel did not say.
    page_sizes: int
    #: Usable IOVA windows as VFIO reports them: ``(start, last)``, ``last`` inclusive.
    #: Empty when the kernel has no IOVA_RANGE capability (pre-5.4): then nothing is known.
    iova_ranges: tuple[tuple[int, int], ...]
    #: How many more DMA mappings the container allows (DMA_AVAIL capability), if reported.
    dma_avail: int | None = None

    @property
    def min_page_size(self) -> int:
        """Smallest mappable page: every map must be aligned to it (4 KiB on x86)."""
        if not self.page_sizes:
            return 4096
        return self.page_sizes & -self.page_sizes

    def page_size_list(self) -> list[int]:
        return [1 << bit for bit in range(64) if self.page_sizes >> bit & 1]


def parse_iommu_info(buf: bytes | bytearray | memoryview) -> IommuInfo:
    """Decode a ``vfio_iommu_type1_info`` buffer, capability chain included."""
    data = bytes(buf)
    if len(data) < ctypes.sizeof(IommuType1Info):
        raise CapChainError(f"IOMMU info is {len(data)} bytes, needs at least 24")
    info = IommuType1Info.from_buffer_copy(data)
    ranges: list[tuple[int, int]] = []
    dma_avail = None
    if info.flags & VFIO_IOMMU_INFO_CAPS and info.cap_offset:
        for cap_id, _version, offset in iter_caps(data[: max(info.argsz, 24)], info.cap_offset):
            body = offset + _CAP_HEADER
            if cap_id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                # struct vfio_iommu_type1_info_cap_iova_range: nr_iovas, reserved, ranges[]
                nr = int.from_bytes(data[body : body + 4], "little")
                start = body + 8
                if start + nr * ctypes.sizeof(IovaRange) > len(data):
                    raise CapChainError(f"IOVA_RANGE capability claims {nr} ranges past "
                                        "the end of the buffer")
                for i in range(nr):
                    r = IovaRange.from_buffer_copy(data, start + i * ctypes.sizeof(IovaRange))
                    ranges.append((int(r.start), int(r.end)))
            elif cap_id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
                dma_avail = int.from_bytes(data[body : body + 4], "little")
    page_sizes = int(info.iova_pgsizes) if info.flags & VFIO_IOMMU_INFO_PGSIZES else 0
    return IommuInfo(int(info.flags), page_sizes, tuple(ranges), dma_avail)


@dataclass(frozen=True)
class RegionDesc:
    """A device region as ``VFIO_DEVICE_GET_REGION_INFO`` describes it."""

    index: int
    flags: int
    size: int
    offset: int
    #: ``(offset, size)`` areas that may be mmapped when the region as a whole may not be
    #: (e.g. a BAR that also holds the MSI-X table); None without that capability.
    sparse: tuple[tuple[int, int], ...] | None = None

    @property
    def readable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_WRITE)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_MMAP)

    def describe(self) -> str:
        flags = "".join(c if self.flags & bit else "-" for c, bit in (
            ("R", VFIO_REGION_INFO_FLAG_READ), ("W", VFIO_REGION_INFO_FLAG_WRITE),
            ("M", VFIO_REGION_INFO_FLAG_MMAP), ("C", VFIO_REGION_INFO_FLAG_CAPS)))
        sparse = f" sparse={list(self.sparse)}" if self.sparse is not None else ""
        return f"region {self.index}: size={self.size:#x} offset={self.offset:#x} {flags}{sparse}"


def parse_region_info(buf: bytes | bytearray | memoryview) -> RegionDesc:
    data = bytes(buf)
    info = RegionInfo.from_buffer_copy(data)
    sparse: tuple[tuple[int, int], ...] | None = None
    if info.flags & VFIO_REGION_INFO_FLAG_CAPS and info.cap_offset and len(data) > 32:
        for cap_id, _version, offset in iter_caps(data, info.cap_offset):
            if cap_id == VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                body = offset + _CAP_HEADER
                nr = int.from_bytes(data[body : body + 4], "little")
                start = body + 8
                if start + nr * ctypes.sizeof(SparseMmapArea) > len(data):
                    raise CapChainError(f"SPARSE_MMAP capability claims {nr} areas past "
                                        "the end of the buffer")
                areas = [SparseMmapArea.from_buffer_copy(data, start + 16 * i) for i in range(nr)]
                sparse = tuple((int(a.offset), int(a.size)) for a in areas)
    return RegionDesc(int(info.index), int(info.flags), int(info.size), int(info.offset), sparse)


# -- calls -----------------------------------------------------------------------------------


def _call(fd: int, request: int, arg: Any = None) -> int:
    try:
        return libc.ioctl(fd, request, arg)
    except OSError as exc:
        name = IOCTL_NAMES.get(request, hex(request))
        raise vfio_error(exc.errno or _errno.EIO, f"{name} on fd {fd}") from None


def get_api_version(container_fd: int) -> int:
    return _call(container_fd, VFIO_GET_API_VERSION)


def check_extension(container_fd: int, extension: int) -> bool:
    # The argument is passed by value, not by pointer.
    return _call(container_fd, VFIO_CHECK_EXTENSION, extension) > 0


def set_iommu(container_fd: int, iommu_type: int) -> None:
    _call(container_fd, VFIO_SET_IOMMU, iommu_type)


def group_get_status(group_fd: int) -> int:
    status = GroupStatus()
    _call(group_fd, VFIO_GROUP_GET_STATUS, status)
    return int(status.flags)


def group_set_container(group_fd: int, container_fd: int) -> None:
    # Unlike SET_IOMMU, this one takes a pointer to the fd.
    _call(group_fd, VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(container_fd))


def group_unset_container(group_fd: int) -> None:
    _call(group_fd, VFIO_GROUP_UNSET_CONTAINER)


def group_get_device_fd(group_fd: int, name: str) -> int:
    """A new fd for device ``name`` (its sysfs name, e.g. ``0000:00:07.0``).  The kernel
    opens it close-on-exec."""
    return _call(group_fd, VFIO_GROUP_GET_DEVICE_FD, ctypes.create_string_buffer(name.encode()))


def device_get_info(device_fd: int) -> DeviceInfo:
    info = DeviceInfo()
    _call(device_fd, VFIO_DEVICE_GET_INFO, info)
    return info


def _get_with_caps(fd: int, request: int, head: ArgszStructure) -> bytes:
    """Issue an info ioctl; if the kernel says (via a larger ``argsz``) that capabilities
    did not fit, ask again with a buffer that big.  Returns the raw answer."""
    _call(fd, request, head)
    needed = int(head.argsz)
    size = ctypes.sizeof(head)
    if needed <= size:
        return bytes(head)
    buf = ctypes.create_string_buffer(needed)
    ctypes.memmove(buf, ctypes.addressof(head), size)
    ctypes.c_uint32.from_buffer(buf, 0).value = needed
    _call(fd, request, buf)
    return bytes(buf.raw)


def device_get_region_info(device_fd: int, index: int) -> RegionDesc:
    return parse_region_info(
        _get_with_caps(device_fd, VFIO_DEVICE_GET_REGION_INFO, RegionInfo(index=index)))


def device_get_region_info_raw(device_fd: int, index: int) -> bytes:
    return _get_with_caps(device_fd, VFIO_DEVICE_GET_REGION_INFO, RegionInfo(index=index))


def device_get_irq_info(device_fd: int, index: int) -> IrqInfo:
    info = IrqInfo(index=index)
    _call(device_fd, VFIO_DEVICE_GET_IRQ_INFO, info)
    return info


def device_set_irq_eventfds(device_fd: int, index: int, eventfds: Sequence[int],
                            start: int = 0) -> None:
    """Trigger ``eventfds[i]`` for vector ``start + i`` of interrupt ``index`` (for MSI-X
    this also enables MSI-X in the function).  An fd of -1 leaves that vector unwired."""
    count = len(eventfds)
    head_size = ctypes.sizeof(IrqSet)
    buf = ctypes.create_string_buffer(head_size + 4 * count)
    head = IrqSet.from_buffer(buf)
    head.argsz = len(buf)
    head.flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER
    head.index = index
    head.start = start
    head.count = count
    (ctypes.c_int32 * count).from_buffer(buf, head_size)[:] = list(eventfds)
    del head
    _call(device_fd, VFIO_DEVICE_SET_IRQS, buf)


def device_disable_irqs(device_fd: int, index: int) -> None:
    """Tear down every vector of interrupt ``index`` (DATA_NONE, count 0)."""
    _call(device_fd, VFIO_DEVICE_SET_IRQS,
          IrqSet(flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, index=index))


def device_reset(device_fd: int) -> None:
    _call(device_fd, VFIO_DEVICE_RESET)


def iommu_get_info_raw(container_fd: int) -> bytes:
    return _get_with_caps(container_fd, VFIO_IOMMU_GET_INFO, IommuType1Info())


def iommu_get_info(container_fd: int) -> IommuInfo:
    return parse_iommu_info(iommu_get_info_raw(container_fd))


def iommu_map_dma(container_fd: int, vaddr: int, iova: int, size: int, *,
                  read: bool = True, write: bool = True) -> None:
    flags = (VFIO_DMA_MAP_FLAG_READ if read else 0) | (VFIO_DMA_MAP_FLAG_WRITE if write else 0)
    _call(container_fd, VFIO_IOMMU_MAP_DMA, DmaMap(flags=flags, vaddr=vaddr, iova=iova, size=size))


def iommu_unmap_dma(container_fd: int, iova: int, size: int) -> int:
    """Returns how many bytes the kernel unmapped."""
    unmap = DmaUnmap(iova=iova, size=size)
    _call(container_fd, VFIO_IOMMU_UNMAP_DMA, unmap)
    return int(unmap.size)


__all__ = [
    "IOCTLS",
    "STRUCT_SIZES",
    "CapChainError",
    "IommuInfo",
    "RegionDesc",
    "VfioIoctl",
    "VfioNotFoundError",
    "VfioOSError",
    "VfioPermissionError",
    "iter_caps",
    "parse_iommu_info",
    "parse_region_info",
    "vfio_error",
]
