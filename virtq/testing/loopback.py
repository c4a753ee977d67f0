"""An in-process Transport whose device side is a DeviceQueue per queue that a test drives
by hand (notify/wait do nothing): deterministic tests for device drivers, no back-end needed."""

from __future__ import annotations

from virtq.memory import MemfdRegion
from virtq.queue import SplitQueue
from virtq.testing import DeviceQueue
from virtq.transport.base import DmaArena
from virtq.types import Iova


class LoopbackTransport:
    """``features`` are offered; ``queue_sizes[i]`` is queue i's maximum size; ``config``
    is the device config space."""

    def __init__(self, *, features: int, queue_sizes: list[int], config: bytes) -> None:
        self.features = features
        self.queue_sizes = queue_sizes
        self.config = config
        self.arenas: list[DmaArena] = []
        self.queues: dict[int, SplitQueue] = {}
        self.devices: dict[int, DeviceQueue] = {}

    @property
    def device_features(self) -> int:
        return self.features

    def negotiate(self, wanted: int) -> int:
        self.features &= wanted | 1 << 32  # VIRTIO_F_VERSION_1 always
        return self.features

    def num_queues(self) -> int:
        return len(self.queue_sizes)

    def max_queue_size(self, index: int) -> int:
        return self.queue_sizes[index] if index < len(self.queue_sizes) else 0

    def read_config(self, offset: int, size: int) -> bytes:
        return self.config[offset : offset + size]

    def alloc_dma(self, nbytes: int) -> DmaArena:
        region = MemfdRegion(-(-nbytes // 4096) * 4096)
        arena = DmaArena(region, Iova(0x1000_0000 * (len(self.arenas) + 1)))
        self.arenas.append(arena)
        # The device must reach buffers allocated after the queues: map them too.
        for i, old in self.devices.items():
            self.devices[i] = self._device(self.queues[i], old.last_avail)
            old.close()
        return arena

    def _device(self, queue: SplitQueue, start: int | None) -> DeviceQueue:
        regions = [(a.iova, a.region) for a in self.arenas[1:]]
        return DeviceQueue(queue.region, queue.layout, iova=queue.iova,
                           event_idx=queue.event_idx, start_index=start, regions=regions)

    def attach_queue(self, index: int, queue: SplitQueue) -> None:
        self.queues[index] = queue
        self.devices[index] = self._device(queue, None)

    def start(self) -> None:
        pass

    def notify(self, index: int) -> None:
        pass

    def wait(self, index: int, timeout: float | None) -> bool:
        return False

    def close(self) -> None:
        for d in self.devices.values():
            d.close()
        for q in self.queues.values():
            q.close()
        for a in self.arenas:
            a.region.close()
