"""One regression test per defect of crosvm's UserQueue listed in shared/SEED.md.

Each would have failed against the seed's semantics."""

from __future__ import annotations

import pytest

from virtq._sys import fence
from virtq.errors import DeviceProtocolError, QueueBrokenError
from virtq.iova import BumpAllocator
from virtq.layout import SplitLayout
from virtq.memory import MemfdRegion
from virtq.queue import SplitQueue, UserQueue
from virtq.queue import _splitcore as core_mod
from virtq.testing import DeviceQueue, HostileDevice


def test_seed_defect_1_out_of_order_completion_does_not_reuse_in_flight_buffers():
    # The seed picked the tx slot by avail_idx % N: after an out-of-order completion it
    # overwrote a buffer the device had not read yet.
    with UserQueue(4, False, iova_allocator=BumpAllocator(0, 1 << 20)) as uq:
        dev = DeviceQueue(uq.region, uq.layout, iova=uq.iova)
        for i in range(4):
            uq.write(b"msg%d" % i)
        chains = [dev.pop() for _ in range(4)]
        dev.push(chains[2][0], 0)  # the device completes only message 2
        uq.write(b"NEW!")  # must land in message 2's slot, nowhere else
        contents = [dev.read(segs[0].iova, 4) for _, segs in chains]
        assert contents[:2] == [b"msg0", b"msg1"]
        assert contents[3] == b"msg3"
        dev.close()


def test_seed_defect_2_rx_buffer_reposted_only_after_release():
    with UserQueue(4, True, iova_allocator=BumpAllocator(0, 1 << 20)) as uq:
        dev = DeviceQueue(uq.region, uq.layout, iova=uq.iova)
        head, segs = dev.pop()
        dev.write(segs[0].iova, b"data")
        dev.push(head, 4)
        view = uq.read_data()
        # While the caller holds the view the device has no way to get the buffer back.
        assert dev.avail_pending() == 3
        assert bytes(view.data) == b"data"
        view.release()
        assert dev.avail_pending() == 4
        dev.close()


@pytest.mark.parametrize(("head", "length", "field"), [
    (9, 0, "id"), (0xFFFFFFFF, 0, "id"), (0, 2000, "len")])
def test_seed_defect_3_used_elements_are_validated(head, length, field):
    layout = SplitLayout.compute(8, buffer_size=1024)
    with MemfdRegion(layout.nbytes) as region:
        q = SplitQueue(region, layout, iova=0)
        h = HostileDevice(region, layout)
        q.add([], [(layout.buffer(0), 1024)], token="rx")
        q.publish()
        h.complete(head, length)
        with pytest.raises(DeviceProtocolError, match=field):
            q.pop_used()
        h.close()
        q.close()


def test_seed_defect_3b_used_idx_jump_detected():
    layout = SplitLayout.compute(8)
    with MemfdRegion(layout.nbytes) as region:
        q = SplitQueue(region, layout, iova=0)
        h = HostileDevice(region, layout)
        q.add([(0x1000, 1)], [])
        q.publish()
        h.advance_used_idx(9)
        with pytest.raises(DeviceProtocolError, match=r"used\.idx"):
            q.drain_used()
        h.close()
        q.close()


def test_seed_defect_4_chains_mixed_directions_larger_than_1k_and_indirect():
    layout = SplitLayout.compute(8, buffer_size=8192, indirect_size=8)
    with MemfdRegion(layout.nbytes) as region:
        q = SplitQueue(region, layout, iova=0, indirect=True)
        dev = DeviceQueue(region, layout, iova=0)
        b = layout.buffer
        q.add([(b(0), 16), (b(1), 5000)], [(b(2), 4096), (b(3), 1)], token="big")
        q.publish()
        head, segs = dev.pop()
        assert [(s.length, s.writable) for s in segs] == [
            (16, False), (5000, False), (4096, True), (1, True)]
        dev.push(head, 4097)
        assert q.pop_used() == ("big", 4097)
        dev.close()
        q.close()


def test_seed_defect_5_notification_suppression_and_event_idx():
    layout = SplitLayout.compute(8)
    with MemfdRegion(layout.nbytes) as region:
        q = SplitQueue(region, layout, iova=0, event_idx=True)
        dev = DeviceQueue(region, layout, iova=0, event_idx=True)
        dev.set_avail_event(5)
        kicks = []
        for _ in range(8):
            q.add([(0x100, 1)], [])
            kicks.append(q.publish())
            dev.pop()
        assert kicks == [False] * 5 + [True] + [False] * 2
        dev.close()
        q.close()


def test_seed_defect_6_full_fence_between_idx_store_and_notify_decision(monkeypatch):
    # Python has no barrier; virtq uses a real one where the spec needs store->load order:
    # the fence the queue calls is the machine-code stub (mfence on x86-64, a dmb on
    # aarch64; tests/test_fence.py proves it orders), not the no-op or the lock fallback.
    assert "stub" in fence.MECHANISM, fence.MECHANISM
    assert core_mod.full_fence is fence.full_fence
    layout = SplitLayout.compute(8)
    with MemfdRegion(layout.nbytes) as region:
        q = SplitQueue(region, layout, iova=0)
        seen = []
        idx = region.view(layout.avail + 2, 2).cast("H")

        def recording_fence():
            seen.append(idx[0])
            fence.full_fence()

        monkeypatch.setattr(core_mod, "full_fence", recording_fence)
        q.add([(0x100, 1)], [])
        q.publish()
        assert seen == [1], "the fence must come after the avail.idx store"
        seen.clear()
        q.enable_interrupts()
        assert seen == [1]
        idx.release()
        q.close()


def test_seed_defect_7_failures_raise_and_queue_stays_usable():
    layout = SplitLayout.compute(8)
    with MemfdRegion(layout.nbytes) as region:
        q = SplitQueue(region, layout, iova=0)
        h = HostileDevice(region, layout)
        q.add([(0x100, 1)], [], token="a")
        q.publish()
        h.set_used_idx(0x8000)
        with pytest.raises(DeviceProtocolError):
            q.pop_used()
        with pytest.raises(QueueBrokenError):
            q.pop_used()
        assert q.reset(start_index=0) == ["a"]
        q.add([(0x100, 1)], [], token="b")
        q.publish()
        h.complete(q.snapshot()["in_flight_heads"][0], 0)
        assert q.pop_used() == ("b", 0)
        h.close()
        q.close()


def test_seed_defect_8_wraparound_tested_by_seeding_not_looping():
    with UserQueue(4, True, iova_allocator=BumpAllocator(0, 1 << 20),
                   start_index=0xFFFE) as uq:
        dev = DeviceQueue(uq.region, uq.layout, iova=uq.iova)
        for i in range(6):
            head, segs = dev.pop()
            dev.write(segs[0].iova, bytes([i]))
            dev.push(head, 1)
            with uq.read_data() as data:
                assert bytes(data) == bytes([i])
        assert uq.queue.last_used == 4  # crossed 0xFFFF -> 0
        dev.close()
