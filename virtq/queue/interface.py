"""The driver-queue interface: everything devices and transports see of a virtqueue.

Two protocols, so that a ring format (split today, packed next) plugs in without a line of
device or transport code knowing which it is:

* :class:`VirtQueue` -- what a *transport* and the :class:`~virtq.transport.Waiter` need:
  the ring's size and the three areas VIRTIO 1.2 §2.6 names (descriptor area, driver area,
  device area) to program into the device, the index a vhost-user back-end starts from,
  publish / reap, interrupt control, state, reset and close.
* :class:`DriverQueue` -- a :class:`VirtQueue` that also takes chains of buffers: single
  chains (:meth:`DriverQueue.add`), batches (:meth:`DriverQueue.add_many`) and
  :class:`ChainTemplate`\\ s (a request shape declared once, submitted many times; the queue
  alone decides direct or indirect descriptors and writes their bytes).

Implemented by :class:`~virtq.queue.SplitQueue` (chains) and
:class:`~virtq.queue.SlotQueue` (fixed one-buffer slots: a :class:`VirtQueue` with its own
``submit``/``reap``).  Both are written over memory you own and do no I/O: ``publish()``
*returns* whether the device wants a notification.

A queue is in one :class:`QueueState`.  ``READY`` is the only state in which chains are
added, published or reaped.  A device that writes something impossible makes it ``BROKEN``
(every later call raises :class:`~virtq.errors.QueueBrokenError`, whose ``__cause__`` is the
original :class:`~virtq.errors.DeviceProtocolError`) until :meth:`VirtQueue.reset`; after
:meth:`VirtQueue.close` it is ``CLOSED`` for good.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from virtq.errors import DeviceError
from virtq.memory import MemoryRegion
from virtq.types import Iova

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

#: One buffer of a chain: ``(iova, length)`` -- the device address of its first byte and
#: its length in bytes (1 .. 2**32 - 1).
Buffer = tuple[Iova, int]


class QueueState(enum.Enum):
    """Where a queue is in its life."""

    #: Usable.
    READY = "ready"
    #: The device broke the protocol; only inspection, ``reset()`` and ``close()`` work.
    BROKEN = "broken"
    #: Closed: the views of the region are released; nothing works any more.
    CLOSED = "closed"


@runtime_checkable
class VirtQueue(Protocol[T]):
    """A virtqueue as transports and waiters see it (ring format independent)."""

    #: Entries (descriptors) in the ring: queue *size*, not bytes.
    size: int
    #: Whether VIRTIO_F_EVENT_IDX semantics are in use.
    event_idx: bool
    #: The memory the rings live in, and the device address of its byte 0.
    region: MemoryRegion
    iova: Iova

    @property
    def desc_area(self) -> Iova:
        """Device address of the descriptor area (split: descriptor table)."""
        ...

    @property
    def driver_area(self) -> Iova:
        """Device address of the driver area (split: available ring)."""
        ...

    @property
    def device_area(self) -> Iova:
        """Device address of the device area (split: used ring)."""
        ...

    @property
    def vring_base(self) -> int:
        """Where the device starts consuming: vhost-user's SET_VRING_BASE value (split:
        the avail index of the first chain the device has not seen)."""
        ...

    def resume_index(self) -> int | None:
        """Where a new device resumes this ring when the driver keeps it as it is (a
        vhost-user back-end restarted with its inflight region, vhost-user.rst "Inflight
        I/O tracking"): vhost-user's SET_VRING_BASE value then.  Split: ``used.idx`` as
        the device last stored it -- what QEMU's front-end sends
        (``virtio_queue_restore_last_avail_idx``); the back-end adds the chains its
        inflight region still holds.  None: the ring format cannot be resumed (the
        driver resets the ring and resubmits instead)."""
        ...

    @property
    def state(self) -> QueueState:
        """``READY``, ``BROKEN`` or ``CLOSED``."""
        ...

    @property
    def broken(self) -> DeviceError | None:
        """The device error that broke the queue, or None."""
        ...

    @property
    def num_in_flight(self) -> int:
        """Chains made available (published or not) and not yet reaped."""
        ...

    def publish(self) -> bool:
        """Expose what was added; True when the device wants an available-buffer
        notification.  Raises :class:`~virtq.errors.QueueStateError` (closed) or
        :class:`~virtq.errors.QueueBrokenError`."""
        ...

    def has_used(self) -> bool:
        """True when the device has completed chains not yet reaped."""
        ...

    def drain_used(self) -> list[tuple[T, int]]:
        """Every completed chain as ``(token, used_len)``, in used order.  Raises
        :class:`~virtq.errors.DeviceProtocolError` (and breaks the queue) for an impossible
        completion; its ``completed`` holds the valid ones reaped before it."""
        ...

    def pop_used(self) -> tuple[T, int] | None:
        """The next completed chain, or None (same errors as :meth:`drain_used`)."""
        ...

    def disable_interrupts(self) -> bool:
        """Ask the device not to notify used buffers (advisory).  Returns
        :meth:`has_used`."""
        ...

    def enable_interrupts(self) -> bool:
        """Ask for used-buffer notifications.  True means completions raced in: reap
        instead of sleeping."""
        ...

    def enable_interrupts_after(self, count: int) -> bool:
        """Ask for a notification once ``count`` more chains completed (event idx; else
        :meth:`enable_interrupts`).  True means they are already there."""
        ...

    def in_flight_tokens(self) -> list[T]:
        """Tokens of the chains made available and not reaped."""
        ...

    def mark_broken(self, err: DeviceError) -> None:
        """Break the queue for a device error found above the ring (e.g. a bad reply in a
        buffer): from now on it behaves as if the ring itself had been corrupt."""
        ...

    def reset(self, start_index: int | None = None) -> list[T]:
        """Forget every chain and re-initialise the rings (only while the device does not
        use them); returns the tokens that were in flight.  Clears ``BROKEN``."""
        ...

    def close(self) -> None:
        """Release every view of the region (idempotent)."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """Driver state and ring indices as a plain dict."""
        ...

    def describe(self) -> str:
        """A human-readable dump of the driver state and the live rings."""
        ...


@runtime_checkable
class ChainTemplate(Protocol[T_contra]):
    """A request shape declared once and submitted many times.

    A template owns ``slots`` request slots.  :meth:`acquire` a free slot (the device
    driver keeps per-slot resources, e.g. a request header, indexed by it), then
    :meth:`submit` it with its buffers; the slot comes back to the free list when its
    completion is reaped (or on ``reset()``).  The queue remembers what each slot's
    descriptors hold, so submitting the same buffers again (the same tuple objects, or
    equal ones) writes no descriptor at all.
    """

    #: How many slots (chains of this shape that may be in flight at once).
    slots: int
    #: The most buffers one chain may have.
    max_buffers: int

    @property
    def num_free(self) -> int:
        """Slots :meth:`acquire` can hand out now."""
        ...

    def acquire(self) -> int:
        """A free slot, held by the caller until submitted or released.  Raises
        :class:`~virtq.errors.QueueFullError` when none is free."""
        ...

    def acquire_many(self, count: int) -> tuple[int, ...]:
        """``count`` free slots (all or none; :class:`~virtq.errors.QueueFullError`).  The
        slots freed last come first, in the order they were freed.  Submit this very tuple
        with :meth:`submit_many` and the slots need no checking again."""
        ...

    def release(self, slot: int) -> None:
        """Give back a held slot without submitting it."""
        ...

    def release_many(self, slots: Iterable[int]) -> None:
        """:meth:`release` each (all or nothing)."""
        ...

    def submit(self, slot: int, readable: Sequence[Buffer], writable: Sequence[Buffer],
               token: T_contra) -> None:
        """Make the held ``slot``'s chain available (visible after ``publish()``):
        ``readable`` buffers, then ``writable`` ones.  Raises
        :class:`~virtq.errors.ArgumentError` (bad slot or buffer),
        :class:`~virtq.errors.QueueFullError` (direct descriptors exhausted); the queue is
        unchanged then."""
        ...

    def submit_many(self, slots: Sequence[int], readables: Sequence[Sequence[Buffer]] | None,
                    writables: Sequence[Sequence[Buffer]] | None,
                    tokens: Sequence[T_contra]) -> None:
        """:meth:`submit` for each, all or nothing; ``readables``/``writables`` None repeat
        each slot's previous buffers (nothing but the avail entries is written)."""
        ...


@runtime_checkable
class DriverQueue(VirtQueue[T], Protocol[T]):
    """A :class:`VirtQueue` that takes chains of readable + writable buffers."""

    #: Whether chains may go into indirect descriptor tables (VIRTIO_F_INDIRECT_DESC).
    indirect: bool

    @property
    def num_free(self) -> int:
        """Free descriptors."""
        ...

    def add(self, readable: Sequence[Buffer], writable: Sequence[Buffer],
            token: T) -> int:
        """Add one chain (visible after ``publish()``); returns its id.  Raises
        :class:`~virtq.errors.QueueFullError` or :class:`~virtq.errors.ArgumentError`
        with the queue unchanged."""
        ...

    def add_many(self, chains: Iterable[tuple[Sequence[Buffer], Sequence[Buffer], T]]
                 ) -> int:
        """Add ``(readable, writable, token)`` chains, all or nothing; returns how many."""
        ...

    def template(self, max_buffers: int, *, slots: int | None = None,
                 typical_buffers: int | None = None) -> ChainTemplate[T]:
        """Declare a request shape of up to ``max_buffers`` buffers with ``slots`` request
        slots (default: as many as the ring can hold in flight; ``typical_buffers`` says
        how many buffers most chains have, for a ring that must place them directly)."""
        ...


__all__ = ["Buffer", "ChainTemplate", "DriverQueue", "QueueState", "VirtQueue"]
