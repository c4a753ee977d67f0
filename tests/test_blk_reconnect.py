"""Reconnect that loses nothing: BlkDevice with a ReconnectPolicy against real back-ends
killed the way a crash kills them (SIGKILL) and started again on the same socket.

Two ways for a request to survive, both run here:

* the driver resubmits (qemu-storage-daemon 7.2 offers no INFLIGHT_SHMFD: checked below
  against the real binary; the embedded back-end without ``inflight``);
* the back-end resubmits from its inflight region (the embedded back-end with
  ``inflight=True``), and the driver keeps its rings and resubmits nothing.

The crash tests keep QD 128 of mixed 4 KiB reads and writes going over 4 queues
(:class:`virtq.testing.crash.StampedWorkload`), kill the back-end at a seeded moment,
start it again 200 ms later, and check that every request completed exactly once without
an error and that the image equals the model of every acknowledged write.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from virtq.devices import BlkDevice, ReconnectError, ReconnectPolicy
from virtq.errors import ArgumentError, QueueStateError
from virtq.memory import MemfdRegion
from virtq.testing.crash import StampedWorkload, block_data
from virtq.testing.embedded import BackendProcess, Faults, VhostUserBlkBackend
from virtq.testing.embedded.inflight import InflightBuffer
from virtq.testing.runners import QemuStorageDaemon, sector_pattern
from virtq.transport.errors import DeviceRefusedError
from virtq.transport.vhost_user import VhostUserDisconnectedError, VhostUserFrontend
from virtq.transport.vhost_user import protocol as P

IMAGE_BYTES = 16 << 20  # the plugin's image
BLOCKS = IMAGE_BYTES // 4096
QUICK = ReconnectPolicy(timeout=30.0, interval=0.02)


def expected(sector: int, nbytes: int) -> bytes:
    return b"".join(sector_pattern(s) for s in range(sector, sector + nbytes // 512))


class Restarter:
    """Kill a back-end (``jitter()`` seconds from now) and start it again ``delay``
    seconds later, in a thread (the driver goes on meanwhile); :meth:`join` re-raises what
    the restart raised.

    With ``holding`` (a count of what the back-end holds, e.g. its inflight buffer's) the
    kill is not immediate: a thread freezes the back-end (SIGSTOP) again and again, while
    the driver goes on, until it holds something, and SIGKILLs it frozen -- so what it
    held at its death is exactly what was counted (:attr:`held`)."""

    def __init__(self, backend: Any, delay: float = 0.2,
                 jitter: Callable[[], float] | None = None,
                 holding: Callable[[], int] | None = None) -> None:
        self.backend = backend
        self.delay = delay
        self.jitter = jitter
        self.holding = holding
        self.held = 0
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.kills = 0
        self.killed = threading.Event()

    def __call__(self) -> None:
        if self.jitter:
            time.sleep(self.jitter())  # somewhere in the back-end's batch
        if self.holding is None:
            self._kill()
            target = self._restart
        else:
            target = self._freeze_then_kill
        t = threading.Thread(target=target)
        t.start()
        self.threads.append(t)

    def _kill(self) -> None:
        self.backend.kill()
        self.kills += 1
        self.killed.set()

    def _freeze_then_kill(self) -> None:
        assert self.holding is not None
        try:
            proc = psutil.Process(self.backend.pid)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                proc.send_signal(signal.SIGSTOP)
                while (status := proc.status()) != psutil.STATUS_STOPPED:
                    if status == psutil.STATUS_ZOMBIE:
                        raise AssertionError("the back-end died on its own")
                    time.sleep(0.0001)
                self.held = self.holding()
                if self.held:
                    break
                proc.send_signal(signal.SIGCONT)
                time.sleep(0.0005)
            self._kill()
        except BaseException as exc:  # re-raised by join()
            self.errors.append(exc)
            self.killed.set()
            return
        self._restart()

    def _restart(self) -> None:
        time.sleep(self.delay)
        try:
            self.backend.start()
        except BaseException as exc:  # re-raised by join()
            self.errors.append(exc)

    def join(self) -> None:
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def image(virtq_blk_image: Path) -> Path:
    return virtq_blk_image


def crash_run(dev: BlkDevice, image: Path, restarter: Restarter, seed: int,
              completions: int = 1500) -> StampedWorkload:
    """The crash test's body: QD 128 mixed 4 KiB I/O, one kill at a seeded moment: after
    a seeded number of completions, a seeded 0-3 ms into the back-end's next batch."""
    rng = random.Random(seed)
    kill_at = rng.randrange(150, completions - 300)
    restarter.jitter = lambda: rng.uniform(0.0, 0.003)
    work = StampedWorkload(dev, blocks=BLOCKS, depth=128, seed=seed)
    try:
        work.run(completions, at={kill_at: restarter})
        while not restarter.killed.is_set():  # a freezing restarter kills when it can
            work.run(50)
        work.run(200)  # those in flight at the kill can only complete after a reconnect
    finally:
        restarter.join()  # a failed restart is the first thing to report
    assert restarter.kills == 1
    # Every request completed exactly once and without an error (run() checks each
    # completion), every read matched the model when it completed, and the image holds
    # exactly the acknowledged writes.
    assert work.stats.completed >= completions
    assert work.verify(image) > 0
    stats = dev.reconnect_stats()
    assert stats["reconnects"] == 1 and not stats["waiting"]
    per_queue = dev.stats()
    assert all(q["failed"] == 0 and q["in_flight"] == 0 for q in per_queue)
    assert sum(q["completed"] for q in per_queue) == work.stats.completed
    assert all(q["completed"] > 0 for q in per_queue)
    return work


SEEDS = [1, 2] + [pytest.param(s, marks=pytest.mark.slow) for s in range(3, 13)]


@pytest.mark.parametrize("seed", SEEDS)
def test_crash_qsd_4_queues_driver_resubmits(image: Path, tmp_path: Path, seed: int) -> None:
    sock = tmp_path / "crash.sock"
    qsd = QemuStorageDaemon(image, sock, num_queues=4).start()
    try:
        with BlkDevice.connect_vhost_user(sock, num_queues=4, queue_size=128,
                                          reconnect=QUICK) as dev:
            assert dev.transport.inflight_region is None  # QSD 7.2: no INFLIGHT_SHMFD
            crash_run(dev, image, Restarter(qsd), seed)
            stats = dev.reconnect_stats()
            assert stats["resumed"] == 0  # every kept request went back by the driver
            assert sum(q["resubmitted"] for q in dev.stats()) == stats["resubmitted"]
    finally:
        qsd.stop()


@pytest.mark.parametrize("seed", SEEDS)
def test_crash_embedded_4_queues_backend_resubmits(image: Path, tmp_path: Path,
                                                   seed: int) -> None:
    sock = tmp_path / "crash.sock"
    backend = BackendProcess(image, sock, num_queues=4, inflight=True).start()
    try:
        with BlkDevice.connect_vhost_user(sock, num_queues=4, queue_size=128,
                                          reconnect=QUICK) as dev:
            region = dev.transport.inflight_region
            assert region is not None and region.num_queues == 4
            # The test looks into the buffer the front-end keeps, to kill the back-end
            # while it has taken requests and not completed them: the new one must
            # carry those out from the buffer.
            buf = InflightBuffer(MemfdRegion.attach(region.fd, region.mmap_size),
                                 region.num_queues, region.queue_size)
            restarter = Restarter(backend, holding=buf.in_flight)
            try:
                crash_run(dev, image, restarter, seed, completions=1000)
            finally:
                buf.close()
            assert restarter.held > 0
            # The rings were kept: the back-end carried out what was in flight, the
            # driver resubmitted nothing.
            stats = dev.reconnect_stats()
            assert stats["resubmitted"] == 0 and stats["resumed"] >= restarter.held
            assert all(q["resubmitted"] == 0 for q in dev.stats())
    finally:
        backend.stop()


# -- the back-end resubmits from its inflight region, deterministically ------------------


def test_inflight_backend_resumes_taken_requests(image: Path, tmp_path: Path,
                                                 no_leaks: None) -> None:
    """The embedded back-end drops the connection after taking 8 requests (served, not
    completed: the writes are done, their completions not), every time.  With the
    inflight region each new session first carries out the 8 its predecessor took; the
    driver resubmits nothing and sees each completion once."""
    sock = tmp_path / "i.sock"
    with VhostUserBlkBackend(image, sock, inflight=True,
                             faults=Faults(drop_after=8)) as backend, \
            BlkDevice.connect_vhost_user(sock, reconnect=QUICK) as dev:
        assert dev.transport.inflight_region is not None
        writes = [dev.submit_write(i * 8, block_data(i, 100 + i)) for i in range(20)]
        done: list[Any] = []
        deadline = time.monotonic() + 30
        while len(done) < 20 and time.monotonic() < deadline:
            done += dev.poll(timeout=1.0)
        assert sorted(map(id, done)) == sorted(map(id, writes))  # each exactly once
        assert all(w.error is None for w in writes)
        stats = dev.reconnect_stats()
        # Sessions of 8, 8 and 4.  (The second may drop before the front-end finished
        # setting it up: then one reconnect took two attempts.)
        assert backend.connections == 3
        assert stats["reconnects"] in (1, 2)
        assert stats["resubmitted"] == 0
        # The back-end completed 8 resumed + 8 resumed + 4 new... and nothing twice.
        assert len(backend.completed) == 20
        assert sorted(r.sector for r in backend.completed) == [i * 8 for i in range(20)]
        backend.faults = Faults()
        for i in range(20):
            assert dev.read(i * 8, 4096) == block_data(i, 100 + i)


def test_without_inflight_the_driver_resubmits_taken_requests(image: Path, tmp_path: Path,
                                                              no_leaks: None) -> None:
    """The same back-end without ``inflight``, dropping its first connection only: the
    driver resets the ring and resubmits every request not completed -- the 3 the
    back-end had taken (2 of them written) and the 3 it had not."""
    sock = tmp_path / "d.sock"
    with VhostUserBlkBackend(image, sock, faults=Faults(drop_after=3, sessions=1)) \
            as backend, BlkDevice.connect_vhost_user(sock, reconnect=QUICK) as dev:
        assert dev.transport.inflight_region is None
        writes = [dev.submit_write(i * 8, block_data(i, 7)) for i in range(6)]
        done: list[Any] = []
        deadline = time.monotonic() + 30
        while len(done) < 6 and time.monotonic() < deadline:
            done += dev.poll(timeout=1.0)
        assert sorted(map(id, done)) == sorted(map(id, writes))  # each exactly once
        assert all(w.error is None for w in writes)
        stats = dev.reconnect_stats()
        assert stats["reconnects"] == 1
        assert stats["resubmitted"] == 6 and stats["resumed"] == 0
        assert backend.connections == 2
        assert sorted(r.sector for r in backend.completed) == [i * 8 for i in range(6)]
        for i in range(6):
            assert dev.read(i * 8, 4096) == block_data(i, 7)


def test_qsd_7_2_offers_no_inflight_shmfd(virtq_qsd: QemuStorageDaemon) -> None:
    """Asked of the real binary: the driver-resubmits path is the one QSD takes."""
    with VhostUserFrontend.connect(virtq_qsd.socket_path) as fe:
        fe.set_owner()
        assert fe.get_features() >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1
        offered = fe.get_protocol_features()
    assert not offered >> P.ProtocolFeature.INFLIGHT_SHMFD & 1
    assert offered >> P.ProtocolFeature.MQ & 1


# -- the deadline, and what is refused --------------------------------------------------------


def test_deadline_fails_every_kept_request_with_reconnect_error(
        image: Path, tmp_path: Path, no_leaks: None) -> None:
    sock = tmp_path / "gone.sock"
    qsd = QemuStorageDaemon(image, sock, num_queues=2).start()
    try:
        with BlkDevice.connect_vhost_user(
                sock, num_queues=2, reconnect=ReconnectPolicy(timeout=0.5, interval=0.05)
        ) as dev:
            freeze(qsd.pid)  # hold them in flight
            reqs = [dev.submit_read(i * 8, 4096) for i in range(16)]
            reqs.append(dev.submit_flush())
            reqs.append(dev.submit_write(900, b"x" * 4096))
            dev.kick()
            qsd.kill()  # and it never comes back
            dev.wait(timeout=30)
            for r in reqs:
                assert isinstance(r.error, ReconnectError), r.error
                assert isinstance(r.error.__cause__, VhostUserDisconnectedError)
                assert "0.5 s" in str(r.error) and f"sector {r.sector}" in str(r.error)
                # Kept until the deadline (not failed at once), trying all along.
                assert r.error.elapsed >= 0.5
                assert r.error.attempts >= 2 and r.error.last_error is not None
                with pytest.raises(ReconnectError):
                    r.wait()
            assert len({id(r.error) for r in reqs}) == len(reqs)  # one error each
            assert dev.in_flight == 0
            assert sum(q["failed"] for q in dev.stats()) == len(reqs)
            with pytest.raises(QueueStateError, match="did not come back") as info:
                dev.submit_read(0, 512)
            assert isinstance(info.value.__cause__, ReconnectError)
            assert dev.poll(timeout=0) == []
            # A back-end later: reconnect() by hand, and the device works again.
            qsd.start()
            assert dev.reconnect() == 0  # all had failed already
            assert dev.read(8, 4096) == expected(8, 4096)
    finally:
        qsd.stop()


def test_a_backend_with_fewer_features_fails_the_requests_at_once(
        image: Path, tmp_path: Path, no_leaks: None) -> None:
    sock = tmp_path / "f.sock"
    backend = BackendProcess(image, sock, num_queues=2).start()
    try:
        with BlkDevice.connect_vhost_user(sock, num_queues=2, reconnect=QUICK) as dev:
            assert dev.read(0, 512) == sector_pattern(0)
            freeze(backend.pid)
            reqs = [dev.submit_read(i * 8, 4096) for i in range(4)]
            dev.kick()
            backend.kill()
            backend.stop()
            # One queue only: no VIRTIO_BLK_F_MQ, which was negotiated.
            backend = BackendProcess(image, sock, num_queues=1).start()
            dev.wait(reqs, timeout=30)
            for r in reqs:
                # Failed at the refusal, not at the deadline: waiting would not help.
                assert isinstance(r.error, ReconnectError)
                assert "cannot serve" in str(r.error)
                assert r.error.elapsed < QUICK.timeout
                assert isinstance(r.error.last_error, DeviceRefusedError)
                assert "lacks negotiated features" in str(r.error.last_error)
    finally:
        backend.stop()


def test_policy_arguments() -> None:
    with pytest.raises(ArgumentError):
        ReconnectPolicy(timeout=0)
    with pytest.raises(ArgumentError):
        ReconnectPolicy(timeout=float("inf"))
    with pytest.raises(ArgumentError):
        ReconnectPolicy(interval=-1)
    with pytest.raises(ArgumentError):
        ReconnectPolicy(inflight=1)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError):
        BlkDevice.connect_vhost_user("/nonexistent", reconnect=30.0)  # type: ignore[arg-type]


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_outage_seen_by_an_event_loop_style_poll(image: Path, tmp_path: Path) -> None:
    """poll(0) never waits for the back-end: it tries a connection at most once per
    interval and returns; the requests stay in flight until one succeeds."""
    sock = tmp_path / "p0.sock"
    qsd = QemuStorageDaemon(image, sock).start()
    try:
        with BlkDevice.connect_vhost_user(sock, reconnect=QUICK) as dev:
            freeze(qsd.pid)
            reqs = [dev.submit_read(i * 8, 4096) for i in range(8)]
            dev.kick()
            qsd.kill()
            # poll(0) finds nothing, looks at the connection, and the outage begins.
            _wait_for(lambda: dev.poll(0) == [] and bool(dev.reconnect_stats()["waiting"]))
            assert dev.in_flight == 8
            assert dev.poll(0) == []
            assert dev.reconnect_stats()["waiting"]
            more = dev.submit_read(800, 4096)  # accepted while waiting: kept as well
            qsd.start()
            got: list[Any] = []
            _wait_for(lambda: bool(got.extend(dev.poll(0))) or len(got) == 9)
            assert {id(r) for r in got} == {id(r) for r in [*reqs, more]}
            for r in [*reqs, more]:
                assert r.wait() == expected(r.sector, 4096)
    finally:
        qsd.stop()



@pytest.mark.parametrize("then", ["comes back", "never comes back"])
def test_an_attempt_that_fails_half_way_loses_nothing(image: Path, tmp_path: Path,
                                                      no_leaks: None, then: str) -> None:
    """The first back-end dies; the second refuses SET_VRING_ADDR -- after the rings were
    reset for it, so the kept requests are in no ring any more.  They still count as in
    flight, and they are resubmitted by the next successful reconnect (or fail at the
    deadline), each once."""
    sock = tmp_path / "h.sock"
    policy = ReconnectPolicy(timeout=30.0 if then == "comes back" else 2.0, interval=0.01)
    with VhostUserBlkBackend(image, sock, faults=Faults(drop_after=1)) as backend, \
            BlkDevice.connect_vhost_user(sock, reconnect=policy) as dev:
        reqs = [dev.submit_read(i * 8, 4096) for i in range(6)]
        dev.kick()
        _wait_for(lambda: _dead(dev))
        backend.faults = Faults(nack="SET_VRING_ADDR")
        assert dev.poll(timeout=0) == []  # notices, tries once: refused half-way
        assert dev.reconnect_stats()["waiting"]
        assert all(q.num_in_flight == 0 for q in dev.queues)  # the rings were reset
        assert dev.in_flight == 6
        assert [q["in_flight"] for q in dev.stats()] == [6]
        if then == "comes back":
            backend.faults = Faults()
        done: list[Any] = []
        deadline = time.monotonic() + 30
        while len(done) < 6 and time.monotonic() < deadline:
            done += dev.poll(timeout=1.0)
        assert sorted(map(id, done)) == sorted(map(id, reqs))
        if then == "comes back":
            assert all(r.wait() == expected(r.sector, 4096) for r in reqs)
            assert dev.reconnect_stats()["resubmitted"] == 6
        else:
            assert all(isinstance(r.error, ReconnectError) for r in reqs)
            assert dev.in_flight == 0


def freeze(pid: int | None) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped: from then on it takes nothing more
    from the rings (kill(2) returns before the signal is acted on)."""
    assert pid is not None
    proc = psutil.Process(pid)
    proc.send_signal(signal.SIGSTOP)
    _wait_for(lambda: proc.status() == psutil.STATUS_STOPPED)


def _dead(dev: BlkDevice) -> bool:
    try:
        dev.transport.check_alive()
    except VhostUserDisconnectedError:
        return True
    return False


@pytest.mark.parametrize("poll", [False, True], ids=["eventfd", "poll"])
def test_killed_with_32_in_flight_all_complete_after_the_restart(image: Path, tmp_path: Path,
                                                                 poll: bool) -> None:
    """test_vhost_user_blk's kill test, with a policy: the requests are kept, not failed,
    whether the device sleeps on eventfds or spins on the used rings."""
    sock = tmp_path / "k.sock"
    qsd = QemuStorageDaemon(image, sock).start()
    try:
        with BlkDevice.connect_vhost_user(sock, poll=poll, reconnect=QUICK) as dev:
            freeze(qsd.pid)
            reqs = [dev.submit_read(i * 8, 4096) for i in range(32)]
            dev.kick()
            restarter = Restarter(qsd)
            restarter()
            dev.wait(reqs, timeout=30)
            restarter.join()
            for r in reqs:
                assert r.wait() == expected(r.sector, 4096)
            assert dev.reconnect_stats()["resubmitted"] == 32
    finally:
        qsd.stop()
