"""A device that lies: garbage in the device-owned part of a split ring.

Used to prove that :class:`virtq.queue.SplitQueue` turns every impossible value into a
:class:`~virtq.errors.DeviceError` (or accepts it when it is in fact valid), never an
``IndexError``, a crash or a hang.
"""

from __future__ import annotations

import random

from virtq.layout import SplitLayout, wrap_add
from virtq.layout.split import used_nbytes
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
        """Store ``value`` (mod 2**16) as ``used.idx``."""
        self._used_h[1] = value & 0xFFFF

    def advance_used_idx(self, by: int) -> None:
        """Move ``used.idx`` forward by ``by`` (wrapping), without writing elements."""
        self._used_h[1] = wrap_add(self._used_h[1], by)

    def write_elem(self, slot: int, head: int, length: int) -> None:
        """Write ``used.ring[slot mod size]`` as ``(head, length)``, each truncated to 32 bits;
        ``used.idx`` is left alone."""
        self._used_w[1 + 2 * (slot % self.size)] = head & 0xFFFFFFFF
        self._used_w[2 + 2 * (slot % self.size)] = length & 0xFFFFFFFF

    def complete(self, head: int, length: int) -> None:
        """Append one element at ``used.idx`` and bump the index (valid or not)."""
        idx = self._used_h[1]
        self.write_elem(idx, head, length)
        self._used_h[1] = wrap_add(idx, 1)

    def set_flags(self, value: int) -> None:
        """Store ``value`` (mod 2**16) as ``used.flags``."""
        self._used_h[0] = value & 0xFFFF

    def set_avail_event(self, value: int) -> None:
        """Store ``value`` (mod 2**16) as ``used.avail_event``."""
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
        """Release the views of the used ring (call it before closing the region)."""
        for v in (self._used_h, self._used_w, self._used):
            v.release()
