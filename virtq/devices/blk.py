"""virtio-blk driver (VIRTIO 1.2 §5.2) over any :class:`~virtq.transport.Transport`.

A request is a chain: a 16-byte device-readable header (type, reserved, sector), the data
buffers (device-readable for writes, device-writable for reads), and a 1-byte
device-writable status (§5.2.6).  Each in-flight request owns a *slot*: a header, a status
byte and (for copying I/O) a bounce buffer in the device's memory arena.  Zero-copy I/O
passes :class:`~virtq.devices.dma.DmaBuffer`\\ s from :meth:`BlkDevice.alloc_buffer` instead.

Submission is lazy: ``submit_*`` adds chains; :meth:`BlkDevice.kick` (called by ``wait`` and
``poll``) publishes them with one index store per queue and notifies only when the device
asks for it (event idx).
"""

from __future__ import annotations

import operator
import os
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn, Self

from virtq.abi import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from virtq.abi.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from virtq.devices.dma import DmaBuffer
from virtq.devices.errors import BlkIOError, BlkUnsupportedError
from virtq.errors import (
    ArgumentError,
    DeviceError,
    DeviceProtocolError,
    QueueFullError,
    QueueStateError,
)
from virtq.iova import IovaAllocator
from virtq.layout import SplitLayout, align_up
from virtq.queue import SplitQueue
from virtq.transport.base import DmaArena, Transport
from virtq.transport.errors import DeviceRefusedError
from virtq.transport.vfio_pci import VfioPciTransport
from virtq.transport.vhost_user import VhostUserTransport

# The request header (type, reserved, sector) and the status byte after it (poisoned, see
# _STATUS_POISON) in one store.
_PACK_HEADER_STATUS = struct.Struct("<IIQB").pack_into
_PACK_DESC = struct.Struct("<QIHH").pack_into  # struct virtq_desc (§2.7.5)
_F_NEXT = VIRTQ_DESC_F_NEXT
_F_WRITE = VIRTQ_DESC_F_WRITE
_F_INDIRECT = VIRTQ_DESC_F_INDIRECT
# Header (16) + status (1), padded to a cache line: the device writing one slot's status
# and the driver writing the next request's header into another slot then never contend
# for one line.
_SLOT_META = 64
_KIND_NAMES = {VIRTIO_BLK_T_IN: "read", VIRTIO_BLK_T_OUT: "write",
               VIRTIO_BLK_T_FLUSH: "flush", VIRTIO_BLK_T_GET_ID: "get_id"}
_U64_MAX = (1 << 64) - 1
_STATUS_POISON = 0xFF  # written before submission: a status the device never wrote is caught
_BUF_KIND = operator.attrgetter("__class__", "length")
_FIRST = operator.itemgetter(0)
_NO_SHAPE = -1  # a slot whose indirect table holds no known shape (see _write_shape)


def _check_sectors(nbytes: int) -> None:
    if nbytes.__class__ is not int or nbytes <= 0 or nbytes % SECTOR_SIZE:
        raise ArgumentError("nbytes", nbytes, "must be a positive multiple of 512")


def _check_sector(sector: int) -> None:
    if (sector.__class__ is not int and not isinstance(sector, int)) \
            or not 0 <= sector <= _U64_MAX:
        raise ArgumentError("sector", sector, "must be an int in 0..2**64-1")


def _byte_view(data: memoryview) -> memoryview:
    """``data`` as bytes (a multi-byte format would make len() count items)."""
    try:
        return data.cast("B")
    except TypeError as err:  # not C-contiguous
        raise ArgumentError("data", data, f"a contiguous buffer ({err})") from None


class BlkRequest:
    """A submitted request.  :meth:`wait` returns its result (the bytes read, when the
    request copied them) or raises the request's error.

    ``into`` is None for copying I/O (the data goes through the slot's bounce buffer) and
    the caller's buffers for zero-copy I/O.  ``status`` is the device's status byte once
    the request completed, ``written`` what the device reported writing."""

    __slots__ = ("_dev", "error", "into", "kind", "nbytes", "result", "sector", "slot",
                 "status", "written")

    # Positional only and no defaults: this runs once per request (keyword arguments made
    # it three times slower).
    def __init__(self, dev: BlkDevice, kind: int, sector: int, nbytes: int, slot: int,
                 into: Sequence[DmaBuffer] | None, /) -> None:
        self._dev = dev
        self.kind = kind
        self.sector = sector
        self.nbytes = nbytes
        self.slot = slot
        self.into = into
        self.status: int | None = None
        self.written = 0
        self.result: bytes | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.status is not None or self.error is not None

    def wait(self, timeout: float | None = None) -> bytes | None:
        """Block until this request completes; returns the data read (copying reads and
        GET_ID) or None; raises :class:`BlkIOError`, :class:`BlkUnsupportedError` or the
        transport's error."""
        if not self.done:
            self._dev.wait([self], timeout=timeout)
        if self.error is not None:
            raise self.error
        return self.result

    def __repr__(self) -> str:
        state = "done" if self.done else "in flight"
        return (f"<BlkRequest {_KIND_NAMES.get(self.kind, self.kind)} sector={self.sector} "
                f"nbytes={self.nbytes} {state}>")


class BlkDevice:
    """A virtio-blk device.  Build it with :meth:`connect_vhost_user`, :meth:`open_vfio`,
    or over any transport: ``BlkDevice(transport)``.  Closing the device closes the
    transport."""

    def __init__(
        self,
        transport: Transport,
        *,
        queue_size: int = 128,
        num_queues: int = 1,
        max_io: int = 128 * 1024,
        max_segments: int = 8,
        indirect: bool = True,
        event_idx: bool = True,
        poll: bool = False,
        start_index: int = 0,
    ) -> None:
        if max_io <= 0 or max_io % SECTOR_SIZE:
            raise ArgumentError("max_io", max_io, "must be a positive multiple of 512")
        self.transport = transport
        self.poll_mode = poll
        self.max_io = max_io
        self._closed = False
        # Why submissions are refused (closed, or the transport failed), None while usable:
        # one check on the submit paths.
        self._refused: str | None = None
        self._refused_cause: BaseException | None = None
        try:
            self._setup(queue_size, num_queues, max_segments, indirect, event_idx, start_index)
        except BaseException:
            # Our own views pin the arena: release them first, or closing the transport
            # fails with RegionBusyError and hides the error that stopped the set-up.
            mem = getattr(self, "_mem", None)
            if mem is not None:
                mem.release()
            for q in getattr(self, "queues", []):
                q.close()
            transport.close()
            raise

    # -- set-up ---------------------------------------------------------------------------------

    def _setup(self, queue_size: int, num_queues: int, max_segments: int, indirect: bool,
               event_idx: bool, start_index: int) -> None:
        t = self.transport
        wanted = (1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX
                  | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH
                  | 1 << VIRTIO_BLK_F_RO | 1 << VIRTIO_BLK_F_TOPOLOGY)
        if num_queues > 1:
            wanted |= 1 << VIRTIO_BLK_F_MQ
        if event_idx:
            wanted |= 1 << VIRTIO_F_EVENT_IDX
        if indirect:
            wanted |= 1 << VIRTIO_F_INDIRECT_DESC
        self.features = t.negotiate(wanted)
        if indirect and not self.features >> VIRTIO_F_INDIRECT_DESC & 1:
            raise DeviceRefusedError("the device does not offer VIRTIO_F_INDIRECT_DESC")
        if num_queues > 1 and not self.features >> VIRTIO_BLK_F_MQ & 1:
            raise DeviceRefusedError(f"{num_queues} queues asked, the device has no MQ")
        # Configuration layout (§5.2.4): capacity le64 @0, size_max le32 @8,
        # seg_max le32 @12, geometry @16, blk_size le32 @20.
        config = t.read_config(0, 24)
        self.capacity: int = struct.unpack_from("<Q", config, 0)[0]
        self.size_max: int | None = (struct.unpack_from("<I", config, 8)[0]
                                     if self._has(VIRTIO_BLK_F_SIZE_MAX) else None)
        self.seg_max: int | None = (struct.unpack_from("<I", config, 12)[0]
                                    if self._has(VIRTIO_BLK_F_SEG_MAX) else None)
        self.block_size: int = (struct.unpack_from("<I", config, 20)[0]
                                if self._has(VIRTIO_BLK_F_BLK_SIZE) else SECTOR_SIZE)
        self.read_only = self._has(VIRTIO_BLK_F_RO)
        self.flush_supported = self._has(VIRTIO_BLK_F_FLUSH)
        if self.seg_max is not None and self.seg_max:
            max_segments = min(max_segments, self.seg_max)

        max_size = t.max_queue_size(0)
        if max_size == 0:
            raise DeviceRefusedError("the device has no request queue 0")
        size = min(queue_size, max_size)
        self.max_segments = max_segments
        self.indirect = bool(self.features >> VIRTIO_F_INDIRECT_DESC & 1)
        ev = bool(self.features >> VIRTIO_F_EVENT_IDX & 1)
        # An indirect request takes one ring descriptor; a direct one header + data + status.
        per_request = 1 if self.indirect else 2 + 1
        self.slots_per_queue = max(1, size // per_request)
        layout = SplitLayout.compute(
            size, indirect_size=(2 + max_segments) if self.indirect else 0)
        page = layout.page_size
        ring_bytes = layout.nbytes
        meta_off = num_queues * ring_bytes
        nslots = num_queues * self.slots_per_queue
        bounce_off = align_up(meta_off + nslots * _SLOT_META, page)
        total = bounce_off + nslots * self.max_io
        self.arena: DmaArena = t.alloc_dma(total)
        # Per slot: where its header and its status byte are (looked up, not computed, in
        # the per-request loops).
        self._slot_meta = [meta_off + slot * _SLOT_META for slot in range(nslots)]
        self._slot_status = [meta + 16 for meta in self._slot_meta]
        self._bounce_off = bounce_off
        self._mem = self.arena.region.view()
        self.queues: list[SplitQueue] = []
        self._free_slots: list[list[int]] = []
        # Per slot: the reserved ring descriptor heading its persistent indirect chain, the
        # offset of its indirect table, the shape last written there (see _submit), and
        # its queue's add_reserved (bound once: the submit path runs per request).
        self._slot_head: list[int] = []
        self._slot_table: list[int] = []
        self._slot_shape: list[int] = []
        # With a one-buffer zero-copy shape: the DmaBuffer its data entry points at (held,
        # so identity means the same immutable buffer; see submit_read_many).
        self._slot_buf: list[DmaBuffer | None] = []
        self._slot_add: list[Any] = []
        for i in range(num_queues):
            qlayout = layout.shifted(i * ring_bytes)
            q = SplitQueue(self.arena.region, qlayout,
                           iova=self.arena.iova, event_idx=ev, indirect=self.indirect,
                           start_index=start_index)
            self.queues.append(q)
            base = i * self.slots_per_queue
            self._free_slots.append(list(range(base + self.slots_per_queue - 1, base - 1, -1)))
            if self.indirect:
                for head in q.reserve(size):
                    self._slot_head.append(head)
                    self._slot_table.append(qlayout.indirect_table(head))
                    self._slot_shape.append(_NO_SHAPE)
                    self._slot_buf.append(None)
                    self._slot_add.append(q.add_reserved)
            t.attach_queue(i, q)
        self._init_chains()
        self._n_in_flight = 0  # the queues' tokens list them; the count saves scanning
        self._next_queue = 0
        self._single_queue = num_queues == 1
        # With one queue, slot k's chain is usually headed by descriptor k (saves a lookup).
        self._slot_is_head = self._slot_head == list(range(len(self._slot_head)))
        t.start()
        if self.poll_mode:
            for q in self.queues:
                q.disable_interrupts()

    def _has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @classmethod
    def connect_vhost_user(
        cls,
        path: str | os.PathLike[str],
        *,
        queue_size: int = 128,
        num_queues: int = 1,
        timeout: float = 5.0,
        iova_allocator: IovaAllocator | None = None,
        **options: Any,
    ) -> Self:
        """Connect to a vhost-user-blk back-end (qemu-storage-daemon, the embedded
        :mod:`virtq.testing.embedded`, ...) listening on ``path``."""
        transport = VhostUserTransport.connect(path, timeout=timeout,
                                               iova_allocator=iova_allocator)
        return cls(transport, queue_size=queue_size, num_queues=num_queues, **options)

    @classmethod
    def open_vfio(
        cls,
        pci_address: str,
        *,
        iova_allocator: IovaAllocator | None = None,
        memory: Any = None,
        poll: bool = False,
        bind: bool = False,
        **options: Any,
    ) -> Self:
        """Open a virtio-blk PCI function through VFIO (see ``docs/vfio.md``); ``bind``
        rebinds it to ``vfio-pci`` first."""
        transport = VfioPciTransport.open(pci_address, iova_allocator=iova_allocator,
                                          memory=memory, poll=poll, bind=bind)
        return cls(transport, poll=poll, **options)

    # -- buffers --------------------------------------------------------------------------

    def alloc_buffer(self, nbytes: int) -> DmaBuffer:
        """Device-visible memory for zero-copy I/O (``submit_read(..., into=buf)``).
        Allocate few, large buffers and :meth:`DmaBuffer.slice` them: each call is a new
        region the transport must register (vhost-user allows 8 in all)."""
        arena = self.transport.alloc_dma(nbytes)
        # The arena is rounded up to pages (2 MiB with hugepages); the buffer is what was
        # asked for, so a whole-buffer request moves exactly nbytes.
        return DmaBuffer(arena, 0, nbytes)

    # -- submission ---------------------------------------------------------------------------

    def _take_slot(self) -> int:
        """A free slot, round-robin over the queues (a slot's queue is
        ``slot // slots_per_queue``).  _submit pops a single queue's slots itself."""
        free_slots = self._free_slots
        n = len(free_slots)
        for k in range(n):
            qi = (self._next_queue + k) % n
            if free_slots[qi]:
                self._next_queue = (qi + 1) % n
                return free_slots[qi].pop()
        raise QueueStateError(
            f"all {n * self.slots_per_queue} request slots are in flight; wait() for some")

    def _init_chains(self) -> None:
        """(Re)write every slot's persistent chain: a ring descriptor pointing at the slot's
        indirect table, whose entry 0 is the request header.  Data and status entries are
        written per request shape (see :meth:`_submit`)."""
        if not self.indirect:
            return
        iova = self.arena.iova
        for slot in range(len(self._slot_head)):
            meta = self._slot_meta[slot]
            _PACK_DESC(self._mem, self._slot_table[slot], iova + meta, 16, _F_NEXT, 1)
            self._slot_shape[slot] = _NO_SHAPE
            self._slot_buf[slot] = None

    def _write_shape(self, slot: int, nbytes: int, into: Sequence[DmaBuffer] | None,
                     wflag: int, key: int) -> None:
        """Write the data entries 1..m and the status entry m+1 of the slot's indirect table
        (§2.7.5.3: entries are chained by index from 0), and the head's table length --
        each only if it differs from what the slot's last request left there.

        The shape key (see _submit) packs ``m << 2 | wflag`` (where the status entry
        sits, which way the data goes) in the low 16 bits; a copying request adds its
        length above them, because its one data entry, the bounce buffer, is then fully
        known (``key``, computed by _submit).  Zero-copy data entries are rewritten every
        time."""
        mem = self._mem
        table = self._slot_table[slot]
        iova = self.arena.iova
        m = (1 if nbytes else 0) if into is None else len(into)
        tail = m << 2 | wflag
        old = self._slot_shape[slot]
        self._slot_shape[slot] = _NO_SHAPE  # until every entry below is written
        self._slot_buf[slot] = None
        if old & 0xFFFF != tail:
            meta = self._slot_meta[slot]
            _PACK_DESC(mem, table + 16 * (m + 1), iova + meta + 16, 1, _F_WRITE, 0)
            queue = self.queues[slot // self.slots_per_queue]
            queue.set_desc(self._slot_head[slot], iova + table, 16 * (m + 2), _F_INDIRECT, 0)
        flags = _F_NEXT | wflag
        if into is None:
            if nbytes:
                boff = self._bounce_off + slot * self.max_io
                _PACK_DESC(mem, table + 16, iova + boff, nbytes, flags, 2)
            self._slot_shape[slot] = key
        else:
            i = 1
            for buf in into:
                _PACK_DESC(mem, table + 16 * i, buf.iova, buf.length, flags, i + 1)
                i += 1
            self._slot_shape[slot] = tail
            if m == 1:
                self._slot_buf[slot] = into[0]

    def _submit(self, kind: int, sector: int, nbytes: int,
                data: bytes | bytearray | memoryview | None,
                into: Sequence[DmaBuffer] | None, wflag: int) -> BlkRequest:
        """Start a request whose lengths are already checked: ``nbytes`` in total, copied
        through the slot's bounce buffer (``into`` None; ``data`` is what to write) or
        moved by the device straight to/from ``into``.  ``wflag`` is ``VIRTQ_DESC_F_WRITE``
        when the device writes the data (reads, GET_ID), else 0.

        This runs once per request, so it avoids what costs in CPython: keyword arguments,
        temporary tuples, and rewriting descriptors that already say the right thing."""
        if sector.__class__ is not int or not 0 <= sector <= _U64_MAX:
            _check_sector(sector)  # raises, unless an int subclass in range
        if self._refused is not None:
            self._refuse()
        free = self._free_slots[0]
        slot = free.pop() if free and self._single_queue else self._take_slot()
        mem = self._mem
        meta = self._slot_meta[slot]
        _PACK_HEADER_STATUS(mem, meta, kind, 0, sector, _STATUS_POISON)
        if into is None and nbytes:
            boff = self._bounce_off + slot * self.max_io
            if data is not None:
                mem[boff : boff + nbytes] = data
        try:
            if self.indirect:
                # Persistent chain (one reserved ring descriptor per slot, see _setup): most
                # workloads repeat one shape, so most requests write no descriptor at all.
                key = nbytes << 17 | 1 << 16 | (4 if nbytes else 0) | wflag  # see _write_shape
                if into is not None or self._slot_shape[slot] != key:
                    self._write_shape(slot, nbytes, into, wflag, key)
                req = BlkRequest(self, kind, sector, nbytes, slot, into)
                self._slot_add[slot](self._slot_head[slot], req, nbytes + 1 if wflag else 1)
            else:
                req = self._add_direct(kind, sector, nbytes, slot, into, wflag)
        except BaseException:
            self._free_slots[slot // self.slots_per_queue].append(slot)
            raise
        self._n_in_flight += 1
        return req

    def _add_direct(self, kind: int, sector: int, nbytes: int, slot: int,
                    into: Sequence[DmaBuffer] | None, wflag: int) -> BlkRequest:
        """Without indirect descriptors: the whole chain goes into the ring each time."""
        iova = self.arena.iova
        meta = self._slot_meta[slot]
        segments: list[tuple[int, int]]
        if into is not None:
            segments = [(b.iova, b.length) for b in into]
        elif nbytes:
            segments = [(iova + self._bounce_off + slot * self.max_io, nbytes)]
        else:
            segments = []
        req = BlkRequest(self, kind, sector, nbytes, slot, into)
        header = (iova + meta, 16)
        status = (iova + meta + 16, 1)
        queue = self.queues[slot // self.slots_per_queue]
        if wflag:
            queue.add((header,), [*segments, status], req)
        else:
            queue.add([header, *segments], (status,), req)
        return req

    def _check_len(self, nbytes: int) -> None:
        _check_sectors(nbytes)
        if nbytes > self.max_io:
            raise ArgumentError("nbytes", nbytes, f"at most max_io={self.max_io} per request; "
                                "read()/write() split larger transfers")

    def _check_bufs(self, into: DmaBuffer | Sequence[DmaBuffer]) -> tuple[Sequence[DmaBuffer], int]:
        """Zero-copy buffers as a sequence, and their total length."""
        if into.__class__ is DmaBuffer:
            length = into.length
            if length % SECTOR_SIZE:
                raise ArgumentError("into", into, "buffer lengths must be multiples of 512")
            return (into,), length
        bufs = [into] if isinstance(into, DmaBuffer) else list(into)
        if not bufs:
            raise ArgumentError("into", into, "at least one buffer")
        if len(bufs) > self.max_segments:
            raise ArgumentError("into", len(bufs),
                                f"at most {self.max_segments} segments per request")
        for b in bufs:
            if not isinstance(b, DmaBuffer):
                raise ArgumentError("into", b, "DmaBuffers from alloc_buffer()")
            if b.length % SECTOR_SIZE:
                raise ArgumentError("into", b, "buffer lengths must be multiples of 512")
        return bufs, sum(b.length for b in bufs)

    def submit_read(self, sector: int, nbytes: int = 0, *,
                    into: DmaBuffer | Sequence[DmaBuffer] | None = None) -> BlkRequest:
        """Start reading ``nbytes`` at ``sector``.  Without ``into`` the data is copied out
        of a bounce buffer and returned by ``wait()``; with ``into`` (one buffer or a
        scatter list) the device writes straight into them."""
        if into is None:
            if nbytes.__class__ is not int or not 0 < nbytes <= self.max_io \
                    or nbytes % SECTOR_SIZE:
                self._check_len(nbytes)
            return self._submit(VIRTIO_BLK_T_IN, sector, nbytes, None, None, _F_WRITE)
        bufs, total = self._check_bufs(into)
        return self._submit(VIRTIO_BLK_T_IN, sector, total, None, bufs, _F_WRITE)

    def submit_read_many(self, sectors: Sequence[int], nbytes: int = 0, *,
                         into: Sequence[DmaBuffer] | None = None) -> list[BlkRequest]:
        """:meth:`submit_read` for each of ``sectors``, in one call: ``nbytes`` each,
        copied, or without a copy into ``into[i]`` (one :class:`DmaBuffer` per sector, all
        the same length).  This is how to refill a deep queue: the per-request work runs
        in one loop and the queue takes the whole batch at once (submission costs about
        0.6x as much CPU as single calls).  All or nothing: a bad argument, or fewer free
        slots than ``sectors``, raises before any request is submitted."""
        count = len(sectors)
        if into is None:
            if nbytes.__class__ is not int or not 0 < nbytes <= self.max_io \
                    or nbytes % SECTOR_SIZE:
                self._check_len(nbytes)
        else:
            nbytes = self._check_buf_batch(into, count)
        if self._refused is not None:
            self._refuse()
        if not (self.indirect and self._single_queue):
            return self._submit_each(VIRTIO_BLK_T_IN, sectors, nbytes, into)
        free = self._free_slots[0]
        if count > len(free):
            raise QueueStateError(f"{count} requests need {count} slots; {len(free)} of "
                                  f"{self.slots_per_queue} are free")
        if not count:
            return []
        slots = free[-count:]
        mem = self._mem
        pack_header = _PACK_HEADER_STATUS
        slot_meta = self._slot_meta
        shape = self._slot_shape
        reqs: list[BlkRequest] = []
        append = reqs.append
        # Everything below writes only to free slots, invisible to the device, so a bad
        # sector (struct refuses it) leaves nothing to undo.
        try:
            if into is None:
                key = nbytes << 17 | 1 << 16 | 4 | _F_WRITE  # see _write_shape
                for slot, sector in zip(slots, sectors, strict=True):
                    pack_header(mem, slot_meta[slot], VIRTIO_BLK_T_IN, 0, sector,
                                _STATUS_POISON)
                    if shape[slot] != key:
                        self._write_shape(slot, nbytes, None, _F_WRITE, key)
                    append(BlkRequest(self, VIRTIO_BLK_T_IN, sector, nbytes, slot, None))
            else:
                # Refilling with the buffers of the requests just reaped puts each one back
                # into the slot it came from (the slots freed last are taken first, in
                # order), so its descriptor already points at it and is not rewritten.
                tail = 1 << 2 | _F_WRITE  # one data entry, device-writable
                slot_buf = self._slot_buf
                for slot, sector, buf in zip(slots, sectors, into, strict=True):
                    pack_header(mem, slot_meta[slot], VIRTIO_BLK_T_IN, 0, sector,
                                _STATUS_POISON)
                    bufs = (buf,)
                    if slot_buf[slot] is not buf or shape[slot] != tail:
                        self._write_shape(slot, nbytes, bufs, _F_WRITE, tail)
                    append(BlkRequest(self, VIRTIO_BLK_T_IN, sector, nbytes, slot, bufs))
        except struct.error:
            for sector in sectors:
                _check_sector(sector)
            raise
        heads = slots if self._slot_is_head else [self._slot_head[slot] for slot in slots]
        self.queues[0].add_reserved_many(heads, capacity=nbytes + 1, tokens=reqs)
        del free[-count:]
        self._n_in_flight += count
        return reqs

    def _check_buf_batch(self, into: Sequence[DmaBuffer], count: int) -> int:
        """One DmaBuffer per request, all of one length (a multiple of 512): that length."""
        if len(into) != count:
            raise ArgumentError("into", len(into), f"one buffer per sector ({count})")
        if not count:
            return 0
        # One C-level pass (map), not per-buffer Python lines: this runs per batch.
        try:
            kinds: set[tuple[type, int]] = set(map(_BUF_KIND, into))
        except AttributeError:
            kinds = set()
        if len(kinds) != 1 or next(iter(kinds))[0] is not DmaBuffer:
            bad = next((b for b in into if b.__class__ is not DmaBuffer), None)
            if bad is not None:
                raise ArgumentError("into", bad, "DmaBuffers from alloc_buffer()")
            raise ArgumentError("into", sorted(b.length for b in into),
                                "buffers of one length per call")
        ((_, length),) = kinds
        if length % SECTOR_SIZE:
            raise ArgumentError("into", length, "buffer lengths must be multiples of 512")
        return length

    def _submit_each(self, kind: int, sectors: Sequence[int], nbytes: int,
                     into: Sequence[DmaBuffer] | None) -> list[BlkRequest]:
        """The batch calls without the single-queue indirect fast path: check everything,
        then submit one by one (nothing can fail half-way)."""
        for sector in sectors:
            _check_sector(sector)
        count = len(sectors)
        free = sum(len(f) for f in self._free_slots)
        if count > free:
            raise QueueStateError(f"{count} requests need {count} slots; {free} are free")
        if not self.indirect:
            # Each of these takes three ring descriptors (header, data, status).  A slot is
            # sized for that, but scatter requests in flight may hold more, so check each
            # queue for the most requests it could be given.
            for q, slots in zip(self.queues, self._free_slots, strict=True):
                needed = 3 * min(count, len(slots))
                if needed > q.num_free:
                    raise QueueFullError(needed, q.num_free)
        wflag = _F_WRITE if kind == VIRTIO_BLK_T_IN else 0
        if into is None:
            return [self._submit(kind, sector, nbytes, None, None, wflag) for sector in sectors]
        return [self._submit(kind, sector, nbytes, None, (buf,), wflag)
                for sector, buf in zip(sectors, into, strict=True)]

    def submit_write(self, sector: int,
                     data: bytes | bytearray | memoryview | DmaBuffer | Sequence[DmaBuffer]
                     ) -> BlkRequest:
        """Start writing ``data`` (copied) or device buffers (zero-copy) at ``sector``."""
        if self.read_only:
            raise QueueStateError("the device is read-only (VIRTIO_BLK_F_RO)")
        if isinstance(data, bytes | bytearray | memoryview):
            if isinstance(data, memoryview):
                data = _byte_view(data)
            nbytes = len(data)
            self._check_len(nbytes)
            return self._submit(VIRTIO_BLK_T_OUT, sector, nbytes, data, None, 0)
        bufs, total = self._check_bufs(data)
        return self._submit(VIRTIO_BLK_T_OUT, sector, total, None, bufs, 0)

    def submit_flush(self) -> BlkRequest:
        return self._submit(VIRTIO_BLK_T_FLUSH, 0, 0, None, None, 0)

    def submit_get_id(self) -> BlkRequest:
        return self._submit(VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES, None, None, _F_WRITE)

    # -- completion --------------------------------------------------------------------------

    def kick(self) -> None:
        """Publish added requests; notify the queues whose device asked for it."""
        for qi, queue in enumerate(self.queues):
            if queue.publish():  # False at once when nothing was added
                self.transport.notify(qi)

    @property
    def in_flight(self) -> int:
        """How many requests are submitted and not yet completed."""
        return self._n_in_flight

    def poll(self, timeout: float | None = 0, *, min_completions: int = 1) -> list[BlkRequest]:
        """Publish pending requests, then return the requests the device completed (check
        each one's ``error``, or call its ``wait()``).  With ``timeout`` (seconds, None =
        forever) block until at least ``min_completions`` are done (fewer if fewer are in
        flight) or the time is up; ``timeout=0`` never blocks.

        ``min_completions`` > 1 is for throughput: with event idx the device is asked to
        notify once that many have completed, so the driver sleeps through the rest
        instead of waking (or spinning) for each one -- like io_uring's ``min_complete``.
        Each request then waits a little longer.

        A transport failure (the back-end died) fails every request in flight with that
        error and raises it."""
        done: list[BlkRequest] = []
        try:
            self.kick()
            self._reap(done)
            if timeout == 0 or len(done) >= min_completions or not self._n_in_flight:
                return done
            deadline = None if timeout is None else time.monotonic() + timeout
            spins = 0
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return done
                if self.poll_mode:
                    spins += 1
                    if spins % 4096 == 0:
                        self._check_transport()
                else:
                    busy = self._arm_wakeup(min_completions - len(done))
                    if busy is not None:
                        self.transport.wait(busy,
                                            0.1 if remaining is None else min(0.1, remaining))
                self._reap(done)
                if len(done) >= min_completions or not self._n_in_flight:
                    return done
        except (DeviceError, OSError) as err:
            if isinstance(err, BlkIOError):
                raise
            self._fail_all(err)
            if self._refused is None:
                self._refused = (f"the transport failed ({type(err).__name__}: {err}); "
                                 "reconnect() before submitting more")
                self._refused_cause = err
            raise

    def _refuse(self) -> NoReturn:
        raise QueueStateError(self._refused or "BlkDevice is unusable") \
            from self._refused_cause

    def _arm_wakeup(self, want: int) -> int | None:
        """Re-enable notifications for the ``want`` completions still wanted; the queue to
        sleep on, or None when they raced in meanwhile (reap instead: §2.7.13.5)."""
        queues = self.queues
        if self._single_queue:
            return None if queues[0].enable_interrupts_after(want) else 0
        busy = [i for i, q in enumerate(queues) if q.num_in_flight]
        if any(queues[i].enable_interrupts_after(want) for i in busy):
            return None
        return busy[0] if busy else 0

    def _reap(self, done: list[BlkRequest]) -> None:
        """Complete what the device used (see :meth:`_complete`), queue by queue."""
        for q, free in zip(self.queues, self._free_slots, strict=True):
            try:
                got = q.drain_used()
            except DeviceProtocolError as err:
                # The queue validated these before the bad element: they did complete.
                # (Their tokens are BlkRequests: nothing else adds to these queues.)
                self._complete(err.completed, free, done)  # type: ignore[arg-type]
                raise
            if got:
                self._complete(got, free, done)

    def _complete(self, got: list[tuple[BlkRequest, int]], free: list[int],
                  done: list[BlkRequest]) -> None:
        """Status byte, copy out of the bounce buffer, free the slot: inlined over the
        batch because it runs once per request."""
        mem = self._mem
        slot_status = self._slot_status
        bounce_off = self._bounce_off
        max_io = self.max_io
        stale: list[BlkRequest] = []
        for req, written in got:
            if req.error is not None:
                # Failed when its transport did (_fail_all), which freed the slot; the
                # device still wrote its completion.  Freeing the slot again would hand
                # it out twice.
                stale.append(req)
                continue
            slot = req.slot
            status = mem[slot_status[slot]]
            req.written = written
            req.status = status
            if status or req.kind:  # not a successful read (VIRTIO_BLK_T_IN is 0)
                self._complete_other(req, status)
            elif req.into is None:
                boff = bounce_off + slot * max_io
                req.result = bytes(mem[boff : boff + req.nbytes])
            free.append(slot)
        if stale:
            done.extend(req for req, _ in got if req not in stale)
            self._n_in_flight -= len(got) - len(stale)
        else:
            done.extend(map(_FIRST, got))
            self._n_in_flight -= len(got)

    def _complete_other(self, req: BlkRequest, status: int) -> None:
        """A failed request's error, or GET_ID's string (writes and flushes carry nothing)."""
        if status:
            req.error = self._status_error(req, status)
        elif req.kind == VIRTIO_BLK_T_GET_ID:
            boff = self._bounce_off + req.slot * self.max_io
            req.result = bytes(self._mem[boff : boff + req.nbytes]).rstrip(b"\0")

    @staticmethod
    def _status_error(req: BlkRequest, status: int) -> BlkIOError:
        name = _KIND_NAMES.get(req.kind, str(req.kind))
        cls = BlkUnsupportedError if status == VIRTIO_BLK_S_UNSUPP else BlkIOError
        what = {VIRTIO_BLK_S_IOERR: "I/O error", VIRTIO_BLK_S_UNSUPP: "unsupported",
                _STATUS_POISON: "no status written"}.get(status, f"status {status}")
        return cls(f"{name} of {req.nbytes} bytes at sector {req.sector}: {what}",
                   kind=name, sector=req.sector, nbytes=req.nbytes, status=status)

    def _in_flight(self) -> list[BlkRequest]:
        """The requests submitted and not done (the queues keep them as tokens)."""
        return [req for q in self.queues for req in q.in_flight_tokens() if not req.done]

    def _fail_all(self, err: BaseException) -> None:
        """The transport failed: no request in flight can complete any more.  (The queues
        still list them until reconnect() resets the rings; done() skips them.)"""
        for req in self._in_flight():
            req.error = err
            self._free_slots[req.slot // self.slots_per_queue].append(req.slot)
        self._n_in_flight = 0

    def wait(self, requests: Iterable[BlkRequest] | None = None,
             timeout: float | None = None) -> None:
        """Until every request in ``requests`` (default: all in flight) is done.  Raises
        TimeoutError after ``timeout`` seconds (the requests stay in flight)."""
        pending = [r for r in (self._in_flight() if requests is None else requests)
                   if not r.done]
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{len(pending)} request(s) still in flight after "
                                   f"{timeout} s")
            self.poll(timeout=remaining)
            pending = [r for r in pending if not r.done]

    def _check_transport(self) -> None:
        check = getattr(self.transport, "check_alive", None)
        if check is not None:
            check()

    # -- convenience ----------------------------------------------------------------------

    def read(self, sector: int, nbytes: int) -> bytes:
        """Read ``nbytes`` (a multiple of 512) at ``sector``; large reads are split into
        ``max_io`` requests kept in flight together."""
        _check_sectors(nbytes)
        chunks = []
        for off in range(0, nbytes, self.max_io):
            n = min(self.max_io, nbytes - off)
            chunks.append(self._submit_when_free(
                lambda s=sector + off // SECTOR_SIZE, n=n: self.submit_read(s, n)))
        self.wait(chunks)
        return b"".join(r.wait() or b"" for r in chunks)

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (a multiple of 512 bytes) at ``sector``, split like :meth:`read`."""
        view = _byte_view(memoryview(data))
        _check_sectors(len(view))
        reqs = []
        for off in range(0, len(data), self.max_io):
            part = view[off : off + self.max_io]
            reqs.append(self._submit_when_free(
                lambda s=sector + off // SECTOR_SIZE, p=part: self.submit_write(s, p)))
        self.wait(reqs)
        for r in reqs:
            r.wait()

    def _submit_when_free(self, submit: Any) -> BlkRequest:
        while not any(self._free_slots):
            self.wait(self._in_flight()[:1])
        req: BlkRequest = submit()
        return req

    def flush(self) -> None:
        """Make previous writes durable (VIRTIO_BLK_T_FLUSH)."""
        if not self.flush_supported:
            raise QueueStateError("the device did not offer VIRTIO_BLK_F_FLUSH")
        self.submit_flush().wait()

    def get_id(self) -> str:
        """The device's identifier string (up to 20 bytes)."""
        raw = self.submit_get_id().wait() or b""
        return raw.decode("ascii", "replace")

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * SECTOR_SIZE

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the transport (and with it the queues and memory); requests still in
        flight fail with :class:`QueueStateError`."""
        if self._closed:
            return
        self._closed = True
        self._refused, self._refused_cause = "BlkDevice is closed", None
        self._fail_all(QueueStateError("BlkDevice was closed with the request in flight"))
        mem = getattr(self, "_mem", None)
        if mem is not None:
            mem.release()
        self.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reconnect(self, path: str | os.PathLike[str] | None = None) -> int:
        """vhost-user only: connect to a new back-end after the old one died; requests
        that were in flight fail with the disconnect error (if not already).  Returns how
        many were lost."""
        reconnect = getattr(self.transport, "reconnect", None)
        if reconnect is None:
            raise QueueStateError("this transport cannot reconnect")
        lost = reconnect(path)
        count = 0
        for tokens in lost.values():
            for req in tokens:
                if not req.done:
                    req.error = DeviceError("the back-end went away with the request in flight")
                    count += 1
        # Every slot is free again: the rings were reset.
        for qi in range(len(self.queues)):
            base = qi * self.slots_per_queue
            self._free_slots[qi] = list(range(base + self.slots_per_queue - 1, base - 1, -1))
        self._n_in_flight = 0
        self._init_chains()  # the reset rings lost the persistent chains' head descriptors
        if self.poll_mode:
            for q in self.queues:
                q.disable_interrupts()
        if not self._closed:
            self._refused = self._refused_cause = None
        return count
