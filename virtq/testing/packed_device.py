"""The device side of a packed virtqueue (VIRTIO 1.2 §2.8), for tests and peers.

:class:`PackedDeviceQueue` is the *device's* half of a packed ring over the same memory the
driver uses -- in-process, or in another process that attached the driver's
:class:`~virtq.memory.MemfdRegion` by fd.  It is written from the specification alone and
shares nothing with the driver side beyond the wire layout
(:class:`~virtq.layout.PackedLayout`), so a round trip between them checks one against the
other.

How the ring is read and written (the section numbers are those of packed-ring.tex):

* The device keeps two positions with a one-bit wrap counter each, both starting at 1
  (§2.8.1 "Driver and Device Ring Wrap Counters"): where it looks for the next *available*
  descriptor and where it writes the next *used* one.  A descriptor is available when its
  AVAIL bit equals the avail wrap counter and its USED bit does not; a used descriptor has
  AVAIL == USED == the used wrap counter.  Each counter toggles when its position passes the
  end of the ring.
* A buffer is a run of descriptors linked by NEXT; its Buffer ID is in the *last* one
  (§2.8.6).  One used descriptor answers the whole run, and the device's used position then
  skips the run's length (§2.8.2, §2.8.6) -- which is why :meth:`PackedDeviceQueue.pop`
  remembers, per buffer id, how many ring descriptors the buffer occupied.
* With VIRTIO_F_IN_ORDER one used descriptor (the id of a batch's last buffer) retires the
  whole batch, and the device skips the batch's total length (§2.8.8 "In-order use of
  descriptors"): :meth:`PackedDeviceQueue.push_in_order`.
* Event suppression (§2.8.10, §2.8.14): the *driver* area tells the device when to send
  used-buffer notifications (read by :meth:`PackedDeviceQueue.publish_used`), the *device*
  area tells the driver when to send available-buffer notifications (written by
  :meth:`~PackedDeviceQueue.enable_notifications` and friends).

The driver is the untrusted side: anything impossible it wrote into the ring -- an address
outside every region, a list longer than allowed, a readable element after a writable one, an
indirect descriptor inside a NEXT list, a bad indirect table, a buffer id out of range or
still in flight, more descriptors outstanding than the ring has slots -- raises
:class:`~virtq.testing.DriverProtocolError` and leaves the device's positions unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from virtq._sys.fence import full_fence, observe_barrier, publish_barrier
from virtq.abi import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from virtq.errors import ArgumentError, QueueStateError
from virtq.layout import PackedLayout, need_event
from virtq.layout.split import DESC_SIZE
from virtq.memory import MemoryRegion
from virtq.testing.device import DriverProtocolError, Segment, byte_data, check_uint

#: ``struct pvirtq_desc`` (§2.8.13): le64 addr, le32 len, le16 id, le16 flags.
_PDESC = struct.Struct("<QIHH")
#: Halfword index of ``id`` and ``flags`` inside a descriptor, word index of ``len``.
_ID_H, _FLAGS_H, _LEN_W = 6, 7, 2
#: ``struct pvirtq_event_suppress`` (§2.8.14) as two halfwords: [0] off_wrap, [1] flags.
_EVENT_OFF_WRAP, _EVENT_FLAGS = 0, 1
#: desc_event_flags is a 2-bit field; the other 14 bits are reserved.
_EVENT_FLAGS_MASK = 0x3
_WRAP_SHIFT = 15
_OFF_MASK = (1 << _WRAP_SHIFT) - 1
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


def is_avail(flags: int, wrap: int) -> bool:
    """§2.8.1: available for a reader whose wrap counter is ``wrap`` -- AVAIL matches it
    and USED does not."""
    return bool(flags & VIRTQ_DESC_F_AVAIL) == bool(wrap) and bool(
        flags & VIRTQ_DESC_F_USED) != bool(wrap)


def used_flags(wrap: int, written: bool) -> int:
    """Flags of a used descriptor written with used wrap counter ``wrap`` (§2.8.1: AVAIL and
    USED both equal to it) and WRITE iff the device wrote into the buffer (§2.8.3)."""
    bits = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if wrap else 0
    return bits | (VIRTQ_DESC_F_WRITE if written else 0)


def vring_base(avail_index: int, avail_wrap: int, used_index: int, used_wrap: int) -> int:
    """The 32-bit GET_VRING_BASE / SET_VRING_BASE value of a packed ring as QEMU
    (``virtio_queue_packed_get_last_avail_idx``) and DPDK encode it: avail position, avail
    wrap counter in bit 15, used position in bits 16..30, used wrap counter in bit 31."""
    return ((avail_index & _OFF_MASK) | (avail_wrap & 1) << 15
            | (used_index & _OFF_MASK) << 16 | (used_wrap & 1) << 31)


def _check_position(name: str, value: object, size: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < size:
        raise ArgumentError(name, value, f"must be a ring position in 0..{size - 1}")
    return value


def _check_wrap(name: str, value: object) -> int:
    if not isinstance(value, int) or value not in (0, 1):
        raise ArgumentError(name, value, "a wrap counter is 0 or 1")
    return int(value)


class PackedDeviceQueue:
    """The device's view of a packed ring laid out by ``layout`` in ``region``.

    ``iova`` is the device address of the region's byte 0; ``regions`` adds further
    ``(iova, region)`` pairs that descriptors may point into.  ``event_idx`` is whether
    VIRTIO_F_EVENT_IDX was negotiated (RING_EVENT_FLAGS_DESC is valid only then, §2.8.10).

    ``avail_index``/``avail_wrap`` and ``used_index``/``used_wrap`` are where the device
    starts (vhost-user SET_VRING_BASE for a packed ring); a fresh ring starts at position 0
    with both counters 1 (§2.8.1), and the used position defaults to the avail one (nothing
    in flight).  ``max_segments`` is the device's limit on the descriptors of one list
    (direct or in an indirect table); §2.8.5: "If not limited, the maximum number of
    descriptors in a list is the virtqueue size".

    Raises :class:`~virtq.errors.ArgumentError` for a layout that is not a
    :class:`~virtq.layout.PackedLayout`, a region smaller than it, or a position / wrap
    counter out of range.
    """

    def __init__(
        self,
        region: MemoryRegion,
        layout: PackedLayout,
        *,
        iova: int,
        event_idx: bool = False,
        avail_index: int = 0,
        avail_wrap: int = 1,
        used_index: int | None = None,
        used_wrap: int | None = None,
        regions: Sequence[tuple[int, MemoryRegion]] | None = None,
        max_segments: int | None = None,
    ) -> None:
        if not isinstance(layout, PackedLayout):
            raise ArgumentError("layout", layout, "must be a PackedLayout")
        if not isinstance(region, MemoryRegion):
            raise ArgumentError("region", region, "must be a MemoryRegion")
        check_uint("iova", iova, _U64)
        n = layout.queue_size
        if region.nbytes < layout.nbytes:
            raise ArgumentError("region", region, f"must hold the layout's {layout.nbytes} "
                                "bytes")
        self.size = n
        self.layout = layout
        self.event_idx = bool(event_idx)
        self._avail_index = _check_position("avail_index", avail_index, n)
        self._avail_wrap = _check_wrap("avail_wrap", avail_wrap)
        self._used_index = _check_position(
            "used_index", avail_index if used_index is None else used_index, n)
        self._used_wrap = _check_wrap(
            "used_wrap", self._avail_wrap if used_wrap is None else used_wrap)
        # The used position the driver has been shown (pending used descriptors excluded):
        # the driver may reuse ring slots only up to here.
        self._published = (self._used_index, self._used_wrap)
        if max_segments is None:
            max_segments = n
        if not isinstance(max_segments, int) or max_segments < 1:
            raise ArgumentError("max_segments", max_segments, "must be an int >= 1")
        self.max_segments = max_segments
        # Every view taken, released in reverse order by close().
        self._views: list[memoryview] = []
        # Address translation: (iova base, size, view); the queue's own region first.
        self._spaces: list[tuple[int, int, memoryview]] = []
        try:
            for base, space in [(iova, region), *(regions or [])]:
                self._spaces.append((base, space.nbytes, self._take(space.view())))
            self._desc = self._take(region.view(layout.desc, DESC_SIZE * n))
            self._desc_h = self._take(self._desc.cast("H"))
            self._desc_w = self._take(self._desc.cast("I"))
            self._driver_event = self._take(
                self._take(region.view(layout.driver_event, 4)).cast("H"))
            self._device_event = self._take(
                self._take(region.view(layout.device_event, 4)).cast("H"))
        except BaseException:
            self.close()
            raise
        self._closed = False
        # Buffers popped and not used yet: id -> ring descriptors the buffer occupied, in
        # the order they were popped (dicts keep insertion order: push_in_order's batches).
        self._inflight: dict[int, int] = {}
        # Used descriptors written but not yet published: (position, wrap, id, len).
        self._pending: list[tuple[int, int, int, int]] = []

    def add_region(self, iova: int, region: MemoryRegion) -> None:
        """Make ``region`` reachable at device address ``iova`` too (memory the driver
        shared after the queue was set up).  Raises :class:`QueueStateError` after
        :meth:`close`, :class:`ArgumentError` for a bad ``iova`` or ``region``."""
        self._check_open()
        check_uint("iova", iova, _U64)
        if not isinstance(region, MemoryRegion):
            raise ArgumentError("region", region, "must be a MemoryRegion")
        self._spaces.append((iova, region.nbytes, self._take(region.view())))

    def _take(self, view: memoryview) -> memoryview:
        self._views.append(view)
        return view

    def _check_open(self) -> None:
        if self._closed:
            raise QueueStateError("the PackedDeviceQueue is closed")

    # -- state ----------------------------------------------------------------------------

    @property
    def avail_index(self) -> int:
        """Ring position of the next descriptor :meth:`pop` looks at."""
        return self._avail_index

    @property
    def avail_wrap(self) -> int:
        """The device's avail wrap counter (what AVAIL must equal at :attr:`avail_index`)."""
        return self._avail_wrap

    @property
    def used_index(self) -> int:
        """Ring position of the next used descriptor :meth:`push` writes (pending,
        unpublished used descriptors included)."""
        return self._used_index

    @property
    def used_wrap(self) -> int:
        """The Device Ring Wrap Counter (§2.8.1) at :attr:`used_index`."""
        return self._used_wrap

    @property
    def vring_base(self) -> int:
        """GET_VRING_BASE's value for this ring: see :func:`vring_base`."""
        return vring_base(self._avail_index, self._avail_wrap, self._used_index,
                          self._used_wrap)

    @property
    def inflight(self) -> Mapping[int, int]:
        """Buffer ids popped and not used yet -> ring descriptors each occupies (a copy,
        in pop order)."""
        return dict(self._inflight)

    @property
    def pending_used(self) -> int:
        """Used descriptors written by ``push(..., publish=False)`` and not yet published."""
        return len(self._pending)

    # -- memory access by device address --------------------------------------------------

    def _translate(self, iova: int, length: int) -> memoryview:
        if iova.__class__ is not int or length.__class__ is not int \
                or not 0 <= iova <= _U64 or not 0 <= length <= _U64:
            check_uint("iova", iova, _U64)
            check_uint("length", length, _U64)
        self._check_open()
        for base, size, view in self._spaces:
            if base <= iova and iova + length <= base + size:
                return view[iova - base : iova - base + length]
        raise DriverProtocolError(f"address range [{iova:#x}, +{length}) is not mapped")

    def read(self, iova: int, length: int) -> bytes:
        """Bytes at device address ``iova``; raises DriverProtocolError when unmapped."""
        return bytes(self._translate(iova, length))

    def write(self, iova: int, data: bytes | memoryview) -> None:
        """Store ``data`` at device address ``iova``; raises DriverProtocolError when
        unmapped."""
        view = byte_data(data)
        self._translate(iova, len(view))[:] = view

    def view(self, iova: int, length: int) -> memoryview:
        """A writable view of device memory; raises DriverProtocolError when unmapped."""
        return self._translate(iova, length)

    # -- consuming available buffers ------------------------------------------------------

    def _flags(self, position: int) -> int:
        return int(self._desc_h[position * 8 + _FLAGS_H])

    def avail_pending(self) -> int:
        """Complete buffers the driver has made available and the device has not popped.

        Counts from :attr:`avail_index` while the next head is available, skipping each
        buffer's NEXT run; stops (without raising) at the first descriptor that is not
        available or at a run :meth:`pop` would reject for its length."""
        self._check_open()
        position, wrap = self._avail_index, self._avail_wrap
        buffers = seen = 0
        while seen < self.size:
            flags = self._flags(position)
            if not is_avail(flags, wrap):
                break
            observe_barrier()  # the list behind a head after the head's flags (§2.8.21)
            seen += 1
            position += 1
            if position == self.size:
                position, wrap = 0, wrap ^ 1
            if not flags & VIRTQ_DESC_F_NEXT:
                buffers += 1  # only complete lists count
        return buffers

    def _room(self) -> int:
        """Ring slots the driver may fill beyond the device's avail position: the size less
        the slots from the published used position to the avail position (§2.8.17: the
        driver makes sure there is space for a whole list before exposing it)."""
        used_index, used_wrap = self._published
        behind = self._avail_index - used_index
        if self._avail_wrap != used_wrap:
            behind += self.size
        return self.size - behind

    def pop(self) -> tuple[int, list[Segment]] | None:
        """The next available buffer in ring order as ``(buffer_id, segments)`` (NEXT runs
        and indirect tables followed), or None when the descriptor at :attr:`avail_index`
        is not available.

        Raises :class:`~virtq.testing.DriverProtocolError` (and consumes nothing) for any
        impossible ring content: see the module docstring."""
        self._check_open()
        position, wrap = self._avail_index, self._avail_wrap
        if not is_avail(self._flags(position), wrap):
            return None
        # §2.8.21 "Updating flags": the driver wrote the list before the head's flags; read
        # the rest only after the flags that exposed it.
        observe_barrier()
        segments: list[Segment] = []
        seen_writable = False
        count = 0
        limit = min(self.size, self.max_segments)
        room = self._room()
        while True:
            if count == limit:
                # §2.8.17: a list no longer than the queue size (or the device's limit);
                # a ring full of NEXT flags would otherwise be walked round and round.
                raise DriverProtocolError(
                    f"descriptor list at position {self._avail_index} is longer than "
                    f"{limit} descriptors")
            if count == room:
                # The driver wrote into slots whose used descriptors it has not been shown:
                # more descriptors outstanding than the ring holds (§2.8.17).
                raise DriverProtocolError(
                    f"descriptor {position} made available while the ring's {self.size} "
                    "slots are all outstanding (the driver overran the used position)")
            here = position
            addr, length, buffer_id, flags = _PDESC.unpack_from(self._desc, here * DESC_SIZE)
            if count and not is_avail(flags, wrap):
                # §2.8.6: flags must be right in every descriptor of the list, and the
                # driver exposes the head only after the rest (§2.8.17).
                raise DriverProtocolError(
                    f"descriptor {here} continues a list but is not available "
                    f"(flags {flags:#06x}, wrap counter {wrap})")
            count += 1
            position += 1
            if position == self.size:
                position, wrap = 0, wrap ^ 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                # §2.8.19: no INDIRECT in a list linked by NEXT (neither carrying NEXT nor
                # following a descriptor that did).
                if flags & VIRTQ_DESC_F_NEXT or count > 1:
                    raise DriverProtocolError(
                        f"indirect descriptor at {here} is part of a NEXT list (§2.8.19)")
                segments = self._walk_indirect(addr, length)
            else:
                writable = bool(flags & VIRTQ_DESC_F_WRITE)
                if seen_writable and not writable:
                    raise DriverProtocolError(
                        "device-readable descriptor after a device-writable one (§2.8.17)")
                seen_writable |= writable
                self._translate(addr, length)  # the device never trusts an address
                segments.append(Segment(addr, length, writable))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
        # §2.8.6: the Buffer ID is in the last descriptor of the list.
        if buffer_id >= self.size:
            raise DriverProtocolError(f"buffer id {buffer_id} >= queue size {self.size}")
        if buffer_id in self._inflight:
            raise DriverProtocolError(
                f"buffer id {buffer_id} made available again before the device used it")
        self._inflight[buffer_id] = count
        self._avail_index, self._avail_wrap = position, wrap
        return buffer_id, segments

    def _walk_indirect(self, addr: int, length: int) -> list[Segment]:
        """§2.8.7: a table of ``len / 16`` sequential descriptors; only WRITE is valid in
        them (driver normative, §2.8.19)."""
        if not length or length % DESC_SIZE:
            raise DriverProtocolError(
                f"indirect table length {length} is not a non-zero multiple of {DESC_SIZE}")
        entries = length // DESC_SIZE
        if entries > self.max_segments:
            raise DriverProtocolError(
                f"indirect table of {entries} descriptors exceeds the limit "
                f"{self.max_segments}")
        table = self._translate(addr, length)
        segments: list[Segment] = []
        seen_writable = False
        for i in range(entries):
            e_addr, e_len, _, e_flags = _PDESC.unpack_from(table, i * DESC_SIZE)
            if e_flags & ~VIRTQ_DESC_F_WRITE:
                raise DriverProtocolError(
                    f"indirect descriptor {i} has flags {e_flags:#06x}: only WRITE is "
                    "allowed in an indirect table (§2.8.19)")
            writable = bool(e_flags & VIRTQ_DESC_F_WRITE)
            if seen_writable and not writable:
                raise DriverProtocolError(
                    "device-readable descriptor after a device-writable one (§2.8.17)")
            seen_writable |= writable
            self._translate(e_addr, e_len)
            segments.append(Segment(e_addr, e_len, writable))
        return segments

    # -- returning used buffers -----------------------------------------------------------

    def _check_len(self, written_len: object) -> int:
        if (not isinstance(written_len, int) or isinstance(written_len, bool)
                or not 0 <= written_len <= _U32):
            raise ArgumentError("written_len", written_len, "must be an int in 0..2**32-1")
        return written_len

    def _check_inflight(self, buffer_id: object) -> int:
        if not isinstance(buffer_id, int) or buffer_id not in self._inflight:
            raise ArgumentError("buffer_id", buffer_id,
                                f"must be a popped, unused buffer id {sorted(self._inflight)}")
        return buffer_id

    def _append_used(self, buffer_id: int, written_len: int, descriptors: int) -> None:
        self._pending.append((self._used_index, self._used_wrap, buffer_id, written_len))
        position = self._used_index + descriptors
        if position >= self.size:
            position -= self.size
            self._used_wrap ^= 1
        self._used_index = position

    def push(self, buffer_id: int, written_len: int, *, publish: bool = True) -> bool:
        """Mark buffer ``buffer_id`` used with ``written_len`` bytes written: one used
        descriptor at :attr:`used_index`, which then skips the buffer's descriptors
        (§2.8.6).  With ``publish`` (default) it is made visible at once and the return
        value is whether the driver wants a used-buffer notification; otherwise it waits
        for :meth:`publish_used` and False is returned.

        Raises :class:`~virtq.errors.ArgumentError` for an id that was not popped or is
        already used, or a length outside 0..2**32-1, and
        :class:`~virtq.errors.QueueStateError` after :meth:`close`."""
        self._check_open()
        self._check_len(written_len)
        self._check_inflight(buffer_id)
        descriptors = self._inflight.pop(buffer_id)
        self._append_used(buffer_id, written_len, descriptors)
        return self.publish_used() if publish else False

    def push_in_order(self, last_buffer_id: int, written_len: int, *,
                      publish: bool = True) -> bool:
        """VIRTIO_F_IN_ORDER batched retirement (§2.8.8): every buffer popped up to and
        including ``last_buffer_id`` and not yet used is used by ONE used descriptor
        carrying ``last_buffer_id`` and ``written_len`` (the earlier ones count as used
        completely); the used position skips the whole batch's descriptors.  Returns as
        :meth:`push`.  Raises :class:`~virtq.errors.ArgumentError` like :meth:`push`."""
        self._check_open()
        self._check_len(written_len)
        self._check_inflight(last_buffer_id)
        total = 0
        for buffer_id in list(self._inflight):
            total += self._inflight.pop(buffer_id)
            if buffer_id == last_buffer_id:
                break
        self._append_used(last_buffer_id, written_len, total)
        return self.publish_used() if publish else False

    def publish_used(self) -> bool:
        """Make the pending used descriptors visible: every field and every later flags
        word first, then -- after a write barrier -- the FIRST one's flags, the single
        store the driver polls (§2.8.2; as §2.8.9 asks of multi-buffer requests) -- the
        packed counterpart of one used.idx store.  Returns whether the driver wants a
        used-buffer notification (False when nothing was pending)."""
        self._check_open()
        if not self._pending:
            return False
        first_position = self._pending[0][0]
        for position, _, buffer_id, written_len in self._pending:
            self._desc_w[position * 4 + _LEN_W] = written_len
            self._desc_h[position * 8 + _ID_H] = buffer_id
        for position, wrap, _, written_len in self._pending[1:]:
            self._desc_h[position * 8 + _FLAGS_H] = used_flags(wrap, written_len > 0)
        _, first_wrap, _, first_len = self._pending[0]
        publish_barrier()  # buffer data and descriptor fields before the flags exposing them
        self._desc_h[first_position * 8 + _FLAGS_H] = used_flags(first_wrap, first_len > 0)
        self._pending.clear()
        self._published = (self._used_index, self._used_wrap)
        full_fence()  # the flags store before reading the driver's suppression structure
        return self._driver_wants_notification(first_position)

    def _driver_wants_notification(self, old: int) -> bool:
        """§2.8.10 with the wrap adjustment of DPDK's ``vhost_vring_call_packed`` (and, on
        the driver side, Linux's ``virtqueue_kick_prepare_packed``): positions are
        linearised so a batch that crossed the ring's end is the window [old - N, new) and an
        event offset of the other wrap counter lies N lower."""
        flags = self._driver_event[_EVENT_FLAGS] & _EVENT_FLAGS_MASK
        if not self.event_idx or flags != RING_EVENT_FLAGS_DESC:
            # DESC without EVENT_IDX and the reserved value 3 are not "disable".
            return flags != RING_EVENT_FLAGS_DISABLE
        observe_barrier()  # off_wrap after the flags that made it meaningful
        off_wrap = self._driver_event[_EVENT_OFF_WRAP]
        event = off_wrap & _OFF_MASK
        new = self._used_index
        if new <= old:  # the batch passed the ring's end
            old -= self.size
        if off_wrap >> _WRAP_SHIFT != self._used_wrap:
            event -= self.size
        return need_event(event, new, old)

    # -- device event suppression (available-buffer notifications) ------------------------

    def disable_notifications(self) -> None:
        """Ask the driver for no available-buffer notifications (RING_EVENT_FLAGS_DISABLE)."""
        self._check_open()
        self._device_event[_EVENT_FLAGS] = RING_EVENT_FLAGS_DISABLE

    def enable_notifications(self) -> None:
        """Ask for available-buffer notifications again: for every buffer
        (RING_EVENT_FLAGS_ENABLE), or with EVENT_IDX for the one made available at the
        device's next avail position (RING_EVENT_FLAGS_DESC).  The caller re-checks
        :meth:`pop` afterwards (a buffer may have arrived meanwhile)."""
        self._check_open()
        if self.event_idx:
            self.set_avail_event(self._avail_index, self._avail_wrap)
        else:
            self._device_event[_EVENT_FLAGS] = RING_EVENT_FLAGS_ENABLE
        full_fence()  # the suppression store before the caller re-reads the ring

    def set_avail_event(self, position: int, wrap: int) -> None:
        """With EVENT_IDX: ask for a notification once the driver makes the descriptor at
        ``position`` available with wrap counter ``wrap`` (§2.8.14 desc_event_off /
        desc_event_wrap, then flags RING_EVENT_FLAGS_DESC).

        Raises :class:`~virtq.errors.QueueStateError` without EVENT_IDX (DESC is valid only
        then, §2.8.10) and :class:`~virtq.errors.ArgumentError` for a bad position or
        wrap counter."""
        self._check_open()
        if not self.event_idx:
            raise QueueStateError("RING_EVENT_FLAGS_DESC needs VIRTIO_F_EVENT_IDX")
        _check_position("position", position, self.size)
        wrap = _check_wrap("wrap", wrap)
        self._device_event[_EVENT_OFF_WRAP] = position | wrap << _WRAP_SHIFT
        publish_barrier()  # the offset before the flags that make the driver read it
        self._device_event[_EVENT_FLAGS] = RING_EVENT_FLAGS_DESC

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Release every view of the driver's memory (idempotent); afterwards every method
        raises :class:`~virtq.errors.QueueStateError`.  Views returned by :meth:`view` are
        the holder's to release."""
        self._closed = True
        while self._views:
            self._views.pop().release()
        self._spaces.clear()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def __enter__(self) -> PackedDeviceQueue:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["PackedDeviceQueue", "is_avail", "used_flags", "vring_base"]
