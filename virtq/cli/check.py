"""``virtq check``: run the conformance catalogue against a vhost-user back-end.

Exit status: 0 when every MUST check passed (or did not apply), 1 when a MUST check failed,
2 when the tool could not run (bad arguments, no back-end, a MUST check that errored).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

from virtq.check import (
    CATALOGUE,
    DEVICES,
    Backend,
    BackendStartError,
    CheckOptions,
    CheckResult,
    CommandBackend,
    Outcome,
    Report,
    SocketBackend,
    run_checks,
    select_checks,
)
from virtq.errors import ArgumentError

T = TypeVar("T")

_COLOURS = {Outcome.PASS: "32", Outcome.FAIL: "31;1", Outcome.SKIP: "2", Outcome.ERROR: "33;1"}


def use_colour(choice: str, stream: IO[str]) -> bool:
    """Whether to colour the report: ``always``, ``never``, or ``auto`` (a terminal, without
    ``NO_COLOR``, not ``TERM=dumb``)."""
    if choice == "always":
        return True
    if choice == "never":
        return False
    return stream.isatty() and os.environ.get("NO_COLOR") is None and \
        os.environ.get("TERM") != "dumb"


def paint(text: str, code: str, colour: bool) -> str:
    """``text`` in the ANSI colour ``code`` when ``colour``, else as it is."""
    return f"\033[{code}m{text}\033[0m" if colour else text


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``virtq check`` and ``virtq fuzz`` share: the socket or ``--backend-cmd``,
    ``--device``, ``--color``."""
    p.add_argument("socket", nargs="?", help="a back-end already listening on this socket")
    p.add_argument("--backend-cmd", metavar="CMD",
                   help="start the back-end with CMD ({socket} is replaced by a fresh path); "
                        "it is restarted when needed and stopped by pid at the end")
    p.add_argument("--device", required=True, choices=DEVICES)
    p.add_argument("--color", "--colour", choices=["auto", "always", "never"],
                   default="auto", dest="color")


def backend_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Backend:
    """The back-end the arguments name: a :class:`~virtq.check.CommandBackend` (started here) or
    a :class:`~virtq.check.SocketBackend`.  Exits 2 through ``parser`` unless exactly one of them
    is given or for a bad command; raises :class:`~virtq.check.BackendStartError` when the
    command cannot start."""
    if bool(args.socket) == bool(args.backend_cmd):
        parser.error("give a SOCKET or --backend-cmd (one of them)")
    if args.backend_cmd:
        try:
            backend = CommandBackend(args.backend_cmd)
            try:
                return backend.start()
            except BaseException:
                backend.close()  # its private directory (and a process that did not listen)
                raise
        except ArgumentError as exc:
            parser.error(str(exc))
    return SocketBackend(args.socket)


def on_backend(command: str, args: argparse.Namespace, parser: argparse.ArgumentParser,
               run: Callable[[Backend], T]) -> T | None:
    """``run(backend)`` on the back-end the arguments name (see :func:`backend_from`), which is
    stopped afterwards if it was started here.  When the back-end cannot be started (at first
    or when ``run`` restarts it) the reason goes to stderr as ``virtq COMMAND: ...`` and the
    result is None (the caller exits 2).  Raises what ``run`` raises, but not
    :class:`~virtq.check.BackendStartError`; exits 2 through ``parser`` for bad arguments."""
    try:
        backend = backend_from(args, parser)
    except BackendStartError as exc:
        print(f"virtq {command}: {exc}", file=sys.stderr)
        return None
    try:
        return run(backend)
    except BackendStartError as exc:
        print(f"virtq {command}: {exc}", file=sys.stderr)
        return None
    finally:
        if isinstance(backend, CommandBackend):
            backend.close()


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``check`` to the ``virtq`` command's subparsers ``sub``."""
    p = sub.add_parser(
        "check", help="conformance checks for a vhost-user back-end",
        description="Run virtq's conformance checks (VIRTIO 1.2, vhost-user.rst) against a "
                    "vhost-user back-end. Exit 0: every MUST check passed; 1: one failed; "
                    "2: the tool could not run.")
    add_backend_arguments(p)
    p.add_argument("--image", type=Path, help="blk: the image the back-end serves "
                   "(capacity and data are compared with it)")
    p.add_argument("--no-writes", action="store_true",
                   help="skip checks that write to the device (they restore what they "
                        "overwrite otherwise)")
    p.add_argument("--fs-lookup", metavar="NAME",
                   help="fs: a name in the shared directory that LOOKUP must find")
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="run only checks whose id matches (e.g. 'ring.*'); repeatable")
    p.add_argument("--timeout", type=float, default=2.0,
                   help="seconds to wait for a completion or a reply (default 2)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.set_defaults(func=lambda a: main(a, p))


def list_checks(device: str, out: IO[str]) -> None:
    """Write every check of ``device`` to ``out``: id, level, title, and the clause it tests."""
    for chk in select_checks(device):
        out.write(f"{chk.id:28} {chk.level!s:6} {chk.title}\n{'':35}{chk.clause}\n")


def _wrap(text: str, width: int, first: str = "") -> list[str]:
    return textwrap.wrap(text, width, initial_indent=" " * 17 + first,
                         subsequent_indent=" " * (17 + len(first)),
                         break_long_words=False, break_on_hyphens=False) or [""]


def format_result(r: CheckResult, colour: bool, *, width: int = 100) -> list[str]:
    """One result as report lines: outcome, level, id, title, and for a failure the message and
    evidence wrapped to ``width``."""
    mark = paint(f"{r.outcome!s:5}", _COLOURS[r.outcome], colour)
    lines = [f"  {mark}  {r.level!s:6}  {r.id:28} {r.title}"]
    if r.outcome in (Outcome.FAIL, Outcome.ERROR):
        lines += _wrap(r.message, width)
        said = str(r.evidence.get("backend_log", "")).strip().splitlines()
        if said:
            lines += _wrap(said[-1], width, "back-end said: ")
        lines += _wrap(r.clause, width, "clause: ")
    elif r.message and r.outcome is Outcome.SKIP:
        lines += _wrap(r.message, width)
    return lines


def format_report(report: Report, colour: bool) -> str:
    """The whole report as text: the back-end and its features, every result, the counts and the
    exit status."""
    lines = [f"virtq check --device {report.device}: {report.backend}"]
    if report.offered_features is not None:
        proto = "" if report.protocol_features is None else \
            f", protocol features {report.protocol_features:#x}"
        lines.append(f"offered features {report.offered_features:#x}{proto}")
    lines += [f"note: {n}" for n in report.notes]
    group = None
    for r in report.results:
        if r.group != group:
            group = r.group
            lines.append(f"\n{group}")
        lines += format_result(r, colour)
    c = report.counts()
    must_failed = [r.id for r in report.results
                   if r.outcome is Outcome.FAIL and str(r.level) == "MUST"]
    lines.append("")
    lines.append(f"{c['pass']} passed, {c['fail']} failed, {c['skip']} skipped, "
                 f"{c['error']} errors")
    if must_failed:
        lines.append(paint(f"MUST checks failed: {', '.join(must_failed)}", "31;1", colour))
    return "\n".join(lines)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``virtq check``: run the checks, print the report (``--json``: write it too) and return
    the exit status (0 every MUST check passed, 1 one failed, 2 the tool could not run).  Bad
    arguments exit 2 through ``parser``."""
    out = sys.stdout
    if args.list:
        list_checks(args.device, out)
        return 0
    try:
        select_checks(args.device, args.only)
    except ArgumentError as exc:
        parser.error(str(exc))
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: no such directory {args.json.parent}")
    if args.image is not None and not args.image.is_file():
        parser.error(f"--image {args.image}: no such file")
    colour = use_colour(args.color, out)
    options = CheckOptions(image=args.image, allow_writes=not args.no_writes,
                           timeout=args.timeout, fs_lookup=args.fs_lookup)
    report = on_backend("check", args, parser, lambda backend: run_checks(
        args.device, backend, options=options, only=args.only))
    if report is None:
        return 2
    out.write(format_report(report, colour) + "\n")
    if args.json is not None:
        args.json.write_text(report.to_json() + "\n")
    return report.exit_status


assert CATALOGUE  # the checks are registered by importing virtq.check
