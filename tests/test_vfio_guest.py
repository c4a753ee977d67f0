"""The VFIO tests that need real devices: boot the vfio-guest VM and run tests/guest there.

Three boots: the main one (intel-iommu, modern virtio-rng/blk with iommu_platform=on) runs
every guest test but the others'; the second boots without an IOMMU (``iommu=off``) for the
"no IOMMU group" error; the third gives the devices ``packed=on`` so they offer
VIRTIO_F_RING_PACKED and QEMU's device side reads our packed rings.  A failure shows the
guest's pytest output; the whole run folder (console.log, guest.log, disk.img) stays in
pytest's tmp_path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = ROOT / "scripts" / "vfio-guest"
HARNESS = ROOT.parent / "shared" / "tools" / "vfio-guest" / "run.sh"
GUEST_PYTEST = ('$PY -m pytest -p no:cacheprovider -q -rfE -o faulthandler_timeout=60 '
                '-m "{marker}" tests/guest')


@pytest.fixture(scope="module", autouse=True)
def _system_deps() -> None:
    """qemu and a static busybox; installed (idempotently) if missing -- never skipped."""
    if not (shutil.which("qemu-system-x86_64") and shutil.which("busybox")):
        subprocess.run([str(ROOT / "scripts" / "install-system-deps.sh")], check=False)
    assert shutil.which("qemu-system-x86_64"), "qemu-system-x86_64 missing: run " \
        "scripts/install-system-deps.sh (as root)"
    assert HARNESS.exists() or os.environ.get("VFIO_GUEST_HARNESS"), (
        f"no vfio-guest harness at {HARNESS} (set VFIO_GUEST_HARNESS)")


def run_in_guest(out: Path, command: str, *, append: str | None = None,
                 devopt: str | None = None) -> tuple[int, str]:
    args = [str(WRAPPER), "--out", str(out), "--timeout", "240"]
    if append:
        args += ["--append", append]
    if devopt:
        args += ["--devopt", devopt]
    proc = subprocess.run([*args, "--", command], capture_output=True, text=True,
                          timeout=330, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _check(rc: int, output: str, minimum: int) -> None:
    tail = "\n".join(output.splitlines()[-250:])
    assert rc == 0, f"the guest's pytest exited {rc}:\n{tail}"
    summary = [line for line in output.splitlines() if " passed" in line]
    assert summary, f"no pytest summary in the guest's output:\n{tail}"
    passed = int(summary[-1].split(" passed")[0].split()[-1])
    assert passed >= minimum, f"only {passed} guest tests passed:\n{tail}"


def test_vfio_guest_suite(tmp_path):
    rc, output = run_in_guest(tmp_path, GUEST_PYTEST.format(
        marker="not noiommu_boot and not packed_boot"))
    _check(rc, output, minimum=30)


def test_vfio_guest_without_an_iommu(tmp_path):
    rc, output = run_in_guest(tmp_path, GUEST_PYTEST.format(marker="noiommu_boot"),
                              append="iommu=off")
    _check(rc, output, minimum=1)


def test_vfio_guest_packed_rings(tmp_path):
    rc, output = run_in_guest(tmp_path, GUEST_PYTEST.format(marker="packed_boot"),
                              devopt="packed=on")
    _check(rc, output, minimum=6)
