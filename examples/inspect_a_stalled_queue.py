"""`virtq inspect` on a queue stuck behind a stopped back-end ("traffic stopped").

    python examples/inspect_a_stalled_queue.py [--svg docs/images/stalled-ring.svg]

qemu-storage-daemon is stopped with SIGSTOP; five reads are submitted and kicked, and can
never complete.  Another process -- `virtq inspect /proc/PID/fd/N` -- maps this process's
ring memory read-only and shows the five chains in flight.  Then SIGCONT, and they complete.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from virtq.devices import BlkDevice
from virtq.testing.runners import QemuStorageDaemon, make_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--svg", help="also draw the ring into this file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        image = make_image(Path(tmp) / "disk.img", 16 << 20)
        with QemuStorageDaemon(image, Path(tmp) / "blk.sock") as qsd, \
                BlkDevice.connect_vhost_user(qsd.socket_path, queue_size=32) as disk:
            for i in range(40):                     # some traffic first: indices move on
                disk.read(8 * i, 4096)
            os.kill(qsd.pid, signal.SIGSTOP)        # the back-end stops answering
            try:
                reqs = [disk.submit_read(8 * i, 4096) for i in range(5)]
                disk.kick()                         # published and notified: stuck
                ring = f"/proc/{os.getpid()}/fd/{disk.arena.region.fd}"
                command = [sys.executable, "-m", "virtq", "inspect", ring,
                           "--queue-size", str(disk.queues[0].size)]
                if args.svg:
                    command += ["--svg", args.svg]
                print("$ virtq", " ".join(command[3:]))
                subprocess.run(command, check=True)  # another process, read-only
            finally:
                os.kill(qsd.pid, signal.SIGCONT)
            disk.wait(reqs, timeout=10)
            print(f"after SIGCONT: {sum(r.error is None for r in reqs)} of 5 reads completed")


if __name__ == "__main__":
    main()
