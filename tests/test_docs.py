"""The code in the docs runs: docs/writing-a-driver.md's complete driver is executed."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from virtq.cli import build_parser
from virtq.devices import BlkDevice

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_the_complete_driver_of_writing_a_driver_runs(no_leaks):
    blocks = python_blocks(DOCS / "writing-a-driver.md")
    complete = [b for b in blocks if "class TinyRng" in b]
    assert len(complete) == 1
    exec(compile(complete[0], "writing-a-driver.md", "exec"), {"__name__": "doc_example"})


def test_the_fragments_compile():
    for block in python_blocks(DOCS / "writing-a-driver.md"):
        compile(block, "writing-a-driver.md", "exec")


def all_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md")
                  if "_build" not in p.parts and "api" not in p.parts)


def test_every_python_block_in_the_docs_compiles():
    pages = all_pages()
    assert len(pages) > 15
    for page in pages:
        for block in python_blocks(page):
            compile(block, str(page.relative_to(DOCS)), "exec")


def run_page(name: str, prelude: str = "") -> dict[str, object]:
    """Run a page's Python blocks in order, as one program (with ``prelude`` first)."""
    code = prelude + "\n".join(python_blocks(DOCS / name))
    namespace: dict[str, object] = {"__name__": "doc_example"}
    exec(compile(code, name, "exec"), namespace)
    return namespace


def test_the_first_queue_tutorial_runs(no_leaks):
    run_page("tutorials/first-queue.md")


def test_the_disk_tutorial_runs(no_leaks):
    """It starts its own qemu-storage-daemon and stops it at the end."""
    run_page("tutorials/disk.md")


def test_the_cross_process_how_to_runs(no_leaks):
    run_page("howto/cross-process.md")


def test_the_async_tutorial_runs(virtq_qsd):
    ns = run_page("tutorials/async.md", f"SOCKET = {str(virtq_qsd.socket_path)!r}\n")
    # the asyncio-only variant on the page, over the plain BlkDevice
    with BlkDevice.connect_vhost_user(virtq_qsd.socket_path) as disk:
        data = asyncio.run(ns["read_one"](disk, 8))  # type: ignore[operator]
        assert data == disk.read(8, 4096)


def test_the_inspect_how_to_matches_the_cli():
    """The flags the page shows are the command's."""
    page = (DOCS / "howto" / "inspect-a-stalled-queue.md").read_text()
    inspect = build_parser()._subparsers._group_actions[0].choices["inspect"]  # type: ignore
    options = {o for a in inspect._actions for o in a.option_strings}
    for flag in ("--queue-size", "--svg", "--offset", "--iova"):
        assert flag in page and flag in options
