"""``virtq`` command line: ``demo``, ``inspect``, ``bench``."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from virtq.layout import SplitLayout, wrap_add
from virtq.memory import MemfdRegion
from virtq.queue import SplitQueue
from virtq.types import Iova


def demo_ring(args: argparse.Namespace) -> int:
    """A driver (this process) and a device (a child process) share one SplitQueue in a
    memfd; the indices start just below 0xFFFF so the run crosses the u16 wrap."""
    n, count, start = args.queue_size, args.count, args.start_index
    layout = SplitLayout.compute(n, buffer_size=256, indirect_size=4)
    iova = Iova(0x4000_0000)
    out = print
    with MemfdRegion(layout.nbytes, name="virtq-demo") as region:
        queue = SplitQueue(region, layout, iova=iova, indirect=True, start_index=start)
        out(f"driver: {n}-entry split ring in a {region.nbytes}-byte memfd (fd {region.fd}), "
            f"device address {iova:#x}")
        out(f"        desc@{queue.desc_iova:#x} avail@{queue.avail_iova:#x} "
            f"used@{queue.used_iova:#x}; indices start at {start:#06x}")
        fd = region.fd
        assert fd is not None  # a memfd always has one
        child = subprocess.Popen(
            [sys.executable, "-m", "virtq.testing.peer", "--fd", str(fd),
             "--nbytes", str(region.nbytes), "--queue-size", str(n), "--buffer-size", "256",
             "--indirect-size", "4", "--iova", hex(iova), "--count", str(count)],
            pass_fds=[fd],
        )
        out(f"device: pid {child.pid} attached the memfd; it echoes each request reversed, "
            "completing in shuffled order")
        free_slots = list(range(n))
        pending: dict[int, tuple[int, bytes]] = {}
        checked = 0
        sent = 0
        wrapped_at = None
        t0 = time.perf_counter()
        deadline = time.monotonic() + 60
        try:
            while checked < count:
                if time.monotonic() > deadline:
                    raise TimeoutError("the device process stopped answering")
                while sent < count and free_slots and queue.num_free:
                    slot = free_slots.pop()
                    payload = f"request {sent:05d} to the device".encode()
                    off = layout.buffer(slot)
                    region.view(off, len(payload))[:] = payload
                    addr = iova + off
                    # Two device-readable pieces and one device-writable buffer: three
                    # descriptors in an indirect table, one ring slot.
                    queue.add([(addr, 8), (addr + 8, len(payload) - 8)],
                              [(addr + 128, 128)], token=(sent, slot))
                    pending[sent] = (slot, payload)
                    sent += 1
                queue.publish()
                for (i, slot), written in queue.drain_used():
                    reply = bytes(region.view(layout.buffer(slot) + 128, written))
                    _, payload = pending.pop(i)
                    if reply != payload[::-1]:
                        raise AssertionError(f"request {i}: bad reply {reply!r}")
                    checked += 1
                    free_slots.append(slot)
                if wrapped_at is None and queue.last_used < start:
                    wrapped_at = checked
                    out(f"driver: used index wrapped 0xffff -> {queue.last_used:#06x} "
                        f"after {checked} completions")
        finally:
            rc = child.wait(timeout=30)
        elapsed = time.perf_counter() - t0
        out(f"driver: {checked} requests verified byte for byte; final avail.idx "
            f"{queue.next_avail:#06x} (= {start:#06x} + {count} mod 2**16: "
            f"{queue.next_avail == wrap_add(start, count)})")
        out(f"        {count / elapsed:,.0f} requests/s across two processes "
            f"(polling, no notifications); device exit status {rc}")
        queue.close()
    return 0 if rc == 0 else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show the layout the library would use for a queue size."""
    lay = SplitLayout.compute(args.queue_size, buffer_size=args.buffer_size,
                              legacy=args.legacy)
    for field in ("queue_size", "desc", "avail", "used", "buffers", "nbytes"):
        print(f"{field:>10}: {getattr(lay, field)}")
    print(f"{'used_event':>10}: {lay.used_event}")
    print(f"{'avail_event':>10}: {lay.avail_event}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="virtq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show virtq driving a device")
    demo.add_argument("what", nargs="?", default="ring", choices=["ring"],
                      help="ring: driver and device in two processes over a memfd")
    demo.add_argument("--queue-size", type=int, default=16)
    demo.add_argument("--count", type=int, default=2000)
    demo.add_argument("--start-index", type=lambda s: int(s, 0), default=0xFF00)
    demo.set_defaults(func=demo_ring)
    insp = sub.add_parser("inspect", help="print a split ring layout")
    insp.add_argument("queue_size", type=int)
    insp.add_argument("--buffer-size", type=int, default=0)
    insp.add_argument("--legacy", action="store_true")
    insp.set_defaults(func=cmd_inspect)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
