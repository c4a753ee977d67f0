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


# Who may know what a descriptor looks like.  Devices and transports see a ring only through
# the driver-queue interface (virtq.queue.interface); the queue alone writes descriptor
# bytes.  virtq.abi defines them, virtq.testing holds device-side peers and hostile drivers
# (which read or forge descriptors on purpose), virtq.check is the hostile driver's home.
DESCRIPTOR_AWARE = {"virtq.queue", "virtq.abi", "virtq.testing", "virtq.check"}
DESCRIPTOR_NAMES = ("VIRTQ_DESC_F_", "VirtqDesc", "VirtqPackedDesc")
# struct virtq_desc (le64 addr, le32 len, le16 flags, le16 next) and the packed ring's
# (le64 addr, le32 len, le16 id, le16 flags) share this struct format.
DESCRIPTOR_FORMATS = ("QIHH",)


def descriptor_knowledge(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        name = None
        if isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.alias):
            name = node.name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if any(f in node.value.replace("<", "").replace(" ", "") for f in
                   DESCRIPTOR_FORMATS) and len(node.value) <= 8:
                found.append(f"line {node.lineno}: descriptor struct format {node.value!r}")
            continue
        if name and name.startswith(DESCRIPTOR_NAMES):
            found.append(f"line {getattr(node, 'lineno', '?')}: {name}")
    return found


def test_only_the_queue_writes_descriptors():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        if layer_of(module) in DESCRIPTOR_AWARE:
            continue
        bad += [f"{module} {what}" for what in descriptor_knowledge(path)]
    assert not bad, "\n".join(bad)


def test_the_descriptor_check_can_fail(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import struct\nfrom virtq.abi import VIRTQ_DESC_F_NEXT\n"
                      "PACK = struct.Struct('<QIHH')\nflags = abi.VIRTQ_DESC_F_WRITE\n")
    assert len(descriptor_knowledge(sample)) == 3
