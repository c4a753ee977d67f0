"""``virtq bench vfio``: per-request latency of virtio-rng and virtio-blk through VFIO.

Rows: rng (64-byte reads) and blk (4 KiB reads), each by polling and by MSI-X eventfd;
columns: mean, median and p99 in microseconds.  With ``--reference-json`` (the
``result.json`` of the vfio-guest harness's standalone driver, ``vfio_virtio.py``) the same
rows of that driver are printed beside, with the ratio virtq / reference.

Where it runs: on a machine whose virtio-pci functions can go to vfio-pci (``--here``,
implied inside the vfio-guest VM).  From a source checkout without one, it boots the
vfio-guest VM (``scripts/vfio-guest``) and runs, in that one boot, the reference driver and
then itself, so both are measured on the same emulated devices.  The numbers of a TCG guest
measure emulation more than drivers; compare ratios, not absolute values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from virtq.cli import _args
from virtq.devices.blk import BlkDevice
from virtq.devices.rng import RngDevice
from virtq.transport.vfio_pci import find_virtio_devices

RNG_BYTES = 64
BLK_BYTES = 4096
#: The rows, in print order: (key, label, reference driver's test name, polling?).
ROWS = (
    ("rng-poll", "rng 64 B   poll ", "rng", "poll"),
    ("rng-msix", "rng 64 B   MSI-X", "rng", "irq"),
    ("blk-poll", "blk 4 KiB  poll ", "blk", "poll"),
    ("blk-msix", "blk 4 KiB  MSI-X", "blk", "irq"),
)


def stats(samples: list[float]) -> dict[str, float]:
    """Mean, median, p99 and min in microseconds (p99 as the reference driver takes it:
    the element at n * 99 // 100 of the sorted samples)."""
    ordered = sorted(samples)
    n = len(ordered)
    return {
        "n": n,
        "mean_us": statistics.fmean(ordered) * 1e6,
        "p50_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[min(n - 1, n * 99 // 100)] * 1e6,
        "min_us": ordered[0] * 1e6,
    }


def _time(op: Callable[[int], object], iters: int, warmup: int) -> list[float]:
    for i in range(warmup):
        op(i)
    clock = time.perf_counter
    samples = []
    for i in range(iters):
        t0 = clock()
        op(i)
        samples.append(clock() - t0)
    return samples


def measure(rng_address: str, blk_address: str, iters: int, warmup: int = 20
            ) -> dict[str, dict[str, float]]:
    """Time ``iters`` requests per row (see :data:`ROWS`) on the virtio-rng and virtio-blk
    functions at these PCI addresses, after ``warmup`` untimed ones; :func:`stats` per row.
    Raises what :meth:`RngDevice.open_vfio` / :meth:`BlkDevice.open_vfio` raise."""
    results: dict[str, dict[str, float]] = {}
    for poll in (True, False):
        mode = "poll" if poll else "msix"
        with RngDevice.open_vfio(rng_address, poll=poll, bind=True) as rng:
            results[f"rng-{mode}"] = stats(_time(lambda _i: rng.read(RNG_BYTES), iters, warmup))
        with BlkDevice.open_vfio(blk_address, poll=poll) as blk:
            sectors = max(8, min(blk.capacity, 1024) - 8)

            def read(i: int, blk: BlkDevice = blk, sectors: int = sectors) -> object:
                return blk.read((i * 8) % sectors, BLK_BYTES)

            results[f"blk-{mode}"] = stats(_time(read, iters, warmup))
    return results


def reference_rows(path: Path) -> dict[str, dict[str, float]]:
    """The rows of the harness driver's result.json."""
    data = json.loads(path.read_text())
    rows = {}
    for key, _label, test, mode in ROWS:
        latency = data.get(test, {}).get(mode, {}).get("latency")
        if latency:
            rows[key] = {k: float(v) for k, v in latency.items()}
    return rows


def render(ours: dict[str, dict[str, float]], ref: dict[str, dict[str, float]] | None,
           iters: int) -> str:
    """The text table of :func:`measure`'s rows, with the reference driver's rows and the
    ratios beside them when ``ref`` is given."""
    lines = [f"virtq bench vfio: {iters} requests per row, python {platform.python_version()}"
             f" ({sys.executable}), {platform.machine()}"]
    head = f"{'':18}{'virtq (us)':^26}"
    sub = f"{'':18}{'mean':>8}{'median':>9}{'p99':>9}"
    if ref is not None:
        head += f"  {'reference driver (us)':^26}  {'virtq / reference':^26}"
        sub += f"  {'mean':>8}{'median':>9}{'p99':>9}  {'mean':>8}{'median':>9}{'p99':>9}"
    lines += [head, sub]
    for key, label, _test, _mode in ROWS:
        row = ours.get(key)
        if row is None:
            continue
        cells = [row["mean_us"], row["p50_us"], row["p99_us"]]
        text = f"{label:18}" + "".join(f"{v:>{8 if i == 0 else 9}.1f}" for i, v in
                                       enumerate(cells))
        other = (ref or {}).get(key)
        if ref is not None and other:
            ref_cells = [other["mean_us"], other["p50_us"], other["p99_us"]]
            text += "  " + "".join(f"{v:>{8 if i == 0 else 9}.1f}" for i, v in
                                   enumerate(ref_cells))
            text += "  " + "".join(f"{a / b:>{8 if i == 0 else 9}.2f}" for i, (a, b) in
                                   enumerate(zip(cells, ref_cells, strict=True)))
        lines.append(text)
    return "\n".join(lines)


def _run_here(args: argparse.Namespace) -> int:
    rng = args.rng or next(iter(find_virtio_devices(4)), None)
    blk = args.blk or next(iter(find_virtio_devices(2)), None)
    if rng is None or blk is None:
        print("virtq bench vfio: no virtio-rng (1af4:1044) or virtio-blk (1af4:1042) function "
              "here; pass --rng/--blk, or run from a checkout to use the vfio-guest VM",
              file=sys.stderr)
        return 2
    ours = measure(rng, blk, args.iters)
    ref = reference_rows(Path(args.reference_json)) if args.reference_json else None
    print(render(ours, ref, args.iters))
    if args.json:
        Path(args.json).write_text(json.dumps({"virtq": ours, "reference": ref}, indent=1))
    return 0


def _run_in_guest(args: argparse.Namespace) -> int:
    # virtq/cli/bench_vfio.py -> the checkout's root (three levels up).
    wrapper = Path(__file__).resolve().parents[2] / "scripts" / "vfio-guest"
    if not wrapper.exists():
        print(f"virtq bench vfio: no VFIO devices here and no {wrapper} (a source checkout "
              "has it) to boot the vfio-guest VM; use --here on a machine with devices",
              file=sys.stderr)
        return 2
    n = int(args.iters)
    # One boot, both drivers, the same interpreter: the reference first (it binds the
    # devices to vfio-pci itself), then virtq.
    command = (
        f'$PY -u "$VIRTQ_VG_SCRIPTS/vfio_virtio.py" --tests rng,blk --iters {n} '
        f'--out "$VIRTQ_GUEST_OUT/reference.json" > "$VIRTQ_GUEST_OUT/reference.log" 2>&1 '
        f'|| {{ cat "$VIRTQ_GUEST_OUT/reference.log"; exit 1; }}; '
        f'grep -E "(rng|blk) (poll|irq):" "$VIRTQ_GUEST_OUT/reference.log"; '
        f'$PY -m virtq.cli.bench_vfio --here --iters {n} '
        f'--reference-json "$VIRTQ_GUEST_OUT/reference.json" '
        f'--json "$VIRTQ_GUEST_OUT/bench.json"'
    )
    argv = [str(wrapper)]
    if args.out:
        argv += ["--out", args.out]
    argv += ["--", command]
    print(f"virtq bench vfio: booting the vfio-guest VM ({shlex.join(argv[:-2])} ...)",
          flush=True)
    return subprocess.run(argv, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    """``virtq bench vfio [options]``: measure here (``--here``, or inside the vfio-guest
    VM), else boot the VM from a source checkout and measure there.  Returns 0, or 2 when
    there is nothing to measure on (the command's status when the VM ran it)."""
    parser = argparse.ArgumentParser(
        prog="virtq bench vfio",
        description="Per-request latency of virtio-rng and virtio-blk through VFIO, beside "
                    "the vfio-guest harness's reference driver.")
    parser.add_argument("--iters", type=_args.positive_int, default=1000,
                        help="requests per row [1000]")
    parser.add_argument("--here", action="store_true",
                        help="measure on this machine's devices (implied in the vfio-guest VM)")
    parser.add_argument("--rng", help="PCI address of the virtio-rng function (default: found "
                                      "by vendor:device id)")
    parser.add_argument("--blk", help="PCI address of the virtio-blk function")
    parser.add_argument("--reference-json", help="result.json of the harness's vfio_virtio.py "
                                                 "to compare with")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--out", help="run folder for the VM (default .cache/vfio-guest/out/...)")
    args = _args.parse(parser, argv)
    if args.here or os.environ.get("VIRTQ_GUEST") == "1":
        return _run_here(args)
    return _run_in_guest(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
