"""virtq.queue.UserQueue: the seed's buffer-pool API over SplitQueue."""

from __future__ import annotations

import pytest

from virtq.errors import ArgumentError, QueueFullError, QueueStateError
from virtq.iova import BumpAllocator, IdentityAllocator, NullDmaMapper, TaggedAllocator
from virtq.memory import AnonymousRegion
from virtq.queue import UserQueue
from virtq.testing import DeviceQueue


def device_for(uq: UserQueue) -> DeviceQueue:
    return DeviceQueue(uq.region, uq.layout, iova=uq.iova)


def test_desc_table_addrs_follow_seed_layout(no_leaks):
    alloc = TaggedAllocator(0x1_0000_0000, 1 << 24)
    mapper = NullDmaMapper()
    with UserQueue(256, False, tag=1, iova_allocator=alloc, dma_mapper=mapper) as uq:
        base = 0x1_0000_0000 + (1 << 24)
        assert uq.desc_table_addrs() == (base, base + 4096, base + 4616)
        assert uq.region.nbytes == 270336
        assert mapper.mapped == {base: (uq.region.host_addr, 270336)}
    assert mapper.mapped == {}


def test_tx_write_and_ack(no_leaks):
    with UserQueue(8, False, iova_allocator=BumpAllocator(0, 1 << 20)) as uq:
        dev = device_for(uq)
        for i in range(20):  # more than the queue size: slots are recycled
            assert uq.write(bytes([i + 1]) * 5) is True
            head, segs = dev.pop()
            assert dev.read(segs[0].iova, segs[0].length) == bytes([i + 1]) * 5
            dev.push(head, 0)
            assert dev.pop() is None
        dev.close()


def test_rx_read_data(no_leaks):
    with UserQueue(8, True, iova_allocator=BumpAllocator(0, 1 << 20)) as uq:
        dev = device_for(uq)
        for i in range(20):
            head, segs = dev.pop()
            dev.write(segs[0].iova, bytes([i]) * 5)
            dev.push(head, 5)
            with uq.read_data() as data:
                assert bytes(data) == bytes([i]) * 5
            assert uq.read_data() is None
        dev.close()


def test_misuse_errors():
    with UserQueue(4, False, iova_allocator=BumpAllocator(0, 1 << 20)) as tx:
        with pytest.raises(QueueStateError):
            tx.read_data()
        with pytest.raises(ArgumentError):
            tx.write(b"x" * 1025)
        with pytest.raises(ArgumentError):
            tx.write(b"")
        for _ in range(4):
            tx.write(b"x")
        with pytest.raises(QueueFullError):
            tx.write(b"x")
    with UserQueue(4, True, iova_allocator=BumpAllocator(0, 1 << 20)) as rx:
        with pytest.raises(QueueStateError):
            rx.write(b"x")
        with pytest.raises(QueueStateError):
            rx.ack_used()


def test_identity_allocator_and_anonymous_memory(no_leaks):
    with UserQueue(8, False, iova_allocator=IdentityAllocator(),
                   memory_factory=AnonymousRegion) as uq:
        assert uq.iova == uq.region.host_addr
        uq.write(b"abc")


def test_close_refused_while_buffer_lent():
    uq = UserQueue(4, True, iova_allocator=BumpAllocator(0, 1 << 20))
    dev = device_for(uq)
    head, _ = dev.pop()
    dev.push(head, 3)
    lent = uq.read_data()
    with pytest.raises(QueueStateError):
        uq.close()
    lent.release()
    dev.close()
    uq.close()
