"""virtio-fs (VIRTIO 1.2 §5.11): a FUSE client over virtqueues, without a VM or a mount.

The device is a FUSE daemon (QEMU's ``virtiofsd``, ...); this driver plays the kernel's
part.  Each FUSE request is one chain (§5.11.6, ``struct virtio_fs_req``): the device-readable
``fuse_in_header`` and the opcode's arguments (and, for WRITE, the data), then the
device-writable ``fuse_out_header`` and the reply (and, for READ, READDIR and READLINK, a
data buffer).  Queue 0 is the hiprio queue, which carries only FUSE_FORGET and
FUSE_BATCH_FORGET here (§5.11.6.2); queues 1..n are request queues, used round-robin.

Layout: one DMA arena holds every ring, a 5 KiB area per request slot (the in header and
arguments, then the out header and the fixed-size reply) and a pool of ``io_buffers`` data
buffers of ``io_size`` bytes for copying READ/WRITE/READDIR/READLINK.  Zero-copy READ and
WRITE take :class:`~virtq.devices.dma.DmaBuffer`\\ s from :meth:`FsDevice.alloc_buffer`.

Every reply is checked at one ingress (:meth:`FsDevice._finish`): the out header's ``len``
must equal ``used.len``, ``unique`` the request's, ``error`` 0 or a negated errno above
-512 (and then no payload), the payload the size its opcode allows, and its contents what
the kernel's FUSE client accepts (:mod:`virtq.devices.fswire`).  A FUSE error becomes an
:class:`~virtq.devices.errors.FsOSError` (``FileNotFoundError`` for ENOENT, ...); anything
malformed is a :class:`~virtq.errors.DeviceProtocolError` that breaks the queue.

Failure policy (the same as every device of virtq, see ``docs/writing-a-driver.md``):

* a request's own failure is its ``error`` (a FUSE errno, or the DeviceProtocolError of its
  malformed reply);
* a queue broken by a malformed reply or used element fails its other requests with
  :class:`~virtq.errors.QueueBrokenError` and is stopped (vhost-user: GET_VRING_BASE);
* a transport failure (the daemon died) fails every request in flight and refuses new ones
  until :meth:`FsDevice.reconnect` (a new FUSE session: node ids and open files of the old
  one are gone);
* ``poll()`` raises only for caller misuse; ``wait()`` raises a request's error.

Inode accounting: every reply that names a node (LOOKUP, CREATE, MKDIR, SYMLINK, LINK,
each READDIRPLUS entry) makes the daemon count one lookup of it, which the driver must give
back with FORGET (§5.11.6.2; the FUSE protocol's rule).  :attr:`FsDevice.lookups` holds the
counts the daemon holds for this client; the path API gives its lookups back as soon as it
is done with a node, batched (FORGET for one node, BATCH_FORGET for more), and
:meth:`FsDevice.close` forgets every remaining one before FUSE_DESTROY.

Not thread-safe: use one device per thread, or lock around it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import posixpath
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Self

from virtq.abi import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from virtq.abi.fs import (
    ATTR_OUT_SIZE,
    CREATE_OUT_SIZE,
    ENTRY_OUT_SIZE,
    FATTR_ATIME,
    FATTR_FH,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_SIZE,
    FIRST_REQUEST_QUEUE,
    FS_CFG_NUM_REQUEST_QUEUES,
    FS_CONFIG_SIZE,
    FS_TAG_SIZE,
    FUSE_ASYNC_READ,
    FUSE_ATOMIC_O_TRUNC,
    FUSE_ATTR,
    FUSE_BATCH_FORGET_IN,
    FUSE_BIG_WRITES,
    FUSE_CREATE_IN,
    FUSE_DEFAULT_MAX_PAGES,
    FUSE_DO_READDIRPLUS,
    FUSE_FLUSH_IN,
    FUSE_FORGET_IN,
    FUSE_FORGET_ONE,
    FUSE_FSYNC_FDATASYNC,
    FUSE_FSYNC_IN,
    FUSE_GETATTR_FH,
    FUSE_GETATTR_IN,
    FUSE_IN_HEADER,
    FUSE_INIT_IN,
    FUSE_KERNEL_MINOR_VERSION,
    FUSE_KERNEL_VERSION,
    FUSE_LINK_IN,
    FUSE_MAX_ERRNO,
    FUSE_MAX_PAGES,
    FUSE_MIN_MINOR_VERSION,
    FUSE_MKDIR_IN,
    FUSE_OPEN_IN,
    FUSE_OPEN_OUT,
    FUSE_OUT_HEADER,
    FUSE_PAGE_SIZE,
    FUSE_PARALLEL_DIROPS,
    FUSE_READ_IN,
    FUSE_RELEASE_IN,
    FUSE_RENAME_IN,
    FUSE_ROOT_ID,
    FUSE_SETATTR_IN,
    FUSE_WRITE_IN,
    FUSE_WRITE_OUT,
    HIPRIO_QUEUE,
    INIT_OUT_SIZE,
    NAME_MAX,
    OPEN_OUT_SIZE,
    PATH_MAX,
    STATFS_OUT_SIZE,
    VIRTIO_ID_FS,
    WRITE_OUT_SIZE,
    FuseOpcode,
)
from virtq.devices._requests import check_int as _check_int
from virtq.devices._requests import wait_requests
from virtq.devices._rings import ring_chosen, ring_wanted
from virtq.devices.dma import MAX_BUFFER, DmaBuffer, byte_view
from virtq.devices.errors import FsOSError, fs_error
from virtq.devices.fsfile import FsFile
from virtq.devices.fswire import (
    FsAttr,
    FsDirEntry,
    FsEntry,
    FsInit,
    entry_nodeid,
    parse_attr,
    parse_dirents,
    parse_entry,
    parse_init,
    parse_statfs,
)
from virtq.errors import (
    ArgumentError,
    DeviceError,
    DeviceProtocolError,
    QueueBrokenError,
    QueueFullError,
    QueueStateError,
    VirtqError,
)
from virtq.iova import IovaAllocator
from virtq.layout import align_up
from virtq.queue import ChainTemplate, DriverQueue, QueueState, make_queue, ring_layout
from virtq.transport.base import DmaArena, Reconnectable, Transport
from virtq.transport.errors import DeviceRefusedError
from virtq.transport.vhost_user import VhostUserTransport
from virtq.transport.waiter import Waiter, deadline_after
from virtq.types import Iova

_OP = FuseOpcode
_IN = FUSE_IN_HEADER.size  # 40
_OUT = FUSE_OUT_HEADER.size  # 16
#: A request slot's area: the in header and the largest arguments (SYMLINK: a name of up
#: to NAME_MAX bytes and a target of up to PATH_MAX - 1, both NUL-terminated), then the out
#: header and the largest fixed-size reply (CREATE: 144 bytes).
_REQ_AREA = 4608
_REPLY_AREA = 512
_SLOT_BYTES = _REQ_AREA + _REPLY_AREA
#: A hiprio slot holds one BATCH_FORGET: 40 + 8 + 16 per node.
_HIPRIO_AREA = 8192
_BATCH_MAX = (_HIPRIO_AREA - _IN - FUSE_BATCH_FORGET_IN.size) // FUSE_FORGET_ONE.size
_HIPRIO_SLOTS = 8
#: Distinct nodes whose lookups were given back before they are forgotten in one batch.
_FORGET_BATCH = 256
#: Symlinks followed while resolving one path (Linux's MAXSYMLINKS).
_MAX_SYMLINKS = 40
#: Bytes asked for per READDIR (more is fewer round trips; the daemon fills what fits).
_READDIR_SIZE = 64 * 1024
_READY = QueueState.READY
#: The payload size of each fixed-size reply (after the out header).
_FIXED_REPLY = {
    _OP.LOOKUP: ENTRY_OUT_SIZE, _OP.MKDIR: ENTRY_OUT_SIZE, _OP.SYMLINK: ENTRY_OUT_SIZE,
    _OP.LINK: ENTRY_OUT_SIZE, _OP.CREATE: CREATE_OUT_SIZE, _OP.GETATTR: ATTR_OUT_SIZE,
    _OP.SETATTR: ATTR_OUT_SIZE, _OP.OPEN: OPEN_OUT_SIZE, _OP.OPENDIR: OPEN_OUT_SIZE,
    _OP.WRITE: WRITE_OUT_SIZE, _OP.STATFS: STATFS_OUT_SIZE, _OP.INIT: INIT_OUT_SIZE,
    _OP.RELEASE: 0, _OP.RELEASEDIR: 0, _OP.FLUSH: 0, _OP.FSYNC: 0, _OP.UNLINK: 0,
    _OP.RMDIR: 0, _OP.RENAME: 0, _OP.DESTROY: 0,
}
#: What virtq asks for in FUSE_INIT: parallel reads and directory operations, big writes
#: and max_pages (else the daemon caps requests at 32 pages), O_TRUNC handled by OPEN,
#: READDIRPLUS when the daemon offers it.
_INIT_FLAGS = (FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES | FUSE_DO_READDIRPLUS
               | FUSE_MAX_PAGES | FUSE_PARALLEL_DIROPS)


_U64_MAX = (1 << 64) - 1
_U32_MAX = 0xFFFFFFFF


def _check_ids(**values: object) -> None:
    """Node ids, file handles and directory cookies (u64 fields of the FUSE structs):
    :class:`ArgumentError` for anything else, before a struct packs it (``struct.error``)
    or a request is half made."""
    for name, value in values.items():
        if value.__class__ is not int or not 0 <= value <= _U64_MAX:
            _check_int(name, value, 0, _U64_MAX)


def _name_bytes(name: str | bytes, what: str = "name") -> bytes:
    """One path component as the daemon gets it: no '/', no NUL, not empty (a '/' would
    let the daemon resolve a path on our behalf), at most NAME_MAX bytes."""
    if isinstance(name, str):
        raw = os.fsencode(name)
    elif isinstance(name, bytes):
        raw = name
    else:
        raise ArgumentError(what, name, "must be str or bytes")
    if not raw or b"/" in raw or b"\0" in raw or raw in (b".", b".."):
        raise ArgumentError(what, name, "one path component: not empty, '.' or '..', "
                            "without '/' or NUL")
    if len(raw) > NAME_MAX:
        raise fs_error(errno.ENAMETOOLONG, path=os.fsdecode(raw))
    return raw


def _path_bytes(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> bytes:
    try:
        raw = os.fsencode(path)
    except TypeError:
        raise ArgumentError("path", path, "must be str, bytes or os.PathLike") from None
    if b"\0" in raw:
        raise ArgumentError("path", path, "must not contain NUL")
    return raw


@dataclass(frozen=True, slots=True)
class FsConfig:
    """``struct virtio_fs_config`` (§5.11.4): the file system's ``tag`` (None when the
    transport cannot read the configuration space, as vhost-user without the CONFIG
    protocol feature) and how many request queues the device has."""

    tag: str | None
    num_request_queues: int


class FsRequest:
    """A FUSE request in flight (or done).  :meth:`wait` returns its result or raises its
    error: an :class:`~virtq.devices.errors.FsOSError` for a FUSE error, a
    :class:`~virtq.errors.DeviceProtocolError` for a malformed reply,
    :class:`~virtq.errors.QueueBrokenError`, or the transport's error."""

    __slots__ = ("_dev", "chunk", "done", "error", "expect", "g", "into", "nodeid",
                 "opcode", "path", "qi", "result", "sink", "size", "unique")

    def __init__(self, dev: FsDevice, opcode: int, unique: int, nodeid: int, qi: int,
                 g: int, /) -> None:
        self._dev = dev
        self.opcode = opcode
        self.unique = unique
        self.nodeid = nodeid
        self.qi = qi
        self.g = g
        #: The pool buffer holding this request's data, if it uses one.
        self.chunk: int | None = None
        self.into: Sequence[DmaBuffer] | None = None
        #: Where a copying READ's data goes (else it is returned as bytes).
        self.sink: memoryview | None = None
        #: Data bytes asked for (READ, READDIR, READLINK) or sent (WRITE).
        self.size = 0
        #: The file type a created node must have (MKDIR, SYMLINK, CREATE, LINK).
        self.expect = 0
        self.path: str | None = None
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    @property
    def name(self) -> str:
        """The opcode's name (LOOKUP, READ, ...)."""
        try:
            return FuseOpcode(self.opcode).name
        except ValueError:
            return str(self.opcode)

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the request completes; its result, or raise its error (or
        :class:`~virtq.errors.VirtqTimeoutError`; the request stays in flight)."""
        if not self.done:
            self._dev.wait([self], timeout=timeout)
        if self.error is not None:
            raise self.error
        return self.result

    def __repr__(self) -> str:
        state = "failed" if self.error is not None else "done" if self.done else "in flight"
        return f"<FsRequest {self.name} unique={self.unique} nodeid={self.nodeid} {state}>"


class _Held:
    """Lookups a path operation took: given back (to be forgotten) when it ends, except
    those :meth:`keep` hands to a longer-lived owner (an open file)."""

    __slots__ = ("_dev", "nodes")

    def __init__(self, dev: FsDevice) -> None:
        self._dev = dev
        self.nodes: list[int] = []

    def add(self, nodeid: int) -> int:
        self.nodes.append(nodeid)
        return nodeid

    def keep(self, nodeid: int) -> None:
        self.nodes.remove(nodeid)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        nodes, self.nodes = self.nodes, []
        self._dev._give_back(nodes)


class FsDevice:
    """A virtio-fs device: a FUSE session with the daemon behind ``transport``.  Build it
    with :meth:`connect_vhost_user` or over any transport: ``FsDevice(transport)``.
    Closing the device forgets every node, sends FUSE_DESTROY and closes the transport
    (also when the constructor fails).

    ``queue_size``: ring entries per queue.  ``num_request_queues``: request queues to use
    (at most what the device has).  ``io_size``: the largest copying READ/WRITE (further
    capped by what FUSE_INIT negotiates) and the size of each of ``io_buffers`` pool
    buffers.  ``max_segments``: the most DmaBuffers of one zero-copy request.
    ``timeout``: seconds each synchronous operation may take.  ``uid``/``gid``: the
    credentials requests carry (default: this process's; the daemon creates files as
    them).  ``umask``: cleared from the mode of created files and directories, as the
    kernel does.  ``indirect``/``event_idx``: accept those features when offered.
    ``poll``: never sleep; spin on the used rings.  ``ring``: ``"split"``, ``"packed"`` or
    ``"auto"`` (packed when offered); ``in_order``: VIRTIO_F_IN_ORDER (None: when offered).

    Raises :class:`ArgumentError`, :class:`~virtq.transport.DeviceRefusedError` (a
    transport of another device type, too few queues, a FUSE version older than 7.23),
    :class:`~virtq.errors.DeviceProtocolError` (a malformed configuration or INIT reply),
    :class:`~virtq.errors.VirtqTimeoutError`, and the transport's errors.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        queue_size: int = 128,
        num_request_queues: int = 1,
        io_size: int = 1 << 20,
        io_buffers: int = 8,
        max_segments: int = 8,
        timeout: float | None = 30.0,
        uid: int | None = None,
        gid: int | None = None,
        umask: int = 0o022,
        indirect: bool = True,
        event_idx: bool = True,
        poll: bool = False,
        ring: str = "auto",
        in_order: bool | None = None,
    ) -> None:
        self.transport = transport
        self._closed = False
        self._transport_closed = False
        self._refused: tuple[str, BaseException | None] | None = None
        self.queues: list[DriverQueue[FsRequest]] = []
        self._tpls: list[ChainTemplate[FsRequest]] = []
        self._mem: memoryview | None = None
        self._quarantine: list[DmaBuffer] = []
        #: Lookups the daemon counts for this client, per node id.
        self._lookups: dict[int, int] = {}
        #: Of those, how many were given back and wait to be forgotten.
        self._forget: dict[int, int] = {}
        self._files: dict[int, Any] = {}  # id -> open FsFile, closed before DESTROY
        #: Bumped by every new FUSE session (reconnect): an FsFile of an older one is stale.
        self.session = 0
        self._unique = 0
        try:
            _check_int("queue_size", queue_size, 2, 32768)
            _check_int("num_request_queues", num_request_queues, 1, 0xFFFF)
            _check_int("io_size", io_size, FUSE_PAGE_SIZE, MAX_BUFFER)
            _check_int("io_buffers", io_buffers, 1, 1024)
            _check_int("max_segments", max_segments, 1, 1024)
            _check_int("umask", umask, 0, 0o777)
            deadline_after(timeout)  # validates it
            self.timeout = timeout
            self.umask = umask
            self.uid = os.geteuid() if uid is None else _check_int("uid", uid, 0, 0xFFFFFFFF)
            self.gid = os.getegid() if gid is None else _check_int("gid", gid, 0, 0xFFFFFFFF)
            self.poll_mode = bool(poll or transport.polling)
            self._setup(queue_size, num_request_queues, io_size, io_buffers, max_segments,
                        indirect, event_idx, ring, in_order)
            self.init = self._fuse_init()
        except BaseException:
            self._release_views()
            transport.close()
            raise

    # -- set-up ---------------------------------------------------------------------------

    def _setup(self, queue_size: int, nreq: int, io_size: int, io_buffers: int,
               max_segments: int, indirect: bool, event_idx: bool, ring: str,
               in_order: bool | None) -> None:
        t = self.transport
        if t.device_type is not None and t.device_type != VIRTIO_ID_FS:
            raise DeviceRefusedError(f"the transport's device is virtio type "
                                     f"{t.device_type}, not a file system ({VIRTIO_ID_FS})")
        wanted = 0  # §5.11.3: no device feature bits (a later spec adds NOTIFICATION)
        if indirect:
            wanted |= 1 << VIRTIO_F_INDIRECT_DESC
        if event_idx:
            wanted |= 1 << VIRTIO_F_EVENT_IDX
        wanted |= ring_wanted(ring, in_order)
        self.features = t.negotiate(wanted)
        #: "split" or "packed", and whether VIRTIO_F_IN_ORDER is in use (the device then
        #: uses every queue's requests in the order they were made available).
        self.ring, self.in_order = ring_chosen(self.features, ring, in_order)
        self.config = self._read_config()
        if nreq > self.config.num_request_queues:
            raise DeviceRefusedError(f"{nreq} request queues asked for; the device has "
                                     f"{self.config.num_request_queues}")
        self.indirect = bool(self.features >> VIRTIO_F_INDIRECT_DESC & 1)
        ev = bool(self.features >> VIRTIO_F_EVENT_IDX & 1)
        sizes = []
        for qi in range(nreq + 1):
            maximum = t.max_queue_size(qi)
            if maximum == 0:
                raise DeviceRefusedError(f"the device has no queue {qi}")
            sizes.append(min(queue_size, maximum))
        if not self.indirect:
            # A direct chain lives in the ring: header, data segments, reply, data.
            max_segments = min(max_segments, max(1, min(sizes[1:]) // 2 - 2))
        self.max_segments = max_segments
        chain = 2 + 2 * max_segments
        layouts = [ring_layout(sizes[0], indirect_size=1 if self.indirect else 0,
                               ring=self.ring)]
        layouts += [ring_layout(s, indirect_size=chain if self.indirect else 0,
                                ring=self.ring) for s in sizes[1:]]
        # Request slots: one ring entry each with indirect descriptors, else a few.
        spq = [min(_HIPRIO_SLOTS, sizes[0])]
        spq += [s if self.indirect else max(1, s // 3) for s in sizes[1:]]
        ring_bytes = sum(lay.nbytes for lay in layouts)
        page = layouts[0].page_size
        meta_off = ring_bytes
        self._slot_base = [0]
        for n in spq[:-1]:
            self._slot_base.append(self._slot_base[-1] + n)
        nslots = sum(spq)
        hiprio_bytes = spq[0] * _HIPRIO_AREA
        pool_off = align_up(meta_off + hiprio_bytes + (nslots - spq[0]) * _SLOT_BYTES, page)
        self._chunk_bytes = io_size
        self.arena: DmaArena = t.alloc_dma(pool_off + io_buffers * io_size)
        iova = self.arena.iova
        self._mem = self.arena.region.view()
        # Per global slot: where its request area starts (the reply area follows).
        self._meta = [meta_off + g * _HIPRIO_AREA for g in range(spq[0])]
        base = meta_off + hiprio_bytes
        self._meta += [base + k * _SLOT_BYTES for k in range(nslots - spq[0])]
        self._reply_w = [(Iova(iova + m + _REQ_AREA), _REPLY_AREA) for m in self._meta]
        self._chunks = [DmaBuffer(self.arena, pool_off + k * io_size, io_size)
                        for k in range(io_buffers)]
        self._free_chunks = list(range(io_buffers - 1, -1, -1))
        offset = 0
        for qi, (lay, slots) in enumerate(zip(layouts, spq, strict=True)):
            q: DriverQueue[FsRequest] = make_queue(
                self.arena.region, lay.shifted(offset), iova=iova, event_idx=ev,
                indirect=self.indirect, in_order=self.in_order)
            offset += lay.nbytes
            self.queues.append(q)
            shape = 1 if qi == HIPRIO_QUEUE else chain
            self._tpls.append(q.template(shape, slots=slots,
                                         typical_buffers=min(2, shape)))
            t.attach_queue(qi, q)
        self._next_queue = 0
        self._waiter = Waiter(t, self.queues, poll=self.poll_mode)
        t.start()
        if self.poll_mode:
            self._waiter.disarm()

    def _read_config(self) -> FsConfig:
        """``struct virtio_fs_config`` (§5.11.4), the one ingress for it.  Transports that
        cannot read it (vhost-user back-ends without the CONFIG protocol feature, like
        virtiofsd) leave the tag unknown; the request queues are then the queues after
        hiprio (§5.11.2)."""
        t = self.transport
        try:
            raw = t.read_config(0, FS_CONFIG_SIZE)
        except DeviceRefusedError:
            queues = t.num_queues() - FIRST_REQUEST_QUEUE
            if queues < 1:
                raise DeviceRefusedError(f"the device has {t.num_queues()} queue(s): no "
                                         "request queue after hiprio") from None
            return FsConfig(None, queues)
        if len(raw) != FS_CONFIG_SIZE:
            raise DeviceProtocolError("config length", len(raw),
                                      f"{FS_CONFIG_SIZE} bytes asked for")
        tag_raw = bytes(raw[:FS_TAG_SIZE])
        text = tag_raw.rstrip(b"\0")
        # UTF-8, padded with NUL bytes (§5.11.4): no NUL inside the name.
        try:
            if b"\0" in text:
                raise UnicodeError
            tag = text.decode("utf-8")
        except UnicodeError:
            raise DeviceProtocolError("config.tag", int.from_bytes(tag_raw[:8], "little"),
                                      "UTF-8 padded with NUL bytes (§5.11.4)") from None
        (nreq,) = struct.unpack_from("<I", raw, FS_CFG_NUM_REQUEST_QUEUES)
        if nreq < 1:
            raise DeviceProtocolError("config.num_request_queues", nreq,
                                      ">= 1 (§5.11.4.2: the device MUST set 1 or greater)")
        return FsConfig(tag, min(nreq, max(0, t.num_queues() - FIRST_REQUEST_QUEUE)))

    def _fuse_init(self) -> FsInit:
        """FUSE_INIT on a request queue (§5.11.5): one per session, whatever the number of
        queues.  The daemon answers with its version; both use the smaller minor."""
        args = FUSE_INIT_IN.pack(FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION,
                                 self._chunk_bytes, _INIT_FLAGS)
        fields = self._call(_OP.INIT, 0, args, reply=INIT_OUT_SIZE)
        (major, minor, max_readahead, flags, max_background, congestion, max_write,
         time_gran, max_pages) = fields
        if major != FUSE_KERNEL_VERSION:
            raise DeviceRefusedError(f"the daemon speaks FUSE {major}.{minor}; virtq "
                                     f"speaks {FUSE_KERNEL_VERSION}")
        minor = min(minor, FUSE_KERNEL_MINOR_VERSION)
        if minor < FUSE_MIN_MINOR_VERSION:
            raise DeviceRefusedError(f"the daemon speaks FUSE 7.{minor}; virtq needs "
                                     f"7.{FUSE_MIN_MINOR_VERSION} or later")
        flags &= _INIT_FLAGS
        # The kernel's process_init_reply(): max_write at least a page, max_pages at least
        # one (and without FUSE_MAX_PAGES the default 32).
        max_write = max(FUSE_PAGE_SIZE, max_write)
        max_pages = max(1, max_pages) if flags & FUSE_MAX_PAGES else FUSE_DEFAULT_MAX_PAGES
        init = FsInit(major, minor, max_readahead, flags, max_background, congestion,
                      max_write, time_gran, max_pages)
        #: The largest READ and WRITE this driver sends (one pool buffer at most).
        self.max_read = min(self._chunk_bytes, max_pages * FUSE_PAGE_SIZE)
        self.max_write = min(self._chunk_bytes, max_write)
        self.readdirplus = bool(flags & FUSE_DO_READDIRPLUS)
        self.session += 1
        return init

    @classmethod
    def connect_vhost_user(
        cls,
        path: str | os.PathLike[str],
        *,
        queue_size: int = 128,
        num_request_queues: int = 1,
        io_size: int = 1 << 20,
        io_buffers: int = 8,
        max_segments: int = 8,
        timeout: float | None = 30.0,
        uid: int | None = None,
        gid: int | None = None,
        umask: int = 0o022,
        indirect: bool = True,
        event_idx: bool = True,
        poll: bool = False,
        ring: str = "auto",
        in_order: bool | None = None,
        connect_timeout: float = 5.0,
        iova_allocator: IovaAllocator | None = None,
        hugepages: bool = False,
    ) -> Self:
        """Connect to a vhost-user-fs back-end (``virtiofsd --socket-path=...``) listening
        on ``path`` and start a FUSE session.  Raises the transport's errors
        (:class:`~virtq.transport.vhost_user.VhostUserConnectError`, ...) and those of
        the constructor; the connection is closed on any error."""
        transport = VhostUserTransport.connect(path, timeout=connect_timeout,
                                               iova_allocator=iova_allocator,
                                               hugepages=hugepages)
        try:
            return cls(transport, queue_size=queue_size,
                       num_request_queues=num_request_queues, io_size=io_size,
                       io_buffers=io_buffers, max_segments=max_segments, timeout=timeout,
                       uid=uid, gid=gid, umask=umask, indirect=indirect,
                       event_idx=event_idx, poll=poll, ring=ring, in_order=in_order)
        except BaseException:
            transport.close()
            raise

    # -- buffers ----------------------------------------------------------------------------

    def alloc_buffer(self, nbytes: int) -> DmaBuffer:
        """Device-visible memory for zero-copy READ/WRITE (:meth:`submit_read`,
        :meth:`submit_write`).  Each call is a new region the transport registers:
        allocate few, large buffers and :meth:`DmaBuffer.slice` them.  Raises
        :class:`ArgumentError`, :class:`~virtq.errors.QueueStateError` (closed),
        :class:`~virtq.errors.VirtqOSError`."""
        self._check_open()
        _check_int("nbytes", nbytes, 1, MAX_BUFFER)
        return DmaBuffer(self.transport.alloc_dma(nbytes), 0, nbytes)

    # -- submission -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise QueueStateError("FsDevice is closed")

    def _refuse(self) -> NoReturn:
        why, cause = self._refused or ("FsDevice is unusable", None)
        raise QueueStateError(why) from cause

    def _take_slot(self) -> tuple[int, int, ChainTemplate[FsRequest]]:
        """A free slot of a usable request queue, round-robin: (queue, slot, template)."""
        n = len(self._tpls) - 1
        usable = 0
        for k in range(n):
            qi = 1 + (self._next_queue + k) % n
            if self.queues[qi].state is not _READY:
                continue
            usable += 1
            tpl = self._tpls[qi]
            if tpl.num_free:
                self._next_queue = qi % n
                return qi, tpl.acquire(), tpl
        if not usable:
            broken = next((q.broken for q in self.queues[1:] if q.broken), None)
            raise QueueStateError("every request queue is broken; reconnect()") from broken
        raise QueueFullError(1, 0, "request slots")

    def _submit(self, opcode: int, nodeid: int, args: bytes | bytearray = b"", *,
                reply: int = 0, data: memoryview | None = None,
                src: Sequence[DmaBuffer] | None = None, data_in: int = 0,
                into: Sequence[DmaBuffer] | None = None, sink: memoryview | None = None,
                path: str | None = None, expect: int = 0) -> FsRequest:
        """Make one request available (published by the next :meth:`kick`): the in
        header and ``args``; WRITE data copied from ``data`` into a pool buffer or taken
        from ``src``; room for an out header and ``reply`` bytes; for data replies
        ``data_in`` bytes of a pool buffer (copied to ``sink``, or returned) or ``into``.
        Raises :class:`~virtq.errors.QueueFullError` (no slot or pool buffer free) and
        :class:`~virtq.errors.QueueStateError` (closed, failed, broken)."""
        if nodeid.__class__ is not int or not 0 <= nodeid <= _U64_MAX:
            _check_int("nodeid", nodeid, 0, _U64_MAX)
        if self._refused is not None:
            self._refuse()
        qi, slot, tpl = self._take_slot()
        g = self._slot_base[qi] + slot
        chunk = None
        try:
            if data is not None or data_in:
                if not self._free_chunks:
                    raise QueueFullError(1, 0, "I/O buffers")
                chunk = self._free_chunks.pop()
            mem = self._mem
            assert mem is not None
            meta = self._meta[g]
            base = self.arena.iova
            ndata = len(data) if data is not None else sum(b.length for b in src or ())
            self._unique += 1
            unique = self._unique
            FUSE_IN_HEADER.pack_into(mem, meta, _IN + len(args) + ndata, opcode, unique,
                                     nodeid, self.uid, self.gid, os.getpid(), 0)
            mem[meta + _IN : meta + _IN + len(args)] = args
            readable: list[tuple[Iova, int]] = [(Iova(base + meta), _IN + len(args))]
            if data is not None and ndata:
                assert chunk is not None
                buf = self._chunks[chunk]
                mem[buf.offset : buf.offset + ndata] = data
                readable.append((buf.iova, ndata))
            elif src:
                readable += [(b.iova, b.length) for b in src]
            writable: list[tuple[Iova, int]] = [(self._reply_w[g][0], _OUT + reply)]
            if data_in:
                assert chunk is not None
                writable.append((self._chunks[chunk].iova, data_in))
            elif into:
                writable += [(b.iova, b.length) for b in into]
            req = FsRequest(self, opcode, unique, nodeid, qi, g)
            req.chunk = chunk
            req.into = into
            req.sink = sink
            req.size = data_in or ndata or sum(b.length for b in into or ())
            req.path = path
            req.expect = expect
            tpl.submit(slot, readable, writable, req)
        except BaseException as exc:
            if chunk is not None:
                self._free_chunks.append(chunk)
            tpl.release(slot)
            if isinstance(exc, QueueBrokenError):
                raise QueueStateError(f"the request queue is broken ({exc.cause}); "
                                      "reconnect() before submitting more") from exc.cause
            raise
        return req

    def _submit_when_free(self, submit: Callable[[], FsRequest], *,
                          hiprio: bool = False) -> FsRequest:
        """``submit()``, waiting for the oldest request in flight (on the hiprio queue, or
        on the request queues) while every slot or pool buffer is taken."""
        while True:
            try:
                return submit()
            except QueueFullError:
                if hiprio:
                    oldest = [r for r in self.queues[HIPRIO_QUEUE].in_flight_tokens()
                              if not r.done][:1]
                else:
                    oldest = self._in_flight(requests_only=True)[:1]
                if not oldest:
                    raise
                self.wait(oldest, timeout=self.timeout)

    def _call(self, opcode: int, nodeid: int, args: bytes | bytearray = b"",
              **kw: Any) -> Any:
        """One synchronous request: its result, or its error raised."""
        req = self._submit_when_free(functools.partial(self._submit, opcode, nodeid, args,
                                                       **kw))
        return req.wait(self.timeout)

    # -- completion -------------------------------------------------------------------------

    def kick(self) -> None:
        """Publish added requests; notify the queues whose device asked for it."""
        for qi, queue in enumerate(self.queues):
            if queue.state is _READY and queue.publish():
                self.transport.notify(qi)

    @property
    def in_flight(self) -> int:
        """Requests (hiprio included) submitted and not yet completed."""
        if self._refused is not None:
            return 0
        return sum(q.num_in_flight for q in self.queues if q.state is _READY)

    def _in_flight(self, *, requests_only: bool = False) -> list[FsRequest]:
        queues = self.queues[1:] if requests_only else self.queues
        return [r for q in queues if q.state is not QueueState.CLOSED
                for r in q.in_flight_tokens() if not r.done]

    @property
    def waiter(self) -> Waiter:
        """The device's waiter (``fds()``, ``arm()``/``drain()`` for an event loop)."""
        return self._waiter

    def poll(self, timeout: float | None = 0) -> list[FsRequest]:
        """Publish pending requests, then return those that completed (each with its
        ``result`` or ``error``).  With ``timeout`` (seconds, None = forever) block until
        at least one is done or the time is up.  Device failures do not raise (see the
        failure policy); raises :class:`ArgumentError` and
        :class:`~virtq.errors.QueueStateError` (closed) only."""
        self._check_open()
        deadline = deadline_after(timeout)
        done: list[FsRequest] = []
        if self._refused is not None:
            return done
        try:
            self.kick()
            self._reap(done)
            if done or not self.in_flight or timeout == 0:
                return done
            while True:
                woke = self._waiter.wait(deadline)
                self._reap(done)
                if done or not self.in_flight:
                    return done
                if not woke and deadline is not None and time.monotonic() >= deadline:
                    return done
        except (DeviceError, OSError) as err:
            self._transport_failed(err, done)
            return done

    def _reap(self, done: list[FsRequest]) -> None:
        for qi, q in enumerate(self.queues):
            if q.state is not _READY:
                continue
            try:
                got = q.drain_used()
            except DeviceProtocolError as err:
                # The queue validated these before the bad element: they did complete.
                self._complete(qi, err.completed, done)  # type: ignore[arg-type]
                self._queue_broke(qi, err, done)
                continue
            if got:
                self._complete(qi, got, done)

    def _complete(self, qi: int, got: list[tuple[FsRequest, int]],
                  done: list[FsRequest]) -> None:
        """Check and deliver each reply; the first malformed one breaks the queue (the
        ones reaped after it fail with it too: the device can no longer be believed)."""
        broken: DeviceProtocolError | None = None
        for req, used in got:
            if broken is not None:
                self._fail(req, QueueBrokenError(broken), broken)
                done.append(req)
                continue
            err = self._finish(req, used)
            done.append(req)
            if err is not None:
                broken = err
        if broken is not None and self.queues[qi].state is _READY:
            self.queues[qi].mark_broken(broken)
            self._queue_broke(qi, broken, done)

    def _fail(self, req: FsRequest, err: BaseException, cause: BaseException | None = None,
              *, free: bool = True) -> None:
        if cause is not None:
            err.__cause__ = cause
        req.error = err
        req.done = True
        if req.chunk is not None and free:
            self._free_chunks.append(req.chunk)
            req.chunk = None

    def _queue_broke(self, qi: int, err: DeviceProtocolError, done: list[FsRequest]) -> None:
        """Queue ``qi`` is broken: its requests fail; the ring is stopped if the transport
        can, else their buffers stay out of use (the device may still write them)."""
        failed = [r for r in self.queues[qi].in_flight_tokens() if not r.done]
        try:
            stopped = self.transport.stop_queue(qi)
        except (DeviceError, OSError) as exc:
            stopped = False
            self._transport_failed(exc, done)
        for req in failed:
            if not req.done:
                self._fail(req, QueueBrokenError(err), err, free=stopped)
                done.append(req)
            if not stopped:
                self._quarantine.extend(req.into or ())

    def _transport_failed(self, err: BaseException, done: list[FsRequest]) -> None:
        """The transport failed: every request in flight fails with ``err`` (its pool
        buffer stays taken until the rings are reset); new ones are refused until
        :meth:`reconnect`."""
        for q in self.queues:
            if q.state is QueueState.CLOSED:
                continue
            for req in q.in_flight_tokens():
                if not req.done:
                    self._fail(req, err, free=False)
                    done.append(req)
        if self._refused is None:
            self._refused = (f"the transport failed ({type(err).__name__}: {err}); "
                             "reconnect() before submitting more", err)

    def _finish(self, req: FsRequest, used: int) -> DeviceProtocolError | None:
        """The one ingress of a reply: sets ``req.result`` or ``req.error``; returns the
        :class:`~virtq.errors.DeviceProtocolError` of a malformed reply (which is also the
        request's error)."""
        try:
            self._finish_reply(req, used)
        except DeviceProtocolError as err:
            req.error = err
            return err
        finally:
            req.done = True
            if req.chunk is not None:
                self._free_chunks.append(req.chunk)
                req.chunk = None
        return None

    def _finish_reply(self, req: FsRequest, used: int) -> None:
        if req.qi == HIPRIO_QUEUE:
            return  # FORGET and BATCH_FORGET have no reply (no writable buffer at all)
        mem = self._mem
        assert mem is not None
        roff = self._meta[req.g] + _REQ_AREA
        name = req.name
        if used < _OUT:
            raise DeviceProtocolError(f"used.len of a FUSE_{name} reply", used,
                                      f">= {_OUT} (struct fuse_out_header)")
        olen, error, unique = FUSE_OUT_HEADER.unpack_from(mem, roff)
        if olen != used:
            raise DeviceProtocolError(f"fuse_out_header.len of a FUSE_{name} reply", olen,
                                      f"{used}, the used.len of its chain")
        if unique != req.unique:
            raise DeviceProtocolError(f"fuse_out_header.unique of a FUSE_{name} reply",
                                      unique, f"{req.unique}, the request's")
        if error:
            if not -FUSE_MAX_ERRNO <= error < 0:
                raise DeviceProtocolError(
                    f"fuse_out_header.error of a FUSE_{name} reply", error,
                    f"0 or a negated errno, -1..-{FUSE_MAX_ERRNO}")
            if olen != _OUT:
                raise DeviceProtocolError(f"fuse_out_header.len of a FUSE_{name} error",
                                          olen, f"{_OUT}: an error reply carries no data")
            req.error = fs_error(-error, path=req.path, opcode=name, nodeid=req.nodeid)
            return
        n = olen - _OUT
        op = req.opcode
        fixed = _FIXED_REPLY.get(op)  # type: ignore[call-overload]
        if fixed is not None:
            if n != fixed:
                raise DeviceProtocolError(f"payload length of a FUSE_{name} reply", n,
                                          f"{fixed} bytes")
            # Parsed from a copy: a view of device memory must not live on in the
            # traceback of a DeviceProtocolError (it would keep the arena from closing),
            # and the daemon must not change what was checked while it is read.
            self._finish_fixed(req, bytes(mem[roff + _OUT : roff + _OUT + n]))
            return
        # A data reply: the payload is in the pool buffer or the caller's buffers (the
        # queue bounds used.len by their capacity, so n <= req.size).
        if op == _OP.READ:
            if req.chunk is None:
                req.result = n
            else:
                off = self._chunks[req.chunk].offset
                if req.sink is not None:
                    req.sink[:n] = mem[off : off + n]
                    req.result = n
                else:
                    req.result = bytes(mem[off : off + n])
            return
        assert req.chunk is not None
        off = self._chunks[req.chunk].offset
        data = bytes(mem[off : off + n])  # a copy, as above
        if op == _OP.READLINK:
            # The kernel reads a link into one page and refuses a target that fills it.
            if not 0 < n < PATH_MAX:
                raise DeviceProtocolError("FUSE_READLINK reply length", n,
                                          f"1..{PATH_MAX - 1} bytes (a symlink target)")
            if b"\0" in data:
                raise DeviceProtocolError("FUSE_READLINK target length", n,
                                          "a target without NUL bytes")
            req.result = data
            return
        # READDIR(PLUS): every node the daemon looked up for the reply is counted, and
        # given back at once if the reply is rejected (the kernel forgets them too).
        looked_up: list[int] = []
        try:
            req.result = parse_dirents(data, plus=op == _OP.READDIRPLUS, looked_up=looked_up)
        finally:
            for nodeid in looked_up:
                self._count(nodeid)
            if req.result is None:
                self._give_back(looked_up)

    def _finish_fixed(self, req: FsRequest, payload: bytes) -> None:
        op = req.opcode
        if op in (_OP.LOOKUP, _OP.MKDIR, _OP.SYMLINK, _OP.LINK, _OP.CREATE):
            created = None if op == _OP.LOOKUP else req.expect
            nodeid = entry_nodeid(payload)
            try:
                entry = parse_entry(payload, 0, "fuse_entry_out", created=created)
            except DeviceProtocolError:
                # The daemon counted a lookup all the same (unless it named no node):
                # give it back, as the kernel does for a reply it rejects.
                if nodeid:
                    self._count(nodeid)
                    self._give_back([nodeid])
                raise
            if entry is None:  # LOOKUP's negative entry: the name does not exist
                req.error = fs_error(errno.ENOENT, path=req.path, opcode=req.name,
                                     nodeid=req.nodeid)
                return
            self._count(entry.nodeid)
            if op == _OP.CREATE:
                fh, open_flags, _pad = FUSE_OPEN_OUT.unpack_from(payload, ENTRY_OUT_SIZE)
                req.result = (entry, fh, open_flags)
            else:
                req.result = entry
        elif op in (_OP.GETATTR, _OP.SETATTR):
            req.result = parse_attr(payload, ATTR_OUT_SIZE - FUSE_ATTR.size, "fuse_attr_out.attr")
        elif op in (_OP.OPEN, _OP.OPENDIR):
            fh, open_flags, _pad = FUSE_OPEN_OUT.unpack_from(payload, 0)
            req.result = (fh, open_flags)
        elif op == _OP.WRITE:
            (size, _pad) = FUSE_WRITE_OUT.unpack_from(payload, 0)
            if size > req.size:
                raise DeviceProtocolError("fuse_write_out.size", size,
                                          f"<= {req.size}, the bytes sent")
            req.result = size
        elif op == _OP.STATFS:
            req.result = parse_statfs(payload)
        elif op == _OP.INIT:
            req.result = parse_init(payload)

    def wait(self, requests: Iterable[FsRequest] | None = None,
             timeout: float | None = None) -> None:
        """Until every request in ``requests`` (default: all in flight) is done.  Raises
        :class:`~virtq.errors.VirtqTimeoutError` after ``timeout`` seconds (the requests
        stay in flight), :class:`ArgumentError` for a request of another device."""
        wait_requests(self, requests, timeout, FsRequest, "FUSE request(s)")

    # -- node lookups and FORGET ------------------------------------------------------------

    def _count(self, nodeid: int) -> None:
        self._lookups[nodeid] = self._lookups.get(nodeid, 0) + 1

    def _give_back(self, nodes: Iterable[int]) -> None:
        """Lookups this driver no longer needs: forgotten with the next batch."""
        forget = self._forget
        for nodeid in nodes:
            forget[nodeid] = forget.get(nodeid, 0) + 1

    def _maybe_flush(self) -> None:
        if len(self._forget) >= _FORGET_BATCH:
            self.flush_forgets()

    @property
    def lookups(self) -> dict[int, int]:
        """The lookup count the daemon holds for this client, per node id (a copy):
        what LOOKUP and friends returned, minus what was forgotten."""
        return dict(self._lookups)

    def forget(self, nodeid: int, nlookup: int = 1) -> None:
        """Give back ``nlookup`` lookups of ``nodeid`` (from :meth:`fuse_lookup`,
        :meth:`fuse_create`, ...).  They are sent in batches (FUSE_FORGET or
        FUSE_BATCH_FORGET on the hiprio queue); :meth:`flush_forgets` sends them now.
        Raises :class:`ArgumentError` for more than the daemon counts for this client
        (the daemon would abort on an underflow)."""
        _check_int("nodeid", nodeid, 1, (1 << 64) - 1)
        _check_int("nlookup", nlookup, 1)
        held = self._lookups.get(nodeid, 0) - self._forget.get(nodeid, 0)
        if nlookup > held:
            raise ArgumentError("nlookup", nlookup, f"node {nodeid} has {held} lookup(s) "
                                "this client may still forget")
        self._forget[nodeid] = self._forget.get(nodeid, 0) + nlookup
        self._maybe_flush()

    def flush_forgets(self) -> int:
        """Send every lookup given back and not yet forgotten: FUSE_FORGET for one node,
        FUSE_BATCH_FORGET (up to 509 nodes each) for more, on the hiprio queue
        (§5.11.6.2).  Returns how many nodes were named.  After a transport failure the
        session is gone and nothing is sent."""
        items = sorted(self._forget.items())
        self._forget.clear()
        for nodeid, n in items:
            left = self._lookups.get(nodeid, 0) - n
            if left > 0:
                self._lookups[nodeid] = left
            else:
                self._lookups.pop(nodeid, None)
        if not items or self._refused is not None:
            return 0
        for k in range(0, len(items), _BATCH_MAX):
            batch = items[k : k + _BATCH_MAX]
            self._submit_when_free(functools.partial(self._submit_forget, batch),
                                   hiprio=True)
        self.kick()
        return len(items)

    def _submit_forget(self, batch: list[tuple[int, int]]) -> FsRequest:
        if self._refused is not None:
            self._refuse()
        q, tpl = self.queues[HIPRIO_QUEUE], self._tpls[HIPRIO_QUEUE]
        if q.state is not _READY:
            raise QueueStateError("the hiprio queue is broken; reconnect()") from q.broken
        slot = tpl.acquire()
        try:
            mem = self._mem
            assert mem is not None
            meta = self._meta[slot]
            if len(batch) == 1:
                opcode, nodeid = _OP.FORGET, batch[0][0]
                args = FUSE_FORGET_IN.pack(batch[0][1])
            else:
                opcode, nodeid = _OP.BATCH_FORGET, 0
                args = FUSE_BATCH_FORGET_IN.pack(len(batch), 0) + b"".join(
                    FUSE_FORGET_ONE.pack(n, k) for n, k in batch)
            self._unique += 1
            FUSE_IN_HEADER.pack_into(mem, meta, _IN + len(args), opcode, self._unique, nodeid,
                                     self.uid, self.gid, os.getpid(), 0)
            mem[meta + _IN : meta + _IN + len(args)] = args
            req = FsRequest(self, opcode, self._unique, nodeid, HIPRIO_QUEUE, slot)
            # No device-writable part: forgets have no reply (the device uses the chain
            # with used.len 0).
            tpl.submit(slot, ((Iova(self.arena.iova + meta), _IN + len(args)),), (), req)
        except BaseException:
            tpl.release(slot)
            raise
        return req

    # -- FUSE operations on node ids --------------------------------------------------------
    #
    # One method per opcode, synchronous (within ``timeout``); each raises the request's
    # error: FsOSError (a FUSE errno), DeviceProtocolError (a malformed reply),
    # QueueBrokenError, the transport's error, VirtqTimeoutError, or ArgumentError /
    # QueueStateError for misuse.  ``path`` only names the file in error messages.

    def fuse_lookup(self, parent: int, name: str | bytes, *, path: str | None = None
                    ) -> FsEntry:
        """FUSE_LOOKUP ``name`` in directory ``parent``: the node, with one lookup counted
        for this client (give it back with :meth:`forget`)."""
        raw = _name_bytes(name)
        entry: FsEntry = self._call(_OP.LOOKUP, parent, raw + b"\0",
                                    reply=ENTRY_OUT_SIZE, path=path or os.fsdecode(raw))
        return entry

    def fuse_getattr(self, nodeid: int, fh: int | None = None, *,
                     path: str | None = None) -> FsAttr:
        """FUSE_GETATTR (of the open file ``fh`` when given)."""
        if fh is not None:
            _check_ids(fh=fh)
        args = FUSE_GETATTR_IN.pack(FUSE_GETATTR_FH if fh is not None else 0, 0, fh or 0)
        attr: FsAttr = self._call(_OP.GETATTR, nodeid, args, reply=ATTR_OUT_SIZE, path=path)
        return attr

    def fuse_setattr(self, nodeid: int, *, fh: int | None = None, size: int | None = None,
                     mode: int | None = None, atime_ns: int | None = None,
                     mtime_ns: int | None = None, path: str | None = None) -> FsAttr:
        """FUSE_SETATTR: truncate or extend to ``size``, chmod to ``mode`` (permission
        bits), set access/modification times (ns since the epoch); returns the new
        attributes."""
        valid = 0
        if fh is not None:
            _check_ids(fh=fh)
            valid |= FATTR_FH
        if size is not None:
            valid |= FATTR_SIZE
            _check_int("size", size, 0, (1 << 63) - 1)
        if mode is not None:
            valid |= FATTR_MODE
            _check_int("mode", mode, 0, 0o7777)
        a_s = a_ns = m_s = m_ns = 0
        if atime_ns is not None:
            valid |= FATTR_ATIME
            a_s, a_ns = divmod(_check_int("atime_ns", atime_ns, 0, (1 << 63) - 1), 10**9)
        if mtime_ns is not None:
            valid |= FATTR_MTIME
            m_s, m_ns = divmod(_check_int("mtime_ns", mtime_ns, 0, (1 << 63) - 1), 10**9)
        args = FUSE_SETATTR_IN.pack(valid, 0, fh or 0, size or 0, 0, a_s, m_s, 0, a_ns, m_ns,
                                    0, mode or 0, 0, 0, 0, 0)
        attr: FsAttr = self._call(_OP.SETATTR, nodeid, args, reply=ATTR_OUT_SIZE, path=path)
        return attr

    def _open_flags(self, flags: int) -> int:
        # What the kernel passes on (fuse_open_common): no O_CREAT, O_EXCL, O_NOCTTY, and
        # O_TRUNC only when the daemon handles it (FUSE_ATOMIC_O_TRUNC).
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        if not self.init.flags & FUSE_ATOMIC_O_TRUNC:
            flags &= ~os.O_TRUNC
        return flags

    def fuse_open(self, nodeid: int, flags: int = os.O_RDONLY, *, path: str | None = None
                  ) -> tuple[int, int]:
        """FUSE_OPEN: ``(fh, open_flags)`` (``FOPEN_*``).  Release it with
        :meth:`fuse_release`."""
        _check_int("flags", flags, 0, 0xFFFFFFFF)
        result: tuple[int, int] = self._call(
            _OP.OPEN, nodeid, FUSE_OPEN_IN.pack(self._open_flags(flags), 0),
            reply=OPEN_OUT_SIZE, path=path)
        return result

    def fuse_opendir(self, nodeid: int, *, path: str | None = None) -> int:
        """FUSE_OPENDIR: the directory handle (release it with :meth:`fuse_releasedir`)."""
        fh, _flags = self._call(_OP.OPENDIR, nodeid, FUSE_OPEN_IN.pack(os.O_RDONLY, 0),
                                reply=OPEN_OUT_SIZE, path=path)
        return int(fh)

    def fuse_release(self, nodeid: int, fh: int, flags: int = 0, *,
                     path: str | None = None) -> None:
        """FUSE_RELEASE an open file (``flags``: those it was opened with)."""
        _check_ids(fh=fh)
        _check_int("flags", flags, 0, _U32_MAX)
        self._call(_OP.RELEASE, nodeid, FUSE_RELEASE_IN.pack(fh, flags, 0, 0), path=path)

    def fuse_releasedir(self, nodeid: int, fh: int, *, path: str | None = None) -> None:
        """FUSE_RELEASEDIR an open directory."""
        _check_ids(fh=fh)
        self._call(_OP.RELEASEDIR, nodeid, FUSE_RELEASE_IN.pack(fh, os.O_RDONLY, 0, 0),
                   path=path)

    def fuse_flush(self, nodeid: int, fh: int, *, path: str | None = None) -> None:
        """FUSE_FLUSH: what the kernel sends on every close() of a file descriptor."""
        _check_ids(fh=fh)
        self._call(_OP.FLUSH, nodeid, FUSE_FLUSH_IN.pack(fh, 0, 0, 0), path=path)

    def fuse_fsync(self, nodeid: int, fh: int, *, datasync: bool = False,
                   path: str | None = None) -> None:
        """FUSE_FSYNC (``datasync``: data only, FUSE_FSYNC_FDATASYNC)."""
        _check_ids(fh=fh)
        self._call(_OP.FSYNC, nodeid,
                   FUSE_FSYNC_IN.pack(fh, FUSE_FSYNC_FDATASYNC if datasync else 0, 0),
                   path=path)

    def _check_read(self, size: int) -> None:
        if size.__class__ is not int or not 0 < size <= self.max_read:
            raise ArgumentError("size", size, f"must be in 1..max_read={self.max_read} "
                                "(read_bytes() and FsFile split larger reads)")

    def submit_read(self, nodeid: int, fh: int, offset: int, size: int = 0, *,
                    into: DmaBuffer | Sequence[DmaBuffer] | None = None, flags: int = 0,
                    sink: memoryview | None = None, path: str | None = None) -> FsRequest:
        """Start a FUSE_READ of ``size`` bytes at ``offset`` (``flags``: the file's open
        flags).  Copied through a pool buffer: the result is the bytes read (or, with
        ``sink``, a writable byte view of at least ``size``, their number); with ``into``
        (DmaBuffers of :meth:`alloc_buffer`) the daemon writes straight into them and the
        result is the number of bytes it wrote.  Raises :class:`ArgumentError`,
        :class:`~virtq.errors.QueueFullError`, :class:`~virtq.errors.QueueStateError`."""
        _check_int("offset", offset, 0, (1 << 63) - 1)
        if fh.__class__ is not int or flags.__class__ is not int or not 0 <= fh <= _U64_MAX \
                or not 0 <= flags <= _U32_MAX:
            _check_ids(fh=fh)
            _check_int("flags", flags, 0, _U32_MAX)
        if into is not None:
            bufs = self._check_bufs(into)
            size = sum(b.length for b in bufs)
            self._check_read(size)
            return self._submit(_OP.READ, nodeid, FUSE_READ_IN.pack(fh, offset, size, 0, 0,
                                                                   flags, 0),
                                into=bufs, path=path)
        self._check_read(size)
        if sink is not None and (sink.readonly or sink.nbytes < size or sink.format != "B"):
            raise ArgumentError("sink", sink, f"a writable byte view of >= {size} bytes")
        return self._submit(_OP.READ, nodeid,
                            FUSE_READ_IN.pack(fh, offset, size, 0, 0, flags, 0),
                            data_in=size, sink=sink, path=path)

    def fuse_read(self, nodeid: int, fh: int, offset: int, size: int, *, flags: int = 0,
                  path: str | None = None) -> bytes:
        """FUSE_READ: up to ``size`` (at most :attr:`max_read`) bytes at ``offset``;
        fewer at the end of the file."""
        req = self._submit_when_free(functools.partial(
            self.submit_read, nodeid, fh, offset, size, flags=flags, path=path))
        data: bytes = req.wait(self.timeout)
        return data

    def submit_write(self, nodeid: int, fh: int, offset: int, data: Any, *, flags: int = 0,
                     path: str | None = None) -> FsRequest:
        """Start a FUSE_WRITE of ``data`` at ``offset``: bytes-like data (at most
        :attr:`max_write` bytes) is copied into a pool buffer, a :class:`DmaBuffer` or a
        list of them goes to the daemon without a copy.  The result is the number of bytes
        the daemon wrote.  Raises :class:`ArgumentError` (a bad ``offset``, more than
        :attr:`max_write` bytes, data that is not bytes-like; more than
        :attr:`max_segments` DmaBuffers, or ones not from this device or quarantined by a
        broken queue), :class:`~virtq.errors.QueueFullError`,
        :class:`~virtq.errors.QueueStateError`."""
        _check_int("offset", offset, 0, (1 << 63) - 1)
        if fh.__class__ is not int or flags.__class__ is not int or not 0 <= fh <= _U64_MAX \
                or not 0 <= flags <= _U32_MAX:
            _check_ids(fh=fh)
            _check_int("flags", flags, 0, _U32_MAX)
        if isinstance(data, DmaBuffer) or (isinstance(data, list | tuple) and data
                                           and isinstance(data[0], DmaBuffer)):
            bufs = self._check_bufs(data)
            size = sum(b.length for b in bufs)
            if size > self.max_write:
                raise ArgumentError("data", size, f"at most max_write={self.max_write} bytes")
            return self._submit(_OP.WRITE, nodeid,
                                FUSE_WRITE_IN.pack(fh, offset, size, 0, 0, flags, 0),
                                reply=WRITE_OUT_SIZE, src=bufs, path=path)
        view = byte_view(data)
        if len(view) > self.max_write:
            raise ArgumentError("data", len(view), f"at most max_write={self.max_write} bytes "
                                "per request (FsFile and write_bytes() split larger writes)")
        return self._submit(_OP.WRITE, nodeid,
                            FUSE_WRITE_IN.pack(fh, offset, len(view), 0, 0, flags, 0),
                            reply=WRITE_OUT_SIZE, data=view, path=path)

    def fuse_write(self, nodeid: int, fh: int, offset: int, data: Any, *, flags: int = 0,
                   path: str | None = None) -> int:
        """FUSE_WRITE ``data`` at ``offset``; the number of bytes written."""
        req = self._submit_when_free(functools.partial(
            self.submit_write, nodeid, fh, offset, data, flags=flags, path=path))
        written: int = req.wait(self.timeout)
        return written

    def _check_bufs(self, into: DmaBuffer | Sequence[DmaBuffer]) -> Sequence[DmaBuffer]:
        try:
            bufs = [into] if isinstance(into, DmaBuffer) else list(into)
        except TypeError:
            raise ArgumentError("into", into, "a DmaBuffer or a sequence of them") from None
        if not bufs or len(bufs) > self.max_segments:
            raise ArgumentError("into", into, f"1..{self.max_segments} DmaBuffers")
        for b in bufs:
            if b.__class__ is not DmaBuffer or b.owner is not self.transport:
                raise ArgumentError("into", b, "DmaBuffers from this device's alloc_buffer()")
            if self._quarantine and any(b.overlaps(q) for q in self._quarantine):
                raise ArgumentError("into", b, "the device may still write this buffer: a "
                                    "queue broke with it in flight; reconnect() or close()")
        return bufs

    def fuse_readdir(self, nodeid: int, fh: int, offset: int = 0, *, plus: bool = False,
                     size: int | None = None, path: str | None = None) -> list[FsDirEntry]:
        """One FUSE_READDIR (``plus``: FUSE_READDIRPLUS, only when negotiated) from the
        cookie ``offset``, of at most ``size`` bytes (default: 64 KiB or :attr:`max_read`,
        the smaller); an empty list at the end.  Each READDIRPLUS ``entry`` is one lookup
        for this client to give back with :meth:`forget`.  Raises
        :class:`~virtq.errors.QueueStateError` for ``plus`` when the daemon did not
        negotiate FUSE_DO_READDIRPLUS (:attr:`readdirplus`), :class:`ArgumentError` for a
        ``size`` outside 1..max_read, and the request's errors."""
        if plus and not self.readdirplus:
            raise QueueStateError("the daemon did not negotiate FUSE_DO_READDIRPLUS")
        size = min(self.max_read, _READDIR_SIZE) if size is None else size
        _check_int("size", size, 1, self.max_read)
        _check_ids(fh=fh, offset=offset)
        entries: list[FsDirEntry] = self._call(
            _OP.READDIRPLUS if plus else _OP.READDIR, nodeid,
            FUSE_READ_IN.pack(fh, offset, size, 0, 0, 0, 0), data_in=size, path=path)
        return entries

    def _mode_bits(self, mode: int) -> int:
        return _check_int("mode", mode, 0, 0o7777) & ~self.umask

    def fuse_create(self, parent: int, name: str | bytes, flags: int = os.O_WRONLY,
                    mode: int = 0o666, *, path: str | None = None
                    ) -> tuple[FsEntry, int, int]:
        """FUSE_CREATE a regular file and open it: ``(entry, fh, open_flags)``; ``mode``
        has :attr:`umask` cleared.  One lookup of the new node is counted."""
        raw = _name_bytes(name)
        _check_int("flags", flags, 0, _U32_MAX)
        args = FUSE_CREATE_IN.pack(flags | os.O_CREAT, stat.S_IFREG | self._mode_bits(mode),
                                   self.umask, 0) + raw + b"\0"
        result: tuple[FsEntry, int, int] = self._call(
            _OP.CREATE, parent, args, reply=CREATE_OUT_SIZE, path=path or os.fsdecode(raw),
            expect=stat.S_IFREG)
        return result

    def fuse_mkdir(self, parent: int, name: str | bytes, mode: int = 0o777, *,
                   path: str | None = None) -> FsEntry:
        """FUSE_MKDIR; ``mode`` has :attr:`umask` cleared.  One lookup counted."""
        raw = _name_bytes(name)
        entry: FsEntry = self._call(
            _OP.MKDIR, parent, FUSE_MKDIR_IN.pack(self._mode_bits(mode), self.umask)
            + raw + b"\0", reply=ENTRY_OUT_SIZE, path=path or os.fsdecode(raw),
            expect=stat.S_IFDIR)
        return entry

    def fuse_symlink(self, parent: int, name: str | bytes, target: str | bytes, *,
                     path: str | None = None) -> FsEntry:
        """FUSE_SYMLINK ``name`` -> ``target`` (stored as given): the new node, with one
        lookup counted.  Raises ``FileNotFoundError`` for an empty ``target`` and an
        :class:`~virtq.devices.errors.FsOSError` with ENAMETOOLONG for one of PATH_MAX
        bytes or more (as symlink(2) does, without asking the daemon),
        :class:`ArgumentError` for a ``name`` that is not one path component or a
        ``target`` with NUL, and the request's errors."""
        raw = _name_bytes(name)
        tgt = _path_bytes(target)
        if not tgt:
            raise fs_error(errno.ENOENT, path=path or os.fsdecode(raw), opcode="SYMLINK")
        if len(tgt) >= PATH_MAX:
            raise fs_error(errno.ENAMETOOLONG, path=path or os.fsdecode(raw))
        entry: FsEntry = self._call(_OP.SYMLINK, parent, raw + b"\0" + tgt + b"\0",
                                    reply=ENTRY_OUT_SIZE, path=path or os.fsdecode(raw),
                                    expect=stat.S_IFLNK)
        return entry

    def fuse_link(self, nodeid: int, newparent: int, newname: str | bytes, *,
                  file_type: int | None = None, path: str | None = None) -> FsEntry:
        """FUSE_LINK: a new name ``newname`` in ``newparent`` for ``nodeid``.  The reply
        must name a node of ``nodeid``'s file type (``S_IFREG``, ...; asked with GETATTR
        when not given).  One lookup counted."""
        raw = _name_bytes(newname)
        _check_ids(nodeid=nodeid)
        if file_type is None:
            file_type = stat.S_IFMT(self.fuse_getattr(nodeid, path=path).mode)
        entry: FsEntry = self._call(_OP.LINK, newparent, FUSE_LINK_IN.pack(nodeid) + raw
                                    + b"\0", reply=ENTRY_OUT_SIZE,
                                    path=path or os.fsdecode(raw), expect=file_type)
        return entry

    def fuse_unlink(self, parent: int, name: str | bytes, *, path: str | None = None
                    ) -> None:
        """FUSE_UNLINK a non-directory."""
        raw = _name_bytes(name)
        self._call(_OP.UNLINK, parent, raw + b"\0", path=path or os.fsdecode(raw))

    def fuse_rmdir(self, parent: int, name: str | bytes, *, path: str | None = None
                   ) -> None:
        """FUSE_RMDIR an empty directory."""
        raw = _name_bytes(name)
        self._call(_OP.RMDIR, parent, raw + b"\0", path=path or os.fsdecode(raw))

    def fuse_rename(self, olddir: int, oldname: str | bytes, newdir: int,
                    newname: str | bytes, *, path: str | None = None) -> None:
        """FUSE_RENAME ``olddir/oldname`` to ``newdir/newname`` (replacing it)."""
        old, new = _name_bytes(oldname, "oldname"), _name_bytes(newname, "newname")
        _check_ids(newdir=newdir)
        self._call(_OP.RENAME, olddir, FUSE_RENAME_IN.pack(newdir) + old + b"\0" + new
                   + b"\0", path=path or os.fsdecode(old))

    def fuse_readlink(self, nodeid: int, *, path: str | None = None) -> bytes:
        """FUSE_READLINK: the symlink's target."""
        target: bytes = self._call(_OP.READLINK, nodeid, data_in=PATH_MAX, path=path)
        return target

    def fuse_statfs(self, nodeid: int = FUSE_ROOT_ID) -> os.statvfs_result:
        """FUSE_STATFS of the file system holding ``nodeid``, as :func:`os.statvfs`."""
        result: os.statvfs_result = self._call(_OP.STATFS, nodeid, reply=STATFS_OUT_SIZE)
        return result

    # -- spans: large reads and writes, every piece in flight at once ----------------------

    def _read_span(self, nodeid: int, fh: int, offset: int, view: memoryview, flags: int,
                   path: str | None) -> int:
        """Fill ``view`` from ``offset`` with READs of :attr:`max_read` bytes, all
        submitted before the first is waited for (as many at a time as the pool has
        buffers).  Returns the bytes read up to the first short READ (the end of the
        file); raises the first failed READ's error."""
        step = self.max_read
        n = len(view)
        reqs: list[tuple[FsRequest, int]] = []
        for off in range(0, n, step):
            k = min(step, n - off)
            reqs.append((self._submit_when_free(functools.partial(
                self.submit_read, nodeid, fh, offset + off, k, flags=flags,
                sink=view[off : off + k], path=path)), k))
        self.wait([r for r, _ in reqs], timeout=self.timeout)
        total = 0
        for r, k in reqs:
            got: int = r.wait()
            total += got
            if got < k:
                break
        return total

    def _write_span(self, nodeid: int, fh: int, offset: int, view: memoryview, flags: int,
                    path: str | None, *, sequential: bool = False) -> int:
        """Write ``view`` at ``offset`` with WRITEs of :attr:`max_write` bytes, all in
        flight together (``sequential``: one at a time, for O_APPEND, where the daemon
        places each at the end).  Returns the bytes written up to the first short WRITE;
        raises the first failed WRITE's error."""
        step = self.max_write
        n = len(view)
        reqs: list[tuple[FsRequest, int]] = []
        for off in range(0, n, step):
            k = min(step, n - off)
            req = self._submit_when_free(functools.partial(
                self.submit_write, nodeid, fh, offset + off, view[off : off + k],
                flags=flags, path=path))
            reqs.append((req, k))
            if sequential and req.wait(self.timeout) < k:
                break
        self.wait([r for r, _ in reqs], timeout=self.timeout)
        total = 0
        for r, k in reqs:
            got: int = r.wait()
            total += got
            if got < k:
                break
        return total

    # -- paths ------------------------------------------------------------------------------
    #
    # Paths are resolved from the root node by LOOKUP, one component at a time, as the
    # kernel's path walk does: '.' is skipped, '..' goes back up the directories walked
    # (never above the root), symlinks are followed (a target starting with '/' starts
    # again at the root of the share, as a guest that mounted it at / would see).  No
    # name is cached: with ``-o cache=none`` on the daemon every call sees the directory
    # as it is now.  The lookups a call takes are given back when it returns.
    #
    # Like the kernel's VFS, UNLINK, RMDIR and RENAME look their (source) name up first: a
    # daemon may rely on it (virtiofsd answers EIO, not ENOENT, for a name it cannot find
    # there, taking it for a race with another client).

    def _held(self) -> _Held:
        return _Held(self)

    def _resolve(self, path: Any, held: _Held, *, follow: bool = True
                 ) -> tuple[int, FsAttr, str]:
        """The node ``path`` names: ``(nodeid, attributes, path as text)``."""
        raw = _path_bytes(path)
        shown = os.fsdecode(raw)
        todo = [p for p in reversed(raw.split(b"/")) if p and p != b"."]
        stack: list[tuple[int, FsAttr | None]] = [(FUSE_ROOT_ID, None)]
        links = 0
        while todo:
            name = todo.pop()
            if name == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            if len(name) > NAME_MAX:
                raise fs_error(errno.ENAMETOOLONG, path=shown)
            entry = self.fuse_lookup(stack[-1][0], name, path=shown)
            held.add(entry.nodeid)
            if entry.attr.is_symlink and (todo or follow):
                links += 1
                if links > _MAX_SYMLINKS:
                    raise fs_error(errno.ELOOP, path=shown)
                target = self.fuse_readlink(entry.nodeid, path=shown)
                if target.startswith(b"/"):
                    del stack[1:]
                todo += [p for p in reversed(target.split(b"/")) if p and p != b"."]
                continue
            if todo and not entry.attr.is_dir:
                raise fs_error(errno.ENOTDIR, path=shown)
            stack.append((entry.nodeid, entry.attr))
        nodeid, attr = stack[-1]
        if attr is None:
            attr = self.fuse_getattr(nodeid, path=shown)
        if raw.endswith(b"/") and not attr.is_dir:
            raise fs_error(errno.ENOTDIR, path=shown)
        return nodeid, attr, shown

    def _resolve_parent(self, path: Any, held: _Held) -> tuple[int, bytes, str]:
        """The directory that holds ``path``'s last component, and that name."""
        raw = _path_bytes(path)
        shown = os.fsdecode(raw)
        head, _, name = raw.rstrip(b"/").rpartition(b"/")
        if not name or name in (b".", b".."):
            raise fs_error(errno.EINVAL, path=shown)
        if len(name) > NAME_MAX:
            raise fs_error(errno.ENAMETOOLONG, path=shown)
        parent, attr, _ = self._resolve(head or (b"/" if raw.startswith(b"/") else b"."),
                                        held)
        if not attr.is_dir:
            raise fs_error(errno.ENOTDIR, path=shown)
        return parent, name, shown

    def _done(self, held: _Held) -> None:
        held.__exit__()
        self._maybe_flush()

    def stat(self, path: Any = ".", *, follow_symlinks: bool = True) -> os.stat_result:
        """:func:`os.stat` through the daemon (``st_dev`` is 0).  Raises
        :class:`~virtq.devices.errors.FsOSError` (``FileNotFoundError``,
        ``NotADirectoryError``, ...) and the device's errors."""
        held = self._held()
        try:
            return self._resolve(path, held, follow=follow_symlinks)[1].to_stat_result()
        finally:
            self._done(held)

    def lstat(self, path: Any) -> os.stat_result:
        """:meth:`stat` without following a final symlink."""
        return self.stat(path, follow_symlinks=False)

    def exists(self, path: Any) -> bool:
        """Whether ``path`` names something (following symlinks)."""
        try:
            self.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def is_dir(self, path: Any) -> bool:
        """Whether ``path`` names a directory (following symlinks), as
        :meth:`pathlib.Path.is_dir`: False when it does not exist or a component is not a
        directory; other errors of :meth:`stat` (``PermissionError``, the device's) are
        raised."""
        try:
            return stat.S_ISDIR(self.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def is_file(self, path: Any) -> bool:
        """Whether ``path`` names a regular file (following symlinks), as
        :meth:`pathlib.Path.is_file`: False when it does not exist or a component is not a
        directory; other errors of :meth:`stat` (``PermissionError``, the device's) are
        raised."""
        try:
            return stat.S_ISREG(self.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def _read_dir(self, nodeid: int, plus: bool, path: str) -> list[FsDirEntry]:
        """Every entry of directory ``nodeid``: OPENDIR, READDIR(PLUS) until an empty
        reply, RELEASEDIR.  A daemon whose cookies go round in circles would never end
        the listing: a cookie seen twice is a protocol error."""
        fh = self.fuse_opendir(nodeid, path=path)
        entries: list[FsDirEntry] = []
        try:
            offset = 0
            seen = {0}
            while True:
                batch = self.fuse_readdir(nodeid, fh, offset, plus=plus, path=path)
                entries += batch
                if not batch:
                    break
                offset = batch[-1].offset
                if offset in seen:
                    err = DeviceProtocolError("fuse_dirent.off", offset,
                                              "a cookie not returned before in this listing")
                    self._broke_above_ring(err)
                    raise err
                seen.add(offset)
        except BaseException:
            self._give_back(e.entry.nodeid for e in entries if e.entry is not None)
            with contextlib.suppress(VirtqError, OSError):
                self.fuse_releasedir(nodeid, fh, path=path)
            raise
        self.fuse_releasedir(nodeid, fh, path=path)
        return entries

    def _broke_above_ring(self, err: DeviceProtocolError) -> None:
        """A device error found above the ring (the failure policy's second row): the
        request queues are marked broken as if a used element had been impossible."""
        for qi in range(FIRST_REQUEST_QUEUE, len(self.queues)):
            if self.queues[qi].state is _READY:
                self.queues[qi].mark_broken(err)
                self._queue_broke(qi, err, [])

    def scandir(self, path: Any = ".") -> list[FsDirEntry]:
        """The entries of a directory, ``.`` and ``..`` left out, with their type
        (``is_dir``, ``is_symlink``) and inode number; READDIRPLUS entries also carry
        their attributes (``entry.attr``).  Their lookups are given back: an
        ``entry.nodeid`` is not held for you (:meth:`fuse_lookup` one to use it).  Raises
        ``NotADirectoryError`` when ``path`` is not a directory, ``FileNotFoundError`` and
        the other :class:`~virtq.devices.errors.FsOSError` errors for one that cannot be
        resolved, and the device's errors."""
        held = self._held()
        try:
            nodeid, attr, shown = self._resolve(path, held)
            if not attr.is_dir:
                raise fs_error(errno.ENOTDIR, path=shown)
            entries = self._read_dir(nodeid, self.readdirplus, shown)
            held.nodes += [e.entry.nodeid for e in entries if e.entry is not None]
            return [e for e in entries if e.name not in (".", "..")]
        finally:
            self._done(held)

    def listdir(self, path: Any = ".") -> list[str]:
        """The names in a directory, as :func:`os.listdir` (daemon order, without ``.``
        and ``..``).  Raises ``NotADirectoryError`` when ``path`` is not a directory,
        ``FileNotFoundError`` and the other :class:`~virtq.devices.errors.FsOSError` errors
        for one that cannot be resolved, and the device's errors."""
        held = self._held()
        try:
            nodeid, attr, shown = self._resolve(path, held)
            if not attr.is_dir:
                raise fs_error(errno.ENOTDIR, path=shown)
            return [e.name for e in self._read_dir(nodeid, False, shown)
                    if e.name not in (".", "..")]
        finally:
            self._done(held)

    def walk(self, top: Any = ".", topdown: bool = True,
             onerror: Callable[[OSError], object] | None = None,
             followlinks: bool = False) -> Iterator[tuple[str, list[str], list[str]]]:
        """:func:`os.walk` through the daemon: ``(dirpath, dirnames, filenames)`` for
        every directory under ``top``; a symlink to a directory is in ``dirnames`` but
        only walked into with ``followlinks``.  With ``topdown`` the caller may prune
        ``dirnames`` in place.  Directories are walked by node id (READDIRPLUS gives
        them with the listing; else one LOOKUP each), holding the lookups of the
        directories above until their subtree is done.

        As with os.walk, an error the file system answered resolving ``top``
        (``NotADirectoryError`` when it is not a directory, ``FileNotFoundError``, ...: an
        :class:`~virtq.devices.errors.FsOSError`) or listing a directory is not raised but
        passed to ``onerror`` (default: ignored; it may raise it).  Everything else is
        raised: a daemon that stops answering (:class:`~virtq.errors.VirtqTimeoutError`,
        although it is a ``TimeoutError``, must not make directories silently vanish from
        the walk), the transport's errors, :class:`~virtq.errors.DeviceProtocolError`,
        :class:`~virtq.errors.QueueBrokenError`, :class:`~virtq.errors.QueueStateError`."""
        held = self._held()
        try:
            try:
                nodeid, attr, shown = self._resolve(top, held)
                if not attr.is_dir:
                    raise fs_error(errno.ENOTDIR, path=shown)
            except FsOSError as err:
                if onerror is not None:
                    onerror(err)
                return
            yield from self._walk_dir(nodeid, os.fsdecode(_path_bytes(top)), topdown,
                                      onerror, followlinks)
        finally:
            self._done(held)

    def _walk_dir(self, nodeid: int, dirpath: str, topdown: bool,
                  onerror: Callable[[OSError], object] | None, followlinks: bool
                  ) -> Iterator[tuple[str, list[str], list[str]]]:
        try:
            entries = self._read_dir(nodeid, self.readdirplus, dirpath)
        except FsOSError as err:
            if onerror is not None:
                onerror(err)
            return
        held = self._held()
        try:
            held.nodes += [e.entry.nodeid for e in entries if e.entry is not None]
            known = {e.name: e.entry for e in entries if e.entry is not None}
            dirs: list[str] = []
            files: list[str] = []
            for e in entries:
                if e.name in (".", ".."):
                    continue
                is_dir = e.is_dir
                if e.is_symlink or e.type == 0:
                    # os.walk classifies with DirEntry.is_dir(), which follows symlinks.
                    try:
                        is_dir = stat.S_ISDIR(self.stat(posixpath.join(dirpath, e.name)
                                                        ).st_mode)
                    except FsOSError:
                        is_dir = False
                (dirs if is_dir else files).append(e.name)
            if topdown:
                yield dirpath, dirs, files
            for name in dirs:
                sub = posixpath.join(dirpath, name)
                try:
                    entry = known.get(name)
                    if entry is None:
                        entry = self.fuse_lookup(nodeid, name, path=sub)
                        held.add(entry.nodeid)
                    child, attr = entry.nodeid, entry.attr
                    if attr.is_symlink:
                        if not followlinks:
                            continue
                        child, attr, _ = self._resolve(sub, held)
                    if not attr.is_dir:
                        continue
                except FsOSError as err:
                    if onerror is not None:
                        onerror(err)
                    continue
                yield from self._walk_dir(child, sub, topdown, onerror, followlinks)
            if not topdown:
                yield dirpath, dirs, files
        finally:
            self._done(held)

    def open(self, path: Any, mode: str = "rb", *, perms: int = 0o666) -> FsFile:
        """Open a file as an unbuffered binary :class:`io.RawIOBase`
        (:class:`~virtq.devices.fsfile.FsFile`): ``mode`` is ``r``, ``w``, ``a`` or ``x``,
        with ``+`` for both directions, and must say ``b`` (wrap it in
        :class:`io.BufferedReader` / :class:`io.TextIOWrapper` for more).  New files get
        ``perms`` minus :attr:`umask`.  A directory raises ``IsADirectoryError`` (as
        Python's own ``open()`` does).  Close it (or use ``with``): FUSE_FLUSH and
        FUSE_RELEASE go out then."""
        flags = _mode_flags(mode)
        # Checked whether or not a file is created: a bad value must not pass just
        # because the file happens to exist.
        _check_int("perms", perms, 0, 0o7777)
        held = self._held()
        try:
            nodeid, fh, open_flags, attr, shown = self._open_node(path, flags, perms, held)
            held.keep(nodeid)  # the file holds this lookup until it is closed
        finally:
            self._done(held)
        f = FsFile(self, nodeid, fh, flags, open_flags, shown, mode, attr.size)
        self._files[id(f)] = f
        return f

    def _open_node(self, path: Any, flags: int, perms: int, held: _Held
                   ) -> tuple[int, int, int, FsAttr, str]:
        """LOOKUP (then OPEN) or CREATE: ``(nodeid, fh, open_flags, attributes, path)``;
        the node's lookup is in ``held``."""
        if flags & os.O_CREAT:
            parent, name, shown = self._resolve_parent(path, held)
            try:
                entry: FsEntry | None = self.fuse_lookup(parent, name, path=shown)
            except FileNotFoundError:
                entry = None
            if entry is None:
                entry, fh, open_flags = self.fuse_create(parent, name, flags, perms,
                                                         path=shown)
                held.add(entry.nodeid)
                return entry.nodeid, fh, open_flags, entry.attr, shown
            held.add(entry.nodeid)
            if flags & os.O_EXCL:
                raise fs_error(errno.EEXIST, path=shown)
            nodeid, attr = entry.nodeid, entry.attr
            if attr.is_symlink:
                nodeid, attr, _ = self._resolve(path, held)
        else:
            nodeid, attr, shown = self._resolve(path, held)
        if attr.is_dir:
            # CPython's FileIO refuses directories (EISDIR) whatever the mode.
            raise fs_error(errno.EISDIR, path=shown)
        fh, open_flags = self.fuse_open(nodeid, flags, path=shown)
        if flags & os.O_TRUNC and not self.init.flags & FUSE_ATOMIC_O_TRUNC:
            attr = self.fuse_setattr(nodeid, fh=fh, size=0, path=shown)
        return nodeid, fh, open_flags, attr, shown

    def read_bytes(self, path: Any) -> bytes:
        """The whole file: READs of :attr:`max_read` bytes, all in flight together."""
        with self.open(path, "rb") as f:
            return f.readall()

    def read_text(self, path: Any, encoding: str = "utf-8", errors: str = "strict") -> str:
        """:meth:`read_bytes` decoded."""
        return self.read_bytes(path).decode(encoding, errors)

    def write_bytes(self, path: Any, data: Any) -> int:
        """Create or truncate the file and write bytes-like ``data``: WRITEs of
        :attr:`max_write` bytes, all in flight together.  Returns the bytes written.
        Raises an :class:`~virtq.devices.errors.FsOSError` with EIO when the daemon writes
        nothing (it would never finish), :class:`ArgumentError` for ``data`` that is not
        bytes-like, and the errors of :meth:`open` and of the WRITEs."""
        view = byte_view(data)
        with self.open(path, "wb") as f:
            done = 0
            while done < len(view):
                n = f.write(view[done:])
                if not n:
                    raise fs_error(errno.EIO, path=f.name, opcode="WRITE")
                done += n
        return done

    def write_text(self, path: Any, text: str, encoding: str = "utf-8") -> int:
        """:meth:`write_bytes` of ``text`` encoded.  Raises :class:`ArgumentError` for
        ``text`` that is not a str."""
        if not isinstance(text, str):
            raise ArgumentError("text", type(text).__name__, "must be a str")
        return self.write_bytes(path, text.encode(encoding))

    def mkdir(self, path: Any, mode: int = 0o777, *, parents: bool = False,
              exist_ok: bool = False) -> None:
        """Make a directory (``mode`` minus :attr:`umask`); ``parents`` makes missing
        parents too, ``exist_ok`` accepts an existing directory (as
        :meth:`pathlib.Path.mkdir`)."""
        held = self._held()
        try:
            try:
                parent, name, shown = self._resolve_parent(path, held)
            except FileNotFoundError:
                if not parents:
                    raise
                parent_path = posixpath.dirname(os.fsdecode(_path_bytes(path)).rstrip("/"))
                self.mkdir(parent_path, mode, parents=True, exist_ok=True)
                parent, name, shown = self._resolve_parent(path, held)
            try:
                held.add(self.fuse_mkdir(parent, name, mode, path=shown).nodeid)
            except FileExistsError:
                if not exist_ok or not self.is_dir(path):
                    raise
        finally:
            self._done(held)

    def rmdir(self, path: Any) -> None:
        """Remove an empty directory."""
        held = self._held()
        try:
            parent, name, shown = self._resolve_parent(path, held)
            held.add(self.fuse_lookup(parent, name, path=shown).nodeid)
            self.fuse_rmdir(parent, name, path=shown)
        finally:
            self._done(held)

    def remove(self, path: Any) -> None:
        """Remove a file or symlink (not a directory: :meth:`rmdir`)."""
        held = self._held()
        try:
            parent, name, shown = self._resolve_parent(path, held)
            held.add(self.fuse_lookup(parent, name, path=shown).nodeid)
            self.fuse_unlink(parent, name, path=shown)
        finally:
            self._done(held)

    unlink = remove

    def rename(self, src: Any, dst: Any) -> None:
        """Rename ``src`` to ``dst`` (replacing it, as :func:`os.replace`)."""
        held = self._held()
        try:
            sparent, sname, shown = self._resolve_parent(src, held)
            held.add(self.fuse_lookup(sparent, sname, path=shown).nodeid)
            dparent, dname, _ = self._resolve_parent(dst, held)
            self.fuse_rename(sparent, sname, dparent, dname, path=shown)
        finally:
            self._done(held)

    replace = rename

    def symlink(self, target: Any, path: Any) -> None:
        """Make ``path`` a symlink to ``target`` (as :func:`os.symlink`)."""
        held = self._held()
        try:
            parent, name, shown = self._resolve_parent(path, held)
            held.add(self.fuse_symlink(parent, name, _path_bytes(target), path=shown).nodeid)
        finally:
            self._done(held)

    def readlink(self, path: Any) -> str:
        """The target of the symlink ``path`` (a final symlink is not followed).  Raises
        an :class:`~virtq.devices.errors.FsOSError` with EINVAL when ``path`` is not a
        symlink (as :func:`os.readlink`), the errors resolving ``path`` and of the
        request."""
        held = self._held()
        try:
            nodeid, attr, shown = self._resolve(path, held, follow=False)
            if not attr.is_symlink:
                raise fs_error(errno.EINVAL, path=shown)
            return os.fsdecode(self.fuse_readlink(nodeid, path=shown))
        finally:
            self._done(held)

    def link(self, src: Any, dst: Any) -> None:
        """Make ``dst`` a hard link to ``src`` (as :func:`os.link`, not following a final
        symlink)."""
        held = self._held()
        try:
            nodeid, attr, _ = self._resolve(src, held, follow=False)
            parent, name, shown = self._resolve_parent(dst, held)
            held.add(self.fuse_link(nodeid, parent, name, file_type=stat.S_IFMT(attr.mode),
                                    path=shown).nodeid)
        finally:
            self._done(held)

    def _setattr_path(self, path: Any, *, follow: bool = True, **changes: Any
                      ) -> os.stat_result:
        held = self._held()
        try:
            nodeid, _attr, shown = self._resolve(path, held, follow=follow)
            return self.fuse_setattr(nodeid, path=shown, **changes).to_stat_result()
        finally:
            self._done(held)

    def truncate(self, path: Any, length: int) -> None:
        """Cut or extend the file to ``length`` bytes (SETATTR size)."""
        self._setattr_path(path, size=length)

    def chmod(self, path: Any, mode: int) -> None:
        """Set the permission bits (SETATTR mode)."""
        self._setattr_path(path, mode=mode)

    def utime(self, path: Any, times: tuple[float, float] | None = None, *,
              ns: tuple[int, int] | None = None) -> None:
        """Set access and modification times, as :func:`os.utime` (seconds in ``times``
        or nanoseconds in ``ns``; neither: now) with SETATTR.  Raises
        :class:`ArgumentError` when both are given or a time is negative or out of range,
        and the errors resolving ``path`` and of the request."""
        if times is not None and ns is not None:
            raise ArgumentError("times", times, "not both times and ns")
        if ns is None:
            if times is None:
                now = time.time_ns()
                ns = (now, now)
            else:
                if not (isinstance(times, tuple) and len(times) == 2 and all(
                        isinstance(t, int | float) and not isinstance(t, bool)
                        and math.isfinite(t) for t in times)):
                    raise ArgumentError("times", times, "must be (atime, mtime): two finite "
                                        "numbers of seconds")
                try:
                    ns = (int(times[0] * 1e9), int(times[1] * 1e9))
                except OverflowError:  # finite seconds whose nanoseconds are not (1e300)
                    raise ArgumentError("times", times, "out of range") from None
        elif not (isinstance(ns, tuple) and len(ns) == 2 and all(
                isinstance(t, int) and not isinstance(t, bool) for t in ns)):
            raise ArgumentError("ns", ns, "must be (atime_ns, mtime_ns): two ints")
        self._setattr_path(path, atime_ns=ns[0], mtime_ns=ns[1])

    def statvfs(self, path: Any = ".") -> os.statvfs_result:
        """:func:`os.statvfs` through the daemon (FUSE_STATFS)."""
        held = self._held()
        try:
            return self.fuse_statfs(self._resolve(path, held)[0])
        finally:
            self._done(held)

    # -- teardown and recovery --------------------------------------------------------------

    def _release_views(self) -> None:
        for q in self.queues:
            q.close()
        if self._mem is not None:
            self._mem.release()
            self._mem = None

    def _goodbye(self) -> None:
        """The end of a healthy session: close the open files, forget every node still
        counted, wait until the daemon has taken the forgets, FUSE_DESTROY."""
        for f in list(self._files.values()):
            f.close()
        for nodeid, n in self._lookups.items():
            self._forget[nodeid] = n
        self.flush_forgets()
        hiprio = [r for r in self.queues[HIPRIO_QUEUE].in_flight_tokens() if not r.done]
        self.wait(hiprio, timeout=self.timeout)
        self._call(_OP.DESTROY, 0)

    def close(self) -> None:
        """End the FUSE session (open files released, every node forgotten,
        FUSE_DESTROY) and close the transport (and with it the queues and memory).  A
        session that cannot end cleanly (the daemon died, misbehaves or does not answer)
        is just dropped.  Requests still in flight fail with
        :class:`~virtq.errors.QueueStateError`.  :class:`~virtq.errors.RegionBusyError`
        if views of the device's memory (:meth:`DmaBuffer.view`) are alive: release them
        and call ``close()`` again."""
        if not self._closed:
            if self._refused is None:
                with contextlib.suppress(VirtqError, OSError):  # it is over either way
                    self._goodbye()
            self._closed = True
            self._refused = ("FsDevice is closed", None)
            err = QueueStateError("FsDevice was closed with the request in flight")
            for req in self._in_flight():
                self._fail(req, err, free=False)
            for f in list(self._files.values()):
                f._drop()
            self._files.clear()
            self._lookups.clear()
            self._forget.clear()
            self._quarantine.clear()
            self._release_views()
        if not self._transport_closed:
            self.transport.close()
            self._transport_closed = True

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reconnect(self, path: str | os.PathLike[str] | None = None, *,
                  timeout: float | None = None) -> int:
        """vhost-user only: connect to a new daemon after the old one died (or to recover
        broken queues) and start a new FUSE session.  Requests in flight fail with the
        disconnect error (if not already); the old session's node ids, lookups and open
        files are gone (an :class:`~virtq.devices.fsfile.FsFile` of it raises ESTALE).
        Returns how many requests were lost.  Raises
        :class:`~virtq.errors.QueueStateError` (closed, or a transport that cannot
        reconnect) and the connection's and FUSE_INIT's errors -- after which the device
        stays refused."""
        self._check_open()
        t = self.transport
        if not isinstance(t, Reconnectable):
            raise QueueStateError(f"{type(t).__name__} cannot reconnect")
        try:
            lost = t.reconnect(path, timeout=timeout)
        except ArgumentError:
            # A bad path or timeout is refused before the connection is touched: the
            # device keeps working as it was.
            raise
        except BaseException as exc:
            self._refused = (f"reconnect failed ({type(exc).__name__}: {exc})", exc)
            raise
        count = 0
        gone = DeviceError("the back-end went away with the request in flight")
        for tokens in lost.values():
            for req in tokens:
                if not req.done:
                    self._fail(req, gone, free=False)
                    count += 1
        self._files.clear()  # stale now: they raise ESTALE and close without a word
        self._lookups.clear()
        self._forget.clear()
        self._quarantine.clear()
        # The rings were reset: no buffer is the device's any more.
        self._free_chunks = list(range(len(self._chunks) - 1, -1, -1))
        if self.poll_mode:
            self._waiter.disarm()
        self._refused = None
        try:
            self.init = self._fuse_init()
        except BaseException as exc:
            self._refused = (f"FUSE_INIT failed after reconnect ({type(exc).__name__}: "
                             f"{exc})", exc)
            raise
        return count

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<FsDevice tag={self.config.tag!r} FUSE {self.init.major}."
                f"{self.init.minor} {state}>" if hasattr(self, "init") else
                f"<FsDevice {state}>")


_MODES = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
          "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL}


def _mode_flags(mode: str) -> int:
    """open() flags for a binary ``mode`` ("rb", "r+b", "wb", "ab", "xb", ...)."""
    if not isinstance(mode, str) or "b" not in mode or len(set(mode)) != len(mode) \
            or set(mode) - set("rwaxb+") or sum(c in "rwax" for c in mode) != 1:
        raise ArgumentError("mode", mode, "a binary mode: one of r, w, a, x, optionally +, "
                            "and b (FsFile is an io.RawIOBase)")
    flags = _MODES[next(c for c in mode if c in "rwax")]
    if "+" in mode:
        flags = flags & ~(os.O_WRONLY | os.O_RDONLY) | os.O_RDWR
    return flags


__all__ = ["FsConfig", "FsDevice", "FsFile", "FsOSError", "FsRequest"]
