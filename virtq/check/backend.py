"""Back-end handles: how ``virtq check`` / ``virtq fuzz`` reach the back-end under test.

:class:`SocketBackend` is a back-end someone else started (``virtq check SOCKET``): it can
be connected to, never restarted.  :class:`CommandBackend` starts one from a command line
in which ``{socket}`` is replaced by a fresh path, restarts it on demand (between checks
that want a fresh one, after a crash, or because it exits after each front-end, as
virtiofsd does) and stops it by pid.  It also tells *how* the process ended: an exit
status, or the signal it died on -- what ``virtq fuzz`` classifies as a crash.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import stat
import subprocess
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, Self, runtime_checkable

from virtq.errors import ArgumentError, VirtqError

__all__ = ["Backend", "BackendExit", "BackendStartError", "CommandBackend", "SocketBackend"]


class BackendStartError(VirtqError):
    """The back-end could not be started or reached (the tool cannot run: exit 2)."""


@dataclass(frozen=True)
class BackendExit:
    """How a back-end process ended: ``signal`` set when it died on one."""

    returncode: int

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"died on {name}"
        return f"exited with status {self.returncode}"


@runtime_checkable
class Backend(Protocol):
    """What checks and the fuzzer need from a back-end."""

    @property
    def socket_path(self) -> Path: ...

    @property
    def restartable(self) -> bool: ...

    def describe(self) -> str: ...

    def ensure_running(self) -> None:
        """Make sure something listens on :attr:`socket_path` (restart it if it ended)."""
        ...

    def restart(self) -> None: ...

    def poll(self) -> BackendExit | None:
        """How the process ended, if it has (None: running, or not ours to know)."""
        ...

    def stop(self) -> None: ...


class SocketBackend:
    """A back-end already listening on ``path``; the tool never starts or stops it."""

    restartable = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)

    @property
    def socket_path(self) -> Path:
        return self._path

    def describe(self) -> str:
        return f"socket {self._path}"

    def ensure_running(self) -> None:
        try:
            mode = os.stat(self._path).st_mode
        except FileNotFoundError:
            raise BackendStartError(f"{self._path}: no such socket") from None
        if not stat.S_ISSOCK(mode):
            raise BackendStartError(f"{self._path} is not a socket")

    def restart(self) -> None:
        self.ensure_running()

    def poll(self) -> BackendExit | None:
        return None

    def stop(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _finalize(proc: subprocess.Popen[bytes], tmp: tempfile.TemporaryDirectory[str]) -> None:
    warnings.warn(f"back-end process {proc.pid} was not stopped", ResourceWarning,
                  stacklevel=2)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()
    tmp.cleanup()


class CommandBackend:
    """``command`` (a string split like a shell would, or a list) with ``{socket}``
    replaced by a fresh socket path in a private directory.

    The process gets a pipe on stdin that stays open while it runs (a program that exits
    on end-of-input, like dpdk-testpmd, keeps running), its output goes to a log file
    (:meth:`log_tail`), and it runs in its own session.  Ready means: the socket exists.
    """

    restartable = True

    def __init__(self, command: str | list[str], *, start_timeout: float = 20.0,
                 stop_timeout: float = 5.0) -> None:
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise ArgumentError("command", command, "is empty")
        if not any("{socket}" in a for a in argv):
            raise ArgumentError("command", command, "must contain {socket}")
        self.argv = argv
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="virtq-check-")
        self._path = Path(self._tmp.name) / "backend.sock"
        self._log_path = Path(self._tmp.name) / "backend.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exits: list[BackendExit] = []  # every end seen, in order
        self._finalizer: weakref.finalize[..., CommandBackend] | None = None
        self._log: IO[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self._path

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def describe(self) -> str:
        return shlex.join(self.argv)

    def command(self) -> list[str]:
        return [a.replace("{socket}", str(self._path)) for a in self.argv]

    def start(self) -> Self:
        if self.proc is not None:
            raise BackendStartError("the back-end is already running")
        # A fresh socket path per start: a dead back-end's socket file is stale.
        self.starts += 1
        self._path = Path(self._tmp.name) / f"backend{self.starts}.sock"
        self._log = open(self._log_path, "ab")  # noqa: SIM115 - lives as long as the process
        try:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE,
                                         stdout=self._log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        except OSError as exc:
            self._log.close()
            raise BackendStartError(f"cannot start {self.argv[0]}: {exc}") from exc
        self._finalizer = weakref.finalize(self, _finalize, self.proc, self._tmp)
        deadline = time.monotonic() + self.start_timeout
        while not self._listening():
            code = self.proc.poll()
            if code is not None:
                self._reap(code)
                raise BackendStartError(
                    f"the back-end {BackendExit(code).describe()} before it listened on "
                    f"{self._path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BackendStartError(
                    f"the back-end did not create {self._path} within {self.start_timeout} s:"
                    f"\n{self.log_tail()}")
            time.sleep(0.01)
        return self

    def _listening(self) -> bool:
        try:
            return stat.S_ISSOCK(os.stat(self._path).st_mode)
        except FileNotFoundError:
            return False

    def poll(self) -> BackendExit | None:
        """How the process ended (once; later calls return None until it ends again)."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            return None
        return self._reap(code)

    def _reap(self, code: int) -> BackendExit:
        end = BackendExit(code)
        self.exits.append(end)
        self._release()
        return end

    def _release(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if self._finalizer is not None:
            self._finalizer.detach()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        self._path.unlink(missing_ok=True)

    def wait_exit(self, timeout: float) -> BackendExit | None:
        """Wait up to ``timeout`` for the process to end on its own."""
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self._reap(code)

    def ensure_running(self) -> None:
        if self.proc is None or self.poll() is not None:
            self.start()

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL after ``stop_timeout``; the exit is recorded."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=self.stop_timeout)
        self.proc = None
        self._release_after(proc)

    def _release_after(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self._release()

    def log_size(self) -> int:
        try:
            return self._log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        """What the back-end printed after byte ``offset`` of its log."""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(offset)
                return f.read(1 << 16).decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, nbytes: int = 2000) -> str:
        try:
            data = self._log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[-nbytes:].decode(errors="replace")

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
