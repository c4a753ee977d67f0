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
    p.add_argument("--device", default="blk", choices=["blk", "net", "fs", "rng"],
                   help="the device type (net loops frames back; fs serves hello.txt)")
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
                                      read_only=args.read_only, device=args.device,
                                      inflight=args.inflight,
                                      faults=Faults.parse(args.faults)).start()
    except (OSError, VirtqError) as exc:
        print(f"{p.prog}: {exc}", file=sys.stderr)
        return 1
    try:
        print("ready", backend.socket_path, flush=True)
        # Until a stop signal, or until the back-end stops serving by itself (the
        # exit_on_disconnect fault: one front-end, then exit, as virtiofsd does).
        while backend.serving:
            got = signal.sigtimedwait(stop_signals, 0.1)
            # CPython 3.11 returns an uninitialised siginfo (not None) when the wait was
            # interrupted -- e.g. by SIGSTOP/SIGCONT -- and the time ran out meanwhile:
            # only a stop signal ends the loop.
            if got is not None and got.si_signo in stop_signals:
                break
    finally:
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
