"""``virtq bench blk``: 4 KiB random reads against qemu-storage-daemon.

Reports IOPS, latency percentiles and virtq's own CPU time per request (psutil: user +
system time of this process, which runs only the driver; QSD is another process).  CPU
cost is the number to compare across machines: IOPS depend on the back-end's speed.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from virtq.cli import _args
from virtq.devices import BlkDevice
from virtq.testing.runners import QemuStorageDaemon, make_image

IMAGE_BYTES = 256 << 20
IO = 4096
#: run_depth gives a depth a queue of up to 3 x depth entries; a split ring has 32768.
MAX_DEPTH = 32768 // 3


def _progress(label: str, frac: float) -> None:
    width = 30
    filled = int(width * min(1.0, frac))
    sys.stderr.write(f"\r{label:<28} [{'#' * filled}{'.' * (width - filled)}] {frac:4.0%}")
    sys.stderr.flush()


#: ``--modes``: how the driver waits for completions.
MODES = {
    "poll": "busy-polls the used ring (no notifications: lowest latency, a whole core)",
    "eventfd": "sleeps on the call eventfd until the next completion",
    "batch": "sleeps until 3/8 of the queue depth has completed (poll(min_completions=))",
}


def run_depth(socket_path: Path, depth: int, seconds: float, mode: str,
              label: str, *, backend_pid: int | None = None,
              copy: bool = False, batch: int | None = None) -> dict[str, float]:
    """One row: keep ``depth`` random 4 KiB reads in flight for ``seconds``, refilling with
    one ``submit_read_many`` per ``poll``.  The data lands in one DmaBuffer per request
    (zero-copy, as fio reads into its buffers), or with ``copy`` is returned as ``bytes``.
    ``mode`` is a key of :data:`MODES`.  Latency is per request (submit to reap); CPU is
    this process's, and the back-end's when ``backend_pid`` is given.  ``batch`` overrides
    the batch mode's ``min_completions``."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
    min_completions = 1
    if mode == "batch":
        min_completions = batch or max(1, depth * 3 // 8)
    queue_size = 1 << max(7, (3 * depth - 1).bit_length())
    sectors_total = IMAGE_BYTES // 512
    rng = random.Random(depth)
    targets = [rng.randrange(0, sectors_total - 8) & ~7 for _ in range(65536)]
    targets += targets[:depth]  # targets[k : k + m] never wraps (k < 65536, m <= depth)
    backend = psutil.Process(backend_pid) if backend_pid else None
    with BlkDevice.connect_vhost_user(socket_path, queue_size=queue_size,
                                      poll=mode == "poll", max_io=IO) as dev:
        for i in range(min(depth, 64)):  # warm up
            dev.read(targets[i], IO)
        arena = None if copy else dev.alloc_buffer(IO * depth)
        buffers = [] if arena is None else [arena.slice(i * IO, IO) for i in range(depth)]
        proc = psutil.Process()
        lat: list[int] = []
        # Submission times by request slot: cheaper than a dict keyed by request, and
        # this loop's own cost is counted as virtq's.
        started = [0] * (dev.slots_per_queue * len(dev.queues))
        pc = time.perf_counter_ns
        submit_many = dev.submit_read_many
        t = pc()
        if copy:
            reqs = submit_many(targets[:depth], IO)
        else:
            reqs = submit_many(targets[:depth], into=buffers)
        for req in reqs:
            started[req.slot] = t
        k = depth
        cpu0 = proc.cpu_times()
        bcpu0 = backend.cpu_times() if backend else None
        t0 = time.monotonic()
        end = t0 + seconds
        next_progress = t0
        done = 0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_progress:
                _progress(label, (now - t0) / seconds)
                next_progress = now + 0.2
            completed = dev.poll(timeout=1.0, min_completions=min_completions)
            m = len(completed)
            if not m:
                continue
            t = pc()
            errors = [req.error for req in completed if req.error is not None]
            if errors:
                raise errors[0]
            lat += [t - started[req.slot] for req in completed]
            # Refill: each zero-copy buffer goes back with the next request.
            if copy:
                reqs = submit_many(targets[k : k + m], IO)
            else:
                reqs = submit_many(targets[k : k + m],
                                   into=[req.into[0] for req in completed if req.into])
            for req in reqs:
                started[req.slot] = t
            k = (k + m) & 0xFFFF
            done += m
        elapsed = time.monotonic() - t0
        cpu1 = proc.cpu_times()
        bcpu1 = backend.cpu_times() if backend else None
        dev.wait(timeout=10)
        del reqs, completed, buffers, arena  # before the device closes its memory
    _progress(label, 1.0)
    sys.stderr.write("\n")
    return bench_row(lat, done, elapsed, (cpu0, cpu1), (bcpu0, bcpu1))


def bench_row(lat: list[int], done: int, elapsed: float, cpu: tuple[Any, Any],
              backend_cpu: tuple[Any, Any]) -> dict[str, float]:
    """The table row for ``done`` requests in ``elapsed`` seconds: latencies (ns) to
    percentiles, psutil ``cpu_times()`` before/after (the back-end's may be None) to CPU
    per request and utilisation."""
    lat.sort()

    def used(times: tuple[Any, Any]) -> float:
        before, after = times
        return float((after.user - before.user) + (after.system - before.system))

    spent = used(cpu)
    row = {
        "iops": done / elapsed,
        "p50": lat[len(lat) // 2] / 1000,
        "p99": lat[int(len(lat) * 0.99)] / 1000,
        "cpu_us": spent / done * 1e6,
        "cpu_util": spent / elapsed,
    }
    if None not in backend_cpu:
        bspent = used(backend_cpu)
        row["backend_cpu_us"] = bspent / done * 1e6
        row["backend_util"] = bspent / elapsed
    return row


def make_bench_image(directory: Path) -> Path:
    """A 256 MiB image full of data (reads of holes would be free), in the page cache."""
    image = make_image(directory / "bench.img", IMAGE_BYTES, pattern=False)
    with open(image, "r+b") as f:
        chunk = bytes(range(256)) * 4096
        for _ in range(IMAGE_BYTES // len(chunk)):
            f.write(chunk)
    return image


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/self/mounts)."""
    best, fstype = "", "?"
    target = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            mount = fields[1]
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) \
                    and len(mount) > len(best):
                best, fstype = mount, fields[2]
    return fstype


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="virtq bench blk", description=__doc__)
    # A depth needs a queue of 3 x depth entries (run_depth), at most 32768.
    p.add_argument("--depths", type=_args.int_list(_args.int_in(1, MAX_DEPTH)),
                   default=[1, 32, 128], help=f"queue depths 1..{MAX_DEPTH}, comma-separated")
    p.add_argument("--seconds", type=_args.seconds(), default=3.0, help="per depth and mode")
    p.add_argument("--modes", default=",".join(MODES),
                   help="; ".join(f"{k}: {v}" for k, v in MODES.items()))
    p.add_argument("--copy", action="store_true",
                   help="return each read as bytes (copied out of a bounce buffer) instead "
                        "of reading into DmaBuffers")
    p.add_argument("--batch", type=_args.positive_int, default=None,
                   help="min_completions in batch mode (default: 3/8 of the depth)")
    # aio=native needs cache.direct=on, which the benchmark does not set.
    p.add_argument("--aio", default="io_uring", choices=["io_uring", "threads"],
                   help="qemu-storage-daemon aio= mode")
    p.add_argument("--image-dir", type=_args.directory, default=None,
                   help="where the 256 MiB image goes (default: the temp dir; avoid tmpfs)")
    args = _args.parse(p, argv)
    depths = args.depths
    if args.batch is not None and args.batch > min(depths):
        p.error(f"--batch {args.batch}: more than the smallest depth ({min(depths)}) would "
                "wait for completions that can never come")
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        p.error(f"--modes: unknown {sorted(set(modes) - set(MODES))}; choose from "
                f"{', '.join(MODES)}")
    # Not /dev/shm: QEMU's io_uring reads from tmpfs go through kernel worker threads
    # (measured here: under half the IOPS of the same image in a disk filesystem's page
    # cache), which would measure the kernel rather than the front-end.
    with tempfile.TemporaryDirectory(dir=args.image_dir) as tmp:
        image = make_bench_image(Path(tmp))
        fstype = filesystem_type(image)
        with QemuStorageDaemon(image, Path(tmp) / "bench.sock", aio=args.aio) as qsd:
            assert qsd.proc is not None
            rows = []
            for depth in depths:
                for mode in modes:
                    r = run_depth(qsd.socket_path, depth, args.seconds, mode,
                                  f"QD {depth} {mode}", backend_pid=qsd.proc.pid,
                                  copy=args.copy, batch=args.batch)
                    rows.append((depth, mode, r))
    how = "copied out as bytes" if args.copy else "zero-copy into DmaBuffers"
    print(f"# virtq bench blk: 4 KiB random reads ({how}), qemu-storage-daemon "
          f"aio={args.aio}, image on {fstype}, {args.seconds:g} s per row")
    print("| QD | mode | IOPS | p50 µs | p99 µs | virtq CPU-µs/req | virtq CPU use "
          "| QSD CPU-µs/req | QSD CPU use |")
    print("|---|---|---|---|---|---|---|---|---|")
    for depth, mode, r in rows:
        print(f"| {depth} | {mode} | {r['iops']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} "
              f"| {r['cpu_us']:.2f} | {r['cpu_util']:.0%} "
              f"| {r['backend_cpu_us']:.2f} | {r['backend_util']:.0%} |")
    print()
    for mode in modes:
        print(f"- {mode}: {MODES[mode]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
