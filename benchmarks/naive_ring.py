"""A plain split-ring driver written with the standard library: the fair reference for
bench_ring.py.

Fair means it does the driver work the way a careful stdlib author would, not the slowest
way: precompiled :class:`struct.Struct` objects, one ``pack_into`` per descriptor (address,
length, flags and next in one call), one per avail-ring entry, one ``unpack_from`` per
used element (id and len together), the same event-idx kick decision as virtq when the
row under comparison has event idx (VIRTIO 1.2 §2.7.10, ``vring_need_event``), a list of
free descriptors and a dict from head to (token, descriptors).  ``add_many`` is a loop over
``add``: the batch shares one ``publish``, as in virtq's rows.

What it leaves out, and virtq pays for: checking what the device wrote (used.idx, ids,
lengths: §2.7.8), the memory barriers of §2.7.13 (it is only correct on x86 with a device
that never races it, which bench_ring's in-process echo device does not), indirect
descriptors (a 3-buffer chain is always three ring descriptors), checking that a chain
fits (the benchmark never overfills the ring), and any error handling.

:class:`NaiveInOrderRing` is the same driver with VIRTIO_F_IN_ORDER, the counterpart of
virtq's ``InOrderSplitQueue`` in bench_ring's in-order rows: descriptors are taken in ring
order (§2.7.5.1: ``next`` = x + 1, so no free list), and one used element may retire a
batch (§2.7.9): a deque of the chains in flight is popped up to the head it names, the
chains before it counting as completely written (their writable capacity).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

VIRTQ_DESC_F_NEXT = 1  # VIRTIO 1.2 §2.7.5
VIRTQ_DESC_F_WRITE = 2
VIRTQ_USED_F_NO_NOTIFY = 1  # §2.7.10

DESC = struct.Struct("<QIHH")  # struct virtq_desc: addr, len, flags, next (§2.7.5)
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem: id, len (§2.7.8)

Buffer = tuple[int, int]


class NaiveRing:
    """The driver side of one split ring at the given byte offsets of ``mem``
    (``n`` a power of two)."""

    def __init__(self, mem: memoryview, n: int, desc: int, avail: int, used: int, *,
                 event_idx: bool = False) -> None:
        self.mem, self.n, self.desc = mem, n, desc
        self.mask = n - 1
        self.avail_idx = avail + 2
        self.avail_ring = avail + 4
        self.used_flags = used
        self.used_idx = used + 2
        self.used_ring = used + 4
        self.avail_event = used + 4 + 8 * n  # §2.7.8: after the used ring
        self.event_idx = event_idx
        self.free = list(range(n))
        self.next_avail = 0
        self.published = 0
        self.last_used = 0
        self.chains: dict[int, tuple[Any, list[int]]] = {}

    def add(self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: Any) -> int:
        """Write one chain (readable buffers first) and its avail entry; returns its head."""
        mem, pack_desc, base, free = self.mem, DESC.pack_into, self.desc, self.free
        count = len(readable) + len(writable)
        descs = free[-count:]
        del free[-count:]
        i = 0
        for addr, length in readable:
            i += 1
            if i < count:
                pack_desc(mem, base + 16 * descs[i - 1], addr, length, VIRTQ_DESC_F_NEXT,
                          descs[i])
            else:
                pack_desc(mem, base + 16 * descs[i - 1], addr, length, 0, 0)
        for addr, length in writable:
            i += 1
            if i < count:
                pack_desc(mem, base + 16 * descs[i - 1], addr, length,
                          VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, descs[i])
            else:
                pack_desc(mem, base + 16 * descs[i - 1], addr, length, VIRTQ_DESC_F_WRITE, 0)
        head = descs[0]
        U16.pack_into(mem, self.avail_ring + 2 * (self.next_avail & self.mask), head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        self.chains[head] = (token, descs)
        return head

    def add_many(self, chains: Sequence[tuple[Sequence[Buffer], Sequence[Buffer], Any]]) -> int:
        """:meth:`add` for each ``(readable, writable, token)``; returns how many."""
        add = self.add
        for readable, writable, token in chains:
            add(readable, writable, token)
        return len(chains)

    def publish(self) -> bool:
        """Store avail.idx; True when the device wants a notification (§2.7.10)."""
        new, old = self.next_avail, self.published
        if new == old:
            return False
        U16.pack_into(self.mem, self.avail_idx, new)
        self.published = new
        if self.event_idx:
            (event,) = U16.unpack_from(self.mem, self.avail_event)
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        (flags,) = U16.unpack_from(self.mem, self.used_flags)
        return not flags & VIRTQ_USED_F_NO_NOTIFY

    def drain_used(self) -> list[tuple[Any, int]]:
        """``(token, written length)`` of every chain the device used, in ring order."""
        mem, unpack_elem, ring, mask = self.mem, USED_ELEM.unpack_from, self.used_ring, self.mask
        chains, free = self.chains, self.free
        (used_idx,) = U16.unpack_from(mem, self.used_idx)
        last = self.last_used
        out = []
        while last != used_idx:
            head, length = unpack_elem(mem, ring + 8 * (last & mask))
            token, descs = chains.pop(head)
            free += descs
            out.append((token, length))
            last = (last + 1) & 0xFFFF
        self.last_used = last
        return out


class NaiveInOrderRing(NaiveRing):
    """:class:`NaiveRing` with VIRTIO_F_IN_ORDER (§2.7.9): descriptors in ring order, a
    batch of completions read from one used element."""

    def __init__(self, mem: memoryview, n: int, desc: int, avail: int, used: int, *,
                 event_idx: bool = False) -> None:
        super().__init__(mem, n, desc, avail, used, event_idx=event_idx)
        self.next_desc = 0
        # (head, token, writable capacity) of each chain in flight, in avail order.
        self.in_flight: deque[tuple[int, Any, int]] = deque()

    def add(self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: Any) -> int:
        """Write one chain at the next descriptors in ring order, and its avail entry;
        returns its head."""
        mem, pack_desc, base, mask = self.mem, DESC.pack_into, self.desc, self.mask
        count = len(readable) + len(writable)
        head = d = self.next_desc
        i = 0
        for addr, length in readable:
            i += 1
            nxt = (d + 1) & mask
            if i < count:
                pack_desc(mem, base + 16 * d, addr, length, VIRTQ_DESC_F_NEXT, nxt)
            else:
                pack_desc(mem, base + 16 * d, addr, length, 0, 0)
            d = nxt
        capacity = 0
        for addr, length in writable:
            i += 1
            nxt = (d + 1) & mask
            if i < count:
                pack_desc(mem, base + 16 * d, addr, length,
                          VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, nxt)
            else:
                pack_desc(mem, base + 16 * d, addr, length, VIRTQ_DESC_F_WRITE, 0)
            capacity += length
            d = nxt
        self.next_desc = d
        U16.pack_into(mem, self.avail_ring + 2 * (self.next_avail & mask), head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        self.in_flight.append((head, token, capacity))
        return head

    def drain_used(self) -> list[tuple[Any, int]]:
        """``(token, written length)`` of every chain the device used, in ring order; each
        used element retires the chains up to the head it names."""
        mem, unpack_elem, ring, mask = self.mem, USED_ELEM.unpack_from, self.used_ring, self.mask
        pop = self.in_flight.popleft
        (used_idx,) = U16.unpack_from(mem, self.used_idx)
        last = self.last_used
        out = []
        while last != used_idx:
            head, length = unpack_elem(mem, ring + 8 * (last & mask))
            while True:
                h, token, capacity = pop()
                last = (last + 1) & 0xFFFF
                if h == head:
                    out.append((token, length))
                    break
                out.append((token, capacity))
        self.last_used = last
        return out
