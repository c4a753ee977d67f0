"""DPDK's vhost_blk example, the packed-ring-only vhost-user-blk back-end, started by
:class:`~virtq.testing.runners.DpdkVhostBlk` (built by scripts/build-dpdk-vhost-blk.sh from
Debian's dpdk-doc).  Never skipped: a missing binary fails with the script to run."""

from __future__ import annotations

import os
import random
import struct
import time
from contextlib import contextmanager

import psutil
import pytest

from virtq.abi import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from virtq.devices import BlkDevice
from virtq.devices.errors import BlkIOError
from virtq.errors import QueueStateError
from virtq.layout import PackedLayout
from virtq.memory import MemfdRegion
from virtq.queue import PackedQueue
from virtq.testing.runners import BackendError, DpdkVhostBlk, unix_socket_listening
from virtq.transport.vhost_user import VhostUserFrontend
from virtq.transport.vhost_user.protocol import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature

from .packed_spec_driver import SpecDriver

# What DPDK 22.11's librte_vhost offers by default, plus the two the example adds
# (vhost_dev_install_rte_compat_hooks: CONFIG and INFLIGHT_SHMFD).
EXPECTED_FEATURES = {VIRTIO_F_NOTIFY_ON_EMPTY, VHOST_USER_F_PROTOCOL_FEATURES,
                     VIRTIO_F_VERSION_1, VIRTIO_F_RING_PACKED}
PF = ProtocolFeature
EXPECTED_PROTOCOL_FEATURES = {PF.MQ, PF.LOG_SHMFD, PF.RARP, PF.REPLY_ACK, PF.MTU,
                              PF.BACKEND_REQ, PF.CRYPTO_SESSION, PF.CONFIG,
                              PF.BACKEND_SEND_FD, PF.HOST_NOTIFIER, PF.INFLIGHT_SHMFD,
                              PF.STATUS}


def bits(value: int) -> set[int]:
    return {b for b in range(64) if value >> b & 1}


def test_offers_the_packed_ring_only(virtq_dpdk_vhost_blk, no_leaks):
    backend = virtq_dpdk_vhost_blk
    with VhostUserFrontend.connect(backend.socket_path, timeout=10) as fe:
        features = fe.get_features()
        protocol = fe.get_protocol_features()
        assert features >> VIRTIO_F_RING_PACKED & 1
        assert not features & (1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_INDIRECT_DESC
                               | 1 << VIRTIO_F_IN_ORDER)
        assert bits(features) == EXPECTED_FEATURES
        assert bits(protocol) == EXPECTED_PROTOCOL_FEATURES
        fe.set_owner()
        fe.set_features(features)
        fe.set_protocol_features(protocol)
        # The virtio-blk config space (VIRTIO 1.2 §5.2.4) of the RAM disk.
        config = fe.get_config(0, 36)
        capacity, = struct.unpack_from("<Q", config, 0)
        blk_size, = struct.unpack_from("<I", config, 20)
        assert capacity * 512 == DpdkVhostBlk.CAPACITY
        assert blk_size == DpdkVhostBlk.BLOCK_SIZE
    assert backend.proc is not None and backend.proc.poll() is None  # serves the next one


def test_stop_is_clean_and_idempotent(tmp_path, no_leaks):
    workdir = tmp_path / "blk"
    backend = DpdkVhostBlk(workdir)
    with backend:
        pid = backend.pid
        sock = backend.socket_path
        assert sock == workdir.resolve() / "vhost.socket"
        assert unix_socket_listening(sock)
        proc = backend.proc
    assert backend.proc is None and proc is not None
    assert proc.returncode == 0  # its SIGINT handler unregistered the socket and exited
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not sock.exists() and not unix_socket_listening(sock)
    assert "binding succeeded" in (workdir / DpdkVhostBlk.LOG_NAME).read_text()
    backend.stop()  # idempotent


def test_kill_then_restart_in_the_same_directory(tmp_path, no_leaks):
    workdir = tmp_path / "blk"
    with DpdkVhostBlk(workdir) as crashed:
        crashed.kill()  # a crash: the socket file stays behind
        assert crashed.socket_path.exists()
        assert not unix_socket_listening(crashed.socket_path)
        # A new back-end in the same directory is not stopped by the stale socket file.
        with (DpdkVhostBlk(workdir) as again,
              VhostUserFrontend.connect(again.socket_path, timeout=10) as fe):
            assert fe.get_features() >> VIRTIO_F_RING_PACKED & 1
    assert not (workdir / "vhost.socket").exists()


def test_temporary_workdir_is_removed(no_leaks):
    backend = DpdkVhostBlk()
    with backend:
        workdir = backend.socket_path.parent
        assert workdir.is_dir()
    assert not workdir.exists()


def test_a_process_that_dies_at_start_is_reported(tmp_path, no_leaks):
    # EAL refuses an lcore this machine does not have: the process exits before listening.
    missing_lcore = (os.cpu_count() or 1) + 64
    backend = DpdkVhostBlk(tmp_path / "blk", lcores=str(missing_lcore))
    with pytest.raises(BackendError, match="exited"):
        backend.start()
    assert backend.proc is None


def test_a_missing_binary_names_the_build_script(tmp_path, monkeypatch):
    monkeypatch.setenv("VIRTQ_DPDK_VHOST_BLK", str(tmp_path / "nope"))
    with pytest.raises(BackendError, match=r"build-dpdk-vhost-blk\.sh"):
        DpdkVhostBlk(tmp_path).start()
    assert list(tmp_path.iterdir()) == []


def test_runs_in_its_own_session(virtq_dpdk_vhost_blk):
    # start_new_session: a Ctrl-C to the test run's process group does not reach the
    # back-end; stop() signals its pid alone.
    assert os.getsid(virtq_dpdk_vhost_blk.pid) == virtq_dpdk_vhost_blk.pid


# -- a packed ring served for real ---------------------------------------------------------------

GPA = 0x1_0000_0000  # guest-physical address of the region's byte 0
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT = 0, 1


@contextmanager
def packed_ring(backend: DpdkVhostBlk, n: int, *, wrap: int):
    """A packed ring of ``n`` entries on queue 0, set up by hand with VhostUserFrontend
    (no virtq driver queue involved) and driven by the test's spec driver."""
    layout = PackedLayout.compute(n, buffer_size=8192)
    with MemfdRegion(layout.nbytes) as region, \
            VhostUserFrontend.connect(backend.socket_path, timeout=10) as fe:
        kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
        drv = SpecDriver(region, layout, next_avail=0, avail_wrap=wrap, next_used=0,
                         used_wrap=wrap)
        try:
            fe.set_owner()
            fe.set_features(fe.get_features())
            fe.set_protocol_features(1 << PF.REPLY_ACK)
            uva = region.host_addr
            fe.set_mem_table([(GPA, region.nbytes, uva, region.fd_offset, region.fd)])
            fe.set_vring_num(0, n)
            # vhost-user.rst, packed rings: bits 0..14 the avail position, bit 15 its
            # wrap counter (QEMU's virtio_queue_packed_get_last_avail_idx encoding).
            fe.set_vring_base(0, wrap << 15)
            # For a packed ring "desc" is the descriptor ring, "avail" the driver area and
            # "used" the device area.
            fe.set_vring_addr(0, uva + layout.desc, uva + layout.device_event,
                              uva + layout.driver_event)
            fe.set_vring_kick(0, kick)
            fe.set_vring_call(0, call)
            fe.set_vring_enable(0, True)
            yield drv, layout, region, kick, fe
        finally:
            drv.close()
            os.close(kick)
            os.close(call)


def blk_request(drv: SpecDriver, layout: PackedLayout, region: MemfdRegion, kick: int,
                buffer_id: int, kind: int, sector: int, data: bytes | None) -> tuple[int, bytes]:
    """One virtio-blk request (VIRTIO 1.2 §5.2.6: header, data, status) in buffer
    ``buffer_id``'s slot; returns (status, the data buffer afterwards)."""
    off = layout.buffer(buffer_id)
    region.view(off, 16)[:] = struct.pack("<IIQ", kind, 0, sector)
    if data is not None:
        region.view(off + 16, 4096)[:] = data
    region.view(off + 16 + 4096, 1)[:] = b"\xff"
    drv.add(buffer_id, [(GPA + off, 16, False), (GPA + off + 16, 4096, kind == VIRTIO_BLK_T_IN),
                        (GPA + off + 16 + 4096, 1, True)])
    os.write(kick, (1).to_bytes(8, "little"))
    deadline = time.monotonic() + 10
    while (used := drv.get_used()) is None:
        assert time.monotonic() < deadline, "vhost_blk did not complete the request"
        time.sleep(0.001)
    assert used[0] == buffer_id
    # The example leaves the head descriptor's len and WRITE bit in the used descriptor
    # (enqueue_task_packed writes only id, addr and the AVAIL/USED bits): the status
    # byte, not the used length, says how the request went.
    return bytes(region.view(off + 16 + 4096, 1))[0], bytes(region.view(off + 16, 4096))


def test_serves_a_packed_ring_started_with_wrap_counter_0(virtq_dpdk_vhost_blk, no_leaks):
    """Writes and reads back through several laps of an 8-entry ring (3 descriptors a
    request), so both of the device's wrap counters toggle.  The ring starts with wrap
    counter 0: new_device() of the example (DPDK 22.11) reads the avail position with
    rte_vhost_get_vring_base without masking the wrap bit, and its own wrap counters stay 0
    unless INFLIGHT_SHMFD took the resubmission path -- which its feature-word check never
    does -- so the spec's start state (wrap counter 1, SET_VRING_BASE 0x8000) is never
    served."""
    n = 8
    with packed_ring(virtq_dpdk_vhost_blk, n, wrap=0) as (drv, layout, region, kick, fe):
        for i in range(10):
            pattern = bytes((i * 31 + j) & 0xFF for j in range(4096))
            status, _ = blk_request(drv, layout, region, kick, i % n, VIRTIO_BLK_T_OUT,
                                    8 * i, pattern)
            assert status == 0
            status, back = blk_request(drv, layout, region, kick, (i + 1) % n,
                                       VIRTIO_BLK_T_IN, 8 * i, None)
            assert (status, back) == (0, pattern)
        assert (drv.next_avail, drv.avail_wrap) == (60 % n, (60 // n) & 1)
        # GET_VRING_BASE stops the ring and answers position | wrap counter << 15.
        assert fe.get_vring_base(0) == drv.next_avail | drv.avail_wrap << 15


def test_stop_while_a_ring_is_being_served(tmp_path, no_leaks):
    # The worker thread busy-polls while the front-end is connected; SIGINT's handler
    # stops it (destroy_device) before exiting.
    with DpdkVhostBlk(tmp_path / "blk") as backend, \
            packed_ring(backend, 8, wrap=0) as (drv, layout, region, kick, _):
        status, _ = blk_request(drv, layout, region, kick, 0, VIRTIO_BLK_T_OUT, 0,
                                bytes(4096))
        assert status == 0
        proc = backend.proc
        backend.stop()
        assert proc is not None and proc.returncode == 0


@contextmanager
def blk_device(backend: DpdkVhostBlk, **options: object):
    """BlkDevice on the example's packed ring, started at position 0 with wrap counter 0:
    the only start it serves (see the test above)."""
    dev = BlkDevice.connect_vhost_user(backend.socket_path, ring="packed", start_index=0,
                                       timeout=10, **options)  # type: ignore[arg-type]
    try:
        yield dev
    finally:
        dev.close()


@pytest.mark.parametrize("poll", [True, False], ids=["poll", "notify"])
def test_blk_device_over_the_packed_only_back_end(virtq_dpdk_vhost_blk, no_leaks, poll):
    """BlkDevice, unchanged, on a packed ring served by an independent C back-end: write,
    read back, many requests in flight around the ring, and the device's error statuses."""
    rng = random.Random(3)
    with blk_device(virtq_dpdk_vhost_blk, poll=poll, queue_size=32) as blk:
        assert blk.ring == "packed"
        assert blk.features >> VIRTIO_F_RING_PACKED & 1
        assert all(isinstance(q, PackedQueue) for q in blk.queues)
        assert blk.capacity == 128 * 1024 * 1024 // 512  # config capacity, 512-byte sectors
        data = {s: rng.randbytes(4096) for s in range(0, 8 * 64, 8)}
        for s, payload in data.items():
            blk.write(s, payload)
        for s, payload in data.items():
            assert blk.read(s, 4096) == payload
        # Eight reads in flight at a time (24 of the 32 ring entries: 3-descriptor chains),
        # eight rounds: both wrap counters toggle many times.
        sectors = list(data)
        for k in range(0, len(sectors), 8):
            reqs = [blk.submit_read(s, 4096) for s in sectors[k : k + 8]]
            blk.wait(reqs)
            assert [r.wait() for r in reqs] == [data[s] for s in sectors[k : k + 8]]
        big = rng.randbytes(64 * 1024)
        blk.write(4096, big)
        assert blk.read(4096, len(big)) == big
        # No VIRTIO_BLK_F_FLUSH offered: flush() says so.  The example answers every
        # request it does not serve with VIRTIO_BLK_S_IOERR (vhost_blk.c turns any non-OK
        # result into IOERR): a FLUSH sent anyway, and every GET_ID (blk.c tests
        # `task->data_len` where it means `!task->data_len`).  Each is a clear BlkIOError
        # and the queue goes on.
        assert not blk.config.flush_supported
        with pytest.raises(QueueStateError, match="FLUSH"):
            blk.flush()
        with pytest.raises(BlkIOError, match="flush"):
            blk.submit_flush().wait()
        with pytest.raises(BlkIOError, match=r"^get_id .*I/O error") as info:
            blk.get_id()
        assert info.value.status == 1  # VIRTIO_BLK_S_IOERR
        assert blk.read(0, 4096) == data[0]
        # Reading past the end is not tried here: the example bounds only the length of a
        # request, not its sector, and would memcpy beyond its RAM disk (blk.c
        # vhost_bdev_process_blk_commands).  tests/test_vhost_user_blk.py reads past the end
        # of qemu-storage-daemon's disk (BlkIOError).
        assert [(q["state"], q["in_flight"]) for q in blk.stats()] == [("ready", 0)]
