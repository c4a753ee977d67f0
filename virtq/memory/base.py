"""The ``MemoryRegion`` protocol and the shared mmap-backed implementation."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import warnings
import weakref
from types import TracebackType
from typing import Protocol, Self, TypeGuard, cast, runtime_checkable

from virtq._sys import libc
from virtq.errors import (
    ArgumentError,
    RegionBoundsError,
    RegionBusyError,
    RegionClosedError,
    VirtqOSError,
)
from virtq.types import HostAddr

#: The largest region virtq will try to map.  No 64-bit Linux address space is larger
#: (x86-64 with 5-level paging gives a process 2**56 bytes, arm64 at most 2**52); below
#: this the kernel decides, and refuses with ENOMEM (:class:`~virtq.errors.VirtqOSError`).
MAX_REGION_BYTES = 1 << 56


@runtime_checkable
class MemoryRegion(Protocol):
    """A contiguous, host-mapped span of memory that a device will be told about.

    Implementations: :class:`~virtq.memory.AnonymousRegion`, :class:`~virtq.memory.MemfdRegion`,
    :class:`~virtq.memory.HugepageRegion` (and, with VFIO, a DMA-mapped one), or your own --
    run :func:`virtq.testing.check_memory_region` against it.
    """

    @property
    def nbytes(self) -> int:
        """Length in bytes."""
        ...

    @property
    def host_addr(self) -> HostAddr:
        """Virtual address of byte 0 in this process."""
        ...

    @property
    def fd(self) -> int | None:
        """A file descriptor another process can map (memfd, hugetlbfs), or ``None``."""
        ...

    @property
    def fd_offset(self) -> int:
        """Offset of byte 0 inside :attr:`fd` (vhost-user's ``mmap_offset``)."""
        ...

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        ...

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        """A zero-copy, bounds-checked, writable view of ``[offset, offset + length)``."""
        ...

    def close(self) -> None:
        """Unmap (idempotent).  Raises :class:`RegionBusyError` while views are alive."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def _finalize(mapping: mmap.mmap, fd: int | None, what: str) -> None:
    """Fallback when a region is garbage-collected without ``close()``."""
    warnings.warn(f"{what} was not closed", ResourceWarning, stacklevel=2)
    # If views still reference the mmap object it unmaps itself when the last one goes.
    with contextlib.suppress(BufferError):
        mapping.close()
    if fd is not None:
        with contextlib.suppress(OSError):  # already closed behind our back: nothing to do
            os.close(fd)


class MmapRegion:
    """A region backed by a Python ``mmap`` object (which owns the mapping).

    Views are ``memoryview`` slices of the ``mmap``; while any exists the ``mmap`` refuses to
    close, and virtq turns that refusal into :class:`RegionBusyError` instead of unmapping
    memory under a live view (which would segfault).
    """

    def __init__(
        self, mapping: mmap.mmap, nbytes: int, fd: int | None, *, fd_offset: int = 0
    ) -> None:
        """Take ownership of ``mapping`` (and of ``fd``, closed with the region).

        Raises :class:`~virtq.errors.ArgumentError` unless ``mapping`` is an open
        ``mmap.mmap`` of at least ``nbytes`` bytes, ``fd`` is ``None`` or a descriptor
        number and ``fd_offset`` a non-negative int; nothing is taken over then.
        """
        if not isinstance(mapping, mmap.mmap) or mapping.closed:
            raise ArgumentError("mapping", mapping, "must be an open mmap.mmap")
        if not is_int(nbytes) or not 0 < nbytes <= len(mapping):
            raise ArgumentError("nbytes", nbytes,
                                f"must be an int in 1..{len(mapping)} (the mapping's length)")
        if fd is not None and (not is_int(fd) or fd < 0):
            raise ArgumentError("fd", fd, "must be None or a file descriptor (an int >= 0)")
        if not is_int(fd_offset) or fd_offset < 0:
            raise ArgumentError("fd_offset", fd_offset, "must be an int >= 0")
        self._mmap: mmap.mmap | None = mapping
        self._nbytes = nbytes
        self._fd = fd
        self._fd_offset = fd_offset
        self._host_addr = HostAddr(libc.buffer_address(mapping))
        self._finalizer = weakref.finalize(self, _finalize, mapping, fd, repr(self))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at {self._host_addr:#x}"
        return f"<{type(self).__name__} {self._nbytes} bytes {state} fd={self._fd}>"

    @property
    def nbytes(self) -> int:
        """Length in bytes."""
        return self._nbytes

    @property
    def host_addr(self) -> HostAddr:
        """Virtual address of byte 0 in this process.  Raises
        :class:`~virtq.errors.RegionClosedError` after :meth:`close`."""
        self._check_open()
        return self._host_addr

    @property
    def fd(self) -> int | None:
        """The fd another process can map, or None.  Raises
        :class:`~virtq.errors.RegionClosedError` after :meth:`close`."""
        self._check_open()
        return self._fd

    @property
    def fd_offset(self) -> int:
        """Offset of byte 0 inside :attr:`fd`."""
        return self._fd_offset

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._mmap is None

    def _check_open(self) -> mmap.mmap:
        if self._mmap is None:
            raise RegionClosedError(f"{type(self).__name__} is closed")
        return self._mmap

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        """A zero-copy writable view of ``[offset, offset + length)`` (to the end if
        ``length`` is None).  Raises :class:`~virtq.errors.RegionClosedError` after
        ``close()`` and :class:`~virtq.errors.RegionBoundsError` for a range (or a
        non-int offset or length) outside the region."""
        mapping = self._check_open()
        if length is None and is_int(offset):
            length = self._nbytes - offset
        if (
            not is_int(offset)
            or not is_int(length)
            or offset < 0
            or length < 0
            or offset + length > self._nbytes
        ):
            # The values as given (the error shows what was asked, even a non-int).
            raise RegionBoundsError(offset, cast(int, length), self._nbytes)
        return memoryview(mapping)[offset : offset + length]

    def close(self) -> None:
        """Unmap and close the fd (idempotent).  Raises
        :class:`~virtq.errors.RegionBusyError`, changing nothing, while views are alive."""
        mapping = self._mmap
        if mapping is None:
            return
        try:
            mapping.close()
        except BufferError as exc:
            raise RegionBusyError(
                f"{self!r} still has live views (memoryviews or ctypes objects over it); "
                "release them (view.release(), close the queue) before closing the region"
            ) from exc
        self._mmap = None
        self._finalizer.detach()
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:  # someone closed our fd behind our back
                raise os_error(exc, f"closing the region's fd {fd}") from exc

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def is_int(value: object) -> TypeGuard[int]:
    """A real int: ``True`` is an int to Python but never a size, offset or fd here."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_nbytes(nbytes: object, align: int = 1, *, name: str = "nbytes") -> int:
    """``nbytes`` rounded up to ``align`` (a power of two); raises
    :class:`~virtq.errors.ArgumentError` unless it is an int in
    ``1..``:data:`MAX_REGION_BYTES` after rounding."""
    if not is_int(nbytes) or nbytes <= 0:
        raise ArgumentError(name, nbytes, "must be a positive int")
    size = (nbytes + align - 1) & ~(align - 1)
    if size > MAX_REGION_BYTES:
        raise ArgumentError(name, nbytes,
                            f"must be at most {MAX_REGION_BYTES:#x} bytes (no address space "
                            "is larger)")
    return size


def os_error(exc: OSError, what: str, hint: str = "") -> VirtqOSError:
    """``exc`` as a :class:`~virtq.errors.VirtqOSError` with the same errno, saying what
    was attempted (raise it ``from exc``)."""
    err = exc.errno if exc.errno is not None else errno.EIO
    message = f"{what}: {os.strerror(err)}"
    return VirtqOSError(err, f"{message} -- {hint}" if hint else message)
