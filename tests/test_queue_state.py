"""Explicit queue state (issue 12 item 4) and the queue-level findings of the 2026-11-30
review: a broken or closed queue refuses everything, whatever way the call arrives; the
original error is the cause; a broken queue holds no reference cycle; driver state is never
read back from shared memory; a chain in flight for 65 536 positions is still accepted."""

from __future__ import annotations

import gc
from contextlib import contextmanager, suppress

import pytest

from virtq.errors import (
    ArgumentError,
    DeviceProtocolError,
    QueueBrokenError,
    QueueStateError,
)
from virtq.layout import SplitLayout
from virtq.memory import MemfdRegion
from virtq.queue import QueueState, SlotQueue, SplitQueue
from virtq.testing import DeviceQueue, HostileDevice

BASE = 0x4000_0000


@contextmanager
def ring(n=8, **kw):
    layout = SplitLayout.compute(n, buffer_size=256, indirect_size=4)
    with MemfdRegion(layout.nbytes) as region:
        q = SplitQueue(region, layout, iova=BASE, **kw)
        try:
            yield q, layout, region
        finally:
            q.close()


def break_it(q, layout, region):
    q.add([(BASE + layout.buffer(0), 8)], [], "t")
    q.publish()
    hostile = HostileDevice(region, layout)
    hostile.complete(99, 0)  # a head that does not exist
    hostile.close()
    with pytest.raises(DeviceProtocolError) as info:
        q.drain_used()
    return info.value


def calls(q, layout):
    """Every operation of the driver-queue interface that a broken queue must refuse."""
    buf = [(BASE + layout.buffer(1), 8)]
    return {
        "add": (q.add, (buf, [], "x")),
        "add_many": (q.add_many, ([(buf, [], "x")],)),
        "publish": (q.publish, ()),
        "drain_used": (q.drain_used, ()),
        "pop_used": (q.pop_used, ()),
        "disable_interrupts": (q.disable_interrupts, ()),
        "enable_interrupts": (q.enable_interrupts, ()),
        "enable_interrupts_after": (q.enable_interrupts_after, (2,)),
        "template": (q.template, (2,)),
    }


def test_bound_methods_fetched_before_the_break_refuse_too():
    """The old guard replaced methods by instance attributes: a bound method fetched
    earlier (a driver caches q.add in a hot loop) kept working on a broken queue."""
    with ring() as (q, layout, region):
        tpl = q.template(2, slots=2)
        slot = tpl.acquire()
        bound = calls(q, layout)
        submit = tpl.submit
        err = break_it(q, layout, region)
        assert q.state is QueueState.BROKEN and q.broken is err
        for name, (method, args) in bound.items():
            with pytest.raises(QueueBrokenError) as info:
                method(*args)
            assert info.value.__cause__ is err, name
            assert info.value.cause is err, name
        with pytest.raises(QueueBrokenError):
            submit(slot, [(BASE, 8)], [], "x")
        # inspection still works, and reset() makes it usable again
        assert q.snapshot()["state"] == "broken"
        assert "broken" in q.describe()
        assert q.reset() == ["t"]  # the chain the bad element did not complete
        assert q.state is QueueState.READY
        q.add([(BASE, 8)], [], "again")


def test_closed_queue_refuses_through_old_bound_methods():
    with ring() as (q, layout, _region):
        bound = calls(q, layout)
        q.close()
        for _name, (method, args) in bound.items():
            with pytest.raises(QueueStateError, match="closed"):
                method(*args)
        with pytest.raises(QueueStateError):
            q.reset()
        assert q.state is QueueState.CLOSED


def test_reset_returns_the_victims_of_a_break():
    with ring() as (q, layout, region):
        q.add([(BASE, 8)], [], "a")
        err = break_it(q, layout, region)
        assert err.completed == []
        assert sorted(q.reset()) == ["a", "t"]


def test_slot_queue_has_the_same_state_rules():
    layout = SplitLayout.compute(4, buffer_size=64)
    with MemfdRegion(layout.nbytes) as region:
        q = SlotQueue(region, layout, iova=BASE, writable=True, slot_size=64,
                      slots=[BASE + layout.buffer(d) for d in range(4)])
        reap, submit = q.reap, q.submit
        q.submit(2)
        q.publish()
        hostile = HostileDevice(region, layout)
        hostile.complete(3, 0)  # never published
        hostile.close()
        with pytest.raises(DeviceProtocolError) as info:
            reap()
        for call in (reap, lambda: submit(1), q.publish, q.drain_used):
            with pytest.raises(QueueBrokenError) as broken:
                call()
            assert broken.value.__cause__ is info.value
        assert q.reset() == [0, 1]
        q.close()
        with pytest.raises(QueueStateError):
            submit(1)


def test_a_broken_queue_holds_no_reference_cycle():
    """Dropped without close(), with the cyclic GC off, a queue that broke must free its
    views by reference counting alone, so the region closes cleanly.  (The old guard kept
    the error -- whose traceback holds the queue's frames -- in closures on the queue.)"""
    gc.collect()
    gc.disable()
    try:
        layout = SplitLayout.compute(8, buffer_size=256)
        with MemfdRegion(layout.nbytes) as region:
            q = SplitQueue(region, layout, iova=BASE)
            q.add([(BASE + layout.buffer(0), 8)], [], "t")
            q.publish()
            hostile = HostileDevice(region, layout)
            hostile.complete(99, 0)
            hostile.close()
            with suppress(DeviceProtocolError):
                q.drain_used()
            with pytest.raises(QueueBrokenError):
                q.publish()
            del q
        # the with-block closed the region: no RegionBusyError
    finally:
        gc.enable()


def test_the_cause_survives_the_caller_dropping_it():
    with ring() as (q, layout, region):
        err = break_it(q, layout, region)
        field, value = err.field, err.value
        del err
        gc.collect()
        with pytest.raises(QueueBrokenError) as info:
            q.publish()
        cause = info.value.__cause__
        assert isinstance(cause, DeviceProtocolError)
        assert (cause.field, cause.value) == (field, value)


class Scribbling:
    """A buffer whose unpacking lets the "device" scribble over the avail ring (which it
    may read but never write) and then turns out to be malformed."""

    def __init__(self, avail):
        self.avail = avail

    def __iter__(self):
        for i in range(2, len(self.avail)):
            self.avail[i] = 0xFFFF
        raise ValueError("not an (iova, length) pair")


def test_rollback_never_reads_the_avail_ring_back():
    """add_many undoes a failed batch from the driver's shadow.  The old rollback read the
    heads it had added back from avail.ring: a device scribbling there gave an IndexError
    (or cleared the state of a live chain)."""
    with ring(indirect=True) as (q, layout, region):
        q.add([(BASE, 8)], [], "live")
        avail = region.view(layout.avail, 6 + 2 * 8).cast("H")
        before = q.snapshot()
        chains = [([(BASE, 8), (BASE + 8, 8)], [], "a"), ([(BASE, 8)], [], "b"),
                  ([Scribbling(avail)], [], "c")]
        with pytest.raises(ArgumentError):
            q.add_many(chains)
        avail.release()
        after = q.snapshot()
        for key in ("next_avail", "num_free", "in_flight_heads", "num_in_flight"):
            assert after[key] == before[key], key
        assert q.in_flight_tokens() == ["live"]


def test_add_many_takes_any_iterable():
    """add_many(generator) returned 5 and added nothing (it read the generator twice)."""
    with ring() as (q, _layout, _region):
        gen = (([(BASE + 8 * i, 8)], [], i) for i in range(5))
        assert q.add_many(gen) == 5
        assert q.num_in_flight == 5
        assert q.in_flight_tokens() == [0, 1, 2, 3, 4]


def test_reset_start_index_and_counts_are_checked():
    with ring() as (q, _layout, _region):
        for bad in (70000, -1, "3", 1.5):
            with pytest.raises(ArgumentError):
                q.reset(start_index=bad)  # type: ignore[arg-type]
        for bad in (-1, "8", None):
            with pytest.raises(ArgumentError):
                q.enable_interrupts_after(bad)  # type: ignore[arg-type]
        with pytest.raises(ArgumentError):
            q.add([(BASE, 8)], (b for b in [1]), "x")  # writable is not (iova, len) pairs


def test_a_chain_in_flight_for_65536_positions_is_still_accepted():
    """A valid device was rejected: one chain held for 65 536 avail positions, then
    unpublished adds covering the same position mod 2**16; the device legally completes the
    old chain, and the old queue compared a stale u16 position and raised 'expected a head
    that has been published'.  (This needs 65 536 positions of real traffic: the positions
    are relative, so seeding the start index cannot shorten it.)"""
    n = 8
    layout = SplitLayout.compute(n)
    with MemfdRegion(layout.nbytes) as region:
        q = SplitQueue(region, layout, iova=BASE)
        used = region.view(layout.used, 6 + 8 * n)
        used_h, used_q = used.cast("H"), used[4 : 4 + 8 * n].cast("Q")
        old_head = q.add([(BASE, 8)], [], "old")  # stays in flight throughout
        q.publish()
        idx = 0
        done = 0
        while done < 65536 - 1:  # the old chain's position comes round again
            k = min(n - 1, 65535 - done)
            heads = [q.add([(BASE, 8)], [], None) for _ in range(k)]
            q.publish()
            for h in heads:  # an echo device, written straight into the used ring
                used_q[idx % n] = h
                idx += 1
            used_h[1] = idx & 0xFFFF
            assert len(q.drain_used()) == k
            done += k
        # Now add without publishing: the new chains cover the old one's position mod 2**16.
        q.add([(BASE, 8)], [], "new")
        used_q[idx % n] = old_head
        used_h[1] = (idx + 1) & 0xFFFF
        assert q.drain_used() == [("old", 0)]
        used_h.release()
        used_q.release()
        used.release()
        q.close()


def test_device_queue_walks_indirect_tables_longer_than_the_ring():
    """The test peer bounded a chain by the ring size even inside an indirect table
    (§2.7.5.3.1 lets the table hold more entries): a valid 6-entry table on a 4-entry ring
    was reported as a loop."""
    layout = SplitLayout.compute(4, buffer_size=256, indirect_size=6)
    with MemfdRegion(layout.nbytes) as region:
        q = SplitQueue(region, layout, iova=BASE, indirect=True)
        dev = DeviceQueue(region, layout, iova=BASE)
        q.add([(BASE + 8 * i, 8) for i in range(6)], [], "long")
        q.publish()
        _head, segs = dev.pop()
        assert len(segs) == 6
        dev.close()
        q.close()
