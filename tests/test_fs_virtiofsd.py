"""virtio-fs against the real QEMU C virtiofsd (``/usr/lib/qemu/virtiofsd``): a tree built
on the host read back through virtq, writes through virtq seen on the host, the errno
cases, inode accounting checked in the daemon's own debug log, zero-copy I/O, and a daemon
that dies under the client.

virtiofsd exits when its client disconnects; the ``virtq_virtiofsd`` fixture starts one
per ``connect()``.  ``-o cache=none`` (the fixture's default) makes every LOOKUP and
GETATTR see the directory as it is now; ``cache=auto`` is the daemon's default and the one
that negotiates READDIRPLUS, so the walk test runs with both.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from virtq.abi.fs import FUSE_ROOT_ID
from virtq.devices import FsDevice, FsOSError
from virtq.errors import (
    ArgumentError,
    DeviceError,
    QueueStateError,
    VirtqError,
)
from virtq.testing.runners import Virtiofsd

MIB = 1 << 20
SIZES = {"empty": 0, "one": 1, "page-1": 4095, "page": 4096, "mib+1": MIB + 1}


def build_tree(root: Path) -> None:
    """Files of the sizes the issue names, nested directories, a symlink to a file and one
    to a directory, names with spaces and UTF-8."""
    for name, size in SIZES.items():
        (root / name).write_bytes(os.urandom(size))
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    (root / "a" / "b" / "with space.txt").write_bytes(b"spaces " * 100)
    (root / "ünïcødé 文件").mkdir()
    (root / "ünïcødé 文件" / "ça.bin").write_bytes(os.urandom(5000))
    (root / "empty dir").mkdir()
    (root / "link to deep").symlink_to("a/b/c/deep.txt")
    (root / "link to a").symlink_to("a")


def host_walk(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    return {os.path.relpath(d, root): (sorted(ds), sorted(fs))
            for d, ds, fs in os.walk(root)}


def fs_walk(fs: FsDevice, **kw: object) -> dict[str, tuple[list[str], list[str]]]:
    return {os.path.normpath(d): (sorted(ds), sorted(fs_))
            for d, ds, fs_ in fs.walk(".", **kw)}  # type: ignore[arg-type]


@pytest.mark.parametrize("cache", ["none", "auto"])
def test_tree_round_trip(virtq_fs_dir, cache, no_leaks):
    build_tree(virtq_fs_dir)
    sockdir = tempfile.mkdtemp(prefix="virtq-fs-")
    try:
        with Virtiofsd(virtq_fs_dir, Path(sockdir) / "fs.sock", cache=cache) as daemon, \
                daemon.connect() as fs:
            # cache=none turns READDIRPLUS off in virtiofsd; the default turns it on: both
            # listing paths are exercised.
            assert fs.readdirplus is (cache != "none")
            assert fs_walk(fs) == host_walk(virtq_fs_dir)
            for dirpath, _dirs, files in os.walk(virtq_fs_dir):
                for name in files:
                    host = Path(dirpath) / name
                    rel = os.path.relpath(host, virtq_fs_dir)
                    assert fs.read_bytes(rel) == host.read_bytes(), rel
                    want = os.stat(host)
                    got = fs.stat(rel)
                    assert (got.st_ino, got.st_size, got.st_mode, got.st_nlink) == \
                        (want.st_ino, want.st_size, want.st_mode, want.st_nlink), rel
                    assert got.st_mtime_ns == want.st_mtime_ns
            assert fs.lstat("link to deep").st_mode == os.lstat(virtq_fs_dir /
                                                               "link to deep").st_mode
            assert fs.readlink("link to deep") == "a/b/c/deep.txt"
            # followlinks walks into the directory symlink, as os.walk does.
            assert fs_walk(fs, followlinks=True) == {
                os.path.relpath(d, virtq_fs_dir): (sorted(ds), sorted(f))
                for d, ds, f in os.walk(virtq_fs_dir, followlinks=True)}
            assert fs_walk(fs, topdown=False) == host_walk(virtq_fs_dir)
            assert sorted(fs.listdir("ünïcødé 文件")) == ["ça.bin"]
            assert {e.name for e in fs.scandir("a/b")} == {"c", "with space.txt"}
            assert fs.read_bytes("/a/../link to a/b/./c/deep.txt") == b"deep\n"
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def test_writes_are_seen_on_the_host(virtq_virtiofsd, virtq_fs_dir, no_leaks):
    root = virtq_fs_dir
    with virtq_virtiofsd.connect(umask=0o022) as fs:
        data = os.urandom(3 * MIB + 17)
        assert fs.write_bytes("big.bin", data) == len(data)
        assert (root / "big.bin").read_bytes() == data
        assert stat.S_IMODE(os.stat(root / "big.bin").st_mode) == 0o644  # 0o666 & ~umask
        # ... and the host's writes through virtq (cache=none: nothing is cached).
        (root / "big.bin").write_bytes(b"host wrote this")
        assert fs.read_bytes("big.bin") == b"host wrote this"
        assert fs.stat("big.bin").st_size == 15

        fs.mkdir("d/e/f", parents=True)
        assert (root / "d" / "e" / "f").is_dir()
        fs.mkdir("d", exist_ok=True)
        fs.write_text("d/e/f/note.txt", "héllo")
        assert (root / "d/e/f/note.txt").read_text() == "héllo"

        with fs.open("d/e/f/note.txt", "r+b") as f:
            assert f.read(1) == b"h"
            assert f.tell() == 1
            f.seek(-2, os.SEEK_END)
            assert f.write(b"LO") == 2
            f.seek(0)
            assert f.readall() == "hél".encode() + b"LO"
            assert f.truncate(3) == 3
        assert (root / "d/e/f/note.txt").read_bytes() == "hé".encode()
        with fs.open("d/e/f/note.txt", "ab") as f:
            f.write(b"++")
            f.write(b"--")
        assert (root / "d/e/f/note.txt").read_bytes() == "hé".encode() + b"++--"
        with pytest.raises(FileExistsError):
            fs.open("d/e/f/note.txt", "xb")
        with fs.open("d/new.bin", "xb") as f:
            f.write(b"x" * 5000)
        assert (root / "d/new.bin").stat().st_size == 5000

        fs.truncate("big.bin", 1 << 20)
        assert (root / "big.bin").stat().st_size == 1 << 20
        fs.chmod("big.bin", 0o600)
        assert stat.S_IMODE((root / "big.bin").stat().st_mode) == 0o600
        fs.utime("big.bin", ns=(1_000_000_123, 2_000_000_456))
        st = (root / "big.bin").stat()
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)

        fs.rename("big.bin", "d/moved.bin")
        assert not (root / "big.bin").exists()
        assert (root / "d/moved.bin").stat().st_size == 1 << 20
        fs.symlink("moved.bin", "d/sym")
        assert os.readlink(root / "d/sym") == "moved.bin"
        assert fs.stat("d/sym").st_size == 1 << 20
        fs.link("d/moved.bin", "hard")
        assert (root / "hard").stat().st_ino == (root / "d/moved.bin").stat().st_ino
        assert fs.stat("hard").st_nlink == 2
        fs.remove("hard")
        fs.remove("d/sym")
        assert sorted(os.listdir(root / "d")) == ["e", "moved.bin", "new.bin"]
        fs.remove("d/e/f/note.txt")
        fs.rmdir("d/e/f")
        assert not (root / "d/e/f").exists()
        fs.write_bytes("empty", b"")
        assert (root / "empty").stat().st_size == 0
        assert fs.read_bytes("empty") == b""

        vfs, host = fs.statvfs(), os.statvfs(root)
        assert (vfs.f_bsize, vfs.f_blocks, vfs.f_namemax) == \
            (host.f_bsize, host.f_blocks, host.f_namemax)
        with fs.open("d/moved.bin", "r+b") as f:
            f.fsync()
            f.fsync(datasync=True)


def test_fuse_errors_are_oserrors(virtq_virtiofsd, virtq_fs_dir, no_leaks):
    (virtq_fs_dir / "dir" / "sub").mkdir(parents=True)
    (virtq_fs_dir / "file").write_bytes(b"data")
    with virtq_virtiofsd.connect() as fs:
        with pytest.raises(FileNotFoundError) as info:
            fs.stat("dir/missing")
        err = info.value
        assert isinstance(err, VirtqError) and isinstance(err, FsOSError)
        assert err.errno == errno.ENOENT and err.filename == "dir/missing"
        assert err.opcode == "LOOKUP"
        with pytest.raises(FileNotFoundError):
            fs.read_bytes("nope")
        with pytest.raises(FsOSError) as info:
            fs.rmdir("dir")
        assert info.value.errno == errno.ENOTEMPTY
        assert isinstance(info.value, VirtqError)
        with pytest.raises(IsADirectoryError):
            fs.read_bytes("dir")
        with pytest.raises(FileExistsError):
            fs.mkdir("dir")
        with pytest.raises(NotADirectoryError):
            fs.listdir("file")
        with pytest.raises(NotADirectoryError):
            fs.stat("file/x")
        with pytest.raises(IsADirectoryError):
            fs.remove("dir")  # unlinkat() of a directory, answered by the daemon
        with pytest.raises(FsOSError) as info:
            fs.stat("x" * 300)
        assert info.value.errno == errno.ENAMETOOLONG
        assert not fs.exists("nope") and fs.exists("dir") and fs.is_file("file")
        assert not fs.is_dir("file") and fs.is_dir("dir/sub")

        # The daemon's own EISDIR: READ of an open directory (pread(2) on the host).
        entry = fs.fuse_lookup(FUSE_ROOT_ID, "dir")
        fh, _ = fs.fuse_open(entry.nodeid)
        try:
            with pytest.raises(IsADirectoryError) as info:
                fs.fuse_read(entry.nodeid, fh, 0, 10)
            assert info.value.opcode == "READ"
        finally:
            fs.fuse_release(entry.nodeid, fh)
            fs.forget(entry.nodeid)
        with fs.open("file", "rb") as f, pytest.raises(FsOSError) as info:
            f.write(b"x")
        assert info.value.errno == errno.EBADF
        with pytest.raises(ArgumentError):
            fs.open("file", "r")  # text mode: FsFile is a raw binary file
        with pytest.raises(ArgumentError):
            fs.fuse_lookup(FUSE_ROOT_ID, "a/b")  # one component only
        # A failed call leaves the session usable.
        assert fs.read_bytes("file") == b"data"


_LOOKUP = re.compile(r"\]\s+(\d+)/.* -> (\d+)$")
_FORGET = re.compile(r"\]\s+forget (\d+) (\d+) -(\d+)$")


def check_forgets_balance(log: str) -> Counter[int]:
    """Replay the daemon's debug log: every lookup it counted (``parent/name -> ino``)
    and every forget (``forget ino nlookup -n``, nlookup being the count before).  The
    count the daemon had before each forget must be the count the log shows; at the end
    nothing may be left.  Returns the lookups per node."""
    held: Counter[int] = Counter()
    looked: Counter[int] = Counter()
    for line in log.splitlines():
        if m := _LOOKUP.search(line):
            held[int(m[2])] += 1
            looked[int(m[2])] += 1
        elif m := _FORGET.search(line):
            ino, before, n = int(m[1]), int(m[2]), int(m[3])
            assert before == held[ino], f"{line}: the daemon had {before}, the log {held[ino]}"
            assert 0 < n <= before
            held[ino] -= n
    assert not +held, f"lookups never forgotten: {dict(+held)}"
    return looked


@pytest.mark.parametrize("cache", ["none", "auto"])
def test_forgets_balance_lookups(virtq_fs_dir, cache, no_leaks):
    for d in range(6):
        sub = virtq_fs_dir / f"dir{d}" / "inner"
        sub.mkdir(parents=True)
        for i in range(60):
            (sub.parent / f"f{i}").write_bytes(b"%d" % i)
        (sub / "x").write_bytes(b"x")
    sockdir = tempfile.mkdtemp(prefix="virtq-fs-")
    try:
        daemon = Virtiofsd(virtq_fs_dir, Path(sockdir) / "fs.sock", cache=cache, debug=True)
        with daemon:
            with daemon.connect() as fs:
                for _ in range(2):
                    seen = sum(len(files) for _, _, files in fs.walk())
                    assert seen == 6 * 61
                for dirpath, _, files in fs.walk():
                    for name in files:
                        assert fs.stat(f"{dirpath}/{name}").st_size >= 1
                for d in range(6):
                    for i in range(0, 60, 7):
                        assert fs.read_bytes(f"dir{d}/f{i}") == b"%d" % i
                # More than one batch's worth of nodes were given back: some were
                # forgotten while the session ran.
                assert "BATCH_FORGET" in daemon.log()
                fs.flush_forgets()
                assert not fs.lookups  # the path API gave back everything it took
                # One node, one FORGET (not a batch).
                entry = fs.fuse_lookup(FUSE_ROOT_ID, "dir0")
                assert fs.fuse_lookup(FUSE_ROOT_ID, "dir0") == entry
                assert fs.lookups == {entry.nodeid: 2}
                fs.forget(entry.nodeid)
                assert fs.flush_forgets() == 1
                assert fs.lookups == {entry.nodeid: 1}
                with pytest.raises(ArgumentError):
                    fs.forget(entry.nodeid, 2)  # more than the client holds
                # The last one is left for close() to forget.
            assert daemon.wait_exit() == 0
            looked = check_forgets_balance(daemon.logs[-1])
            assert sum(looked.values()) > 2 * 6 * 61  # (node ids are reused once forgotten)
            log = daemon.logs[-1]
            assert re.search(r"opcode: FORGET \(2\)", log)
            assert "opcode: DESTROY" in log
            # Forgets went to the hiprio queue's thread, everything else to queue 1's
            # (§5.11.6.2: FORGET and BATCH_FORGET only on hiprio, nothing else there).
            thread = {int(m[2]): m[1] for m in
                      re.finditer(r"\[ID: (\d+)\] fv_queue_thread: Start for queue (\d+)", log)}
            for m in re.finditer(r"\[ID: (\d+)\] unique: \d+, opcode: (\w+)", log):
                forget = m[2] in ("FORGET", "BATCH_FORGET")
                assert m[1] == thread[0 if forget else 1], m[0]
            # A second session walks the same tree (nothing was left half-forgotten).
            with daemon.connect() as fs:
                assert sum(len(files) for _, _, files in fs.walk()) == 6 * 61
            daemon.wait_exit()
            check_forgets_balance(daemon.logs[-1])
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def test_reads_in_flight_and_zero_copy(virtq_virtiofsd, virtq_fs_dir, no_leaks):
    data = os.urandom(5 * MIB + 333)
    (virtq_fs_dir / "f").write_bytes(data)
    virtq_virtiofsd.debug = True
    virtq_virtiofsd.stop()
    with virtq_virtiofsd.connect(io_size=256 << 10, io_buffers=4) as fs:
        assert fs.max_read == 256 << 10
        # 21 READs of max_read, four in flight at a time (the pool's buffers): the daemon
        # found four READs' worth of writable buffers in its ring at once.
        assert fs.read_bytes("f") == data
        available = [int(m[1]) for m in re.finditer(r"available: in: (\d+)",
                                                     virtq_virtiofsd.log())]
        assert max(available) >= 4 * (256 << 10)
        buf = fs.alloc_buffer(MIB)
        entry = fs.fuse_lookup(FUSE_ROOT_ID, "f")
        fh, _ = fs.fuse_open(entry.nodeid)
        reqs = [fs.submit_read(entry.nodeid, fh, k * (64 << 10),
                               into=buf.slice(k * (64 << 10), 64 << 10))
                for k in range(4)]
        assert fs.in_flight == 4
        fs.wait(reqs, timeout=10)
        assert [r.wait() for r in reqs] == [64 << 10] * 4
        assert buf.read()[: 256 << 10] == data[: 256 << 10]
        # Two buffers, one READ; then a zero-copy WRITE of them somewhere else.
        n = fs.submit_read(entry.nodeid, fh, 1000, into=[buf.slice(0, 4096),
                                                         buf.slice(8192, 4096)]).wait(10)
        assert n == 8192
        assert buf.slice(0, 4096).read() + buf.slice(8192, 4096).read() == data[1000:9192]
        fs.fuse_release(entry.nodeid, fh)
        with fs.open("copy", "wb") as f:
            written = fs.submit_write(f.nodeid, f.fh, 0, [buf.slice(0, 4096),
                                                          buf.slice(8192, 4096)]).wait(10)
            assert written == 8192
        assert (virtq_fs_dir / "copy").read_bytes() == data[1000:9192]
        with fs.open("f", "rb") as f:
            f.seek(MIB)
            assert f.readinto_dma(buf.slice(0, 128 << 10)) == 128 << 10
            assert buf.slice(0, 128 << 10).read() == data[MIB : MIB + (128 << 10)]
            f.seek(len(data) - 10)
            assert f.readinto_dma(buf.slice(0, 4096)) == 10
            ba = bytearray(3 * MIB)
            f.seek(0)
            assert f.readinto(ba) == 3 * MIB and ba == data[: 3 * MIB]
        fs.forget(entry.nodeid)
        with pytest.raises(ArgumentError):
            fs.submit_read(entry.nodeid, 0, 0, fs.max_read + 1)
        del buf


def test_daemon_death_and_reconnect(virtq_virtiofsd, virtq_fs_dir, no_leaks):
    (virtq_fs_dir / "f").write_bytes(b"before")
    fs = virtq_virtiofsd.connect()
    try:
        f = fs.open("f", "rb")
        assert f.read(3) == b"bef"
        virtq_virtiofsd.kill()
        # The transport's failure is every request's error (a DeviceError), and the device
        # refuses more until reconnect().
        with pytest.raises(DeviceError):
            fs.stat("f")
        with pytest.raises(QueueStateError):
            fs.stat("f")
        virtq_virtiofsd.start()
        assert fs.reconnect() == 0
        # A new FUSE session: the old file handle is stale, paths resolve again.
        with pytest.raises(FsOSError) as info:
            f.read(1)
        assert info.value.errno == errno.ESTALE
        f.close()  # nothing to release in the new session
        (virtq_fs_dir / "f").write_bytes(b"after")
        assert fs.read_bytes("f") == b"after"
        assert fs.init.minor == 31 and fs.session == 2
    finally:
        fs.close()
    assert virtq_virtiofsd.wait_exit() == 0


def test_device_misuse(virtq_virtiofsd, no_leaks):
    with virtq_virtiofsd.connect() as fs:
        with pytest.raises(ArgumentError):
            fs.open("x", "rw")
        with pytest.raises(ArgumentError):
            fs.stat(b"a\0b")
        with pytest.raises(ArgumentError):
            fs.forget(12345)
        f = fs.open("new", "wb")
    # Closing the device released the open file.
    assert f.closed
    with pytest.raises(QueueStateError):
        fs.stat(".")
    with pytest.raises(ArgumentError):
        f.write(b"x")
    fs.close()  # idempotent


@pytest.mark.parametrize(("indirect", "event_idx", "poll"), [
    (False, False, False), (False, True, True), (True, False, True)])
def test_ring_options(virtq_virtiofsd, virtq_fs_dir, indirect, event_idx, poll, no_leaks):
    """Direct descriptors (a chain of header, data and reply in the ring itself), no event
    idx, busy polling: the same session works."""
    (virtq_fs_dir / "d").mkdir()
    data = os.urandom(MIB + 5)
    with virtq_virtiofsd.connect(indirect=indirect, event_idx=event_idx, poll=poll,
                                 queue_size=16, io_size=128 << 10, io_buffers=4) as fs:
        assert fs.indirect is indirect and fs.queues[1].event_idx is event_idx
        fs.write_bytes("d/x", data)
        assert fs.read_bytes("d/x") == data
        assert fs_walk(fs) == host_walk(virtq_fs_dir)
        fs.remove("d/x")
        assert fs.listdir("d") == []
