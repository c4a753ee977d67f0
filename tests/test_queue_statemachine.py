"""Hypothesis state machines, one per ring format: any interleaving of add / template
submit / publish / device pop / device complete / reap / reset keeps the queue's invariants.

* split: any completion order, starting a few chains before the u16 index wrap;
* split with VIRTIO_F_IN_ORDER (``InOrderSplitQueue``): completions in order, one used
  element per chain or one per batch (§2.7.9);
* packed (§2.8): any completion order, starting a few descriptors before the ring's end
  with either wrap counter, so the lap (and both wrap counters) flips during the run;
* packed with IN_ORDER: per-chain and batched retirement (§2.8.8).

Each runs with direct and indirect chains, event idx on and off.  The device side is the
independent peer of each format (``DeviceQueue``, ``PackedDeviceQueue``).

Invariants, exact (not bounds):
* every ring descriptor is free, reserved by the template, or held by exactly one chain in
  flight: ``num_free + reserved + descriptors in flight == size``;
* ``num_in_flight`` is the number of chains added and not reaped; the next avail position
  is the start plus everything ever added;
* every token comes back exactly once (reaped, or handed back by ``reset()``), with the data
  the device wrote for that very chain (a chain an in-order batch retired without its own
  used element reports its whole writable capacity, §2.7.9/§2.8.8).
"""

from __future__ import annotations

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from virtq.errors import QueueFullError
from virtq.layout import distance
from virtq.memory import MemfdRegion
from virtq.queue import make_queue, ring_layout
from virtq.testing import DeviceQueue
from virtq.testing.packed_device import PackedDeviceQueue
from virtq.testing.peer import serve_chain

BASE = 0x1_0000_0000
N = 8
BUF = 64
TSLOTS = 2  # template slots


class QueueMachine(RuleBasedStateMachine):
    RING = "split"
    IN_ORDER = False

    @initialize(
        # split: the third add at the latest crosses the u16 wrap; packed: a position a few
        # descriptors before the ring's end, with either wrap counter
        start=st.integers(0, 2),
        wrap=st.integers(0, 1),
        event_idx=st.booleans(),
        indirect=st.booleans(),
    )
    def setup(self, start, wrap, event_idx, indirect):
        self.packed = self.RING == "packed"
        self.layout = ring_layout(N, buffer_size=BUF * 4, indirect_size=5, ring=self.RING)
        self.region = MemfdRegion(self.layout.nbytes)
        if self.packed:
            start = (N - 1 - start) | wrap << 15
            # descriptor count of the start: position + N * (1 - wrap) (§2.8.1)
            self.start_seq = (start & 0x7FFF) + N * (1 - wrap)
        else:
            start = 0xFFFF - start
        self.q = make_queue(self.region, self.layout, iova=BASE, event_idx=event_idx,
                            indirect=indirect, in_order=self.IN_ORDER, start_index=start)
        # A template of up to three buffers.  Split: with indirect descriptors its two slots
        # hold a ring descriptor each for good; without (or in order), each submission takes
        # descriptors.  Packed: each slot keeps a buffer id; submissions take positions.
        self.tpl = self.q.template(3, slots=TSLOTS)
        self.reserved = TSLOTS if (self.tpl.persistent and not self.packed) else 0
        self.start = start
        self._new_device()
        self.next_token = 0
        self.slots_free = list(range(N))  # buffer slots of the layout, per chain
        # token -> (buffer slot, data, writable capacity, ring descriptors held)
        self.outstanding: dict[int, tuple[int, bytes, int, int]] = {}
        self.tpl_slot_of: dict[int, int] = {}  # token -> template slot
        self.avail_order: list[int] = []  # tokens added, not yet popped by the device
        self.device_held: list[tuple[int, int, int]] = []  # (id/head, written, token)
        self.skipped: set[int] = set()  # tokens an in-order batch retired silently
        self.returned: set[int] = set()
        self.total_added = 0
        self.total_descs = 0

    def _new_device(self):
        if self.packed:
            base = self.q.vring_base & 0xFFFF
            self.dev = PackedDeviceQueue(self.region, self.layout, iova=BASE,
                                         event_idx=self.q.event_idx,
                                         avail_index=base & 0x7FFF, avail_wrap=base >> 15)
        else:
            self.dev = DeviceQueue(self.region, self.layout, iova=BASE,
                                   event_idx=self.q.event_idx)

    def teardown(self):
        if hasattr(self, "q"):
            event(f"{self.RING} in_order={self.IN_ORDER} crossed the end="
                  f"{self.total_descs > 3}")
            # Every token added came back once, or is still in flight.
            assert self.returned | set(self.outstanding) == set(range(self.next_token))
            assert not self.returned & set(self.outstanding)
            self.dev.close()
            self.q.close()
            self.region.close()

    def _chain(self, nread: int, nwrite: int, data: bytes) -> tuple[int, list, list] | None:
        if not self.slots_free:
            return None
        slot = self.slots_free[-1]
        base = BASE + self.layout.buffer(slot)
        self.region.view(self.layout.buffer(slot), len(data))[:] = data
        # split the payload over nread readable descriptors
        cuts = [len(data) * i // nread for i in range(nread + 1)]
        readable = [(base + cuts[i], cuts[i + 1] - cuts[i]) for i in range(nread)
                    if cuts[i + 1] > cuts[i]]
        writable = [(base + BUF * (1 + i), BUF) for i in range(nwrite)]
        return slot, readable, writable

    def _added(self, token: int, slot: int, data: bytes, nwrite: int, descs: int) -> None:
        self.slots_free.pop()
        self.next_token += 1
        self.total_added += 1
        self.total_descs += descs
        self.avail_order.append(token)
        self.outstanding[token] = (slot, data, nwrite * BUF, descs)

    def _ring_descs(self, count: int) -> int:
        """Ring descriptors a chain of ``count`` buffers takes when not from a persistent
        split template."""
        return 1 if (self.q.indirect and count > 1) else count

    @rule(nread=st.integers(1, 3), nwrite=st.integers(0, 2), data=st.binary(min_size=3,
                                                                            max_size=BUF))
    def add(self, nread, nwrite, data):
        chain = self._chain(nread, nwrite, data)
        if chain is None:
            return
        slot, readable, writable = chain
        count = len(readable) + nwrite
        needed = self._ring_descs(count)
        before = self.q.snapshot()
        token = self.next_token
        try:
            self.q.add(readable, writable, token)
        except QueueFullError as exc:
            if exc.needed == 1 and exc.free == 0 and self.packed:
                pass  # out of buffer ids (the template keeps two)
            else:
                assert exc.needed == needed
            assert exc.free < exc.needed
            assert self.q.snapshot() == before
            return
        self._added(token, slot, data, nwrite, needed)

    @rule(nread=st.integers(1, 2), nwrite=st.integers(0, 1), data=st.binary(min_size=2,
                                                                            max_size=BUF))
    def template_submit(self, nread, nwrite, data):
        chain = self._chain(nread, nwrite, data)
        if chain is None or not self.tpl.num_free:
            return
        buf_slot, readable, writable = chain
        count = len(readable) + nwrite
        before = self.q.snapshot()
        slot = self.tpl.acquire()
        token = self.next_token
        try:
            self.tpl.submit(slot, readable, writable, token)
        except QueueFullError:
            assert not self.reserved
            self.tpl.release(slot)
            assert self.q.snapshot() == before
            return
        self.tpl_slot_of[token] = slot
        self._added(token, buf_slot, data, nwrite,
                    0 if self.reserved else self._ring_descs(count))

    @rule(k=st.integers(1, TSLOTS), nwrite=st.integers(0, 1),
          data=st.binary(min_size=2, max_size=BUF))
    def template_submit_many(self, k, nwrite, data):
        """k chains in one call, all or nothing."""
        k = min(k, self.tpl.num_free, len(self.slots_free))
        if not k:
            return
        chains = []
        for _i in range(k):
            chain = self._chain(1, nwrite, data)
            assert chain is not None
            chains.append(chain)
            self.slots_free.insert(0, self.slots_free.pop())  # next chain, next buffer
        before = self.q.snapshot()
        slots = self.tpl.acquire_many(k)
        tokens = list(range(self.next_token, self.next_token + k))
        try:
            self.tpl.submit_many(slots, [c[1] for c in chains], [c[2] for c in chains],
                                 tokens)
        except QueueFullError:
            assert not self.reserved
            self.tpl.release_many(slots)
            assert self.q.snapshot() == before
            return
        for token, slot, (buf_slot, readable, _) in zip(tokens, slots, chains, strict=True):
            self.slots_free.remove(buf_slot)
            self.slots_free.append(buf_slot)
            self.tpl_slot_of[token] = slot
            self._added(token, buf_slot, data, nwrite,
                        0 if self.reserved else self._ring_descs(len(readable) + nwrite))
        event("submit_many")

    @rule()
    def publish(self):
        self.q.publish()

    @precondition(lambda self: hasattr(self, "dev"))
    @rule()
    def device_pop(self):
        self._pop_one()

    def _pop_one(self) -> bool:
        chain = self.dev.pop()
        if chain is None:
            return False
        head, segments = chain
        token = self.avail_order.pop(0)  # the device sees chains in avail order
        self.device_held.append((head, serve_chain(self.dev, segments), token))
        return True

    @precondition(lambda self: hasattr(self, "dev"))
    @rule()
    def device_pop_all(self):
        """Everything available at once: the device holds several chains."""
        while self._pop_one():
            pass

    @rule(pick=st.integers(0, 100), publish=st.booleans(), batch=st.booleans())
    def device_complete(self, pick, publish, batch):
        held = self.device_held
        if not held:
            return
        if not self.IN_ORDER:
            head, written, _ = held.pop(pick % len(held))
            self.dev.push(head, written, publish=publish)
        elif batch:
            # One used element for the first k + 1 held chains, naming the last (§2.7.9,
            # §2.8.8); the others count as used completely.
            k = len(held) - 1 - pick % len(held)  # small picks: long batches
            head, written, _ = held[k]
            self.skipped.update(token for _, _, token in held[:k])
            del held[: k + 1]
            self.dev.push_in_order(head, written, publish=publish)
            event(f"in-order batch of {k + 1}")
        else:
            head, written, _ = held.pop(0)
            self.dev.push(head, written, publish=publish)

    @rule()
    def device_publish(self):
        self.dev.publish_used()

    def _returned(self, token: int) -> tuple[int, bytes, int, int]:
        assert token not in self.returned, "token came back twice"
        self.returned.add(token)
        got = self.outstanding.pop(token)
        self.slots_free.append(got[0])
        self.tpl_slot_of.pop(token, None)
        return got

    @rule(all_=st.booleans())
    def reap(self, all_):
        done = self.q.drain_used() if all_ else [x for x in [self.q.pop_used()] if x]
        for token, written in done:
            slot, data, capacity, _ = self._returned(token)
            expected = data[::-1][:capacity]
            if token in self.skipped:
                self.skipped.discard(token)
                assert written == capacity, "retired by a batch: used completely"
            else:
                assert written == len(expected)
            off = self.layout.buffer(slot) + BUF
            assert bytes(self.region.view(off, len(expected))) == expected, "data intact"

    @precondition(lambda self: hasattr(self, "q") and self.q.num_in_flight)
    @rule()
    def reset(self):
        """The device is reset (e.g. a back-end restart): every token in flight comes back
        from reset(), in the order the chains were made available."""
        lost = self.q.reset()
        assert lost == sorted(self.outstanding), "reset returns tokens in avail order"
        for token in lost:
            self._returned(token)
            self.skipped.discard(token)
        self.dev.close()
        self._new_device()
        self.device_held.clear()
        self.avail_order.clear()
        event("reset")

    @invariant()
    def accounting(self):
        if not hasattr(self, "q"):
            return
        q = self.q
        assert q.num_in_flight == len(self.outstanding)
        held = sum(descs for *_, descs in self.outstanding.values())
        assert q.num_free + self.reserved + held == N, "every descriptor accounted for once"
        assert self.tpl.num_free == TSLOTS - len(self.tpl_slot_of)
        if self.packed:
            seq = self.start_seq + self.total_descs  # the next avail descriptor count
            wrap = 1 ^ (seq // N) & 1
            assert q.vring_base & 0xFFFF == seq % N | wrap << 15
        else:
            assert distance(self.start, q.next_avail) == self.total_added % 65536
        assert q.in_flight_tokens() == sorted(self.outstanding), "in avail order"


class InOrderSplitMachine(QueueMachine):
    IN_ORDER = True


class PackedMachine(QueueMachine):
    RING = "packed"


class InOrderPackedMachine(QueueMachine):
    RING = "packed"
    IN_ORDER = True


_SETTINGS = settings(stateful_step_count=80)
TestSplitQueueMachine = QueueMachine.TestCase
TestSplitQueueMachine.settings = _SETTINGS
TestInOrderSplitMachine = InOrderSplitMachine.TestCase
TestInOrderSplitMachine.settings = _SETTINGS
TestPackedMachine = PackedMachine.TestCase
TestPackedMachine.settings = _SETTINGS
TestInOrderPackedMachine = InOrderPackedMachine.TestCase
TestInOrderPackedMachine.settings = _SETTINGS
