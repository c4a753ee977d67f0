"""The layering rule, enforced on the source: a lower layer never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "virtq"

# What each layer may import from virtq (besides itself).
LEAF = {"virtq.errors", "virtq.types"}
ALLOWED = {
    "virtq.errors": set(),
    "virtq.types": set(),
    "virtq.layout": LEAF,
    "virtq.abi": LEAF,
    "virtq._sys": LEAF,
    "virtq.memory": LEAF | {"virtq.layout", "virtq.abi", "virtq._sys"},
    "virtq.iova": LEAF | {"virtq.layout", "virtq.abi", "virtq._sys"},
    "virtq.queue": LEAF | {"virtq.layout", "virtq.abi", "virtq._sys", "virtq.memory",
                           "virtq.iova"},
    "virtq.transport": LEAF | {"virtq.layout", "virtq.abi", "virtq._sys", "virtq.memory",
                               "virtq.iova", "virtq.queue"},
    "virtq.testing": LEAF | {"virtq.layout", "virtq.abi", "virtq._sys", "virtq.memory",
                             "virtq.iova", "virtq.queue", "virtq.transport", "virtq.devices"},
    "virtq.devices": LEAF | {"virtq.layout", "virtq.abi", "virtq._sys", "virtq.memory",
                             "virtq.iova", "virtq.queue", "virtq.transport"},
    # The back-end tester (virtq check / virtq fuzz) drives back-ends with the hostile
    # driver of virtq.testing, below the CLI.
    "virtq.check": LEAF | {"virtq.layout", "virtq.abi", "virtq._sys", "virtq.memory",
                           "virtq.iova", "virtq.queue", "virtq.transport", "virtq.devices",
                           "virtq.testing"},
    # The CLI (with the benchmarks behind ``virtq bench``) sits above every layer.
    "virtq.cli": LEAF | {"virtq.layout", "virtq.abi", "virtq._sys", "virtq.memory",
                         "virtq.iova", "virtq.queue", "virtq.transport", "virtq.devices",
                         "virtq.testing", "virtq.check"},
}


# Entry points loaded by name from outside the library (pytest loads its plugin by
# module path), which may use a layer above their package.
ENTRY_POINTS = {"virtq.testing.pytest_plugin": {"virtq.check"}}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def virtq_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("virtq")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("virtq"):
            found.add(node.module)
    return found


def test_layers_import_only_downwards():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        layer = layer_of(module)
        if layer not in ALLOWED:
            continue  # the package root re-exports
        for imported in virtq_imports(path):
            target = layer_of(imported)
            if target != layer and target not in ALLOWED[layer] | ENTRY_POINTS.get(module, set()):
                bad.append(f"{module} imports {imported}")
    assert not bad, "\n".join(bad)


def test_every_layer_is_checked():
    layers = {p.name.removesuffix(".py") for p in PKG.iterdir()
              if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    layers -= {"__init__", "__main__", "__pycache__"}
    assert {f"virtq.{name}" for name in layers} <= set(ALLOWED)
