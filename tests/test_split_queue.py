"""virtq.queue.SplitQueue against the independent DeviceQueue peer."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from virtq.abi import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY
from virtq.errors import (
    ArgumentError,
    DeviceProtocolError,
    LayoutError,
    QueueBrokenError,
    QueueFullError,
    QueueStateError,
    RegionBusyError,
)
from virtq.layout import SplitLayout, wrap_add
from virtq.memory import MemfdRegion
from virtq.queue import SplitQueue
from virtq.testing import DeviceQueue, HostileDevice
from virtq.testing.peer import serve_chain

BASE = 0x4000_0000  # device address of region byte 0


@dataclass
class Ring:
    region: MemfdRegion
    layout: SplitLayout
    q: SplitQueue
    dev: DeviceQueue

    def buf(self, slot: int, offset: int = 0) -> int:
        return BASE + self.layout.buffer(slot) + offset

    def put(self, slot: int, data: bytes) -> None:
        self.region.view(self.layout.buffer(slot), len(data))[:] = data

    def get(self, slot: int, n: int, offset: int = 0) -> bytes:
        return bytes(self.region.view(self.layout.buffer(slot) + offset, n))


@contextmanager
def ring(n: int = 8, *, buffer_size: int = 512, indirect_size: int = 0, event_idx=False,
         indirect=False, start_index=0):
    layout = SplitLayout.compute(n, buffer_size=buffer_size, indirect_size=indirect_size)
    region = MemfdRegion(layout.nbytes)
    q = SplitQueue(region, layout, iova=BASE, event_idx=event_idx, indirect=indirect,
                   start_index=start_index)
    dev = DeviceQueue(region, layout, iova=BASE, event_idx=event_idx)
    r = Ring(region, layout, q, dev)
    try:
        yield r
    finally:
        r.dev.close()
        r.q.close()
        region.close()


def device_echo_all(r: Ring, *, reverse_completion: bool = False) -> list[int]:
    chains = []
    while (c := r.dev.pop()) is not None:
        chains.append(c)
    if reverse_completion:
        chains.reverse()
    for head, segments in chains:
        r.dev.push(head, serve_chain(r.dev, segments), publish=False)
    r.dev.publish_used()
    return [h for h, _ in chains]


# -- round trips -----------------------------------------------------------------------


def test_one_descriptor_round_trip(no_leaks):
    with ring() as r:
        r.put(0, b"ping")
        r.q.add([(r.buf(0), 4)], [], token="t0")
        assert r.q.publish() is True
        head, segs = r.dev.pop()
        assert [(s.iova, s.length, s.writable) for s in segs] == [(r.buf(0), 4, False)]
        assert r.dev.read(segs[0].iova, 4) == b"ping"
        r.dev.push(head, 0)
        assert r.q.pop_used() == ("t0", 0)
        assert r.q.pop_used() is None
        assert r.q.num_free == 8


@pytest.mark.parametrize("indirect", [False, True])
def test_three_descriptor_mixed_chain(indirect, no_leaks):
    with ring(indirect=indirect, indirect_size=4 if indirect else 0) as r:
        r.put(0, b"header--")
        r.put(1, bytes(range(200)))
        r.q.add([(r.buf(0), 8), (r.buf(1), 200)], [(r.buf(2), 300)], token="req")
        free_after_add = r.q.num_free
        assert free_after_add == (7 if indirect else 5)
        r.q.publish()
        head, segs = r.dev.pop()
        assert [(s.length, s.writable) for s in segs] == [(8, False), (200, False), (300, True)]
        written = serve_chain(r.dev, segs)
        r.dev.push(head, written)
        assert r.q.pop_used() == ("req", 208)
        assert r.get(2, 208) == (b"header--" + bytes(range(200)))[::-1]
        assert r.q.num_free == 8


def test_out_of_order_completion_returns_right_tokens():
    with ring(n=8) as r:
        for i in range(4):
            r.put(i, bytes([i]) * 10)
            r.q.add([(r.buf(i), 10)], [(r.buf(i, 256), 10)], token=i)
        with pytest.raises(QueueFullError) as info:
            r.q.add([(r.buf(0), 1)], [], token="x")
        assert (info.value.needed, info.value.free) == (1, 0)
        r.q.publish()
        device_echo_all(r, reverse_completion=True)
        assert r.q.drain_used() == [(3, 10), (2, 10), (1, 10), (0, 10)]
        for i in range(4):
            assert r.get(i, 10, 256) == bytes([i]) * 10


def test_wrap_around_by_seeding(no_leaks):
    with ring(n=4, start_index=0xFFFD) as r:
        seen = []
        for round_ in range(6):  # crosses 0xFFFF -> 0 after three chains
            r.put(0, b"%d" % round_)
            r.q.add([(r.buf(0), 1)], [(r.buf(1), 8)], token=round_)
            r.q.publish()
            device_echo_all(r)
            seen.extend(r.q.drain_used())
        assert seen == [(i, 1) for i in range(6)]
        assert r.q.next_avail == wrap_add(0xFFFD, 6) == 3
        assert r.q.snapshot()["used.idx"] == 3


def test_cross_process_round_trip_with_wraparound(no_leaks):
    n = 16
    layout = SplitLayout.compute(n, buffer_size=256, indirect_size=4)
    count = 100
    with MemfdRegion(layout.nbytes) as region:
        q = SplitQueue(region, layout, iova=BASE, indirect=True, start_index=0xFFC0)
        child = subprocess.Popen(
            [sys.executable, "-m", "virtq.testing.peer", "--fd", str(region.fd),
             "--nbytes", str(region.nbytes), "--queue-size", str(n), "--buffer-size", "256",
             "--indirect-size", "4", "--iova", hex(BASE), "--count", str(count)],
            pass_fds=[region.fd],
        )
        free_slots = list(range(n))
        results = {}
        sent = 0
        deadline = time.monotonic() + 60
        while len(results) < count:
            assert time.monotonic() < deadline, "peer did not answer"
            while sent < count and free_slots and q.num_free:
                slot = free_slots.pop()
                payload = f"message {sent:04d}".encode()
                off = layout.buffer(slot)
                region.view(off, len(payload))[:] = payload
                base = BASE + off
                if sent % 3 == 0:   # 3-descriptor chain -> indirect table
                    q.add([(base, 8), (base + 8, len(payload) - 8)], [(base + 128, 64)],
                          token=(sent, slot))
                else:
                    q.add([(base, len(payload))], [(base + 128, 64)], token=(sent, slot))
                sent += 1
            q.publish()
            for (i, slot), written in q.drain_used():
                off = layout.buffer(slot)
                results[i] = bytes(region.view(off + 128, written))
                free_slots.append(slot)
        assert child.wait(timeout=30) == 0
        for i in range(count):
            assert results[i] == f"message {i:04d}".encode()[::-1]
        assert q.next_avail == wrap_add(0xFFC0, count)
        q.close()


# -- argument checking -----------------------------------------------------------------


@pytest.mark.parametrize(
    "bufs",
    [[(-1, 4)], [(0, 0)], [(0, 1 << 32)], [(1 << 64, 4)], [(1.5, 4)], [("a", 4)], [(0,)],
     [5], [(0, "4")], [(None, 4)]],
)
def test_bad_buffers_rejected_without_side_effects(bufs):
    with ring() as r:
        before = r.q.snapshot()
        with pytest.raises(ArgumentError):
            r.q.add(bufs, [])
        with pytest.raises(ArgumentError):
            r.q.add([(r.buf(0), 4)], bufs)
        assert r.q.snapshot() == before


def test_empty_chain_and_full_queue_write_nothing():
    with ring(n=4) as r:
        with pytest.raises(ArgumentError):
            r.q.add([], [])
        r.q.add([(r.buf(0), 4)], [], token=1)
        before = r.q.snapshot()
        desc_before = bytes(r.region.view(0, 64))
        with pytest.raises(QueueFullError) as info:
            r.q.add([(r.buf(1), 4)] * 4, [])
        assert (info.value.needed, info.value.free) == (4, 3)
        assert r.q.snapshot() == before
        assert bytes(r.region.view(0, 64)) == desc_before


def test_indirect_needs_layout_and_bounded_table():
    layout = SplitLayout.compute(8)
    with MemfdRegion(layout.nbytes) as region:
        with pytest.raises(LayoutError):
            SplitQueue(region, layout, iova=0, indirect=True)
        with pytest.raises(LayoutError):
            SplitQueue(region, SplitLayout.compute(1024), iova=0)
        with pytest.raises(ArgumentError):
            SplitQueue(region, layout, iova=0, start_index=0x10000)
    with ring(indirect=True, indirect_size=2) as r, pytest.raises(ArgumentError):
        r.q.add([(r.buf(0), 1)] * 3, [])


def test_region_cannot_close_under_queue_and_closed_queue_refuses():
    layout = SplitLayout.compute(8)
    region = MemfdRegion(layout.nbytes)
    q = SplitQueue(region, layout, iova=0)
    with pytest.raises(RegionBusyError):
        region.close()
    q.close()
    q.close()
    region.close()
    for call in (lambda: q.add([(0, 1)], []), q.publish, q.pop_used, q.drain_used,
                 q.enable_interrupts, q.disable_interrupts):
        with pytest.raises(QueueStateError):
            call()
    assert q.snapshot()["closed"] is True
    assert "(closed)" in q.describe()


# -- notifications ----------------------------------------------------------------------


def test_publish_respects_no_notify_flag():
    with ring() as r:
        assert r.q.publish() is False  # nothing added
        r.q.add([(r.buf(0), 1)], [])
        assert r.q.publish() is True
        r.dev.disable_notifications()
        r.q.add([(r.buf(0), 1)], [])
        assert r.q.publish() is False
        r.dev.enable_notifications()
        r.q.add([(r.buf(0), 1)], [])
        assert r.q.publish() is True


@pytest.mark.parametrize(
    ("start", "adds", "avail_event", "expected"),
    [
        (0, 1, 0, True),          # event 0 in [0, 1)
        (0, 3, 5, False),         # event 5 not in [0, 3)
        (0, 3, 2, True),          # last of the batch
        (0, 3, 3, False),         # next one, not yet
        (0xFFFE, 4, 0xFFFF, True),  # window wraps: [0xFFFE, 2)
        (0xFFFE, 4, 1, True),
        (0xFFFE, 4, 2, False),
        (0xFFFE, 1, 0xFFFD, False),  # already passed
    ],
)
def test_publish_with_event_idx(start, adds, avail_event, expected):
    with ring(event_idx=True, start_index=start) as r:
        r.dev.set_avail_event(avail_event)
        for i in range(adds):
            r.q.add([(r.buf(i), 1)], [])
        assert r.q.publish() is expected


def test_event_idx_ignores_no_notify_flag():
    # With EVENT_IDX the flags are not used (§2.7.10); only avail_event decides.
    with ring(event_idx=True) as r:
        HostileDevice(r.region, r.layout).set_flags(VIRTQ_USED_F_NO_NOTIFY)
        r.q.add([(r.buf(0), 1)], [])
        assert r.q.publish() is True


def test_interrupt_suppression_and_the_enable_race():
    with ring() as r:
        r.q.disable_interrupts()
        assert r.q.snapshot()["avail.flags"] == VIRTQ_AVAIL_F_NO_INTERRUPT
        r.q.add([(r.buf(0), 1)], [], token=1)
        r.q.publish()
        head, _ = r.dev.pop()
        assert r.dev.push(head, 0) is False  # driver asked for no interrupt
        # The completion arrived while interrupts were off: enabling must report it.
        assert r.q.enable_interrupts() is True
        assert r.q.snapshot()["avail.flags"] == 0
        assert r.q.pop_used() == (1, 0)
        assert r.q.enable_interrupts() is False


def test_used_event_suppression():
    with ring(event_idx=True) as r:
        for i in range(3):
            r.q.add([(r.buf(i), 1)], [], token=i)
        r.q.publish()
        r.q.disable_interrupts()
        chains = [r.dev.pop() for _ in range(3)]
        assert [r.dev.push(h, 0) for h, _ in chains] == [False, False, False]
        assert r.q.enable_interrupts() is True  # three completions arrived meanwhile
        assert len(r.q.drain_used()) == 3
        assert r.q.enable_interrupts() is False
        r.q.add([(r.buf(0), 1)], [], token=9)
        r.q.publish()
        h, _ = r.dev.pop()
        assert r.dev.push(h, 0) is True  # used_event == last_used: notify


# -- device misbehaviour ---------------------------------------------------------------


def broken_ring_cases():
    def bad_id(r, h):
        h.complete(200, 0)

    def not_in_flight(r, h):
        h.complete(5, 0)

    def too_long(r, h):
        h.complete(0, 513)

    def idx_jump(r, h):
        h.advance_used_idx(2)

    def unpublished(r, h):
        r.q.add([(r.buf(1), 1)], [], token="unpub")
        h.complete(1, 0)

    return {"bad_id": bad_id, "not_in_flight": not_in_flight, "too_long": too_long,
            "idx_jump": idx_jump, "unpublished": unpublished}


@pytest.mark.parametrize("case", list(broken_ring_cases()))
def test_device_protocol_errors_break_the_queue_cleanly(case):
    with ring() as r:
        hostile = HostileDevice(r.region, r.layout)
        r.q.add([], [(r.buf(0), 512)], token="t")
        r.q.publish()
        broken_ring_cases()[case](r, hostile)
        with pytest.raises(DeviceProtocolError) as info:
            r.q.drain_used()
        err = info.value
        assert err.field.startswith("used.")
        assert isinstance(err.value, int)
        assert r.q.broken is err
        for call in (r.q.pop_used, r.q.drain_used, r.q.publish,
                     lambda: r.q.add([(r.buf(0), 1)], [])):
            with pytest.raises(QueueBrokenError) as again:
                call()
            assert again.value.cause is err
        # reset() hands back what was in flight and the queue works again.
        lost = r.q.reset(start_index=0)
        assert "t" in lost
        hostile.close()
        r.dev.close()
        r.dev = DeviceQueue(r.region, r.layout, iova=BASE)
        r.q.add([(r.buf(0), 1)], [], token="again")
        r.q.publish()
        device_echo_all(r)
        assert r.q.pop_used() == ("again", 0)


def test_good_completions_before_a_bad_one_are_not_lost():
    with ring() as r:
        hostile = HostileDevice(r.region, r.layout)
        for i in range(3):
            r.q.add([], [(r.buf(i), 16)], token=i)
        r.q.publish()
        hostile.complete(1, 4)
        hostile.complete(7, 0)  # not in flight
        with pytest.raises(DeviceProtocolError) as info:
            r.q.drain_used()
        assert info.value.completed == [(1, 4)]
        assert sorted(r.q.reset()) == [0, 2]
        hostile.close()


def test_lenient_len_mode_accepts_overlong_len():
    layout = SplitLayout.compute(8, buffer_size=64)
    with MemfdRegion(layout.nbytes) as region:
        q = SplitQueue(region, layout, iova=BASE, strict_len=False)
        h = HostileDevice(region, layout)
        q.add([(BASE + layout.buffer(0), 4)], [], token="tx")
        q.publish()
        h.complete(0, 4)  # a device reporting the readable length, as some do
        assert q.pop_used() == ("tx", 4)
        h.close()
        q.close()


def test_describe_and_ring_views():
    with ring() as r:
        r.q.add([(r.buf(0), 4)], [(r.buf(1), 8)], token="x")
        r.q.publish()
        text = r.q.describe()
        (head,) = r.q.snapshot()["in_flight_heads"]
        assert f"head {head}:" in text
        assert "NEXT" in text
        assert "WRITE" in text
        with r.q.ring() as view:
            assert view.avail.idx == 1
            assert view.used.idx == 0


# -- add_many ---------------------------------------------------------------------------


def test_add_many_one_descriptor_chains_round_trip():
    with ring(n=8, start_index=0xFFFE) as r:
        chains = [([(r.buf(i), 4)], [], i) if i % 2 else ([], [(r.buf(i), 8)], i)
                  for i in range(8)]
        assert r.q.add_many(chains) == 8
        assert r.q.num_free == 0
        r.q.publish()
        popped = []
        while (c := r.dev.pop()) is not None:
            popped.append((c[0], [(s.length, s.writable) for s in c[1]]))
        assert [segs for _, segs in popped] == [
            [(8, True)] if i % 2 == 0 else [(4, False)] for i in range(8)]
        for head, segs in reversed(popped):
            r.dev.push(head, 8 if segs[0][1] else 0)
        assert sorted(r.q.drain_used()) == sorted(
            (i, 0 if i % 2 else 8) for i in range(8))


def test_add_many_mixed_chains_and_indirect():
    with ring(n=8, indirect=True, indirect_size=3) as r:
        chains = [([(r.buf(0), 4), (r.buf(1), 4)], [(r.buf(2), 4)], "a"),
                  ([(r.buf(3), 4)], [], "b")]
        assert r.q.add_many(chains) == 2
        r.q.publish()
        assert device_echo_all(r)
        assert sorted(t for t, _ in r.q.drain_used()) == ["a", "b"]


@pytest.mark.parametrize("indirect", [False, True])
def test_add_many_is_all_or_nothing(indirect):
    with ring(n=4, indirect=indirect, indirect_size=4 if indirect else 0) as r:
        r.q.add([(r.buf(0), 4)], [], token="keep")
        before = r.q.snapshot()
        with pytest.raises(QueueFullError) as info:
            r.q.add_many([([(r.buf(1), 4)], [], i) for i in range(4)])
        assert (info.value.needed, info.value.free) == (4, 3)
        assert r.q.snapshot() == before
        # a bad buffer in the middle of a batch: nothing of the batch stays
        with pytest.raises(ArgumentError):
            r.q.add_many([([(r.buf(1), 4)], [], 1), ([(r.buf(1), 0)], [], 2)])
        assert r.q.snapshot() == before
        with pytest.raises(ArgumentError):
            r.q.add_many([([(r.buf(1), 4), (r.buf(2), 4)], [], 1), ([(-1, 4)], [], 2)])
        assert r.q.snapshot() == before
        r.q.publish()
        device_echo_all(r)
        assert r.q.drain_used() == [("keep", 0)]


def test_enable_interrupts_delayed_asks_for_three_quarters():
    with ring(n=8, event_idx=True) as r:
        for i in range(8):
            r.q.add([(r.buf(i), 1)], [], token=i)
        r.q.publish()
        assert r.q.enable_interrupts_delayed() is False
        assert r.q.snapshot()["avail.used_event"] == 6  # last_used 0 + 8 * 3 // 4
        chains = [r.dev.pop() for _ in range(8)]
        notified = [r.dev.push(h, 0) for h, _ in chains]
        assert notified == [False] * 6 + [True, False]  # the 7th completion crosses 6
        assert len(r.q.drain_used()) == 8


def test_enable_interrupts_after_count_and_clamp():
    with ring(n=8, event_idx=True, start_index=0xFFFD) as r:
        for i in range(6):
            r.q.add([(r.buf(i), 1)], [], token=i)
        r.q.publish()
        assert r.q.enable_interrupts_after(4) is False
        # used_event = last_used + 3 (u16 wrap): the device notifies on the 4th completion
        assert r.q.snapshot()["avail.used_event"] == (0xFFFD + 3) & 0xFFFF
        chains = [r.dev.pop() for _ in range(6)]
        notified = [r.dev.push(h, 0) for h, _ in chains[:4]]
        assert notified == [False, False, False, True]
        assert r.q.enable_interrupts_after(4) is True  # four are already there: reap
        assert len(r.q.drain_used()) == 4
        # more than is in flight is clamped to what is in flight, so the wake-up can happen
        assert r.q.enable_interrupts_after(100) is False
        assert r.q.snapshot()["avail.used_event"] == (0xFFFD + 4 + 1) & 0xFFFF
        assert [r.dev.push(h, 0) for h, _ in chains[4:]] == [False, True]
        assert r.q.enable_interrupts_after(0) is True  # at least one: two are waiting
        assert len(r.q.drain_used()) == 2


def test_enable_interrupts_after_without_event_idx_is_enable_interrupts():
    with ring(n=4) as r:
        r.q.disable_interrupts()
        r.q.add([(r.buf(0), 1)], [], token=0)
        r.q.publish()
        assert r.q.enable_interrupts_after(3) is False
        assert r.q.snapshot()["avail.flags"] == 0


def test_reap_batch_across_the_ring_end_and_the_u16_wrap():
    """One drain_used whose elements run past the last ring slot (read in two pieces) and
    whose indices cross 0xFFFF -> 0, completed out of order."""
    with ring(n=4, start_index=0xFFFE) as r:
        for i in range(2):  # move the ring position to slot 2 (0xFFFE & 3 == 2, then 0)
            r.q.add([(r.buf(i), 1)], [], token=i)
        r.q.publish()
        device_echo_all(r)
        assert [t for t, _ in r.q.drain_used()] == [0, 1]
        for i in range(4):
            r.q.add([], [(r.buf(i), 8)], token=10 + i)
        r.q.publish()
        heads = device_echo_all(r, reverse_completion=True)
        assert len(heads) == 4
        assert r.q.last_used == 0
        got = r.q.drain_used()  # used.ring[0..3] from last_used 0: contiguous
        assert [t for t, _ in got] == [13, 12, 11, 10]
        for i in range(3):
            r.q.add([], [(r.buf(i), 8)], token=20 + i)
        r.q.publish()
        device_echo_all(r)
        got = r.q.drain_used()
        assert [t for t, _ in got] == [20, 21, 22]
        for i in range(4):  # last_used & 3 == 3: this batch wraps the ring
            r.q.add([], [(r.buf(i), 8)], token=30 + i)
        r.q.publish()
        device_echo_all(r, reverse_completion=True)
        assert [t for t, _ in r.q.drain_used()] == [33, 32, 31, 30]
        assert r.q.last_used == r.q.next_avail == (0xFFFE + 13) & 0xFFFF


def test_bad_used_element_is_named_by_its_ring_position():
    with ring(n=4, start_index=0xFFFF) as r:
        for i in range(3):
            r.q.add([(r.buf(i), 1)], [], token=i)
        r.q.publish()
        chains = [r.dev.pop() for _ in range(3)]
        r.dev.push(chains[0][0], 0)
        HostileDevice(r.region, r.layout).complete(7, 0)  # not a head of a 4-entry queue
        with pytest.raises(DeviceProtocolError) as info:
            r.q.drain_used()
        # the good element before it is handed over on the error; last_used stops at it
        assert info.value.completed == [(0, 0)]
        assert info.value.field == "used.ring[0].id"  # 0xFFFF + 1 wraps to slot 0
        assert r.q.last_used == 0
