"""Memory a device reaches through an IOMMU: a VFIO container and DMA-mapped regions.

:class:`VfioContainer` is ``/dev/vfio/vfio``: one IOMMU address space.  IOMMU groups join it
(the transport does that), and then any :class:`~virtq.memory.MemoryRegion` can be mapped
into it at an IOVA.  The container is a :class:`~virtq.iova.DmaMapper` (the seed's
``map_iova``); an :class:`~virtq.iova.IovaAllocator` chooses the IOVAs (the seed's
``alloc_iova``).  :class:`VfioDmaRegion` ties the three together: a region, an IOVA
reserved for it, and the mapping -- all undone by ``close()``.

Rules the kernel enforces, checked here first so the error says what to change:

* IOVA, host address and length are multiples of the IOMMU's smallest page size
  (``VFIO_IOMMU_GET_INFO.iova_pgsizes``; 4 KiB on x86);
* the IOVA span lies inside one of the usable ranges the kernel reports (its
  ``IOVA_RANGE`` capability): on x86 the MSI window 0xFEE00000-0xFEEFFFFF is reserved and
  the top is the IOMMU's address width.  :meth:`VfioContainer.usable_ranges` gives them in
  the half-open form :class:`~virtq.iova.RangeAllocator` takes (the memory layer does not
  import ``virtq.iova``; any object with its ``alloc``/``free`` methods will do).
* Mappings vanish when the last group leaves the container, so they are undone before the
  groups are closed (the transport closes in that order).
"""

from __future__ import annotations

import contextlib
import errno
import os
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from virtq._sys import vfio as _vfio
from virtq.errors import ArgumentError, IovaError, RegionClosedError, VirtqUsageError
from virtq.memory.base import MemoryRegion, is_int
from virtq.types import HostAddr, Iova

VFIO_CONTAINER_PATH = "/dev/vfio/vfio"
#: The default allocator leaves IOVAs below this unused, so that a zeroed or truncated
#: device address faults in the IOMMU instead of silently hitting mapped memory.
DEFAULT_IOVA_FLOOR = 1 << 20


class _Allocator(Protocol):
    """The part of :class:`virtq.iova.IovaAllocator` this module uses (structural, so the
    memory layer needs no import from ``virtq.iova``)."""

    def alloc(self, size: int, *, align: int = ..., tag: int = ...,
              host_addr: HostAddr | None = ...) -> Iova: ...

    def free(self, iova: Iova) -> None: ...


class IovaRangeError(IovaError):
    """An IOVA span lies outside every range the IOMMU allows (a reserved hole such as the
    x86 MSI window, or beyond the IOMMU's address width)."""

    def __init__(self, iova: int, nbytes: int, ranges: Iterable[tuple[int, int]]) -> None:
        self.iova = iova
        self.nbytes = nbytes
        self.ranges = tuple(ranges)
        shown = ", ".join(f"{s:#x}-{e:#x}" for s, e in self.ranges) or "none reported"
        super().__init__(
            f"IOVA span [{iova:#x}, {iova + nbytes:#x}) is outside the IOMMU's usable ranges "
            f"({shown}); allocate IOVAs from a RangeAllocator over "
            f"VfioContainer.usable_ranges() or give your allocator a window inside one of them"
        )


def check_iova_span(ranges: Iterable[tuple[int, int]], iova: int, nbytes: int) -> None:
    """Raise :class:`IovaRangeError` unless ``[iova, iova + nbytes)`` fits inside one
    inclusive ``(start, last)`` range.  With no ranges reported (old kernels) nothing is
    known, so nothing is refused here and the kernel decides."""
    spans = tuple(ranges)
    if not spans:
        return
    last = iova + nbytes - 1
    for start, end in spans:
        if start <= iova and last <= end:
            return
    raise IovaRangeError(iova, nbytes, spans)


def _finalize_container(fd: int, what: str) -> None:
    warnings.warn(f"{what} was not closed", ResourceWarning, stacklevel=2)
    # Closing the fd drops the IOMMU context and with it every mapping.
    with contextlib.suppress(OSError):
        os.close(fd)


class VfioContainer:
    """A VFIO container (``/dev/vfio/vfio``) using the type1v2 IOMMU model.

    Usable once a group has joined (:meth:`attach_group`): before that it has no IOMMU, so
    it can neither report ranges nor map memory.  Implements
    :class:`~virtq.iova.DmaMapper`.
    """

    def __init__(self, path: str = VFIO_CONTAINER_PATH) -> None:
        """Open the container at ``path``.  Raises :class:`~virtq.errors.ArgumentError` for a
        ``path`` that is not a str or contains NUL, and a ``VfioOSError`` (with the
        kernel's errno, and what to load) if it cannot be opened or has no type1v2 IOMMU."""
        if not isinstance(path, str) or "\0" in path:
            raise ArgumentError("path", path, "must be a str without NUL characters")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _vfio.vfio_error(
                exc.errno or errno.EIO, f"opening the VFIO container {path}",
                "load the vfio and vfio_iommu_type1 modules (modprobe vfio-pci), and make "
                "sure the kernel runs with an IOMMU (intel_iommu=on / amd_iommu=on)",
            ) from None
        self.path = path
        self.fd = fd
        self._groups: list[int] = []
        self._iommu_set = False
        self._info: _vfio.IommuInfo | None = None
        #: Live mappings: iova -> (host address, length).
        self.mappings: dict[int, tuple[int, int]] = {}
        self._finalizer = weakref.finalize(self, _finalize_container, fd, repr(self))
        try:
            version = _vfio.get_api_version(fd)
            if version != _vfio.VFIO_API_VERSION:
                raise _vfio.VfioOSError(errno.EINVAL, f"VFIO API version is {version}",
                                        f"virtq speaks version {_vfio.VFIO_API_VERSION}")
            if not _vfio.check_extension(fd, _vfio.VFIO_TYPE1v2_IOMMU):
                raise _vfio.VfioOSError(
                    errno.ENOTSUP, "the VFIO container offers no type1v2 IOMMU",
                    "load vfio_iommu_type1 and boot with an IOMMU (intel_iommu=on); "
                    "no-IOMMU mode is not supported by virtq")
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fd} groups={len(self._groups)}"
        return f"<VfioContainer {state} mappings={len(self.mappings)}>"

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self.fd < 0

    def _check_open(self) -> int:
        if self.fd < 0:
            raise RegionClosedError("VfioContainer is closed")
        return self.fd

    # -- groups ------------------------------------------------------------------------------

    def attach_group(self, group_fd: int) -> None:
        """Join an IOMMU group (its ``/dev/vfio/<n>`` fd) to this container; the first
        group also selects the type1v2 IOMMU model.  Raises
        :class:`~virtq.errors.RegionClosedError` when the container is closed and a
        :class:`~virtq.errors.VirtqOSError` with a hint when the kernel refuses."""
        fd = self._check_open()
        try:
            _vfio.group_set_container(group_fd, fd)
        except _vfio.VfioOSError as exc:
            raise _vfio.vfio_error(
                exc.errno or errno.EIO, "attaching the IOMMU group to the VFIO container",
                "another device of the group may be bound to a kernel driver (EBUSY), or "
                "the group belongs to another container; without interrupt remapping "
                "type1 refuses with EPERM unless vfio_iommu_type1.allow_unsafe_interrupts=1",
            ) from None
        self._groups.append(group_fd)
        if not self._iommu_set:
            try:
                _vfio.set_iommu(fd, _vfio.VFIO_TYPE1v2_IOMMU)
            except BaseException:
                self.detach_group(group_fd)
                raise
            self._iommu_set = True

    def detach_group(self, group_fd: int) -> None:
        """Leave the container.  When the last group leaves, the IOMMU context -- and every
        mapping in it -- goes away, so :meth:`unmap` those first."""
        if group_fd not in self._groups:
            return
        self._groups.remove(group_fd)
        with contextlib.suppress(OSError):
            _vfio.group_unset_container(group_fd)
        if not self._groups:
            self._iommu_set = False
            self._info = None
            self.mappings.clear()

    def _check_iommu(self) -> int:
        fd = self._check_open()
        if not self._iommu_set:
            raise VirtqUsageError(
                "the VFIO container has no IOMMU yet: attach a group first "
                "(VfioPciTransport.open does this)")
        return fd

    # -- IOMMU properties ------------------------------------------------------------------

    @property
    def info(self) -> _vfio.IommuInfo:
        """``VFIO_IOMMU_GET_INFO``: page sizes and usable IOVA ranges (cached)."""
        if self._info is None:
            self._info = _vfio.iommu_get_info(self._check_iommu())
        return self._info

    @property
    def page_size(self) -> int:
        """The smallest IOMMU page: alignment of every mapping."""
        return self.info.min_page_size

    @property
    def iova_ranges(self) -> tuple[tuple[int, int], ...]:
        """Usable IOVA windows, ``(start, last)`` with ``last`` inclusive, as reported."""
        return self.info.iova_ranges

    def usable_ranges(self, *, floor: int = DEFAULT_IOVA_FLOOR) -> list[tuple[int, int]]:
        """The usable IOVA ranges from ``floor`` up, half-open ``(start, end)`` -- what
        ``RangeAllocator(...)`` takes.  Without reported ranges (kernels before 5.4): the
        32-bit space below the x86 MSI window."""
        ranges = self.iova_ranges or ((0, 0xFEDF_FFFF),)
        return [(max(start, floor), last + 1) for start, last in ranges if last + 1 > floor]

    def mapping_align(self, region_page_size: int) -> int:
        """IOVA alignment for a region backed by ``region_page_size`` pages: the largest
        IOMMU page size not above it, so a hugepage region can use IOMMU superpages."""
        sizes = [p for p in self.info.page_size_list() if p <= region_page_size]
        return max(sizes, default=self.page_size)

    # -- DmaMapper -------------------------------------------------------------------------

    def map(self, iova: Iova, host_addr: HostAddr, nbytes: int, *, readable: bool = True,
            writable: bool = True) -> None:
        """Make ``nbytes`` at ``host_addr`` reachable by the devices at ``iova``
        (``VFIO_IOMMU_MAP_DMA``; the kernel pins the pages).  Raises
        :class:`~virtq.errors.ArgumentError` for values out of range or not multiples of the
        IOMMU page size, :class:`~virtq.errors.IovaError` for a span outside the IOMMU's ranges
        or overlapping a mapping, and a :class:`~virtq.errors.VirtqOSError` with a hint when the
        kernel refuses (ENOMEM: RLIMIT_MEMLOCK; ENOSPC: the mapping limit);
        :class:`~virtq.errors.VirtqUsageError` before a group joined."""
        for name, value in (("iova", iova), ("host_addr", host_addr), ("nbytes", nbytes)):
            if not is_int(value) or not 0 <= value < 1 << 64:
                raise ArgumentError(name, value, "must be an int in 0..2**64-1")
        if nbytes <= 0 or iova + nbytes > 1 << 64:
            raise ArgumentError("nbytes", nbytes,
                                f"must be positive and end inside the 64-bit space "
                                f"(iova {iova:#x})")
        if not isinstance(readable, bool) or not isinstance(writable, bool):
            raise ArgumentError("readable/writable", (readable, writable), "must be bools")
        fd = self._check_iommu()
        page = self.page_size
        for name, value in (("iova", iova), ("host_addr", host_addr), ("nbytes", nbytes)):
            if value % page:
                raise ArgumentError(name, value,
                                    f"must be a multiple of the IOMMU page size {page:#x}")
        check_iova_span(self.iova_ranges, iova, nbytes)
        end = iova + nbytes
        for start, (_, length) in self.mappings.items():
            if start < end and iova < start + length:
                raise IovaError(f"IOVA span [{iova:#x}, {end:#x}) overlaps the mapping at "
                                f"[{start:#x}, {start + length:#x})")
        try:
            _vfio.iommu_map_dma(fd, host_addr, iova, nbytes, read=readable, write=writable)
        except _vfio.VfioOSError as exc:
            hint = {
                errno.ENOMEM: "the pages could not be pinned: raise RLIMIT_MEMLOCK "
                              "(ulimit -l) or run with CAP_IPC_LOCK",
                errno.ENOSPC: "the container's DMA mapping limit is reached "
                              "(vfio_iommu_type1.dma_entry_limit); map fewer, larger regions",
                errno.EEXIST: "that IOVA is already mapped in this container",
                errno.EINVAL: "the span is not allowed by the IOMMU (reserved or too high) "
                              "or is misaligned",
            }.get(exc.errno or 0, "")
            raise _vfio.vfio_error(
                exc.errno or errno.EIO,
                f"VFIO_IOMMU_MAP_DMA of {nbytes:#x} bytes at host {host_addr:#x} "
                f"to IOVA {iova:#x}", hint) from None
        self.mappings[iova] = (host_addr, nbytes)

    def unmap(self, iova: Iova, nbytes: int) -> None:
        """Undo :meth:`map` (the whole mapping: type1v2 refuses partial unmaps).  Raises
        :class:`~virtq.errors.IovaError` unless exactly that mapping exists."""
        fd = self._check_iommu()
        if not is_int(iova) or not is_int(nbytes) or \
                self.mappings.get(iova, (0, -1))[1] != nbytes:
            raise IovaError(f"no mapping of {nbytes:#x} bytes at IOVA {iova:#x}")
        try:
            done = _vfio.iommu_unmap_dma(fd, iova, nbytes)
        except _vfio.VfioOSError as exc:
            raise _vfio.vfio_error(exc.errno or errno.EIO,
                                   f"VFIO_IOMMU_UNMAP_DMA of {nbytes:#x} bytes at IOVA {iova:#x}",
                                   "was the last group closed before unmapping?") from None
        del self.mappings[iova]
        if done != nbytes:
            raise _vfio.VfioOSError(errno.EIO, f"VFIO_IOMMU_UNMAP_DMA at IOVA {iova:#x} "
                                    f"unmapped {done:#x} of {nbytes:#x} bytes")

    def map_region(self, region: MemoryRegion, allocator: _Allocator, *, tag: int = 0,
                   own: bool = False) -> VfioDmaRegion:
        """Reserve an IOVA for ``region`` from ``allocator`` and map it there; see
        :class:`VfioDmaRegion`."""
        return VfioDmaRegion(self, region, allocator, tag=tag, own=own)

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap whatever is still mapped and close the container (idempotent).  Close the
        regions mapped here and the groups first."""
        if self.fd < 0:
            return
        if self._iommu_set:
            for iova, (_, nbytes) in list(self.mappings.items()):
                with contextlib.suppress(OSError):
                    self.unmap(Iova(iova), nbytes)
        self.mappings.clear()
        self._finalizer.detach()
        fd, self.fd = self.fd, -1
        os.close(fd)

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass(eq=False)
class _DmaState:
    """What a :class:`VfioDmaRegion` must undo; kept apart from the region object so the
    garbage-collection fallback can reach it without keeping the region alive."""

    container: VfioContainer
    allocator: _Allocator
    iova: Iova
    nbytes: int
    mapped: bool = True

    def undo(self) -> None:
        """Unmap, then free the IOVA (idempotent); the IOVA is freed even if unmapping
        failed, since the kernel drops mappings of a container that lost its groups."""
        if not self.mapped:
            return
        self.mapped = False
        try:
            if not self.container.closed and self.iova in self.container.mappings:
                self.container.unmap(self.iova, self.nbytes)
        finally:
            self.allocator.free(self.iova)


def _finalize_dma(state: _DmaState, what: str) -> None:
    warnings.warn(f"{what} was not closed", ResourceWarning, stacklevel=2)
    with contextlib.suppress(Exception):
        state.undo()


class VfioDmaRegion:
    """A :class:`~virtq.memory.MemoryRegion` that the devices of a :class:`VfioContainer`
    see at :attr:`iova`.

    The IOVA comes from ``allocator`` (aligned so that a hugepage region can use IOMMU
    superpages) and must lie in the IOMMU's usable ranges; the whole region is mapped
    read-write.  ``close()`` closes the wrapped region if ``own``, unmaps it from the IOMMU
    and frees the IOVA.
    """

    def __init__(self, container: VfioContainer, region: MemoryRegion, allocator: _Allocator,
                 *, tag: int = 0, own: bool = False) -> None:
        """Reserve an IOVA from ``allocator`` and map ``region`` there.  Raises
        :class:`~virtq.errors.ArgumentError` if ``container`` is not a
        :class:`VfioContainer`, ``region`` not an open
        :class:`~virtq.memory.MemoryRegion` or ``own`` not a bool; what the allocator and
        :meth:`VfioContainer.map` raise otherwise (the IOVA is freed again then)."""
        if not isinstance(container, VfioContainer):
            raise ArgumentError("container", container, "must be a VfioContainer")
        if not isinstance(region, MemoryRegion) or region.closed:
            raise ArgumentError("region", region, "must be an open MemoryRegion")
        if not isinstance(own, bool):
            raise ArgumentError("own", own, "must be True or False")
        self.container = container
        self.inner = region
        self.allocator = allocator
        self.own = own
        nbytes = region.nbytes
        page = int(getattr(region, "page_size", container.page_size))
        align = container.mapping_align(page)
        iova = allocator.alloc(nbytes, align=align, tag=tag, host_addr=region.host_addr)
        try:
            container.map(iova, region.host_addr, nbytes)
        except BaseException:
            allocator.free(iova)
            raise
        self.iova = iova
        self._state = _DmaState(container, allocator, iova, nbytes)
        self._finalizer = weakref.finalize(self, _finalize_dma, self._state,
                                           f"VfioDmaRegion at IOVA {iova:#x}")

    def __repr__(self) -> str:
        state = f"IOVA {self.iova:#x}" if self._state.mapped else "unmapped"
        return f"<VfioDmaRegion {self.nbytes} bytes {state} over {self.inner!r}>"

    # -- MemoryRegion ------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Length in bytes."""
        return self.inner.nbytes

    def _check_open(self) -> MemoryRegion:
        if not self._state.mapped:
            raise RegionClosedError("VfioDmaRegion is closed")
        return self.inner

    @property
    def host_addr(self) -> HostAddr:
        """Virtual address of byte 0 in this process.  Raises
        :class:`~virtq.errors.RegionClosedError` after :meth:`close`."""
        return self._check_open().host_addr

    @property
    def fd(self) -> int | None:
        """The wrapped region's fd, or None.  Raises :class:`~virtq.errors.RegionClosedError`
        after :meth:`close`."""
        return self._check_open().fd

    @property
    def fd_offset(self) -> int:
        """Offset of byte 0 inside :attr:`fd`."""
        return self.inner.fd_offset

    @property
    def closed(self) -> bool:
        """True once unmapped (:meth:`close`)."""
        return not self._state.mapped

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        """A zero-copy view of ``[offset, offset + length)`` of the wrapped region.  Raises
        :class:`~virtq.errors.RegionClosedError` after :meth:`close` and
        :class:`~virtq.errors.RegionBoundsError` for a range outside the region."""
        return self._check_open().view(offset, length)

    def close(self) -> None:
        """Close the wrapped region if owned, then unmap it from the IOMMU and free the IOVA
        (idempotent).

        While views of an owned region are alive this raises
        :class:`~virtq.errors.RegionBusyError` and changes nothing.  Unmapping after the
        ``munmap`` is safe: ``MAP_DMA`` pinned the pages, so they stay allocated -- and the
        device can reach nothing else -- until ``UNMAP_DMA`` releases them.
        """
        if not self._state.mapped:
            return
        if self.own:
            self.inner.close()
        self._finalizer.detach()
        self._state.undo()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
