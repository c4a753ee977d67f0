"""SlotQueue: fixed one-buffer slots in ring order, against the DeviceQueue peer (in order,
out of order, hostile), across the u16 wrap and the ring's end; the state machine also runs
PackedSlotQueue (against PackedDeviceQueue) and both with VIRTIO_F_IN_ORDER batches."""

from __future__ import annotations

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from virtq.errors import (
    ArgumentError,
    DeviceProtocolError,
    QueueBrokenError,
    QueueFullError,
    QueueStateError,
)
from virtq.memory import MemfdRegion
from virtq.queue import SlotQueue, make_slot_queue, ring_layout
from virtq.testing import DeviceQueue
from virtq.testing.packed_device import PackedDeviceQueue

BASE = 0x2_0000_0000
N = 8
SLOT = 64


class Rig:
    """A slot queue over slots that follow the rings in one region, and the device's view.
    ``ring``: "split" (``start`` is the avail index) or "packed" (``start`` is
    ``position | wrap << 15``)."""

    def __init__(self, *, writable: bool, start: int = 0, event_idx: bool = False,
                 n: int = N, ring: str = "split", in_order: bool = False) -> None:
        self.layout = ring_layout(n, ring=ring)
        self.slots_off = self.layout.nbytes
        self.region = MemfdRegion(-(-(self.layout.nbytes + n * SLOT) // 4096) * 4096)
        self.q = make_slot_queue(self.region, self.layout, iova=BASE,
                                 slots=[BASE + self.slots_off + d * SLOT for d in range(n)],
                                 slot_size=SLOT, writable=writable, event_idx=event_idx,
                                 in_order=in_order, start_index=start)
        self.dev: DeviceQueue | PackedDeviceQueue
        if ring == "packed":
            self.dev = PackedDeviceQueue(self.region, self.layout, iova=BASE,
                                         event_idx=event_idx, avail_index=start & 0x7FFF,
                                         avail_wrap=start >> 15)
        else:
            self.dev = DeviceQueue(self.region, self.layout, iova=BASE, event_idx=event_idx)

    def fill(self, slot: int, data: bytes) -> None:
        off = self.slots_off + slot * SLOT
        self.region.view(off, len(data))[:] = data

    def slot_bytes(self, slot: int, n: int) -> bytes:
        return bytes(self.region.view(self.slots_off + slot * SLOT, n))

    def close(self) -> None:
        self.dev.close()
        self.q.close()
        self.region.close()


@pytest.fixture
def tx(no_leaks: None):
    rig = Rig(writable=False)
    yield rig
    rig.close()


@pytest.fixture
def rx(no_leaks: None):
    rig = Rig(writable=True)
    yield rig
    rig.close()


def test_transmit_in_order(tx: Rig) -> None:
    q, dev = tx.q, tx.dev
    assert (q.num_free, q.next_slot) == (N, 0)
    for s in range(3):
        tx.fill(s, bytes([s]) * (10 + s))
    assert q.submit(3, [10, 11, 12]) == 0
    assert q.publish()
    seen = [dev.pop() for _ in range(3)]
    assert [h for h, _ in seen] == [0, 1, 2]
    for s, (_, segs) in enumerate(seen):
        assert [(g.iova, g.length, g.writable) for g in segs] == [
            (BASE + tx.slots_off + s * SLOT, 10 + s, False)]
        assert dev.read(segs[0].iova, segs[0].length) == bytes([s]) * (10 + s)
    assert q.num_free == N - 3
    dev.push(0, 0)
    dev.push(1, 0)
    assert q.reap() == ([0, 1], [0, 0])
    assert q.num_free == N - 1
    assert q.num_in_flight == 1
    assert q.in_flight_tokens() == [2]
    assert q.reap() == ([], [])
    # Lengths stay as last written when none are given.
    assert q.submit(1) == 3
    q.publish()
    _, segs = dev.pop()
    assert segs[0].length == SLOT


@pytest.mark.parametrize("writable", [False, True])
def test_in_order_per_buffer_run_then_a_batch_over_stale_elements(writable: bool) -> None:
    """VIRTIO_F_IN_ORDER (§2.7.9): a device that retires every buffer with its own used
    element (DPDK does, per packet) is reaped as a run in a few C-level comparisons, with
    each buffer's own length.  A lap later the same positions hold those elements, stale:
    a batch that writes only its first position's element (naming its last slot) must
    not be read as per-buffer elements -- the skipped slots were used completely."""
    rig = Rig(writable=writable, in_order=True)
    try:
        q, dev = rig.q, rig.dev
        lengths = None if writable else [8] * N
        assert q.submit(N, lengths) == 0
        q.publish()
        popped = [dev.pop() for _ in range(N)]
        assert [h for h, _ in popped] == list(range(N))
        for head, _ in popped:
            dev.push(head, (1 + head) if writable else 0)
        assert q.reap() == (list(range(N)), [(1 + s) if writable else 0 for s in range(N)])
        # Second lap: one batch of four (one element, at position 0, naming slot 3), then
        # one of one at position 4.  Positions 1..3 still hold lap one's elements.
        assert q.submit(5, None if writable else [8] * 5) == 0
        q.publish()
        popped = [dev.pop() for _ in range(5)]
        dev.push_in_order(3, 40 if writable else 0)
        dev.push(4, 9 if writable else 0)
        full = SLOT if writable else 0
        assert q.reap() == ([0, 1, 2, 3, 4],
                            [full, full, full, 40, 9] if writable else [0] * 5)
    finally:
        rig.close()


def test_receive_returns_lengths_and_checks_capacity(rx: Rig) -> None:
    q, dev = rx.q, rx.dev
    q.submit(N)
    q.publish()
    for _ in range(2):
        head, segs = dev.pop()
        assert segs[0].writable and segs[0].length == SLOT
        dev.write(segs[0].iova, b"x" * (5 + head))
        dev.push(head, 5 + head)
    assert q.reap() == ([0, 1], [5, 6])
    assert rx.slot_bytes(1, 6) == b"x" * 6
    assert q.num_free == 2 and q.next_slot == 0
    assert q.submit(2) == 0  # the same two buffers, in ring order
    head, _ = dev.pop()
    dev.push(head, SLOT + 1)  # more than the slot holds
    with pytest.raises(DeviceProtocolError, match=r"used\.ring\[2\]\.len") as info:
        q.reap()
    assert info.value.completed == []
    with pytest.raises(QueueBrokenError):
        q.submit(1)
    with pytest.raises(QueueBrokenError):
        q.reap()


def test_out_of_order_completion_is_returned_at_once_and_reused_in_order(tx: Rig) -> None:
    q, dev = tx.q, tx.dev
    q.submit(4, [20] * 4)
    q.publish()
    for _ in range(4):
        dev.pop()
    dev.push(2, 0)
    dev.push(3, 0)
    assert q.reap() == ([2, 3], [0, 0])
    # 2 and 3 are done, but slots are reused first in, first out: 0 is still out.
    assert q.num_free == N - 4
    assert q.in_flight_tokens() == [0, 1]
    dev.push(0, 0)
    assert q.reap() == ([0], [0])
    assert q.num_free == N - 3  # 0 is free; 1 still holds 2 and 3 back
    dev.push(1, 0)
    assert q.reap() == ([1], [0])
    assert q.num_free == N
    assert q.in_flight_tokens() == []
    # The fast path is back: a full ring in order, across the ring's end.
    assert q.submit(N, [30] * N) == 4
    q.publish()
    heads = [dev.pop()[0] for _ in range(N)]
    assert heads == [4, 5, 6, 7, 0, 1, 2, 3]
    for h in heads:
        dev.push(h, 0)
    assert q.reap() == (heads, [0] * N)


@pytest.mark.parametrize(("writable", "start"), [(False, 0xFFFE), (True, 0xFFFA)])
def test_u16_wrap_and_ring_end(writable: bool, start: int) -> None:
    rig = Rig(writable=writable, start=start)
    try:
        q, dev = rig.q, rig.dev
        first = start & (N - 1)
        for rnd in range(3):
            k = N - 1
            lengths = None if writable else [1 + (rnd + i) % SLOT for i in range(k)]
            assert q.submit(k, lengths) == (first + rnd * k) & (N - 1)
            q.publish()
            got = []
            for _ in range(k):
                head, segs = dev.pop()
                got.append(head)
                if lengths is not None:
                    assert segs[0].length == lengths[len(got) - 1]
                dev.push(head, 3 if writable else 0)
            assert got == [(first + rnd * k + i) & (N - 1) for i in range(k)]
            assert q.reap() == (got, [3 if writable else 0] * k)
        assert q.next_avail == (start + 3 * (N - 1)) & 0xFFFF
        assert q.next_avail < start  # crossed 0xFFFF -> 0
    finally:
        rig.close()


@pytest.mark.parametrize(
    ("scenario", "match"),
    [
        ("id_out_of_range", r"used\.ring\[0\]\.id"),
        ("never_submitted", r"used\.ring\[1\]\.id"),
        ("twice", r"used\.ring\[1\]\.id"),
        ("unpublished", r"used\.ring\[0\]\.id"),
        ("readable_len", r"used\.ring\[0\]\.len"),
        ("idx_ahead", r"used\.idx"),
    ],
)
def test_hostile_completions(tx: Rig, scenario: str, match: str) -> None:
    q, dev = tx.q, tx.dev
    q.submit(3, [10, 10, 10])
    q.publish()
    q.submit(1, [10])  # slot 3: added, not published
    completed: list[tuple[int, int]] = []
    if scenario == "id_out_of_range":
        dev.push(N + 5, 0)
    elif scenario == "never_submitted":
        dev.push(1, 0)
        dev.push(6, 0)
        completed = [(1, 0)]
    elif scenario == "twice":
        dev.push(1, 0)
        dev.push(1, 0)
        completed = [(1, 0)]
    elif scenario == "unpublished":
        dev.push(3, 0)
    elif scenario == "readable_len":
        dev.push(0, 7)
    else:
        for h in (0, 1, 2, 0):
            dev.push(h, 0)
    with pytest.raises(DeviceProtocolError, match=match) as info:
        q.reap()
    assert info.value.completed == completed
    assert q.broken is info.value
    # reset() hands back what was never completed and makes the queue usable again.
    lost = q.reset()
    assert sorted(lost) == sorted({0, 1, 2, 3} - {s for s, _ in completed})
    assert q.broken is None and q.num_free == N


def test_twice_across_two_reaps(tx: Rig) -> None:
    q, dev = tx.q, tx.dev
    q.submit(3, [10] * 3)
    q.publish()
    dev.push(2, 0)  # early: 0 and 1 are still out
    assert q.reap() == ([2], [0])
    dev.push(2, 0)
    with pytest.raises(DeviceProtocolError, match=r"used\.ring\[1\]\.id"):
        q.reap()


def test_bad_calls(tx: Rig, rx: Rig) -> None:
    q = tx.q
    # A sibling of SplitQueue, not a subclass that refuses half its methods: the chain API
    # is simply not there.
    for name in ("add", "add_many", "template", "reserve", "set_desc", "add_reserved_many"):
        assert not hasattr(q, name), name
    with pytest.raises(QueueFullError):
        q.submit(N + 1)
    for count, lengths in ((2, [10]), (1, [0]), (1, [SLOT + 1]), (1, ["10"]), (1, [-1]),
                           (-1, None), (1.0, None)):
        with pytest.raises(ArgumentError):
            q.submit(count, lengths)  # type: ignore[arg-type]
    assert q.num_free == N and q.next_avail == 0  # nothing was taken
    with pytest.raises(ArgumentError, match="device-readable"):
        rx.q.submit(1, [10])
    with pytest.raises(ArgumentError):
        q.reap(0)
    assert q.submit(0) == 0
    with pytest.raises(ArgumentError):
        SlotQueue(tx.region, tx.layout, iova=BASE, slots=[BASE] * (N - 1), slot_size=SLOT,
                  writable=False)
    with pytest.raises(ArgumentError):
        SlotQueue(tx.region, tx.layout, iova=BASE, slots=[BASE] * N, slot_size=0,
                  writable=False)
    with pytest.raises(ArgumentError):
        SlotQueue(tx.region, tx.layout, iova=BASE, slots=[-1] * N, slot_size=SLOT,
                  writable=False)


def test_pop_used_drain_used_and_reset_rewrites_the_rings(tx: Rig) -> None:
    q, dev = tx.q, tx.dev
    q.submit(3, [11, 12, 13])
    q.publish()
    for _ in range(3):
        h, _ = dev.pop()
        dev.push(h, 0)
    assert q.pop_used() == (0, 0)
    assert q.drain_used() == [(1, 0), (2, 0)]
    assert q.pop_used() is None
    q.submit(2, [14, 15])
    assert sorted(q.reset(0x1234)) == [3, 4]
    # reset() zeroed the rings; the fixed descriptors and avail entries are back.
    dev2 = DeviceQueue(tx.region, tx.layout, iova=BASE)
    try:
        assert dev2.last_avail == 0x1234
        assert q.submit(2, [20, 21]) == 0x1234 & (N - 1)
        q.publish()
        (h1, s1), (h2, s2) = dev2.pop(), dev2.pop()
        assert (h1, h2) == (4, 5)
        assert (s1[0].iova, s1[0].length) == (BASE + tx.slots_off + 4 * SLOT, 20)
        assert s2[0].length == 21
    finally:
        dev2.close()
    assert "SlotQueue" in q.describe()
    assert q.snapshot()["in_flight_heads"] == [4, 5]


@pytest.mark.usefixtures("no_leaks")
def test_close_releases_the_region() -> None:
    rig = Rig(writable=True)
    rig.q.submit(2)
    rig.dev.close()
    rig.q.close()
    rig.q.close()
    with pytest.raises(QueueStateError):
        rig.q.submit(1)
    with pytest.raises(QueueStateError):
        rig.q.reap()
    rig.region.close()  # no view left behind


class SlotQueueMachine(RuleBasedStateMachine):
    """Any interleaving of submit / publish / device pop / device complete (any order, or
    in order with batches) / reap: every submitted slot comes back exactly once with what
    the device wrote, slots are taken in ring order, and the free count follows
    first-in-first-out reuse."""

    RING = "split"
    IN_ORDER = False

    @initialize(start=st.integers(0, 7), wrap=st.integers(0, 1), writable=st.booleans(),
                event_idx=st.booleans())
    def setup(self, start: int, wrap: int, writable: bool, event_idx: bool) -> None:
        # packed: a position before the ring's end, either wrap counter (§2.8.1);
        # split: an avail index before the u16 wrap
        start = ((N - 1 - start % 3) | wrap << 15) if self.RING == "packed" else 0xFFF8 + start
        self.rig = Rig(writable=writable, start=start, event_idx=event_idx, ring=self.RING,
                       in_order=self.IN_ORDER)
        self.first = start & 0x7FFF if self.RING == "packed" else start
        self.writable = writable
        self.submitted: list[int] = []  # slots in submission order, not yet reaped
        self.held: list[tuple[int, int]] = []  # popped by the device: (head, written)
        self.done_early: set[int] = set()
        self.skipped: set[int] = set()  # retired by an in-order batch without an element
        self.total = 0
        self.stamp = 0
        self.content: dict[int, bytes] = {}  # what each readable slot was filled with

    def teardown(self) -> None:
        if hasattr(self, "rig"):
            event(f"{self.RING} in_order={self.IN_ORDER} crossed the end={self.total > 8}")
            self.rig.close()

    @rule(k=st.integers(0, N + 1), size=st.integers(1, SLOT))
    def submit(self, k: int, size: int) -> None:
        q = self.rig.q
        free = q.num_free
        first = q.next_slot
        lengths = None if self.writable else [size] * k
        if k > free:
            with pytest.raises(QueueFullError):
                q.submit(k, lengths)
            assert q.num_free == free
            return
        for i in range(k):
            slot = (first + i) % N
            self.stamp = (self.stamp + 1) % 251
            self.content[slot] = bytes([self.stamp]) * size
            self.rig.fill(slot, self.content[slot])
        assert q.submit(k, lengths) == first
        for i in range(k):
            self.submitted.append((first + i) % N)
        self.total += k

    @rule()
    def publish(self) -> None:
        self.rig.q.publish()

    @rule(every=st.booleans())
    def device_pop(self, every: bool) -> None:
        while (got := self.rig.dev.pop()) is not None:
            head, segs = got
            assert len(segs) == 1 and segs[0].writable == self.writable
            written = 0
            if not self.writable:
                assert self.rig.dev.read(segs[0].iova, segs[0].length) == self.content[head]
            else:
                written = 1 + head
                self.rig.dev.write(segs[0].iova, bytes([0xA0 + head]) * written)
            self.held.append((head, written))
            if not every:
                break

    @rule(pick=st.integers(0, 100), publish=st.booleans(), batch=st.booleans())
    def device_complete(self, pick: int, publish: bool, batch: bool) -> None:
        held = self.held
        if not held:
            return
        if not self.IN_ORDER:
            head, written = held.pop(pick % len(held))
            self.rig.dev.push(head, written, publish=publish)
        elif batch:
            k = len(held) - 1 - pick % len(held)  # one used element for held[0..k]
            head, written = held[k]
            self.skipped.update(h for h, _ in held[:k])
            del held[: k + 1]
            self.rig.dev.push_in_order(head, written, publish=publish)
            event(f"in-order batch of {k + 1}")
        else:
            head, written = held.pop(0)
            self.rig.dev.push(head, written, publish=publish)

    @rule()
    def device_publish(self) -> None:
        self.rig.dev.publish_used()

    @rule(limit=st.sampled_from([None, 1, 2]))
    def reap(self, limit: int | None) -> None:
        q = self.rig.q
        has = q.has_used()
        slots, lens = q.reap(limit)
        assert has == bool(slots), "has_used() tells whether reap() finds something"
        if limit is not None:
            assert len(slots) <= limit
        for slot, length in zip(slots, lens, strict=True):
            assert slot in self.submitted and slot not in self.done_early
            if slot in self.skipped:
                self.skipped.discard(slot)
                assert length == (SLOT if self.writable else 0), "used completely"
                if self.writable:
                    assert self.rig.slot_bytes(slot, 1 + slot) == bytes([0xA0 + slot]) * (
                        1 + slot)
            elif self.writable:
                assert length == 1 + slot
                assert self.rig.slot_bytes(slot, length) == bytes([0xA0 + slot]) * length
            else:
                assert length == 0
            self.done_early.add(slot)
        # First in, first out: the completed prefix is free again.
        while self.submitted and self.submitted[0] in self.done_early:
            self.done_early.discard(self.submitted.pop(0))
        if self.done_early:
            event("a completion waits behind an older slot")

    @invariant()
    def accounting(self) -> None:
        if not hasattr(self, "rig"):
            return
        q = self.rig.q
        assert q.num_free == N - len(self.submitted)
        assert sorted(q.in_flight_tokens()) == sorted(set(self.submitted) - self.done_early)
        assert q.num_in_flight == len(self.submitted) - len(self.done_early)
        assert q.next_slot == (self.first + self.total) % N


class InOrderSlotQueueMachine(SlotQueueMachine):
    IN_ORDER = True


class PackedSlotQueueMachine(SlotQueueMachine):
    RING = "packed"


class InOrderPackedSlotQueueMachine(SlotQueueMachine):
    RING = "packed"
    IN_ORDER = True


_SETTINGS = settings(stateful_step_count=60, max_examples=200, deadline=None)
TestSlotQueueMachine = SlotQueueMachine.TestCase
TestSlotQueueMachine.settings = _SETTINGS
TestInOrderSlotQueueMachine = InOrderSlotQueueMachine.TestCase
TestInOrderSlotQueueMachine.settings = _SETTINGS
TestPackedSlotQueueMachine = PackedSlotQueueMachine.TestCase
TestPackedSlotQueueMachine.settings = _SETTINGS
TestInOrderPackedSlotQueueMachine = InOrderPackedSlotQueueMachine.TestCase
TestInOrderPackedSlotQueueMachine.settings = _SETTINGS
