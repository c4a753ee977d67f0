"""Concrete memory backends: anonymous, memfd (shareable), hugepage."""

from __future__ import annotations

import errno
import mmap
import os

from virtq._sys import libc
from virtq.errors import ArgumentError, HugepagesUnavailableError
from virtq.layout import align_up, is_power_of_two
from virtq.memory.base import MmapRegion, check_nbytes

PAGE_SIZE = mmap.PAGESIZE
HUGEPAGE_2M = 2 * 1024 * 1024
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE


class AnonymousRegion(MmapRegion):
    """Private anonymous memory (``MAP_PRIVATE | MAP_ANONYMOUS``), zero-filled.

    Not shareable with another process; fine for VFIO (the IOMMU maps it) and for tests.
    ``nbytes`` is rounded up to the page size.
    """

    def __init__(self, nbytes: int) -> None:
        size = align_up(check_nbytes(nbytes), PAGE_SIZE)
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=_PROT_RW)
        super().__init__(mapping, size, None)


def _hugepage_flag(page_size: int, shift: int) -> int:
    """Encode log2(page_size) into the MAP_HUGE_*/MFD_HUGE_* bits (linux/mman.h)."""
    if not is_power_of_two(page_size) or page_size <= PAGE_SIZE:
        raise ArgumentError("page_size", page_size, "hugepage size must be a power of two > 4 KiB")
    return (page_size.bit_length() - 1) << shift


def _map_hugetlb(fd: int, size: int, page_size: int, flags: int) -> mmap.mmap:
    try:
        return mmap.mmap(fd, size, flags=flags, prot=_PROT_RW)
    except OSError as exc:
        # hugetlb reserves pages at mmap time, so exhaustion shows up here as ENOMEM
        # (EINVAL when the kernel does not know the page size at all).
        if exc.errno in (errno.ENOMEM, errno.EINVAL):
            raise HugepagesUnavailableError(page_size, size, exc.errno) from exc
        raise


class MemfdRegion(MmapRegion):
    """Shared memory with a file descriptor (``memfd_create``), mapped ``MAP_SHARED``.

    The fd is what another process needs: a vhost-user backend receives it over
    ``SCM_RIGHTS``, a child process inherits it, and :meth:`attach` maps it again.  With
    ``hugepages=True`` the memfd is backed by hugetlbfs pages (``MFD_HUGETLB``).
    """

    def __init__(
        self,
        nbytes: int,
        *,
        name: str = "virtq",
        hugepages: bool = False,
        page_size: int | None = None,
    ) -> None:
        flags = libc.MFD_CLOEXEC
        if hugepages:
            page_size = page_size or HUGEPAGE_2M
            flags |= libc.MFD_HUGETLB | _hugepage_flag(page_size, libc.MFD_HUGE_SHIFT)
        else:
            page_size = PAGE_SIZE
        size = align_up(check_nbytes(nbytes), page_size)
        fd = os.memfd_create(name, flags)
        try:
            os.ftruncate(fd, size)
            if hugepages:
                mapping = _map_hugetlb(fd, size, page_size, mmap.MAP_SHARED)
            else:
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=_PROT_RW)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(mapping, size, fd)
        self.page_size = page_size

    @classmethod
    def attach(cls, fd: int, nbytes: int, *, offset: int = 0) -> MemfdRegion:
        """Map an existing shareable fd (another process's region).

        The fd is duplicated: the new region owns and closes its copy; the caller keeps
        (and closes) the original.
        """
        size = check_nbytes(nbytes)
        own = os.dup(fd)
        try:
            st = os.fstat(own)
            if offset < 0 or offset + size > st.st_size:
                raise ArgumentError(
                    "nbytes", size, f"offset {offset} + nbytes exceeds the fd's {st.st_size} bytes"
                )
            mapping = mmap.mmap(own, size, flags=mmap.MAP_SHARED, prot=_PROT_RW, offset=offset)
        except BaseException:
            os.close(own)
            raise
        region = cls.__new__(cls)
        MmapRegion.__init__(region, mapping, size, own, fd_offset=offset)
        region.page_size = PAGE_SIZE
        return region


class HugepageRegion(MmapRegion):
    """Private anonymous hugepage memory (``MAP_HUGETLB``): physically contiguous per page,
    which DMA engines and IOMMUs like.  Needs reserved hugepages (``vm.nr_hugepages``);
    without them :class:`~virtq.errors.HugepagesUnavailableError` says how to reserve some.
    """

    def __init__(self, nbytes: int, *, page_size: int = HUGEPAGE_2M) -> None:
        flags = (
            mmap.MAP_PRIVATE
            | mmap.MAP_ANONYMOUS
            | libc.MAP_HUGETLB
            | _hugepage_flag(page_size, libc.MAP_HUGE_SHIFT)
        )
        size = align_up(check_nbytes(nbytes), page_size)
        super().__init__(_map_hugetlb(-1, size, page_size, flags), size, None)
        self.page_size = page_size
