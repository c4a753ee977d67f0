"""``virtq bench blk``: 4 KiB random reads against qemu-storage-daemon.

Reports IOPS, latency percentiles and virtq's own CPU time per request (psutil: user +
system time of this process, which runs only the driver; QSD is another process).  CPU
cost is the number to compare across machines: IOPS depend on the back-end's speed.

``--queues 1,2,4`` runs every depth and mode once per queue count instead (QSD exports
``num-queues`` = the largest): the depth is spread over the queues, and each completion
is refilled on its own queue.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from virtq.cli import _args, plot
from virtq.cli.benchutil import (
    ProgressBar,
    Results,
    cpu_seconds,
    host_line,
    io_stats,
    markdown_table,
)
from virtq.devices import BlkDevice, DmaBuffer
from virtq.errors import ArgumentError
from virtq.testing.runners import QemuStorageDaemon, make_image

if TYPE_CHECKING:
    from virtq.devices import BlkRequest

IMAGE_BYTES = 256 << 20
IO = 4096
#: run_depth gives a depth a queue of up to 3 x depth entries; a split ring has 32768.
MAX_DEPTH = 32768 // 3

#: ``--modes``: how the driver waits for completions.
MODES = {
    "poll": "busy-polls the used ring (no notifications: lowest latency, a whole core)",
    "eventfd": "sleeps on the call eventfd until the next completion",
    "batch": "sleeps until 3/8 of the queue depth has completed (poll(min_completions=))",
}


def read_targets(depth: int) -> list[int]:
    """The sectors a run at ``depth`` reads, 4 KiB-aligned, random but the same for every
    front-end at that depth: 65536 of them, then the first ``depth`` again, so a slice
    ``[k : k + m]`` with ``k < 65536`` and ``m <= depth`` never wraps."""
    rng = random.Random(depth)
    targets = [rng.randrange(0, IMAGE_BYTES // 512 - 8) & ~7 for _ in range(65536)]
    return targets + targets[:depth]


def batch_size(depth: int, batch: int | None = None) -> int:
    """``min_completions`` of the batch mode at ``depth``: ``batch``, or 3/8 of the depth."""
    return batch or max(1, depth * 3 // 8)


def run_depth(socket_path: Path, depth: int, seconds: float, mode: str,
              label: str, *, backend_pid: int | None = None,
              copy: bool = False, batch: int | None = None) -> dict[str, float]:
    """One row: keep ``depth`` random 4 KiB reads in flight for ``seconds``, refilling with
    one ``submit_read_many`` per ``poll``.  The data lands in one DmaBuffer per request
    (zero-copy, as fio reads into its buffers), or with ``copy`` is returned as ``bytes``.
    ``mode`` is a key of :data:`MODES`.  Latency is per request (submit to reap); CPU is
    this process's, and the back-end's when ``backend_pid`` is given (see
    :func:`~virtq.cli.benchutil.io_stats` for the keys).  ``batch`` overrides the batch
    mode's ``min_completions``.

    ``benchmarks/compare.py`` runs this against older virtq trees too, so it uses only
    long-standing API: ``connect_vhost_user``, ``submit_read_many``, ``poll``,
    ``alloc_buffer``, ``DmaBuffer.slice``, ``wait``, and a request's ``error``; requests
    are tracked in a dict keyed by the request object.  Raises
    :class:`~virtq.errors.ArgumentError` for an unknown ``mode``, and what the device
    raises."""
    if mode not in MODES:
        raise ArgumentError("mode", mode, f"one of {', '.join(MODES)}")
    min_completions = batch_size(depth, batch) if mode == "batch" else 1
    queue_size = 1 << max(7, (3 * depth - 1).bit_length())
    targets = read_targets(depth)
    backend = psutil.Process(backend_pid) if backend_pid else None
    bar = ProgressBar(label)
    with BlkDevice.connect_vhost_user(socket_path, queue_size=queue_size,
                                      poll=mode == "poll", max_io=IO) as dev:
        dev.submit_read_many(targets[:depth], IO)  # warm up
        dev.wait(timeout=10)
        arena = None if copy else dev.alloc_buffer(IO * depth)
        buffers = [] if arena is None else [arena.slice(i * IO, IO) for i in range(depth)]
        lat: list[int] = []
        # Request -> submission time (copy) or (submission time, its buffer) (zero-copy):
        # this bookkeeping runs per request and is counted as virtq's CPU.
        started: dict[object, int] = {}
        owned: dict[object, tuple[int, DmaBuffer]] = {}
        pc = time.perf_counter_ns
        submit_many = dev.submit_read_many
        t = pc()
        if copy:
            for req in submit_many(targets[:depth], IO):
                started[req] = t
        else:
            for req, buf in zip(submit_many(targets[:depth], into=buffers), buffers,
                                strict=True):
                owned[req] = (t, buf)
        k = depth
        completed: list[BlkRequest] = []
        freed: list[tuple[int, DmaBuffer]] = []
        bufs: list[DmaBuffer] = []
        cpu0 = cpu_seconds()
        bcpu0 = cpu_seconds(backend) if backend else 0.0
        t0 = time.monotonic()
        end = t0 + seconds
        next_progress = t0
        done = 0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_progress:
                bar.show((now - t0) / seconds)
                next_progress = now + 0.2
            completed = dev.poll(timeout=1.0, min_completions=min_completions)
            m = len(completed)
            if not m:
                continue
            t = pc()
            errors = [req.error for req in completed if req.error is not None]
            if errors:
                raise errors[0]
            if copy:
                pop = started.pop
                lat += [t - pop(req) for req in completed]
                for req in submit_many(targets[k : k + m], IO):
                    started[req] = t
            else:
                # Refill: each zero-copy buffer goes back with the next request.
                freed = [owned.pop(req) for req in completed]
                lat += [t - t_sub for t_sub, _ in freed]
                bufs = [buf for _, buf in freed]
                for req, buf in zip(submit_many(targets[k : k + m], into=bufs), bufs,
                                    strict=True):
                    owned[req] = (t, buf)
            k = (k + m) & 0xFFFF
            done += m
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds() - cpu0
        bcpu = cpu_seconds(backend) - bcpu0 if backend else None
        dev.wait(timeout=10)
        # Before the device closes its memory: nothing may still view the buffers.
        del completed, freed, bufs, buffers, arena
        owned.clear()
    bar.close()
    return io_stats(lat, done, elapsed, cpu, bcpu)


def run_queues(socket_path: Path, queues: int, depth: int, seconds: float, mode: str,
               label: str, *, backend_pid: int | None = None,
               batch: int | None = None) -> dict[str, float]:
    """One row of the queue sweep: ``depth`` random 4 KiB zero-copy reads in flight,
    spread over ``queues`` request queues (VIRTIO_BLK_F_MQ), for ``seconds``.  Each
    completion is refilled on the queue it came from, with one ``submit_read_many(...,
    queue=q)`` per queue per ``poll``.  Keys as :func:`run_depth`'s.  Raises
    :class:`~virtq.errors.ArgumentError` for an unknown ``mode`` or a depth smaller than
    ``queues``, and what the device raises."""
    if mode not in MODES:
        raise ArgumentError("mode", mode, f"one of {', '.join(MODES)}")
    if depth < queues:
        raise ArgumentError("depth", depth, f"at least one request per queue ({queues})")
    min_completions = batch_size(depth, batch) if mode == "batch" else 1
    per_queue = [depth // queues + (1 if q < depth % queues else 0) for q in range(queues)]
    queue_size = 1 << max(7, (3 * max(per_queue) - 1).bit_length())
    targets = read_targets(depth)
    backend = psutil.Process(backend_pid) if backend_pid else None
    bar = ProgressBar(label)
    with BlkDevice.connect_vhost_user(socket_path, queue_size=queue_size, num_queues=queues,
                                      poll=mode == "poll", max_io=IO) as dev:
        arena = dev.alloc_buffer(IO * depth)
        buffers = [arena.slice(i * IO, IO) for i in range(depth)]
        owned: dict[BlkRequest, tuple[int, DmaBuffer]] = {}
        pc = time.perf_counter_ns
        t = pc()
        k = 0
        for q, n in enumerate(per_queue):  # warm up, then the first fill
            dev.wait(dev.submit_read_many(targets[k : k + n], IO, queue=q), timeout=10)
            for req, buf in zip(dev.submit_read_many(targets[k : k + n],
                                                     into=buffers[k : k + n], queue=q),
                                buffers[k : k + n], strict=True):
                owned[req] = (t, buf)
            k += n
        lat: list[int] = []
        completed: list[BlkRequest] = []
        cpu0 = cpu_seconds()
        bcpu0 = cpu_seconds(backend) if backend else 0.0
        t0 = time.monotonic()
        end = t0 + seconds
        next_progress = t0
        done = 0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_progress:
                bar.show((now - t0) / seconds)
                next_progress = now + 0.2
            completed = dev.poll(timeout=1.0, min_completions=min_completions)
            m = len(completed)
            if not m:
                continue
            t = pc()
            by_queue: dict[int, list[DmaBuffer]] = {}
            for req in completed:
                if req.error is not None:
                    raise req.error
                t_sub, buf = owned.pop(req)
                lat.append(t - t_sub)
                by_queue.setdefault(req.queue, []).append(buf)
            for q, bufs in by_queue.items():
                n = len(bufs)
                for req, buf in zip(dev.submit_read_many(targets[k : k + n], into=bufs,
                                                         queue=q), bufs, strict=True):
                    owned[req] = (t, buf)
                k = (k + n) & 0xFFFF
            done += m
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds() - cpu0
        bcpu = cpu_seconds(backend) - bcpu0 if backend else None
        dev.wait(timeout=10)
        # Before the device closes its memory: nothing may still view the buffers.
        del completed, buffers, arena
        owned.clear()
    bar.close()
    return io_stats(lat, done, elapsed, cpu, bcpu)


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
    """``virtq bench blk [options]``: start qemu-storage-daemon, run every depth and mode,
    print the table (``--json``: write the numbers too).  Returns 0; argparse exits on bad
    options; a back-end that cannot start raises
    :class:`~virtq.testing.runners.BackendError`."""
    p = argparse.ArgumentParser(prog="virtq bench blk", description=_args.plain(__doc__ or ""))
    # A depth needs a queue of 3 x depth entries (run_depth), at most 32768.
    p.add_argument("--depths", type=_args.int_list(_args.int_in(1, MAX_DEPTH)),
                   default=None, help=f"queue depths 1..{MAX_DEPTH}, comma-separated "
                   "(default: 1,32,128; with --queues 32,128)")
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
    p.add_argument("--queues", type=_args.int_list(_args.int_in(1, 64)), default=None,
                   help="request queue counts, comma-separated (e.g. 1,2,4): one row per "
                        "count, depth and mode, over a qemu-storage-daemon with as many "
                        "queues as the largest")
    p.add_argument("--json", help="also write the numbers to this file")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw the table: IOPS, and CPU per request of virtq and QSD, by "
                        "queue depth and mode (needs matplotlib: virtq[plot])")
    args = _args.parse(p, argv)
    if args.plot:
        plot.require()  # before minutes of measuring, not after
    depths = args.depths or ([32, 128] if args.queues else [1, 32, 128])
    if args.batch is not None and args.batch > min(depths):
        p.error(f"--batch {args.batch}: more than the smallest depth ({min(depths)}) would "
                "wait for completions that can never come")
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        p.error(f"--modes: unknown {sorted(set(modes) - set(MODES))}; choose from "
                f"{', '.join(MODES)}")
    if args.queues is not None:
        if args.copy:
            p.error("--queues measures zero-copy reads only (drop --copy)")
        if max(args.queues) > min(depths):
            p.error(f"--queues {max(args.queues)}: more queues than the smallest depth "
                    f"({min(depths)}) leaves a queue with nothing to do")
        if args.plot:
            p.error("--plot draws the depth table; it is not drawn for --queues")
        return queue_sweep(args, depths, modes)
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
    title = (f"virtq bench blk: 4 KiB random reads ({how}), qemu-storage-daemon "
             f"aio={args.aio}, image on {fstype}, {args.seconds:g} s per row; {host_line()}")
    print(f"# {title}")
    results = Results("blk", title)
    table = []
    for depth, mode, r in rows:
        table.append([depth, mode, f"{r['iops']:,.0f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}",
                      f"{r['cpu_us']:.2f}", f"{r['cpu_util']:.0%}",
                      f"{r['backend_cpu_us']:.2f}", f"{r['backend_util']:.0%}"])
        row = f"QD {depth} {mode}"
        results.add(row, "IOPS", r["iops"], "higher")
        results.add(row, "p50 µs", r["p50"], "lower")
        results.add(row, "p99 µs", r["p99"], "lower")
        results.add(row, "virtq CPU-µs/req", r["cpu_us"], "lower")
        results.add(row, "QSD CPU-µs/req", r["backend_cpu_us"], None)
    print(markdown_table(["QD", "mode", "IOPS", "p50 µs", "p99 µs", "virtq CPU-µs/req",
                          "virtq CPU use", "QSD CPU-µs/req", "QSD CPU use"], table,
                         "rlrrrrrrr"))
    print()
    for mode in modes:
        print(f"- {mode}: {MODES[mode]}")
    if args.json:
        results.write(args.json)
    if args.plot:
        draw(args.plot, title, rows, depths, modes)
        print(f"plot: {args.plot}")
    return 0


def draw(path: str, title: str, rows: list[tuple[int, str, dict[str, float]]],
         depths: list[int], modes: list[str]) -> None:
    """``--plot``: IOPS by queue depth (a bar per mode), and CPU-µs per request of virtq
    next to QSD's in the same run.  Raises what :func:`virtq.cli.plot.bar_charts` raises."""
    by = {(d, m): r for d, m, r in rows}
    groups = [f"QD {d}" for d in depths]
    iops = plot.Panel("IOPS", groups, {m: [by[d, m]["iops"] for d in depths] for m in modes})
    cpu = plot.Panel("CPU-µs per request", groups, lower_is_better=True)
    for m in modes:
        cpu.series[f"virtq {m}"] = [by[d, m]["cpu_us"] for d in depths]
        cpu.series[f"QSD ({m})"] = [by[d, m]["backend_cpu_us"] for d in depths]
    plot.bar_charts(path, title, [iops, cpu])


def queue_sweep(args: argparse.Namespace, depths: list[int], modes: list[str]) -> int:
    """``--queues``: every queue count at every depth and mode, one table."""
    queues: list[int] = args.queues
    with tempfile.TemporaryDirectory(dir=args.image_dir) as tmp:
        image = make_bench_image(Path(tmp))
        fstype = filesystem_type(image)
        with QemuStorageDaemon(image, Path(tmp) / "bench.sock", aio=args.aio,
                               num_queues=max(queues)) as qsd:
            assert qsd.proc is not None
            rows = []
            for depth in depths:
                for mode in modes:
                    for n in queues:
                        r = run_queues(qsd.socket_path, n, depth, args.seconds, mode,
                                       f"{n} queue(s) QD {depth} {mode}",
                                       backend_pid=qsd.proc.pid, batch=args.batch)
                        rows.append((n, depth, mode, r))
    title = (f"virtq bench blk --queues: 4 KiB random reads (zero-copy), QD spread over the "
             f"queues, qemu-storage-daemon num-queues={max(queues)} aio={args.aio}, image "
             f"on {fstype}, {args.seconds:g} s per row; {host_line()}")
    print(f"# {title}")
    results = Results("blk-queues", title)
    table = []
    for n, depth, mode, r in rows:
        table.append([n, depth, mode, f"{r['iops']:,.0f}", f"{r['p50']:.1f}",
                      f"{r['p99']:.1f}", f"{r['cpu_us']:.2f}", f"{r['cpu_util']:.0%}",
                      f"{r['backend_cpu_us']:.2f}", f"{r['backend_util']:.0%}"])
        row = f"{n} queue(s) QD {depth} {mode}"
        results.add(row, "IOPS", r["iops"], "higher")
        results.add(row, "p50 µs", r["p50"], "lower")
        results.add(row, "p99 µs", r["p99"], "lower")
        results.add(row, "virtq CPU-µs/req", r["cpu_us"], "lower")
        results.add(row, "QSD CPU-µs/req", r["backend_cpu_us"], None)
    print(markdown_table(["queues", "QD", "mode", "IOPS", "p50 µs", "p99 µs",
                          "virtq CPU-µs/req", "virtq CPU use", "QSD CPU-µs/req",
                          "QSD CPU use"], table, "rrlrrrrrrr"))
    print()
    for mode in modes:
        print(f"- {mode}: {MODES[mode]}")
    if args.json:
        results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
