"""The seam between device drivers (``virtq.devices``) and transports.

A transport is how a driver reaches a device: vhost-user (a Unix socket to a back-end
process), virtio-pci through VFIO, or an in-process test device
(:class:`virtq.testing.loopback.LoopbackTransport`).  Device drivers are written once
against :class:`Transport` and see a ring only through :class:`~virtq.queue.VirtQueue`.

Life cycle (mirrors VIRTIO 1.2 §3.1.1 "Driver Requirements: Device Initialization")::

    t = SomeTransport.open(...)           # reset, ACKNOWLEDGE, DRIVER
    accepted = t.negotiate(wanted)        # features: offered & wanted (+ required) -> FEATURES_OK
    cfg = t.read_config(0, 8)             # device-specific configuration space
    arena = t.alloc_dma(nbytes)           # device-visible memory (rings and data buffers)
    q = make_queue(arena.region, layout, iova=arena.iova, ...)
    t.attach_queue(0, q)                  # hand the rings to the device
    t.start()                             # DRIVER_OK / rings enabled
    ... q.add(...); q.publish() and t.notify(0); Waiter(t, [q]).wait(...); q.drain_used() ...
    t.close()                             # stop the device, release every fd and mapping

What a driver may need beyond that is declared, not probed: :class:`Reconnectable` for
transports that can reach a new back-end (vhost-user).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from virtq.abi import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from virtq.errors import ArgumentError
from virtq.memory import MemoryRegion
from virtq.queue import VirtQueue
from virtq.types import Iova

#: Feature bits 24..49 are about the transport and the rings, not the device (VIRTIO 1.2 §6).
TRANSPORT_FEATURE_RANGE = ((1 << 50) - 1) & ~((1 << 24) - 1)
#: Of those, the ones virtq's SplitQueue implements.
QUEUE_FEATURES = (1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_VERSION_1
                  | 1 << VIRTIO_F_RING_PACKED | 1 << VIRTIO_F_IN_ORDER)


def usable_features(offered: int, transport_features: int = 0) -> int:
    """``offered`` with the transport-range bits virtq does not implement removed: device
    bits pass; ring bits only if :data:`QUEUE_FEATURES` or ``transport_features`` has
    them.  No transport may accept a feature nothing in virtq implements."""
    return offered & (~TRANSPORT_FEATURE_RANGE | QUEUE_FEATURES | transport_features)


def arena_of(arenas: Iterable[DmaArena], queue: VirtQueue[Any]) -> DmaArena:
    """The arena ``queue`` lives in; its ``iova`` must be the queue's (descriptors and ring
    addresses are computed from it).  Raises :class:`~virtq.errors.ArgumentError` when the
    queue's memory is not one of ``arenas`` or its ``iova`` differs from the arena's."""
    for arena in arenas:
        if arena.region is queue.region:
            if queue.iova != arena.iova:
                raise ArgumentError("queue.iova", queue.iova,
                                    f"must be its arena's device address {arena.iova:#x}")
            return arena
    raise ArgumentError("queue", queue, "its region was not allocated with alloc_dma()")


@dataclass(eq=False)
class DmaArena:
    """Memory the device can reach: ``region`` is seen by the device at ``iova``."""

    region: MemoryRegion
    iova: Iova
    #: The transport that allocated it: a buffer in it may only go to that transport's
    #: device (another device would read the IOVA in its own address space).
    owner: object = None
    #: Transport-private bookkeeping (e.g. the IOVA reservation to free on close).
    private: dict[str, object] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """The region's length in bytes."""
        return self.region.nbytes

    def addr(self, offset: int) -> Iova:
        """Device address of byte ``offset`` of the region."""
        return Iova(self.iova + offset)


@runtime_checkable
class Transport(Protocol):
    """What a device driver needs from a transport."""

    @property
    def device_features(self) -> int:
        """Feature bits the device offers (transport-internal bits masked out)."""
        ...

    @property
    def device_type(self) -> int | None:
        """The virtio device type (§5: 1 net, 2 block, 4 entropy, 26 fs...) when the
        transport can tell (PCI device id), else None (vhost-user has no such message)."""
        ...

    @property
    def polling(self) -> bool:
        """True when the device sends no used-buffer notifications (drivers then poll the
        used rings; :meth:`wait` returns False at once)."""
        ...

    def negotiate(self, wanted: int) -> int:
        """Accept ``device_features & wanted`` plus the bits the transport itself requires
        (``VIRTIO_F_VERSION_1``; ``VIRTIO_F_ACCESS_PLATFORM`` behind an IOMMU).  Returns the
        accepted set.  Raises ``TransportError`` if the device refuses (FEATURES_OK not set)
        or lacks a required bit."""
        ...

    def num_queues(self) -> int:
        """How many virtqueues the device has."""
        ...

    def max_queue_size(self, index: int) -> int:
        """The largest size queue ``index`` accepts (0 if it does not exist)."""
        ...

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the device-specific configuration space at ``offset``."""
        ...

    def alloc_dma(self, nbytes: int) -> DmaArena:
        """Allocate ``nbytes`` (rounded up) of memory the device can reach, and make it
        reachable (vhost-user memory table, IOMMU mapping).  Freed by :meth:`close`."""
        ...

    def attach_queue(self, index: int, queue: VirtQueue[Any]) -> None:
        """Give the device queue ``index``: size, the three ring areas, where it starts
        (``queue.vring_base``), notifications.  The queue's region must come from
        :meth:`alloc_dma`."""
        ...

    def start(self) -> None:
        """Finish initialisation (DRIVER_OK, rings enabled): the device may now run."""
        ...

    def notify(self, index: int) -> None:
        """Available-buffer notification for queue ``index`` (a kick)."""
        ...

    def notification_fds(self) -> list[int]:
        """The fds that become readable on a used-buffer notification (one eventfd per
        queue or vector; empty when polling) -- for an event loop's ``add_reader``; after a
        wake-up call :meth:`drain_notifications`."""
        ...

    def drain_notifications(self) -> bool:
        """Reset the notification fds without sleeping; True if any had fired."""
        ...

    def wait(self, timeout: float | None) -> bool:
        """Sleep until a used-buffer notification for any queue arrives or ``timeout``
        seconds pass (None: forever); True if one arrived.  Raises the transport's error
        (a :class:`~virtq.errors.DeviceError`) at once if the device goes away meanwhile,
        and :class:`~virtq.errors.QueueStateError` if the transport is closed (also from
        another thread during the sleep).  When polling it returns False at once."""
        ...

    def check_alive(self) -> None:
        """Raise the transport's :class:`~virtq.errors.DeviceError` if the device is gone
        or failed (cheap, non-blocking: for polling loops)."""
        ...

    def stop_queue(self, index: int) -> bool:
        """Make the device stop using queue ``index`` now, if this transport can do that
        for one queue (vhost-user: GET_VRING_BASE); returns False when it cannot (the
        queue's buffers then stay the device's until :meth:`close`)."""
        ...

    def close(self) -> None:
        """Stop the device (reset, or disconnect) and release every fd, mapping and IOVA
        (idempotent)."""
        ...


@runtime_checkable
class Reconnectable(Protocol):
    """A transport that can reach a new instance of its device (vhost-user: a restarted
    back-end on the same socket path)."""

    def reconnect(self, path: Any = None, *, timeout: float | None = None,
                  resume: bool = False) -> dict[int, list[Any]]:
        """Connect again, renegotiate, and bring every attached ring back; returns, per
        queue, the tokens that were in flight (in submission order) which the device has
        lost -- the caller fails or resubmits them.

        Without ``resume`` every ring is reset and restarts at its ``vring_base``: every
        token in flight is returned.  With ``resume`` a transport whose new device can
        take the rings over as they are (vhost-user: an inflight region kept across the
        restart, vhost-user.rst "Inflight I/O tracking") leaves them untouched and returns
        no token for those rings: the device carries out what it had taken, the rest is
        still available.  A transport that cannot resets the rings as without it."""
        ...


@runtime_checkable
class QueueEnabling(Protocol):
    """A transport whose front-end switches single rings on and off while the device runs
    (vhost-user: SET_VRING_ENABLE, vhost-user.rst "Multiple queue support").  Over such a
    transport the front-end -- this process -- owns the device model: a virtio-net
    controlq is not handed to the back-end but played by the front-end, which enables and
    disables queue pairs itself (what QEMU and DPDK's virtio-user do)."""

    def enable_queue(self, index: int, enable: bool) -> None:
        """Enable (True) or disable (False) attached ring ``index``."""
        ...
