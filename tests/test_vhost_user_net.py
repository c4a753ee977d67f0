"""NetDevice against a real vhost-user-net back-end: dpdk-testpmd (Debian ``dpdk-dev``).

Never skipped: without dpdk-testpmd the fixture fails with the package to install
(``scripts/install-system-deps.sh`` installs it).  One back-end serves the module; each
test switches its forwarding mode (``rxonly`` counts what we send, ``io`` with one port
sends every frame back) and waits for the link to go down again after disconnecting, so
the next connection starts clean.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from virtq.abi.net import MIN_RX_BUFFER, NET_HDR_SIZE, TX_QUEUE
from virtq.devices import NetDevice, NetTimeoutError
from virtq.devices.net import build_frame
from virtq.errors import ArgumentError, LayoutError, QueueStateError, VirtqError
from virtq.testing.runners import BackendError
from virtq.testing.testpmd import TestPmd
from virtq.transport.vhost_user import (
    VhostUserConnectError,
    VhostUserDisconnectedError,
    VhostUserTransport,
)
from virtq.transport.vhost_user.protocol import ProtocolFeature

SRC = bytes.fromhex("020000000001")
DST = bytes.fromhex("020000000002")


def frame(i: int, size: int) -> bytes:
    """A distinct frame of exactly ``size`` (>= 14) bytes: Ethernet header, then a
    sequence number and a pattern derived from it."""
    payload = i.to_bytes(4, "little") + bytes((i + k) & 0xFF for k in range(size))
    # 0x88B5: the IEEE "local experimental" ethertype.
    return build_frame(DST, SRC, 0x88B5, payload[: size - 14])


@pytest.fixture(scope="module")
def backend(virtq_testpmd: TestPmd) -> TestPmd:
    return virtq_testpmd  # the public fixture from virtq.testing.pytest_plugin


@contextmanager
def connected(tp: TestPmd, mode: str, **options: Any) -> Iterator[NetDevice]:
    tp.set_forward_mode(mode)
    tp.clear_stats()
    tp.start_forwarding()
    dev = NetDevice.connect_vhost_user(tp.socket_path, **options)
    try:
        tp.wait_link(True)  # DRIVER_OK reached the back-end (SET_STATUS)
        yield dev
    finally:
        dev.close()
        tp.wait_link(False)


def drain_tx(dev: NetDevice) -> None:
    deadline = time.monotonic() + 5
    while dev.tx_in_flight and time.monotonic() < deadline:
        dev.reclaim()
        time.sleep(0.001)
    assert dev.tx_in_flight == 0


#: The ring formats testpmd's net_vhost offers (split and packed, with IN_ORDER): each is
#: driven for real.
RINGS = [pytest.param(("split", False), id="split"),
         pytest.param(("split", True), id="split-in-order"),
         pytest.param(("packed", True), id="packed-in-order"),
         pytest.param(("packed", False), id="packed")]


def check_ring(dev: NetDevice, ring: tuple[str, bool | None]) -> None:
    fmt, in_order = ring
    assert dev.ring == fmt
    assert dev.in_order == bool(in_order)
    assert bool(dev.features >> 34 & 1) == (fmt == "packed")  # VIRTIO_F_RING_PACKED
    assert bool(dev.features >> 35 & 1) == bool(in_order)  # VIRTIO_F_IN_ORDER


def check_tx_base(dev: NetDevice) -> None:
    """After every frame went out, the back-end's GET_VRING_BASE of the transmitq is where
    the driver's next descriptor goes: the avail index (split), or the position with the
    driver wrap counter in bit 15 (packed, vhost-user.rst)."""
    drain_tx(dev)
    assert dev.transport.get_vring_base(TX_QUEUE) & 0xFFFF == dev.txq.vring_base & 0xFFFF


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("poll", [False, True], ids=["notify", "poll"])
@pytest.mark.usefixtures("no_leaks")
def test_frames_sent_are_counted_exactly(backend: TestPmd, poll: bool,
                                         ring: tuple[str, bool | None]) -> None:
    rng = random.Random(5)
    frames = [frame(i, rng.randrange(60, 1515)) for i in range(3000)]
    with connected(backend, "rxonly", poll=poll, queue_size=128, ring=ring[0],
                   in_order=ring[1]) as dev:
        assert dev.features >> 32 & 1  # VERSION_1
        check_ring(dev, ring)
        for f in frames[:500]:
            dev.send(f, timeout=5)
        # Batches larger than the ring wait for the device to complete earlier frames.
        for k in range(500, 3000, 700):
            assert dev.send_batch(frames[k : k + 700], timeout=5) == len(frames[k : k + 700])
        stats = backend.wait_rx_packets(len(frames))
        assert stats.rx_packets == len(frames)
        # testpmd counts frame bytes without the virtio_net_hdr we prepended.
        assert stats.rx_bytes == sum(map(len, frames))
        assert (dev.tx_packets, dev.tx_bytes) == (len(frames), stats.rx_bytes)
        drain_tx(dev)
        time.sleep(0.1)
        assert backend.port_stats().rx_packets == len(frames)  # nothing sent twice
        check_tx_base(dev)


@pytest.mark.usefixtures("no_leaks")
def test_packed_in_order_transmit_is_retired_in_batches(backend: TestPmd) -> None:
    """DPDK's vhost retires transmitted packed descriptors four at a time under IN_ORDER
    (one used descriptor naming the last id, VIRTIO 1.2 §2.8.8): the batched path of
    PackedSlotQueue really runs against it, and every frame is still counted once."""
    rng = random.Random(9)
    frames = [frame(i, rng.randrange(60, 200)) for i in range(2000)]
    batches: list[int] = []
    with connected(backend, "rxonly", poll=True, queue_size=256, ring="packed",
                   in_order=True) as dev:
        check_ring(dev, ("packed", True))
        txq = dev.txq
        retire = txq._retire_slots  # type: ignore[union-attr]

        def counting(seq: int, at: int, *rest: Any) -> int:
            batches.append(at - txq._front + 1)  # type: ignore[union-attr]
            return retire(seq, at, *rest)

        txq._retire_slots = counting  # type: ignore[union-attr]
        for k in range(0, len(frames), 100):
            dev.send_batch(frames[k : k + 100], timeout=5)
        assert backend.wait_rx_packets(len(frames)).rx_packets == len(frames)
        check_tx_base(dev)
        assert dev.tx_packets == len(frames)
    assert batches and max(batches) > 1, "DPDK never retired a batch with one descriptor"


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize(("poll", "event_idx"), [(False, True), (True, True), (False, False)],
                         ids=["notify", "poll", "notify-no-event-idx"])
@pytest.mark.usefixtures("no_leaks")
def test_io_forward_loopback_is_byte_exact(backend: TestPmd, poll: bool, event_idx: bool,
                                           ring: tuple[str, bool | None]) -> None:
    rng = random.Random(7)
    # 14..1514 bytes: the shortest frame, the longest without MRG_RXBUF, and between.
    sizes = [14, 15, 60, 1513, 1514, *(rng.randrange(14, 1515) for _ in range(1995))]
    frames = [frame(i, s) for i, s in enumerate(sizes)]
    got: list[bytes] = []
    with connected(backend, "io", poll=poll, event_idx=event_idx, queue_size=256,
                   ring=ring[0], in_order=ring[1]) as dev:
        assert bool(dev.features >> 29 & 1) == event_idx  # VIRTIO_F_EVENT_IDX
        check_ring(dev, ring)
        # Bursts no larger than the posted receive buffers: io forwarding drops what does
        # not fit the receiveq, and this test is about content, not loss.
        for k in range(0, len(frames), 128):
            burst = frames[k : k + 128]
            dev.send_batch(burst, timeout=5)
            want = len(got) + len(burst)
            deadline = time.monotonic() + 10
            while len(got) < want and time.monotonic() < deadline:
                if k % 256:
                    got.extend(dev.recv_batch(want - len(got), timeout=1))
                else:
                    f = dev.recv(timeout=1)
                    if f is not None:
                        got.append(f)
            assert len(got) == want, f"burst at {k}: {len(got)} of {want} frames came back"
        assert dev.recv(timeout=0.05) is None  # nothing extra
        assert dev.rx_packets == len(frames)
        assert dev.rx_bytes == sum(map(len, frames))
        check_tx_base(dev)
    # One queue, one forwarding lcore: order is kept, so the sequence must match exactly.
    assert got == frames


@pytest.mark.usefixtures("no_leaks")
def test_link_comes_up_only_at_start(backend: TestPmd) -> None:
    """DPDK negotiates the STATUS protocol feature and waits for DRIVER_OK (SET_STATUS) and
    enabled rings before it runs the device: both come from Transport.start()."""
    backend.set_forward_mode("rxonly")
    transport = VhostUserTransport.connect(backend.socket_path)
    assert transport.protocol_features >> ProtocolFeature.STATUS & 1
    assert transport.protocol_features >> ProtocolFeature.REPLY_ACK & 1
    deferred = transport.start
    transport.start = lambda: None  # type: ignore[method-assign]
    dev = NetDevice(transport)
    try:
        time.sleep(0.2)
        assert not backend.link_up()
        deferred()
        backend.wait_link(True)
    finally:
        dev.close()
        backend.wait_link(False)


@pytest.mark.usefixtures("no_leaks")
def test_recv_batch_splits_and_keeps_the_rest(backend: TestPmd) -> None:
    frames = [frame(i, 64) for i in range(100)]
    with connected(backend, "io") as dev:
        dev.send_batch(frames, timeout=5)
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < 100 and time.monotonic() < deadline:
            batch = dev.recv_batch(7, timeout=1)
            assert len(batch) <= 7
            got.extend(batch)
        assert got == frames


@pytest.mark.usefixtures("no_leaks")
def test_recv_times_out_with_none(backend: TestPmd) -> None:
    with connected(backend, "rxonly") as dev:
        t0 = time.monotonic()
        assert dev.recv(timeout=0.2) is None
        assert time.monotonic() - t0 >= 0.15
        assert dev.recv(timeout=0) is None
        assert dev.recv_batch(16) == []


@pytest.mark.usefixtures("no_leaks")
def test_bad_usage(backend: TestPmd) -> None:
    with connected(backend, "rxonly") as dev:
        assert dev.max_frame == 2048 - NET_HDR_SIZE
        with pytest.raises(ArgumentError):
            dev.send(b"\x00" * 13)  # shorter than an Ethernet header
        with pytest.raises(ArgumentError):
            dev.send(bytes(dev.max_frame + 1))
        with pytest.raises(ArgumentError):  # all or nothing: the good frames stay unsent
            dev.send_batch([frame(1, 64), b"short", frame(2, 64)])
        assert (dev.tx_packets, dev.tx_in_flight) == (0, 0)
        assert dev.send_batch([]) == 0
        with pytest.raises(ArgumentError):
            dev.recv_batch(0)
        dev.close()
        dev.close()  # idempotent
        with pytest.raises(QueueStateError):
            dev.send(frame(3, 64))
        with pytest.raises(QueueStateError):
            dev.recv(timeout=0)
    assert backend.port_stats().rx_packets == 0


@pytest.mark.usefixtures("no_leaks")
def test_bad_construction_releases_everything(backend: TestPmd, tmp_path: Path) -> None:
    backend.set_forward_mode("rxonly")
    with pytest.raises(ArgumentError, match="1526"):
        NetDevice.connect_vhost_user(backend.socket_path, buffer_size=MIN_RX_BUFFER - 1)
    backend.wait_link(False)
    with pytest.raises(LayoutError):
        NetDevice.connect_vhost_user(backend.socket_path, queue_size=100, ring="split")
    backend.wait_link(False)
    with pytest.raises(VhostUserConnectError) as info:
        NetDevice.connect_vhost_user(tmp_path / "nobody-listens.sock")
    assert isinstance(info.value, VirtqError) and isinstance(info.value, OSError)


@pytest.mark.usefixtures("no_leaks")
def test_transmit_times_out_when_the_device_stops(backend: TestPmd) -> None:
    with connected(backend, "rxonly", queue_size=64) as dev:
        backend.stop_forwarding()  # nobody dequeues: the transmitq fills up
        with pytest.raises(NetTimeoutError) as info:
            dev.send_batch([frame(i, 64) for i in range(100)], timeout=0.3)
        assert info.value.sent == 64
        assert isinstance(info.value, TimeoutError)
        backend.start_forwarding()
        assert backend.wait_rx_packets(64).rx_packets == 64


@pytest.mark.usefixtures("no_leaks")
def test_backend_crash_is_a_disconnect_error(tmp_path: Path) -> None:
    with TestPmd.vhost(tmp_path / "crash.sock") as tp:
        tp.start_forwarding()
        dev = NetDevice.connect_vhost_user(tp.socket_path)
        try:
            tp.wait_link(True)
            tp.kill()
            with pytest.raises(VhostUserDisconnectedError):
                dev.recv(timeout=5)
        finally:
            dev.close()
        assert tp.socket_path.exists()  # SIGKILL leaves the socket; stop() removes it
    assert not tp.socket_path.exists()


def test_missing_testpmd_names_the_package(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendError, match="dpdk-dev"):
        TestPmd.vhost(tmp_path / "x.sock")
