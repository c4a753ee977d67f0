"""A plain packed-ring driver written with the standard library: the fair reference for
bench_ring.py's packed rows (the packed sibling of naive_ring.py).

Fair means it does the driver work the way a careful stdlib author would, not the slowest
way: one precompiled :class:`struct.Struct` per structure, one ``pack_into`` per descriptor
(address, length, buffer id and flags in one call), one ``unpack_from`` per used
descriptor (length, id and flags together), buffer ids from a free list, per-id shadow
state in a list, and, for the kick decision, the same reading of the device event
suppression structure as virtq (VIRTIO 1.2 §2.8.10, §2.8.14: ENABLE, DISABLE, or with
event idx the descriptor offset and wrap counter it waits for, compared the way Linux's
``virtqueue_kick_prepare_packed`` does).  ``add_many`` is a loop over ``add``: the batch
shares one ``publish``, as in virtq's rows.

Each chain is made available as it is added: its other descriptors are written first and
its first descriptor last (§2.8.6: "The driver always makes the first descriptor in the
list available after the rest of the list has been written out"); its flags are the last
bytes of that one ``pack_into``.  ``publish()`` then only decides whether to notify (Linux
does the same).  virtq instead defers the first chain's flags of a batch to ``publish()``,
which is one more store per batch, not per chain.

Wrap counters (§2.8.1): the driver's flips when its next position passes the ring's end;
the used position and its wrap counter advance by each chain's descriptor count (§2.8.6),
and a position holds a used descriptor when its AVAIL and USED bits both equal the used
wrap counter (both bits are tested: a stale available descriptor of the previous lap has
USED equal to it too).

:class:`NaivePackedRing` with ``in_order=True`` (VIRTIO_F_IN_ORDER, §2.8.8) keeps a deque
of the ids in flight in avail order; one used descriptor retires the chains up to the id
it names, the ones before it counting as completely written (their writable capacity).

What it leaves out, and virtq pays for: checking what the device wrote (ids in range and in
flight, lengths against the writable capacity, flags of the wrong lap: §2.8.22), the
memory barriers of §2.8.21 (it is only correct on x86 with a device that never races it,
which bench_ring's in-process echo device does not), indirect descriptors (a 3-buffer
chain is always three ring descriptors), checking that a chain fits (the benchmark never
overfills the ring), and any error handling.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

VIRTQ_DESC_F_NEXT = 1  # VIRTIO 1.2 §2.8.6
VIRTQ_DESC_F_WRITE = 2  # §2.8.3
VIRTQ_DESC_F_AVAIL = 1 << 7  # §2.8.1
VIRTQ_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_DISABLE = 1  # §2.8.10
RING_EVENT_FLAGS_DESC = 2

DESC = struct.Struct("<QIHH")  # struct pvirtq_desc: addr, len, id, flags (§2.8.13)
USED = struct.Struct("<IHH")  # a used descriptor's len, id and flags (bytes 8..15)
EVENT = struct.Struct("<HH")  # struct pvirtq_event_suppress: off_wrap, flags (§2.8.14)

#: The AVAIL/USED bits of an available descriptor, by driver wrap counter (§2.8.1).
AVAIL_BITS = (VIRTQ_DESC_F_USED, VIRTQ_DESC_F_AVAIL)
#: ... and of a used one, by device wrap counter.
USED_BITS = (0, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)
PAIR = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED

Buffer = tuple[int, int]


class NaivePackedRing:
    """The driver side of one ``n``-entry packed ring whose descriptor ring and device
    event suppression structure are at the given byte offsets of ``mem``."""

    def __init__(self, mem: memoryview, n: int, desc: int, device_event: int, *,
                 event_idx: bool = False, in_order: bool = False) -> None:
        self.mem, self.n, self.desc = mem, n, desc
        self.device_event = device_event
        self.event_idx = event_idx
        self.in_order = in_order
        self.next = 0  # next available position; its lap's wrap counter:
        self.wrap = 1
        self.used_pos = 0  # next used position and the device wrap counter there
        self.used_wrap = 1
        self.added = 0  # descriptors made available since the last publish()
        self.ids = list(range(n - 1, -1, -1))  # free buffer ids (a stack)
        # Per buffer id in flight: (token, descriptors, writable capacity).
        self.chains: list[tuple[Any, int, int] | None] = [None] * n
        self.order: deque[int] = deque()  # in_order: ids in flight, in avail order

    def add(self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: Any) -> int:
        """Write one chain (readable buffers first, §2.8.5), its first descriptor last;
        returns its buffer id."""
        mem, pack_desc, base, n = self.mem, DESC.pack_into, self.desc, self.n
        count = len(readable) + len(writable)
        buffer_id = self.ids.pop()
        pos = first = self.next
        wrap = self.wrap
        bits = AVAIL_BITS[wrap]
        capacity = 0
        if count == 1:
            if readable:
                addr, length = readable[0]
                pack_desc(mem, base + 16 * pos, addr, length, buffer_id, bits)
            else:
                addr, length = writable[0]
                pack_desc(mem, base + 16 * pos, addr, length, buffer_id,
                          bits | VIRTQ_DESC_F_WRITE)
                capacity = length
            pos += 1
            if pos == n:
                pos = 0
                wrap ^= 1
        else:
            i = 0
            head_addr = head_len = head_flags = 0
            for addr, length in readable:
                i += 1
                flags = bits | VIRTQ_DESC_F_NEXT if i < count else bits
                if i == 1:
                    head_addr, head_len, head_flags = addr, length, flags
                else:
                    pack_desc(mem, base + 16 * pos, addr, length, buffer_id, flags)
                pos += 1
                if pos == n:
                    pos = 0
                    wrap ^= 1
                    bits = AVAIL_BITS[wrap]
            for addr, length in writable:
                i += 1
                flags = bits | VIRTQ_DESC_F_WRITE
                if i < count:
                    flags |= VIRTQ_DESC_F_NEXT
                if i == 1:
                    head_addr, head_len, head_flags = addr, length, flags
                else:
                    pack_desc(mem, base + 16 * pos, addr, length, buffer_id, flags)
                capacity += length
                pos += 1
                if pos == n:
                    pos = 0
                    wrap ^= 1
                    bits = AVAIL_BITS[wrap]
            # The first descriptor last: it makes the whole chain available.
            pack_desc(mem, base + 16 * first, head_addr, head_len, buffer_id, head_flags)
        self.next = pos
        self.wrap = wrap
        self.added += count
        self.chains[buffer_id] = (token, count, capacity)
        if self.in_order:
            self.order.append(buffer_id)
        return buffer_id

    def add_many(self, chains: Sequence[tuple[Sequence[Buffer], Sequence[Buffer], Any]]) -> int:
        """:meth:`add` for each ``(readable, writable, token)``; returns how many."""
        add = self.add
        for readable, writable, token in chains:
            add(readable, writable, token)
        return len(chains)

    def publish(self) -> bool:
        """True when the device wants a notification for the chains added since the last
        call (§2.8.21.2, read from the device event suppression structure)."""
        added = self.added
        if not added:
            return False
        self.added = 0
        off_wrap, flags = EVENT.unpack_from(self.mem, self.device_event)
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return flags != RING_EVENT_FLAGS_DISABLE
        # vring_need_event(event, new, old) with positions: an event offset of the other
        # lap is one ring length back (new - old == added, at most n).
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.wrap:
            event -= self.n
        return (self.next - event - 1) & 0xFFFF < added

    def drain_used(self) -> list[tuple[Any, int]]:
        """``(token, written length)`` of every chain the device used, in the order it
        wrote them."""
        mem, unpack_used, base, n = self.mem, USED.unpack_from, self.desc + 8, self.n
        chains, ids = self.chains, self.ids
        pos, wrap = self.used_pos, self.used_wrap
        expected = USED_BITS[wrap]
        out = []
        while True:
            length, buffer_id, flags = unpack_used(mem, base + 16 * pos)
            if flags & PAIR != expected:
                break
            if not flags & VIRTQ_DESC_F_WRITE:
                length = 0  # §2.8.4: len is reserved without WRITE
            if self.in_order:
                # One used descriptor for a batch (§2.8.8): every chain up to this id.
                pop = self.order.popleft
                while True:
                    done = pop()
                    token, count, capacity = chains[done]  # type: ignore[misc]
                    ids.append(done)
                    out.append((token, length if done == buffer_id else capacity))
                    pos += count
                    if done == buffer_id:
                        break
            else:
                token, count, _ = chains[buffer_id]  # type: ignore[misc]
                ids.append(buffer_id)
                out.append((token, length))
                pos += count
            if pos >= n:
                pos -= n
                wrap ^= 1
                expected = USED_BITS[wrap]
        self.used_pos, self.used_wrap = pos, wrap
        return out
