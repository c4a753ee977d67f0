"""The command line: the README's demo and ``inspect`` (the benchmarks: test_benchmarks.py)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import virtq as virtq_pkg
from virtq.cli import _args


def virtq(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "virtq", *args], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("backend", ["qsd", "embedded"])
def test_demo_blk(backend):
    out = virtq("demo", "--backend", backend, "--mib", "1")
    assert "byte-exact" in out
    assert "BlkIOError" in out
    last = out.strip().splitlines()[-1]  # "ring: avail.idx N, back-end's GET_VRING_BASE N"
    words = last.replace(",", "").split()
    assert words[2] == words[-1]


def test_demo_ring_crosses_the_wrap():
    out = virtq("demo", "ring", "--count", "300", "--start-index", "0xfff0")
    assert "wrapped 0xffff -> 0x0000" in out
    assert "300 requests verified" in out


def test_inspect_prints_the_seed_layout():
    out = virtq("inspect", "256", "--buffer-size", "1024")
    assert "avail: 4096" in out
    assert "used: 4616" in out
    assert "nbytes: 270336" in out



# -- polish: help, --version, --trace, exit statuses ---------------------------------------------

HELP = [[], ["demo"], ["inspect"], ["bench"], ["bench", "blk"], ["bench", "net"],
        ["bench", "vfio"], ["check"], ["fuzz"]]
MARKUP = re.compile(r"``|:(class|func|meth|mod|data|attr|exc):`|`[^`\s]+`_?")


@pytest.mark.parametrize("argv", HELP, ids=lambda a: " ".join(a) or "virtq")
def test_help_has_no_restructuredtext_markup(argv):
    text = virtq(*argv, "--help")
    assert text.startswith("usage: virtq")
    assert not MARKUP.search(text), MARKUP.search(text)


def test_plain_strips_the_markup_help_texts_are_written_in():
    assert _args.plain(":class:`~virtq.errors.ArgumentError` and ``x``::") == \
        "ArgumentError and x:"
    assert _args.plain(":func:`virtq.ringview.save_snapshot`, `y`") == \
        "virtq.ringview.save_snapshot, y"


def test_version_is_the_package_version():
    assert virtq("--version").strip() == f"virtq {virtq_pkg.__version__}"


def test_trace_logs_every_vhost_user_message():
    done = subprocess.run([sys.executable, "-m", "virtq", "--trace", "demo", "--backend",
                           "embedded", "--mib", "1"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    sent = [line for line in lines if " vhost-user -> " in line]
    replies = [line for line in lines if " vhost-user <- " in line]
    assert sent and sent[0].split(" -> ")[1].startswith("SET_OWNER")
    assert any(" <- GET_FEATURES flags=0x5 size=8 " in line for line in replies)
    assert any("-> SET_MEM_TABLE" in line or "-> ADD_MEM_REG" in line for line in sent)
    assert any("-> GET_VRING_BASE" in line for line in sent)
    # nothing is logged without --trace
    assert "vhost-user ->" not in subprocess.run(
        [sys.executable, "-m", "virtq", "demo", "--backend", "embedded", "--mib", "1"],
        capture_output=True, text=True, timeout=120, check=True).stderr


def test_a_failure_on_the_way_is_one_line_and_exit_2(tmp_path):
    """Not a bad argument but a failure (a socket nobody listens on, a file that cannot
    be read): ``virtq <command>: error: ...`` and status 2, no traceback."""
    unreadable = tmp_path / "ring.json"
    unreadable.write_text("{not json")
    done = subprocess.run([sys.executable, "-m", "virtq", "inspect", str(unreadable)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("virtq inspect: error: ")
