"""BlkDevice over several request queues (VIRTIO_BLK_F_MQ) against real back-ends:
qemu-storage-daemon with ``num-queues=4``, and the embedded back-end for a device error
on one queue."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from virtq.devices import BlkDevice, BlkRequest
from virtq.errors import ArgumentError, QueueBrokenError, QueueStateError
from virtq.testing.embedded import Faults, VhostUserBlkBackend
from virtq.testing.runners import QemuStorageDaemon, sector_pattern

IMAGE_BYTES = 16 << 20


def expected(sector: int, nbytes: int) -> bytes:
    return b"".join(sector_pattern(s) for s in range(sector, sector + nbytes // 512))


@pytest.fixture
def qsd4(virtq_blk_image: Path, tmp_path: Path) -> Any:
    with QemuStorageDaemon(virtq_blk_image, tmp_path / "mq.sock", num_queues=4) as qsd:
        yield qsd


def test_four_queues_carry_data_and_each_is_used(qsd4: QemuStorageDaemon,
                                                 virtq_blk_image: Path,
                                                 no_leaks: None) -> None:
    with BlkDevice.connect_vhost_user(qsd4.socket_path, num_queues=4) as dev:
        assert dev.num_queues == 4
        # One waiter over every queue's call fd.
        assert len(set(dev.waiter.fds())) == 4
        writes = {i: os.urandom(4096) for i in range(0, 64 * 8, 8)}
        reqs = [dev.submit_write(sector, data) for sector, data in writes.items()]
        dev.wait(reqs, timeout=30)
        assert all(r.error is None for r in reqs)
        assert {r.queue for r in reqs} == {0, 1, 2, 3}  # round-robin
        reads = [dev.submit_read(sector, 4096) for sector in writes]
        reads += [dev.submit_read(s, 4096) for s in range(4096, 4096 + 32 * 8, 8)]
        dev.wait(reads, timeout=30)
        for r in reads:
            want = writes.get(r.sector) or expected(r.sector, 4096)
            assert r.wait() == want
        stats = dev.stats()
        assert [q["submitted"] for q in stats] == [40, 40, 40, 40]
        assert [q["completed"] for q in stats] == [40, 40, 40, 40]
        assert all(q["in_flight"] == 0 and q["failed"] == 0 for q in stats)
        dev.flush()
        # The back-end's own count of what each ring carried (GET_VRING_BASE stops it).
        bases = [dev.transport.get_vring_base(i) for i in range(4)]
        assert all(b > 0 for b in bases), bases
        assert bases == [q.vring_base for q in dev.queues] == [41, 40, 40, 40]
    with open(virtq_blk_image, "rb") as f:
        for sector, data in writes.items():
            f.seek(sector * 512)
            assert f.read(4096) == data


def test_queue_argument_routes_to_one_queue(qsd4: QemuStorageDaemon) -> None:
    with BlkDevice.connect_vhost_user(qsd4.socket_path, num_queues=4) as dev:
        reqs = [dev.submit_read(s, 4096, queue=2) for s in range(0, 80, 8)]
        reqs += dev.submit_read_many(list(range(80, 160, 8)), 4096, queue=2)
        reqs.append(dev.submit_write(200, b"q" * 4096, queue=2))
        reqs.append(dev.submit_get_id(queue=2))
        dev.wait(reqs, timeout=30)
        assert {r.queue for r in reqs} == {2}
        for r in reqs[:20]:
            assert r.wait() == expected(r.sector, 4096)
        assert dev.submit_flush(queue=2).wait(timeout=30) is None
        assert [q["submitted"] for q in dev.stats()] == [0, 0, 23, 0]
        assert [dev.transport.get_vring_base(i) for i in range(4)] == [0, 0, 23, 0]
        for bad in (4, -1, True, 2.0):
            with pytest.raises(ArgumentError):
                dev.submit_read(0, 512, queue=bad)  # type: ignore[arg-type]


def test_one_poll_reaps_every_queue(qsd4: QemuStorageDaemon) -> None:
    with BlkDevice.connect_vhost_user(qsd4.socket_path, num_queues=4) as dev:
        reqs = [dev.submit_read(s, 4096, queue=s // 8 % 4) for s in range(0, 64 * 8, 8)]
        done: list[BlkRequest] = []
        while len(done) < len(reqs):
            done += dev.poll(timeout=10, min_completions=len(reqs) - len(done))
        assert sorted(map(id, done)) == sorted(map(id, reqs))
        assert {r.queue for r in done} == {0, 1, 2, 3}


def test_a_device_error_on_one_queue_loses_no_other_completion(
        virtq_blk_image: Path, tmp_path: Path, no_leaks: None) -> None:
    """The embedded back-end completes each batch on queue 1 with a head no driver owns:
    queue 1 breaks; every request on queues 0, 2, 3 completes with its data, in the same
    polls; queue 1's fail with QueueBrokenError; the device goes on with three queues."""
    sock = tmp_path / "bad.sock"
    with VhostUserBlkBackend(virtq_blk_image, sock, num_queues=4,
                             faults=Faults(corrupt_used=True, queue=1)), \
            BlkDevice.connect_vhost_user(sock, num_queues=4) as dev:
        reqs = [dev.submit_read(s, 4096) for s in range(0, 32 * 8, 8)]
        done: list[BlkRequest] = []
        while len(done) < len(reqs):
            got = dev.poll(timeout=10)
            assert got
            done += got
        assert sorted(map(id, done)) == sorted(map(id, reqs))  # each exactly once
        for r in reqs:
            if r.queue == 1:
                assert isinstance(r.error, QueueBrokenError)
            else:
                assert r.error is None
                assert r.wait() == expected(r.sector, 4096)
        stats = dev.stats()
        assert stats[1]["state"] == "broken" and stats[1]["failed"] == 8
        assert [q["completed"] for q in stats] == [8, 0, 8, 8]
        # New requests skip the broken queue; naming it says why.
        more = [dev.submit_read(s, 4096) for s in range(0, 12 * 8, 8)]
        assert 1 not in {r.queue for r in more}
        dev.wait(more, timeout=30)
        assert all(r.error is None for r in more)
        with pytest.raises(QueueStateError, match="queue 1 is broken") as info:
            dev.submit_read(0, 512, queue=1)
        assert isinstance(info.value.__cause__, Exception)


@pytest.mark.parametrize("queue", [0, 3])
def test_batch_refill_on_one_queue(qsd4: QemuStorageDaemon, queue: int,
                                   no_leaks: None) -> None:
    """submit_read_many(queue=q) takes the batch path on that queue: the device's slots
    of queue q (not queue 0's) carry the headers and buffers, refills repeat them."""
    with BlkDevice.connect_vhost_user(qsd4.socket_path, num_queues=4) as dev:
        arena = dev.alloc_buffer(16 * 4096)
        bufs = [arena.slice(i * 4096, 4096) for i in range(16)]
        for rnd in range(5):
            sectors = [(rnd * 16 + i) * 8 for i in range(16)]
            reqs = dev.submit_read_many(sectors, into=bufs, queue=queue)
            copied = dev.submit_read_many(sectors[:4], 4096, queue=queue)
            dev.wait([*reqs, *copied], timeout=30)
            assert {r.queue for r in [*reqs, *copied]} == {queue}
            for r, buf in zip(reqs, bufs, strict=True):
                assert r.error is None
                with buf.view() as v:
                    assert bytes(v) == expected(r.sector, 4096)
            for r in copied:
                assert r.wait() == expected(r.sector, 4096)
        assert [q["submitted"] for q in dev.stats()][queue] == 100
        del bufs, arena
