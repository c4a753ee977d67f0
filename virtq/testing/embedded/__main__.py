"""``python -m virtq.testing.embedded IMAGE SOCKET [--faults SPEC]``: serve until SIGTERM.

Prints ``ready SOCKET`` on stdout once it listens (what :class:`BackendProcess` waits for).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from virtq.errors import VirtqError
from virtq.testing.embedded.server import Faults, VhostUserBlkBackend


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m virtq.testing.embedded",
                                description="Serve a raw image as a vhost-user-blk device.")
    p.add_argument("image")
    p.add_argument("socket")
    p.add_argument("--num-queues", type=int, default=1)
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--inflight", action="store_true",
                   help="offer INFLIGHT_SHMFD and resume requests from the inflight buffer")
    p.add_argument("--faults", default="", metavar="SPEC",
                   help="e.g. 'drop_after=3' or 'nack=SET_MEM_TABLE,out_of_order'")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # Block the stop signals before the serving thread exists (it inherits the mask), so
    # that only sigwait() below sees them.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        backend = VhostUserBlkBackend(args.image, args.socket, num_queues=args.num_queues,
                                      read_only=args.read_only, inflight=args.inflight,
                                      faults=Faults.parse(args.faults)).start()
    except (OSError, VirtqError) as exc:
        print(f"{p.prog}: {exc}", file=sys.stderr)
        return 1
    try:
        print("ready", backend.socket_path, flush=True)
        signal.sigwait(stop_signals)
    finally:
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
