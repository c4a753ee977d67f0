"""InOrderSplitQueue's reap finds each retired chain's head through the avail entry the
driver wrote, but only when its own shadow agrees: a device that scribbles on the avail
ring (shared memory) changes nothing about what is reaped, which descriptors come free,
or in which order (VIRTIO 1.2 §2.7.9: a batch retired by one used element)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from virtq.memory import MemfdRegion
from virtq.queue import InOrderSplitQueue
from virtq.queue.factory import make_queue, ring_layout
from virtq.testing.device import DeviceQueue
from virtq.types import Iova

BASE = 0x5_0000_0000
N = 8


def run(chains: list[int], batches: list[int], scribble: list[int] | None
        ) -> tuple[list[tuple[int, int]], list[int], tuple[object, ...]]:
    """Add ``chains`` (buffer counts), complete them in batches of the given sizes (one
    used element each), with the avail ring overwritten by ``scribble`` before each reap;
    what was reaped, the free descriptors after, and the queue's counts."""
    layout = ring_layout(N, buffer_size=64, ring="split")
    region = MemfdRegion(layout.nbytes)
    q = make_queue(region, layout, iova=Iova(BASE), in_order=True)
    dev = DeviceQueue(region, layout, iova=BASE)
    avail = region.view(layout.avail, 4 + 2 * N).cast("H")
    try:
        assert isinstance(q, InOrderSplitQueue)
        reaped: list[tuple[int, int]] = []
        token = 0
        for start in range(0, len(chains), 4):  # up to 4 chains in flight per reap
            group = chains[start : start + 4]
            batch = batches[start // 4]
            if q.num_free < sum(group):
                break
            q.add_many([([(BASE + 64 * i, 8) for i in range(count - 1)],
                         [(BASE + 512, 16)], token + k) for k, count in enumerate(group)])
            token += len(group)
            q.publish()
            pending = []
            while (got := dev.pop()) is not None:
                pending.append(got[0])
            # Retire what was popped in batches of ``batch`` (one used element naming the
            # last head of each).
            while pending:
                take, pending = pending[:batch], pending[batch:]
                dev.push_in_order(take[-1], 16, publish=False)
            dev.publish_used()
            if scribble is not None:
                for i, value in enumerate(scribble):
                    avail[2 + i % N] = value
            reaped += q.drain_used()
        return reaped, list(q._free), (q.last_used, q.num_in_flight, q.in_flight_tokens())
    finally:
        avail.release()
        dev.close()
        q.close()
        region.close()


@settings(max_examples=80, deadline=None)
@given(chains=st.lists(st.integers(1, 3), min_size=1, max_size=30),
       batches=st.lists(st.integers(1, 4), min_size=30, max_size=30),
       scribble=st.lists(st.integers(0, N - 1) | st.integers(0, 0xFFFF), min_size=N,
                         max_size=N))
def test_a_scribbled_avail_ring_changes_nothing_reaped(chains, batches, scribble):
    assert run(chains, batches, scribble) == run(chains, batches, None)
