"""A driver that lies: full control over the driver-owned half of a split ring and over the
vhost-user messages, for testing *back-ends*.

:class:`HostileDevice` proves virtq's driver survives a lying device; this module is its
mirror image.  :class:`HostileDriver` is a vhost-user front-end session whose every byte can
be chosen: descriptors with any address, length, flags and next index
(:meth:`RawRing.write_desc`), any avail ring entry and any ``avail.idx``
(:meth:`RawRing.set_avail`), raw vhost-user messages with any header, payload and file
descriptors (:meth:`HostileDriver.send_raw`).  It also has the well-behaved path a
conformance check needs (:meth:`RawRing.add`, :meth:`HostileDriver.handshake`,
:meth:`HostileDriver.setup_ring`), and device memory with **guard bytes** around every
buffer (:meth:`GuestMemory.buffer`) so any write outside a buffer is caught.

Nothing here validates what the back-end does: it records.  ``virtq.check`` judges.

Addresses (vhost-user.rst, "Memory region description"): descriptors carry guest-physical
addresses (``gpa``); SET_VRING_ADDR carries the front-end's virtual addresses (``uva``).
The memory is one memfd mapped at ``uva`` and announced at ``gpa_base``, deliberately
different, so a back-end that mixes the two spaces fails at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import socket
import struct
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

from virtq.abi import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from virtq.errors import ArgumentError, VirtqError
from virtq.layout import SplitLayout, wrap_add
from virtq.layout.split import DESC_SIZE, avail_nbytes, used_nbytes
from virtq.memory import MemfdRegion
from virtq.transport.vhost_user import (
    VhostUserConnectError,
    VhostUserFrontend,
)
from virtq.transport.vhost_user import protocol as P

__all__ = [
    "DEFAULT_GPA_BASE",
    "Buf",
    "GuestMemory",
    "HostileDriver",
    "RawReply",
    "RawRing",
]

#: Guest-physical address of the memory's byte 0: not the host address, on purpose.
DEFAULT_GPA_BASE = 0x1_0000_0000
GUARD = 64  # guard bytes on each side of every buffer
_DESC = struct.Struct("<QIHH")
_EFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK


@dataclass(frozen=True)
class Buf:
    """One buffer in :class:`GuestMemory`: ``length`` bytes at guest address ``gpa``
    (memory offset ``offset``), with guard bytes on both sides; ``writable`` buffers are
    pre-filled with ``poison`` so that bytes the device did not write can be recognised."""

    gpa: int
    offset: int
    length: int
    writable: bool
    poison: bytes = b""

    def desc(self) -> tuple[int, int]:
        return self.gpa, self.length


@dataclass(frozen=True)
class GuardHit:
    """Bytes around a buffer (or in a readable buffer) that changed."""

    what: str  # "guard before", "guard after", "readable buffer"
    gpa: int
    expected: bytes
    found: bytes

    def describe(self) -> str:
        diff = next((i for i, (a, b) in enumerate(zip(self.expected, self.found, strict=True))
                     if a != b), 0)
        return (f"{self.what} at {self.gpa:#x}: byte {diff} is {self.found[diff]:#04x}, "
                f"expected {self.expected[diff]:#04x} ({_hex(self.found)})")


def _hex(data: bytes, limit: int = 32) -> str:
    text = data[:limit].hex(" ")
    return text + (" ..." if len(data) > limit else "")


class GuestMemory:
    """One memfd the back-end maps: rings at the start (page aligned), a bump heap of
    buffers after them.  :meth:`reset_heap` forgets the buffers (not the rings)."""

    def __init__(self, nbytes: int = 4 << 20, *, gpa_base: int = DEFAULT_GPA_BASE,
                 seed: int = 0) -> None:
        self.region = MemfdRegion(nbytes, name="virtq-hostile-driver")
        self.gpa_base = gpa_base
        self.nbytes = self.region.nbytes
        self._mem = self.region.view()
        self._rings_end = 0
        self._heap = 0
        self._rng = random.Random(seed)
        self.guarded: list[tuple[int, bytes]] = []  # (offset, pattern) of every guard
        self.readable: list[tuple[Buf, bytes]] = []  # readable buffers and their contents

    # -- addresses ---------------------------------------------------------------------------

    @property
    def uva(self) -> int:
        return int(self.region.host_addr)

    def gpa(self, offset: int) -> int:
        return self.gpa_base + offset

    @property
    def gpa_end(self) -> int:
        return self.gpa_base + self.nbytes

    def offset_of(self, gpa: int) -> int:
        off = gpa - self.gpa_base
        if not 0 <= off < self.nbytes:
            raise ArgumentError("gpa", gpa, "is not inside the guest memory")
        return off

    def mem_table(self) -> list[tuple[int, int, int, int, int]]:
        fd = self.region.fd
        assert fd is not None  # a memfd has one
        return [(self.gpa_base, self.nbytes, self.uva, 0, fd)]

    # -- allocation --------------------------------------------------------------------------

    def alloc_rings(self, nbytes: int) -> int:
        """Page-aligned space for rings (before any buffer is allocated)."""
        if self._heap:
            raise VirtqError("rings must be allocated before buffers")
        off = self._rings_end
        self._rings_end = _align(off + nbytes, 4096)
        return off

    def _alloc(self, nbytes: int, align: int) -> int:
        start = self._heap or self._rings_end
        off = _align(start, align)
        if off + nbytes > self.nbytes:
            raise VirtqError(f"guest memory exhausted ({self.nbytes} bytes)")
        self._heap = off + nbytes
        return off

    def buffer(self, length: int, *, writable: bool = False, data: bytes | None = None,
               guard: int = GUARD, align: int = 16) -> Buf:
        """A buffer with ``guard`` bytes of a random pattern on each side.  A readable one
        holds ``data`` (random bytes by default), a writable one a random poison."""
        off = self._alloc(length + 2 * guard, align) + guard
        if guard:
            for g in (off - guard, off + length):
                pattern = self._rng.randbytes(guard)
                self._mem[g : g + guard] = pattern
                self.guarded.append((g, pattern))
        poison = b""
        if writable:
            poison = self._rng.randbytes(length)
            self._mem[off : off + length] = poison
        else:
            content = self._rng.randbytes(length) if data is None else data
            if len(content) != length:
                raise ArgumentError("data", len(content), f"must be {length} bytes")
            self._mem[off : off + length] = content
        buf = Buf(self.gpa(off), off, length, writable, poison)
        if not writable:
            self.readable.append((buf, bytes(self._mem[off : off + length])))
        return buf

    def table(self, entries: int) -> int:
        """Space for an indirect descriptor table (16-byte aligned, no guards); returns
        its memory offset."""
        off = self._alloc(entries * DESC_SIZE, 16)
        self._mem[off : off + entries * DESC_SIZE] = bytes(entries * DESC_SIZE)
        return off

    def reset_heap(self) -> None:
        self._heap = 0
        self.guarded.clear()
        self.readable.clear()

    # -- access ------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._mem[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self._mem[offset : offset + len(data)] = data

    def contents(self, buf: Buf, length: int | None = None) -> bytes:
        return self.read(buf.offset, buf.length if length is None else length)

    def write_desc_at(self, offset: int, index: int, addr: int, length: int, flags: int,
                      nxt: int) -> None:
        _DESC.pack_into(self._mem, offset + index * DESC_SIZE, addr & (1 << 64) - 1,
                        length & 0xFFFFFFFF, flags & 0xFFFF, nxt & 0xFFFF)

    def guard_hits(self) -> list[GuardHit]:
        """Every guard that changed, and every readable buffer whose bytes changed."""
        hits = []
        for off, pattern in self.guarded:
            found = self.read(off, len(pattern))
            if found != pattern:
                hits.append(GuardHit("guard bytes", self.gpa(off), pattern, found))
        for buf, content in self.readable:
            found = self.contents(buf)
            if found != content:
                hits.append(GuardHit("device-readable buffer", buf.gpa, content, found))
        return hits

    def close(self) -> None:
        self._mem.release()
        self.region.close()


def _align(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


class RawRing:
    """The driver half of one split ring in :class:`GuestMemory`, byte by byte.

    The raw writers (:meth:`write_desc`, :meth:`set_avail`, :attr:`avail_idx`, ...) store
    exactly what they are given.  :meth:`add` / :meth:`publish` / :meth:`reap` are a
    minimal well-behaved driver on top (free list, chains, indirect tables) whose state
    is kept in Python; :meth:`reap` returns used elements as written, unvalidated.
    """

    def __init__(self, mem: GuestMemory, index: int, size: int, *, start: int = 0) -> None:
        self.mem = mem
        self.index = index
        self.size = size
        layout = SplitLayout.compute(size)
        self.layout = layout
        self.base = mem.alloc_rings(layout.nbytes)
        view = mem._mem
        b = self.base
        self._desc = view[b + layout.desc : b + layout.desc + DESC_SIZE * size]
        self._avail = view[b + layout.avail : b + layout.avail + avail_nbytes(size)].cast("H")
        used = view[b + layout.used : b + layout.used + used_nbytes(size)]
        self._used_h = used.cast("H")
        self._used_w = used[: 4 + 8 * size].cast("I")
        self._used_raw = used
        self.reset(start)

    def reset(self, start: int = 0) -> None:
        """Zero the rings; both indices (and the event words) start at ``start``."""
        self._desc[:] = bytes(len(self._desc))
        self._avail[:] = memoryview(bytes(2 * len(self._avail))).cast("H")
        self._used_h[:] = memoryview(bytes(2 * len(self._used_h))).cast("H")
        self._avail[1] = start
        self._used_h[1] = start
        self._avail[2 + self.size] = start
        self.next_avail = start
        self.last_used = start
        self.free = list(range(self.size - 1, -1, -1))
        self.heads: dict[int, tuple[list[int], int]] = {}  # head -> (descs, writable cap)

    # -- addresses ----------------------------------------------------------------------

    def _uva(self, part: int) -> int:
        return self.mem.uva + self.base + part

    @property
    def desc_uva(self) -> int:
        return self._uva(self.layout.desc)

    @property
    def avail_uva(self) -> int:
        return self._uva(self.layout.avail)

    @property
    def used_uva(self) -> int:
        return self._uva(self.layout.used)

    # -- raw access -----------------------------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        """Descriptor ``i`` (taken modulo the queue size), any values (truncated to the
        field widths)."""
        self.mem.write_desc_at(self.base + self.layout.desc, i % self.size, addr, length,
                               flags, nxt)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        addr, length, flags, nxt = _DESC.unpack_from(self._desc, (i % self.size) * DESC_SIZE)
        return addr, length, flags, nxt

    def desc_table(self) -> bytes:
        return bytes(self._desc)

    def set_avail(self, position: int, head: int) -> None:
        """``avail.ring[position % size] = head`` (any u16)."""
        self._avail[2 + position % self.size] = head & 0xFFFF

    def avail_entry(self, position: int) -> int:
        """``avail.ring[position % size]``."""
        return int(self._avail[2 + position % self.size])

    @property
    def avail_idx(self) -> int:
        return int(self._avail[1])

    @avail_idx.setter
    def avail_idx(self, value: int) -> None:
        self._avail[1] = value & 0xFFFF

    @property
    def avail_flags(self) -> int:
        return int(self._avail[0])

    @avail_flags.setter
    def avail_flags(self, value: int) -> None:
        self._avail[0] = value & 0xFFFF

    @property
    def used_event(self) -> int:
        return int(self._avail[2 + self.size])

    @used_event.setter
    def used_event(self, value: int) -> None:
        self._avail[2 + self.size] = value & 0xFFFF

    @property
    def used_idx(self) -> int:
        return int(self._used_h[1])

    @property
    def used_flags(self) -> int:
        return int(self._used_h[0])

    @property
    def avail_event(self) -> int:
        return int(self._used_h[2 + 4 * self.size])

    def used_elem(self, position: int) -> tuple[int, int]:
        slot = position % self.size
        return int(self._used_w[1 + 2 * slot]), int(self._used_w[2 + 2 * slot])

    # -- the well-behaved driver ------------------------------------------------------------

    def add(self, readable: Sequence[Buf], writable: Sequence[Buf], *,
            indirect: bool = False, direct_prefix: int = 0) -> int:
        """Write one chain (readable buffers first, §2.7.4.2) and its avail entry at
        ``next_avail``; not visible until :meth:`publish`.  ``indirect``: the buffers go
        into an indirect table (§2.7.5.3); ``direct_prefix``: that many of the first
        buffers stay in the ring, chained to the indirect descriptor (the layout
        §2.7.5.3.2 says a device MUST handle).  Returns the head."""
        bufs = [(b, False) for b in readable] + [(b, True) for b in writable]
        if not bufs:
            raise ArgumentError("chain", 0, "needs at least one buffer")
        direct = bufs[:direct_prefix] if indirect else bufs
        ring_descs = len(direct) + (1 if indirect else 0)
        if ring_descs > len(self.free):
            raise VirtqError(f"ring {self.index}: {ring_descs} descriptors needed, "
                             f"{len(self.free)} free")
        descs = [self.free.pop() for _ in range(ring_descs)]
        for k, (buf, w) in enumerate(direct):
            last = k == len(descs) - 1
            self.write_desc(descs[k], buf.gpa, buf.length,
                            (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT),
                            0 if last else descs[k + 1])
        if indirect:
            rest = bufs[direct_prefix:]
            table = self.mem.table(len(rest))
            for k, (buf, w) in enumerate(rest):
                last = k == len(rest) - 1
                self.mem.write_desc_at(
                    table, k, buf.gpa, buf.length,
                    (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT),
                    0 if last else k + 1)
            self.write_desc(descs[-1], self.mem.gpa(table), len(rest) * DESC_SIZE,
                            VIRTQ_DESC_F_INDIRECT, 0)
        head = descs[0]
        capacity = sum(b.length for b, w in bufs if w)
        self.heads[head] = (descs, capacity)
        self.set_avail(self.next_avail, head)
        self.next_avail = wrap_add(self.next_avail, 1)
        return head

    def capacity(self, head: int) -> int | None:
        """The writable capacity of an in-flight head (None if it is not in flight)."""
        state = self.heads.get(head)
        return None if state is None else state[1]

    def publish(self) -> None:
        """Store ``avail.idx = next_avail`` (a full fence orders it after the ring writes:
        the memoryview stores are plain stores, and this process has one thread)."""
        self.avail_idx = self.next_avail

    def pending(self) -> int:
        """Used elements written and not reaped yet."""
        return (self.used_idx - self.last_used) & 0xFFFF

    def reap(self) -> list[tuple[int, int]]:
        """Every used element since the last reap, as ``(id, len)``, unvalidated.  Heads
        that were in flight go back to the free list (once)."""
        out = []
        idx = self.used_idx
        while self.last_used != idx:
            elem = self.used_elem(self.last_used)
            out.append(elem)
            state = self.heads.pop(elem[0], None)
            if state is not None:
                self.free.extend(state[0])
            self.last_used = wrap_add(self.last_used, 1)
        return out

    def close(self) -> None:
        for v in (self._desc, self._avail, self._used_h, self._used_w, self._used_raw):
            v.release()


@dataclass(frozen=True)
class RawReply:
    """One message the back-end sent, as it came."""

    code: int
    flags: int
    payload: bytes

    def describe(self) -> str:
        return (f"{P.request_name(self.code)} flags={self.flags:#x} size={len(self.payload)} "
                f"payload={_hex(self.payload)}")


@dataclass
class _Queue:
    ring: RawRing
    kick: int
    call: int


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _finalize(fds: list[int], path: str) -> None:
    warnings.warn(f"HostileDriver for {path} was not closed", ResourceWarning, stacklevel=2)
    _close_fds(fds)


@dataclass
class Negotiated:
    """What the handshake settled (all as the back-end answered)."""

    offered: int = 0
    protocol_offered: int = 0
    features: int = 0
    protocol: int = 0
    queue_num: int | None = None
    replies: list[str] = field(default_factory=list)


class HostileDriver:
    """One vhost-user connection with :class:`GuestMemory` and :class:`RawRing` s.

    Well-formed messages go through :class:`~virtq.transport.vhost_user.VhostUserFrontend`
    (:attr:`frontend`); :meth:`send_raw` / :meth:`recv_raw` put any bytes on the same
    socket.  After a raw exchange the front-end's view of the stream is only as good as the
    back-end's answers: use one or the other per message.
    """

    def __init__(self, frontend: VhostUserFrontend, *, mem_bytes: int = 4 << 20,
                 gpa_base: int = DEFAULT_GPA_BASE, seed: int = 0) -> None:
        self.frontend = frontend
        self.sock = frontend.sock
        self.path = frontend.path
        self.mem = GuestMemory(mem_bytes, gpa_base=gpa_base, seed=seed)
        self.queues: dict[int, _Queue] = {}
        self.neg = Negotiated()
        self._fds: list[int] = []
        self._finalizer = weakref.finalize(self, _finalize, self._fds, self.path)

    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float = 2.0,
                connect_timeout: float = 5.0, **kwargs: int) -> Self:
        """Connect, retrying while the socket is not there or not listening yet (a
        back-end that is still starting) for up to ``connect_timeout`` seconds."""
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                fe = VhostUserFrontend.connect(path, timeout=timeout)
                break
            except VhostUserConnectError as exc:
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED) or \
                        time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        try:
            return cls(fe, **kwargs)
        except BaseException:
            fe.close()
            raise

    # -- raw messages --------------------------------------------------------------------

    def send_raw(self, code: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                 flags: int = P.VERSION, size: int | None = None) -> None:
        """Any header (``size`` defaults to the payload's length), any payload, any fds.
        Raises ``OSError`` (EPIPE, ECONNRESET) if the back-end is gone."""
        header = P.HEADER.pack(code & 0xFFFFFFFF, flags & 0xFFFFFFFF,
                               (len(payload) if size is None else size) & 0xFFFFFFFF)
        socket.send_fds(self.sock, [header + payload], list(fds))

    def recv_raw(self, timeout: float) -> RawReply | None:
        """The next whole message from the back-end, or None if nothing complete came
        within ``timeout``.  Raises :class:`EOFError` when the back-end closed the
        connection (ECONNRESET included)."""
        deadline = time.monotonic() + timeout
        head = self._recv_exact(P.HEADER.size, deadline)
        if head is None:
            return None
        code, flags, size = P.HEADER.unpack(head)
        payload = self._recv_exact(min(size, 1 << 16), deadline) if size else b""
        if payload is None:
            return RawReply(code, flags, b"")
        return RawReply(code, flags, payload)

    def _recv_exact(self, n: int, deadline: float) -> bytes | None:
        buf = b""
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if not ready:
                return None
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, n - len(buf), 8)
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise EOFError("the back-end reset the connection") from exc
            _close_fds(list(fds))
            if not data:
                raise EOFError("the back-end closed the connection")
            buf += data
        return buf

    def connection_open(self) -> bool:
        """False once the back-end has closed the socket (a non-blocking peek)."""
        if self.sock.fileno() < 0:
            return False
        ready, _, _ = select.select([self.sock], [], [], 0)
        if not ready:
            return True
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return bool(data)

    # -- the well-behaved handshake ----------------------------------------------------------

    def handshake(self, *, features: int, protocol_features: int | None = None,
                  status: bool = True) -> Negotiated:
        """SET_OWNER, feature and protocol-feature negotiation (``features`` and
        ``protocol_features`` are masked with what is offered; VHOST_USER_F_PROTOCOL_FEATURES
        is kept when offered), the memory table.  With the STATUS protocol feature the
        device status goes ACKNOWLEDGE | DRIVER | FEATURES_OK."""
        fe, neg = self.frontend, self.neg
        fe.set_owner()
        neg.offered = fe.get_features()
        proto_bit = 1 << P.VHOST_USER_F_PROTOCOL_FEATURES
        if neg.offered & proto_bit:
            neg.protocol_offered = fe.get_protocol_features()
            wanted = neg.protocol_offered if protocol_features is None else protocol_features
            neg.protocol = neg.protocol_offered & wanted
            fe.set_protocol_features(neg.protocol)
        if self.has(P.ProtocolFeature.MQ):
            neg.queue_num = fe.get_queue_num()
        neg.features = neg.offered & (features | proto_bit)
        fe.set_features(neg.features)
        if status and self.has(P.ProtocolFeature.STATUS):
            fe.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                          | VIRTIO_CONFIG_S_FEATURES_OK)
        fe.set_mem_table(self.mem.mem_table())
        return neg

    def has(self, feature: P.ProtocolFeature) -> bool:
        return bool(self.neg.protocol >> feature & 1)

    @property
    def event_idx(self) -> bool:
        return bool(self.neg.features >> VIRTIO_F_EVENT_IDX & 1)

    def add_ring(self, index: int, size: int, *, start: int = 0) -> RawRing:
        """Memory and eventfds for ring ``index`` (nothing is sent)."""
        ring = RawRing(self.mem, index, size, start=start)
        kick = os.eventfd(0, _EFD_FLAGS)
        self._fds.append(kick)
        call = os.eventfd(0, _EFD_FLAGS)
        self._fds.append(call)
        self.queues[index] = _Queue(ring, kick, call)
        return ring

    def setup_ring(self, index: int, *, enable: bool = True) -> None:
        """SET_VRING_NUM, _BASE (the ring's start index), _ADDR, _KICK, _CALL and, with
        PROTOCOL_FEATURES, SET_VRING_ENABLE (vhost-user.rst, "Ring states")."""
        q = self.queues[index]
        fe, ring = self.frontend, q.ring
        fe.set_vring_num(index, ring.size)
        fe.set_vring_base(index, ring.next_avail)
        fe.set_vring_addr(index, desc=ring.desc_uva, used=ring.used_uva, avail=ring.avail_uva)
        fe.set_vring_kick(index, q.kick)
        fe.set_vring_call(index, q.call)
        if enable:
            self.enable(index, True)

    def enable(self, index: int, on: bool) -> None:
        if self.neg.features >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            self.frontend.set_vring_enable(index, on)

    def driver_ok(self) -> None:
        if self.has(P.ProtocolFeature.STATUS):
            self.frontend.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                                     | VIRTIO_CONFIG_S_FEATURES_OK
                                     | VIRTIO_CONFIG_S_DRIVER_OK)

    def ring(self, index: int) -> RawRing:
        return self.queues[index].ring

    # -- notifications --------------------------------------------------------------------

    def kick(self, index: int) -> None:
        os.eventfd_write(self.queues[index].kick, 1)

    def take_calls(self, index: int) -> int:
        """The used-buffer notifications counted on ring ``index``'s call eventfd since the
        last call (the counter is reset)."""
        try:
            return os.eventfd_read(self.queues[index].call)
        except BlockingIOError:
            return 0

    def wait_call(self, index: int, timeout: float) -> bool:
        """Wait for a notification on ``index`` without consuming it."""
        ready, _, _ = select.select([self.queues[index].call], [], [], timeout)
        return bool(ready)

    def wait_used(self, index: int, count: int, timeout: float) -> bool:
        """Poll until ``count`` used elements are pending on ring ``index`` (or
        ``timeout`` passes, or the back-end hangs up: then False).  Polls memory, so it
        works whatever notifications the back-end sends."""
        ring = self.queues[index].ring
        deadline = time.monotonic() + timeout
        checked = time.monotonic()
        while ring.pending() < count:
            now = time.monotonic()
            if now > deadline:
                return False
            if now - checked > 0.02:
                checked = now
                if not self.connection_open():
                    return ring.pending() >= count
            time.sleep(0.0005)
        return True

    # -- teardown -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.frontend.closed

    def close(self) -> None:
        if self.frontend.closed and not self.queues:
            return
        self.frontend.close()
        for q in self.queues.values():
            q.ring.close()
        self.queues.clear()
        self._finalizer.detach()
        _close_fds(self._fds)
        self._fds.clear()
        self.mem.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
