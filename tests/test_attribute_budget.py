"""The per-request classes keep fewer than 30 instance attributes.

CPython 3.11 shares the keys of instance dicts only up to 29 attributes; from 30 on every
attribute load is about 10 ns slower (measured on this machine: a method reading two
attributes, 25.5 -> 36 ns).  The queues and the device drivers read attributes on every
request, so this is a performance budget, checked here so that adding a field shows up
as a test failure instead of a slow benchmark."""

from __future__ import annotations

import struct

import pytest

from virtq.devices import BlkDevice, NetDevice
from virtq.layout import PackedLayout, SplitLayout
from virtq.memory import MemfdRegion
from virtq.queue import InOrderSplitQueue, PackedQueue, PackedSlotQueue, SlotQueue, SplitQueue
from virtq.testing.loopback import LoopbackTransport

BUDGET = 29


@pytest.mark.parametrize("make", [
    lambda r, s, p: SplitQueue(r, s, iova=0, indirect=True, event_idx=True),
    lambda r, s, p: InOrderSplitQueue(r, s, iova=0, indirect=True),
    lambda r, s, p: SlotQueue(r, s, iova=0, slots=[0] * 8, slot_size=64, writable=True,
                              in_order=True),
    lambda r, s, p: PackedQueue(r, p, iova=0, indirect=True, in_order=True),
    lambda r, s, p: PackedSlotQueue(r, p, iova=0, slots=[0] * 8, slot_size=64,
                                    writable=True),
], ids=["SplitQueue", "InOrderSplitQueue", "SlotQueue", "PackedQueue", "PackedSlotQueue"])
def test_queues_stay_within_the_budget(make):
    split = SplitLayout.compute(8, indirect_size=4)
    packed = PackedLayout.compute(8, indirect_size=4)
    with MemfdRegion(max(split.nbytes, packed.nbytes)) as region:
        q = make(region, split, packed)
        tpl = q.template(3, slots=2) if hasattr(q, "template") else None
        assert len(vars(q)) <= BUDGET, sorted(vars(q))
        if tpl is not None:
            assert len(vars(tpl)) <= BUDGET
        q.close()


def test_devices_stay_within_the_budget():
    t = LoopbackTransport(features=1 << 32 | 1 << 28 | 1 << 29, queue_sizes=[16],
                          config=struct.pack("<Q", 1 << 20).ljust(64, b"\0"))
    with BlkDevice(t, queue_size=16) as blk:
        assert len(vars(blk)) <= BUDGET, sorted(vars(blk))
    t = LoopbackTransport(features=1 << 32 | 1 << 29, queue_sizes=[16, 16], config=b"")
    with NetDevice(t, queue_size=16) as net:
        assert len(vars(net)) <= BUDGET, sorted(vars(net))
