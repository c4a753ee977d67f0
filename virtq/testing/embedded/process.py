"""The embedded back-end in a child process, for tests that kill it the way a crash would."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from virtq.testing.embedded.server import Faults
from virtq.testing.runners import BackendError, kill_process, stop_process


class BackendProcess:
    """``python -m virtq.testing.embedded`` as a child process.  A context manager, like
    :class:`~virtq.testing.runners.QemuStorageDaemon`; :meth:`kill` is a SIGKILL."""

    def __init__(
        self,
        image_path: str | os.PathLike[str],
        socket_path: str | os.PathLike[str],
        *,
        num_queues: int = 1,
        read_only: bool = False,
        inflight: bool = False,
        faults: Faults | Mapping[str, object] | None = None,
        timeout: float = 10.0,
        device: str = "blk",
    ) -> None:
        self.image_path = Path(image_path)
        self.socket_path = Path(socket_path)
        self.num_queues = num_queues
        self.read_only = read_only
        self.inflight = inflight
        self.faults = Faults.coerce(faults)
        self.timeout = timeout
        self.device = device
        self.proc: subprocess.Popen[bytes] | None = None
        self._socket_ino = 0

    def command(self) -> list[str]:
        """The child's command line: ``python -m virtq.testing.embedded IMAGE SOCKET`` with the
        options given."""
        cmd = [sys.executable, "-m", "virtq.testing.embedded", str(self.image_path),
               str(self.socket_path), "--num-queues", str(self.num_queues)]
        if self.read_only:
            cmd.append("--read-only")
        if self.inflight:
            cmd.append("--inflight")
        if self.device != "blk":
            cmd += ["--device", self.device]
        if spec := self.faults.to_spec():
            cmd += ["--faults", spec]
        return cmd

    def start(self) -> Self:
        """Start the child and return once it says it listens.  Raises
        :class:`~virtq.testing.runners.BackendError` when it does not within ``timeout`` seconds
        (its stderr says why)."""
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        # The child prints one line once it listens: a socket file alone could be stale,
        # or bound and not listening yet.
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line.startswith(b"ready"):
            self.stop()
            raise BackendError(f"the embedded back-end did not start (said {line!r}; "
                               "its stderr has the reason)")
        self._socket_ino = os.stat(self.socket_path).st_ino
        return self

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs (None otherwise)."""
        return None if self.proc is None else self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the connection drops mid-whatever, the socket file stays behind."""
        if self.proc is not None:
            kill_process(self.proc, self.timeout)
            if self.proc.stdout is not None:
                self.proc.stdout.close()  # start() may run the next one

    def stop(self) -> None:
        """SIGTERM (the child cleans up), SIGKILL if it does not exit in time."""
        if self.proc is None:
            return
        stop_process(self.proc, self.timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
        try:  # a killed child leaves its socket; a successor's socket is not ours
            if os.stat(self.socket_path).st_ino == self._socket_ino:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
