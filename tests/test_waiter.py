"""The one completion waiter (issue 12 item 5): all of a device's queues at once, a
deadline on every path, fds for event loops, and safe against close() from another
thread."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from virtq.devices import BlkDevice
from virtq.errors import DeviceProtocolError, QueueStateError, VirtqError
from virtq.layout import SplitLayout
from virtq.queue import SplitQueue
from virtq.testing.loopback import LoopbackTransport
from virtq.transport import NotificationSet, Waiter
from virtq.transport.vhost_user import VhostUserDisconnectedError, VhostUserTransport

BASE = 0x4000_0000


def in_thread(fn, timeout=20.0):
    """Run ``fn`` in a thread; its result or exception, or fail if it does not end."""
    box: dict[str, object] = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} did not return within {timeout} s"
    return box


class EventfdTransport(LoopbackTransport):
    """The loopback transport with a real eventfd per queue, signalled by the test: a
    device that notifies (polling False)."""

    def __init__(self, nqueues: int) -> None:
        super().__init__(features=1 << 32, queue_sizes=[8] * nqueues, config=b"")
        self.notifier = NotificationSet("test transport")
        self.efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nqueues)]
        for i, fd in enumerate(self.efds):
            self.notifier.add(i, fd)

    @property
    def polling(self) -> bool:
        return False

    def notification_fds(self) -> list[int]:
        return self.notifier.fds()

    def drain_notifications(self) -> bool:
        return self.notifier.drain()

    def wait(self, timeout: float | None) -> bool:
        self._check()
        return self.notifier.wait(timeout)

    def close(self) -> None:
        self.notifier.shutdown()
        for fd in self.efds:
            os.close(fd)
        self.efds = []
        super().close()


def queues_on(t: EventfdTransport, n: int) -> list[SplitQueue]:
    layout = SplitLayout.compute(8, buffer_size=64)
    qs = []
    for i in range(n):
        arena = t.alloc_dma(layout.nbytes)
        q = SplitQueue(arena.region, layout, iova=arena.iova, event_idx=True)
        t.attach_queue(i, q)
        qs.append(q)
    return qs


def test_a_completion_on_any_queue_wakes_the_waiter(no_leaks):
    """The old blk loop slept on the first busy queue's fd only (the others waited up to
    100 ms per round): with no timeout at all, a completion on queue 1 never woke it."""
    t = EventfdTransport(2)
    q0, q1 = queues_on(t, 2)
    for q in (q0, q1):
        q.add([(q.iova + q.layout.buffer(0), 8)], [], "x")
        q.publish()
    waiter = Waiter(t, [q0, q1])
    assert sorted(waiter.fds()) == sorted(t.efds)

    def complete_on_queue_1_then_notify():
        time.sleep(0.05)
        dev = t.devices[1]
        head, _ = dev.pop()
        dev.push(head, 0)
        os.eventfd_write(t.efds[1], 1)

    threading.Thread(target=complete_on_queue_1_then_notify, daemon=True).start()
    box = in_thread(lambda: waiter.wait(None))  # no deadline: only the fd can end it
    assert box == {"result": True}
    assert q1.drain_used() == [("x", 0)] and q0.drain_used() == []
    t.close()


def test_arm_asks_each_busy_queue_for_its_share():
    t = EventfdTransport(2)
    q0, q1 = queues_on(t, 2)
    for i in range(6):
        q0.add([(q0.iova + q0.layout.buffer(0), 8)], [], i)
    for i in range(2):
        q1.add([(q1.iova + q1.layout.buffer(0), 8)], [], i)
    q0.publish()
    q1.publish()
    waiter = Waiter(t, [q0, q1])
    assert waiter.arm(4) is False
    # 4 wanted of 8 in flight: queue 0 (6 in flight) is asked for 3, queue 1 for 1.
    assert q0.snapshot()["avail.used_event"] == 2
    assert q1.snapshot()["avail.used_event"] == 0
    waiter.disarm()
    assert q0.snapshot()["interrupts"] is False
    t.close()


def test_the_deadline_ends_every_path():
    # notifications: nothing ever fires
    t = EventfdTransport(1)
    (q,) = queues_on(t, 1)
    q.add([(q.iova + q.layout.buffer(0), 8)], [], "x")
    q.publish()
    box = in_thread(lambda: Waiter(t, [q]).wait(time.monotonic() + 0.1))
    assert box == {"result": False}
    t.close()
    # polling: spins on the used ring, looking at the clock now and then
    lt = LoopbackTransport(features=1 << 32, queue_sizes=[8], config=b"")
    layout = SplitLayout.compute(8)
    arena = lt.alloc_dma(layout.nbytes)
    q = SplitQueue(arena.region, layout, iova=arena.iova)
    lt.attach_queue(0, q)
    q.add([(arena.iova, 8)], [], "x")
    q.publish()
    waiter = Waiter(lt, [q])
    assert waiter.polling and waiter.fds() == []
    box = in_thread(lambda: waiter.wait(time.monotonic() + 0.1))
    assert box == {"result": False}
    # a polling waiter also notices a transport that failed
    lt.fail(VhostUserDisconnectedError("gone"))
    box = in_thread(lambda: waiter.wait(None))
    assert isinstance(box["error"], VhostUserDisconnectedError)
    lt.close()


def test_a_broken_queue_does_not_keep_the_others_from_sleeping():
    """Found by FsDevice: once one queue was broken (its requests already failed by the
    device driver), arm() returned True for every queue and the waiter spun at 100% CPU
    while the healthy queues' requests were outstanding.  Now it sleeps on those."""
    t = EventfdTransport(2)
    q0, q1 = queues_on(t, 2)
    for q in (q0, q1):
        q.add([(q.iova + q.layout.buffer(0), 8)], [], "x")
        q.publish()
    q0.mark_broken(DeviceProtocolError("used.len", 1, "0"))
    waiter = Waiter(t, [q0, q1])
    assert waiter.arm() is False  # sleep: queue 1 will notify
    box = in_thread(lambda: waiter.wait(time.monotonic() + 0.2))
    assert box == {"result": False}  # slept to the deadline instead of spinning
    q1.close()
    assert waiter.arm() is True  # no usable queue has anything in flight: do not sleep
    t.close()


def test_nothing_in_flight_is_nothing_to_wait_for():
    t = EventfdTransport(1)
    (q,) = queues_on(t, 1)
    assert Waiter(t, [q]).arm() is True  # "do not sleep": nothing could wake you
    assert in_thread(lambda: Waiter(t, [q]).wait(None)) == {"result": True}
    t.close()


def test_close_from_another_thread_during_a_wait(virtq_qsd, no_leaks):
    """The waiter used fds it no longer owned: close() from another thread during wait()
    gave a raw EBADF -- or, when anything opened a file in between, read 8 bytes of that
    file.  Now close() wakes the sleeper and waits for it to leave before any fd closes;
    the sleeper raises QueueStateError."""
    for _ in range(5):
        t = VhostUserTransport.connect(virtq_qsd.socket_path)
        t.negotiate(0)
        layout = SplitLayout.compute(8)
        arena = t.alloc_dma(layout.nbytes)
        q = SplitQueue(arena.region, layout, iova=arena.iova)
        t.attach_queue(0, q)
        t.start()
        started = threading.Event()

        def sleeper(t=t, started=started):
            started.set()
            while True:  # a back-end may signal once at set-up: sleep again
                t.wait(None)

        box: dict[str, object] = {}
        thread = threading.Thread(target=lambda box=box, sleeper=sleeper:
                                  box.update(in_thread(sleeper)))
        thread.start()
        started.wait(5)
        time.sleep(0.05)
        t.close()
        # files opened right after close() reuse the fd numbers: nobody may read them
        with open(__file__, "rb") as f1, open(__file__, "rb") as f2:
            thread.join(20)
            assert f1.read(16) == f2.read(16)
        assert isinstance(box.get("error"), QueueStateError), box
        with pytest.raises(QueueStateError):
            t.wait(0)


def test_an_event_loop_drives_a_device_through_the_public_waiter(virtq_qsd):
    """arm / fds / drain are public: asyncio runs a BlkDevice without private calls."""

    async def main(dev: BlkDevice) -> bytes:
        loop = asyncio.get_running_loop()
        woke = asyncio.Event()
        for fd in dev.waiter.fds():
            loop.add_reader(fd, woke.set)
        try:
            req = dev.submit_read(8, 4096)
            dev.kick()
            while not req.done:
                if not dev.waiter.arm():
                    await asyncio.wait_for(woke.wait(), 10)
                    woke.clear()
                    dev.waiter.drain()
                dev.poll(0)
            return req.wait() or b""
        finally:
            for fd in dev.waiter.fds():
                loop.remove_reader(fd)

    with BlkDevice.connect_vhost_user(virtq_qsd.socket_path) as dev:
        data = asyncio.run(main(dev))
        assert data == dev.read(8, 4096)


def test_a_closed_transport_never_puts_the_waiter_to_sleep():
    """Its queues are closed with it: the waiter says "look now" and the queue says why."""
    t = EventfdTransport(1)
    (q,) = queues_on(t, 1)
    q.add([(q.iova + q.layout.buffer(0), 8)], [], "x")
    q.publish()
    waiter = Waiter(t, [q])
    t.close()
    assert in_thread(lambda: waiter.wait(None)) == {"result": True}
    with pytest.raises(QueueStateError, match="closed"):
        q.drain_used()
    with pytest.raises(VirtqError):
        t.wait(0)
