"""Chain templates: request shapes declared once, submitted many times; the queue alone
decides direct or indirect and writes the descriptor bytes."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from virtq.errors import (
    ArgumentError,
    DeviceProtocolError,
    QueueBrokenError,
    QueueFullError,
    QueueStateError,
)
from virtq.layout import SplitLayout
from virtq.memory import MemfdRegion
from virtq.queue import ChainTemplate, QueueState, SplitQueue
from virtq.queue import split as split_mod
from virtq.testing import DeviceQueue, HostileDevice

BASE = 0x4000_0000


@contextmanager
def ring(n=8, *, indirect=True, start_index=0):
    layout = SplitLayout.compute(n, buffer_size=4096, indirect_size=4)
    region = MemfdRegion(layout.nbytes)
    q = SplitQueue(region, layout, iova=BASE, indirect=indirect, start_index=start_index)
    dev = DeviceQueue(region, layout, iova=BASE)
    try:
        yield q, dev, layout
    finally:
        dev.close()
        q.close()
        region.close()


def buf(layout, slot, off=0):
    return BASE + layout.buffer(slot) + off


def blk_shape(layout, slot, nbytes=512):
    """Header (readable), data and status (writable): the virtio-blk read shape."""
    return ([(buf(layout, slot), 16)],
            [(buf(layout, slot, 64), nbytes), (buf(layout, slot, 32), 1)])


@pytest.fixture
def count_writes(monkeypatch):
    """How many descriptors the queue writes (every one goes through _PACK_DESC)."""
    calls = []
    real = split_mod._PACK_DESC

    def counting(*args):
        calls.append(args[1])
        real(*args)

    monkeypatch.setattr(split_mod, "_PACK_DESC", counting)
    return calls


def test_indirect_template_round_trip_any_order(no_leaks):
    with ring() as (q, dev, layout):
        tpl = q.template(3, slots=4)
        assert isinstance(tpl, ChainTemplate)
        assert tpl.persistent and tpl.indirect and tpl.slots == 4
        assert q.num_free == 4  # each slot keeps one ring descriptor for good
        slots = [tpl.acquire() for _ in range(3)]
        assert slots == [0, 1, 2] and tpl.num_free == 1
        for s in slots:
            tpl.submit(s, *blk_shape(layout, s), token=f"req{s}")
        q.publish()
        chains = [dev.pop() for _ in slots]
        for (_, segs), s in zip(chains, slots, strict=True):
            assert [(g.iova, g.length, g.writable) for g in segs] == [
                (buf(layout, s), 16, False), (buf(layout, s, 64), 512, True),
                (buf(layout, s, 32), 1, True)]
        for head, _ in reversed(chains):  # completed in reverse order
            dev.push(head, 513)
        assert q.drain_used() == [("req2", 513), ("req1", 513), ("req0", 513)]
        assert tpl.num_free == 4  # completed slots are free again
        assert tpl.acquire() == 0  # the slot freed last comes first


def test_same_buffers_write_no_descriptor(count_writes):
    with ring() as (q, dev, layout):
        tpl = q.template(3, slots=2)
        setup_writes = len(count_writes)  # the two heads pointing at their tables
        r, w = blk_shape(layout, 0)

        def once(readable, writable, token):
            slot = tpl.acquire()
            tpl.submit(slot, readable, writable, token)
            q.publish()
            head, segs = dev.pop()
            dev.push(head, 513)
            assert q.drain_used() == [(token, 513)]
            return segs

        before = len(count_writes)
        once(r, w, 1)
        assert len(count_writes) - before == 3  # header, data, status entries
        before = len(count_writes)
        once(r, w, 2)  # the very same objects: nothing written
        assert len(count_writes) == before
        once(list(r), list(w), 3)  # equal, new objects: compared, nothing written
        assert len(count_writes) == before
        segs = once(r, [(buf(layout, 1, 64), 512), w[1]], 4)  # a new data buffer
        assert len(count_writes) - before == 1
        assert segs[1].iova == buf(layout, 1, 64)
        # and the repeat of a slot's previous chain: no buffers passed at all
        slot = tpl.acquire()
        before = len(count_writes)
        tpl.submit_many([slot], None, None, ["again"])
        q.publish()
        _head, segs = dev.pop()
        assert segs[1].iova == buf(layout, 1, 64) and len(count_writes) == before
        assert setup_writes == 2


def test_chain_lengths_change_on_a_slot():
    """A slot that carried three buffers now carries one, then two: the head's table
    length follows, so the device never sees a stale entry."""
    with ring() as (q, dev, layout):
        tpl = q.template(4, slots=1)
        shapes = [blk_shape(layout, 0), ([(buf(layout, 0), 16)], []),
                  ([(buf(layout, 0), 16)], [(buf(layout, 0, 32), 1)]),
                  blk_shape(layout, 0, 1024)]
        for r, w in shapes:
            slot = tpl.acquire()
            tpl.submit(slot, r, w, "t")
            q.publish()
            head, segs = dev.pop()
            assert [(g.iova, g.length, g.writable) for g in segs] == \
                [(a, n, False) for a, n in r] + [(a, n, True) for a, n in w]
            dev.push(head, 0)
            q.drain_used()


def test_one_buffer_template_keeps_one_descriptor_per_slot(count_writes):
    with ring(indirect=False) as (q, dev, layout):
        tpl = q.template(1, slots=8)
        assert tpl.persistent and not tpl.indirect and q.num_free == 0
        for rnd in range(3):
            slots = tpl.acquire_many(8)
            before = len(count_writes)
            tpl.submit_many(slots, [()] * 8, [((buf(layout, s), 100),) for s in slots],
                            list(range(8)))
            if rnd:
                assert len(count_writes) == before  # equal buffers: nothing rewritten
            q.publish()
            for _ in range(8):
                head, segs = dev.pop()
                assert segs == [segs[0]] and segs[0].writable and segs[0].length == 100
                dev.push(head, 100)
            assert sorted(t for t, _ in q.drain_used()) == list(range(8))


def test_direct_template_takes_descriptors_per_submission():
    with ring(indirect=False) as (q, dev, layout):
        tpl = q.template(3, typical_buffers=2)
        assert not tpl.persistent and tpl.slots == 8 // 2
        a, b = tpl.acquire(), tpl.acquire()
        tpl.submit(a, *blk_shape(layout, 0), token="a")
        assert q.num_free == 5
        tpl.submit(b, *blk_shape(layout, 1), token="b")
        c = tpl.acquire()
        before = q.snapshot()
        with pytest.raises(QueueFullError):  # 2 descriptors left, 3 needed
            tpl.submit(c, *blk_shape(layout, 2), token="c")
        assert q.snapshot() == before
        tpl.release(c)
        q.publish()
        for head, _ in [dev.pop(), dev.pop()]:
            dev.push(head, 513)
        assert sorted(q.drain_used()) == [("a", 513), ("b", 513)]
        assert q.num_free == 8 and tpl.num_free == tpl.slots
        # batches are all or nothing against the free descriptors too
        slots = tpl.acquire_many(2)
        tpl.submit_many(slots, [blk_shape(layout, 0)[0]] * 2, [blk_shape(layout, 0)[1]] * 2,
                        ["x", "y"])
        assert q.num_free == 2


def test_slot_misuse_is_refused_and_changes_nothing():
    with ring() as (q, _dev, layout):
        tpl = q.template(3, slots=2)
        r, w = blk_shape(layout, 0)
        for bad in (-1, 2, 99, "0", 0.0, None):
            with pytest.raises(ArgumentError):
                tpl.submit(bad, r, w, "x")  # type: ignore[arg-type]
        with pytest.raises(ArgumentError):  # not acquired
            tpl.submit(0, r, w, "x")
        slot = tpl.acquire()
        before = q.snapshot()
        for readable, writable in (([(buf(layout, 0), 0)], w),  # zero length
                                   ([(buf(layout, 0), 1 << 32)], w),  # over u32
                                   ([(-1, 16)], w), ([("a", 16)], w), ([(1.5, 16)], w),
                                   ([], []), (r, w * 2),  # empty; more than max_buffers
                                   ([(buf(layout, 0), (1 << 32) - 2)], [(0, 2)])):  # total
            with pytest.raises(ArgumentError):
                tpl.submit(slot, readable, writable, "x")
            assert q.snapshot() == before  # nothing submitted, the slot still held
        tpl.submit(slot, r, w, "ok")
        with pytest.raises(ArgumentError):  # twice
            tpl.submit(slot, r, w, "again")
        with pytest.raises(ArgumentError):
            tpl.release(slot)  # in flight, not held
        other = tpl.acquire()
        with pytest.raises(QueueFullError):
            tpl.acquire()
        with pytest.raises(ArgumentError):  # all or nothing: one is not held
            tpl.release_many([other, slot])
        tpl.release_many([other])
        with pytest.raises(ArgumentError):  # never submitted: nothing to repeat
            tpl.submit_many([tpl.acquire()], None, None, ["x"])
        with pytest.raises(QueueFullError):  # more than free
            q.template(1, slots=q.num_free + 1)
        for bad_count in (0, -1, "2"):
            with pytest.raises(ArgumentError):
                q.template(bad_count)  # type: ignore[arg-type]


def test_submit_many_is_all_or_nothing():
    with ring(start_index=0xFFFE) as (q, dev, layout):
        tpl = q.template(3, slots=4)
        slots = tpl.acquire_many(3)
        good = blk_shape(layout, 0)
        before = q.snapshot()
        with pytest.raises(ArgumentError):
            tpl.submit_many(slots, [good[0], good[0], [(0, 0)]], [good[1]] * 3, [1, 2, 3])
        with pytest.raises(ArgumentError):  # a slot twice
            tpl.submit_many([slots[0], slots[0]], [good[0]] * 2, [good[1]] * 2, [1, 2])
        with pytest.raises(ArgumentError):  # lengths differ
            tpl.submit_many(slots, [good[0]] * 3, [good[1]] * 3, [1, 2])
        assert q.snapshot() == before
        tpl.submit_many(slots, [good[0]] * 3, [good[1]] * 3, [1, 2, 3])
        q.publish()
        assert q.next_avail == 1  # crossed the wrap
        assert [dev.pop() is not None for _ in range(3)] == [True] * 3


def test_reset_rebuilds_templates_and_returns_their_tokens():
    with ring() as (q, dev, layout):
        tpl = q.template(3, slots=2)
        s = tpl.acquire()
        tpl.submit(s, *blk_shape(layout, 0), token="lost")
        q.publish()
        assert q.reset() == ["lost"]  # the rings were zeroed, heads included
        assert tpl.num_free == 2 and q.num_free == 6
        dev.close()
        fresh = DeviceQueue(q.region, layout, iova=BASE)
        s = tpl.acquire()
        tpl.submit(s, *blk_shape(layout, 1), token="after")
        q.publish()
        head, segs = fresh.pop()
        assert [g.iova for g in segs] == [buf(layout, 1), buf(layout, 1, 64),
                                           buf(layout, 1, 32)]
        fresh.push(head, 513)
        assert q.drain_used() == [("after", 513)]
        fresh.close()


def test_template_completion_is_validated_like_any_chain():
    with ring() as (q, dev, layout):
        tpl = q.template(3, slots=2)
        s = tpl.acquire()
        tpl.submit(s, *blk_shape(layout, 0), token="t")
        q.publish()
        head, _ = dev.pop()
        dev.push(head, 514)  # one more than the 513 writable bytes
        with pytest.raises(DeviceProtocolError, match=r"len") as info:
            q.drain_used()
        assert info.value.value == 514
        assert q.state is QueueState.BROKEN
        with pytest.raises(QueueBrokenError):
            tpl.acquire() and tpl.submit(0, *blk_shape(layout, 0), token="x")
        assert q.reset() == ["t"]
        HostileDevice(q.region, layout).set_used_idx(q.last_used)


def test_templates_refuse_on_a_closed_queue():
    with ring() as (q, _dev, layout):
        tpl = q.template(3, slots=2)
        s = tpl.acquire()
        q.close()
        with pytest.raises(QueueStateError, match="closed"):
            tpl.submit(s, *blk_shape(layout, 0), token="x")
        with pytest.raises(QueueStateError):
            q.template(1)
