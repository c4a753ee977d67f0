"""Start and stop real vhost-user back-ends for tests and benchmarks.

:class:`QemuStorageDaemon` runs ``qemu-storage-daemon`` (Debian package
``qemu-system-common``) exporting a raw image as vhost-user-blk.  :class:`DpdkVhostBlk` runs
DPDK's ``vhost_blk`` example, the one packed-ring-only back-end here (built by
``scripts/build-dpdk-vhost-blk.sh``).  :class:`TestPmd` lives in
:mod:`virtq.testing.testpmd`.  All are context managers that stop their process by pid and
remove their socket; none needs hugepages.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Self

from virtq.errors import VirtqError


class BackendError(VirtqError):
    """A back-end process could not be started (missing binary, bad arguments, it died)."""


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackendError(
            f"{name} not found; install the Debian package {package} "
            "(scripts/install-system-deps.sh does)")
    return path


def kill_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGKILL ``proc`` if it still runs, as a crash would, and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=timeout)


def stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM ``proc`` (it cleans up), SIGKILL if it has not exited after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process(proc, timeout)


def make_image(path: str | os.PathLike[str], nbytes: int, *, pattern: bool = True) -> Path:
    """Create a raw disk image; with ``pattern`` every 512-byte sector starts with its
    number (8 bytes, little-endian) followed by a byte pattern derived from it, so a test
    can tell any sector from any other."""
    p = Path(path)
    with open(p, "wb") as f:
        if not pattern:
            f.truncate(nbytes)
        else:
            for sector in range(nbytes // 512):
                f.write(sector_pattern(sector))
    return p


def sector_pattern(sector: int) -> bytes:
    """The 512 bytes :func:`make_image` writes at ``sector``."""
    fill = bytes((sector * 7 + i) & 0xFF for i in range(504))
    return sector.to_bytes(8, "little") + fill


class QemuStorageDaemon:
    """``qemu-storage-daemon`` exporting ``image`` as vhost-user-blk on ``socket_path``.

    Readiness: the daemon writes its pidfile only after the export is listening.  It
    serves one front-end at a time; a new connection is served after the previous one
    closes.
    """

    def __init__(
        self,
        image: str | os.PathLike[str],
        socket_path: str | os.PathLike[str],
        *,
        aio: str = "io_uring",
        num_queues: int = 1,
        writable: bool = True,
        direct: bool = False,
        timeout: float = 10.0,
    ) -> None:
        self.image = Path(image)
        self.socket_path = Path(socket_path)
        self.pidfile = self.socket_path.with_suffix(".pid")
        self.aio = aio
        self.num_queues = num_queues
        self.writable = writable
        self.direct = direct
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr = self.socket_path.with_suffix(".stderr")

    def command(self) -> list[str]:
        binary = require_binary("qemu-storage-daemon", "qemu-system-common")
        cache = ",cache.direct=on" if self.direct else ""
        return [
            binary,
            "--blockdev",
            f"driver=file,node-name=file0,filename={self.image},aio={self.aio}{cache}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={self.socket_path},writable={'on' if self.writable else 'off'},"
            f"num-queues={self.num_queues}",
            "--pidfile", str(self.pidfile),
        ]

    def start(self) -> Self:
        for stale in (self.socket_path, self.pidfile):
            stale.unlink(missing_ok=True)
        with open(self._stderr, "wb") as err:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise BackendError(f"qemu-storage-daemon exited with {self.proc.returncode}: "
                                   f"{self.stderr().strip()}")
            if self.pidfile.exists() and self.pidfile.read_text().strip():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise BackendError(f"qemu-storage-daemon not ready after {self.timeout} s")
            time.sleep(0.01)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def stderr(self) -> str:
        try:
            return self._stderr.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would (for fault tests); the socket file stays behind."""
        if self.proc is not None:
            kill_process(self.proc, 10)

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, 5)
        self.proc = None
        for leftover in (self.socket_path, self.pidfile, self._stderr):
            leftover.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Where scripts/build-dpdk-vhost-blk.sh puts the binary, relative to the cache directory.
VHOST_BLK_CACHE_PATH = Path("dpdk-vhost-blk") / "vhost-blk"
_REPO_ROOT = Path(__file__).resolve().parents[2]
#: ``__SO_ACCEPTCON`` in /proc/net/unix's Flags column: the socket listens.
_SO_ACCEPTCON = 0x10000


def find_vhost_blk() -> Path:
    """The built ``vhost-blk`` binary: ``$VIRTQ_DPDK_VHOST_BLK`` if set, else
    ``<cache>/dpdk-vhost-blk/vhost-blk`` with ``<cache>`` ``$VIRTQ_CACHE_DIR`` or the
    checkout's ``.cache``.  Raises :class:`BackendError` naming the build script when it is
    missing."""
    explicit = os.environ.get("VIRTQ_DPDK_VHOST_BLK")
    if explicit:
        path = Path(explicit)
    else:
        cache = os.environ.get("VIRTQ_CACHE_DIR")
        path = (Path(cache) if cache else _REPO_ROOT / ".cache") / VHOST_BLK_CACHE_PATH
    if not os.access(path, os.X_OK):
        raise BackendError(
            f"DPDK's vhost_blk example is not built at {path}; run "
            "scripts/build-dpdk-vhost-blk.sh (scripts/install-system-deps.sh runs it; it "
            "needs the Debian packages dpdk-doc, libdpdk-dev, pkg-config, make, gcc)")
    return path


def unix_socket_listening(path: str | os.PathLike[str]) -> bool:
    """Whether some process of this network namespace listens on the Unix socket bound at
    ``path`` (absolute, as bound), read from /proc/net/unix -- without connecting, which a
    vhost-user back-end would take for a front-end."""
    target = os.fsdecode(path)
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            next(f, None)  # the header
            for line in f:
                # Num RefCount Protocol Flags Type St Inode Path (the path may hold spaces)
                fields = line.rstrip("\n").split(maxsplit=7)
                if (len(fields) == 8 and fields[7] == target
                        and int(fields[3], 16) & _SO_ACCEPTCON):
                    return True
    except OSError:
        return False
    return False


def _finalize_vhost_blk(proc: subprocess.Popen[bytes], tmpdir: str | None) -> None:
    warnings.warn(f"DPDK vhost_blk (pid {proc.pid}) was not stopped", ResourceWarning,
                  stacklevel=2)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


class DpdkVhostBlk:
    """DPDK's ``vhost_blk`` example (``/usr/share/dpdk/examples/vhost_blk``): a vhost-user-blk
    back-end that offers **only** the packed ring (VIRTIO_F_RING_PACKED, VERSION_1,
    NOTIFY_ON_EMPTY; no EVENT_IDX, no INDIRECT_DESC, no blk feature bits) and serves a
    128 MiB RAM disk (4096-byte blocks) on one queue.

    It always listens on ``vhost.socket`` in its working directory: ``workdir`` (created if
    needed; a temporary directory, removed on :meth:`stop`, when None).  Its output goes to
    ``vhost-blk.log`` there.  EAL runs without hugepages or PCI (``--no-huge -m
    memory_mb --no-pci --no-shconf``) on ``lcores``; once a front-end has set up the queue
    the example's worker thread pins itself to CPU 0 and busy-polls until the front-end
    leaves.  Readiness: its socket is listening (/proc/net/unix).  :meth:`stop` sends
    SIGINT (the example's handler unregisters the socket and exits), then SIGKILL.
    """

    CAPACITY = 128 << 20
    BLOCK_SIZE = 4096
    SOCKET_NAME = "vhost.socket"
    LOG_NAME = "vhost-blk.log"

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        binary: str | os.PathLike[str] | None = None,
        lcores: str = "0",
        memory_mb: int = 512,
        timeout: float = 30.0,
    ) -> None:
        self._workdir_arg = None if workdir is None else Path(workdir)
        self.binary = None if binary is None else Path(binary)
        self.lcores = lcores
        self.memory_mb = memory_mb
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: str | None = None
        self.workdir: Path | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def socket_path(self) -> Path:
        """``<workdir>/vhost.socket`` (valid once started)."""
        if self.workdir is None:
            raise BackendError("DpdkVhostBlk is not started")
        return self.workdir / self.SOCKET_NAME

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def command(self) -> list[str]:
        binary = self.binary if self.binary is not None else find_vhost_blk()
        return [str(binary), "--no-huge", "-m", str(self.memory_mb), "--no-pci",
                "--no-shconf", "--no-telemetry", "-l", self.lcores]

    def start(self) -> Self:
        """Start the back-end and wait until its socket listens.  Raises
        :class:`BackendError` (nothing left running) when the binary is missing, the process
        exits or the socket does not listen within ``timeout``."""
        if self.proc is not None:
            raise BackendError("vhost_blk is already running")
        command = self.command()
        if self._workdir_arg is None:
            self._tmpdir = tempfile.mkdtemp(prefix="virtq-vhost-blk-")
            workdir = Path(self._tmpdir)
        else:
            workdir = self._workdir_arg
            workdir.mkdir(parents=True, exist_ok=True)
        # The example binds getcwd() + "/vhost.socket": the real path, symlinks resolved.
        self.workdir = workdir.resolve()
        sock = self.workdir / self.SOCKET_NAME
        sock.unlink(missing_ok=True)  # a SIGKILLed predecessor's socket file
        try:
            with open(self.workdir / self.LOG_NAME, "wb") as log:
                self.proc = subprocess.Popen(command, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        except OSError as exc:
            self._remove_tmpdir()
            raise BackendError(f"cannot start {command[0]}: {exc}") from exc
        self._finalizer = weakref.finalize(self, _finalize_vhost_blk, self.proc, self._tmpdir)
        deadline = time.monotonic() + self.timeout
        while not unix_socket_listening(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {self.proc.returncode}" if self.proc.poll() is not None
                       else f"not listening on {sock} after {self.timeout} s")
                output = self.output()
                self.stop()
                raise BackendError(f"DPDK vhost_blk {why}:\n{output[-4000:]}")
            time.sleep(0.01)
        return self

    def output(self) -> str:
        """What the back-end printed so far (stdout and stderr)."""
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / self.LOG_NAME).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would; the socket file stays behind until :meth:`stop`."""
        if self.proc is not None:
            kill_process(self.proc, 10)

    def stop(self) -> None:
        """SIGINT (the example cleans up and exits 0), SIGKILL after 10 s; reap it, remove
        its socket file and the temporary working directory (idempotent)."""
        proc = self.proc
        if proc is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    kill_process(proc, 10)
        finally:
            if proc.poll() is None:
                kill_process(proc, 10)
            self.proc = None
            if self.workdir is not None:
                sock = self.workdir / self.SOCKET_NAME
                try:
                    if stat.S_ISSOCK(sock.lstat().st_mode):
                        sock.unlink()
                except FileNotFoundError:
                    pass
            self._remove_tmpdir()

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
