"""An in-process Transport whose device side is a DeviceQueue per queue that a test drives
by hand (notify/wait do nothing): deterministic tests for device drivers, no back-end needed.

Use it to test a driver step by step::

    t = LoopbackTransport(features=1 << 32, queue_sizes=[8], config=b"")
    dev = MyDriver(t)                  # negotiates, allocates, attaches, starts
    ... dev.submit(...) ...
    head, segments = t.devices[0].pop()  # play the device
    t.devices[0].push(head, 0)
    dev.poll()

:meth:`LoopbackTransport.fail` makes it behave like a transport whose device went away.
"""

from __future__ import annotations

from typing import Any

from virtq.errors import ArgumentError, DeviceError, QueueStateError
from virtq.layout import PackedLayout
from virtq.memory import MemfdRegion
from virtq.queue import VirtQueue
from virtq.testing.device import DeviceQueue, check_uint
from virtq.testing.packed_device import PackedDeviceQueue
from virtq.transport.base import DmaArena
from virtq.types import Iova

_U64 = (1 << 64) - 1


class LoopbackTransport:
    """``features`` are offered; ``queue_sizes[i]`` is queue i's maximum size; ``config``
    is the device config space; ``device_type`` what the transport reports (None, like
    vhost-user, by default).  Implements :class:`~virtq.transport.Transport` (polling: it
    sends no notifications) and :class:`~virtq.transport.Reconnectable`."""

    def __init__(self, *, features: int, queue_sizes: list[int], config: bytes,
                 device_type: int | None = None) -> None:
        # Checked here: a bad value would otherwise surface inside a device driver's set-up
        # as a TypeError, far from the test that passed it.
        check_uint("features", features, _U64)
        if not isinstance(queue_sizes, list | tuple) or not all(
                isinstance(q, int) and not isinstance(q, bool) and 0 <= q <= 0x8000
                for q in queue_sizes):
            raise ArgumentError("queue_sizes", queue_sizes, "must be a list of ints in "
                                "0..32768 (0: no such queue)")
        if not isinstance(config, bytes | bytearray):
            raise ArgumentError("config", type(config).__name__, "must be bytes")
        self.features = features
        self.queue_sizes = list(queue_sizes)
        self.config = config
        self._device_type = device_type
        self.arenas: list[DmaArena] = []
        self.queues: dict[int, VirtQueue[Any]] = {}
        #: The device side of each attached queue: a DeviceQueue for a split ring, a
        #: PackedDeviceQueue for a packed one (the same pop/push/publish_used API).
        self.devices: dict[int, DeviceQueue | PackedDeviceQueue] = {}
        self.notified: list[int] = []  # queue indices, one per notify()
        self.stopped: set[int] = set()  # queues stop_queue() stopped
        self.closed = False
        self.started = False
        self._failure: DeviceError | None = None

    @property
    def device_features(self) -> int:
        """The features offered (after :meth:`negotiate`: the ones accepted)."""
        return self.features

    @property
    def device_type(self) -> int | None:
        """The virtio device id given to the constructor (None by default, like vhost-user)."""
        return self._device_type

    @property
    def polling(self) -> bool:
        """Always True: this transport sends no notifications, so waiters spin."""
        return True

    def negotiate(self, wanted: int) -> int:
        """Keep the offered features that ``wanted`` names (VIRTIO_F_VERSION_1 always) and return
        them."""
        check_uint("wanted", wanted, _U64)
        self.features &= wanted | 1 << 32  # VIRTIO_F_VERSION_1 always
        return self.features

    def num_queues(self) -> int:
        """How many queues the device has (``len(queue_sizes)``)."""
        return len(self.queue_sizes)

    def max_queue_size(self, index: int) -> int:
        """Queue ``index``'s maximum size, 0 for a queue the device does not have."""
        check_uint("index", index, 0xFFFF)
        return self.queue_sizes[index] if 0 <= index < len(self.queue_sizes) else 0

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the config space at ``offset`` (shorter past its end)."""
        check_uint("offset", offset, 0xFFFF)
        check_uint("size", size, 0xFFFF)
        return self.config[offset : offset + size]

    def alloc_dma(self, nbytes: int) -> DmaArena:
        """A new memfd-backed arena of at least ``nbytes`` (rounded up to pages) at its own
        device address; every device side is rebuilt so it can reach it.  Raises
        :class:`~virtq.errors.QueueStateError` once closed."""
        if self.closed:
            raise QueueStateError("loopback transport is closed")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 1:
            raise ArgumentError("nbytes", nbytes, "must be an int >= 1")
        region = MemfdRegion(-(-nbytes // 4096) * 4096)
        arena = DmaArena(region, Iova(0x1000_0000 * (len(self.arenas) + 1)), owner=self)
        self.arenas.append(arena)
        # The device must reach buffers allocated after the queues: map them too.
        for device in self.devices.values():
            device.add_region(arena.iova, region)
        return arena

    def _device(self, queue: VirtQueue[Any]) -> DeviceQueue | PackedDeviceQueue:
        """The device side of ``queue``, in its ring format, starting where the queue's
        ``vring_base`` says (what SET_VRING_BASE would tell a back-end)."""
        regions = [(a.iova, a.region) for a in self.arenas if a.region is not queue.region]
        layout = queue.layout  # type: ignore[attr-defined]
        region = queue.region
        iova = queue.iova
        base = queue.vring_base
        if isinstance(layout, PackedLayout):
            avail, used = base & 0xFFFF, base >> 16
            return PackedDeviceQueue(region, layout, iova=iova, event_idx=queue.event_idx,
                                     avail_index=avail & 0x7FFF, avail_wrap=avail >> 15,
                                     used_index=used & 0x7FFF, used_wrap=used >> 15,
                                     regions=regions)
        return DeviceQueue(region, layout, iova=iova, event_idx=queue.event_idx,
                           start_index=base, regions=regions)

    def attach_queue(self, index: int, queue: VirtQueue[Any]) -> None:
        """Give queue ``index`` to the device: a :class:`~virtq.testing.DeviceQueue` over its
        memory appears in :attr:`devices`.  Raises :class:`~virtq.errors.ArgumentError` when
        ``index`` is attached already."""
        if index in self.queues:
            raise ArgumentError("index", index, "queue already attached")
        self.queues[index] = queue
        self.devices[index] = self._device(queue)

    def start(self) -> None:
        """Mark the device started (DRIVER_OK); nothing else happens."""
        self.started = True

    def notify(self, index: int) -> None:
        """Record ``index`` in :attr:`notified`.  Raises the error given to :meth:`fail`, or
        :class:`~virtq.errors.QueueStateError` once closed."""
        self._check()
        self.notified.append(index)

    def notification_fds(self) -> list[int]:
        """None: this transport polls (an empty list)."""
        return []

    def drain_notifications(self) -> bool:
        """False: there is nothing to drain."""
        return False

    def wait(self, timeout: float | None) -> bool:
        """Return False at once (nothing ever notifies).  Raises the error given to :meth:`fail`,
        or :class:`~virtq.errors.QueueStateError` once closed."""
        self._check()
        return False

    def check_alive(self) -> None:
        """Raises the error given to :meth:`fail`, or :class:`~virtq.errors.QueueStateError` once
        closed."""
        self._check()

    def stop_queue(self, index: int) -> bool:
        """Record ``index`` in :attr:`stopped`; True (the ring is stopped).  Raises like
        :meth:`check_alive`."""
        self._check()
        self.stopped.add(index)
        return True

    def fail(self, err: DeviceError) -> None:
        """From now on behave like a transport whose device went away: ``notify``,
        ``wait``, ``check_alive`` raise ``err`` (until :meth:`reconnect`)."""
        self._failure = err

    def _check(self) -> None:
        if self.closed:
            raise QueueStateError("loopback transport is closed")
        if self._failure is not None:
            raise self._failure

    def reconnect(self, path: Any = None, *, timeout: float | None = None,
                  resume: bool = False) -> dict[int, list[Any]]:
        """A fresh device side on the same memory: every ring reset at its vring_base
        (``resume`` is not supported: a loopback device keeps no inflight region).  Returns
        the tokens each queue had in flight.  Raises :class:`~virtq.errors.QueueStateError`
        once closed."""
        if self.closed:
            raise QueueStateError("loopback transport is closed")
        self._failure = None
        self.stopped.clear()
        lost: dict[int, list[Any]] = {}
        for index, queue in self.queues.items():
            lost[index] = queue.reset()
            self.devices[index].close()
            self.devices[index] = self._device(queue)
        return lost

    def close(self) -> None:
        """Close every device side, queue and arena (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for d in self.devices.values():
            d.close()
        for q in self.queues.values():
            q.close()
        for a in self.arenas:
            a.region.close()
