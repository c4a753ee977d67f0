"""A virtio-blk disk over vhost-user, served by qemu-storage-daemon.

    python examples/disk_over_qsd.py                     # starts its own daemon
    python examples/disk_over_qsd.py --backend embedded  # virtq's pure-Python back-end
    python examples/disk_over_qsd.py --socket /tmp/blk.sock

The back-end is another process; the rings live in a memfd this process allocated and
handed over with the vhost-user memory table.
"""

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

from virtq.devices import BlkDevice, BlkIOError
from virtq.testing.embedded import VhostUserBlkBackend
from virtq.testing.runners import QemuStorageDaemon, make_image, sector_pattern


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--socket", help="a vhost-user-blk back-end already listening here")
    p.add_argument("--backend", choices=["qsd", "embedded"], default="qsd")
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        socket = args.socket
        if socket is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            image = make_image(tmp / "disk.img", 16 << 20)  # sector n starts with n
            runner = QemuStorageDaemon if args.backend == "qsd" else VhostUserBlkBackend
            socket = stack.enter_context(runner(image, tmp / "blk.sock")).socket_path
        disk = stack.enter_context(BlkDevice.connect_vhost_user(socket))
        print(f"{disk.capacity} sectors, block size {disk.block_size}, id {disk.get_id()!r}")

        # Copying I/O: any multiple of 512 bytes; large transfers are split and overlapped.
        data = os.urandom(1 << 20)
        disk.write(2048, data)
        disk.flush()
        assert disk.read(2048, len(data)) == data
        print("1 MiB written, flushed and read back")

        # Many requests in flight at once; each completes with its result or its error.
        reqs = [disk.submit_read(8 * i, 4096) for i in range(32)]
        disk.wait(reqs)
        if args.socket is None:
            assert all(r.result[:512] == sector_pattern(8 * i) for i, r in enumerate(reqs))
        print(f"{len(reqs)} reads in flight together, all done")

        # Zero copy: the device writes straight into memory it can reach.
        arena = disk.alloc_buffer(4 * 4096)
        bufs = [arena.slice(i * 4096, 4096) for i in range(4)]
        disk.wait(disk.submit_read_many([0, 8, 16, 24], into=bufs))
        view = bufs[3].view()
        print("zero-copy read of sector 24 starts with", bytes(view[:8]).hex())
        view.release()

        # The device's status byte becomes an exception that names the request.
        try:
            disk.read(disk.capacity, 512)
        except BlkIOError as err:
            print("reading past the end:", err)


if __name__ == "__main__":
    main()
