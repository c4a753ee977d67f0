"""NetDevice's queue pairs and MRG_RXBUF against real dpdk-testpmd ``net_vhost``.

* ``virtq_testpmd_mq`` serves 4 queue pairs (``queues=4``, ``--rxq=4 --txq=4``); in ``io``
  mode testpmd forwards its rx queue k to its tx queue k, so every pair is a loopback of its
  own: what virtq sends on transmitq k comes back on receiveq k, in order.  testpmd counts
  each stream (``show fwd stats all``), so what each pair transmitted is counted exactly.
* MRG_RXBUF: frames longer than a receive buffer (up to 9000 bytes over 2048-byte buffers;
  1514 over 512) go out in one transmit buffer, testpmd carries them in chained mbufs, and
  its vhost library spreads them over several receive buffers with num_buffers set.

Over vhost-user the controlq is played by virtq itself, as by QEMU and DPDK's virtio-user
(see virtq.devices.net): VQ_PAIRS_SET becomes SET_VRING_ENABLE per ring, checked here on the
wire.  Both ring formats, with and without IN_ORDER, are driven for real.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from virtq.abi.net import NET_HDR_SIZE, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ
from virtq.devices import NetDevice
from virtq.errors import ArgumentError
from virtq.testing.pytest_plugin import TESTPMD_MQ_QUEUES
from virtq.testing.testpmd import TestPmd
from virtq.transport.vhost_user import VhostUserTransport
from virtq.transport.vhost_user.protocol import ProtocolFeature

from .test_vhost_user_net import RINGS, check_ring, frame

PAIRS = TESTPMD_MQ_QUEUES


@contextmanager
def looped(tp: TestPmd, transport: VhostUserTransport | None = None,
           **options: Any) -> Iterator[NetDevice]:
    """A NetDevice on ``tp`` forwarding in ``io`` mode (forward stats start at zero)."""
    tp.set_forward_mode("io")
    tp.clear_stats()
    tp.start_forwarding()
    if transport is None:
        dev = NetDevice.connect_vhost_user(tp.socket_path, **options)
    else:
        dev = NetDevice(transport, **options)
    try:
        tp.wait_link(True)
        yield dev
    finally:
        dev.close()
        tp.wait_link(False)


def collect(dev: NetDevice, want: dict[int, int], *, any_pair: bool,
            timeout: float = 10.0) -> dict[int, list[bytes]]:
    """Receive until pair k has ``want[k]`` frames (or the time is up): with ``recv_any``
    (one sleep on every receiveq) or pair by pair."""
    got: dict[int, list[bytes]] = {k: [] for k in want}
    deadline = time.monotonic() + timeout
    while any(len(got[k]) < n for k, n in want.items()) and time.monotonic() < deadline:
        if any_pair:
            for k, f in dev.recv_any(64, timeout=1):
                got[k].append(f)
        else:
            for k, n in want.items():
                if len(got[k]) < n:
                    got[k] += dev.recv_batch(64, timeout=0.05, pair=k)
    return got


def burst_loop(dev: NetDevice, frames: dict[int, list[bytes]], *, any_pair: bool,
               burst: int = 100) -> dict[int, list[bytes]]:
    """Send every pair's frames in bursts no larger than its posted receive buffers (io
    forwarding drops what does not fit) and receive each burst back."""
    got: dict[int, list[bytes]] = {k: [] for k in frames}
    longest = max(map(len, frames.values()))
    for at in range(0, longest, burst):
        want = {}
        for k, fs in frames.items():
            chunk = fs[at : at + burst]
            dev.send_batch(chunk, pair=k, timeout=5)
            want[k] = len(chunk)
        back = collect(dev, want, any_pair=any_pair)
        for k in frames:
            assert len(back[k]) == want[k], f"pair {k}, burst at {at}: {len(back[k])} of " \
                                            f"{want[k]} came back"
            got[k] += back[k]
    return got


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("poll", [False, True], ids=["notify", "poll"])
@pytest.mark.usefixtures("no_leaks")
def test_every_pair_is_a_byte_exact_loopback(virtq_testpmd_mq: TestPmd, poll: bool,
                                             ring: tuple[str, bool | None]) -> None:
    tp = virtq_testpmd_mq
    rng = random.Random(15)
    frames = {k: [frame(k << 20 | i, rng.randrange(14, 1515)) for i in range(150 + 25 * k)]
              for k in range(PAIRS)}
    with looped(tp, queue_pairs=PAIRS, queue_size=256, poll=poll, ring=ring[0],
                in_order=ring[1]) as dev:
        check_ring(dev, ring)
        assert (dev.queue_pairs, dev.active_pairs, dev.control) == (PAIRS, PAIRS, "front-end")
        # MQ is negotiated with the back-end; CTRL_VQ is not (the front-end plays it).
        assert dev.features >> VIRTIO_NET_F_MQ & 1
        assert not dev.features >> VIRTIO_NET_F_CTRL_VQ & 1
        # Notify mode sleeps on every receiveq at once (recv_any); poll mode asks each pair.
        got = burst_loop(dev, frames, any_pair=not poll)
        assert dev.recv_any(16, timeout=0.05) == []  # nothing extra on any pair
        stats = dev.pair_stats()
        for k in range(PAIRS):
            assert got[k] == frames[k], f"pair {k}"
            n, nbytes = len(frames[k]), sum(map(len, frames[k]))
            s = stats[k]
            assert (s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes) == (n, nbytes, n, nbytes)
            assert s.rx_buffers == n  # every frame fits one 2048-byte buffer
        fwd = tp.fwd_stats()
    # testpmd's stream k (its rx queue k = our transmitq k): exactly what pair k sent,
    # all forwarded, nothing dropped.
    assert fwd == {k: (len(frames[k]), len(frames[k]), 0) for k in range(PAIRS)}


@pytest.mark.usefixtures("no_leaks")
def test_queue_pairs_switch_with_set_vring_enable(virtq_testpmd_mq: TestPmd) -> None:
    """What virtq sends for VQ_PAIRS_SET over vhost-user: SET_VRING_ENABLE for both rings of
    each pair that changes, nothing for the others; the pairs still in use keep working and
    the re-enabled ones work again."""
    tp = virtq_testpmd_mq
    transport = VhostUserTransport.connect(tp.socket_path)
    sent: list[tuple[int, bool]] = []
    real = transport.frontend.set_vring_enable

    def record(index: int, enable: bool) -> None:
        sent.append((index, enable))
        real(index, enable)

    transport.frontend.set_vring_enable = record  # type: ignore[method-assign]
    # What net_vhost tells a front-end: PROTOCOL_F_MQ and GET_QUEUE_NUM, which is DPDK's
    # VHOST_MAX_QUEUE_PAIRS (128) whatever queues= says; no CONFIG, so no
    # max_virtqueue_pairs -- the front-end decides how many pairs, as QEMU's queues= does.
    assert transport.protocol_features >> ProtocolFeature.MQ & 1
    assert not transport.protocol_features >> ProtocolFeature.CONFIG & 1
    assert transport.num_queues() == 128
    with looped(tp, transport, queue_pairs=PAIRS, queue_size=128) as dev:
        # start() enabled every ring (the first pair too: PROTOCOL_FEATURES negotiated,
        # vhost-user.rst "Ring states"); VQ_PAIRS_SET(4) then had nothing to change.
        assert sent == [(i, True) for i in range(2 * PAIRS)]
        assert dev.max_queue_pairs == PAIRS  # what the front-end chose
        sent.clear()
        dev.set_queue_pairs(2)
        assert sent == [(4, False), (5, False), (6, False), (7, False)]
        assert [s.active for s in dev.pair_stats()] == [True, True, False, False]
        with pytest.raises(ArgumentError, match="send on"):
            dev.send(frame(1, 64), pair=2)
        got = burst_loop(dev, {0: [frame(i, 64) for i in range(20)],
                               1: [frame(100 + i, 64) for i in range(20)]}, any_pair=True)
        assert got == {0: [frame(i, 64) for i in range(20)],
                       1: [frame(100 + i, 64) for i in range(20)]}
        sent.clear()
        dev.set_queue_pairs(PAIRS)
        assert sent == [(4, True), (5, True), (6, True), (7, True)]
        frames = {k: [frame(k << 20 | i, 60 + i) for i in range(30)] for k in range(PAIRS)}
        assert burst_loop(dev, frames, any_pair=False) == frames


#: Frame sizes around the 2048-byte buffer's edges (2036 bytes fit one with the header)
#: and up to 9000.
EDGES = [14, 60, 1514, 2035, 2036, 2037, 2038, 4083, 4084, 4085, 6132, 8180, 8181, 9000]


def buffers_for(size: int, buffer_size: int) -> int:
    """Receive buffers a frame takes: the device fills all but the last (§5.1.6.4.1)."""
    return -(-(NET_HDR_SIZE + size) // buffer_size)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.usefixtures("no_leaks")
def test_mrg_rxbuf_jumbo_frames_come_back_byte_exact(virtq_testpmd: TestPmd,
                                                     ring: tuple[str, bool | None]) -> None:
    tp = virtq_testpmd
    rng = random.Random(16)
    sizes = EDGES + [rng.randrange(14, 9001) for _ in range(186)]
    frames = [frame(i, n) for i, n in enumerate(sizes)]
    with looped(tp, max_frame=9000, queue_size=256, ring=ring[0], in_order=ring[1]) as dev:
        check_ring(dev, ring)
        assert dev.mrg_rxbuf and (dev.buffer_size, dev.max_frame) == (2048, 9000)
        # Bursts small enough that their buffers fit the receiveq (a 9000-byte frame takes
        # five): io forwarding drops what does not fit.
        got = burst_loop(dev, {0: frames}, any_pair=False, burst=40)[0]
        assert got == frames
        s = dev.pair_stats()[0]
        assert s.rx_packets == len(frames)
        assert s.rx_buffers == sum(buffers_for(n, 2048) for n in sizes)
        assert s.rx_bytes == s.tx_bytes == sum(sizes)
        fwd = tp.fwd_stats()
        stats = tp.port_stats()
    assert fwd in ({}, {0: (len(frames), len(frames), 0)})  # one stream: may be unprinted
    assert (stats.rx_packets, stats.tx_packets) == (len(frames), len(frames))


@pytest.mark.usefixtures("no_leaks")
def test_mrg_rxbuf_small_buffers(virtq_testpmd: TestPmd) -> None:
    """512-byte receive buffers (allowed only with MRG_RXBUF): every full-size Ethernet
    frame takes three, the transmit buffers stay 1514 + 12 bytes."""
    rng = random.Random(17)
    sizes = [14, 500, 501, 1012, 1013, 1514, *(rng.randrange(14, 1515) for _ in range(300))]
    frames = [frame(i, n) for i, n in enumerate(sizes)]
    with looped(virtq_testpmd, buffer_size=512, queue_size=256) as dev:
        assert dev.max_frame == 1514
        got = burst_loop(dev, {0: frames}, any_pair=True, burst=60)[0]
        assert got == frames
        assert dev.pair_stats()[0].rx_buffers == sum(buffers_for(n, 512) for n in sizes)


@pytest.mark.usefixtures("no_leaks")
def test_without_mrg_rxbuf_a_long_frame_cannot_come_back(virtq_testpmd: TestPmd) -> None:
    """The control for the tests above: without MRG_RXBUF the back-end has no way to put a
    frame longer than a buffer into the receiveq, so it drops it (testpmd counts the drop);
    the frames around it arrive.  Sending it is fine: transmit never needed MRG_RXBUF."""
    tp = virtq_testpmd
    with looped(tp, mrg_rxbuf=False, max_frame=4000) as dev:
        assert not dev.mrg_rxbuf
        dev.send_batch([frame(1, 60), frame(2, 4000)], timeout=5)
        assert dev.recv(timeout=5) == frame(1, 60)
        assert tp.wait_rx_packets(2).rx_packets == 2  # the long one reached testpmd
        dev.send(frame(3, 2036), timeout=5)  # the longest that fits one buffer
        assert dev.recv(timeout=5) == frame(3, 2036)
        assert dev.recv(timeout=0.1) is None
        stats = tp.port_stats()
    assert (stats.rx_packets, stats.tx_packets) == (3, 2)


@pytest.fixture(scope="module")
def testpmd_small_mbufs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestPmd]:
    """Two pairs and 640-byte mbufs: every frame over 640 bytes is an mbuf chain in
    testpmd, written by the vhost library into several receive buffers."""
    sock = tmp_path_factory.mktemp("virtq-net-mbufs") / "vhost-net.sock"
    with TestPmd.vhost(sock, queues=2, mbuf_size=640) as tp:
        yield tp


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.usefixtures("no_leaks")
def test_mrg_rxbuf_on_two_pairs_through_chained_mbufs(testpmd_small_mbufs: TestPmd,
                                                      ring: str) -> None:
    rng = random.Random(18)
    frames = {k: [frame(k << 20 | i, rng.choice([*EDGES, rng.randrange(14, 9001)]))
                  for i in range(120)] for k in range(2)}
    with looped(testpmd_small_mbufs, queue_pairs=2, buffer_size=1024, max_frame=9000,
                ring=ring) as dev:
        assert dev.ring == ring and dev.mrg_rxbuf
        got = burst_loop(dev, frames, any_pair=True, burst=20)
        assert got == frames
        fwd = testpmd_small_mbufs.fwd_stats()
    assert fwd == dict.fromkeys(range(2), (120, 120, 0))
