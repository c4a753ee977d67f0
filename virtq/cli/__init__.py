"""``virtq`` command line: ``demo``, ``inspect``, ``bench``, ``check``, ``fuzz``, ``fs``.

Exit status, for every command: 0 success; 1 the command ran and found a problem (a
mismatch, an inconsistent ring, a failed MUST check); 2 it could not run -- a bad argument
(a one-line usage error, never a traceback) or a failure on the way
(``virtq <command>: error: ...``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from virtq.cli import _args
from virtq.cli import check as cli_check
from virtq.cli import fs as fs_cli
from virtq.cli import fuzz as cli_fuzz
from virtq.cli import inspect as cli_inspect
from virtq.errors import ArgumentError, VirtqError, VirtqTimeoutError
from virtq.layout import SplitLayout, wrap_add
from virtq.memory import MemfdRegion
from virtq.queue import SplitQueue
from virtq.types import Iova


def demo_ring(args: argparse.Namespace) -> int:
    """A driver (this process) and a device (a child process) share one SplitQueue in a
    memfd; the indices start just below 0xFFFF so the run crosses the u16 wrap.  Returns 0,
    or 1 when a reply is wrong or the device exits with an error.  Raises
    :class:`~virtq.errors.VirtqTimeoutError` when the device stops answering."""
    n, count, start = args.queue_size, args.count, args.start_index
    layout = SplitLayout.compute(n, buffer_size=256, indirect_size=4)
    iova = Iova(0x4000_0000)
    out = print
    with MemfdRegion(layout.nbytes, name="virtq-demo") as region:
        queue: SplitQueue[tuple[int, int]] = SplitQueue(region, layout, iova=iova, indirect=True,
                                                        start_index=start)
        out(f"driver: {n}-entry split ring in a {region.nbytes}-byte memfd (fd {region.fd}), "
            f"device address {iova:#x}")
        out(f"        desc@{queue.desc_iova:#x} avail@{queue.avail_iova:#x} "
            f"used@{queue.used_iova:#x}; indices start at {start:#06x}")
        fd = region.fd
        assert fd is not None  # a memfd always has one
        child = subprocess.Popen(
            [sys.executable, "-m", "virtq.testing.peer", "--fd", str(fd),
             "--nbytes", str(region.nbytes), "--queue-size", str(n), "--buffer-size", "256",
             "--indirect-size", "4", "--iova", hex(iova), "--count", str(count)],
            pass_fds=[fd],
        )
        out(f"device: pid {child.pid} attached the memfd; it echoes each request reversed, "
            "completing in shuffled order")
        free_slots = list(range(n))
        pending: dict[int, tuple[int, bytes]] = {}
        checked = 0
        sent = 0
        wrapped_at = None
        t0 = time.perf_counter()
        deadline = time.monotonic() + 60
        try:
            while checked < count:
                if time.monotonic() > deadline:
                    raise VirtqTimeoutError("the device process stopped answering")
                while sent < count and free_slots and queue.num_free:
                    slot = free_slots.pop()
                    payload = f"request {sent:05d} to the device".encode()
                    off = layout.buffer(slot)
                    region.view(off, len(payload))[:] = payload
                    addr = Iova(iova + off)
                    # Two device-readable pieces and one device-writable buffer: three
                    # descriptors in an indirect table, one ring slot.
                    queue.add([(addr, 8), (Iova(addr + 8), len(payload) - 8)],
                              [(Iova(addr + 128), 128)], token=(sent, slot))
                    pending[sent] = (slot, payload)
                    sent += 1
                queue.publish()
                for (i, slot), written in queue.drain_used():
                    reply = bytes(region.view(layout.buffer(slot) + 128, written))
                    _, payload = pending.pop(i)
                    if reply != payload[::-1]:
                        print(f"driver: request {i}: bad reply {reply!r}", file=sys.stderr)
                        child.kill()
                        return 1
                    checked += 1
                    free_slots.append(slot)
                if wrapped_at is None and queue.last_used < start:
                    wrapped_at = checked
                    out(f"driver: used index wrapped 0xffff -> {queue.last_used:#06x} "
                        f"after {checked} completions")
        finally:
            rc = child.wait(timeout=30)
        elapsed = time.perf_counter() - t0
        out(f"driver: {checked} requests verified byte for byte; final avail.idx "
            f"{queue.next_avail:#06x} (= {start:#06x} + {count} mod 2**16: "
            f"{queue.next_avail == wrap_add(start, count)})")
        out(f"        {count / elapsed:,.0f} requests/s across two processes "
            f"(polling, no notifications); device exit status {rc}")
        queue.close()
    return 0 if rc == 0 else 1


def _blk_backend(image: Path, sock: Path, which: str) -> tuple[str, AbstractContextManager[Any]]:
    from virtq.testing.runners import QemuStorageDaemon  # noqa: PLC0415 - CLI only

    if which == "qsd" or (which == "auto" and shutil.which("qemu-storage-daemon")):
        return "qemu-storage-daemon (aio=io_uring)", QemuStorageDaemon(image, sock)
    try:
        backend = importlib.import_module("virtq.testing.embedded")
    except ImportError as exc:
        raise VirtqError("qemu-storage-daemon is not installed (Debian: qemu-system-common) "
                         "and this virtq has no embedded back-end") from exc
    return "virtq's embedded Python back-end", backend.VhostUserBlkBackend(image, sock)


def demo_blk(args: argparse.Namespace) -> int:
    """vhost-user-blk end to end: a back-end process serves a disk image; virtq connects,
    negotiates, sets up a ring in a memfd, writes blocks, reads them back, verifies.
    Returns 0, or 1 when what is read back differs.  Raises what connecting raises
    (:class:`~virtq.errors.VirtqError`; the command line prints it in one line)."""
    from virtq.devices import BlkDevice, BlkIOError  # noqa: PLC0415 - CLI only
    from virtq.testing.runners import make_image, sector_pattern  # noqa: PLC0415

    out = print
    with tempfile.TemporaryDirectory(prefix="virtq-demo-") as tmp:
        image = make_image(Path(tmp) / "disk.img", 16 << 20)
        sock = Path(tmp) / "blk.sock"
        name, backend = _blk_backend(image, sock, args.backend)
        with backend:
            out(f"back-end: {name} exporting a 16 MiB image on {sock}")
            with BlkDevice.connect_vhost_user(sock, queue_size=128) as dev:
                t = dev.transport
                q = dev.queues[0]
                out(f"virtq:    negotiated features {dev.features:#x} "
                    f"(event_idx={q.event_idx}, indirect={dev.indirect}); "
                    f"protocol features {getattr(t, 'protocol_features', 0):#x}")
                out(f"          capacity {dev.capacity} sectors ({dev.capacity_bytes >> 20} MiB)"
                    f", block size {dev.block_size}, device id {dev.get_id()!r}")
                out(f"          ring: {q.size} entries in a {dev.arena.nbytes}-byte memfd, "
                    f"guest address {dev.arena.iova:#x}")
                if dev.read(0, 1024) != sector_pattern(0) + sector_pattern(1):
                    print("read:     sectors 0-1 do not hold the image's pattern",
                          file=sys.stderr)
                    return 1
                out("read:     sectors 0-1 match the image's pattern")
                payload = os.urandom(args.mib << 20)
                t0 = time.perf_counter()
                dev.write(2048, payload)
                dev.flush()
                t1 = time.perf_counter()
                back = dev.read(2048, len(payload))
                t2 = time.perf_counter()
                if back != payload:
                    print("read:     read-back mismatch", file=sys.stderr)
                    return 1
                out(f"write:    {args.mib} MiB at sector 2048 + flush in {t1 - t0:.3f} s "
                    f"({args.mib / (t1 - t0):.0f} MiB/s)")
                out(f"read:     {args.mib} MiB back in {t2 - t1:.3f} s "
                    f"({args.mib / (t2 - t1):.0f} MiB/s), byte-exact")
                n = 2000
                t0 = time.perf_counter()
                for i in range(n):
                    dev.read((i * 8) % 4096, 4096)
                dt = time.perf_counter() - t0
                out(f"latency:  {n} synchronous 4 KiB reads, {dt / n * 1e6:.0f} µs each")
                try:
                    dev.read(dev.capacity, 512)
                except BlkIOError as exc:
                    out(f"error:    reading past the end -> BlkIOError: {exc}")
                out(f"ring:     avail.idx {q.snapshot()['avail.idx']}, back-end's GET_VRING_BASE "
                    f"{t.get_vring_base(0)}")  # type: ignore[attr-defined]
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``virtq bench NAME ...``: run benchmark ``NAME``'s own command line.  Raises
    :class:`~virtq.errors.VirtqError` when the benchmark cannot be imported (and what the
    benchmark raises)."""
    modules = {"blk": "virtq.cli.bench_blk", "net": "virtq.cli.bench_net",
               "vfio": "virtq.cli.bench_vfio", "fs": "virtq.cli.bench_fs",
               "reconnect": "virtq.cli.bench_reconnect",
               "profile": "virtq.cli.bench_profile"}
    try:
        module = importlib.import_module(modules[args.what])
    except ImportError as exc:
        raise VirtqError(f"benchmark {args.what!r} is not available: {exc}") from exc
    result: int = module.main(args.rest)
    return result


def _version() -> str:
    # From the installed metadata: the CLI may not import the package root (layers).
    try:
        return importlib.metadata.version("virtq")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


#: The loggers ``--trace`` turns on: every vhost-user message, both directions.
TRACE_LOGGERS = ("virtq.transport.vhost_user",)


def enable_trace(stream: Any = None) -> logging.Handler:
    """Log every vhost-user message (``virtq.transport.vhost_user`` at DEBUG) to ``stream``
    (default stderr); returns the handler (remove it to stop)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(relativeCreated)9.1f ms vhost-user %(message)s"))
    for name in TRACE_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    return handler


def build_parser() -> argparse.ArgumentParser:
    """The ``virtq`` command's argument parser (every subcommand but the benchmarks' own
    options, which ``virtq bench NAME --help`` shows)."""
    parser = argparse.ArgumentParser(prog="virtq", description=_args.plain(__doc__ or ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"virtq {_version()}")
    parser.add_argument("--trace", action="store_true",
                        help="log every vhost-user message (request, flags, size, fds, "
                             "payload) to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show virtq driving a device",
                          description="Show virtq driving a device: blk (default) runs a "
                                      "vhost-user-blk back-end end to end; ring runs a "
                                      "driver and a device in two processes over a memfd; "
                                      "fs walks, reads and writes a directory through "
                                      "virtiofsd (as root).")
    demo.add_argument("what", nargs="?", default="blk", choices=["blk", "ring", "fs"],
                      help="blk (default): a vhost-user-blk back-end end to end; "
                           "ring: driver and device in two processes over a memfd; "
                           "fs: virtiofsd sharing a directory (needs root)")
    demo.add_argument("--backend", choices=["auto", "qsd", "embedded"], default="auto",
                      help="blk: qemu-storage-daemon when installed, else the embedded one")
    # The demo image is 16 MiB and the write starts 1 MiB in.
    demo.add_argument("--mib", type=_args.int_in(1, 15), default=4,
                      help="blk: MiB to write and read back (1..15)")
    demo.add_argument("--queue-size", type=_args.queue_size, default=16,
                      help="ring: entries (a power of two, 1..32768)")
    demo.add_argument("--count", type=_args.positive_int, default=2000, help="ring: requests")
    demo.add_argument("--start-index", type=_args.u16, default=0xFF00,
                      help="ring: first index, 0..0xffff (near 0xFFFF to show the wrap)")
    demo.set_defaults(func=lambda a: {"blk": demo_blk, "ring": demo_ring,
                                      "fs": fs_cli.demo_fs}[a.what](a), parser=demo)
    bench = sub.add_parser("bench", help="benchmarks (blk, net, vfio, fs, reconnect, "
                                         "profile); --help after the name",
                           description="Run a benchmark against real back-ends and print "
                                       "its table: virtq bench "
                                       "blk|net|vfio|fs|reconnect|profile [options]; "
                                       "virtq bench NAME --help lists NAME's options.")
    bench.add_argument("what", choices=["blk", "net", "vfio", "fs", "reconnect",
                                        "profile"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench, parser=bench)
    cli_inspect.register(sub)
    cli_check.register(sub)
    cli_fuzz.register(sub)
    fs_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``virtq`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit
    status (see the module's docstring).  Bad arguments exit 2 through argparse
    (``SystemExit``); a :class:`~virtq.errors.VirtqError` or ``OSError`` on the way is
    printed as one line and returns 2."""
    parser = build_parser()
    args = _args.parse(parser, argv)
    command = getattr(args, "parser", parser)
    handler = enable_trace() if args.trace else None
    try:
        result: int = args.func(args)
    except BrokenPipeError:
        # The reader went away (``virtq inspect ... | head``): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ArgumentError as exc:
        # A rule the argument types above do not know (the library checks every value
        # again): still the caller's argument, so a usage error, not a traceback.
        command.error(str(exc))
    except (VirtqError, OSError) as exc:
        print(f"{command.prog}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if handler is not None:
            for name in TRACE_LOGGERS:
                logging.getLogger(name).removeHandler(handler)
    return result
