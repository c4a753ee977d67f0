"""A deliberately naive split-ring driver: one ``struct.pack_into``/``unpack_from`` per
field, the way ixy.py and most ad-hoc Python drivers do it.  No validation, no event idx,
no indirect.  It exists only as the floor virtq must beat in bench_ring.py."""

from __future__ import annotations

import struct


class NaiveRing:
    def __init__(self, mem: memoryview, n: int, desc: int, avail: int, used: int) -> None:
        self.mem, self.n, self.desc, self.avail, self.used = mem, n, desc, avail, used
        self.free = list(range(n))
        self.next_avail = 0
        self.last_used = 0
        self.tokens: dict[int, object] = {}
        self.chains: dict[int, list[int]] = {}

    def add(self, readable, writable, token):
        mem = self.mem
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, 2) for a, n in writable]
        descs = [self.free.pop() for _ in bufs]
        for i, (addr, length, flags) in enumerate(bufs):
            off = self.desc + 16 * descs[i]
            last = i == len(bufs) - 1
            struct.pack_into("<Q", mem, off, addr)
            struct.pack_into("<I", mem, off + 8, length)
            struct.pack_into("<H", mem, off + 12, flags | (0 if last else 1))
            struct.pack_into("<H", mem, off + 14, 0 if last else descs[i + 1])
        head = descs[0]
        struct.pack_into("<H", mem, self.avail + 4 + 2 * (self.next_avail % self.n), head)
        self.next_avail = (self.next_avail + 1) % 65536
        self.tokens[head] = token
        self.chains[head] = descs
        return head

    def publish(self):
        struct.pack_into("<H", self.mem, self.avail + 2, self.next_avail)
        (flags,) = struct.unpack_from("<H", self.mem, self.used)
        return not flags & 1

    def drain_used(self):
        out = []
        (used_idx,) = struct.unpack_from("<H", self.mem, self.used + 2)
        while self.last_used != used_idx:
            off = self.used + 4 + 8 * (self.last_used % self.n)
            (head,) = struct.unpack_from("<I", self.mem, off)
            (length,) = struct.unpack_from("<I", self.mem, off + 4)
            out.append((self.tokens.pop(head), length))
            self.free.extend(self.chains.pop(head))
            self.last_used = (self.last_used + 1) % 65536
        return out
