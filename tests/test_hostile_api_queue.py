"""Ring layouts and driver queues against hostile arguments: sizes are ints (not bools),
a region is a MemoryRegion, add_many() takes triples, a closed queue says so.

Every test names the finding of the hostile-input campaign it guards."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings

from virtq.errors import ArgumentError, QueueStateError
from virtq.memory import MemfdRegion
from virtq.queue import make_queue, ring_layout

from .hostile_values import HOSTILE_INTS


@pytest.mark.parametrize("ring", ["split", "packed"])
@given(value=HOSTILE_INTS)
@settings(max_examples=60, deadline=None)
def test_ring_layout_arguments(ring: str, value: Any) -> None:
    """Finding: ring_layout(True) laid out a 1-entry ring; indirect_size / buffer_size of
    None, "1" or nan raised TypeError; buffer_size=2**64 was accepted (one descriptor's len
    is a le32)."""
    for kw in ({"size": value}, {"size": 8, "indirect_size": value},
               {"size": 8, "buffer_size": value}):
        if kw.get("indirect_size", kw.get("buffer_size")) is False:
            continue  # False == 0: "none", as documented
        with pytest.raises(ArgumentError):
            ring_layout(kw.pop("size"), ring=ring, **kw)


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_queue_arguments_and_closed_queue(ring: str) -> None:
    """Findings: make_queue(5, layout) raised AttributeError; add_many(5) and (packed)
    add_many([(1, 2)]) raised TypeError/ValueError; has_used() on a closed split queue
    raised ``ValueError: operation forbidden on released memoryview``."""
    layout = ring_layout(8, ring=ring, indirect_size=4)
    with MemfdRegion(layout.nbytes + 4096) as region:
        for bad in (5, None, object()):
            with pytest.raises(ArgumentError):
                make_queue(bad, layout, iova=region.host_addr)  # type: ignore[arg-type]
        q = make_queue(region, layout, iova=region.host_addr, indirect=True)
        buf = region.host_addr + layout.nbytes
        for bad in (5, None, [(1, 2)], [None], [([(buf, 8)], [], 1, 2)]):
            with pytest.raises(ArgumentError):
                q.add_many(bad)  # type: ignore[arg-type]
            assert q.num_in_flight == 0
        assert q.add_many([([(buf, 8)], [], "t")]) == 1
        q.close()
        if ring == "split":  # (a closed packed queue answers False)
            with pytest.raises(QueueStateError):
                q.has_used()
