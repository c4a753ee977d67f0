"""A seed-compatible buffer pool: crosvm's ``UserQueue`` done right.

For people porting from crosvm's vvu driver: one region holds the rings and N fixed
buffers (the seed's layout, 1 KiB each by default); a queue is either device-readable
(``write(data)`` sends) or device-writable (``read_data()`` receives).  Unlike the seed it
handles any completion order (buffer slots are tracked by token, not by ``avail_idx % N``),
re-posts a receive buffer only after the caller released the view of it, and validates every
used element (through :class:`~virtq.queue.SplitQueue`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from virtq.errors import ArgumentError, QueueBrokenError, QueueFullError, QueueStateError
from virtq.iova import DmaMapper, IovaAllocator
from virtq.layout import SplitLayout
from virtq.memory import MemfdRegion, MemoryRegion
from virtq.queue.split import SplitQueue
from virtq.types import Iova

MAX_USERQUEUE_SIZE = 256  # the seed's cap (min(256, device max))


class DescTableAddrs(NamedTuple):
    """The three ring IOVAs a transport hands the device."""

    desc: Iova
    avail: Iova
    used: Iova


class UsedBuffer:
    """A zero-copy view of a received buffer.  The buffer goes back to the device only when
    this is released (``release()`` or leaving the ``with`` block) -- never while the caller
    may still be reading it (the seed re-posted first: defect 2 in SEED.md).

    Once the queue is broken (the device broke the protocol) or closed, releasing still
    works and is quiet: the view is released but the buffer is *not* re-posted -- there is
    no ring to post it to that the device may be trusted with.  The queue's error surfaces
    on the next call to the queue itself (``read_data()`` raises
    :class:`~virtq.errors.QueueBrokenError`), not on the way out of a ``with`` block.
    """

    def __init__(self, owner: UserQueue, slot: int, data: memoryview) -> None:
        self._owner: UserQueue | None = owner
        self.slot = slot
        self.data = data
        self.notify = False

    def __len__(self) -> int:
        return len(self.data)

    def tobytes(self) -> bytes:
        """A copy of the received bytes."""
        return self.data.tobytes()

    def release(self) -> bool:
        """Re-post the buffer; returns whether the device wants a notification (False if
        it was not re-posted: already released, or the queue is broken or closed).
        Idempotent.  Raises :class:`~virtq.errors.QueueStateError`, keeping the buffer,
        while something still holds an export of :attr:`data` (the device could write
        under it)."""
        owner = self._owner
        if owner is None:
            return False
        try:
            self.data.release()
        except BufferError as exc:
            raise QueueStateError(
                f"buffer {self.slot} is still exported (a view made from its data is "
                "alive); release that first: the device would write under it") from exc
        self._owner = None
        self.notify = owner._repost(self.slot)
        return self.notify

    def __enter__(self) -> memoryview:
        return self.data

    def __exit__(self, *exc: object) -> None:
        self.release()


class UserQueue:
    """``UserQueue(queue_size, device_writable, *, tag, iova_allocator, ...)``.

    Allocates its region with ``memory_factory(nbytes)``, reserves an IOVA range with
    ``iova_allocator.alloc(nbytes, tag=tag)`` and, if a ``dma_mapper`` is given, maps it (the
    seed's ``alloc_iova``/``map_iova`` pair).  ``close()`` undoes all of it.
    """

    def __init__(
        self,
        queue_size: int,
        device_writable: bool,
        *,
        tag: int = 0,
        iova_allocator: IovaAllocator,
        memory_factory: Callable[[int], MemoryRegion] = MemfdRegion,
        dma_mapper: DmaMapper | None = None,
        buffer_size: int = 1024,
        event_idx: bool = False,
        start_index: int = 0,
    ) -> None:
        if not isinstance(buffer_size, int) or isinstance(buffer_size, bool) \
                or buffer_size <= 0:
            raise ArgumentError("buffer_size", buffer_size, "must be a positive int")
        if not isinstance(queue_size, int) or isinstance(queue_size, bool) \
                or not 1 <= queue_size <= MAX_USERQUEUE_SIZE:
            # The seed's cap (min(256, device max)); SplitLayout checks the power of two.
            raise ArgumentError("queue_size", queue_size,
                                f"must be an int in 1..{MAX_USERQUEUE_SIZE}")
        if not isinstance(device_writable, bool):
            raise ArgumentError("device_writable", device_writable, "must be True or False")
        if not isinstance(event_idx, bool):
            raise ArgumentError("event_idx", event_idx, "must be True or False")
        if not isinstance(iova_allocator, IovaAllocator):
            raise ArgumentError("iova_allocator", iova_allocator,
                                "must be an IovaAllocator (alloc/free)")
        if dma_mapper is not None and not isinstance(dma_mapper, DmaMapper):
            raise ArgumentError("dma_mapper", dma_mapper, "must be None or a DmaMapper")
        self.layout = SplitLayout.compute(queue_size, buffer_size=buffer_size)
        self.device_writable = device_writable
        self.buffer_size = buffer_size
        self._allocator = iova_allocator
        self._mapper = dma_mapper
        self.region = memory_factory(self.layout.nbytes)
        self.iova: Iova | None = None
        self._mapped = False
        if not isinstance(self.region, MemoryRegion) or self.region.nbytes < self.layout.nbytes:
            bad, nbytes = self.region, getattr(self.region, "nbytes", None)
            if isinstance(bad, MemoryRegion):
                bad.close()
            raise ArgumentError("memory_factory", memory_factory,
                                f"returned {bad!r} ({nbytes} bytes); it must return a "
                                f"MemoryRegion of at least {self.layout.nbytes} bytes")
        try:
            self.iova = iova_allocator.alloc(
                self.region.nbytes, align=4096, tag=tag, host_addr=self.region.host_addr
            )
            if dma_mapper is not None:
                dma_mapper.map(self.iova, self.region.host_addr, self.region.nbytes)
                self._mapped = True
            self.queue: SplitQueue[int] = SplitQueue(
                self.region, self.layout, iova=self.iova, event_idx=event_idx,
                start_index=start_index,
            )
        except BaseException:
            self._release_memory()
            raise
        assert self.layout.buffers is not None  # buffer_size > 0 was checked
        self._buffers = self.region.view(self.layout.buffers, buffer_size * queue_size)
        self._free_slots = list(range(queue_size - 1, -1, -1))
        self._lent: set[int] = set()
        if device_writable:
            # Pre-post every buffer for the device to fill.
            for slot in range(queue_size):
                self._post_writable(slot)
            self.queue.publish()

    def _slot_iova(self, slot: int) -> Iova:
        assert self.iova is not None
        return Iova(self.iova + self.layout.buffers + slot * self.buffer_size)  # type: ignore[operator]

    def _post_writable(self, slot: int) -> None:
        self.queue.add((), [(self._slot_iova(slot), self.buffer_size)], slot)

    def desc_table_addrs(self) -> DescTableAddrs:
        """The device addresses of the descriptor table, available ring and used ring (the seed's
        ``desc_table_addrs()``)."""
        q = self.queue
        return DescTableAddrs(q.desc_iova, q.avail_iova, q.used_iova)

    # -- device-readable (tx) ------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> bool:
        """Copy the bytes of ``data`` into a free buffer and publish it.  Returns whether
        the device wants a notification (the caller notifies; the queue does no I/O).

        ``data`` is any C-contiguous bytes-like object; its length is counted in bytes
        (an ``array('Q')`` of 3 items is 24 bytes).  Raises
        :class:`~virtq.errors.ArgumentError` for anything else (a non-contiguous view, a
        str) or for 0 or more than ``buffer_size`` bytes,
        :class:`~virtq.errors.QueueFullError` when every buffer is in flight."""
        if self.device_writable:
            raise QueueStateError("write() is for device-readable queues; use read_data()")
        try:
            view = memoryview(data)
        except TypeError:
            raise ArgumentError("data", type(data).__name__, "must be bytes-like") from None
        with view:
            if not view.c_contiguous:
                raise ArgumentError("data", view, "must be C-contiguous (copy it first)")
            try:
                raw = view.cast("B")  # its bytes, whatever the item format and shape
            except (TypeError, ValueError):  # a non-native format such as ctypes' "<Q"
                raw = memoryview(view.tobytes())
            with raw:
                return self._write(raw)

    def _write(self, raw: memoryview) -> bool:
        n = raw.nbytes
        if not 0 < n <= self.buffer_size:
            raise ArgumentError(
                "data", f"<{n} bytes>", f"length must be 1..{self.buffer_size} bytes "
                "(buffer size)")
        self.ack_used()
        if not self._free_slots:
            raise QueueFullError(1, 0)
        slot = self._free_slots.pop()
        start = slot * self.buffer_size
        self._buffers[start : start + n] = raw
        try:
            self.queue.add([(self._slot_iova(slot), n)], (), slot)
        except BaseException:
            self._free_slots.append(slot)
            raise
        return self.queue.publish()

    def ack_used(self) -> int:
        """Reclaim the buffers the device has consumed; returns how many.  Raises
        :class:`~virtq.errors.QueueStateError` on a device-writable queue, and what the queue's
        reap raises for an impossible completion."""
        if self.device_writable:
            raise QueueStateError("ack_used() is for device-readable queues")
        done = self.queue.drain_used()
        for slot, _ in done:
            self._free_slots.append(slot)
        return len(done)

    # -- device-writable (rx) ------------------------------------------------------------

    def read_data(self) -> UsedBuffer | None:
        """The next filled buffer as a zero-copy :class:`UsedBuffer`, or None.  Raises
        :class:`~virtq.errors.QueueStateError` on a device-readable queue, and what the queue's
        reap raises for an impossible completion."""
        if not self.device_writable:
            raise QueueStateError("read_data() is for device-writable queues; use write()")
        got = self.queue.pop_used()
        if got is None:
            return None
        slot, length = got
        self._lent.add(slot)
        start = slot * self.buffer_size
        return UsedBuffer(self, slot, self._buffers[start : start + length])

    def _repost(self, slot: int) -> bool:
        self._lent.discard(slot)
        queue = self.queue
        if queue.region.closed or queue.broken is not None:
            return False  # nothing to post to (see UsedBuffer): the queue reports itself
        try:
            self._post_writable(slot)
            return queue.publish()
        except QueueBrokenError:
            return False

    # -- teardown ------------------------------------------------------------------------

    def _release_memory(self) -> None:
        # Undo only what was done (a map() that failed is not unmapped), and the rest even
        # if one step fails: the error of the first failure is the one raised.
        try:
            if self._mapped and self._mapper is not None and self.iova is not None:
                self._mapped = False
                self._mapper.unmap(self.iova, self.region.nbytes)
        finally:
            try:
                if self.iova is not None:
                    iova, self.iova = self.iova, None
                    self._allocator.free(iova)
            finally:
                self.region.close()

    def close(self) -> None:
        """Close the queue and release its memory (idempotent).  Raises
        :class:`~virtq.errors.QueueStateError` while received buffers are still lent out (release
        them first)."""
        if self.region.closed:
            return
        if self._lent:
            raise QueueStateError(
                f"{len(self._lent)} received buffer(s) still lent out; release them first"
            )
        self._buffers.release()
        self.queue.close()
        self._release_memory()

    def __enter__(self) -> UserQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
