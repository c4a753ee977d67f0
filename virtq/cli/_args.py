"""Argument types for the command line: each parses one value and refuses a bad one with
``argparse.ArgumentTypeError``, which argparse prints as a one-line ``error:`` after the
usage, exiting 2 -- never a traceback."""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable

from virtq.layout import MAX_SPLIT_QUEUE_SIZE, is_power_of_two

Parse = Callable[[str], int]


def parse_int(text: str) -> int:
    """Decimal, or with a 0x/0o/0b prefix; leading zeros are decimal ("08" is 8)."""
    try:
        return int(text, 0)
    except ValueError:
        pass
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def int_in(lo: int, hi: int | None = None, *, power_of_two: bool = False) -> Parse:
    """An int in ``lo..hi`` (no upper bound if ``hi`` is None), a power of two if asked."""
    def parse(text: str) -> int:
        value = parse_int(text)
        span = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text}: must be {span}")
        if power_of_two and not is_power_of_two(value):
            raise argparse.ArgumentTypeError(f"{text}: must be a power of two {span}")
        return value

    parse.__name__ = "int"  # argparse names the type in some messages
    return parse


#: A split ring's size: a power of two, 1..32768 (VIRTIO 1.2 §2.7).
queue_size = int_in(1, MAX_SPLIT_QUEUE_SIZE, power_of_two=True)
#: A 16-bit ring index (avail.idx / used.idx, VIRTIO 1.2 §2.7.6).
u16 = int_in(0, 0xFFFF)
positive_int = int_in(1)
nonnegative_int = int_in(0)


def seconds(*, allow_zero: bool = False) -> Callable[[str], float]:
    """A finite number of seconds, > 0 (or >= 0 with ``allow_zero``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(
                f"{text}: must be a {'non-negative' if allow_zero else 'positive'} finite "
                "number of seconds")
        return value

    parse.__name__ = "float"
    return parse


def int_list(item: Parse) -> Callable[[str], list[int]]:
    """Comma-separated ints, each checked by ``item``."""
    def parse(text: str) -> list[int]:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list")
        return [item(p) for p in parts]

    parse.__name__ = "list"
    return parse


def directory(text: str) -> str:
    """An existing directory."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|ref|doc):`~?([^`<]*?)(?: <[^>]*>)?`")


def plain(text: str) -> str:
    """``text`` (a docstring) without reStructuredText markup, for ``--help``: roles
    (``:class:`~a.B``` -> ``B``, the last part when the target starts with ``~``),
    double and single backquotes, and ``::`` at the end of a line (-> ``:``)."""
    def role(m: re.Match[str]) -> str:
        name = m.group(1)
        return name.rsplit(".", 1)[-1] if m.group(0).split("`", 1)[1].startswith("~") \
            else name

    text = _ROLE.sub(role, text)
    text = text.replace("``", "")
    text = re.sub(r"`([^`]+)`", r"\1", text)
    return re.sub(r"::$", ":", text, flags=re.M)


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every subcommand's parser under it, at any depth."""
    found = [parser]
    for action in parser._actions:  # argparse has no public accessor
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                found += _all_parsers(sub)
    return found


def parse(parser: argparse.ArgumentParser, argv: list[str] | None,
          *subparsers: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser.parse_args(argv)``, then a check argparse itself misses: Python 3.11's
    argparse drops a ``--`` value (``--count=--``) and stores an empty list without calling
    the option's type or checking its choices, which would reach the command as [] (no
    type here returns an empty list)."""
    args = parser.parse_args(argv)
    for p in (*_all_parsers(parser), *subparsers):
        for action in p._actions:  # argparse has no public accessor
            value = getattr(args, action.dest, None)
            if action.nargs is None and value == [] and value is not action.default:
                p.error(f"argument {'/'.join(action.option_strings) or action.dest}: "
                        "expected one value")
    return args
