"""A device that lies: garbage in the device-owned part of a split ring
(:class:`HostileDevice`) or in the device-written parts of a packed ring
(:class:`PackedHostileDevice`).

Used to prove that a driver queue turns every impossible value into a
:class:`~virtq.errors.DeviceError` (or accepts it when it is in fact valid), never an
``IndexError``, a crash or a hang.
"""

from __future__ import annotations

import random

from virtq.abi import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE
from virtq.layout import PackedLayout, SplitLayout, wrap_add
from virtq.layout.split import DESC_SIZE, used_nbytes
from virtq.memory import MemoryRegion


class HostileDevice:
    """Writes chosen or random values into ``used`` (flags, idx, ring, avail_event)."""

    def __init__(self, region: MemoryRegion, layout: SplitLayout, *, seed: int | None = None):
        n = layout.queue_size
        self.size = n
        self._used = region.view(layout.used, used_nbytes(n))
        self._used_h = self._used.cast("H")
        self._used_w = self._used[: 4 + 8 * n].cast("I")
        self.rng = random.Random(seed)

    # -- chosen corruptions ---------------------------------------------------------------
    def set_used_idx(self, value: int) -> None:
        self._used_h[1] = value & 0xFFFF

    def advance_used_idx(self, by: int) -> None:
        self._used_h[1] = wrap_add(self._used_h[1], by)

    def write_elem(self, slot: int, head: int, length: int) -> None:
        self._used_w[1 + 2 * (slot % self.size)] = head & 0xFFFFFFFF
        self._used_w[2 + 2 * (slot % self.size)] = length & 0xFFFFFFFF

    def complete(self, head: int, length: int) -> None:
        """Append one element at ``used.idx`` and bump the index (valid or not)."""
        idx = self._used_h[1]
        self.write_elem(idx, head, length)
        self._used_h[1] = wrap_add(idx, 1)

    def set_flags(self, value: int) -> None:
        self._used_h[0] = value & 0xFFFF

    def set_avail_event(self, value: int) -> None:
        self._used_h[2 + 4 * self.size] = value & 0xFFFF

    # -- random corruption -------------------------------------------------------------
    def corrupt(self) -> str:
        """Apply one random corruption; returns a description of it."""
        r = self.rng
        kind = r.randrange(7)
        if kind == 0:
            v = r.randrange(0x10000)
            self.set_used_idx(v)
            return f"used.idx={v:#x}"
        if kind == 1:
            by = r.choice((1, 2, self.size, self.size + 1, 0x8000, 0xFFFF))
            self.advance_used_idx(by)
            return f"used.idx+={by}"
        if kind == 2:
            head = r.choice((r.randrange(self.size), self.size, 0xFFFFFFFF, r.randrange(1 << 32)))
            length = r.choice((0, 1, r.randrange(1 << 32), 0xFFFFFFFF))
            self.complete(head, length)
            return f"complete({head:#x}, {length:#x})"
        if kind == 3:
            slot = r.randrange(self.size)
            self.write_elem(slot, r.randrange(1 << 32), r.randrange(1 << 32))
            return f"scribble slot {slot}"
        if kind == 4:
            v = r.randrange(0x10000)
            self.set_flags(v)
            return f"used.flags={v:#x}"
        if kind == 5:
            v = r.randrange(0x10000)
            self.set_avail_event(v)
            return f"avail_event={v:#x}"
        raw = bytes(r.randrange(256) for _ in range(len(self._used)))
        self._used[:] = raw
        return "random used ring"

    def close(self) -> None:
        for v in (self._used_h, self._used_w, self._used):
            v.release()


class PackedHostileDevice:
    """Writes chosen or random garbage into the device-writable parts of a packed ring
    (VIRTIO 1.2 §2.8): used descriptors (id, len, flags) in the descriptor ring and the
    device event suppression structure.

    It keeps its own used cursor (``used_index``/``used_wrap``, by default where a fresh
    ring starts: position 0, wrap counter 1, §2.8.1) so it can also write *well-formed*
    used descriptors with wrong contents; :meth:`corrupt` picks one corruption at random
    from ``rng`` (seeded by ``seed``) and returns what it did.  Every value is masked to
    its field's width; nothing is validated -- lying is the point.
    """

    def __init__(self, region: MemoryRegion, layout: PackedLayout, *, seed: int | None = None,
                 used_index: int = 0, used_wrap: int = 1) -> None:
        n = layout.queue_size
        self.size = n
        self.used_index = used_index % n
        self.used_wrap = used_wrap & 1
        self._ring = region.view(layout.desc, DESC_SIZE * n)
        self._ring_h = self._ring.cast("H")
        self._ring_w = self._ring.cast("I")
        self._device_event = region.view(layout.device_event, 4)
        self._device_event_h = self._device_event.cast("H")
        self.rng = random.Random(seed)

    # -- chosen corruptions ---------------------------------------------------------------
    def write_used(self, position: int, buffer_id: int, length: int, flags: int) -> None:
        """Raw: id, len, then flags of the descriptor at ``position`` (mod the size)."""
        p = position % self.size
        self._ring_w[4 * p + 2] = length & 0xFFFFFFFF
        self._ring_h[8 * p + 6] = buffer_id & 0xFFFF
        self._ring_h[8 * p + 7] = flags & 0xFFFF

    def used_flags(self, wrap: int, *, written: bool = True) -> int:
        """A used descriptor's flags for wrap counter ``wrap``: AVAIL = USED = wrap."""
        bits = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if wrap & 1 else 0
        return bits | (VIRTQ_DESC_F_WRITE if written else 0)

    def _advance(self, by: int) -> None:
        position = self.used_index + by
        self.used_wrap ^= (position // self.size) & 1
        self.used_index = position % self.size

    def complete(self, buffer_id: int, length: int, *, skip: int = 1,
                 written: bool | None = None) -> None:
        """A well-formed used descriptor at the cursor (right wrap bits, WRITE iff
        ``length`` unless ``written`` says otherwise); the cursor then moves ``skip``
        descriptors -- which need not be the buffer's real length."""
        w = bool(length) if written is None else written
        self.write_used(self.used_index, buffer_id, length,
                        self.used_flags(self.used_wrap, written=w))
        self._advance(skip)

    def complete_wrong_wrap(self, buffer_id: int, length: int) -> None:
        """A used descriptor at the cursor with the *other* wrap counter's bits (looks like
        last lap's used descriptor); the cursor does not move."""
        self.write_used(self.used_index, buffer_id, length,
                        self.used_flags(self.used_wrap ^ 1, written=bool(length)))

    def complete_split_bits(self, buffer_id: int, length: int, *, avail: int,
                            used: int) -> None:
        """A descriptor at the cursor whose AVAIL and USED bits are ``avail`` and ``used``
        (AVAIL != USED is an *available* descriptor to a driver, never a used one)."""
        flags = ((VIRTQ_DESC_F_AVAIL if avail & 1 else 0)
                 | (VIRTQ_DESC_F_USED if used & 1 else 0) | VIRTQ_DESC_F_WRITE)
        self.write_used(self.used_index, buffer_id, length, flags)

    def write_ahead(self, distance: int, buffer_id: int, length: int) -> None:
        """A used descriptor ``distance`` positions past the cursor, with the wrap bits that
        position would get; the cursor does not move (the driver must not look there)."""
        position = self.used_index + distance
        wrap = self.used_wrap ^ ((position // self.size) & 1)
        self.write_used(position, buffer_id, length, self.used_flags(wrap))

    def set_device_event(self, off_wrap: int, flags: int) -> None:
        """The device event suppression structure (§2.8.14), any values."""
        self._device_event_h[0] = off_wrap & 0xFFFF
        self._device_event_h[1] = flags & 0xFFFF

    # -- random corruption -------------------------------------------------------------
    def _random_id(self) -> int:
        r = self.rng
        return r.choice((r.randrange(self.size), self.size, 0xFFFF, r.randrange(0x10000)))

    def _random_len(self) -> int:
        r = self.rng
        return r.choice((0, 1, r.randrange(1 << 32), 0xFFFFFFFF))

    def corrupt(self) -> str:
        """Apply one random corruption; returns a description of it."""
        r = self.rng
        kind = r.randrange(8)
        if kind == 0:
            buffer_id, length = self._random_id(), self._random_len()
            skip = r.choice((1, 1, 2, self.size, self.size + 1, 0))
            at = self.used_index
            self.complete(buffer_id, length, skip=skip)
            return f"complete(id={buffer_id:#x}, len={length:#x}) at {at}, skip {skip}"
        if kind == 1:
            buffer_id, length = self._random_id(), self._random_len()
            self.complete_wrong_wrap(buffer_id, length)
            return f"wrong-wrap used descriptor id={buffer_id:#x} at {self.used_index}"
        if kind == 2:
            avail = r.randrange(2)
            buffer_id = self._random_id()
            self.complete_split_bits(buffer_id, self._random_len(), avail=avail,
                                     used=avail ^ 1)
            return f"AVAIL={avail} USED={avail ^ 1} id={buffer_id:#x} at {self.used_index}"
        if kind == 3:
            distance = r.randrange(1, self.size + 1)
            buffer_id = self._random_id()
            self.write_ahead(distance, buffer_id, self._random_len())
            return f"used descriptor id={buffer_id:#x} {distance} ahead of {self.used_index}"
        if kind == 4:
            position = r.randrange(self.size)
            flags = r.randrange(0x10000)
            buffer_id, length = self._random_id(), self._random_len()
            self.write_used(position, buffer_id, length, flags)
            return f"raw id={buffer_id:#x} len={length:#x} flags={flags:#06x} at {position}"
        if kind == 5:
            off_wrap, flags = r.randrange(0x10000), r.choice((0, 1, 2, 3, r.randrange(0x10000)))
            self.set_device_event(off_wrap, flags)
            return f"device event off_wrap={off_wrap:#06x} flags={flags:#06x}"
        if kind == 6:
            position = r.randrange(self.size)
            start = position * DESC_SIZE
            self._ring[start : start + DESC_SIZE] = bytes(r.randrange(256)
                                                          for _ in range(DESC_SIZE))
            return f"random bytes in descriptor {position}"
        self._ring[:] = bytes(r.randrange(256) for _ in range(len(self._ring)))
        return "random descriptor ring"

    def close(self) -> None:
        """Release the views of the ring (idempotent)."""
        for v in (self._ring_h, self._ring_w, self._ring, self._device_event_h,
                  self._device_event):
            v.release()

    def __enter__(self) -> PackedHostileDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
