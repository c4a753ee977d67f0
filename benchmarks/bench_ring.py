"""Per-chain cost of virtq's driver queues next to fair plain-stdlib rings, for both ring
formats, in one table from one run.

    python benchmarks/bench_ring.py [--seconds 0.5] [--rounds 3] [--ring split,packed]
                                    [--in-order off,on] [--batched-api add_many]
                                    [--json results.json]

Rows: ring format (split, VIRTIO 1.2 §2.7; packed, §2.8) x VIRTIO_F_IN_ORDER off/on x
1- and 3-descriptor chains x one chain per publish (``add()``) or 32 (``add_many()``) x
event idx off/on, and for 3-descriptor chains indirect descriptors off/on.  virtq's queue
comes from ``virtq.queue.make_queue``: SplitQueue, InOrderSplitQueue, or PackedQueue with
or without in-order.

Every configuration runs add x batch + publish, a minimal in-process echo device
(echo_device.py, the same one for virtq and naive) completes the chains, then the driver
reaps.  "driver" counts only the driver's work (add + publish + reap, timer overhead
subtracted); "round trip" also counts the device.  Each is the median over the batches of
a run, per chain: a batch that another process preempted (a shared machine) moves a mean,
not the median.  The naive rings (naive_ring.py for
split, naive_packed_ring.py for packed, each with its in-order variant) do the same driver
work with precompiled structs, one ``pack_into`` per descriptor, the same batching (one
publish per batch) and, in the event-idx rows, the same kick decision; they never use
indirect descriptors (an "indirect on" row's naive side writes three ring descriptors) and
check nothing the device wrote.  virtq and naive run in this process, interleaved,
keeping the best of the rounds, so the ratio is meaningful on a noisy machine; absolute
numbers are not.

Against an older virtq (``benchmarks/compare.py``) the rows that virtq cannot build (no
packed ring, no in-order split ring) are left out, and each is named on a ``# skipped``
line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# naive_ring beside this file, and virtq from this checkout when it is not installed.
# Appended, not inserted: PYTHONPATH (benchmarks/compare.py) and an install come first.
sys.path.append(str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))

from echo_device import PackedEcho, SplitEcho, SplitInOrderEcho
from naive_packed_ring import NaivePackedRing
from naive_ring import NaiveInOrderRing, NaiveRing

from virtq.cli.benchutil import Results, host_line, markdown_table
from virtq.errors import VirtqError
from virtq.layout import SplitLayout
from virtq.memory import MemfdRegion
from virtq.queue import SplitQueue

try:  # the format-independent factory (older virtq: split rings only, built directly)
    from virtq.queue.factory import make_queue, ring_layout
except ImportError:
    make_queue = ring_layout = None  # type: ignore[assignment]

N = 256
BASE = 0x10_0000_0000
RINGS = ("split", "packed")
ON = {False: "off", True: "on"}


def layout_for(ring: str, indirect: bool) -> Any:
    """The layout of an N-entry ``ring`` with 64-byte buffers (and 4-entry indirect
    tables)."""
    indirect_size = 4 if indirect else 0
    if ring_layout is None:
        if ring != "split":
            raise VirtqError(f"this virtq has no {ring} ring")
        return SplitLayout.compute(N, buffer_size=64, indirect_size=indirect_size)
    return ring_layout(N, buffer_size=64, indirect_size=indirect_size, ring=ring)


def virtq_queue(region: MemfdRegion, layout: Any, ring: str, in_order: bool, event_idx: bool,
                indirect: bool) -> Any:
    """virtq's driver queue for the row, through the factory when virtq has one."""
    if make_queue is None:
        if in_order:
            raise VirtqError("this virtq has no in-order split ring")
        return SplitQueue(region, layout, iova=BASE, event_idx=event_idx, indirect=indirect)
    # in_order only when asked: a factory older than VIRTIO_F_IN_ORDER has no such argument.
    extra = {"in_order": True} if in_order else {}
    return make_queue(region, layout, iova=BASE, event_idx=event_idx, indirect=indirect,
                      **extra)


def unsupported(ring: str, in_order: bool) -> str | None:
    """Why the virtq under test cannot build this ring (None: it can)."""
    for indirect in (False, True):
        try:
            layout = layout_for(ring, indirect)
            region = MemfdRegion(layout.nbytes)
        except (VirtqError, TypeError) as e:
            return str(e)
        try:
            q = virtq_queue(region, layout, ring, in_order, True, indirect)
            q.close()
        except (VirtqError, TypeError) as e:
            return str(e)
        finally:
            region.close()
    return None


def timer_overhead() -> float:
    """The cost of one ``perf_counter_ns()`` call, in ns."""
    pc = time.perf_counter_ns
    t = pc()
    for _ in range(100_000):
        a = pc()
        b = pc()
        _ = b - a
    return (pc() - t) / 100_000 / 2


def build(kind: str, ring: str, in_order: bool, event_idx: bool, indirect: bool
          ) -> tuple[Any, Any, Any, Callable[[], None]]:
    """(queue, device, layout, cleanup) for one run.  ``kind``: "virtq" or "naive" (the
    naive rings never use indirect descriptors)."""
    layout = layout_for(ring, indirect)
    region = MemfdRegion(layout.nbytes)
    mem = None
    dev: Any
    q: Any
    if ring == "packed":
        dev = PackedEcho(region, layout, event_idx=event_idx, in_order=in_order)
    elif in_order:
        dev = SplitInOrderEcho(region, layout, event_idx=event_idx)
    else:
        dev = SplitEcho(region, layout, event_idx=event_idx)
    if kind == "virtq":
        q = virtq_queue(region, layout, ring, in_order, event_idx, indirect)
    else:
        mem = region.view(0, layout.nbytes)
        if ring == "packed":
            q = NaivePackedRing(mem, N, layout.desc, layout.device_event, event_idx=event_idx,
                                in_order=in_order)
        else:
            cls = NaiveInOrderRing if in_order else NaiveRing
            q = cls(mem, N, layout.desc, layout.avail, layout.used, event_idx=event_idx)

    def cleanup() -> None:
        dev.close()
        if kind == "virtq":
            q.close()
        if mem is not None:
            mem.release()
        region.close()

    return q, dev, layout, cleanup


#: How a row adds its chains: one ``add()`` per chain, one ``add_many()`` per batch, or a
#: chain template (``q.template(chain)``, one ``submit_many()`` per batch) refilled with the
#: buffers each slot held last time ("template") or with a new data buffer per chain
#: ("template-new", the header and status buffers of a block request stay the slot's).
APIS = ("add", "add_many", "template", "template-new")
#: Distinct data buffers the "template-new" rows cycle through: more than a batch, so a
#: slot never gets the buffer it had.
DATA_BUFFERS = 97


def chains_for(api: str, chain: int, batch: int, buf: int, rnd: int
               ) -> tuple[list[Any], list[Any], list[int]]:
    """(readables, writables, tokens) of one batch.  ``buf``: the buffers' base address;
    ``rnd``: the batch's number (template-new rows take the next data buffers)."""
    # One object per buffer that stays (a driver keeps its header and status buffers), a
    # new tuple per data buffer that changes.
    hdr, status = (buf, 16), [(buf + 32, 16)]
    if api != "template-new":
        readable = [(buf, 16)] if chain == 1 else [hdr, (buf + 16, 16)]
        writable = [] if chain == 1 else status
        return [readable] * batch, [writable] * batch, list(range(batch))
    base = rnd * batch
    data = [buf + 64 + 64 * ((base + i) % DATA_BUFFERS) for i in range(batch)]
    if chain == 1:
        return [[(d, 16)] for d in data], [[]] * batch, list(range(batch))
    return [[hdr, (d, 16)] for d in data], [status] * batch, list(range(batch))


def run(kind: str, ring: str, in_order: bool, api: str, chain: int, batch: int,
        event_idx: bool, indirect: bool, seconds: float, overhead: float
        ) -> tuple[float, float]:
    """(driver ns, round-trip ns) per chain.  ``api``: one of :data:`APIS` (the naive rings
    have no templates: their template rows add the same chains with ``add_many``)."""
    q, dev, layout, cleanup = build(kind, ring, in_order, event_idx, indirect)
    try:
        buf = BASE + layout.buffers
        add, publish, drain, complete = q.add, q.publish, q.drain_used, dev.complete_all
        new_data = api == "template-new"
        # template-new rows build their batch's buffer lists in the timed part: saying
        # which buffers a request uses is the driver's work.
        batches = [chains_for(api, chain, batch, buf, r) for r in range(DATA_BUFFERS)]
        readables, writables, tokens = batches[0]
        many = list(zip(readables, writables, tokens, strict=True))
        readable, writable = readables[0], writables[0]
        tpl = None
        if kind == "virtq" and api.startswith("template"):
            tpl = q.template(chain, slots=batch)
            # Every slot submitted once, so that a refill has buffers to repeat.
            slots = tpl.acquire_many(batch)
            tpl.submit_many(slots, readables, writables, tokens)
            publish()
            complete()
            drain()
        acquire_many = tpl.acquire_many if tpl is not None else None
        submit_many = tpl.submit_many if tpl is not None else None
        add_many = q.add_many if api != "add" else None
        pc = time.perf_counter_ns
        # Per batch (publish): the driver's ns and the round trip's, for their medians.
        driver: list[int] = []
        total: list[int] = []
        deadline = time.monotonic() + seconds
        rng = range(batch)
        r = 0
        while time.monotonic() < deadline:
            for _ in range(50):
                if new_data:
                    r = (r + 1) % DATA_BUFFERS
                    # The data addresses, outside the timed part; the lists inside it.
                    addrs = [rr[-1][0] for rr in batches[r][0]]
                t0 = pc()
                if submit_many is not None:
                    assert acquire_many is not None
                    slots = acquire_many(batch)
                    if new_data:
                        if chain == 1:
                            submit_many(slots, [[(a, 16)] for a in addrs], writables, tokens)
                        else:
                            hdr = readable[0]
                            submit_many(slots, [[hdr, (a, 16)] for a in addrs], writables,
                                        tokens)
                    else:
                        submit_many(slots, None, None, tokens)
                elif add_many is not None:
                    if new_data:
                        if chain == 1:
                            add_many([([(a, 16)], writable, i) for i, a in enumerate(addrs)])
                        else:
                            hdr = readable[0]
                            add_many([([hdr, (a, 16)], writable, i)
                                      for i, a in enumerate(addrs)])
                    else:
                        add_many(many)
                else:
                    for i in rng:
                        add(readable, writable, i)
                publish()
                t1 = pc()
                complete()
                t2 = pc()
                got = drain()
                t3 = pc()
                driver.append((t1 - t0) + (t3 - t2))
                total.append(t3 - t0)
                # Every chain came back, last one last (outside the timed part: a broken
                # ring must not print numbers).
                if len(got) != batch or got[-1][0] != batch - 1:
                    raise RuntimeError(f"{kind} {ring}: reaped {len(got)} chains of {batch}")
    finally:
        cleanup()
    return ((statistics.median(driver) - 2 * overhead) / batch,
            (statistics.median(total) - overhead) / batch)


def api_label(api: str) -> str:
    """How a row's API reads in the table and the JSON labels."""
    return {"template": "template, same buffers",
            "template-new": "template, new data buffer"}.get(api, f"{api}()")


def has_templates() -> bool:
    """Whether the virtq under test has chain templates (older ones do not)."""
    layout = layout_for("split", False)
    region = MemfdRegion(layout.nbytes)
    try:
        q = virtq_queue(region, layout, "split", False, True, False)
        try:
            return hasattr(q, "template")
        finally:
            q.close()
    finally:
        region.close()


def csv_choice(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated, non-empty subset of ``allowed``."""
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"{text!r}: a comma-separated list of {', '.join(allowed)}")
        return list(dict.fromkeys(items))
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=0.5,
                   help="per configuration, API and ring, over all rounds")
    p.add_argument("--rounds", type=int, default=3, help="alternate virtq/naive this often")
    p.add_argument("--ring", type=csv_choice(RINGS), default=list(RINGS),
                   help="ring formats, comma-separated [split,packed]")
    p.add_argument("--in-order", type=csv_choice(("off", "on")), default=["off", "on"],
                   help="VIRTIO_F_IN_ORDER off, on or both [off,on]")
    p.add_argument("--batched-api", choices=("add_many", "add", "both"), default="add_many",
                   help="how the batched rows add their 32 chains: one add_many() call, "
                   "32 add() calls, or a row for each [add_many]")
    p.add_argument("--templates", choices=("on", "off"), default="on",
                   help="also the template rows (32 chains per publish, event idx on): "
                   "refills with the same buffers and with a new data buffer per chain [on]")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        p.error("--rounds must be >= 1 and --seconds > 0")
    overhead = timer_overhead()
    batched = ["add", "add_many"] if args.batched_api == "both" else [args.batched_api]
    kinds = [(ring, io == "on") for ring in args.ring for io in args.in_order]
    skipped = {k: why for k in kinds if (why := unsupported(*k)) is not None}
    if len(skipped) == len(kinds):
        p.error("the virtq under test can build none of the rings asked for: " + "; ".join(
            f"{ring}, in-order {ON[io]}: {why}" for (ring, io), why in skipped.items()))
    templates = args.templates == "on" and has_templates()
    configs = [
        (ring, io, chain, batch, ev, ind, api)
        for ring, io in kinds if (ring, io) not in skipped
        for chain in (1, 3)
        for batch in (1, 32)
        for ev in (False, True)
        for ind in ((False, True) if chain == 3 else (False,))
        for api in (batched if batch > 1 else ["add"])
    ]
    if templates:
        configs += [(ring, io, chain, 32, True, ind, api)
                    for ring, io in kinds if (ring, io) not in skipped
                    for api in ("template", "template-new")
                    for chain in (1, 3)
                    for ind in ((False, True) if chain == 3 else (False,))]
    title = (f"bench_ring: {host_line()}, queue size {N}, {args.seconds:g} s over "
             f"{args.rounds} round(s) per ring, API and configuration")
    print(f"# {title}")
    print("# driver ns/chain = add + publish + reap; round trip adds the echo device; "
          "median batch of each run, best of the rounds")
    for (ring, io), why in skipped.items():
        print(f"# skipped: {ring}, in-order {ON[io]}: {why}")
    if args.templates == "on" and not templates:
        print("# skipped: the template rows (this virtq's queues have no template())")
    if templates:
        print("# template rows: virtq refills a chain template (acquire_many + submit_many); "
              "the naive ring, which has none, adds the same chains with add_many.  "
              "template-new: a new data buffer per chain, its buffer lists built in the "
              "timed part on both sides")
    results = Results("ring", title)
    rows = []
    for ring, io, chain, batch, ev, ind, api in configs:
        best = {kind: (float("inf"), float("inf")) for kind in ("virtq", "naive")}
        for rnd in range(args.rounds):  # interleaved; keep the best (least disturbed)
            for kind in ("virtq", "naive") if rnd % 2 == 0 else ("naive", "virtq"):
                d, t = run(kind, ring, io, api, chain, batch, ev, ind and kind == "virtq",
                           args.seconds / args.rounds, overhead)
                best[kind] = (min(best[kind][0], d), min(best[kind][1], t))
        (vd, vt), (nd, nt) = best["virtq"], best["naive"]
        rows.append([ring, ON[io], chain, batch, ON[ev], ON[ind], api_label(api), f"{vd:.0f}",
                     f"{nd:.0f}", f"{nd / vd:.2f}x", f"{vt:.0f}", f"{nt:.0f}"])
        label = (f"{ring}, in-order {ON[io]}, chain {chain}, batch {batch}, "
                 f"event_idx {ON[ev]}, indirect {ON[ind]}, {api_label(api)}")
        results.add(label, "virtq ns/chain", vd, "lower")
        # The same code whatever virtq is: what compare.py shows as the noise floor.
        results.add(label, "naive ns/chain (control)", nd, None)
    print(markdown_table(
        ["ring", "in-order", "chain", "batch", "event_idx", "indirect", "API", "virtq ns",
         "naive ns", "naive / virtq", "virtq round trip", "naive round trip"], rows,
        "llrrlllrrrrr"))
    if args.json:
        results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
