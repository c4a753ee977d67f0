"""PackedSlotQueue's run-at-a-time submit and reap agree with a descriptor-at-a-time model.

``submit`` writes the descriptors of a submission with strided stores (one per field and
lap), and ``reap`` first takes the used descriptors a device wrote one by one in order with
one list comparison per run.  ``EachSlotQueue`` below is the same queue with the
submission written one descriptor at a time (the loop it replaced, written out here) and
with every used descriptor going through the per-descriptor validation loop.  Both are
driven with the same Hypothesis-chosen operations -- submissions with and without lengths
across the ring's end from any start position and wrap counter, publishes, completions by a
device model in any order or (VIRTIO_F_IN_ORDER) a batch per used descriptor, with or
without WRITE, and impossible used descriptors (an id not in flight, a len past the slot,
the other lap's flags) -- and must agree after every step: the ring's bytes, what every
call returned or raised (errors with the completions they carry), and the snapshot.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from virtq.errors import ArgumentError, DeviceProtocolError, QueueBrokenError, QueueFullError
from virtq.layout import PackedLayout
from virtq.memory import MemfdRegion
from virtq.queue import PackedSlotQueue
from virtq.queue._splitcore import _READY

BASE = 0x3_0000_0000
N = 6
SLOT = 64
AVAIL_BITS = (1 << 15, 1 << 7)  # an available descriptor's AVAIL/USED bits, by wrap
USED_BITS = (0, (1 << 7) | (1 << 15))
WRITE = 2


class EachSlotQueue(PackedSlotQueue):
    """One descriptor at a time: the reference."""

    def submit(self, count, lengths=None):
        if self._state_v is not _READY:
            self._refuse()
        if not isinstance(count, int) or count < 0:
            raise ArgumentError("count", count, "must be an int >= 0")
        seq = self._avail_dseq
        n = self.size
        free = n - (seq - self._front)
        if count > free:
            raise QueueFullError(count, free, "slots")
        if not count:
            return seq % n
        if lengths is not None:
            self._set_lengths(seq, count, lengths)
        wflag = WRITE if self.writable else 0
        addrs = self._runs[0]
        for k in range(count):
            pos = (seq + k) % n
            bits = AVAIL_BITS[1 ^ (seq + k) // n & 1] | wflag
            self._desc_q[2 * pos] = addrs[pos]
            if k or self._pending is not None:
                self._desc_q[2 * pos + 1] = self._lens[pos] | pos << 32 | bits << 48
            else:
                self._desc_w[4 * pos + 2] = self._lens[pos]
                self._desc_h[8 * pos + 6] = pos
                self._pending = (8 * pos + 7, bits)
        self._avail_dseq = seq + count
        return seq % n

    def _set_lengths(self, seq, count, lengths):
        if self.writable:
            raise ArgumentError("lengths", "...", "only device-readable slots take lengths "
                                "(a writable slot's capacity is checked against used.len)")
        try:
            values = list(lengths)
        except TypeError:
            raise ArgumentError("lengths", lengths, "must be a sequence of ints") from None
        if len(values) != count:
            raise ArgumentError("lengths", len(values), f"one per slot ({count})")
        size = self.slot_size
        if not all(isinstance(x, int) and 0 < x <= size for x in values):
            bad = next(x for x in values if not isinstance(x, int) or not 0 < x <= size)
            raise ArgumentError("lengths", bad, f"must be ints in 1..{size}")
        for k, x in enumerate(values):
            self._lens[(seq + k) % self.size] = x

    def _used_run(self, seq, count, slots, lens):
        return 0  # every used descriptor through the per-descriptor loop


class Device:
    """The device's half: slots in the order they became available, completed in any
    order at the next used position."""

    def __init__(self, q: PackedSlotQueue, start: int) -> None:
        self.h, self.w, self.n = q._desc_h, q._desc_w, q.size
        self.pos, self.wrap = start & 0x7FFF, start >> 15
        self.used, self.used_wrap = self.pos, self.wrap
        self.seen: list[int] = []

    def fetch(self) -> None:
        while self.h[8 * self.pos + 7] & USED_BITS[1] == AVAIL_BITS[self.wrap]:
            self.seen.append(self.h[8 * self.pos + 6])
            self.pos += 1
            if self.pos == self.n:
                self.pos, self.wrap = 0, self.wrap ^ 1

    def complete(self, index, in_order, write, length, bad):
        """Complete seen slot ``index`` (in order: the first ``index + 1``, named by the
        last); ``bad`` replaces its id, len or flags with an impossible one."""
        if in_order:
            batch, self.seen = self.seen[: index + 1], self.seen[index + 1 :]
        else:
            batch = [self.seen.pop(index)]
        at = self.used
        slot = batch[-1]
        flags = USED_BITS[self.used_wrap] | (WRITE if write else 0)
        if bad == "id":
            slot = (slot + 1 + self.n) % (self.n + 3)  # another slot, or past the ring
        elif bad == "len":
            length = SLOT + 1
        elif bad == "flags":
            flags ^= USED_BITS[1]  # the other lap's counter
        elif bad == "ahead":  # one position past the next used one (of this lap or the next)
            at = (at + 1) % self.n
            flags = USED_BITS[self.used_wrap ^ (at == 0)] | (WRITE if write else 0)
            slot = at
        self.w[4 * at + 2] = length
        self.h[8 * at + 6] = slot
        self.h[8 * at + 7] = flags  # last
        self.used += len(batch)
        if self.used >= self.n:
            self.used -= self.n
            self.used_wrap ^= 1


# (which seen slot, mostly the oldest; WRITE as a device sets it for the slot's direction,
# or the opposite; the len it reports; an impossible field, or a write past the used
# position)
completion = st.tuples(st.sampled_from([0, 0, 0, 1, 2, N]),
                       st.sampled_from([False] * 5 + [True]), st.integers(0, SLOT),
                       st.sampled_from([None] * 24 + ["id", "len", "flags", "ahead"]))
# Rounds, so that most of them reach the reap: submit, maybe publish, complete some, reap
# (with a limit, sometimes), and now and then a reset.
rounds = st.lists(st.tuples(
    st.integers(0, N + 1), st.sampled_from([None, None, "ok", "bad"]),
    st.booleans(), st.lists(completion, max_size=N + 1),
    st.sampled_from([None, None, None, 1, 2, 4]), st.integers(0, 15)), max_size=12)


def steps_of(rounds_):
    for count, lengths, publish, completions, limit, other in rounds_:
        yield ("submit", count, lengths)
        if publish or other:
            yield ("publish",)
        for c in completions:
            yield ("complete", *c)
        yield ("reap", limit)
        if other == 0:
            yield ("reset",)


def run(q: PackedSlotQueue, steps, in_order: bool, start: int) -> list[object]:
    dev = Device(q, start)
    log: list[object] = []
    for step in steps:
        try:
            if step[0] == "submit":
                _, count, kind = step
                lengths = None if kind is None else [1 + (7 * k) % SLOT for k in range(count)]
                if kind == "bad" and lengths:
                    lengths[-1] = SLOT + 1 if count % 2 else 0  # past the slot, or empty
                log.append(q.submit(count, lengths))
            elif step[0] == "publish":
                log.append(q.publish())
                dev.fetch()
            elif step[0] == "complete":
                _, index, flip, length, bad = step
                if dev.seen:
                    dev.complete(index % len(dev.seen), in_order, q.writable ^ flip, length, bad)
            elif step[0] == "reap":
                log.append(q.reap(step[1]))
            else:
                log.append(q.reset())
                dev = Device(q, q.vring_base & 0xFFFF)
        except (ArgumentError, QueueFullError, QueueBrokenError) as e:
            log.append((type(e).__name__, str(e)))
        except DeviceProtocolError as e:
            log.append(("DeviceProtocolError", str(e), e.completed))
        log.append(bytes(q._mem))
        log.append(q.snapshot())
    return log


@settings(max_examples=500, deadline=None)
@given(rounds_=rounds, start_pos=st.integers(0, N - 1), wrap=st.integers(0, 1),
       writable=st.booleans(), in_order=st.booleans(), strict=st.booleans())
def test_runs_agree_with_one_descriptor_at_a_time(rounds_, start_pos, wrap, writable,
                                                  in_order, strict):
    steps = list(steps_of(rounds_))
    start = start_pos | wrap << 15
    layout = PackedLayout.compute(N, buffer_size=SLOT)
    logs = []
    for cls in (PackedSlotQueue, EachSlotQueue):
        with MemfdRegion(layout.nbytes) as region:
            q = cls(region, layout, iova=BASE, slots=[BASE + layout.buffer(d) for d in range(N)],
                    slot_size=SLOT, writable=writable, in_order=in_order, start_index=start,
                    strict_len=strict)
            try:
                logs.append(run(q, steps, in_order, start))
            finally:
                q.close()
    assert logs[0] == logs[1]


def test_a_long_in_order_run_is_reaped_in_one_go():
    """The common case the runs are for: every slot used in order, across the ring's end
    (two runs), reaped with its lengths."""
    layout = PackedLayout.compute(N, buffer_size=SLOT)
    with MemfdRegion(layout.nbytes) as region:
        q = PackedSlotQueue(region, layout, iova=BASE, slots=[0] * N, slot_size=SLOT,
                            writable=True, start_index=4 | 1 << 15)
        try:
            dev = Device(q, 4 | 1 << 15)
            q.submit(N)
            q.publish()
            dev.fetch()
            for k in range(N):
                dev.complete(0, False, True, 10 + k, None)
            assert q.reap() == ([4, 5, 0, 1, 2, 3], [10, 11, 12, 13, 14, 15])
            assert q.num_free == N
        finally:
            q.close()


def test_a_len_past_the_slot_inside_a_run_is_named():
    """The run stops before the impossible len; the per-descriptor check names it, with the
    completions before it."""
    layout = PackedLayout.compute(N, buffer_size=SLOT)
    with MemfdRegion(layout.nbytes) as region:
        q = PackedSlotQueue(region, layout, iova=BASE, slots=[0] * N, slot_size=SLOT,
                            writable=True)
        try:
            dev = Device(q, 1 << 15)
            q.submit(4)
            q.publish()
            dev.fetch()
            for bad in (None, None, "len", None):
                dev.complete(0, False, True, 7, bad)
            try:
                q.reap()
            except DeviceProtocolError as e:
                assert e.completed == [(0, 7), (1, 7)]
                assert "desc[2].len" in str(e)
            else:
                raise AssertionError("a len past the slot was reaped")
        finally:
            q.close()
