"""``virtq inspect``: a ring's layout for a queue size, or a live ring another process owns.

``virtq inspect 256`` prints where the parts of a 256-entry split ring go.
``virtq inspect /proc/PID/fd/N --queue-size 128`` maps that process's memfd read-only and
shows its ring as it is; ``virtq inspect SNAPSHOT.json`` shows a ring saved with
:func:`virtq.ringview.save_snapshot`; ``virtq inspect /proc/PID`` lists the memfds a process
holds.  ``--svg FILE`` also draws the ring.

Exit status: 0 when the ring is consistent (and for a layout or a list), 1 when something
in it is impossible (listed), 2 when it cannot be inspected (bad arguments, no such file).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from virtq.cli import _args
from virtq.errors import VirtqOSError
from virtq.layout import SplitLayout
from virtq.ringview import (
    MappedFile,
    SnapshotFile,
    analyze,
    is_snapshot,
    render_svg,
    render_text,
    shared_files,
)

#: Exit statuses (``virtq check`` uses the same three).
OK, FOUND_PROBLEMS, CANNOT_RUN = 0, 1, 2


def print_layout(args: argparse.Namespace) -> int:
    """Show the layout the library would use for a queue size."""
    lay = SplitLayout.compute(args.queue_size, buffer_size=args.buffer_size,
                              legacy=args.legacy)
    for field in ("queue_size", "desc", "avail", "used", "buffers", "nbytes"):
        print(f"{field:>10}: {getattr(lay, field)}")
    print(f"{'used_event':>10}: {lay.used_event}")
    print(f"{'avail_event':>10}: {lay.avail_event}")
    return OK


def list_memfds(pid: int) -> int:
    """Print the shareable files process ``pid`` holds (where its rings may live)."""
    files = shared_files(pid)
    if not files:
        print(f"process {pid} holds no memfd or hugetlbfs file")
        return OK
    print(f"process {pid} holds these shareable files; inspect one with "
          f"`virtq inspect /proc/{pid}/fd/N --queue-size SIZE`:")
    for f in files:
        print(f"  fd {f.fd:<4} {f.nbytes:>12,} bytes  {f.target}")
    return OK


def show_ring(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Attach to the ring named by ``args.target`` and print (and draw) it; returns the exit
    status.  Raises :class:`~virtq.errors.VirtqOSError` when the file cannot be read or the
    picture written, :class:`~virtq.errors.ArgumentError` when it holds no such ring, and
    exits 2 through ``parser`` when a live ring's size is missing."""
    target: str = args.target
    source: Any
    if is_snapshot(target):
        source = SnapshotFile(target)
    else:
        if args.queue_size_opt is None:
            parser.error(f"{target}: a live ring needs --queue-size (the owner's ring size)")
        source = MappedFile(target, args.queue_size_opt, offset=args.offset, iova=args.iova,
                            legacy=args.legacy)
    try:
        state = analyze(source)
    finally:
        if isinstance(source, MappedFile):
            source.close()
    print(render_text(state, max_chains=args.max_chains), end="")
    if args.svg:
        try:
            Path(args.svg).write_text(render_svg(state, max_chains=args.max_chains))
        except OSError as exc:
            raise VirtqOSError(exc.errno or 0, f"cannot write {args.svg}: {exc.strerror}") \
                from None
        print(f"picture: {args.svg}")
    return OK if state.consistent else FOUND_PROBLEMS


def cmd_inspect(args: argparse.Namespace) -> int:
    """``virtq inspect TARGET``: a layout (TARGET a queue size), a process's memfds (TARGET
    ``/proc/PID``), or a ring (TARGET a file).  Raises :class:`~virtq.errors.ArgumentError`
    and :class:`~virtq.errors.VirtqOSError` for a target it cannot read (the command line
    turns them into exit status 2)."""
    parser: argparse.ArgumentParser = args.parser
    target: str = args.target
    # A number is a queue size (name a file called "256" as ./256).
    if re.fullmatch(r"[+-]?(0[xob])?[0-9a-f_]+", target.strip(), flags=re.I):
        try:
            args.queue_size = _args.queue_size(target)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument target: {exc}")
        return print_layout(args)
    proc = re.fullmatch(r"/proc/(\d+)/?", target)
    if proc:
        return list_memfds(int(proc[1]))
    if not os.path.exists(target):
        parser.error(f"argument target: {target!r} is neither a queue size nor a file")
    if os.path.isdir(target):
        parser.error(f"argument target: {target} is a directory")
    return show_ring(args, parser)


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``inspect`` to the ``virtq`` command's subparsers ``sub``; returns its parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "inspect", help="a ring's layout, or a live ring another process owns",
        description=_args.plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="a queue size (a power of two, 1..32768, VIRTIO 1.2 "
                   "§2.7): print its layout; /proc/PID/fd/N or another shared file: show "
                   "the ring in it; a snapshot file; /proc/PID: list its memfds")
    p.add_argument("--buffer-size", type=_args.nonnegative_int, default=0,
                   help="layout: bytes of buffer per descriptor")
    p.add_argument("--legacy", action="store_true",
                   help="the pre-1.0 layout (used ring on a page boundary)")
    p.add_argument("--queue-size", dest="queue_size_opt", type=_args.queue_size,
                   help="live ring: its size (entries)")
    p.add_argument("--offset", type=_args.nonnegative_int, default=0,
                   help="live ring: where its descriptor table starts in the file "
                        "(default 0; queue i of a BlkDevice is at i times the ring's "
                        "page-rounded size)")
    p.add_argument("--iova", type=_args.nonnegative_int, default=None,
                   help="live ring: the device address of the file's byte 0, to follow "
                        "indirect tables (default: where the owner maps the file, right "
                        "for vhost-user)")
    p.add_argument("--svg", metavar="FILE", help="also draw the ring into this SVG file")
    p.add_argument("--max-chains", type=_args.positive_int, default=16,
                   help="chains listed per kind (the rest are counted)")
    p.set_defaults(func=cmd_inspect, parser=p)
    return p


__all__ = ["CANNOT_RUN", "FOUND_PROBLEMS", "OK", "cmd_inspect", "list_memfds",
           "print_layout", "register", "show_ring"]
