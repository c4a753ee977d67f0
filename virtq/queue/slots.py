"""A split virtqueue of fixed one-buffer slots, made available in ring order (VIRTIO 1.2 §2.7).

Many drivers post the same buffers over and over: a network driver's receive and transmit
buffers, an entropy driver's, a console's.  For them :class:`SlotQueue` fixes everything a
general queue has to write and check per chain:

* **Descriptors are written once.**  Descriptor ``d`` is a one-descriptor chain over slot
  ``d``'s buffer.  Only its ``len`` ever changes, and only for device-readable slots whose
  content varies in length (a transmitted frame).
* **The avail ring is written once.**  Slot ``d`` is only ever made available at avail
  positions ``p`` with ``p mod size == d``, so ``avail.ring[d] = d`` holds forever and making
  ``k`` slots available is a ``len`` rewrite (if any) and one ``avail.idx`` store.  Placing
  any head at any position is the driver's choice (§2.7.6); this is one such choice.
* **An in-order completion is checked in one comparison.**  A device that uses buffers in
  the order they were made available (DPDK's vhost does for these queues; it is what
  VIRTIO_F_IN_ORDER would promise, §2.7.9, which is not negotiated here) writes
  ``used.ring[p mod size].id == p mod size``.  The reap reads the ids and lengths of all new
  elements with one C-level ``tolist()`` each and compares them with that expectation
  instead of validating element by element.

Nothing is assumed of the device.  If it completes out of order (allowed, §2.7.8), the
elements are validated one by one (each id must be a slot in flight, each completed once;
each ``len`` within the slot), the completions are returned at once in used-ring order, and
the queue stays correct.  What changes is reuse: slots are reused first in, first out, so a
slot the device completed early is made available again only when the ones submitted before
it have completed too.  A device that holds one buffer for long therefore delays reuse of
the others -- use :class:`~virtq.queue.SplitQueue` for such a device.

Trust model as in :mod:`virtq.queue.split`: the driver never reads back descriptors or the
avail ring (a device that scribbles over them only misleads itself), and every value the
device writes passes :meth:`SlotQueue.reap` before it is acted on.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

from virtq.abi import VIRTQ_DESC_F_WRITE
from virtq.errors import ArgumentError, QueueFullError
from virtq.layout import SplitLayout
from virtq.memory import MemoryRegion
from virtq.queue._splitcore import _READY, _SplitCore, ring_run
from virtq.queue.split import _PACK_DESC, _U32_LIMIT
from virtq.types import Iova

_U64_LIMIT = 1 << 64


class SlotQueue(_SplitCore[int]):
    """A split virtqueue whose ``size`` descriptors are fixed one-buffer slots.

    ``slots`` holds the device address of each slot's buffer (one per descriptor, in
    descriptor order), each ``slot_size`` bytes; ``writable`` says whether the device writes
    them (a receive queue) or reads them (a transmit queue).

    Use: write the buffers of slots ``next_slot``, ``next_slot + 1``, ... (mod ``size``),
    :meth:`submit` how many, :meth:`publish`; later :meth:`reap` the completions (or
    ``drain_used``/``pop_used``, which return ``(slot, len)`` pairs: a slot is its own
    token).  A sibling of :class:`~virtq.queue.SplitQueue` over the same split-ring core
    (publish, interrupt control, the ``used.idx`` check, state, reset, close).
    """

    _views = (*_SplitCore._views, "_used_i")

    def __init__(
        self,
        region: MemoryRegion,
        layout: SplitLayout,
        *,
        iova: Iova,
        slots: Sequence[int],
        slot_size: int,
        writable: bool,
        event_idx: bool = False,
        in_order: bool = False,
        start_index: int = 0,
        strict_len: bool = True,
    ) -> None:
        n = layout.queue_size
        addrs = list(slots)
        if len(addrs) != n:
            raise ArgumentError("slots", len(addrs), f"one buffer address per descriptor ({n})")
        if not isinstance(slot_size, int) or not 0 < slot_size < _U32_LIMIT:
            raise ArgumentError("slot_size", slot_size, "must be in 1..2**32-1")
        for addr in addrs:
            if not isinstance(addr, int) or not 0 <= addr <= _U64_LIMIT - slot_size:
                raise ArgumentError("slots", addr, "each must be a u64 address with room "
                                    f"for {slot_size} bytes")
        super().__init__(region, layout, iova=iova, event_idx=event_idx,
                         start_index=start_index, strict_len=strict_len)
        # used.ring as u32 pairs: [2i] id, [2i + 1] len (struct virtq_used_elem, §2.7.8)
        used = layout.used
        self._used_i = self._mem[used + 4 : used + 4 + 8 * n].cast("I")
        self.slot_size = slot_size
        self.writable = bool(writable)
        #: VIRTIO_F_IN_ORDER: slots already go to the device in ring order (§2.7.9); the
        #: device may then retire a batch with one used element naming its last slot.
        self.in_order = bool(in_order)
        # What the device may report writing into a slot (§2.7.8: used.len counts bytes
        # written into device-writable buffers; a device-readable slot has none).
        self._capacity = slot_size if writable else 0
        # Expected used ids for positions first..first+count-1 (mod size), as one slice for
        # any first < size and count <= size; and count zero lengths.  (One attribute for
        # both: past 29 instance attributes CPython 3.11 stops sharing the keys of instance
        # dicts, and every attribute load gets slower.)
        self._expect = (list(range(n)) * 2, [0] * n, addrs)
        self._rebuild()

    def _rebuild(self) -> None:
        """Write the fixed descriptors and avail entries (after the rings were zeroed)."""
        n = self.size
        flags = VIRTQ_DESC_F_WRITE if self.writable else 0
        for d, addr in enumerate(self._expect[2]):
            _PACK_DESC(self._desc_mem, d << 4, addr, self.slot_size, flags, 0)
        self._avail[2 : 2 + n] = array("H", range(n))  # avail.ring[d] = d, for good
        # Slots are reused first in, first out: positions front .. next_avail - 1 are taken
        # (in flight, or completed early while an older one is not), the rest are free.
        self._front = self._avail_seq
        self._early = bytearray(n)  # 1: completed while an older slot was still in flight
        self._early_count = 0

    # -- state ----------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Slots :meth:`submit` can take now."""
        return self.size - (self._avail_seq - self._front)

    @property
    def next_slot(self) -> int:
        """The slot the next :meth:`submit` makes available first."""
        return self._avail_seq & self._mask

    def in_flight_tokens(self) -> list[int]:
        """The slots submitted and not yet reaped, in submission order."""
        early = self._early
        mask = self._mask
        return [s for s in ((p & mask) for p in range(self._front, self._avail_seq))
                if not early[s]]

    def _in_flight_heads(self) -> list[int]:
        return sorted(self.in_flight_tokens())

    # An in-order batch a limited reap stopped inside: (used sequence of its last slot,
    # the length its used element reported), or None.
    _batch: tuple[int, int] | None = None

    def _forget(self) -> list[int]:
        self._batch = None
        return self.in_flight_tokens()

    def _snapshot_extra(self) -> dict[str, Any]:
        return {"num_free": self.num_free, "slot_size": self.slot_size,
                "writable": self.writable}

    # -- submitting -----------------------------------------------------------------------

    def submit(self, count: int, lengths: Sequence[int] | None = None) -> int:
        """Make the next ``count`` slots available (visible after :meth:`publish`) and
        return the first: they are ``next_slot``, ``next_slot + 1``, ... mod ``size``, so
        write their buffers before.  ``lengths`` (device-readable slots only) sets how many
        bytes of each the device reads, 1..``slot_size``; without it each keeps the length
        it had (``slot_size`` to begin with).  All or nothing: :class:`QueueFullError`,
        :class:`ArgumentError`.  Raises :class:`QueueFullError` when fewer slots are free,
        :class:`ArgumentError` for a bad count or length, and the queue's state errors."""
        if self._state_v is not _READY:
            self._refuse()
        pos = self._avail_seq
        free = self.size - (pos - self._front)
        if (count.__class__ is not int or count < 0) and (
                not isinstance(count, int) or count < 0):
            raise ArgumentError("count", count, "must be an int >= 0")
        if count > free:
            raise QueueFullError(count, free)
        first = pos & self._mask
        if lengths is not None:
            self._write_lengths(first, count, lengths)
        self._avail_seq = pos + count
        return first

    def _write_lengths(self, first: int, count: int, lengths: Sequence[int]) -> None:
        if self.writable:
            raise ArgumentError("lengths", "...", "only device-readable slots take lengths "
                                "(a writable slot's capacity is checked against used.len)")
        try:
            nlen = len(lengths)
        except TypeError:
            raise ArgumentError("lengths", lengths, "must be a sequence of ints") from None
        if nlen != count:
            raise ArgumentError("lengths", nlen, f"one per slot ({count})")
        if not count:
            return
        try:
            ok = min(lengths) > 0 and max(lengths) <= self.slot_size
            values = array("I", lengths)
        except (TypeError, OverflowError):
            ok = False
        if not ok:
            bad = next(x for x in lengths
                       if not isinstance(x, int) or not 0 < x <= self.slot_size)
            raise ArgumentError("lengths", bad, f"must be ints in 1..{self.slot_size}")
        # virtq_desc.len is u32 [4d + 2] of the table (§2.7.5): a strided store per run.
        desc_w = self._desc_w
        end = first + count
        if end <= self.size:
            desc_w[4 * first + 2 : 4 * end + 2 : 4] = values
        else:
            k = self.size - first
            desc_w[4 * first + 2 :: 4] = values[:k]
            desc_w[2 : 4 * (count - k) + 2 : 4] = values[k:]

    # -- reaping --------------------------------------------------------------------------

    def reap(self, limit: int | None = None) -> tuple[list[int], list[int]]:
        """The slots the device completed since the last reap (at most ``limit``), in
        used-ring order, and the bytes it wrote into each (``used.len``, validated against
        the slot: 0 for a device-readable slot).  ``([], [])`` when there are none.  Raises
        :class:`~virtq.errors.DeviceProtocolError` for an impossible completion (the queue
        is then broken; ``err.completed`` holds the valid ``(slot, len)`` pairs before it).
        """
        if self._state_v is not _READY:
            self._refuse()
        if limit is not None and (limit.__class__ is not int or limit < 1):
            raise ArgumentError("limit", limit, "must be an int >= 1 (or None: all)")
        used_idx = self._used_h[1]
        last_used = self._used_seq
        if used_idx == last_used & 0xFFFF:
            return [], []
        count = total = self._used_count(used_idx)
        if limit is not None and count > limit:
            count = limit
        in_order = self.in_order
        # The run fast paths below need every element to complete the slot of its own
        # position.  Without IN_ORDER that is the common case; with it (§2.7.9) it is a
        # device that retires every batch of one buffer, which DPDK does for each packet
        # -- and then every element of the run was written fresh: the batch at position
        # p writes its element at p, and an element naming p's own slot closes a batch of
        # one, so the next batch starts at p + 1.  (A longer batch's element names another
        # slot, and the batch loop takes over.)  Not while a batch cut short by a limited
        # reap is pending.
        if not in_order or self._batch is None:
            n = self.size
            first = last_used & self._mask
            end = first + count
            if not self.writable and not self._early_count:
                # A device-readable slot completes with len 0, so an in-order element, read
                # as one u64 (id | len << 32), equals its slot number: one list comparison
                # checks ids and lengths together.
                ids2, zeros, _ = self._expect
                elems = ring_run(self._used_q, first, count, n)
                if elems == ids2[first:end]:
                    self._front = self._used_seq = last_used + count
                    return elems, zeros[:count]
            slots = ring_run(self._used_i, first, count, n, step=2)
            lens = ring_run(self._used_i, first, count, n, step=2, offset=1)
            # In order: with no early completion pending, front == last_used, and positions
            # last_used .. last_used + count - 1 are published and in flight; element k must
            # then name the slot made available at position last_used + k.
            if (not self._early_count and slots == self._expect[0][first:end]
                    and (max(lens) <= self._capacity or not self.strict_len)):
                self._front = self._used_seq = last_used + count
                return slots, lens
            if not in_order:
                return self._reap_one_by_one(slots, lens)
        return self._reap_batches(last_used, total, limit)

    def _reap_batches(self, last_used: int, count: int, limit: int | None
                      ) -> tuple[list[int], list[int]]:
        """VIRTIO_F_IN_ORDER (§2.7.9): ``count`` slots completed, in ring order, announced by
        one used element per batch -- at the used position of the batch's first slot,
        naming its last slot; the slots before it were used completely.  At most ``limit``
        are handed out; a batch cut short is remembered in ``_batch``."""
        n = self.size
        mask = self._mask
        used_q = self._used_q
        cap = self._capacity
        strict = self.strict_len
        slots: list[int] = []
        lens: list[int] = []
        seq = last_used  # == self._front: in order, nothing completes early
        end = last_used + count
        stop = end if limit is None else min(end, last_used + limit)
        batch = self._batch
        while seq < stop:
            if batch is None:
                elem = used_q[seq & mask]
                slot = elem & 0xFFFFFFFF
                length = elem >> 32
                last = seq + (slot - seq) % n if slot < n else end
                if last >= end:
                    self._fail_at(seq - last_used, "id", slot,
                                  f"a slot at or after {seq & mask} whose batch fits the "
                                  f"{end - seq} completions used.idx announces (in order)",
                                  list(zip(slots, lens, strict=True)))
                if length > cap and strict:
                    self._fail_at(seq - last_used, "len", length, f"<= {cap}, the bytes "
                                  f"slot {slot} can take", list(zip(slots, lens, strict=True)))
            else:
                last, length = batch
            upto = min(last, stop - 1)
            for k in range(seq, upto + 1):
                slots.append(k & mask)
                lens.append(length if k == last else cap)
            seq = upto + 1
            batch = (last, length) if upto < last else None
        self._batch = batch
        self._front = self._used_seq = seq
        return slots, lens

    def _reap_one_by_one(self, slots: list[int], lens: list[int]) -> tuple[list[int], list[int]]:
        """Validate each element (out-of-order completion, or a bad one to name)."""
        n = self.size
        mask = self._mask
        early = self._early
        front = self._front
        # Slots at positions front .. published - 1 were published and are in flight unless
        # they completed early (a device may not complete one it was never given, nor one
        # twice).
        span = self._pub_seq - front
        cap = self._capacity
        strict = self.strict_len
        for k, (slot, length) in enumerate(zip(slots, lens, strict=True)):
            if slot >= n or ((slot - front) & mask) >= span or early[slot]:
                self._fail_at(k, "id", slot,
                              f"a published slot not yet completed (queue size {n})",
                              list(zip(slots[:k], lens[:k], strict=True)))
            if length > cap and strict:
                what = "writable bytes" if self.writable else "device-writable bytes (none)"
                self._fail_at(k, "len", length, f"<= {cap}, the {what} of slot {slot}",
                              list(zip(slots[:k], lens[:k], strict=True)))
            early[slot] = 1
            self._early_count += 1
        # Reuse is first in, first out: the front moves past every completed slot.
        while self._early_count and early[front & mask]:
            early[front & mask] = 0
            self._early_count -= 1
            front += 1
        self._front = front
        self._used_seq += len(slots)
        return slots, lens

    def pop_used(self) -> tuple[int, int] | None:
        """The next completed ``(slot, len)``, or None."""
        slots, lens = self.reap(1)
        return (slots[0], lens[0]) if slots else None

    def drain_used(self) -> list[tuple[int, int]]:
        """Every completed ``(slot, len)``, in used-ring order."""
        slots, lens = self.reap()
        return list(zip(slots, lens, strict=True))


__all__ = ["SlotQueue"]
