"""Errors of the device drivers."""

from __future__ import annotations

import errno
import os

from virtq.errors import DeviceError, VirtqOSError


class BlkIOError(DeviceError):
    """The block device completed a request with ``VIRTIO_BLK_S_IOERR`` (or an unknown
    status): a read past the end, a failed medium, a write to a read-only disk."""

    def __init__(self, message: str, *, kind: str, sector: int, nbytes: int, status: int):
        super().__init__(message)
        self.kind = kind
        self.sector = sector
        self.nbytes = nbytes
        self.status = status


class BlkUnsupportedError(BlkIOError):
    """The device answered ``VIRTIO_BLK_S_UNSUPP``: it does not implement the request type."""


class FsOSError(VirtqOSError):
    """A FUSE request failed: the daemon answered with ``-errno`` in
    ``fuse_out_header.error``.  An :class:`OSError` with that ``errno`` (and ``filename``
    when the call named a path), and a :class:`~virtq.errors.VirtqError`.  The errors Python
    has an :class:`OSError` subclass for come as subclasses of both (see :func:`fs_error`):
    ``except FileNotFoundError`` catches a FUSE ENOENT.  ``opcode`` names the request,
    ``nodeid`` the node it went to."""

    def __init__(self, err: int, strerror: str, filename: str | None = None, *,
                 opcode: str = "", nodeid: int = 0) -> None:
        if filename is None:
            OSError.__init__(self, err, strerror)
        else:
            OSError.__init__(self, err, strerror, filename)
        self.opcode = opcode
        self.nodeid = nodeid


class FsFileNotFoundError(FsOSError, FileNotFoundError):
    """ENOENT from the daemon."""


class FsFileExistsError(FsOSError, FileExistsError):
    """EEXIST from the daemon."""


class FsIsADirectoryError(FsOSError, IsADirectoryError):
    """EISDIR from the daemon."""


class FsNotADirectoryError(FsOSError, NotADirectoryError):
    """ENOTDIR from the daemon."""


class FsPermissionError(FsOSError, PermissionError):
    """EACCES or EPERM from the daemon."""


class FsInterruptedError(FsOSError, InterruptedError):
    """EINTR from the daemon."""


class FsBlockingIOError(FsOSError, BlockingIOError):
    """EAGAIN from the daemon."""


class FsTimeoutError(FsOSError, TimeoutError):
    """ETIMEDOUT from the daemon (its own I/O timed out; not a virtq wait)."""


_FS_ERRORS: dict[int, type[FsOSError]] = {
    errno.ENOENT: FsFileNotFoundError,
    errno.EEXIST: FsFileExistsError,
    errno.EISDIR: FsIsADirectoryError,
    errno.ENOTDIR: FsNotADirectoryError,
    errno.EACCES: FsPermissionError,
    errno.EPERM: FsPermissionError,
    errno.EINTR: FsInterruptedError,
    errno.EAGAIN: FsBlockingIOError,
    errno.ETIMEDOUT: FsTimeoutError,
}


def fs_error(err: int, *, path: str | None = None, opcode: str = "",
             nodeid: int = 0) -> FsOSError:
    """The exception for errno ``err`` (positive): the :class:`FsOSError` subclass that is
    also Python's own subclass for it (``FileNotFoundError`` for ENOENT, ...), else
    :class:`FsOSError` itself."""
    cls = _FS_ERRORS.get(err, FsOSError)
    try:
        text = os.strerror(err)
    except ValueError:
        text = f"error {err}"
    if opcode:
        text = f"{text} (FUSE_{opcode})"
    return cls(err, text, path, opcode=opcode, nodeid=nodeid)
