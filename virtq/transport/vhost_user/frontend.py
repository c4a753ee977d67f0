"""A vhost-user front-end: one Unix socket, one request at a time.

This module speaks the message protocol only (it never touches a ring).  Every reply is
matched to its request and checked; every failure is a :class:`VhostUserError` that names
the request.  The connection is unusable after any error of the back-end (the protocol has
no way to resynchronise), and the front-end says so on every later call.

Every public method checks its arguments against the wire format before anything is sent
(field widths, fds, vhost-user.rst's limits) and raises
:class:`~virtq.errors.ArgumentError` for a bad one; the connection stays usable then.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import socket
import warnings
import weakref
from collections.abc import Sequence
from typing import Self, TypeGuard

from virtq.errors import ArgumentError
from virtq.transport.vhost_user import protocol as P
from virtq.transport.vhost_user.errors import (
    VhostUserConnectError,
    VhostUserDisconnectedError,
    VhostUserError,
    VhostUserNackError,
    VhostUserProtocolError,
    VhostUserTimeoutError,
)

#: Every message sent and received, at DEBUG (``virtq --trace`` turns it on).
log = logging.getLogger(__name__)
#: Bytes of a payload a trace line shows (the rest is counted).
TRACE_PAYLOAD = 64

DEFAULT_TIMEOUT = 5.0
#: Longest timeout accepted (seconds): what poll(2)'s int milliseconds can express.
#: ``None`` waits forever.
MAX_TIMEOUT = 2_147_483.0
#: sockaddr_un.sun_path holds 108 bytes, the terminating NUL included (unix(7)).
_SUN_PATH_MAX = 107

#: A memory region as the front-end describes it: (guest_phys_addr, memory_size,
#: userspace_addr, mmap_offset, fd).
MemRegion = tuple[int, int, int, int, int]


def _finalize(sock: socket.socket, path: str) -> None:
    warnings.warn(f"vhost-user connection to {path} was not closed", ResourceWarning,
                  stacklevel=2)
    sock.close()


def _trace_bytes(data: bytes) -> str:
    """A payload for a trace line: hex, cut at :data:`TRACE_PAYLOAD` bytes."""
    if len(data) <= TRACE_PAYLOAD:
        return data.hex() or "-"
    return f"{data[:TRACE_PAYLOAD].hex()}... (+{len(data) - TRACE_PAYLOAD} bytes)"


# -- argument checks (each raises ArgumentError naming the argument) ---------------------


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _uint(name: str, value: object, bits: int, *, low: int = 0) -> int:
    """``value`` if it is an int in ``low..2**bits-1`` (the wire field's width)."""
    if not _is_int(value) or not low <= value < 1 << bits:
        raise ArgumentError(name, value, f"must be an int in {low}..{(1 << bits) - 1} "
                            f"(a u{bits} field)")
    return value


def _ring(index: object) -> int:
    if not _is_int(index) or not 0 <= index < P.MAX_VRINGS:
        raise ArgumentError("index", index, f"must be a ring index in 0..{P.MAX_VRINGS - 1} "
                            "(SET_VRING_KICK/CALL carry 8 bits of it)")
    return index


def _fd(name: str, fd: object) -> int:
    """An open file descriptor: checked here, because sendmsg(2) with a closed one fails
    with EBADF and a file that is not open cannot be passed at all."""
    if not _is_int(fd) or not 0 <= fd < 1 << 31:  # a C int
        raise ArgumentError(name, fd, "must be a file descriptor (an int >= 0)")
    try:
        os.fstat(fd)
    except OSError as exc:
        raise ArgumentError(name, fd, f"is not an open file descriptor "
                            f"({os.strerror(exc.errno or errno.EBADF)})") from None
    return fd


def _mem_region(name: str, region: object) -> MemRegion:
    """One memory region description (vhost-user.rst, "Memory regions description"): u64
    fields, a non-empty span that does not wrap around either address space, an fd."""
    if not isinstance(region, tuple | list) or len(region) != 5:
        raise ArgumentError(name, region, "must be (guest_phys_addr, memory_size, "
                            "userspace_addr, mmap_offset, fd)")
    gpa = _uint(f"{name}.guest_phys_addr", region[0], 64)
    size = _uint(f"{name}.memory_size", region[1], 64, low=1)
    uva = _uint(f"{name}.userspace_addr", region[2], 64)
    offset = _uint(f"{name}.mmap_offset", region[3], 64)
    if gpa + size > 1 << 64 or uva + size > 1 << 64:
        raise ArgumentError(f"{name}.memory_size", size,
                            "the region must end inside the 64-bit address spaces")
    return gpa, size, uva, offset, _fd(f"{name}.fd", region[4])


def check_timeout(timeout: object) -> float | None:
    """``timeout`` if it is ``None`` (wait forever) or a number of seconds in
    ``(0, MAX_TIMEOUT]``; raises :class:`~virtq.errors.ArgumentError` otherwise (0 would make
    the socket non-blocking, a negative or NaN value is refused by the socket module)."""
    if timeout is None:
        return None
    if (not isinstance(timeout, int | float) or isinstance(timeout, bool)
            or not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT):
        raise ArgumentError("timeout", timeout,
                            f"must be None (wait forever) or seconds in (0, {MAX_TIMEOUT:.0f}]")
    return float(timeout)


def check_path(path: object) -> str | bytes:
    """``path`` as :func:`os.fspath` gives it, if it can name a Unix socket (unix(7): 1..107
    bytes, no NUL but an abstract name's leading one); raises
    :class:`~virtq.errors.ArgumentError` otherwise."""
    try:
        fspath = os.fspath(path)  # type: ignore[call-overload]
    except TypeError:
        raise ArgumentError("path", path, "must be a str, bytes or os.PathLike") from None
    raw = os.fsencode(fspath)
    if not raw or len(raw) > _SUN_PATH_MAX or (b"\0" in raw and not raw.startswith(b"\0")):
        raise ArgumentError("path", path, f"must be a Unix socket path of 1..{_SUN_PATH_MAX} "
                            "bytes without NUL (unix(7))")
    return fspath  # type: ignore[no-any-return]


class VhostUserFrontend:
    """The message layer.  ``reply_ack`` is switched on by :meth:`set_protocol_features`
    when REPLY_ACK is negotiated: every SET_* request then waits for the back-end's ack.

    ``VhostUserFrontend(sock, path, timeout)`` wraps a connected ``AF_UNIX`` stream socket
    (and owns it); :meth:`connect` makes one.  ``timeout`` (seconds, or ``None`` to wait
    forever) bounds every send and reply.
    """

    def __init__(self, sock: socket.socket, path: str, timeout: float | None) -> None:
        if not isinstance(sock, socket.socket) or sock.family != socket.AF_UNIX \
                or sock.type != socket.SOCK_STREAM or sock.fileno() < 0:
            raise ArgumentError("sock", sock, "must be an open AF_UNIX stream socket")
        timeout = check_timeout(timeout)
        self.sock = sock
        self.path = path
        self.timeout = timeout
        self.reply_ack = False
        self._dead: VhostUserError | None = None
        sock.settimeout(timeout)
        self._finalizer = weakref.finalize(self, _finalize, sock, path)

    @classmethod
    def connect(cls, path: str | os.PathLike[str],
                *, timeout: float | None = DEFAULT_TIMEOUT) -> Self:
        """Connect to the back-end's socket at ``path``.

        Raises :class:`~virtq.errors.ArgumentError` for a ``path`` that cannot name a Unix
        socket or a ``timeout`` that is not ``None`` or in ``(0, MAX_TIMEOUT]``,
        :class:`VhostUserTimeoutError` if connecting takes longer, and
        :class:`VhostUserConnectError` (an ``OSError`` with the errno) if it fails.
        """
        fspath = check_path(path)
        timeout = check_timeout(timeout)
        shown = os.fsdecode(fspath)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(fspath)
        except TimeoutError as exc:
            sock.close()
            raise VhostUserTimeoutError(f"connecting to {shown!r} timed out") from exc
        except OSError as exc:
            sock.close()
            raise VhostUserConnectError(shown, exc) from exc
        except BaseException:
            sock.close()
            raise
        return cls(sock, shown, timeout)

    # -- framing -----------------------------------------------------------------------------

    def _fail(self, err: VhostUserError) -> VhostUserError:
        self._dead = err
        return err

    def _check_alive(self, name: str) -> None:
        if self._dead is not None:
            raise VhostUserDisconnectedError(
                f"{name}: the connection is unusable after an earlier error: {self._dead}",
                request=name,
            ) from self._dead
        if self.sock.fileno() < 0:
            raise VhostUserDisconnectedError(f"{name}: the connection is closed", request=name)

    def _send(self, request: P.Request, payload: bytes = b"", fds: Sequence[int] = (),
              flags: int = P.VERSION) -> None:
        name = request.name
        self._check_alive(name)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("-> %s flags=%#x size=%d fds=%s payload=%s", name, flags, len(payload),
                      list(fds), _trace_bytes(payload))
        data = P.pack_header(request, flags, len(payload)) + payload
        try:
            # Header, payload and fds in one sendmsg: the back-end reads them as one message.
            sent = socket.send_fds(self.sock, [data], list(fds))
        except TimeoutError as exc:
            raise self._fail(VhostUserTimeoutError(f"{name}: send timed out",
                                                   request=name)) from exc
        except OSError as exc:
            if exc.errno == errno.EBADF and self.sock.fileno() >= 0:
                # An fd closed since it was checked: sendmsg(2) sent nothing, so the
                # connection is still in step.
                raise ArgumentError("fds", list(fds), "an fd was closed while being sent") \
                    from exc
            raise self._fail(VhostUserDisconnectedError(
                f"{name}: cannot send to the back-end ({exc.strerror or exc})",
                request=name)) from exc
        if sent != len(data):
            raise self._fail(VhostUserProtocolError(
                f"{name}: only {sent} of {len(data)} bytes sent", request=name))

    def _recv_exact(self, n: int, name: str, fds: list[int] | None = None) -> bytes:
        """``n`` bytes of the stream.  With ``fds``, file descriptors that ride along
        (SCM_RIGHTS, at most one per read) are appended to it: the caller owns them, also
        when this raises."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                if fds is None:
                    k = self.sock.recv_into(view[got:])
                else:
                    data, new, flags, _ = socket.recv_fds(self.sock, n - got, 1,
                                                          socket.MSG_CMSG_CLOEXEC)
                    fds.extend(new)
                    if flags & socket.MSG_CTRUNC:
                        raise self._fail(VhostUserProtocolError(
                            f"{name}: the reply carried more file descriptors than one",
                            request=name))
                    k = len(data)
                    view[got : got + k] = data
            except TimeoutError as exc:
                raise self._fail(VhostUserTimeoutError(
                    f"{name}: no reply from the back-end within {self.timeout} s",
                    request=name)) from exc
            except ConnectionResetError as exc:
                raise self._fail(VhostUserDisconnectedError(
                    f"{name}: the back-end reset the connection", request=name)) from exc
            except OSError as exc:
                raise self._fail(VhostUserDisconnectedError(
                    f"{name}: cannot receive from the back-end ({exc.strerror or exc})",
                    request=name)) from exc
            if k == 0:
                raise self._fail(VhostUserDisconnectedError(
                    f"{name}: the back-end closed the connection (it rejected the request, "
                    "or died)", request=name, got=bytes(buf[:got])))
            got += k
        return bytes(buf)

    def _recv_reply(self, request: P.Request, fds: list[int] | None = None) -> bytes:
        name = request.name
        code, flags, size = P.HEADER.unpack(self._recv_exact(P.HEADER.size, name, fds))
        if code != request or not flags & P.FLAG_REPLY or flags & P.FLAG_VERSION_MASK != P.VERSION:
            raise self._fail(VhostUserProtocolError(
                f"{name}: expected its reply, got {P.request_name(code)} flags={flags:#x} "
                f"size={size}", request=name, got=(code, flags, size)))
        if size > P.MAX_PAYLOAD:
            raise self._fail(VhostUserProtocolError(
                f"{name}: reply payload of {size} bytes is implausible", request=name, got=size))
        payload = self._recv_exact(size, name, fds) if size else b""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("<- %s flags=%#x size=%d payload=%s", name, flags, size,
                      _trace_bytes(payload))
        return payload

    def request(self, request: P.Request, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send one request; return its reply payload (b"" when it has none).

        With REPLY_ACK negotiated a request without a reply of its own carries NEED_REPLY
        and its ack is checked here, so every SET_* is synchronous.

        Raises :class:`~virtq.errors.ArgumentError` (nothing sent) unless ``request`` is a
        :class:`~virtq.transport.vhost_user.protocol.Request`, ``payload`` bytes-like of
        at most ``MAX_PAYLOAD`` bytes and ``fds`` at most ``MAX_FDS`` open descriptors;
        :class:`VhostUserNackError` when the back-end refuses; another
        :class:`VhostUserError` (the connection is then unusable) when it misbehaves.
        """
        if not isinstance(request, P.Request):
            raise ArgumentError("request", request, "must be a protocol.Request")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise ArgumentError("payload", payload, "must be bytes-like")
        payload = bytes(payload)
        if len(payload) > P.MAX_PAYLOAD:
            raise ArgumentError("payload", f"<{len(payload)} bytes>",
                                f"must be at most {P.MAX_PAYLOAD} bytes")
        if not isinstance(fds, Sequence) or isinstance(fds, str | bytes) \
                or len(fds) > P.MAX_FDS:
            raise ArgumentError("fds", fds, f"must be a sequence of at most {P.MAX_FDS} fds")
        fds = [_fd("fds", fd) for fd in fds]
        wants_ack = self.reply_ack and request not in P.HAS_REPLY
        flags = P.VERSION | (P.FLAG_NEED_REPLY if wants_ack else 0)
        self._send(request, payload, fds, flags)
        if request in P.HAS_REPLY:
            return self._recv_reply(request)
        if wants_ack:
            reply = self._recv_reply(request)
            if len(reply) != 8:
                raise self._fail(VhostUserProtocolError(
                    f"{request.name}: ack of {len(reply)} bytes, expected 8",
                    request=request.name, got=reply))
            (status,) = P.U64.unpack(reply)
            if status:
                raise VhostUserNackError(
                    f"{request.name}: the back-end refused (status {status})",
                    request=request.name, got=status)
        return b""

    def _u64_reply(self, request: P.Request, *, low: int = 0,
                   high: int = (1 << 64) - 1) -> int:
        reply = self.request(request)
        if len(reply) != 8:
            raise self._fail(VhostUserProtocolError(
                f"{request.name}: reply of {len(reply)} bytes, expected 8",
                request=request.name, got=reply))
        value: int = P.U64.unpack(reply)[0]
        if not low <= value <= high:
            raise self._fail(VhostUserProtocolError(
                f"{request.name}: the back-end answered {value:#x}, expected "
                f"{low}..{high:#x}", request=request.name, got=value))
        return value

    # -- messages ----------------------------------------------------------------------------

    def get_features(self) -> int:
        """GET_FEATURES: the device's feature bits plus vhost-user's (bit 30)."""
        return self._u64_reply(P.Request.GET_FEATURES)

    def set_features(self, features: int) -> None:
        """SET_FEATURES; ``features`` is a u64 (else :class:`ArgumentError`)."""
        self.request(P.Request.SET_FEATURES, P.U64.pack(_uint("features", features, 64)))

    def get_protocol_features(self) -> int:
        """GET_PROTOCOL_FEATURES (only if GET_FEATURES offered bit 30)."""
        return self._u64_reply(P.Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        """SET_PROTOCOL_FEATURES; ``features`` is a u64.  Turns :attr:`reply_ack` on when
        REPLY_ACK is among them."""
        features = _uint("features", features, 64)
        self.request(P.Request.SET_PROTOCOL_FEATURES, P.U64.pack(features))
        self.reply_ack = bool(features >> P.ProtocolFeature.REPLY_ACK & 1)

    def set_owner(self) -> None:
        """SET_OWNER: the first message of a session."""
        self.request(P.Request.SET_OWNER)

    def get_queue_num(self) -> int:
        """GET_QUEUE_NUM (with protocol feature MQ): how many queues the back-end has.
        Raises :class:`VhostUserProtocolError` for an answer outside ``1..MAX_QUEUE_NUM``
        (virtio's num_queues is 16 bits; a device without queues cannot be driven)."""
        return self._u64_reply(P.Request.GET_QUEUE_NUM, low=1, high=P.MAX_QUEUE_NUM)

    def set_mem_table(self, regions: Sequence[MemRegion]) -> None:
        """SET_MEM_TABLE: replace the back-end's memory table with ``regions``, each
        ``(guest_phys_addr, memory_size, userspace_addr, mmap_offset, fd)``.

        Raises :class:`~virtq.errors.ArgumentError` unless there are 1..``MAX_MEM_REGIONS``
        regions, each with u64 fields, a non-zero size and an open fd, and no two overlap
        in guest-physical or in user address space (an address must name one byte)."""
        if not isinstance(regions, Sequence) or not 1 <= len(regions) <= P.MAX_MEM_REGIONS:
            raise ArgumentError("regions", regions,
                                f"SET_MEM_TABLE takes 1..{P.MAX_MEM_REGIONS} regions")
        checked = [_mem_region(f"regions[{i}]", r) for i, r in enumerate(regions)]
        for field, name in ((0, "guest_phys_addr"), (2, "userspace_addr")):
            spans = sorted((r[field], r[field] + r[1]) for r in checked)
            for (_, end), (start, _) in itertools.pairwise(spans):
                if start < end:
                    raise ArgumentError("regions", regions,
                                        f"two regions overlap in {name} space at {start:#x}")
        payload = P.MEM_TABLE_HEADER.pack(len(checked), 0) + b"".join(
            P.MEM_REGION.pack(gpa, size, uva, off) for gpa, size, uva, off, _ in checked)
        self.request(P.Request.SET_MEM_TABLE, payload, [fd for *_, fd in checked])

    def get_max_mem_slots(self) -> int:
        """GET_MAX_MEM_SLOTS (with CONFIGURE_MEM_SLOTS): how many regions the back-end
        can hold.  Raises :class:`VhostUserProtocolError` for 0."""
        return self._u64_reply(P.Request.GET_MAX_MEM_SLOTS, low=1)

    def add_mem_reg(self, region: MemRegion) -> None:
        """ADD_MEM_REG (with CONFIGURE_MEM_SLOTS): map one more region, given as for
        :meth:`set_mem_table`, with its fd (vhost-user.rst: "Exactly one file descriptor").
        Raises :class:`~virtq.errors.ArgumentError` for a bad region."""
        gpa, size, uva, off, fd = _mem_region("region", region)
        self.request(P.Request.ADD_MEM_REG, P.SINGLE_MEM_REGION.pack(0, gpa, size, uva, off),
                     [fd])

    def rem_mem_reg(self, region: MemRegion) -> None:
        """REM_MEM_REG (with CONFIGURE_MEM_SLOTS): unmap a region added before, named by
        its guest address, user address and size (the mmap offset is ignored).

        Its fd is sent along, as QEMU's front-end does: vhost-user.rst says back-ends
        "MAY accept messages with one file descriptor" and must close it, and the
        libvhost-user of QEMU before 9.0 (qemu-storage-daemon 7.2) hangs up on a
        REM_MEM_REG without exactly one.  Raises :class:`~virtq.errors.ArgumentError` for a
        bad region."""
        gpa, size, uva, off, fd = _mem_region("region", region)
        self.request(P.Request.REM_MEM_REG, P.SINGLE_MEM_REGION.pack(0, gpa, size, uva, off),
                     [fd])

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, int, int]:
        """GET_INFLIGHT_FD (with protocol feature INFLIGHT_SHMFD): ask the back-end for a
        shared buffer in which it tracks the requests it has taken from ``num_queues``
        rings of ``queue_size`` entries (vhost-user.rst, "Inflight I/O tracking").

        Returns ``(fd, mmap_size, mmap_offset)``; the caller owns ``fd`` and keeps it
        across a back-end restart (SET_INFLIGHT_FD gives it to the next one).  Raises
        :class:`~virtq.errors.ArgumentError` for counts that do not fit the u16 fields or
        are 0, and :class:`VhostUserProtocolError` for a reply that is not an inflight
        description with exactly one fd (any fd received is closed then)."""
        num_queues = _uint("num_queues", num_queues, 16, low=1)
        queue_size = _uint("queue_size", queue_size, 16, low=1)
        request = P.Request.GET_INFLIGHT_FD
        self._send(request, P.INFLIGHT.pack(0, 0, num_queues, queue_size))
        fds: list[int] = []
        try:
            reply = self._recv_reply(request, fds)
            if len(reply) != P.INFLIGHT.size or len(fds) != 1:
                raise self._fail(VhostUserProtocolError(
                    f"GET_INFLIGHT_FD: reply of {len(reply)} bytes with {len(fds)} fd(s), "
                    f"expected {P.INFLIGHT.size} bytes and one fd", request=request.name,
                    got=reply))
            size, offset, _, _ = P.INFLIGHT.unpack(reply)
            if not size:
                raise self._fail(VhostUserProtocolError(
                    "GET_INFLIGHT_FD: the back-end answered an empty region",
                    request=request.name, got=reply))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds[0], size, offset

    def set_inflight_fd(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
                        queue_size: int) -> None:
        """SET_INFLIGHT_FD (with protocol feature INFLIGHT_SHMFD): give the back-end the
        inflight buffer ``fd`` (as GET_INFLIGHT_FD described it) so that it can resume
        the requests a previous back-end had taken.  Raises
        :class:`~virtq.errors.ArgumentError` for a bad fd or field."""
        payload = P.INFLIGHT.pack(_uint("mmap_size", mmap_size, 64, low=1),
                                  _uint("mmap_offset", mmap_offset, 64),
                                  _uint("num_queues", num_queues, 16, low=1),
                                  _uint("queue_size", queue_size, 16, low=1))
        self.request(P.Request.SET_INFLIGHT_FD, payload, [_fd("fd", fd)])

    def set_vring_num(self, index: int, num: int) -> None:
        """SET_VRING_NUM: ring ``index`` (0..255) has ``num`` (1..32768) entries.  Raises
        :class:`~virtq.errors.ArgumentError` for a bad index or size, and what :meth:`request`
        raises."""
        num = _uint("num", num, 16, low=1)
        if num > P.MAX_VRING_NUM:
            raise ArgumentError("num", num, f"must be in 1..{P.MAX_VRING_NUM} (VIRTIO 1.2 §2.7)")
        self.request(P.Request.SET_VRING_NUM, P.VRING_STATE.pack(_ring(index), num))

    def set_vring_base(self, index: int, base: int) -> None:
        """SET_VRING_BASE: ring ``index`` starts at ``base`` (a u32; a split ring uses its
        low 16 bits, the next avail index)."""
        self.request(P.Request.SET_VRING_BASE,
                     P.VRING_STATE.pack(_ring(index), _uint("base", base, 32)))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stop ring ``index`` and return where it stopped.  Raises
        :class:`VhostUserProtocolError` for a reply of the wrong size or ring."""
        index = _ring(index)
        reply = self.request(P.Request.GET_VRING_BASE, P.VRING_STATE.pack(index, 0))
        if len(reply) != P.VRING_STATE.size:
            raise self._fail(VhostUserProtocolError(
                f"GET_VRING_BASE: reply of {len(reply)} bytes", request="GET_VRING_BASE",
                got=reply))
        got_index, num = P.VRING_STATE.unpack(reply)
        if got_index != index:
            raise self._fail(VhostUserProtocolError(
                f"GET_VRING_BASE: asked for ring {index}, reply is for ring {got_index}",
                request="GET_VRING_BASE", got=got_index))
        return int(num)

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int) -> None:
        """Ring addresses in the *front-end's* virtual address space (§3.4 of spec-notes);
        each a u64."""
        self.request(P.Request.SET_VRING_ADDR, P.VRING_ADDR.pack(
            _ring(index), 0, _uint("desc", desc, 64), _uint("used", used, 64),
            _uint("avail", avail, 64), 0))

    def set_vring_kick(self, index: int, fd: int) -> None:
        """SET_VRING_KICK: the eventfd ``fd`` (open, >= 0) the front-end writes to kick
        ring ``index`` (0..255)."""
        index, fd = _ring(index), _fd("fd", fd)
        self.request(P.Request.SET_VRING_KICK, P.U64.pack(index), [fd])

    def set_vring_call(self, index: int, fd: int) -> None:
        """SET_VRING_CALL: the eventfd ``fd`` (open, >= 0) the back-end signals when ring
        ``index`` (0..255) has used buffers."""
        index, fd = _ring(index), _fd("fd", fd)
        self.request(P.Request.SET_VRING_CALL, P.U64.pack(index), [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """SET_VRING_ENABLE: enable (True) or disable (False) ring ``index``.  Raises
        :class:`~virtq.errors.ArgumentError` for a bad index or a non-bool ``enable``, and what
        :meth:`request` raises."""
        if not isinstance(enable, bool):
            raise ArgumentError("enable", enable, "must be True or False")
        self.request(P.Request.SET_VRING_ENABLE, P.VRING_STATE.pack(_ring(index), int(enable)))

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: ``size`` bytes of the device's config space from ``offset``.

        Raises :class:`~virtq.errors.ArgumentError` unless ``offset >= 0``, ``size >= 1``
        and ``offset + size <= MAX_CONFIG_SIZE`` (256); :class:`VhostUserNackError` for the
        back-end's empty reply (its way of failing, vhost-user.rst); and
        :class:`VhostUserProtocolError` for a reply whose size, offset or flags differ
        from the request (the spec: its "payload size MUST match the front-end's
        request")."""
        offset = _uint("offset", offset, 32)
        size = _uint("size", size, 32, low=1)
        if offset + size > P.MAX_CONFIG_SIZE:
            raise ArgumentError("size", size, f"offset {offset} + size must be at most "
                                f"{P.MAX_CONFIG_SIZE} (VHOST_USER_MAX_CONFIG_SIZE)")
        payload = P.CONFIG_HEADER.pack(offset, size, 0) + bytes(size)
        reply = self.request(P.Request.GET_CONFIG, payload)
        where = f"GET_CONFIG(offset={offset}, size={size})"
        if not reply:
            raise VhostUserNackError(f"{where}: the back-end answered with an empty payload "
                                     "(it failed)", request="GET_CONFIG", got=reply)
        if len(reply) != P.CONFIG_HEADER.size + size:
            raise self._fail(VhostUserProtocolError(
                f"{where}: reply of {len(reply)} bytes, expected "
                f"{P.CONFIG_HEADER.size + size}", request="GET_CONFIG", got=reply))
        header = P.CONFIG_HEADER.unpack_from(reply)
        if header != (offset, size, 0):
            raise self._fail(VhostUserProtocolError(
                f"{where}: reply is for offset={header[0]} size={header[1]} "
                f"flags={header[2]:#x}", request="GET_CONFIG", got=header))
        return reply[P.CONFIG_HEADER.size :]

    def set_status(self, status: int) -> None:
        """SET_STATUS (with protocol feature STATUS): the virtio device status, a u8."""
        self.request(P.Request.SET_STATUS, P.U64.pack(_uint("status", status, 8)))

    def get_status(self) -> int:
        """GET_STATUS: the device status.  Raises :class:`VhostUserProtocolError` for a
        value that does not fit virtio's 8-bit status (VIRTIO 1.2 §2.1)."""
        return self._u64_reply(P.Request.GET_STATUS, high=0xFF)

    def reset_device(self) -> None:
        """RESET_DEVICE (with protocol feature RESET_DEVICE)."""
        self.request(P.Request.RESET_DEVICE)

    # -- teardown --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after :meth:`close` (the socket is closed)."""
        return self.sock.fileno() < 0

    def close(self) -> None:
        """Close the socket (idempotent); the back-end resets the device on disconnect."""
        self._finalizer.detach()
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
