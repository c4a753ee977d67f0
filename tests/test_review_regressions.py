"""One regression test per device-level finding of ../shared/reference/review-2026-11-30.md
(R = "defects found by reading", H = "defects found by hostile inputs"); each failed on
main at e9d9a8c.  Queue-level findings are in test_queue_state.py and test_waiter.py, the
RNG ones in test_vfio_unit.py, lower layers (memory, vhost-user messages, CLI, UserQueue)
in their own test files."""

from __future__ import annotations

import array
import os
import struct
import threading
from collections.abc import Iterator

import pytest

from virtq.abi import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from virtq.abi.blk import VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SIZE_MAX
from virtq.abi.net import NET_HDR_SIZE, TX_QUEUE, VIRTIO_NET_F_MAC
from virtq.devices import BlkDevice, DmaBuffer, NetDevice
from virtq.errors import (
    ArgumentError,
    DeviceProtocolError,
    QueueBrokenError,
    QueueFullError,
    QueueStateError,
    RegionBoundsError,
    RegionBusyError,
    VirtqError,
)
from virtq.testing import HostileDevice
from virtq.testing.embedded import VhostUserBlkBackend
from virtq.testing.loopback import LoopbackTransport
from virtq.testing.runners import sector_pattern
from virtq.transport.vhost_user import VhostUserConnectError

from .test_waiter import in_thread

CAPACITY = 1 << 16


def blk_transport(*, queues: int = 1, size_max: int = 0, features: int = 0) -> LoopbackTransport:
    config = struct.pack("<QII", CAPACITY, size_max, 0).ljust(64, b"\0")
    return LoopbackTransport(
        features=(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_INDIRECT_DESC
                  | 1 << VIRTIO_BLK_F_FLUSH | (1 << VIRTIO_BLK_F_MQ if queues > 1 else 0)
                  | features),
        queue_sizes=[16] * queues, config=config)


def serve(t: LoopbackTransport, queue: int, *, written: int | None = None,
          status: int = 0) -> int:
    """Complete every chain of ``queue`` as a read of the sector pattern."""
    d = t.devices[queue]
    n = 0
    while (chain := d.pop()) is not None:
        head, segs = chain
        _kind, _, sector = struct.unpack("<IIQ", d.read(segs[0].iova, 16))
        data = b"".join(sector_pattern(sector + i) for i in range(
            sum(s.length for s in segs[1:-1]) // 512))
        off = 0
        for s in segs[1:-1]:
            if s.writable:
                d.write(s.iova, data[off : off + s.length])
                off += s.length
        d.write(segs[-1].iova, bytes([status]))
        d.push(head, off + 1 if written is None else written)
        n += 1
    return n


@pytest.fixture
def blk(no_leaks) -> Iterator[tuple[BlkDevice, LoopbackTransport]]:
    t = blk_transport()
    dev = BlkDevice(t, queue_size=16, max_io=8192)
    try:
        yield dev, t
    finally:
        dev.close()


# -- defects found by reading --------------------------------------------------------------


def test_r1_a_buffer_goes_only_to_the_device_that_allocated_it(no_leaks):
    """Two VFIO devices both allocate IOVAs from 1 MiB: device B asked to read into A's
    buffer DMAed into one of B's own buffers.  Now a buffer names its transport."""
    with BlkDevice(blk_transport()) as a, BlkDevice(blk_transport()) as b:
        foreign = a.alloc_buffer(4096)
        for submit in (lambda: b.submit_read(0, into=foreign),
                       lambda: b.submit_read(0, into=[foreign]),
                       lambda: b.submit_read_many([0], into=[foreign]),
                       lambda: b.submit_write(0, foreign)):
            with pytest.raises(ArgumentError, match="belongs to") as info:
                submit()
            assert repr(a.transport) in str(info.value) and repr(b.transport) in str(info.value)
        assert b.in_flight == 0
        a.submit_read(0, into=foreign)  # its own device takes it


def test_r2_a_broken_queue_does_not_lose_another_queues_completions(no_leaks):
    t = blk_transport(queues=2)
    with BlkDevice(t, queue_size=16, num_queues=2, max_io=4096) as dev:
        reqs = [dev.submit_read(8 * i, 512) for i in range(4)]  # round-robin: 0 1 0 1
        assert [r.queue for r in reqs] == [0, 1, 0, 1]
        dev.kick()
        assert serve(t, 0) == 2
        d1 = t.devices[1]
        _head, _ = d1.pop()  # queue 1: a bad element (a head it was never given)
        q1 = dev.queues[1]
        HostileDevice(q1.region, q1.layout).complete(q1.size + 5, 0)
        done = dev.poll()  # poll() raises only for caller misuse
        assert set(done) == set(reqs)
        assert [r.wait() for r in (reqs[0], reqs[2])] == [sector_pattern(0), sector_pattern(16)]
        for r in (reqs[1], reqs[3]):
            with pytest.raises(QueueBrokenError) as info:
                r.wait()
            assert isinstance(info.value.__cause__, DeviceProtocolError)
        # queue 0 carries on alone
        more = [dev.submit_read(8, 512) for _ in range(3)]
        assert {r.queue for r in more} == {0}
        dev.kick()
        serve(t, 0)
        assert set(dev.poll()) == set(more)
        assert dev.stats()[1]["state"] == "broken"


class NoStopLoopback(LoopbackTransport):
    """A transport that cannot stop one queue (VFIO without RING_RESET)."""

    def stop_queue(self, index: int) -> bool:
        return False


def test_r3_no_buffer_is_handed_back_under_live_dma(no_leaks):
    """_fail_all freed slots without stopping the device.  Now a broken queue's ring is
    stopped where the transport can; where it cannot, its zero-copy buffers stay
    quarantined -- refused for new requests -- until the device is reset."""
    t = NoStopLoopback(features=blk_transport().features, queue_sizes=[16],
                       config=blk_transport().config)
    with BlkDevice(t, queue_size=16, max_io=4096) as dev:
        arena = dev.alloc_buffer(8192)
        held, other = arena.slice(0, 4096), arena.slice(4096, 4096)
        req = dev.submit_read(0, into=held)
        dev.kick()
        q = dev.queues[0]
        HostileDevice(q.region, q.layout).complete(99, 0)
        assert dev.poll() == [req] and isinstance(req.error, QueueBrokenError)
        for overlapping in (held, arena.slice(2048, 4096), arena):
            with pytest.raises((ArgumentError, QueueStateError)):
                dev.submit_read(0, into=overlapping)
        assert dev.stats()[0]["free_slots"] == dev.slots_per_queue - 1  # slot still taken
        dev.reconnect()  # the device is reset: the device can no longer write them
        dev.submit_read(0, into=held)
        dev.submit_read(0, into=other)


def test_r8_size_max_is_enforced():
    """size_max was read and ignored: a 4096-byte bounce buffer went to a device whose
    largest segment is 1024 bytes."""
    t = blk_transport(size_max=1024, features=1 << VIRTIO_BLK_F_SIZE_MAX)
    with BlkDevice(t, queue_size=16, max_io=4096) as dev:
        assert dev.size_max == 1024
        req = dev.submit_read(8, 4096)
        dev.kick()
        _head, segs = t.devices[0].pop()
        assert [s.length for s in segs] == [16, 1024, 1024, 1024, 1024, 1]
        big = dev.alloc_buffer(2048)
        with pytest.raises(ArgumentError, match="size_max"):
            dev.submit_read(0, into=big)
        del req
    with pytest.raises(ArgumentError, match=r"seg_max|segments"):
        BlkDevice(blk_transport(size_max=512, features=1 << VIRTIO_BLK_F_SIZE_MAX),
                  max_io=8192, max_segments=4)


# -- defects found by hostile inputs --------------------------------------------------------


def test_h1_no_spin_after_a_failed_reconnect(virtq_blk_image, tmp_path, no_leaks):
    sock = tmp_path / "b.sock"
    backend = VhostUserBlkBackend(virtq_blk_image, sock).start()
    with BlkDevice.connect_vhost_user(sock) as dev:
        assert dev.read(1, 512) == sector_pattern(1)
        backend.stop()  # the socket is gone: a reconnect cannot succeed
        with pytest.raises(VhostUserConnectError):
            dev.reconnect()
        box = in_thread(lambda: dev.read(0, 512))
        assert isinstance(box["error"], QueueStateError), box
        assert "reconnect" in str(box["error"])
        assert in_thread(lambda: dev.poll(timeout=None)) == {"result": []}
        with pytest.raises(QueueStateError):
            dev.submit_read_many([0, 8], 512)


def test_h3_write_counts_bytes_not_items(virtq_embedded_blk):
    with BlkDevice.connect_vhost_user(virtq_embedded_blk.socket_path, max_io=4096) as dev:
        words = array.array("Q", range(1024))  # 8192 bytes, 1024 items
        dev.write(64, words)
        assert dev.read(64, 8192) == words.tobytes()
        view = memoryview(bytes(range(256)) * 32).cast("I")  # 8192 bytes, 2048 items
        dev.write(80, view)
        assert dev.read(80, 8192) == view.tobytes()
        req = dev.submit_write(100, memoryview(b"\x07" * 1024).cast("H"))
        req.wait()
        assert dev.read(100, 1024) == b"\x07" * 1024
        with pytest.raises(ArgumentError):
            dev.write(0, memoryview(bytes(2048))[::2])  # not contiguous


def test_h4_dma_buffers_are_checked(blk):
    dev, _ = blk
    buf = dev.alloc_buffer(4096)
    arena = buf.arena
    for offset, length in ((0, arena.nbytes + 1), (arena.nbytes - 100, 512), (-1, 512),
                           (0, 0), (0, 1 << 32)):
        with pytest.raises((ArgumentError, RegionBoundsError)):
            DmaBuffer(arena, offset, length)
    for bad in ((0.5, 512), (0, "512"), (0, 4097), (-512, 512)):
        with pytest.raises((ArgumentError, RegionBoundsError)):
            buf.slice(*bad)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError):
        DmaBuffer("arena", 0, 512)  # type: ignore[arg-type]
    buf.write(memoryview(b"\x01\x02" * 256).cast("H"))  # bytes, whatever the item size
    assert buf.read()[:512] == b"\x01\x02" * 256


def test_h5_data_past_used_len_is_never_returned(blk):
    """The device reports writing 1 byte (the status) of a 4096-byte read: the old driver
    returned 4096 bytes of whatever the buffer held."""
    dev, t = blk
    buf = dev.alloc_buffer(4096)
    copying = dev.submit_read(8, 4096)
    zero_copy = dev.submit_read(16, into=buf)
    dev.kick()
    serve(t, 0, written=1)
    dev.poll()
    for req in (copying, zero_copy):
        with pytest.raises(DeviceProtocolError, match=r"used\.len") as info:
            req.wait()
        assert info.value.value == 1
        assert req.result is None
    # a write whose status byte the device never claimed to write
    w = dev.submit_write(8, bytes(512))
    dev.kick()
    d = t.devices[0]
    head, segs = d.pop()
    d.write(segs[-1].iova, b"\0")
    d.push(head, 0)
    dev.poll()
    with pytest.raises(VirtqError, match="no status"):
        w.wait()
    # and the queue goes on: these are request failures, not a broken ring
    ok = dev.submit_read(8, 512)
    dev.kick()
    serve(t, 0)
    dev.poll()
    assert ok.wait() == sector_pattern(8)


def test_get_id_stops_at_the_nul(blk):
    """GET_ID returned what the bounce buffer held after the NUL (found while checking H5
    against qemu-storage-daemon: 'vhost_user_blk\\x00xxxxx')."""
    dev, t = blk
    w = dev.submit_write(0, b"x" * 512)  # leaves 'x' in a bounce buffer
    dev.kick()
    d = t.devices[0]
    head, segs = d.pop()
    d.write(segs[-1].iova, b"\0")
    d.push(head, 1)
    dev.poll()
    w.wait()
    req = dev.submit_get_id()
    dev.kick()
    head, segs = d.pop()
    d.write(segs[1].iova, b"virtq-test\0")
    d.write(segs[-1].iova, b"\0")
    d.push(head, 21)
    dev.poll()
    assert req.wait() == b"virtq-test"


@pytest.mark.parametrize("bad", [0, -1, 1.5, "8", 100000])
def test_h7_max_segments_is_checked(bad, no_leaks):
    t = blk_transport()
    with pytest.raises(ArgumentError):
        BlkDevice(t, max_segments=bad)
    assert t.closed


def test_h9_no_resource_held_after_errors(virtq_qsd, no_leaks):
    path = virtq_qsd.socket_path
    with pytest.raises(ArgumentError):
        BlkDevice.connect_vhost_user(path, max_io=0)
    with pytest.raises(TypeError):
        BlkDevice.connect_vhost_user(path, bogus=1)  # type: ignore[call-arg]
    # qemu-storage-daemon serves one front-end at a time: the next one gets through
    dev = BlkDevice.connect_vhost_user(path)
    buf = dev.alloc_buffer(4096)
    view = buf.view()
    with pytest.raises(RegionBusyError):
        dev.close()  # a live view of a buffer: refused, and retried below
    view.release()
    dev.close()
    with pytest.raises(QueueStateError):
        dev.alloc_buffer(4096)
    with pytest.raises(QueueStateError):
        dev.reconnect()
    with BlkDevice.connect_vhost_user(path) as again:
        assert again.read(0, 512) == sector_pattern(0)


def test_h10_waiting_for_another_devices_request(no_leaks):
    with BlkDevice(blk_transport()) as a, BlkDevice(blk_transport()) as b:
        req = a.submit_read(0, 512)
        box = in_thread(lambda: b.wait([req], timeout=None))
        assert isinstance(box["error"], ArgumentError)


def test_h12_arguments_are_checked_with_virtq_errors(blk):
    dev, t = blk
    for call in (lambda: dev.alloc_buffer(1 << 62), lambda: dev.alloc_buffer(0),
                 lambda: dev.poll(timeout=-1), lambda: dev.wait(timeout=-1),
                 lambda: dev.poll(min_completions=0), lambda: dev.read(-1, 512),
                 lambda: dev.submit_read_many(5, 512)):  # type: ignore[arg-type]
        with pytest.raises(ArgumentError):
            call()
    with pytest.raises(ArgumentError):
        BlkDevice(blk_transport(), max_io=1 << 40)
    for huge in (1 << 40, dev.capacity_bytes + 512):  # more than the disk: never split
        with pytest.raises(ArgumentError, match="larger than the device"):
            dev.read(0, huge)
    with pytest.raises(ArgumentError, match="larger than the device"):
        dev.write(0, bytes(dev.capacity_bytes + 512))
    assert dev.in_flight == 0
    # timeouts of any size are accepted, infinity included (no OverflowError in poll())
    req = dev.submit_read(8, 512)
    dev.kick()
    serve(t, 0)
    for timeout in (float("inf"), 1e300, 1 << 40):
        assert in_thread(lambda timeout=timeout: dev.poll(timeout=timeout)) in (
            {"result": [req]}, {"result": []})
    full = dev.submit_read_many(list(range(dev.slots_per_queue)), 512)
    with pytest.raises(QueueFullError):  # a full device is QueueFullError everywhere
        dev.submit_read(0, 512)
    with pytest.raises(QueueFullError):
        dev.submit_read_many([0], 512)
    del full


def test_h12_net_send_counts_bytes(no_leaks):
    t = LoopbackTransport(
        features=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_NET_F_MAC,
        queue_sizes=[8, 8], config=b"\x02\0\0\0\0\1")
    with NetDevice(t, queue_size=8) as dev:
        frame = bytes(range(60))
        dev.send(memoryview(frame).cast("I"))  # 15 items, 60 bytes
        dev.send_batch([array.array("B", frame), bytearray(frame)])
        d = t.devices[TX_QUEUE]
        got = []
        while (chain := d.pop()) is not None:
            _head, segs = chain
            got.append(d.read(segs[0].iova, segs[0].length)[NET_HDR_SIZE:])
        assert got == [frame] * 3
        # more frames than the ring takes at once, one of them not a frame at all
        with pytest.raises(ArgumentError):
            dev.send_batch([frame] * 20 + [object()], timeout=0.1)  # type: ignore[list-item]


def test_close_from_another_thread_during_poll(virtq_qsd, no_leaks):
    """The device-level face of H2: a poll() sleeping in one thread when another closes the
    device ends with QueueStateError, not EBADF or another file's bytes."""
    dev = BlkDevice.connect_vhost_user(virtq_qsd.socket_path)
    os.kill(virtq_qsd.pid, 19)  # SIGSTOP: nothing will complete
    try:
        dev.submit_read(0, 512)
        started = threading.Event()

        def poller():
            started.set()
            return dev.poll(timeout=30)

        box: dict[str, object] = {}
        thread = threading.Thread(target=lambda: box.update(in_thread(poller, 40)))
        thread.start()
        started.wait(5)
        dev.close()
        thread.join(45)
        assert isinstance(box.get("error"), QueueStateError) or box.get("result") == [], box
    finally:
        os.kill(virtq_qsd.pid, 18)  # SIGCONT
