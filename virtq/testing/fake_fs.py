"""A FUSE daemon in a thread of this process, behind a
:class:`~virtq.testing.loopback.LoopbackTransport`: a virtio-fs device that tests can make
lie.

:class:`FakeFsDaemon` serves a small in-memory tree (directories, files, symlinks) with the
FUSE requests :class:`~virtq.devices.fs.FsDevice` sends, counts the lookups it hands out and
the forgets it gets, and passes every reply through :attr:`FakeFsDaemon.tamper` first, so
that a test can return a malformed reply (a wrong length, a foreign ``unique``, an errno out
of range, a short entry, a directory entry with a '/' ...) and check that the driver turns
it into a :class:`~virtq.errors.DeviceProtocolError`.  It is an independent implementation
of the device side of FUSE (the wire structures come from :mod:`virtq.abi.fs`), so a round
trip with the driver also checks one against the other.
"""

from __future__ import annotations

import errno
import stat
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from virtq.abi import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from virtq.abi.fs import (
    FS_TAG_SIZE,
    FUSE_ATOMIC_O_TRUNC,
    FUSE_ATTR,
    FUSE_ATTR_OUT,
    FUSE_BATCH_FORGET_IN,
    FUSE_BIG_WRITES,
    FUSE_CREATE_IN,
    FUSE_DIRENT,
    FUSE_DO_READDIRPLUS,
    FUSE_ENTRY_OUT,
    FUSE_FORGET_IN,
    FUSE_FORGET_ONE,
    FUSE_IN_HEADER,
    FUSE_INIT_IN,
    FUSE_INIT_OUT,
    FUSE_LINK_IN,
    FUSE_MAX_PAGES,
    FUSE_MKDIR_IN,
    FUSE_OPEN_OUT,
    FUSE_OUT_HEADER,
    FUSE_READ_IN,
    FUSE_RENAME_IN,
    FUSE_ROOT_ID,
    FUSE_SETATTR_IN,
    FUSE_STATFS_OUT,
    FUSE_WRITE_IN,
    FUSE_WRITE_OUT,
    VIRTIO_ID_FS,
    FuseOpcode,
    fuse_dirent_align,
)
from virtq.errors import ArgumentError
from virtq.testing.device import Segment
from virtq.testing.loopback import LoopbackTransport
from virtq.transport.base import DmaArena

_OP = FuseOpcode
#: ``tamper(opcode, args, reply)``: return None to send ``reply`` as it is, or
#: ``(reply_bytes, used_len)`` to send those instead.
Tamper = Callable[[int, bytes, bytearray], "tuple[bytes, int] | None"]


#: The largest file the fake daemon keeps (in memory): a WRITE or SETATTR past it is
#: answered EFBIG (write(2)), not a bytearray of that size.
MAX_FILE_SIZE = 64 << 20


def _check_count(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ArgumentError(name, value, f"must be an int in {low}..{high}")


def _check_size(size: int) -> None:
    if size > MAX_FILE_SIZE:
        raise OSError(errno.EFBIG, "file too large for the fake daemon")


@dataclass
class FakeNode:
    """A node of the fake tree: a directory (``children``), a file (``data``) or a symlink
    (``target``)."""

    mode: int
    data: bytearray = field(default_factory=bytearray)
    children: dict[bytes, int] = field(default_factory=dict)
    target: bytes = b""


class _FakeTransport(LoopbackTransport):
    """The loopback transport (split or packed device side, as negotiated), with the
    daemon's thread stopped before the rings go."""

    def __init__(self, daemon: FakeFsDaemon, **kw: Any) -> None:
        super().__init__(**kw)
        self._daemon = daemon

    def alloc_dma(self, nbytes: int) -> DmaArena:
        with self._daemon.lock:  # the device sides learn the region: not while in use
            return super().alloc_dma(nbytes)

    def close(self) -> None:
        self._daemon.stop()
        super().close()


class FakeFsDaemon:
    """A FUSE daemon with ``num_request_queues`` request queues (plus hiprio) of
    ``queue_size`` entries, serving a tree with ``/file`` ("hello world"), ``/dir`` (empty)
    and ``/link`` (-> file).  ``readdirplus`` offers FUSE_DO_READDIRPLUS; ``tag`` is the
    config space's tag (raw bytes are written as they are); ``minor``/``major`` what INIT
    answers; ``packed``/``in_order`` offer VIRTIO_F_RING_PACKED / VIRTIO_F_IN_ORDER (the
    loopback transport plays either ring format's device side; the daemon answers each
    queue's requests in order anyway).

    :meth:`connect` starts the serving thread and returns an
    :class:`~virtq.devices.fs.FsDevice` over :attr:`transport`; closing the device stops
    the thread.  :attr:`lookups` counts the lookups handed out per node minus the forgets
    received; :attr:`requests` lists ``(queue, opcode)`` of every request; an exception in
    the thread lands in :attr:`errors`."""

    def __init__(self, *, num_request_queues: int = 1, queue_size: int = 64,
                 tag: str | bytes = "fakefs", readdirplus: bool = False, major: int = 7,
                 minor: int = 31, config_queues: int | None = None, packed: bool = False,
                 in_order: bool = False) -> None:
        # Checked here: a value the daemon cannot put in its config space or INIT reply
        # would kill its thread, and the driver would wait for an answer that never comes.
        _check_count("num_request_queues", num_request_queues, 1, 0xFFFF - 1)
        _check_count("queue_size", queue_size, 1, 0x8000)
        _check_count("major", major, 0, 0xFFFFFFFF)
        _check_count("minor", minor, 0, 0xFFFFFFFF)
        if config_queues is not None:
            _check_count("config_queues", config_queues, 0, 0xFFFFFFFF)
        if not isinstance(tag, str | bytes):
            raise ArgumentError("tag", tag, "must be str or bytes")
        raw_tag = tag.encode() if isinstance(tag, str) else tag
        nq = num_request_queues if config_queues is None else config_queues
        config = raw_tag[:FS_TAG_SIZE].ljust(FS_TAG_SIZE, b"\0") + struct.pack("<I", nq)
        features = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC
                    | 1 << VIRTIO_F_EVENT_IDX | packed << VIRTIO_F_RING_PACKED
                    | in_order << VIRTIO_F_IN_ORDER)
        self.lock = threading.Lock()
        self.transport = _FakeTransport(self, features=features, config=config,
                                        queue_sizes=[queue_size] * (1 + num_request_queues),
                                        device_type=VIRTIO_ID_FS)
        self.readdirplus = readdirplus
        self.major = major
        self.minor = minor
        self.tamper: Tamper | None = None
        self.nodes: dict[int, FakeNode] = {FUSE_ROOT_ID: FakeNode(stat.S_IFDIR | 0o755)}
        self._next_node = FUSE_ROOT_ID + 1
        self.lookups: Counter[int] = Counter()
        self.requests: list[tuple[int, int]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        file = self._add(FUSE_ROOT_ID, b"file", FakeNode(stat.S_IFREG | 0o644))
        self.nodes[file].data += b"hello world"
        self._add(FUSE_ROOT_ID, b"dir", FakeNode(stat.S_IFDIR | 0o755))
        self._add(FUSE_ROOT_ID, b"link", FakeNode(stat.S_IFLNK | 0o777, target=b"file"))

    def _add(self, parent: int, name: bytes, node: FakeNode) -> int:
        nodeid = self._next_node
        self._next_node += 1
        self.nodes[nodeid] = node
        self.nodes[parent].children[name] = nodeid
        return nodeid

    # -- the thread ---------------------------------------------------------------------------

    def connect(self, **options: Any) -> Any:
        """Start serving and return an :class:`~virtq.devices.fs.FsDevice` (``options``
        go to its constructor)."""
        from virtq.devices.fs import FsDevice  # noqa: PLC0415 - the device under test

        self.start()
        return FsDevice(self.transport, **options)

    def start(self) -> None:
        """Start the serving thread (once; :meth:`connect` calls it)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="fake-virtiofsd",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the serving thread and wait for it (up to 10 s); closing the transport
        (and so the device) calls it.  It is for good: the daemon does not serve again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _serve(self) -> None:
        while not self._stop.is_set():
            busy = False
            with self.lock:
                try:
                    for qi, dq in list(self.transport.devices.items()):
                        chain = dq.pop()
                        if chain is not None:
                            busy = True
                            self._answer(qi, dq, *chain)
                except BaseException as exc:
                    self.errors.append(exc)
                    return
            if not busy:
                time.sleep(0.0002)

    def _answer(self, qi: int, dq: Any, head: int, segs: list[Segment]) -> None:
        request = b"".join(dq.read(s.iova, s.length) for s in segs if not s.writable)
        writable = [s for s in segs if s.writable]
        _len, opcode, unique, nodeid = FUSE_IN_HEADER.unpack_from(request)[:4]
        args = request[FUSE_IN_HEADER.size :]
        self.requests.append((qi, opcode))
        if opcode in (_OP.FORGET, _OP.BATCH_FORGET):
            self._forget(opcode, nodeid, args)
            dq.push(head, 0)
            return
        try:
            payload = self._handle(opcode, nodeid, args)
            reply = bytearray(FUSE_OUT_HEADER.pack(FUSE_OUT_HEADER.size + len(payload), 0,
                                                   unique) + payload)
        except OSError as err:
            reply = bytearray(FUSE_OUT_HEADER.pack(FUSE_OUT_HEADER.size, -(err.errno or 5),
                                                   unique))
        used = len(reply)
        if self.tamper is not None:
            changed = self.tamper(opcode, args, reply)
            if changed is not None:
                reply, used = bytearray(changed[0]), changed[1]
        pos = 0
        for s in writable:  # scatter the reply over the writable buffers
            piece = reply[pos : pos + s.length]
            if piece:
                dq.write(s.iova, bytes(piece))
            pos += len(piece)
        dq.push(head, used)

    def _forget(self, opcode: int, nodeid: int, args: bytes) -> None:
        if opcode == _OP.FORGET:
            (n,) = FUSE_FORGET_IN.unpack_from(args)
            self.lookups[nodeid] -= n
            return
        count, _ = FUSE_BATCH_FORGET_IN.unpack_from(args)
        for k in range(count):
            one, n = FUSE_FORGET_ONE.unpack_from(args, FUSE_BATCH_FORGET_IN.size
                                                 + k * FUSE_FORGET_ONE.size)
            self.lookups[one] -= n

    # -- the file system ----------------------------------------------------------------------

    def _node(self, nodeid: int) -> FakeNode:
        try:
            return self.nodes[nodeid]
        except KeyError:
            raise OSError(errno.ESTALE, "no such node") from None

    def attr(self, nodeid: int) -> bytes:
        """The packed ``struct fuse_attr`` this daemon reports for ``nodeid`` (a tamper
        function can build replies with it).  Raises :class:`OSError` (ESTALE) for a node
        it does not have: the error reply it sends for one."""
        node = self._node(nodeid)
        size = len(node.data) if stat.S_ISREG(node.mode) else len(node.target)
        return FUSE_ATTR.pack(nodeid, size, (size + 511) // 512, 1, 2, 3, 0, 0, 0, node.mode,
                              1, 0, 0, 0, 4096, 0)

    def entry(self, nodeid: int) -> bytes:
        """The packed ``struct fuse_entry_out`` for ``nodeid``, counting one lookup of it
        in :attr:`lookups` (as the reply that carries it does).  Raises :class:`OSError`
        (ESTALE) for a node it does not have."""
        self.lookups[nodeid] += 1
        return FUSE_ENTRY_OUT.pack(nodeid, 0, 0, 0, 0, 0, *FUSE_ATTR.unpack(self.attr(nodeid)))

    def _child(self, parent: int, name: bytes) -> int:
        node = self._node(parent)
        if not stat.S_ISDIR(node.mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        try:
            return node.children[name]
        except KeyError:
            raise OSError(errno.ENOENT, "no such entry") from None

    def _new(self, parent: int, name: bytes, node: FakeNode) -> bytes:
        if name in self._node(parent).children:
            raise OSError(errno.EEXIST, "exists")
        return self.entry(self._add(parent, name, node))

    def _handle(self, op: int, nodeid: int, args: bytes) -> bytes:
        names = args.split(b"\0")
        if op == _OP.INIT:
            _major, _minor, readahead, _flags = FUSE_INIT_IN.unpack_from(args)
            flags = FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_ATOMIC_O_TRUNC
            if self.readdirplus:
                flags |= FUSE_DO_READDIRPLUS
            return FUSE_INIT_OUT.pack(self.major, self.minor, readahead, flags, 16, 12,
                                      1 << 20, 1, 256, 0)
        if op == _OP.LOOKUP:
            return self.entry(self._child(nodeid, names[0]))
        if op in (_OP.GETATTR, _OP.SETATTR):
            if op == _OP.SETATTR:
                fields = FUSE_SETATTR_IN.unpack_from(args)
                if fields[0] & (1 << 3):  # FATTR_SIZE
                    _check_size(fields[3])
                    data = self._node(nodeid).data
                    del data[fields[3]:]
                    data.extend(bytes(fields[3] - len(data)))
            return FUSE_ATTR_OUT.pack(0, 0, 0, *FUSE_ATTR.unpack(self.attr(nodeid)))
        if op in (_OP.OPEN, _OP.OPENDIR):
            self._node(nodeid)
            return FUSE_OPEN_OUT.pack(nodeid * 10, 0, 0)
        if op == _OP.READ:
            _fh, offset, size = FUSE_READ_IN.unpack_from(args)[:3]
            node = self._node(nodeid)
            if stat.S_ISDIR(node.mode):
                raise OSError(errno.EISDIR, "directory")
            return bytes(node.data[offset : offset + size])
        if op == _OP.WRITE:
            _fh, offset, size = FUSE_WRITE_IN.unpack_from(args)[:3]
            data = self._node(nodeid).data
            payload = args[FUSE_WRITE_IN.size : FUSE_WRITE_IN.size + size]
            _check_size(offset + len(payload))
            if len(data) < offset:
                data.extend(bytes(offset - len(data)))
            data[offset : offset + len(payload)] = payload
            return FUSE_WRITE_OUT.pack(len(payload), 0)
        if op in (_OP.READDIR, _OP.READDIRPLUS):
            return self._readdir(nodeid, args, op == _OP.READDIRPLUS)
        if op == _OP.READLINK:
            node = self._node(nodeid)
            if not stat.S_ISLNK(node.mode):
                raise OSError(errno.EINVAL, "not a symlink")  # readlink(2)
            return node.target
        if op == _OP.MKDIR:
            mode, _umask = FUSE_MKDIR_IN.unpack_from(args)
            return self._new(nodeid, args[FUSE_MKDIR_IN.size :].split(b"\0")[0],
                             FakeNode(stat.S_IFDIR | mode))
        if op == _OP.CREATE:
            _flags, mode = FUSE_CREATE_IN.unpack_from(args)[:2]
            name = args[FUSE_CREATE_IN.size :].split(b"\0")[0]
            return self._new(nodeid, name, FakeNode(mode)) + FUSE_OPEN_OUT.pack(1, 0, 0)
        if op == _OP.SYMLINK:
            return self._new(nodeid, names[0], FakeNode(stat.S_IFLNK | 0o777,
                                                        target=names[1]))
        if op == _OP.LINK:
            (old,) = FUSE_LINK_IN.unpack_from(args)
            name = args[FUSE_LINK_IN.size :].split(b"\0")[0]
            self._node(nodeid).children[name] = old
            return self.entry(old)
        if op in (_OP.UNLINK, _OP.RMDIR):
            child = self._child(nodeid, names[0])
            if op == _OP.RMDIR and self._node(child).children:
                raise OSError(errno.ENOTEMPTY, "not empty")
            del self.nodes[nodeid].children[names[0]]
            return b""
        if op == _OP.RENAME:
            (newdir,) = FUSE_RENAME_IN.unpack_from(args)
            old, new = args[FUSE_RENAME_IN.size :].split(b"\0")[:2]
            child = self._child(nodeid, old)
            del self.nodes[nodeid].children[old]
            self._node(newdir).children[new] = child
            return b""
        if op == _OP.STATFS:
            return FUSE_STATFS_OUT.pack(100, 50, 50, 10, 5, 4096, 255, 4096, 0)
        if op in (_OP.RELEASE, _OP.RELEASEDIR, _OP.FLUSH, _OP.FSYNC, _OP.DESTROY):
            return b""
        raise OSError(errno.ENOSYS, "not implemented")

    def _readdir(self, nodeid: int, args: bytes, plus: bool) -> bytes:
        _fh, offset, size = FUSE_READ_IN.unpack_from(args)[:3]
        node = self._node(nodeid)
        listing = [(b".", nodeid), (b"..", FUSE_ROOT_ID), *sorted(node.children.items())]
        out = bytearray()
        for cookie, (name, child) in enumerate(listing[offset:], start=offset + 1):
            dtype = stat.S_IFMT(self.nodes[child].mode) >> 12
            dirent = FUSE_DIRENT.pack(child, cookie, len(name), dtype) + name
            if plus:
                head = (FUSE_ENTRY_OUT.pack(0, 0, 0, 0, 0, 0, *FUSE_ATTR.unpack(
                    self.attr(child))) if name in (b".", b"..") else None)
                if head is None:
                    if len(out) + fuse_dirent_align(FUSE_ENTRY_OUT.size + len(dirent)) > size:
                        break
                    head = self.entry(child)
                dirent = head + dirent
            record = dirent.ljust(fuse_dirent_align(len(dirent)), b"\0")
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)


__all__ = ["FakeFsDaemon", "FakeNode", "Tamper"]
