"""The device side of a split virtqueue, for tests, demos and embedded backends.

:class:`DeviceQueue` is an independent implementation of the *device's* half of VIRTIO 1.2
§2.7 over the same memory the driver uses -- in-process, or in another process that attached
the driver's :class:`~virtq.memory.MemfdRegion` by fd.  It does not share code with
:class:`virtq.queue.SplitQueue` beyond the wire layout, so a round trip between them checks
one against the other.

The driver is the untrusted side here: a descriptor pointing outside the region, a loop, or an
indirect table where none is allowed raises :class:`DriverProtocolError`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from virtq._sys.fence import full_fence, observe_barrier, publish_barrier
from virtq.abi import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from virtq.errors import VirtqError
from virtq.layout import SplitLayout, distance, need_event, wrap_add
from virtq.layout.split import DESC_SIZE, avail_nbytes, used_nbytes
from virtq.memory import MemoryRegion

_DESC = struct.Struct("<QIHH")


class DriverProtocolError(VirtqError):
    """The driver put something impossible into the rings (seen from the device side)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """One buffer of a chain as the device sees it."""

    iova: int
    length: int
    writable: bool


class DeviceQueue:
    """The device's view of a split ring laid out by ``layout`` in ``region``; ``iova`` is the
    device address of the region's byte 0 (descriptor addresses are translated with it).

    ``start_index`` is where the device starts consuming ``avail`` (vhost-user's
    SET_VRING_BASE); by default it is read from ``used.idx``, which the driver initialised.
    """

    def __init__(
        self,
        region: MemoryRegion,
        layout: SplitLayout,
        *,
        iova: int,
        event_idx: bool = False,
        start_index: int | None = None,
        regions: Sequence[tuple[int, MemoryRegion]] | None = None,
    ) -> None:
        n = layout.queue_size
        self.size = n
        self.layout = layout
        self.event_idx = event_idx
        self._mem = region.view(0, layout.nbytes)
        self._desc = self._mem[layout.desc : layout.desc + DESC_SIZE * n]
        self._avail = self._mem[layout.avail : layout.avail + avail_nbytes(n)].cast("H")
        used = self._mem[layout.used : layout.used + used_nbytes(n)]
        self._used_h = used.cast("H")
        self._used_w = used[: 4 + 8 * n].cast("I")
        self._used_bytes = used
        # Address translation: (iova base, view) pairs; the queue's own region first.
        self._spaces: list[tuple[int, int, memoryview]] = [(iova, region.nbytes, region.view())]
        for base, extra in regions or []:
            self._spaces.append((base, extra.nbytes, extra.view()))
        used_idx = self._used_h[1]
        self.last_avail = used_idx if start_index is None else start_index
        self.used_idx = used_idx
        self._pending_used = 0

    # -- memory access by device address --------------------------------------------

    def _translate(self, iova: int, length: int) -> memoryview:
        for base, size, view in self._spaces:
            if base <= iova and iova + length <= base + size:
                return view[iova - base : iova - base + length]
        raise DriverProtocolError(f"address range [{iova:#x}, +{length}) is not mapped")

    def read(self, iova: int, length: int) -> bytes:
        return bytes(self._translate(iova, length))

    def write(self, iova: int, data: bytes | memoryview) -> None:
        self._translate(iova, len(data))[:] = data

    def view(self, iova: int, length: int) -> memoryview:
        return self._translate(iova, length)

    # -- consuming available chains -------------------------------------------------

    def avail_pending(self) -> int:
        """Chains the driver has published and the device has not popped yet."""
        return distance(self.last_avail, self._avail[1])

    def pop(self) -> tuple[int, list[Segment]] | None:
        """The next available chain as ``(head, segments)``, indirect tables followed."""
        avail_idx = self._avail[1]
        if avail_idx == self.last_avail:
            return None
        if distance(self.last_avail, avail_idx) > self.size:
            raise DriverProtocolError(
                f"avail.idx {avail_idx:#x} is more than {self.size} ahead of {self.last_avail:#x}"
            )
        observe_barrier()  # ring entry and descriptors after the index that exposed them (§2.7.6)
        head = self._avail[2 + (self.last_avail & (self.size - 1))]
        self.last_avail = wrap_add(self.last_avail, 1)
        if head >= self.size:
            raise DriverProtocolError(f"avail ring names head {head} >= size {self.size}")
        return head, self._walk(head)

    def chain(self, head: int) -> list[Segment]:
        """The chain from ``head``, walked as :meth:`pop` walks it, without touching the
        avail ring: for a device that resumes a chain it had taken before (vhost-user's
        inflight tracking)."""
        if not 0 <= head < self.size:
            raise DriverProtocolError(f"head {head} >= size {self.size}")
        return self._walk(head)

    def _walk(self, head: int) -> list[Segment]:
        """The chain from ``head``; a chain longer than the table it lives in loops.  The
        bound is the table's own length: the ring's size, or the indirect table's entries
        once the chain moves into one (§2.7.5.3.1: an indirect table may hold more entries
        than the ring has)."""
        segments: list[Segment] = []
        table: memoryview = self._desc
        limit = self.size
        index = head
        indirect = False
        seen_writable = False
        steps = 0  # descriptors visited in the current table
        while True:
            steps += 1
            if steps > limit:
                raise DriverProtocolError(f"descriptor chain from head {head} loops")
            addr, length, flags, nxt = _DESC.unpack_from(table, index * DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect or flags & VIRTQ_DESC_F_NEXT or length % DESC_SIZE or not length:
                    raise DriverProtocolError(f"bad indirect descriptor at {index}")
                table = self._translate(addr, length)
                limit = length // DESC_SIZE
                index = 0
                indirect = True
                steps = 0
                continue
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if seen_writable and not writable:
                raise DriverProtocolError("readable descriptor after a writable one (§2.7.4.2)")
            seen_writable |= writable
            self._translate(addr, length)  # validate now: the device never trusts addresses
            segments.append(Segment(addr, length, writable))
            if not flags & VIRTQ_DESC_F_NEXT:
                return segments
            if nxt >= limit:
                raise DriverProtocolError(f"next={nxt} out of range {limit}")
            index = nxt

    # -- returning used chains --------------------------------------------------------

    def push(self, head: int, written_len: int, *, publish: bool = True) -> bool:
        """Put ``(head, written_len)`` into the used ring; with ``publish`` also store
        ``used.idx``.  Returns whether the driver wants a used-buffer notification."""
        slot = wrap_add(self.used_idx, self._pending_used) & (self.size - 1)
        self._used_w[1 + 2 * slot] = head
        self._used_w[2 + 2 * slot] = written_len
        self._pending_used += 1
        if publish:
            return self.publish_used()
        return False

    def publish_used(self) -> bool:
        if not self._pending_used:
            return False
        old = self.used_idx
        new = wrap_add(old, self._pending_used)
        publish_barrier()  # elements and written data before the index (§2.7.8)
        self._used_h[1] = new
        self.used_idx = new
        self._pending_used = 0
        full_fence()  # idx store before reading the driver's suppression state
        if self.event_idx:
            return need_event(self._avail[2 + self.size], new, old)
        return not self._avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- notification suppression (device -> driver kicks) ------------------------------

    def disable_notifications(self) -> None:
        if self.event_idx:
            self._used_h[2 + 4 * self.size] = wrap_add(self.last_avail, -1)
        else:
            self._used_h[0] = VIRTQ_USED_F_NO_NOTIFY

    def enable_notifications(self) -> None:
        if self.event_idx:
            self.set_avail_event(self.last_avail)
        else:
            self._used_h[0] = 0

    def set_avail_event(self, index: int) -> None:
        """With event idx: ask for a kick once the driver publishes past ``index``."""
        self._used_h[2 + 4 * self.size] = index & 0xFFFF

    def close(self) -> None:
        if self._mem is None:
            return
        for view in (self._avail, self._used_h, self._used_w, self._used_bytes, self._desc):
            view.release()
        for _, _, view in self._spaces:
            view.release()
        self._mem.release()
        self._mem = None  # type: ignore[assignment]

    def __enter__(self) -> DeviceQueue:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
