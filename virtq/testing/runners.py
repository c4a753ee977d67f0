"""Start and stop real vhost-user back-ends for tests and benchmarks.

:class:`QemuStorageDaemon` runs ``qemu-storage-daemon`` (Debian package
``qemu-system-common``) exporting a raw image as vhost-user-blk.  :class:`TestPmd` lives in
:mod:`virtq.testing.testpmd`.  Both are context managers that stop their process by pid and
remove their socket; neither needs hugepages.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Self

from virtq.errors import VirtqError


class BackendError(VirtqError):
    """A back-end process could not be started (missing binary, bad arguments, it died)."""


def require_binary(name: str, package: str) -> str:
    """The path of executable ``name`` on ``PATH``.  Raises :class:`BackendError` naming the
    Debian ``package`` to install when it is missing."""
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
        """The daemon's command line (``--blockdev`` file + raw, ``--export
        type=vhost-user-blk``, ``--pidfile``).  Raises :class:`BackendError` when
        ``qemu-storage-daemon`` is not installed."""
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
        """Start the daemon and return once its export listens (the pidfile is written).  Raises
        :class:`BackendError` when the binary is missing, the daemon exits (with its stderr in
        the message) or is not ready within ``timeout`` seconds."""
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
        """The daemon's pid while it runs (None before :meth:`start` and after :meth:`stop`)."""
        return None if self.proc is None else self.proc.pid

    def stderr(self) -> str:
        """What the daemon wrote to stderr so far (empty once stopped)."""
        try:
            return self._stderr.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would (for fault tests); the socket file stays behind."""
        if self.proc is not None:
            kill_process(self.proc, 10)

    def stop(self) -> None:
        """SIGTERM the daemon (SIGKILL after 5 s) and remove its socket, pidfile and log
        (idempotent)."""
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
