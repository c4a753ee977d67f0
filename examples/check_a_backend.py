"""Check a vhost-user back-end against the spec: `virtq check --device blk SOCKET`.

    python examples/check_a_backend.py                       # starts qemu-storage-daemon
    python examples/check_a_backend.py --socket /tmp/blk.sock

virtq's hostile driver is the front-end: it sets up rings and requests byte by byte and
checks every rule of VIRTIO 1.2 and vhost-user.rst it can observe (guard bytes around each
buffer, poisoned writable buffers, the used ring, GET_VRING_BASE, notifications, blk
semantics).  Exit status of `virtq check`: 0 every MUST check passed, 1 one failed, 2 the
tool could not run.
"""

import argparse
import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

from virtq.check import CheckOptions, SocketBackend, run_checks
from virtq.testing.runners import QemuStorageDaemon, make_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--socket", help="a vhost-user-blk back-end already listening here")
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        socket, image = args.socket, None
        if socket is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            image = make_image(tmp / "disk.img", 16 << 20)
            socket = stack.enter_context(QemuStorageDaemon(image, tmp / "blk.sock")).socket_path

        # 1. The command line, as a user runs it (--image: compare data with the file).
        command = [sys.executable, "-m", "virtq", "check", "--device", "blk", str(socket)]
        if image is not None:
            command += ["--image", str(image)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        print(done.stdout)
        print(f"virtq check exited {done.returncode} (0 pass, 1 a MUST check failed, "
              "2 could not run)")

        # 2. The same from Python: a Report to assert on (here: only the ring checks, no
        #    writes to the disk).
        ring_checks = ["ring.setup", "ring.guard-bytes", "ring.used-ids",
                       "ring.used-len-capacity", "ring.index-wrap"]
        report = run_checks("blk", SocketBackend(socket),
                            options=CheckOptions(allow_writes=False), only=ring_checks)
        print("from Python:", report.outcomes())
        assert done.returncode in (0, 1), done.stderr
        assert all(outcome == "pass" for outcome in report.outcomes().values())


if __name__ == "__main__":
    main()
