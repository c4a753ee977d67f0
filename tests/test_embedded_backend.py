"""The embedded vhost-user-blk back-end (virtq.testing.embedded) against BlkDevice.

Two things are tested at once: the back-end serves a file correctly (so the demo can use it
when qemu-storage-daemon is absent), and virtq's front-end survives every fault the
back-end can inject: each must surface as the documented VhostUser* error, quickly.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from virtq.abi.blk import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from virtq.devices.blk import BlkDevice
from virtq.devices.errors import BlkIOError
from virtq.errors import ArgumentError, DeviceProtocolError, QueueBrokenError, QueueStateError
from virtq.iova import BumpAllocator
from virtq.memory import MemfdRegion
from virtq.testing import BackendProcess, Faults, VhostUserBlkBackend
from virtq.testing.embedded import FrontendProtocolError
from virtq.testing.runners import make_image, sector_pattern
from virtq.transport.vhost_user import (
    VhostUserConnectError,
    VhostUserDisconnectedError,
    VhostUserFrontend,
    VhostUserNackError,
    VhostUserProtocolError,
    VhostUserTimeoutError,
)
from virtq.transport.vhost_user import protocol as P

IMAGE_BYTES = 1 << 20  # 2048 sectors
SECTORS = IMAGE_BYTES // 512


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", IMAGE_BYTES)


@pytest.fixture
def sock() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="vq-") as d:
        yield Path(d) / "blk.sock"


@pytest.fixture
def backend(image: Path, sock: Path) -> Iterator[VhostUserBlkBackend]:
    with VhostUserBlkBackend(image, sock) as b:
        yield b


def image_bytes(image: Path, sector: int, nbytes: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(sector * 512)
        return f.read(nbytes)


def check_io(dev: BlkDevice, image: Path, sector: int = 7, fill: int = 0x5A) -> None:
    """A write, then a read that must see it, in the device and in the file."""
    data = bytes([fill]) * 1024
    dev.write(sector, data)
    assert dev.read(sector, 1024) == data
    assert image_bytes(image, sector, 1024) == data
    assert dev.read(sector + 2, 512) == sector_pattern(sector + 2)


# -- serving a file ---------------------------------------------------------------------


def test_config_and_features(backend: VhostUserBlkBackend, sock: Path) -> None:
    with BlkDevice.connect_vhost_user(sock) as dev:
        assert dev.capacity == SECTORS
        assert dev.block_size == 512
        assert dev.seg_max == 126
        assert dev.flush_supported
        assert not dev.read_only
    assert backend.errors == []


def test_reads_equal_the_image(backend: VhostUserBlkBackend, sock: Path, image: Path) -> None:
    with BlkDevice.connect_vhost_user(sock, max_io=64 * 1024) as dev:
        assert dev.read(0, 512) == sector_pattern(0)
        assert dev.read(SECTORS - 1, 512) == sector_pattern(SECTORS - 1)
        # Larger than max_io: split into requests kept in flight together.
        assert dev.read(0, IMAGE_BYTES) == image.read_bytes()
    assert backend.errors == []


def test_writes_land_in_the_file(backend: VhostUserBlkBackend, sock: Path,
                                 image: Path) -> None:
    with BlkDevice.connect_vhost_user(sock) as dev:
        check_io(dev, image)
        dev.flush()
        assert dev.get_id() == "virtq-embedded"
    ops = {(r.kind, r.status) for r in backend.completed}
    assert (VIRTIO_BLK_T_IN, VIRTIO_BLK_S_OK) in ops


@pytest.mark.parametrize(("sector", "nbytes"), [(SECTORS, 512), (SECTORS - 1, 1024),
                                                (1 << 40, 512)])
def test_read_past_the_end_is_an_io_error(backend: VhostUserBlkBackend, sock: Path,
                                          sector: int, nbytes: int) -> None:
    with BlkDevice.connect_vhost_user(sock) as dev:
        with pytest.raises(BlkIOError) as err:
            dev.read(sector, nbytes)
        assert err.value.status == VIRTIO_BLK_S_IOERR
        assert dev.read(0, 512) == sector_pattern(0)  # the device carries on


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("event_idx", [False, True])
def test_ring_options(backend: VhostUserBlkBackend, sock: Path, image: Path,
                      indirect: bool, event_idx: bool) -> None:
    with BlkDevice.connect_vhost_user(sock, indirect=indirect, event_idx=event_idx) as dev:
        for i in range(40):  # past several avail_event updates
            check_io(dev, image, sector=i * 3, fill=i)
    assert backend.errors == []


def test_guest_addresses_differ_from_ring_addresses(backend: VhostUserBlkBackend,
                                                    sock: Path, image: Path) -> None:
    # Rings are found through userspace_addr, descriptors through guest_phys_addr: with a
    # bump allocator the two spaces differ, so mixing them up cannot go unnoticed.
    alloc = BumpAllocator(0x10_0000_0000, 0x20_0000_0000)
    with BlkDevice.connect_vhost_user(sock, iova_allocator=alloc) as dev:
        assert dev.arena.iova != dev.arena.region.host_addr
        check_io(dev, image)
    assert backend.errors == []


def test_new_memory_table_while_running(backend: VhostUserBlkBackend, sock: Path,
                                        image: Path) -> None:
    # alloc_buffer() adds a region: a second SET_MEM_TABLE with the rings live.
    alloc = BumpAllocator(0x10_0000_0000, 0x20_0000_0000)
    with BlkDevice.connect_vhost_user(sock, iova_allocator=alloc) as dev:
        check_io(dev, image)
        buf = dev.alloc_buffer(8192)
        dev.submit_read(4, into=[buf.slice(0, 512), buf.slice(4096, 1024)]).wait()
        assert buf.slice(0, 512).read() == sector_pattern(4)
        assert buf.slice(4096, 1024).read() == sector_pattern(5) + sector_pattern(6)
        check_io(dev, image, sector=100)
    assert backend.errors == []


def test_two_queues(image: Path, sock: Path) -> None:
    with VhostUserBlkBackend(image, sock, num_queues=2) as backend, \
            BlkDevice.connect_vhost_user(sock, num_queues=2) as dev:
        reqs = [dev.submit_read(s, 512) for s in range(16)]
        dev.wait(reqs)
        assert [r.wait() for r in reqs] == [sector_pattern(s) for s in range(16)]
        assert {r.queue for r in backend.completed} == {0, 1}
    assert backend.errors == []


def test_read_only(image: Path, sock: Path) -> None:
    with VhostUserBlkBackend(image, sock, read_only=True) as backend, \
            BlkDevice.connect_vhost_user(sock) as dev:
        assert dev.read_only
        assert dev.read(1, 512) == sector_pattern(1)
        with pytest.raises(QueueStateError):
            dev.write(1, bytes(512))
    assert backend.errors == []


def test_serves_one_connection_after_another(backend: VhostUserBlkBackend, sock: Path,
                                             image: Path) -> None:
    for i in range(3):
        with BlkDevice.connect_vhost_user(sock) as dev:
            check_io(dev, image, fill=i)
    backend.stop()
    assert backend.connections == 3
    assert backend.errors == []


def test_out_of_order_completion(image: Path, sock: Path) -> None:
    with VhostUserBlkBackend(image, sock, faults=Faults(out_of_order=True)) as backend, \
            BlkDevice.connect_vhost_user(sock) as dev:
        sectors = list(range(10, 26))
        reqs = [dev.submit_read(s, 512) for s in sectors]
        dev.wait(reqs)  # one publish, so the back-end pops them as one batch
        assert [r.wait() for r in reqs] == [sector_pattern(s) for s in sectors]
        completed = [r.sector for r in backend.completed]
        assert sorted(completed) == sectors
        assert completed != sectors
    assert backend.errors == []


def test_no_leaks(image: Path, sock: Path) -> None:
    def session() -> None:
        with VhostUserBlkBackend(image, sock) as backend:
            with BlkDevice.connect_vhost_user(sock) as dev:
                check_io(dev, image)
                dev.alloc_buffer(4096)  # a second memory table: old mappings must go
                check_io(dev, image, sector=50)
                # Both sides map both regions (so the filter below does see them).
                assert sum("memfd:virtq" in p for p in owned_resources()[1]) == 4
            backend.stop()
            assert backend.errors == []

    def owned_resources() -> tuple[int, list[str]]:
        # fds, and every mapping of a file or memfd: all the back-end ever maps.  Anonymous
        # mappings are left out: CPython's allocator keeps 1 MiB arenas and glibc caches
        # thread stacks, both at their own discretion.
        gc.collect()
        proc = psutil.Process()
        files = sorted(m.path for m in proc.memory_maps(grouped=False)
                       if m.path.startswith("/"))
        return proc.num_fds(), files

    # Measure from the second session on (the first may load a library or two).
    session()
    before = owned_resources()
    assert not [p for p in before[1] if "memfd:virtq" in p]  # every guest mapping is gone
    for _ in range(5):
        session()
    assert owned_resources() == before


# -- faults --------------------------------------------------------------------------------


def test_drop_mid_request_fails_every_request_then_reconnect(
        backend: VhostUserBlkBackend, sock: Path, image: Path) -> None:
    with BlkDevice.connect_vhost_user(sock) as dev:
        check_io(dev, image)
        backend.faults = Faults(drop_after=3)
        reqs = [dev.submit_read(s, 512) for s in range(8)]
        dev.wait(reqs, timeout=10)  # they complete -- with the transport's error
        for r in reqs:
            assert isinstance(r.error, VhostUserDisconnectedError)
            with pytest.raises(VhostUserDisconnectedError):
                r.wait()
        backend.faults = None
        assert dev.reconnect() == 0  # all were failed already
        check_io(dev, image, sector=30)
    assert backend.errors == []
    assert backend.connections == 2


def test_nack(image: Path, sock: Path) -> None:
    with VhostUserBlkBackend(image, sock, faults={"nack": "SET_MEM_TABLE"}) as backend:
        with pytest.raises(VhostUserNackError) as err:
            BlkDevice.connect_vhost_user(sock)
        assert err.value.request == "SET_MEM_TABLE"
        # GET_CONFIG has its own way to fail: an empty reply.
        backend.faults = Faults(nack="GET_CONFIG")
        with pytest.raises(VhostUserNackError):
            BlkDevice.connect_vhost_user(sock)
        # GET_FEATURES cannot be NACKed at all: the back-end hangs up.
        backend.faults = Faults(nack=P.Request.GET_FEATURES)
        with pytest.raises(VhostUserDisconnectedError):
            BlkDevice.connect_vhost_user(sock)
        backend.faults = None
        with BlkDevice.connect_vhost_user(sock) as dev:
            check_io(dev, image)
    assert backend.errors == []


@pytest.mark.parametrize("kind", ["code", "flags", "size"])
@pytest.mark.parametrize("request_name", ["GET_FEATURES", "GET_VRING_BASE", "SET_VRING_ADDR"])
def test_garbage_reply(image: Path, sock: Path, kind: str, request_name: str) -> None:
    with VhostUserBlkBackend(image, sock, faults=Faults(garbage_reply=request_name,
                                                        garbage_kind=kind)):  # type: ignore[arg-type]
        if request_name == "GET_VRING_BASE":  # only sent when asked for
            with BlkDevice.connect_vhost_user(sock) as dev, \
                    pytest.raises(VhostUserProtocolError):
                dev.transport.get_vring_base(0)  # type: ignore[attr-defined]
        else:
            with pytest.raises(VhostUserProtocolError):
                BlkDevice.connect_vhost_user(sock)


@pytest.mark.parametrize("request_name", ["GET_CONFIG", "SET_VRING_ENABLE"])
def test_never_answer_times_out(image: Path, sock: Path, request_name: str) -> None:
    with VhostUserBlkBackend(image, sock, faults=Faults(never_answer=request_name)) as b:
        with pytest.raises(VhostUserTimeoutError) as err:
            BlkDevice.connect_vhost_user(sock, timeout=0.5)
        assert err.value.request == request_name
        b.faults = None
        with BlkDevice.connect_vhost_user(sock) as dev:
            check_io(dev, image)


def test_corrupt_used_ring(image: Path, sock: Path) -> None:
    with VhostUserBlkBackend(image, sock) as backend, \
            BlkDevice.connect_vhost_user(sock) as dev:
        check_io(dev, image)
        backend.faults = Faults(corrupt_used=True)
        with pytest.raises(QueueBrokenError) as info:
            dev.read(0, 512)
        assert isinstance(info.value.__cause__, DeviceProtocolError)


def test_stop_while_connected(image: Path, sock: Path) -> None:
    backend = VhostUserBlkBackend(image, sock).start()
    with BlkDevice.connect_vhost_user(sock) as dev:
        check_io(dev, image)
        backend.stop()
        assert not sock.exists()
        with pytest.raises(VhostUserDisconnectedError):
            dev.read(0, 512)


# -- the message layer on its own -----------------------------------------------------------


def raw_request(s: socket.socket, code: int, flags: int, payload: bytes = b"") -> bytes:
    s.sendall(P.pack_header(code, flags, len(payload)) + payload)
    return s.recv(64)


def test_unknown_request_nack_or_hang_up(backend: VhostUserBlkBackend, sock: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(os.fspath(sock))
        reply = raw_request(s, 99, P.VERSION | P.FLAG_NEED_REPLY)
        assert reply == P.pack_header(99, P.VERSION | P.FLAG_REPLY, 8) + P.U64.pack(1)
        # Without NEED_REPLY there is no way to say no: libvhost-user closes, so do we.
        assert raw_request(s, 99, P.VERSION) == b""
    backend.stop()
    assert [type(e) for e in backend.errors] == [FrontendProtocolError]


def test_get_config_out_of_range_is_an_empty_reply(backend: VhostUserBlkBackend,
                                                   sock: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(os.fspath(sock))
        ask = P.CONFIG_HEADER.pack(250, 8, 0) + bytes(8)
        assert raw_request(s, P.Request.GET_CONFIG, P.VERSION, ask) == \
            P.pack_header(P.Request.GET_CONFIG, P.VERSION | P.FLAG_REPLY, 0)
        ask = P.CONFIG_HEADER.pack(0, 8, 0) + bytes(8)
        reply = raw_request(s, P.Request.GET_CONFIG, P.VERSION, ask)
        assert struct.unpack_from("<Q", reply, P.HEADER.size + 12)[0] == SECTORS


def test_ring_split_across_regions_is_refused(backend: VhostUserBlkBackend,
                                              sock: Path) -> None:
    # The three ring parts must sit in one region here; a front-end that spreads them
    # over two gets the connection closed (and the reason recorded), not a crash.
    with MemfdRegion(8192) as a, MemfdRegion(8192) as b, \
            VhostUserFrontend.connect(sock) as fe:
        fe.set_owner()
        fe.set_features(fe.get_features())
        fe.set_mem_table([(0x10000, a.nbytes, a.host_addr, 0, a.fd),
                          (0x20000, b.nbytes, b.host_addr, 0, b.fd)])  # type: ignore[list-item]
        fe.set_vring_num(0, 8)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(0, desc=a.host_addr, used=b.host_addr, avail=a.host_addr + 256)
        kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
        try:
            fe.set_vring_kick(0, kick)
            fe.set_vring_call(0, call)
            fe.set_vring_enable(0, True)  # starts the ring: the back-end hangs up
            with pytest.raises(VhostUserDisconnectedError):
                fe.get_queue_num()
        finally:
            os.close(kick)
            os.close(call)
    backend.stop()
    assert [type(e) for e in backend.errors] == [FrontendProtocolError]
    assert "different regions" in str(backend.errors[0])


def test_wrong_protocol_peer(sock: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(os.fspath(sock))
    server.listen(1)

    def http() -> None:  # a web server where a vhost-user back-end was expected
        with contextlib.suppress(OSError), server.accept()[0] as conn:
            conn.recv(64)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    t = threading.Thread(target=http)
    t.start()
    try:
        with pytest.raises((VhostUserProtocolError, VhostUserDisconnectedError)):
            BlkDevice.connect_vhost_user(sock, timeout=5)
    finally:
        t.join()
        server.close()


def test_bad_socket_path(tmp_path: Path) -> None:
    with pytest.raises(VhostUserConnectError):
        BlkDevice.connect_vhost_user(tmp_path / "nothing-here.sock")
    (tmp_path / "plain-file").write_bytes(b"")
    with pytest.raises(VhostUserConnectError):
        BlkDevice.connect_vhost_user(tmp_path / "plain-file")


# -- a back-end process, killed --------------------------------------------------------------


def test_sigkill_then_reconnect_to_a_new_backend(image: Path, sock: Path) -> None:
    proc = BackendProcess(image, sock).start()
    try:
        dev = BlkDevice.connect_vhost_user(sock)
        with dev:
            check_io(dev, image, sector=11, fill=0x11)
            proc.kill()
            with pytest.raises(VhostUserDisconnectedError):
                dev.read(0, 512)
            # A new back-end on the same (stale) socket path; the rings resume.
            with VhostUserBlkBackend(image, sock) as backend:
                dev.reconnect()
                assert dev.read(11, 1024) == bytes([0x11]) * 1024  # the old write survived
                check_io(dev, image, sector=40, fill=0x40)
                dev.close()
            assert backend.errors == []
    finally:
        proc.stop()


def test_process_with_faults(image: Path, sock: Path) -> None:
    with BackendProcess(image, sock, faults=Faults(drop_after=2, out_of_order=True)), \
            BlkDevice.connect_vhost_user(sock) as dev:
        reqs = [dev.submit_read(s, 512) for s in range(4)]
        dev.wait(reqs, timeout=10)
        assert all(isinstance(r.error, VhostUserDisconnectedError) for r in reqs)
    assert not sock.exists()  # the child removed its socket on SIGTERM


# -- the fault specification ------------------------------------------------------------------


def test_faults_spec_round_trip() -> None:
    f = Faults(drop_after=3, nack="SET_MEM_TABLE", out_of_order=True)
    assert f.nack is P.Request.SET_MEM_TABLE
    assert Faults.parse(f.to_spec()) == f
    assert Faults.parse("") == Faults()
    assert Faults.coerce({"never_answer": "GET_CONFIG"}).never_answer is P.Request.GET_CONFIG
    with pytest.raises(ArgumentError):
        Faults(nack="NO_SUCH_REQUEST")
    with pytest.raises(ArgumentError):
        Faults.parse("explode")
    with pytest.raises(ArgumentError):
        Faults.parse("drop_after=soon")


def test_public_pytest_fixture_serves_the_pattern_image(virtq_embedded_blk):
    with BlkDevice.connect_vhost_user(virtq_embedded_blk.socket_path) as dev:
        assert dev.read(5, 512) == sector_pattern(5)
