"""VFIO groups, devices and BAR access.

MMIO registers must be touched with single accesses of exactly their width (VIRTIO 1.2
§4.1.3.1): a memcpy over a mapped BAR may split, merge or widen accesses, and the device
sees different register operations.  So:

* :class:`MmapBar` maps the BAR from the device fd and accesses each register through a
  ``ctypes.c_uint8/16/32`` object at its address -- one load or store of that width.  The
  mapping is uncached (UC) device memory, so x86 neither reorders nor combines these
  accesses with each other or with earlier stores: a register write followed by a read of
  the same device needs no fence.
* :class:`PioBar` is the fallback when VFIO does not allow mmap of the region: ``pread`` /
  ``pwrite`` of exactly ``width`` bytes at the region's offset in the device fd, which
  vfio-pci turns into one access of that width.

The config space region is never mmappable: it is always read with ``pread``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
import warnings
import weakref
from typing import Any, Protocol, Self

from virtq._sys import libc
from virtq._sys import vfio as _vfio
from virtq.errors import ArgumentError, RegionClosedError, VirtqOSError
from virtq.transport.vfio_pci.errors import VfioPciError

_CTYPES: dict[int, type[ctypes.c_uint8] | type[ctypes.c_uint16] | type[ctypes.c_uint32]] = {
    1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32,
}
_PACK = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I")}


class RegisterSpace(Protocol):
    """Single-width register access: ``width`` is 1, 2 or 4 bytes."""

    def read(self, offset: int, width: int) -> int:
        """The ``width``-byte register at ``offset``, read with one access of that width."""
        ...

    def write(self, offset: int, width: int, value: int) -> None:
        """Store ``value`` into the ``width``-byte register at ``offset`` with one access of that
        width."""
        ...


class Window:
    """``length`` bytes at ``base`` of a register space (one virtio capability's window)."""

    def __init__(self, space: RegisterSpace, base: int, length: int) -> None:
        self.space = space
        self.base = base
        self.length = length

    def read(self, offset: int, width: int) -> int:
        """The register at ``offset`` inside the window (see :meth:`RegisterSpace.read`)."""
        return self.space.read(self.base + offset, width)

    def write(self, offset: int, width: int, value: int) -> None:
        """Store the register at ``offset`` inside the window (see :meth:`RegisterSpace.write`)."""
        self.space.write(self.base + offset, width, value)


def _finalize_mmap(mapping: mmap.mmap, what: str) -> None:
    warnings.warn(f"{what} was not closed", ResourceWarning, stacklevel=2)
    with contextlib.suppress(BufferError):
        mapping.close()


class MmapBar:
    """A BAR mapped into this process; registers accessed with exact-width ctypes loads and
    stores."""

    mode = "mmap"

    def __init__(self, device_fd: int, region: _vfio.RegionDesc) -> None:
        self.index = region.index
        self.size = region.size
        try:
            mapping = mmap.mmap(device_fd, region.size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=region.offset)
        except OSError as exc:
            raise _vfio.vfio_error(exc.errno or errno.EIO,
                                   f"mmap of BAR {region.index} ({region.size:#x} bytes)",
                                   "use bar_access='pio'") from None
        self._mmap: mmap.mmap | None = mapping
        # A raw address: ctypes objects made with from_address() hold no buffer export,
        # so nothing stops close() -- every access checks the mapping is still there.
        self.base = libc.buffer_address(mapping)
        self._finalizer = weakref.finalize(self, _finalize_mmap, mapping,
                                           f"mmap of BAR {region.index}")

    def _addr(self, offset: int, width: int) -> int:
        if self._mmap is None:
            raise RegionClosedError(f"BAR {self.index} is unmapped")
        if offset < 0 or offset + width > self.size:
            raise ArgumentError("offset", offset, f"register of {width} bytes is outside BAR "
                                f"{self.index} ({self.size:#x} bytes)")
        return self.base + offset

    def read(self, offset: int, width: int) -> int:
        """One load of ``width`` (1, 2 or 4) bytes at ``offset``.  Raises
        :class:`~virtq.errors.RegionClosedError` after :meth:`close` and
        :class:`~virtq.errors.ArgumentError` for a register outside the BAR."""
        return int(_CTYPES[width].from_address(self._addr(offset, width)).value)

    def write(self, offset: int, width: int, value: int) -> None:
        """One store of ``width`` bytes at ``offset``.  Raises like :meth:`read`."""
        _CTYPES[width].from_address(self._addr(offset, width)).value = value

    def register16(self, offset: int) -> ctypes.c_uint16:
        """A reusable 16-bit register object (the notify doorbell's hot path: one store
        per kick, no lookups).  Valid only until :meth:`close`."""
        return ctypes.c_uint16.from_address(self._addr(offset, 2))

    def close(self) -> None:
        """Unmap the BAR (idempotent); registers from :meth:`register16` are invalid afterwards."""
        if self._mmap is not None:
            self._finalizer.detach()
            self._mmap.close()
            self._mmap = None


class PioBar:
    """A BAR accessed with ``pread``/``pwrite`` on the device fd."""

    mode = "pio"

    def __init__(self, device_fd: int, region: _vfio.RegionDesc) -> None:
        self.index = region.index
        self.size = region.size
        self._fd = device_fd
        self._offset = region.offset

    def read(self, offset: int, width: int) -> int:
        """``pread`` of exactly ``width`` bytes at ``offset`` (vfio-pci makes it one access).
        Raises :class:`~virtq.errors.RegionClosedError` after :meth:`close`,
        :class:`~virtq.errors.VirtqOSError` (EIO) for a short read and ``OSError`` when the
        kernel refuses."""
        if self._fd < 0:
            raise RegionClosedError(f"BAR {self.index} is closed")
        data = os.pread(self._fd, width, self._offset + offset)
        if len(data) != width:
            raise VirtqOSError(errno.EIO, f"short read of BAR {self.index} at {offset:#x}")
        return int(_PACK[width].unpack(data)[0])

    def write(self, offset: int, width: int, value: int) -> None:
        """``pwrite`` of exactly ``width`` bytes at ``offset``.  Raises like :meth:`read`."""
        if self._fd < 0:
            raise RegionClosedError(f"BAR {self.index} is closed")
        if os.pwrite(self._fd, _PACK[width].pack(value), self._offset + offset) != width:
            raise VirtqOSError(errno.EIO, f"short write of BAR {self.index} at {offset:#x}")

    def close(self) -> None:
        """Forget the device fd (which the :class:`VfioDevice` owns and closes)."""
        self._fd = -1


Bar = MmapBar | PioBar


def _finalize_fd(fd: int, what: str) -> None:
    warnings.warn(f"{what} was not closed", ResourceWarning, stacklevel=2)
    with contextlib.suppress(OSError):
        os.close(fd)


class VfioGroup:
    """An IOMMU group's VFIO node, ``/dev/vfio/<number>``."""

    def __init__(self, number: int, *, dev_dir: str = "/dev/vfio",
                 address: str | None = None) -> None:
        self.number = number
        self.path = os.path.join(dev_dir, str(number))
        who = f" (the group of {address})" if address else ""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            hint = {
                errno.ENOENT: "the node appears once a device of the group is bound to "
                              "vfio-pci (pass bind=True, or bind it through sysfs)",
                errno.EACCES: "run as root, or give your user the group node "
                              f"(chown $USER {self.path}) and enough RLIMIT_MEMLOCK",
                errno.EPERM: "run as root, or give your user the group node "
                             f"(chown $USER {self.path}) and enough RLIMIT_MEMLOCK",
                errno.EBUSY: "the group is already open -- by another process, or by "
                             "another transport in this one; close that first",
            }.get(exc.errno or 0, "")
            raise _vfio.vfio_error(exc.errno or errno.EIO,
                                   f"opening VFIO group {self.path}{who}", hint) from None
        self.fd = fd
        self._finalizer = weakref.finalize(self, _finalize_fd, fd, f"VFIO group {self.path}")

    def __repr__(self) -> str:
        return f"<VfioGroup {self.path} fd={self.fd}>"

    def status(self) -> int:
        """``VFIO_GROUP_GET_STATUS`` flags.  Raises ``VfioOSError`` (a
        :class:`~virtq.errors.VirtqOSError`) when the ioctl fails."""
        return _vfio.group_get_status(self.fd)

    @property
    def viable(self) -> bool:
        """Whether every device of the group is bound to vfio-pci (or no driver), so the group
        can be used.  Raises like :meth:`status`."""
        return bool(self.status() & _vfio.VFIO_GROUP_FLAGS_VIABLE)

    def device_fd(self, address: str) -> int:
        """A new fd for device ``address`` of this group (``VFIO_GROUP_GET_DEVICE_FD``).  Raises
        a :class:`~virtq.errors.VirtqOSError` with a hint when the device is not bound to
        vfio-pci, the group has no container, or the device is open already (EBUSY)."""
        try:
            return _vfio.group_get_device_fd(self.fd, address)
        except _vfio.VfioOSError as exc:
            raise _vfio.vfio_error(
                exc.errno or errno.EIO, f"VFIO_GROUP_GET_DEVICE_FD for {address}",
                "the device must be bound to vfio-pci and the group attached to a container"
                if exc.errno != errno.EBUSY else "the device is already open",
            ) from None

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self.fd < 0

    def close(self) -> None:
        """Close the node (which also detaches it from its container)."""
        if self.fd >= 0:
            self._finalizer.detach()
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VfioDevice:
    """A device fd from a group: regions, config space, interrupts."""

    def __init__(self, group: VfioGroup, address: str) -> None:
        self.address = address
        self.fd = group.device_fd(address)
        self._finalizer = weakref.finalize(self, _finalize_fd, self.fd,
                                           f"VFIO device {address}")
        self._regions: dict[int, _vfio.RegionDesc] = {}
        try:
            info = _vfio.device_get_info(self.fd)
            self.flags = int(info.flags)
            self.num_regions = int(info.num_regions)
            self.num_irqs = int(info.num_irqs)
            if not self.flags & _vfio.VFIO_DEVICE_FLAGS_PCI:
                raise VfioPciError(f"{address} is not a vfio-pci device "
                                   f"(flags {self.flags:#x})", address=address)
            self.config_region = self.region(_vfio.VFIO_PCI_CONFIG_REGION_INDEX)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<VfioDevice {self.address} fd={self.fd}>"

    @property
    def can_reset(self) -> bool:
        """Whether VFIO can reset the function (``VFIO_DEVICE_FLAGS_RESET``)."""
        return bool(self.flags & _vfio.VFIO_DEVICE_FLAGS_RESET)

    def region(self, index: int) -> _vfio.RegionDesc:
        """Region ``index``'s description (offset in the device fd, size, mmap-ability), cached.
        Raises :class:`~virtq.errors.RegionClosedError` after :meth:`close` and a
        :class:`~virtq.errors.VirtqOSError` when the ioctl fails."""
        desc = self._regions.get(index)
        if desc is None:
            desc = self._regions[index] = _vfio.device_get_region_info(self._fd(), index)
        return desc

    def _fd(self) -> int:
        if self.fd < 0:
            raise RegionClosedError(f"VFIO device {self.address} is closed")
        return self.fd

    # -- config space (always pread/pwrite: VFIO virtualises parts of it) -----------------

    def config_read(self, offset: int, width: int) -> int:
        """The ``width``-byte config space register at ``offset`` (``pread``).  Raises
        :class:`~virtq.errors.RegionClosedError` after :meth:`close`, ``OSError`` when the kernel
        refuses."""
        data = os.pread(self._fd(), width, self.config_region.offset + offset)
        return int(_PACK[width].unpack(data)[0])

    def config_write(self, offset: int, width: int, value: int) -> None:
        """Store ``value`` into the config space register at ``offset`` (``pwrite``).  Raises
        like :meth:`config_read`."""
        os.pwrite(self._fd(), _PACK[width].pack(value), self.config_region.offset + offset)

    def config_snapshot(self, nbytes: int = 256) -> bytes:
        """The first ``nbytes`` of config space as VFIO presents it."""
        size = min(nbytes, self.config_region.size)
        return os.pread(self._fd(), size, self.config_region.offset)

    # -- BARs --------------------------------------------------------------------------------

    def map_bar(self, index: int, mode: str = "auto") -> Bar:
        """Access BAR ``index`` by ``mode``: ``"mmap"``, ``"pio"`` or ``"auto"`` (mmap when
        VFIO allows mapping the whole region, else pread/pwrite).  Raises
        :class:`~virtq.transport.vfio_pci.VfioPciError` for a BAR the function does not
        implement, or ``mode='mmap'`` for a BAR VFIO will not map whole;
        :class:`~virtq.errors.VirtqOSError` when the mapping fails."""
        desc = self.region(index)
        if not desc.size:
            raise VfioPciError(f"BAR {index} of {self.address} is not implemented",
                               address=self.address)
        whole = desc.mmappable and desc.sparse is None
        if mode == "mmap" and not whole:
            raise VfioPciError(f"BAR {index} of {self.address} cannot be mmapped as a whole "
                               f"({desc.describe()}); use bar_access='pio'",
                               address=self.address)
        if mode == "pio" or not whole:
            return PioBar(self._fd(), desc)
        return MmapBar(self._fd(), desc)

    # -- interrupts --------------------------------------------------------------------------

    def irq_count(self, index: int) -> int:
        """How many interrupts of kind ``index`` (``VFIO_PCI_MSIX_IRQ_INDEX``: MSI-X vectors) the
        function has.  Raises :class:`~virtq.errors.RegionClosedError` after :meth:`close`,
        :class:`~virtq.errors.VirtqOSError` when the ioctl fails."""
        return int(_vfio.device_get_irq_info(self._fd(), index).count)

    def set_msix(self, eventfds: list[int]) -> None:
        """Wire MSI-X vector ``i`` to ``eventfds[i]`` (``VFIO_DEVICE_SET_IRQS``).  Raises
        :class:`~virtq.errors.RegionClosedError` after :meth:`close`, a
        :class:`~virtq.errors.VirtqOSError` with a hint when the kernel refuses."""
        try:
            _vfio.device_set_irq_eventfds(self._fd(), _vfio.VFIO_PCI_MSIX_IRQ_INDEX, eventfds)
        except _vfio.VfioOSError as exc:
            raise _vfio.vfio_error(exc.errno or errno.EIO,
                                   f"wiring {len(eventfds)} MSI-X vector(s) of {self.address} "
                                   "to eventfds", "or open with poll=True") from None

    def disable_msix(self) -> None:
        """Unwire every MSI-X vector.  Raises :class:`~virtq.errors.RegionClosedError` after
        :meth:`close`, :class:`~virtq.errors.VirtqOSError` when the ioctl fails."""
        _vfio.device_disable_irqs(self._fd(), _vfio.VFIO_PCI_MSIX_IRQ_INDEX)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self.fd < 0

    def close(self) -> None:
        """Close the device fd (idempotent); BARs mapped from it stay valid until closed
        themselves."""
        if self.fd >= 0:
            self._finalizer.detach()
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
