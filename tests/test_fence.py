"""The memory-ordering mechanism is real: a store-buffering litmus test shows the forbidden
outcome with a no-op in place of the fence, and never with virtq's full_fence."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from virtq._sys import fence
from virtq._sys.vfio import RegionDesc
from virtq.transport.vfio_pci import transport as vfio_transport
from virtq.transport.vfio_pci.device import MmapBar, PioBar

LITMUS = Path(__file__).parent / "litmus" / "sb.c"
ROUNDS = 200_000


@pytest.fixture(scope="module")
def litmus(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed for the litmus test (scripts/install-system-deps.sh)"
    lib = tmp_path_factory.mktemp("litmus") / "sb.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(lib), str(LITMUS)],
                   check=True)
    so = ctypes.CDLL(str(lib))
    so.sb_litmus.restype = ctypes.c_long
    so.sb_litmus.argtypes = (ctypes.c_size_t, ctypes.c_long)
    return so.sb_litmus


def test_mechanism_is_the_machine_code_stub():
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        assert fence.MECHANISM == "x86-64 mfence stub"
        assert fence.FULL_FENCE_CODE == bytes.fromhex("0faef0c3")  # mfence; ret
        # TSO: store->store and load->load need no instruction.
        assert not fence.PUBLISH_BARRIER_NEEDED
        assert not fence.OBSERVE_BARRIER_NEEDED
    else:  # pragma: no cover - aarch64
        assert fence.FULL_FENCE_CODE == fence.AARCH64_STUBS["full_fence"]  # dmb osh; ret
    fence.full_fence()
    fence.publish_barrier()
    fence.observe_barrier()
    fence.doorbell_barrier()


def test_store_buffering_litmus(litmus):
    fence_addr = ctypes.cast(fence.full_fence, ctypes.c_void_p).value
    assert fence_addr
    without = litmus(0, ROUNDS)  # 0 = the C file's no-op function
    with_fence = litmus(fence_addr, ROUNDS)
    assert without > 0, "the CPU never reordered: the litmus test proves nothing here"
    assert with_fence == 0, f"{with_fence} forbidden outcomes despite full_fence"


@pytest.mark.parametrize("bar_class", [MmapBar, PioBar])
def test_vfio_kick_runs_the_doorbell_barrier_before_the_notify_store(bar_class, monkeypatch):
    """The VFIO doorbell calls doorbell_barrier() first, then stores the queue index into
    the notify register (a memfd stands in for the BAR)."""
    fd = os.memfd_create("bar")
    os.ftruncate(fd, 4096)
    bar = bar_class(fd, RegionDesc(index=4, flags=0, size=4096, offset=0))
    seen = []
    monkeypatch.setattr(vfio_transport, "doorbell_barrier",
                        lambda: seen.append(bar.read(0x20, 2)))
    try:
        kick = vfio_transport.VfioPciTransport._doorbell(bar, 0x20, 5)
        kick()
        assert seen == [0]  # the barrier ran while the register still held its old value
        assert bar.read(0x20, 2) == 5
    finally:
        bar.close()
        os.close(fd)
