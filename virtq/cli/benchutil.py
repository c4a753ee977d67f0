"""What every benchmark shares: a progress bar that only a terminal sees, CPU time, the host
line of a table's header, Markdown tables, and machine-readable results.

The benchmarks (``virtq bench ...`` and the scripts in ``benchmarks/``) and the reference
front-ends they compare with import these, so that a reference needs nothing private of
virtq.  This module uses the standard library, ``psutil`` and :mod:`virtq.errors` only:
``benchmarks/compare.py`` runs the working tree's copy of it against an older virtq too.

A results file (``--json PATH`` of each benchmark) is::

    {"bench": "ring", "title": "...", "python": "3.11.7", "virtq": "/path/virtq/__init__.py",
     "values": [{"row": "chain 1, batch 32, ...", "metric": "virtq ns/chain", "value": 391.0,
                 "better": "lower"}, ...]}

``better`` is ``"lower"``, ``"higher"`` or ``null`` (a value to show, not to judge).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import psutil

from virtq.errors import ArgumentError, VirtqOSError

__all__ = [
    "ProgressBar",
    "Results",
    "cpu_model",
    "cpu_seconds",
    "host_line",
    "io_stats",
    "markdown_table",
    "read_results",
]

#: How a metric improves: a smaller value (time, CPU) or a larger one (rates).
BETTER = ("lower", "higher")


class ProgressBar:
    """``label [#####.....]  50%`` redrawn in place on ``stream`` (default ``sys.stderr``)
    -- only when that stream is a terminal.  Piped or captured output (CI, ``tee``, a
    results file) gets nothing, not one line per redraw.  Callers decide how often to call
    :meth:`show`; it draws every time it is called."""

    WIDTH = 30

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        try:
            self.enabled = self.stream.isatty()
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            self.enabled = False

    def show(self, fraction: float) -> None:
        """Redraw at ``fraction`` (0..1, clamped) of the way."""
        if not self.enabled:
            return
        frac = max(0.0, min(1.0, fraction))
        filled = int(self.WIDTH * frac)
        self.stream.write(f"\r{self.label:<28} [{'#' * filled}{'.' * (self.WIDTH - filled)}]"
                          f" {frac:4.0%}")
        self.stream.flush()

    def close(self) -> None:
        """Draw 100 % and end the line (nothing when not on a terminal)."""
        if not self.enabled:
            return
        self.show(1.0)
        self.stream.write("\n")
        self.stream.flush()


def cpu_seconds(proc: psutil.Process | None = None) -> float:
    """User + system CPU time of ``proc`` (default: this process), in seconds.  Raises
    ``psutil.NoSuchProcess`` if it has exited."""
    t = (proc or psutil.Process()).cpu_times()
    return float(t.user + t.system)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_line() -> str:
    """``<cpu model>, <n> CPUs, Python <version>``: what a table's header says about the
    host."""
    return f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]],
                   align: str | None = None) -> str:
    """A Markdown table: ``header`` cells, then one line per row (cells through ``str``).
    ``align`` has one letter per column, ``l`` or ``r`` (default: all ``l``).  Raises
    :class:`~virtq.errors.ArgumentError` if a row or ``align`` has the wrong number of
    cells."""
    n = len(header)
    if align is None:
        align = "l" * n
    if len(align) != n or set(align) - {"l", "r"}:
        raise ArgumentError("align", align, f"one of 'l'/'r' per column ({n})")
    for row in rows:
        if len(row) != n:
            raise ArgumentError("rows", list(row), f"has {len(row)} cells, the header {n}")
    lines = ["| " + " | ".join(header) + " |",
             "|" + "".join("---|" if a == "l" else "---:|" for a in align)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Results:
    """The numbers behind a benchmark's table, for ``--json`` (and ``benchmarks/
    compare.py``): one ``value`` per (row, metric)."""

    bench: str
    title: str = ""
    values: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: str, metric: str, value: float, better: str | None) -> None:
        """Record ``value`` of ``metric`` in ``row``; ``better`` is ``"lower"``,
        ``"higher"`` or None.  Raises :class:`~virtq.errors.ArgumentError` for another
        ``better``."""
        if better is not None and better not in BETTER:
            raise ArgumentError("better", better, "'lower', 'higher' or None")
        self.values.append({"row": row, "metric": metric, "value": float(value),
                            "better": better})

    def to_dict(self) -> dict[str, Any]:
        """The results as JSON-ready data (with the Python version and where virtq was
        imported from)."""
        # Which virtq ran: the package this process imported (benchmarks/compare.py checks
        # it is the tree it asked for).
        virtq = sys.modules.get("virtq")
        return {"bench": self.bench, "title": self.title,
                "python": platform.python_version(),
                "virtq": getattr(virtq, "__file__", None), "values": self.values}

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON to ``path``.  Raises
        :class:`~virtq.errors.VirtqOSError` (with the errno) if it cannot."""
        try:
            Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        except OSError as err:
            raise VirtqOSError(err.errno or 0, f"{path}: {err.strerror or err}") from err


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A results file written by :meth:`Results.write`.  Raises
    :class:`~virtq.errors.VirtqOSError` if it cannot be read,
    :class:`~virtq.errors.ArgumentError` if it is not a results file."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise VirtqOSError(err.errno or 0, f"{path}: {err.strerror or err}") from err
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ArgumentError("path", str(path), f"a benchmark results file ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("values"), list):
        raise ArgumentError("path", str(path), "a benchmark results file (no values)")
    return data


def io_stats(latencies_ns: list[int], done: int, elapsed: float, cpu: float,
             backend_cpu: float | None = None) -> dict[str, float]:
    """One I/O benchmark row: ``done`` requests in ``elapsed`` seconds with per-request
    ``latencies_ns`` (sorted here, in place), ``cpu`` seconds of the front-end's CPU and
    ``backend_cpu`` of the back-end's (None: not measured).  Keys: ``iops``, ``p50`` and
    ``p99`` (µs), ``cpu_us`` (per request), ``cpu_util`` (of one CPU), and with
    ``backend_cpu`` ``backend_cpu_us`` and ``backend_util``.  Raises
    :class:`~virtq.errors.ArgumentError` when nothing completed."""
    if done <= 0 or not latencies_ns or elapsed <= 0:
        raise ArgumentError("done", done, f"no requests completed in {elapsed:.3f} s: "
                            "nothing to report")
    lat = latencies_ns
    lat.sort()
    row = {
        "iops": done / elapsed,
        "p50": lat[len(lat) // 2] / 1000,
        "p99": lat[int(len(lat) * 0.99)] / 1000,
        "cpu_us": cpu / done * 1e6,
        "cpu_util": cpu / elapsed,
    }
    if backend_cpu is not None:
        row["backend_cpu_us"] = backend_cpu / done * 1e6
        row["backend_util"] = backend_cpu / elapsed
    return row
