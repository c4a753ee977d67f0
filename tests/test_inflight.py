"""vhost-user's inflight I/O tracking (vhost-user.rst, "Inflight I/O tracking"): the
front-end's GET_INFLIGHT_FD / SET_INFLIGHT_FD messages against replies the test writes,
and the embedded back-end's split-ring region, crashed between any two of its stores."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtq.errors import ArgumentError
from virtq.memory import MemfdRegion
from virtq.testing.embedded.inflight import (
    DESC_STATE,
    QUEUE_HEADER,
    InflightBuffer,
    InflightQueue,
    queue_region_size,
)
from virtq.transport.vhost_user import VhostUserFrontend, VhostUserProtocolError

HDR = struct.Struct("=III")
GET_INFLIGHT_FD, SET_INFLIGHT_FD = 31, 32
# The inflight description: mmap_size u64, mmap_offset u64, num_queues u16, queue_size u16,
# laid out as QEMU's C struct is (padded to 24 bytes).
INFLIGHT = struct.Struct("=QQHHxxxx")
REPLY = 0x5


class Pair:
    def __init__(self) -> None:
        a, self.be = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.fe = VhostUserFrontend(a, "socketpair", 5.0)

    def reply(self, code: int, payload: bytes, fds: list[int] | None = None) -> None:
        data = HDR.pack(code, REPLY, len(payload)) + payload
        if fds:
            socket.send_fds(self.be, [data], fds)
        else:
            self.be.sendall(data)

    def take(self) -> tuple[int, bytes, list[int]]:
        data, fds, _, _ = socket.recv_fds(self.be, 4096, 4, socket.MSG_DONTWAIT)
        code, _, size = HDR.unpack_from(data)
        return code, data[HDR.size : HDR.size + size], fds

    def close(self) -> None:
        self.fe.close()
        self.be.close()


@pytest.fixture
def pair() -> Pair:
    p = Pair()
    yield p  # type: ignore[misc]
    p.close()


def test_get_inflight_fd_returns_the_backends_fd(pair: Pair, no_leaks: None) -> None:
    with MemfdRegion(8192) as region:
        assert region.fd is not None
        pair.reply(GET_INFLIGHT_FD, INFLIGHT.pack(8192, 0, 4, 128), [region.fd])
        fd, size, offset = pair.fe.get_inflight_fd(4, 128)
        try:
            assert (size, offset) == (8192, 0)
            assert os.fstat(fd).st_ino == os.fstat(region.fd).st_ino
        finally:
            os.close(fd)
    code, payload, _ = pair.take()
    assert code == GET_INFLIGHT_FD
    assert INFLIGHT.unpack(payload) == (0, 0, 4, 128)


def test_set_inflight_fd_sends_the_region_and_its_fd(pair: Pair, no_leaks: None) -> None:
    with MemfdRegion(4096) as region:
        assert region.fd is not None
        pair.fe.set_inflight_fd(region.fd, 4096, 0, 2, 64)
        code, payload, fds = pair.take()
        try:
            assert code == SET_INFLIGHT_FD
            assert INFLIGHT.unpack(payload) == (4096, 0, 2, 64)
            assert len(fds) == 1
            assert os.fstat(fds[0]).st_ino == os.fstat(region.fd).st_ino
        finally:
            for fd in fds:
                os.close(fd)


@pytest.mark.parametrize("reply", [
    "no fd", "short", "empty region",
])
def test_bad_get_inflight_fd_replies_leave_no_fd(pair: Pair, no_leaks: None,
                                                 reply: str) -> None:
    with MemfdRegion(4096) as region:
        assert region.fd is not None
        if reply == "no fd":
            pair.reply(GET_INFLIGHT_FD, INFLIGHT.pack(4096, 0, 1, 8))
        elif reply == "short":
            pair.reply(GET_INFLIGHT_FD, INFLIGHT.pack(4096, 0, 1, 8)[:20], [region.fd])
        else:
            pair.reply(GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, 1, 8), [region.fd])
        with pytest.raises(VhostUserProtocolError):
            pair.fe.get_inflight_fd(1, 8)
    pair.take()


@pytest.mark.parametrize(("args", "name"), [
    ((0, 8), "num_queues"), ((1, 0), "queue_size"), ((1 << 16, 8), "num_queues"),
    ((1, -1), "queue_size"), ((True, 8), "num_queues"),
])
def test_get_inflight_fd_arguments(pair: Pair, args: tuple[int, int], name: str) -> None:
    with pytest.raises(ArgumentError) as info:
        pair.fe.get_inflight_fd(*args)
    assert info.value.name == name


def test_set_inflight_fd_arguments(pair: Pair) -> None:
    with pytest.raises(ArgumentError):
        pair.fe.set_inflight_fd(-1, 4096, 0, 1, 8)
    with MemfdRegion(4096) as region:
        assert region.fd is not None
        with pytest.raises(ArgumentError):
            pair.fe.set_inflight_fd(region.fd, 0, 0, 1, 8)
        with pytest.raises(ArgumentError):
            pair.fe.set_inflight_fd(region.fd, 4096, 0, 1, 1 << 16)


# -- the back-end's region ----------------------------------------------------------------

SIZE = 8


def fresh_queue() -> tuple[MemfdRegion, InflightQueue]:
    region = MemfdRegion(queue_region_size(SIZE))
    q = InflightQueue(region, 0, SIZE)
    q.initialise()
    return region, q


def test_layout_is_the_documents() -> None:
    # QueueRegionSplit's header is 16 bytes, DescStateSplit 16; regions are 64-aligned.
    assert QUEUE_HEADER.size == 16 and DESC_STATE.size == 16
    assert queue_region_size(128) == 16 + 16 * 128 + 48
    region, q = fresh_queue()
    with region.view(0, 16) as v:
        assert struct.unpack("=QHHHH", v) == (0, 1, SIZE, 0, 0)
    q.close()
    region.close()


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.integers(1, 4), min_size=1, max_size=12),
       crash=st.integers(0, 200), data=st.data())
def test_recovery_after_a_crash_between_any_two_stores(batches: list[int], crash: int,
                                                       data: st.DataObject) -> None:
    """A back-end takes chains in avail order and completes them in batches, in the order
    the document gives (link each, publish used.idx, clear each, store used_idx); it dies
    after ``crash`` steps.  A new back-end's recovery must return exactly the heads taken
    and not yet published, in the order they were taken -- no lost request, and no
    request completed twice."""
    region, q = fresh_queue()
    try:
        free = list(range(SIZE))
        taken: list[int] = []  # in flight, in take order
        published_idx = 0  # the used ring's idx, as the driver sees it
        steps = 0

        def step() -> bool:
            nonlocal steps
            steps += 1
            return steps <= crash

        alive = True
        for size in batches:
            # Take up to `size` chains (any free heads: the driver reuses them freely).
            for _ in range(size):
                if not free or not (alive := step()):
                    break
                head = free.pop(data.draw(st.integers(0, len(free) - 1)))
                q.take(head)
                taken.append(head)
            if not alive:
                break
            # Complete a batch: any subset of what is in flight, in any order.
            k = data.draw(st.integers(0, len(taken)))
            batch = data.draw(st.permutations(taken))[:k]
            for head in batch:
                if not (alive := step()):
                    break
                q.link(head)
            if not alive:
                break
            if not (alive := step()):
                break
            before = published_idx
            published_idx = (published_idx + len(batch)) & 0xFFFF  # used.idx stored
            for head in batch:
                taken.remove(head)
            # Clear each head's flag, then store used_idx: a crash may stop it anywhere.
            for j in range(1, len(batch) + 1):
                if not (alive := step()):
                    q.retire(batch[: j - 1], before)  # the flags cleared so far
                    break
            if not alive or not (alive := step()):
                break
            q.retire(batch, published_idx)
            free.extend(batch)
        q2 = InflightQueue(region, 0, SIZE)
        try:
            assert q2.recover(published_idx) == taken
            assert q2.in_flight() == len(taken)
        finally:
            q2.close()
    finally:
        q.close()
        region.close()


def test_a_region_never_initialised_holds_nothing() -> None:
    with MemfdRegion(InflightBuffer.nbytes(2, SIZE)) as region:
        buf = InflightBuffer(region, 2, SIZE)
        try:
            assert buf.queues[1].recover(5) == []
            assert buf.queues[1].valid  # and is initialised now
        finally:
            for q in buf.queues:
                q.close()
