"""Hypothesis state machine: any interleaving of add / template submit / publish / device
pop / device complete (any order) / reap / reset keeps the queue's invariants, across the
u16 wrap.

Invariants, exact (not bounds):
* every descriptor is free, reserved by the template, or held by exactly one chain in flight:
  ``num_free + reserved + descriptors in flight == size``;
* ``num_in_flight`` is the number of chains added and not reaped;
* every token comes back exactly once (reaped, or handed back by ``reset()``), with the data
  the device wrote for that very chain.
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
from virtq.layout import SplitLayout, distance
from virtq.memory import MemfdRegion
from virtq.queue import SplitQueue
from virtq.testing import DeviceQueue
from virtq.testing.peer import serve_chain

BASE = 0x1_0000_0000
N = 8
BUF = 64
TSLOTS = 2  # template slots


class SplitQueueMachine(RuleBasedStateMachine):
    @initialize(
        start=st.integers(0xFFFD, 0xFFFF),  # the third add at the latest crosses the wrap
        event_idx=st.booleans(),
        indirect=st.booleans(),
    )
    def setup(self, start, event_idx, indirect):
        self.layout = SplitLayout.compute(N, buffer_size=BUF * 4, indirect_size=5)
        self.region = MemfdRegion(self.layout.nbytes)
        self.q = SplitQueue(self.region, self.layout, iova=BASE, event_idx=event_idx,
                            indirect=indirect, start_index=start)
        # A template of up to three buffers: with indirect descriptors its two slots hold a
        # descriptor each for good; without, each submission takes descriptors.
        self.tpl = self.q.template(3, slots=TSLOTS)
        self.reserved = TSLOTS if self.tpl.persistent else 0
        self.dev = DeviceQueue(self.region, self.layout, iova=BASE, event_idx=event_idx)
        self.start = start
        self.next_token = 0
        self.slots_free = list(range(N))  # buffer slots of the layout, per chain
        # token -> (buffer slot, data, writable capacity, ring descriptors held)
        self.outstanding: dict[int, tuple[int, bytes, int, int]] = {}
        self.tpl_slot_of: dict[int, int] = {}  # token -> template slot
        self.device_held: list[tuple[int, int]] = []  # (head, written)
        self.returned: set[int] = set()
        self.total_added = 0

    def teardown(self):
        if hasattr(self, "q"):
            event(f"wrapped={self.q.next_avail < self.start}")
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
        self.outstanding[token] = (slot, data, nwrite * BUF, descs)

    @rule(nread=st.integers(1, 3), nwrite=st.integers(0, 2), data=st.binary(min_size=3,
                                                                            max_size=BUF))
    def add(self, nread, nwrite, data):
        chain = self._chain(nread, nwrite, data)
        if chain is None:
            return
        slot, readable, writable = chain
        count = len(readable) + nwrite
        needed = 1 if (self.q.indirect and count > 1) else count
        before = self.q.snapshot()
        token = self.next_token
        try:
            self.q.add(readable, writable, token)
        except QueueFullError as exc:
            assert exc.needed == needed
            assert exc.free < needed
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
            assert not self.tpl.persistent
            self.tpl.release(slot)
            assert self.q.snapshot() == before
            return
        self.tpl_slot_of[token] = slot
        self._added(token, buf_slot, data, nwrite, 0 if self.tpl.persistent else count)

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
            assert not self.tpl.persistent
            self.tpl.release_many(slots)
            assert self.q.snapshot() == before
            return
        for token, slot, (buf_slot, readable, _) in zip(tokens, slots, chains, strict=True):
            self.slots_free.remove(buf_slot)
            self.slots_free.append(buf_slot)
            self.tpl_slot_of[token] = slot
            self._added(token, buf_slot, data, nwrite,
                        0 if self.tpl.persistent else len(readable) + nwrite)
        event("submit_many")

    @rule()
    def publish(self):
        self.q.publish()

    @precondition(lambda self: hasattr(self, "dev"))
    @rule()
    def device_pop(self):
        chain = self.dev.pop()
        if chain is not None:
            head, segments = chain
            self.device_held.append((head, serve_chain(self.dev, segments)))

    @rule(pick=st.integers(0, 100), publish=st.booleans())
    def device_complete(self, pick, publish):
        if self.device_held:
            head, written = self.device_held.pop(pick % len(self.device_held))
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
            assert written == len(expected)
            off = self.layout.buffer(slot) + BUF
            assert bytes(self.region.view(off, written)) == expected, "data intact"

    @precondition(lambda self: hasattr(self, "q") and self.q.num_in_flight)
    @rule()
    def reset(self):
        """The device is reset (e.g. a back-end restart): every token in flight comes back
        from reset(), in the order the chains were made available."""
        lost = self.q.reset()
        assert lost == sorted(self.outstanding), "reset returns tokens in avail order"
        for token in lost:
            self._returned(token)
        self.dev.close()
        self.dev = DeviceQueue(self.region, self.layout, iova=BASE,
                               event_idx=self.q.event_idx)
        self.device_held.clear()
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
        assert distance(self.start, q.next_avail) == self.total_added % 65536
        assert sorted(q.in_flight_tokens()) == sorted(self.outstanding)


TestSplitQueueMachine = SplitQueueMachine.TestCase
TestSplitQueueMachine.settings = settings(stateful_step_count=80)
