"""Bad command-line arguments: a one-line ``error:`` (after argparse's usage) and exit
status 2, never a traceback (review 2026-11-30, hostile finding 13: ``virtq inspect 3``,
``inspect 0``, ``inspect -8``, ``inspect 8 --buffer-size -1``, ``demo ring --queue-size 3``,
``demo ring --start-index 0x10000``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import virtq
from virtq import cli
from virtq.cli import bench_blk, bench_fs, bench_net, bench_vfio
from virtq.cli import fs as fs_cli
from virtq.layout import SplitLayout

BAD = [
    # the review's reproducers
    ["inspect", "3"], ["inspect", "0"], ["inspect", "-8"], ["inspect", "8", "--buffer-size", "-1"],
    ["demo", "ring", "--queue-size", "3"], ["demo", "ring", "--start-index", "0x10000"],
    # their siblings
    ["inspect", "65536"], ["inspect", "x"], ["inspect", "1e3"], ["inspect", ""],
    ["inspect", "8", "--buffer-size", "x"], ["inspect"], ["inspect", "8", "--bogus"],
    ["demo", "ring", "--queue-size", "0"], ["demo", "ring", "--queue-size", "65536"],
    ["demo", "ring", "--queue-size", "-16"], ["demo", "ring", "--count", "0"],
    ["demo", "ring", "--count", "-5"], ["demo", "ring", "--count", "many"],
    ["demo", "ring", "--start-index", "-1"], ["demo", "ring", "--start-index", "0xg"],
    ["demo", "--mib", "0"], ["demo", "--mib", "16"], ["demo", "--mib", "-1"],
    ["demo", "--backend", "nope"], ["demo", "disk"],
    ["bench"], ["bench", "disk"],
    ["bench", "blk", "--depths", "0"], ["bench", "blk", "--depths", "x"],
    ["bench", "blk", "--depths", "1,,2"], ["bench", "blk", "--depths", "99999"],
    ["bench", "blk", "--seconds", "-1"], ["bench", "blk", "--seconds", "nan"],
    ["bench", "blk", "--seconds", "0"], ["bench", "blk", "--seconds", "inf"],
    ["bench", "blk", "--batch", "0"], ["bench", "blk", "--depths", "4", "--batch", "5"],
    ["bench", "blk", "--modes", "warp"], ["bench", "blk", "--aio", "native"],
    ["bench", "blk", "--image-dir", "/nonexistent/dir"],
    ["bench", "net", "--frame-size", "10"], ["bench", "net", "--frame-size", "9000"],
    ["bench", "net", "--queue-size", "100"], ["bench", "net", "--batch", "0"],
    ["bench", "net", "--batch", "512", "--queue-size", "256"],
    ["bench", "net", "--seconds", "-2"], ["bench", "net", "--warmup", "-1"],
    ["bench", "net", "--rounds", "0"], ["bench", "net", "--mode", "spin"],
    ["bench", "net", "--pairs", "0"], ["bench", "net", "--pairs", "1,,2"],
    ["bench", "net", "--pairs", "9"],
    ["bench", "vfio", "--iters", "0"], ["bench", "vfio", "--iters", "-3"],
    ["bench", "fs", "--size-mib", "0"], ["bench", "fs", "--size-mib", "x"],
    ["bench", "fs", "--request-sizes", "100"], ["bench", "fs", "--request-sizes", "4096,"],
    ["bench", "fs", "--request-sizes", "2097152"], ["bench", "fs", "--files", "0"],
    ["bench", "fs", "--dir", "/nonexistent/dir"], ["bench", "fs", "--bogus"],
    ["demo", "fsx"], ["fs"], ["fs", "ls"], ["fs", "--socket", "s"],
    ["fs", "--socket", "s", "frob"], ["fs", "--socket", "s", "cat"],
    ["fs", "--socket", "s", "put", "/nonexistent/file", "x"],
    ["fs", "--socket", "s", "get", "x"], ["fs", "--socket", "s", "--timeout", "0", "ls"],
    ["fs", "--socket", "s", "--timeout", "nan", "ls"], ["fs", "--socket", "s", "ls", "-x"],
    ["fs", "--socket", "s", "stat", "a", "b"],
    [], ["frobnicate"], ["--bogus"],
    # argparse (3.11) stores [] for an option value of "--" without checking it
    ["demo", "ring", "--count=--"], ["demo", "--backend=--"], ["demo", "--mib=--"],
    ["bench", "blk", "--depths=--"], ["bench", "blk", "--modes=--"],
    ["bench", "blk", "--aio=--"], ["bench", "net", "--mode=--"],
    ["bench", "vfio", "--iters=--"], ["inspect", "8", "--buffer-size=--"],
    ["fs", "--socket=--", "ls"], ["fs", "--socket", "s", "--timeout=--", "ls"],
    ["bench", "fs", "--size-mib=--"], ["bench", "fs", "--json=--"],
]


@pytest.fixture(autouse=True)
def _no_real_runs(monkeypatch):
    """Parsing is what is tested: a command that got past it must not run for real."""
    def ran(*_args, **_kwargs):
        raise AssertionError("a bad argument was accepted and the command ran")

    for module, name in ((cli, "demo_blk"), (cli, "demo_ring"), (bench_blk, "run_depth"),
                         (bench_blk, "QemuStorageDaemon"), (bench_net, "TestPmd"),
                         (bench_vfio, "_run_here"), (bench_vfio, "_run_in_guest"),
                         (bench_fs, "Virtiofsd"), (fs_cli, "run_fs"), (fs_cli, "demo_fs")):
        monkeypatch.setattr(module, name, ran)


@pytest.mark.parametrize("argv", BAD, ids=" ".join)
def test_bad_arguments_exit_2_with_a_one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("virtq") and ": error: " in last, err


@pytest.mark.parametrize("argv", [["inspect", "3"], ["demo", "ring", "--start-index",
                                                     "0x10000"], ["bench", "blk", "--depths",
                                                                  "0"]])
def test_the_real_entry_point_exits_2(argv):
    done = subprocess.run([sys.executable, "-m", "virtq", *argv], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert ": error: " in done.stderr.strip().splitlines()[-1]
    assert done.stdout == ""


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"virtq {virtq.__version__}"


@pytest.mark.parametrize(("argv", "expected"), [
    (["inspect", "8"], "queue_size: 8"),
    (["inspect", "0x100", "--buffer-size", "0x400"], "queue_size: 256"),
    (["inspect", "08"], "queue_size: 8"),  # leading zero: decimal
    (["inspect", "32768", "--legacy"], "queue_size: 32768"),
    (["inspect", "1"], "queue_size: 1"),
])
def test_good_inspect_arguments(argv, expected, capsys):
    assert cli.main(argv) == 0
    assert expected in capsys.readouterr().out


def test_a_library_rule_the_parser_does_not_know_is_still_a_usage_error(monkeypatch, capsys):
    from virtq.errors import ArgumentError  # noqa: PLC0415

    def refuse(args):
        raise ArgumentError("count", args.count, "too many for this machine")

    monkeypatch.setattr(cli, "demo_ring", refuse)
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "ring", "--count", "5"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "virtq demo: error: count=5: too many for this machine")


token = st.one_of(st.text(max_size=8), st.integers(-(1 << 70), 1 << 70).map(str),
                  st.integers(0, 1 << 20).map(hex), st.floats().map(str),
                  st.sampled_from(["--buffer-size", "--legacy", "-h", "--", "-1", "0"]))


@given(st.lists(token, max_size=4))
def test_any_inspect_arguments_print_a_layout_or_exit_2(argv):
    try:
        assert cli.main(["inspect", *argv]) == 0
    except SystemExit as exc:
        assert exc.code in (0, 2)  # 0: -h


def _demo_checks_its_arguments(args) -> int:
    """Stands in for the demos: what the parser let through must be valid for them (the
    ring the ring demo builds, the 16 MiB image the blk demo writes to)."""
    SplitLayout.compute(args.queue_size, buffer_size=256, indirect_size=4)
    assert 0 <= args.start_index <= 0xFFFF and args.count >= 1 and 1 <= args.mib <= 15
    return 0


@given(option=st.sampled_from(["--queue-size", "--count", "--start-index", "--mib"]),
       value=token, what=st.sampled_from(["ring", "blk"]))
def test_any_demo_option_value_runs_or_exits_2(option, value, what):
    cli.demo_ring = cli.demo_blk = _demo_checks_its_arguments  # undone by the fixture
    try:
        assert cli.main(["demo", what, f"{option}={value}"]) == 0
    except SystemExit as exc:
        assert exc.code == 2
