"""virtq's vhost-user-blk CPU cost per request next to a plain-stdlib front-end, in one run.

    python benchmarks/bench_blk_ref.py [--depths 32] [--seconds 3] [--rounds 3]

One qemu-storage-daemon (aio=io_uring) serves a 256 MiB image in a disk filesystem's page
cache; for every depth and round, virtq (``virtq.bench_blk.run_depth``, eventfd mode) and
the plain front-end (naive_blk.py: struct + os over the same vhost-user control plane) each
keep that many random 4 KiB reads in flight, alternating which goes first.  The table gives
medians over the rounds; the ratios are the medians of the per-round virtq/naive ratios
(the two runs of a round are neighbours in time, so the ratio is what survives a noisy
machine).
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

from virtq.bench_blk import filesystem_type, make_bench_image, run_depth
from virtq.testing.backends import QemuStorageDaemon


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="32", help="queue depths, comma-separated")
    p.add_argument("--seconds", type=float, default=3.0, help="per run")
    p.add_argument("--rounds", type=int, default=3, help="virtq + naive pairs per depth")
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
                runs: dict[str, list[dict[str, float]]] = {"virtq": [], "naive": []}
                for rnd in range(args.rounds):
                    order = ["virtq", "naive"] if rnd % 2 == 0 else ["naive", "virtq"]
                    for who in order:
                        label = f"QD {depth} {who} {rnd + 1}/{args.rounds}"
                        if who == "virtq":
                            r = run_depth(qsd.socket_path, depth, args.seconds, False, label,
                                          backend_pid=pid)
                        else:
                            r = run_naive(qsd.socket_path, depth, args.seconds,
                                          backend_pid=pid, label=label)
                        runs[who].append(r)
                results[depth] = runs

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def ratio(runs: dict[str, list[dict[str, float]]], key: str) -> float:
        return statistics.median(v[key] / n[key] for v, n in zip(runs["virtq"], runs["naive"],
                                                                 strict=True))

    print(f"# virtq vs plain-stdlib vhost-user-blk front-end: 4 KiB random reads, "
          f"qemu-storage-daemon aio={aio}, image on {fstype}, {args.seconds:g} s per run, "
          f"{args.rounds} round(s), medians")
    print("| QD | virtq IOPS | naive IOPS | IOPS virtq/naive | virtq p50 µs | naive p50 µs "
          "| virtq CPU-µs/req | naive CPU-µs/req | CPU virtq/naive "
          "| QSD CPU-µs/req (virtq) | QSD CPU-µs/req (naive) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for depth, runs in results.items():
        v, n = runs["virtq"], runs["naive"]
        print(f"| {depth} | {med(v, 'iops'):,.0f} | {med(n, 'iops'):,.0f} "
              f"| {ratio(runs, 'iops'):.2f} "
              f"| {med(v, 'p50'):.1f} | {med(n, 'p50'):.1f} "
              f"| {med(v, 'cpu_us'):.2f} | {med(n, 'cpu_us'):.2f} "
              f"| {ratio(runs, 'cpu_us'):.2f} "
              f"| {med(v, 'backend_cpu_us'):.2f} | {med(n, 'backend_cpu_us'):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
