"""The command line: the README's demo and ``inspect`` (the benchmarks: test_benchmarks.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest


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

