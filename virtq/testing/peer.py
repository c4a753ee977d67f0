"""A device process: ``python -m virtq.testing.peer --fd FD ...``.

Attaches the driver's :class:`~virtq.memory.MemfdRegion` by an inherited fd and serves a
split queue as an "echo-reverse" device: every chain's device-readable bytes are written back,
reversed, into its device-writable buffers, and the chain is completed with the number of
bytes written.  Completions are returned in shuffled batches (any order is legal) so drivers
are tested against out-of-order devices.  Used by the demo and the cross-process tests.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from virtq.layout import SplitLayout
from virtq.memory import MemfdRegion
from virtq.testing.device import DeviceQueue, Segment


def serve_chain(dev: DeviceQueue, segments: list[Segment]) -> int:
    """Echo-reverse one chain; returns the bytes written."""
    data = b"".join(dev.read(s.iova, s.length) for s in segments if not s.writable)[::-1]
    written = 0
    for seg in segments:
        if seg.writable and written < len(data):
            part = data[written : written + seg.length]
            dev.write(seg.iova, part)
            written += len(part)
    return written


def serve(dev: DeviceQueue, count: int, *, timeout: float, seed: int = 0) -> int:
    """Serve ``count`` chains (polling), completing them in shuffled batches.  Returns how many
    it served.  Raises ``TimeoutError`` when the driver published fewer within ``timeout``
    seconds, and :class:`~virtq.testing.DriverProtocolError` for an impossible chain."""
    rng = random.Random(seed)
    deadline = time.monotonic() + timeout
    done = 0
    while done < count:
        batch = []
        while (chain := dev.pop()) is not None:
            head, segments = chain
            batch.append((head, serve_chain(dev, segments)))
        if not batch:
            if time.monotonic() > deadline:
                raise TimeoutError(f"served {done} of {count} chains before the timeout")
            time.sleep(0)
            continue
        rng.shuffle(batch)
        for head, written in batch:
            dev.push(head, written, publish=False)
        dev.publish_used()
        done += len(batch)
    return done


def main(argv: list[str] | None = None) -> int:
    """The command line (``--help`` lists the options): attach the memfd, serve ``--count``
    chains, exit 0 (1 if fewer were served)."""
    p = argparse.ArgumentParser(prog="python -m virtq.testing.peer", description=__doc__)
    p.add_argument("--fd", type=int, required=True, help="inherited memfd of the region")
    p.add_argument("--nbytes", type=int, required=True)
    p.add_argument("--queue-size", type=int, required=True)
    p.add_argument("--buffer-size", type=int, default=0)
    p.add_argument("--indirect-size", type=int, default=0)
    p.add_argument("--iova", type=lambda s: int(s, 0), required=True)
    p.add_argument("--count", type=int, required=True, help="chains to serve, then exit")
    p.add_argument("--event-idx", action="store_true")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    layout = SplitLayout.compute(
        args.queue_size, buffer_size=args.buffer_size, indirect_size=args.indirect_size
    )
    with MemfdRegion.attach(args.fd, args.nbytes) as region:
        dev = DeviceQueue(region, layout, iova=args.iova, event_idx=args.event_idx)
        try:
            served = serve(dev, args.count, timeout=args.timeout)
        finally:
            dev.close()
    return 0 if served == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
