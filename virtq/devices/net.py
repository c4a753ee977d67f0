"""virtio-net driver (VIRTIO 1.2 §5.1) over any :class:`~virtq.transport.Transport`.

One queue pair: queue 0 is the receiveq, queue 1 the transmitq (§5.1.2).  Every packet on
either queue is preceded by a ``struct virtio_net_hdr`` (§5.1.6), 12 bytes with
``VIRTIO_F_VERSION_1`` (``num_buffers`` is always present in 1.x, §5.1.6.1):

    flags u8, gso_type u8, hdr_len le16, gso_size le16, csum_start le16, csum_offset le16,
    num_buffers le16

No offload feature is negotiated (no CSUM, no GSO/TSO, no MRG_RXBUF), so the transmit header
is all zeros (§5.1.6.2: "no checksum, no segmentation") and received frames arrive whole, fully
checksummed, one per buffer.  The driver therefore only has to:

* **transmit** -- write ``zero header + frame`` into one per-slot buffer and add it as a
  single device-readable descriptor (§5.1.6.2.1: flags 0 and num_buffers 0 without CSUM;
  §2.7.4: a device must not assume any arrangement of descriptors -- only legacy drivers
  without ANY_LAYOUT had to put the header in a descriptor of its own, §5.1.6.6);
* **receive** -- keep the receiveq full of device-writable buffers of at least 1526 bytes
  (§5.1.6.3.1: 12-byte header + a 1514-byte frame, the size a driver without MRG_RXBUF or
  GUEST_TSO/UFO must post), strip the header, copy the frame out and re-post the buffer.

Memory is one arena from :meth:`Transport.alloc_dma`: both rings, then ``queue_size``
receive buffers, then ``queue_size`` transmit buffers.  Notifications follow the NAPI
pattern: used-buffer notifications stay off while the driver is busy and are switched on
only to sleep (§2.7.10); in ``poll`` mode they are never on.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, NoReturn, Self

from virtq.abi import VIRTIO_F_EVENT_IDX
from virtq.abi.net import (
    MIN_FRAME,
    MIN_RX_BUFFER,
    NET_HDR_SIZE,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_MAC,
)
from virtq.devices._rings import ring_chosen, ring_wanted
from virtq.devices.dma import byte_view
from virtq.errors import ArgumentError, DeviceProtocolError, QueueStateError, VirtqTimeoutError
from virtq.iova import IovaAllocator
from virtq.layout import align_up
from virtq.queue import make_slot_queue, ring_layout
from virtq.transport.base import DmaArena, Transport
from virtq.transport.errors import DeviceRefusedError, TransportError
from virtq.transport.vhost_user import VhostUserTransport
from virtq.transport.waiter import Waiter, deadline_after

#: Frame types whose len() is their size in bytes (others are converted first).
_PLAIN = frozenset((bytes, bytearray))



class NetTimeoutError(VirtqTimeoutError):
    """A transmit did not find ring space in time (the device stopped consuming); the
    first ``sent`` frames of the call were queued and will still go out."""

    def __init__(self, message: str, *, sent: int) -> None:
        super().__init__(message)
        self.sent = sent


class NetDevice:
    """A virtio-net device with one queue pair.  Build it with :meth:`connect_vhost_user`
    or over any transport: ``NetDevice(transport)``.  Closing the device closes the
    transport.

    ``buffer_size`` is the size of every receive and transmit buffer, header included: the
    largest frame is ``buffer_size - 12`` bytes.  ``poll=True`` busy-polls the rings
    instead of sleeping on used-buffer notifications (lowest latency, one core spinning).
    ``ring``: ``"split"``, ``"packed"`` or ``"auto"`` (packed when offered); ``in_order``:
    VIRTIO_F_IN_ORDER (None: when offered and implemented for the format).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        queue_size: int = 256,
        buffer_size: int = 2048,
        event_idx: bool = True,
        poll: bool = False,
        ring: str = "auto",
        in_order: bool | None = None,
    ) -> None:
        self.transport = transport
        self.poll_mode = bool(poll or transport.polling)
        self.tx_packets = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.rx_bytes = 0
        self._closed = False
        try:
            if not isinstance(buffer_size, int) or buffer_size < MIN_RX_BUFFER:
                raise ArgumentError(
                    "buffer_size", buffer_size,
                    f"receive buffers must hold >= {MIN_RX_BUFFER} bytes (12-byte header + "
                    "1514-byte frame, VIRTIO 1.2 §5.1.6.3.1)")
            self.buffer_size = buffer_size
            #: The largest frame :meth:`send` accepts.
            self.max_frame = buffer_size - NET_HDR_SIZE
            self._setup(queue_size, event_idx, ring, in_order)
        except BaseException:
            self._release_views()
            transport.close()
            raise

    # -- set-up ---------------------------------------------------------------------------------

    def _setup(self, queue_size: int, event_idx: bool, ring: str,
               in_order: bool | None) -> None:
        t = self.transport
        wanted = 1 << VIRTIO_NET_F_MAC | ring_wanted(ring, in_order)
        if event_idx:
            wanted |= 1 << VIRTIO_F_EVENT_IDX
        self.features = t.negotiate(wanted)
        #: "split" or "packed", and whether VIRTIO_F_IN_ORDER is in use.
        self.ring, self.in_order = ring_chosen(self.features, ring, in_order)
        self.mac = self._read_mac()
        for index, name in ((RX_QUEUE, "receiveq"), (TX_QUEUE, "transmitq")):
            if t.max_queue_size(index) == 0:
                raise DeviceRefusedError(f"the device has no {name} (queue {index})")
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ArgumentError("queue_size", queue_size, "must be an int >= 1")
        size = min(queue_size, t.max_queue_size(RX_QUEUE), t.max_queue_size(TX_QUEUE))
        layout = ring_layout(size, ring=self.ring)  # validates the size for the format
        ring_bytes = layout.nbytes  # page-aligned, so shifted() keeps every alignment
        bs = self.buffer_size
        rx_off = 2 * ring_bytes
        tx_off = align_up(rx_off + size * bs, layout.page_size)
        self.arena: DmaArena = t.alloc_dma(tx_off + size * bs)
        self._mem = self.arena.region.view()
        ev = bool(self.features >> VIRTIO_F_EVENT_IDX & 1)
        # Both queues are fixed slots (SlotQueue, or its packed sibling): slot d <-> buffer d,
        # made available in ring order and reused first in, first out.  Receiving re-posts
        # the buffers just read; transmitting sets only each slot's length.
        addr = self.arena.addr
        self.rxq = make_slot_queue(self.arena.region, layout, iova=self.arena.iova,
                                   event_idx=ev, in_order=self.in_order,
                                   slots=[addr(rx_off + d * bs) for d in range(size)],
                                   slot_size=bs, writable=True)
        self.txq = make_slot_queue(self.arena.region, layout.shifted(ring_bytes),
                                   iova=self.arena.iova, event_idx=ev, in_order=self.in_order,
                                   slots=[addr(tx_off + d * bs) for d in range(size)],
                                   slot_size=bs, writable=False)
        self.queue_size = size
        # Where each slot's frame starts (just past its header), listed twice so that the
        # slots of one submission, first .. first + k - 1 mod size, are one slice.
        self._tx_starts = [tx_off + slot * bs + NET_HDR_SIZE for slot in range(size)] * 2
        self._rx_starts = [rx_off + slot * bs + NET_HDR_SIZE for slot in range(size)]
        # The transmit header is always zero and the device never writes device-readable
        # buffers (§2.7.4), so each slot's header is written once, here.
        self._mem[tx_off : tx_off + size * bs] = bytes(size * bs)
        self._rx_ready: deque[bytes] = deque()
        t.attach_queue(RX_QUEUE, self.rxq)
        t.attach_queue(TX_QUEUE, self.txq)
        self._rx_waiter = Waiter(t, [self.rxq], poll=self.poll_mode)
        self._tx_waiter = Waiter(t, [self.txq], poll=self.poll_mode)
        # Fill the receiveq before DRIVER_OK: a device may deliver as soon as it runs
        # (§5.1.5 step 3, "fill the receive queues with buffers").
        self.rxq.submit(size)
        self.rxq.publish()
        # Transmit completions are reaped on the next send, never waited for eagerly.
        self.txq.disable_interrupts()
        if self.poll_mode:
            self.rxq.disable_interrupts()
        t.start()
        # No notification may precede DRIVER_OK (§3.1.1), so the receiveq's first kick
        # comes now; a back-end that sleeps until kicked then sees the filled ring.
        self.transport.notify(RX_QUEUE)

    def _read_mac(self) -> bytes | None:
        if not self.features >> VIRTIO_NET_F_MAC & 1:
            return None
        try:
            # struct virtio_net_config (§5.1.4): mac u8[6] at offset 0.
            return self.transport.read_config(0, 6)
        except TransportError:
            return None  # the transport cannot read config (vhost-user without CONFIG)

    @classmethod
    def connect_vhost_user(
        cls,
        path: str | os.PathLike[str],
        *,
        queue_size: int = 256,
        buffer_size: int = 2048,
        event_idx: bool = True,
        poll: bool = False,
        ring: str = "auto",
        in_order: bool | None = None,
        timeout: float = 5.0,
        iova_allocator: IovaAllocator | None = None,
        hugepages: bool = False,
    ) -> Self:
        """Connect to a vhost-user-net back-end (DPDK ``net_vhost``, :class:`~virtq.testing.
        testpmd.TestPmd`, ...) listening on ``path``.  The connection is closed on any
        error."""
        transport = VhostUserTransport.connect(path, timeout=timeout,
                                               iova_allocator=iova_allocator,
                                               hugepages=hugepages)
        try:
            return cls(transport, queue_size=queue_size, buffer_size=buffer_size,
                       event_idx=event_idx, poll=poll, ring=ring, in_order=in_order)
        except BaseException:
            transport.close()  # idempotent; covers a TypeError before __init__ ran
            raise

    # -- transmit -------------------------------------------------------------------------

    def send(self, frame: bytes | bytearray | memoryview, *,
             timeout: float | None = None) -> None:
        """Queue one Ethernet frame (no FCS) for transmission; blocks while the transmitq is
        full, for at most ``timeout`` seconds (None: until there is room)."""
        self.send_batch((frame,), timeout=timeout)

    def send_batch(self, frames: Iterable[Any], *, timeout: float | None = None) -> int:
        """Queue ``frames`` (bytes-like: bytes, bytearray, memoryview, array -- sizes are
        counted in bytes) in order, publishing each run that fits the ring with one index
        store and at most one notification.  Blocks while the ring is full (at most
        ``timeout`` seconds in all, counted from the first wait, then
        :class:`NetTimeoutError`, whose ``sent`` says how many were queued); returns how
        many were queued (all of them).  Raises :class:`ArgumentError` for a bad frame
        (before anything is queued), :class:`~virtq.errors.DeviceProtocolError` /
        :class:`~virtq.errors.QueueBrokenError` when the device broke the transmitq, the
        transport's error when it failed."""
        if self._closed:
            self._check_open()
        if type(frames) is not list:
            try:
                frames = list(frames)
            except TypeError:
                raise ArgumentError("frames", frames, "must be an iterable of frames") from None
        total = len(frames)
        if not total:
            return 0
        # All-or-nothing validation, before anything is queued (C-level loops: this is the
        # per-packet hot path).  len() counts bytes only for bytes and bytearray; a batch
        # that may not fit the ring in one go is checked for other types up front, so a
        # bad frame cannot stop it half-way.
        if total > self.txq.num_free and not _PLAIN.issuperset(map(type, frames)):
            frames = [byte_view(f, "frame") for f in frames]
        lens, dlens = self._frame_lengths(frames)
        deadline: float | None = None  # the clock starts at the first wait for room
        txq = self.txq
        mem = self._mem
        starts = self._tx_starts
        sent = 0
        while sent < total:
            txq.reap()  # completed transmit slots become free (first in, first out)
            k = min(txq.num_free, total - sent)
            if not k:
                if deadline is None:
                    deadline = deadline_after(timeout)
                self._wait_tx_room(deadline, sent)
                continue
            first = txq.next_slot
            end = sent + k
            try:
                for start, frame, n in zip(starts[first : first + k], frames[sent:end],
                                           lens[sent:end], strict=True):
                    mem[start : start + n] = frame
            except (ValueError, TypeError):
                # A frame whose len() is not its size in bytes (a memoryview of another
                # format, an array): nothing of this run was submitted, so convert the
                # rest and go again.
                frames = [*frames[:sent], *(byte_view(f, "frame") for f in frames[sent:])]
                lens, dlens = self._frame_lengths(frames)
                continue
            txq.submit(k, dlens[sent:end])
            if txq.publish():
                self.transport.notify(TX_QUEUE)
            sent = end
        self.tx_packets += total
        self.tx_bytes += sum(lens)
        return total

    def _frame_lengths(self, frames: list[Any]) -> tuple[list[int], list[int]]:
        """Each frame's length, and its descriptor's (zero header + frame, §5.1.6.2);
        :class:`ArgumentError` for a frame outside 14 .. max_frame bytes."""
        try:
            lens = list(map(len, frames))
        except TypeError:
            raise ArgumentError("frame", next(f for f in frames if not hasattr(f, "__len__")),
                                "must be bytes-like") from None
        lo, hi = MIN_FRAME, self.max_frame
        if min(lens) < lo or max(lens) > hi:
            n = next(n for n in lens if not lo <= n <= hi)
            raise ArgumentError("frame", f"<{n} bytes>",
                                f"must be {lo}..{hi} bytes (buffer_size - 12)")
        return lens, [n + NET_HDR_SIZE for n in lens]

    def _wait_tx_room(self, deadline: float | None, sent: int) -> None:
        """Until the device completes some transmit buffer (the caller reaps it)."""
        txq = self.txq
        while not txq.has_used():
            if deadline is not None and time.monotonic() >= deadline:
                raise NetTimeoutError(
                    f"transmitq full for {self.queue_size} frames: the device did not "
                    f"complete any within the timeout ({sent} of this batch queued)",
                    sent=sent)
            # Ask for a notification once about 3/4 of the ring has completed (one wake-up
            # per batch); the waiter re-checks after arming (§2.7.7, §2.7.14).
            self._tx_waiter.wait(deadline, txq.num_in_flight * 3 // 4 + 1)
            if not self.poll_mode:
                txq.disable_interrupts()

    def reclaim(self) -> int:
        """Reap completed transmit buffers now (``send`` also does it); returns how many."""
        self._check_open()
        slots, _ = self.txq.reap()
        return len(slots)

    @property
    def tx_in_flight(self) -> int:
        """Transmit buffers the device has not completed (or that are not reaped yet)."""
        return self.txq.num_in_flight

    # -- receive --------------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next received frame (header stripped), waiting at most ``timeout`` seconds
        (None: forever, 0: do not wait); None if none arrived."""
        ready = self._rx_ready
        if ready:
            return ready.popleft()
        frames = self._wait_rx(timeout)
        if not frames:
            return None
        if len(frames) > 1:
            ready.extend(frames[1:])
        return frames[0]

    def recv_batch(self, max_frames: int = 256, timeout: float | None = 0) -> list[bytes]:
        """Up to ``max_frames`` received frames; waits at most ``timeout`` seconds for the
        first one (default: do not wait); ``[]`` if none arrived.  Raises :class:`ArgumentError`
        for a bad ``max_frames`` or ``timeout``, :class:`~virtq.errors.QueueStateError` once
        closed, and a :class:`~virtq.errors.DeviceError` for a frame the device reported
        impossibly."""
        if not isinstance(max_frames, int) or max_frames < 1:
            raise ArgumentError("max_frames", max_frames, "must be an int >= 1")
        ready = self._rx_ready
        if ready:
            if len(ready) <= max_frames:
                out = list(ready)
                ready.clear()
                return out
            return [ready.popleft() for _ in range(max_frames)]
        frames = self._wait_rx(timeout)
        if len(frames) > max_frames:
            ready.extend(frames[max_frames:])
            del frames[max_frames:]
        return frames

    def _wait_rx(self, timeout: float | None) -> list[bytes]:
        """Received frames, waiting until some arrive or ``timeout`` passes (then [])."""
        self._check_open()
        frames = self._harvest_rx()
        if frames or timeout == 0:
            return frames  # (the hot path: no clock read)
        deadline = deadline_after(timeout)
        waiter = self._rx_waiter
        while True:
            # Sleep only with notifications on and the ring re-checked after the store
            # that switched them on (the waiter does both, §2.7.7); off again while busy.
            woke = waiter.wait(deadline)
            if not self.poll_mode:
                self.rxq.disable_interrupts()
            frames = self._harvest_rx()
            if frames or (not woke and deadline is not None
                          and time.monotonic() >= deadline):
                return frames

    def _harvest_rx(self) -> list[bytes]:
        """Copy every completed receive buffer out (header stripped) and re-post the
        buffers with one publish."""
        rxq = self.rxq
        slots, lens = rxq.reap()
        if not slots:
            return []
        mem = self._mem
        starts = self._rx_starts  # of each buffer's frame, just past its header
        # used.len is every byte written, header included (§2.7.8); the queue already
        # checked it is <= buffer_size.
        frames = [mem[starts[slot] : starts[slot] + length - NET_HDR_SIZE].tobytes()
                  for slot, length in zip(slots, lens, strict=True)]
        # Re-post every free buffer: the ones just read (all of them, unless the device
        # completed out of order and an older one is still out).
        rxq.submit(rxq.num_free)
        if rxq.publish():
            self.transport.notify(RX_QUEUE)
        if min(lens) < NET_HDR_SIZE:
            return self._drop_short(slots, lens, frames)
        self.rx_packets += len(frames)
        self.rx_bytes += sum(map(len, frames))
        return frames

    def _drop_short(self, slots: list[int], lens: list[int], frames: list[bytes]) -> NoReturn:
        """The device wrote less than a header into some buffer (every received packet
        starts with one, §5.1.6.4): keep the good frames for the next receive, break the
        receiveq like any impossible used element, then raise.  num_buffers is not
        checked: without MRG_RXBUF DPDK leaves it as the buffer had it."""
        good = [f for f, length in zip(frames, lens, strict=True) if length >= NET_HDR_SIZE]
        self._rx_ready.extend(good)
        self.rx_packets += len(good)
        self.rx_bytes += sum(map(len, good))
        slot, length = next((s, n) for s, n in zip(slots, lens, strict=True)
                            if n < NET_HDR_SIZE)
        err = DeviceProtocolError(
            f"receiveq used.len of buffer {slot}", length,
            f">= {NET_HDR_SIZE} (the virtio_net_hdr precedes every frame)")
        self.rxq.mark_broken(err)
        try:
            raise err
        finally:
            del err  # no error -> traceback -> frame -> error cycle (see SplitQueue._fail)

    # -- lifecycle ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise QueueStateError("NetDevice is closed")

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def _release_views(self) -> None:
        # Queues a failed set-up never attached are not closed by the transport; their
        # views would keep the arena from closing.
        for name in ("rxq", "txq"):
            q = getattr(self, name, None)
            if q is not None:
                q.close()
        mem = getattr(self, "_mem", None)
        if mem is not None:
            mem.release()

    def close(self) -> None:
        """Close the transport (and with it the queues and memory); frames not yet
        received are dropped (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._rx_ready.clear()
        self._release_views()
        self.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"queue_size={self.queue_size}"
        return (f"<NetDevice {state} tx={self.tx_packets} rx={self.rx_packets} "
                f"poll={self.poll_mode}>")


def build_frame(dst: bytes, src: bytes, ethertype: int, payload: bytes | Iterable[int]) -> bytes:
    """An Ethernet II frame (no FCS): 6-byte destination and source, big-endian type.  Raises
    :class:`ArgumentError` unless both MAC addresses are 6 bytes."""
    if len(dst) != 6 or len(src) != 6:
        raise ArgumentError("mac", (dst, src), "MAC addresses are 6 bytes")
    return bytes(dst) + bytes(src) + ethertype.to_bytes(2, "big") + bytes(payload)
