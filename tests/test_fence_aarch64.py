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
* QEMU's own decoder, an independent reading of the Arm ARM, names each instruction
  (``-d in_asm``) and turns it into a TCG ``mb`` op whose flags say which accesses it
  orders (``-d op``): ``full_fence`` and ``doorbell_barrier`` must order everything,
  store->load included; ``publish_barrier`` stores->stores; ``observe_barrier`` loads->loads
  and loads->stores.  The ``mb`` op has no shareability domain (osh vs ish); the
  mnemonics pin that.

A store-buffering litmus run under the emulator was tried and dropped: QEMU's call overhead
hides the reordering on most runs (0 to 15 000 forbidden outcomes in 100 000 rounds), so
it could not be a reliable test.  The x86 litmus test is in tests/test_fence.py.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from virtq._sys.fence import AARCH64_STUBS

LITMUS = Path(__file__).parent / "litmus"

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
                    "-Wextra", "-Werror", f"-I{directory}", "-o", str(program),
                    str(LITMUS / "a64_stubs.c")], check=True)
    return program


def run_aarch64(program: Path, *qemu_args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("qemu-aarch64-static"), *qemu_args, str(program)],
                          check=False, capture_output=True, text=True, timeout=120,
                          cwd=program.parent)


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


# QEMU's TCG barrier flags (include/tcg/tcg-mo.h): TCG_MO_A_B orders an A before a later B;
# a DMB/DSB always carries TCG_BAR_SC (0x30) as well.
TCG_MO = {"ld_ld": 0x01, "st_ld": 0x02, "ld_st": 0x04, "st_st": 0x08}
TCG_BAR_SC = 0x30
ORDERS = {
    "full_fence": {"ld_ld", "st_ld", "ld_st", "st_st"},
    "publish_barrier": {"st_st"},
    "observe_barrier": {"ld_ld", "ld_st"},
    "doorbell_barrier": {"ld_ld", "st_ld", "ld_st", "st_st"},
}


def translated_blocks(log: str, page: int) -> dict[int, tuple[str, list[int]]]:
    """From a ``-d in_asm,op`` log: for each translation block starting in the stub page,
    QEMU's disassembly of its first instruction and the flags of its ``mb`` ops."""
    blocks: dict[int, tuple[str, list[int]]] = {}
    for chunk in log.split("\nIN:")[1:]:
        guest, _, ops = chunk.partition("\nOP:")
        first = re.search(r"^0x([0-9a-f]+):\s+[0-9a-f]{8}\s+(.+)$", guest, re.MULTILINE)
        if first is None or not page <= int(first.group(1), 16) < page + 4096:
            continue
        flags = [int(m, 16) for m in re.findall(r"^ mb \$0x([0-9a-f]+)$", ops, re.MULTILINE)]
        blocks[int(first.group(1), 16) - page] = (" ".join(first.group(2).split()), flags)
    return blocks


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
    result = run_aarch64(harness, "-d", "in_asm,op", "-D", str(harness.parent / "qemu.log"))
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[1:] == [f"{name} ok" for name in AARCH64_STUBS]
    page = int(lines[0].removeprefix("page "), 16)

    blocks = translated_blocks((harness.parent / "qemu.log").read_text(), page)
    for slot, name in enumerate(AARCH64_STUBS):
        mnemonic, flags = blocks[slot * 64]
        assert mnemonic == MNEMONICS[name]
        expected = TCG_BAR_SC | sum(TCG_MO[order] for order in ORDERS[name])
        assert flags == [expected], f"{name}: mb {[hex(f) for f in flags]}, not {expected:#x}"


def test_harness_dies_on_a_corrupted_byte(tmp_path: Path):
    """Negative control: the run above would fail if the bytes were not instructions.  The
    top byte of ``dmb osh`` zeroed gives 0x000333bf, an unallocated encoding (objdump:
    "undefined")."""
    code = bytearray(AARCH64_STUBS["full_fence"])
    code[3] = 0x00
    program = build_harness(tmp_path, {**AARCH64_STUBS, "full_fence": bytes(code)})
    result = run_aarch64(program)
    assert result.returncode == -signal.SIGILL, result
    assert "full_fence ok" not in result.stdout
    assert not [p for p in os.listdir(tmp_path) if "core" in p]
