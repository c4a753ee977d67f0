"""``--plot FILE.png`` of the benchmarks: the table they print, as grouped bar charts.

matplotlib is an optional dependency (``pip install 'virtq[plot]'``); it is imported only
when a plot is asked for, and only its object-oriented API is used (no pyplot, no global
backend state), so plotting works without a display.
"""

from __future__ import annotations

import errno
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from virtq.errors import VirtqError, VirtqOSError


@dataclass
class Panel:
    """One chart: ``groups`` along the x axis, one bar per group for each of ``series``
    (name -> one value per group; None leaves a gap), ``ylabel`` on the y axis."""

    ylabel: str
    groups: list[str]
    series: dict[str, list[float | None]] = field(default_factory=dict)
    #: Whether smaller is better (said in the panel's title).
    lower_is_better: bool = False


def require() -> Any:
    """The ``matplotlib.figure`` module.  Raises :class:`~virtq.errors.VirtqError` naming
    the extra to install when matplotlib is missing."""
    try:
        importlib.import_module("matplotlib")
        return importlib.import_module("matplotlib.figure")
    except ImportError as exc:
        raise VirtqError("--plot needs matplotlib: pip install 'virtq[plot]'") from exc


def bar_charts(path: str | os.PathLike[str], title: str, panels: Sequence[Panel]) -> None:
    """Draw ``panels`` side by side into the PNG (or SVG, PDF: by the suffix) ``path``.
    Raises :class:`~virtq.errors.VirtqError` without matplotlib and
    :class:`~virtq.errors.VirtqOSError` when the file cannot be written."""
    figure_mod = require()
    fig = figure_mod.Figure(figsize=(5.2 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        count = max(1, len(panel.series))
        width = 0.8 / count
        for k, (name, values) in enumerate(panel.series.items()):
            xs = [g + (k - (count - 1) / 2) * width for g in range(len(panel.groups))]
            pairs = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
            bars = ax.bar([x for x, _ in pairs], [v for _, v in pairs], width, label=name)
            ax.bar_label(bars, fmt=_short, fontsize=7, padding=1)
        ax.set_xticks(range(len(panel.groups)), panel.groups)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(f"{panel.ylabel} ({'lower' if panel.lower_is_better else 'higher'} is "
                     "better)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9, wrap=True)
    try:
        fig.savefig(os.fspath(path), dpi=110)
    except OSError as exc:
        raise VirtqOSError(exc.errno or errno.EIO,
                           f"cannot write {os.fspath(path)}: {exc.strerror or exc}") from None


def _short(value: float) -> str:
    """A bar's label: 3 significant digits, k/M for large values."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


__all__ = ["Panel", "bar_charts", "require"]
