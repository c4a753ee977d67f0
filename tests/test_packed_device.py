"""PackedDeviceQueue (the device's half of a packed ring) against a driver written in this
file straight from VIRTIO 1.2 §2.8 with struct.pack_into -- not virtq's own driver queue, so
the two sides of the wire are checked by independent code."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtq.abi import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from virtq.errors import ArgumentError, QueueStateError, RegionBusyError, RegionClosedError
from virtq.layout import PackedLayout, SplitLayout
from virtq.memory import MemfdRegion
from virtq.testing import DriverProtocolError, PackedDeviceQueue, PackedHostileDevice, Segment
from virtq.testing.packed_device import is_avail, used_flags, vring_base

from .packed_spec_driver import DESC, SpecDriver

BASE = 0x5000_0000  # device address of the region's byte 0


@dataclass
class Ring:
    region: MemfdRegion
    layout: PackedLayout
    drv: SpecDriver
    dev: PackedDeviceQueue

    def buf(self, slot: int, offset: int = 0) -> int:
        return BASE + self.layout.buffer(slot) + offset

    def table(self, buffer_id: int) -> int:
        return BASE + self.layout.indirect_table(buffer_id)

    def write_table(self, buffer_id: int, entries: list[tuple[int, int, int]]) -> int:
        """An indirect table (addr, len, flags) for ``buffer_id``; returns its address."""
        off = self.layout.indirect_table(buffer_id)
        view = self.region.view(off, 16 * len(entries))
        for i, (addr, length, flags) in enumerate(entries):
            DESC.pack_into(view, i * 16, addr, length, 0xBEEF, flags)
        view.release()
        return BASE + off


@contextmanager
def ring(n: int = 8, *, position: int = 0, wrap: int = 1, event_idx: bool = False,
         in_order: bool = False, indirect_size: int = 0, **dev_kw):
    layout = PackedLayout.compute(n, buffer_size=256, indirect_size=indirect_size)
    region = MemfdRegion(layout.nbytes)
    drv = SpecDriver(region, layout, next_avail=position, avail_wrap=wrap, next_used=position,
                     used_wrap=wrap, in_order=in_order)
    dev = PackedDeviceQueue(region, layout, iova=BASE, event_idx=event_idx,
                            avail_index=position, avail_wrap=wrap, **dev_kw)
    try:
        yield Ring(region, layout, drv, dev)
    finally:
        dev.close()
        drv.close()
        region.close()


# -- the basics ------------------------------------------------------------------------------

def test_single_descriptor_round_trip(no_leaks):
    with ring() as r:
        assert r.dev.pop() is None
        r.drv.add(3, [(r.buf(0), 10, False)])
        assert r.dev.avail_pending() == 1
        assert r.dev.pop() == (3, [Segment(r.buf(0), 10, False)])
        assert r.dev.pop() is None
        assert r.dev.inflight == {3: 1}
        assert r.drv.get_used() is None
        r.dev.push(3, 0)
        addr, length, buffer_id, flags = r.drv.read(0)
        assert (buffer_id, length) == (3, 0)
        # §2.8.1: AVAIL = USED = the device's wrap counter; §2.8.3: no WRITE, nothing written.
        assert flags == VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
        assert addr == r.buf(0)  # Element Address is unused in a used descriptor: untouched
        assert r.drv.get_used() == (3, 0, False, [3])
        assert (r.dev.used_index, r.dev.used_wrap) == (1, 1)


def test_chain_id_is_in_the_last_descriptor_and_used_skips_the_chain(no_leaks):
    with ring() as r:
        elems = [(r.buf(0), 4, False), (r.buf(0, 4), 12, False), (r.buf(1), 64, True)]
        r.drv.add(6, elems)
        assert r.dev.pop() == (6, [Segment(*e) for e in elems])
        assert (r.dev.avail_index, r.dev.avail_wrap) == (3, 1)
        assert r.dev.inflight == {6: 3}
        r.dev.push(6, 40)
        _, length, buffer_id, flags = r.drv.read(0)
        assert (buffer_id, length) == (6, 40)
        assert flags == VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED | VIRTQ_DESC_F_WRITE
        assert (r.dev.used_index, r.dev.used_wrap) == (3, 1)
        assert r.drv.get_used() == (6, 40, True, [6])
        assert r.drv.next_used == 3


def test_out_of_order_completion_writes_used_descriptors_in_completion_order(no_leaks):
    with ring() as r:
        r.drv.add(0, [(r.buf(0), 1, False), (r.buf(0, 8), 1, True)])
        r.drv.add(1, [(r.buf(1), 1, True)])
        r.drv.add(2, [(r.buf(2), 1, False)] * 3)
        assert r.dev.avail_pending() == 3
        assert [r.dev.pop()[0] for _ in range(3)] == [0, 1, 2]  # type: ignore[index]
        r.dev.push(2, 0)  # at 0, skips 3
        r.dev.push(0, 1)  # at 3, skips 2
        r.dev.push(1, 1)  # at 5
        assert [r.drv.read(p)[2] for p in (0, 3, 5)] == [2, 0, 1]
        got = [r.drv.get_used() for _ in range(3)]
        assert [g[0] for g in got if g] == [2, 0, 1]
        assert r.drv.get_used() is None
        assert r.dev.used_index == r.drv.next_used == 6


def test_unpublished_used_descriptors_are_invisible_until_publish(no_leaks):
    with ring() as r:
        for i in range(3):
            r.drv.add(i, [(r.buf(i), 8, True)])
            r.dev.pop()
        assert r.dev.push(1, 8, publish=False) is False
        assert r.dev.push(0, 8, publish=False) is False
        assert r.dev.push(2, 8, publish=False) is False
        assert r.dev.pending_used == 3
        # The driver polls only the first position (§2.8.2): nothing is there yet, even
        # though later used descriptors may already carry their flags.
        assert r.drv.get_used() is None
        assert r.dev.publish_used() is True
        assert r.dev.pending_used == 0
        assert [r.drv.get_used()[0] for _ in range(3)] == [1, 0, 2]  # type: ignore[index]
        assert r.dev.publish_used() is False  # nothing pending


def test_other_regions_are_translated(no_leaks):
    other = MemfdRegion(4096)
    try:
        with ring(regions=[(0x9000_0000, other)]) as r:
            r.drv.add(0, [(0x9000_0000 + 100, 50, True)])
            _, segs = r.dev.pop()  # type: ignore[misc]
            r.dev.write(segs[0].iova, b"x" * 50)
            assert bytes(other.view(100, 50)) == b"x" * 50
            assert r.dev.read(0x9000_0000 + 100, 3) == b"xxx"
            with pytest.raises(DriverProtocolError):
                r.dev.read(0x9000_0000 + 4090, 7)
            v = r.dev.view(0x9000_0000, 4)
            v.release()
    finally:
        other.close()


def test_avail_pending_counts_only_complete_exposed_buffers(no_leaks):
    with ring() as r:
        assert r.dev.avail_pending() == 0
        r.drv.add(0, [(r.buf(0), 1, False)] * 2)
        r.drv.add(1, [(r.buf(1), 1, False)])
        r.drv.add(2, [(r.buf(2), 1, False)] * 3, expose=False)
        assert r.dev.avail_pending() == 2
        r.drv.expose()
        assert r.dev.avail_pending() == 3
        r.dev.pop()
        assert r.dev.avail_pending() == 2


def test_vring_base_encoding(no_leaks):
    assert vring_base(5, 0, 3, 1) == 5 | 3 << 16 | 1 << 31
    assert vring_base(0x7FFF, 1, 0x7FFF, 0) == 0x7FFF_FFFF
    with ring(n=8, position=6, wrap=0) as r:
        assert r.dev.vring_base == 6 | 6 << 16
        r.drv.add(0, [(r.buf(0), 1, False)] * 3)
        r.dev.pop()
        assert (r.dev.avail_index, r.dev.avail_wrap) == (1, 1)
        assert r.dev.vring_base == 1 | 1 << 15 | 6 << 16
        r.dev.push(0, 0)
        assert r.dev.vring_base == 1 | 1 << 15 | 1 << 16 | 1 << 31


def test_is_avail_and_used_flags():
    assert is_avail(VIRTQ_DESC_F_AVAIL, 1) and not is_avail(VIRTQ_DESC_F_AVAIL, 0)
    assert is_avail(VIRTQ_DESC_F_USED, 0) and not is_avail(VIRTQ_DESC_F_USED, 1)
    assert not is_avail(0, 0) and not is_avail(0, 1)  # zero-initialised ring (§2.8.13)
    both = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
    assert not is_avail(both, 0) and not is_avail(both, 1)
    assert used_flags(1, False) == both and used_flags(0, True) == VIRTQ_DESC_F_WRITE


# -- wrap of both counters ----------------------------------------------------------------

@pytest.mark.parametrize("wrap", [0, 1])
@pytest.mark.parametrize("back", [1, 2, 3])
def test_chain_across_the_end_of_the_ring(no_leaks, back, wrap):
    n = 8
    with ring(n, position=n - back, wrap=wrap) as r:
        elems = [(r.buf(i), 16, i >= 2) for i in range(4)]
        r.drv.add(5, elems)  # the last 4 - back descriptors are in the next lap
        assert r.dev.pop() == (5, [Segment(*e) for e in elems])
        assert (r.dev.avail_index, r.dev.avail_wrap) == (4 - back, wrap ^ 1)
        r.dev.push(5, 7)
        _, length, buffer_id, flags = r.drv.read(n - back)
        assert (buffer_id, length) == (5, 7)
        assert flags == used_flags(wrap, True)
        assert (r.dev.used_index, r.dev.used_wrap) == (4 - back, wrap ^ 1)
        assert r.drv.get_used() == (5, 7, True, [5])
        assert (r.drv.next_used, r.drv.used_wrap) == (4 - back, wrap ^ 1)


@given(
    n=st.integers(1, 9),
    back=st.integers(1, 9),
    wrap=st.integers(0, 1),
    in_order=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_laps_against_the_spec_driver(n, back, wrap, in_order, seed):
    """Random buffers (direct lists, indirect tables), completed in random order (or in
    random in-order batches) with random publish points, over several laps from a start
    a few positions before the end with either wrap value: the spec driver sees exactly
    the ids and lengths the device used, and both sides end at the same positions."""
    rng = random.Random(seed)
    position = (n - back) % n
    with ring(n, position=position, wrap=wrap, in_order=in_order, indirect_size=4) as r:
        next_id = list(range(n))
        rng.shuffle(next_id)
        expected: dict[int, tuple[int, list[Segment]]] = {}
        popped: list[int] = []
        added = reaped = 0
        for _ in range(6 * n + 10):
            # driver: add while there is room
            while next_id and r.drv.free and rng.random() < 0.6:
                b = next_id.pop()
                k = rng.randint(1, min(3, r.drv.free))
                elems = [(r.buf(b, 8 * i), rng.randrange(1, 8), i >= k // 2)
                         for i in range(k)]
                if rng.random() < 0.25:
                    table = r.write_table(b, [(a, ln, VIRTQ_DESC_F_WRITE if w else 0)
                                              for a, ln, w in elems])
                    r.drv.add(b, [(table, 16 * k, False)], extra_flags=(VIRTQ_DESC_F_INDIRECT,))
                else:
                    r.drv.add(b, elems)
                expected[b] = (rng.randrange(0, 100), [Segment(*e) for e in elems])
                added += 1
            # device: pop everything, use some
            while (got := r.dev.pop()) is not None:
                b, segs = got
                assert segs == expected[b][1]
                popped.append(b)
            if popped and rng.random() < 0.7:
                if in_order:
                    last = popped[rng.randrange(len(popped))]
                    del popped[: popped.index(last) + 1]
                    r.dev.push_in_order(last, expected[last][0], publish=False)
                else:
                    for b in rng.sample(popped, rng.randint(1, len(popped))):
                        popped.remove(b)
                        r.dev.push(b, expected[b][0], publish=False)
                if rng.random() < 0.7:
                    r.dev.publish_used()
            # driver: reap
            while (u := r.drv.get_used()) is not None:
                b, length, written, retired = u
                assert (length, written) == (expected[b][0], expected[b][0] > 0)
                for x in retired:
                    del expected[x]
                    next_id.append(x)
                reaped += len(retired)
        r.dev.publish_used()
        for b in popped:
            r.dev.push(b, expected[b][0])
        while (u := r.drv.get_used()) is not None:
            reaped += len(u[3])
        assert not r.dev.inflight and r.dev.avail_pending() == 0
        assert reaped == added
        assert (r.drv.next_used, r.drv.used_wrap) == (r.dev.used_index, r.dev.used_wrap)
        assert (r.drv.next_avail, r.drv.avail_wrap) == (r.dev.avail_index, r.dev.avail_wrap)
        assert (r.drv.next_avail, r.drv.avail_wrap) == (r.drv.next_used, r.drv.used_wrap)


# -- in-order batches (§2.8.8) -------------------------------------------------------------

def test_push_in_order_retires_a_batch_with_one_used_descriptor(no_leaks):
    with ring(n=8, position=5, wrap=1, in_order=True) as r:
        lengths = {4: 2, 5: 1, 7: 3, 6: 1}
        for b, k in lengths.items():
            r.drv.add(b, [(r.buf(0), 1, False)] * k)
        for b in lengths:
            assert r.dev.pop()[0] == b  # type: ignore[index]
        r.dev.push_in_order(7, 33)  # 4, 5, 7: 6 descriptors from position 5
        _, length, buffer_id, flags = r.drv.read(5)
        assert (buffer_id, length, flags) == (7, 33, used_flags(1, True))
        assert (r.dev.used_index, r.dev.used_wrap) == (3, 0)
        assert r.dev.inflight == {6: 1}
        # Only one used descriptor: the position after the batch's first is untouched.
        assert r.drv.read(7)[3] & VIRTQ_DESC_F_USED == 0
        assert r.drv.get_used() == (7, 33, True, [4, 5, 7])
        r.dev.push_in_order(6, 0)
        assert r.drv.read(3)[2:] == (6, used_flags(0, False))
        assert r.drv.get_used() == (6, 0, False, [6])
        assert (r.drv.next_used, r.drv.used_wrap) == (r.dev.used_index, r.dev.used_wrap)


def test_push_in_order_after_out_of_order_pushes_skips_only_unused(no_leaks):
    with ring() as r:
        for b in range(4):
            r.drv.add(b, [(r.buf(b), 1, False)] * 2)
            r.dev.pop()
        r.dev.push(1, 0)  # used early, out of order: 2 descriptors
        r.dev.push_in_order(2, 5)  # 0 and 2: 4 descriptors
        assert r.dev.used_index == 6
        assert r.dev.inflight == {3: 2}


def test_push_in_order_of_an_unknown_id_is_refused(no_leaks):
    with ring() as r:
        r.drv.add(0, [(r.buf(0), 1, False)])
        r.dev.pop()
        for bad in (1, -1, None, 0.0):
            with pytest.raises(ArgumentError):
                r.dev.push_in_order(bad, 0)  # type: ignore[arg-type]
        assert r.dev.inflight == {0: 1}


# -- indirect tables (§2.8.7) --------------------------------------------------------------

def test_indirect_table(no_leaks):
    with ring(indirect_size=4) as r:
        entries = [(r.buf(0), 8, 0), (r.buf(0, 8), 8, 0), (r.buf(1), 32, VIRTQ_DESC_F_WRITE)]
        table = r.write_table(4, entries)
        # WRITE on the indirect descriptor itself is reserved and ignored (§2.8.7).
        r.drv.add(4, [(table, 48, True)], extra_flags=(VIRTQ_DESC_F_INDIRECT,))
        assert r.dev.pop() == (4, [Segment(a, ln, bool(f)) for a, ln, f in entries])
        assert r.dev.inflight == {4: 1}  # one ring descriptor
        r.dev.push(4, 16)
        assert r.drv.get_used() == (4, 16, True, [4])


def test_indirect_table_may_be_as_long_as_the_queue_or_the_device_limit(no_leaks):
    with ring(n=4, indirect_size=6) as r:
        table = r.write_table(0, [(r.buf(0), 1, 0)] * 4)
        r.drv.add(0, [(table, 64, False)], extra_flags=(VIRTQ_DESC_F_INDIRECT,))
        assert len(r.dev.pop()[1]) == 4  # type: ignore[index]
    with ring(n=4, indirect_size=6, max_segments=6) as r:
        table = r.write_table(0, [(r.buf(0), 1, 0)] * 6)
        r.drv.add(0, [(table, 96, False)], extra_flags=(VIRTQ_DESC_F_INDIRECT,))
        assert len(r.dev.pop()[1]) == 6  # type: ignore[index]


# -- everything the driver can get wrong -------------------------------------------------------

BAD_CASES = {
    "unmapped address": lambda r: r.drv.add(0, [(0x10, 4, False)]),
    "address past the region": lambda r: r.drv.add(
        0, [(BASE + r.region.nbytes - 2, 4, False)]),
    "readable after writable": lambda r: r.drv.add(
        0, [(r.buf(0), 4, True), (r.buf(1), 4, False)]),
    "buffer id >= queue size": lambda r: r.drv.add(8, [(r.buf(0), 4, False)]),
    "buffer id 0xffff": lambda r: r.drv.add(0xFFFF, [(r.buf(0), 4, False)]),
    "indirect with next": lambda r: r.drv.add(
        0, [(r.write_table(0, [(r.buf(0), 4, 0)]), 16, False), (r.buf(1), 4, False)],
        extra_flags=(VIRTQ_DESC_F_INDIRECT,)),
    "indirect after next": lambda r: r.drv.add(
        0, [(r.buf(1), 4, False), (r.write_table(0, [(r.buf(0), 4, 0)]), 16, False)],
        extra_flags=(0, VIRTQ_DESC_F_INDIRECT)),
    "indirect len not a multiple of 16": lambda r: r.drv.add(
        0, [(r.write_table(0, [(r.buf(0), 4, 0)] * 2), 24, False)],
        extra_flags=(VIRTQ_DESC_F_INDIRECT,)),
    "indirect len 0": lambda r: r.drv.add(
        0, [(r.table(0), 0, False)], extra_flags=(VIRTQ_DESC_F_INDIRECT,)),
    "indirect table unmapped": lambda r: r.drv.add(
        0, [(0x1000, 32, False)], extra_flags=(VIRTQ_DESC_F_INDIRECT,)),
    "indirect table too long": lambda r: r.drv.add(
        0, [(r.write_table(0, [(r.buf(0), 4, 0)] * 9), 9 * 16, False)],
        extra_flags=(VIRTQ_DESC_F_INDIRECT,)),
    "next inside an indirect table": lambda r: r.drv.add(
        0, [(r.write_table(0, [(r.buf(0), 4, VIRTQ_DESC_F_NEXT), (r.buf(0), 4, 0)]), 32,
             False)], extra_flags=(VIRTQ_DESC_F_INDIRECT,)),
    "indirect inside an indirect table": lambda r: r.drv.add(
        0, [(r.write_table(0, [(r.table(1), 16, VIRTQ_DESC_F_INDIRECT)]), 16, False)],
        extra_flags=(VIRTQ_DESC_F_INDIRECT,)),
    "avail bit inside an indirect table": lambda r: r.drv.add(
        0, [(r.write_table(0, [(r.buf(0), 4, VIRTQ_DESC_F_AVAIL)]), 16, False)],
        extra_flags=(VIRTQ_DESC_F_INDIRECT,)),
    "readable after writable in a table": lambda r: r.drv.add(
        0, [(r.write_table(0, [(r.buf(0), 4, VIRTQ_DESC_F_WRITE), (r.buf(0), 4, 0)]), 32,
             False)], extra_flags=(VIRTQ_DESC_F_INDIRECT,)),
    "unmapped address in a table": lambda r: r.drv.add(
        0, [(r.write_table(0, [(0x20, 4, 0)]), 16, False)],
        extra_flags=(VIRTQ_DESC_F_INDIRECT,)),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_driver_protocol_errors(no_leaks, case):
    with ring(n=8, indirect_size=9) as r:
        BAD_CASES[case](r)
        with pytest.raises(DriverProtocolError):
            r.dev.pop()
        # Nothing was consumed: the device's state is as before, and it says so again.
        assert (r.dev.avail_index, r.dev.avail_wrap, r.dev.inflight) == (0, 1, {})
        with pytest.raises(DriverProtocolError):
            r.dev.pop()


def test_a_list_longer_than_the_ring_is_a_loop(no_leaks):
    with ring(n=4) as r:
        # Every descriptor available with NEXT: a list that never ends.
        for p in range(4):
            r.drv.raw(p, r.buf(0), 1, 0, r.drv.flags(False, True, 1))
        with pytest.raises(DriverProtocolError, match="longer than 4"):
            r.dev.pop()
        assert r.dev.avail_pending() == 0  # no complete buffer, and no hang


def test_a_list_longer_than_the_device_limit(no_leaks):
    with ring(n=8, max_segments=2) as r:
        r.drv.add(0, [(r.buf(0), 1, False)] * 3)
        with pytest.raises(DriverProtocolError, match="longer than 2"):
            r.dev.pop()


@pytest.mark.parametrize("bits", ["zero", "other-wrap", "used"])
def test_continuation_descriptor_that_is_not_available(no_leaks, bits):
    with ring() as r:
        r.drv.add(0, [(r.buf(0), 1, False)] * 2)
        flags = {"zero": 0,
                 "other-wrap": VIRTQ_DESC_F_USED,  # available for wrap counter 0
                 "used": VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED}[bits]
        r.drv.raw(1, r.buf(0), 1, 0, flags)
        with pytest.raises(DriverProtocolError, match="not available"):
            r.dev.pop()


def test_buffer_id_reused_while_in_flight(no_leaks):
    with ring() as r:
        r.drv.add(2, [(r.buf(0), 1, False)])
        r.dev.pop()
        r.drv.sgs.pop(2)
        r.drv.add(2, [(r.buf(0), 1, False)])
        with pytest.raises(DriverProtocolError, match="again"):
            r.dev.pop()
        r.dev.push(2, 0)
        assert r.dev.pop()[0] == 2  # type: ignore[index]


def test_overrunning_the_used_position_is_detected(no_leaks):
    with ring(n=4, position=2) as r:
        for b in range(4):
            r.drv.add(b, [(r.buf(b), 1, False)])
            r.dev.pop()
        # A driver that lost count: a fifth buffer in the slot of the first one, which the
        # device has not marked used (the driver is a lap ahead now: wrap counter 0).
        r.drv.raw(2, r.buf(0), 1, 0, r.drv.flags(False, False, 0))
        with pytest.raises(DriverProtocolError, match="overran"):
            r.dev.pop()
        r.dev.push(0, 0, publish=False)
        with pytest.raises(DriverProtocolError, match="overran"):
            r.dev.pop()  # not published: the driver could not know the slot was free
        r.dev.publish_used()
        # Now the used descriptor at 2 is there; the driver writes its next buffer after
        # seeing it, and that one is legal.
        assert r.drv.get_used() == (0, 0, False, [0])
        r.drv.add(0, [(r.buf(0), 1, False)])
        assert r.dev.pop() == (0, [Segment(r.buf(0), 1, False)])


def test_not_available_descriptors_are_not_popped(no_leaks):
    with ring(n=4) as r:
        for flags in (0, VIRTQ_DESC_F_USED, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED):
            r.drv.raw(0, r.buf(0), 1, 0, flags)
            assert r.dev.pop() is None
            assert r.dev.avail_pending() == 0


# -- used-buffer notifications (driver event suppression, §2.8.10) --------------------------

def _complete(r: Ring, count: int, *, one_by_one: bool = False) -> bool:
    ids = []
    for _ in range(count):
        b = next(i for i in range(r.drv.n) if i not in r.drv.sgs)
        r.drv.add(b, [(r.buf(0), 1, False)])
        ids.append(b)
    for _ in ids:
        r.dev.pop()
    for b in ids:
        r.dev.push(b, 0, publish=False)
    wants = r.dev.publish_used()
    while r.drv.get_used() is not None:
        pass
    return wants


@pytest.mark.parametrize("event_idx", [False, True])
def test_enable_and_disable(no_leaks, event_idx):
    with ring(event_idx=event_idx) as r:
        assert _complete(r, 1) is True  # zero-initialised: ENABLE
        r.drv.set_driver_event(RING_EVENT_FLAGS_DISABLE)
        assert _complete(r, 2) is False
        r.drv.set_driver_event(RING_EVENT_FLAGS_ENABLE)
        assert _complete(r, 1) is True
        r.drv.set_driver_event(3)  # reserved: not "disable"
        assert _complete(r, 1) is True
        r.drv.set_driver_event(RING_EVENT_FLAGS_DISABLE | 0x100)  # reserved bits ignored
        assert _complete(r, 1) is False


def test_desc_without_event_idx_means_notify(no_leaks):
    with ring(event_idx=False) as r:
        r.drv.set_driver_event(RING_EVENT_FLAGS_DESC, off=7, wrap=0)
        assert _complete(r, 1) is True


def _covered(start: int, wrap: int, count: int, n: int) -> set[tuple[int, int]]:
    """The (position, wrap) pairs the used position steps over: the oracle."""
    out = set()
    for _ in range(count):
        out.add((start, wrap))
        start += 1
        if start == n:
            start, wrap = 0, wrap ^ 1
    return out


@given(n=st.integers(1, 8), start=st.integers(0, 7), wrap=st.integers(0, 1),
       count=st.integers(1, 8), off=st.integers(0, 7), off_wrap=st.integers(0, 1))
def test_desc_event_matches_the_positions_the_batch_covered(n, start, wrap, count, off,
                                                            off_wrap):
    start, count, off = start % n, min(count, n), off % n
    with ring(n, position=start, wrap=wrap, event_idx=True) as r:
        r.drv.set_driver_event(RING_EVENT_FLAGS_DESC, off=off, wrap=off_wrap)
        wants = _complete(r, count)
        assert wants == ((off, off_wrap) in _covered(start, wrap, count, n))


def test_desc_event_examples(no_leaks):
    with ring(8, position=6, wrap=1, event_idx=True) as r:
        r.drv.set_driver_event(RING_EVENT_FLAGS_DESC, off=0, wrap=0)
        assert _complete(r, 1) is False  # wrote 6
        assert _complete(r, 1) is False  # wrote 7
        assert _complete(r, 1) is True  # wrote 0 of the next lap
        assert _complete(r, 3) is False  # 1..3: the event is behind
        r.drv.set_driver_event(RING_EVENT_FLAGS_DESC, off=4, wrap=0)
        assert _complete(r, 4) is True  # 4..7 crosses it
        r.drv.set_driver_event(RING_EVENT_FLAGS_DESC, off=1, wrap=1)
        assert _complete(r, 2) is True  # 0, 1 with wrap 1


# -- available-buffer notifications (device event suppression) --------------------------------

def test_device_event_suppression_without_event_idx(no_leaks):
    with ring() as r:
        r.dev.disable_notifications()
        assert r.drv.device_event_words()[1] == RING_EVENT_FLAGS_DISABLE
        r.drv.add(0, [(r.buf(0), 1, False)])
        assert r.drv.needs_kick() is False
        r.dev.enable_notifications()
        assert r.drv.device_event_words()[1] == RING_EVENT_FLAGS_ENABLE
        r.drv.add(1, [(r.buf(0), 1, False)])
        assert r.drv.needs_kick() is True
        with pytest.raises(QueueStateError):
            r.dev.set_avail_event(0, 1)


@pytest.mark.parametrize(("position", "wrap"), [(0, 1), (6, 0), (7, 1)])
def test_device_event_suppression_with_event_idx(no_leaks, position, wrap):
    with ring(8, position=position, wrap=wrap, event_idx=True) as r:
        r.dev.enable_notifications()
        assert r.drv.device_event_words() == (position | wrap << 15, RING_EVENT_FLAGS_DESC)
        r.drv.add(0, [(r.buf(0), 1, False)])
        assert r.drv.needs_kick() is True  # the descriptor the device asked about
        r.dev.pop()
        r.dev.push(0, 0)
        r.drv.get_used()
        # Ask about the descriptor 3 ahead (maybe in the next lap).
        target = r.dev.avail_index + 3
        r.dev.set_avail_event(target % 8, r.dev.avail_wrap ^ (target >= 8))
        r.drv.add(1, [(r.buf(0), 1, False)] * 2)
        assert r.drv.needs_kick() is False  # 2 descriptors: not there yet
        r.drv.add(2, [(r.buf(0), 1, False)] * 2)
        assert r.drv.needs_kick() is True  # crossed it
        r.dev.disable_notifications()
        assert r.drv.device_event_words()[1] == RING_EVENT_FLAGS_DISABLE
        for bad in ((8, 0), (-1, 0), (0, 2)):
            with pytest.raises(ArgumentError):
                r.dev.set_avail_event(*bad)


# -- arguments and lifetime ---------------------------------------------------------------------

def test_constructor_arguments(no_leaks):
    layout = PackedLayout.compute(8)
    with MemfdRegion(layout.nbytes) as region:
        for kw in ({"avail_index": 8}, {"avail_index": -1}, {"avail_wrap": 2},
                   {"used_index": 9}, {"used_wrap": -1}, {"max_segments": 0},
                   {"avail_index": True}):
            with pytest.raises(ArgumentError):
                PackedDeviceQueue(region, layout, iova=BASE, **kw)  # type: ignore[arg-type]
        with pytest.raises(ArgumentError):
            PackedDeviceQueue(region, SplitLayout.compute(8), iova=BASE)  # type: ignore[arg-type]
        small = PackedLayout.compute(8, buffer_size=4096)
        with pytest.raises(ArgumentError):
            PackedDeviceQueue(region, small, iova=BASE)
        # A constructor that fails half-way releases the views it took: the region closes.
        closed = MemfdRegion(4096)
        closed.close()
        with pytest.raises(RegionClosedError):
            PackedDeviceQueue(region, layout, iova=BASE, regions=[(0x9000_0000, closed)])


def test_push_arguments(no_leaks):
    with ring() as r:
        r.drv.add(0, [(r.buf(0), 1, True)])
        r.dev.pop()
        for bad_len in (-1, 2**32, 1.5, True):
            with pytest.raises(ArgumentError):
                r.dev.push(0, bad_len)  # type: ignore[arg-type]
        for bad_id in (1, 8, -1, "0"):
            with pytest.raises(ArgumentError):
                r.dev.push(bad_id, 0)  # type: ignore[arg-type]
        r.dev.push(0, 2**32 - 1)
        with pytest.raises(ArgumentError):
            r.dev.push(0, 0)  # already used
        assert r.drv.get_used() == (0, 2**32 - 1, True, [0])


def test_close_releases_views_and_is_final(no_leaks):
    layout = PackedLayout.compute(4)
    region = MemfdRegion(layout.nbytes)
    dev = PackedDeviceQueue(region, layout, iova=BASE)
    with pytest.raises(RegionBusyError):
        region.close()
    with dev:
        pass
    dev.close()  # idempotent
    assert dev.closed
    for call in (dev.pop, dev.avail_pending, dev.publish_used, dev.disable_notifications,
                 dev.enable_notifications, lambda: dev.push(0, 0), lambda: dev.read(BASE, 1),
                 lambda: dev.push_in_order(0, 0)):
        with pytest.raises(QueueStateError):
            call()
    region.close()


# -- the hostile packed device --------------------------------------------------------------------

def test_hostile_chosen_corruptions(no_leaks):
    with ring(n=4) as r, PackedHostileDevice(r.region, r.layout, seed=1) as h:
        for b in range(3):
            r.drv.add(b, [(r.buf(b), 1, False)])
        h.complete_wrong_wrap(0, 5)
        assert r.drv.get_used() is None  # last lap's bits: not used
        h.complete_split_bits(0, 5, avail=1, used=0)
        assert r.drv.get_used() is None  # AVAIL != USED is never used
        h.write_ahead(1, 1, 9)
        assert r.drv.get_used() is None
        assert r.drv.read(1)[2:] == (1, used_flags(1, True))
        h.complete(0, 5)
        assert r.drv.get_used() == (0, 5, True, [0])
        assert (h.used_index, h.used_wrap) == (1, 1)
        h.complete(1, 0, skip=3)  # passes the end: the cursor's wrap toggles
        assert (h.used_index, h.used_wrap) == (0, 0)
        h.set_device_event(0x8003, 0xFFFF)
        assert r.drv.device_event_words() == (0x8003, 0xFFFF)
        h.write_used(9, 0x1FFFF, -1, 0x1_0080)  # masked to the fields
        assert r.drv.read(1)[1:] == (0xFFFFFFFF, 0xFFFF, 0x0080)


def test_hostile_random_corruptions_are_reproducible(no_leaks):
    layout = PackedLayout.compute(8)
    snapshots = []
    for _ in range(2):
        with MemfdRegion(layout.nbytes) as region:
            with PackedHostileDevice(region, layout, seed=7) as h:
                descriptions = [h.corrupt() for _ in range(200)]
            snapshots.append((descriptions, bytes(region.view(0, layout.nbytes))))
    assert snapshots[0] == snapshots[1]
    kinds = {d.split()[0] for d in snapshots[0][0]}
    assert len(kinds) >= 6, kinds  # the corruptions vary


def test_device_side_survives_hostile_garbage(no_leaks):
    """The device side reads what a hostile device scribbled as driver input: it must
    answer with None, a buffer or DriverProtocolError -- never IndexError or a hang."""
    with ring(n=8, indirect_size=4) as r, PackedHostileDevice(r.region, r.layout,
                                                              seed=3) as h:
        outcomes = {"none": 0, "buffer": 0, "error": 0}
        for _ in range(300):
            h.corrupt()
            try:
                got = r.dev.pop()
            except DriverProtocolError:
                outcomes["error"] += 1
                continue
            if got is None:
                outcomes["none"] += 1
            else:
                outcomes["buffer"] += 1
                r.dev.push(got[0], 0)
        assert outcomes["none"] and outcomes["error"]


# -- the cross-process peer ---------------------------------------------------------------------

@pytest.mark.parametrize("in_order", [False, True])
def test_cross_process_packed_peer(no_leaks, in_order):
    n, count = 8, 60
    layout = PackedLayout.compute(n, buffer_size=256, indirect_size=4)
    start, wrap = n - 2, 0
    with MemfdRegion(layout.nbytes) as region:
        drv = SpecDriver(region, layout, next_avail=start, avail_wrap=wrap, next_used=start,
                         used_wrap=wrap, in_order=in_order)
        args = [sys.executable, "-m", "virtq.testing.peer", "--packed", "--fd", str(region.fd),
                "--nbytes", str(region.nbytes), "--queue-size", str(n), "--buffer-size",
                "256", "--indirect-size", "4", "--iova", hex(BASE), "--count", str(count),
                "--avail-index", str(start), "--avail-wrap", str(wrap)]
        child = subprocess.Popen(args + (["--in-order"] if in_order else []),
                                 pass_fds=[region.fd])
        try:
            free = list(range(n))
            results: dict[int, bytes] = {}
            msg_of: dict[int, int] = {}
            used_descriptors = sent = 0
            deadline = time.monotonic() + 60
            while len(results) < count:
                assert time.monotonic() < deadline, "peer did not answer"
                while sent < count and free and drv.free >= 2:
                    b = free.pop()
                    payload = f"packed {sent:04d}".encode()
                    off = layout.buffer(b)
                    region.view(off, len(payload))[:] = payload
                    if sent % 3 == 0 and drv.free >= 3:  # readable in two descriptors
                        drv.add(b, [(BASE + off, 4, False),
                                    (BASE + off + 4, len(payload) - 4, False),
                                    (BASE + off + 128, len(payload), True)])
                    else:
                        drv.add(b, [(BASE + off, len(payload), False),
                                    (BASE + off + 128, len(payload), True)])
                    msg_of[b] = sent
                    sent += 1
                while (u := drv.get_used()) is not None:
                    used_descriptors += 1
                    for b in u[3]:
                        off = layout.buffer(b)
                        results[msg_of[b]] = bytes(region.view(off + 128, 11))
                        free.append(b)
            assert child.wait(timeout=30) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        for i in range(count):
            assert results[i] == f"packed {i:04d}".encode()[::-1]
        if in_order:
            assert used_descriptors < count  # batches happened
        drv.close()
