"""virtq.queue.UserQueue: the seed's buffer-pool API over SplitQueue."""

from __future__ import annotations

import array
import ctypes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtq.errors import (
    ArgumentError,
    DeviceProtocolError,
    IovaError,
    QueueBrokenError,
    QueueFullError,
    QueueStateError,
    VirtqOSError,
)
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


# -- review 2026-11-30, hostile finding 12: multi-byte items and broken queues --------------


def _bytes_of(data: object) -> bytes:
    return memoryview(data).tobytes()  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [
    lambda: array.array("Q", [1, 2, 3]),
    lambda: memoryview(array.array("I", range(10))),
    lambda: memoryview(bytes(range(64))).cast("B", (8, 8)),  # 2-D, C-contiguous
    lambda: memoryview(array.array("H", range(40))).cast("B").cast("H"),
    lambda: (ctypes.c_uint64 * 4)(1, 2, 3, 4),  # format "<Q": not castable
    lambda: bytearray(b"abc"),
    lambda: b"\x00" * 1024,  # exactly one buffer
], ids=["array-Q", "memoryview-I", "2-D", "recast-H", "ctypes", "bytearray", "full"])
def test_write_takes_the_bytes_of_any_contiguous_buffer(make, no_leaks):
    with UserQueue(4, False, iova_allocator=BumpAllocator(0, 1 << 20)) as uq:
        dev = device_for(uq)
        data = make()
        uq.write(data)
        head, segs = dev.pop()
        assert segs[0].length == len(_bytes_of(data))
        assert dev.read(segs[0].iova, segs[0].length) == _bytes_of(data)
        dev.push(head, 0)
        dev.close()


@pytest.mark.parametrize("bad", [
    memoryview(bytes(64))[::2],  # not contiguous
    memoryview(bytes(64)).cast("B", (8, 8))[::2],
    "text", 5, None, [1, 2, 3], array.array("Q", range(129)),  # 1032 bytes > 1024
    array.array("Q"), memoryview(b""),
], ids=["strided", "strided-2-D", "str", "int", "None", "list", "too-long", "empty-array",
        "empty-view"])
def test_write_refuses_what_it_cannot_send(bad, no_leaks):
    with UserQueue(4, False, iova_allocator=BumpAllocator(0, 1 << 20)) as uq:
        with pytest.raises(ArgumentError):
            uq.write(bad)
        assert uq.queue.num_free == 4  # nothing was added


buffers = st.one_of(
    st.binary(min_size=0, max_size=1100),
    st.builds(array.array, st.sampled_from("BbHhIiLlQq"),
              st.lists(st.integers(0, 127), max_size=200)),
    st.builds(lambda b, step: memoryview(b)[::step], st.binary(max_size=600),
              st.integers(1, 3)),
    st.builds(bytearray, st.binary(max_size=1100)),
)


@given(data=st.lists(buffers, min_size=1, max_size=12))
def test_any_buffer_is_sent_byte_for_byte_or_refused(data):
    with UserQueue(8, False, iova_allocator=BumpAllocator(0, 1 << 20)) as uq:
        dev = device_for(uq)
        for item in data:
            view = memoryview(item)
            ok = view.c_contiguous and 0 < view.nbytes <= 1024
            try:
                uq.write(item)
            except ArgumentError:
                assert not ok
                continue
            assert ok
            head, segs = dev.pop()
            assert dev.read(segs[0].iova, segs[0].length) == view.tobytes()
            dev.push(head, 0)
        dev.close()


def _broken_rx():
    """An rx UserQueue with one buffer lent out, then broken by the device (a used length
    beyond the buffer).  Returns (queue, device, the lent buffer)."""
    uq = UserQueue(4, True, iova_allocator=BumpAllocator(0, 1 << 20))
    dev = device_for(uq)
    first, _ = dev.pop()
    second, _ = dev.pop()
    dev.push(first, 5)
    dev.push(second, 1 << 20)  # more than the 1 KiB buffer: a protocol violation
    return uq, dev, uq.read_data()


def test_release_after_the_queue_broke_is_quiet_and_the_queue_still_says_so(no_leaks):
    uq, dev, lent = _broken_rx()
    with pytest.raises(DeviceProtocolError):
        uq.read_data()
    assert lent.release() is False  # not re-posted: the queue is broken
    assert lent.release() is False  # idempotent
    with pytest.raises(QueueBrokenError):
        uq.read_data()  # the error surfaces on the next queue call
    dev.close()
    uq.close()


def test_with_block_exits_cleanly_when_the_queue_breaks_inside_it(no_leaks):
    uq, dev, lent = _broken_rx()

    def consume() -> None:
        with lent as data:
            assert bytes(data) == bytes(5)
            uq.read_data()  # the device's bad element: the exit must not mask it

    with pytest.raises(DeviceProtocolError):
        consume()
    with pytest.raises(QueueBrokenError):
        uq.read_data()
    dev.close()
    uq.close()


def test_release_after_close_of_a_drained_queue(no_leaks):
    uq = UserQueue(4, True, iova_allocator=BumpAllocator(0, 1 << 20))
    dev = device_for(uq)
    head, _ = dev.pop()
    dev.push(head, 3)
    lent = uq.read_data()
    with pytest.raises(QueueStateError):
        uq.close()  # refused: lent out
    assert lent.release() is True  # re-posted: the queue is fine
    dev.close()
    uq.close()
    assert lent.release() is False


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"buffer_size": "1024"}, "buffer_size"), ({"buffer_size": 0}, "buffer_size"),
    ({"buffer_size": True}, "buffer_size"), ({"buffer_size": 1.5}, "buffer_size"),
    ({"queue_size": 512}, "queue_size"), ({"queue_size": 0}, "queue_size"),
    ({"queue_size": "8"}, "queue_size"), ({"device_writable": "yes"}, "device_writable"),
    ({"memory_factory": lambda n: AnonymousRegion(max(1, n // 2))}, "memory_factory"),
    ({"memory_factory": bytearray}, "memory_factory"),
    ({"iova_allocator": None}, "iova_allocator"), ({"iova_allocator": object()},
                                                   "iova_allocator"),
    ({"dma_mapper": object()}, "dma_mapper"), ({"event_idx": "no"}, "event_idx"),
])
def test_constructor_arguments_are_checked(kwargs, name, no_leaks):
    args = {"queue_size": 8, "device_writable": False, "iova_allocator":
            BumpAllocator(0, 1 << 20), **kwargs}
    with pytest.raises(ArgumentError) as info:
        UserQueue(args.pop("queue_size"), args.pop("device_writable"), **args)
    assert info.value.name == name


class RefusingMapper(NullDmaMapper):
    """A DmaMapper whose map() fails, as VFIO's does when pages cannot be pinned."""

    def __init__(self) -> None:
        super().__init__()
        self.unmapped: list[int] = []

    def map(self, iova, host_addr, nbytes, **kwargs):
        raise VirtqOSError(12, "cannot pin")

    def unmap(self, iova, nbytes):
        self.unmapped.append(iova)
        raise IovaError(f"no mapping at {iova:#x}")


def test_a_failed_map_is_not_unmapped_and_the_iova_is_freed(no_leaks):
    alloc = BumpAllocator(0, 1 << 20)
    mapper = RefusingMapper()
    with pytest.raises(VirtqOSError):  # the mapper's own error, not an unmap error
        UserQueue(8, False, iova_allocator=alloc, dma_mapper=mapper)
    assert mapper.unmapped == []
    assert alloc.alloc(4096) == 0  # everything was freed: the allocator rewound
