"""Hypothesis state machine: any interleaving of add / publish / device pop / device
complete (any order) / reap keeps the queue's invariants, across the u16 wrap."""

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
        self.dev = DeviceQueue(self.region, self.layout, iova=BASE, event_idx=event_idx)
        self.start = start
        self.next_token = 0
        self.slots_free = list(range(N))
        self.outstanding: dict[int, tuple[int, bytes, int]] = {}  # token -> slot, data, nw
        self.device_held: list[tuple[int, int]] = []  # (head, written)
        self.reaped: set[int] = set()
        self.total_added = 0

    def teardown(self):
        if hasattr(self, "q"):
            event(f"wrapped={self.q.next_avail < self.start}")
            self.dev.close()
            self.q.close()
            self.region.close()

    @rule(nread=st.integers(1, 3), nwrite=st.integers(0, 2), data=st.binary(min_size=3,
                                                                            max_size=BUF))
    def add(self, nread, nwrite, data):
        if not self.slots_free:
            return
        slot = self.slots_free[-1]
        base = BASE + self.layout.buffer(slot)
        self.region.view(self.layout.buffer(slot), len(data))[:] = data
        # split the payload over nread readable descriptors
        cuts = [len(data) * i // nread for i in range(nread + 1)]
        readable = [(base + cuts[i], cuts[i + 1] - cuts[i]) for i in range(nread)
                    if cuts[i + 1] > cuts[i]]
        writable = [(base + BUF * (1 + i), BUF) for i in range(nwrite)]
        needed = 1 if (self.q.indirect and len(readable) + nwrite > 1) else len(readable) + nwrite
        before = self.q.snapshot()
        token = self.next_token
        try:
            self.q.add(readable, writable, token)
        except QueueFullError as exc:
            assert exc.needed == needed
            assert exc.free < needed
            assert self.q.snapshot() == before
            return
        self.slots_free.pop()
        self.next_token += 1
        self.total_added += 1
        self.outstanding[token] = (slot, data, nwrite * BUF)

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

    @rule(all_=st.booleans())
    def reap(self, all_):
        done = self.q.drain_used() if all_ else [x for x in [self.q.pop_used()] if x]
        for token, written in done:
            assert token not in self.reaped, "token reaped twice"
            self.reaped.add(token)
            slot, data, capacity = self.outstanding.pop(token)
            expected = data[::-1][:capacity]
            assert written == len(expected)
            off = self.layout.buffer(slot) + BUF
            assert bytes(self.region.view(off, written)) == expected, "data intact"
            self.slots_free.append(slot)

    @invariant()
    def accounting(self):
        if not hasattr(self, "q"):
            return
        q = self.q
        assert q.num_in_flight == len(self.outstanding)
        # free + descriptors held by in-flight chains == size
        assert q.num_free <= N
        if not self.outstanding:
            assert q.num_free == N
        assert distance(self.start, q.next_avail) == self.total_added % 65536


TestSplitQueueMachine = SplitQueueMachine.TestCase
TestSplitQueueMachine.settings = settings(stateful_step_count=80)
