"""An open file of a virtio-fs device, as an unbuffered binary :class:`io.RawIOBase`.

Made by :meth:`virtq.devices.fs.FsDevice.open`; reads and writes go to the daemon as
FUSE_READ / FUSE_WRITE at the file's position, split into :attr:`FsDevice.max_read` /
:attr:`FsDevice.max_write` pieces that are all in flight together.  ``close()`` sends
FUSE_FLUSH and FUSE_RELEASE (as the kernel does on the last close of a file) and gives
back the file's lookup of its node.
"""

from __future__ import annotations

import errno
import io
import os
from typing import TYPE_CHECKING, Any

from virtq.abi.fs import FOPEN_NONSEEKABLE
from virtq.devices.dma import DmaBuffer, byte_view
from virtq.devices.errors import FsOSError, fs_error
from virtq.errors import ArgumentError, VirtqError

if TYPE_CHECKING:
    from virtq.devices.fs import FsDevice


#: The most one step of :meth:`FsFile.read` asks for (its buffer is allocated up front).
_READ_CHUNK = 16 << 20


class FsFile(io.RawIOBase):
    """A file opened through a :class:`~virtq.devices.fs.FsDevice`: ``nodeid`` and the
    daemon's file handle ``fh``; ``name`` is the path it was opened by, ``mode`` the mode.

    Raises :class:`~virtq.devices.errors.FsOSError` (the daemon's errors; EBADF for a
    direction the mode does not allow, ESTALE after the device reconnected to a new
    daemon), :class:`~virtq.errors.ArgumentError` (a closed file, a bad seek), and the
    device's errors."""

    def __init__(self, dev: FsDevice, nodeid: int, fh: int, flags: int, open_flags: int,
                 name: str, mode: str, size_hint: int) -> None:
        super().__init__()
        self._dev = dev
        self.nodeid = nodeid
        self.fh = fh
        self.flags = flags
        self.open_flags = open_flags
        self.name = name
        self.mode = mode
        self._pos = 0
        self._session = dev.session
        # The size the file had when it was opened: readall() from the start plans its
        # READs with it (one byte more, so that a file of exactly that size needs no
        # extra READ to see its end).
        self._size_hint: int | None = size_hint
        self._append = bool(flags & os.O_APPEND)

    # -- state --------------------------------------------------------------------------

    def _check(self, direction: str | None = None) -> None:
        if self.closed:
            raise ArgumentError("file", self.name, "I/O operation on a closed file")
        if self._session != self._dev.session:
            raise fs_error(errno.ESTALE, path=self.name)
        if direction == "r" and not self.readable():
            raise fs_error(errno.EBADF, path=self.name)
        if direction == "w" and not self.writable():
            raise fs_error(errno.EBADF, path=self.name)

    def readable(self) -> bool:
        """Whether the file was opened for reading (``r`` or ``+``)."""
        return self.flags & os.O_ACCMODE in (os.O_RDONLY, os.O_RDWR)

    def writable(self) -> bool:
        """Whether the file was opened for writing (``w``, ``a``, ``x`` or ``+``)."""
        return self.flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)

    def seekable(self) -> bool:
        """Whether the daemon lets the position move: False when it opened the file with
        FOPEN_NONSEEKABLE."""
        return not self.open_flags & FOPEN_NONSEEKABLE

    def _size(self) -> int:
        return self._dev.fuse_getattr(self.nodeid, self.fh, path=self.name).size

    # -- reading --------------------------------------------------------------------------

    def readinto(self, buffer: Any) -> int:
        """Read up to ``len(buffer)`` bytes at the position into ``buffer`` (READs of
        ``max_read``, all in flight); returns the bytes read, 0 at the end of the file.
        Raises :class:`~virtq.errors.ArgumentError` for a ``buffer`` that is not a
        writable bytes-like object (or a closed file), an
        :class:`~virtq.devices.errors.FsOSError` with EBADF for a file not open for
        reading, and the READs' errors."""
        self._check("r")
        view = byte_view(buffer, "buffer")
        if view.readonly:
            raise ArgumentError("buffer", type(buffer).__name__, "must be writable")
        if not len(view):
            return 0
        self._size_hint = None
        n = self._dev._read_span(self.nodeid, self.fh, self._pos, view, self.flags,
                                 self.name)
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes | None:
        """Up to ``size`` bytes at the position (``-1`` or None: to the end of the file, as
        :meth:`readall`); ``b""`` at the end.  Raises :class:`~virtq.errors.ArgumentError`
        for a ``size`` that is not an int (io's own ``read`` raises a bare ``TypeError``),
        and as :meth:`readinto`."""
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise ArgumentError("size", size, "must be an int or None")
        if size is None or size < 0:
            return self.readall()
        if size <= _READ_CHUNK:
            return super().read(size)
        # io's read(n) zero-fills a bytearray of n bytes first: read(2**32) of an 11-byte
        # file touched 4 GiB (and 2**64 raised OverflowError).  Large sizes go in pieces,
        # stopping at the first short one (the end of the file).
        parts = []
        left = size
        while left:
            want = min(left, _READ_CHUNK)
            piece = super().read(want)
            if not piece:
                break
            parts.append(piece)
            left -= len(piece)
            if len(piece) < want:
                break
        return b"".join(parts)

    def readall(self) -> bytes:
        """Everything from the position to the end of the file."""
        self._check("r")
        hint = self._size_hint if self._size_hint is not None and not self._pos \
            else self._size()
        self._size_hint = None
        buf = bytearray(max(0, hint - self._pos) + 1)
        view = memoryview(buf)
        got = self._dev._read_span(self.nodeid, self.fh, self._pos, view, self.flags,
                                   self.name)
        self._pos += got
        if got < len(buf):
            view.release()
            del buf[got:]
            return bytes(buf)
        view.release()
        parts = [bytes(buf)]
        while True:  # the file grew since its size was asked
            more = self._dev.fuse_read(self.nodeid, self.fh, self._pos, self._dev.max_read,
                                       flags=self.flags, path=self.name)
            if not more:
                return b"".join(parts)
            parts.append(more)
            self._pos += len(more)

    def readinto_dma(self, buf: DmaBuffer | list[DmaBuffer]) -> int:
        """Zero-copy: one READ at the position straight into ``buf`` (DmaBuffers of the
        device's :meth:`~virtq.devices.fs.FsDevice.alloc_buffer`, at most ``max_read``
        bytes in all); the bytes read."""
        self._check("r")
        self._size_hint = None
        req = self._dev.submit_read(self.nodeid, self.fh, self._pos, into=buf,
                                    flags=self.flags, path=self.name)
        n: int = req.wait(self._dev.timeout)
        self._pos += n
        return n

    # -- writing --------------------------------------------------------------------------

    def write(self, data: Any) -> int:
        """Write bytes-like ``data`` at the position (at the end in append mode): WRITEs
        of ``max_write``, all in flight (one after the other in append mode).  Returns the
        bytes written (fewer only if the daemon wrote fewer)."""
        self._check("w")
        view = byte_view(data)
        if not len(view):
            return 0
        self._size_hint = None
        if self._append:
            self._pos = self._size()
        n = self._dev._write_span(self.nodeid, self.fh, self._pos, view, self.flags,
                                  self.name, sequential=self._append)
        self._pos += n
        return n

    def truncate(self, size: int | None = None) -> int:
        """Cut or extend the file to ``size`` (default: the position) with SETATTR on the
        open file; the position does not move.  Returns the new size.  Raises
        :class:`~virtq.errors.ArgumentError` for a ``size`` that is not an int >= 0 (or a
        closed file), an :class:`~virtq.devices.errors.FsOSError` with EBADF for a file not
        open for writing, and the request's errors."""
        self._check("w")
        size = self._pos if size is None else size
        if not isinstance(size, int) or size < 0:
            raise ArgumentError("size", size, "must be an int >= 0")
        self._size_hint = None
        self._dev.fuse_setattr(self.nodeid, fh=self.fh, size=size, path=self.name)
        return size

    def fsync(self, *, datasync: bool = False) -> None:
        """FUSE_FSYNC: make what was written durable on the daemon's side."""
        self._check()
        self._dev.fuse_fsync(self.nodeid, self.fh, datasync=datasync, path=self.name)

    # -- position -------------------------------------------------------------------------

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position to ``offset`` from the start (``os.SEEK_SET``), the position
        (``os.SEEK_CUR``) or the end of the file (``os.SEEK_END``, which asks the daemon
        for the size: GETATTR); returns the new position.  Raises
        :class:`~virtq.errors.ArgumentError` for an ``offset`` that is not an int, another
        ``whence``, a position that would be negative or beyond a 64-bit file offset, or
        a closed file; an :class:`~virtq.devices.errors.FsOSError` with ESPIPE when the
        daemon opened the file non-seekable (FOPEN_NONSEEKABLE, like ``lseek`` on a pipe);
        and GETATTR's errors."""
        self._check()
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise ArgumentError("offset", offset, "must be an int")
        if not self.seekable():
            raise fs_error(errno.ESPIPE, path=self.name)
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._size() + offset
        else:
            raise ArgumentError("whence", whence, "SEEK_SET, SEEK_CUR or SEEK_END")
        if not 0 <= pos < 1 << 63:
            raise ArgumentError("offset", offset, "the position would be negative or "
                                "beyond a 64-bit file offset")
        self._size_hint = None
        self._pos = pos
        return pos

    def tell(self) -> int:
        """The position.  Raises :class:`~virtq.errors.ArgumentError` for a closed file and
        an :class:`~virtq.devices.errors.FsOSError` with ESTALE after the device
        reconnected."""
        self._check()
        return self._pos

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """FUSE_FLUSH and FUSE_RELEASE; the file's lookup of its node is given back.  A
        FUSE error of the flush is raised (after the release); a device that failed (the
        session is broken: the daemon needs no handle back) is not, its error was the
        failed call's."""
        if self.closed:
            return
        dev = self._dev
        flush_error: FsOSError | None = None
        try:
            if self._session == dev.session and not dev.closed and dev._refused is None:
                try:
                    dev.fuse_flush(self.nodeid, self.fh, path=self.name)
                except FsOSError as err:
                    if err.errno != errno.ENOSYS:  # (the kernel stops flushing then)
                        flush_error = err
                dev.fuse_release(self.nodeid, self.fh, self.flags, path=self.name)
        except VirtqError:
            pass
        finally:
            if self._session == dev.session:
                dev._give_back([self.nodeid])
            dev._files.pop(id(self), None)
            super().close()
        if flush_error is not None:
            raise flush_error

    def _drop(self) -> None:
        """Closed without a word to the daemon: its session is gone."""
        super().close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fh={self.fh}"
        return f"<FsFile {self.name!r} mode={self.mode!r} {state}>"


__all__ = ["FsFile"]
