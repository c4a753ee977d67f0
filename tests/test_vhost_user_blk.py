"""BlkDevice over vhost-user against a real qemu-storage-daemon started by the fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from pathlib import Path

import pytest

from virtq.devices import BlkDevice, BlkIOError
from virtq.errors import ArgumentError
from virtq.iova import BumpAllocator, IdentityAllocator
from virtq.testing.runners import QemuStorageDaemon, sector_pattern
from virtq.transport.vhost_user import (
    VhostUserConnectError,
    VhostUserDisconnectedError,
    VhostUserProtocolError,
    VhostUserTimeoutError,
)

IMAGE_BYTES = 16 << 20  # the plugin's image
SECTORS = IMAGE_BYTES // 512


# The public fixtures from virtq.testing.pytest_plugin, under the names these tests use.
@pytest.fixture
def image(virtq_blk_image: Path) -> Path:
    return virtq_blk_image


@pytest.fixture
def qsd(virtq_qsd):
    return virtq_qsd


def expected(sector: int, nbytes: int) -> bytes:
    return b"".join(sector_pattern(s) for s in range(sector, sector + nbytes // 512))


def test_config_id_and_reads_match_the_image(qsd, no_leaks):
    with BlkDevice.connect_vhost_user(qsd.socket_path) as dev:
        assert dev.capacity == SECTORS
        assert dev.capacity_bytes == IMAGE_BYTES
        assert dev.block_size == 512
        assert dev.get_id()  # QSD reports the export's node name
        for sector in (0, 1, 777, SECTORS - 8):
            assert dev.read(sector, 4096) == expected(sector, 4096)
        # larger than max_io: split into several requests kept in flight together
        assert dev.read(100, 3 * dev.max_io) == expected(100, 3 * dev.max_io)


def test_writes_land_in_the_file_and_flush(qsd, image):
    data = os.urandom(8192)
    with BlkDevice.connect_vhost_user(qsd.socket_path) as dev:
        dev.write(64, data)
        dev.flush()
        assert dev.read(64, 8192) == data
    with open(image, "rb") as f:
        f.seek(64 * 512)
        assert f.read(8192) == data


def test_read_past_the_end_is_a_blk_io_error(qsd):
    with BlkDevice.connect_vhost_user(qsd.socket_path) as dev:
        with pytest.raises(BlkIOError) as info:
            dev.read(SECTORS, 512)
        assert info.value.sector == SECTORS
        assert info.value.status == 1
        assert dev.read(0, 512) == sector_pattern(0)  # the device still works


def test_zero_copy_read_split_over_several_data_descriptors(qsd):
    with BlkDevice.connect_vhost_user(qsd.socket_path) as dev:
        buf = dev.alloc_buffer(16384)
        parts = [buf.slice(0, 512), buf.slice(4096, 1024), buf.slice(8192, 2560)]
        req = dev.submit_read(40, into=parts)
        assert req.wait() is None  # zero-copy: nothing returned, the data is in the buffers
        got = b"".join(p.read() for p in parts)
        assert got == expected(40, 4096)
        # zero-copy write from a buffer, then read back
        out = buf.slice(12288, 1024)
        out.write(b"Z" * 1024)
        dev.submit_write(9, out).wait()
        assert dev.read(9, 1024) == b"Z" * 1024


def test_many_requests_in_flight(image, tmp_path):
    # aio=threads completes requests from a thread pool, so completions can overtake.
    with QemuStorageDaemon(image, tmp_path / "t.sock", aio="threads") as daemon, \
            BlkDevice.connect_vhost_user(daemon.socket_path, queue_size=256) as dev:
        sectors = [(i * 397) % (SECTORS - 8) for i in range(dev.slots_per_queue)]
        reqs = [dev.submit_read(s, 4096) for s in sectors]
        order = []
        remaining = set(reqs)
        while remaining:
            dev.wait(list(remaining)[:1])
            for r in list(remaining):
                if r.done:
                    order.append(reqs.index(r))
                    remaining.discard(r)
        for s, r in zip(sectors, reqs, strict=True):
            assert r.wait() == expected(s, 4096)
        assert sorted(order) == list(range(len(reqs)))


def test_get_vring_base_equals_driver_avail_index(qsd):
    with BlkDevice.connect_vhost_user(qsd.socket_path) as dev:
        for i in range(37):
            dev.read(i, 512)
        assert dev.transport.get_vring_base(0) == dev.queues[0].next_avail == 37 + 0


def test_wraparound_of_the_16_bit_index(qsd):
    with BlkDevice.connect_vhost_user(qsd.socket_path, start_index=0xFFF0) as dev:
        for i in range(40):  # crosses 0xFFFF -> 0 after 16 requests
            assert dev.read(i, 512) == sector_pattern(i)
        assert dev.queues[0].next_avail == (0xFFF0 + 40) & 0xFFFF
        assert dev.transport.get_vring_base(0) == dev.queues[0].next_avail


@pytest.mark.parametrize("allocator", [IdentityAllocator, lambda: BumpAllocator(1 << 32, 1 << 40)],
                         ids=["identity", "bump"])
def test_both_guest_address_strategies(qsd, allocator):
    alloc = allocator()
    with BlkDevice.connect_vhost_user(qsd.socket_path, iova_allocator=alloc) as dev:
        if isinstance(alloc, BumpAllocator):
            assert dev.arena.iova == 1 << 32
        else:
            assert dev.arena.iova == dev.arena.region.host_addr
        dev.write(5, b"q" * 1024)
        assert dev.read(5, 1024) == b"q" * 1024
        assert dev.read(300, 512) == sector_pattern(300)


@pytest.mark.parametrize("poll", [False, True], ids=["eventfd", "poll"])
def test_backend_killed_with_32_in_flight_then_reconnect(image, tmp_path, poll):
    sock = tmp_path / "k.sock"
    daemon = QemuStorageDaemon(image, sock).start()
    try:
        with BlkDevice.connect_vhost_user(sock, queue_size=128, indirect=True,
                                          poll=poll) as dev:
            assert dev.read(1, 512) == sector_pattern(1)
            os.kill(daemon.pid, signal.SIGSTOP)  # hold the requests in flight
            reqs = [dev.submit_read(i * 8, 4096) for i in range(32)]
            dev.kick()
            daemon.kill()
            # The requests fail with the disconnect -- at once, not by this timeout (which
            # would raise VirtqTimeoutError).
            dev.wait(timeout=30)
            assert all(r.done for r in reqs)
            for r in reqs:
                with pytest.raises(VhostUserDisconnectedError):
                    r.wait()
            # A new back-end on the same socket: the rings come back at next_avail.
            daemon = QemuStorageDaemon(image, sock).start()
            dev.reconnect()
            assert dev.read(200, 4096) == expected(200, 4096)
            dev.write(3, b"after" * 1024 + b"\0" * 512)
            assert dev.read(3, 5632)[:5120] == b"after" * 1024
            assert dev.transport.get_vring_base(0) == dev.queues[0].vring_base
    finally:
        daemon.stop()


def test_bad_socket_path():
    with pytest.raises(VhostUserConnectError) as info:
        BlkDevice.connect_vhost_user("/nonexistent/virtq.sock")
    assert info.value.errno is not None
    assert isinstance(info.value, OSError)


def _silent_server(path: str, reply: bytes | None) -> tuple[socket.socket, threading.Thread]:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            if reply is not None:
                conn.sendall(reply)
            conn.settimeout(10)
            # hold the connection open until the client hangs up (recv returns b"")
            with contextlib.suppress(OSError):
                while conn.recv(4096):
                    pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv, t


@pytest.mark.parametrize(("reply", "error"), [
    (None, VhostUserTimeoutError),  # a back-end that never answers
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", VhostUserProtocolError),  # the wrong peer
])
def test_peer_that_is_not_a_vhost_user_backend(tmp_path, reply, error):
    path = str(tmp_path / "fake.sock")
    srv, t = _silent_server(path, reply)
    try:
        with pytest.raises(error):
            BlkDevice.connect_vhost_user(path, timeout=0.5)
    finally:
        t.join(timeout=5)
        srv.close()


def test_alloc_buffer_has_the_asked_size(qsd):
    with BlkDevice.connect_vhost_user(qsd.socket_path) as dev:
        buf = dev.alloc_buffer(4096)
        assert buf.length == 4096  # not the page-rounded arena
        dev.submit_read(16, into=buf).wait()
        assert buf.read() == expected(16, 4096)


@pytest.mark.parametrize("indirect", [True, False])
def test_request_shapes_alternate_on_reused_slots(qsd, indirect):
    """A slot's persistent indirect table is rewritten only when the request's shape
    changes: cycle every shape through two slots and check each result."""
    with BlkDevice.connect_vhost_user(qsd.socket_path, queue_size=8, max_io=8192,
                                      indirect=indirect) as dev:
        buf = dev.alloc_buffer(16384)
        scatter = [buf.slice(0, 1024), buf.slice(4096, 512), buf.slice(8192, 2048)]
        single = buf.slice(12288, 4096)
        for rnd in range(6):
            base = 1000 + 64 * rnd
            assert dev.read(base, 4096) == expected(base, 4096)
            assert dev.read(base + 8, 512) == expected(base + 8, 512)
            dev.submit_read(base + 16, into=scatter).wait()
            assert b"".join(p.read() for p in scatter) == expected(base + 16, 3584)
            dev.submit_read(base + 24, into=single).wait()
            assert single.read() == expected(base + 24, 4096)
            data = bytes([rnd]) * 1536
            dev.write(base + 32, data)
            dev.flush()
            assert dev.get_id()
            assert dev.read(base + 32, 1536) == data
            assert dev.read(base + 8, 8192) == expected(base + 8, 8192)


def test_bad_arguments_are_argument_errors(qsd):
    with BlkDevice.connect_vhost_user(qsd.socket_path, max_io=4096) as dev:
        buf = dev.alloc_buffer(8192)
        for call in (lambda: dev.submit_read(-1, 512),
                     lambda: dev.submit_read(1 << 64, 512),
                     lambda: dev.submit_read(1.5, 512),  # type: ignore[arg-type]
                     lambda: dev.submit_read(0, 8192),  # over max_io: read() splits
                     lambda: dev.submit_read(0, 100),
                     lambda: dev.submit_read(0, into=[]),
                     lambda: dev.submit_read(0, into=buf.slice(0, 100)),
                     lambda: dev.submit_read(0, into=[b"not a buffer"]),  # type: ignore[list-item]
                     lambda: dev.submit_write(0, b"x" * 100),
                     lambda: dev.submit_write(0, memoryview(bytes(1024))[::2]),
                     lambda: dev.read(0, 0)):
            with pytest.raises(ArgumentError):
                call()
        assert dev.in_flight == 0  # nothing was half-submitted
        # a multi-byte memoryview format is measured in bytes, not items
        dev.submit_write(0, memoryview(bytearray(1024)).cast("I")).wait()
        assert dev.read(0, 1024) == bytes(1024)


@pytest.mark.parametrize("indirect", [True, False])
def test_submit_read_many_refills_against_qsd(qsd, indirect):
    """The bench's loop, checked: batches of copying and zero-copy reads, each refill
    reusing the buffers (and slots) the last batch freed."""
    with BlkDevice.connect_vhost_user(qsd.socket_path, queue_size=64, max_io=4096,
                                      indirect=indirect) as dev:
        arena = dev.alloc_buffer(16 * 4096)
        bufs = [arena.slice(i * 4096, 4096) for i in range(16)]
        sectors = [(i * 1031) % (SECTORS - 8) for i in range(16 * 20)]
        reqs = dev.submit_read_many(sectors[:16], into=bufs)
        copies = dev.submit_read_many(sectors[:4], 4096)
        k = 16
        while k < len(sectors):
            done = dev.poll(timeout=10, min_completions=4)
            assert done
            for r in done:
                if r.into:
                    assert r.into[0].read() == expected(r.sector, 4096)
                else:
                    assert r.wait() == expected(r.sector, 4096)
            again = [r.into[0] for r in done if r.into][: len(sectors) - k]
            reqs = dev.submit_read_many(sectors[k : k + len(again)], into=again)
            k += len(again)
        dev.wait(timeout=10)
        assert k == len(sectors)
        assert all(r.into and r.into[0].read() == expected(r.sector, 4096) for r in reqs)
        assert [r.wait() for r in copies] == [expected(s, 4096) for s in sectors[:4]]
        assert dev.transport.get_vring_base(0) == dev.queues[0].next_avail
        del arena, bufs, reqs, done, again


@pytest.mark.parametrize("poll", [False, True], ids=["eventfd", "poll"])
def test_poll_min_completions(qsd, poll):
    with BlkDevice.connect_vhost_user(qsd.socket_path, poll=poll, max_io=4096) as dev:
        reqs = dev.submit_read_many([i * 8 for i in range(24)], 4096)
        done = dev.poll(timeout=10, min_completions=16)
        assert len(done) >= 16
        # more than are in flight: returns when all of them are done
        done += dev.poll(timeout=10, min_completions=1000)
        assert sorted(r.sector for r in done) == [i * 8 for i in range(24)]
        assert dev.in_flight == 0
        assert [r.wait() for r in reqs] == [expected(i * 8, 4096) for i in range(24)]
        assert dev.poll(timeout=10, min_completions=5) == []  # nothing in flight
