"""``virtq bench fs``: what the virtio-fs path costs, next to ``os`` on the same directory.

QEMU's virtiofsd shares a temporary directory (``-o cache=none``); in one run the benchmark
times, through virtq and then with :mod:`os` on the directory itself:

* sequential reads and writes of one large file (default 64 MiB), one request at a time,
  at each request size (default 4 KiB and 1 MiB) -- MiB/s;
* the whole file with ``read_bytes()``: READs of ``max_read``, all in flight together;
* small files: stat, open, read (4 KiB), close -- files/s.

Both sides hit the host's page cache (nothing is fsynced); the ratio is the price of a
FUSE round trip through the rings, the daemon and a Python driver.  No number is checked.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from virtq.cli import _args
from virtq.cli.benchutil import Results, host_line, markdown_table
from virtq.devices.fs import FsDevice
from virtq.testing.runners import Virtiofsd

MIB = 1 << 20
SMALL = 4096


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _read_virtq(fs: FsDevice, name: str, size: int, request: int) -> None:
    buf = bytearray(request)
    view = memoryview(buf)
    with fs.open(name, "rb") as f:
        got = 0
        while n := f.readinto(view):
            got += n
    view.release()
    if got != size:
        raise SystemExit(f"virtq read {got} bytes of {size}")


def _read_os(path: Path, size: int, request: int) -> None:
    buf = bytearray(request)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        got = 0
        while n := f.readinto(view):
            got += n
    view.release()
    if got != size:
        raise SystemExit(f"os read {got} bytes of {size}")


def _write_virtq(fs: FsDevice, name: str, data: memoryview, request: int) -> None:
    with fs.open(name, "wb") as f:
        for off in range(0, len(data), request):
            f.write(data[off : off + request])


def _write_os(path: Path, data: memoryview, request: int) -> None:
    with open(path, "wb", buffering=0) as f:
        for off in range(0, len(data), request):
            f.write(data[off : off + request])


def _small_virtq(fs: FsDevice, names: Sequence[str]) -> None:
    for name in names:
        fs.stat(name)
        with fs.open(name, "rb") as f:
            f.read(SMALL)


def _small_os(root: Path, names: Sequence[str]) -> None:
    for name in names:
        path = root / name
        os.stat(path)
        with open(path, "rb", buffering=0) as f:
            f.read(SMALL)


def main(argv: list[str] | None = None) -> int:
    """``virtq bench fs [options]``: start virtiofsd, run every row, print the table
    (``--json``: write the numbers too).  Returns 0; argparse exits on bad options; exits
    with a message when not root (virtiofsd needs it); a daemon that cannot start raises
    :class:`~virtq.testing.runners.BackendError`."""
    p = argparse.ArgumentParser(prog="virtq bench fs", description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=_args.int_in(1, 4096), default=64,
                   help="the large file, MiB (default 64)")
    p.add_argument("--request-sizes", type=_args.int_list(_args.int_in(512, MIB)),
                   default=[4096, MIB], help="bytes per READ/WRITE, comma-separated "
                   "(512..1048576; default 4096,1048576)")
    p.add_argument("--files", type=_args.int_in(1, 100_000), default=500,
                   help="small files of 4 KiB (default 500)")
    p.add_argument("--dir", type=_args.directory, default=None,
                   help="where the shared directory goes (default: the temp dir)")
    p.add_argument("--json", help="also write the numbers to this file")
    args = _args.parse(p, argv)
    if os.geteuid() != 0:
        raise SystemExit("virtq bench fs: virtiofsd must run as root")
    size = args.size_mib * MIB
    data = memoryview(os.urandom(size))
    names = [f"small/f{k:05d}" for k in range(args.files)]
    rows: list[tuple[str, str, float, float, str]] = []
    sockdir = tempfile.mkdtemp(prefix="virtq-bench-fs-")  # a short socket path
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            share = Path(tmp) / "share"
            (share / "small").mkdir(parents=True)
            (share / "big.bin").write_bytes(data)
            for name in names:
                (share / name).write_bytes(os.urandom(SMALL))
            with Virtiofsd(share, Path(sockdir) / "fs.sock", cache="none") as daemon, \
                    daemon.connect(io_size=max(MIB, *args.request_sizes)) as fs:
                for rs in args.request_sizes:
                    tv = _timed(partial(_read_virtq, fs, "big.bin", size, rs))
                    to = _timed(partial(_read_os, share / "big.bin", size, rs))
                    rows.append(("sequential read", _size(rs), size / MIB / tv,
                                 size / MIB / to, "MiB/s"))
                for rs in args.request_sizes:
                    tv = _timed(partial(_write_virtq, fs, "w-virtq.bin", data, rs))
                    to = _timed(partial(_write_os, share / "w-os.bin", data, rs))
                    rows.append(("sequential write", _size(rs), size / MIB / tv,
                                 size / MIB / to, "MiB/s"))
                    if (share / "w-virtq.bin").stat().st_size != size:
                        raise SystemExit("the file virtq wrote has the wrong size")
                tv = _timed(lambda: fs.read_bytes("big.bin"))
                to = _timed((share / "big.bin").read_bytes)
                rows.append(("read_bytes(), READs in flight", _size(fs.max_read),
                             size / MIB / tv, size / MIB / to, "MiB/s"))
                tv = _timed(lambda: _small_virtq(fs, names))
                to = _timed(lambda: _small_os(share, names))
                rows.append(("small files: stat+open+read+close", _size(SMALL),
                             len(names) / tv, len(names) / to, "files/s"))
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    title = (f"virtq bench fs: virtiofsd -o cache=none, a {args.size_mib} MiB file and "
             f"{args.files} files of 4 KiB, virtq next to os on the same directory; "
             f"{host_line()}")
    print(f"# {title}")
    results = Results("fs", title)
    table = []
    for what, req, virtq, host, unit in rows:
        table.append([what, req, f"{virtq:,.1f} {unit}", f"{host:,.1f} {unit}",
                      f"{virtq / host:.3f}"])
        row = f"{what}, {req}"
        results.add(row, f"virtq {unit}", virtq, "higher")
        results.add(row, f"os {unit}", host, None)
    print(markdown_table(["operation", "request", "virtq", "os", "virtq / os"], table,
                         "llrrr"))
    if args.json:
        results.write(args.json)
    return 0


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= MIB and not n % MIB else f"{n >> 10} KiB" \
        if n >= 1024 and not n % 1024 else f"{n} B"


if __name__ == "__main__":
    sys.exit(main())
