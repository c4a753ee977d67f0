"""The ``MemoryRegion`` protocol and the shared mmap-backed implementation."""

from __future__ import annotations

import contextlib
import mmap
import os
import warnings
import weakref
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from virtq._sys import libc
from virtq.errors import ArgumentError, RegionBoundsError, RegionBusyError, RegionClosedError
from virtq.types import HostAddr


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
    def closed(self) -> bool: ...

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
        return self._nbytes

    @property
    def host_addr(self) -> HostAddr:
        self._check_open()
        return self._host_addr

    @property
    def fd(self) -> int | None:
        self._check_open()
        return self._fd

    @property
    def fd_offset(self) -> int:
        return self._fd_offset

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def _check_open(self) -> mmap.mmap:
        if self._mmap is None:
            raise RegionClosedError(f"{type(self).__name__} is closed")
        return self._mmap

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        mapping = self._check_open()
        if length is None:
            length = self._nbytes - offset
        if (
            not isinstance(offset, int)
            or not isinstance(length, int)
            or offset < 0
            or length < 0
            or offset + length > self._nbytes
        ):
            raise RegionBoundsError(offset, length, self._nbytes)
        return memoryview(mapping)[offset : offset + length]

    def close(self) -> None:
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
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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


def check_nbytes(nbytes: object) -> int:
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
        raise ArgumentError("nbytes", nbytes, "must be a positive int")
    return nbytes
