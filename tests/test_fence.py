"""The memory-ordering mechanism is real: a store-buffering litmus test shows the forbidden
outcome with a no-op in place of the fence, and never with virtq's full_fence."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from virtq._sys import fence

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
    else:  # pragma: no cover - aarch64
        assert fence.FULL_FENCE_CODE[:4] == (0xD5033BBF).to_bytes(4, "little")  # dmb ish
    fence.full_fence()
    fence.publish_barrier()
    fence.observe_barrier()


def test_store_buffering_litmus(litmus):
    fence_addr = ctypes.cast(fence.full_fence, ctypes.c_void_p).value
    assert fence_addr
    without = litmus(0, ROUNDS)  # 0 = the C file's no-op function
    with_fence = litmus(fence_addr, ROUNDS)
    assert without > 0, "the CPU never reordered: the litmus test proves nothing here"
    assert with_fence == 0, f"{with_fence} forbidden outcomes despite full_fence"
