"""Concrete memory backends: anonymous, memfd (shareable), hugepage.

Every constructor checks its arguments before touching the kernel (bad ones raise
:class:`~virtq.errors.ArgumentError`) and turns a refusal of the kernel into a
:class:`~virtq.errors.VirtqOSError` with the kernel's errno (ENOMEM for a region larger than
the address space or the overcommit limit allows); nothing is left open when they raise.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path

from virtq._sys import libc
from virtq.errors import ArgumentError, HugepagesUnavailableError
from virtq.layout import is_power_of_two
from virtq.memory.base import MmapRegion, check_nbytes, is_int, os_error

PAGE_SIZE = mmap.PAGESIZE
HUGEPAGE_2M = 2 * 1024 * 1024
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
#: memfd_create(2): "The name ... is limited to 249 bytes, excluding the terminating null
#: byte" (NAME_MAX minus the "memfd:" prefix); longer names fail with EINVAL.
MEMFD_NAME_MAX = 249
#: Where the kernel lists the hugepage sizes it supports (one ``hugepages-<N>kB`` each).
_HUGEPAGES_SYSFS = Path("/sys/kernel/mm/hugepages")
#: MAP_HUGE_* / MFD_HUGE_* carry log2(page size) in 6 bits (linux/mman.h, HUGETLB_FLAG_ENCODE).
_HUGE_LOG2_MAX = 0x3F
#: File descriptors are C ints.
_FD_MAX = 2**31 - 1
_ENOMEM_HINT = ("the address space or the overcommit limit cannot hold a region this large "
                "(see vm.overcommit_memory and ulimit -v)")


def hugepage_sizes() -> tuple[int, ...]:
    """The hugepage sizes this kernel supports, ascending; empty if it does not say (no
    ``/sys/kernel/mm/hugepages``, e.g. sysfs not mounted in a container)."""
    sizes = []
    with contextlib.suppress(OSError):
        for entry in _HUGEPAGES_SYSFS.iterdir():
            kib = entry.name.removeprefix("hugepages-").removesuffix("kB")
            if kib.isdigit():
                sizes.append(int(kib) * 1024)
    return tuple(sorted(sizes))


def _check_page_size(page_size: object) -> int:
    """A hugepage size the kernel can use: a power of two above the base page that fits
    the 6-bit MAP_HUGE_* field, and one of :func:`hugepage_sizes` when the kernel lists
    them (otherwise mmap/memfd_create would fail with EINVAL or ENODEV)."""
    if (not is_int(page_size) or not is_power_of_two(page_size) or page_size <= PAGE_SIZE
            or page_size.bit_length() - 1 > _HUGE_LOG2_MAX):
        raise ArgumentError("page_size", page_size,
                            f"hugepage size must be a power of two > {PAGE_SIZE} bytes")
    known = hugepage_sizes()
    if known and page_size not in known:
        raise ArgumentError("page_size", page_size, "this kernel supports hugepages of "
                            + ", ".join(f"{s // 1024} KiB" for s in known))
    return page_size


def _hugepage_flag(page_size: int, shift: int) -> int:
    """Encode log2(page_size) into the MAP_HUGE_*/MFD_HUGE_* bits (linux/mman.h)."""
    return (page_size.bit_length() - 1) << shift


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ArgumentError(name, value, "must be True or False")
    return value


def _map(fd: int, size: int, flags: int, what: str, *, offset: int = 0) -> mmap.mmap:
    try:
        return mmap.mmap(fd, size, flags=flags, prot=_PROT_RW, offset=offset)
    except OSError as exc:
        hint = _ENOMEM_HINT if exc.errno == errno.ENOMEM else ""
        raise os_error(exc, f"mmap of {size:#x} bytes for {what}", hint) from exc


def _map_hugetlb(fd: int, size: int, page_size: int, flags: int) -> mmap.mmap:
    try:
        return mmap.mmap(fd, size, flags=flags, prot=_PROT_RW)
    except OSError as exc:
        # hugetlb reserves pages at mmap time, so exhaustion shows up here as ENOMEM
        # (EINVAL when the kernel does not know the page size at all).
        if exc.errno in (errno.ENOMEM, errno.EINVAL):
            raise HugepagesUnavailableError(page_size, size, exc.errno) from exc
        raise os_error(exc, f"mmap of {size:#x} bytes of hugepages") from exc


class AnonymousRegion(MmapRegion):
    """Private anonymous memory (``MAP_PRIVATE | MAP_ANONYMOUS``), zero-filled.

    Not shareable with another process; fine for VFIO (the IOMMU maps it) and for tests.
    ``nbytes`` is rounded up to the page size.  Raises
    :class:`~virtq.errors.ArgumentError` for an ``nbytes`` that is not an int in
    ``1..MAX_REGION_BYTES`` and :class:`~virtq.errors.VirtqOSError` (ENOMEM) when the
    kernel cannot map that much.
    """

    def __init__(self, nbytes: int) -> None:
        size = check_nbytes(nbytes, PAGE_SIZE)
        mapping = _map(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, "anonymous memory")
        super().__init__(mapping, size, None)


def _check_memfd_name(name: object) -> str:
    if not isinstance(name, str) or "\0" in name:
        raise ArgumentError("name", name, "must be a str without NUL characters")
    if len(os.fsencode(name)) > MEMFD_NAME_MAX:
        raise ArgumentError("name", name,
                            f"must be at most {MEMFD_NAME_MAX} bytes long (memfd_create(2))")
    return name


class MemfdRegion(MmapRegion):
    """Shared memory with a file descriptor (``memfd_create``), mapped ``MAP_SHARED``.

    The fd is what another process needs: a vhost-user backend receives it over
    ``SCM_RIGHTS``, a child process inherits it, and :meth:`attach` maps it again.  With
    ``hugepages=True`` the memfd is backed by hugetlbfs pages (``MFD_HUGETLB``) of
    ``page_size`` (default 2 MiB), and ``nbytes`` is rounded up to it.

    Raises :class:`~virtq.errors.ArgumentError` for a bad argument (``nbytes`` not an int in
    ``1..MAX_REGION_BYTES``; ``name`` not a str, with a NUL or longer than
    :data:`MEMFD_NAME_MAX` bytes; ``hugepages`` not a bool; ``page_size`` without
    ``hugepages`` or not a size the kernel supports),
    :class:`~virtq.errors.HugepagesUnavailableError` when no hugepages are free, and
    :class:`~virtq.errors.VirtqOSError` (with the kernel's errno) for any other refusal.
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
        _check_memfd_name(name)
        if _check_bool("hugepages", hugepages):
            page_size = _check_page_size(HUGEPAGE_2M if page_size is None else page_size)
            flags |= libc.MFD_HUGETLB | _hugepage_flag(page_size, libc.MFD_HUGE_SHIFT)
        elif page_size is not None and page_size != PAGE_SIZE:
            raise ArgumentError("page_size", page_size,
                                "a page size other than the base page needs hugepages=True")
        else:
            page_size = PAGE_SIZE
        size = check_nbytes(nbytes, page_size)
        try:
            fd = os.memfd_create(name, flags)
        except OSError as exc:
            raise os_error(exc, f"memfd_create({name!r})") from exc
        try:
            try:
                os.ftruncate(fd, size)
            except OSError as exc:
                if hugepages and exc.errno == errno.ENOMEM:
                    raise HugepagesUnavailableError(page_size, size, exc.errno) from exc
                raise os_error(exc, f"ftruncate of a memfd to {size:#x} bytes") from exc
            if hugepages:
                mapping = _map_hugetlb(fd, size, page_size, mmap.MAP_SHARED)
            else:
                mapping = _map(fd, size, mmap.MAP_SHARED, "a memfd")
        except BaseException:
            os.close(fd)
            raise
        super().__init__(mapping, size, fd)
        self.page_size = page_size

    @classmethod
    def attach(cls, fd: int, nbytes: int, *, offset: int = 0) -> MemfdRegion:
        """Map ``nbytes`` of an existing shareable fd from ``offset`` (another process's
        region).

        The fd is duplicated: the new region owns and closes its copy; the caller keeps
        (and closes) the original.  The page size is the file's (a hugetlbfs memfd's is its
        hugepage size): ``offset`` must be a multiple of it and ``nbytes`` is rounded up to
        it (mmap(2) maps whole pages).

        Raises :class:`~virtq.errors.ArgumentError` if ``fd`` is not an open descriptor
        (an int >= 0), ``offset`` is not a page-aligned int >= 0, or ``offset + nbytes``
        runs past the end of the file; :class:`~virtq.errors.VirtqOSError` (with the
        kernel's errno) if the kernel refuses the mapping (a file opened read-only: EACCES;
        a pipe or directory: ENODEV).
        """
        if not is_int(fd) or not 0 <= fd <= _FD_MAX:
            raise ArgumentError("fd", fd, "must be an open file descriptor (an int >= 0)")
        if not is_int(offset) or offset < 0:
            raise ArgumentError("offset", offset, "must be an int >= 0")
        check_nbytes(nbytes)
        try:
            own = os.dup(fd)
        except OSError as exc:
            raise ArgumentError("fd", fd, f"is not an open file descriptor "
                                f"({os.strerror(exc.errno or errno.EBADF)})") from exc
        try:
            try:
                st = os.fstat(own)
                fs_type, fs_block = libc.fstatfs_type(own)
            except OSError as exc:
                raise os_error(exc, f"fstat of fd {fd}") from exc
            # A hugetlbfs file is mapped in whole hugepages (its block size); anything else
            # in base pages.
            page = fs_block if fs_type == libc.HUGETLBFS_MAGIC else PAGE_SIZE
            if offset % page:
                raise ArgumentError("offset", offset,
                                    f"must be a multiple of the file's page size {page}")
            size = check_nbytes(nbytes, page)
            if offset + size > st.st_size:
                raise ArgumentError(
                    "nbytes", nbytes, f"offset {offset} + {size} bytes exceeds the fd's "
                    f"{st.st_size} bytes")
            mapping = _map(own, size, mmap.MAP_SHARED, f"fd {fd}", offset=offset)
        except BaseException:
            os.close(own)
            raise
        region = cls.__new__(cls)
        MmapRegion.__init__(region, mapping, size, own, fd_offset=offset)
        region.page_size = page
        return region


class HugepageRegion(MmapRegion):
    """Private anonymous hugepage memory (``MAP_HUGETLB``): physically contiguous per page,
    which DMA engines and IOMMUs like.  Needs reserved hugepages (``vm.nr_hugepages``);
    without them :class:`~virtq.errors.HugepagesUnavailableError` says how to reserve some.
    ``nbytes`` is rounded up to ``page_size``.  Raises :class:`~virtq.errors.ArgumentError`
    for an ``nbytes`` that is not an int in ``1..MAX_REGION_BYTES`` or a ``page_size`` the
    kernel does not support.
    """

    def __init__(self, nbytes: int, *, page_size: int = HUGEPAGE_2M) -> None:
        page_size = _check_page_size(page_size)
        flags = (
            mmap.MAP_PRIVATE
            | mmap.MAP_ANONYMOUS
            | libc.MAP_HUGETLB
            | _hugepage_flag(page_size, libc.MAP_HUGE_SHIFT)
        )
        size = check_nbytes(nbytes, page_size)
        super().__init__(_map_hugetlb(-1, size, page_size, flags), size, None)
        self.page_size = page_size
