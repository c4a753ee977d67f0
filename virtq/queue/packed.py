"""The driver side of a packed virtqueue (VIRTIO 1.2 §2.8), sans-I/O.

One ring of descriptors, written by both sides: the driver makes a chain available by
writing its descriptors at the next positions with the AVAIL/USED flag pair of its *driver
ring wrap counter* (AVAIL = counter, USED = its inverse, §2.8.1), and the device writes one
used descriptor per chain (or, with VIRTIO_F_IN_ORDER, per batch of chains) with
AVAIL = USED = its *device ring wrap counter*, in completion order, skipping as many
positions as the chain had descriptors (§2.8.2, §2.8.6).  Buffer ids name chains; they are
separate from positions, so a device may complete in any order.

:class:`PackedQueue` implements :class:`~virtq.queue.DriverQueue` exactly like
:class:`~virtq.queue.SplitQueue`: chains, batches, templates, ``publish() -> bool``, reap,
interrupt control, state, ``reset()``.  What differs is inside:

* **Publishing.**  Chains added between two ``publish()`` calls are written at once --
  every descriptor, flags included -- except the flags word of the *first* chain's first
  descriptor.  The device stops at the first descriptor that is not available (§2.8.2:
  each side polls only the next descriptor in ring order), so none of them is visible
  until ``publish()`` stores that one word after the write barrier: the packed ring's
  equivalent of the split ring's single ``avail.idx`` store (§2.8.21.1.1, the driver
  requirement "perform a suitable memory barrier before the flags update").
* **Counters.**  Positions and wrap counters are derived from unbounded descriptor counts:
  count ``s`` is position ``s % N`` in lap ``s // N``, and the wrap counter of that lap is
  ``1 ^ (s // N) & 1`` (both counters start at 1, §2.8.1).  A start position ``p`` with
  wrap ``w`` is count ``p + N * (1 - w)``.
* **Event suppression** (§2.8.10): the driver area holds the driver's structure (what it
  wants as used-buffer notifications: ENABLE, DISABLE, or with EVENT_IDX a descriptor
  position and wrap), the device area the device's (read before deciding to kick).

Trust model as for the split ring: everything the driver needs about its chains (buffer
id -> token, descriptor count, writable capacity, when it was published) is shadowed in
Python; what the device writes (a used descriptor's flags, id, len; the device event
suppression structure) passes one ingress point, :meth:`PackedQueue._reap`.  Descriptor
fields the device may overwrite (a used descriptor lands on top of an available one) are
never read back: positions are rewritten in full whenever they are reused.
"""

from __future__ import annotations

import struct
import weakref
from array import array
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Generic, NoReturn, TypeVar

from virtq._sys.fence import (
    OBSERVE_BARRIER_NEEDED,
    PUBLISH_BARRIER_NEEDED,
    full_fence,
    observe_barrier,
    publish_barrier,
)
from virtq.abi import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    PvirtqDesc,
)
from virtq.errors import (
    ArgumentError,
    DeviceError,
    DeviceProtocolError,
    LayoutError,
    QueueBrokenError,
    QueueFullError,
    QueueStateError,
)
from virtq.layout import PackedLayout
from virtq.layout.split import DESC_SIZE
from virtq.memory import MemoryRegion
from virtq.queue._splitcore import (
    _BROKEN,
    _CLOSED,
    _READY,
    _detached,
    check_u16,
    flag_names,
)
from virtq.queue._template import TemplateSlots
from virtq.queue.interface import Buffer, QueueState
from virtq.queue.split import _as_seq, _bad_buffer, _chain_entries
from virtq.types import Iova

T = TypeVar("T")

# struct pvirtq_desc (§2.8.13): addr, len, id, flags -- and without flags, for a chain's
# first descriptor whose flags are stored last.
_PACK_DESC = struct.Struct("<QIHH").pack_into
_PACK_DESC_NOFLAGS = struct.Struct("<QIH").pack_into
_U32_LIMIT = 1 << 32
_U64_LIMIT = 1 << 64
_F_NEXT = VIRTQ_DESC_F_NEXT
_F_WRITE = VIRTQ_DESC_F_WRITE
_F_INDIRECT = VIRTQ_DESC_F_INDIRECT
#: AVAIL/USED bits of an available descriptor, by driver wrap counter (§2.8.1).
_AVAIL_BITS = (VIRTQ_DESC_F_USED, VIRTQ_DESC_F_AVAIL)
_PAIR = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
#: The AVAIL/USED bits of a *used* descriptor, by device wrap counter.
_USED_BITS = (0, _PAIR)

#: Shadow state of a buffer id in flight: (token, writable capacity, ring descriptors the
#: chain occupies, the chain's number in avail order (unbounded), the free list that takes
#: ``item`` back on completion, ``item``).
_IdState = tuple[Any, int, int, int, list[int], int, int]


def _used_len(length: int, capacity: int, head_len: int) -> int:
    """The written length of a used descriptor *without* VIRTQ_DESC_F_WRITE.

    By the spec its len is then reserved and nothing was written (§2.8.3, §2.8.4), but real
    devices write data without setting WRITE: QEMU's virtio-pci devices (7.2) put the true
    length there, DPDK's vhost_blk example (22.11) leaves the head descriptor's available
    length in place.  A len within the chain's capacity that is not that left-over length
    is taken as written (QEMU; what Linux and DPDK's drivers read regardless of the flag);
    otherwise the length is unknown and the chain counts as used completely -- the
    assumption §2.8.8 makes for the chains an in-order batch skips."""
    if length <= capacity and length != head_len:
        return length
    return capacity


def _wrap(seq: int, n: int) -> int:
    """The wrap counter of descriptor count ``seq`` (1 in the first lap)."""
    return 1 ^ (seq // n) & 1


class _PackedCore(Generic[T]):
    """What every driver-side packed ring has: the views, the descriptor counters, the
    batch's first flags stored by publish(), event suppression, interrupt control, state,
    reset and teardown.  :class:`PackedQueue` (chains) and :class:`PackedSlotQueue` (fixed
    slots) add how descriptors are placed and how used ones are reaped."""

    # Instance attributes stay below 30: CPython 3.11 shares instance-dict keys only up to
    # 29, and every attribute load of the hot paths gets slower past that.
    def __init__(
        self,
        region: MemoryRegion,
        layout: PackedLayout,
        *,
        iova: Iova,
        event_idx: bool = False,
        in_order: bool = False,
        start_index: int = 1 << 15,
        strict_len: bool = True,
    ) -> None:
        if not isinstance(layout, PackedLayout):
            raise ArgumentError("layout", layout, "must be a PackedLayout")
        if not isinstance(region, MemoryRegion):
            raise ArgumentError("region", region, "must be a MemoryRegion")
        if region.nbytes < layout.nbytes:
            raise LayoutError("layout.nbytes", layout.nbytes,
                              f"exceeds the region's {region.nbytes} bytes")
        if (iova.__class__ is not int and not isinstance(iova, int)) \
                or not 0 <= iova <= _U64_LIMIT - layout.nbytes:
            raise ArgumentError("iova", iova, "must be a u64 with room for the layout")
        n = layout.queue_size
        self._check_start(start_index, n)  # validated before anything is built
        self.region = region
        self.layout = layout
        self.size = n
        self.event_idx = bool(event_idx)
        self.in_order = bool(in_order)
        self.strict_len = bool(strict_len)
        self.iova = Iova(int(iova))
        self._state_v = _READY
        self._broken: tuple[Any, DeviceError] | None = None
        self._mem = region.view(0, layout.nbytes)
        desc = self._mem[layout.desc : layout.desc + DESC_SIZE * n]
        self._desc_mem = desc
        self._desc_h = desc.cast("H")  # descriptor p: id at [8p + 6], flags at [8p + 7]
        self._desc_w = desc.cast("I")  # descriptor p: len at [4p + 2]
        self._drv_ev = self._mem[layout.driver_event : layout.driver_event + 4].cast("H")
        self._dev_ev = self._mem[layout.device_event : layout.device_event + 4].cast("H")

    @staticmethod
    def _check_start(start_index: object, n: int) -> int:
        value = check_u16("start_index", start_index)
        pos, wrap = value & 0x7FFF, value >> 15
        if pos >= n:
            raise ArgumentError("start_index", start_index,
                                f"position {pos} is outside the {n}-entry ring")
        return pos + n * (1 - wrap)

    def _reset_ring(self, start: int) -> None:
        """Zero the ring (§2.8.13: "The descriptor ring is zero-initialized") and the
        suppression structures; every counter at descriptor count ``start``."""
        self._desc_mem[:] = bytes(len(self._desc_mem))
        self._drv_ev[0] = self._drv_ev[1] = 0  # ENABLE: notify every used buffer
        self._dev_ev[0] = self._dev_ev[1] = 0
        self._avail_dseq = self._pub_dseq = self._used_dseq = start  # descriptors
        # The first descriptor of the chains added since the last publish(): (its offset
        # in the ring's u16 view of flags, the flags to store), or None.
        self._pending: tuple[int, int] | None = None
        # VIRTIO_F_IN_ORDER: a batch a limited reap (pop_used, reap(limit)) stopped inside,
        # as (what names its last chain, the length its used descriptor reported): the
        # rest of it is handed out without reading the ring.  None otherwise.
        self._batch: tuple[int, int] | None = None
        self._forget()

    def _forget(self) -> None:
        """Drop the shadow state of every chain (subclass hook, called by _reset_ring)."""
        raise NotImplementedError

    # -- ring areas ---------------------------------------------------------------------------

    @property
    def desc_area(self) -> Iova:
        """Device address of the descriptor ring (§2.6: descriptor area)."""
        return Iova(self.iova + self.layout.desc)

    @property
    def driver_area(self) -> Iova:
        """Device address of the driver event suppression structure (§2.8.10)."""
        return Iova(self.iova + self.layout.driver_event)

    @property
    def device_area(self) -> Iova:
        """Device address of the device event suppression structure (§2.8.10)."""
        return Iova(self.iova + self.layout.device_event)

    @property
    def vring_base(self) -> int:
        """vhost-user SET_VRING_BASE for a packed ring: the next available position and
        the driver wrap counter in bits 0-15, the next used position and the device wrap
        counter in bits 16-31 (QEMU ``virtio_queue_packed_set_last_avail_idx``)."""
        n = self.size
        avail = self._avail_dseq % n | _wrap(self._avail_dseq, n) << 15
        used = self._used_dseq % n | _wrap(self._used_dseq, n) << 15
        return avail | used << 16

    def resume_index(self) -> int | None:
        """None: a packed ring is not resumed in place here.  Its device-side position
        (QEMU's ``used_idx`` and wrap counter) is not in shared memory in one place, and
        no back-end on this machine resumes packed rings from an inflight region; the
        driver resets the ring and resubmits instead.  Raises :class:`QueueStateError`
        when closed."""
        if self._state_v is _CLOSED:
            raise QueueStateError("queue is closed")
        return None

    # -- state ----------------------------------------------------------------------------

    @property
    def state(self) -> QueueState:
        return self._state_v

    @property
    def closed(self) -> bool:
        return self._state_v is _CLOSED

    @property
    def broken(self) -> DeviceError | None:
        """The device error that broke the queue, or None."""
        if self._state_v is not _BROKEN or self._broken is None:
            return None
        ref, copy = self._broken
        original: DeviceError | None = ref()
        return original if original is not None else copy

    def _refuse(self) -> NoReturn:
        if self._state_v is _CLOSED:
            raise QueueStateError("queue is closed")
        cause = self.broken
        assert cause is not None
        raise QueueBrokenError(cause) from cause

    def _break(self, err: DeviceError) -> None:
        self._broken = (weakref.ref(err), _detached(err))
        self._state_v = _BROKEN

    def _fail(self, err: DeviceProtocolError, completed: list[tuple[T, int]]) -> NoReturn:
        """A device-written value is impossible: break the queue and raise (see
        SplitQueue._fail: the valid completions before it travel on the error)."""
        err.completed = completed  # type: ignore[assignment]
        self._break(err)
        try:
            raise err
        finally:
            del err  # no error -> traceback -> frame -> error cycle

    def mark_broken(self, err: DeviceError) -> None:
        """Break the queue for a device error found above the ring (see
        :meth:`SplitQueue.mark_broken`)."""
        if not isinstance(err, DeviceError):
            raise ArgumentError("err", err, "must be a DeviceError")
        if self._state_v is _CLOSED:
            raise QueueStateError("queue is closed")
        if self._state_v is _READY:
            self._break(err)

    # -- publishing -------------------------------------------------------------------------

    def publish(self) -> bool:
        """Expose every added chain with one store: the first one's flags, after the write
        barrier (§2.8.21.1.1).  Returns whether the device wants an available-buffer
        notification (§2.8.10 device event suppression: ENABLE, DISABLE, or with event idx
        the descriptor position and wrap it waits for); False when nothing was added."""
        if self._state_v is not _READY:
            self._refuse()
        pending = self._pending
        if pending is None:
            return False
        new = self._avail_dseq
        old = self._pub_dseq
        if PUBLISH_BARRIER_NEEDED:
            publish_barrier()
        self._desc_h[pending[0]] = pending[1]
        self._pending = None
        self._pub_dseq = new
        self._published()
        # The decision reads what the device wrote: only after the flags store is visible
        # (§2.8.21.3.1 "a suitable memory barrier before reading the Event Suppression
        # structure").
        full_fence()
        flags = self._dev_ev[1] & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True  # ENABLE (and the reserved value: notify rather than stall)
        return self._event_between(self._dev_ev[0], old, new)

    def _event_between(self, off_wrap: int, old: int, new: int) -> bool:
        """Whether descriptor (off_wrap: position | wrap << 15) is among counts
        old .. new - 1 -- the packed ring's vring_need_event (Linux
        ``virtqueue_kick_prepare_packed``).  A (position, wrap) pair repeats every 2N
        counts; the window is at most N long."""
        n = self.size
        pos, wrap = off_wrap & 0x7FFF, off_wrap >> 15
        residue = pos + n * (1 - wrap)
        period = 2 * n
        event = new - 1 - ((new - 1 - residue) % period)
        return event >= old

    # -- reaping --------------------------------------------------------------------------------

    def has_used(self) -> bool:
        """True when the device has written a used descriptor not yet reaped."""
        if self._batch is not None:
            return True  # an in-order batch a limited reap stopped inside
        seq = self._used_dseq
        if seq == self._pub_dseq:
            return False
        n = self.size
        flags = self._desc_h[(seq % n) * 8 + 7]
        return flags & _PAIR == _USED_BITS[1 ^ (seq // n) & 1]  # _wrap(seq, n), inlined

    def _fail_here(self, seq: int, out: list[tuple[T, int]], part: str, value: int,
                   expected: str) -> NoReturn:
        """The used descriptor at count ``seq`` is impossible: the driver's used position
        stops there, and the queue breaks."""
        self._used_dseq = seq
        self._fail(DeviceProtocolError(f"desc[{seq % self.size}].{part}", value, expected),
                   out)

    # -- interrupt (used-buffer notification) control ---------------------------------------

    def _set_driver_event(self, seq: int | None) -> None:
        """Driver event suppression (§2.8.10): with event idx, wake me when the device
        writes a used descriptor at count ``seq``; else enable (``seq`` given) or disable
        (None)."""
        drv = self._drv_ev
        if seq is None:
            drv[1] = RING_EVENT_FLAGS_DISABLE
        elif self.event_idx:
            n = self.size
            drv[0] = seq % n | _wrap(seq, n) << 15
            # off_wrap before flags: a device that sees DESC must see the new position
            # (Linux's virtio_wmb in virtqueue_enable_cb_prepare_packed).
            if PUBLISH_BARRIER_NEEDED:
                publish_barrier()
            drv[1] = RING_EVENT_FLAGS_DESC
        else:
            drv[1] = RING_EVENT_FLAGS_ENABLE

    def disable_interrupts(self) -> bool:
        """Ask the device not to send used-buffer notifications; returns :meth:`has_used`."""
        if self._state_v is not _READY:
            self._refuse()
        self._set_driver_event(None)
        return self.has_used()

    def enable_interrupts(self) -> bool:
        """Ask for a notification at the next used descriptor; True when one is already
        there (reap instead of sleeping: the store must be visible before the re-check,
        hence the full fence)."""
        if self._state_v is not _READY:
            self._refuse()
        self._set_driver_event(self._used_dseq)
        full_fence()
        return self.has_used()

    def enable_interrupts_after(self, count: int) -> bool:
        """Ask for a notification once about ``count`` more chains completed (event idx:
        the position their used descriptors will have reached, estimated with the average
        chain length in flight); without event idx this is :meth:`enable_interrupts`.
        True when one is already there.  Raises :class:`ArgumentError` for a count that
        is not an int >= 0."""
        if (count.__class__ is not int or count < 0) and (
                not isinstance(count, int) or count < 0):
            raise ArgumentError("count", count, "must be an int >= 0")
        if not self.event_idx:
            return self.enable_interrupts()
        if self._state_v is not _READY:
            self._refuse()
        chains = self._published_chains()
        descs = self._pub_dseq - self._used_dseq
        count = max(1, min(count, chains))
        target = self._used_dseq + ((count - 1) * descs) // max(chains, 1)
        self._set_driver_event(target)
        full_fence()
        return self.has_used()

    def enable_interrupts_delayed(self) -> bool:
        """:meth:`enable_interrupts_after` about 3/4 of the chains in flight."""
        return self.enable_interrupts_after(self._published_chains() * 3 // 4 + 1)

    def _published(self) -> None:
        """publish() exposed everything added (subclass hook for chain counts)."""

    def _published_chains(self) -> int:
        """Chains published and not yet reaped (one descriptor each, unless overridden)."""
        return self._pub_dseq - self._used_dseq

    # -- reset and teardown ------------------------------------------------------------------

    def reset(self, start_index: int | None = None) -> list[T]:
        """Forget every chain, zero the ring and restart at ``start_index``
        (``position | wrap << 15``; default: the next available position), returning the
        tokens that were in flight in the order they were added.  Clears a break.  Raises
        :class:`QueueStateError` when closed, :class:`ArgumentError` for a bad start."""
        if self._state_v is _CLOSED:
            raise QueueStateError("queue is closed")
        n = self.size
        if start_index is None:
            start = self._avail_dseq % n + n * (1 - _wrap(self._avail_dseq, n))
        else:
            start = self._check_start(start_index, n)
        lost = self.in_flight_tokens()
        self._reset_ring(start)
        self._broken = None
        self._state_v = _READY
        self._rebuild()
        return lost

    def in_flight_tokens(self) -> list[T]:
        raise NotImplementedError

    def _rebuild(self) -> None:
        """Rewrite what the queue keeps across a reset (subclass hook)."""

    def close(self) -> None:
        """Release the views of the region (idempotent)."""
        if self._state_v is _CLOSED:
            return
        for view in (self._desc_h, self._desc_w, self._drv_ev, self._dev_ev,
                     self._desc_mem):
            view.release()
        self._mem.release()
        self._state_v = _CLOSED
        self._broken = None

    def __enter__(self) -> _PackedCore[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inspection -------------------------------------------------------------------------

    def _snapshot_extra(self) -> dict[str, Any]:
        return {}

    def snapshot(self) -> dict[str, Any]:
        """Driver state, counters and the suppression words as a plain dict."""
        n = self.size
        closed = self._state_v is _CLOSED
        broken = self.broken
        snap: dict[str, Any] = {
            "format": "packed",
            "size": n,
            "state": self._state_v.value,
            "next_avail": self._avail_dseq % n,
            "avail_wrap": _wrap(self._avail_dseq, n),
            "published": self._pub_dseq % n,
            "next_used": self._used_dseq % n,
            "used_wrap": _wrap(self._used_dseq, n),
            "num_free": self.num_free,
            "num_in_flight": self.num_in_flight,
            "event_idx": self.event_idx,
            "in_order": self.in_order,
            "broken": None if broken is None else str(broken),
            "closed": closed,
            "desc_area": self.desc_area,
            "driver_area": self.driver_area,
            "device_area": self.device_area,
            "driver_event": None if closed else (self._drv_ev[0], self._drv_ev[1]),
            "device_event": None if closed else (self._dev_ev[0], self._dev_ev[1]),
        }
        snap.update(self._snapshot_extra())
        return snap

    @property
    def num_free(self) -> int:
        raise NotImplementedError

    @property
    def num_in_flight(self) -> int:
        """Slots (one descriptor each) made available and not yet reaped."""
        return self._avail_dseq - self._used_dseq

    def describe(self) -> str:
        """A human-readable dump of the driver state and the live ring."""
        snap = self.snapshot()
        lines = [
            f"{type(self).__name__} size={self.size} desc@{self.desc_area:#x} "
            f"driver@{self.driver_area:#x} device@{self.device_area:#x} "
            f"event_idx={self.event_idx} in_order={self.in_order} state={snap['state']}",
            f"  driver: next_avail={snap['next_avail']} wrap={snap['avail_wrap']} "
            f"next_used={snap['next_used']} wrap={snap['used_wrap']} "
            f"in_flight={snap['num_in_flight']} broken={snap['broken']}",
        ]
        if self._state_v is _CLOSED:
            lines.append("  (closed)")
            return "\n".join(lines)
        lines.append(f"  driver event: off_wrap={self._drv_ev[0]:#06x} "
                     f"flags={self._drv_ev[1]}; device event: off_wrap={self._dev_ev[0]:#06x} "
                     f"flags={self._dev_ev[1]}")
        ring = (PvirtqDesc * self.size).from_buffer(self._desc_mem)
        try:
            for k in range(min(self._avail_dseq - self._used_dseq, self.size)):
                pos = (self._used_dseq + k) % self.size
                d = ring[pos]
                lines.append(f"  desc[{pos}] addr={d.addr:#x} len={d.len} id={d.id} "
                             f"flags={flag_names(d.flags & 7)}"
                             f"{' AVAIL' if d.flags & VIRTQ_DESC_F_AVAIL else ''}"
                             f"{' USED' if d.flags & VIRTQ_DESC_F_USED else ''}")
        finally:
            del ring
        return "\n".join(lines)


class PackedQueue(_PackedCore[T]):
    """A packed virtqueue, driver side; tokens of type ``T`` come back with completions.

    ``iova`` is the device address of the region's byte 0.  ``start_index`` is where the
    ring starts: ``position | wrap_counter << 15`` (vhost-user's SET_VRING_BASE form for
    a packed ring, both counters equal; default position 0 with wrap counter 1).  With
    ``indirect=True`` chains of more than one buffer go into the per-id indirect tables
    ``layout`` reserves (``PackedLayout.compute(..., indirect_size=K)``).  ``in_order``
    (VIRTIO_F_IN_ORDER): the device may retire a batch of chains with one used descriptor
    naming the last one (§2.8.8).
    """

    def __init__(
        self,
        region: MemoryRegion,
        layout: PackedLayout,
        *,
        iova: Iova,
        event_idx: bool = False,
        indirect: bool = False,
        in_order: bool = False,
        start_index: int = 1 << 15,
        strict_len: bool = True,
    ) -> None:
        if indirect and isinstance(layout, PackedLayout) and not layout.indirect_size:
            raise LayoutError("indirect", indirect, "needs a layout with indirect tables: "
                              "PackedLayout.compute(..., indirect_size=K)")
        super().__init__(region, layout, iova=iova, event_idx=event_idx, in_order=in_order,
                         start_index=start_index, strict_len=strict_len)
        self.indirect = bool(indirect)
        self._templates: list[PackedTemplate[T]] = []
        self._reset_ring(self._check_start(start_index, self.size))

    @property
    def num_in_flight(self) -> int:
        """Chains added and not yet reaped (published or not)."""
        return self._avail_cseq - self._used_cseq

    def _published(self) -> None:
        self._pub_cseq = self._avail_cseq

    def _published_chains(self) -> int:
        return self._pub_cseq - self._used_cseq

    def _forget(self) -> None:
        n = self.size
        self._avail_cseq = self._pub_cseq = self._used_cseq = 0  # chains
        # Buffer ids: a stack of free ones; templates keep theirs.
        reserved = {i for tpl in self._templates for i in tpl._ids}
        self._free_ids = [i for i in range(n - 1, -1, -1) if i not in reserved]
        self._state: list[_IdState | None] = [None] * n
        # With IN_ORDER: the ids in flight in avail order (a batch retires a prefix).
        self._order: deque[int] = deque()

    def _rebuild(self) -> None:
        for tpl in self._templates:
            tpl._rebuild()

    def _snapshot_extra(self) -> dict[str, Any]:
        return {"indirect": self.indirect,
                "in_flight_ids": [i for i, st in enumerate(self._state) if st is not None],
                "templates": [t.describe() for t in self._templates]}

    @property
    def num_free(self) -> int:
        """Free ring positions (a direct chain of k buffers needs k, an indirect one 1)."""
        return self.size - (self._avail_dseq - self._used_dseq)

    def in_flight_tokens(self) -> list[T]:
        """Tokens of the chains added and not reaped, in the order they were added."""
        live = [st for st in self._state if st is not None]
        live.sort(key=lambda st: st[3])
        return [st[0] for st in live]

    # -- adding chains --------------------------------------------------------------------------

    def add(self, readable: Sequence[Buffer], writable: Sequence[Buffer],
            token: T = None) -> int:  # type: ignore[assignment]
        """Add one chain of ``readable`` then ``writable`` buffers (§2.8.5: device-writable
        after device-readable); returns its buffer id.  Visible to the device after
        :meth:`publish`.  Raises :class:`QueueFullError` (positions or ids exhausted) and
        :class:`ArgumentError` with the queue unchanged."""
        if self._state_v is not _READY:
            self._refuse()
        try:
            nr = len(readable)
            n = nr + len(writable)
        except TypeError:
            readable = _as_seq(readable, "readable")
            writable = _as_seq(writable, "writable")
            nr = len(readable)
            n = nr + len(writable)
        if n == 0:
            raise ArgumentError("buffers", 0, "a chain needs at least one buffer")
        free_ids = self._free_ids
        if not free_ids:
            raise QueueFullError(1, 0, "buffer ids")
        buffer_id = free_ids[-1]
        if n == 1:
            # Fast path: one buffer of plain ints in range is one descriptor, written here
            # as _place and _commit would (anything else takes the checked path below).
            try:
                iova, length = readable[0] if nr else writable[0]
                ok = (iova.__class__ is int and length.__class__ is int
                      and 0 <= iova < _U64_LIMIT and 0 < length < _U32_LIMIT)
            except (TypeError, ValueError, IndexError, KeyError):
                ok = False
            if ok:
                seq = self._avail_dseq
                size = self.size
                room = size - (seq - self._used_dseq)
                if room < 1:
                    raise QueueFullError(1, room, "ring positions")
                pos = seq % size
                bits = _AVAIL_BITS[1 ^ (seq // size) & 1]
                if not nr:
                    bits |= _F_WRITE
                if self._pending is None:
                    _PACK_DESC_NOFLAGS(self._desc_mem, pos << 4, iova, length, buffer_id)
                    self._pending = (pos * 8 + 7, bits)  # stored by publish()
                else:
                    _PACK_DESC(self._desc_mem, pos << 4, iova, length, buffer_id, bits)
                self._avail_dseq = seq + 1
                free_ids.pop()
                self._state[buffer_id] = (token, 0 if nr else length, 1, self._avail_cseq,
                                          free_ids, buffer_id, length)
                self._avail_cseq += 1
                if self.in_order:
                    self._order.append(buffer_id)
                return buffer_id
        entries, capacity = _chain_entries(readable, writable, nr, n)
        if self.indirect and n > 1:
            if n > self.layout.indirect_size:
                raise ArgumentError("buffers", n, f"chain longer than the "
                                    f"{self.layout.indirect_size}-entry indirect table")
            table = self.layout.indirect_table(buffer_id)
            # The table is the free id's own: nobody reads it until the chain is published.
            self._write_table(table, entries)
            self._place([(self.iova + table, DESC_SIZE * n, _F_INDIRECT)], buffer_id)
            ndesc = 1
            head_len = DESC_SIZE * n
        else:
            self._place(entries, buffer_id)
            ndesc = n
            head_len = entries[0][1]
        free_ids.pop()
        self._commit(buffer_id, token, capacity, ndesc, free_ids, buffer_id, head_len)
        return buffer_id

    def _write_table(self, offset: int, entries: list[tuple[int, int, int]]) -> None:
        """An indirect table: entries 0 .. k-1 in order; only WRITE is valid inside
        (§2.8.7: "The VIRTQ_DESC_F_WRITE flags bit is the only valid flag"), and ids are
        reserved."""
        mem = self._mem
        for k, (addr, length, flags) in enumerate(entries):
            _PACK_DESC(mem, offset + (k << 4), addr, length, 0, flags & _F_WRITE)

    def _place(self, entries: list[tuple[int, int, int]], buffer_id: int) -> None:
        """Write ``entries`` (addr, len, WRITE|NEXT flags) at the next ring positions with
        the AVAIL/USED bits of each position's lap and the buffer id (§2.8.6: in the last
        descriptor; written in all).  The first descriptor's flags wait for publish() when
        it opens a batch; the others are written now, invisible behind it.  Raises
        QueueFullError before writing anything."""
        k = len(entries)
        n = self.size
        seq = self._avail_dseq
        if k > n - (seq - self._used_dseq):
            raise QueueFullError(k, n - (seq - self._used_dseq), "ring positions")
        desc = self._desc_mem
        pos = seq % n
        lap_bits = _AVAIL_BITS[1 ^ (seq // n) & 1]  # _wrap(seq, n), inlined
        first_flags = -1
        for i, (addr, length, flags) in enumerate(entries):
            f = flags | lap_bits
            if i == 0 and self._pending is None:
                _PACK_DESC_NOFLAGS(desc, pos << 4, addr, length, buffer_id)
                first_flags = f
            else:
                _PACK_DESC(desc, pos << 4, addr, length, buffer_id, f)
            pos += 1
            if pos == n:
                pos = 0
                lap_bits = _AVAIL_BITS[_wrap(seq + i + 1, n)]
        if first_flags >= 0:
            self._pending = ((seq % n) * 8 + 7, first_flags)
        self._avail_dseq = seq + k

    def _commit(self, buffer_id: int, token: T, capacity: int, ndesc: int,
                home: list[int], item: int, head_len: int) -> None:
        # head_len: the length the chain's first ring descriptor was made available with,
        # to tell a used length the device wrote from one it left in place (_used_len).
        self._state[buffer_id] = (token, capacity, ndesc, self._avail_cseq, home, item,
                                  head_len)
        self._avail_cseq += 1
        if self.in_order:
            self._order.append(buffer_id)

    def add_many(self, chains: Iterable[tuple[Sequence[Buffer], Sequence[Buffer], T]]) -> int:
        """Add ``(readable, writable, token)`` chains, all or nothing; returns how many.
        Raises :class:`ArgumentError` for something that is not such triples, and what
        :meth:`add` raises."""
        if self._state_v is not _READY:
            self._refuse()
        if not isinstance(chains, list | tuple):
            try:
                chains = list(chains)
            except TypeError:
                raise ArgumentError("chains", chains, "must be an iterable of "
                                    "(readable, writable, token)") from None
        return self._add_chains(chains)

    def _add_each(self, chains: Sequence[tuple[Sequence[Buffer], Sequence[Buffer], T]]) -> int:
        """:meth:`add` for each chain, all or nothing (the reference for _add_chains)."""
        mark = self._mark()
        try:
            for chain in chains:
                try:
                    readable, writable, token = chain
                except (TypeError, ValueError):
                    raise ArgumentError("chains", chain, "must be (readable, writable, "
                                        "token) triples of sequences") from None
                self.add(readable, writable, token)
        except BaseException:
            for home, item in self._rollback(mark):
                home.append(item)  # the buffer ids are free again
            raise
        return len(chains)

    def _add_chains(self, chains: Sequence[tuple[Sequence[Buffer], Sequence[Buffer], T]]
                    ) -> int:
        """:meth:`add` for each chain, all or nothing, in one loop: what add() ->
        _chain_entries() -> _place() / _write_table() -> _commit() do per chain, without
        their calls and the entry lists between them (on CPython a call costs as much as
        the descriptor it writes).  Every buffer is checked as there, before the chain
        counts; on any error the batch is undone from the shadow state (_rollback)."""
        size = self.size
        desc = self._desc_mem
        mem = self._mem
        states = self._state
        free_ids = self._free_ids
        indirect = self.indirect
        isize = self.layout.indirect_size
        in_order = self.in_order
        order = self._order
        pack = _PACK_DESC
        buf: object = None
        mark = self._mark()
        seq = self._avail_dseq
        cseq = self._avail_cseq
        # The device only frees positions when the driver reaps: none free up meanwhile.
        limit = self._used_dseq + size
        # The counters live in these locals until the batch is done (stored once, or
        # before the rollback of a failed batch, which reads them).
        try:
            for readable, writable, token in chains:
                try:
                    nr = len(readable)
                    n = nr + len(writable)
                except TypeError:
                    readable = _as_seq(readable, "readable")  # noqa: PLW2901 - as add()
                    writable = _as_seq(writable, "writable")  # noqa: PLW2901
                    nr = len(readable)
                    n = nr + len(writable)
                if n == 0:
                    raise ArgumentError("buffers", 0, "a chain needs at least one buffer")
                if not free_ids:
                    raise QueueFullError(1, 0, "buffer ids")
                buffer_id = free_ids[-1]
                if n == 1:
                    # One buffer of plain ints in range: one descriptor, as add()'s fast
                    # path writes it (anything else takes the checked path below).
                    try:
                        buf = readable[0] if nr else writable[0]
                        iova, length = buf
                        ok = (iova.__class__ is int and length.__class__ is int
                              and 0 <= iova < _U64_LIMIT and 0 < length < _U32_LIMIT)
                    except (TypeError, ValueError, IndexError, KeyError):
                        ok = False
                    if ok:
                        room = limit - seq
                        if room < 1:
                            raise QueueFullError(1, room, "ring positions")
                        pos = seq % size
                        bits = _AVAIL_BITS[1 ^ (seq // size) & 1]
                        if not nr:
                            bits |= _F_WRITE
                        if self._pending is None:
                            _PACK_DESC_NOFLAGS(desc, pos << 4, iova, length, buffer_id)
                            self._pending = (pos * 8 + 7, bits)  # stored by publish()
                        else:
                            pack(desc, pos << 4, iova, length, buffer_id, bits)
                        seq += 1
                        free_ids.pop()
                        states[buffer_id] = (token, 0 if nr else length, 1, cseq, free_ids,
                                             buffer_id, length)
                        cseq += 1
                        if in_order:
                            order.append(buffer_id)
                        continue
                ind = indirect and n > 1
                # Every buffer checked before anything is written (as _chain_entries
                # does): a chain that fails leaves no descriptor behind.
                total = 0
                for buf in readable:
                    iova, length = buf
                    if (iova.__class__ is not int or length.__class__ is not int) and not (
                            isinstance(iova, int) and isinstance(length, int)):
                        raise TypeError
                    if not (0 < length < _U32_LIMIT and 0 <= iova < _U64_LIMIT):
                        raise ValueError
                    total += length
                capacity = 0
                for buf in writable:
                    iova, length = buf
                    if (iova.__class__ is not int or length.__class__ is not int) and not (
                            isinstance(iova, int) and isinstance(length, int)):
                        raise TypeError
                    if not (0 < length < _U32_LIMIT and 0 <= iova < _U64_LIMIT):
                        raise ValueError
                    capacity += length
                if total + capacity >= _U32_LIMIT:
                    raise ArgumentError("buffers", total + capacity,
                                        "a chain's total length must be < 2**32")
                if ind and n > isize:
                    raise ArgumentError("buffers", n, f"chain longer than the {isize}-entry "
                                        "indirect table")
                ndesc = 1 if ind else n
                room = limit - seq
                pos = seq % size
                lap = _AVAIL_BITS[1 ^ (seq // size) & 1]  # _wrap(seq, size), inlined
                if ind:
                    # The id's own table: entries in order, only WRITE valid inside (§2.8.7).
                    table = self.layout.indirect_table(buffer_id)
                    off: int = table
                    for iova, length in readable:
                        pack(mem, off, iova, length, 0, 0)
                        off += DESC_SIZE
                    for iova, length in writable:
                        pack(mem, off, iova, length, 0, _F_WRITE)
                        off += DESC_SIZE
                    if room < 1:
                        raise QueueFullError(1, room, "ring positions")
                    head_len = DESC_SIZE * n
                    if self._pending is None:
                        _PACK_DESC_NOFLAGS(desc, pos << 4, self.iova + table, head_len,
                                           buffer_id)
                        self._pending = (pos * 8 + 7, lap | _F_INDIRECT)  # publish() stores
                    else:
                        pack(desc, pos << 4, self.iova + table, head_len, buffer_id,
                             lap | _F_INDIRECT)
                else:
                    if n > room:
                        raise QueueFullError(n, room, "ring positions")
                    # Positions seq .. seq + n - 1, each with its lap's AVAIL/USED bits and
                    # the buffer id (§2.8.6); a batch's first flags wait for publish().
                    # Readable and writable buffers in two loops on purpose: one loop over
                    # ((readable, 0), (writable, WRITE)) measured 6-8 % slower per
                    # 3-descriptor chain (bench_ring, packed, 2026-11-30).
                    last = n - 1
                    i = 0
                    head_len = -1
                    for iova, length in readable:
                        f = (_F_NEXT if i < last else 0) | lap
                        if i == 0:
                            head_len = length
                            if self._pending is None:
                                _PACK_DESC_NOFLAGS(desc, pos << 4, iova, length, buffer_id)
                                self._pending = (pos * 8 + 7, f)
                            else:
                                pack(desc, pos << 4, iova, length, buffer_id, f)
                        else:
                            pack(desc, pos << 4, iova, length, buffer_id, f)
                        i += 1
                        pos += 1
                        if pos == size:
                            pos = 0
                            lap = _AVAIL_BITS[_wrap(seq + i, size)]
                    for iova, length in writable:
                        f = (_F_WRITE | _F_NEXT if i < last else _F_WRITE) | lap
                        if i == 0:
                            head_len = length
                            if self._pending is None:
                                _PACK_DESC_NOFLAGS(desc, pos << 4, iova, length, buffer_id)
                                self._pending = (pos * 8 + 7, f)
                            else:
                                pack(desc, pos << 4, iova, length, buffer_id, f)
                        else:
                            pack(desc, pos << 4, iova, length, buffer_id, f)
                        i += 1
                        pos += 1
                        if pos == size:
                            pos = 0
                            lap = _AVAIL_BITS[_wrap(seq + i, size)]
                seq += ndesc
                free_ids.pop()
                states[buffer_id] = (token, capacity, ndesc, cseq, free_ids, buffer_id,
                                     head_len)
                cseq += 1
                if in_order:
                    order.append(buffer_id)
        except BaseException as exc:
            self._avail_dseq, self._avail_cseq = seq, cseq  # the chains done, to undo
            for home, item in self._rollback(mark):
                home.append(item)  # the buffer ids are free again
            if isinstance(exc, ArgumentError | QueueFullError) or not isinstance(
                    exc, TypeError | ValueError | OverflowError | struct.error):
                raise
            _bad_buffer(buf)
        self._avail_dseq, self._avail_cseq = seq, cseq
        return len(chains)

    def _mark(self) -> tuple[int, int, tuple[int, int] | None, int]:
        return (self._avail_dseq, self._avail_cseq, self._pending, len(self._order))

    def _rollback(self, mark: tuple[int, int, tuple[int, int] | None, int]
                  ) -> list[tuple[list[int], int]]:
        """Undo unpublished adds since ``mark``, from the shadow state alone; returns the
        (free list, item) of each undone chain for the caller to hand back (or keep).

        The positions written since are made unavailable again: a later batch may start
        before them and expose them with its first flags store, and a stale AVAIL bit
        there would hand the device a half-written chain.  AVAIL = USED = the other lap's
        counter is "not available" to the device (§2.8.1)."""
        dseq, cseq, pending, norder = mark
        undone: list[tuple[list[int], int]] = []
        for buffer_id, st in enumerate(self._state):
            if st is not None and st[3] >= cseq:
                self._state[buffer_id] = None
                undone.append((st[4], st[5]))
        while len(self._order) > norder:
            self._order.pop()
        n = self.size
        for seq in range(dseq, self._avail_dseq):
            self._desc_h[(seq % n) * 8 + 7] = _USED_BITS[1 - _wrap(seq, n)]
        self._avail_dseq, self._avail_cseq, self._pending = dseq, cseq, pending
        return undone

    # -- templates ---------------------------------------------------------------------------

    def template(self, max_buffers: int, *, slots: int | None = None,
                 typical_buffers: int | None = None) -> PackedTemplate[T]:
        """Declare a request shape of up to ``max_buffers`` buffers (see
        :class:`~virtq.queue.ChainTemplate`).  Each slot keeps a buffer id for good; with
        indirect descriptors it also keeps that id's indirect table, so a repeated shape
        writes only its one ring descriptor per submission.  ``slots`` defaults to the free
        ids (indirect, or one-buffer shapes) or the ring size divided by
        ``typical_buffers`` (direct chains).  Raises :class:`ArgumentError`,
        :class:`QueueFullError`."""
        if self._state_v is not _READY:
            self._refuse()
        if not isinstance(max_buffers, int) or max_buffers < 1:
            raise ArgumentError("max_buffers", max_buffers, "must be an int >= 1")
        indirect = max_buffers > 1 and self.indirect and max_buffers <= self.layout.indirect_size
        if not indirect and max_buffers > self.size:
            raise ArgumentError("max_buffers", max_buffers,
                                f"a direct chain cannot exceed the queue size {self.size}")
        if typical_buffers is not None and (
                not isinstance(typical_buffers, int) or not 1 <= typical_buffers <= max_buffers):
            raise ArgumentError("typical_buffers", typical_buffers,
                                f"must be an int in 1..max_buffers ({max_buffers})")
        free = len(self._free_ids)
        if slots is None:
            per = 1 if indirect or max_buffers == 1 else (typical_buffers or max_buffers)
            slots = min(free, self.size // per)
        if not isinstance(slots, int) or slots < 1:
            raise ArgumentError("slots", slots, "must be an int >= 1")
        if slots > free:
            raise QueueFullError(slots, free, "buffer ids")
        tpl = PackedTemplate(self, max_buffers, slots, indirect)
        self._templates.append(tpl)
        return tpl

    # -- reaping --------------------------------------------------------------------------------

    def pop_used(self) -> tuple[T, int] | None:
        """The next completed chain as ``(token, used_len)``, or None (see
        :meth:`drain_used`)."""
        if self._state_v is not _READY:
            self._refuse()
        got = self._reap(1)
        return got[0] if got else None

    def drain_used(self) -> list[tuple[T, int]]:
        """Every completed chain as ``(token, used_len)``, in the order the device wrote
        them.  Raises :class:`~virtq.errors.DeviceProtocolError` for an impossible used
        descriptor (the queue is then broken; ``completed`` holds the valid ones)."""
        if self._state_v is not _READY:
            self._refuse()
        return self._reap(-1)

    def _reap(self, limit: int) -> list[tuple[T, int]]:
        """The single ingress point for what the device writes into the ring: here with
        VIRTIO_F_IN_ORDER (a used descriptor may retire a batch, §2.8.8), else
        :meth:`_reap_any_order`."""
        if not self.in_order:
            return self._reap_any_order(limit)
        out: list[tuple[T, int]] = []
        n = self.size
        desc_h = self._desc_h
        desc_w = self._desc_w
        states = self._state
        pub = self._pub_dseq
        pub_cseq = self._pub_cseq
        strict = self.strict_len
        seq = self._used_dseq
        if self._batch is not None:
            last_id, length = self._batch
            seq, limit = self._retire_batch(seq, last_id, length, out, limit)
        while seq != pub and limit and self._batch is None:
            pos = seq % n
            flags = desc_h[pos * 8 + 7]
            pair = flags & _PAIR
            expected = _USED_BITS[1 ^ (seq // n) & 1]  # _wrap(seq, n), inlined
            if pair != expected:
                if pair == _PAIR ^ expected:
                    # AVAIL == USED, of the other lap: a used descriptor with the wrong
                    # device wrap counter (§2.8.1).
                    self._fail_here(seq, out, "flags", flags,
                                    f"AVAIL = USED = {_wrap(seq, n)}, the device wrap counter")
                break  # AVAIL != USED: still available, not used yet
            # The id and len were written before the flags (§2.8.22, the read barrier
            # of its example): read them after.
            if OBSERVE_BARRIER_NEEDED:
                observe_barrier()
            buffer_id = desc_h[pos * 8 + 6]
            length = desc_w[pos * 4 + 2]
            try:
                token, capacity, ndesc, cseq, home, item, head_len = states[buffer_id]  # type: ignore[misc]
            except (IndexError, TypeError):
                self._fail_here(seq, out, "id", buffer_id,
                                f"a buffer id in flight (queue size {n})")
            if not flags & _F_WRITE:
                length = _used_len(length, capacity, head_len)
            if cseq >= pub_cseq:
                self._fail_here(seq, out, "id", buffer_id, "a buffer that has been published")
            if length > capacity and strict:
                self._fail_here(seq, out, "len", length,
                                f"<= {capacity}, the writable capacity of buffer {buffer_id}")
            if self._order[0] != buffer_id:
                seq, limit = self._retire_batch(seq, buffer_id, length, out, limit)
                continue
            out.append((token, length))
            states[buffer_id] = None
            home.append(item)
            self._order.popleft()
            seq += ndesc
            self._used_cseq += 1
            limit -= 1
        self._used_dseq = seq
        return out

    def _reap_any_order(self, limit: int) -> list[tuple[T, int]]:
        """:meth:`_reap` without VIRTIO_F_IN_ORDER: every used descriptor names one chain.
        The same checks as the in-order loop, with the ring position, its lap's USED bits,
        the chain count and the module constants kept in locals (one attribute store per
        call, not per chain).  Kept apart from that loop on purpose: its per-chain batch
        bookkeeping and attribute stores cost this one 290-358 against about 250 ns per
        chain (``virtq bench profile``, packed reap)."""
        out: list[tuple[T, int]] = []
        append = out.append
        n = self.size
        desc_h = self._desc_h
        desc_w = self._desc_w
        states = self._state
        pub = self._pub_dseq
        pub_cseq = self._pub_cseq
        # Chains added but not published yet are invisible to the device: only when some
        # exist must each completion be checked against them.
        unpublished = self._avail_cseq != pub_cseq
        strict = self.strict_len
        barrier = OBSERVE_BARRIER_NEEDED
        pair = _PAIR
        f_write = _F_WRITE
        seq = self._used_dseq
        pos = seq % n
        expected = _USED_BITS[1 ^ (seq // n) & 1]  # _wrap(seq, n), inlined
        try:
            while seq != pub and limit:
                flags = desc_h[pos * 8 + 7]
                if flags & pair != expected:
                    if flags & pair == pair ^ expected:
                        # AVAIL == USED, of the other lap: a used descriptor with the
                        # wrong device wrap counter (§2.8.1).
                        self._fail_here(seq, out, "flags", flags, "AVAIL = USED = "
                                        f"{_wrap(seq, n)}, the device wrap counter")
                    break  # AVAIL != USED: still available, not used yet
                # The id and len were written before the flags (§2.8.22, the read barrier
                # of its example): read them after.
                if barrier:
                    observe_barrier()
                buffer_id = desc_h[pos * 8 + 6]
                length = desc_w[pos * 4 + 2]
                try:
                    token, capacity, ndesc, cseq, home, item, head_len = states[buffer_id]  # type: ignore[misc]
                except (IndexError, TypeError):
                    self._fail_here(seq, out, "id", buffer_id,
                                    f"a buffer id in flight (queue size {n})")
                if unpublished and cseq >= pub_cseq:
                    self._fail_here(seq, out, "id", buffer_id,
                                    "a buffer that has been published")
                if not flags & f_write and (length > capacity or length == head_len):
                    length = capacity  # _used_len(), inlined: the length is not known
                elif length > capacity and strict:
                    self._fail_here(seq, out, "len", length, f"<= {capacity}, the writable "
                                    f"capacity of buffer {buffer_id}")
                append((token, length))
                states[buffer_id] = None
                home.append(item)
                seq += ndesc
                pos += ndesc
                if pos >= n:
                    pos -= n
                    expected ^= pair  # the next lap
                limit -= 1
        finally:
            # Also when a check above breaks the queue: what was handed out is reaped.
            self._used_cseq += len(out)
        self._used_dseq = seq
        return out

    def _retire_batch(self, seq: int, last_id: int, length: int,
                      out: list[tuple[T, int]], limit: int) -> tuple[int, int]:
        """VIRTIO_F_IN_ORDER: one used descriptor retires every chain in flight up to
        ``last_id`` (§2.8.8, "In-order use of descriptors"); the others were "used
        completely": their length is their whole writable capacity.  Hands out at most
        ``limit`` chains and remembers the rest of the batch in ``_batch``; returns the
        next used descriptor count and what is left of ``limit``.  ``last_id`` was
        checked to be in flight and its length against its capacity."""
        order = self._order
        states = self._state
        self._batch = (last_id, length)
        while limit:
            buffer_id = order.popleft()
            st = states[buffer_id]
            assert st is not None
            token, capacity, ndesc, _, home, item, _ = st
            is_last = buffer_id == last_id
            out.append((token, length if is_last else capacity))
            states[buffer_id] = None
            home.append(item)
            seq += ndesc
            self._used_cseq += 1
            limit -= 1
            if is_last:
                self._batch = None
                break
        return seq, limit


class PackedTemplate(TemplateSlots, Generic[T]):
    """A request shape on a :class:`PackedQueue` (see :class:`~virtq.queue.ChainTemplate`).

    Each slot owns a buffer id for good.  With indirect descriptors it also owns that id's
    indirect table, whose entries are rewritten only where they change; a submission then
    writes one ring descriptor (the position moves on every time, unlike a split ring's
    head).  Otherwise every submission writes the chain's descriptors at the next
    positions.
    """

    def __init__(self, queue: PackedQueue[T], max_buffers: int, slots: int,
                 indirect: bool) -> None:
        self._q = queue
        self.max_buffers = max_buffers
        self.slots = slots
        self.indirect = indirect
        #: Every slot keeps its buffer id (and, with indirect, its table).
        self.persistent = True
        ids = queue._free_ids
        self._ids: list[int] = ids[-slots:][::-1]
        del ids[-slots:]
        self._tables = ([queue.iova + queue.layout.indirect_table(i) for i in self._ids]
                        if indirect else [])
        self._rebuild()

    def _rebuild(self) -> None:
        slots = self.slots
        self._free = list(range(slots - 1, -1, -1))
        self._held: set[int] = set()
        self._batch: tuple[int, ...] | None = None
        self._entries: list[list[tuple[int, int, int]]] = [[] for _ in range(slots)]
        self._snap: list[tuple[list[tuple[int, int]], list[tuple[int, int]]] | None] = \
            [None] * slots
        self._cap = [0] * slots
        # Per slot whose chain is one ring descriptor (indirect, or one buffer): that
        # descriptor's (addr, len, WRITE|INDIRECT flags), for submit_many's one loop.
        self._ring: list[tuple[int, int, int] | None] = [None] * slots

    def _shape(self, slot: int, readable: Sequence[Buffer], writable: Sequence[Buffer]
               ) -> list[tuple[int, int, int]]:
        """Slot's chain as descriptor entries, validated; its indirect table brought up to
        date (only entries that changed are written)."""
        moved = self._moved(slot, readable, writable)
        if moved is not None:  # only addresses moved: rewrite just those entries
            if moved:
                self._move(slot, moved)
                if self.indirect:
                    mem = self._q._mem
                    base = self._tables[slot] - self._q.iova
                    for k, iova, length, flags in moved:
                        _PACK_DESC(mem, base + (k << 4), iova, length, 0, flags & _F_WRITE)
                elif len(self._entries[slot]) == 1:
                    self._ring[slot] = self._entries[slot][0]
            return self._entries[slot]
        try:
            nr = len(readable)
            n = nr + len(writable)
        except TypeError:
            readable = _as_seq(readable, "readable")
            writable = _as_seq(writable, "writable")
            nr = len(readable)
            n = nr + len(writable)
        if not 1 <= n <= self.max_buffers:
            raise ArgumentError("buffers", n, f"a chain of this template has "
                                f"1..{self.max_buffers} buffers")
        entries, capacity = _chain_entries(readable, writable, nr, n)
        if self.indirect:
            old = self._entries[slot]
            mem = self._q._mem
            base = self._tables[slot] - self._q.iova
            for k, entry in enumerate(entries):
                if k >= len(old) or old[k] != entry:
                    _PACK_DESC(mem, base + (k << 4), entry[0], entry[1], 0,
                               entry[2] & _F_WRITE)
        self._keep(slot, entries, nr)
        self._cap[slot] = capacity
        if self.indirect:
            self._ring[slot] = (self._tables[slot], DESC_SIZE * n, _F_INDIRECT)
        elif n == 1:
            self._ring[slot] = entries[0]
        return entries

    def _ring_entries(self, slot: int, entries: list[tuple[int, int, int]]
                      ) -> list[tuple[int, int, int]]:
        if self.indirect:
            return [(self._tables[slot], DESC_SIZE * len(entries), _F_INDIRECT)]
        return entries

    def submit(self, slot: int, readable: Sequence[Buffer], writable: Sequence[Buffer],
               token: T) -> None:
        """Make held ``slot``'s chain available (visible after ``publish()``).  Raises
        :class:`ArgumentError`, :class:`QueueFullError` (ring positions), the queue's
        state errors; on error nothing is submitted and the slot stays held."""
        q = self._q
        if q._state_v is not _READY:
            q._refuse()
        if not self._is_held(slot):
            self._bad_slot(slot)
        entries = self._shape(slot, readable, writable)
        buffer_id = self._ids[slot]
        ring = self._ring_entries(slot, entries)
        q._place(ring, buffer_id)
        q._commit(buffer_id, token, self._cap[slot], len(ring), self._free, slot, ring[0][1])
        self._held.discard(slot)
        self._batch = None

    def submit_many(self, slots: Sequence[int],
                    readables: Sequence[Sequence[Buffer]] | None,
                    writables: Sequence[Sequence[Buffer]] | None, tokens: Sequence[T]) -> None:
        """:meth:`submit` each, all or nothing; ``readables``/``writables`` None repeat
        each slot's previous buffers.  Raises :class:`ArgumentError` (mismatched sequences, slots
        not held, a slot never submitted when repeating, a bad buffer), :class:`QueueFullError`
        (ring positions) and the queue's state errors; on error nothing is submitted."""
        q = self._q
        if q._state_v is not _READY:
            q._refuse()
        same = self._check_submit_many(slots, readables, writables, tokens)
        count = len(slots)
        if not count:
            return
        if slots is not self._batch:
            self._check_held_all(slots)
        if self.indirect or self.max_buffers == 1:
            self._submit_one_desc_many(slots, readables, writables, tokens, same)
            return
        mark = q._mark()
        try:
            for i, (slot, token) in enumerate(zip(slots, tokens, strict=True)):
                if same:
                    if self._snap[slot] is None:
                        raise ArgumentError("slot", slot,
                                            "has never been submitted: nothing to repeat")
                    entries = self._entries[slot]
                else:
                    assert readables is not None and writables is not None
                    entries = self._shape(slot, readables[i], writables[i])
                ring = self._ring_entries(slot, entries)
                q._place(ring, self._ids[slot])
                q._commit(self._ids[slot], token, self._cap[slot], len(ring), self._free, slot,
                          ring[0][1])
        except BaseException:
            q._rollback(mark)  # the slots stay held; their ids stay theirs
            raise
        self._held.difference_update(slots)
        self._batch = None

    def _submit_one_desc_many(self, slots: Sequence[int],
                              readables: Sequence[Sequence[Buffer]] | None,
                              writables: Sequence[Sequence[Buffer]] | None,
                              tokens: Sequence[T], same: bool) -> None:
        """submit_many() when every chain is one ring descriptor (its indirect table, or
        its one buffer): every check and every table write first, then one loop that
        writes a descriptor and a shadow state per slot -- what _place() and _commit() do
        per chain, without their calls and lists.  ``slots`` were checked to be held."""
        q = self._q
        count = len(slots)
        n = q.size
        seq = q._avail_dseq
        room = n - (seq - q._used_dseq)
        if count > room:
            raise QueueFullError(count, room, "ring positions")
        ring = self._ring
        if same:
            if None in map(ring.__getitem__, slots):
                slot = next(s for s in slots if ring[s] is None)
                raise ArgumentError("slot", slot, "has never been submitted: nothing to repeat")
        else:
            assert readables is not None and writables is not None
            # Tables are the held slots' own, invisible to the device until their ring
            # descriptors are published: writing them before a later slot fails its check
            # leaves nothing to undo (each slot's remembered shape is its table's).
            shape = self._shape
            for slot, readable, writable in zip(slots, readables, writables, strict=True):
                shape(slot, readable, writable)
        desc = q._desc_mem
        state = q._state
        ids = self._ids
        caps = self._cap
        home = self._free
        cseq = q._avail_cseq
        pos = seq % n
        bits = _AVAIL_BITS[1 ^ (seq // n) & 1]  # _wrap(seq, n), inlined
        first = q._pending is None
        for slot, token in zip(slots, tokens, strict=True):
            addr, length, flags = ring[slot]  # type: ignore[misc]
            buffer_id = ids[slot]
            if first:
                # The batch's first flags wait for publish() (§2.8.21.1.1).
                _PACK_DESC_NOFLAGS(desc, pos << 4, addr, length, buffer_id)
                q._pending = (pos * 8 + 7, flags | bits)
                first = False
            else:
                _PACK_DESC(desc, pos << 4, addr, length, buffer_id, flags | bits)
            state[buffer_id] = (token, caps[slot], 1, cseq, home, slot, length)
            cseq += 1
            pos += 1
            if pos == n:
                pos = 0
                bits ^= _PAIR  # the next lap: AVAIL and USED both flip
        if q.in_order:
            q._order.extend(map(ids.__getitem__, slots))
        q._avail_dseq = seq + count
        q._avail_cseq = cseq
        self._held.difference_update(slots)
        self._batch = None

    def describe(self) -> str:
        """One line for logs: the shape, the slots and how many are free."""
        kind = "indirect" if self.indirect else "direct"
        return (f"template max_buffers={self.max_buffers} slots={self.slots} ({kind}), "
                f"{len(self._free)} free")


class PackedSlotQueue(_PackedCore[int]):
    """Fixed one-buffer slots on a packed ring (the packed sibling of
    :class:`~virtq.queue.SlotQueue`, same API): slot ``d``'s buffer is at ``slots[d]``,
    ``slot_size`` bytes, device-``writable`` or not.

    Slots are made available in ring order and reused first in, first out, so slot ``d``
    always sits at position ``d`` and is its own buffer id.  A submission writes each
    slot's descriptor in full (address, length from the driver's own shadow, id, flags:
    the device writes id, len and flags of used descriptors over them, and nothing of it
    is read back), a strided store per field and lap; the first slot's flags wait for
    :meth:`publish`.  A reap takes the slots a device used one by one in order a run at
    a time (one list comparison), and anything else one descriptor at a time.  A device that
    completes out of order is handled as by ``SlotQueue``: reuse waits for the oldest
    slot.  With VIRTIO_F_IN_ORDER one used descriptor may retire a batch (§2.8.8).
    """

    def __init__(
        self,
        region: MemoryRegion,
        layout: PackedLayout,
        *,
        iova: Iova,
        slots: Sequence[int],
        slot_size: int,
        writable: bool,
        event_idx: bool = False,
        in_order: bool = False,
        start_index: int = 1 << 15,
        strict_len: bool = True,
    ) -> None:
        n = layout.queue_size if isinstance(layout, PackedLayout) else 0
        addrs = list(slots)
        if len(addrs) != n:
            raise ArgumentError("slots", len(addrs), f"one buffer address per position ({n})")
        if not isinstance(slot_size, int) or not 0 < slot_size < _U32_LIMIT:
            raise ArgumentError("slot_size", slot_size, "must be in 1..2**32-1")
        for addr in addrs:
            if not isinstance(addr, int) or not 0 <= addr <= _U64_LIMIT - slot_size:
                raise ArgumentError("slots", addr, "each must be a u64 address with room "
                                    f"for {slot_size} bytes")
        super().__init__(region, layout, iova=iova, event_idx=event_idx, in_order=in_order,
                         start_index=start_index, strict_len=strict_len)
        self.slot_size = slot_size
        self.writable = bool(writable)
        # What the device may report writing into a slot (a device-readable one: none).
        self._capacity = slot_size if writable else 0
        self._desc_q = self._desc_mem.cast("Q")  # [2p] addr, [2p + 1] len | id << 32 | flags << 48
        # Each slot's length, as the driver last set it (the ring's len is the device's
        # after a completion).
        self._lens = array("I", [slot_size]) * n
        # Per position p (= slot = buffer id), for strided stores and one-comparison checks
        # of whole runs: the slot addresses; by wrap counter, the u32 holding id and flags
        # (descriptor bytes 12..15) of an available descriptor, and of a used one as an
        # in-order device writes it (WRITE set when it wrote into a writable slot,
        # §2.8.3).  One attribute for all (the 29-attribute budget).
        wflag = _F_WRITE if writable else 0
        self._runs = (
            array("Q", addrs),
            tuple(array("I", [p | (_AVAIL_BITS[w] | wflag) << 16 for p in range(n)])
                  for w in (0, 1)),
            tuple([p | (_USED_BITS[w] | wflag) << 16 for p in range(n)] for w in (0, 1)),
        )
        self._reset_ring(self._check_start(start_index, n))

    def _forget(self) -> None:
        self._front = self._avail_dseq  # oldest slot not yet completed (count)
        self._early = bytearray(self.size)  # 1: completed while an older slot was in flight
        self._early_count = 0

    @property
    def num_free(self) -> int:
        """Slots :meth:`submit` can take now."""
        return self.size - (self._avail_dseq - self._front)

    @property
    def next_slot(self) -> int:
        """The slot the next :meth:`submit` makes available first."""
        return self._avail_dseq % self.size

    def in_flight_tokens(self) -> list[int]:
        """The slots submitted and not yet reaped, in submission order."""
        n = self.size
        early = self._early
        return [s % n for s in range(self._front, self._avail_dseq) if not early[s % n]]

    def _snapshot_extra(self) -> dict[str, Any]:
        return {"slot_size": self.slot_size, "writable": self.writable}

    def close(self) -> None:
        """Release every view of the region (idempotent)."""
        if self._state_v is not _CLOSED:
            self._desc_q.release()
        super().close()

    # -- submitting -----------------------------------------------------------------------

    def submit(self, count: int, lengths: Sequence[int] | None = None) -> int:
        """Make the next ``count`` slots available (after :meth:`publish`) and return the
        first; ``lengths`` (device-readable slots only) sets how many bytes of each the
        device reads, 1..``slot_size``.  All or nothing: :class:`QueueFullError`,
        :class:`ArgumentError`.  Raises :class:`QueueFullError` when fewer slots are free,
        :class:`ArgumentError` for a bad count or length, and the queue's state errors."""
        if self._state_v is not _READY:
            self._refuse()
        if (count.__class__ is not int or count < 0) and (
                not isinstance(count, int) or count < 0):
            raise ArgumentError("count", count, "must be an int >= 0")
        seq = self._avail_dseq
        n = self.size
        free = n - (seq - self._front)
        if count > free:
            raise QueueFullError(count, free, "slots")
        if not count:
            return seq % n
        if lengths is not None:
            self._set_lengths(seq, count, lengths)
        first = seq % n
        wrap = 1 ^ (seq // n) & 1  # _wrap(seq, n), inlined
        start = first
        if self._pending is None:
            # The batch's first descriptor: address, len and id now, flags in publish().
            self._desc_q[2 * first] = self._runs[0][first]
            self._desc_w[4 * first + 2] = self._lens[first]
            self._desc_h[8 * first + 6] = first
            self._pending = (8 * first + 7, self._runs[1][wrap][first] >> 16)
            start += 1
        # The others in full, a run per lap: invisible behind the first until publish().
        end = first + count
        self._write_run(start, min(end, n), wrap)
        if end > n:
            self._write_run(0, end - n, wrap ^ 1)
        self._avail_dseq = seq + count
        return first

    def _write_run(self, a: int, b: int, wrap: int) -> None:
        """Descriptors a .. b - 1, available in the lap of wrap counter ``wrap``: address,
        len, then id and flags, each one strided store over the run (§2.8.13)."""
        if a < b:
            addrs, avail, _ = self._runs
            self._desc_q[2 * a : 2 * b : 2] = addrs[a:b]
            self._desc_w[4 * a + 2 : 4 * b + 2 : 4] = self._lens[a:b]
            self._desc_w[4 * a + 3 : 4 * b + 3 : 4] = avail[wrap][a:b]

    def _set_lengths(self, seq: int, count: int, lengths: Sequence[int]) -> None:
        if self.writable:
            raise ArgumentError("lengths", "...", "only device-readable slots take lengths "
                                "(a writable slot's capacity is checked against used.len)")
        try:
            values = list(lengths)
        except TypeError:
            raise ArgumentError("lengths", lengths, "must be a sequence of ints") from None
        if len(values) != count:
            raise ArgumentError("lengths", len(values), f"one per slot ({count})")
        size = self.slot_size
        try:  # min, max and the u32 conversion: C loops
            ok = min(values) > 0 and max(values) <= size
            packed = array("I", values)
        except (TypeError, OverflowError):
            ok = False
        if not ok:
            bad = next(x for x in values if not isinstance(x, int) or not 0 < x <= size)
            raise ArgumentError("lengths", bad, f"must be ints in 1..{size}")
        n = self.size
        first = seq % n
        k = min(count, n - first)
        self._lens[first : first + k] = packed[:k]
        self._lens[: count - k] = packed[k:]

    # -- reaping --------------------------------------------------------------------------

    def reap(self, limit: int | None = None) -> tuple[list[int], list[int]]:
        """The slots the device completed since the last reap (at most ``limit``), in the
        order it wrote them, and the bytes it wrote into each (validated: 0 for a
        device-readable slot; with IN_ORDER the slots a batch retires without a used
        descriptor of their own count as fully written).  Raises
        :class:`~virtq.errors.DeviceProtocolError` for an impossible used descriptor."""
        if self._state_v is not _READY:
            self._refuse()
        if limit is not None and (limit.__class__ is not int or limit < 1):
            raise ArgumentError("limit", limit, "must be an int >= 1 (or None: all)")
        slots: list[int] = []
        lens: list[int] = []
        n = self.size
        desc_h = self._desc_h
        desc_w = self._desc_w
        early = self._early
        cap = self._capacity
        strict = self.strict_len
        seq = self._used_dseq
        pub = self._pub_dseq
        if self._batch is not None:
            seq = self._retire_slots(seq, *self._batch, slots, lens, limit)
        elif seq != pub and not self._early_count:
            # The common case first, a run at a time: used in order, one descriptor each.
            seq += self._used_run(seq, pub - seq if limit is None else min(pub - seq, limit),
                                  slots, lens)
            self._front = seq
        while seq != pub and (limit is None or len(slots) < limit) and self._batch is None:
            pos = seq % n
            flags = desc_h[pos * 8 + 7]
            pair = flags & _PAIR
            expected = _USED_BITS[1 ^ (seq // n) & 1]  # _wrap(seq, n), inlined
            if pair != expected:
                if pair == _PAIR ^ expected:
                    self._fail_slot(seq, slots, lens, "flags", flags,
                                    f"AVAIL = USED = {_wrap(seq, n)}, the device wrap counter")
                break
            if OBSERVE_BARRIER_NEEDED:
                observe_barrier()
            slot = desc_h[pos * 8 + 6]
            length = desc_w[pos * 4 + 2]
            front = self._front
            # Where that slot was made available: at or after the oldest in flight.
            at = front + (slot - front) % n if slot < n else pub
            if at >= pub or early[slot]:
                self._fail_slot(seq, slots, lens, "id", slot,
                                f"a published slot not yet completed (queue size {n})")
            if not flags & _F_WRITE:
                length = _used_len(length, cap, self._lens[slot])  # as PackedQueue._reap
            if length > cap and strict:
                self._fail_slot(seq, slots, lens, "len", length,
                                f"<= {cap}, the bytes slot {slot} can take")
            if self.in_order and at != front:
                # One used descriptor for the batch front .. at (§2.8.8): the others
                # were used completely.
                seq = self._retire_slots(seq, at, length, slots, lens, limit)
                continue
            slots.append(slot)
            lens.append(length)
            seq += 1
            if at == front and not self._early_count:
                self._front = front + 1
                continue
            early[slot] = 1
            self._early_count += 1
            while self._early_count and early[self._front % n]:
                early[self._front % n] = 0
                self._early_count -= 1
                self._front += 1
        self._used_dseq = seq
        return slots, lens

    def _retire_slots(self, seq: int, at: int, length: int, slots: list[int],
                      lens: list[int], limit: int | None) -> int:
        """VIRTIO_F_IN_ORDER: one used descriptor retired the slots made available at
        counts front .. ``at`` (§2.8.8), the last with ``length``, the others used
        completely.  Hands out slots until ``limit`` and keeps the rest of the batch in
        ``_batch``; returns the next used descriptor count."""
        n = self.size
        front = self._front
        stop = at + 1 if limit is None else min(at + 1, front + limit - len(slots))
        for s in range(front, stop):
            slots.append(s % n)
            lens.append(length if s == at else self._capacity)
        self._front = stop
        self._batch = (at, length) if stop <= at else None
        return seq + stop - front

    def _used_run(self, seq: int, count: int, slots: list[int], lens: list[int]) -> int:
        """How many of the ``count`` descriptors from count ``seq`` on (published, in
        flight, nothing completed early) the device used one by one in order -- slot p's
        used descriptor at position p with id p, AVAIL = USED = the lap's wrap counter,
        WRITE exactly for a writable slot, len within it -- appended to ``slots`` and
        ``lens``.  Each run of positions is checked with one list comparison of the u32s
        holding id and flags (an aligned load: the flags the device stores last come with
        the id it stored before them, §2.8.22), and lens are read after the barrier.  The
        caller's loop takes whatever else comes next: a descriptor not yet used, an
        in-order batch, an early completion, or an impossible one it names."""
        n = self.size
        desc_w = self._desc_w
        used = self._runs[2]
        a = seq % n
        wrap = 1 ^ (seq // n) & 1  # _wrap(seq, n), inlined
        if desc_w[4 * a + 3] != used[wrap][a]:
            return 0  # not used yet, or not this way (an in-order batch): one load
        done = 0
        while done < count:
            b = min(n, a + count - done)
            want = used[wrap][a:b]
            got = desc_w[4 * a + 3 : 4 * b + 3 : 4].tolist()
            k = b - a
            if got != want:
                # The longest equal prefix, each probe one C-level comparison.
                lo, hi = 0, k
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if got[:mid] == want[:mid]:
                        lo = mid
                    else:
                        hi = mid
                k = lo
            if not k:
                break
            if OBSERVE_BARRIER_NEEDED:
                observe_barrier()
            if self.writable:
                got_lens = desc_w[4 * a + 2 : 4 * (a + k) + 2 : 4].tolist()
                if self.strict_len and max(got_lens) > self._capacity:
                    # Up to the first impossible len: the caller's loop names it.
                    k = next(i for i, x in enumerate(got_lens) if x > self._capacity)
                    got_lens = got_lens[:k]
                lens += got_lens
            else:
                lens += [0] * k
            slots += range(a, a + k)
            done += k
            if a + k < b:
                break
            a = 0
            wrap ^= 1
        return done

    def _fail_slot(self, seq: int, slots: list[int], lens: list[int], part: str, value: int,
                   expected: str) -> NoReturn:
        self._used_dseq = seq
        self._fail(DeviceProtocolError(f"desc[{seq % self.size}].{part}", value, expected),
                   list(zip(slots, lens, strict=True)))

    def pop_used(self) -> tuple[int, int] | None:
        """The next completed ``(slot, len)``, or None."""
        slots, lens = self.reap(1)
        return (slots[0], lens[0]) if slots else None

    def drain_used(self) -> list[tuple[int, int]]:
        """Every completed ``(slot, len)``, in the order the device wrote them."""
        slots, lens = self.reap()
        return list(zip(slots, lens, strict=True))


__all__ = ["PackedQueue", "PackedSlotQueue", "PackedTemplate"]
