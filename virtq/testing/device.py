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
from virtq.errors import ArgumentError, QueueStateError, VirtqError
from virtq.layout import SplitLayout, distance, need_event, wrap_add
from virtq.layout.split import DESC_SIZE, avail_nbytes, used_nbytes
from virtq.memory import MemoryRegion

_DESC = struct.Struct("<QIHH")
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


def check_uint(name: str, value: object, high: int) -> int:
    """``value`` if it is an int (not a bool) in ``0..high``; raises
    :class:`ArgumentError` otherwise.  The device-side peers take addresses, lengths and
    ids from tests: a float or a negative length would otherwise slice memory without a
    word, and an id too large for its ring field would raise a bare ``ValueError`` from
    the memoryview."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise ArgumentError(name, value, f"must be an int in 0..{high:#x}")
    return value


def byte_data(data: object) -> memoryview:
    """``data`` (any bytes-like object) as a flat byte view; raises :class:`ArgumentError`
    for anything else (a multi-byte memoryview's ``len()`` counts items, not bytes)."""
    try:
        return memoryview(data).cast("B")  # type: ignore[arg-type]
    except TypeError:
        raise ArgumentError("data", type(data).__name__, "must be bytes-like") from None


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
        indirect_head_only: bool = False,
    ) -> None:
        if not isinstance(layout, SplitLayout):
            raise ArgumentError("layout", layout, "must be a SplitLayout")
        if not isinstance(region, MemoryRegion):
            raise ArgumentError("region", region, "must be a MemoryRegion")
        check_uint("iova", iova, _U64)
        if start_index is not None:
            check_uint("start_index", start_index, 0xFFFF)
        n = layout.queue_size
        #: Follow VIRTQ_DESC_F_INDIRECT only in a head descriptor, as libvhost-user does
        #: (a deviation from §2.7.5.3.2, for the embedded back-end's fault switch).
        self.indirect_head_only = indirect_head_only
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
        # Heads popped and not pushed, in pop order (dicts keep insertion order): what a
        # VIRTIO_F_IN_ORDER batch retires (push_in_order).
        self._popped: dict[int, None] = {}

    def add_region(self, iova: int, region: MemoryRegion) -> None:
        """Make ``region`` reachable at device address ``iova`` too (memory the driver
        shared after the queue was set up: a vhost-user memory table update, a DMA map).
        Raises :class:`ArgumentError` for a bad ``iova`` or ``region``,
        :class:`~virtq.errors.QueueStateError` after :meth:`close`."""
        self._check_open()
        check_uint("iova", iova, _U64)
        if not isinstance(region, MemoryRegion):
            raise ArgumentError("region", region, "must be a MemoryRegion")
        self._spaces.append((iova, region.nbytes, region.view()))

    def _check_open(self) -> None:
        if self._mem is None:
            raise QueueStateError("the DeviceQueue is closed")

    # -- memory access by device address --------------------------------------------

    def _translate(self, iova: int, length: int) -> memoryview:
        if iova.__class__ is not int or length.__class__ is not int \
                or not 0 <= iova <= _U64 or not 0 <= length <= _U64:
            check_uint("iova", iova, _U64)
            check_uint("length", length, _U64)
        self._check_open()
        for base, size, view in self._spaces:
            if base <= iova and iova + length <= base + size:
                return view[iova - base : iova - base + length]
        raise DriverProtocolError(f"address range [{iova:#x}, +{length}) is not mapped")

    def read(self, iova: int, length: int) -> bytes:
        """A copy of ``length`` bytes at device address ``iova``.  Raises
        :class:`DriverProtocolError` when the range is not in any region the device can reach."""
        return bytes(self._translate(iova, length))

    def write(self, iova: int, data: bytes | memoryview) -> None:
        """Write ``data`` at device address ``iova`` (what a device does to a writable buffer).
        Raises :class:`DriverProtocolError` when the range is not mapped."""
        view = byte_data(data)
        self._translate(iova, len(view))[:] = view

    def view(self, iova: int, length: int) -> memoryview:
        """A zero-copy view of ``length`` bytes at device address ``iova``.  Raises
        :class:`DriverProtocolError` when the range is not mapped."""
        return self._translate(iova, length)

    # -- consuming available chains -------------------------------------------------

    def avail_pending(self) -> int:
        """Chains the driver has published and the device has not popped yet."""
        return distance(self.last_avail, self._avail[1])

    def next_head(self) -> int | None:
        """The head the next :meth:`pop` would take (unvalidated), or None."""
        if self._avail[1] == self.last_avail:
            return None
        return int(self._avail[2 + (self.last_avail & (self.size - 1))])

    def pop(self) -> tuple[int, list[Segment]] | None:
        """The next available chain as ``(head, segments)``, indirect tables followed.  Returns
        None when nothing is pending.  Raises :class:`DriverProtocolError` when the driver's
        avail index, head or chain is impossible (an index more than the ring's size ahead, a
        head out of range, a loop, a bad indirect descriptor, a readable buffer after a writable
        one, an address outside the regions)."""
        self._check_open()
        avail_idx = self._avail[1]
        if avail_idx == self.last_avail:
            return None
        if distance(self.last_avail, avail_idx) > self.size:
            raise DriverProtocolError(
                f"avail.idx {avail_idx:#x} is more than {self.size} ahead of {self.last_avail:#x}"
            )
        observe_barrier()  # ring entry and descriptors after the index that exposed them (§2.7.6)
        head = self._avail[2 + (self.last_avail & (self.size - 1))]
        if head >= self.size:
            raise DriverProtocolError(f"avail ring names head {head} >= size {self.size}")
        segments = self._walk(head)
        self.last_avail = wrap_add(self.last_avail, 1)
        self._popped[head] = None
        return head, segments

    def chain(self, head: int) -> list[Segment]:
        """The chain from ``head``, walked as :meth:`pop` walks it, without touching the
        avail ring: for a device that resumes a chain it had taken before (vhost-user's
        inflight tracking).  Raises :class:`DriverProtocolError` for a head outside the
        ring or a chain that is not well formed."""
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
            if flags & VIRTQ_DESC_F_INDIRECT and self.indirect_head_only and segments:
                flags &= ~VIRTQ_DESC_F_INDIRECT  # read the table as if it were data
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

    def desc(self, index: int) -> tuple[int, int, int, int]:
        """Descriptor ``index`` of the ring's table: (addr, len, flags, next).  Raises
        :class:`ArgumentError` for an index outside the ring."""
        check_uint("index", index, self.size - 1)
        addr, length, flags, nxt = _DESC.unpack_from(self._desc, (index % self.size) * DESC_SIZE)
        return addr, length, flags, nxt

    def write_desc_len(self, index: int, length: int) -> None:
        """Overwrite descriptor ``index``'s len: something no device may do (§2.7.5.1);
        for fault injection.  Raises :class:`ArgumentError` for an index outside the ring
        or a length that is not a u32."""
        check_uint("index", index, self.size - 1)
        check_uint("length", length, _U32)
        struct.pack_into("<I", self._desc, (index % self.size) * DESC_SIZE + 8, length)

    @property
    def used_flags(self) -> int:
        """``used.flags`` as the device side last wrote it."""
        return int(self._used_h[0])

    def set_used_flags(self, value: int) -> None:
        """Store ``value`` (mod 2**16) as ``used.flags`` (``VIRTQ_USED_F_NO_NOTIFY``: do not
        kick).  Raises :class:`ArgumentError` for a ``value`` that is not an int."""
        if not isinstance(value, int) or isinstance(value, bool):
            raise ArgumentError("value", value, "must be an int")
        self._used_h[0] = value & 0xFFFF

    # -- returning used chains --------------------------------------------------------

    def push(self, head: int, written_len: int, *, publish: bool = True) -> bool:
        """Put ``(head, written_len)`` into the used ring; with ``publish`` also store
        ``used.idx``.  Returns whether the driver wants a used-buffer notification.  Raises
        :class:`ArgumentError` for a head or length that is not a u32 (any u32 head: a
        hostile device may name one outside the ring on purpose),
        :class:`~virtq.errors.QueueStateError` after :meth:`close`."""
        self._check_used(head, written_len)
        self._popped.pop(head, None)
        return self._put_used(head, written_len, 1, publish)

    def push_in_order(self, last_head: int, written_len: int, *, publish: bool = True) -> bool:
        """VIRTIO_F_IN_ORDER batched retirement (§2.7.9): every chain popped up to and
        including ``last_head`` is used, announced by ONE used element naming ``last_head``
        with ``written_len``, written at the batch's first used position, and ``used.idx``
        advances by the batch's size (the earlier chains count as used completely).
        Returns as :meth:`push`.  Raises :class:`DriverProtocolError` for a head that was
        not popped."""
        self._check_used(last_head, written_len)
        if last_head not in self._popped:
            raise DriverProtocolError(f"head {last_head} was not popped or is already used")
        batch = 0
        for head in list(self._popped):
            del self._popped[head]
            batch += 1
            if head == last_head:
                break
        return self._put_used(last_head, written_len, batch, publish)

    def _check_used(self, head: int, written_len: int) -> None:
        """Before anything changes: the used element's two le32 fields (§2.7.8)."""
        if head.__class__ is not int or written_len.__class__ is not int \
                or not 0 <= head <= _U32 or not 0 <= written_len <= _U32:
            check_uint("head", head, _U32)
            check_uint("written_len", written_len, _U32)
        self._check_open()

    def _put_used(self, head: int, written_len: int, chains: int, publish: bool) -> bool:
        slot = wrap_add(self.used_idx, self._pending_used) & (self.size - 1)
        self._used_w[1 + 2 * slot] = head
        self._used_w[2 + 2 * slot] = written_len
        self._pending_used += chains
        if publish:
            return self.publish_used()
        return False

    def publish_used(self) -> bool:
        """Store ``used.idx`` past every element :meth:`push` wrote with ``publish=False`` (after
        a barrier: elements before the index, §2.7.8).  Returns whether the driver wants a
        used-buffer notification (``used_event`` with event idx, else
        ``VIRTQ_AVAIL_F_NO_INTERRUPT``); False when nothing was pending."""
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
        """Ask the driver not to kick (§2.7.10): ``avail_event`` behind the last consumed index
        with event idx, else ``VIRTQ_USED_F_NO_NOTIFY``."""
        if self.event_idx:
            self._used_h[2 + 4 * self.size] = wrap_add(self.last_avail, -1)
        else:
            self._used_h[0] = VIRTQ_USED_F_NO_NOTIFY

    def enable_notifications(self) -> None:
        """Ask the driver to kick again for the next chain it publishes."""
        if self.event_idx:
            self.set_avail_event(self.last_avail)
        else:
            self._used_h[0] = 0

    def set_avail_event(self, index: int) -> None:
        """With event idx: ask for a kick once the driver publishes past ``index`` (mod
        2**16).  Raises :class:`ArgumentError` for an ``index`` that is not an int."""
        if not isinstance(index, int) or isinstance(index, bool):
            raise ArgumentError("index", index, "must be an int")
        self._used_h[2 + 4 * self.size] = index & 0xFFFF

    def close(self) -> None:
        """Release every view of the driver's memory (idempotent); the region itself stays the
        driver's."""
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
