"""add_many's one-loop paths write exactly what adding the chains one by one writes.

SplitQueue.add_many adds chains of several buffers in one loop (``_add_chains``) instead
of ``add()`` per chain (``_add_each``, kept as the reference); PackedQueue.add_many
likewise.  Two queues over two regions take the same batches, one through ``add_many``,
the other through the per-chain reference: after every batch the regions' bytes (the
descriptor table, indirect tables, the avail ring / the packed ring), the snapshots, the
tokens in flight, and every error (its type; the queue unchanged after it: all or
nothing) must agree.  Between batches the same device completes the same chains on both,
in a shuffled order (in order with VIRTIO_F_IN_ORDER), and what each driver reaps must
agree too.

Batches mix 1- to 5-buffer chains (5 does not fit the 4-entry indirect tables), chains
with no buffer, and bad buffers (a zero length, an address outside u64, a length outside
u32, a float, a pair that is not a pair): the checks of VIRTIO 1.2 §2.7.5.3.1 / §2.8.5.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtq.errors import ArgumentError, QueueFullError
from virtq.memory import MemfdRegion
from virtq.queue import PackedQueue, SplitQueue
from virtq.queue.factory import make_queue, ring_layout
from virtq.testing.device import DeviceQueue
from virtq.testing.packed_device import PackedDeviceQueue
from virtq.types import Iova

BASE = 0x7_0000_0000
N = 16

# Buffers the test device can map (it checks every address): inside the region.
GOOD = st.tuples(st.integers(BASE, BASE + 32768), st.integers(1, 4096))
BAD = st.sampled_from([(BASE, 0), (-1, 8), (2**64, 8), (BASE, 2**32), (1.5, 8), (BASE,),
                       "xy"])
BUFFER = st.one_of(GOOD, GOOD, GOOD, GOOD, GOOD, GOOD, GOOD, GOOD, GOOD, BAD)


@st.composite
def chains(draw: Callable[..., Any]) -> list[tuple[list[Any], list[Any], int]]:
    out = []
    for token in range(draw(st.integers(1, 6))):
        k = draw(st.sampled_from([0, 1, 2, 3, 3, 3, 4, 5, -1]))
        if k < 0:  # each length fine, the chain's total not (§2.7.5.3.1)
            out.append(([(BASE, 2**31)], [(BASE, 2**31)], token))
            continue
        bufs = [draw(BUFFER) for _ in range(k)]
        nr = draw(st.integers(0, k))
        out.append((bufs[:nr], bufs[nr:], token))
    return out


def build(ring: str, indirect: bool, in_order: bool = False
          ) -> tuple[MemfdRegion, Any, Any]:
    layout = ring_layout(N, buffer_size=4096, indirect_size=4 if indirect else 0, ring=ring)
    region = MemfdRegion(layout.nbytes)
    q = make_queue(region, layout, iova=Iova(BASE), indirect=indirect, in_order=in_order)
    if ring == "packed":
        dev: Any = PackedDeviceQueue(region, layout, iova=BASE)
    else:
        dev = DeviceQueue(region, layout, iova=BASE)
    return region, q, dev


def reference(q: Any) -> None:
    """Make ``q``'s add_many add() each chain, as it did before the one-loop paths."""
    q._add_chains = q._add_each


def image(region: MemfdRegion) -> bytes:
    view = region.view()
    try:
        return bytes(view)
    finally:
        view.release()


def attempt(fn: Callable[[], int]) -> tuple[str, int | None]:
    try:
        return "ok", fn()
    except (ArgumentError, QueueFullError) as exc:
        return type(exc).__name__, None


@pytest.mark.parametrize("in_order", [False, True], ids=["any-order", "in-order"])
@pytest.mark.parametrize(("ring", "indirect"), [("split", False), ("split", True),
                                                ("packed", False), ("packed", True)])
@settings(max_examples=100, deadline=None)
@given(batches=st.lists(chains(), min_size=1, max_size=12), seed=st.integers(0, 2**32))
def test_add_many_writes_what_add_writes(ring, indirect, in_order, batches, seed):
    ra, qa, da = build(ring, indirect, in_order)
    rb, qb, db = build(ring, indirect, in_order)
    reference(qb)
    rng = random.Random(seed)
    outstanding: list[int] = []  # made available, not yet completed
    try:
        for batch in batches:
            got_a = attempt(lambda batch=batch: qa.add_many(batch))
            got_b = attempt(lambda batch=batch: qb.add_many(batch))
            assert got_a == got_b
            assert image(ra) == image(rb)
            assert qa.snapshot() == qb.snapshot()
            assert qa.in_flight_tokens() == qb.in_flight_tokens()
            qa.publish()
            qb.publish()
            while (chain := da.pop()) is not None:
                outstanding.append(chain[0])
                assert db.pop()[0] == chain[0]
            if not in_order:  # VIRTIO_F_IN_ORDER: completed in the order made available
                rng.shuffle(outstanding)
            done = rng.randint(0, len(outstanding))
            for head in outstanding[:done]:
                da.push(head, 0, publish=False)
                db.push(head, 0, publish=False)
            del outstanding[:done]
            da.publish_used()
            db.publish_used()
            assert qa.drain_used() == qb.drain_used()
    finally:
        for x in (da, db, qa, qb, ra, rb):
            x.close()


def test_the_one_loop_paths_are_the_ones_taken():
    """A batch of multi-buffer chains on a SplitQueue goes through _add_chains (not the
    per-chain reference) and on a PackedQueue through its own loop: a guard that the
    test above compares two different implementations."""
    for ring in ("split", "packed"):
        region, q, dev = build(ring, False)
        try:
            calls = []
            q.add = lambda *a, calls=calls: calls.append(a)  # type: ignore[method-assign]
            assert q.add_many([([(BASE, 8), (BASE + 8, 8)], [(BASE + 16, 8)], 0)]) == 1
            assert calls == []
            assert q.in_flight_tokens() == [0]
            assert isinstance(q, SplitQueue | PackedQueue)
        finally:
            dev.close()
            q.close()
            region.close()
