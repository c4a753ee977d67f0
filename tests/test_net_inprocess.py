"""NetDevice against an in-process device (DeviceQueue, or PackedDeviceQueue on a packed
ring, per queue) that a test drives step by step: what the device sees on the transmitq,
what the driver delivers from the receiveq, and what happens when the device completes out
of order or misbehaves.  Every test runs over both ring formats.  The same paths run
against real dpdk-testpmd in test_vhost_user_net.py; here each step is deterministic."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from virtq.abi import VIRTIO_F_EVENT_IDX, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
from virtq.abi.net import NET_HDR_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_MAC
from virtq.devices.net import NetDevice, NetTimeoutError, build_frame
from virtq.errors import ArgumentError, DeviceProtocolError, QueueStateError
from virtq.testing import DeviceQueue, PackedDeviceQueue, PackedHostileDevice
from virtq.testing.loopback import LoopbackTransport

MAC = bytes.fromhex("020000abcdef")
SIZE = 16


def frame(i: int, size: int = 60) -> bytes:
    return build_frame(b"\xff" * 6, MAC, 0x0800, bytes([i % 256]) * (size - 14))


@pytest.fixture(params=["split", "packed"])
def net(request: pytest.FixtureRequest,
        no_leaks: None) -> Iterator[tuple[NetDevice, LoopbackTransport]]:
    """A NetDevice over a loopback transport offering the ring format of the param; every
    fd and mapping released afterwards."""
    packed = request.param == "packed"
    t = LoopbackTransport(
        features=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_NET_F_MAC
        | (1 << VIRTIO_F_RING_PACKED if packed else 0),
        queue_sizes=[SIZE, SIZE], config=MAC)
    dev = NetDevice(t, queue_size=SIZE)
    try:
        assert dev.ring == request.param
        yield dev, t
    finally:
        dev.close()


def take_tx(t: LoopbackTransport) -> list[tuple[int, bytes]]:
    """Pop every published transmit chain: (head, header + frame as the device reads it)."""
    d = t.devices[TX_QUEUE]
    out = []
    while (chain := d.pop()) is not None:
        head, segs = chain
        assert len(segs) == 1 and not segs[0].writable
        out.append((head, d.read(segs[0].iova, segs[0].length)))
    return out


def deliver(d: DeviceQueue | PackedDeviceQueue, frames: list[bytes], *,
            order: list[int] | None = None) -> None:
    """Fill receive buffers with ``frames`` (one each), completing them in ``order``."""
    chains = [d.pop() for _ in frames]
    done = []
    for chain, f in zip(chains, frames, strict=True):
        assert chain is not None
        head, segs = chain
        assert segs[0].writable and segs[0].length >= NET_HDR_SIZE + 1514
        d.write(segs[0].iova, bytes(NET_HDR_SIZE) + f)
        done.append((head, NET_HDR_SIZE + len(f)))
    for i in order or range(len(done)):
        d.push(*done[i], publish=False)
    d.publish_used()


def test_transmit_what_the_device_reads(net: tuple[NetDevice, LoopbackTransport]) -> None:
    dev, t = net
    assert dev.mac == MAC
    frames = [frame(i, 60 + i) for i in range(5)]
    assert dev.send_batch(frames) == 5
    got = take_tx(t)
    assert [data for _, data in got] == [bytes(NET_HDR_SIZE) + f for f in frames]
    assert dev.tx_in_flight == 5 and dev.tx_packets == 5
    for head, _ in got:
        t.devices[TX_QUEUE].push(head, 0)
    assert dev.reclaim() == 5
    assert dev.tx_in_flight == 0


def test_transmit_wraps_the_ring_with_out_of_order_completions(
        net: tuple[NetDevice, LoopbackTransport]) -> None:
    """More frames than the ring holds, completed in reverse order per round: every frame
    reaches the device intact and in order, across the ring's end and slot reuse."""
    dev, t = net
    d = t.devices[TX_QUEUE]
    seen: list[bytes] = []
    sent = 0
    for rnd in range(7):
        batch = [frame(sent + i, 14 + (sent + i) % 1500) for i in range(SIZE - 3)]
        dev.send_batch(batch, timeout=1)
        sent += len(batch)
        got = take_tx(t)
        seen += [data[NET_HDR_SIZE:] for _, data in got]
        for head, _ in reversed(got) if rnd % 2 else got:
            d.push(head, 0)
    assert seen == [frame(i, 14 + i % 1500) for i in range(sent)]
    assert dev.reclaim() == SIZE - 3
    assert dev.tx_in_flight == 0


def test_transmit_waits_for_the_oldest_slot(net: tuple[NetDevice, LoopbackTransport]) -> None:
    """Slots are reused first in, first out: with the oldest frame still held by the
    device, a full ring does not take the slots completed after it."""
    dev, t = net
    d = t.devices[TX_QUEUE]
    dev.send_batch([frame(i) for i in range(SIZE)])
    got = take_tx(t)
    for head, _ in got[1:]:
        d.push(head, 0)
    with pytest.raises(NetTimeoutError) as info:
        dev.send_batch([frame(99)], timeout=0.05)
    assert info.value.sent == 0
    assert dev.tx_in_flight == 1  # the completions were reaped; only the oldest is out
    d.push(got[0][0], 0)
    assert dev.send_batch([frame(100)], timeout=1) == 1
    assert take_tx(t)[0][1][NET_HDR_SIZE:] == frame(100)


def test_transmit_timeout_reports_what_was_queued(
        net: tuple[NetDevice, LoopbackTransport]) -> None:
    dev, _ = net
    start = time.monotonic()
    with pytest.raises(NetTimeoutError) as info:
        dev.send_batch([frame(i) for i in range(SIZE + 4)], timeout=0.1)
    assert info.value.sent == SIZE
    assert time.monotonic() - start < 2


def test_bad_frames_queue_nothing(net: tuple[NetDevice, LoopbackTransport]) -> None:
    dev, t = net
    for bad in ([frame(1), b"short"], [frame(1), bytes(dev.max_frame + 1)]):
        with pytest.raises(ArgumentError):
            dev.send_batch(bad)
    assert dev.tx_in_flight == 0 and take_tx(t) == []
    assert dev.send_batch([]) == 0
    assert dev.send_batch(iter([frame(2)])) == 1


def test_receive_in_used_order_and_repost(net: tuple[NetDevice, LoopbackTransport]) -> None:
    dev, t = net
    d = t.devices[RX_QUEUE]
    assert d.avail_pending() == SIZE  # the whole ring was posted before DRIVER_OK
    sent = [frame(i, 60 + i) for i in range(SIZE)]
    deliver(d, sent[:6], order=[2, 0, 1, 3, 5, 4])
    got = dev.recv_batch(64)
    assert got == [sent[i] for i in (2, 0, 1, 3, 5, 4)]
    # All six are back in the ring (the out-of-order run completed before the reap).
    assert d.avail_pending() == SIZE
    deliver(d, sent[6:])
    assert dev.recv_batch(64) == sent[6:]
    # The ring's end: three more rounds through reposted buffers.
    for rnd in range(3):
        batch = [frame(100 + rnd * SIZE + i) for i in range(SIZE)]
        deliver(d, batch)
        assert dev.recv_batch(SIZE) == batch
    assert dev.rx_packets == SIZE * 4


def test_receive_holds_reuse_behind_an_older_buffer(
        net: tuple[NetDevice, LoopbackTransport]) -> None:
    """A buffer completed while an older one is still with the device is delivered at once
    but re-posted only once the older one is done (first in, first out)."""
    dev, t = net
    d = t.devices[RX_QUEUE]
    chains = [d.pop() for _ in range(3)]
    for chain, i in zip(chains, range(3), strict=True):
        assert chain is not None
        d.write(chain[1][0].iova, bytes(NET_HDR_SIZE) + frame(i))
    d.push(chains[1][0], NET_HDR_SIZE + 60)
    d.push(chains[2][0], NET_HDR_SIZE + 60)
    assert dev.recv(timeout=0) == frame(1)
    assert dev.recv(timeout=0) == frame(2)
    assert d.avail_pending() == SIZE - 3  # nothing re-posted: buffer 0 is still out
    d.push(chains[0][0], NET_HDR_SIZE + 60)
    assert dev.recv(timeout=0) == frame(0)
    assert d.avail_pending() == SIZE  # all three re-posted at once


def test_receive_timeout_and_short_buffer(net: tuple[NetDevice, LoopbackTransport]) -> None:
    dev, t = net
    d = t.devices[RX_QUEUE]
    assert dev.recv(timeout=0.02) is None
    chains = [d.pop() for _ in range(3)]
    for chain in chains:
        assert chain is not None
        d.write(chain[1][0].iova, bytes(NET_HDR_SIZE) + frame(chain[0]))
    d.push(chains[0][0], NET_HDR_SIZE + 60)
    d.push(chains[1][0], 5)  # less than a header
    d.push(chains[2][0], NET_HDR_SIZE + 60)
    with pytest.raises(DeviceProtocolError, match=r"used\.len of buffer 1"):
        dev.recv(timeout=0)
    # The good frames around the bad one are kept for the next receive.
    assert dev.recv_batch(8) == [frame(0), frame(2)]


def test_device_naming_a_buffer_it_was_not_given(
        net: tuple[NetDevice, LoopbackTransport]) -> None:
    dev, t = net
    d = t.devices[TX_QUEUE]
    dev.send_batch([frame(1)])
    if isinstance(d, PackedDeviceQueue):  # the device side refuses to lie: write it raw
        hostile = PackedHostileDevice(dev.txq.region, dev.txq.layout)  # type: ignore[union-attr]
        hostile.complete(5, 0)
        hostile.close()
        where = r"desc\[0\]\.id"
    else:
        d.push(5, 0)  # slot 5 was never made available
        where = r"used\.ring\[0\]\.id"
    with pytest.raises(DeviceProtocolError, match=where):
        dev.send_batch([frame(2)])
    dev.close()
    with pytest.raises(QueueStateError):
        dev.send(frame(3))
