"""A packed-ring driver written in the tests straight from VIRTIO 1.2 §2.8 (the §2.8.21 and
§2.8.22 examples) with struct.pack_into: independent of virtq's own driver queue, so the
device side (PackedDeviceQueue, DPDK's vhost_blk) is checked by code that shares nothing
with it."""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

from virtq.abi import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from virtq.layout import PackedLayout
from virtq.memory import MemoryRegion

DESC = struct.Struct("<QIHH")


@dataclass
class SpecDriver:
    """Just enough of a driver: makes buffers available exactly as the §2.8.21.3 example
    does (the first descriptor's flags written last) and reaps used descriptors as §2.8.22
    does (skip the buffer's descriptor count; with ``in_order`` the whole batch's)."""

    region: MemoryRegion
    layout: PackedLayout
    next_avail: int = 0
    avail_wrap: int = 1
    next_used: int = 0
    used_wrap: int = 1
    in_order: bool = False
    sgs: dict[int, int] = field(default_factory=dict)
    order: deque[int] = field(default_factory=deque)
    num_added: int = 0

    def __post_init__(self) -> None:
        n = self.layout.queue_size
        self.n = n
        self.ring = self.region.view(self.layout.desc, 16 * n)
        self.driver_event = self.region.view(self.layout.driver_event, 4)
        self.device_event = self.region.view(self.layout.device_event, 4)
        self.free = n

    def close(self) -> None:
        for v in (self.ring, self.driver_event, self.device_event):
            v.release()

    def flags(self, writable: bool, more: bool, wrap: int, extra: int = 0) -> int:
        f = (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if more else 0)
        # §2.8.1: AVAIL = the Driver Ring Wrap Counter, USED = its inverse.
        return f | extra | (VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED)

    def raw(self, position: int, addr: int, length: int, buffer_id: int, flags: int) -> None:
        DESC.pack_into(self.ring, position * 16, addr, length, buffer_id, flags)

    def read(self, position: int) -> tuple[int, int, int, int]:
        return DESC.unpack_from(self.ring, position * 16)

    def add(self, buffer_id: int, elems: list[tuple[int, int, bool]], *, expose: bool = True,
            extra_flags: tuple[int, ...] = ()) -> None:
        """Make ``elems`` (addr, len, device-writable) available as buffer ``buffer_id``;
        ``extra_flags[i]`` is ORed into element i's flags (to break the rules)."""
        assert len(elems) <= self.free
        first, first_flags = self.next_avail, 0
        for i, (addr, length, writable) in enumerate(elems):
            last = i == len(elems) - 1
            f = self.flags(writable, not last, self.avail_wrap,
                           extra_flags[i] if i < len(extra_flags) else 0)
            pos = self.next_avail
            # Buffer ID goes into the last descriptor (§2.8.6); the others get 0xdead to
            # prove the device ignores them.
            struct.pack_into("<QIH", self.ring, pos * 16, addr, length,
                             buffer_id if last else 0xDEAD)
            if pos == first:
                first_flags = f
            else:
                struct.pack_into("<H", self.ring, pos * 16 + 14, f)
            self.next_avail += 1
            if self.next_avail == self.n:
                self.next_avail, self.avail_wrap = 0, self.avail_wrap ^ 1
        self.sgs[buffer_id] = len(elems)
        self.order.append(buffer_id)
        self.free -= len(elems)
        self.num_added += len(elems)
        self.first_pending = (first, first_flags)
        if expose:
            self.expose()

    def expose(self) -> None:
        first, first_flags = self.first_pending
        struct.pack_into("<H", self.ring, first * 16 + 14, first_flags)

    def get_used(self) -> tuple[int, int, bool, list[int]] | None:
        """(id, len, WRITE flag, ids retired) of the next used descriptor, or None."""
        if not self.order:
            # Nothing outstanding: the §2.8.22 example's check 1.  It matters when a ring
            # starts with wrap counter 0: zero-initialised descriptors (§2.8.13) look used.
            return None
        # The flags first, alone; id and len only after them (the §2.8.22 example's
        # read_memory_barrier).  One 16-byte unpack would load id before flags and could
        # pair a new flags word with a stale id while the device is writing.
        flags, = struct.unpack_from("<H", self.ring, self.next_used * 16 + 14)
        if (bool(flags & VIRTQ_DESC_F_AVAIL) != bool(self.used_wrap)
                or bool(flags & VIRTQ_DESC_F_USED) != bool(self.used_wrap)):
            return None
        length, buffer_id = struct.unpack_from("<IH", self.ring, self.next_used * 16 + 8)
        if self.in_order:  # §2.8.8: the batch up to this id, in the order made available
            retired = []
            while True:
                b = self.order.popleft()
                retired.append(b)
                if b == buffer_id:
                    break
        else:
            self.order.remove(buffer_id)
            retired = [buffer_id]
        skip = sum(self.sgs.pop(b) for b in retired)
        self.free += skip
        self.next_used += skip
        if self.next_used >= self.n:
            self.next_used -= self.n
            self.used_wrap ^= 1
        return buffer_id, length, bool(flags & VIRTQ_DESC_F_WRITE), retired

    def set_driver_event(self, flags: int, off: int = 0, wrap: int = 0) -> None:
        struct.pack_into("<HH", self.driver_event, 0, off | wrap << 15, flags)

    def device_event_words(self) -> tuple[int, int]:
        return struct.unpack_from("<HH", self.device_event, 0)

    def needs_kick(self) -> bool:
        """Linux ``virtqueue_kick_prepare_packed`` after ``num_added`` descriptors: the
        driver's half of the device event suppression (§2.8.10)."""
        off_wrap, flags = self.device_event_words()
        new = self.next_avail
        old = (new - self.num_added) & 0xFFFF
        self.num_added = 0
        if flags != RING_EVENT_FLAGS_DESC:
            return flags != RING_EVENT_FLAGS_DISABLE
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.avail_wrap:
            event -= self.n
        return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
