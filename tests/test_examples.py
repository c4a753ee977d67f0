"""Every program in examples/ runs, against the real back-end it is written for: the
in-process queue, qemu-storage-daemon, the embedded back-end, dpdk-testpmd, and virtio-rng
through VFIO inside the vfio-guest VM."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TESTED = {"first_queue.py", "disk_over_qsd.py", "nic_loopback.py", "rng_through_vfio.py",
          "tiny_driver.py", "async_disk.py", "inspect_a_stalled_queue.py", "check_a_backend.py"}


def run(name: str, *args: str, timeout: float = 180) -> str:
    env = dict(os.environ, PYTHONWARNINGS="error")
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, timeout=timeout, check=False, cwd=ROOT, env=env)
    assert done.returncode == 0, f"{name} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def test_every_example_is_tested_and_listed():
    assert {p.name for p in EXAMPLES.glob("*.py")} == TESTED
    readme = (EXAMPLES / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in TESTED)


def test_first_queue():
    out = run("first_queue.py")
    assert "request 1 completed, 5 bytes: b'HELLO'" in out


@pytest.mark.parametrize("backend", ["qsd", "embedded"])
def test_disk_over_qsd(backend):
    out = run("disk_over_qsd.py", "--backend", backend)
    assert "1 MiB written, flushed and read back" in out
    assert "32 reads in flight together, all done" in out
    assert "zero-copy read of sector 24 starts with 1800000000000000" in out
    assert "reading past the end: read of 512 bytes at sector 32768" in out


def test_disk_over_a_socket_you_started(virtq_qsd):
    out = run("disk_over_qsd.py", "--socket", str(virtq_qsd.socket_path))
    assert "32 reads in flight together" in out


def test_nic_loopback():
    out = run("nic_loopback.py", "--frames", "64")
    assert "64 frames sent and received back byte for byte" in out


def test_tiny_driver():
    out = run("tiny_driver.py")
    assert "id 'vhost_user_blk'" in out
    assert "sector 8: 0800000000000000" in out


def test_async_disk():
    out = run("async_disk.py")
    for backend in ("asyncio", "trio"):
        assert f"{backend}:" in out
    assert out.count("a cancelled read left the queue consistent") == 2


def test_inspect_a_stalled_queue(tmp_path):
    svg = tmp_path / "stalled.svg"
    out = run("inspect_a_stalled_queue.py", "--svg", str(svg))
    assert "5 chain(s) published and not used" in out
    assert "in flight (5)" in out
    assert "after SIGCONT: 5 of 5 reads completed" in out
    assert "in flight (5)" in "".join(ET.parse(svg).getroot().itertext())


def test_check_a_backend():
    """virtq check against qemu-storage-daemon, from the command line and from Python (what
    QSD passes and fails is tests/test_check_backends.py's business)."""
    out = run("check_a_backend.py")
    assert "virtq check --device blk" in out
    assert "pass   MUST    ring.setup" in out
    assert "virtq check exited " in out
    assert "from Python: {'ring.setup': 'pass'" in out


def test_rng_through_vfio_in_the_guest(tmp_path):
    """The only place with a virtio-rng PCI function and an IOMMU: the vfio-guest VM."""
    harness = ROOT.parent / "shared" / "tools" / "vfio-guest" / "run.sh"
    assert harness.exists() or os.environ.get("VFIO_GUEST_HARNESS"), "no vfio-guest harness"
    done = subprocess.run([str(ROOT / "scripts" / "vfio-guest"), "--out", str(tmp_path),
                           "--timeout", "240", "--", "$PY examples/rng_through_vfio.py"],
                          capture_output=True, text=True, timeout=330, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "(polling): " in output and "(MSI-X): " in output, output[-4000:]
