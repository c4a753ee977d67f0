"""Run one benchmark against an older revision of virtq and against this working tree, in
one run, interleaved, and print one table: old, new and new/old per row.

    python benchmarks/compare.py --rev e9d9a8c [--rounds 3] [--json out.json] -- ring --seconds 1
    python benchmarks/compare.py --rev main -- blk --depths 32 --modes eventfd,batch
    python benchmarks/compare.py --rev HEAD~1 -- net --seconds 2 --rounds 1

Benchmarks: ``ring`` (benchmarks/bench_ring.py), ``blk`` (``virtq bench blk``), ``net``
(``virtq bench net``) and ``blk-ref`` (benchmarks/bench_blk_ref.py); the arguments after
the name are the benchmark's own.

How: ``REV`` is checked out with ``git worktree add --detach`` into a temporary directory
(removed at the end).  Each run is a child process of this interpreter with ``PYTHONPATH``
set to one tree, so ``import virtq`` loads that tree's package; an editable install of the
working tree cannot win, because the child also drops the install's import hook, and the
child checks that ``virtq.__file__`` and every ``virtq.*`` module it loaded come from the
tree it was given.  What is *measured* is the same code on both sides: the working tree's
benchmark and its harness (``virtq.cli.benchutil``, ``virtq.cli.bench_blk``,
``virtq.cli.bench_net``, ``virtq.testing.runners``, ``virtq.testing.testpmd``) are loaded
from the working tree's files into the old tree's ``virtq`` package; only the library under
them differs.  The benchmarks therefore use only API that both trees have.

Rounds alternate old/new, new/old, ... (each run is one whole benchmark).  "old" and "new"
are medians over the rounds, "new/old" the median of the per-round ratios (the two runs of
a round are neighbours in time).  A row is marked when it is more than ``--threshold``
percent worse or better in the direction the benchmark says is better; on a shared machine
read that as a hint to re-run, not as a verdict.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the working tree: the "new" side
# benchutil from the working tree when virtq is not installed (appended: see the benches).
sys.path.append(str(ROOT))

#: name -> (kind, what): a script of benchmarks/ (run by path) or a module of the harness.
BENCHES = {
    "ring": ("script", "benchmarks/bench_ring.py"),
    "blk-ref": ("script", "benchmarks/bench_blk_ref.py"),
    "blk": ("module", "virtq.cli.bench_blk"),
    "net": ("module", "virtq.cli.bench_net"),
}
#: The benchmarks' harness: always the working tree's files, in this (import) order.
HARNESS = (
    "virtq.cli.benchutil",
    "virtq.cli._args",
    "virtq.cli.plot",
    "virtq.testing.runners",
    "virtq.testing.testpmd",
    "virtq.cli.bench_blk",
    "virtq.cli.bench_net",
)


def module_path(root: Path, name: str) -> Path:
    """Where module ``name`` of the tree at ``root`` lives (a plain module, not a
    package)."""
    return root.joinpath(*name.split(".")).with_suffix(".py")


def _under(path: str | None, root: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(root.resolve())


# -- the child: one benchmark run against one tree ---------------------------------------------


def child(tree: Path, json_out: Path, bench: str, argv: list[str]) -> int:
    """Import virtq from ``tree``, graft the working tree's harness onto it, run ``bench``
    with ``argv``, and add to its results file where every ``virtq`` module came from."""
    # The editable install's finder sits after the path finder, so PYTHONPATH wins for
    # ``virtq`` itself; dropping it also keeps a module the old tree lacks from being
    # loaded silently out of the working tree.
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not getattr(f, "__module__", "").startswith("__editable__")]
    virtq = importlib.import_module("virtq")
    if not _under(virtq.__file__, tree):
        print(f"compare: virtq came from {virtq.__file__}, not from {tree} "
              "(PYTHONPATH did not win)", file=sys.stderr)
        return 3
    print(f"compare: virtq from {virtq.__file__}", file=sys.stderr, flush=True)
    grafted = []
    if tree.resolve() != ROOT:
        for name in HARNESS:
            path = module_path(ROOT, name)
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                print(f"compare: cannot load {path}", file=sys.stderr)
                return 3
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # before it runs: its own imports find it
            spec.loader.exec_module(module)
            grafted.append(name)
    kind, what = BENCHES[bench]
    if kind == "script":
        spec = importlib.util.spec_from_file_location(f"bench_{bench.replace('-', '_')}",
                                                      ROOT / what)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(what)
    rc: int = module.main([*argv, "--json", str(json_out)])
    # Where everything came from: the tree under test, or the working tree's harness.
    strays = []
    count = 0
    for name, mod in list(sys.modules.items()):
        if name != "virtq" and not name.startswith("virtq."):
            continue
        path = getattr(mod, "__file__", None)
        if name in grafted:
            ok = _under(path, ROOT)
        else:
            count += 1
            ok = _under(path, tree)
        if not ok:
            strays.append(f"{name} from {path}")
    if strays:
        print("compare: modules from the wrong tree:\n  " + "\n  ".join(strays),
              file=sys.stderr)
        return 3
    from virtq.cli.benchutil import read_results  # noqa: PLC0415 - after the graft

    data = read_results(json_out)
    data["modules"] = {"tree": str(tree), "from_tree": count, "harness": grafted}
    json_out.write_text(json.dumps(data, indent=1) + "\n")
    return rc


# -- the parent ---------------------------------------------------------------------------------


def git(*args: str) -> str:
    """``git -C ROOT args``' output, stripped; raises SystemExit with git's message."""
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise SystemExit(f"compare: git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def run_one(tree: Path, bench: str, argv: list[str], json_out: Path, log: Path) -> dict[str,
                                                                                     Any]:
    """One child run against ``tree``; its stdout goes to ``log``, its stderr (progress
    bars on a terminal) through."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(tree),
           "--results", str(json_out), "--", bench, *argv]
    with open(log, "w") as out:
        rc = subprocess.run(cmd, env=env, stdout=out, check=False).returncode
    if rc:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"compare: the run against {tree} exited {rc}:\n{tail}")
    from virtq.cli.benchutil import read_results  # noqa: PLC0415 - the working tree's

    return read_results(json_out)


def fmt(v: float) -> str:
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def table(runs: list[tuple[dict[str, Any], dict[str, Any]]], threshold: float) -> str:
    """One line per (row, metric): median old, median new, median per-round new/old."""
    from virtq.cli.benchutil import markdown_table  # noqa: PLC0415

    keys: dict[tuple[str, str], str | None] = {}
    old_v: dict[tuple[str, str], list[float]] = {}
    new_v: dict[tuple[str, str], list[float]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    for old, new in runs:
        o = {(v["row"], v["metric"]): v["value"] for v in old["values"]}
        for v in new["values"]:
            key = (v["row"], v["metric"])
            keys.setdefault(key, v["better"])
            new_v.setdefault(key, []).append(v["value"])
            if key in o:
                old_v.setdefault(key, []).append(o[key])
                if o[key]:
                    ratios.setdefault(key, []).append(v["value"] / o[key])
    rows = []
    limit = threshold / 100
    for key, better in keys.items():
        row, metric = key
        old_cell = fmt(statistics.median(old_v[key])) if key in old_v else "-"
        new_cell = fmt(statistics.median(new_v[key]))
        mark = ""
        if key in ratios:
            r = statistics.median(ratios[key])
            ratio_cell = f"{r:.3f}"
            worse = r - 1 if better == "lower" else 1 - r if better == "higher" else 0.0
            if worse > limit:
                mark = f"worse > {threshold:g} %"
            elif worse < -limit:
                mark = f"better > {threshold:g} %"
        else:
            ratio_cell = "-"
        rows.append([row, metric, old_cell, new_cell, ratio_cell, better or "", mark])
    return markdown_table(["row", "metric", "old", "new", "new/old", "better", ""], rows,
                          "llrrrll")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit(__doc__.split("\n\n")[1] if __doc__ else "usage: -- BENCH ARGS")
    split = argv.index("--")
    own, rest = argv[:split], argv[split + 1 :]
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", help="the old revision (any git revision)")
    p.add_argument("--rounds", type=int, default=3, help="old/new pairs [3]")
    p.add_argument("--threshold", type=float, default=5.0,
                   help="mark rows more than this many percent worse or better [5]")
    p.add_argument("--json", help="also write old, new and ratios per row to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(own)
    if not rest or rest[0] not in BENCHES:
        p.error(f"after --: a benchmark, one of {', '.join(BENCHES)}, then its arguments")
    bench, bench_args = rest[0], rest[1:]
    if args.child is not None:
        return child(args.child, args.results, bench, bench_args)
    if not args.rev or args.rounds < 1:
        p.error("--rev REV is required; --rounds >= 1")

    sha = git("rev-parse", "--verify", f"{args.rev}^{{commit}}")
    old_desc = git("log", "-1", "--format=%h %s", sha)
    head = git("log", "-1", "--format=%h", "HEAD")
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") \
        else ""
    tmp = Path(tempfile.mkdtemp(prefix="virtq-compare-"))
    old_tree = tmp / "old"
    runs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    try:
        git("worktree", "add", "--detach", "--quiet", str(old_tree), sha)
        trees = {"old": old_tree, "new": ROOT}
        for rnd in range(args.rounds):
            order = ("old", "new") if rnd % 2 == 0 else ("new", "old")
            got: dict[str, dict[str, Any]] = {}
            for side in order:
                print(f"compare: round {rnd + 1}/{args.rounds}: {side}", file=sys.stderr,
                      flush=True)
                got[side] = run_one(trees[side], bench, bench_args,
                                    tmp / f"{side}-{rnd}.json", tmp / f"{side}-{rnd}.log")
            runs.append((got["old"], got["new"]))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                        str(old_tree)], capture_output=True, check=False)
        if args.keep:
            print(f"compare: logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        # If the removal failed (the directory went first), forget the worktree anyway.
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True,
                       check=False)

    old0, new0 = runs[0]
    print(f"# compare {bench} {' '.join(bench_args)}: {args.rounds} round(s), alternating; "
          f"medians; new/old = median of per-round ratios")
    print(f"# old: {old_desc}; virtq from {old0['virtq']} "
          f"({old0['modules']['from_tree']} modules from that tree, harness from the "
          f"working tree: {', '.join(old0['modules']['harness'])})")
    print(f"# new: working tree at {head}{dirty}; virtq from {new0['virtq']} "
          f"({new0['modules']['from_tree']} modules from that tree)")
    print(f"# {new0['title']}")
    print(table(runs, args.threshold))
    old_rows = {v["row"] for v in old0["values"]}
    missing = sorted({v["row"] for v in new0["values"]} - old_rows)
    if missing:
        # e.g. bench_ring's packed rows against a virtq without a packed ring: the benchmark
        # leaves out what the old tree cannot build and says so in its log (--keep).
        print(f"# old '-': {len(missing)} row(s) the old revision did not produce "
              "(something it lacks; --keep keeps its log)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"bench": bench, "args": bench_args, "old": old_desc, "new": f"{head}{dirty}",
             "runs": [{"old": o, "new": n} for o, n in runs]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
