"""Per-chain cost of virtq's SplitQueue next to a fair plain-stdlib ring (naive_ring.py).

    python benchmarks/bench_ring.py [--seconds 0.5] [--rounds 3] [--json results.json]

Every configuration runs add x batch + publish, a minimal in-process echo device completes
the chains, then the driver reaps.  "driver" counts only the driver's work (add + publish +
reap, timer overhead subtracted); "round trip" also counts the device.  The naive ring does
the same driver work with precompiled structs, one ``pack_into`` per descriptor, the same
batching (one publish per batch) and, in the event-idx rows, the same kick decision; it
never uses indirect descriptors and checks nothing the device wrote.  Each row compares
``add()`` with ``add()`` or ``add_many()`` with ``add_many()``.  virtq and naive run in
this process, interleaved, keeping the best of the rounds, so the ratio is meaningful on a
noisy machine; absolute numbers are not.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# naive_ring beside this file, and virtq from this checkout when it is not installed.
# Appended, not inserted: PYTHONPATH (benchmarks/compare.py) and an install come first.
sys.path.append(str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))

from naive_ring import NaiveRing

from virtq.cli.benchutil import Results, host_line, markdown_table
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
    """The cost of one ``perf_counter_ns()`` call, in ns."""
    pc = time.perf_counter_ns
    t = pc()
    for _ in range(100_000):
        a = pc()
        b = pc()
        _ = b - a
    return (pc() - t) / 100_000 / 2


def run(kind: str, api: str, chain: int, batch: int, event_idx: bool, indirect: bool,
        seconds: float, overhead: float) -> tuple[float, float]:
    """(driver ns, round-trip ns) per chain.  ``kind``: "virtq" or "naive"; ``api``: "add"
    (one call per chain) or "add_many" (one per batch).  The naive ring never uses
    indirect descriptors."""
    layout = SplitLayout.compute(N, buffer_size=64, indirect_size=4 if indirect else 0)
    region = MemfdRegion(layout.nbytes)
    dev = EchoDevice(region, layout)
    mem = None
    q: SplitQueue | NaiveRing
    if kind == "virtq":
        q = SplitQueue(region, layout, iova=BASE, event_idx=event_idx, indirect=indirect)
    else:
        mem = region.view(0, layout.nbytes)
        q = NaiveRing(mem, N, layout.desc, layout.avail, layout.used, event_idx=event_idx)
    buf = BASE + layout.buffers
    readable = [(buf, 16)] if chain == 1 else [(buf, 16), (buf + 16, 16)]
    writable = [] if chain == 1 else [(buf + 32, 16)]
    add, publish, drain = q.add, q.publish, q.drain_used
    many = [(readable, writable, i) for i in range(batch)]
    add_many = q.add_many if api == "add_many" else None
    pc = time.perf_counter_ns
    ops = 0
    driver_ns = 0.0
    total_ns = 0.0
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
    if isinstance(q, SplitQueue):
        q.close()
    if mem is not None:
        mem.release()
    region.close()
    return driver_ns / ops, total_ns / ops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=0.5,
                   help="per configuration, API and ring, over all rounds")
    p.add_argument("--rounds", type=int, default=3, help="alternate virtq/naive this often")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        p.error("--rounds must be >= 1 and --seconds > 0")
    overhead = timer_overhead()
    configs = [
        (chain, batch, ev, ind)
        for chain in (1, 3)
        for batch in (1, 32)
        for ev in (False, True)
        for ind in ((False, True) if chain == 3 else (False,))
    ]
    title = (f"bench_ring: {host_line()}, queue size {N}, {args.seconds:g} s over "
             f"{args.rounds} round(s) per ring, API and configuration")
    print(f"# {title}")
    print("# driver ns/chain = add + publish + reap; round trip adds the echo device; "
          "best of the rounds")
    results = Results("ring", title)
    rows = []
    for chain, batch, ev, ind in configs:
        for api in ("add", "add_many") if batch > 1 else ("add",):
            best = {kind: (float("inf"), float("inf")) for kind in ("virtq", "naive")}
            for rnd in range(args.rounds):  # interleaved; keep the best (least disturbed)
                for kind in ("virtq", "naive") if rnd % 2 == 0 else ("naive", "virtq"):
                    d, t = run(kind, api, chain, batch, ev, ind and kind == "virtq",
                               args.seconds / args.rounds, overhead)
                    best[kind] = (min(best[kind][0], d), min(best[kind][1], t))
            (vd, vt), (nd, nt) = best["virtq"], best["naive"]
            on = {False: "off", True: "on"}
            rows.append([chain, batch, on[ev], on[ind], f"{api}()", f"{vd:.0f}", f"{nd:.0f}",
                         f"{nd / vd:.2f}x", f"{vt:.0f}", f"{nt:.0f}"])
            label = (f"chain {chain}, batch {batch}, event_idx {on[ev]}, indirect {on[ind]}, "
                     f"{api}()")
            results.add(label, "virtq ns/chain", vd, "lower")
            # The same code whatever virtq is: what compare.py shows as the noise floor.
            results.add(label, "naive ns/chain (control)", nd, None)
    print(markdown_table(
        ["chain", "batch", "event_idx", "indirect", "API", "virtq ns", "naive ns",
         "naive / virtq", "virtq round trip", "naive round trip"], rows, "rrlllrrrrr"))
    if args.json:
        results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
