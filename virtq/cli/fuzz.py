"""``virtq fuzz``: feed a vhost-user back-end malformed inputs and classify what it does.

Exit status: 0 when nothing was found, 1 when there are findings (crash, hang, a write
outside the buffers, a ring protocol violation), 2 when the tool could not run.
With ``--replay FILE``: 1 when the case is (still) a finding, 0 when it is not.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import IO

from virtq.check import Backend
from virtq.check.fuzz import (
    CLASSES,
    FINDINGS,
    LEVELS,
    Case,
    FuzzOptions,
    FuzzReport,
    Verdict,
    fuzz,
    load_case,
    replay,
)
from virtq.cli.check import add_backend_arguments, on_backend, paint, use_colour
from virtq.errors import ArgumentError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``fuzz`` to the ``virtq`` command's subparsers ``sub``."""
    p = sub.add_parser(
        "fuzz", help="a hostile driver against a vhost-user back-end",
        description="Send malformed descriptors, requests and vhost-user messages to a "
                    "back-end and classify each outcome. Findings are minimised and "
                    "written to --out as reproducers (virtq fuzz --replay FILE).")
    add_backend_arguments(p)
    p.add_argument("--seconds", type=float, default=20.0, help="how long (default 20)")
    p.add_argument("--cases", type=int, help="stop after this many cases instead")
    p.add_argument("--seed", type=int, default=0, help="the same seed replays the run")
    p.add_argument("--levels", default=",".join(LEVELS),
                   help=f"comma-separated, of {', '.join(LEVELS)} (default: all)")
    p.add_argument("--hang-timeout", type=float, default=1.0,
                   help="seconds without an answer that count as a hang (default 1)")
    p.add_argument("--no-minimise", action="store_true", help="keep findings as found")
    p.add_argument("--out", type=Path, metavar="DIR", help="write reproducers here")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the summary as JSON")
    p.add_argument("--replay", type=Path, metavar="FILE", help="run one reproducer")
    p.set_defaults(func=lambda a: main(a, p))


def _progress(out: IO[str], started: float) -> object:
    last = [started]
    known = [0]

    def show(report: FuzzReport, case: Case, verdict: Verdict) -> None:
        now = time.monotonic()
        if len(report.findings) > known[0]:
            known[0] = len(report.findings)
            out.write(f"  new finding: {verdict.cls}: {case.describe()}: {verdict.detail}\n")
        if now - last[0] >= 2.0:
            last[0] = now
            elapsed = now - started
            found = ", ".join(f"{c} {report.by_class[c]}" for c in sorted(FINDINGS)
                              if report.by_class[c])
            out.write(f"[{elapsed:5.1f}s] {report.cases} cases ({report.cases / elapsed:.1f}/s)"
                      f"; findings: {found or 'none'}\n")
        out.flush()

    return show


def format_summary(report: FuzzReport, colour: bool) -> str:
    """The fuzz report as text: cases, rate, restarts, outcomes by class and kind, and each
    finding with its reproducer."""
    lines = [f"virtq fuzz --device {report.device} --seed {report.seed}: {report.backend}",
             f"{report.cases} cases in {report.seconds:.1f} s "
             f"({report.cases / max(report.seconds, 1e-9):.1f}/s), "
             f"{report.restarts} back-end restarts", "",
             "| case | " + " | ".join(c for c in CLASSES if c != "error") + " | error |",
             "|---|" + "---|" * len(CLASSES)]
    for kind, counts in sorted(report.by_kind.items()):
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(c, 0) or "")
                                                  for c in CLASSES) + " |")
    lines.append("| **all** | " + " | ".join(str(report.by_class.get(c, 0)) for c in CLASSES)
                 + " |")
    lines.append("")
    if not report.findings:
        lines.append("no findings")
    for f in report.findings:
        head = paint(f"{f.verdict.cls}", "31;1", colour)
        lines.append(f"{head}: {f.case.describe()} (x{f.repeats}): {f.verdict.detail}")
        if f.prelude:
            lines.append(f"    after {len(f.prelude)} earlier case(s) on the same process: "
                         + "; ".join(c.describe() for c in f.prelude))
        if not f.reproduced:
            lines.append("    (did not reproduce on a fresh back-end)")
        if f.path is not None:
            lines.append(f"    reproducer: {f.path}")
    return "\n".join(lines)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``virtq fuzz``: run (or ``--replay``) cases, print the summary (``--json``: write the
    report) and return the exit status (0 nothing stands, 1 a finding stands, 2 the tool could
    not run).  Bad arguments exit 2 through ``parser``."""
    out = sys.stdout
    levels = tuple(x.strip() for x in args.levels.split(",") if x.strip())
    if not levels or set(levels) - set(LEVELS):
        parser.error(f"--levels: choose among {', '.join(LEVELS)}")
    if args.seconds <= 0 or args.hang_timeout <= 0 or (args.cases is not None
                                                        and args.cases <= 0):
        parser.error("--seconds, --cases and --hang-timeout must be positive")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: no such directory {args.json.parent}")
    if args.replay is not None:
        try:
            rep = load_case(args.replay)
        except ArgumentError as exc:
            parser.error(str(exc))
        if rep.case.device != args.device:
            parser.error(f"{args.replay} is a {rep.case.device} case, not {args.device}")
    options = FuzzOptions(seconds=args.seconds, cases=args.cases, seed=args.seed,
                          hang_timeout=args.hang_timeout, levels=levels,
                          minimise=not args.no_minimise, out=args.out)
    colour = use_colour(args.color, out)

    def run(backend: Backend) -> FuzzReport | int:
        if args.replay is not None:
            case, verdict = replay(args.replay, backend, options)
            if rep.prelude:
                out.write(f"after {len(rep.prelude)} earlier case(s): "
                          + "; ".join(c.describe() for c in rep.prelude) + "\n")
            out.write(f"{case.describe()}: {verdict.cls}: {verdict.detail}\n")
            return 1 if verdict.finding else 0
        return fuzz(args.device, backend, options,
                    on_progress=_progress(out, time.monotonic()))  # type: ignore[arg-type]

    report = on_backend("fuzz", args, parser, run)
    if report is None:
        return 2
    if isinstance(report, int):  # the exit status of a replay
        return report
    out.write(format_summary(report, colour) + "\n")
    if args.json is not None:
        args.json.write_text(report.to_json() + "\n")
    return report.exit_status
