"""``virtq fuzz`` classifies what a back-end does: each class is produced here by a case
chosen for it against the embedded back-end (in a process, so it can crash), with the fault
switch that causes it; the fuzzing loop finds, minimises and replays a crash."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtq.check import CommandBackend
from virtq.check.fuzz import (
    Case,
    FuzzOptions,
    fuzz,
    generate,
    load_case,
    run_case,
)
from virtq.errors import ArgumentError
from virtq.testing import BackendProcess, Faults
from virtq.testing.runners import make_image


@pytest.fixture
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vqf-") as d:
        yield Path(d)


def embedded_cmd(tmp: Path, faults: str = "") -> list[str]:
    image = make_image(tmp / "disk.img", 1 << 20)
    return BackendProcess(image, "{socket}", faults=Faults.parse(faults)).command()


def classify(tmp: Path, faults: str, level: str, kind: str, **params: object):
    # A hung back-end ignores SIGTERM: kill it after a second, not five.
    with CommandBackend(embedded_cmd(tmp, faults), stop_timeout=1.0) as backend:
        return run_case(Case("blk", level, kind, dict(params)), backend, FuzzOptions())


@pytest.mark.parametrize(("faults", "level", "kind", "params", "cls", "detail"), [
    ("", "ring", "addr_oob", {"where": "end"}, "rejected", "disconnected"),
    ("", "ring", "head_twice", {}, "ok", "completed"),
    ("", "request", "bad_type", {"type": 10}, "rejected", "status 2"),
    ("crash_on_indirect", "ring", "indirect_bad_len", {"length": 7}, "crash", "SIGABRT"),
    ("spin_on_loop", "ring", "loop", {"to": 3}, "hang", "no reply"),
    ("write_past_buffer", "request", "bad_type", {"type": 10}, "wrote-outside", "guard"),
    ("write_readable", "ring", "zero_len", {"target": 2}, "wrote-outside", "readable"),
    ("corrupt_used", "request", "bad_type", {"type": 10}, "protocol", "never made"),
    ("bad_used_len", "ring", "head_twice", {}, "protocol", "used.len"),
    ("never_answer=GET_STATUS", "protocol", "vring_num", {"num": 1}, "hang", "GET_STATUS"),
])
def test_each_class(tmp, faults, level, kind, params, cls, detail):
    verdict = classify(tmp, faults, level, kind, **params)
    assert verdict.cls == cls, verdict
    assert detail in verdict.detail


def test_generation_is_deterministic():
    def cases(seed):
        rng = random.Random(seed)
        return [generate(rng, "blk").describe() for _ in range(50)]

    assert cases(7) == cases(7)
    assert cases(7) != cases(8)
    assert {c.split("/")[0] for c in cases(7)} == {"ring", "request", "protocol"}


def test_fuzz_finds_minimises_and_replays_a_crash(tmp):
    out = tmp / "out"
    with CommandBackend(embedded_cmd(tmp, "crash_on_indirect")) as backend:
        report = fuzz("blk", backend, FuzzOptions(cases=12, seed=3, out=out,
                                                  levels=("ring",)))
    crashes = [f for f in report.findings if f.verdict.cls == "crash"]
    assert crashes, report.to_json()
    first = crashes[0]
    assert first.reproduced and "SIGABRT" in first.verdict.detail
    assert first.path is not None and first.path.exists()
    rep = load_case(first.path)
    assert rep.case == first.case and rep.cls == "crash"
    # The minimised case is no bigger than what was found.
    assert len(json.dumps(first.case.params)) <= len(json.dumps(first.first.params))
    done = subprocess.run(
        [sys.executable, "-m", "virtq", "fuzz", "--device", "blk", "--replay",
         str(first.path), "--backend-cmd", " ".join(embedded_cmd(tmp, "crash_on_indirect"))],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert "crash" in done.stdout and "SIGABRT" in done.stdout


def test_fuzz_cli_on_a_clean_back_end(tmp):
    js = tmp / "fuzz.json"
    done = subprocess.run(
        [sys.executable, "-m", "virtq", "fuzz", "--device", "blk", "--cases", "25",
         "--seed", "1", "--json", str(js), "--backend-cmd", " ".join(embedded_cmd(tmp))],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(js.read_text())
    assert data["cases"] == 25 and sum(data["by_class"].values()) == 25
    assert data["findings"] == []
    assert "| **all** |" in done.stdout and "no findings" in done.stdout


@pytest.mark.parametrize("args", [
    ["--levels", "bogus"], ["--seconds", "0"], ["--replay", "/nonexistent.json"],
    ["--json", "/nonexistent/dir/f.json"],
])
def test_fuzz_cli_bad_arguments_exit_2_without_a_traceback(args):
    done = subprocess.run([sys.executable, "-m", "virtq", "fuzz", "--device", "blk",
                           "--backend-cmd", "x {socket}", *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "error:" in done.stderr


def test_a_reproducer_that_is_not_one_is_refused(tmp):
    bad = tmp / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ArgumentError):
        load_case(bad)
