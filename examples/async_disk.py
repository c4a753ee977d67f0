"""The disk from asyncio and trio, without threads (pip install 'virtq[async]').

    python examples/async_disk.py                   # asyncio, then trio
    python examples/async_disk.py --socket /tmp/blk.sock

Waits are awaits on the device's notification eventfd; any number of tasks share one
device; cancelling a task leaves the queue consistent.
"""

import argparse
import contextlib
import tempfile
from pathlib import Path

import anyio

from virtq.aio import AsyncBlkDevice
from virtq.testing.runners import QemuStorageDaemon, make_image


async def demo(socket: str) -> None:
    async with await AsyncBlkDevice.connect_vhost_user(socket) as disk:
        # One awaited request; a large one becomes several in flight together.
        await disk.write(2048, b"async!" * 512 + bytes(1024))
        assert (await disk.read(2048, 4096)).startswith(b"async!")

        # Sixteen tasks, one device: each waits for its own request.
        results: dict[int, bytes] = {}

        async def reader(i: int) -> None:
            results[i] = await disk.read(8 * i, 4096)

        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(reader, i)
        print(f"  16 tasks read {sum(map(len, results.values()))} bytes")

        # Submit now, take completions as they come.
        reqs = [disk.submit_read(8 * i, 4096) for i in range(32)]
        done = [req async for req in disk.completions()]
        assert sorted(r.sector for r in done) == [r.sector for r in reqs]
        print(f"  {len(done)} completions from the async iterator")

        # Cancel a wait: the request stays the device's until it completes; drain() reaps.
        with anyio.move_on_after(0):
            await disk.read(0, 4096)
        await disk.drain()
        assert disk.device.in_flight == 0
        print("  a cancelled read left the queue consistent")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--socket", help="a vhost-user-blk back-end already listening here")
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        socket = args.socket
        if socket is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            image = make_image(tmp / "disk.img", 16 << 20)
            socket = stack.enter_context(QemuStorageDaemon(image, tmp / "blk.sock")).socket_path
        for backend in ("asyncio", "trio"):
            print(f"{backend}:")
            anyio.run(demo, str(socket), backend=backend)


if __name__ == "__main__":
    main()
