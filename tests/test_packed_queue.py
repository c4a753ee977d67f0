"""PackedQueue's specific rules, each against the independent device side
(PackedDeviceQueue) or a hand-written ring word: one store exposes a batch, event
suppression in both directions, the used length without VIRTQ_DESC_F_WRITE as real devices
write it, the packed vhost-user base, start states, and the errors of a bad used
descriptor.  Sequences and wrap-around are the state machines' (test_queue_statemachine)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from virtq.abi import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
)
from virtq.errors import ArgumentError, DeviceProtocolError, QueueBrokenError, QueueStateError
from virtq.layout import PackedLayout
from virtq.memory import MemfdRegion
from virtq.queue import PackedQueue
from virtq.testing import PackedDeviceQueue, PackedHostileDevice

BASE = 0x4000_0000
N = 8


class Rig:
    def __init__(self, *, event_idx: bool = False, in_order: bool = False,
                 indirect: bool = False, start: int = 1 << 15) -> None:
        self.layout = PackedLayout.compute(N, buffer_size=256, indirect_size=4)
        self.region = MemfdRegion(self.layout.nbytes)
        self.q: PackedQueue[str] = PackedQueue(self.region, self.layout, iova=BASE,
                                               event_idx=event_idx, in_order=in_order,
                                               indirect=indirect, start_index=start)
        self.dev = PackedDeviceQueue(self.region, self.layout, iova=BASE, event_idx=event_idx,
                                     avail_index=start & 0x7FFF, avail_wrap=start >> 15)
        self.flags = self.region.view(self.layout.desc, 16 * N).cast("H")

    def buf(self, i: int) -> int:
        return BASE + self.layout.buffer(i)

    def close(self) -> None:
        self.flags.release()
        self.dev.close()
        self.q.close()
        self.region.close()


@pytest.fixture
def rig(no_leaks: None):
    r = Rig()
    yield r
    r.close()


def test_one_flags_store_exposes_the_whole_batch(rig: Rig) -> None:
    q, dev = rig.q, rig.dev
    q.add([(rig.buf(0), 16)], [(rig.buf(0) + 64, 32)], "a")  # positions 0, 1
    q.add([(rig.buf(1), 16)], [], "b")  # position 2
    # Everything is written but the first chain's head flags: the device sees nothing.
    assert dev.pop() is None
    assert rig.flags[8 * 1 + 7] & VIRTQ_DESC_F_AVAIL  # the second descriptor is ready...
    assert not rig.flags[8 * 0 + 7] & VIRTQ_DESC_F_AVAIL  # ...behind the unexposed head
    assert q.publish()  # ENABLE: a notification is wanted
    (ia, sa), (ib, sb) = dev.pop(), dev.pop()
    assert [(s.length, s.writable) for s in sa] == [(16, False), (32, True)]
    assert [(s.length, s.writable) for s in sb] == [(16, False)]
    dev.write(sa[1].iova, b"x" * 5)
    dev.push(ib, 0)
    dev.push(ia, 5)
    assert q.drain_used() == [("b", 0), ("a", 5)]  # completion order, by buffer id
    assert q.num_free == N and q.num_in_flight == 0


def test_device_event_suppression_decides_the_kick() -> None:
    r = Rig(event_idx=True)
    try:
        q, dev = r.q, r.dev
        dev.disable_notifications()
        q.add([(r.buf(0), 8)], [], "a")
        assert not q.publish()  # RING_EVENT_FLAGS_DISABLE
        dev.pop()
        dev.enable_notifications()  # DESC at the device's next position (1, wrap 1)
        q.add([(r.buf(1), 8)], [], "b")
        assert q.publish()
        dev.set_avail_event(5, 1)  # wake me at descriptor 5 of this lap
        for i in range(2, 5):
            q.add([(r.buf(i), 8)], [], str(i))
            assert not q.publish(), i  # positions 2, 3, 4: not yet
        q.add([(r.buf(5), 8)], [], "5")
        assert q.publish()  # position 5 was just exposed
        q.add([(r.buf(6), 8)], [], "6")
        assert not q.publish()  # past it
    finally:
        r.close()


def test_driver_event_suppression_is_what_the_device_reads() -> None:
    r = Rig(event_idx=True)
    try:
        q, dev = r.q, r.dev
        drv = r.region.view(r.layout.driver_event, 4).cast("H")
        try:
            assert not q.disable_interrupts()
            assert drv[1] == RING_EVENT_FLAGS_DISABLE
            for i in range(3):
                q.add([], [(r.buf(i), 8)], str(i))
            q.publish()
            assert not q.enable_interrupts_after(3)  # nothing used yet: sleep
            assert drv[1] == RING_EVENT_FLAGS_DESC
            assert drv[0] == 2 | 1 << 15  # the third chain's position, wrap counter 1
            ids = [dev.pop()[0] for _ in range(3)]
            assert not dev.push(ids[0], 8)  # the driver asked for position 2
            assert not dev.push(ids[1], 8)
            assert dev.push(ids[2], 8)
            assert q.has_used()
            assert len(q.drain_used()) == 3
            q.disable_interrupts()
            assert not q.enable_interrupts()  # ENABLE-equivalent at the next position
            assert drv[1] in (RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_ENABLE)
        finally:
            drv.release()
    finally:
        r.close()


@pytest.mark.parametrize(("written", "expected"), [
    (5, 5),  # QEMU: the true length, no WRITE
    (16, 32),  # DPDK vhost_blk: the head's own available length left in place -> unknown
    (33, 32),  # over the capacity: reserved -> unknown -> used completely
    (0, 0),
])
def test_used_length_without_the_write_flag(rig: Rig, written: int, expected: int) -> None:
    """Without VIRTQ_DESC_F_WRITE a used len is reserved (VIRTIO 1.2 §2.8.3, §2.8.4); real
    devices write data without the flag anyway.  A plausible len is taken, the head
    descriptor's left-over len or an impossible one means "unknown: used completely"."""
    q, dev = rig.q, rig.dev
    q.add([(rig.buf(0), 16)], [(rig.buf(0) + 64, 32)], "t")
    q.publish()
    buffer_id, _ = dev.pop()
    hostile = PackedHostileDevice(rig.region, rig.layout, used_index=0, used_wrap=1)
    try:
        hostile.complete(buffer_id, written, written=False)
    finally:
        hostile.close()
    assert q.pop_used() == ("t", expected)


def test_used_length_with_the_write_flag_is_strict(rig: Rig) -> None:
    q, dev = rig.q, rig.dev
    q.add([(rig.buf(0), 16)], [(rig.buf(0) + 64, 32)], "t")
    q.publish()
    buffer_id, _ = dev.pop()
    dev.push(buffer_id, 33)  # WRITE set (len > 0), more than the chain's 32 writable bytes
    with pytest.raises(DeviceProtocolError, match=r"desc\[0\]\.len") as info:
        q.drain_used()
    assert info.value.completed == []
    with pytest.raises(QueueBrokenError):
        q.add([(rig.buf(1), 8)], [], "u")
    assert q.reset() == ["t"]


@pytest.mark.parametrize("bad", ["wrong-wrap", "id-range", "id-not-in-flight",
                                 "id-unpublished"])
def test_impossible_used_descriptors(rig: Rig, bad: str) -> None:
    q, dev = rig.q, rig.dev
    first = q.add([(rig.buf(0), 8)], [], "a")
    if bad == "id-not-in-flight":
        q.add([(rig.buf(2), 8)], [], "b")  # a second published position to lie at
    q.publish()
    late = q.add([(rig.buf(1), 8)], [], "late")  # added, never published
    dev.pop()
    hostile = PackedHostileDevice(rig.region, rig.layout)
    try:
        if bad == "wrong-wrap":
            hostile.complete_wrong_wrap(first, 0)
        elif bad == "id-range":
            hostile.complete(N + 3, 0)
        elif bad == "id-not-in-flight":
            hostile.complete(first, 0)
            hostile.complete(first, 0)  # the same id twice
        else:
            hostile.complete(late, 0)
    finally:
        hostile.close()
    with pytest.raises(DeviceProtocolError) as info:
        q.drain_used()
    assert info.value.completed == ([("a", 0)] if bad == "id-not-in-flight" else [])
    lost = q.reset()
    tokens = {"a", "late"} | ({"b"} if bad == "id-not-in-flight" else set())
    assert sorted(lost) == sorted(tokens - {t for t, _ in info.value.completed})


def test_not_yet_used_is_not_an_error(rig: Rig) -> None:
    """AVAIL != USED at the used position: still available (§2.8.1), nothing to reap."""
    q = rig.q
    q.add([(rig.buf(0), 8)], [], "a")
    q.publish()
    hostile = PackedHostileDevice(rig.region, rig.layout)
    try:
        hostile.complete_split_bits(0, 0, avail=0, used=1)
    finally:
        hostile.close()
    assert q.drain_used() == []
    assert not q.has_used()


@pytest.mark.parametrize("start", [0, 1 << 15, (N - 1) | 1 << 15, N - 1])
def test_vring_base_is_the_vhost_user_packed_encoding(start: int) -> None:
    """SET_VRING_BASE/GET_VRING_BASE for a packed ring (vhost-user.rst): bits 0-14 the
    avail position, bit 15 the driver wrap counter; bits 16-31 the used side."""
    r = Rig(start=start)
    try:
        q, dev = r.q, r.dev
        assert q.vring_base == start | start << 16
        q.add([(r.buf(0), 8), (r.buf(0) + 8, 8)], [], "a")  # two descriptors
        q.publish()
        pos, wrap = (start & 0x7FFF) + 2, start >> 15
        if pos >= N:
            pos, wrap = pos - N, wrap ^ 1
        assert q.vring_base & 0xFFFF == pos | wrap << 15
        buffer_id, _ = dev.pop()
        dev.push(buffer_id, 0)
        q.drain_used()
        assert q.vring_base == (pos | wrap << 15) * 0x10001
    finally:
        r.close()


def test_bad_arguments(rig: Rig) -> None:
    q = rig.q
    for start in (N, N | 1 << 15, -1, 1 << 16, "0"):
        with pytest.raises(ArgumentError):
            PackedQueue(rig.region, rig.layout, iova=BASE, start_index=start)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError):
        q.add([], [], "empty")
    with pytest.raises(ArgumentError):
        q.enable_interrupts_after(-1)
    with pytest.raises(ArgumentError):
        q.reset(start_index=N)
    assert q.num_free == N
    q.close()
    with pytest.raises(QueueStateError):
        q.add([(rig.buf(0), 8)], [], "x")
    assert "closed" in q.describe() or q.closed


@pytest.mark.parametrize(("in_order", "wrap"), [(False, 1), (True, 0)],
                         ids=["any-order", "in-order"])
def test_cross_process_round_trip_across_the_ring_end(no_leaks, in_order: bool,
                                                      wrap: int) -> None:
    """virtq's PackedQueue here, the packed peer (``python -m virtq.testing.peer --packed``)
    in another process over one memfd: 200 chains through an 8-entry ring (25 laps, both
    wrap counters toggling), direct and indirect, completed in shuffled batches or, in
    order, retired a batch at a time."""
    n, count = 8, 200
    layout = PackedLayout.compute(n, buffer_size=256, indirect_size=4)
    start = n - 2
    with MemfdRegion(layout.nbytes) as region:
        q: PackedQueue[tuple[int, int]] = PackedQueue(
            region, layout, iova=BASE, indirect=True, in_order=in_order,
            start_index=start | wrap << 15)
        args = [sys.executable, "-m", "virtq.testing.peer", "--packed", "--fd",
                str(region.fd), "--nbytes", str(region.nbytes), "--queue-size", str(n),
                "--buffer-size", "256", "--indirect-size", "4", "--iova", hex(BASE),
                "--count", str(count), "--avail-index", str(start), "--avail-wrap",
                str(wrap), "--seed", "3"]
        child = subprocess.Popen(args + (["--in-order"] if in_order else []),
                                 pass_fds=[region.fd])
        try:
            free = list(range(n))
            results: dict[int, bytes] = {}
            sent = 0
            deadline = time.monotonic() + 60
            while len(results) < count:
                assert time.monotonic() < deadline, "peer did not answer"
                while sent < count and free and q.num_free >= 2:
                    slot = free.pop()
                    payload = f"packed {sent:04d}".encode()
                    off = layout.buffer(slot)
                    region.view(off, len(payload))[:] = payload
                    base = BASE + off
                    # As many writable bytes as readable ones: the in-order peer then
                    # fills each chain and may batch it (§2.8.8 skipped = fully written).
                    if sent % 3 == 0:  # two readable + one writable: an indirect table
                        q.add([(base, 4), (base + 4, len(payload) - 4)],
                              [(base + 128, len(payload))], (sent, slot))
                    else:
                        q.add([(base, len(payload))], [(base + 128, len(payload))],
                              (sent, slot))
                    sent += 1
                q.publish()
                for (i, slot), written in q.drain_used():
                    assert written == 11
                    results[i] = bytes(region.view(layout.buffer(slot) + 128, written))
                    free.append(slot)
            assert child.wait(timeout=30) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert [results[i] for i in range(count)] == [
            f"packed {i:04d}".encode()[::-1] for i in range(count)]
        assert q.num_in_flight == 0 and q.num_free == n
        q.close()
