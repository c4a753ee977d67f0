"""Sphinx extension for virtq's documentation: what is generated at build time, offline.

* ``reference/api/*.md`` -- one page per public module (every module whose dotted name has
  no part starting with an underscore), documenting the module and the public objects whose
  home it is: where they are defined, or for a definition in a private module, the public
  package that re-exports it.  ``tests/test_docstrings.py`` walks the same modules.
* ``_generated/split-ring.svg`` -- a real split ring (a :class:`~virtq.queue.SplitQueue`
  and the test device over one memory region) drawn by :mod:`virtq.ringview`.
* ``_generated/packed-ring.svg`` -- the packed ring format of VIRTIO 1.2 §2.8: descriptor
  ring, wrap counters, flags, the two event suppression structures.
* the ``errortree`` directive: virtq's exception hierarchy, from the classes themselves.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import shutil
from html import escape
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective

import virtq
from virtq.cli._args import plain
from virtq.errors import VirtqError
from virtq.layout import SplitLayout
from virtq.memory import AnonymousRegion
from virtq.queue import SplitQueue
from virtq.ringview import SnapshotFile, analyze, render_svg, snapshot_data
from virtq.testing import DeviceQueue

# -- the API pages ----------------------------------------------------------------------------


def public_modules() -> list[str]:
    """Every public module under ``virtq`` (the package first, then in walk order)."""
    names = ["virtq"]
    for info in pkgutil.walk_packages(virtq.__path__, "virtq."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return names


def public_names(module: Any) -> list[str]:
    exported = getattr(module, "__all__", None)
    if exported is not None:
        return list(exported)
    return [name for name, obj in vars(module).items() if not name.startswith("_")
            and getattr(obj, "__module__", None) == module.__name__]


def is_function(obj: Any) -> bool:
    """A plain function, or one wrapped by a decorator (``functools.cache``)."""
    return inspect.isfunction(inspect.unwrap(obj)) if callable(obj) else False


def homes(modules: list[str]) -> dict[str, list[tuple[str, Any]]]:
    """module -> the ``(name, object)`` pairs documented on its page."""
    public = set(modules)
    pages: dict[str, list[tuple[str, Any]]] = {m: [] for m in modules}
    placed: set[int] = set()
    data_home: dict[tuple[str, int], str] = {}
    for modname in modules:
        module = importlib.import_module(modname)
        for name in public_names(module):
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue
            if inspect.isclass(obj) or is_function(obj):
                origin = getattr(obj, "__module__", "")
                if not origin.startswith("virtq") or id(obj) in placed:
                    continue
                if origin in public:
                    home = origin
                else:  # defined in a private module: its nearest public package
                    parts = origin.split(".")
                    while ".".join(parts) not in public:
                        parts.pop()
                    home = ".".join(parts)
                    if home != modname and name not in public_names(
                            importlib.import_module(home)):
                        home = modname
                placed.add(id(obj))
                pages[home].append((name, obj))
            elif hasattr(module, "__all__"):
                # Data: on the deepest page that exports it (where it is defined).
                key = (name, id(obj))
                if key not in data_home or len(modname) > len(data_home[key]):
                    data_home[key] = modname
    # A constant is documented where its ``#:`` comment is, when that module is public.
    commented: dict[str, list[str]] = {}
    for modname in modules:
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except PycodeError:
            continue
        for (scope, name) in docs:
            if not scope:
                commented.setdefault(name, []).append(modname)
    for (name, oid), exporter in data_home.items():
        home = next((c for c in commented.get(name, []) if id(getattr(
            importlib.import_module(c), name, None)) == oid), exporter)
        pages[home].append((name, getattr(importlib.import_module(home), name)))
    return pages


def api_page(modname: str, objects: list[tuple[str, Any]], modules: list[str]) -> str:
    lines = [f"# `{modname}`", "", "```{eval-rst}", f".. automodule:: {modname}",
             "   :no-members:", ""]
    for name, obj in objects:
        target = f"{modname}.{name}"
        if inspect.isclass(obj):
            kind = "exception" if issubclass(obj, BaseException) else "class"
            lines += [f".. auto{kind}:: {target}", "   :members:", ""]
        elif is_function(obj):
            lines += [f".. autofunction:: {target}", ""]
        else:
            lines += [f".. autodata:: {target}", "   :no-value:" if len(repr(obj)) > 300
                      else "", ""]
    lines.append("```")
    module = importlib.import_module(modname)
    elsewhere = []
    for name in public_names(module):
        obj = getattr(module, name)
        if inspect.ismodule(obj) or any(o is obj for _, o in objects):
            continue
        if inspect.isclass(obj) or is_function(obj):
            elsewhere.append(f"- {{py:obj}}`{name} <{obj.__module__}.{obj.__qualname__}>`"
                             if obj.__module__ in modules else f"- `{name}`")
    if elsewhere:
        lines += ["", "Also exported here (documented where they are defined):", "",
                  *elsewhere]
    children = [m for m in modules if m.startswith(modname + ".")
                and "." not in m[len(modname) + 1 :]]
    if children:
        lines += ["", "```{toctree}", ":maxdepth: 1", "", *children, "```"]
    return "\n".join(lines) + "\n"


def write_api_pages(app: Sphinx) -> None:
    folder = Path(app.srcdir) / "reference" / "api"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    modules = public_modules()
    for modname, objects in homes(modules).items():
        (folder / f"{modname}.md").write_text(api_page(modname, objects, modules))


# -- pictures -------------------------------------------------------------------------------


def split_ring_svg() -> str:
    """A real 16-entry split ring: chains completed and not reaped, in flight, and added
    but not yet published."""
    layout = SplitLayout.compute(16, buffer_size=512)
    base = 0x1000_0000
    with AnonymousRegion(layout.nbytes) as region:
        queue: SplitQueue[str] = SplitQueue(region, layout, iova=base, event_idx=True,
                                            indirect=False)
        device = DeviceQueue(region, layout, iova=base, event_idx=True)
        try:
            def buf(slot: int, off: int, n: int) -> tuple[int, int]:
                return (base + layout.buffer(slot) + off, n)

            queue.add([buf(0, 0, 16)], [buf(0, 16, 256), buf(0, 272, 1)], "read")
            queue.add([buf(1, 0, 16), buf(1, 16, 64)], [buf(1, 80, 1)], "write")
            queue.add([buf(2, 0, 16)], [buf(2, 16, 1)], "flush")
            queue.publish()
            head, _ = device.pop()
            device.push(head, 257)  # the read completed; the driver has not reaped it
            device.pop()  # the device is working on the write
            queue.add([buf(3, 0, 16)], [buf(3, 16, 1)], "id")  # not published yet
            data = snapshot_data(queue)
            data["taken"] = "when these pages were built"
            state = analyze(SnapshotFile.from_data(data, "an example ring"))
            return render_svg(state, title="a split ring of 16 entries (VIRTIO 1.2 §2.7)")
        finally:
            device.close()
            queue.close()


def packed_ring_svg() -> str:
    """The packed ring format (VIRTIO 1.2 §2.8) in one state: 8 descriptors, the driver
    has wrapped once (Driver Ring Wrap Counter 0), the device has not (Device Ring Wrap
    Counter 1); flags of each descriptor as written by whoever wrote it last."""
    n = 8
    # Per descriptor: (who wrote it last, AVAIL bit, USED bit, what it is).
    # Round 1 (wrap counter 1): the driver made 0..7 available (AVAIL=1, USED=0); the device
    # used buffers 0..4 (one used descriptor per buffer: AVAIL=USED=1).  Round 2 (driver
    # wrap counter 0): the driver reused 0..2 (AVAIL=0, USED=1).
    cells = [
        ("driver", 0, 1, "avail (round 2)"), ("driver", 0, 1, "avail (round 2)"),
        ("driver", 0, 1, "avail (round 2)"),
        ("device", 1, 1, "used"), ("device", 1, 1, "used"),
        ("driver", 1, 0, "avail"), ("driver", 1, 0, "avail"), ("driver", 1, 0, "avail"),
    ]
    colour = {"avail": "#fdae6b", "used": "#a1d99b", "avail (round 2)": "#9ecae1"}
    cw, ch, x0, y0 = 108, 64, 40, 120
    out = []

    def text(x: float, y: float, s: str, size: int = 12, anchor: str = "start",
             weight: str = "normal", fill: str = "#222") -> None:
        out.append(f"<text x='{x}' y='{y}' font-size='{size}' font-family='DejaVu Sans, "
                   f"Helvetica, Arial, sans-serif' text-anchor='{anchor}' "
                   f"font-weight='{weight}' fill='{fill}'>{escape(s)}</text>")

    text(20, 28, "a packed ring of 8 descriptors (VIRTIO 1.2 §2.8)", 16, weight="bold")
    text(20, 50, "One ring of 16-byte descriptors (addr, len, id, flags) that both sides "
         "write: the driver makes a descriptor available, the device", 12)
    text(20, 66, "overwrites it with a used one.  Available: AVAIL = the driver's wrap counter, "
         "USED = its inverse; used: AVAIL = USED = the device's", 12)
    text(20, 82, "wrap counter (§2.8.1).  Each side polls only the next descriptor after the "
         "one it processed (§2.8.2).", 12)
    text(20, y0 - 12, "descriptor ring (descriptor area)", 13, weight="bold")
    for i, (who, a, u, what) in enumerate(cells):
        x = x0 + i * cw
        out.append(f"<rect x='{x}' y='{y0}' width='{cw - 4}' height='{ch}' "
                   f"fill='{colour[what]}' stroke='#777'/>")
        text(x + (cw - 4) / 2, y0 + 16, f"[{i}] {what.split(' ')[0]}", 11, "middle",
             "bold")
        text(x + (cw - 4) / 2, y0 + 33, f"AVAIL={a} USED={u}", 10, "middle")
        text(x + (cw - 4) / 2, y0 + 50, f"by the {who}", 10, "middle", fill="#555")

    def pointer(i: int, label: str, sub: str, colour: str, row: int) -> None:
        x = x0 + i * cw + (cw - 4) / 2
        y = y0 + ch + 6
        out.append(f"<path d='M {x} {y + 24 + 30 * row} L {x} {y}' stroke='{colour}' "
                   "stroke-width='1.5' fill='none' marker-end='url(#a)'/>")
        text(x + 4, y + 30 + 30 * row, label, 11, fill=colour, weight="bold")
        text(x + 4, y + 44 + 30 * row, sub, 10, fill=colour)

    pointer(3, "driver: next to make available", "Driver Ring Wrap Counter = 0", "#1f4e9c", 0)
    pointer(5, "device: next to read (then use)", "Device Ring Wrap Counter = 1", "#8c2d04", 1)
    y = y0 + ch + 110
    text(20, y, "Legend: orange = available in round 1 (AVAIL=1, USED=0); green = used by "
         "the device (AVAIL=USED=1); blue = available again in round 2", 11)
    text(20, y + 16, "after the driver wrapped (AVAIL=0, USED=1).  A chain takes consecutive "
         "descriptors with NEXT set on all but the last, which carries the Buffer ID", 11)
    text(20, y + 32, "(§2.8.6); the device writes one used descriptor per chain, with that "
         "id and the bytes written, then skips the rest of the chain.", 11)
    y += 64
    for k, (who, flags) in enumerate((("driver", "DESC: notify me at used descriptor 6, "
                                       "wrap 1"), ("device", "ENABLE: kick me for every "
                                                   "new available descriptor"))):
        area = "driver area" if who == "driver" else "device area"
        text(20, y + 52 * k, f"{who} event suppression ({area}, written by the {who})", 13,
             weight="bold")
        yy = y + 10 + 52 * k
        out.append(f"<rect x='40' y='{yy}' width='230' height='22' fill='#f4f4f4' "
                   "stroke='#777'/>")
        out.append(f"<rect x='270' y='{yy}' width='230' height='22' fill='#f4f4f4' "
                   "stroke='#777'/>")
        text(155, yy + 15, "le16 desc: offset (15 bits) | wrap (1)", 10, "middle")
        text(385, yy + 15, "le16 flags: ENABLE 0, DISABLE 1, DESC 2", 10, "middle")
        text(512, yy + 15, f"e.g. {flags}", 10, fill="#555")
    height = y + 110
    width = x0 + n * cw + 40
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"viewBox='0 0 {width} {height}'><defs><marker id='a' viewBox='0 0 10 10' "
            "refX='9' refY='5' markerWidth='7' markerHeight='7' orient='auto-start-reverse'>"
            "<path d='M 0 0 L 10 5 L 0 10 z' fill='#555'/></marker></defs>"
            "<rect width='100%' height='100%' fill='white'/>" + "".join(out) + "</svg>\n")


def write_pictures(app: Sphinx) -> None:
    folder = Path(app.srcdir) / "_generated"
    folder.mkdir(exist_ok=True)
    for name, draw in (("split-ring.svg", split_ring_svg), ("packed-ring.svg",
                                                           packed_ring_svg)):
        svg = draw()
        path = folder / name
        if not path.exists() or path.read_text() != svg:
            path.write_text(svg)


# -- the error tree -------------------------------------------------------------------------


class ErrorTree(SphinxDirective):
    """``{errortree}``: every exception class of virtq under ``VirtqError``, nested by
    inheritance, each with its other bases and the first line of its docstring."""

    def run(self) -> list[nodes.Node]:
        for modname in public_modules():
            importlib.import_module(modname)  # every exception class exists

        def item(cls: type) -> nodes.list_item:
            li = nodes.list_item()
            para = nodes.paragraph()
            para += nodes.literal(text=cls.__name__)
            para += nodes.Text(f" ({cls.__module__})")
            others = [b.__name__ for b in cls.__bases__[1:]
                      if not b.__module__.startswith("virtq")]
            if others:
                para += nodes.Text(f"; also {', '.join(others)}")
            doc = plain((inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " "))
            if doc:
                para += nodes.Text(f": {doc}")
            li += para
            subs = sorted((s for s in cls.__subclasses__()
                           if s.__module__.startswith("virtq")), key=lambda c: c.__name__)
            if subs:
                bl = nodes.bullet_list()
                for s in subs:
                    if cls in s.__bases__[:1]:
                        bl += item(s)
                li += bl
            return li

        root = nodes.bullet_list()
        root += item(VirtqError)
        return [root]


def drop_type_docstrings(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                         lines: list[str]) -> None:
    """A constant without a ``#:`` comment would show its type's docstring (``int([x]) ->
    integer ...``): show nothing instead."""
    if what in ("data", "attribute") and lines and not inspect.isclass(obj):
        mine = " ".join(" ".join(lines).split())
        doc = type(obj).__doc__
        theirs = " ".join(doc.split()) if isinstance(doc, str) else ""
        if mine == theirs:
            lines[:] = []


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", drop_type_docstrings)
    app.connect("builder-inited", write_api_pages)
    app.connect("builder-inited", write_pictures)
    app.add_directive("errortree", ErrorTree)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
