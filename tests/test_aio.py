"""virtq.aio against a real qemu-storage-daemon, under asyncio and under trio: awaited
reads and writes, many tasks on one device, the completions iterator, no threads, and
cancellation that leaves the queue consistent."""

from __future__ import annotations

import os
import signal
import threading

import anyio
import pytest

from virtq.aio import AsyncBlkDevice, Pump
from virtq.devices import BlkDevice
from virtq.errors import ArgumentError, QueueStateError, VirtqError
from virtq.ringview import ADDED, IN_FLIGHT, SnapshotFile, analyze, snapshot_data
from virtq.testing.runners import sector_pattern

BACKENDS = ["asyncio", "trio"]


def pattern(sector: int, nbytes: int) -> bytes:
    return b"".join(sector_pattern(sector + i) for i in range(nbytes // 512))


async def until(condition, limit: int = 2000) -> None:
    """Yield to the loop until ``condition()`` (bounded: fails rather than hangs)."""
    for _ in range(limit):
        if condition():
            return
        await anyio.sleep(0.005)
    raise AssertionError("condition never became true")


@pytest.mark.parametrize("backend", BACKENDS)
def test_await_read_write_flush_get_id(virtq_qsd, backend, no_leaks):
    async def main() -> None:
        threads = threading.active_count()
        async with await AsyncBlkDevice.connect_vhost_user(virtq_qsd.socket_path) as disk:
            assert await disk.read(16, 4096) == pattern(16, 4096)
            big = disk.device.max_io * 2 + 4096  # three requests in flight together
            assert await disk.read(64, big) == pattern(64, big)
            data = os.urandom(8192)
            await disk.write(2048, data)
            await disk.flush()
            assert await disk.read(2048, 8192) == data
            assert await disk.get_id() == disk.device.get_id()
            with pytest.raises(ArgumentError):
                await disk.read(0, 100)
            with pytest.raises(ArgumentError):
                await disk.write(0, b"x" * 100)
            assert threading.active_count() == threads  # no helper threads
        with pytest.raises(QueueStateError):
            await disk.read(0, 512)

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tasks_share_one_small_queue(virtq_qsd, backend):
    """40 tasks, a 4-entry ring: tasks wait for free slots and for each other's rounds."""
    async def main() -> dict[int, bytes]:
        got: dict[int, bytes] = {}
        async with await AsyncBlkDevice.connect_vhost_user(virtq_qsd.socket_path,
                                                           queue_size=4) as disk:
            async def reader(i: int) -> None:
                got[i] = await disk.read(8 * i, 4096)

            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(reader, i)
            assert disk.device.in_flight == 0
        return got

    got = anyio.run(main, backend=backend)
    assert got == {i: pattern(8 * i, 4096) for i in range(40)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_completions_iterator(virtq_qsd, backend):
    async def main() -> None:
        async with await AsyncBlkDevice.connect_vhost_user(virtq_qsd.socket_path) as disk:
            reqs = [disk.submit_read(8 * i, 4096) for i in range(24)]
            seen = []
            async for req in disk.completions(want=8):
                assert req.error is None
                assert req.result == pattern(req.sector, 4096)
                seen.append(req)
            assert sorted(seen, key=lambda r: r.sector) == reqs
            # nothing in flight: the iterator ends at once
            assert [r async for r in disk.completions()] == []

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancellation_leaves_the_queue_consistent(virtq_qsd, backend, no_leaks):
    """Six reads in flight behind a stopped back-end, every waiting task cancelled (one
    of them asleep on the call eventfd): the requests stay with the device, the ring is
    consistent, and once the back-end runs again they are reaped, every slot comes back
    and new reads return the right data."""
    async def main() -> None:
        async with await AsyncBlkDevice.connect_vhost_user(virtq_qsd.socket_path,
                                                           queue_size=8) as disk:
            dev = disk.device
            free = dev.stats()[0]["free_slots"]
            assert await disk.read(0, 512) == pattern(0, 512)
            os.kill(virtq_qsd.pid, signal.SIGSTOP)
            try:
                finished = []

                async def reader(i: int) -> None:
                    await disk.read(8 * i, 4096)
                    finished.append(i)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(reader, 0)
                    await until(lambda: dev.in_flight == 1)
                    await anyio.sleep(0.05)  # let it fall asleep in the pump, on the fd
                    for i in range(1, 6):
                        tg.start_soon(reader, i)
                    await until(lambda: dev.in_flight == 6)
                    tg.cancel_scope.cancel()
                assert finished == []
                assert dev.in_flight == 6  # still the device's: nothing reused
                state = analyze(SnapshotFile.from_data(snapshot_data(dev.queues[0])))
                assert state.problems == []
                # every waiting task published its request, also the ones that waited
                # behind the task asleep in the pump
                assert len(state.by_status(IN_FLIGHT)) == 6
                assert state.by_status(ADDED) == []
            finally:
                os.kill(virtq_qsd.pid, signal.SIGCONT)
            await disk.drain()
            assert dev.in_flight == 0
            assert dev.stats()[0]["free_slots"] == free
            assert dev.queues[0].state.value == "ready"
            assert await disk.read(800, 8192) == pattern(800, 8192)

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_polling_device_spins_cooperatively(virtq_qsd, backend):
    async def main() -> None:
        disk = AsyncBlkDevice(BlkDevice.connect_vhost_user(virtq_qsd.socket_path, poll=True))
        try:
            assert disk.pump.waiter.fds() == []
            other_ran = []

            async def other() -> None:
                other_ran.append(True)

            async with anyio.create_task_group() as tg:
                tg.start_soon(other)
                assert await disk.read(8, 4096) == pattern(8, 4096)
            assert other_ran == [True]
        finally:
            await disk.aclose()

    anyio.run(main, backend=backend)


def test_a_wait_with_nothing_in_flight_is_an_error():
    class NoWaiter:
        def fds(self):
            return []

    pump: Pump[int] = Pump(NoWaiter(), list, lambda: 0)  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(VirtqError, match="nothing in flight"):
            await pump.until(lambda: False)

    anyio.run(main, backend="asyncio")
    with pytest.raises(ArgumentError):
        AsyncBlkDevice(object())  # type: ignore[arg-type]
