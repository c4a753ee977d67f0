"""BlkDevice's reconnect policy step by step, against in-process devices the test serves by
hand: which requests are resubmitted, on which queue, in which order; flushes held until
the writes resubmitted with them completed; exactly-once delivery; the same with packed
rings, split rings, several queues.  (The one packed vhost-user-blk back-end here, DPDK's
vhost_blk example, keeps its disk in RAM -- a restart empties it -- and serves a ring only
from position 0 with wrap counter 0, so packed reconnects are exercised here.)

The device side is a loopback transport whose ``fail()`` plays the back-end dying and
whose ``reconnect()`` plays a new one coming up (every ring reset: the driver resubmits);
it serves packed rings with virtq.testing.packed_device (sharing nothing with
virtq.queue.packed).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtq.abi import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from virtq.abi.blk import (
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from virtq.devices import BlkDevice, BlkRequest, ReconnectError, ReconnectPolicy
from virtq.errors import ArgumentError, QueueStateError
from virtq.testing.device import Segment
from virtq.testing.loopback import LoopbackTransport
from virtq.transport.reconnect import Outage
from virtq.transport.vhost_user import VhostUserDisconnectedError

CAPACITY = 1 << 12  # sectors


class BlkLoopback(LoopbackTransport):
    """A virtio-blk device of CAPACITY sectors with ``queues`` queues; ``packed`` offers
    VIRTIO_F_RING_PACKED (the loopback serves packed rings itself).  The test plays
    the device with :meth:`serve`; the disk is :attr:`disk`."""

    def __init__(self, *, queues: int = 1, packed: bool = False) -> None:
        features = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC
                    | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_BLK_F_FLUSH
                    | (1 << VIRTIO_BLK_F_MQ if queues > 1 else 0)
                    | (1 << VIRTIO_F_RING_PACKED if packed else 0))
        super().__init__(features=features, queue_sizes=[64] * queues,
                         config=struct.pack("<Q", CAPACITY).ljust(64, b"\0"))
        self.packed = packed
        self.disk = bytearray(CAPACITY * 512)
        #: (queue, kind, sector) of every request served, in order.
        self.log: list[tuple[int, int, int]] = []

    def pop_all(self, index: int) -> list[tuple[int, list[Segment]]]:
        dev = self.devices[index]
        out = []
        while (chain := dev.pop()) is not None:
            out.append(chain)
        return out

    def serve(self, index: int, chain: tuple[int, list[Segment]], *,
              complete: bool = True) -> None:
        """Carry out one request (the data moves); with ``complete`` also complete it."""
        buf_id, segments = chain
        dev = self.devices[index]
        kind, _, sector = struct.unpack("<IIQ", dev.read(segments[0].iova, 16))
        data = segments[1:-1]
        written = 0
        off = sector * 512
        if kind == VIRTIO_BLK_T_IN:
            for s in data:
                dev.write(s.iova, bytes(self.disk[off : off + s.length]))
                off += s.length
                written += s.length
        elif kind == VIRTIO_BLK_T_OUT:
            for s in data:
                self.disk[off : off + s.length] = dev.read(s.iova, s.length)
                off += s.length
        elif kind == VIRTIO_BLK_T_GET_ID:
            dev.write(data[0].iova, b"loopback".ljust(data[0].length, b"\0"))
            written = data[0].length
        self.log.append((index, kind, sector))
        dev.write(segments[-1].iova, b"\0")
        if complete:
            dev.push(buf_id, written + 1)

    def serve_all(self) -> int:
        n = 0
        for index in self.devices:
            for chain in self.pop_all(index):
                self.serve(index, chain)
                n += 1
        return n

    def die(self) -> None:
        self.fail(VhostUserDisconnectedError("the back-end closed the connection"))


POLICY = ReconnectPolicy(timeout=5.0, interval=0.01)


@pytest.fixture(params=[("split", 1), ("split", 3), ("packed", 1), ("packed", 3)],
                ids=["split-1q", "split-3q", "packed-1q", "packed-3q"])
def blk(request: pytest.FixtureRequest) -> Iterator[tuple[BlkDevice, BlkLoopback]]:
    ring, queues = request.param
    t = BlkLoopback(queues=queues, packed=ring == "packed")
    dev = BlkDevice(t, queue_size=64, num_queues=queues, max_io=8192, ring=ring,
                    reconnect=POLICY)
    assert dev.ring == ring
    try:
        yield dev, t
    finally:
        dev.close()


def block(i: int, version: int) -> bytes:
    return bytes([i & 0xFF, version & 0xFF]) * 2048


def drain(dev: BlkDevice, t: BlkLoopback, rounds: int = 20) -> list[BlkRequest]:
    out: list[BlkRequest] = []
    for _ in range(rounds):
        out += dev.poll(timeout=0)
        if not t.serve_all() and not dev.in_flight:
            break
    out += dev.poll(timeout=0)
    return out


def test_resubmits_what_did_not_complete_exactly_once(no_leaks: None, blk: Any) -> None:
    dev, t = blk
    nq = len(dev.queues)
    reqs = [dev.submit_write(i * 16, block(i, 1)) for i in range(12)]
    reqs += [dev.submit_read(i * 16, 4096) for i in range(12, 18)]
    dev.kick()
    # The device completes the first request of each queue, carries out (writes) the
    # second without completing it, and has not looked at the rest when it dies.
    done: list[BlkRequest] = []
    for index in t.devices:
        chains = t.pop_all(index)
        t.serve(index, chains[0])
        t.serve(index, chains[1], complete=False)
    t.die()
    done += dev.poll(timeout=0)  # delivers the completed ones ...
    assert len(done) == nq
    done += dev.poll(timeout=0)  # ... and finding nothing more, notices and reconnects
    assert len(done) == nq
    assert dev.reconnect_stats()["reconnects"] == 1
    assert dev.reconnect_stats()["resubmitted"] == len(reqs) - nq
    t.log.clear()
    done += drain(dev, t)
    assert sorted(map(id, done)) == sorted(map(id, reqs))  # each exactly once
    assert [r.error for r in reqs if r.error is not None] == []
    # Each request went back to its own queue, in the order it was submitted there.
    for qi in range(nq):
        mine = [(r.kind, r.sector) for r in reqs if r.queue == qi][1:]
        assert [(k, s) for q, k, s in t.log if q == qi] == mine
    for i in range(12):
        assert bytes(t.disk[i * 16 * 512 : i * 16 * 512 + 4096]) == block(i, 1)
    stats = dev.stats()
    assert sum(q["resubmitted"] for q in stats) == len(reqs) - nq
    assert [q["submitted"] for q in stats] == [q["completed"] for q in stats]
    assert sum(q["submitted"] for q in stats) == len(reqs)


def test_a_flush_waits_for_the_writes_resubmitted_with_it(blk: Any) -> None:
    dev, t = blk
    writes = [dev.submit_write(i * 16, block(i, 2)) for i in range(4)]
    flush = dev.submit_flush()
    get_id = dev.submit_get_id()
    dev.kick()
    t.die()
    assert dev.poll(timeout=0) == []
    # Resubmitted: the writes and GET_ID; the flush is held back (not in any ring).
    assert dev.in_flight == 6
    t.log.clear()
    served = t.serve_all()
    assert served == 5
    assert all(kind != VIRTIO_BLK_T_FLUSH for _, kind, _ in t.log)
    done = dev.poll(timeout=0)  # the writes complete: now the flush goes
    assert set(map(id, done)) == set(map(id, [*writes, get_id]))
    assert dev.in_flight == 1
    assert t.serve_all() == 1
    assert t.log[-1][1] == VIRTIO_BLK_T_FLUSH
    assert dev.poll(timeout=0) == [flush]
    assert flush.error is None and get_id.result == b"loopback"


def test_a_flush_alone_is_resubmitted_at_once(blk: Any) -> None:
    dev, t = blk
    flush = dev.submit_flush()
    dev.kick()
    t.die()
    assert dev.poll(timeout=0) == []
    assert t.serve_all() == 1
    assert dev.poll(timeout=0) == [flush] and flush.error is None


def test_the_same_outage_when_nothing_completes_between_deaths(blk: Any) -> None:
    """A back-end that dies again before completing anything: the deadline counts from
    the first death (a request that crashes every back-end is not retried forever)."""
    dev, t = blk
    dev.submit_read(0, 512)
    dev.kick()
    t.die()
    dev.poll(timeout=0)
    first = dev._rec.since
    assert first is not None
    t.die()
    dev.poll(timeout=0)
    assert dev._rec.since == first  # same start: no completion in between
    t.serve_all()
    assert len(dev.poll(timeout=0)) == 1
    dev.submit_read(8, 512)
    dev.kick()
    t.die()
    dev.poll(timeout=0)
    assert dev._rec.since is not None
    assert dev._rec.since[0] > first[0]  # progress was made: a new outage


def test_deadline_fails_kept_requests_and_held_flushes(blk: Any, no_leaks: None,
                                                      monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    dev, t = blk
    write = dev.submit_write(0, block(0, 3))
    flush = dev.submit_flush()
    dev.kick()
    t.die()
    # The new back-end comes and dies at once: the flush is held; then nobody comes.
    assert dev.poll(timeout=0) == []
    t.die()
    refused = VhostUserDisconnectedError("connection refused")

    def no_backend(*args: object, **kwargs: object) -> dict[int, list[Any]]:
        raise refused

    monkeypatch.setattr(t, "reconnect", no_backend)
    done = dev.poll(timeout=0)
    assert dev.reconnect_stats()["waiting"]
    outage = dev._rec.outage
    assert isinstance(outage, Outage)
    outage.deadline = 0.0  # the time is up
    done += dev.poll(timeout=0)
    assert set(map(id, done)) == {id(write), id(flush)}
    for r in (write, flush):
        assert isinstance(r.error, ReconnectError)
        assert r.error.last_error is refused
        assert isinstance(r.error.__cause__, VhostUserDisconnectedError)
    assert dev.in_flight == 0
    with pytest.raises(QueueStateError, match="did not come back"):
        dev.submit_read(0, 512)


def test_queue_argument(blk: Any) -> None:
    dev, t = blk
    nq = len(dev.queues)
    last = nq - 1
    reqs = [dev.submit_read(0, 512, queue=last) for _ in range(3)]
    reqs += dev.submit_read_many([8, 16], 512, queue=last)
    reqs.append(dev.submit_write(24, b"w" * 512, queue=last))
    reqs.append(dev.submit_flush(queue=last))
    reqs.append(dev.submit_get_id(queue=last))
    assert {r.queue for r in reqs} == {last}
    assert dev.stats()[last]["in_flight"] == len(reqs)
    for bad in (nq, -1, True, "0", None.__class__):
        with pytest.raises(ArgumentError):
            dev.submit_read(0, 512, queue=bad)  # type: ignore[arg-type]
        with pytest.raises(ArgumentError):
            dev.submit_read_many([0], 512, queue=bad)  # type: ignore[arg-type]
    done = drain(dev, t)
    assert sorted(map(id, done)) == sorted(map(id, reqs))


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from("rwfi"), st.integers(0, 7)), min_size=1,
                    max_size=40),
       cut=st.lists(st.integers(0, 60), max_size=3),
       packed=st.booleans(), queues=st.integers(1, 3))
def test_any_sequence_completes_each_request_once(ops: list[tuple[str, int]],
                                                  cut: list[int], packed: bool,
                                                  queues: int) -> None:
    """Requests of every kind, the device serving a prefix (some completed, some only
    carried out) and dying at arbitrary points, again and again: every request comes
    back once, without an error, and the disk holds the last write of each block."""
    t = BlkLoopback(queues=queues, packed=packed)
    with BlkDevice(t, queue_size=64, num_queues=queues, max_io=8192,
                   ring="packed" if packed else "split", reconnect=POLICY) as dev:
        reqs: list[BlkRequest] = []
        expect: dict[int, bytes] = {}
        busy: set[int] = set()
        for n, (op, blk_no) in enumerate(ops):
            if op in "rw" and blk_no in busy:
                continue  # never two requests on one block in flight together
            if op == "r":
                reqs.append(dev.submit_read(blk_no * 16, 4096))
                busy.add(blk_no)
            elif op == "w":
                data = block(blk_no, n)
                reqs.append(dev.submit_write(blk_no * 16, data))
                expect[blk_no] = data
                busy.add(blk_no)
            elif op == "f":
                reqs.append(dev.submit_flush())
            else:
                reqs.append(dev.submit_get_id())
        dev.kick()
        done: list[BlkRequest] = []
        served = 0
        for point in sorted(cut):
            for index in list(t.devices):
                for chain in t.pop_all(index):
                    served += 1
                    t.serve(index, chain, complete=served <= point)
            t.die()
            done += dev.poll(timeout=0)
        done += drain(dev, t, rounds=40)
        assert sorted(map(id, done)) == sorted(map(id, reqs))
        assert all(r.error is None for r in reqs)
        for blk_no, data in expect.items():
            assert bytes(t.disk[blk_no * 16 * 512 : blk_no * 16 * 512 + 4096]) == data
