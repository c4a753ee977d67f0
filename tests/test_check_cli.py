"""``virtq check``'s command line and library edges: arguments, exit codes, colour, JSON,
the pytest fixture, and that a run leaves no fd or mapping behind."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtq.check import (
    CATALOGUE,
    CheckOptions,
    CommandBackend,
    Level,
    SocketBackend,
    run_checks,
    select_checks,
)
from virtq.check.backend import BackendStartError
from virtq.errors import ArgumentError
from virtq.testing import VhostUserBlkBackend
from virtq.testing.runners import make_image


@pytest.fixture
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vqk-") as d:
        yield Path(d)


def virtq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtq", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def embedded(tmp: Path, faults: str = "") -> str:
    image = make_image(tmp / "disk.img", 1 << 20)
    spec = f" --faults {faults}" if faults else ""
    return f"{sys.executable} -m virtq.testing.embedded {image} {{socket}}{spec}"


@pytest.mark.parametrize("args", [
    ["--device", "blk"],  # neither SOCKET nor --backend-cmd
    ["--device", "blk", "/s", "--backend-cmd", "x {socket}"],  # both
    ["--device", "scsi", "/s"],
    ["--device", "blk", "--backend-cmd", "no-placeholder"],
    ["--device", "blk", "/s", "--only", "nothing.*"],
    ["--device", "blk", "/s", "--timeout", "0"],
    ["--device", "blk", "/s", "--image", "/nonexistent.img"],
    ["--device", "blk", "/s", "--json", "/nonexistent/dir/r.json"],
])
def test_bad_arguments_exit_2_without_a_traceback(args):
    done = virtq("check", *args)
    assert done.returncode == 2, done.stdout
    assert "Traceback" not in done.stderr and "error:" in done.stderr


def test_no_back_end_is_exit_2(tmp):
    done = virtq("check", "--device", "blk", str(tmp / "absent.sock"))
    assert done.returncode == 2 and "no such socket" in done.stderr
    done = virtq("check", "--device", "blk", "--backend-cmd", "/bin/false {socket}")
    assert done.returncode == 2 and "exited with status 1" in done.stderr


def test_list_names_every_blk_check():
    done = virtq("check", "--device", "blk", "--list")
    assert done.returncode == 0
    for chk in select_checks("blk"):
        assert chk.id in done.stdout
    assert "net.loopback" not in done.stdout


def test_a_failing_must_check_is_exit_1_with_json_and_no_colour_when_piped(tmp):
    js = tmp / "r.json"
    done = virtq("check", "--device", "blk", "--backend-cmd", embedded(tmp, "write_readable"),
                 "--only", "ring.*", "--json", str(js))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "\033[" not in done.stdout
    assert "fail   MUST    ring.readable-untouched" in done.stdout
    assert "clause: VIRTIO 1.2 §2.7.5.1" in done.stdout
    report = json.loads(js.read_text())
    assert report["exit_status"] == 1
    (bad,) = [r for r in report["results"] if r["outcome"] == "fail"]
    assert bad["id"] == "ring.readable-untouched" and bad["level"] == "MUST"
    assert bad["evidence"]["hits"]
    assert {r["id"].split(".")[0] for r in report["results"]} == {"ring"}


def test_colour_when_asked(tmp):
    done = virtq("check", "--device", "blk", "--backend-cmd", embedded(tmp), "--only",
                 "ring.setup", "--color", "always")
    assert done.returncode == 0
    assert "\033[32mpass" in done.stdout


def test_every_check_names_a_clause_and_a_level():
    for chk in CATALOGUE.values():
        assert chk.clause and chk.title and chk.level in Level
        assert chk.clause.startswith(("VIRTIO 1.2 §", "vhost-user.rst")), chk.id
    ids = [c.id for c in CATALOGUE.values()]
    assert len(ids) == len(set(ids))


def test_select_checks_refuses_unknown_devices_and_patterns():
    with pytest.raises(ArgumentError):
        select_checks("scsi")
    with pytest.raises(ArgumentError):
        select_checks("blk", ["nope"])
    assert [c.id for c in select_checks("blk", ["blk.get-id"])] == ["blk.get-id"]


def test_command_backend_needs_the_placeholder_and_reports_a_start_failure():
    with pytest.raises(ArgumentError):
        CommandBackend("qemu-storage-daemon")
    backend = CommandBackend([sys.executable, "-c", "import sys; sys.exit(3)", "{socket}"])
    with pytest.raises(BackendStartError, match="exited with status 3"):
        backend.start()
    backend.close()


def test_a_run_leaves_no_fd_or_mapping_behind(tmp, no_leaks):
    image = make_image(tmp / "disk.img", 1 << 20)
    with VhostUserBlkBackend(image, tmp / "s.sock") as b:
        report = run_checks("blk", SocketBackend(b.socket_path),
                            options=CheckOptions(image=image, timeout=0.5))
    assert report.exit_status == 0


def test_the_pytest_fixture(virtq_check, tmp):
    image = make_image(tmp / "disk.img", 1 << 20)
    report = virtq_check("blk", backend_cmd=embedded(tmp), image=image, only=["blk.*"])
    assert report.exit_status == 0, report.failed()
    assert {r.id.split(".")[0] for r in report.results} == {"blk"}
    with VhostUserBlkBackend(image, tmp / "s.sock", faults={"long_id": True}) as b:
        report = virtq_check("blk", socket=b.socket_path, only=["blk.get-id"])
    assert report.failed() == ["blk.get-id"]
    with pytest.raises(ValueError, match="one of them"):
        virtq_check("blk")
