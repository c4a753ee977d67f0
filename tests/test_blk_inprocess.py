"""BlkDevice's request bookkeeping against an in-process device (DeviceQueue, or
PackedDeviceQueue on a packed ring) that a test drives step by step: what the device sees
in the rings, and what the driver does with a device that misbehaves half-way through a
batch.  Every test that takes the ``blk`` fixture, and the state machine, run over both
ring formats: the device code does not know which it has.  The same paths run against real
qemu-storage-daemon in test_vhost_user_blk.py; here each step is deterministic."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from virtq.abi import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from virtq.abi.blk import VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_IN
from virtq.devices import BlkDevice, DmaBuffer
from virtq.devices.blk import BlkRequest
from virtq.errors import (
    ArgumentError,
    DeviceProtocolError,
    QueueBrokenError,
    QueueFullError,
    QueueStateError,
)
from virtq.queue import PackedQueue
from virtq.testing import HostileDevice, PackedHostileDevice
from virtq.testing.device import Segment
from virtq.testing.loopback import LoopbackTransport as Loopback
from virtq.transport.vhost_user import VhostUserDisconnectedError

CAPACITY = 1 << 16  # sectors


def sector_bytes(sector: int, nbytes: int) -> bytes:
    """What the fake disk holds: each 512-byte sector filled with its number (mod 251)."""
    return b"".join(bytes([(sector + i) % 251]) * 512 for i in range(nbytes // 512))


class LoopbackTransport(Loopback):
    """A virtio-blk device of CAPACITY sectors with one queue, served by hand; ``packed``
    offers VIRTIO_F_RING_PACKED (the device then takes a packed ring)."""

    def __init__(self, *, indirect: bool = True, packed: bool = False) -> None:
        super().__init__(
            features=(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX
                      | 1 << VIRTIO_BLK_F_FLUSH
                      | (1 << VIRTIO_F_INDIRECT_DESC if indirect else 0)
                      | (1 << VIRTIO_F_RING_PACKED if packed else 0)),
            queue_sizes=[256], config=struct.pack("<Q", CAPACITY).ljust(64, b"\0"))

    # -- the device, step by step ---------------------------------------------------------

    def pop_all(self) -> list[tuple[int, list[Segment]]]:
        dev = self.devices[0]
        chains = []
        while (chain := dev.pop()) is not None:
            chains.append(chain)
        return chains

    def serve(self, head: int, segments: list[Segment]) -> None:
        """A virtio-blk read: header, data (writable), status (writable)."""
        dev = self.devices[0]
        kind, _, sector = struct.unpack("<IIQ", dev.read(segments[0].iova, 16))
        assert kind == VIRTIO_BLK_T_IN
        data = sector_bytes(sector, sum(s.length for s in segments[1:-1]))
        off = 0
        for seg in segments[1:-1]:
            dev.write(seg.iova, data[off : off + seg.length])
            off += seg.length
        dev.write(segments[-1].iova, b"\0")
        dev.push(head, off + 1, publish=False)


@pytest.fixture(params=[(True, "split"), (False, "split"), (True, "packed"),
                        (False, "packed")],
                ids=["indirect", "direct", "packed-indirect", "packed-direct"])
def blk(request: pytest.FixtureRequest) -> Iterator[tuple[BlkDevice, LoopbackTransport]]:
    indirect, ring = request.param
    transport = LoopbackTransport(indirect=indirect, packed=ring == "packed")
    dev = BlkDevice(transport, queue_size=32, max_io=8192, indirect=indirect)  # ring="auto"
    try:
        assert dev.ring == ring
        assert isinstance(dev.queues[0], PackedQueue) == (ring == "packed")
        yield dev, transport
    finally:
        dev.close()


def serve_all(t: LoopbackTransport, *, order: list[int] | None = None) -> int:
    chains = t.pop_all()
    for i in order if order is not None else range(len(chains)):
        t.serve(*chains[i])
    t.devices[0].publish_used()
    return len(chains)


def test_submit_read_many_copying(no_leaks, blk):
    dev, t = blk
    sectors = [5, 900, 17, CAPACITY - 16]
    reqs = dev.submit_read_many(sectors, 4096)
    assert dev.in_flight == 4
    dev.kick()
    assert serve_all(t, order=[2, 0, 3, 1]) == 4
    done = dev.poll()
    assert [r.sector for r in done] == [17, 5, CAPACITY - 16, 900]
    for s, r in zip(sectors, reqs, strict=True):
        assert r.wait() == sector_bytes(s, 4096)
        assert r.written == 4097
    assert dev.in_flight == 0


def test_zero_copy_refill_points_each_descriptor_at_its_buffer(no_leaks, blk):
    """Refilling with the reaped requests' buffers skips rewriting descriptors that already
    point at them; any other pairing of slots and buffers must be rewritten.  Check from the
    device's side that every request's data goes to the buffer it was given."""
    dev, t = blk
    arena = dev.alloc_buffer(8 * 4096)
    bufs = [arena.slice(i * 4096, 4096) for i in range(8)]
    rng = random.Random(7)
    reqs = dev.submit_read_many([rng.randrange(CAPACITY - 8) for _ in bufs], into=bufs)
    for rnd in range(12):
        dev.kick()
        chains = t.pop_all()
        assert len(chains) == len(reqs)
        by_head = dict(chains)
        # the device sees the buffer each request was given, in the order submitted
        for (_, segs), r in zip(chains, reqs, strict=True):
            if r.into:
                assert (segs[1].iova, segs[1].length) == (r.into[0].iova, 4096)
            else:
                assert segs[1].length == 1024
        order = list(range(len(chains)))
        rng.shuffle(order)
        for i in order:
            head = chains[i][0]
            t.serve(head, by_head[head])
        t.devices[0].publish_used()
        done = dev.poll()
        assert len(done) == len(reqs)
        for r in done:
            if r.into:
                assert r.into[0].read() == sector_bytes(r.sector, 4096)
            else:
                assert r.wait() == sector_bytes(r.sector, 1024)
        again = [r.into[0] for r in done if r.into]
        if rnd % 3 == 1:
            rng.shuffle(again)  # buffers move to other slots
        if rnd % 3 == 2:
            again = again[:5]  # fewer requests than slots just freed
        reqs = dev.submit_read_many([rng.randrange(CAPACITY - 8) for _ in again], into=again)
        # copying and single requests share the slots and their persistent tables
        extra = dev.submit_read(rng.randrange(CAPACITY - 8), 1024)
        reqs.append(extra)


def test_submit_read_many_is_all_or_nothing(blk):
    dev, t = blk
    arena = dev.alloc_buffer(4 * 4096)
    bufs = [arena.slice(i * 4096, 4096) for i in range(4)]
    snapshot = dev.queues[0].snapshot()
    for call, error in [
        (lambda: dev.submit_read_many([1, 2, -1, 4], 4096), ArgumentError),
        (lambda: dev.submit_read_many([1, 1.5], 4096), ArgumentError),
        (lambda: dev.submit_read_many([1, 1 << 64], 4096), ArgumentError),
        (lambda: dev.submit_read_many([1, 2], 100), ArgumentError),
        (lambda: dev.submit_read_many([1, 2], 16384), ArgumentError),  # over max_io
        (lambda: dev.submit_read_many([1, 2], into=bufs[:1]), ArgumentError),
        (lambda: dev.submit_read_many([1, 2], into=[bufs[0], arena.slice(0, 512)]),
         ArgumentError),  # two lengths in one call
        (lambda: dev.submit_read_many([1], into=[b"\0" * 4096]), ArgumentError),
        (lambda: dev.submit_read_many([1], into=[arena.slice(0, 100)]), ArgumentError),
        (lambda: dev.submit_read_many(list(range(dev.slots_per_queue + 1)), 512),
         QueueFullError),
    ]:
        with pytest.raises(error):
            call()
        assert dev.in_flight == 0
        assert dev.queues[0].snapshot() == snapshot
    assert dev.submit_read_many([], 512) == []
    # the slots are all usable afterwards
    reqs = dev.submit_read_many(list(range(0, 8 * dev.slots_per_queue, 8)), 512)
    assert len(reqs) == dev.slots_per_queue
    dev.kick()
    serve_all(t)
    dev.poll()
    assert [r.wait() for r in reqs] == [sector_bytes(r.sector, 512) for r in reqs]


def test_direct_batch_refused_whole_when_scatter_requests_hold_descriptors():
    t = LoopbackTransport(indirect=False)
    with BlkDevice(t, queue_size=16, max_io=4096, indirect=False) as dev:
        assert dev.slots_per_queue == 5  # sized for three descriptors per request
        arena = dev.alloc_buffer(4 * 1024)
        for i in range(2):  # header + two data + status: four descriptors each
            dev.submit_read(i * 8, into=[arena.slice(i * 2048, 1024),
                                         arena.slice(i * 2048 + 1024, 1024)])
        before = dev.queues[0].snapshot()
        assert before["num_free"] == 8
        with pytest.raises(QueueFullError):  # three free slots, but 9 > 8 descriptors
            dev.submit_read_many([100, 200, 300], 512)
        assert dev.queues[0].snapshot() == before and dev.in_flight == 2
        reqs = dev.submit_read_many([100, 200], 512)
        dev.kick()
        serve_all(t)
        dev.poll()
        assert [r.wait() for r in reqs] == [sector_bytes(100, 512), sector_bytes(200, 512)]


def test_device_error_mid_batch_completes_the_good_and_fails_the_rest(blk):
    dev, t = blk
    reqs = dev.submit_read_many([10, 20, 30], 512)
    dev.kick()
    chains = t.pop_all()
    t.serve(*chains[1])  # one good completion, then an element naming no head
    t.devices[0].publish_used()
    q = dev.queues[0]
    device = t.devices[0]
    if dev.ring == "packed":  # a used descriptor at the device's next used position
        hostile = PackedHostileDevice(q.region, q.layout,  # type: ignore[attr-defined]
                                      used_index=device.used_index,  # type: ignore[union-attr]
                                      used_wrap=device.used_wrap)  # type: ignore[union-attr]
        hostile.complete(q.size + 3, 0)
        hostile.close()
    else:
        HostileDevice(q.region, q.layout).complete(q.size + 3, 0)  # type: ignore[attr-defined]
    done = dev.poll()  # a device error is not the caller's: poll() does not raise
    assert set(done) == set(reqs)
    assert reqs[1].wait() == sector_bytes(20, 512)  # completed before the bad element
    for r in (reqs[0], reqs[2]):
        assert r.done
        with pytest.raises(QueueBrokenError) as info:
            r.wait()
        assert isinstance(info.value.__cause__, DeviceProtocolError)
        assert ".id" in str(info.value.__cause__)  # used.ring[k].id / desc[k].id
    assert dev.in_flight == 0
    assert t.stopped == {0}  # the broken ring was stopped before anything else
    # The only queue is broken: new requests are refused with the reason...
    with pytest.raises(QueueStateError, match="broken") as refused:
        dev.submit_read(40, 512)
    assert isinstance(refused.value.__cause__, DeviceProtocolError)
    # ... until the device is reset (here: a reconnect), which frees every slot.
    dev.reconnect()
    assert dev.stats()[0]["free_slots"] == dev.slots_per_queue
    again = dev.submit_read_many([40, 48], 512)
    dev.kick()
    serve_all(t)
    dev.poll()
    assert [r.wait() for r in again] == [sector_bytes(40, 512), sector_bytes(48, 512)]


class BlkRequestMachine(RuleBasedStateMachine):
    """Any interleaving of batch and single submissions (copying, zero-copy, scatter),
    device pops and out-of-order completions, and polls: every completed request carries
    the data of its own sector in its own buffers.  That is what would break if a slot's
    persistent descriptors were reused for the wrong shape or the wrong buffer."""

    RING = "split"

    @initialize(start=st.integers(0, 15), wrap=st.integers(0, 1), indirect=st.booleans())
    def setup(self, start: int, wrap: int, indirect: bool) -> None:
        packed = self.RING == "packed"
        self.t = LoopbackTransport(indirect=indirect, packed=packed)
        # split: an avail index before the u16 wrap; packed: any position, either wrap
        # counter (position | wrap << 15)
        start_index = start | wrap << 15 if packed else 0xFFF0 + start
        self.dev = BlkDevice(self.t, queue_size=16, max_io=4096, indirect=indirect,
                             start_index=start_index, ring=self.RING)
        arena = self.dev.alloc_buffer(8 * 4096)
        self.pool = {4096: [arena.slice(i * 4096, 4096) for i in range(4)],
                     1024: [arena.slice(16384 + i * 1024, 1024) for i in range(8)]}
        self.busy: set[int] = set()  # id() of buffers in flight
        self.submitted: list[BlkRequest] = []
        self.popped: list[tuple[int, list[Segment]]] = []

    def teardown(self) -> None:
        if hasattr(self, "dev"):
            self.dev.close()

    def _free_bufs(self, length: int) -> list[DmaBuffer]:
        return [b for b in self.pool[length] if id(b) not in self.busy]

    def _free_slots(self) -> int:
        return sum(q["free_slots"] for q in self.dev.stats())

    @precondition(lambda self: self._free_slots() > 0)
    @rule(data=st.data(), nbytes=st.sampled_from([512, 1024, 4096]))
    def submit_many_copying(self, data: st.DataObject, nbytes: int) -> None:
        count = data.draw(st.integers(1, min(4, self._free_slots())))
        sectors = data.draw(st.lists(st.integers(0, CAPACITY - 8), min_size=count,
                                     max_size=count))
        self.submitted += self._all_or_nothing(
            lambda: self.dev.submit_read_many(sectors, nbytes))

    @precondition(lambda self: self._free_slots() > 0)
    @rule(data=st.data(), length=st.sampled_from([4096, 1024]))
    def submit_many_zero_copy(self, data: st.DataObject, length: int) -> None:
        free = self._free_bufs(length)
        count = data.draw(st.integers(min(1, len(free)), min(len(free), self._free_slots())))
        bufs = data.draw(st.permutations(free))[:count]
        sectors = data.draw(st.lists(st.integers(0, CAPACITY - 8), min_size=count,
                                     max_size=count))
        reqs = self._all_or_nothing(lambda: self.dev.submit_read_many(sectors, into=bufs))
        self.submitted += reqs
        if reqs:
            self.busy.update(id(b) for b in bufs)

    @precondition(lambda self: self._free_slots() > 0)
    @rule(sector=st.integers(0, CAPACITY - 8), scatter=st.booleans())
    def submit_single(self, sector: int, scatter: bool) -> None:
        free = self._free_bufs(1024)
        if scatter and len(free) >= 2:
            bufs = free[:2]
            reqs = self._all_or_nothing(lambda: [self.dev.submit_read(sector, into=bufs)])
            if reqs:
                self.busy.update(id(b) for b in bufs)
        else:
            reqs = self._all_or_nothing(lambda: [self.dev.submit_read(sector, 512)])
        self.submitted += reqs

    def _all_or_nothing(self, submit: Callable[[], list[BlkRequest]]) -> list[BlkRequest]:
        """Without indirect descriptors, scatter requests in flight can leave too few ring
        descriptors: QueueFullError, and nothing submitted."""
        before = self.dev.queues[0].snapshot()
        try:
            return submit()
        except QueueFullError:
            assert not self.dev.indirect
            assert self.dev.queues[0].snapshot() == before
            event("queue full")
            return []

    @rule()
    def device_pops(self) -> None:
        self.dev.kick()
        self.popped += self.t.pop_all()

    @precondition(lambda self: self.popped)
    @rule(data=st.data())
    def device_completes(self, data: st.DataObject) -> None:
        """Some of the popped chains, in any order (then poll, so slots are reused)."""
        order = data.draw(st.permutations(range(len(self.popped))))
        k = data.draw(st.integers(1, len(order)))
        for i in order[:k]:
            self.t.serve(*self.popped[i])
        self.t.devices[0].publish_used()
        self.popped = [c for i, c in enumerate(self.popped) if i not in order[:k]]
        self.poll()

    @rule()
    def poll(self) -> None:
        for r in self.dev.poll():
            if r.into:
                got = b"".join(b.read() for b in r.into)
                self.busy.difference_update(id(b) for b in r.into)
            else:
                got = r.wait() or b""
            assert got == sector_bytes(r.sector, r.nbytes), (r, got[:4])
            self.submitted.remove(r)

    @invariant()
    def counts(self) -> None:
        if hasattr(self, "dev"):
            assert self.dev.in_flight == len(self.submitted)
            assert self._free_slots() == self.dev.slots_per_queue - len(self.submitted)


class PackedBlkRequestMachine(BlkRequestMachine):
    RING = "packed"


TestBlkRequestMachine = BlkRequestMachine.TestCase
TestBlkRequestMachine.settings = settings(max_examples=300, stateful_step_count=40,
                                          deadline=None)
TestPackedBlkRequestMachine = PackedBlkRequestMachine.TestCase
TestPackedBlkRequestMachine.settings = settings(max_examples=200, stateful_step_count=40,
                                                deadline=None)


def test_completion_after_transport_failure_does_not_free_a_slot_twice():
    """The transport fails with requests in flight: they fail (poll() returns them with the
    error, it does not raise).  Their slots stay taken -- the device might still write
    their buffers -- until the device is reset by a reconnect.  A completion the device
    wrote anyway is never reaped: no request completes twice, no slot goes to two
    requests."""
    t = LoopbackTransport()
    with BlkDevice(t, queue_size=16, max_io=4096) as dev:
        reqs = dev.submit_read_many([8, 16, 24], 512)
        dev.kick()
        chains = t.pop_all()
        t.fail(VhostUserDisconnectedError("Broken pipe"))
        done = dev.poll(timeout=1)  # the wait fails -> every request in flight fails
        assert set(done) == set(reqs)
        assert all(r.done for r in reqs) and dev.in_flight == 0
        assert dev.stats()[0]["free_slots"] == dev.slots_per_queue - 3  # quarantined
        t.serve(*chains[1])  # the device had completed one of them
        t.devices[0].publish_used()
        assert dev.poll() == []  # nothing new: that request failed already
        with pytest.raises(VhostUserDisconnectedError, match="Broken pipe"):
            reqs[1].wait()
        # until reconnect(), new requests are refused with the reason, not half-queued
        for submit in (lambda: dev.submit_read(40, 512),
                       lambda: dev.submit_read_many([40, 48], 512)):
            with pytest.raises(QueueStateError, match="reconnect") as info:
                submit()
            assert isinstance(info.value.__cause__, VhostUserDisconnectedError)
        assert dev.reconnect() == 0  # all three had failed already
        assert dev.stats()[0]["free_slots"] == dev.slots_per_queue
        assert reqs[1].error is not None and reqs[1].status is None  # never completed twice
        again = dev.submit_read_many([40, 48], 512)
        dev.kick()
        serve_all(t)
        assert set(dev.poll()) == set(again)
        assert [r.wait() for r in again] == [sector_bytes(40, 512), sector_bytes(48, 512)]
