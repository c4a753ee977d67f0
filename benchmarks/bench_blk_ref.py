"""virtq's vhost-user-blk CPU cost per request next to a plain-stdlib front-end, in one run.

    python benchmarks/bench_blk_ref.py [--depths 32] [--seconds 3] [--rounds 3] [--copy]
                                       [--modes eventfd,batch] [--json results.json]

One qemu-storage-daemon (aio=io_uring) serves a 256 MiB image in a disk filesystem's page
cache; for every depth and round, each front-end keeps that many random 4 KiB reads in
flight, in rotating order, with each waiting strategy (``--modes``):

- ``eventfd``: wake for every completion;
- ``batch``: sleep until 3/8 of the depth has completed (``--batch N``): virtq's
  ``poll(min_completions=)``, and the same event-idx request (``used_event = last_used +
  N - 1``) written by hand in the plain front-end.

The front-ends: ``naive`` is naive_blk.py, struct + os over the same vhost-user control
plane; ``virtq`` is ``virtq.cli.bench_blk.run_depth``.  Reads go straight into each
request's buffer (``--copy``: returned as ``bytes``).  The table gives medians over the
rounds; "virtq / naive" is the median of per-round ratios of virtq's CPU per request to the
plain front-end's with the same strategy (runs of a round are neighbours in time, so the
ratio is what survives a noisy machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

# naive_blk beside this file, and virtq from this checkout when it is not installed.
# Appended, not inserted: PYTHONPATH (benchmarks/compare.py) and an install come first.
sys.path.append(str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))

from naive_blk import MODES, run_naive

from virtq.cli.bench_blk import filesystem_type, make_bench_image, run_depth
from virtq.cli.benchutil import Results, host_line, markdown_table
from virtq.testing.runners import QemuStorageDaemon

FRONT_ENDS = ("naive", "virtq")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="32", help="queue depths, comma-separated")
    p.add_argument("--seconds", type=float, default=3.0, help="per run")
    p.add_argument("--rounds", type=int, default=3, help="runs of each front-end per depth")
    p.add_argument("--modes", default=",".join(MODES),
                   help="waiting strategies, comma-separated: eventfd, batch")
    p.add_argument("--batch", type=int, default=None,
                   help="min_completions in batch mode (default: 3/8 of the depth)")
    p.add_argument("--copy", action="store_true", help="return the data as bytes")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    modes = args.modes.split(",")
    if set(modes) - set(MODES) or args.rounds < 1:
        p.error(f"--modes: from {', '.join(MODES)}; --rounds >= 1")
    runners = [(who, mode) for mode in modes for who in FRONT_ENDS]
    aio = "io_uring"
    results: dict[int, dict[tuple[str, str], list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        image = make_bench_image(Path(tmp))
        fstype = filesystem_type(image)
        with QemuStorageDaemon(image, Path(tmp) / "bench.sock", aio=aio) as qsd:
            assert qsd.proc is not None
            pid = qsd.proc.pid
            for depth in depths:
                runs: dict[tuple[str, str], list[dict[str, float]]] = {r: [] for r in runners}
                for rnd in range(args.rounds):
                    for i in range(len(runners)):
                        who, mode = runners[(rnd + i) % len(runners)]
                        label = f"QD {depth} {who} {mode} {rnd + 1}/{args.rounds}"
                        if who == "naive":
                            r = run_naive(qsd.socket_path, depth, args.seconds, mode,
                                          backend_pid=pid, label=label, copy=args.copy,
                                          batch=args.batch)
                        else:
                            r = run_depth(qsd.socket_path, depth, args.seconds, mode, label,
                                          backend_pid=pid, copy=args.copy, batch=args.batch)
                        runs[(who, mode)].append(r)
                results[depth] = runs

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    how = "copied out as bytes" if args.copy else "read into each request's buffer"
    title = (f"virtq vs a plain-stdlib vhost-user-blk front-end: 4 KiB random reads ({how}), "
             f"qemu-storage-daemon aio={aio}, image on {fstype}, {args.seconds:g} s per run, "
             f"{args.rounds} round(s), medians; {host_line()}")
    print(f"# {title}")
    out = Results("blk-ref", title)
    table = []
    for depth, runs in results.items():
        for who, mode in runners:
            mine = runs[(who, mode)]
            rel = "1"
            if who != "naive":
                rel = "{:.2f}".format(statistics.median(
                    v["cpu_us"] / n["cpu_us"]
                    for v, n in zip(mine, runs[("naive", mode)], strict=True)))
            table.append([depth, mode, who, f"{med(mine, 'iops'):,.0f}",
                          f"{med(mine, 'p50'):.1f}", f"{med(mine, 'cpu_us'):.2f}", rel,
                          f"{med(mine, 'backend_cpu_us'):.2f}"])
            row = f"QD {depth} {mode} {who}"
            # naive rows are the same code whatever virtq is: a control, not judged.
            judged = who == "virtq"
            out.add(row, "IOPS", med(mine, "iops"), "higher" if judged else None)
            out.add(row, "p50 µs", med(mine, "p50"), "lower" if judged else None)
            out.add(row, "CPU-µs/req", med(mine, "cpu_us"), "lower" if judged else None)
            out.add(row, "QSD CPU-µs/req", med(mine, "backend_cpu_us"), None)
    print(markdown_table(["QD", "mode", "front-end", "IOPS", "p50 µs", "CPU-µs/req",
                          "CPU / naive (same mode)", "QSD CPU-µs/req"], table, "rllrrrrr"))
    if args.json:
        out.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
