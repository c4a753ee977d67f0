"""Pictures of a :class:`~virtq.ringview.model.RingState`: text for a terminal, SVG for a
page.

Both show the same things: the indices (``avail.idx``, ``used.idx``, the driver's reap
position when known) and the event words; the descriptor table, the available ring and
the used ring as strips of cells coloured by what each entry belongs to (a chain added but
not published, in flight at the device, completed but not reaped); every chain with its
descriptors; and everything inconsistent.  The SVG is self-contained (no script, no
external font or style sheet).
"""

from __future__ import annotations

import itertools
from html import escape

from virtq.layout import distance
from virtq.ringview.model import (
    ADDED,
    COMPLETED,
    IN_FLIGHT,
    Chain,
    Descriptor,
    RingState,
    flag_text,
)

#: One character per ring entry in the text strips.
_MARK = {ADDED: "+", IN_FLIGHT: "#", COMPLETED: "*"}
_IDLE = "."
_COLOURS = {ADDED: "#9ecae1", IN_FLIGHT: "#fdae6b", COMPLETED: "#a1d99b"}
_IDLE_COLOUR = "#f4f4f4"
_BAD_COLOUR = "#fb6a4a"
_DESCRIBE = {
    ADDED: "added by the driver, avail.idx not yet stored",
    IN_FLIGHT: "published; the device has not used them yet",
    COMPLETED: "in the used ring; the driver has not reaped them",
}


def _entry_status(state: RingState) -> tuple[dict[int, str], dict[int, str], dict[int, str]]:
    """Status of each descriptor index, avail slot and used slot (absent: idle)."""
    desc: dict[int, str] = {}
    avail: dict[int, str] = {}
    used: dict[int, str] = {}
    n = state.size
    for chain in state.chains:
        for index in chain.ring_descriptors:
            desc.setdefault(index, chain.status)
        if chain.avail_pos is not None:
            avail[chain.avail_pos % n] = chain.status
        if chain.used_pos is not None:
            used[chain.used_pos % n] = chain.status
    return desc, avail, used


def _driver_line(state: RingState) -> str:
    d = state.driver
    if d is None:
        return ("live ring: what the driver has reaped is its own state, not in shared "
                "memory (a snapshot has it)")
    line = (f"state {d.get('state')}, added up to {int(d['next_avail']) & 0xFFFF:#06x}, "
            f"published up to {int(d['published']) & 0xFFFF:#06x}, reaped up to "
            f"{int(d['last_used']) & 0xFFFF:#06x}, event_idx {d.get('event_idx')}")
    if d.get("broken"):
        line += f"; broken: {d['broken']}"
    return line


def _desc_line(d: Descriptor) -> str:
    where = f"desc[{d.index}]" if d.table is None else f"  ind[{d.index}]"
    nxt = f" next {d.next}" if d.flags & 1 else ""
    return (f"{where:<10} addr {d.addr:#014x}  len {d.len:<7} "
            f"{'W' if d.writable else 'R'} {flag_text(d.flags)}{nxt}")


def _chain_title(chain: Chain, n: int) -> str:
    parts = [f"head {chain.head}"]
    if chain.avail_pos is not None:
        parts.append(f"avail[{chain.avail_pos % n}] (position {chain.avail_pos:#06x})")
    if chain.used_pos is not None:
        parts.append(f"used[{chain.used_pos % n}] len {chain.used_len}")
    return ", ".join(parts)


def _strip(marks: dict[int, str], n: int, width: int = 64) -> list[str]:
    rows = []
    for start in range(0, n, width):
        end = min(n, start + width)
        cells = "".join(_MARK.get(marks.get(i, ""), _IDLE) for i in range(start, end))
        rows.append(f"{start:>5} {cells}")
    return rows


def _pointer(label_at: dict[str, int], n: int, width: int = 64) -> list[str]:
    """Caret lines under a strip: each label's ring slot (label -> slot)."""
    lines = []
    for label, slot in label_at.items():
        row, col = divmod(slot, width)
        where = f"{row * width:>5}" if n > width else " " * 5
        lines.append(f"{where} {' ' * col}^ {label}")
    return lines


def render_text(state: RingState, *, max_chains: int = 16) -> str:
    """The ring as lines of text for a terminal (at most ``max_chains`` chains of each
    kind are listed with their descriptors; the rest are counted)."""
    n = state.size
    desc_st, avail_st, used_st = _entry_status(state)
    out = [f"split ring of {n} entries: {state.source}",
           f"  driver  {_driver_line(state)}",
           f"  avail   idx {state.avail_idx:#06x}  flags {state.avail_flags:#x}  "
           f"used_event {state.used_event:#06x}",
           f"  used    idx {state.used_idx:#06x}  flags {state.used_flags:#x}  "
           f"avail_event {state.avail_event:#06x}",
           f"          {state.in_flight} chain(s) published and not used "
           "(avail.idx - used.idx)", ""]
    legend = "  ".join(f"{_MARK[s]} {s}" for s in (ADDED, IN_FLIGHT, COMPLETED))
    out.append(f"  legend: {legend}  {_IDLE} idle")
    out.append("  descriptor table")
    out += _strip(desc_st, n)
    out.append("  available ring (driver area)")
    out += _strip(avail_st, n)
    out += _pointer({"avail.idx": state.avail_idx % n}, n)
    out.append("  used ring (device area)")
    out += _strip(used_st, n)
    pointers = {"used.idx": state.used_idx % n}
    if state.last_used is not None:
        pointers["driver's last reap"] = state.last_used % n
    out += _pointer(pointers, n)
    for status in (ADDED, IN_FLIGHT, COMPLETED):
        chains = state.by_status(status)
        if status != IN_FLIGHT and not chains:
            continue
        out += ["", f"  {status} ({len(chains)}): {_DESCRIBE[status]}"]
        for chain in chains[:max_chains]:
            out.append(f"    {_chain_title(chain, n)}")
            out += [f"      {_desc_line(d)}" for d in chain.descriptors]
            if chain.unread_table:
                out.append("      (indirect table not readable here: give --iova)")
            if chain.problem:
                out.append(f"      !! {chain.problem}")
        if len(chains) > max_chains:
            out.append(f"    ... and {len(chains) - max_chains} more")
    if state.driver is None:
        out += ["", "  completed, not reaped: unknown for a live ring (the driver's reap "
                "position is private); recent used elements:"]
        for k in range(min(4, n, state.used_idx)):
            pos = (state.used_idx - 1 - k) & 0xFFFF
            head, length = state.used_ring[pos % n]
            out.append(f"    used[{pos % n}] (position {pos:#06x}) id {head} len {length}")
    out.append("")
    if state.problems:
        out.append(f"  INCONSISTENT: {len(state.problems)} problem(s)")
        out += [f"    - {p}" for p in state.problems]
    else:
        out.append("  consistent: nothing impossible found")
    return "\n".join(out) + "\n"


# -- SVG --------------------------------------------------------------------------------------

_CELL = 26
_GAP = 2
_LEFT = 20
#: Where the strips of cells start (their labels are on the left).
_STRIP = 230
_FONT = "font-family='DejaVu Sans Mono, Menlo, Consolas, monospace'"


class _Svg:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.height = 0
        self.width = 0

    def text(self, x: float, y: float, s: str, *, size: int = 12, fill: str = "#222",
             anchor: str = "start", weight: str = "normal") -> None:
        self.items.append(f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' {_FONT} "
                          f"fill='{fill}' text-anchor='{anchor}' font-weight='{weight}'>"
                          f"{escape(s)}</text>")
        self.width = max(self.width, int(x + (len(s) * size * 0.62 if anchor == "start"
                                              else 0)) + 10)

    def rect(self, x: float, y: float, w: float, h: float, fill: str, *,
             stroke: str = "#888", title: str = "") -> None:
        tip = f"<title>{escape(title)}</title>" if title else ""
        self.items.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{w:.1f}' height='{h:.1f}' "
                          f"fill='{fill}' stroke='{stroke}' stroke-width='1'>{tip}</rect>")
        self.width = max(self.width, int(x + w) + 10)

    def path(self, d: str, *, stroke: str = "#555", marker: bool = True,
             dash: bool = False) -> None:
        end = " marker-end='url(#arrow)'" if marker else ""
        dashes = " stroke-dasharray='4 3'" if dash else ""
        self.items.append(f"<path d='{d}' fill='none' stroke='{stroke}' stroke-width='1.2'"
                          f"{end}{dashes}/>")

    def finish(self) -> str:
        head = (f"<svg xmlns='http://www.w3.org/2000/svg' width='{self.width}' "
                f"height='{self.height}' xml:space='preserve' "
                f"viewBox='0 0 {self.width} {self.height}'>"
                "<defs><marker id='arrow' viewBox='0 0 10 10' refX='9' refY='5' "
                "markerWidth='7' markerHeight='7' orient='auto-start-reverse'>"
                "<path d='M 0 0 L 10 5 L 0 10 z' fill='#555'/></marker></defs>"
                f"<rect width='100%' height='100%' fill='white'/>")
        return head + "".join(self.items) + "</svg>\n"


def _cells(svg: _Svg, y: float, n: int, cols: int, label: tuple[str, str],
           content: list[str], colours: dict[int, str], titles: list[str]
           ) -> tuple[float, dict[int, tuple[float, float]]]:
    """A strip of ``n`` cells from ``y`` in rows of ``cols``, its two-line ``label`` on the
    left; returns the y below it and each cell's centre."""
    svg.text(_LEFT, y + 11, label[0], size=12, weight="bold")
    svg.text(_LEFT, y + 25, label[1], size=10, fill="#666")
    centres = {}
    for i in range(n):
        row, col = divmod(i, cols)
        x = _STRIP + col * (_CELL + _GAP)
        cy = y + row * (_CELL + 18)
        if col == 0:
            svg.text(_STRIP - 6, cy + 17, str(i), size=9, fill="#888", anchor="end")
        svg.rect(x, cy, _CELL, _CELL, colours.get(i, _IDLE_COLOUR), title=titles[i])
        svg.text(x + _CELL / 2, cy + 17, content[i], size=10 if len(content[i]) < 4 else 8,
                 anchor="middle")
        centres[i] = (x + _CELL / 2, cy + _CELL / 2)
    rows = -(-n // cols)
    return y + rows * (_CELL + 18), centres


def _marker(svg: _Svg, centre: tuple[float, float], label: str, colour: str,
            level: int) -> None:
    x, y = centre
    top = y + _CELL / 2 + 2
    svg.path(f"M {x:.1f} {top + 10 + 11 * level:.1f} L {x:.1f} {top + 1:.1f}", stroke=colour)
    svg.text(x + 3, top + 12 + 11 * level, label, size=9, fill=colour)


def render_svg(state: RingState, *, title: str | None = None, max_chains: int = 12) -> str:
    """The ring as one self-contained SVG image (see the module's docstring)."""
    n = state.size
    cols = min(n, 32)
    svg = _Svg()
    desc_st, avail_st, used_st = _entry_status(state)
    y = 24.0
    svg.text(_LEFT, y, title or f"split ring of {n} entries", size=15, weight="bold")
    y += 18
    svg.text(_LEFT, y, state.source, size=10, fill="#555")
    y += 16
    svg.text(_LEFT, y, f"avail.idx {state.avail_idx:#06x}   used.idx {state.used_idx:#06x}   "
             f"in flight (avail.idx - used.idx) {state.in_flight}   used_event "
             f"{state.used_event:#06x}   avail_event {state.avail_event:#06x}", size=11)
    y += 15
    svg.text(_LEFT, y, _driver_line(state), size=10, fill="#555")
    y += 14
    x = float(_LEFT)
    for status in (ADDED, IN_FLIGHT, COMPLETED):
        svg.rect(x, y, 12, 12, _COLOURS[status])
        svg.text(x + 16, y + 10, status, size=10)
        x += 30 + len(status) * 6.4
    y += 26
    desc_text = [str(d.next) if d.flags & 1 and i in desc_st else "" for i, d in
                 enumerate(state.table)]
    desc_titles = [f"desc[{d.index}] addr {d.addr:#x} len {d.len} flags {flag_text(d.flags)}"
                   f" next {d.next}" for d in state.table]
    y, desc_xy = _cells(svg, y, n, cols, ("descriptor table", "desc area; cells: next"),
                        desc_text, {i: _COLOURS[s] for i, s in desc_st.items()}, desc_titles)
    y += 30
    avail_text = [str(h) if i in avail_st else "" for i, h in enumerate(state.avail_ring)]
    avail_titles = [f"avail.ring[{i}] = head {h}" for i, h in enumerate(state.avail_ring)]
    y, avail_xy = _cells(svg, y, n, cols, ("available ring", "driver area; cells: heads"),
                         avail_text, {i: _COLOURS[s] for i, s in avail_st.items()},
                         avail_titles)
    _marker(svg, avail_xy[state.avail_idx % n], "avail.idx", "#1f4e9c", 0)
    y += 16
    used_text = [str(e[0]) if i in used_st else "" for i, e in enumerate(state.used_ring)]
    used_titles = [f"used.ring[{i}] = id {e[0]} len {e[1]}" for i, e in
                   enumerate(state.used_ring)]
    y, used_xy = _cells(svg, y, n, cols, ("used ring", "device area; cells: ids"),
                        used_text, {i: _COLOURS[s] for i, s in used_st.items()}, used_titles)
    _marker(svg, used_xy[state.used_idx % n], "used.idx", "#8c2d04", 0)
    if state.last_used is not None:
        _marker(svg, used_xy[state.last_used % n], "driver's last reap", "#2b7a0b", 1)
    y += 22
    if n <= 32:
        # avail entry -> head descriptor -> next descriptors: the chains drawn on the rings.
        for chain in state.chains:
            if chain.head >= n:
                continue
            hx, hy = desc_xy[chain.head]
            if chain.avail_pos is not None:
                ax, ay = avail_xy[chain.avail_pos % n]
                svg.path(f"M {ax:.1f} {ay - _CELL / 2:.1f} C {ax:.1f} {ay - 40:.1f} "
                         f"{hx:.1f} {hy + 40:.1f} {hx:.1f} {hy + _CELL / 2 + 1:.1f}",
                         stroke="#777", dash=True)
            ring = [d for d in chain.descriptors if d.table is None]
            for a, b in itertools.pairwise(ring):
                (x1, y1), (x2, y2) = desc_xy[a.index], desc_xy[b.index]
                svg.path(f"M {x1:.1f} {y1 - _CELL / 2:.1f} C {x1:.1f} {y1 - 30:.1f} "
                         f"{x2:.1f} {y2 - 30:.1f} {x2:.1f} {y2 - _CELL / 2 - 1:.1f}")
    for status in (ADDED, IN_FLIGHT, COMPLETED):
        chains = state.by_status(status)
        if not chains:
            continue
        y += 8
        svg.text(_LEFT, y, f"{status} ({len(chains)}): {_DESCRIBE[status]}", size=12,
                 weight="bold", fill="#333")
        y += 16
        for chain in chains[:max_chains]:
            svg.rect(_LEFT, y - 10, 10, 10, _COLOURS[status], stroke="none")
            svg.text(_LEFT + 16, y, _chain_title(chain, n), size=11)
            y += 14
            for d in chain.descriptors:
                svg.text(_LEFT + 30, y, _desc_line(d), size=10, fill="#444")
                y += 13
            if chain.unread_table:
                svg.text(_LEFT + 30, y, "(indirect table not readable here)", size=10,
                         fill="#888")
                y += 13
            if chain.problem:
                svg.text(_LEFT + 30, y, chain.problem, size=10, fill=_BAD_COLOUR)
                y += 13
        if len(chains) > max_chains:
            svg.text(_LEFT + 16, y, f"... and {len(chains) - max_chains} more", size=11)
            y += 14
    y += 10
    if state.problems:
        svg.text(_LEFT, y, f"INCONSISTENT: {len(state.problems)} problem(s)", size=13,
                 weight="bold", fill=_BAD_COLOUR)
        y += 16
        for p in state.problems:
            svg.text(_LEFT + 10, y, f"- {p}", size=10, fill=_BAD_COLOUR)
            y += 14
    else:
        svg.text(_LEFT, y, "consistent: nothing impossible found", size=12, fill="#2b7a0b")
        y += 14
    svg.height = int(y + 12)
    return svg.finish()


def used_waiting(state: RingState) -> int | None:
    """Completed chains the driver has not reaped (None when unknown: a live ring)."""
    if state.last_used is None:
        return None
    return distance(state.last_used, state.used_idx)


__all__ = ["render_svg", "render_text", "used_waiting"]
