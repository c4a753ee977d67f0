"""A device process: ``python -m virtq.testing.peer --fd FD ...``.

Attaches the driver's :class:`~virtq.memory.MemfdRegion` by an inherited fd and serves a
split queue (or, with ``--packed``, a packed one) as an "echo-reverse" device: every chain's
device-readable bytes are written back, reversed, into its device-writable buffers, and the
chain is completed with the number of bytes written.  Completions are returned in shuffled
batches (any order is legal) so drivers are tested against out-of-order devices.  Used by the
demo and the cross-process tests.

``--packed --in-order`` serves like a VIRTIO_F_IN_ORDER device instead (VIRTIO 1.2 §2.8.8):
buffers are used in the order they were made available, in batches of random size, each
batch retired by ONE used descriptor carrying its last buffer's id.  The buffers a batch
skips count as used *completely* (their whole writable part written), so a batch also ends
after any buffer whose writable part the echo did not fill -- it needs its own length.  To
see multi-buffer batches, give each buffer exactly as many writable bytes as readable ones.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Protocol

from virtq.layout import PackedLayout, SplitLayout
from virtq.memory import MemfdRegion
from virtq.testing.device import DeviceQueue, Segment
from virtq.testing.packed_device import PackedDeviceQueue


class _Device(Protocol):
    def read(self, iova: int, length: int) -> bytes: ...
    def write(self, iova: int, data: bytes | memoryview) -> None: ...
    def pop(self) -> tuple[int, list[Segment]] | None: ...
    def push(self, head: int, written_len: int, *, publish: bool = True) -> bool: ...
    def publish_used(self) -> bool: ...


def serve_chain(dev: _Device, segments: list[Segment]) -> int:
    """Echo-reverse one chain; returns the bytes written."""
    data = b"".join(dev.read(s.iova, s.length) for s in segments if not s.writable)[::-1]
    written = 0
    for seg in segments:
        if seg.writable and written < len(data):
            part = data[written : written + seg.length]
            dev.write(seg.iova, part)
            written += len(part)
    return written


def serve(dev: _Device, count: int, *, timeout: float, seed: int = 0) -> int:
    """Serve ``count`` chains (polling), completing them in shuffled batches."""
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


def serve_in_order(dev: PackedDeviceQueue, count: int, *, timeout: float,
                   seed: int = 0) -> int:
    """Serve ``count`` buffers of a packed ring as an IN_ORDER device: random batches, one
    used descriptor each (:meth:`PackedDeviceQueue.push_in_order`); a batch ends at a
    random point and after every buffer the echo did not fill completely."""
    rng = random.Random(seed)
    deadline = time.monotonic() + timeout
    done = 0
    while done < count:
        popped = []
        while (chain := dev.pop()) is not None:
            buffer_id, segments = chain
            capacity = sum(s.length for s in segments if s.writable)
            popped.append((buffer_id, serve_chain(dev, segments), capacity))
        if not popped:
            if time.monotonic() > deadline:
                raise TimeoutError(f"served {done} of {count} buffers before the timeout")
            time.sleep(0)
            continue
        for i, (buffer_id, written, capacity) in enumerate(popped):
            last = i == len(popped) - 1
            if last or written != capacity or rng.random() < 0.3:
                dev.push_in_order(buffer_id, written, publish=False)
                if rng.random() < 0.5:
                    dev.publish_used()
        dev.publish_used()
        done += len(popped)
    return done


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--seed", type=int, default=0, help="of the completion order")
    p.add_argument("--packed", action="store_true", help="a packed ring (VIRTIO 1.2 §2.8)")
    p.add_argument("--in-order", action="store_true",
                   help="packed only: batched in-order completions (VIRTIO_F_IN_ORDER)")
    p.add_argument("--avail-index", type=int, default=0,
                   help="packed only: the device's starting ring position")
    p.add_argument("--avail-wrap", type=int, default=1, choices=(0, 1),
                   help="packed only: the device's starting wrap counters")
    args = p.parse_args(argv)
    if args.in_order and not args.packed:
        p.error("--in-order needs --packed")
    with MemfdRegion.attach(args.fd, args.nbytes) as region:
        dev: DeviceQueue | PackedDeviceQueue
        if args.packed:
            layout = PackedLayout.compute(
                args.queue_size, buffer_size=args.buffer_size, indirect_size=args.indirect_size)
            dev = PackedDeviceQueue(region, layout, iova=args.iova, event_idx=args.event_idx,
                                    avail_index=args.avail_index, avail_wrap=args.avail_wrap)
        else:
            split = SplitLayout.compute(
                args.queue_size, buffer_size=args.buffer_size, indirect_size=args.indirect_size)
            dev = DeviceQueue(region, split, iova=args.iova, event_idx=args.event_idx)
        try:
            if isinstance(dev, PackedDeviceQueue) and args.in_order:
                served = serve_in_order(dev, args.count, timeout=args.timeout, seed=args.seed)
            else:
                served = serve(dev, args.count, timeout=args.timeout, seed=args.seed)
        finally:
            dev.close()
    return 0 if served == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
