"""Every benchmark of issue 18 next to its fair reference, in one run, into one Markdown
file: the README's "Performance" section is regenerated from this.

    python benchmarks/all.py [--markdown FILE] [--quick] [--json FILE] [--only ring,blk,...]

Parts, in this order (each is the existing benchmark, run in this process, its table kept):

- ``ring``: benchmarks/bench_ring.py, split and packed, in-order off and on, 1- and
  3-descriptor chains, one chain and 32 per publish, against the fair naive rings.
- ``blk``: benchmarks/bench_blk_ref.py at QD 32 and 128, batch and eventfd waiting: virtq's
  CPU per request and IOPS next to qemu-storage-daemon's CPU per request and to the plain
  stdlib front-end's (naive_blk.py), in one run.
- ``queues``: ``virtq bench blk --queues 1,2,4`` at QD 32 and 128, batch waiting.
- ``net``: ``virtq bench net``, split and packed rings, TX and RX, against DPDK's C
  virtio-user on the same dpdk-testpmd back-end.
- ``profile``: ``virtq bench profile``: one request in stages next to the CPython floor.

Then, per target of issue 18, a line "met" or "missed (ratio X, target Y)".  The default
durations keep the whole run under 10 minutes on a 2-CPU host; ``--quick`` (for the smoke
test) under a minute, with numbers too short to mean anything.

Every ratio is taken between runs of the same invocation, interleaved where the benchmark
interleaves them; absolute numbers are host- and load-dependent.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench_ring's and bench_blk_ref's neighbours, and virtq from this checkout when it is not
# installed (appended, as the benchmarks do: an install comes first).
sys.path.append(str(HERE))
sys.path.append(str(ROOT))

from virtq.cli.benchutil import cpu_model  # noqa: E402

PARTS = ("ring", "blk", "queues", "net", "profile")

#: Issue 18's targets.
RING_MIN = 3.0  # naive ns / virtq ns, batched by 32, driver side
BLK_MAX = 0.5  # virtq CPU per request / QSD CPU per request
QUEUES_SPREAD = 0.10  # |CPU(n queues) / CPU(1 queue) - 1|
NET_MAX = {"TX": 5.0, "RX": 2.5}  # C Mpps / virtq Mpps


class Tee(io.TextIOBase):
    """Writes to ``stream`` and keeps a copy."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.copy.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def load_script(name: str) -> Any:
    """A benchmark script of this directory as a module."""
    spec = importlib.util.spec_from_file_location(f"all_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_part(main: Callable[[list[str]], int], argv: list[str], json_path: Path
             ) -> tuple[str, dict[str, Any]]:
    """Run one benchmark's ``main(argv + --json)``; its printed text and its results."""
    tee = Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        rc = main([*argv, "--json", str(json_path)])
    if rc != 0:
        raise SystemExit(f"all: {argv} exited {rc}")
    return tee.copy.getvalue(), json.loads(json_path.read_text())


def values(results: dict[str, Any]) -> dict[tuple[str, str], float]:
    return {(v["row"], v["metric"]): v["value"] for v in results["values"]}


def verdict(what: str, ratio: float, target: float, *, at_most: bool) -> tuple[bool, str]:
    ok = ratio <= target if at_most else ratio >= target
    bound = "≤" if at_most else "≥"
    if ok:
        return True, f"- {what}: met (ratio {ratio:.2f}, target {bound} {target:g})"
    return False, f"- {what}: missed (ratio {ratio:.2f}, target {bound} {target:g})"


def ring_targets(res: dict[str, Any]) -> list[tuple[bool, str]]:
    """One verdict per ring format, in-order and chain length: virtq's best batched way
    to keep 32 chains going -- ``add_many()``, or refilling a chain template with the
    buffers its slots held (direct or indirect, as the queue chose) -- against the fair
    naive ring of the same row; the line names the way."""
    v = values(res)
    out = []
    for ring in ("split", "packed"):
        for io_ in ("off", "on"):
            for chain in (1, 3):
                prefix = f"{ring}, in-order {io_}, chain {chain}, batch 32, event_idx on, "
                rows = [prefix + "indirect off, add_many()"]
                rows += [f"{prefix}indirect {ind}, template, same buffers"
                         for ind in (("off", "on") if chain == 3 else ("off",))]
                ratios = {row: v[row, "naive ns/chain (control)"] / v[row, "virtq ns/chain"]
                          for row in rows if (row, "virtq ns/chain") in v}
                if not ratios:
                    continue
                best = max(ratios, key=ratios.__getitem__)
                how = best[len(prefix):]
                out.append(verdict(f"ring {ring}, in-order {io_}, {chain}-descriptor chains, "
                                   f"32 per publish: fair naive ns / virtq ns (best: {how})",
                                   ratios[best], RING_MIN, at_most=False))
    return out


def blk_targets(res: dict[str, Any], depths: list[int], modes: list[str]
                ) -> list[tuple[bool, str]]:
    v = values(res)
    out = []
    for depth in depths:
        for mode in modes:
            mine, ref = f"QD {depth} {mode} virtq", f"QD {depth} {mode} naive"
            cpu = v[mine, "CPU-µs/req"] / v[mine, "QSD CPU-µs/req"]
            out.append(verdict(f"blk QD {depth} {mode}: virtq CPU/req / QSD CPU/req", cpu,
                               BLK_MAX, at_most=True))
            iops = v[mine, "IOPS"] / v[ref, "IOPS"]
            out.append(verdict(f"blk QD {depth} {mode}: virtq IOPS / plain front-end IOPS",
                               iops, 1.0, at_most=False))
    return out


def queue_targets(res: dict[str, Any], queues: list[int], depths: list[int]
                  ) -> list[tuple[bool, str]]:
    v = values(res)
    out = []
    for depth in depths:
        base = v[f"1 queue(s) QD {depth} batch", "virtq CPU-µs/req"]
        worst = max((v[f"{n} queue(s) QD {depth} batch", "virtq CPU-µs/req"] / base
                     for n in queues), key=lambda r: abs(r - 1))
        ok = abs(worst - 1) <= QUEUES_SPREAD
        what = (f"blk QD {depth} batch, {','.join(map(str, queues))} queues: CPU/req vs 1 "
                "queue, the furthest")
        out.append((ok, f"- {what}: {'met' if ok else 'missed'} (ratio {worst:.2f}, target "
                        f"1 ± {QUEUES_SPREAD:g})"))
    return out


def net_targets(res: dict[str, Any], ring: str) -> list[tuple[bool, str]]:
    v = values(res)
    out = []
    for d in ("TX", "RX"):
        c = v.get((f"{d} {ring} DPDK virtio-user (C)", "Mpps"))
        mine = [v[k] for k in v if k[0].startswith(f"{d} {ring} virtq") and k[1] == "Mpps"]
        if c is None or not mine or max(mine) <= 0:
            continue
        out.append(verdict(f"net {d} {ring}: DPDK C Mpps / virtq Mpps (virtq's best mode)",
                           c / max(mine), NET_MAX[d], at_most=True))
    return out


def as_markdown(text: str) -> str:
    """A benchmark's printed table as Markdown: its ``# ...`` comment lines (the title,
    the host, the back-end) become paragraphs, not headings (they would be, in Markdown)."""
    out: list[str] = []
    for line in text.rstrip().splitlines():
        if line.startswith("# "):
            out += [line[2:], ""]
        else:
            out.append(line)
    return "\n".join(out).rstrip()


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" (with uncommitted changes)" if dirty.strip() else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--markdown", help="write the report (every table, the targets) here")
    p.add_argument("--json", help="write every part's numbers and the verdicts here")
    p.add_argument("--quick", action="store_true",
                   help="seconds, not minutes: a smoke run (numbers mean nothing)")
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"parts to run, comma-separated: {', '.join(PARTS)}")
    args = p.parse_args(argv)
    parts = [x for x in args.only.split(",") if x]
    if not parts or set(parts) - set(PARTS):
        p.error(f"--only: a comma-separated list of {', '.join(PARTS)}")
    q = args.quick
    blk_depths = [32] if q else [32, 128]
    blk_modes = ["batch"] if q else ["batch", "eventfd"]
    queues = [1, 2, 4]
    started = time.monotonic()
    now = datetime.datetime.now(datetime.UTC)
    rev = git_rev()
    host = (f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()} "
            f"({platform.python_implementation()}), {platform.system()} {platform.release()}")
    sections: list[tuple[str, str]] = []
    targets: list[tuple[bool, str]] = []
    everything: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="virtq-bench-all-") as tmp:
        out = Path(tmp)
        if "ring" in parts:
            ring = load_script("bench_ring")
            argv_ = (["--seconds", "0.02", "--rounds", "1"] if q
                     else ["--seconds", "0.6", "--rounds", "3"])
            text, res = run_part(ring.main, argv_, out / "ring.json")
            sections.append(("Ring operations: virtq vs a fair naive ring "
                             "(benchmarks/bench_ring.py)", text))
            targets += ring_targets(res)
            everything["ring"] = res
        if "blk" in parts:
            ref = load_script("bench_blk_ref")
            argv_ = ["--depths", ",".join(map(str, blk_depths)), "--modes", ",".join(blk_modes),
                     *(["--seconds", "0.3", "--rounds", "1"] if q
                       else ["--seconds", "2", "--rounds", "3"])]
            text, res = run_part(ref.main, argv_, out / "blk.json")
            sections.append(("blk: virtq vs qemu-storage-daemon's CPU and a plain stdlib "
                             "front-end (benchmarks/bench_blk_ref.py)", text))
            targets += blk_targets(res, blk_depths, blk_modes)
            everything["blk"] = res
        if "queues" in parts:
            from virtq.cli import bench_blk  # noqa: PLC0415 - only when asked for

            argv_ = ["--queues", ",".join(map(str, queues)), "--depths",
                     ",".join(map(str, blk_depths)), "--modes", "batch",
                     "--seconds", "0.3" if q else "3"]
            text, res = run_part(bench_blk.main, argv_, out / "queues.json")
            sections.append(("blk over 1, 2 and 4 queues (virtq bench blk --queues)", text))
            targets += queue_targets(res, queues, blk_depths)
            everything["queues"] = res
        if "net" in parts:
            from virtq.cli import bench_net  # noqa: PLC0415 - only when asked for

            for ring_name in ("split", "packed"):
                argv_ = ["--ring", ring_name,
                         *(["--seconds", "0.2", "--warmup", "0.1", "--rounds", "1",
                            "--mode", "poll"] if q else ["--seconds", "2", "--rounds", "2"])]
                text, res = run_part(bench_net.main, argv_, out / f"net-{ring_name}.json")
                sections.append((f"net, {ring_name} ring: virtq vs DPDK's C virtio-user "
                                 "(virtq bench net)", text))
                targets += net_targets(res, ring_name)
                everything[f"net-{ring_name}"] = res
        if "profile" in parts:
            from virtq.cli import bench_profile  # noqa: PLC0415 - only when asked for

            argv_ = ["--seconds", "0.3", "--floor-ops", "20000"] if q else ["--seconds", "3"]
            text, res = run_part(bench_profile.main, argv_, out / "profile.json")
            sections.append(("One request in stages next to the CPython floor "
                             "(virtq bench profile)", text))
            everything["profile"] = res
    elapsed = time.monotonic() - started
    met = sum(ok for ok, _ in targets)
    lines = [
        "# virtq performance",
        "",
        f"- date: {now:%Y-%m-%d %H:%M} UTC",
        f"- commit: {rev}",
        f"- host: {host}",
        f"- command: `python benchmarks/all.py{' --quick' if q else ''}"
        f"{'' if parts == list(PARTS) else ' --only ' + ','.join(parts)}` "
        f"({elapsed:.0f} s)",
        "",
        f"## Issue 18 targets: {met} of {len(targets)} met",
        "",
        *[line for _, line in targets],
        "",
        "Ratios are between runs of this one invocation on one host (interleaved where the "
        "benchmark interleaves); the machine may be shared, so read a ratio near its "
        "target as a tie.",
    ]
    for title, text in sections:
        lines += ["", f"## {title}", "", as_markdown(text)]
    report = "\n".join(lines) + "\n"
    print()
    print(f"# issue 18 targets: {met} of {len(targets)} met ({elapsed:.0f} s)")
    for _, line in targets:
        print(line)
    if args.markdown:
        Path(args.markdown).write_text(report)
        print(f"markdown: {args.markdown}")
    if args.json:
        everything["targets"] = [{"met": ok, "line": line} for ok, line in targets]
        everything["elapsed_s"] = elapsed
        Path(args.json).write_text(json.dumps(everything, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
