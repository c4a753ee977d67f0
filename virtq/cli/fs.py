"""``virtq fs`` (a FUSE client for one command) and ``virtq demo fs``.

``virtq fs --socket S ls|cat|put|get|stat ...`` connects to a virtio-fs back-end (QEMU's
``virtiofsd --socket-path=S -o source=DIR``), runs one command and disconnects.  virtiofsd
serves one connection and exits when it ends: start it again for the next command.

The device modules are imported when a command runs, not when the CLI starts.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtq.cli import _args

if TYPE_CHECKING:
    from virtq.devices.fs import FsDevice

MIB = 1 << 20


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``virtq fs`` on the subparsers ``sub``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "fs", help="a virtio-fs client for one command (ls, cat, put, get, stat)",
        description="Run one file command through a virtio-fs back-end (virtiofsd "
                    "--socket-path=S -o source=DIR).  virtiofsd exits when the client "
                    "disconnects: start it again for each command.")
    p.add_argument("--socket", required=True, help="the back-end's vhost-user socket")
    p.add_argument("--timeout", type=_args.seconds(), default=30.0,
                   help="seconds per FUSE request (default 30)")
    cmds = p.add_subparsers(dest="fs_command", required=True, metavar="COMMAND")
    ls = cmds.add_parser("ls", help="list a directory")
    ls.add_argument("path", nargs="?", default=".")
    ls.add_argument("-l", action="store_true", dest="long", help="mode, size, name")
    cat = cmds.add_parser("cat", help="write a file to stdout")
    cat.add_argument("path")
    put = cmds.add_parser("put", help="copy a local file in")
    put.add_argument("local", type=_existing_file)
    put.add_argument("remote")
    get = cmds.add_parser("get", help="copy a file out")
    get.add_argument("remote")
    get.add_argument("local")
    st = cmds.add_parser("stat", help="a file's attributes")
    st.add_argument("path")
    for c in (ls, cat, put, get, st):
        c.set_defaults(parser=c)
    p.set_defaults(func=run_fs, parser=p)
    return p


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return text


def run_fs(args: argparse.Namespace) -> int:
    """One command over a new FUSE session.  File system errors (``FileNotFoundError``
    from the daemon, ...) and a back-end that cannot be reached print one line and return
    1."""
    from virtq.devices.fs import FsDevice  # noqa: PLC0415 - imported when a command runs
    from virtq.errors import VirtqError  # noqa: PLC0415

    try:
        with FsDevice.connect_vhost_user(args.socket, timeout=args.timeout) as fs:
            return _command(fs, args)
    except (OSError, VirtqError) as exc:
        # ArgumentError is a usage error: main() turns it into exit status 2.
        from virtq.errors import ArgumentError  # noqa: PLC0415

        if isinstance(exc, ArgumentError):
            raise
        print(f"virtq fs {args.fs_command}: {exc}", file=sys.stderr)
        return 1


def _command(fs: FsDevice, args: argparse.Namespace) -> int:
    out = sys.stdout
    if args.fs_command == "ls":
        if args.long:
            for entry in sorted(fs.scandir(args.path), key=lambda e: e.name):
                st = fs.lstat(f"{args.path}/{entry.name}")
                out.write(f"{stat.filemode(st.st_mode)} {st.st_size:>12} {entry.name}\n")
        else:
            for name in sorted(fs.listdir(args.path)):
                out.write(name + "\n")
    elif args.fs_command == "cat":
        out.flush()
        sys.stdout.buffer.write(fs.read_bytes(args.path))
        sys.stdout.buffer.flush()
    elif args.fs_command == "put":
        n = fs.write_bytes(args.remote, Path(args.local).read_bytes())
        out.write(f"{n} bytes -> {args.remote}\n")
    elif args.fs_command == "get":
        data = fs.read_bytes(args.remote)
        Path(args.local).write_bytes(data)
        out.write(f"{len(data)} bytes -> {args.local}\n")
    elif args.fs_command == "stat":
        st = fs.lstat(args.path)
        out.write(f"  path: {args.path}\n  mode: {stat.filemode(st.st_mode)} "
                  f"({st.st_mode:#o})\n  size: {st.st_size}\n inode: {st.st_ino}\n"
                  f" links: {st.st_nlink}\n   uid: {st.st_uid}  gid: {st.st_gid}\n"
                  f"  atime: {time.ctime(st.st_atime)}\n mtime: {time.ctime(st.st_mtime)}\n"
                  f" ctime: {time.ctime(st.st_ctime)}\n")
    return 0


def _fill(root: Path) -> None:
    (root / "docs" / "notes").mkdir(parents=True)
    (root / "docs" / "readme.txt").write_text("virtio-fs without a VM\n")
    (root / "docs" / "notes" / "ünïcødé name.txt").write_text("UTF-8 and spaces\n")
    (root / "data").mkdir()
    for k, size in enumerate((0, 1, 4095, 4096, MIB + 1)):
        (root / "data" / f"blob{k}.bin").write_bytes(os.urandom(size))
    (root / "latest").symlink_to("data/blob4.bin")


def demo_fs(args: argparse.Namespace) -> int:
    """virtio-fs end to end: QEMU's virtiofsd shares a temporary directory; virtq negotiates
    FUSE, walks the tree, reads and writes files, shows an error and what the daemon
    counted.  Returns 0, or 1 when virtiofsd does not exit cleanly after the session.
    Raises ``SystemExit`` with a one-line message when this process is not root or
    virtiofsd cannot start, and what the device raises on the way."""
    from virtq.abi.fs import FuseOpcode  # noqa: PLC0415 - CLI only
    from virtq.testing.runners import BackendError, Virtiofsd  # noqa: PLC0415

    out = print
    if os.geteuid() != 0:
        raise SystemExit("virtq demo fs: virtiofsd must run as root")
    with tempfile.TemporaryDirectory(prefix="virtq-demo-fs-") as tmp:
        share = Path(tmp) / "share"
        share.mkdir()
        _fill(share)
        daemon = Virtiofsd(share, Path(tmp) / "fs.sock", cache="none", debug=True)
        try:
            daemon.start()
        except BackendError as exc:
            raise SystemExit(f"virtq demo fs: {exc}") from exc
        try:
            out(f"back-end: virtiofsd (pid {daemon.pid}) sharing {share} (-o cache=none)")
            with daemon.connect() as fs:
                init = fs.init
                out(f"virtq:    FUSE {init.major}.{init.minor}; flags "
                    f"{' '.join(init.flag_names)}")
                out(f"          max_write {init.max_write >> 10} KiB, max_pages "
                    f"{init.max_pages}: READ/WRITE up to {fs.max_read >> 10} KiB; "
                    f"{len(fs.queues) - 1} request queue(s) + hiprio, "
                    f"{fs.queues[1].size}-entry {fs.ring} rings, indirect={fs.indirect}")
                files = 0
                for dirpath, dirs, names in fs.walk():
                    files += len(names)
                    out(f"walk:     {dirpath + '/':<22} dirs {sorted(dirs)} files "
                        f"{sorted(names)}")
                match = sum(fs.read_bytes(os.path.relpath(os.path.join(d, n), share))
                            == (Path(d) / n).read_bytes()
                            for d, _, ns in os.walk(share) for n in ns)
                out(f"read:     {match} of {files} files byte-identical to the host's "
                    f"(latest -> {fs.readlink('latest')})")
                payload = os.urandom(8 * MIB)
                t0 = time.perf_counter()
                fs.write_bytes("written by virtq.bin", payload)
                t1 = time.perf_counter()
                back = fs.read_bytes("written by virtq.bin")
                t2 = time.perf_counter()
                host = (share / "written by virtq.bin").read_bytes()
                out(f"write:    8 MiB in {t1 - t0:.3f} s; read back in {t2 - t1:.3f} s "
                    f"({fs.max_read >> 20} MiB READs in flight together); host copy "
                    f"{'identical' if host == payload == back else 'DIFFERENT'}")
                fs.mkdir("made/by/virtq", parents=True)
                fs.rename("written by virtq.bin", "made/by/virtq/moved.bin")
                fs.chmod("made/by/virtq/moved.bin", 0o600)
                st = os.stat(share / "made/by/virtq/moved.bin")
                out(f"host:     made/by/virtq/moved.bin exists, mode "
                    f"{stat.filemode(st.st_mode)}, {st.st_size >> 20} MiB")
                try:
                    fs.rmdir("made")
                except OSError as exc:
                    out(f"error:    rmdir of a non-empty directory -> "
                        f"{type(exc).__name__}: {exc}")
                try:
                    fs.read_bytes("no/such/file")
                except FileNotFoundError as exc:
                    out(f"          except FileNotFoundError caught "
                        f"{type(exc).__name__}: {exc}")
            status = daemon.wait_exit()
            log = daemon.logs[-1]
            # virtiofsd's debug log has "forget <node> <its count> -<forgotten>" for each
            # node forgotten: the daemon's own count, which must end at 0.
            last: dict[str, tuple[int, int]] = {}
            forgot = 0
            for m in re.finditer(r"forget (\d+) (\d+) -(\d+)", log):
                last[m[1]] = (int(m[2]), int(m[3]))
                forgot += int(m[3])
            zeroed = sum(1 for count, n in last.values() if count == n)
            batches = log.count("opcode: FORGET") + log.count("opcode: BATCH_FORGET")
            out(f"session:  {forgot} lookups of {len(last)} nodes forgotten in {batches} "
                f"FORGET/BATCH_FORGET request(s), {zeroed} of {len(last)} nodes back to 0 "
                f"in the daemon's count; FUSE_{FuseOpcode.DESTROY.name}; virtiofsd exited "
                f"with {status}")
        finally:
            daemon.stop()
    return 0 if status == 0 else 1
