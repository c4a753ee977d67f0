"""virtio-net driver (VIRTIO 1.2 §5.1) over any :class:`~virtq.transport.Transport`.

**Queues** (§5.1.2): pair ``k`` is receiveq``k+1`` (queue ``2k``) and transmitq``k+1`` (queue
``2k+1``); with VIRTIO_NET_F_CTRL_VQ the controlq is queue ``2N``, N = ``max_virtqueue_pairs``
(§5.1.4).  Every packet on a data queue is preceded by a ``struct virtio_net_hdr`` (§5.1.6),
12 bytes with ``VIRTIO_F_VERSION_1`` (``num_buffers`` is always present in 1.x, §5.1.6.1):

    flags u8, gso_type u8, hdr_len le16, gso_size le16, csum_start le16, csum_offset le16,
    num_buffers le16

No offload is negotiated (no CSUM, no GSO/TSO), so the transmit header is all zeros
(§5.1.6.2: "no checksum, no segmentation", num_buffers 0) and received frames arrive fully
checksummed.  The driver:

* **transmits** by writing ``zero header + frame`` into one per-slot buffer of
  ``max_frame + 12`` bytes, one device-readable descriptor per frame (§2.7.4: a device must
  not assume any arrangement of descriptors; only legacy drivers without ANY_LAYOUT had to put
  the header in a descriptor of its own, §5.1.6.6).  A frame larger than a receive buffer is
  still one transmit buffer: the transmit side never needs MRG_RXBUF, and one copy into one
  buffer is cheaper than a chain of receive-sized pieces.
* **receives** into a ring of fixed ``buffer_size`` buffers.  Without VIRTIO_NET_F_MRG_RXBUF
  each must hold a header and a 1514-byte frame (§5.1.6.3.1).  With it (negotiated when
  offered) a frame may span ``num_buffers`` buffers, all used together, all but the last
  filled completely (§5.1.6.4.1); they are consecutive used elements of the receiveq, and the
  driver checks every one of those promises.  The ring's buffers lie back to back in memory,
  so the buffers of an in-order frame are adjacent and the frame is one slice: it is copied
  out once, like a one-buffer frame; only a frame that wraps around the ring is joined.
* **multi-queue** (VIRTIO_NET_F_MQ, automatic receive steering, §5.1.6.5.6): with
  ``queue_pairs=N > 1`` the driver sets up N pairs, fills every receiveq, then sends
  ``VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET(N)`` and checks the ack (§5.1.6.5).  Over a transport
  whose device has a controlq the command goes there.  Over vhost-user it does not: the
  front-end owns the device model, and the controlq is the front-end's to play -- QEMU handles
  it itself (virtio_net_handle_mq) and DPDK's virtio-user too (virtio_user_handle_mq), both
  turning VQ_PAIRS_SET into VHOST_USER_SET_VRING_ENABLE per ring and stripping CTRL_VQ from
  the features they send (vhost-user.rst, "Multiple queue support": "The front-end enables
  queues by sending message VHOST_USER_SET_VRING_ENABLE").  DPDK 22.11's vhost library has no
  controlq code at all (its virtio_net_ctrl.c arrived in 23.07, for VDUSE only), so a
  controlq handed to net_vhost would never be answered.  virtq does the same as those two
  front-ends: :class:`QueueEnabling` transports get the front-end control.

Memory is one arena from :meth:`Transport.alloc_dma`: every ring, the controlq and its
command buffer, then each pair's receive and transmit buffers.  Notifications follow the NAPI
pattern: used-buffer notifications stay off while the driver is busy and are switched on only
to sleep (§2.7.10); in ``poll`` mode they are never on.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn, Self

from virtq.abi import VIRTIO_F_EVENT_IDX
from virtq.abi.net import (
    CONFIG_MAC,
    CONFIG_MAX_VIRTQUEUE_PAIRS,
    MIN_FRAME,
    MIN_RX_BUFFER,
    NET_HDR_SIZE,
    NUM_BUFFERS_OFFSET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_OK,
    VQ_PAIRS_MAX,
    VQ_PAIRS_MIN,
    controlq,
    receiveq,
    transmitq,
)
from virtq.devices._rings import ring_chosen, ring_wanted
from virtq.devices.dma import byte_view
from virtq.errors import (
    ArgumentError,
    DeviceError,
    DeviceProtocolError,
    QueueStateError,
    VirtqError,
    VirtqTimeoutError,
)
from virtq.iova import IovaAllocator
from virtq.layout import align_up
from virtq.queue import QueueState, make_queue, make_slot_queue, ring_layout
from virtq.queue.packed import PackedSlotQueue
from virtq.queue.slots import SlotQueue
from virtq.transport.base import DmaArena, QueueEnabling, Transport
from virtq.transport.errors import DeviceRefusedError, TransportError
from virtq.transport.vhost_user import VhostUserTransport
from virtq.transport.waiter import Waiter, deadline_after

#: Frame types whose len() is their size in bytes (others are converted first).
_PLAIN = frozenset((bytes, bytearray))
_READY = QueueState.READY
#: The largest frame a virtio-net device handles without GSO: a 65535-byte IP packet plus the
#: 14-byte Ethernet header (§5.1.6.3 counts 65550 with GUEST_TSO/UFO; 1514 without).
MAX_FRAME = 65550
#: How long set-up waits for the device to acknowledge VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET.
CONTROL_TIMEOUT = 5.0
#: controlq entries: one command is in flight at a time, a few entries are plenty.
_CONTROL_QUEUE_SIZE = 16
#: Where the command lives in the controlq's buffer: class + command at 0, data at 8, the
#: ack byte at 64 (one descriptor each, as Linux lays them out).
_CTRL_DATA = 8
_CTRL_ACK = 64
_CTRL_MAX_DATA = _CTRL_ACK - _CTRL_DATA

_SlotQueue = SlotQueue | PackedSlotQueue
#: num_buffers = 1 (le16, as the rings' native-order views read it) for every slot of the
#: largest ring: what a run of one-buffer frames looks like.
_ONE_EACH = (1).to_bytes(2, "little") * 32768


def _not_index(value: object) -> bool:
    """Whether ``value`` cannot be a pair number: anything but an int -- bool included, and
    1.0, which would find pair 1 in a dict keyed by int without a word."""
    return not isinstance(value, int) or isinstance(value, bool)


class NetTimeoutError(VirtqTimeoutError):
    """A transmit did not find ring space in time (the device stopped consuming); the
    first ``sent`` frames of the call were queued and will still go out."""

    def __init__(self, message: str, *, sent: int) -> None:
        super().__init__(message)
        self.sent = sent


class NetControlError(DeviceError):
    """The device answered a controlq command with an ack other than VIRTIO_NET_OK
    (§5.1.6.5): ``command_class``, ``command`` and the ``ack`` byte say which and how."""

    def __init__(self, message: str, *, command_class: int, command: int, ack: int) -> None:
        super().__init__(message)
        self.command_class = command_class
        self.command = command
        self.ack = ack


@dataclass(frozen=True)
class NetPairStats:
    """One queue pair's counters (:meth:`NetDevice.pair_stats`)."""

    pair: int
    #: True while the pair is in use (within the last VQ_PAIRS_SET).
    active: bool
    tx_packets: int
    tx_bytes: int
    rx_packets: int
    rx_bytes: int
    #: Receive buffers the device filled: more than ``rx_packets`` when frames spanned
    #: several (MRG_RXBUF).
    rx_buffers: int
    #: Transmit buffers the device has not completed (or that are not reaped yet).
    tx_in_flight: int
    #: Receive buffers posted to the device and not yet completed.
    rx_posted: int


class _Pair:
    """One receiveq/transmitq pair: its queues, where its buffers are, its counters."""

    __slots__ = (
        "index",
        "nbufs",
        "runs",
        "rx_buffers",
        "rx_bytes",
        "rx_index",
        "rx_off",
        "rx_packets",
        "rx_ready",
        "rx_starts",
        "rx_waiter",
        "rxq",
        "tx_bytes",
        "tx_index",
        "tx_packets",
        "tx_starts",
        "tx_waiter",
        "txq",
    )

    rxq: _SlotQueue
    txq: _SlotQueue
    rx_off: int
    rx_starts: list[int]
    tx_starts: list[int]
    nbufs: memoryview
    runs: list[int]
    rx_waiter: Waiter
    tx_waiter: Waiter

    def __init__(self, index: int) -> None:
        self.index = index
        self.rx_index = receiveq(index)
        self.tx_index = transmitq(index)
        self.rx_ready: deque[bytes] = deque()
        self.tx_packets = self.tx_bytes = self.rx_packets = self.rx_bytes = 0
        self.rx_buffers = 0

    def release(self) -> None:
        """Close the queues (the transport closes attached ones too) and the view."""
        for name in ("rxq", "txq"):
            q = getattr(self, name, None)
            if q is not None:
                q.close()
        nbufs = getattr(self, "nbufs", None)
        if nbufs is not None:
            nbufs.release()


class _ControlQueue:
    """The controlq (§5.1.6.5) of a device that has one: one command at a time, header,
    data and ack in descriptors of their own, the ack and its used length checked."""

    __slots__ = ("addr", "buf", "index", "mem", "queue", "seq", "transport", "waiter")

    def __init__(self, transport: Transport, index: int, queue: Any, mem: memoryview,
                 buf: int, addr: int, poll: bool) -> None:
        self.transport = transport
        self.index = index
        self.queue = queue
        self.mem = mem
        self.buf = buf  # offset of the command buffer in mem
        self.addr = addr  # its device address
        self.waiter = Waiter(transport, [queue], poll=poll)
        self.seq = 0

    def command(self, cls: int, cmd: int, data: bytes, timeout: float | None) -> None:
        """Send one command and wait for its ack.  Raises :class:`ArgumentError` for data
        longer than the command buffer holds, :class:`NetControlError` for an
        ack other than VIRTIO_NET_OK, :class:`~virtq.errors.DeviceProtocolError` for a used
        length other than the one ack byte (the controlq is then broken),
        :class:`~virtq.errors.VirtqTimeoutError` when no answer comes in time (the controlq
        is broken too: the device may still read the command buffer), and what the
        transport raises."""
        if len(data) > _CTRL_MAX_DATA:
            raise ArgumentError("data", f"<{len(data)} bytes>",
                                f"a command's data is at most {_CTRL_MAX_DATA} bytes here")
        # The deadline first: a bad timeout must raise before the command is on the ring
        # (a command left there would be answered with the next one's completion).
        deadline = deadline_after(timeout)
        q = self.queue
        mem, buf, addr = self.mem, self.buf, self.addr
        mem[buf : buf + 2] = bytes((cls, cmd))
        mem[buf + _CTRL_DATA : buf + _CTRL_DATA + len(data)] = data
        mem[buf + _CTRL_ACK] = 0xFF  # neither OK nor ERR until the device writes it
        readable = [(addr, 2)]
        if data:
            readable.append((addr + _CTRL_DATA, len(data)))
        self.seq += 1
        token = self.seq
        q.add(readable, [(addr + _CTRL_ACK, 1)], token)
        if q.publish():
            self.transport.notify(self.index)
        what = f"controlq command class {cls} command {cmd}"
        while True:
            done = q.drain_used()
            if done:
                break
            if not self.waiter.wait(deadline):
                q.mark_broken(DeviceError(f"{what} was not answered within {timeout} s"))
                raise VirtqTimeoutError(f"{what}: no answer within {timeout} s (the "
                                        "controlq is now unusable)")
        if not self.waiter.polling:
            q.disable_interrupts()
        (got, used_len), = done  # one command in flight: one completion
        if got != token or used_len != 1:
            # §2.7.8: used.len is the bytes written into device-writable buffers; the ack is
            # the only one (§5.1.6.5).
            err = DeviceProtocolError(f"{what}: used.len", used_len,
                                      "1, the ack byte (VIRTIO 1.2 §5.1.6.5)")
            q.mark_broken(err)
            raise err
        ack = mem[buf + _CTRL_ACK]
        if ack != VIRTIO_NET_OK:
            name = {VIRTIO_NET_ERR: "VIRTIO_NET_ERR"}.get(ack, f"{ack:#x}")
            raise NetControlError(f"{what}: the device answered {name}", command_class=cls,
                                  command=cmd, ack=ack)


class _FrontEndControl:
    """The controlq played by the front-end, over a transport that enables single rings
    (vhost-user): what QEMU's virtio_net_handle_mq and DPDK's virtio_user_handle_mq do.
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET(n) enables both rings of pairs 0..n-1 and disables the
    rest; any other command is answered VIRTIO_NET_ERR."""

    __slots__ = ("enabled", "pairs", "transport")

    def __init__(self, transport: QueueEnabling, pairs: int) -> None:
        self.transport = transport
        self.pairs = pairs
        self.enabled = pairs  # start() enables every attached ring

    def command(self, cls: int, cmd: int, data: bytes, timeout: float | None) -> None:
        n = int.from_bytes(data, "little") if len(data) == 2 else 0
        if (cls, cmd) != (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) \
                or not VQ_PAIRS_MIN <= n <= self.pairs:
            raise NetControlError(f"controlq command class {cls} command {cmd}: the "
                                  "front-end answered VIRTIO_NET_ERR", command_class=cls,
                                  command=cmd, ack=VIRTIO_NET_ERR)
        for pair in range(min(n, self.enabled), max(n, self.enabled)):
            for index in (receiveq(pair), transmitq(pair)):
                self.transport.enable_queue(index, pair < n)
        self.enabled = n


class NetDevice:
    """A virtio-net device.  Build it with :meth:`connect_vhost_user` or over any transport:
    ``NetDevice(transport)``.  Closing the device closes the transport.

    ``buffer_size``: bytes of every receive buffer, header included (>= 1526 without
    MRG_RXBUF, >= 12 with it; even).  ``max_frame``: the largest frame :meth:`send` takes
    (default ``max(buffer_size - 12, 1514)``); transmit buffers are ``max_frame + 12``
    bytes.  Receiving frames longer than ``buffer_size - 12`` needs MRG_RXBUF.
    ``mrg_rxbuf``: VIRTIO_NET_F_MRG_RXBUF (None: when offered; True: insist; False: never).
    ``queue_pairs``: how many receiveq/transmitq pairs to set up and use (VIRTIO_NET_F_MQ
    when more than one; see the module docstring for the controlq).  ``poll=True``
    busy-polls the rings instead of sleeping on used-buffer notifications.  ``ring``:
    ``"split"``, ``"packed"`` or ``"auto"`` (packed when offered); ``in_order``:
    VIRTIO_F_IN_ORDER (None: when offered and implemented for the format).

    Raises :class:`~virtq.errors.ArgumentError` for a bad argument,
    :class:`~virtq.transport.DeviceRefusedError` when the device lacks what was asked
    (MQ, enough queue pairs, MRG_RXBUF when insisted on), :class:`NetControlError` /
    :class:`~virtq.errors.VirtqTimeoutError` when it refuses or ignores VQ_PAIRS_SET, and
    what the transport raises; the transport is closed then.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        queue_size: int = 256,
        buffer_size: int = 2048,
        queue_pairs: int = 1,
        mrg_rxbuf: bool | None = None,
        max_frame: int | None = None,
        event_idx: bool = True,
        poll: bool = False,
        ring: str = "auto",
        in_order: bool | None = None,
    ) -> None:
        self.transport = transport
        self.poll_mode = bool(poll or transport.polling)
        self._closed = False
        self._pairs: list[_Pair] = []
        self._control: _ControlQueue | _FrontEndControl | None = None
        try:
            if not isinstance(queue_pairs, int) or isinstance(queue_pairs, bool) \
                    or not VQ_PAIRS_MIN <= queue_pairs <= VQ_PAIRS_MAX:
                raise ArgumentError("queue_pairs", queue_pairs,
                                    f"must be an int in {VQ_PAIRS_MIN}..{VQ_PAIRS_MAX}")
            if mrg_rxbuf not in (None, True, False):
                raise ArgumentError("mrg_rxbuf", mrg_rxbuf,
                                    "must be True, False or None (when offered)")
            #: How many queue pairs are set up (each can be used once active).
            self.queue_pairs = queue_pairs
            self._negotiate(event_idx, ring, in_order, mrg_rxbuf)
            self._check_sizes(buffer_size, max_frame)
            self._setup(queue_size)
        except BaseException:
            self._release_views()
            transport.close()
            raise

    # -- set-up ---------------------------------------------------------------------------------

    def _negotiate(self, event_idx: bool, ring: str, in_order: bool | None,
                   mrg_rxbuf: bool | None) -> None:
        t = self.transport
        multi = self.queue_pairs > 1
        # Over vhost-user the front-end plays the controlq (module docstring), so CTRL_VQ is
        # not offered to the back-end, as QEMU and DPDK's virtio-user strip it too.
        front_end = multi and isinstance(t, QueueEnabling)
        wanted = 1 << VIRTIO_NET_F_MAC | ring_wanted(ring, in_order)
        if event_idx:
            wanted |= 1 << VIRTIO_F_EVENT_IDX
        if mrg_rxbuf is not False:
            wanted |= 1 << VIRTIO_NET_F_MRG_RXBUF
        if multi:
            # §5.1.3.1: MQ requires CTRL_VQ (VQ_PAIRS_SET is a controlq command).
            wanted |= 1 << VIRTIO_NET_F_MQ | (0 if front_end else 1 << VIRTIO_NET_F_CTRL_VQ)
        self.features = features = t.negotiate(wanted)
        #: "split" or "packed", and whether VIRTIO_F_IN_ORDER is in use.
        self.ring, self.in_order = ring_chosen(features, ring, in_order)
        #: Whether a received frame may span several buffers (VIRTIO_NET_F_MRG_RXBUF).
        self.mrg_rxbuf = bool(features >> VIRTIO_NET_F_MRG_RXBUF & 1)
        if mrg_rxbuf and not self.mrg_rxbuf:
            raise DeviceRefusedError("mrg_rxbuf=True asked, the device does not offer "
                                     "VIRTIO_NET_F_MRG_RXBUF")
        self.mac = self._read_config(CONFIG_MAC, 6) if features >> VIRTIO_NET_F_MAC & 1 \
            else None
        #: Who answers VIRTIO_NET_CTRL_MQ: "controlq" (the device), "front-end" (virtq
        #: itself, over vhost-user), or None with one pair.
        self.control: str | None = None
        #: The device's max_virtqueue_pairs (over vhost-user: what the front-end chose).
        self.max_queue_pairs = 1
        if not multi:
            return
        if not features >> VIRTIO_NET_F_MQ & 1:
            raise DeviceRefusedError(f"queue_pairs={self.queue_pairs} asked, the device "
                                     "does not offer VIRTIO_NET_F_MQ")
        raw = self._read_config(CONFIG_MAX_VIRTQUEUE_PAIRS, 2)
        if raw is not None:
            most = int.from_bytes(raw, "little")
            if not VQ_PAIRS_MIN <= most <= VQ_PAIRS_MAX:
                raise DeviceProtocolError("config max_virtqueue_pairs", most,
                                          f"{VQ_PAIRS_MIN}..{VQ_PAIRS_MAX} (VIRTIO 1.2 §5.1.4.1)")
            if self.queue_pairs > most:
                raise DeviceRefusedError(f"queue_pairs={self.queue_pairs} asked, the "
                                         f"device has max_virtqueue_pairs {most}")
            self.max_queue_pairs = most
        if front_end:
            # vhost-user.rst: the front-end knows or chooses the queue count, checked against
            # GET_QUEUE_NUM (max_queue_size below); the back-end's own limit (net_vhost's
            # queues=) is not visible to it, as for QEMU's "-netdev vhost-user,queues=N".
            self.control = "front-end"
            if raw is None:
                self.max_queue_pairs = self.queue_pairs
        else:
            if not features >> VIRTIO_NET_F_CTRL_VQ & 1:
                raise DeviceRefusedError("VIRTIO_NET_F_MQ needs VIRTIO_NET_F_CTRL_VQ, which "
                                         "the device does not offer (§5.1.3.1)")
            if raw is None:
                raise DeviceRefusedError("the transport cannot read max_virtqueue_pairs, "
                                         "where the controlq's index comes from (§5.1.2)")
            self.control = "controlq"

    def _read_config(self, offset: int, size: int) -> bytes | None:
        try:
            return self.transport.read_config(offset, size)
        except TransportError:
            return None  # the transport cannot read config (vhost-user without CONFIG)

    def _check_sizes(self, buffer_size: int, max_frame: int | None) -> None:
        # §5.1.6.3.1: without MRG_RXBUF a buffer SHOULD hold a header and a 1514-byte
        # frame; with it each buffer MUST hold at least the header.  Even, so that
        # num_buffers is an aligned le16 in every buffer.
        low = NET_HDR_SIZE if self.mrg_rxbuf else MIN_RX_BUFFER
        if not isinstance(buffer_size, int) or isinstance(buffer_size, bool) \
                or buffer_size < low or buffer_size % 2:
            raise ArgumentError(
                "buffer_size", buffer_size,
                f"receive buffers must be even and hold >= {low} bytes" + (
                    " (the 12-byte header, VIRTIO 1.2 §5.1.6.3.1)" if self.mrg_rxbuf else
                    " (12-byte header + 1514-byte frame without MRG_RXBUF, VIRTIO 1.2 "
                    "§5.1.6.3.1)"))
        self.buffer_size = buffer_size
        if max_frame is None:
            max_frame = max(buffer_size - NET_HDR_SIZE, 1514)
        if not isinstance(max_frame, int) or isinstance(max_frame, bool) \
                or not MIN_FRAME <= max_frame <= MAX_FRAME:
            raise ArgumentError("max_frame", max_frame,
                                f"must be an int in {MIN_FRAME}..{MAX_FRAME}")
        #: The largest frame :meth:`send` accepts.
        self.max_frame = max_frame

    def _setup(self, queue_size: int) -> None:
        t = self.transport
        pairs = self.queue_pairs
        data_queues = [i for k in range(pairs) for i in (receiveq(k), transmitq(k))]
        ctrl = controlq(self.max_queue_pairs) if self.control == "controlq" else None
        for index in [*data_queues, *([] if ctrl is None else [ctrl])]:
            if t.max_queue_size(index) == 0:
                kind = ("controlq" if index == ctrl else
                        f"{'transmitq' if index % 2 else 'receiveq'}{index // 2 + 1}")
                raise DeviceRefusedError(f"the device has no {kind} (queue {index})")
        if not isinstance(queue_size, int) or isinstance(queue_size, bool) or queue_size < 1:
            raise ArgumentError("queue_size", queue_size, "must be an int >= 1")
        size = min(queue_size, *(t.max_queue_size(i) for i in data_queues))
        layout = ring_layout(size, ring=self.ring)  # validates the size for the format
        ring_bytes = layout.nbytes  # page-aligned, so shifted() keeps every alignment
        page = layout.page_size
        offset = len(data_queues) * ring_bytes
        ctrl_layout = None
        if ctrl is not None:
            csize = min(_CONTROL_QUEUE_SIZE, t.max_queue_size(ctrl))
            if self.ring == "split":
                csize = 1 << (csize.bit_length() - 1)  # a power of two (§2.7)
            ctrl_layout = ring_layout(csize, ring=self.ring).shifted(offset)
            offset = ctrl_layout.nbytes + page  # the ring, then a page for the command
        bs = self.buffer_size
        tbs = self.max_frame + NET_HDR_SIZE
        rx_bytes = align_up(size * bs, page)
        pair_bytes = rx_bytes + align_up(size * tbs, page)
        self.arena: DmaArena = t.alloc_dma(offset + pairs * pair_bytes)
        self._mem = mem = self.arena.region.view()
        self.queue_size = size
        ev = bool(self.features >> VIRTIO_F_EVENT_IDX & 1)
        addr = self.arena.addr
        for k in range(pairs):
            p = _Pair(k)
            self._pairs.append(p)
            rx_off = offset + k * pair_bytes
            tx_off = rx_off + rx_bytes
            # Both queues are fixed slots (SlotQueue, or its packed sibling): slot d <->
            # buffer d, made available in ring order and reused first in, first out.
            # Receiving re-posts the buffers just read; transmitting sets each slot's length.
            p.rxq = make_slot_queue(self.arena.region, layout.shifted(2 * k * ring_bytes),
                                    iova=self.arena.iova, event_idx=ev, in_order=self.in_order,
                                    slots=[addr(rx_off + d * bs) for d in range(size)],
                                    slot_size=bs, writable=True)
            p.txq = make_slot_queue(self.arena.region,
                                    layout.shifted((2 * k + 1) * ring_bytes),
                                    iova=self.arena.iova, event_idx=ev, in_order=self.in_order,
                                    slots=[addr(tx_off + d * tbs) for d in range(size)],
                                    slot_size=tbs, writable=False)
            p.rx_off = rx_off
            p.rx_starts = [rx_off + slot * bs + NET_HDR_SIZE for slot in range(size)]
            # Where each slot's frame starts (just past its header), listed twice so that
            # the slots of one submission, first .. first + k - 1 mod size, are one slice.
            p.tx_starts = [tx_off + slot * tbs + NET_HDR_SIZE for slot in range(size)] * 2
            # num_buffers of the header at the start of every receive buffer, as one
            # strided view: nbufs[slot] (read only for buffers that start a frame).
            p.nbufs = mem[rx_off : rx_off + size * bs].cast("H")[NUM_BUFFERS_OFFSET // 2 ::
                                                                  bs // 2]
            # Slots in ring order from any start, as one slice (to recognise a run).
            p.runs = list(range(size)) * 2
            # The transmit header is always zero and the device never writes
            # device-readable buffers (§2.7.4), so each slot's header is written once, here.
            mem[tx_off : tx_off + size * tbs] = bytes(size * tbs)
            t.attach_queue(p.rx_index, p.rxq)
            t.attach_queue(p.tx_index, p.txq)
            p.rx_waiter = Waiter(t, [p.rxq], poll=self.poll_mode)
            p.tx_waiter = Waiter(t, [p.txq], poll=self.poll_mode)
        if ctrl is not None and ctrl_layout is not None:
            cq = make_queue(self.arena.region, ctrl_layout, iova=self.arena.iova,
                            event_idx=ev, in_order=self.in_order)
            self._control = _ControlQueue(t, ctrl, cq, mem, ctrl_layout.nbytes,
                                          addr(ctrl_layout.nbytes), self.poll_mode)
            t.attach_queue(ctrl, cq)
        elif self.control == "front-end":
            assert isinstance(t, QueueEnabling)
            self._control = _FrontEndControl(t, pairs)
        #: Pairs frames may be sent on (the last VQ_PAIRS_SET), and received from.
        self.active_pairs = 1
        self._tx_pairs = {0: self._pairs[0]}
        self._rx_pairs = {p.index: p for p in self._pairs}
        for p in self._pairs:
            # Fill every receiveq before DRIVER_OK: a device may deliver as soon as it runs
            # (§5.1.5 step 3, "fill the receive queues with buffers"; with MQ each receiveq
            # that will be used, §5.1.6.3.1).
            p.rxq.submit(size)
            p.rxq.publish()
            # Transmit completions are reaped on the next send, never waited for eagerly.
            p.txq.disable_interrupts()
            if self.poll_mode:
                p.rxq.disable_interrupts()
        t.start()
        # No notification may precede DRIVER_OK (§3.1.1), so the receiveqs' first kicks
        # come now; a back-end that sleeps until kicked then sees the filled rings.
        for p in self._pairs:
            t.notify(p.rx_index)
        if pairs > 1:
            # §5.1.5 step 4: only the first pair is used until VQ_PAIRS_SET; the queues
            # are configured before it (§5.1.6.5.6, driver requirements).
            self.set_queue_pairs(pairs, timeout=CONTROL_TIMEOUT)

    @classmethod
    def connect_vhost_user(
        cls,
        path: str | os.PathLike[str],
        *,
        queue_size: int = 256,
        buffer_size: int = 2048,
        queue_pairs: int = 1,
        mrg_rxbuf: bool | None = None,
        max_frame: int | None = None,
        event_idx: bool = True,
        poll: bool = False,
        ring: str = "auto",
        in_order: bool | None = None,
        timeout: float = 5.0,
        iova_allocator: IovaAllocator | None = None,
        hugepages: bool = False,
    ) -> Self:
        """Connect to a vhost-user-net back-end (DPDK ``net_vhost``, :class:`~virtq.testing.
        testpmd.TestPmd`, ...) listening on ``path``.  With ``queue_pairs=N`` the back-end
        must serve N pairs (DPDK: ``net_vhost0,...,queues=N``; it cannot tell the front-end
        how many it serves, only the most rings it takes, GET_QUEUE_NUM).  The connection is
        closed on any error; raises what :class:`NetDevice` and
        :meth:`VhostUserTransport.connect` raise."""
        transport = VhostUserTransport.connect(path, timeout=timeout,
                                               iova_allocator=iova_allocator,
                                               hugepages=hugepages)
        try:
            return cls(transport, queue_size=queue_size, buffer_size=buffer_size,
                       queue_pairs=queue_pairs, mrg_rxbuf=mrg_rxbuf, max_frame=max_frame,
                       event_idx=event_idx, poll=poll, ring=ring, in_order=in_order)
        except BaseException:
            transport.close()  # idempotent; covers a TypeError before __init__ ran
            raise

    # -- queue pairs ----------------------------------------------------------------------

    def set_queue_pairs(self, count: int, *, timeout: float | None = CONTROL_TIMEOUT) -> None:
        """Use pairs ``0 .. count - 1`` from now on: VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (§5.1.6.5.6)
        on the controlq, or over vhost-user the front-end's SET_VRING_ENABLE per ring.
        Sending on a pair past ``count`` is refused from the moment the command is placed
        (the spec's driver requirement); frames already received there can still be read.

        Raises :class:`~virtq.errors.ArgumentError` unless ``1 <= count <= queue_pairs``,
        :class:`NetControlError` when the device answers VIRTIO_NET_ERR (the pairs in use
        stay as they were), :class:`~virtq.errors.DeviceProtocolError` /
        :class:`~virtq.errors.VirtqTimeoutError` for a controlq that misbehaves or stays
        silent, and what the transport raises."""
        self._check_open()
        if not isinstance(count, int) or isinstance(count, bool) \
                or not 1 <= count <= self.queue_pairs:
            raise ArgumentError("count", count, f"must be an int in 1..{self.queue_pairs} "
                                "(the pairs set up: queue_pairs)")
        # Before anything changes: a bad timeout found after the command was placed would
        # leave it on the controlq, answered behind the next command's back.
        deadline_after(timeout)
        control = self._control
        if control is None:
            return  # one pair, no MQ: nothing to switch
        old = self._tx_pairs
        # "The driver MUST NOT queue packets on transmit queues greater than virtqueue_pairs
        # once it has placed the VQ_PAIRS_SET command in the available ring."
        self._tx_pairs = {p.index: p for p in self._pairs[: min(count, len(old))]}
        try:
            control.command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                            count.to_bytes(2, "little"), timeout)
        except NetControlError:
            self._tx_pairs = old  # refused: the device keeps the old number
            raise
        self._tx_pairs = {p.index: p for p in self._pairs[:count]}
        self.active_pairs = count

    def pair_stats(self) -> list[NetPairStats]:
        """Each queue pair's counters, in pair order."""
        return [NetPairStats(p.index, p.index in self._tx_pairs, p.tx_packets, p.tx_bytes,
                             p.rx_packets, p.rx_bytes, p.rx_buffers, p.txq.num_in_flight,
                             p.rxq.num_in_flight) for p in self._pairs]

    def _no_pair(self, pair: object, what: str, pairs: dict[int, _Pair]) -> ArgumentError:
        self._check_open()
        return ArgumentError("pair", pair, f"cannot {what} it: pairs {sorted(pairs)} are "
                             f"usable ({self.queue_pairs} set up, {self.active_pairs} active)")

    # Pair 0's queues and the sums over every pair (the single-pair API of before).

    @property
    def rxq(self) -> _SlotQueue:
        """receiveq1's queue."""
        q: _SlotQueue = self._pairs[0].rxq
        return q

    @property
    def txq(self) -> _SlotQueue:
        """transmitq1's queue."""
        q: _SlotQueue = self._pairs[0].txq
        return q

    @property
    def tx_packets(self) -> int:
        """Frames sent, summed over every queue pair (per pair: :meth:`pair_stats`)."""
        return sum(p.tx_packets for p in self._pairs)

    @property
    def tx_bytes(self) -> int:
        """Frame bytes sent (without the virtio_net_hdr), summed over every queue pair (per
        pair: :meth:`pair_stats`)."""
        return sum(p.tx_bytes for p in self._pairs)

    @property
    def rx_packets(self) -> int:
        """Frames received, summed over every queue pair (per pair: :meth:`pair_stats`)."""
        return sum(p.rx_packets for p in self._pairs)

    @property
    def rx_bytes(self) -> int:
        """Frame bytes received (without the virtio_net_hdr), summed over every queue pair
        (per pair: :meth:`pair_stats`)."""
        return sum(p.rx_bytes for p in self._pairs)

    # -- transmit -------------------------------------------------------------------------

    def send(self, frame: bytes | bytearray | memoryview, *, pair: int = 0,
             timeout: float | None = None) -> None:
        """Queue one Ethernet frame (no FCS) for transmission on ``pair``; blocks while its
        transmitq is full, for at most ``timeout`` seconds (None: until there is room).
        Raises as :meth:`send_batch`."""
        self.send_batch((frame,), pair=pair, timeout=timeout)

    def send_batch(self, frames: Iterable[Any], *, pair: int = 0,
                   timeout: float | None = None) -> int:
        """Queue ``frames`` (bytes-like: bytes, bytearray, memoryview, array -- sizes are
        counted in bytes) in order on the transmitq of ``pair`` (an active pair), publishing
        each run that fits the ring with one index store and at most one notification.
        Blocks while the ring is full (at most ``timeout`` seconds in all, counted from the
        first wait, then :class:`NetTimeoutError`, whose ``sent`` says how many were
        queued); returns how many were queued (all of them).  Raises :class:`ArgumentError`
        for a bad frame (before anything is queued) or a pair that is not active,
        :class:`~virtq.errors.DeviceProtocolError` /
        :class:`~virtq.errors.QueueBrokenError` when the device broke the transmitq, the
        transport's error when it failed."""
        if self._closed:
            self._check_open()
        try:
            if pair.__class__ is not int and _not_index(pair):
                raise TypeError
            p = self._tx_pairs[pair]
        except (KeyError, TypeError):
            raise self._no_pair(pair, "send on", self._tx_pairs) from None
        if timeout is not None:
            deadline_after(timeout)  # a bad timeout raises now, not after half the batch
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
        txq = p.txq
        if total > txq.num_free and not _PLAIN.issuperset(map(type, frames)):
            frames = [byte_view(f, "frame") for f in frames]
        lens, dlens = self._frame_lengths(frames)
        deadline: float | None = None  # the clock starts at the first wait for room
        mem = self._mem
        starts = p.tx_starts
        sent = 0
        while sent < total:
            txq.reap()  # completed transmit slots become free (first in, first out)
            k = min(txq.num_free, total - sent)
            if not k:
                if deadline is None:
                    deadline = deadline_after(timeout)
                self._wait_tx_room(p, deadline, sent)
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
                self.transport.notify(p.tx_index)
            sent = end
        p.tx_packets += total
        p.tx_bytes += sum(lens)
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
            raise ArgumentError("frame", f"<{n} bytes>", f"must be {lo}..{hi} bytes (max_frame)")
        return lens, [n + NET_HDR_SIZE for n in lens]

    def _wait_tx_room(self, p: _Pair, deadline: float | None, sent: int) -> None:
        """Until the device completes some transmit buffer of ``p`` (the caller reaps it)."""
        txq = p.txq
        while not txq.has_used():
            if deadline is not None and time.monotonic() >= deadline:
                raise NetTimeoutError(
                    f"transmitq{p.index + 1} full for {self.queue_size} frames: the device "
                    f"did not complete any within the timeout ({sent} of this batch queued)",
                    sent=sent)
            # Ask for a notification once about 3/4 of the ring has completed (one wake-up
            # per batch); the waiter re-checks after arming (§2.7.7, §2.7.14).
            p.tx_waiter.wait(deadline, txq.num_in_flight * 3 // 4 + 1)
            if not self.poll_mode:
                txq.disable_interrupts()

    def reclaim(self, pair: int | None = None) -> int:
        """Reap completed transmit buffers now (``send`` also does it) of ``pair`` (None:
        every pair); returns how many.  Raises :class:`ArgumentError` for a pair not set
        up, what the transmitq raises when the device broke it."""
        self._check_open()
        if pair is None:
            pairs = self._pairs
        else:
            try:
                if pair.__class__ is not int and _not_index(pair):
                    raise TypeError
                pairs = [self._rx_pairs[pair]]
            except (KeyError, TypeError):
                raise self._no_pair(pair, "reclaim on", self._rx_pairs) from None
        return sum(len(p.txq.reap()[0]) for p in pairs)

    @property
    def tx_in_flight(self) -> int:
        """Transmit buffers the device has not completed (or that are not reaped yet), over
        every pair."""
        return sum(p.txq.num_in_flight for p in self._pairs)

    # -- receive --------------------------------------------------------------------------

    def _rx_pair(self, pair: object) -> _Pair:
        try:
            if pair.__class__ is not int and _not_index(pair):
                raise TypeError
            return self._rx_pairs[pair]  # type: ignore[index]
        except (KeyError, TypeError):
            raise self._no_pair(pair, "receive from", self._rx_pairs) from None

    def recv(self, timeout: float | None = None, *, pair: int = 0) -> bytes | None:
        """The next frame received on ``pair`` (header stripped, a multi-buffer frame
        reassembled), waiting at most ``timeout`` seconds (None: forever, 0: do not wait);
        None if none arrived.  Raises :class:`ArgumentError` for a pair not set up,
        :class:`~virtq.errors.DeviceProtocolError` when the device broke the receiveq (the
        frames validated before the bad buffer are kept for the next call) and
        :class:`~virtq.errors.QueueBrokenError` on later calls, the transport's error when
        it failed."""
        p = self._rx_pair(pair)
        ready = p.rx_ready
        if ready:
            return ready.popleft()
        frames = self._wait_rx(p, timeout)
        if not frames:
            return None
        if len(frames) > 1:
            ready.extend(frames[1:])
        return frames[0]

    def recv_batch(self, max_frames: int = 256, timeout: float | None = 0, *,
                   pair: int = 0) -> list[bytes]:
        """Up to ``max_frames`` frames received on ``pair``; waits at most ``timeout``
        seconds for the first one (default: do not wait); ``[]`` if none arrived.  Raises
        as :meth:`recv` (:class:`ArgumentError` for a bad ``timeout`` or ``pair``,
        :class:`~virtq.errors.QueueStateError` once closed, a
        :class:`~virtq.errors.DeviceError` for a frame the device reported impossibly),
        and :class:`ArgumentError` for ``max_frames`` < 1."""
        if _not_index(max_frames) or max_frames < 1:
            raise ArgumentError("max_frames", max_frames, "must be an int >= 1")
        p = self._rx_pair(pair)
        ready = p.rx_ready
        if ready:
            if len(ready) <= max_frames:
                out = list(ready)
                ready.clear()
                return out
            return [ready.popleft() for _ in range(max_frames)]
        frames = self._wait_rx(p, timeout)
        if len(frames) > max_frames:
            ready.extend(frames[max_frames:])
            del frames[max_frames:]
        return frames

    def recv_any(self, max_frames: int = 256, timeout: float | None = 0
                 ) -> list[tuple[int, bytes]]:
        """Up to ``max_frames`` ``(pair, frame)`` received on any pair, pair by pair in
        order; waits at most ``timeout`` seconds for the first one (default: do not wait),
        sleeping on every receiveq's notifications at once.  A pair whose receiveq the device
        broke raises its :class:`~virtq.errors.DeviceProtocolError` once (the frames of
        other pairs stay for the next call) and is left out afterwards (:meth:`recv` on it
        raises :class:`~virtq.errors.QueueBrokenError`).  Raises :class:`ArgumentError` for
        ``max_frames`` < 1, the transport's error when it failed."""
        if _not_index(max_frames) or max_frames < 1:
            raise ArgumentError("max_frames", max_frames, "must be an int >= 1")
        self._check_open()
        out = self._take_any(max_frames)
        if out or timeout == 0:
            return out
        deadline = deadline_after(timeout)
        while True:
            waiting = [p.rxq for p in self._pairs if p.rxq.state is _READY]
            if not waiting:
                return out  # every receiveq is broken: nothing will come
            woke = Waiter(self.transport, waiting, poll=self.poll_mode).wait(deadline)
            if not self.poll_mode:
                for q in waiting:
                    if q.state is _READY:
                        q.disable_interrupts()
            out = self._take_any(max_frames)
            if out or (not woke and deadline is not None and time.monotonic() >= deadline):
                return out

    def _take_any(self, budget: int) -> list[tuple[int, bytes]]:
        """Harvest every usable receiveq into its pair's ready frames, then take up to
        ``budget`` of them, pair by pair."""
        for p in self._pairs:
            if p.rxq.state is _READY:
                p.rx_ready.extend(self._harvest_rx(p))
        out: list[tuple[int, bytes]] = []
        for p in self._pairs:
            ready = p.rx_ready
            while ready and len(out) < budget:
                out.append((p.index, ready.popleft()))
        return out

    def _wait_rx(self, p: _Pair, timeout: float | None) -> list[bytes]:
        """Frames received on ``p``, waiting until some arrive or ``timeout`` passes
        (then [])."""
        self._check_open()
        frames = self._harvest_rx(p)
        if frames or timeout == 0:
            return frames  # (the hot path: no clock read)
        deadline = deadline_after(timeout)
        waiter = p.rx_waiter
        while True:
            # Sleep only with notifications on and the ring re-checked after the store
            # that switched them on (the waiter does both, §2.7.7); off again while busy.
            woke = waiter.wait(deadline)
            if not self.poll_mode:
                p.rxq.disable_interrupts()
            frames = self._harvest_rx(p)
            if frames or (not woke and deadline is not None
                          and time.monotonic() >= deadline):
                return frames

    def _harvest_rx(self, p: _Pair) -> list[bytes]:
        """Copy every completed frame of ``p``'s receiveq out (header stripped) and re-post
        the buffers with one publish."""
        rxq = p.rxq
        slots, lens = rxq.reap()
        if not slots:
            return []
        p.rx_buffers += len(slots)
        mem = self._mem
        starts = p.rx_starts  # of each buffer's frame, just past its header
        if self.mrg_rxbuf and not self._one_buffer_each(p, slots):
            frames = self._merge(p, slots, lens)
        else:
            # used.len is every byte written, header included (§2.7.8); the queue already
            # checked it is <= buffer_size.
            frames = [mem[starts[slot] : starts[slot] + length - NET_HDR_SIZE].tobytes()
                      for slot, length in zip(slots, lens, strict=True)]
            if min(lens) < NET_HDR_SIZE:
                self._drop_short(p, slots, lens, frames)
        # Re-post every free buffer: the ones just read (all of them, unless the device
        # completed out of order and an older one is still out).
        rxq.submit(rxq.num_free)
        if rxq.publish():
            self.transport.notify(p.rx_index)
        p.rx_packets += len(frames)
        p.rx_bytes += sum(map(len, frames))
        return frames

    @staticmethod
    def _one_buffer_each(p: _Pair, slots: list[int]) -> bool:
        """Whether every completed buffer holds a whole frame (num_buffers 1): for slots in
        ring order (the usual case) one C-level read of the run's headers."""
        count = len(slots)
        first = slots[0]
        if slots == p.runs[first : first + count]:
            nbufs = p.nbufs
            end = first + count
            size = len(nbufs)
            if end <= size:
                return nbufs[first:end].tobytes() == _ONE_EACH[: 2 * count]
            return (nbufs[first:].tobytes() == _ONE_EACH[: 2 * (size - first)]
                    and nbufs[: end - size].tobytes() == _ONE_EACH[: 2 * (end - size)])
        nb = p.nbufs
        return all(nb[s] == 1 for s in slots)

    def _merge(self, p: _Pair, slots: list[int], lens: list[int]) -> list[bytes]:
        """Frames from used buffers of which some hold part of a frame (MRG_RXBUF,
        §5.1.6.4): each frame is ``num_buffers`` consecutive used buffers, all but the last
        used completely (§5.1.6.4.1), the header in the first.  A frame whose buffers are
        adjacent in memory is one slice; others are joined."""
        mem = self._mem
        nbufs = p.nbufs
        bs = self.buffer_size
        rx_off = p.rx_off
        frames: list[bytes] = []
        count = len(slots)
        k = 0
        while k < count:
            slot, length = slots[k], lens[k]
            where = f"receiveq{p.index + 1} buffer {slot}"
            if length < NET_HDR_SIZE:
                self._bad_rx(p, frames, f"{where} used.len", length,
                             f">= {NET_HDR_SIZE} (the virtio_net_hdr starts every packet, "
                             "VIRTIO 1.2 §5.1.6.4)")
            nb = nbufs[slot]
            start = rx_off + slot * bs
            if nb == 1:
                frames.append(mem[start + NET_HDR_SIZE : start + length].tobytes())
                k += 1
                continue
            if not 1 <= nb <= count - k:
                self._bad_rx(p, frames, f"{where} num_buffers", nb,
                             f"1..{count - k}, the used buffers there are (a packet's buffers "
                             "are used together, VIRTIO 1.2 §5.1.6.4.1)")
            part = slots[k : k + nb]
            plens = lens[k : k + nb]
            for j in range(nb - 1):
                if plens[j] != bs:
                    self._bad_rx(p, frames, f"receiveq{p.index + 1} buffer {part[j]} used.len",
                                 plens[j], f"{bs}: buffer {j + 1} of a {nb}-buffer packet, "
                                 "used completely (VIRTIO 1.2 §5.1.6.4.1)")
            if not plens[-1]:
                self._bad_rx(p, frames, f"receiveq{p.index + 1} buffer {part[-1]} used.len",
                             0, f">= 1: the last of a {nb}-buffer packet")
            if part[-1] - slot == nb - 1 and part == list(range(slot, slot + nb)):
                # Adjacent buffers, all but the last full: the frame is one run of memory.
                frames.append(mem[start + NET_HDR_SIZE : start + sum(plens)].tobytes())
            else:
                pieces = [mem[start + NET_HDR_SIZE : start + bs]]
                pieces += [mem[rx_off + s * bs : rx_off + s * bs + n]
                           for s, n in zip(part[1:], plens[1:], strict=True)]
                frames.append(b"".join(pieces))
                for piece in pieces:
                    piece.release()
            k += nb
        return frames

    def _bad_rx(self, p: _Pair, good: list[bytes], field: str, value: int,
                expected: str) -> NoReturn:
        """The device broke ``p``'s receiveq: keep the ``good`` frames before the bad buffer
        for the next receive, break the queue (one failure policy), stop the ring, raise."""
        p.rx_ready.extend(good)
        p.rx_packets += len(good)
        p.rx_bytes += sum(map(len, good))
        err = DeviceProtocolError(field, value, expected)
        p.rxq.mark_broken(err)
        with contextlib.suppress(VirtqError):  # a transport that failed stops nothing
            self.transport.stop_queue(p.rx_index)
        try:
            raise err
        finally:
            del err  # no error -> traceback -> frame -> error cycle (see SplitQueue._fail)

    def _drop_short(self, p: _Pair, slots: list[int], lens: list[int],
                    frames: list[bytes]) -> NoReturn:
        """The device wrote less than a header into some buffer (every received packet
        starts with one, §5.1.6.4) without MRG_RXBUF: keep the good frames (each buffer is a
        frame of its own, so those after the bad one too), break the receiveq, raise.
        num_buffers is not checked: without MRG_RXBUF DPDK leaves it as the buffer had
        it."""
        good = [f for f, length in zip(frames, lens, strict=True) if length >= NET_HDR_SIZE]
        slot, length = next((s, n) for s, n in zip(slots, lens, strict=True)
                            if n < NET_HDR_SIZE)
        self._bad_rx(p, good, f"receiveq used.len of buffer {slot}", length,
                     f">= {NET_HDR_SIZE} (the virtio_net_hdr precedes every frame)")

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
        for p in self._pairs:
            p.release()
        control = self._control
        if isinstance(control, _ControlQueue):
            control.queue.close()
        mem = getattr(self, "_mem", None)
        if mem is not None:
            mem.release()

    def close(self) -> None:
        """Close the transport (and with it the queues and memory); frames not yet
        received are dropped (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for p in self._pairs:
            p.rx_ready.clear()
        self._release_views()
        self.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = ("closed" if self._closed else
                 f"queue_size={self.queue_size} pairs={self.active_pairs}/{self.queue_pairs}")
        return (f"<NetDevice {state} tx={self.tx_packets} rx={self.rx_packets} "
                f"mrg_rxbuf={getattr(self, 'mrg_rxbuf', None)} poll={self.poll_mode}>")


def build_frame(dst: bytes, src: bytes, ethertype: int, payload: bytes | Iterable[int]) -> bytes:
    """An Ethernet II frame (no FCS): 6-byte destination and source, big-endian type.  Raises
    :class:`ArgumentError` unless both MAC addresses are 6 bytes."""
    if len(dst) != 6 or len(src) != 6:
        raise ArgumentError("mac", (dst, src), "MAC addresses are 6 bytes")
    return bytes(dst) + bytes(src) + ethertype.to_bytes(2, "big") + bytes(payload)
