"""``virtq bench reconnect``: the crash test's twin, timed.

Keeps QD 128 of mixed 4 KiB reads and writes (each write stamping its sectors, see
:mod:`virtq.testing.crash`) going over 4 queues of a :class:`~virtq.devices.BlkDevice`
with a :class:`~virtq.devices.ReconnectPolicy`, SIGKILLs the back-end a few times and
starts it again on the same socket after ``--restart-delay``.  Per kill it prints how long
the device was without a back-end -- from the kill to connected again, and to the first
completion after the reconnect -- how long the new back-end took to start, and how many
requests came back: resubmitted by the driver (qemu-storage-daemon: no inflight region)
or left in the kept rings for the back-end to carry out from its inflight region (the
embedded back-end with INFLIGHT_SHMFD).  At the end the image is checked against the
model of every acknowledged write, and every request must have completed exactly once
without an error (else the benchmark fails).

The times are dominated by the restart delay and the back-end's own start-up (a Python
interpreter for the embedded one); what the front-end adds is the rest.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from virtq.cli import _args
from virtq.cli.benchutil import Results, host_line, markdown_table
from virtq.devices import BlkDevice, ReconnectPolicy
from virtq.testing.crash import BLOCK, StampedWorkload
from virtq.testing.embedded import BackendProcess
from virtq.testing.runners import QemuStorageDaemon, make_image

IMAGE_BYTES = 64 << 20
BACKENDS = {
    "qsd": "qemu-storage-daemon 7.2 (no INFLIGHT_SHMFD: the driver resubmits)",
    "embedded": "virtq's embedded back-end with INFLIGHT_SHMFD (the back-end resubmits)",
}


def _start_backend(kind: str, image: Path, sock: Path, queues: int) -> Any:
    if kind == "qsd":
        return QemuStorageDaemon(image, sock, num_queues=queues).start()
    return BackendProcess(image, sock, num_queues=queues, inflight=True).start()


def _restart(backend: Any, delay: float, ready: list[float],
             errors: list[BaseException]) -> None:
    time.sleep(delay)
    try:
        backend.start()
    except BaseException as exc:  # the benchmark's thread raises it
        errors.append(exc)
    ready.append(time.monotonic())


def run_backend(kind: str, directory: Path, *, queues: int, depth: int, kills: int,
                per_kill: int, delay: float, seed: int, interval: float
                ) -> tuple[list[dict[str, float]], dict[str, int]]:
    """One back-end: ``kills`` kills, ``per_kill`` completions before each.  Returns a
    row per kill and a summary.  Raises :class:`~virtq.testing.crash.WorkloadError` if
    anything was lost, duplicated or failed, and the back-end's start-up errors."""
    image = make_image(directory / f"{kind}.img", IMAGE_BYTES)
    sock = directory / f"{kind}.sock"
    backend = _start_backend(kind, image, sock, queues)
    rows: list[dict[str, float]] = []
    try:
        policy = ReconnectPolicy(timeout=60.0, interval=interval)
        with BlkDevice.connect_vhost_user(sock, num_queues=queues, queue_size=depth,
                                          reconnect=policy) as dev:
            work = StampedWorkload(dev, blocks=IMAGE_BYTES // BLOCK, depth=depth, seed=seed)
            for i in range(kills):
                target = work.stats.completed + per_kill
                while work.stats.completed < target:
                    work.step()
                work.refill()
                dev.kick()
                in_flight = len(work.pending)
                ready: list[float] = []
                errors: list[BaseException] = []
                t_kill = time.monotonic()
                backend.kill()
                thread = threading.Thread(target=_restart,
                                          args=(backend, delay, ready, errors))
                thread.start()
                try:
                    while True:
                        work.step()
                        stats = dev.reconnect_stats()
                        if stats["reconnects"] == i + 1 and "first_at" in stats:
                            break
                        if errors:
                            raise errors[0]
                finally:
                    thread.join()
                if errors:
                    raise errors[0]
                rows.append({
                    "kill": i + 1, "in_flight": in_flight,
                    "startup_ms": (ready[0] - t_kill - delay) * 1000,
                    "reconnected_ms": (stats["back_at"] - t_kill) * 1000,
                    "first_ms": (stats["first_at"] - t_kill) * 1000,
                    "resubmitted": stats["resubmitted"], "resumed": stats["resumed"],
                    "attempts": stats["attempts"]})
            target = work.stats.completed + per_kill
            while work.stats.completed < target:
                work.step()
            work.drain()
            summary = {"completed": work.stats.completed, "reads": work.stats.reads,
                       "writes": work.stats.writes, "blocks": work.verify(image),
                       "failed": sum(q["failed"] for q in dev.stats())}
    finally:
        backend.stop()
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    """``virtq bench reconnect [options]``: kill and restart each back-end, print one row
    per kill.  Returns 0; argparse exits on bad options; raises
    :class:`~virtq.testing.crash.WorkloadError` if a request was lost, duplicated or
    failed, and :class:`~virtq.testing.runners.BackendError` if a back-end cannot
    start."""
    p = argparse.ArgumentParser(prog="virtq bench reconnect", description=__doc__)
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="; ".join(f"{k}: {v}" for k, v in BACKENDS.items()))
    p.add_argument("--kills", type=_args.int_in(1, 100), default=3, help="per back-end")
    p.add_argument("--per-kill", type=_args.int_in(100, 10**7), default=2000,
                   help="completions before each kill (and after the last)")
    p.add_argument("--queues", type=_args.int_in(1, 16), default=4)
    p.add_argument("--depth", type=_args.int_in(1, 4096), default=128,
                   help="requests in flight")
    p.add_argument("--restart-delay", type=_args.seconds(), default=0.2,
                   help="seconds from the kill to starting the new back-end")
    p.add_argument("--interval", type=_args.seconds(), default=0.01,
                   help="the reconnect policy's seconds between connection attempts")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the numbers to this file")
    args = _args.parse(p, argv)
    kinds = args.backends.split(",")
    if set(kinds) - set(BACKENDS):
        p.error(f"--backends: unknown {sorted(set(kinds) - set(BACKENDS))}; choose from "
                f"{', '.join(BACKENDS)}")
    if args.depth < args.queues:
        p.error("--depth must be at least --queues")
    results = Results("reconnect", "")
    table = []
    summaries = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            rows, summary = run_backend(
                kind, Path(tmp), queues=args.queues, depth=args.depth, kills=args.kills,
                per_kill=args.per_kill, delay=args.restart_delay, seed=args.seed,
                interval=args.interval)
            summaries.append((kind, summary))
            for r in rows:
                table.append([kind, r["kill"], r["in_flight"], f"{r['startup_ms']:.0f}",
                              f"{r['reconnected_ms']:.0f}", f"{r['first_ms']:.0f}",
                              r["resubmitted"], r["resumed"], r["attempts"]])
                row = f"{kind} kill {r['kill']}"
                results.add(row, "death -> first completion ms", r["first_ms"], "lower")
                results.add(row, "death -> reconnected ms", r["reconnected_ms"], "lower")
                results.add(row, "resubmitted", r["resubmitted"], None)
    title = (f"virtq bench reconnect: QD {args.depth} mixed 4 KiB reads/writes over "
             f"{args.queues} queues, SIGKILL + restart after {args.restart_delay:g} s, "
             f"reconnect attempts every {args.interval:g} s; {host_line()}")
    results.title = title
    print(f"# {title}")
    print(markdown_table(
        ["back-end", "kill", "in flight", "back-end start-up ms", "death -> reconnected ms",
         "death -> first completion ms", "resubmitted by driver",
         "left in the kept rings", "attempts"], table, "lrrrrrrrr"))
    print()
    for kind, s in summaries:
        print(f"- {kind}: {BACKENDS[kind]}; {s['completed']} requests ({s['reads']} reads, "
              f"{s['writes']} writes) each completed once, {s['failed']} failed; the image "
              f"matches the model ({s['blocks']} blocks written)")
    print("- back-end start-up: from the restart (kill + delay) to its socket listening; "
          "the death -> times include the restart delay")
    if args.json:
        results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
