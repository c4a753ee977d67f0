"""virtq's aarch64 barrier stubs are the instructions Linux uses for DMA-coherent memory and
MMIO, and they execute.

This machine is x86-64, so the bytes in ``virtq._sys.fence.AARCH64_STUBS`` (what virtq maps
on an aarch64 machine) are checked three ways, with the tools scripts/install-system-deps.sh
installs (gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user-static):

* GNU ``as`` for aarch64 assembles each intended mnemonic to exactly those bytes, and
  ``objdump`` disassembles those bytes back to it;
* a static aarch64 program (tests/litmus/a64_stubs.c) maps them into a page the way virtq
  does and calls each under ``qemu-aarch64``: an invalid encoding dies of SIGILL, and a
  negative control with one corrupted byte shows that it does;
* the store-buffering litmus test (tests/litmus/sb.c) runs under the emulator with each stub
  as its fence: qemu decodes a DMB/DSB's request type (all, reads, writes) and emits a host
  fence only for "all", so the forbidden outcome appears with the store-store stub and never
  with ``full_fence`` or ``doorbell_barrier``.  The emulator ignores the shareability
  domain (osh vs ish); the assembler check pins that.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from virtq._sys.fence import AARCH64_STUBS

LITMUS = Path(__file__).parent / "litmus"
ROUNDS = 100_000

# What each stub must be: Linux's dma_mb / dma_wmb / dma_rmb (arch/arm64/include/asm/
# barrier.h) and mb(), each followed by ret.
MNEMONICS = {
    "full_fence": "dmb osh",
    "publish_barrier": "dmb oshst",
    "observe_barrier": "dmb oshld",
    "doorbell_barrier": "dsb sy",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: run scripts/install-system-deps.sh (as root)"
    return path


def stubs_header(stubs: dict[str, bytes]) -> str:
    width = max(len(code) for code in stubs.values())
    rows = ",\n".join("    {" + ", ".join(f"0x{b:02x}" for b in code) + "}"
                      for code in stubs.values())
    return (f"#define STUB_COUNT {len(stubs)}\n"
            "static const char *const stub_names[] = {"
            + ", ".join(f'"{name}"' for name in stubs) + "};\n"
            "static const unsigned stub_len[] = {"
            + ", ".join(str(len(code)) for code in stubs.values()) + "};\n"
            f"static const unsigned char stub_code[][{width}] = {{\n{rows}\n}};\n")


def build_harness(directory: Path, stubs: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stubs.h").write_text(stubs_header(stubs))
    program = directory / "a64_stubs"
    subprocess.run([tool("aarch64-linux-gnu-gcc"), "-O2", "-static", "-pthread", "-Wall",
                    "-Werror", f"-I{directory}", "-o", str(program),
                    str(LITMUS / "a64_stubs.c"), str(LITMUS / "sb.c")], check=True)
    return program


def run_aarch64(program: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("qemu-aarch64-static"), str(program), *args], check=False,
                          capture_output=True, text=True, timeout=300, cwd=program.parent)


@pytest.fixture(autouse=True)
def no_core_dumps():
    # qemu-user writes a core file for a guest killed by a signal unless RLIMIT_CORE is 0;
    # the children inherit the limit (no preexec_fn: fork hooks and threads do not mix).
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_harness(tmp_path_factory.mktemp("a64") / "shipped", AARCH64_STUBS)


def test_every_stub_is_checked():
    assert set(AARCH64_STUBS) == set(MNEMONICS)


@pytest.mark.parametrize("name", sorted(MNEMONICS))
def test_stub_is_what_the_assembler_makes(name: str, tmp_path: Path):
    source = tmp_path / "stub.s"
    source.write_text(f"{MNEMONICS[name]}\nret\n")
    subprocess.run([tool("aarch64-linux-gnu-as"), "-o", str(tmp_path / "stub.o"), str(source)],
                   check=True)
    subprocess.run([tool("aarch64-linux-gnu-objcopy"), "-O", "binary", "-j", ".text",
                    str(tmp_path / "stub.o"), str(tmp_path / "stub.bin")], check=True)
    assert AARCH64_STUBS[name] == (tmp_path / "stub.bin").read_bytes()

    # And the other way: the shipped bytes disassemble to the mnemonic.
    (tmp_path / "shipped.bin").write_bytes(AARCH64_STUBS[name])
    listing = subprocess.run(
        [tool("aarch64-linux-gnu-objdump"), "-D", "-b", "binary", "-m", "aarch64",
         str(tmp_path / "shipped.bin")], check=True, capture_output=True, text=True).stdout
    # Lines look like "   0:\td50333bf \tdmb\tosh".
    found = [" ".join(line.split("\t", 2)[2].split())
             for line in listing.splitlines() if line.startswith("   ") and ":\t" in line]
    assert found == [MNEMONICS[name], "ret"]


def test_shipped_stubs_execute_under_qemu(harness: Path):
    result = run_aarch64(harness)
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [f"{name} ok" for name in AARCH64_STUBS]


def test_harness_dies_on_a_corrupted_byte(tmp_path: Path):
    """Negative control: the run above would fail if the bytes were not instructions.  The
    top byte of ``dmb osh`` zeroed gives 0x000333bf, a permanently undefined encoding
    (UDF #0x33bf)."""
    code = bytearray(AARCH64_STUBS["full_fence"])
    code[3] = 0x00
    program = build_harness(tmp_path, {**AARCH64_STUBS, "full_fence": bytes(code)})
    result = run_aarch64(program)
    assert result.returncode == -signal.SIGILL, result
    assert "full_fence ok" not in result.stdout
    assert not [p for p in os.listdir(tmp_path) if "core" in p]


def test_full_fence_stub_forbids_store_buffering_under_qemu(harness: Path):
    def forbidden(fence: str) -> int:
        result = run_aarch64(harness, "sb", fence, str(ROUNDS))
        assert result.returncode == 0, result
        return int(result.stdout)

    # A store-store barrier does not order the store before the load: the emulated CPU
    # (threads on this host's cores) shows the forbidden outcome, so the check has teeth.
    assert forbidden("publish_barrier") > 0, "no reordering: the litmus test proves nothing"
    assert forbidden("full_fence") == 0
    assert forbidden("doorbell_barrier") == 0
