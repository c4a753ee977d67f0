"""BlkDevice's request bookkeeping against an in-process device (DeviceQueue) that a test
drives step by step: what the device sees in the rings, and what the driver does with a
device that misbehaves half-way through a batch.  The same paths run against real
qemu-storage-daemon in test_vhost_user_blk.py; here each step is deterministic."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import pytest

from virtq.abi import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from virtq.devices import BlkDevice
from virtq.devices.blk import VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_IN
from virtq.errors import ArgumentError, DeviceProtocolError, QueueStateError
from virtq.memory import MemfdRegion
from virtq.queue import SplitQueue
from virtq.testing import DeviceQueue, HostileDevice
from virtq.testing.device import Segment
from virtq.transport.base import DmaArena
from virtq.types import Iova

CAPACITY = 1 << 16  # sectors


def sector_bytes(sector: int, nbytes: int) -> bytes:
    """What the fake disk holds: each 512-byte sector filled with its number (mod 251)."""
    return b"".join(bytes([(sector + i) % 251]) * 512 for i in range(nbytes // 512))


class LoopbackTransport:
    """The Transport protocol over memfd memory, with a DeviceQueue per queue that the test
    serves by hand (notify/wait do nothing)."""

    def __init__(self, *, indirect: bool = True) -> None:
        self.features = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX
                         | 1 << VIRTIO_BLK_F_FLUSH
                         | (1 << VIRTIO_F_INDIRECT_DESC if indirect else 0))
        self.arenas: list[DmaArena] = []
        self.queues: list[SplitQueue] = []
        self.devices: list[DeviceQueue] = []

    @property
    def device_features(self) -> int:
        return self.features

    def negotiate(self, wanted: int) -> int:
        self.features &= wanted | 1 << VIRTIO_F_VERSION_1
        return self.features

    def num_queues(self) -> int:
        return 1

    def max_queue_size(self, index: int) -> int:
        return 256 if index == 0 else 0

    def read_config(self, offset: int, size: int) -> bytes:
        return struct.pack("<Q", CAPACITY).ljust(64, b"\0")[offset : offset + size]

    def alloc_dma(self, nbytes: int) -> DmaArena:
        region = MemfdRegion(-(-nbytes // 4096) * 4096)
        arena = DmaArena(region, Iova(0x1000_0000 * (len(self.arenas) + 1)))
        self.arenas.append(arena)
        # The device must reach buffers allocated after the queues: map them too.
        for i, old in enumerate(self.devices):
            self.devices[i] = self._device(self.queues[i], old.last_avail)
            old.close()
        return arena

    def _device(self, queue: SplitQueue, start: int | None) -> DeviceQueue:
        regions = [(a.iova, a.region) for a in self.arenas[1:]]
        return DeviceQueue(queue.region, queue.layout, iova=queue.iova,
                           event_idx=queue.event_idx, start_index=start, regions=regions)

    def attach_queue(self, index: int, queue: SplitQueue) -> None:
        self.queues.append(queue)
        self.devices.append(self._device(queue, None))

    def start(self) -> None:
        pass

    def notify(self, index: int) -> None:
        pass

    def wait(self, index: int, timeout: float | None) -> bool:
        return False

    def close(self) -> None:
        for d in self.devices:
            d.close()
        for q in self.queues:
            q.close()
        for a in self.arenas:
            a.region.close()

    # -- the device, step by step ---------------------------------------------------------

    def pop_all(self) -> list[tuple[int, list[Segment]]]:
        dev = self.devices[0]
        chains = []
        while (chain := dev.pop()) is not None:
            chains.append(chain)
        return chains

    def serve(self, head: int, segments: list[Segment]) -> None:
        """A virtio-blk read: header, data (writable), status (writable)."""
        dev = self.devices[0]
        kind, _, sector = struct.unpack("<IIQ", dev.read(segments[0].iova, 16))
        assert kind == VIRTIO_BLK_T_IN
        data = sector_bytes(sector, sum(s.length for s in segments[1:-1]))
        off = 0
        for seg in segments[1:-1]:
            dev.write(seg.iova, data[off : off + seg.length])
            off += seg.length
        dev.write(segments[-1].iova, b"\0")
        dev.push(head, off + 1, publish=False)


@pytest.fixture(params=[True, False], ids=["indirect", "direct"])
def blk(request: pytest.FixtureRequest) -> Iterator[tuple[BlkDevice, LoopbackTransport]]:
    transport = LoopbackTransport(indirect=request.param)
    dev = BlkDevice(transport, queue_size=32, max_io=8192, indirect=request.param)
    try:
        yield dev, transport
    finally:
        dev.close()


def serve_all(t: LoopbackTransport, *, order: list[int] | None = None) -> int:
    chains = t.pop_all()
    for i in order if order is not None else range(len(chains)):
        t.serve(*chains[i])
    t.devices[0].publish_used()
    return len(chains)


def test_submit_read_many_copying(no_leaks, blk):
    dev, t = blk
    sectors = [5, 900, 17, CAPACITY - 16]
    reqs = dev.submit_read_many(sectors, 4096)
    assert dev.in_flight == 4
    dev.kick()
    assert serve_all(t, order=[2, 0, 3, 1]) == 4
    done = dev.poll()
    assert [r.sector for r in done] == [17, 5, CAPACITY - 16, 900]
    for s, r in zip(sectors, reqs, strict=True):
        assert r.wait() == sector_bytes(s, 4096)
        assert r.written == 4097
    assert dev.in_flight == 0


def test_zero_copy_refill_points_each_descriptor_at_its_buffer(no_leaks, blk):
    """Refilling with the reaped requests' buffers skips rewriting descriptors that already
    point at them; any other pairing of slots and buffers must be rewritten.  Check from the
    device's side that every request's data goes to the buffer it was given."""
    dev, t = blk
    arena = dev.alloc_buffer(8 * 4096)
    bufs = [arena.slice(i * 4096, 4096) for i in range(8)]
    rng = random.Random(7)
    reqs = dev.submit_read_many([rng.randrange(CAPACITY - 8) for _ in bufs], into=bufs)
    for rnd in range(12):
        dev.kick()
        chains = t.pop_all()
        assert len(chains) == len(reqs)
        by_head = dict(chains)
        # the device sees the buffer each request was given, in the order submitted
        for (_, segs), r in zip(chains, reqs, strict=True):
            if r.into:
                assert (segs[1].iova, segs[1].length) == (r.into[0].iova, 4096)
            else:
                assert segs[1].length == 1024
        order = list(range(len(chains)))
        rng.shuffle(order)
        for i in order:
            head = chains[i][0]
            t.serve(head, by_head[head])
        t.devices[0].publish_used()
        done = dev.poll()
        assert len(done) == len(reqs)
        for r in done:
            if r.into:
                assert r.into[0].read() == sector_bytes(r.sector, 4096)
            else:
                assert r.wait() == sector_bytes(r.sector, 1024)
        again = [r.into[0] for r in done if r.into]
        if rnd % 3 == 1:
            rng.shuffle(again)  # buffers move to other slots
        if rnd % 3 == 2:
            again = again[:5]  # fewer requests than slots just freed
        reqs = dev.submit_read_many([rng.randrange(CAPACITY - 8) for _ in again], into=again)
        # copying and single requests share the slots and their persistent tables
        extra = dev.submit_read(rng.randrange(CAPACITY - 8), 1024)
        reqs.append(extra)


def test_submit_read_many_is_all_or_nothing(blk):
    dev, t = blk
    arena = dev.alloc_buffer(4 * 4096)
    bufs = [arena.slice(i * 4096, 4096) for i in range(4)]
    snapshot = dev.queues[0].snapshot()
    for call, error in [
        (lambda: dev.submit_read_many([1, 2, -1, 4], 4096), ArgumentError),
        (lambda: dev.submit_read_many([1, 1.5], 4096), ArgumentError),
        (lambda: dev.submit_read_many([1, 1 << 64], 4096), ArgumentError),
        (lambda: dev.submit_read_many([1, 2], 100), ArgumentError),
        (lambda: dev.submit_read_many([1, 2], 16384), ArgumentError),  # over max_io
        (lambda: dev.submit_read_many([1, 2], into=bufs[:1]), ArgumentError),
        (lambda: dev.submit_read_many([1, 2], into=[bufs[0], arena.slice(0, 512)]),
         ArgumentError),  # two lengths in one call
        (lambda: dev.submit_read_many([1], into=[b"\0" * 4096]), ArgumentError),
        (lambda: dev.submit_read_many([1], into=[arena.slice(0, 100)]), ArgumentError),
        (lambda: dev.submit_read_many(list(range(dev.slots_per_queue + 1)), 512),
         QueueStateError),
    ]:
        with pytest.raises(error):
            call()
        assert dev.in_flight == 0
        assert dev.queues[0].snapshot() == snapshot
    assert dev.submit_read_many([], 512) == []
    # the slots are all usable afterwards
    reqs = dev.submit_read_many(list(range(0, 8 * dev.slots_per_queue, 8)), 512)
    assert len(reqs) == dev.slots_per_queue
    dev.kick()
    serve_all(t)
    dev.poll()
    assert [r.wait() for r in reqs] == [sector_bytes(r.sector, 512) for r in reqs]


def test_device_error_mid_batch_completes_the_good_and_fails_the_rest(blk):
    dev, t = blk
    reqs = dev.submit_read_many([10, 20, 30], 512)
    dev.kick()
    chains = t.pop_all()
    t.serve(*chains[1])  # one good completion, then an element naming no head
    t.devices[0].publish_used()
    q = dev.queues[0]
    HostileDevice(q.region, q.layout).complete(q.size + 3, 0)
    with pytest.raises(DeviceProtocolError):
        dev.poll()
    assert reqs[1].wait() == sector_bytes(20, 512)  # completed before the bad element
    for r in (reqs[0], reqs[2]):
        assert r.done
        with pytest.raises(DeviceProtocolError):
            r.wait()
    assert dev.in_flight == 0
