"""Template refills where only some buffers move (a block request's new data buffer, its
header and status staying): the cheap path rewrites just the moved descriptors, and what
the device sees is exactly what a fresh chain would give -- both ring formats, direct and
indirect, ``submit`` and ``submit_many``, starting near the end of the ring so the
batches cross it.  Anything the cheap path cannot vouch for (a new length, an odd object,
a bad address) goes through the general path and is refused there with nothing
submitted."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from virtq.errors import ArgumentError
from virtq.memory import MemfdRegion
from virtq.queue import make_queue, ring_layout
from virtq.testing import DeviceQueue
from virtq.testing.packed_device import PackedDeviceQueue

BASE = 0x4000_0000
N = 16
FORMATS = [("split", False), ("split", True), ("packed", False), ("packed", True)]


@contextmanager
def ring(fmt: str, indirect: bool):
    layout = ring_layout(N, buffer_size=4096, indirect_size=4, ring=fmt)
    region = MemfdRegion(layout.nbytes)
    # Packed: two positions before the end, wrap counter 1; split: avail.idx about to wrap.
    start = (N - 2) | 1 << 15 if fmt == "packed" else 0xFFFE
    q = make_queue(region, layout, iova=BASE, indirect=indirect, start_index=start)
    if fmt == "packed":
        dev = PackedDeviceQueue(region, layout, iova=BASE, avail_index=N - 2, avail_wrap=1)
    else:
        dev = DeviceQueue(region, layout, iova=BASE, start_index=0xFFFE)
    try:
        yield q, dev, layout
    finally:
        dev.close()
        q.close()
        region.close()


def shapes(layout, slot, data_slot, nbytes=512):
    """A blk read: header (readable), data and status (writable); the data buffer is
    ``data_slot``'s, the header and status the slot's own objects."""
    hdr = (BASE + layout.buffer(slot), 16)
    status = (BASE + layout.buffer(slot) + 32, 1)
    return [hdr], [(BASE + layout.buffer(data_slot) + 64, nbytes), status]


def seen(dev, count):
    """What the device pops: (id, [(iova, length, writable)])."""
    out = []
    for _ in range(count):
        chain = dev.pop()
        assert chain is not None
        head, segs = chain
        out.append((head, [(g.iova, g.length, g.writable) for g in segs]))
    assert dev.pop() is None
    return out


def complete_all(q, dev, popped, written):
    for head, _ in popped:
        dev.push(head, written)
    return q.drain_used()


@pytest.mark.parametrize(("fmt", "indirect"), FORMATS)
@pytest.mark.parametrize("many", [False, True])
def test_moved_data_buffer_reaches_the_device(fmt, indirect, many):
    with ring(fmt, indirect) as (q, dev, layout):
        tpl = q.template(3, slots=3)
        keep: dict[int, tuple[list, list]] = {}
        for rnd in range(4):  # laps: each slot's data buffer moves every round
            slots = tpl.acquire_many(3)
            chains = []
            for i, slot in enumerate(slots):
                r, w = shapes(layout, slot, (rnd * 3 + i) % N)
                if slot in keep:  # the very header and status objects of last time
                    r = [keep[slot][0][0]]
                    w = [w[0], keep[slot][1][1]]
                keep[slot] = (r, w)
                chains.append((r, w))
            tokens = [(rnd, s) for s in slots]
            if many:
                tpl.submit_many(slots, [c[0] for c in chains], [c[1] for c in chains], tokens)
            else:
                for slot, (r, w), token in zip(slots, chains, tokens, strict=True):
                    tpl.submit(slot, r, w, token)
            q.publish()
            popped = seen(dev, 3)
            assert [segs for _, segs in popped] == [
                [(r[0][0], 16, False), (w[0][0], 512, True), (w[1][0], 1, True)]
                for r, w in chains]
            got = complete_all(q, dev, popped, 513)
            assert sorted(got) == sorted((t, 513) for t in tokens)


@pytest.mark.parametrize(("fmt", "indirect"), FORMATS)
def test_a_new_length_takes_the_general_path(fmt, indirect):
    """The data buffer grows: the chain's writable capacity follows (a used length the
    old capacity would refuse is accepted), and the device sees the new length."""
    with ring(fmt, indirect) as (q, dev, layout):
        tpl = q.template(3, slots=1)
        (slot,) = tpl.acquire_many(1)
        r, w = shapes(layout, slot, 1, 512)
        tpl.submit_many((slot,), [r], [w], ["a"])
        q.publish()
        assert complete_all(q, dev, seen(dev, 1), 513) == [("a", 513)]
        (slot,) = tpl.acquire_many(1)
        w2 = [(w[0][0], 1024), w[1]]
        tpl.submit_many((slot,), [r], [w2], ["b"])
        q.publish()
        popped = seen(dev, 1)
        assert popped[0][1][1] == (w[0][0], 1024, True)
        assert complete_all(q, dev, popped, 1025) == [("b", 1025)]


class ArrayLike:
    """An object whose == answers with something that has no truth value (as a numpy
    array does)."""

    def __eq__(self, other):
        return self

    def __ne__(self, other):
        return self

    def __bool__(self):
        raise ValueError("truth value of an array is ambiguous")

    __hash__ = None  # type: ignore[assignment]


# (A bool length is not among them: add() takes True as 1, a known leniency.)
BAD_DATA = [(-1, 512), (1 << 64, 512), (1.5, 512), ("x", 512), (BASE, 0), (BASE, -512),
            (BASE, 1 << 32), ArrayLike(), None, (BASE,), (BASE, 512, 0)]


@pytest.mark.parametrize(("fmt", "indirect"), FORMATS)
@pytest.mark.parametrize("bad", BAD_DATA, ids=repr)
def test_a_bad_moved_buffer_is_refused_with_nothing_submitted(fmt, indirect, bad):
    with ring(fmt, indirect) as (q, dev, layout):
        tpl = q.template(3, slots=2)
        slots = tpl.acquire_many(2)
        chains = [shapes(layout, s, s) for s in slots]
        tpl.submit_many(slots, [c[0] for c in chains], [c[1] for c in chains], ["a", "b"])
        q.publish()
        assert sorted(complete_all(q, dev, seen(dev, 2), 1)) == [("a", 1), ("b", 1)]
        slots = tpl.acquire_many(2)
        before = q.snapshot()
        # The first slot's refill is fine, the second's data buffer is bad.
        good = shapes(layout, slots[0], 5)
        r1, w1 = shapes(layout, slots[1], 6)
        with pytest.raises(ArgumentError):
            tpl.submit_many(slots, [good[0], r1], [good[1], [bad, w1[1]]], ["c", "d"])
        assert q.snapshot() == before
        assert q.publish() is False or dev.pop() is None
        assert dev.pop() is None
        # The slots stay held; a good refill of both goes through.
        tpl.submit_many(slots, [good[0], r1], [good[1], w1], ["c", "d"])
        q.publish()
        popped = seen(dev, 2)
        assert [segs[1][0] for _, segs in popped] == [good[1][0][0], w1[0][0]]
        assert sorted(complete_all(q, dev, popped, 1)) == [("c", 1), ("d", 1)]


@pytest.mark.parametrize(("fmt", "indirect"), FORMATS)
def test_one_buffer_template_moves_its_buffer(fmt, indirect):
    """Batches of three from two positions before the end: one crosses it mid-batch."""
    with ring(fmt, indirect) as (q, dev, layout):
        tpl = q.template(1, slots=3)
        for rnd in range(5):
            slots = tpl.acquire_many(3)
            bufs = [[(BASE + layout.buffer((rnd * 3 + i) % N), 64)] for i in range(3)]
            tokens = [rnd * 3 + i for i in range(3)]
            tpl.submit_many(slots, [[], [], []], bufs, tokens)
            q.publish()
            popped = seen(dev, 3)
            assert [segs for _, segs in popped] == [[(b[0][0], 64, True)] for b in bufs]
            assert sorted(complete_all(q, dev, popped, 64)) == [(t, 64) for t in tokens]


@pytest.mark.parametrize(("fmt", "indirect"), FORMATS)
def test_repeating_a_slot_never_submitted_is_refused(fmt, indirect):
    with ring(fmt, indirect) as (q, _dev, _layout):
        tpl = q.template(3, slots=2)
        slots = tpl.acquire_many(2)
        before = q.snapshot()
        with pytest.raises(ArgumentError, match="never been submitted"):
            tpl.submit_many(slots, None, None, ["a", "b"])
        assert q.snapshot() == before
        tpl.release_many(slots)
        assert tpl.num_free == 2


@pytest.mark.parametrize(("fmt", "indirect"), FORMATS)
@pytest.mark.parametrize("same_list", [True, False], ids=["same list", "new list"])
def test_a_list_changed_in_place_cannot_hide_a_move(fmt, indirect, same_list):
    """The caller reuses its buffer list: changed in place after a submission, then
    submitted again (the very list, or a new one equal to the changed one).  The template
    compares with its own copy of what the slot holds, so the device sees the new data
    buffer -- never the old one, which the caller may have handed to someone else."""
    with ring(fmt, indirect) as (q, dev, layout):
        tpl = q.template(3, slots=1)
        (slot,) = tpl.acquire_many(1)
        r, w = shapes(layout, slot, 1)
        tpl.submit(slot, r, w, "a")
        q.publish()
        assert complete_all(q, dev, seen(dev, 1), 1) == [("a", 1)]
        moved = (BASE + layout.buffer(7) + 64, 512)
        w[0] = moved  # in place
        (slot,) = tpl.acquire_many(1)
        tpl.submit(slot, r, w if same_list else list(w), "b")
        q.publish()
        popped = seen(dev, 1)
        assert popped[0][1][1] == (moved[0], 512, True)
        assert complete_all(q, dev, popped, 1) == [("b", 1)]


def test_a_direct_repeat_uses_what_was_submitted():
    """A direct split template repeats (buffers None) what each slot was submitted with,
    even if the caller changed its list in place since."""
    with ring("split", False) as (q, dev, layout):
        tpl = q.template(3, slots=1)
        assert not tpl.persistent
        (slot,) = tpl.acquire_many(1)
        r, w = shapes(layout, slot, 1)
        first = [(g[0], g[1], i > 0) for i, g in enumerate(r + w)]
        tpl.submit_many((slot,), [r], [w], ["a"])
        q.publish()
        popped = seen(dev, 1)
        assert [segs for _, segs in popped] == [first]
        assert complete_all(q, dev, popped, 1) == [("a", 1)]
        w[0] = (BASE + layout.buffer(9), 512)  # in place, after the submission
        (slot,) = tpl.acquire_many(1)
        tpl.submit_many((slot,), None, None, ["b"])
        q.publish()
        popped = seen(dev, 1)
        assert [segs for _, segs in popped] == [first]
        assert complete_all(q, dev, popped, 1) == [("b", 1)]


@pytest.mark.parametrize("in_order", [False, True])
def test_a_direct_batch_with_an_empty_chain_is_refused(in_order):
    """One buffer per chain on average is not one buffer each: an empty chain beside a
    two-buffer one is refused (ArgumentError, nothing submitted), not taken by the
    one-descriptor loop."""
    layout = ring_layout(N, buffer_size=64, ring="split")
    region = MemfdRegion(layout.nbytes)
    q = make_queue(region, layout, iova=BASE, in_order=in_order)
    try:
        tpl = q.template(3, slots=4)
        assert not tpl.persistent
        slots = tpl.acquire_many(2)
        before = q.snapshot()
        with pytest.raises(ArgumentError, match="at least one buffer"):
            tpl.submit_many(slots, [[], [(BASE, 4), (BASE + 8, 4)]], [[], []], [1, 2])
        assert q.snapshot() == before
        tpl.submit_many(slots, [[(BASE, 4)], [(BASE + 8, 4)]], [[], []], [1, 2])
        assert q.num_in_flight == 2
    finally:
        q.close()
        region.close()
