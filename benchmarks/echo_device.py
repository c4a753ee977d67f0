"""The device side of bench_ring.py: the least work a device can do on each ring format,
the same for virtq's rows and the naive rings' rows.

Each device completes every chain the driver made available, writing nothing into the
buffers (used length 0), and with ``event_idx`` asks to be notified at the next chain it
will look for, as a device does once it has drained the ring (split: ``avail_event``,
VIRTIO 1.2 §2.7.10; packed: RING_EVENT_FLAGS_DESC with that position and wrap counter,
§2.8.10), so the drivers' kick decisions do their arithmetic.  It checks nothing: the
drivers under test are trusted here.

* :class:`SplitEcho`: one used element per chain (§2.7.8).
* :class:`SplitInOrderEcho`: VIRTIO_F_IN_ORDER: one used element per batch, at the used
  position of the batch's first chain, naming the last chain's head, ``used.idx`` advanced
  by the batch (§2.7.9).
* :class:`PackedEcho`: a used descriptor written over the first descriptor of each chain,
  with the chain's buffer id (from its last descriptor, §2.8.6) and AVAIL = USED = the
  device wrap counter of that position (§2.8.1); with ``in_order``, one used descriptor
  per batch at the batch's first position, naming the last chain's id (§2.8.8).

A "batch" is everything available when :meth:`complete_all` runs: bench_ring calls it
once after each ``publish()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not at run time: an older virtq (benchmarks/compare.py) may lack it
    from virtq.layout import PackedLayout, SplitLayout
    from virtq.memory import MemfdRegion

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_DESC = 2
#: The AVAIL/USED bits of an available descriptor, by wrap counter (§2.8.1) ...
AVAIL_BITS = (VIRTQ_DESC_F_USED, VIRTQ_DESC_F_AVAIL)
#: ... and of a used one.
USED_BITS = (0, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)
PAIR = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED


class SplitEcho:
    """Moves every available head to the used ring, one element each."""

    def __init__(self, region: MemfdRegion, layout: SplitLayout, *,
                 event_idx: bool = False) -> None:
        n = layout.queue_size
        mem = region.view(0, layout.nbytes)
        self.avail = mem[layout.avail : layout.avail + 6 + 2 * n].cast("H")
        # flags, idx, the ring as u16s, then avail_event (at u16 2 + 4n, §2.7.8)
        self.used_h = mem[layout.used : layout.used + 6 + 8 * n].cast("H")
        self.used_w = mem[layout.used : layout.used + 4 + 8 * n].cast("I")
        self.mask = n - 1
        self.avail_event = 2 + 4 * n if event_idx else 0
        self.last_avail = self.avail[1]
        self._mem = mem

    def complete_all(self) -> None:
        avail, used_w, mask = self.avail, self.used_w, self.mask
        idx = self.used_h[1]
        end = avail[1]
        la = self.last_avail
        while la != end:
            slot = idx & mask
            used_w[1 + 2 * slot] = avail[2 + (la & mask)]
            used_w[2 + 2 * slot] = 0
            la = (la + 1) & 0xFFFF
            idx = (idx + 1) & 0xFFFF
        self.last_avail = la
        self.used_h[1] = idx
        if self.avail_event:
            self.used_h[self.avail_event] = la

    def close(self) -> None:
        for v in (self.avail, self.used_h, self.used_w, self._mem):
            v.release()


class SplitInOrderEcho(SplitEcho):
    """VIRTIO_F_IN_ORDER: the whole batch retired by one used element (§2.7.9)."""

    def complete_all(self) -> None:
        avail = self.avail
        end = avail[1]
        la = self.last_avail
        if la != end:
            mask = self.mask
            idx = self.used_h[1]
            slot = idx & mask
            self.used_w[1 + 2 * slot] = avail[2 + ((end - 1) & mask)]
            self.used_w[2 + 2 * slot] = 0
            self.used_h[1] = (idx + ((end - la) & 0xFFFF)) & 0xFFFF
            self.last_avail = end
        if self.avail_event:
            self.used_h[self.avail_event] = end


class PackedEcho:
    """Marks every available chain used in place."""

    def __init__(self, region: MemfdRegion, layout: PackedLayout, *, event_idx: bool = False,
                 in_order: bool = False) -> None:
        n, desc, dev_ev = layout.queue_size, layout.desc, layout.device_event
        mem = region.view(0, layout.nbytes)
        ring = mem[desc : desc + 16 * n]
        self.desc_h = ring.cast("H")  # descriptor p: id at [8p + 6], flags at [8p + 7]
        self.desc_w = ring.cast("I")  # descriptor p: len at [4p + 2]
        self.dev_ev = mem[dev_ev : dev_ev + 4].cast("H")  # off_wrap, flags
        self.n = n
        self.pos = 0  # the next position to look at, and its lap's wrap counter
        self.wrap = 1
        self.event_idx = event_idx
        self.in_order = in_order
        if event_idx:
            self.dev_ev[0] = 0 | 1 << 15
            self.dev_ev[1] = RING_EVENT_FLAGS_DESC
        self._views = (self.desc_h, self.desc_w, self.dev_ev, ring, mem)

    def complete_all(self) -> None:
        desc_h, desc_w, n = self.desc_h, self.desc_w, self.n
        pos, wrap = self.pos, self.wrap
        first = -1
        first_wrap = last_id = 0
        while True:
            flags = desc_h[8 * pos + 7]
            if flags & PAIR != AVAIL_BITS[wrap]:
                break  # not available (§2.8.1)
            start, start_wrap = pos, wrap
            while flags & VIRTQ_DESC_F_NEXT:  # to the chain's last descriptor
                pos += 1
                if pos == n:
                    pos = 0
                    wrap ^= 1
                flags = desc_h[8 * pos + 7]
            buffer_id = desc_h[8 * pos + 6]  # §2.8.6: the id is in the last descriptor
            pos += 1
            if pos == n:
                pos = 0
                wrap ^= 1
            if self.in_order:
                if first < 0:
                    first, first_wrap = start, start_wrap
                last_id = buffer_id
                continue
            # Used, over the chain's first descriptor: len, id, then flags.
            desc_w[4 * start + 2] = 0
            desc_h[8 * start + 6] = buffer_id
            desc_h[8 * start + 7] = USED_BITS[start_wrap]
        if first >= 0:
            desc_w[4 * first + 2] = 0
            desc_h[8 * first + 6] = last_id
            desc_h[8 * first + 7] = USED_BITS[first_wrap]
        self.pos, self.wrap = pos, wrap
        if self.event_idx:
            self.dev_ev[0] = pos | wrap << 15

    def close(self) -> None:
        for v in self._views:
            v.release()
