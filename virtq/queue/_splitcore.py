"""The split-ring core shared by :class:`~virtq.queue.SplitQueue` and
:class:`~virtq.queue.SlotQueue` (VIRTIO 1.2 §2.7).

It owns what every driver-side split ring has, whatever it puts into its descriptors: the
zero-copy views of the three parts, the driver's indices, ``publish()`` with its barriers,
interrupt (used-buffer notification) control, the one check of ``used.idx``, the queue's
state (ready, broken, closed) and teardown.  The two queues add how chains are built and
how a used element is turned back into a token.

Indices.  The driver's three counters -- chains added (``next_avail``), published
(``published``) and reaped (``last_used``) -- are kept as unbounded Python ints
(``_avail_seq``, ``_pub_seq``, ``_used_seq``); the ring only ever sees them mod 2**16
(§2.7.6: "idx ... wraps naturally at 65536").  Comparing positions of chains therefore
never suffers from the u16 wrap: a chain added 65 536 positions ago is still "earlier".

Memory ordering (``docs/memory-ordering.md``): descriptors and ``avail.ring[]`` are written
before :func:`~virtq._sys.fence.publish_barrier` and the single 2-byte ``avail.idx`` store;
the notification decision reads ``used.flags``/``avail_event`` only after
:func:`~virtq._sys.fence.full_fence`; reaping reads ``used.idx`` once, then
:func:`~virtq._sys.fence.observe_barrier`, then the elements.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Generic, NoReturn, TypeVar

from virtq._sys.fence import (
    OBSERVE_BARRIER_NEEDED,
    PUBLISH_BARRIER_NEEDED,
    full_fence,
    observe_barrier,
    publish_barrier,
)
from virtq.abi import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    VirtqDesc,
    avail_ring_type,
    used_ring_type,
)
from virtq.errors import (
    ArgumentError,
    DeviceError,
    DeviceProtocolError,
    LayoutError,
    QueueBrokenError,
    QueueStateError,
)
from virtq.layout import SplitLayout, need_event
from virtq.layout.split import DESC_SIZE, avail_nbytes, used_nbytes
from virtq.memory import MemoryRegion
from virtq.queue.interface import QueueState
from virtq.types import Iova

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
    raise ImportError(
        "virtq.queue maps ring fields with native-endian memoryview casts; virtio 1.x rings "
        "are little-endian, so this host is not supported"
    )

T = TypeVar("T")

_U64_LIMIT = 1 << 64
_READY = QueueState.READY
_BROKEN = QueueState.BROKEN
_CLOSED = QueueState.CLOSED


def check_u16(name: str, value: object) -> int:
    """``value`` as a ring index (0..65535), or :class:`ArgumentError`."""
    if value.__class__ is not int and not isinstance(value, int):
        raise ArgumentError(name, value, "must be a u16 (0..65535)")
    if not 0 <= value <= 0xFFFF:
        raise ArgumentError(name, value, "must be a u16 (0..65535)")
    return int(value)


def _detached(err: DeviceError) -> DeviceError:
    """A copy of ``err`` with the same message and fields but no traceback and no
    completed tokens: what a broken queue keeps once the caller dropped the original (the
    original's traceback holds the queue's frames, and tokens may hold the device that
    owns the queue -- either would make a reference cycle)."""
    if isinstance(err, DeviceProtocolError):
        copy: DeviceError = DeviceProtocolError(err.field, err.value, err.expected)
    else:
        copy = DeviceError(str(err))
    return copy


class _SplitCore(Generic[T]):
    """Views, indices, publish, interrupt control, ``used.idx`` check, state, teardown."""

    #: The memoryviews close() releases (subclasses add theirs).
    _views: tuple[str, ...] = ("_avail", "_used_h", "_used_q", "_desc_w", "_desc_mem")

    def __init__(
        self,
        region: MemoryRegion,
        layout: SplitLayout,
        *,
        iova: Iova,
        event_idx: bool,
        start_index: int,
        strict_len: bool,
    ) -> None:
        if not isinstance(layout, SplitLayout):
            raise ArgumentError("layout", layout, "must be a SplitLayout")
        if not isinstance(region, MemoryRegion):
            raise ArgumentError("region", region, "must be a MemoryRegion")
        if region.nbytes < layout.nbytes:
            raise LayoutError(
                "layout.nbytes", layout.nbytes, f"exceeds the region's {region.nbytes} bytes"
            )
        start_index = check_u16("start_index", start_index)
        if (iova.__class__ is not int and not isinstance(iova, int)) \
                or not 0 <= iova <= _U64_LIMIT - layout.nbytes:
            raise ArgumentError("iova", iova, "must be a u64 with room for the layout")
        n = layout.queue_size
        self.region = region
        self.layout = layout
        self.size = n
        self.event_idx = bool(event_idx)
        self.strict_len = bool(strict_len)
        self.iova = Iova(int(iova))
        self._mask = n - 1
        self._state_v = _READY
        # The error that broke the queue: the original while the caller holds it (weakly:
        # its traceback references this queue), and a detached copy for after that.
        self._broken: tuple[weakref.ref[DeviceError], DeviceError] | None = None

        # Zero-copy views.  Each index field is read/written as its own 2-byte element so
        # no access ever tears or spans a neighbouring field (spec-notes §4.3).
        self._mem = region.view(0, layout.nbytes)
        self._desc_mem = self._mem[layout.desc : layout.desc + DESC_SIZE * n]
        # avail as u16[]: [0] flags, [1] idx, [2 + i] ring[i], [2 + n] used_event
        self._avail = self._mem[layout.avail : layout.avail + avail_nbytes(n)].cast("H")
        used_mem = self._mem[layout.used : layout.used + used_nbytes(n)]
        # used as u16[]: [0] flags, [1] idx, [2 + 4n] avail_event
        self._used_h = used_mem.cast("H")
        # used elements as u64[]: ring[i] = id | len << 32, one load per element
        self._used_q = used_mem[4 : 4 + 8 * n].cast("Q")
        used_mem.release()
        self._desc_w = self._desc_mem.cast("I")  # descriptor i's len at [4 * i + 2]
        self._idx_used_event = 2 + n
        self._idx_avail_event = 2 + 4 * n
        self._reset_rings(start_index)

    # -- ring areas (what a transport programs into the device) ---------------------------

    @property
    def desc_area(self) -> Iova:
        """Device address of the descriptor table (§2.6: descriptor area)."""
        return Iova(self.iova + self.layout.desc)

    @property
    def driver_area(self) -> Iova:
        """Device address of the available ring (§2.6: driver area)."""
        return Iova(self.iova + self.layout.avail)

    @property
    def device_area(self) -> Iova:
        """Device address of the used ring (§2.6: device area)."""
        return Iova(self.iova + self.layout.used)

    # The split ring's own names for the same three addresses.
    desc_iova = desc_area
    avail_iova = driver_area
    used_iova = device_area

    @property
    def vring_base(self) -> int:
        """The avail index the device starts from (vhost-user SET_VRING_BASE): after
        ``reset()`` every index equals it."""
        return self._avail_seq & 0xFFFF

    def resume_index(self) -> int | None:
        """``used.idx`` as the device last stored it: where a device that takes the ring
        over as it is resumes (see :meth:`VirtQueue.resume_index`).  Raises
        :class:`QueueStateError` when closed."""
        if self._state_v is _CLOSED:
            raise QueueStateError("queue is closed")
        return int(self._used_h[1])

    # -- indices ----------------------------------------------------------------------------

    @property
    def next_avail(self) -> int:
        """avail index of the next chain to add (``avail.idx`` once published)."""
        return self._avail_seq & 0xFFFF

    @property
    def published(self) -> int:
        """The last value stored to ``avail.idx``."""
        return self._pub_seq & 0xFFFF

    @property
    def last_used(self) -> int:
        """used index of the next element to reap."""
        return self._used_seq & 0xFFFF

    @property
    def num_in_flight(self) -> int:
        """Chains added and not yet reaped (published or not)."""
        return self._avail_seq - self._used_seq

    # -- state ------------------------------------------------------------------------------

    @property
    def state(self) -> QueueState:
        """``READY``, ``BROKEN`` (a device error; see :attr:`broken`) or ``CLOSED``."""
        return self._state_v

    @property
    def broken(self) -> DeviceError | None:
        """The device error that broke the queue, or ``None``."""
        if self._state_v is not _BROKEN:
            return None
        assert self._broken is not None
        ref, copy = self._broken
        original = ref()
        return original if original is not None else copy

    @property
    def closed(self) -> bool:
        return self._state_v is _CLOSED

    def _refuse(self) -> NoReturn:
        """Raise why the queue is not usable (called when ``_state_v`` is not READY)."""
        if self._state_v is _CLOSED:
            raise QueueStateError("queue is closed")
        cause = self.broken
        assert cause is not None
        raise QueueBrokenError(cause) from cause

    def _break(self, err: DeviceError) -> None:
        self._broken = (weakref.ref(err), _detached(err))
        self._state_v = _BROKEN

    def _fail(self, err: DeviceProtocolError, completed: list[tuple[T, int]]) -> NoReturn:
        """A device-written value is impossible: break the queue and raise.  Completions
        validated before the bad element are handed over on the error, so no token is
        lost: they are neither returned by reset() nor reaped again."""
        err.completed = completed  # type: ignore[assignment]
        self._break(err)
        try:
            raise err
        finally:
            # The traceback keeps this frame; without the local, the error does not keep
            # itself (error -> traceback -> frame -> error), and nothing outlives the
            # caller's reference to it -- the queue is freed by reference counting alone.
            del err

    def _fail_at(self, k: int, part: str, value: int, expected: str,
                 completed: list[tuple[T, int]]) -> NoReturn:
        """Element ``k`` of the run being reaped has a bad ``part`` (id or len):
        ``last_used`` stops at it, so it and what follows are never reaped."""
        self._used_seq += k
        pos = self._used_seq & self._mask
        self._fail(DeviceProtocolError(f"used.ring[{pos}].{part}", value, expected),
                   completed)

    def mark_broken(self, err: DeviceError) -> None:
        """Break the queue for a device error found above the ring (a reply in a buffer
        that cannot be right): every later operation raises :class:`QueueBrokenError` with
        ``err`` as its cause, until :meth:`reset`."""
        if not isinstance(err, DeviceError):
            raise ArgumentError("err", err, "must be a DeviceError")
        if self._state_v is _CLOSED:
            raise QueueStateError("queue is closed")
        if self._state_v is _READY:
            self._break(err)

    # -- set-up and reset -------------------------------------------------------------------

    def _reset_rings(self, start_index: int) -> None:
        """Zero the rings and put every index at ``start_index``."""
        # The driver zeroes the rings (§2.7: "The driver MUST initialize ... used.flags to
        # 0"; a recycled region may hold a previous queue's state).
        self._desc_mem[:] = bytes(len(self._desc_mem))
        zero = memoryview(bytes(2 * len(self._avail))).cast("H")
        self._avail[:] = zero
        zero = memoryview(bytes(2 * len(self._used_h))).cast("H")
        self._used_h[:] = zero
        # Both indices start at start_index; so do the event words, so the first publish and
        # the first completion notify even before the peer has written its event word.
        self._avail[1] = start_index
        self._used_h[1] = start_index
        self._avail[self._idx_used_event] = start_index
        self._used_h[self._idx_avail_event] = start_index
        self._avail_seq = start_index  # chains added (unbounded; the ring sees it mod 2**16)
        self._pub_seq = start_index  # chains published
        self._used_seq = start_index  # chains reaped

    def _forget(self) -> list[T]:
        """Drop every chain's shadow state; return the tokens that were in flight."""
        raise NotImplementedError

    def _rebuild(self) -> None:
        """Rewrite what the queue keeps in the rings across a reset (subclass hook)."""

    def reset(self, start_index: int | None = None) -> list[T]:
        """Forget every chain and re-initialise the rings; returns the tokens that were in
        flight (so the caller can fail or resubmit them) and makes a broken queue usable.

        Only valid while the device does not use the rings (after a device reset, after a
        vhost-user back-end died or was stopped with GET_VRING_BASE).  ``start_index``
        defaults to the current ``next_avail``, so a back-end told
        ``SET_VRING_BASE(vring_base)`` carries on where the old one stopped.  Raises
        :class:`~virtq.errors.QueueStateError` when closed, :class:`ArgumentError` for a
        start index that is not a u16."""
        if self._state_v is _CLOSED:
            raise QueueStateError("queue is closed")
        start = self.next_avail if start_index is None else check_u16("start_index",
                                                                        start_index)
        lost = self._forget()
        self._reset_rings(start)
        self._broken = None
        self._state_v = _READY
        self._rebuild()
        return lost

    # -- publishing -------------------------------------------------------------------------

    def publish(self) -> bool:
        """Expose every added chain to the device with one ``avail.idx`` store.

        Returns True when the device wants an available-buffer notification (§2.7.10:
        ``used.flags`` lacks ``VIRTQ_USED_F_NO_NOTIFY``, or with event idx
        ``vring_need_event(avail_event, new, old)``, §2.7.10.1).  Returns False when nothing
        was added.  Raises :class:`QueueBrokenError` / :class:`QueueStateError` when the
        queue is not usable."""
        if self._state_v is not _READY:
            self._refuse()
        new = self._avail_seq
        old = self._pub_seq
        if new == old:
            return False
        # Descriptors and ring entries must be visible before the index (§2.7.13 step 4,
        # §2.7.13.3.1).
        if PUBLISH_BARRIER_NEEDED:
            publish_barrier()
        self._avail[1] = new & 0xFFFF
        self._pub_seq = new
        # The decision below loads what the device wrote; it must not be satisfied before the
        # idx store is globally visible, or a device that just went to sleep is never woken
        # (§2.7.13 step 6, §2.7.13.4.1).
        full_fence()
        if self.event_idx:
            return need_event(self._used_h[self._idx_avail_event], new & 0xFFFF, old & 0xFFFF)
        return not self._used_h[0] & VIRTQ_USED_F_NO_NOTIFY

    # -- used-ring ingress ------------------------------------------------------------------

    def _used_count(self, used_idx: int) -> int:
        """How many used elements ``used.idx`` announces -- validated: it may run ahead of
        ``last_used`` by at most the chains published and not reaped (§2.7.8: the device
        only uses buffers it was given).  Then the barrier that orders the element loads
        after this index load (§2.7.14)."""
        used_seq = self._used_seq
        count = (used_idx - used_seq) & 0xFFFF
        if count > self._pub_seq - used_seq:
            self._fail(DeviceProtocolError(
                "used.idx", used_idx,
                f"at most {self._pub_seq - used_seq} ahead of last_used "
                f"{used_seq & 0xFFFF:#x} (published avail.idx {self._pub_seq & 0xFFFF:#x})",
            ), [])
        if OBSERVE_BARRIER_NEEDED:
            observe_barrier()
        return count

    def has_used(self) -> bool:
        """True when the device has published completions not yet reaped.  Raises
        :class:`QueueStateError` when closed."""
        try:
            return self._used_h[1] != self._used_seq & 0xFFFF
        except ValueError:  # the view was released by close() (try costs nothing in 3.11)
            raise QueueStateError("queue is closed") from None

    # -- interrupt (used-buffer notification) control ---------------------------------------

    def disable_interrupts(self) -> bool:
        """Ask the device not to send used-buffer notifications (advisory, §2.7.10); returns
        :meth:`has_used`."""
        if self._state_v is not _READY:
            self._refuse()
        if self.event_idx:
            # used_event one behind last_used: the device notifies only after 65536 more.
            self._avail[self._idx_used_event] = (self._used_seq - 1) & 0xFFFF
        else:
            self._avail[0] = VIRTQ_AVAIL_F_NO_INTERRUPT
        return self._used_h[1] != self._used_seq & 0xFFFF

    def enable_interrupts(self) -> bool:
        """Ask for used-buffer notifications again.  Returns True if used entries arrived
        meanwhile: the caller must reap instead of sleeping (the race of §2.7.7 and §2.7.14 -- the
        device may have completed a buffer after the last poll and before it could see this
        request, and will not notify for it)."""
        if self._state_v is not _READY:
            self._refuse()
        last_used = self._used_seq & 0xFFFF
        if self.event_idx:
            self._avail[self._idx_used_event] = last_used
        else:
            self._avail[0] = 0
        # Store (flags/used_event) -> load (used.idx): needs a full fence.
        full_fence()
        return self._used_h[1] != last_used

    def enable_interrupts_after(self, count: int) -> bool:
        """Ask for a used-buffer notification only once ``count`` more chains have
        completed (event idx: ``used_event = last_used + count - 1``, §2.7.10; without event
        idx the device cannot be told, so this is :meth:`enable_interrupts`).  ``count`` is
        clamped to the chains published and not yet reaped, so the wake-up it asks for can
        happen.  Returns True if ``count`` completions are already there (reap instead of
        sleeping: the race of §2.7.7, §2.7.14).  ``count`` 0 counts as 1.  Raises
        :class:`ArgumentError` for a count that is not an int >= 0."""
        # The class test first: it is what passes on the hot path.
        if (count.__class__ is not int or count < 0) and (
                not isinstance(count, int) or count < 0):
            raise ArgumentError("count", count, "must be an int >= 0")
        if not self.event_idx:
            return self.enable_interrupts()
        if self._state_v is not _READY:
            self._refuse()
        used_seq = self._used_seq
        count = max(1, min(count, self._pub_seq - used_seq))
        self._avail[self._idx_used_event] = (used_seq + count - 1) & 0xFFFF
        full_fence()  # store used_event -> load used.idx (§2.7.7; the mb() of §2.7.14)
        return ((self._used_h[1] - used_seq) & 0xFFFF) >= count

    def enable_interrupts_delayed(self) -> bool:
        """:meth:`enable_interrupts_after` about 3/4 of the chains in flight (Linux
        ``virtqueue_enable_cb_delayed``): one wake-up per batch instead of one per
        completion."""
        return self.enable_interrupts_after((self._pub_seq - self._used_seq) * 3 // 4 + 1)

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the views of the region (idempotent), so the region can be closed.
        Every later operation raises :class:`QueueStateError`."""
        if self._state_v is _CLOSED:
            return
        for name in self._views:
            getattr(self, name).release()
        self._mem.release()
        self._state_v = _CLOSED
        self._broken = None

    def __enter__(self) -> _SplitCore[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inspection -------------------------------------------------------------------------

    def in_flight_tokens(self) -> list[T]:
        raise NotImplementedError

    def _in_flight_heads(self) -> list[int]:
        raise NotImplementedError

    def ring(self) -> SplitRingView:
        """ctypes structures laid over the live rings (for inspection and tools; release
        with ``close()`` on the returned view before closing the region)."""
        if self._state_v is _CLOSED:
            raise QueueStateError("queue is closed")
        return SplitRingView(self._mem, self.layout)

    def _snapshot_extra(self) -> dict[str, Any]:
        return {}

    def _interrupts_on(self) -> bool:
        """Whether the driver currently asks for used-buffer notifications (read from the
        driver area it wrote, not kept twice: every attribute counts, see SplitQueue)."""
        if self.event_idx:
            return bool(self._avail[self._idx_used_event] != (self._used_seq - 1) & 0xFFFF)
        return not self._avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def snapshot(self) -> dict[str, Any]:
        """Driver state and ring indices as a plain dict (for logs, tests, the CLI)."""
        closed = self._state_v is _CLOSED
        broken = self.broken
        snap: dict[str, Any] = {
            "format": "split",
            "size": self.size,
            "state": self._state_v.value,
            "next_avail": self.next_avail,
            "published": self.published,
            "last_used": self.last_used,
            "num_in_flight": self.num_in_flight,
            "in_flight_heads": [] if closed else self._in_flight_heads(),
            "event_idx": self.event_idx,
            "interrupts": None if closed else self._interrupts_on(),
            "broken": None if broken is None else str(broken),
            "closed": closed,
            "desc_area": self.desc_area,
            "driver_area": self.driver_area,
            "device_area": self.device_area,
            "avail.flags": None if closed else self._avail[0],
            "avail.idx": None if closed else self._avail[1],
            "avail.used_event": None if closed else self._avail[self._idx_used_event],
            "used.flags": None if closed else self._used_h[0],
            "used.idx": None if closed else self._used_h[1],
            "used.avail_event": None if closed else self._used_h[self._idx_avail_event],
        }
        snap.update(self._snapshot_extra())
        return snap

    def describe(self) -> str:
        """A human-readable dump of the driver state and the live rings."""
        snap = self.snapshot()
        lines = [
            f"{type(self).__name__} size={self.size} desc@{self.desc_area:#x} "
            f"avail@{self.driver_area:#x} used@{self.device_area:#x} "
            f"event_idx={self.event_idx} state={snap['state']}",
            f"  driver: next_avail={snap['next_avail']:#06x} published={snap['published']:#06x} "
            f"last_used={snap['last_used']:#06x} in_flight={snap['num_in_flight']} "
            f"broken={snap['broken']}",
        ]
        if self._state_v is _CLOSED:
            lines.append("  (closed)")
            return "\n".join(lines)
        view = self.ring()
        try:
            avail, used = view.avail, view.used
            lines.append(f"  avail: flags={avail.flags:#x} idx={avail.idx:#06x} "
                         f"used_event={avail.used_event:#06x}")
            lines.append(f"  used:  flags={used.flags:#x} idx={used.idx:#06x} "
                         f"avail_event={used.avail_event:#06x}")
            for head in snap["in_flight_heads"]:
                chain = []
                d = head
                # What the driver wrote; bounded by the ring size, so a scribbled "next"
                # cannot loop.
                for _ in range(self.size):
                    desc = view.desc[d]
                    chain.append(f"[{d}] addr={desc.addr:#x} len={desc.len} "
                                 f"flags={flag_names(desc.flags)} next={desc.next}")
                    if not desc.flags & VIRTQ_DESC_F_NEXT:
                        break
                    d = desc.next & self._mask
                lines.append(f"  head {head}: " + " -> ".join(chain))
            pending = (used.idx - self._used_seq) & 0xFFFF
            for k in range(min(pending, self.size)):
                slot = (self._used_seq + k) & self._mask
                elem = used.ring[slot]
                lines.append(f"  used.ring[{slot}] = id {elem.id} len {elem.len} (unreaped)")
        finally:
            view.close()
        return "\n".join(lines)


class SplitRingView:
    """ctypes structures over a split ring: ``desc`` (VirtqDesc[N]), ``avail``, ``used``."""

    def __init__(self, mem: memoryview, layout: SplitLayout) -> None:
        n = layout.queue_size
        self._views = [
            mem[layout.desc : layout.desc + DESC_SIZE * n],
            mem[layout.avail : layout.avail + avail_nbytes(n)],
            mem[layout.used : layout.used + used_nbytes(n)],
        ]
        self.desc: Any = (VirtqDesc * n).from_buffer(self._views[0])
        self.avail: Any = avail_ring_type(n).from_buffer(self._views[1])
        self.used: Any = used_ring_type(n).from_buffer(self._views[2])

    def close(self) -> None:
        """Drop the ctypes structures and release the views (call it before closing the region)."""
        del self.desc, self.avail, self.used
        for v in self._views:
            v.release()

    def __enter__(self) -> SplitRingView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ring_run(view: memoryview, first: int, count: int, n: int, *, step: int = 1,
             offset: int = 0) -> list[int]:
    """Entries ``first .. first + count - 1`` (mod ``n``) of a ring held in ``view`` as a
    list, in one C-level ``tolist()`` per contiguous run (two when the run crosses the
    ring's end).  Entry ``i`` is ``view[step * i + offset]``: ``step=2`` picks one field of
    two-field elements (used.ring as u32 pairs: id at offset 0, len at offset 1)."""
    end = first + count
    if end <= n:
        return view[step * first + offset : step * end + offset : step].tolist()
    return (view[step * first + offset :: step].tolist()
            + view[offset : step * (end - n) + offset : step].tolist())


def flag_names(flags: int) -> str:
    """``VIRTQ_DESC_F_*`` bits as text (``NEXT|WRITE``)."""
    names = [n for bit, n in ((VIRTQ_DESC_F_NEXT, "NEXT"), (VIRTQ_DESC_F_WRITE, "WRITE"),
                              (VIRTQ_DESC_F_INDIRECT, "INDIRECT")) if flags & bit]
    return "|".join(names) or "0"
