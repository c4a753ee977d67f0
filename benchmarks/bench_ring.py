"""Per-operation cost of virtq's SplitQueue next to a naive struct-per-field ring.

    python benchmarks/bench_ring.py [--seconds 0.5]

Every configuration runs add x batch + publish, a minimal in-process device completes the
chains, then the driver reaps.  "driver" counts only the driver's work (add + publish +
reap, timer overhead subtracted); "round trip" also counts the device.  The naive ring does
the same driver work with one struct.pack_into/unpack_from per field.  Both run in this
process, interleaved, so the ratio is meaningful on a noisy machine; absolute numbers are not.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_ring import NaiveRing

from virtq.layout import SplitLayout
from virtq.memory import MemfdRegion
from virtq.queue import SplitQueue

N = 256
BASE = 0x10_0000_0000


class EchoDevice:
    """The least work a device can do: move every available head to the used ring."""

    def __init__(self, region: MemfdRegion, layout: SplitLayout) -> None:
        n = layout.queue_size
        mem = region.view(0, layout.nbytes)
        self.avail = mem[layout.avail : layout.avail + 6 + 2 * n].cast("H")
        self.used_h = mem[layout.used : layout.used + 6 + 8 * n].cast("H")
        self.used_w = mem[layout.used : layout.used + 4 + 8 * n].cast("I")
        self.mask = n - 1
        self.last_avail = self.avail[1]
        self._mem = mem

    def complete_all(self) -> None:
        avail, used_w, mask = self.avail, self.used_w, self.mask
        idx = self.used_h[1]
        end = avail[1]
        la = self.last_avail
        while la != end:
            slot = idx & mask
            used_w[1 + 2 * slot] = avail[2 + (la & mask)]
            used_w[2 + 2 * slot] = 0
            la = (la + 1) & 0xFFFF
            idx = (idx + 1) & 0xFFFF
        self.last_avail = la
        self.used_h[1] = idx

    def close(self) -> None:
        for v in (self.avail, self.used_h, self.used_w, self._mem):
            v.release()


def timer_overhead() -> float:
    pc = time.perf_counter_ns
    t = pc()
    for _ in range(100_000):
        a = pc()
        b = pc()
        _ = b - a
    return (pc() - t) / 100_000 / 2  # per perf_counter_ns call pair / 2 ... per call


def run(kind: str, chain: int, batch: int, event_idx: bool, indirect: bool,
        seconds: float, overhead: float) -> tuple[float, float]:
    """kind: "virtq" (add per chain), "virtq-many" (add_many per batch) or "naive"."""
    layout = SplitLayout.compute(N, buffer_size=64, indirect_size=4 if indirect else 0)
    region = MemfdRegion(layout.nbytes)
    dev = EchoDevice(region, layout)
    if kind.startswith("virtq"):
        q = SplitQueue(region, layout, iova=BASE, event_idx=event_idx, indirect=indirect)
    else:
        mem = region.view(0, layout.nbytes)
        q = NaiveRing(mem, N, layout.desc, layout.avail, layout.used)
    buf = BASE + layout.buffers
    readable = [(buf, 16)] if chain == 1 else [(buf, 16), (buf + 16, 16)]
    writable = [] if chain == 1 else [(buf + 32, 16)]
    add, publish, drain = q.add, q.publish, q.drain_used
    many = [(readable, writable, i) for i in range(batch)]
    add_many = q.add_many if kind == "virtq-many" else None
    pc = time.perf_counter_ns
    ops = 0
    driver_ns = 0
    total_ns = 0
    deadline = time.monotonic() + seconds
    rng = range(batch)
    while time.monotonic() < deadline:
        for _ in range(50):
            t0 = pc()
            if add_many is not None:
                add_many(many)
            else:
                for i in rng:
                    add(readable, writable, i)
            publish()
            t1 = pc()
            dev.complete_all()
            t2 = pc()
            drain()
            t3 = pc()
            driver_ns += (t1 - t0) + (t3 - t2) - 2 * overhead
            total_ns += t3 - t0 - overhead
            ops += batch
    dev.close()
    if kind.startswith("virtq"):
        q.close()
    else:
        mem.release()
    region.close()
    return driver_ns / ops, total_ns / ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=0.5, help="per configuration and ring")
    p.add_argument("--rounds", type=int, default=3, help="alternate virtq/naive this often")
    args = p.parse_args()
    overhead = timer_overhead()
    configs = [
        (chain, batch, ev, ind)
        for chain in (1, 3)
        for batch in (1, 32)
        for ev in (False, True)
        for ind in ((False, True) if chain == 3 else (False,))
    ]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# bench_ring: {cpu}, Python {platform.python_version()}, queue size {N}, "
          f"{args.seconds}s x {args.rounds} rounds per ring and configuration")
    print("# driver ns/op = add + publish + reap per chain; round trip adds the echo device")
    print("| chain | batch | event_idx | indirect | virtq add() | virtq add_many() | naive "
          "| naive / virtq (best) | virtq round trip | naive round trip |")
    print("|" + "---|" * 10)
    for chain, batch, ev, ind in configs:
        kinds = ["virtq", "naive"] + (["virtq-many"] if batch > 1 else [])
        best = dict.fromkeys(kinds, (1e+18, 1e+18))
        for _ in range(args.rounds):  # interleaved; keep the best of each (least disturbed)
            for kind in kinds:
                feat = kind != "naive"
                d, t = run(kind, chain, batch, ev and feat, ind and feat,
                           args.seconds / args.rounds, overhead)
                best[kind] = (min(best[kind][0], d), min(best[kind][1], t))
        vd, vt = best["virtq"]
        nd, nt = best["naive"]
        md, mt = best.get("virtq-many", (None, None))
        fastest_d = min(vd, md) if md is not None else vd
        fastest_t = min(vt, mt) if mt is not None else vt
        many_col = f"{md:.0f}" if md is not None else "-"
        print(f"| {chain} | {batch} | {'on' if ev else 'off'} | {'on' if ind else 'off'} "
              f"| {vd:.0f} | {many_col} | {nd:.0f} | {nd / fastest_d:.2f}x "
              f"| {fastest_t:.0f} | {nt:.0f} |")


if __name__ == "__main__":
    main()
