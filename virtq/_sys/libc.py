"""libc functions the stdlib does not expose, with errno turned into ``OSError``."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from typing import Any

# Linux constants that Python 3.11's ``mmap``/``os`` modules lack (asm-generic/mman-common.h).
MAP_HUGETLB = 0x40000
MAP_HUGE_SHIFT = 26
MAP_POPULATE = 0x8000
MAP_NORESERVE = 0x4000
MFD_CLOEXEC = getattr(os, "MFD_CLOEXEC", 0x0001)
MFD_ALLOW_SEALING = getattr(os, "MFD_ALLOW_SEALING", 0x0002)
MFD_HUGETLB = getattr(os, "MFD_HUGETLB", 0x0004)
MFD_HUGE_SHIFT = 26
PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
PROT_EXEC = mmap.PROT_EXEC
MAP_PRIVATE = mmap.MAP_PRIVATE
MAP_SHARED = mmap.MAP_SHARED
MAP_ANONYMOUS = mmap.MAP_ANONYMOUS
MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_mprotect = _libc.mprotect
_mprotect.restype = ctypes.c_int
_mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def mmap_raw(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """mmap(2) returning the address; for mappings Python's ``mmap`` cannot make."""
    addr = _mmap(None, length, prot, flags, fd, offset)
    if addr is None or addr == MAP_FAILED:
        _raise_errno("mmap")
    assert addr is not None
    return int(addr)


def munmap_raw(addr: int, length: int) -> None:
    if _munmap(addr, length) != 0:
        _raise_errno("munmap")


def mprotect(addr: int, length: int, prot: int) -> None:
    if _mprotect(addr, length, prot) != 0:
        _raise_errno("mprotect")


def ioctl(fd: int, request: int, arg: Any = None) -> int:
    """ioctl(2) with a ctypes object (passed by reference), an int, or nothing."""
    if arg is None:
        ptr: Any = None
    elif isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.byref(arg)
    ret = int(_ioctl(fd, request, ptr))
    if ret < 0:
        _raise_errno(f"ioctl({request:#x})")
    return ret


def buffer_address(buf: Any) -> int:
    """Host address of a writable buffer (an ``mmap``), without keeping an export alive."""
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


#: statfs(2) f_type of hugetlbfs (linux/magic.h), the file system of MFD_HUGETLB memfds.
HUGETLBFS_MAGIC = 0x958458F6


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux starts with f_type and f_bsize (__fsword_t, a long);
    # the rest (120 bytes in all on x86-64 and arm64) is room for the kernel to fill.
    _fields_ = (("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long),
                ("_rest", ctypes.c_byte * 240))


_fstatfs = _libc.fstatfs
_fstatfs.restype = ctypes.c_int
_fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)


def fstatfs_type(fd: int) -> tuple[int, int]:
    """``(f_type, f_bsize)`` of the file system ``fd`` lives on (fstatfs(2)); on hugetlbfs
    f_bsize is the hugepage size."""
    buf = _Statfs()
    if _fstatfs(fd, ctypes.byref(buf)) != 0:
        _raise_errno("fstatfs")
    return buf.f_type & 0xFFFF_FFFF, int(buf.f_bsize)
