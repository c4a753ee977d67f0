"""The vhost-user message layer (VhostUserFrontend) against hostile callers and replies.

Review 2026-11-30: ``get_config(-1, 8)``, ``set_vring_num(-1, 8)`` and
``set_features(1 << 64)`` raised ``struct.error``, ``set_vring_kick(0, -5)`` a raw EBADF,
``timeout=-1`` a raw ValueError and ``timeout=0`` a BlockingIOError; GET_CONFIG's reply
header and GET_QUEUE_NUM's value were not checked.  Here every public request method is
driven with arbitrary arguments -- a bad one must raise ``ArgumentError`` with nothing sent
and the connection still usable -- and every reply with arbitrary bytes: the answer is a
value or a ``VhostUserError``, never a raw exception.

The back-end is the other end of a socketpair: replies are written into it *before* the
request is made (the front-end finds them buffered), and requests are read back from it
and decoded from vhost-user.rst's layouts (not from virtq's struct tables).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtq.errors import ArgumentError, DeviceError, VirtqError
from virtq.transport.vhost_user import (
    VhostUserDisconnectedError,
    VhostUserError,
    VhostUserFrontend,
    VhostUserNackError,
    VhostUserProtocolError,
)
from virtq.transport.vhost_user import protocol as P

# vhost-user.rst, "Message Specification" and "Front-end message types".
HDR = struct.Struct("=III")
GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES = 12, 13, 15, 16
GET_QUEUE_NUM, SET_VRING_ENABLE, GET_CONFIG = 17, 18, 24
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG, SET_STATUS, GET_STATUS = 36, 37, 38, 39, 40
REPLY = 0x5  # version 1 | reply flag

FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


class Pair:
    """A front-end on one end of a socketpair, the test playing back-end on the other."""

    def __init__(self, timeout: float | None = 5.0) -> None:
        a, self.be = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.fe = VhostUserFrontend(a, "socketpair", timeout)

    def reply(self, code: int, payload: bytes, flags: int = REPLY) -> None:
        self.be.sendall(HDR.pack(code, flags, len(payload)) + payload)

    def reply_u64(self, code: int, value: int) -> None:
        self.reply(code, struct.pack("=Q", value))

    def take(self) -> tuple[int, int, bytes, list[int]]:
        """The next request the front-end sent: (code, flags, payload, fds received)."""
        data, fds, _, _ = socket.recv_fds(self.be, 65536, 16, socket.MSG_DONTWAIT)
        code, flags, size = HDR.unpack_from(data)
        assert len(data) == HDR.size + size, "one request per sendmsg"
        for fd in fds:
            os.close(fd)
        return code, flags, data[HDR.size:], fds

    def nothing_sent(self) -> bool:
        try:
            self.be.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except BlockingIOError:
            return True
        return False

    def still_usable(self) -> None:
        self.fe.set_owner()
        assert self.take()[0] == SET_OWNER

    def close(self) -> None:
        self.fe.close()
        self.be.close()

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


@pytest.fixture
def efd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def closed_fd() -> int:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return r


# -- the review's reproducers ---------------------------------------------------------------


def test_review_reproducers_are_argument_errors_and_send_nothing(pair):
    for call in (lambda: pair.fe.get_config(-1, 8), lambda: pair.fe.set_vring_num(-1, 8),
                 lambda: pair.fe.set_features(1 << 64), lambda: pair.fe.set_vring_kick(0, -5)):
        with pytest.raises(ArgumentError):
            call()
        assert pair.nothing_sent()
    pair.still_usable()


def test_closed_fd_is_an_argument_error_not_ebadf(pair):
    fd = closed_fd()
    for call in (pair.fe.set_vring_kick, pair.fe.set_vring_call):
        with pytest.raises(ArgumentError) as info:
            call(0, fd)
        assert info.value.name == "fd"
    with pytest.raises(ArgumentError):
        pair.fe.request(P.Request.SET_VRING_KICK, struct.pack("=Q", 0), [fd])
    with pytest.raises(ArgumentError):
        pair.fe.set_mem_table([(0, 4096, 0x10000, 0, fd)])
    assert pair.nothing_sent()
    pair.still_usable()


# -- every method, table-driven ------------------------------------------------------------


def bad_calls(fe: VhostUserFrontend, efd: int):
    """(description, call) for arguments each method must refuse."""
    good = (0x1000, 0x2000, 0x7F00_0000_0000, 0, efd)
    yield from [
        ("set_features(-1)", lambda: fe.set_features(-1)),
        ("set_features(2**64)", lambda: fe.set_features(1 << 64)),
        ("set_features('1')", lambda: fe.set_features("1")),
        ("set_features(True)", lambda: fe.set_features(True)),
        ("set_protocol_features(2**64)", lambda: fe.set_protocol_features(1 << 64)),
        ("set_protocol_features(1.0)", lambda: fe.set_protocol_features(1.0)),
        ("set_vring_num(256, 8)", lambda: fe.set_vring_num(256, 8)),
        ("set_vring_num(0, 0)", lambda: fe.set_vring_num(0, 0)),
        ("set_vring_num(0, 32769)", lambda: fe.set_vring_num(0, 32769)),
        ("set_vring_num(0, 2**32)", lambda: fe.set_vring_num(0, 1 << 32)),
        ("set_vring_base(0, -1)", lambda: fe.set_vring_base(0, -1)),
        ("set_vring_base(0, 2**32)", lambda: fe.set_vring_base(0, 1 << 32)),
        ("set_vring_base(-1, 0)", lambda: fe.set_vring_base(-1, 0)),
        ("get_vring_base(2**32)", lambda: fe.get_vring_base(1 << 32)),
        ("get_vring_base(None)", lambda: fe.get_vring_base(None)),
        ("set_vring_addr(0, -1, 0, 0)", lambda: fe.set_vring_addr(0, -1, 0, 0)),
        ("set_vring_addr(0, 0, 2**64, 0)", lambda: fe.set_vring_addr(0, 0, 1 << 64, 0)),
        ("set_vring_addr(0, 0, 0, 0.5)", lambda: fe.set_vring_addr(0, 0, 0, 0.5)),
        ("set_vring_kick(0, -5)", lambda: fe.set_vring_kick(0, -5)),
        ("set_vring_kick(256, efd)", lambda: fe.set_vring_kick(256, efd)),
        ("set_vring_kick(0, '3')", lambda: fe.set_vring_kick(0, "3")),
        ("set_vring_call(0, None)", lambda: fe.set_vring_call(0, None)),
        ("set_vring_call(-1, efd)", lambda: fe.set_vring_call(-1, efd)),
        ("set_vring_enable(0, 2)", lambda: fe.set_vring_enable(0, 2)),
        ("set_vring_enable(0, 'yes')", lambda: fe.set_vring_enable(0, "yes")),
        ("set_vring_enable(300, True)", lambda: fe.set_vring_enable(300, True)),
        ("get_config(0, 0)", lambda: fe.get_config(0, 0)),
        ("get_config(0, 257)", lambda: fe.get_config(0, 257)),
        ("get_config(250, 8)", lambda: fe.get_config(250, 8)),
        ("get_config(2**32, 8)", lambda: fe.get_config(1 << 32, 8)),
        ("get_config(0, -8)", lambda: fe.get_config(0, -8)),
        ("get_config(0.0, 8)", lambda: fe.get_config(0.0, 8)),
        ("set_status(256)", lambda: fe.set_status(256)),
        ("set_status(-1)", lambda: fe.set_status(-1)),
        ("set_mem_table([])", lambda: fe.set_mem_table([])),
        ("set_mem_table(9 regions)", lambda: fe.set_mem_table(
            [(i << 20, 4096, (i + 1) << 32, 0, efd) for i in range(9)])),
        ("set_mem_table(size 0)", lambda: fe.set_mem_table([(0, 0, 0x1000, 0, efd)])),
        ("set_mem_table(gpa -1)", lambda: fe.set_mem_table([(-1, 4096, 0x1000, 0, efd)])),
        ("set_mem_table(wraps)", lambda: fe.set_mem_table([((1 << 64) - 4096, 8192, 0, 0,
                                                            efd)])),
        ("set_mem_table(fd -1)", lambda: fe.set_mem_table([(0, 4096, 0x1000, 0, -1)])),
        ("set_mem_table(4-tuple)", lambda: fe.set_mem_table([(0, 4096, 0x1000, 0)])),
        ("set_mem_table(gpa overlap)", lambda: fe.set_mem_table(
            [(0, 8192, 0x10000, 0, efd), (4096, 4096, 0x20000, 0, efd)])),
        ("set_mem_table(uva overlap)", lambda: fe.set_mem_table(
            [(0, 8192, 0x10000, 0, efd), (0x10000, 4096, 0x11000, 0, efd)])),
        ("set_mem_table(None)", lambda: fe.set_mem_table(None)),
        ("add_mem_reg(fd -1)", lambda: fe.add_mem_reg((*good[:4], -1))),
        ("add_mem_reg(size 0)", lambda: fe.add_mem_reg((0, 0, 0x1000, 0, efd))),
        ("add_mem_reg(offset 2**64)", lambda: fe.add_mem_reg((0, 4096, 0x1000, 1 << 64, efd))),
        ("rem_mem_reg(uva -1)", lambda: fe.rem_mem_reg((0, 4096, -1, 0, efd))),
        ("request(99)", lambda: fe.request(99)),
        ("request(payload str)", lambda: fe.request(P.Request.SET_OWNER, "x")),
        ("request(payload 4097)", lambda: fe.request(P.Request.SET_OWNER, bytes(4097))),
        ("request(9 fds)", lambda: fe.request(P.Request.SET_OWNER, b"", [efd] * 9)),
        ("request(fds None)", lambda: fe.request(P.Request.SET_OWNER, b"", None)),
    ]


def test_every_method_refuses_bad_arguments_before_sending(pair, efd):
    for what, call in bad_calls(pair.fe, efd):
        with pytest.raises(ArgumentError):
            call()
        assert pair.nothing_sent(), f"{what} sent something"
    pair.still_usable()


# -- what goes on the wire, for any argument ----------------------------------------------

u = st.integers


def junk_or(valid: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.one_of(valid, u(min_value=-(1 << 70), max_value=1 << 70),
                     st.sampled_from([-1, 0, 255, 256, 0xFFFF, 1 << 16, 1 << 32, 1 << 64]),
                     st.floats(), st.booleans(), st.none(), st.text(max_size=3))


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@FIXTURE_OK
@given(index=junk_or(u(0, 255)), num=junk_or(u(1, 32768)), base=junk_or(u(0, 2**32 - 1)))
def test_vring_state_requests_send_exactly_the_fields_or_refuse(index, num, base):
    with Pair() as pair:
        for code, call, value, value_ok in (
            (SET_VRING_NUM, pair.fe.set_vring_num, num, _int(num) and 1 <= num <= 32768),
            (SET_VRING_BASE, pair.fe.set_vring_base, base, _int(base) and 0 <= base < 1 << 32),
        ):
            ok = value_ok and _int(index) and 0 <= index <= 255
            try:
                call(index, value)
            except ArgumentError:
                assert not ok and pair.nothing_sent()
                continue
            assert ok
            got = pair.take()
            assert got[0] == code and got[2] == struct.pack("=II", index, value)


@FIXTURE_OK
@given(index=junk_or(u(0, 255)), fd_kind=st.one_of(
    st.sampled_from(["open", "closed", "negative"]), junk_or(st.just(2**31))))
def test_kick_and_call_carry_the_index_and_the_fd_or_refuse(efd, index, fd_kind):
    with Pair() as pair:
        fd = {"open": efd, "closed": closed_fd(), "negative": -5}.get(fd_kind, fd_kind)
        if fd_kind != "open" and _int(fd) and 0 <= fd < 1 << 16:
            fd = closed_fd()  # a number that may be open here: use one surely closed
        ok = _int(index) and 0 <= index <= 255 and fd_kind == "open"
        for code, call in ((SET_VRING_KICK, pair.fe.set_vring_kick),
                           (SET_VRING_CALL, pair.fe.set_vring_call)):
            try:
                call(index, fd)
            except ArgumentError:
                assert not ok and pair.nothing_sent()
                continue
            assert ok
            got_code, _, payload, fds = pair.take()
            # Bits 0-7 the index, bit 8 clear: an fd rides along (vhost-user.rst).
            assert (got_code, payload, len(fds)) == (code, struct.pack("=Q", index), 1)


@FIXTURE_OK
@given(features=junk_or(u(0, 2**64 - 1)), status=junk_or(u(0, 255)))
def test_u64_requests_send_the_value_or_refuse(features, status):
    with Pair() as pair:
        for code, call, value, bits in ((SET_FEATURES, pair.fe.set_features, features, 64),
                                        (SET_PROTOCOL_FEATURES, pair.fe.set_protocol_features,
                                         features, 64),
                                        (SET_STATUS, pair.fe.set_status, status, 8)):
            ok = _int(value) and 0 <= value < 1 << bits
            try:
                call(value)
            except ArgumentError:
                assert not ok and pair.nothing_sent()
                continue
            assert ok
            got = pair.take()
            assert (got[0], got[2]) == (code, struct.pack("=Q", value))
            pair.fe.reply_ack = False  # a REPLY_ACK bit among the features would want acks


@FIXTURE_OK
@given(offset=junk_or(u(0, 255)), size=junk_or(u(1, 256)))
def test_get_config_requests_within_the_256_byte_space(offset, size):
    with Pair() as pair:
        ok = _int(offset) and _int(size) and offset >= 0 and size >= 1 and offset + size <= 256
        if ok:
            pair.reply(GET_CONFIG, struct.pack("=III", offset, size, 0) + bytes(range(size)))
        try:
            data = pair.fe.get_config(offset, size)
        except ArgumentError:
            assert not ok and pair.nothing_sent()
            return
        assert ok and data == bytes(range(size))
        code, _, payload, _ = pair.take()
        assert code == GET_CONFIG and payload == struct.pack("=III", offset, size, 0) + bytes(size)


@FIXTURE_OK
@given(gpa=junk_or(u(0, 2**48)), size=junk_or(u(1, 2**40)), uva=junk_or(u(0, 2**47)),
       offset=junk_or(u(0, 2**20)))
def test_memory_region_requests_use_the_single_region_layout(efd, gpa, size, uva,
                                                             offset):
    with Pair() as pair:
        ok = all(_int(v) and 0 <= v < 1 << 64 for v in (gpa, size, uva, offset)) and size > 0 \
            and gpa + size <= 1 << 64 and uva + size <= 1 << 64
        for code, call in ((ADD_MEM_REG, pair.fe.add_mem_reg), (REM_MEM_REG, pair.fe.rem_mem_reg),
                           (SET_MEM_TABLE, lambda r: pair.fe.set_mem_table([r]))):
            try:
                call((gpa, size, uva, offset, efd))
            except ArgumentError:
                assert not ok and pair.nothing_sent()
                continue
            assert ok
            got_code, _, payload, fds = pair.take()
            assert got_code == code and len(fds) == 1
            if code == SET_MEM_TABLE:  # num regions u32, padding u32, then the region
                assert payload == struct.pack("=IIQQQQ", 1, 0, gpa, size, uva, offset)
            else:  # "Single memory region description": u64 padding, then the region
                assert payload == struct.pack("=QQQQQ", 0, gpa, size, uva, offset)


def test_add_and_remove_region_wait_for_the_ack_with_reply_ack(pair, efd):
    pair.fe.set_protocol_features(1 << 3)  # REPLY_ACK (itself not acked: not yet on)
    pair.take()
    region = (0x100000, 0x200000, 0x7F00_0000_0000, 0, efd)
    pair.reply_u64(ADD_MEM_REG, 0)
    pair.fe.add_mem_reg(region)
    assert pair.take()[1] & 0x8  # NEED_REPLY
    pair.reply_u64(REM_MEM_REG, 1)
    with pytest.raises(VhostUserNackError):
        pair.fe.rem_mem_reg(region)
    pair.take()
    pair.reply_u64(SET_OWNER, 0)
    pair.still_usable()  # a NACK leaves the connection in step


# -- replies --------------------------------------------------------------------------------


def test_get_config_reply_header_must_match_the_request(pair):
    for header in ((4, 8, 0), (0, 4, 0), (0, 8, 1)):
        p = Pair()
        try:
            size = header[1]
            p.reply(GET_CONFIG, struct.pack("=III", *header) + bytes(size))
            with pytest.raises(VhostUserProtocolError) as info:
                p.fe.get_config(0, 8)
            assert isinstance(info.value, DeviceError)
            with pytest.raises(VhostUserDisconnectedError):  # out of step: unusable now
                p.fe.set_owner()
        finally:
            p.close()
    # An empty payload is the back-end's documented failure: a NACK, still in step.
    pair.reply(GET_CONFIG, b"")
    with pytest.raises(VhostUserNackError):
        pair.fe.get_config(0, 8)
    pair.take()
    pair.still_usable()


@pytest.mark.parametrize(("code", "method", "bad", "good"), [
    (GET_QUEUE_NUM, "get_queue_num", [0, 0x10000, 2**64 - 1, 2**32], [1, 0xFFFF]),
    (GET_STATUS, "get_status", [0x100, 2**64 - 1], [0, 0xFF]),
    (GET_MAX_MEM_SLOTS, "get_max_mem_slots", [0], [1, 509, 2**64 - 1]),
])
def test_u64_replies_are_bounded(code, method, bad, good):
    for value in good:
        p = Pair()
        try:
            p.reply_u64(code, value)
            assert getattr(p.fe, method)() == value
        finally:
            p.close()
    for value in bad:
        p = Pair()
        try:
            p.reply_u64(code, value)
            with pytest.raises(VhostUserProtocolError) as info:
                getattr(p.fe, method)()
            assert info.value.got == value
        finally:
            p.close()


REPLY_CALLS = {
    GET_FEATURES: lambda fe: fe.get_features(),
    GET_PROTOCOL_FEATURES: lambda fe: fe.get_protocol_features(),
    GET_QUEUE_NUM: lambda fe: fe.get_queue_num(),
    GET_VRING_BASE: lambda fe: fe.get_vring_base(3),
    GET_CONFIG: lambda fe: fe.get_config(0, 16),
    GET_STATUS: lambda fe: fe.get_status(),
    GET_MAX_MEM_SLOTS: lambda fe: fe.get_max_mem_slots(),
}


@settings(max_examples=300)
@given(code=st.sampled_from(sorted(REPLY_CALLS)), reply_code=st.one_of(
    st.just(None), u(0, 2**32 - 1)), flags=st.one_of(st.just(REPLY), u(0, 2**32 - 1)),
    payload=st.one_of(st.binary(max_size=300), st.builds(
        lambda h, d: struct.pack("=III", *h) + d,
        st.tuples(u(0, 20), u(0, 20), u(0, 3)), st.binary(max_size=20))),
    size=st.one_of(st.none(), u(0, 2**32 - 1)))
def test_any_reply_gives_a_value_or_a_vhost_user_error(code, reply_code, flags, payload,
                                                       size):
    p = Pair()
    try:
        header = HDR.pack(code if reply_code is None else reply_code, flags,
                          len(payload) if size is None else size)
        p.be.sendall(header + payload)
        p.be.shutdown(socket.SHUT_WR)  # a short reply ends in EOF, not in a wait
        with contextlib.suppress(VhostUserError):
            REPLY_CALLS[code](p.fe)
    finally:
        p.close()


# -- timeouts and paths -------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vq-") as d:
        path = Path(d) / "s"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        srv.listen(8)
        try:
            yield path
        finally:
            srv.close()


BAD_TIMEOUTS = [-1, 0, 0.0, -0.5, math.nan, math.inf, -math.inf, 1e300, "1", True, False,
                [1], 3e6]


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS, ids=repr)
def test_bad_timeouts_are_argument_errors(listener, timeout, no_leaks):
    with pytest.raises(ArgumentError) as info:
        VhostUserFrontend.connect(listener, timeout=timeout)
    assert info.value.name == "timeout"
    a, b = socket.socketpair()
    try:
        with pytest.raises(ArgumentError):
            VhostUserFrontend(a, "pair", timeout)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("timeout", [None, 0.001, 1, 2.5, 2_147_483])
def test_good_timeouts(listener, timeout, no_leaks):
    with VhostUserFrontend.connect(listener, timeout=timeout) as fe:
        assert fe.timeout == timeout and fe.sock.gettimeout() == timeout


@pytest.mark.parametrize("path", ["", "a\0b", "x" * 108, 3, None, b"/tmp/\0x"], ids=repr)
def test_bad_socket_paths_are_argument_errors(path, no_leaks):
    with pytest.raises(ArgumentError) as info:
        VhostUserFrontend.connect(path)
    assert info.value.name == "path"


def test_frontend_needs_a_unix_stream_socket():
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with contextlib.closing(udp), pytest.raises(ArgumentError):
        VhostUserFrontend(udp, "udp", 1.0)
    with pytest.raises(ArgumentError):
        VhostUserFrontend("not a socket", "x", 1.0)


def test_errors_are_all_virtq_errors():
    assert issubclass(VhostUserError, VirtqError)
    assert issubclass(ArgumentError, ValueError)
