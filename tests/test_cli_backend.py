"""``virtq.cli.check.on_backend``: how ``virtq check`` and ``virtq fuzz`` start their
back-end, run on it and stop it again (one sequence for both commands)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from virtq.check import BackendStartError, CommandBackend, SocketBackend
from virtq.cli.check import on_backend
from virtq.testing.runners import make_image


def _args(socket: str | None = None, backend_cmd: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(socket=socket, backend_cmd=backend_cmd)


def _embedded(tmp_path: Path) -> str:
    image = make_image(tmp_path / "disk.img", 1 << 20)
    return f"{sys.executable} -m virtq.testing.embedded {image} {{socket}}"


def test_a_started_back_end_is_stopped_when_the_run_raises(tmp_path: Path) -> None:
    seen: list[tuple[CommandBackend, int]] = []

    def run(backend: object) -> int:
        assert isinstance(backend, CommandBackend)
        assert backend.pid is not None and psutil.pid_exists(backend.pid)
        seen.append((backend, backend.pid))
        raise RuntimeError("the run's own failure")

    with pytest.raises(RuntimeError, match="the run's own failure"):
        on_backend("check", _args(backend_cmd=_embedded(tmp_path)), argparse.ArgumentParser(),
                   run)
    ((backend, pid),) = seen
    assert backend.pid is None  # stopped by pid and reaped, not left behind
    assert not psutil.pid_exists(pid)


def test_the_runs_result_comes_back_on_a_socket_back_end(tmp_path: Path) -> None:
    seen: list[object] = []

    def run(backend: object) -> str:
        seen.append(backend)
        return "report"

    sock = str(tmp_path / "someone-elses.sock")
    assert on_backend("check", _args(socket=sock), argparse.ArgumentParser(), run) == "report"
    assert isinstance(seen[0], SocketBackend)


def test_a_back_end_that_cannot_start_is_none_and_said_on_stderr(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def never(backend: object) -> int:
        raise AssertionError("run must not be called")

    assert on_backend("fuzz", _args(backend_cmd="/bin/false {socket}"),
                      argparse.ArgumentParser(), never) is None
    assert "virtq fuzz: " in capsys.readouterr().err

    def restart_fails(backend: object) -> int:
        raise BackendStartError("gone for good")

    assert on_backend("check", _args(socket=str(tmp_path / "s")), argparse.ArgumentParser(),
                      restart_fails) is None
    assert capsys.readouterr().err == "virtq check: gone for good\n"


@pytest.mark.parametrize("backend", [["SOCKET"], ["--backend-cmd", "/bin/false {socket}"]],
                         ids=["absent-socket", "command-exits"])
def test_virtq_fuzz_without_a_back_end_is_exit_2(tmp_path: Path, backend: list[str]) -> None:
    argv = [str(tmp_path / "absent.sock") if a == "SOCKET" else a for a in backend]
    done = subprocess.run([sys.executable, "-m", "virtq", "fuzz", "--device", "blk",
                           "--cases", "1", *argv],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("virtq fuzz: ") and "Traceback" not in done.stderr
