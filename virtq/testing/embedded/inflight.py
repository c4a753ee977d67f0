"""The back-end's half of vhost-user's inflight I/O tracking, for split rings.

vhost-user.rst, "Inflight I/O tracking": a back-end that completes requests out of order
cannot find, after a restart, which chains it had taken from a ring -- their avail entries
may have been overwritten.  So it keeps a buffer shared with the front-end (which keeps it
across the restart: GET_INFLIGHT_FD, SET_INFLIGHT_FD), one region per queue::

    QueueRegionSplit: u64 features, u16 version, u16 desc_num, u16 last_batch_head,
                      u16 used_idx, then desc_num x DescStateSplit
    DescStateSplit:   u8 inflight, u8 padding[5], u16 next, u64 counter

and updates it in the order the document gives, so that a crash between any two stores
leaves something a new back-end can repair:

* taking a chain with head ``i``: ``desc[i].counter`` = the next counter value, then
  ``desc[i].inflight`` = 1;
* completing a batch: each head is linked into the last-batch list (``desc[i].next`` =
  ``last_batch_head``; ``last_batch_head`` = i), the used ring's ``idx`` is published,
  each head's ``inflight`` cleared, and ``used_idx`` set to the published ``idx``;
* on reconnecting: if ``used_idx`` differs from the used ring's ``idx`` the last batch was
  published but not cleared -- clear the ``idx - used_idx`` entries of the list from
  ``last_batch_head`` and set ``used_idx``; then resubmit every head still in flight in
  the order of its counter.

Where the ring resumes taking new chains: the used ring's ``idx`` plus the number of heads
still in flight -- chains are taken in avail order, so those are exactly the ones between
(libvhost-user's ``vu_check_queue_inflights`` computes it the same way).
"""

from __future__ import annotations

import struct

from virtq.layout import align_up, wrap_add
from virtq.memory import MemfdRegion

#: features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16.
QUEUE_HEADER = struct.Struct("=QHHHH")
#: inflight u8, 5 bytes padding, next u16, counter u64.
DESC_STATE = struct.Struct("=B5xHQ")
VERSION = 1
#: Each queue's region starts on a cache line (as libvhost-user and DPDK lay them out).
ALIGNMENT = 64
_OFF_LAST_BATCH = 12
_OFF_USED_IDX = 14
_OFF_NEXT = 6
_OFF_COUNTER = 8


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region."""
    return align_up(QUEUE_HEADER.size + DESC_STATE.size * queue_size, ALIGNMENT)


class InflightQueue:
    """One queue's region in the shared buffer, as the back-end updates it."""

    def __init__(self, region: MemfdRegion, offset: int, queue_size: int) -> None:
        self._mem = region.view(offset, queue_region_size(queue_size))
        self.size = queue_size
        self.counter = 0

    def close(self) -> None:
        """Release this queue's view of the buffer (the region stays open)."""
        self._mem.release()

    def _desc(self, head: int) -> int:
        return QUEUE_HEADER.size + head * DESC_STATE.size

    def initialise(self) -> None:
        """A fresh region (GET_INFLIGHT_FD): nothing in flight, version 1."""
        self._mem[:] = bytes(len(self._mem))
        QUEUE_HEADER.pack_into(self._mem, 0, 0, VERSION, self.size, 0, 0)

    @property
    def valid(self) -> bool:
        """Whether a back-end has initialised the region for rings of this size."""
        _, version, desc_num, _, _ = QUEUE_HEADER.unpack_from(self._mem)
        return bool(version == VERSION and desc_num == self.size)

    def in_flight(self) -> int:
        """How many heads are marked in flight now."""
        flags = bytes(self._mem[QUEUE_HEADER.size :: DESC_STATE.size][: self.size])
        return self.size - flags.count(0)

    def take(self, head: int) -> None:
        """A chain with this head was taken from the avail ring."""
        off = self._desc(head)
        struct.pack_into("=Q", self._mem, off + _OFF_COUNTER, self.counter)
        self.counter += 1
        self._mem[off] = 1  # only now is it in flight: the counter is in place

    def link(self, head: int) -> None:
        """``head`` is completed in the batch being written (before used.idx moves)."""
        last = struct.unpack_from("=H", self._mem, _OFF_LAST_BATCH)[0]
        struct.pack_into("=H", self._mem, self._desc(head) + _OFF_NEXT, last)
        struct.pack_into("=H", self._mem, _OFF_LAST_BATCH, head)

    def retire(self, heads: list[int], used_idx: int) -> None:
        """The batch ``heads`` was published with used.idx = ``used_idx``."""
        for head in heads:
            self._mem[self._desc(head)] = 0
        struct.pack_into("=H", self._mem, _OFF_USED_IDX, used_idx & 0xFFFF)

    def recover(self, used_idx: int) -> list[int]:
        """After a restart, with the used ring's ``idx``: repair the last batch if it was
        published but not retired, and return the heads still in flight in the order they
        were taken.  A region that was never initialised (version 0) holds nothing."""
        if not self.valid:
            self.initialise()
            return []
        _, _, _, last, region_used = QUEUE_HEADER.unpack_from(self._mem)
        batch = (used_idx - region_used) & 0xFFFF
        head = last
        for _ in range(min(batch, self.size)):
            off = self._desc(head)
            self._mem[off] = 0
            head = struct.unpack_from("=H", self._mem, off + _OFF_NEXT)[0]
            if head >= self.size:
                break
        struct.pack_into("=H", self._mem, _OFF_USED_IDX, used_idx & 0xFFFF)
        live = []
        for h in range(self.size):
            inflight, _, counter = DESC_STATE.unpack_from(self._mem, self._desc(h))
            if inflight:
                live.append((counter, h))
        live.sort()
        self.counter = live[-1][0] + 1 if live else 0
        return [h for _, h in live]


class InflightBuffer:
    """The whole shared buffer: ``num_queues`` regions of rings with ``queue_size``
    entries, in a memfd (made by GET_INFLIGHT_FD, or the front-end's from
    SET_INFLIGHT_FD)."""

    def __init__(self, region: MemfdRegion, num_queues: int, queue_size: int) -> None:
        self.region = region
        self.num_queues = num_queues
        self.queue_size = queue_size
        step = queue_region_size(queue_size)
        self.queues = [InflightQueue(region, i * step, queue_size) for i in range(num_queues)]

    @staticmethod
    def nbytes(num_queues: int, queue_size: int) -> int:
        """The buffer's size in bytes for ``num_queues`` rings of ``queue_size`` entries."""
        return num_queues * queue_region_size(queue_size)

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> InflightBuffer:
        """A fresh buffer in a new memfd, every region initialised (GET_INFLIGHT_FD).
        Raises :class:`~virtq.errors.VirtqOSError` if the memfd cannot be made."""
        region = MemfdRegion(cls.nbytes(num_queues, queue_size), name="virtq-inflight")
        buf = cls(region, num_queues, queue_size)
        for q in buf.queues:
            q.initialise()
        return buf

    def in_flight(self) -> int:
        """How many requests the buffer marks in flight, over every queue."""
        return sum(q.in_flight() for q in self.queues)

    def close(self) -> None:
        """Release every queue's view, then close the memfd region."""
        for q in self.queues:
            q.close()
        self.region.close()


def resume_index(used_idx: int, inflight: int) -> int:
    """Where a ring resumes taking chains: after the ones still in flight."""
    return wrap_add(used_idx, inflight)
