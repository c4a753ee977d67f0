"""virtq's vhost-user-blk CPU cost per request next to a plain-stdlib front-end, in one run.

    python benchmarks/bench_blk_ref.py [--depths 32] [--seconds 3] [--rounds 3] [--copy]

One qemu-storage-daemon (aio=io_uring) serves a 256 MiB image in a disk filesystem's page
cache; for every depth and round, three front-ends each keep that many random 4 KiB reads
in flight, in rotating order:

- ``naive``: naive_blk.py, struct + os over the same vhost-user control plane, one request
  at a time, waking for every completion;
- ``virtq eventfd``: ``virtq.cli.bench_blk.run_depth`` waking for every completion, the same
  strategy as naive;
- ``virtq batch``: the same, sleeping until 3/8 of the depth has completed
  (``poll(min_completions=)``).

Reads go straight into each request's buffer (``--copy``: returned as ``bytes``).  The
table gives medians over the rounds; the ratios are medians of per-round ratios to naive
(runs of a round are neighbours in time, so the ratio is what survives a noisy machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_blk import run_naive

from virtq.cli.bench_blk import filesystem_type, make_bench_image, run_depth
from virtq.testing.runners import QemuStorageDaemon

WHO = ("naive", "virtq eventfd", "virtq batch")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="32", help="queue depths, comma-separated")
    p.add_argument("--seconds", type=float, default=3.0, help="per run")
    p.add_argument("--rounds", type=int, default=3, help="runs of each front-end per depth")
    p.add_argument("--copy", action="store_true", help="return the data as bytes")
    args = p.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    aio = "io_uring"
    results: dict[int, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        image = make_bench_image(Path(tmp))
        fstype = filesystem_type(image)
        with QemuStorageDaemon(image, Path(tmp) / "bench.sock", aio=aio) as qsd:
            assert qsd.proc is not None
            pid = qsd.proc.pid
            for depth in depths:
                runs: dict[str, list[dict[str, float]]] = {who: [] for who in WHO}
                for rnd in range(args.rounds):
                    for i in range(len(WHO)):
                        who = WHO[(rnd + i) % len(WHO)]
                        label = f"QD {depth} {who} {rnd + 1}/{args.rounds}"
                        if who == "naive":
                            r = run_naive(qsd.socket_path, depth, args.seconds,
                                          backend_pid=pid, label=label, copy=args.copy)
                        else:
                            r = run_depth(qsd.socket_path, depth, args.seconds,
                                          who.split()[1], label, backend_pid=pid,
                                          copy=args.copy)
                        runs[who].append(r)
                results[depth] = runs

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def ratio(runs: dict[str, list[dict[str, float]]], who: str, key: str) -> float:
        return statistics.median(v[key] / n[key] for v, n in zip(runs[who], runs["naive"],
                                                                 strict=True))

    how = "copied out as bytes" if args.copy else "read into each request's buffer"
    print(f"# virtq vs a plain-stdlib vhost-user-blk front-end: 4 KiB random reads ({how}), "
          f"qemu-storage-daemon aio={aio}, image on {fstype}, {args.seconds:g} s per run, "
          f"{args.rounds} round(s), medians")
    print("| QD | front-end | IOPS | p50 µs | CPU-µs/req | CPU / naive | QSD CPU-µs/req |")
    print("|---|---|---|---|---|---|---|")
    for depth, runs in results.items():
        for who in WHO:
            rel = "1" if who == "naive" else f"{ratio(runs, who, 'cpu_us'):.2f}"
            print(f"| {depth} | {who} | {med(runs[who], 'iops'):,.0f} "
                  f"| {med(runs[who], 'p50'):.1f} | {med(runs[who], 'cpu_us'):.2f} | {rel} "
                  f"| {med(runs[who], 'backend_cpu_us'):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
