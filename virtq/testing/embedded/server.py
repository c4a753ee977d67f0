"""The back-end itself: the vhost-user message handlers, the virtio-blk data path, the
serving thread, and :class:`Faults`.  Overview in :mod:`virtq.testing.embedded`."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Self

from virtq._sys.fence import full_fence
from virtq.abi import (
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTQ_DESC_F_INDIRECT,
)
from virtq.abi.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from virtq.abi.net import VIRTIO_NET_F_MRG_RXBUF
from virtq.errors import ArgumentError, VirtqError
from virtq.layout import MAX_SPLIT_QUEUE_SIZE, SplitLayout, avail_nbytes, is_power_of_two
from virtq.layout.split import DESC_SIZE, used_nbytes
from virtq.memory import PAGE_SIZE, MemfdRegion, MemoryRegion
from virtq.testing.device import DeviceQueue, DriverProtocolError, Segment
from virtq.testing.embedded import devices
from virtq.testing.embedded.inflight import InflightBuffer, InflightQueue, resume_index
from virtq.testing.runners import BackendError
from virtq.transport.vhost_user import protocol as P
from virtq.types import Offset

__all__ = [
    "BlkRecord",
    "Faults",
    "FrontendProtocolError",
    "VhostUserBlkBackend",
]

log = logging.getLogger(__name__)

DEVICE_ID = b"virtq-embedded"
SEG_MAX = 126  # what QEMU reports for a 128-entry queue: queue size minus header and status
#: Feature bits offered (GET_FEATURES); VIRTIO_BLK_F_RO and _MQ are added when they apply.
BASE_FEATURES = (
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_INDIRECT_DESC
    | 1 << P.VHOST_USER_F_PROTOCOL_FEATURES
    | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH
)
PROTOCOL_FEATURES = (
    1 << P.ProtocolFeature.MQ | 1 << P.ProtocolFeature.REPLY_ACK
    | 1 << P.ProtocolFeature.CONFIG | 1 << P.ProtocolFeature.STATUS
)
_BLK_HEADER = struct.Struct("<IIQ")  # type, reserved, sector (VIRTIO 1.2 §5.2.6)
_MAX_PAYLOAD = 4096  # larger than any message this back-end accepts (a full memory table)
_MESSAGE_TIMEOUT = 2.0  # a front-end that stops half-way through a message is dropped
_GARBAGE_CODE = 0xDEAD  # "no such request"
_EFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK
_CODES = frozenset(r.value for r in P.Request)

GarbageKind = Literal["code", "flags", "size"]


class FrontendProtocolError(VirtqError):
    """The front-end sent something this back-end refuses; the connection was closed
    (recorded in :attr:`VhostUserBlkBackend.errors`, never raised to the front-end)."""


# -- fault injection -------------------------------------------------------------------------


def _request(value: P.Request | str | int | None, name: str) -> P.Request | None:
    if value is None or isinstance(value, P.Request):
        return value
    try:
        return P.Request[value] if isinstance(value, str) else P.Request(value)
    except (KeyError, ValueError):
        raise ArgumentError(name, value, "must name a vhost-user request, e.g. "
                            "'SET_MEM_TABLE'") from None


@dataclass(frozen=True)
class Faults:
    """What the back-end does wrong, on purpose.  Requests are named like
    :class:`~virtq.transport.vhost_user.protocol.Request` members (``"GET_CONFIG"``).

    * ``drop_after``: close the connection once this many requests (per connection) have
      been popped from the rings, before completing any of the current batch.
    * ``nack``: answer that request with a non-zero REPLY_ACK status, without acting on it.
      GET_CONFIG is answered with an empty payload (its way of failing); other requests
      that have a reply of their own cannot be NACKed: the connection is closed instead.
    * ``garbage_reply``: answer that request with a malformed reply: ``garbage_kind``
      "code" (a request code that does not exist), "flags" (the REPLY flag missing) or
      "size" (a 3-byte payload, which no reply has).
    * ``never_answer``: read that request and stay silent (a hung back-end).
    * ``out_of_order``: complete each batch of popped requests in reverse order.
    * ``corrupt_used``: complete each batch's first request with a head id no driver owns.
    * ``queue``: ``out_of_order`` and ``corrupt_used`` apply to this queue only (None:
      every queue).
    * ``sessions``: ``drop_after`` applies to the first this-many connections only (None:
      to every one) -- a back-end that crashes once, then works.

    Conformance faults -- each breaks one rule ``virtq check`` checks (the test suite
    asserts which checks fail for each):

    * ``write_past_buffer``: write a byte just past the status byte (VIRTIO 1.2 §2.7.5).
    * ``write_readable``: scribble on the request header, a device-readable buffer (§2.7.5.1).
    * ``write_desc_table``: rewrite the head descriptor's ``len`` after use (§2.7.5.1).
    * ``bad_used_len``: report 512 bytes more than the chain can hold (§2.7.8.2).
    * ``unwritten_len``: a read in several data buffers leaves the last one unwritten but
      counts it in used.len (§2.7.8.2).
    * ``duplicate_used``: in a batch of 8 or more, complete the first head twice (§2.7.8).
    * ``used_flags_garbage``: set bit 15 of used.flags (§2.7.10.2).
    * ``no_notify`` / ``spurious_notify``: never / always signal the call eventfd (§2.7.7.2).
    * ``vring_base_off_by_one``: GET_VRING_BASE answers one more than it processed.
    * ``wrap_bug``: stop serving a ring once its avail index wrapped to 0.
    * ``indirect_head_only``: follow VIRTQ_DESC_F_INDIRECT only in a head descriptor
      (§2.7.5.3.2 requires it after direct ones too), as libvhost-user does.
    * ``header_split_refused``: answer IOERR unless the request header is in one
      descriptor (§2.7.4.1).
    * ``process_disabled``: serve rings that SET_VRING_ENABLE disabled (vhost-user.rst,
      "Ring states").
    * ``accept_unoffered``: accept unoffered feature bits and keep FEATURES_OK (§2.2.2).
    * ``no_version_1``: do not offer VIRTIO_F_VERSION_1 (§6.2).
    * ``wrong_capacity``: report 8 sectors more than the image has (§5.2.4).
    * ``stale_data``: serve reads from a snapshot of the image taken when the front-end
      connected (a later write is not seen).
    * ``lost_write``: keep writes in a per-connection cache that FLUSH does not write out;
      reads see it, the image and the next connection do not (§5.2.6.2).
    * ``long_id``: GET_ID writes 24 bytes into the driver's 20-byte buffer.
    * ``no_ioerr``: reads past the capacity succeed (zeroes) instead of IOERR (§5.2.6).
    * ``unsupp_as_ok``: unknown request types succeed instead of UNSUPP (§5.2.6).
    * ``exit_on_disconnect``: serve one front-end, then stop listening (a process exits).
    * ``crash_on_indirect``: abort (SIGABRT) on an indirect head descriptor.  Kills the
      whole process: use it with :class:`BackendProcess` only.
    * ``spin_on_loop``: hang forever on a descriptor chain that loops (instead of hanging
      up).  Use it with :class:`BackendProcess` only.

    For the other device types (``device=``): ``rng_no_bytes`` (used.len 0, §5.4.6.2);
    ``net_corrupt_frame`` (flip a byte of each looped frame); ``net_bad_header``
    (num_buffers 0 and NEEDS_CSUM in the receive header, §5.1.6.4.1); ``mrg_wrong_count``
    (num_buffers one too many with MRG_RXBUF); ``fuse_init_major`` (FUSE_INIT answers
    major 8); ``fuse_root_not_dir`` (GETATTR says the root is a file);
    ``fuse_lookup_any`` (LOOKUP finds names that do not exist); ``fs_zero_queues``
    (num_request_queues 0 in the configuration space, §5.11.4).

    Replace :attr:`VhostUserBlkBackend.faults` at any time; the back-end reads it for
    every message and every batch.
    """

    drop_after: int | None = None
    nack: P.Request | str | None = None
    garbage_reply: P.Request | str | None = None
    garbage_kind: GarbageKind = "code"
    never_answer: P.Request | str | None = None
    out_of_order: bool = False
    corrupt_used: bool = False
    queue: int | None = None
    sessions: int | None = None
    write_past_buffer: bool = False
    write_readable: bool = False
    write_desc_table: bool = False
    bad_used_len: bool = False
    unwritten_len: bool = False
    duplicate_used: bool = False
    used_flags_garbage: bool = False
    no_notify: bool = False
    spurious_notify: bool = False
    vring_base_off_by_one: bool = False
    wrap_bug: bool = False
    indirect_head_only: bool = False
    header_split_refused: bool = False
    process_disabled: bool = False
    accept_unoffered: bool = False
    no_version_1: bool = False
    wrong_capacity: bool = False
    stale_data: bool = False
    lost_write: bool = False
    long_id: bool = False
    no_ioerr: bool = False
    unsupp_as_ok: bool = False
    exit_on_disconnect: bool = False
    crash_on_indirect: bool = False
    spin_on_loop: bool = False
    rng_no_bytes: bool = False
    net_corrupt_frame: bool = False
    net_bad_header: bool = False
    mrg_wrong_count: bool = False
    fuse_init_major: bool = False
    fuse_root_not_dir: bool = False
    fuse_lookup_any: bool = False
    fs_zero_queues: bool = False

    def __post_init__(self) -> None:
        for name in ("nack", "garbage_reply", "never_answer"):
            object.__setattr__(self, name, _request(getattr(self, name), name))
        if self.drop_after is not None and self.drop_after < 0:
            raise ArgumentError("drop_after", self.drop_after, "must be >= 0")
        for name in ("queue", "sessions"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ArgumentError(name, value, "must be None or an int >= 0")
        if self.garbage_kind not in ("code", "flags", "size"):
            raise ArgumentError("garbage_kind", self.garbage_kind,
                                "must be 'code', 'flags' or 'size'")

    @classmethod
    def coerce(cls, value: Faults | Mapping[str, object] | None) -> Faults:
        """``value`` as :class:`Faults`: None is no fault, a mapping gives the fields by name.
        Raises :class:`~virtq.errors.ArgumentError` for a bad value (``TypeError`` for a name
        that is no field)."""
        if value is None:
            return cls()
        if isinstance(value, Faults):
            return value
        return cls(**value)  # type: ignore[arg-type]

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """The command-line form: ``"drop_after=3,out_of_order"`` (bare names are True).  Raises
        :class:`~virtq.errors.ArgumentError` for an unknown fault or a bad value."""
        kwargs: dict[str, object] = {}
        known = {f.name for f in fields(cls)}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = item.partition("=")
            if key not in known:
                raise ArgumentError("faults", item, f"unknown fault; known: {sorted(known)}")
            if key in ("drop_after", "queue", "sessions"):
                if not value.isdigit():
                    raise ArgumentError("faults", item, f"{key} takes a number")
                kwargs[key] = int(value)
            elif isinstance(cls.__dataclass_fields__[key].default, bool):
                kwargs[key] = not sep or value.lower() in ("1", "true", "yes", "on")
            else:
                kwargs[key] = value
        return cls(**kwargs)  # type: ignore[arg-type]

    def to_spec(self) -> str:
        """The inverse of :meth:`parse`."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if isinstance(value, bool):
                out.append(f.name)
            else:
                out.append(f"{f.name}={value.name if isinstance(value, P.Request) else value}")
        return ",".join(out)


@dataclass(frozen=True, slots=True)
class BlkRecord:
    """One completed virtio-blk request, in the order the back-end completed them."""

    queue: int
    kind: int  # VIRTIO_BLK_T_*
    sector: int
    nbytes: int
    status: int  # VIRTIO_BLK_S_*


# -- per-connection state ------------------------------------------------------------------


class _EndSession(Exception):
    """Close the connection without recording an error (EOF, or a fault said so)."""


@dataclass(eq=False)
class _MemRegion:
    """One SET_MEM_TABLE entry, mapped (vhost-user.rst, "Memory region description")."""

    gpa: int  # guest_phys_addr: the space descriptor addresses live in
    uva: int  # userspace_addr: the space SET_VRING_ADDR addresses live in
    region: MemfdRegion


@dataclass(eq=False)
class _Ring:
    """What the front-end told us about one vring; the DeviceQueue is built lazily from it
    (and rebuilt after a new memory table, keeping its place in the ring)."""

    index: int
    num: int = 0
    addrs: tuple[int, int, int] | None = None  # desc, avail, used (front-end addresses)
    base: int = 0  # next avail index to process (SET_VRING_BASE)
    kick: int = -1
    call: int = -1
    enabled: bool = False
    dev: DeviceQueue | None = None
    #: Inflight tracking: whether this session looked at the ring's inflight region yet,
    #: and the heads to resume from it before taking new chains.
    recovered: bool = False
    resubmit: list[int] = field(default_factory=list)

    def drop_queue(self) -> None:
        if self.dev is not None:
            self.base = self.dev.last_avail
            self.dev.close()
            self.dev = None

    def set_fd(self, which: Literal["kick", "call"], fd: int) -> None:
        old = getattr(self, which)
        if old >= 0:
            os.close(old)
        setattr(self, which, fd)

    def close(self) -> None:
        self.drop_queue()
        self.set_fd("kick", -1)
        self.set_fd("call", -1)


def _take(segments: Sequence[Segment], n: int) -> tuple[list[Segment], list[Segment]]:
    """Split a scatter list after its first ``n`` bytes (a buffer may straddle the cut)."""
    head: list[Segment] = []
    tail: list[Segment] = []
    for s in segments:
        if n >= s.length:
            head.append(s)
            n -= s.length
        elif n > 0:
            head.append(Segment(s.iova, n, s.writable))
            tail.append(Segment(s.iova + n, s.length - n, s.writable))
            n = 0
        else:
            tail.append(s)
    return head, tail


@contextlib.contextmanager
def _views(dev: DeviceQueue, segments: Sequence[Segment]) -> Iterator[list[memoryview]]:
    """Views of guest buffers for preadv/pwritev, released after use: a view left alive
    would stop the mapping from being unmapped."""
    views = [dev.view(s.iova, s.length) for s in segments if s.length]
    try:
        yield views
    finally:
        for v in views:
            v.release()


class _Session:
    """One front-end connection: its memory table, its rings, its negotiated features."""

    def __init__(self, backend: VhostUserBlkBackend, conn: socket.socket) -> None:
        self.backend = backend
        self.conn = conn
        self.number = backend.connections  # 1 for the first connection
        self.features = 0
        self.protocol_features = 0
        self.mem: list[_MemRegion] = []
        self.rings = [_Ring(i) for i in range(backend.num_queues)]
        self.popped = 0
        #: The inflight buffer (GET_INFLIGHT_FD made it, or SET_INFLIGHT_FD gave it).
        self.inflight: InflightBuffer | None = None
        self.status = 0
        #: Faults ``stale_data`` / ``lost_write``: the image as this connection found it,
        #: and the writes FLUSH never wrote out.
        self._snapshot: bytes | None = None
        self._cache: dict[int, bytes] = {}
        if backend.faults.stale_data:
            self._snapshot = os.pread(backend._image_fd, backend.capacity * SECTOR_SIZE, 0)
        self._fds: list[int] = []  # received with the current message, not yet taken
        self._recheck: set[int] = set()  # rings to look at after the current message
        self._handlers: dict[P.Request, Callable[[bytes], bytes | None]] = {
            P.Request.GET_FEATURES: self._get_features,
            P.Request.SET_FEATURES: self._set_features,
            P.Request.SET_OWNER: lambda _: None,
            P.Request.GET_PROTOCOL_FEATURES: lambda _: P.U64.pack(self.offered_protocol),
            P.Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            P.Request.GET_QUEUE_NUM: lambda _: P.U64.pack(backend.num_queues),
            P.Request.SET_MEM_TABLE: self._set_mem_table,
            P.Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            P.Request.ADD_MEM_REG: self._add_mem_reg,
            P.Request.REM_MEM_REG: self._rem_mem_reg,
            P.Request.SET_VRING_NUM: self._set_vring_num,
            P.Request.SET_VRING_ADDR: self._set_vring_addr,
            P.Request.SET_VRING_BASE: self._set_vring_base,
            P.Request.GET_VRING_BASE: self._get_vring_base,
            P.Request.SET_VRING_KICK: lambda p: self._set_vring_fd(p, "kick"),
            P.Request.SET_VRING_CALL: lambda p: self._set_vring_fd(p, "call"),
            P.Request.SET_VRING_ERR: self._set_vring_err,
            P.Request.SET_VRING_ENABLE: self._set_vring_enable,
            P.Request.GET_CONFIG: self._get_config,
            P.Request.RESET_DEVICE: self._reset_device,
            P.Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            P.Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            P.Request.SET_STATUS: self._set_status,
            P.Request.GET_STATUS: lambda _: P.U64.pack(self.status),
        }

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until the front-end hangs up, a fault ends the session, or stop()."""
        wake = self.backend._wake
        while True:
            poller = select.poll()
            poller.register(self.conn, select.POLLIN)
            poller.register(wake, select.POLLIN)
            kicks = {r.kick: r for r in self.rings if r.kick >= 0}
            for fd in kicks:
                poller.register(fd, select.POLLIN)
            events = dict(poller.poll())
            if wake in events:
                return
            # Kicks first: handling a message may close a kick fd and its number be reused.
            for fd, ring in kicks.items():
                if fd in events:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)  # one read clears the counter
                    self._process(ring)
            if self.conn.fileno() in events:
                self._handle_message()
                while self._recheck:
                    self._process(self.rings[self._recheck.pop()])

    def close(self) -> None:
        for ring in self.rings:
            ring.close()  # queues first: their views pin the mappings
        self._set_inflight(None)
        self._unmap()
        self._close_fds()
        self.conn.close()

    def _unmap(self) -> None:
        for m in self.mem:
            m.region.close()
        self.mem = []

    def _close_fds(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    # -- messages (vhost-user.rst, "Message format") ------------------------------------------

    def _recv_exact(self, n: int) -> bytes:
        """``n`` bytes of the stream; file descriptors that ride along (SCM_RIGHTS, attached
        to the message's first byte) are collected in ``self._fds``."""
        buf = b""
        while len(buf) < n:
            try:
                data, fds, flags, _ = socket.recv_fds(
                    self.conn, n - len(buf), P.MAX_MEM_REGIONS, socket.MSG_CMSG_CLOEXEC)
            except ConnectionResetError:
                raise _EndSession("the front-end reset the connection") from None
            except TimeoutError:
                raise FrontendProtocolError(f"the front-end stalled inside a message "
                                            f"({len(buf)} of {n} bytes)") from None
            self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise FrontendProtocolError("a message carried more fds than it may")
            if not data:
                if buf:
                    raise FrontendProtocolError(f"connection closed inside a message "
                                                f"({len(buf)} of {n} bytes)")
                raise _EndSession("the front-end closed the connection")
            buf += data
        return buf

    def _reply(self, code: int, payload: bytes, flags: int = P.VERSION | P.FLAG_REPLY,
               fds: Sequence[int] = ()) -> None:
        data = P.pack_header(code, flags, len(payload)) + payload
        try:
            if fds:
                # The fd rides on the first byte; the rest (if the socket took less) after.
                sent = socket.send_fds(self.conn, [data], list(fds))
                self.conn.sendall(data[sent:])
            else:
                self.conn.sendall(data)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
            raise _EndSession(f"cannot reply: {exc}") from None

    def _handle_message(self) -> None:
        code, flags, size = P.HEADER.unpack(self._recv_exact(P.HEADER.size))
        try:
            if flags & P.FLAG_VERSION_MASK != P.VERSION or size > _MAX_PAYLOAD:
                raise FrontendProtocolError(
                    f"bad header: request={code} flags={flags:#x} size={size}")
            payload = self._recv_exact(size) if size else b""
            self._dispatch(code, flags, payload)
        finally:
            self._close_fds()  # whatever the handler did not take

    def _dispatch(self, code: int, flags: int, payload: bytes) -> None:
        name = P.request_name(code)
        req = P.Request(code) if code in _CODES else None
        need_reply = bool(flags & P.FLAG_NEED_REPLY)
        faults = self.backend.faults
        if req is not None and req == faults.never_answer:
            return  # read it, do nothing, say nothing: the front-end has to time out
        if req is not None and req == faults.nack:
            self._nack(req, need_reply)
            return
        if req is not None and req == faults.garbage_reply:
            self._send_garbage(req, faults.garbage_kind)
            return
        handler = self._handlers.get(req) if req is not None else None
        try:
            if handler is None:
                raise FrontendProtocolError(f"{name} is not supported")
            reply = handler(payload)
        except FrontendProtocolError:
            # vhost-user.rst, "REPLY_ACK": with NEED_REPLY a failure is a non-zero status;
            # without it libvhost-user's only answer to a bad request is to hang up.
            if need_reply and req not in P.HAS_REPLY:
                self._reply(code, P.U64.pack(1))
                return
            raise
        if reply is not None:
            self._reply(code, reply)
        elif need_reply and req not in P.HAS_REPLY:
            self._reply(code, P.U64.pack(0))

    def _nack(self, req: P.Request, need_reply: bool) -> None:
        if need_reply and req not in P.HAS_REPLY:
            self._reply(req, P.U64.pack(1))
        elif req == P.Request.GET_CONFIG:
            self._reply(req, b"")  # vhost-user.rst, GET_CONFIG: "zero length payload" = error
        else:
            raise _EndSession(f"fault: {req.name} cannot be NACKed; hanging up instead")

    def _send_garbage(self, req: P.Request, kind: GarbageKind) -> None:
        if kind == "code":
            self._reply(_GARBAGE_CODE, bytes(8))
        elif kind == "flags":
            self._reply(req, bytes(8), flags=P.VERSION)  # no REPLY bit
        else:
            self._reply(req, bytes(3))  # no reply is 3 bytes long

    # -- payload helpers --------------------------------------------------------------------

    @staticmethod
    def _unpack(fmt: struct.Struct, payload: bytes, name: str) -> tuple[int, ...]:
        if len(payload) != fmt.size:
            raise FrontendProtocolError(f"{name}: payload of {len(payload)} bytes, "
                                        f"expected {fmt.size}")
        return fmt.unpack(payload)

    def _ring(self, index: int, name: str) -> _Ring:
        if not 0 <= index < len(self.rings):
            raise FrontendProtocolError(f"{name}: no vring {index} (the device has "
                                        f"{len(self.rings)})")
        return self.rings[index]

    def _take_fd(self, name: str) -> int:
        if len(self._fds) != 1:
            raise FrontendProtocolError(f"{name}: expected 1 fd, got {len(self._fds)}")
        return self._fds.pop()

    # -- handlers (vhost-user.rst, "Front-end message types") --------------------------------

    @property
    def offered_features(self) -> int:
        b = self.backend
        if b.device != "blk":
            offered = devices.FEATURES[b.device]
            if b.faults.no_version_1:
                offered &= ~(1 << VIRTIO_F_VERSION_1)
            return offered
        offered = (BASE_FEATURES | (1 << VIRTIO_BLK_F_RO if b.read_only else 0)
                   | (1 << VIRTIO_BLK_F_MQ if b.num_queues > 1 else 0))
        if b.faults.no_version_1:
            offered &= ~(1 << VIRTIO_F_VERSION_1)
        return offered

    def _get_features(self, payload: bytes) -> bytes:
        return P.U64.pack(self.offered_features)

    def _set_features(self, payload: bytes) -> None:
        (features,) = self._unpack(P.U64, payload, "SET_FEATURES")
        if features & ~self.offered_features and not self.backend.faults.accept_unoffered:
            raise FrontendProtocolError(
                f"SET_FEATURES: {features & ~self.offered_features:#x} were never offered")
        self.features = features
        if not features >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            # vhost-user.rst, "Ring states": without VHOST_USER_F_PROTOCOL_FEATURES rings
            # are enabled as soon as they start.
            for ring in self.rings:
                ring.enabled = True
        for ring in self.rings:
            ring.drop_queue()  # EVENT_IDX may have changed

    def _set_status(self, payload: bytes) -> None:
        (status,) = self._unpack(P.U64, payload, "SET_STATUS")
        # VIRTIO 1.2 §2.2.2: a device that cannot accept the features the driver chose
        # MUST NOT set FEATURES_OK.
        if self.features & ~self.offered_features and \
                not self.backend.faults.accept_unoffered:
            status &= ~VIRTIO_CONFIG_S_FEATURES_OK
        self.status = status & 0xFF

    def _set_protocol_features(self, payload: bytes) -> None:
        (features,) = self._unpack(P.U64, payload, "SET_PROTOCOL_FEATURES")
        if features & ~self.offered_protocol:
            raise FrontendProtocolError(f"SET_PROTOCOL_FEATURES: {features:#x} not offered")
        self.protocol_features = features

    @property
    def offered_protocol(self) -> int:
        slots = self.backend.mem_slots is not None
        inflight = self.backend.inflight
        return (PROTOCOL_FEATURES
                | (1 << P.ProtocolFeature.CONFIGURE_MEM_SLOTS if slots else 0)
                | (1 << P.ProtocolFeature.INFLIGHT_SHMFD if inflight else 0))

    # -- inflight I/O tracking (vhost-user.rst, "Inflight I/O tracking") -------------------

    def _inflight_payload(self, payload: bytes, name: str) -> tuple[int, int, int, int]:
        if not self.protocol_features >> P.ProtocolFeature.INFLIGHT_SHMFD & 1:
            raise FrontendProtocolError(f"{name}: INFLIGHT_SHMFD was not negotiated")
        size, offset, num_queues, queue_size = self._unpack(P.INFLIGHT, payload, name)
        if not 1 <= num_queues <= len(self.rings) or not is_power_of_two(queue_size) \
                or queue_size > MAX_SPLIT_QUEUE_SIZE:
            raise FrontendProtocolError(f"{name}: {num_queues} queues of {queue_size} "
                                        f"entries (the device has {len(self.rings)} queues)")
        return size, offset, num_queues, queue_size

    def _set_inflight(self, buf: InflightBuffer | None) -> None:
        for ring in self.rings:
            ring.drop_queue()  # their views of the old buffer's queues go with it
            ring.recovered = False
            ring.resubmit = []
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = buf

    def _get_inflight_fd(self, payload: bytes) -> None:
        # A fresh buffer with nothing in flight, which the front-end keeps for the next
        # back-end; the reply carries its fd.
        _, _, num_queues, queue_size = self._inflight_payload(payload, "GET_INFLIGHT_FD")
        buf = InflightBuffer.create(num_queues, queue_size)
        self._set_inflight(buf)
        fd = buf.region.fd
        assert fd is not None
        self._reply(P.Request.GET_INFLIGHT_FD,
                    P.INFLIGHT.pack(buf.region.nbytes, 0, num_queues, queue_size), fds=[fd])

    def _set_inflight_fd(self, payload: bytes) -> None:
        size, offset, num_queues, queue_size = self._inflight_payload(payload,
                                                                      "SET_INFLIGHT_FD")
        fd = self._take_fd("SET_INFLIGHT_FD")
        try:
            if size < InflightBuffer.nbytes(num_queues, queue_size):
                raise FrontendProtocolError(f"SET_INFLIGHT_FD: {size} bytes cannot hold "
                                            f"{num_queues} queues of {queue_size}")
            try:
                region = MemfdRegion.attach(fd, size, offset=offset)
            except (OSError, ArgumentError) as exc:
                raise FrontendProtocolError(f"SET_INFLIGHT_FD: cannot map: {exc}") from None
        finally:
            os.close(fd)  # attach() mapped its own duplicate
        self._set_inflight(InflightBuffer(region, num_queues, queue_size))

    def _set_mem_table(self, payload: bytes) -> None:
        if len(payload) < P.MEM_TABLE_HEADER.size:
            raise FrontendProtocolError("SET_MEM_TABLE: short payload")
        nregions, _ = P.MEM_TABLE_HEADER.unpack_from(payload)
        expected = P.MEM_TABLE_HEADER.size + nregions * P.MEM_REGION.size
        if not 1 <= nregions <= P.MAX_MEM_REGIONS or len(payload) != expected:
            raise FrontendProtocolError(
                f"SET_MEM_TABLE: {nregions} regions in {len(payload)} bytes")
        if len(self._fds) != nregions:  # one fd per region, in order
            raise FrontendProtocolError(
                f"SET_MEM_TABLE: {nregions} regions but {len(self._fds)} fds")
        new: list[_MemRegion] = []
        try:
            for i, fd in enumerate(self._fds):
                gpa, size, uva, offset = P.MEM_REGION.unpack_from(
                    payload, P.MEM_TABLE_HEADER.size + i * P.MEM_REGION.size)
                new.append(_MemRegion(gpa, uva, MemfdRegion.attach(fd, size, offset=offset)))
        except (OSError, ArgumentError) as exc:
            for m in new:
                m.region.close()
            raise FrontendProtocolError(f"SET_MEM_TABLE: cannot map region: {exc}") from None
        # A new table replaces the old one (vhost-user.rst, SET_MEM_TABLE).
        self._new_memory()
        self._unmap()
        self.mem = new

    def _new_memory(self) -> None:
        """Rings are re-translated from their front-end addresses on their next use: a
        DeviceQueue knows the regions that existed when it was built."""
        for ring in self.rings:
            ring.drop_queue()
            self._recheck.add(ring.index)

    def _mem_slots(self, name: str) -> int:
        slots = self.backend.mem_slots
        if slots is None or not self.protocol_features >> P.ProtocolFeature.CONFIGURE_MEM_SLOTS & 1:
            raise FrontendProtocolError(f"{name}: CONFIGURE_MEM_SLOTS was not negotiated")
        return slots

    def _get_max_mem_slots(self, payload: bytes) -> bytes:
        return P.U64.pack(self._mem_slots("GET_MAX_MEM_SLOTS"))

    def _add_mem_reg(self, payload: bytes) -> None:
        # vhost-user.rst, ADD_MEM_REG: a single memory region description, exactly one fd.
        slots = self._mem_slots("ADD_MEM_REG")
        _, gpa, size, uva, offset = self._unpack(P.SINGLE_MEM_REGION, payload, "ADD_MEM_REG")
        fd = self._take_fd("ADD_MEM_REG")
        try:
            if len(self.mem) >= slots:
                raise FrontendProtocolError(f"ADD_MEM_REG: all {slots} memory slots are used")
            for m in self.mem:
                if m.gpa < gpa + size and gpa < m.gpa + m.region.nbytes:
                    raise FrontendProtocolError(
                        f"ADD_MEM_REG: [{gpa:#x}, +{size:#x}) overlaps a region at {m.gpa:#x}")
            try:
                region = MemfdRegion.attach(fd, size, offset=offset)
            except (OSError, ArgumentError) as exc:
                raise FrontendProtocolError(f"ADD_MEM_REG: cannot map region: {exc}") from None
        finally:
            os.close(fd)  # attach() mapped its own duplicate
        self.mem.append(_MemRegion(gpa, uva, region))
        self._new_memory()

    def _rem_mem_reg(self, payload: bytes) -> None:
        # vhost-user.rst, REM_MEM_REG: the region is named by guest address, user address
        # and size; an fd may come along (QEMU sends one) and is closed unused.
        self._mem_slots("REM_MEM_REG")
        _, gpa, size, uva, _ = self._unpack(P.SINGLE_MEM_REGION, payload, "REM_MEM_REG")
        if len(self._fds) > 1:
            raise FrontendProtocolError(f"REM_MEM_REG: {len(self._fds)} fds, at most 1")
        for m in self.mem:
            if (m.gpa, m.uva, m.region.nbytes) == (gpa, uva, size):
                self._new_memory()  # the queues' views pin the mapping: drop them first
                self.mem.remove(m)
                m.region.close()
                return
        raise FrontendProtocolError(f"REM_MEM_REG: no region [{gpa:#x}, +{size:#x}) at "
                                    f"user address {uva:#x}")

    def _set_vring_num(self, payload: bytes) -> None:
        index, num = self._unpack(P.VRING_STATE, payload, "SET_VRING_NUM")
        ring = self._ring(index, "SET_VRING_NUM")
        if not is_power_of_two(num) or num > MAX_SPLIT_QUEUE_SIZE:
            raise FrontendProtocolError(f"SET_VRING_NUM: {num} is not a split ring size")
        ring.drop_queue()
        ring.num = num

    def _set_vring_addr(self, payload: bytes) -> None:
        index, _flags, desc, used, avail, _log = self._unpack(
            P.VRING_ADDR, payload, "SET_VRING_ADDR")
        ring = self._ring(index, "SET_VRING_ADDR")
        ring.drop_queue()
        ring.addrs = (desc, avail, used)

    def _set_vring_base(self, payload: bytes) -> None:
        index, num = self._unpack(P.VRING_STATE, payload, "SET_VRING_BASE")
        ring = self._ring(index, "SET_VRING_BASE")
        ring.drop_queue()
        ring.base = num & 0xFFFF  # split ring: bits 0-15 are the next avail index

    def _get_vring_base(self, payload: bytes) -> bytes:
        index, _ = self._unpack(P.VRING_STATE, payload, "GET_VRING_BASE")
        ring = self._ring(index, "GET_VRING_BASE")
        # vhost-user.rst, "Ring states": GET_VRING_BASE stops the ring.  Like libvhost-user
        # we also forget its eventfds; the front-end sends new ones to restart it.
        ring.drop_queue()
        ring.set_fd("kick", -1)
        ring.set_fd("call", -1)
        base = ring.base + (1 if self.backend.faults.vring_base_off_by_one else 0)
        return P.VRING_STATE.pack(index, base & 0xFFFF)

    def _set_vring_fd(self, payload: bytes, which: Literal["kick", "call"]) -> None:
        name = f"SET_VRING_{which.upper()}"
        (value,) = self._unpack(P.U64, payload, name)
        ring = self._ring(value & P.VRING_IDX_MASK, name)
        if value & P.VRING_NOFD_MASK:
            if which == "kick":  # would mean: poll the ring; this back-end only sleeps
                raise FrontendProtocolError(f"{name}: polling mode (no fd) not supported")
            ring.set_fd("call", -1)  # no call fd: the front-end polls used
            return
        ring.set_fd(which, self._take_fd(name))
        if which == "kick":
            # vhost-user.rst, "Ring states": a ring starts when its kick fd is set (buffers
            # may already be waiting).
            self._recheck.add(ring.index)

    def _set_vring_err(self, payload: bytes) -> None:
        (value,) = self._unpack(P.U64, payload, "SET_VRING_ERR")
        self._ring(value & P.VRING_IDX_MASK, "SET_VRING_ERR")
        if not value & P.VRING_NOFD_MASK:
            os.close(self._take_fd("SET_VRING_ERR"))  # this back-end never reports errors

    def _set_vring_enable(self, payload: bytes) -> None:
        index, num = self._unpack(P.VRING_STATE, payload, "SET_VRING_ENABLE")
        ring = self._ring(index, "SET_VRING_ENABLE")
        ring.enabled = bool(num)
        if ring.enabled:
            self._recheck.add(index)  # kicks that came while disabled were not served

    def _get_config(self, payload: bytes) -> bytes:
        offset, size, flags = self._unpack(P.CONFIG_HEADER, payload[: P.CONFIG_HEADER.size],
                                           "GET_CONFIG")
        if len(payload) != P.CONFIG_HEADER.size + size or offset + size > P.MAX_CONFIG_SIZE:
            return b""  # vhost-user.rst, GET_CONFIG: an empty reply reports the error
        return P.CONFIG_HEADER.pack(offset, size, flags) + self._config()[offset : offset + size]

    def _config(self) -> bytes:
        """struct virtio_blk_config (VIRTIO 1.2 §5.2.4), zero-padded to the vhost-user
        maximum: capacity le64 @0, size_max le32 @8, seg_max le32 @12, geometry @16,
        blk_size le32 @20, topology @24, writeback @32, num_queues le16 @34."""
        if self.backend.device != "blk":
            return devices.config(self.backend.device, self.backend.faults).ljust(
                P.MAX_CONFIG_SIZE, b"\0")
        cfg = bytearray(P.MAX_CONFIG_SIZE)
        extra = 8 if self.backend.faults.wrong_capacity else 0
        struct.pack_into("<Q", cfg, 0, self.backend.capacity + extra)
        struct.pack_into("<I", cfg, 12, SEG_MAX)
        struct.pack_into("<I", cfg, 20, SECTOR_SIZE)
        struct.pack_into("<H", cfg, 34, self.backend.num_queues)
        return bytes(cfg)

    def _reset_device(self, payload: bytes) -> None:
        # vhost-user.rst, RESET_DEVICE: back to the state after SET_OWNER, memory kept.
        for ring in self.rings:
            ring.close()
        self.rings = [_Ring(i) for i in range(self.backend.num_queues)]
        self.features = 0
        self.status = 0

    # -- the data path ------------------------------------------------------------------------

    def _queue_of(self, ring: _Ring, addrs: tuple[int, int, int]) -> DeviceQueue:
        """The ring's DeviceQueue, built on first use from what the front-end sent."""
        if ring.dev is not None:
            return ring.dev
        parts = []
        for uva, nbytes, align in zip(
                addrs, (DESC_SIZE * ring.num, avail_nbytes(ring.num),
                             used_nbytes(ring.num)), (16, 2, 4), strict=True):
            # Ring addresses are front-end virtual addresses (vhost-user.rst, "Memory
            # region description": translate through userspace_addr), unlike descriptors.
            owner = next((m for m in self.mem
                          if m.uva <= uva and uva + nbytes <= m.uva + m.region.nbytes), None)
            if owner is None or uva % align:
                raise FrontendProtocolError(
                    f"vring {ring.index}: [{uva:#x}, +{nbytes}) is not an aligned address "
                    "inside one memory region")
            parts.append((owner, uva - owner.uva, uva - owner.uva + nbytes))
        owner = parts[0][0]
        if any(p[0] is not owner for p in parts):
            raise FrontendProtocolError(f"vring {ring.index}: descriptor table, avail and "
                                        "used rings in different regions (not supported)")
        (_, desc, _), (_, avail, _), (_, used, _) = parts
        layout = SplitLayout(
            queue_size=ring.num, desc=Offset(desc), avail=Offset(avail), used=Offset(used),
            buffers=None, buffer_size=0, indirect=None, indirect_size=0,
            nbytes=max(end for _, _, end in parts), page_size=PAGE_SIZE, legacy=False)
        # Descriptor addresses are guest-physical: DeviceQueue translates them through
        # every region's guest_phys_addr.
        others: list[tuple[int, MemoryRegion]] = [
            (m.gpa, m.region) for m in self.mem if m is not owner]
        ring.dev = DeviceQueue(owner.region, layout, iova=owner.gpa,
                               event_idx=bool(self.features >> VIRTIO_F_EVENT_IDX & 1),
                               start_index=ring.base, regions=others,
                               indirect_head_only=self.backend.faults.indirect_head_only)
        tracked = self._inflight_queue(ring)
        if tracked is not None and not ring.recovered:
            # The first look at this ring since the buffer came: resume what a previous
            # back-end had taken (nothing, for a buffer just made), then take new chains
            # after those -- from used.idx, whatever SET_VRING_BASE said (as
            # libvhost-user's vu_check_queue_inflights does).
            ring.recovered = True
            ring.resubmit = tracked.recover(ring.dev.used_idx)
            ring.dev.last_avail = resume_index(ring.dev.used_idx, len(ring.resubmit))
            if ring.resubmit:
                log.info("vring %d: resuming %d request(s) from the inflight buffer",
                         ring.index, len(ring.resubmit))
        return ring.dev

    def _inflight_queue(self, ring: _Ring) -> InflightQueue | None:
        buf = self.inflight
        if buf is None or ring.index >= buf.num_queues or buf.queue_size != ring.num:
            return None
        return buf.queues[ring.index]

    def _process(self, ring: _Ring) -> None:
        """Serve everything available on ``ring`` (VIRTIO 1.2 §2.7.13, device side)."""
        # vhost-user.rst, "Ring states": only a started (kick fd received) and enabled
        # ring is processed; a disabled one keeps its buffers until it is enabled again.
        faults = self.backend.faults
        enabled = ring.enabled or faults.process_disabled
        if not (enabled and ring.kick >= 0 and ring.num and ring.addrs and self.mem):
            return
        if self.backend.device == "net" and ring.index == 0:
            return  # receive buffers wait for frames (they are taken by _deliver)
        dev = self._queue_of(ring, ring.addrs)
        tracked = self._inflight_queue(ring)
        while True:
            faults = self.backend.faults
            if ring.resubmit:
                # Taken by a previous back-end: carry them out, as one batch, first.
                heads, ring.resubmit = ring.resubmit, []
                self._complete(ring, dev, [self._serve_any(ring.index, dev, head,
                                                           dev.chain(head))
                                           for head in heads], faults, tracked)
            batch: list[tuple[int, int, BlkRecord | None]] = []
            stuck = False
            while True:
                if faults.wrap_bug and dev.last_avail == 0 and self.popped:
                    stuck = True  # the bug: "index 0 comes before anything we served"
                    break
                if faults.crash_on_indirect:
                    head = dev.next_head()
                    if head is not None and head < dev.size and \
                            dev.desc(head)[2] & VIRTQ_DESC_F_INDIRECT:
                        os.abort()  # the fault: a back-end that dies on an indirect table
                try:
                    chain = dev.pop()
                except DriverProtocolError as exc:
                    if faults.spin_on_loop and "loops" in str(exc):
                        while True:  # the fault: a back-end stuck on a descriptor loop
                            time.sleep(0.05)
                    raise
                if chain is None:
                    break
                if tracked is not None:
                    tracked.take(chain[0])
                self.popped += 1
                if faults.drop_after is not None and self.popped >= faults.drop_after \
                        and (faults.sessions is None or self.number <= faults.sessions):
                    raise _EndSession(f"fault: dropping the connection after "
                                      f"{self.popped} requests")
                batch.append(self._serve_any(ring.index, dev, *chain))
            if batch:
                self._complete(ring, dev, batch, faults, tracked)
            if stuck:
                return
            if not dev.event_idx:
                return  # the driver kicks for every publish unless we ask it not to
            # With EVENT_IDX the driver kicks only past avail_event: move it, then look
            # again, with a full fence between (the driver may have published meanwhile
            # and seen the old value -- §2.7.10).
            dev.enable_notifications()
            full_fence()
            if not dev.avail_pending():
                return

    def _complete(self, ring: _Ring, dev: DeviceQueue,
                  batch: list[tuple[int, int, BlkRecord | None]], faults: Faults,
                  tracked: InflightQueue | None) -> None:
        mine = faults.queue is None or faults.queue == ring.index
        if faults.out_of_order and mine:
            batch.reverse()  # any completion order is legal (§2.7.14); make it visible
        for i, (served, written, record) in enumerate(batch):
            bad = faults.corrupt_used and mine and i == 0
            head = served
            if faults.duplicate_used and len(batch) >= 8 and i == len(batch) - 1:
                head = batch[0][0]
            dev.push(dev.size if bad else head, written, publish=False)  # size: never a head
            if faults.write_desc_table:
                dev.write_desc_len(head, 0xBAD)
            if tracked is not None:
                tracked.link(served)
            if record is not None:
                self.backend.completed.append(record)
        # One used.idx store per batch; signal only if the driver asked (EVENT_IDX's
        # used_event or VIRTQ_AVAIL_F_NO_INTERRUPT), as DeviceQueue.publish_used says.
        notify = dev.publish_used()
        if tracked is not None:  # after used.idx: see virtq.testing.embedded.inflight
            tracked.retire([served for served, _, _ in batch], dev.used_idx)
        if faults.used_flags_garbage:
            dev.set_used_flags(dev.used_flags | 0x8000)
        if faults.no_notify:
            notify = False
        if (notify or faults.spurious_notify) and ring.call >= 0:
            os.eventfd_write(ring.call, 1)

    def _serve_any(self, queue: int, dev: DeviceQueue, head: int,
                   segments: list[Segment]) -> tuple[int, int, BlkRecord | None]:
        device, faults = self.backend.device, self.backend.faults
        if device == "blk":
            return self._serve(queue, dev, head, segments)
        if device == "rng":
            return head, devices.serve_rng(dev, segments, faults), None
        if device == "fs":
            return head, devices.serve_fs(dev, queue, segments, faults), None
        # net: what the driver transmits on queue 1 comes back on queue 0 (§5.1.2)
        rx_ring = self.rings[0]
        frame = devices.tx_frame(dev, segments)
        if frame and rx_ring.num and rx_ring.addrs and rx_ring.enabled:
            rx = self._queue_of(rx_ring, rx_ring.addrs)
            mrg = bool(self.features >> VIRTIO_NET_F_MRG_RXBUF & 1)
            if devices.deliver_frame(rx, frame, mrg_rxbuf=mrg, faults=faults) and \
                    rx_ring.call >= 0:
                os.eventfd_write(rx_ring.call, 1)
        return head, 0, None

    def _serve(self, queue: int, dev: DeviceQueue, head: int,
               segments: list[Segment]) -> tuple[int, int, BlkRecord]:
        """Execute one virtio-blk request; returns ``(head, used len, record)``.

        The layout (§5.2.6) is a 16-byte header, data, and a 1-byte status, but the driver
        may split or merge them across descriptors any way it likes (§2.7.4 "Message
        Framing"), so work on the byte streams, not on descriptor boundaries."""
        readable = [s for s in segments if not s.writable and s.length]
        writable = [s for s in segments if s.writable and s.length]
        header, data_out = _take(readable, _BLK_HEADER.size)
        writable_len = sum(s.length for s in writable)
        if sum(s.length for s in header) < _BLK_HEADER.size or not writable_len:
            raise DriverProtocolError(
                f"virtio-blk request at head {head} lacks its header or status byte")
        kind, _, sector = _BLK_HEADER.unpack(b"".join(dev.read(s.iova, s.length)
                                                      for s in header))
        data_in, (status_seg,) = _take(writable, writable_len - 1)
        faults = self.backend.faults
        if faults.header_split_refused and header[0].length < _BLK_HEADER.size:
            status, written, nbytes = VIRTIO_BLK_S_IOERR, 0, 0
        else:
            status, written, nbytes = self._execute(dev, kind, sector, data_out, data_in)
        dev.write(status_seg.iova, bytes([status]))
        if faults.write_past_buffer:
            with contextlib.suppress(DriverProtocolError):
                dev.write(status_seg.iova + 1, b"\xee")
        if faults.write_readable:
            dev.write(header[0].iova, bytes([dev.read(header[0].iova, 1)[0] ^ 0xFF]))
        # used.len counts every byte written into device-writable buffers (§2.7.8):
        # the data read (or the id) plus the status byte.
        used_len = written + 1 + (512 if faults.bad_used_len else 0)
        return head, used_len, BlkRecord(queue, kind, sector, nbytes, status)

    def _execute(self, dev: DeviceQueue, kind: int, sector: int, data_out: list[Segment],
                 data_in: list[Segment]) -> tuple[int, int, int]:
        """Returns (status, bytes written to the driver, bytes transferred)."""
        fd = self.backend._image_fd
        offset = sector * SECTOR_SIZE
        faults = self.backend.faults
        try:
            if kind == VIRTIO_BLK_T_IN:
                n = sum(s.length for s in data_in)
                if not self._in_range(offset, n):
                    if faults.no_ioerr and n % SECTOR_SIZE == 0:
                        for s in data_in:
                            dev.write(s.iova, bytes(s.length))
                        return VIRTIO_BLK_S_OK, n, n
                    return VIRTIO_BLK_S_IOERR, 0, n
                if faults.unwritten_len and len(data_in) > 1:
                    data_in = data_in[:-1]  # the fault: counted below, never written
                if faults.stale_data or faults.lost_write:
                    self._read_faulty(dev, data_in, offset)
                    return VIRTIO_BLK_S_OK, n, n
                with _views(dev, data_in) as iov:
                    got = os.preadv(fd, iov, offset) if iov else 0
                return (VIRTIO_BLK_S_OK, n, n) if got == sum(s.length for s in data_in) \
                    else (VIRTIO_BLK_S_IOERR, 0, n)
            if kind == VIRTIO_BLK_T_OUT:
                n = sum(s.length for s in data_out)
                if faults.lost_write and self._in_range(offset, n):
                    data = b"".join(dev.read(s.iova, s.length) for s in data_out)
                    for k in range(0, n, SECTOR_SIZE):
                        self._cache[offset + k] = data[k : k + SECTOR_SIZE]
                    return VIRTIO_BLK_S_OK, 0, n
                if self.backend.read_only or not self._in_range(offset, n):
                    return VIRTIO_BLK_S_IOERR, 0, n
                with _views(dev, data_out) as iov:
                    put = os.pwritev(fd, iov, offset) if iov else 0
                return (VIRTIO_BLK_S_OK if put == n else VIRTIO_BLK_S_IOERR), 0, n
            if kind == VIRTIO_BLK_T_FLUSH:
                os.fsync(fd)
                return VIRTIO_BLK_S_OK, 0, 0
            if kind == VIRTIO_BLK_T_GET_ID:
                ident = DEVICE_ID.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
                n = min(VIRTIO_BLK_ID_BYTES, sum(s.length for s in data_in))
                if faults.long_id and data_in:
                    # the fault: 24 bytes into a buffer that may hold 20
                    dev.write(data_in[0].iova, (DEVICE_ID + b"-long-id").ljust(24, b"!"))
                    return VIRTIO_BLK_S_OK, n, n
                done = 0
                for s in _take(data_in, n)[0]:
                    dev.write(s.iova, ident[done : done + s.length])
                    done += s.length
                return VIRTIO_BLK_S_OK, n, n
        except OSError as exc:  # the image failed us: that is the device's I/O error
            log.warning("virtio-blk request %d at sector %d failed: %s", kind, sector, exc)
            return VIRTIO_BLK_S_IOERR, 0, 0
        if faults.unsupp_as_ok:
            return VIRTIO_BLK_S_OK, 0, 0
        return VIRTIO_BLK_S_UNSUPP, 0, 0

    def _read_faulty(self, dev: DeviceQueue, data_in: list[Segment], offset: int) -> None:
        """Reads under the ``stale_data`` (a snapshot taken at connect) or ``lost_write``
        (the image overlaid with this connection's unflushed cache) faults."""
        n = sum(s.length for s in data_in)
        if self.backend.faults.stale_data:
            if self._snapshot is None:
                self._snapshot = b""  # filled at connect; empty if the fault came later
            data = self._snapshot[offset : offset + n].ljust(n, b"\0")
        else:
            merged = bytearray(os.pread(self.backend._image_fd, n, offset))
            for k in range(0, n, SECTOR_SIZE):
                cached = self._cache.get(offset + k)
                if cached is not None:
                    merged[k : k + SECTOR_SIZE] = cached
            data = bytes(merged)
        done = 0
        for s in data_in:
            dev.write(s.iova, data[done : done + s.length])
            done += s.length

    def _in_range(self, offset: int, n: int) -> bool:
        return n % SECTOR_SIZE == 0 and offset + n <= self.backend.capacity * SECTOR_SIZE


# -- the back-end --------------------------------------------------------------------------


def _strip_traceback(exc: BaseException) -> BaseException:
    """Drop tracebacks (and so the frames they pin, whose guest-memory views would keep
    mappings alive) from an error kept for later inspection."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return exc


def _finalize(wake: int, path: str) -> None:
    warnings.warn(f"vhost-user-blk back-end on {path} was not stopped", ResourceWarning,
                  stacklevel=2)
    with contextlib.suppress(OSError):
        os.eventfd_write(wake, 1)


class VhostUserBlkBackend:
    """Serve ``image_path`` as a vhost-user-blk device on the Unix socket ``socket_path``.

    :meth:`start` opens the image, binds and listens (so a front-end can connect as soon
    as it returns) and serves connections, one at a time, in a background thread;
    :meth:`stop` ends the thread and releases every fd and mapping.

    ``mem_slots``: offer VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS with that many memory
    slots (GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG, as qemu-storage-daemon does); the
    default ``None`` offers only SET_MEM_TABLE (at most 8 regions), as DPDK does.

    ``inflight``: offer VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: requests are tracked in a
    buffer the front-end keeps (GET_INFLIGHT_FD / SET_INFLIGHT_FD), and a back-end given
    one by SET_INFLIGHT_FD first carries out the requests its predecessor had taken (see
    :mod:`virtq.testing.embedded.inflight`).  Meant for a back-end in its own process
    (:class:`BackendProcess`), killed and started again.

    Inspection for tests: :attr:`completed` (:class:`BlkRecord` per completed request, in
    completion order, the last 4096), :attr:`connections` (accepted so far) and
    :attr:`errors` (why connections were closed on the front-end's account, and any bug
    in the back-end itself: the thread never raises).
    """

    def __init__(
        self,
        image_path: str | os.PathLike[str],
        socket_path: str | os.PathLike[str],
        *,
        num_queues: int = 1,
        read_only: bool = False,
        faults: Faults | Mapping[str, object] | None = None,
        mem_slots: int | None = None,
        device: str = "blk",
        inflight: bool = False,
    ) -> None:
        if not 1 <= num_queues <= 0xFFFF:
            raise ArgumentError("num_queues", num_queues, "must be in 1..65535")
        if mem_slots is not None and (not isinstance(mem_slots, int) or mem_slots < 1):
            raise ArgumentError("mem_slots", mem_slots, "must be None or a count >= 1")
        if device not in devices.DEVICE_TYPES:
            raise ArgumentError("device", device, f"must be one of {devices.DEVICE_TYPES}")
        #: "blk" (the default), or "net", "fs", "rng" (see :mod:`virtq.testing.embedded.devices`)
        self.device = device
        if device != "blk":
            num_queues = devices.QUEUES[device]
        self.image_path = Path(image_path)
        self.socket_path = Path(socket_path)
        self.num_queues = num_queues
        self.read_only = read_only
        #: With a count: offer CONFIGURE_MEM_SLOTS (GET_MAX_MEM_SLOTS answers it,
        #: ADD_MEM_REG / REM_MEM_REG work); None: memory only through SET_MEM_TABLE.
        self.mem_slots = mem_slots
        #: Offer VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD and track requests in the inflight
        #: buffer, resuming them after a restart (vhost-user.rst, "Inflight I/O tracking").
        self.inflight = bool(inflight)
        self._faults = Faults.coerce(faults)
        self.capacity = 0  # sectors
        self.completed: deque[BlkRecord] = deque(maxlen=4096)
        self.connections = 0
        self.errors: list[BaseException] = []
        self._image_fd = -1
        self._wake = -1
        self._listener: socket.socket | None = None
        self._socket_ino = 0
        self._thread: threading.Thread | None = None
        self._finalizer: weakref.finalize[[int, str], VhostUserBlkBackend] | None = None

    @property
    def serving(self) -> bool:
        """True while the serving thread runs (it ends on stop(), or by a fault)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def faults(self) -> Faults:
        """The faults injected now; assign a :class:`Faults` (or a mapping) to change them while
        the back-end runs."""
        return self._faults

    @faults.setter
    def faults(self, value: Faults | Mapping[str, object] | None) -> None:
        self._faults = Faults.coerce(value)  # one reference swap: the thread sees all or none

    # -- life cycle --------------------------------------------------------------------------

    def _open(self) -> None:
        if self._listener is not None:
            raise BackendError(f"back-end on {self.socket_path} is already started")
        try:
            self._image_fd = os.open(self.image_path, os.O_RDONLY if self.read_only
                                     else os.O_RDWR)
            self.capacity = os.fstat(self._image_fd).st_size // SECTOR_SIZE
            self._wake = os.eventfd(0, _EFD_FLAGS)
            with contextlib.suppress(FileNotFoundError):
                # A socket left by a killed back-end is stale (QEMU's daemons do the same);
                # anything else at the path is not ours to delete.
                if not stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                    raise BackendError(f"{self.socket_path} exists and is not a socket")
                self.socket_path.unlink()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener = listener
            listener.bind(os.fspath(self.socket_path))
            self._socket_ino = os.stat(self.socket_path).st_ino
            listener.listen(4)
            listener.setblocking(False)  # accept() only after poll() said so
        except OSError as exc:
            # A missing image, a socket path in a missing directory, ...: the back-end's
            # own error (a VirtqError), not a bare FileNotFoundError from start().
            self._close()
            raise BackendError(f"cannot start the back-end on {self.socket_path}: "
                               f"{exc}") from exc
        except BaseException:
            self._close()
            raise
        self._finalizer = weakref.finalize(self, _finalize, self._wake, str(self.socket_path))

    def start(self) -> Self:
        """Listen, then serve in a background thread; returns once connecting works."""
        self._open()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"vhost-user-blk {self.socket_path}")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (the connected front-end sees the connection close), join the
        thread, close every fd and mapping, remove the socket.  Idempotent."""
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._close()

    close = stop

    def _close(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.socket_path).st_ino == self._socket_ino:  # not a successor's
                    self.socket_path.unlink()
        for name in ("_image_fd", "_wake"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the serving thread ------------------------------------------------------------------

    def _record(self, exc: BaseException) -> None:
        text = "".join(traceback.format_exception_only(exc)).strip()
        log.warning("vhost-user-blk back-end on %s: %s", self.socket_path, text)
        self.errors.append(_strip_traceback(exc))

    def _run(self) -> None:
        assert self._listener is not None
        listener, wake = self._listener, self._wake
        try:
            while True:
                poller = select.poll()
                poller.register(listener, select.POLLIN)
                poller.register(wake, select.POLLIN)
                if wake in dict(poller.poll()):
                    return
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue  # the client gave up between poll and accept
                self.connections += 1
                self._serve_connection(conn)
                if self.faults.exit_on_disconnect:
                    # The fault: like virtiofsd, one front-end and no more.
                    self._listener.close()
                    return
        except Exception as exc:  # a bug here must not escape the thread
            self._record(exc)

    def _serve_connection(self, conn: socket.socket) -> None:
        conn.settimeout(_MESSAGE_TIMEOUT)
        session = _Session(self, conn)
        try:
            session.run()
        except _EndSession as end:
            log.info("vhost-user-blk back-end on %s: %s", self.socket_path, end)
        except Exception as exc:  # the front-end's fault, or ours; either way: hang up
            self._record(exc)
        finally:
            try:
                session.close()
            except Exception as exc:
                self._record(exc)
