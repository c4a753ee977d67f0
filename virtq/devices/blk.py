"""virtio-blk driver (VIRTIO 1.2 §5.2) over any :class:`~virtq.transport.Transport`.

A request is a chain: a 16-byte device-readable header (type, reserved, sector), the data
buffers (device-readable for writes, device-writable for reads), and a 1-byte
device-writable status (§5.2.6).  The driver declares that shape once per queue as a chain
template (:meth:`~virtq.queue.DriverQueue.template`); the queue decides how the chains are
laid out (indirect tables when offered) and writes every descriptor.  Each request slot has
a header and a status byte in the device's memory arena, and (for copying I/O) a bounce
buffer; zero-copy I/O passes :class:`~virtq.devices.dma.DmaBuffer`\\ s from
:meth:`BlkDevice.alloc_buffer` instead.

Submission is lazy: ``submit_*`` makes chains available; :meth:`BlkDevice.kick` (called by
``wait`` and ``poll``) publishes them with one index store per queue and notifies only when
the device asks for it (event idx).  One :class:`~virtq.transport.Waiter` sleeps on every
queue at once.

Failure policy (the same for every device of virtq):

* a request's own failure (the status byte) is its :attr:`BlkRequest.error`;
* a device that breaks one queue (an impossible used element) fails that queue's requests
  with :class:`~virtq.errors.QueueBrokenError` (cause: the
  :class:`~virtq.errors.DeviceProtocolError`); completions reaped before, on any queue, are
  delivered; the other queues go on.  The broken queue is stopped where the transport can
  (vhost-user: GET_VRING_BASE); where it cannot, its zero-copy buffers stay quarantined
  (refused for new requests) until :meth:`BlkDevice.reconnect` or ``close()``;
* a transport failure (the back-end died) fails every request in flight with that error and
  refuses new ones until :meth:`BlkDevice.reconnect` -- unless the device has a
  :class:`~virtq.transport.ReconnectPolicy`: then the requests are kept, the device waits
  for a back-end on the same path and has every request that had not completed carried
  out (see "Reconnect" below); only when the policy's deadline passes do they fail, each
  with :class:`~virtq.transport.ReconnectError`;
* ``poll()`` raises only for caller misuse; ``wait()`` raises a request's error.

Multi-queue (VIRTIO_BLK_F_MQ): ``num_queues=N`` sets up N request queues; a request goes to
the queue named by ``queue=`` or, by default, to the next queue with a free slot
(round-robin).  One ``poll()`` reaps every queue; the waiter sleeps on every queue's
notification fd at once; :meth:`BlkDevice.stats` counts per queue.

Reconnect (``reconnect=ReconnectPolicy(...)``).  When the back-end goes away (the socket
hangs up or a message fails, noticed by ``poll()``/``wait()``), what it had completed is
delivered and every other request is kept.  ``poll()`` then tries to connect to the same
path (within its own timeout; ``wait()`` until the policy's deadline), renegotiates --
the new back-end must offer every feature negotiated before, else the requests fail at
once -- and brings the rings back:

* with the back-end's inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, kept by the
  front-end across the restart, vhost-user.rst "Inflight I/O tracking") the rings are kept
  as they are and the new back-end resubmits what the old one had taken; the driver
  resubmits nothing;
* otherwise the rings are reset and the driver resubmits every request that had not
  completed, on the queue and slot it was on, in the order it was submitted there.

Each request completes exactly once as the caller sees it.  Idempotence: reads, writes and
GET_ID are simply carried out again (a write that the old back-end had already done is
written again with the same data; overlapping requests in flight together have no order
in virtio anyway).  A flush covers the writes that completed before it was submitted
(VIRTIO 1.2 §5.2.6.1); a flush resubmitted by the driver is held back until every write
resubmitted with it has completed, so it covers at least what it covered before.  What is
not promised: a write the old back-end acknowledged and then lost in its own crash (data
it kept in its own memory) is gone -- that is the back-end's fault, as with any disk that
lies about completion.
"""

from __future__ import annotations

import functools
import operator
import os
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Self

from virtq.abi import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from virtq.abi.blk import (
    BLK_CFG_BLK_SIZE,
    BLK_CFG_CAPACITY,
    BLK_CFG_SEG_MAX,
    BLK_CFG_SIZE_MAX,
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
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from virtq.devices._requests import check_int as _check_int
from virtq.devices._requests import wait_requests
from virtq.devices._rings import ring_chosen, ring_wanted
from virtq.devices.dma import MAX_BUFFER, DmaBuffer, byte_view
from virtq.devices.errors import BlkIOError, BlkUnsupportedError
from virtq.errors import (
    ArgumentError,
    DeviceError,
    DeviceProtocolError,
    QueueBrokenError,
    QueueFullError,
    QueueStateError,
)
from virtq.iova import IovaAllocator
from virtq.layout import align_up
from virtq.memory import MemoryRegion
from virtq.queue import ChainTemplate, DriverQueue, QueueState, make_queue, ring_layout
from virtq.transport.base import DmaArena, Reconnectable, Transport
from virtq.transport.errors import DeviceRefusedError
from virtq.transport.reconnect import Outage, ReconnectError, ReconnectPolicy
from virtq.transport.vfio_pci import VfioPciTransport
from virtq.transport.vhost_user import VhostUserTransport
from virtq.transport.waiter import Waiter, deadline_after
from virtq.types import Iova

# The request header (type, reserved, sector) and the status byte after it (poisoned, see
# _STATUS_POISON) in one store.
_PACK_HEADER_STATUS = struct.Struct("<IIQB").pack_into
# Header (16) + status (1), padded to a cache line: the device writing one slot's status
# and the driver writing the next request's header into another slot then never contend
# for one line.
_SLOT_META = 64
_KIND_NAMES = {VIRTIO_BLK_T_IN: "read", VIRTIO_BLK_T_OUT: "write",
               VIRTIO_BLK_T_FLUSH: "flush", VIRTIO_BLK_T_GET_ID: "get_id"}
_U64_MAX = (1 << 64) - 1
_STATUS_POISON = 0xFF  # written before submission: a status the device never wrote is caught
_BUF_KIND = operator.attrgetter("__class__", "length", "owner")
_FIRST = operator.itemgetter(0)
_READY = QueueState.READY
#: Shape-cache key of a one-buffer zero-copy request (see BlkDevice._submit): no copying
#: request has it, because their keys hold the length (> 0) above bit 1.
_ZC_ONE = 1 << 1
_NO_SHAPE = -1


def _check_sectors(nbytes: int) -> None:
    if nbytes.__class__ is not int or nbytes <= 0 or nbytes % SECTOR_SIZE:
        raise ArgumentError("nbytes", nbytes, "must be a positive multiple of 512")


def _check_sector(sector: int) -> None:
    # bool is an int subclass: sector=True would read sector 1 without a word.
    if (sector.__class__ is not int and (not isinstance(sector, int)
                                         or isinstance(sector, bool))) \
            or not 0 <= sector <= _U64_MAX:
        raise ArgumentError("sector", sector, "must be an int in 0..2**64-1")


@dataclass(frozen=True, slots=True)
class BlkConfig:
    """What the device says about itself (struct virtio_blk_config, §5.2.4), validated:
    ``capacity`` in 512-byte sectors; ``size_max`` the largest data segment (None: no
    limit); ``seg_max`` the most data segments (None: not said); ``block_size`` a power of
    two >= 512; ``read_only`` (VIRTIO_BLK_F_RO), ``flush_supported`` (VIRTIO_BLK_F_FLUSH)."""

    capacity: int
    size_max: int | None
    seg_max: int | None
    block_size: int
    read_only: bool
    flush_supported: bool


class BlkRequest:
    """A submitted request.  :meth:`wait` returns its result (the bytes read, when the
    request copied them) or raises the request's error.

    ``into`` is None for copying I/O (the data goes through the slot's bounce buffer) and
    the caller's buffers for zero-copy I/O.  ``status`` is the device's status byte once
    the request completed, ``written`` what the device reported writing (``used.len``);
    ``error`` is set when it failed."""

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
        """Whether the request completed: with a status from the device, or with an ``error``."""
        return self.status is not None or self.error is not None

    @property
    def queue(self) -> int:
        """The index of the queue it went to."""
        return self.slot // self._dev.slots_per_queue

    def wait(self, timeout: float | None = None) -> bytes | None:
        """Block until this request completes; returns the data read (copying reads and
        GET_ID) or None; raises the request's error (:class:`BlkIOError`,
        :class:`BlkUnsupportedError`, :class:`~virtq.errors.QueueBrokenError`, the
        transport's error) or :class:`~virtq.errors.VirtqTimeoutError`."""
        if not self.done:
            self._dev.wait([self], timeout=timeout)
        if self.error is not None:
            raise self.error
        return self.result

    def __repr__(self) -> str:
        state = "failed" if self.error is not None else "done" if self.done else "in flight"
        return (f"<BlkRequest {_KIND_NAMES.get(self.kind, self.kind)} sector={self.sector} "
                f"nbytes={self.nbytes} {state}>")


class _Ledger:
    """What a BlkDevice keeps beside its per-request state, in one attribute (see
    tests/test_attribute_budget.py): per-queue counts and the reconnect policy's state."""

    __slots__ = ("completed", "failed", "first_after", "held", "kept", "last", "outage",
                 "policy", "reconnects", "resubmitted", "since", "writes")

    def __init__(self, policy: ReconnectPolicy | None, num_queues: int) -> None:
        self.policy = policy
        #: The back-end is gone and the requests are kept (policy only).
        self.outage: Outage | None = None
        #: During an outage, every request kept (an ordered set): a connection attempt
        #: that fails half-way may have taken some out of the rings already.
        self.kept: dict[BlkRequest, None] = {}
        #: Per queue: completions reaped from the ring (whatever their status), requests
        #: failed without one (broken queue, transport, reconnect deadline, close), and
        #: requests the driver resubmitted after a reconnect.
        self.completed = [0] * num_queues
        self.failed = [0] * num_queues
        self.resubmitted = [0] * num_queues
        self.reconnects = 0
        #: Resubmitted flushes not yet in a ring: they wait for ``writes`` to complete.
        self.held: list[BlkRequest] = []
        self.writes: list[BlkRequest] = []
        #: The last reconnect: see BlkDevice.reconnect_stats().
        self.last: dict[str, float | int] = {}
        #: The last reconnect: when its outage began, and the completions counted then.
        self.since: tuple[float, int] | None = None
        #: Set by a reconnect until the first completion after it: its outage's start.
        self.first_after: float | None = None


class BlkDevice:
    """A virtio-blk device.  Build it with :meth:`connect_vhost_user`, :meth:`open_vfio`,
    or over any transport: ``BlkDevice(transport)``.  Closing the device closes the
    transport (also when the constructor fails).

    ``queue_size``: ring entries per queue (at most what the device allows).
    ``num_queues``: request queues (VIRTIO_BLK_F_MQ); requests go to the queue their
    ``queue=`` names, else round-robin.
    ``max_io``: the largest copying request, and each slot's bounce buffer (a multiple of
    512).  ``max_segments``: the most data buffers of one zero-copy request (capped by the
    device's ``seg_max``).  ``indirect``/``event_idx``: accept those features when offered.
    ``poll``: never sleep; spin on the used rings.  ``ring``: ``"split"``, ``"packed"`` or
    ``"auto"`` (packed when offered); ``in_order``: VIRTIO_F_IN_ORDER (None: when offered).
    ``start_index``: where the rings start (split: the avail index; packed:
    ``position | wrap << 15``; None: the beginning).  ``reconnect``: a
    :class:`~virtq.transport.ReconnectPolicy` to keep requests across a back-end restart
    (a :class:`~virtq.transport.Reconnectable` transport only; see the module docstring).
    """

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
        start_index: int | None = None,
        ring: str = "auto",
        in_order: bool | None = None,
        reconnect: ReconnectPolicy | None = None,
    ) -> None:
        self.transport = transport
        # 0 open; 1 closed, the transport still to close (a refused close() is retried);
        # 2 closed for good.
        self._closed = 0
        # Why submissions are refused (closed, or the transport failed), None while usable:
        # one check on the submit paths.
        # (why, the error behind it): one attribute, checked on every submit.
        self._refused: tuple[str, BaseException | None] | None = None
        # Zero-copy buffers a broken queue may still write (its ring could not be stopped).
        self._quarantine: list[DmaBuffer] = []
        self.queues: list[DriverQueue[BlkRequest]] = []
        self._mem: memoryview | None = None
        try:
            _check_int("queue_size", queue_size, 1)
            _check_int("num_queues", num_queues, 1, 0xFFFF)
            if reconnect is not None:
                if not isinstance(reconnect, ReconnectPolicy):
                    raise ArgumentError("reconnect", reconnect,
                                        "must be a ReconnectPolicy or None")
                if not isinstance(transport, Reconnectable):
                    raise ArgumentError("reconnect", reconnect,
                                        f"{type(transport).__name__} cannot reconnect")
            self._rec = _Ledger(reconnect, num_queues)
            _check_int("max_segments", max_segments, 1, 4096)
            if not isinstance(max_io, int) or max_io <= 0 or max_io % SECTOR_SIZE \
                    or max_io > MAX_BUFFER:
                raise ArgumentError("max_io", max_io,
                                    "must be a positive multiple of 512 below 2**32")
            self.max_io = max_io
            self.poll_mode = bool(poll or transport.polling)
            self._setup(queue_size, num_queues, max_segments, indirect, event_idx, start_index,
                        ring, in_order)
        except BaseException:
            # Our own views pin the arena: release them first, or closing the transport
            # fails with RegionBusyError and hides the error that stopped the set-up.
            self._release_views()
            transport.close()
            raise

    # -- set-up ---------------------------------------------------------------------------------

    def _setup(self, queue_size: int, num_queues: int, max_segments: int, indirect: bool,
               event_idx: bool, start_index: int | None, ring: str,
               in_order: bool | None) -> None:
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
        wanted |= ring_wanted(ring, in_order)
        self.features = t.negotiate(wanted)
        # "split" or "packed", and whether VIRTIO_F_IN_ORDER is in use (properties).
        self._format = ring_chosen(self.features, ring, in_order)
        ring, in_order = self._format
        if num_queues > 1 and not self._has(VIRTIO_BLK_F_MQ):
            raise DeviceRefusedError(f"{num_queues} queues asked, the device has no MQ")
        self._read_config()
        if self.seg_max is not None:
            max_segments = min(max_segments, self.seg_max)
        self.max_segments = max_segments
        # A copying request's bounce buffer goes to the device in pieces of at most
        # size_max bytes (§5.2.4: "maximum size of any single segment").
        seg = self.size_max or self.max_io
        bounce_pieces = -(-self.max_io // seg)
        if bounce_pieces > max_segments:
            raise ArgumentError(
                "max_io", self.max_io,
                f"needs {bounce_pieces} segments of size_max {self.size_max}, more "
                f"than the {max_segments} the device allows (seg_max)")

        max_size = t.max_queue_size(0)
        if max_size == 0:
            raise DeviceRefusedError("the device has no request queue 0")
        if num_queues > 1 and t.max_queue_size(num_queues - 1) == 0:
            # Before the arena: num_queues=65535 against a 2-queue back-end sized rings and
            # bounce buffers for every one of them (minutes, and ~1 TiB of address space)
            # before attach_queue() failed.
            raise DeviceRefusedError(f"{num_queues} queues asked; the device has no request "
                                     f"queue {num_queues - 1}")
        size = min(queue_size, max_size)
        self.indirect = self._has(VIRTIO_F_INDIRECT_DESC)
        ev = self._has(VIRTIO_F_EVENT_IDX)
        if not self.indirect:
            # A direct chain lives in the ring itself: header, data, status must fit.
            if size < 3:
                raise ArgumentError("queue_size", size, "a ring of >= 3 entries without "
                                    "indirect descriptors (header, data, status)")
            max_segments = self.max_segments = min(max_segments, size - 2)
            if bounce_pieces > max_segments:
                raise ArgumentError("max_io", self.max_io, f"needs {bounce_pieces} "
                                    f"segments; a {size}-entry ring holds {max_segments}")
        chain = 2 + max_segments  # header, data segments, status
        layout = ring_layout(size, indirect_size=chain if self.indirect else 0, ring=ring)
        ring_bytes = layout.nbytes  # page-aligned: layouts stack with shifted()
        meta_off = num_queues * ring_bytes
        # An indirect request takes one ring descriptor; a direct one (usually) three.
        spq = size if self.indirect else max(1, size // 3)
        self.slots_per_queue = spq
        nslots = num_queues * spq
        bounce_off = align_up(meta_off + nslots * _SLOT_META, layout.page_size)
        self.arena: DmaArena = t.alloc_dma(bounce_off + nslots * self.max_io)
        iova = self.arena.iova
        self._mem = self.arena.region.view()
        # Per slot (global number = queue * slots_per_queue + template slot): where its
        # header and status byte are, the header buffer and status buffer as the queue
        # takes them, and its bounce buffer.
        self._slot_meta = [meta_off + g * _SLOT_META for g in range(nslots)]
        self._slot_status = [meta + 16 for meta in self._slot_meta]
        self._hdr_r = [((Iova(iova + meta), 16),) for meta in self._slot_meta]
        self._status_w = [(Iova(iova + meta + 16), 1) for meta in self._slot_meta]
        self._bounce = [bounce_off + g * self.max_io for g in range(nslots)]
        # The buffers of each slot's last request, kept so that a repeated shape hands
        # the queue the very same tuples (it then writes no descriptor).
        self._shape_key = [_NO_SHAPE] * nslots
        self._shape_r: list[tuple[tuple[Iova, int], ...]] = [()] * nslots
        self._shape_w: list[tuple[tuple[Iova, int], ...]] = [()] * nslots
        self._slot_buf: list[DmaBuffer | None] = [None] * nslots
        self._tpls: list[ChainTemplate[BlkRequest]] = []
        for i in range(num_queues):
            q: DriverQueue[BlkRequest] = make_queue(
                self.arena.region, layout.shifted(i * ring_bytes), iova=iova, event_idx=ev,
                indirect=self.indirect, in_order=in_order, start_index=start_index)
            self.queues.append(q)
            tpl = q.template(chain, slots=spq, typical_buffers=min(3, chain))
            self._tpls.append(tpl)
            t.attach_queue(i, q)
        self._next_queue = 0
        self._single_queue = num_queues == 1
        self._waiter = Waiter(t, self.queues, poll=self.poll_mode)
        t.start()
        if self.poll_mode:
            self._waiter.disarm()

    def _has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @property
    def ring(self) -> str:
        """The ring format in use: ``"split"`` or ``"packed"``."""
        return self._format[0]

    @property
    def in_order(self) -> bool:
        """Whether VIRTIO_F_IN_ORDER is in use."""
        return self._format[1]

    @property
    def num_queues(self) -> int:
        """How many request queues the device uses."""
        return len(self.queues)

    # The configuration, read once (see BlkConfig).  Kept on one attribute: past 29 instance
    # attributes CPython 3.11 stops sharing instance-dict keys, and every attribute load of
    # the per-request paths gets slower.
    @property
    def capacity(self) -> int:
        """Sectors of 512 bytes."""
        return self.config.capacity

    @property
    def size_max(self) -> int | None:
        """The largest data segment the device takes (None: no limit)."""
        return self.config.size_max

    @property
    def seg_max(self) -> int | None:
        """The most data segments per request the device takes (None: not said)."""
        return self.config.seg_max

    @property
    def block_size(self) -> int:
        """The device's logical block size in bytes (``blk_size``, §5.2.4; 512 unless it said
        otherwise)."""
        return self.config.block_size

    @property
    def read_only(self) -> bool:
        """Whether the device is read-only (VIRTIO_BLK_F_RO): writes are refused."""
        return self.config.read_only

    @property
    def flush_supported(self) -> bool:
        """Whether the device offered VIRTIO_BLK_F_FLUSH (:meth:`flush` works)."""
        return self.config.flush_supported

    def _read_config(self) -> None:
        """struct virtio_blk_config (§5.2.4): the one ingress for what the device says about
        itself.  A field of a feature not negotiated is not read."""
        config = self.transport.read_config(0, 24)
        if len(config) != 24:
            raise DeviceProtocolError("config length", len(config), "24 bytes asked for")

        def u32(offset: int) -> int:
            value: int = struct.unpack_from("<I", config, offset)[0]
            return value

        capacity: int = struct.unpack_from("<Q", config, BLK_CFG_CAPACITY)[0]
        # qemu-storage-daemon offers SIZE_MAX with size_max 0: no limit.
        size_max = u32(BLK_CFG_SIZE_MAX) or None if self._has(VIRTIO_BLK_F_SIZE_MAX) else None
        if size_max is not None and size_max < SECTOR_SIZE:
            raise DeviceProtocolError("config.size_max", size_max,
                                      f">= {SECTOR_SIZE} (or 0: no limit)")
        seg_max = u32(BLK_CFG_SEG_MAX) if self._has(VIRTIO_BLK_F_SEG_MAX) else None
        if seg_max is not None and seg_max < 1:
            raise DeviceProtocolError("config.seg_max", seg_max, ">= 1 data segment")
        block_size = u32(BLK_CFG_BLK_SIZE) if self._has(VIRTIO_BLK_F_BLK_SIZE) else SECTOR_SIZE
        if block_size < SECTOR_SIZE or block_size & (block_size - 1):
            raise DeviceProtocolError("config.blk_size", block_size,
                                      "a power of two >= 512")
        self.config = BlkConfig(capacity, size_max, seg_max, block_size,
                                self._has(VIRTIO_BLK_F_RO), self._has(VIRTIO_BLK_F_FLUSH))

    @classmethod
    def connect_vhost_user(
        cls,
        path: str | os.PathLike[str],
        *,
        queue_size: int = 128,
        num_queues: int = 1,
        max_io: int = 128 * 1024,
        max_segments: int = 8,
        indirect: bool = True,
        event_idx: bool = True,
        poll: bool = False,
        start_index: int | None = None,
        ring: str = "auto",
        in_order: bool | None = None,
        timeout: float = 5.0,
        iova_allocator: IovaAllocator | None = None,
        hugepages: bool = False,
        reconnect: ReconnectPolicy | None = None,
    ) -> Self:
        """Connect to a vhost-user-blk back-end (qemu-storage-daemon, the embedded
        :mod:`virtq.testing.embedded`, ...) listening on ``path``.  ``reconnect``: keep
        requests across a restart of the back-end (see the module docstring); with its
        ``inflight`` the transport asks for the back-end's inflight region when offered.
        Raises the transport's errors
        (:class:`~virtq.transport.vhost_user.VhostUserConnectError`, ...),
        :class:`ArgumentError`; the connection is closed on any error."""
        if reconnect is not None and not isinstance(reconnect, ReconnectPolicy):
            raise ArgumentError("reconnect", reconnect, "must be a ReconnectPolicy or None")
        transport = VhostUserTransport.connect(
            path, timeout=timeout, iova_allocator=iova_allocator, hugepages=hugepages,
            inflight=reconnect is not None and reconnect.inflight)
        try:
            return cls(transport, queue_size=queue_size, num_queues=num_queues,
                       max_io=max_io, max_segments=max_segments, indirect=indirect,
                       event_idx=event_idx, poll=poll, start_index=start_index, ring=ring,
                       in_order=in_order, reconnect=reconnect)
        except BaseException:
            transport.close()  # idempotent; the constructor closed it already if it ran
            raise

    @classmethod
    def open_vfio(
        cls,
        pci_address: str,
        *,
        iova_allocator: IovaAllocator | None = None,
        memory: Callable[[int], MemoryRegion] | None = None,
        poll: bool = False,
        bind: bool = False,
        queue_size: int = 128,
        max_io: int = 128 * 1024,
        max_segments: int = 8,
        indirect: bool = True,
        event_idx: bool = True,
        ring: str = "auto",
        in_order: bool | None = None,
    ) -> Self:
        """Open a virtio-blk PCI function through VFIO (see ``docs/vfio.md``); ``bind``
        rebinds it to ``vfio-pci`` first."""
        transport = VfioPciTransport.open(pci_address, iova_allocator=iova_allocator,
                                          memory=memory, poll=poll, bind=bind)
        try:
            return cls(transport, poll=poll, queue_size=queue_size, max_io=max_io,
                       max_segments=max_segments, indirect=indirect, event_idx=event_idx,
                       ring=ring, in_order=in_order)
        except BaseException:
            transport.close()
            raise

    # -- buffers --------------------------------------------------------------------------

    def alloc_buffer(self, nbytes: int) -> DmaBuffer:
        """Device-visible memory for zero-copy I/O (``submit_read(..., into=buf)``).
        Allocate few, large buffers and :meth:`DmaBuffer.slice` them: each call is a new
        region the transport must register (vhost-user allows few).  Raises
        :class:`ArgumentError`, :class:`~virtq.errors.QueueStateError` (closed),
        :class:`~virtq.errors.VirtqOSError` (out of memory)."""
        self._check_open()
        _check_int("nbytes", nbytes, 1, MAX_BUFFER)
        arena = self.transport.alloc_dma(nbytes)
        # The arena is rounded up to pages (2 MiB with hugepages); the buffer is what was
        # asked for, so a whole-buffer request moves exactly nbytes.
        return DmaBuffer(arena, 0, nbytes)

    # -- submission ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise QueueStateError("BlkDevice is closed")

    def _refuse(self) -> NoReturn:
        why, cause = self._refused or ("BlkDevice is unusable", None)
        raise QueueStateError(why) from cause

    def _take_slot(self) -> tuple[int, ChainTemplate[BlkRequest]]:
        """A free slot of a usable queue, round-robin over the queues: (the slot's global
        number, its queue's template)."""
        tpls = self._tpls
        queues = self.queues
        n = len(tpls)
        usable = 0
        for k in range(n):
            qi = (self._next_queue + k) % n
            if queues[qi].state is not _READY:
                continue
            usable += 1
            tpl = tpls[qi]
            if tpl.num_free:
                self._next_queue = (qi + 1) % n
                return qi * self.slots_per_queue + tpl.acquire(), tpl
        if not usable:
            broken = next(q.broken for q in queues)
            raise QueueStateError("every queue of the device is broken; reconnect()") \
                from broken
        raise QueueFullError(1, 0, "request slots")

    def _check_queue(self, queue: object) -> int:
        if not isinstance(queue, int) or isinstance(queue, bool) \
                or not 0 <= queue < len(self._tpls):
            raise ArgumentError("queue", queue, f"must be a queue index in "
                                f"0..{len(self._tpls) - 1}")
        return queue

    def _slot_on(self, queue: int) -> tuple[int, ChainTemplate[BlkRequest]]:
        """A free slot of queue ``queue`` (the caller chose it): (global number, template).
        Raises :class:`ArgumentError`, :class:`QueueStateError` (the queue is broken),
        :class:`QueueFullError`."""
        self._check_queue(queue)
        q = self.queues[queue]
        if q.state is not _READY:
            raise QueueStateError(f"queue {queue} is broken ({q.broken}); reconnect() before "
                                  "submitting to it") from q.broken
        tpl = self._tpls[queue]
        if not tpl.num_free:
            raise QueueFullError(1, 0, f"request slots of queue {queue}")
        return queue * self.slots_per_queue + tpl.acquire(), tpl

    def _data_pieces(self, g: int, nbytes: int) -> tuple[tuple[Iova, int], ...]:
        """Slot ``g``'s bounce buffer as the device gets it: pieces of at most size_max."""
        base = self.arena.iova + self._bounce[g]
        seg = self.config.size_max or nbytes
        return tuple((Iova(base + off), min(seg, nbytes - off))
                     for off in range(0, nbytes, seg))

    def _copy_shape(self, g: int, nbytes: int, wflag: bool) -> None:
        """Cache slot ``g``'s buffers for a copying request of ``nbytes`` (0: none)."""
        data = self._data_pieces(g, nbytes) if nbytes else ()
        if wflag:
            self._shape_r[g] = self._hdr_r[g]
            self._shape_w[g] = (*data, self._status_w[g])
        else:
            self._shape_r[g] = (*self._hdr_r[g], *data)
            self._shape_w[g] = (self._status_w[g],)
        self._shape_key[g] = nbytes << 2 | (1 if wflag else 0)
        self._slot_buf[g] = None

    def _zc_shape(self, g: int, into: Sequence[DmaBuffer], wflag: bool
                  ) -> tuple[tuple[tuple[Iova, int], ...], tuple[tuple[Iova, int], ...]]:
        """Slot ``g``'s buffers for a zero-copy request; a one-buffer shape is cached (by
        buffer identity) so that refilling a slot with its old buffer writes nothing."""
        if len(into) == 1:
            buf = into[0]
            key = _ZC_ONE | (1 if wflag else 0)
            if self._slot_buf[g] is buf and self._shape_key[g] == key:
                return self._shape_r[g], self._shape_w[g]
            data: tuple[tuple[Iova, int], ...] = ((buf.iova, buf.length),)
        else:
            buf = None
            key = _NO_SHAPE
            data = tuple((b.iova, b.length) for b in into)
        r: tuple[tuple[Iova, int], ...]
        w: tuple[tuple[Iova, int], ...]
        if wflag:
            r, w = self._hdr_r[g], (*data, self._status_w[g])
        else:
            r, w = (*self._hdr_r[g], *data), (self._status_w[g],)
        self._shape_r[g], self._shape_w[g], self._shape_key[g] = r, w, key
        self._slot_buf[g] = buf
        return r, w

    def _submit(self, kind: int, sector: int, nbytes: int, data: memoryview | None,
                into: Sequence[DmaBuffer] | None, wflag: bool, queue: int | None
                ) -> BlkRequest:
        """Start a request whose lengths are already checked: ``nbytes`` in total, copied
        through the slot's bounce buffer (``into`` None; ``data`` is what to write) or
        moved by the device straight to/from ``into``.  ``wflag``: the device writes the
        data (reads, GET_ID).  ``queue``: the queue to use (None: round-robin).

        This runs once per request, so it avoids what costs in CPython: keyword arguments,
        temporary tuples, and building buffer lists that the slot already has."""
        if sector.__class__ is not int or not 0 <= sector <= _U64_MAX:
            _check_sector(sector)  # raises, unless an int subclass in range
        if self._refused is not None:
            self._refuse()
        if queue is not None:
            g, tpl = self._slot_on(queue)
        elif self._single_queue:
            tpl = self._tpls[0]
            try:
                g = tpl.acquire()  # a broken queue also refuses the submit below
            except QueueFullError:
                self._take_slot()  # says why when the queue is broken
                raise
        else:
            g, tpl = self._take_slot()
        slot = g % self.slots_per_queue
        try:
            mem = self._mem
            assert mem is not None
            _PACK_HEADER_STATUS(mem, self._slot_meta[g], kind, 0, sector, _STATUS_POISON)
            if into is None:
                if data is not None:
                    boff = self._bounce[g]
                    mem[boff : boff + nbytes] = data
                if self._shape_key[g] != nbytes << 2 | (1 if wflag else 0):
                    self._copy_shape(g, nbytes, wflag)
                r, w = self._shape_r[g], self._shape_w[g]
            else:
                r, w = self._zc_shape(g, into, wflag)
            req = BlkRequest(self, kind, sector, nbytes, g, into)
            tpl.submit(slot, r, w, req)
        except BaseException as exc:
            tpl.release(slot)
            if isinstance(exc, QueueBrokenError):
                self._broken_refusal(exc)
            raise
        return req

    def _broken_refusal(self, exc: QueueBrokenError) -> NoReturn:
        """A submission met a broken queue: the caller's way out is a reconnect."""
        raise QueueStateError(f"the request queue is broken ({exc.cause}); reconnect() "
                              "before submitting more") from exc.cause

    def _check_len(self, nbytes: int) -> None:
        _check_sectors(nbytes)
        if nbytes > self.max_io:
            raise ArgumentError("nbytes", nbytes, f"at most max_io={self.max_io} per request; "
                                "read()/write() split larger transfers")

    def _check_buf(self, b: object) -> DmaBuffer:
        if b.__class__ is not DmaBuffer:
            raise ArgumentError("into", b, "DmaBuffers from alloc_buffer()")
        assert isinstance(b, DmaBuffer)
        if b.owner is not self.transport:
            raise ArgumentError(
                "into", b, f"belongs to {b.owner!r}, not to this device's transport "
                f"{self.transport!r}: a buffer may only go to the device that allocated it")
        if b.length % SECTOR_SIZE:
            raise ArgumentError("into", b, "buffer lengths must be multiples of 512")
        size_max = self.config.size_max
        if size_max is not None and b.length > size_max:
            raise ArgumentError("into", b, f"each buffer at most size_max={size_max} bytes "
                                "(the device's largest segment)")
        if self._quarantine and any(b.overlaps(q) for q in self._quarantine):
            raise ArgumentError("into", b, "the device may still write this buffer: a queue "
                                "broke with it in flight; reconnect() or close() first")
        return b

    def _check_bufs(self, into: DmaBuffer | Sequence[DmaBuffer]
                    ) -> tuple[Sequence[DmaBuffer], int]:
        """Zero-copy buffers as a sequence, and their total length."""
        if into.__class__ is DmaBuffer:
            buf = self._check_buf(into)
            return (buf,), buf.length
        try:
            bufs = list(into)  # type: ignore[arg-type]
        except TypeError:
            raise ArgumentError("into", into, "a DmaBuffer or a sequence of them") from None
        if not bufs:
            raise ArgumentError("into", into, "at least one buffer")
        if len(bufs) > self.max_segments:
            raise ArgumentError("into", len(bufs),
                                f"at most {self.max_segments} segments per request")
        for b in bufs:
            self._check_buf(b)
        total = sum(b.length for b in bufs)
        if total > MAX_BUFFER:
            raise ArgumentError("into", total, "a request moves less than 4 GiB")
        return bufs, total

    def submit_read(self, sector: int, nbytes: int = 0, *,
                    into: DmaBuffer | Sequence[DmaBuffer] | None = None,
                    queue: int | None = None) -> BlkRequest:
        """Start reading ``nbytes`` at ``sector``.  Without ``into`` the data is copied out
        of a bounce buffer and returned by ``wait()``; with ``into`` (one buffer or a
        scatter list) the device writes straight into them.  ``queue``: the request
        queue to use (default: round-robin).  Raises :class:`ArgumentError`,
        :class:`~virtq.errors.QueueFullError` (every slot in flight, on ``queue`` if
        given), :class:`~virtq.errors.QueueStateError` (closed, or failed: reconnect)."""
        if into is None:
            if nbytes.__class__ is not int or not 0 < nbytes <= self.max_io \
                    or nbytes % SECTOR_SIZE:
                self._check_len(nbytes)
            return self._submit(VIRTIO_BLK_T_IN, sector, nbytes, None, None, True, queue)
        bufs, total = self._check_bufs(into)
        return self._submit(VIRTIO_BLK_T_IN, sector, total, None, bufs, True, queue)

    def submit_read_many(self, sectors: Sequence[int], nbytes: int = 0, *,
                         into: Sequence[DmaBuffer] | None = None,
                         queue: int | None = None) -> list[BlkRequest]:
        """:meth:`submit_read` for each of ``sectors``, in one call: ``nbytes`` each,
        copied, or without a copy into ``into[i]`` (one :class:`DmaBuffer` per sector, all
        the same length), on ``queue`` (default: round-robin).  This is how to refill a
        deep queue: the per-request work runs in one loop and the queue takes the whole
        batch at once.  All or nothing: a bad argument, or fewer free slots than
        ``sectors`` (:class:`~virtq.errors.QueueFullError`), raises before any request is
        submitted."""
        try:
            count = len(sectors)
        except TypeError:
            raise ArgumentError("sectors", sectors, "must be a sequence of ints") from None
        if into is None:
            if nbytes.__class__ is not int or not 0 < nbytes <= self.max_io \
                    or nbytes % SECTOR_SIZE:
                self._check_len(nbytes)
        else:
            nbytes = self._check_buf_batch(into, count)
        if queue is not None:
            self._check_queue(queue)
        if self._refused is not None:
            self._refuse()
        if not count:
            return []
        if self._single_queue:
            qi = 0
        elif queue is None:
            return self._submit_each(sectors, nbytes, into, None)
        else:
            qi = queue
        tpl = self._tpls[qi]
        try:
            slots = tpl.acquire_many(count)
        except QueueFullError:
            if self.queues[qi].state is not _READY:
                self._slot_on(qi)  # raises why
            raise
        # The template's slots are the queue's; the device's per-slot state is indexed by
        # the global slot number.
        gs = slots if not qi else tuple(qi * self.slots_per_queue + s for s in slots)
        mem = self._mem
        assert mem is not None
        pack_header = _PACK_HEADER_STATUS
        slot_meta = self._slot_meta
        shape_key = self._shape_key
        reqs: list[BlkRequest] = []
        append = reqs.append
        # Everything below writes only to held slots, invisible to the device, so a bad
        # sector (struct refuses it) leaves nothing to undo but the slots.  Each slot's
        # cached buffers are brought up to date; when no slot needed a change (a refill
        # with the same sizes, or with the buffers just reaped, which come back to their
        # old slots: the slots freed last come first, in order), the queue repeats every
        # slot's previous chain without looking at buffers at all.
        same = True
        try:
            if into is None:
                key = nbytes << 2 | 1
                for slot, sector in zip(gs, sectors, strict=True):
                    pack_header(mem, slot_meta[slot], VIRTIO_BLK_T_IN, 0, sector,
                                _STATUS_POISON)
                    if shape_key[slot] != key:
                        self._copy_shape(slot, nbytes, True)
                        same = False
                    append(BlkRequest(self, VIRTIO_BLK_T_IN, sector, nbytes, slot, None))
            else:
                slot_buf = self._slot_buf
                zc_key = _ZC_ONE | 1
                for slot, sector, buf in zip(gs, sectors, into, strict=True):
                    pack_header(mem, slot_meta[slot], VIRTIO_BLK_T_IN, 0, sector,
                                _STATUS_POISON)
                    bufs = (buf,)
                    if slot_buf[slot] is not buf or shape_key[slot] != zc_key:
                        self._zc_shape(slot, bufs, True)
                        same = False
                    append(BlkRequest(self, VIRTIO_BLK_T_IN, sector, nbytes, slot, bufs))
            if same:
                try:
                    tpl.submit_many(slots, None, None, reqs)
                except ArgumentError:
                    same = False  # a slot the queue has forgotten (reset): say it again
            if not same:
                tpl.submit_many(slots, list(map(self._shape_r.__getitem__, gs)),
                                list(map(self._shape_w.__getitem__, gs)), reqs)
        except struct.error:
            tpl.release_many(slots)
            for sector in sectors:
                _check_sector(sector)
            raise
        except BaseException as exc:
            tpl.release_many(slots)
            if isinstance(exc, QueueBrokenError):
                self._broken_refusal(exc)
            raise
        return reqs

    def _check_buf_batch(self, into: Sequence[DmaBuffer], count: int) -> int:
        """One DmaBuffer of this device per request, all of one length (a multiple of 512):
        that length."""
        try:
            if len(into) != count:
                raise ArgumentError("into", len(into), f"one buffer per sector ({count})")
        except TypeError:
            raise ArgumentError("into", into, "a sequence of DmaBuffers") from None
        if not count:
            return 0
        # One C-level pass (map), not per-buffer Python lines: this runs per batch.
        try:
            kinds: set[tuple[type, int, object]] = set(map(_BUF_KIND, into))
        except AttributeError:
            kinds = set()
        if len(kinds) != 1 or next(iter(kinds))[0] is not DmaBuffer \
                or next(iter(kinds))[2] is not self.transport:
            for b in into:
                self._check_buf(b)
            raise ArgumentError("into", sorted(b.length for b in into),
                                "buffers of one length per call")
        if self._quarantine:
            for b in into:
                self._check_buf(b)
        ((_, length, _),) = kinds
        size_max = self.config.size_max
        if length % SECTOR_SIZE or (size_max is not None and length > size_max):
            self._check_buf(into[0])
        return length

    def _submit_each(self, sectors: Sequence[int], nbytes: int,
                     into: Sequence[DmaBuffer] | None, queue: None) -> list[BlkRequest]:
        """The batch call spread over several queues: check everything, then submit one
        by one, round-robin (nothing can fail half-way).  (A batch for one queue takes
        the batch path of :meth:`submit_read_many`.)"""
        for sector in sectors:
            _check_sector(sector)
        count = len(sectors)
        free = sum(t.num_free for t, q in zip(self._tpls, self.queues, strict=True)
                   if q.state is _READY)
        if count > free:
            raise QueueFullError(count, free, "request slots")
        if into is None:
            return [self._submit(VIRTIO_BLK_T_IN, sector, nbytes, None, None, True, queue)
                    for sector in sectors]
        return [self._submit(VIRTIO_BLK_T_IN, sector, nbytes, None, (buf,), True, queue)
                for sector, buf in zip(sectors, into, strict=True)]

    def submit_write(self, sector: int, data: Any, *, queue: int | None = None) -> BlkRequest:
        """Start writing ``data`` at ``sector``: bytes-like data (any item format; its
        length in bytes a multiple of 512, at most ``max_io``) is copied, a
        :class:`DmaBuffer` or a list of them is written without a copy.  ``queue`` as for
        :meth:`submit_read`.  Raises :class:`~virtq.errors.QueueStateError` for a read-only
        device (or closed, or failed), :class:`ArgumentError` for bad data, a bad sector or
        ``queue``, :class:`~virtq.errors.QueueFullError` when every slot is in flight."""
        if self.config.read_only:
            raise QueueStateError("the device is read-only (VIRTIO_BLK_F_RO)")
        if isinstance(data, DmaBuffer) or (isinstance(data, list | tuple) and data
                                           and isinstance(data[0], DmaBuffer)):
            bufs, total = self._check_bufs(data)
            return self._submit(VIRTIO_BLK_T_OUT, sector, total, None, bufs, False, queue)
        view = byte_view(data)
        self._check_len(len(view))
        return self._submit(VIRTIO_BLK_T_OUT, sector, len(view), view, None, False, queue)

    def submit_flush(self, *, queue: int | None = None) -> BlkRequest:
        """Start a flush (VIRTIO_BLK_T_FLUSH): once it completes, the writes that had
        completed before it was submitted are durable (VIRTIO 1.2 §5.2.6.1).  ``queue``
        and the errors as for :meth:`submit_read`."""
        return self._submit(VIRTIO_BLK_T_FLUSH, 0, 0, None, None, False, queue)

    def submit_get_id(self, *, queue: int | None = None) -> BlkRequest:
        """Start a GET_ID request; its result is the id bytes (up to 20).  ``queue`` and
        the errors as for :meth:`submit_read`."""
        return self._submit(VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES, None, None, True,
                            queue)

    # -- completion --------------------------------------------------------------------------

    def kick(self) -> None:
        """Publish added requests; notify the queues whose device asked for it."""
        for qi, queue in enumerate(self.queues):
            if queue.state is _READY and queue.publish():  # False when nothing was added
                self.transport.notify(qi)

    @property
    def in_flight(self) -> int:
        """How many requests are submitted and not yet completed (also those kept while
        the device waits for its back-end to come back)."""
        if self._refused is not None:
            return 0
        rec = self._rec
        if rec.outage is not None:
            return len(self._kept())
        if self._single_queue:
            q = self.queues[0]
            n = q.num_in_flight if q.state is _READY else 0
        else:
            n = sum(q.num_in_flight for q in self.queues if q.state is _READY)
        held = rec.held
        return n + len(held) if held else n

    def stats(self) -> list[dict[str, Any]]:
        """Per queue: its ``state``; requests ``submitted`` to it, ``completed`` by the
        device (whatever their status), ``failed`` without a completion (a broken queue,
        the transport, the reconnect deadline, close), ``in_flight`` (submitted = the
        three together); ``resubmitted`` by the driver after reconnects; ``free_slots``."""
        rec = self._rec
        live_by_queue = [0] * len(self.queues)
        for req in self._kept() if rec.outage is not None else self._in_flight():
            live_by_queue[req.queue] += 1
        out = []
        for i, (q, t) in enumerate(zip(self.queues, self._tpls, strict=True)):
            live = live_by_queue[i]
            out.append({"queue": i, "state": q.state.value,
                        "submitted": rec.completed[i] + rec.failed[i] + live,
                        "completed": rec.completed[i], "failed": rec.failed[i],
                        "in_flight": live, "resubmitted": rec.resubmitted[i],
                        "free_slots": t.num_free})
        return out

    def reconnect_stats(self) -> dict[str, float | int | bool]:
        """What the reconnect policy did: ``reconnects`` (back-end restarts ridden out),
        ``waiting`` (True while the device waits for its back-end), and for the last
        reconnect ``outage_s`` (seconds from noticing the back-end was gone to connected
        again), ``attempts`` (connections tried), ``resubmitted`` (requests the driver
        resubmitted), ``resumed`` (requests left in the kept rings for the back-end to
        carry out from its inflight region), ``first_completion_s`` (from noticing to the
        first completion after the reconnect, once there was one), and the
        ``time.monotonic()`` values ``back_at`` (connected again) and ``first_at``."""
        rec = self._rec
        return {"reconnects": rec.reconnects, "waiting": rec.outage is not None, **rec.last}

    @property
    def waiter(self) -> Waiter:
        """The device's waiter: its ``fds()`` and ``arm()``/``drain()`` let an event loop
        drive the device (then call ``poll(0)``)."""
        return self._waiter

    def poll(self, timeout: float | None = 0, *, min_completions: int = 1) -> list[BlkRequest]:
        """Publish pending requests, then return the requests that completed -- each one
        either with its result or with ``error`` set (check it, or call ``wait()``).  With
        ``timeout`` (seconds, None = forever) block until at least ``min_completions`` are
        done (fewer if fewer are in flight) or the time is up; ``timeout=0`` never blocks.

        ``min_completions`` > 1 is for throughput: with event idx the device is asked to
        notify once that many have completed, so the driver sleeps through the rest
        instead of waking (or spinning) for each one -- like io_uring's ``min_complete``.
        Each request then waits a little longer.

        Device failures do not raise (see the module's failure policy): a transport that
        fails completes every request in flight with its error.  Raises
        :class:`ArgumentError` and :class:`~virtq.errors.QueueStateError` (closed) only."""
        self._check_open()
        deadline = deadline_after(timeout)
        if min_completions.__class__ is not int or min_completions < 1:
            _check_int("min_completions", min_completions, 1)
        done: list[BlkRequest] = []
        if self._refused is not None:
            return done  # everything in flight already failed with the reason
        rec = self._rec
        while True:
            try:
                if rec.outage is not None and not self._recover(deadline, done):
                    return done  # still waiting for the back-end, or given up
                self.kick()
                self._reap(done)
                if rec.held and self._release_flushes():
                    self.kick()
                if len(done) >= min_completions or not self.in_flight:
                    return done
                if timeout == 0:
                    if not done:
                        # Nothing came: is the device still there?  (A poll(0) loop
                        # never sleeps, so it would never hear the socket hang up.)
                        self.transport.check_alive()
                    return done
                wait = self._waiter.wait
                while True:
                    woke = wait(deadline, min_completions - len(done))
                    self._reap(done)
                    if rec.held and self._release_flushes():
                        self.kick()
                    if len(done) >= min_completions or not self.in_flight:
                        return done
                    if not woke and deadline is not None and time.monotonic() >= deadline:
                        return done
            except (DeviceError, OSError) as err:
                # With a reconnect policy the requests are kept: go round again to wait
                # for a new back-end (unless what the old one completed is enough).
                if not self._transport_failed(err, done) or len(done) >= min_completions:
                    return done

    def _reap(self, done: list[BlkRequest]) -> None:
        """Complete what the device used (see :meth:`_complete`), queue by queue."""
        rec = self._rec
        counts = rec.completed
        for qi, q in enumerate(self.queues):
            if q.state is not _READY:
                continue
            try:
                got = q.drain_used()
            except DeviceProtocolError as err:
                # The queue validated these before the bad element: they did complete.
                self._complete(err.completed, done)  # type: ignore[arg-type]
                counts[qi] += len(err.completed)
                self._queue_broke(qi, err, done)
                continue
            if got:
                self._complete(got, done)
                counts[qi] += len(got)
                if rec.first_after is not None:
                    self._first_completion()

    def _first_completion(self) -> None:
        rec = self._rec
        assert rec.first_after is not None
        now = time.monotonic()
        rec.last["first_at"] = now
        rec.last["first_completion_s"] = now - rec.first_after
        rec.first_after = None

    def _complete(self, got: list[tuple[BlkRequest, int]], done: list[BlkRequest]) -> None:
        """Status byte, data out of the bounce buffer: inlined over the batch because it
        runs once per request.  A read is only successful when the device reported
        writing all of it and the status byte (§2.7.8.2: nothing past used.len is
        trusted)."""
        mem = self._mem
        assert mem is not None
        slot_status = self._slot_status
        bounce = self._bounce
        for req, written in got:
            status = mem[slot_status[req.slot]]
            req.written = written
            req.status = status
            if status or req.kind or written <= req.nbytes:  # not a plain successful read
                self._complete_other(req, status, written)
            elif req.into is None:
                boff = bounce[req.slot]
                req.result = bytes(mem[boff : boff + req.nbytes])
        done.extend(map(_FIRST, got))

    def _complete_other(self, req: BlkRequest, status: int, written: int) -> None:
        """A failed request's error, a short read, or GET_ID's string (writes and flushes
        carry nothing)."""
        kind = req.kind
        wants = req.nbytes + 1 if kind in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID) else 1
        if written < 1:
            # The status byte is the last byte of the chain: with used.len 0 the device
            # did not say it wrote it, whatever the byte holds.
            req.error = self._status_error(req, _STATUS_POISON)
        elif status != VIRTIO_BLK_S_OK:
            req.error = self._status_error(req, status)
        elif kind == VIRTIO_BLK_T_IN and written < wants:
            req.error = DeviceProtocolError(
                f"used.len of a {req.nbytes}-byte read at sector {req.sector}", written,
                f"{wants} (the data and the status byte; §2.7.8.2: bytes past used.len "
                "are not to be trusted)")
        elif kind == VIRTIO_BLK_T_GET_ID:
            assert self._mem is not None
            boff = self._bounce[req.slot]
            n = min(VIRTIO_BLK_ID_BYTES, written - 1)
            # The id is NUL-terminated when shorter than 20 bytes (§5.2.6): what follows
            # the NUL is whatever the buffer held before.
            req.result = bytes(self._mem[boff : boff + n]).split(b"\0", 1)[0]

    @staticmethod
    def _status_error(req: BlkRequest, status: int) -> BlkIOError:
        name = _KIND_NAMES.get(req.kind, str(req.kind))
        cls = BlkUnsupportedError if status == VIRTIO_BLK_S_UNSUPP else BlkIOError
        what = {VIRTIO_BLK_S_IOERR: "I/O error", VIRTIO_BLK_S_UNSUPP: "unsupported",
                _STATUS_POISON: "no status written"}.get(status, f"status {status}")
        return cls(f"{name} of {req.nbytes} bytes at sector {req.sector}: {what}",
                   kind=name, sector=req.sector, nbytes=req.nbytes, status=status)

    def _queue_broke(self, qi: int, err: DeviceProtocolError, done: list[BlkRequest]) -> None:
        """Queue ``qi`` is broken: its requests complete with the error; the ring is stopped
        if the transport can, else their zero-copy buffers stay quarantined."""
        q = self.queues[qi]
        failed = [req for req in q.in_flight_tokens() if not req.done]
        for req in failed:
            error = QueueBrokenError(err)
            error.__cause__ = err
            req.error = error
            done.append(req)
        self._rec.failed[qi] += len(failed)
        try:
            stopped = self.transport.stop_queue(qi)
        except (DeviceError, OSError) as exc:
            self._transport_failed(exc, done)
            return
        if not stopped:
            self._quarantine.extend(b for req in failed for b in req.into or ())

    def _transport_failed(self, err: BaseException, done: list[BlkRequest]) -> bool:
        """The transport failed.  With a reconnect policy an outage begins (returns True):
        what the device completed before it went away is delivered, the other requests
        are kept.  Without one no request in flight can complete any more: they fail with
        ``err`` and new ones are refused until :meth:`reconnect` (returns False).  (Their
        slots stay taken until the rings are reset, so no buffer is reused under a device
        that might still write it.)"""
        rec = self._rec
        if rec.policy is not None and not self._closed and self._refused is None:
            if rec.outage is None:
                outage = rec.outage = Outage(rec.policy, err)
                self._reap(done)  # the used rings are intact: deliver what did complete
                since = rec.since
                if since is not None and since[1] == sum(rec.completed):
                    # Nothing completed since the last reconnect: the same outage goes on
                    # (a back-end that dies on the same request every time is not waited
                    # for forever).
                    outage.started = since[0]
                    outage.deadline = since[0] + rec.policy.timeout
            return True
        for req in self._in_flight():
            req.error = err
            done.append(req)
            rec.failed[req.queue] += 1
        rec.held.clear()
        if self._refused is None:
            self._refused = (f"the transport failed ({type(err).__name__}: {err}); "
                             "reconnect() before submitting more", err)
        return False

    # -- reconnect policy -----------------------------------------------------------------

    def _recover(self, deadline: float | None, done: list[BlkRequest]) -> bool:
        """During an outage: try to reconnect until ``deadline`` (the caller's; the policy
        bounds it too).  True once connected again, with every kept request on its way
        again; False while still waiting, or after giving up (the requests then failed
        into ``done``)."""
        rec = self._rec
        outage = rec.outage
        assert outage is not None
        t = self.transport
        assert isinstance(t, Reconnectable)
        # A ring can only be resumed in place if nothing in it was given up on.
        resume = all(q.state is _READY for q in self.queues)
        try:
            lost = outage.attempt(t, deadline, resume=resume, before=self._kept)
        except ReconnectError as err:
            rec.outage = None
            self._give_up(outage, err, done)
            return False
        if lost is None:
            return False
        rec.outage = None
        self._back(outage, lost)
        return True

    def _back(self, outage: Outage, lost: dict[int, list[BlkRequest]]) -> None:
        """Connected again: resubmit what the transport says the device lost, then make
        sure every queue with work is published and kicked (a new back-end may wait for
        a kick before it looks at a ring)."""
        rec = self._rec
        rec.reconnects += 1
        rec.kept = {}
        rec.since = (outage.started, sum(rec.completed))
        self._quarantine.clear()
        # What is still in the rings now was kept for the back-end (reset rings gave
        # their requests back in ``lost``).
        resumed = sum(1 for q in self.queues if q.state is not QueueState.CLOSED
                      for req in q.in_flight_tokens() if not req.done)
        resubmitted = self._resubmit(lost)
        rec.last = {"outage_s": outage.elapsed, "attempts": outage.attempts,
                    "resubmitted": resubmitted, "resumed": resumed,
                    "back_at": time.monotonic()}
        rec.first_after = outage.started
        self._release_flushes()
        if self.poll_mode:
            self._waiter.disarm()
        for qi, q in enumerate(self.queues):
            if q.state is _READY and q.num_in_flight:
                q.publish()
                self.transport.notify(qi)

    def _resubmit(self, lost: dict[int, list[BlkRequest]]) -> int:
        """Put every request of ``lost`` (per queue, in submission order; the queues were
        reset) back on its queue and slot, in that order; flushes are held (see
        :meth:`_release_flushes`).  Returns how many requests were resubmitted or held."""
        rec = self._rec
        mem = self._mem
        assert mem is not None
        spq = self.slots_per_queue
        writes = [w for w in rec.writes if not w.done]
        count = 0
        for qi in sorted(lost):
            reqs = [req for req in lost[qi] if not req.done]
            tpl = self._tpls[qi]
            if not reqs or self.queues[qi].state is not _READY:
                continue
            # After a reset every slot is free: take them all, resubmit each request on
            # its own (its header, bounce buffer and status byte are there), give back
            # the rest.
            free = tpl.acquire_many(tpl.num_free)
            taken = set()
            for req in reqs:
                count += 1
                if req.kind == VIRTIO_BLK_T_FLUSH:
                    rec.held.append(req)
                    continue
                g = req.slot
                slot = g - qi * spq
                # The old back-end may have written the status byte: poison it again.
                _PACK_HEADER_STATUS(mem, self._slot_meta[g], req.kind, 0, req.sector,
                                    _STATUS_POISON)
                tpl.submit(slot, self._shape_r[g], self._shape_w[g], req)
                taken.add(slot)
                rec.resubmitted[qi] += 1
                if req.kind == VIRTIO_BLK_T_OUT:
                    writes.append(req)
            tpl.release_many([slot for slot in free if slot not in taken])
        rec.writes = writes
        return count

    def _release_flushes(self) -> bool:
        """Submit the held flushes once every write resubmitted with them has completed,
        each on a free slot of its queue (or of any usable queue); returns whether any
        was submitted.  A flush that finds no usable queue fails."""
        rec = self._rec
        if rec.writes:
            rec.writes = [w for w in rec.writes if not w.done]
            if rec.writes:
                return False
        mem = self._mem
        assert mem is not None
        spq = self.slots_per_queue
        held, rec.held = rec.held, []
        submitted = False
        for req in held:
            if req.done:
                continue
            own = req.slot // spq
            order = [own] + [i for i in range(len(self.queues)) if i != own]
            usable = [i for i in order if self.queues[i].state is _READY]
            qi = next((i for i in usable if self._tpls[i].num_free), None)
            if qi is None:
                if usable:
                    rec.held.append(req)  # every slot busy: next time
                else:
                    req.error = QueueStateError("every queue of the device is broken; the "
                                                "held flush could not be resubmitted")
                    rec.failed[own] += 1
                continue
            tpl = self._tpls[qi]
            slot = tpl.acquire()
            g = qi * spq + slot
            req.slot = g
            _PACK_HEADER_STATUS(mem, self._slot_meta[g], VIRTIO_BLK_T_FLUSH, 0, 0,
                                _STATUS_POISON)
            if self._shape_key[g] != 0:
                self._copy_shape(g, 0, False)
            tpl.submit(slot, self._shape_r[g], self._shape_w[g], req)
            rec.resubmitted[qi] += 1
            submitted = True
        return submitted

    def _give_up(self, outage: Outage, err: ReconnectError, done: list[BlkRequest]) -> None:
        """The outage ended without a back-end: every kept request fails with its own
        :class:`ReconnectError` (``__cause__``: the error that ended the connection) and
        new ones are refused until :meth:`reconnect`."""
        rec = self._rec
        for req in self._kept():
            name = _KIND_NAMES.get(req.kind, str(req.kind))
            error = ReconnectError(
                f"{name} of {req.nbytes} bytes at sector {req.sector} not completed: {err}",
                last_error=err.last_error, elapsed=err.elapsed, attempts=err.attempts)
            error.__cause__ = outage.cause
            req.error = error
            done.append(req)
            rec.failed[req.queue] += 1
        rec.held.clear()
        rec.writes = []
        rec.kept = {}
        self._refused = (f"the back-end did not come back: {err}; reconnect() before "
                         "submitting more", err)

    def _kept(self) -> list[BlkRequest]:
        """During an outage: every request kept and not done -- also those a failed
        connection attempt took out of the rings (reset) already, which only the next
        successful one gives back."""
        kept = self._rec.kept
        for req in self._in_flight():
            kept[req] = None
        return [req for req in kept if not req.done]

    def _in_flight(self) -> list[BlkRequest]:
        """The requests submitted and not done (the queues keep them as tokens; held
        flushes are the device's own)."""
        reqs = [req for q in self.queues if q.state is not QueueState.CLOSED
                for req in q.in_flight_tokens() if not req.done]
        return reqs + [req for req in self._rec.held if not req.done]

    def wait(self, requests: Iterable[BlkRequest] | None = None,
             timeout: float | None = None) -> None:
        """Until every request in ``requests`` (default: all in flight) is done (each
        with its result or its ``error``).  Raises
        :class:`~virtq.errors.VirtqTimeoutError` after ``timeout`` seconds (the requests
        stay in flight), :class:`ArgumentError` for a request of another device."""
        wait_requests(self, requests, timeout, BlkRequest)

    # -- convenience ----------------------------------------------------------------------

    def read(self, sector: int, nbytes: int) -> bytes:
        """Read ``nbytes`` (a multiple of 512) at ``sector``; large reads are split into
        ``max_io`` requests kept in flight together.  Raises the first failed request's
        error."""
        _check_sector(sector)
        _check_sectors(nbytes)
        self._check_size(nbytes)
        chunks = []
        for off in range(0, nbytes, self.max_io):
            n = min(self.max_io, nbytes - off)
            chunks.append(self._submit_when_free(
                functools.partial(self.submit_read, sector + off // SECTOR_SIZE, n)))
        self.wait(chunks)
        return b"".join(r.wait() or b"" for r in chunks)

    def write(self, sector: int, data: Any) -> None:
        """Write bytes-like ``data`` (a multiple of 512 bytes, any item format) at
        ``sector``, split like :meth:`read`."""
        _check_sector(sector)
        view = byte_view(data)
        _check_sectors(len(view))
        self._check_size(len(view))
        reqs = []
        for off in range(0, len(view), self.max_io):
            part = view[off : off + self.max_io]
            reqs.append(self._submit_when_free(
                functools.partial(self.submit_write, sector + off // SECTOR_SIZE, part)))
        self.wait(reqs)
        for r in reqs:
            r.wait()

    def _check_size(self, nbytes: int) -> None:
        """A transfer larger than the whole disk can never succeed (and would be split
        into that many requests first)."""
        if nbytes > self.config.capacity * SECTOR_SIZE:
            raise ArgumentError("nbytes", nbytes, f"larger than the device "
                                f"({self.config.capacity * SECTOR_SIZE} bytes)")

    def _submit_when_free(self, submit: Callable[[], BlkRequest]) -> BlkRequest:
        while True:
            try:
                return submit()
            except QueueFullError:
                oldest = self._in_flight()[:1]
                if not oldest:
                    raise
                self.wait(oldest)

    def flush(self) -> None:
        """Make previous writes durable (VIRTIO_BLK_T_FLUSH).  Raises
        :class:`~virtq.errors.QueueStateError` when the device has no flush, and the request's
        error."""
        if not self.config.flush_supported:
            raise QueueStateError("the device did not offer VIRTIO_BLK_F_FLUSH")
        self.submit_flush().wait()

    def get_id(self) -> str:
        """The device's identifier string (up to 20 bytes)."""
        raw = self.submit_get_id().wait() or b""
        return raw.decode("ascii", "replace")

    @property
    def capacity_bytes(self) -> int:
        """The capacity in bytes (``capacity`` sectors of 512 bytes)."""
        return self.config.capacity * SECTOR_SIZE

    # -- teardown and recovery -----------------------------------------------------------

    def _release_views(self) -> None:
        # Queues a failed set-up never attached are not closed by the transport; their
        # views would keep the arena from closing.
        for q in self.queues:
            q.close()
        if self._mem is not None:
            self._mem.release()
            self._mem = None

    def close(self) -> None:
        """Close the transport (and with it the queues and memory); requests still in
        flight fail with :class:`QueueStateError`.  If the memory cannot be released
        because views of it are alive (a :meth:`DmaBuffer.view` you still hold),
        :class:`~virtq.errors.RegionBusyError` is raised; release them and call
        ``close()`` again."""
        if not self._closed:
            self._closed = 1
            self._refused = ("BlkDevice is closed", None)
            err = QueueStateError("BlkDevice was closed with the request in flight")
            for req in self._kept() if self._rec.outage is not None else self._in_flight():
                req.error = err
                self._rec.failed[req.queue] += 1
            self._rec.held.clear()
            self._rec.outage = None
            self._rec.kept = {}
            self._quarantine.clear()
            self._release_views()
        if self._closed == 1:
            self.transport.close()
            self._closed = 2

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return bool(self._closed)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reconnect(self, path: str | os.PathLike[str] | None = None, *,
                  timeout: float | None = None) -> int:
        """vhost-user only: connect to a new back-end after the old one died (or to
        recover broken queues); the rings are reset.  Requests that were in flight fail
        with the disconnect error (if not already) -- unless the device is waiting for
        its back-end under a reconnect policy: then they are resubmitted as the policy
        would.  Returns how many failed.  Raises :class:`~virtq.errors.QueueStateError`
        (closed, or a transport that cannot reconnect) and the connection errors -- after
        which the device stays refused (or, under a policy, keeps waiting)."""
        self._check_open()
        t = self.transport
        if not isinstance(t, Reconnectable):
            raise QueueStateError(f"{type(t).__name__} cannot reconnect")
        rec = self._rec
        outage = rec.outage
        try:
            lost = t.reconnect(path, timeout=timeout)
        except ArgumentError:
            # A bad path or timeout is refused before the connection is touched: the
            # device keeps working as it was.
            raise
        except BaseException as exc:
            if outage is None:
                self._refused = (f"reconnect failed ({type(exc).__name__}: {exc})", exc)
            raise
        if outage is not None:
            rec.outage = None
            self._back(outage, lost)
            return 0
        count = 0
        gone = DeviceError("the back-end went away with the request in flight")
        for tokens in lost.values():
            for req in tokens:
                if not req.done:
                    req.error = gone
                    rec.failed[req.queue] += 1
                    count += 1
        for req in rec.held:  # their writes are gone too
            if not req.done:
                req.error = gone
                rec.failed[req.queue] += 1
                count += 1
        rec.held.clear()
        rec.writes = []
        self._quarantine.clear()
        if self.poll_mode:
            self._waiter.disarm()
        self._refused = None
        return count
