"""PackedQueue.add's one-buffer fast path writes exactly what the checked path writes.

The fast path takes a one-buffer chain whose address and length are plain ``int``s in
range; anything else goes through ``_chain_entries`` + ``_place`` + ``_commit``.  An ``int``
subclass with the same value takes the checked path, so two queues driven by the same
operations -- one given plain ints, one given the subclass -- must agree after every step:
the ring's bytes (descriptors, the driver event suppression structure), what ``publish()``
returns, what is reaped, the snapshot, and every error (type and queue unchanged after it).

A small device model completes the published chains in any order (VIRTIO 1.2 §2.8.6: a
used descriptor at the next used position, skipping the chain's descriptors), or, with
VIRTIO_F_IN_ORDER, a batch with one used descriptor naming its last id (§2.8.8), across the
ring's end with both wrap counters.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtq.errors import ArgumentError, QueueFullError
from virtq.layout import PackedLayout
from virtq.memory import MemfdRegion
from virtq.queue import PackedQueue

BASE = 0x2_0000_0000
N = 5  # a packed ring need not be a power of two
AVAIL_BITS = (1 << 15, 1 << 7)  # an available descriptor's AVAIL/USED bits, by wrap
USED_BITS = (0, (1 << 7) | (1 << 15))


class Checked(int):
    """The same value as an int, but not exactly ``int``: the checked path."""


def slow(buffers):
    """``buffers`` with every plain-int pair as :class:`Checked` (others as they are)."""
    return [(Checked(b[0]), Checked(b[1]))
            if len(b) == 2 and all(x.__class__ is int for x in b) else b for b in buffers]


class Device:
    """The device's half, in order of availability; completes any chain it has seen."""

    def __init__(self, q: PackedQueue, start: int) -> None:
        self.h = q._desc_h  # the same memory the driver wrote (a view of the region)
        self.n = q.size
        self.pos, self.wrap = start & 0x7FFF, start >> 15  # next available position
        self.used, self.used_wrap = self.pos, self.wrap  # next used position
        self.seen: list[tuple[int, int, bool]] = []  # (buffer id, descriptors, written)

    def fetch(self) -> None:
        h, n = self.h, self.n
        while h[8 * self.pos + 7] & USED_BITS[1] == AVAIL_BITS[self.wrap]:
            count = 0
            writable = False
            while True:
                flags = h[8 * self.pos + 7]
                writable |= bool(flags & 2)
                buffer_id = h[8 * self.pos + 6]
                count += 1
                self.pos += 1
                if self.pos == n:
                    self.pos, self.wrap = 0, self.wrap ^ 1
                if not flags & 1:
                    break
            self.seen.append((buffer_id, count, writable))

    def complete(self, index: int, in_order: bool) -> None:
        """Complete seen chain ``index`` (in order: the first ``index + 1``, one used
        descriptor naming the last)."""
        if in_order:
            batch, self.seen = self.seen[: index + 1], self.seen[index + 1 :]
        else:
            batch = [self.seen.pop(index)]
        buffer_id, _, writable = batch[-1]
        at = self.used
        self.h[8 * at + 4] = self.h[8 * at + 5] = 0  # len: nothing written
        self.h[8 * at + 6] = buffer_id
        self.h[8 * at + 7] = USED_BITS[self.used_wrap] | (2 if writable else 0)  # last
        for _, count, _ in batch:
            self.used += count
            if self.used >= self.n:
                self.used -= self.n
                self.used_wrap ^= 1


buffers = st.sampled_from([
    ([(BASE, 16)], []),
    ([], [(BASE + 64, 32)]),
    ([(BASE, 8), (BASE + 8, 8)], [(BASE + 64, 16)]),
    ([(BASE, 0)], []),  # bad: zero length
    ([(-1, 8)], []),  # bad: negative address
    ([], [(1 << 64, 8)]),  # bad: past u64
    ([(BASE, 1 << 32)], []),  # bad: past u32
    ([(BASE, 8.0)], []),  # bad: not an int
    ([(BASE,)], []),  # bad: not a pair
])
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), buffers),
    st.tuples(st.just("many"), st.lists(buffers, min_size=1, max_size=3)),
    st.tuples(st.just("publish"), st.none()),
    st.tuples(st.just("complete"), st.integers(0, 4)),
    st.tuples(st.just("reap"), st.none()),
), max_size=60)


def run(q: PackedQueue, dev: Device, steps, convert, in_order: bool) -> list[object]:
    """Apply ``steps``; the log of what every step returned or raised, and the memory."""
    log: list[object] = []
    token = 0
    for op, arg in steps:
        try:
            if op == "add":
                readable, writable = arg
                log.append(q.add(convert(readable), convert(writable), token))
                token += 1
            elif op == "many":
                chains = [(convert(r), convert(w), token + k) for k, (r, w) in enumerate(arg)]
                log.append(q.add_many(chains))
                token += len(arg)
            elif op == "publish":
                log.append(q.publish())
                dev.fetch()
            elif op == "complete":
                if dev.seen:
                    dev.complete(arg % len(dev.seen), in_order)
            else:
                log.append(q.drain_used())
        except (ArgumentError, QueueFullError) as e:
            log.append((type(e).__name__, str(e)))
        log.append(bytes(q._mem))
        log.append(q.snapshot())
    return log


@settings(max_examples=300, deadline=None)
@given(steps=ops, start_pos=st.integers(0, N - 1), wrap=st.integers(0, 1),
       in_order=st.booleans(), event_idx=st.booleans())
def test_fast_path_writes_what_the_checked_path_writes(steps, start_pos, wrap, in_order,
                                                       event_idx):
    start = start_pos | wrap << 15
    layout = PackedLayout.compute(N)
    logs = []
    for convert in (list, slow):
        with MemfdRegion(layout.nbytes) as region:
            q = PackedQueue(region, layout, iova=BASE, event_idx=event_idx, in_order=in_order,
                            start_index=start)
            try:
                logs.append(run(q, Device(q, start), steps, convert, in_order))
            finally:
                q.close()
    assert logs[0] == logs[1]


def test_fast_path_errors_leave_the_queue_unchanged():
    layout = PackedLayout.compute(N)
    with MemfdRegion(layout.nbytes) as region:
        q = PackedQueue(region, layout, iova=BASE)
        try:
            before = (bytes(q._mem), q.snapshot())
            for bad in ([(BASE, 0)], [(-1, 1)], [(1 << 64, 1)], [(BASE, 1 << 32)],
                        [(BASE, "8")], [(BASE,)], [None]):
                with pytest.raises(ArgumentError):
                    q.add(bad, [], "x")
                assert (bytes(q._mem), q.snapshot()) == before
            for _ in range(N):
                q.add([(BASE, 8)], [], "fill")
            with pytest.raises(QueueFullError):
                q.add([(BASE, 8)], [], "one too many")
            assert q.num_in_flight == N
        finally:
            q.close()
