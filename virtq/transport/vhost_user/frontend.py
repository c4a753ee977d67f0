"""A vhost-user front-end: one Unix socket, one request at a time.

This module speaks the message protocol only (it never touches a ring).  Every reply is
matched to its request and checked; every failure is a :class:`VhostUserError` that names
the request.  The connection is unusable after any error (the protocol has no way to
resynchronise), and the front-end says so on every later call.
"""

from __future__ import annotations

import errno
import os
import socket
import warnings
import weakref
from collections.abc import Sequence
from typing import Self

from virtq.transport.vhost_user import protocol as P
from virtq.transport.vhost_user.errors import (
    VhostUserConnectError,
    VhostUserDisconnectedError,
    VhostUserError,
    VhostUserNackError,
    VhostUserProtocolError,
    VhostUserTimeoutError,
)

DEFAULT_TIMEOUT = 5.0


def _finalize(sock: socket.socket, path: str) -> None:
    warnings.warn(f"vhost-user connection to {path} was not closed", ResourceWarning,
                  stacklevel=2)
    sock.close()


class VhostUserFrontend:
    """The message layer.  ``reply_ack`` is switched on by :meth:`set_protocol_features`
    when REPLY_ACK is negotiated: every SET_* request then waits for the back-end's ack."""

    def __init__(self, sock: socket.socket, path: str, timeout: float) -> None:
        self.sock = sock
        self.path = path
        self.timeout = timeout
        self.reply_ack = False
        self._dead: VhostUserError | None = None
        sock.settimeout(timeout)
        self._finalizer = weakref.finalize(self, _finalize, sock, path)

    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> Self:
        path = os.fspath(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except TimeoutError as exc:
            sock.close()
            raise VhostUserTimeoutError(f"connecting to {path!r} timed out") from exc
        except OSError as exc:
            sock.close()
            raise VhostUserConnectError(path, exc) from exc
        return cls(sock, path, timeout)

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
        data = P.pack_header(request, flags, len(payload)) + payload
        try:
            # Header, payload and fds in one sendmsg: the back-end reads them as one message.
            sent = socket.send_fds(self.sock, [data], list(fds))
        except TimeoutError as exc:
            raise self._fail(VhostUserTimeoutError(f"{name}: send timed out",
                                                   request=name)) from exc
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise self._fail(VhostUserDisconnectedError(
                    f"{name}: the back-end closed the connection ({exc.strerror})",
                    request=name)) from exc
            raise
        if sent != len(data):
            raise self._fail(VhostUserProtocolError(
                f"{name}: only {sent} of {len(data)} bytes sent", request=name))

    def _recv_exact(self, n: int, name: str) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except TimeoutError as exc:
                raise self._fail(VhostUserTimeoutError(
                    f"{name}: no reply from the back-end within {self.timeout} s",
                    request=name)) from exc
            except ConnectionResetError as exc:
                raise self._fail(VhostUserDisconnectedError(
                    f"{name}: the back-end reset the connection", request=name)) from exc
            if k == 0:
                raise self._fail(VhostUserDisconnectedError(
                    f"{name}: the back-end closed the connection (it rejected the request, "
                    "or died)", request=name, got=bytes(buf[:got])))
            got += k
        return bytes(buf)

    def _recv_reply(self, request: P.Request) -> bytes:
        name = request.name
        code, flags, size = P.HEADER.unpack(self._recv_exact(P.HEADER.size, name))
        if code != request or not flags & P.FLAG_REPLY or flags & P.FLAG_VERSION_MASK != P.VERSION:
            raise self._fail(VhostUserProtocolError(
                f"{name}: expected its reply, got {P.request_name(code)} flags={flags:#x} "
                f"size={size}", request=name, got=(code, flags, size)))
        if size > 4096:
            raise self._fail(VhostUserProtocolError(
                f"{name}: reply payload of {size} bytes is implausible", request=name, got=size))
        return self._recv_exact(size, name) if size else b""

    def request(self, request: P.Request, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send one request; return its reply payload (b"" when it has none).

        With REPLY_ACK negotiated a request without a reply of its own carries NEED_REPLY
        and its ack is checked here, so every SET_* is synchronous."""
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

    def _u64_reply(self, request: P.Request) -> int:
        reply = self.request(request)
        if len(reply) != 8:
            raise self._fail(VhostUserProtocolError(
                f"{request.name}: reply of {len(reply)} bytes, expected 8",
                request=request.name, got=reply))
        value: int = P.U64.unpack(reply)[0]
        return value

    # -- messages ----------------------------------------------------------------------------

    def get_features(self) -> int:
        return self._u64_reply(P.Request.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.request(P.Request.SET_FEATURES, P.U64.pack(features))

    def get_protocol_features(self) -> int:
        return self._u64_reply(P.Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self.request(P.Request.SET_PROTOCOL_FEATURES, P.U64.pack(features))
        self.reply_ack = bool(features >> P.ProtocolFeature.REPLY_ACK & 1)

    def set_owner(self) -> None:
        self.request(P.Request.SET_OWNER)

    def get_queue_num(self) -> int:
        return self._u64_reply(P.Request.GET_QUEUE_NUM)

    def set_mem_table(self, regions: Sequence[tuple[int, int, int, int, int]]) -> None:
        """``regions``: (guest_phys_addr, memory_size, userspace_addr, mmap_offset, fd)."""
        if not 1 <= len(regions) <= P.MAX_MEM_REGIONS:
            raise VhostUserError(
                f"SET_MEM_TABLE takes 1..{P.MAX_MEM_REGIONS} regions, not {len(regions)}",
                request="SET_MEM_TABLE")
        payload = P.MEM_TABLE_HEADER.pack(len(regions), 0) + b"".join(
            P.MEM_REGION.pack(gpa, size, uva, off) for gpa, size, uva, off, _ in regions)
        self.request(P.Request.SET_MEM_TABLE, payload, [fd for *_, fd in regions])

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(P.Request.SET_VRING_NUM, P.VRING_STATE.pack(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(P.Request.SET_VRING_BASE, P.VRING_STATE.pack(index, base))

    def get_vring_base(self, index: int) -> int:
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
        """Ring addresses in the *front-end's* virtual address space (§3.4 of spec-notes)."""
        self.request(P.Request.SET_VRING_ADDR, P.VRING_ADDR.pack(index, 0, desc, used, avail, 0))

    def set_vring_kick(self, index: int, fd: int) -> None:
        self.request(P.Request.SET_VRING_KICK, P.U64.pack(index & P.VRING_IDX_MASK), [fd])

    def set_vring_call(self, index: int, fd: int) -> None:
        self.request(P.Request.SET_VRING_CALL, P.U64.pack(index & P.VRING_IDX_MASK), [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(P.Request.SET_VRING_ENABLE, P.VRING_STATE.pack(index, int(enable)))

    def get_config(self, offset: int, size: int) -> bytes:
        if not 0 < size <= P.MAX_CONFIG_SIZE:
            raise VhostUserError(f"GET_CONFIG size {size} not in 1..{P.MAX_CONFIG_SIZE}",
                                 request="GET_CONFIG")
        payload = P.CONFIG_HEADER.pack(offset, size, 0) + bytes(size)
        reply = self.request(P.Request.GET_CONFIG, payload)
        if len(reply) != P.CONFIG_HEADER.size + size:
            # A zero-length (or short) reply is how a back-end reports failure.
            raise VhostUserNackError(
                f"GET_CONFIG(offset={offset}, size={size}): back-end answered "
                f"{len(reply)} bytes", request="GET_CONFIG", got=reply)
        return reply[P.CONFIG_HEADER.size :]

    def set_status(self, status: int) -> None:
        self.request(P.Request.SET_STATUS, P.U64.pack(status))

    def get_status(self) -> int:
        return self._u64_reply(P.Request.GET_STATUS)

    def reset_device(self) -> None:
        self.request(P.Request.RESET_DEVICE)

    # -- teardown --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0

    def close(self) -> None:
        self._finalizer.detach()
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
