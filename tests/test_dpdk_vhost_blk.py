"""DPDK's vhost_blk example, the packed-ring-only vhost-user-blk back-end, started by
:class:`~virtq.testing.runners.DpdkVhostBlk` (built by scripts/build-dpdk-vhost-blk.sh from
Debian's dpdk-doc).  Never skipped: a missing binary fails with the script to run."""

from __future__ import annotations

import os
import struct

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
from virtq.testing.runners import BackendError, DpdkVhostBlk, unix_socket_listening
from virtq.transport.vhost_user import VhostUserFrontend
from virtq.transport.vhost_user.protocol import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature

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
