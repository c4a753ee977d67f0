"""The code in the docs runs: docs/writing-a-driver.md's complete driver is executed."""

from __future__ import annotations

import re
from pathlib import Path

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
