"""NetDevice's queue pairs, controlq and MRG_RXBUF receive against an in-process device that
the test plays step by step (LoopbackTransport, one DeviceQueue per queue): what the device
sees on the controlq, what the driver does with its answers, and every way a device can get
num_buffers wrong.  The same paths run against dpdk-testpmd in test_vhost_user_net_mq.py.

Every test runs over both ring formats (the loopback's device side is a DeviceQueue or a
PackedDeviceQueue).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtq.abi import VIRTIO_F_EVENT_IDX, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
from virtq.abi.net import (
    NET_HDR_SIZE,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_OK,
)
from virtq.devices import net as net_module
from virtq.devices.net import NetControlError, NetDevice, build_frame
from virtq.errors import (
    ArgumentError,
    DeviceProtocolError,
    QueueBrokenError,
    VirtqError,
    VirtqTimeoutError,
)
from virtq.testing import DeviceQueue, PackedDeviceQueue
from virtq.testing.loopback import LoopbackTransport
from virtq.transport import DeviceRefusedError, TransportError

from .conftest import named_resource_counts

MAC = bytes.fromhex("020000abcdef")
SIZE = 16
BASE = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_NET_F_MAC
MQ = 1 << VIRTIO_NET_F_MQ | 1 << VIRTIO_NET_F_CTRL_VQ
MRG = 1 << VIRTIO_NET_F_MRG_RXBUF

#: Every test runs over both ring formats.
pytestmark = pytest.mark.parametrize("fmt", ["split", "packed"])
Device = DeviceQueue | PackedDeviceQueue

#: (ack byte, used.len) the controlq answers, or None: no answer at all.
Answer = Callable[[int, int, bytes], tuple[int, int] | None]


def frame(i: int, size: int = 60) -> bytes:
    body = bytes((i * 7 + k) & 0xFF for k in range(size - 14))
    return build_frame(b"\xff" * 6, MAC, 0x88B5, body)


def config(max_pairs: int) -> bytes:
    """struct virtio_net_config: mac, status, max_virtqueue_pairs (§5.1.4)."""
    return MAC + struct.pack("<HH", 1, max_pairs)


class NetLoopback(LoopbackTransport):
    """A loopback virtio-net device whose controlq answers at once, inside notify(): what
    a device does when kicked, without a thread.  ``commands`` records (class, command,
    data, descriptor lengths) of each command in order."""

    def __init__(self, fmt: str, *, max_pairs: int = 1, features: int = BASE,
                 answer: Answer | None = None, raw_config: bytes | None = None) -> None:
        if fmt == "packed":
            features |= 1 << VIRTIO_F_RING_PACKED
        super().__init__(features=features, queue_sizes=[SIZE] * (2 * max_pairs + 1),
                         config=config(max_pairs) if raw_config is None else raw_config)
        self.ctrl = 2 * max_pairs
        self.commands: list[tuple[int, int, bytes, list[int]]] = []
        self.answer: Answer = answer or (lambda cls, cmd, data: (VIRTIO_NET_OK, 1))

    def read_config(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.config):
            raise TransportError(f"config bytes {offset}..{offset + size} do not exist")
        return super().read_config(offset, size)

    def notify(self, index: int) -> None:
        super().notify(index)
        if index == self.ctrl:
            self.serve_control()

    def serve_control(self) -> None:
        d = self.devices[self.ctrl]
        while (chain := d.pop()) is not None:
            head, segs = chain
            readable = b"".join(d.read(s.iova, s.length) for s in segs if not s.writable)
            acks = [s for s in segs if s.writable]
            assert len(acks) == 1 and acks[0].length == 1  # struct virtio_net_ctrl: u8 ack
            self.commands.append((readable[0], readable[1], readable[2:],
                                  [s.length for s in segs]))
            reply = self.answer(readable[0], readable[1], readable[2:])
            if reply is None:
                continue
            d.write(acks[0].iova, bytes([reply[0]]))
            d.push(head, reply[1])
        d.enable_notifications()  # event idx: kick me at the next command too


@pytest.fixture
def leak_check() -> Iterator[None]:
    before = named_resource_counts()
    yield
    assert named_resource_counts() == before


def take_tx(d: Device) -> list[bytes]:
    """Every published transmit chain's frame (header stripped), completed."""
    out = []
    while (chain := d.pop()) is not None:
        head, segs = chain
        assert len(segs) == 1 and not segs[0].writable
        data = d.read(segs[0].iova, segs[0].length)
        assert data[:NET_HDR_SIZE] == bytes(NET_HDR_SIZE)  # §5.1.6.2: no offloads, zeros
        out.append(data[NET_HDR_SIZE:])
        d.push(head, 0)
    return out


def header(num_buffers: int) -> bytes:
    return bytes(NET_HDR_SIZE - 2) + num_buffers.to_bytes(2, "little")


def deliver(d: Device, frames: list[bytes], *, order: list[int] | None = None,
            rng: random.Random | None = None) -> int:
    """Receive ``frames`` as a MRG_RXBUF device would: each into as many available buffers
    as it needs (header first, every buffer but the last filled), num_buffers set, each
    frame's buffers used together; frames completed in ``order``.  With ``rng`` the popped
    buffers are handed to frames in a shuffled order (any buffer may go to any frame).
    Returns the buffers used."""
    chains = []
    need = []
    for f in frames:
        total = NET_HDR_SIZE + len(f)
        n = 0
        while total > 0:
            chain = d.pop()
            assert chain is not None, "the driver posted too few buffers"
            chains.append(chain)
            total -= chain[1][0].length
            n += 1
        need.append(n)
    if rng is not None:
        rng.shuffle(chains)
    groups = []
    at = 0
    for f, n in zip(frames, need, strict=True):
        mine = chains[at : at + n]
        at += n
        data = header(n) + f
        used = []
        for head, segs in mine:
            piece = data[: segs[0].length]
            data = data[segs[0].length :]
            d.write(segs[0].iova, piece)
            used.append((head, len(piece)))
        groups.append(used)
    for i in order or range(len(groups)):
        for head, length in groups[i]:
            d.push(head, length, publish=False)
    d.publish_used()
    return len(chains)


# -- queue pairs and the controlq ---------------------------------------------------------


def test_pairs_are_set_up_and_enabled_through_the_controlq(fmt: str,
                                                           leak_check: None) -> None:
    t = NetLoopback(fmt, max_pairs=4, features=BASE | MQ)
    with NetDevice(t, queue_size=SIZE, queue_pairs=3) as dev:
        assert dev.control == "controlq" and dev.max_queue_pairs == 4
        assert (dev.queue_pairs, dev.active_pairs) == (3, 3)
        # receiveqN = 2(N-1), transmitqN = 2(N-1)+1, controlq = 2 * max_virtqueue_pairs,
        # even though only 3 of the 4 pairs are set up (§5.1.2).
        assert sorted(t.queues) == [0, 1, 2, 3, 4, 5, 8]
        # One VQ_PAIRS_SET, header / data / ack in descriptors of their own (§5.1.6.5).
        assert t.commands == [(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                               (3).to_bytes(2, "little"), [2, 2, 1])]
        # Every receiveq was filled before DRIVER_OK.
        assert all(t.devices[2 * k].avail_pending() == SIZE for k in range(3))
        for k in range(3):
            dev.send_batch([frame(100 * k + i) for i in range(k + 2)], pair=k)
        for k in range(3):
            assert take_tx(t.devices[2 * k + 1]) == [frame(100 * k + i) for i in range(k + 2)]
            deliver(t.devices[2 * k], [frame(50 + k)])
        assert dev.recv_batch(8, pair=2) == [frame(52)]
        assert dev.recv_any(8) == [(0, frame(50)), (1, frame(51))]
        stats = dev.pair_stats()
        assert [(s.pair, s.active, s.tx_packets, s.rx_packets) for s in stats] == [
            (0, True, 2, 1), (1, True, 3, 1), (2, True, 4, 1)]
        assert dev.tx_packets == 9 and dev.rx_packets == 3
        with pytest.raises(ArgumentError, match="pair"):
            dev.send(frame(1), pair=3)  # not set up
        with pytest.raises(ArgumentError, match="pair"):
            dev.recv(timeout=0, pair=-1)


def test_set_queue_pairs_at_run_time(fmt: str, leak_check: None) -> None:
    answers = {3: VIRTIO_NET_ERR}
    t = NetLoopback(fmt, max_pairs=4, features=BASE | MQ,
                    answer=lambda c, m, data: (answers.get(data[0], VIRTIO_NET_OK), 1))
    with NetDevice(t, queue_size=SIZE, queue_pairs=4) as dev:
        dev.set_queue_pairs(2)
        assert dev.active_pairs == 2
        assert t.commands[-1][2] == (2).to_bytes(2, "little")
        with pytest.raises(ArgumentError, match="send on"):
            dev.send(frame(1), pair=2)  # §5.1.6.5.6: not past virtqueue_pairs
        deliver(t.devices[6], [frame(7)])  # received before the switch: still readable
        assert dev.recv(timeout=0, pair=3) == frame(7)
        with pytest.raises(NetControlError) as info:  # the device refuses 3
            dev.set_queue_pairs(3)
        assert (info.value.command_class, info.value.command, info.value.ack) == (
            VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR)
        assert dev.active_pairs == 2 and [s.active for s in dev.pair_stats()] == [
            True, True, False, False]
        dev.set_queue_pairs(4)
        dev.send(frame(9), pair=3)
        assert take_tx(t.devices[7]) == [frame(9)]
        for bad in (0, 5, True, "2"):
            with pytest.raises(ArgumentError):
                dev.set_queue_pairs(bad)  # type: ignore[arg-type]
        assert len(t.commands) == 4  # nothing was sent for the bad counts


@pytest.mark.parametrize(("answer", "error", "match"), [
    (lambda c, m, d: (VIRTIO_NET_ERR, 1), NetControlError, "VIRTIO_NET_ERR"),
    (lambda c, m, d: (0x7F, 1), NetControlError, "0x7f"),
    (lambda c, m, d: (VIRTIO_NET_OK, 0), DeviceProtocolError, r"used\.len"),
    (lambda c, m, d: (VIRTIO_NET_OK, 2), DeviceProtocolError, r"len"),  # over the 1 byte
    (lambda c, m, d: None, VirtqTimeoutError, "no answer"),
], ids=["err", "odd-ack", "used-len-0", "used-len-2", "silent"])
def test_a_bad_controlq_answer_fails_construction(
        fmt: str, answer: Answer, error: type[VirtqError], match: str, leak_check: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(net_module, "CONTROL_TIMEOUT", 0.05)
    t = NetLoopback(fmt, max_pairs=2, features=BASE | MQ, answer=answer)
    with pytest.raises(error, match=match):
        NetDevice(t, queue_size=SIZE, queue_pairs=2)
    assert t.closed  # everything released (leak_check)


@pytest.mark.parametrize(("features", "raw", "pairs", "error", "match"), [
    (BASE, None, 2, DeviceRefusedError, "VIRTIO_NET_F_MQ"),
    (BASE | 1 << VIRTIO_NET_F_MQ, None, 2, DeviceRefusedError, "CTRL_VQ"),
    (BASE | MQ, None, 3, DeviceRefusedError, "max_virtqueue_pairs 2"),
    (BASE | MQ, MAC + struct.pack("<HH", 1, 0), 2, DeviceProtocolError, "max_virtqueue"),
    (BASE | MQ, MAC + struct.pack("<HH", 1, 0x8001), 2, DeviceProtocolError, "max_virtq"),
    (BASE | MQ, MAC, 2, DeviceRefusedError, "cannot read max_virtqueue_pairs"),
    (BASE | MQ, None, 0, ArgumentError, "queue_pairs"),
], ids=["no-mq", "no-ctrl-vq", "too-many", "max-0", "max-over", "no-config", "zero"])
def test_what_the_device_lacks_is_refused(fmt: str, features: int, raw: bytes | None,
                                         pairs: int, error: type[VirtqError], match: str,
                                         leak_check: None) -> None:
    t = NetLoopback(fmt, max_pairs=2, features=features, raw_config=raw)
    with pytest.raises(error, match=match):
        NetDevice(t, queue_size=SIZE, queue_pairs=pairs)
    assert t.closed


def test_one_pair_negotiates_neither_mq_nor_ctrl_vq(fmt: str, leak_check: None) -> None:
    t = NetLoopback(fmt, max_pairs=2, features=BASE | MQ | MRG)
    with NetDevice(t, queue_size=SIZE) as dev:
        assert not dev.features & MQ and dev.control is None and t.commands == []
        assert sorted(t.queues) == [0, 1]
        dev.set_queue_pairs(1)  # nothing to switch
        with pytest.raises(ArgumentError):
            dev.set_queue_pairs(2)


# -- MRG_RXBUF ----------------------------------------------------------------------------


def mrg_device(fmt: str, buffer_size: int = 256,
               pairs: int = 1) -> tuple[NetDevice, NetLoopback]:
    features = BASE | MRG | (MQ if pairs > 1 else 0)
    t = NetLoopback(fmt, max_pairs=max(pairs, 1), features=features)
    dev = NetDevice(t, queue_size=SIZE, buffer_size=buffer_size, queue_pairs=pairs)
    assert dev.mrg_rxbuf and dev.ring == fmt
    return dev, t


def test_frames_over_several_buffers_are_reassembled(fmt: str, leak_check: None) -> None:
    dev, t = mrg_device(fmt, buffer_size=256)
    d = t.devices[0]
    with dev:
        assert dev.max_frame == 1514  # max(buffer_size - 12, 1514): transmit stays Ethernet
        # 244 bytes fit one buffer with the header, 245 need two, 1514 six, 500 two.
        frames = [frame(1, 244), frame(2, 245), frame(3, 1514), frame(4, 14), frame(5, 500)]
        used = deliver(d, frames)
        assert used == 1 + 2 + 6 + 1 + 2
        assert dev.recv_batch(16) == frames
        s = dev.pair_stats()[0]
        assert (s.rx_packets, s.rx_buffers, s.rx_bytes) == (5, used, sum(map(len, frames)))
        # Every buffer was re-posted.  After three more one-buffer frames the next frame
        # takes slots 15, 0, 1, 2: not adjacent in memory, so it is joined.
        assert d.avail_pending() == SIZE
        wrap = frame(6, 3 * 244 + 200)
        deliver(d, [frame(7, 200), frame(8, 200), frame(9, 200)])
        assert dev.recv_batch(4) == [frame(7, 200), frame(8, 200), frame(9, 200)]
        assert deliver(d, [wrap]) == 4
        assert dev.recv(timeout=0) == wrap
        # Frames completed in another order than their buffers were taken.
        batch = [frame(10 + i, 100 + 150 * i) for i in range(4)]
        deliver(d, batch, order=[2, 0, 3, 1])
        assert dev.recv_batch(16) == [batch[i] for i in (2, 0, 3, 1)]


@given(sizes=st.lists(st.integers(14, 1514), min_size=1, max_size=12),
       buffer_size=st.sampled_from([12, 14, 64, 100, 256, 1526, 2048]),
       seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 3))
def test_any_spread_of_frames_over_buffers_is_byte_exact(fmt: str, sizes: list[int],
                                                         buffer_size: int, seed: int,
                                                         rounds: int) -> None:
    """Frames spread over buffers however a device likes -- any buffer to any frame, frames
    completed in any order, across the ring's end -- come out byte-exact, each once."""
    rng = random.Random(seed)
    before = named_resource_counts()
    dev, t = mrg_device(fmt, buffer_size=buffer_size)
    d = t.devices[0]
    with dev:
        serial = 0
        for _ in range(rounds):
            batch, room = [], SIZE
            for n in sizes:
                need = -(-(NET_HDR_SIZE + n) // buffer_size)
                if need > room:
                    break
                room -= need
                batch.append(frame(serial, n))
                serial += 1
            if not batch:
                continue
            order = list(range(len(batch)))
            rng.shuffle(order)
            used = deliver(d, batch, order=order, rng=rng)
            got = dev.recv_batch(64)
            assert got == [batch[i] for i in order]
            assert dev.pair_stats()[0].rx_buffers >= used
            assert d.avail_pending() == SIZE  # every buffer is back with the device
    assert named_resource_counts() == before


#: How a device can get one multi-buffer frame wrong; each breaks the receiveq.  The
#: callable writes into the popped chains and pushes; "field" is what the error names.
BAD_FRAMES = {
    "num_buffers-0": ("num_buffers", 0),
    "num_buffers-past-used": ("num_buffers", 3),
    "first-not-full": ("used.len", 127),
    "last-empty": ("used.len", 0),
    "no-header": ("used.len", 5),
}


def push_bad(d: Device, kind: str, bs: int) -> None:
    a, b = d.pop(), d.pop()
    assert a is not None and b is not None
    if kind == "no-header":
        d.write(a[1][0].iova, header(1)[:5])
        d.push(a[0], 5)
        return
    nb = {"num_buffers-0": 0, "num_buffers-past-used": 3}.get(kind, 2)
    d.write(a[1][0].iova, header(nb) + bytes(bs - NET_HDR_SIZE))
    d.write(b[1][0].iova, bytes(bs))
    d.push(a[0], bs - 1 if kind == "first-not-full" else bs, publish=False)
    d.push(b[0], 0 if kind == "last-empty" else 10, publish=False)
    d.publish_used()  # two used buffers, whatever num_buffers claims


@pytest.mark.parametrize("kind", list(BAD_FRAMES))
def test_bad_num_buffers_breaks_only_that_receiveq(fmt: str, kind: str, leak_check: None) -> None:
    field, value = BAD_FRAMES[kind]
    dev, t = mrg_device(fmt, buffer_size=128, pairs=2)  # 127: one byte short of a full buffer
    with dev:
        good = [frame(1, 300), frame(2, 60)]
        deliver(t.devices[0], good)
        push_bad(t.devices[0], kind, 128)
        deliver(t.devices[2], [frame(3, 400)])  # the other pair's receiveq
        with pytest.raises(DeviceProtocolError) as info:
            dev.recv_batch(16)
        assert info.value.field.endswith(field) and info.value.value == value
        assert "receiveq1" in info.value.field
        # The frames validated before the bad buffer are delivered, then the queue says
        # why it is broken; the ring was stopped (one failure policy).
        assert dev.recv_batch(16) == good
        with pytest.raises(QueueBrokenError) as broken:
            dev.recv(timeout=0)
        assert broken.value.__cause__ is info.value
        assert t.stopped == {0}
        # recv_any leaves the broken pair out; the other pair and transmitting still work.
        assert dev.recv_any(16, timeout=0) == [(1, frame(3, 400))]
        dev.send(frame(4), pair=0)
        assert take_tx(t.devices[1]) == [frame(4)]


def test_without_mrg_rxbuf_num_buffers_is_not_looked_at(fmt: str, leak_check: None) -> None:
    """DPDK leaves num_buffers as the buffer had it when MRG_RXBUF is off (it writes the
    field only for mergeable buffers): garbage there is not an error then."""
    t = NetLoopback(fmt, features=BASE | MRG)
    with NetDevice(t, queue_size=SIZE, mrg_rxbuf=False) as dev:
        assert not dev.mrg_rxbuf and not dev.features & MRG and dev.buffer_size == 2048
        d = t.devices[0]
        head, segs = d.pop()  # type: ignore[misc]
        d.write(segs[0].iova, header(0) + frame(1))
        d.push(head, NET_HDR_SIZE + 60)
        assert dev.recv(timeout=0) == frame(1)
    t = NetLoopback(fmt, features=BASE)
    with pytest.raises(DeviceRefusedError, match="MRG_RXBUF"):
        NetDevice(t, queue_size=SIZE, mrg_rxbuf=True)
    t = NetLoopback(fmt, features=BASE)
    with pytest.raises(ArgumentError, match="1526"):  # small buffers need MRG_RXBUF
        NetDevice(t, queue_size=SIZE, buffer_size=512)


def test_frames_larger_than_a_receive_buffer_go_out_in_one_buffer(
        fmt: str, leak_check: None) -> None:
    t = NetLoopback(fmt, features=BASE | MRG)
    with NetDevice(t, queue_size=SIZE, max_frame=9000) as dev:
        assert (dev.buffer_size, dev.max_frame) == (2048, 9000)
        big = [frame(i, n) for i, n in enumerate((9000, 2037, 14, 4096))]
        dev.send_batch(big)
        assert take_tx(t.devices[1]) == big
        with pytest.raises(ArgumentError, match="max_frame"):
            dev.send(frame(0, 9001))
        # ...and come back in several receive buffers.
        used = deliver(t.devices[0], big)
        assert used == 5 + 2 + 1 + 3
        assert dev.recv_batch(8) == big
