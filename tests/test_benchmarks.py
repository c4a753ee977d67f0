"""Every benchmark runs, for a second or two, against the real back-ends it needs, so none
rots: ``benchmarks/bench_ring.py``, ``benchmarks/bench_blk_ref.py`` (qemu-storage-daemon),
``virtq bench blk`` (qemu-storage-daemon; also ``--queues``), ``virtq bench reconnect``
(qemu-storage-daemon and the embedded back-end, killed and started again),
``virtq bench net`` (two dpdk-testpmd), ``virtq bench vfio`` (the vfio-guest VM, about
10 s), ``virtq bench fs`` (virtiofsd), ``virtq bench profile`` (qemu-storage-daemon),
``benchmarks/all.py --quick`` (all of the above that issue 18 names, in one report) and
``benchmarks/compare.py`` (a ``git worktree`` of ``HEAD~1``).

Smoke runs: each must exit 0 and print its table (header and every row); no timing is
checked.  Their stderr is a pipe here, so it must carry no progress-bar redraws, and the
children run with ResourceWarnings shown, so it must carry none of those either.
"""

from __future__ import annotations

import errno
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtq.cli.benchutil import ProgressBar, Results, io_stats, markdown_table, read_results
from virtq.errors import ArgumentError, VirtqOSError
from virtq.memory import MemfdRegion
from virtq.queue.factory import make_queue, ring_layout

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def run(*argv: str | Path, timeout: float = 180) -> str:
    """Run a benchmark (``sys.executable`` + ``argv``); its stdout.  Fails on a non-zero
    exit, a progress-bar redraw or a ResourceWarning on stderr."""
    env = dict(os.environ, PYTHONWARNINGS="always::ResourceWarning")
    # Bytes, decoded here: text=True would turn a redraw's "\r" into "\n".
    done = subprocess.run([sys.executable, *map(str, argv)], capture_output=True,
                          timeout=timeout, check=False, cwd=ROOT, env=env)
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, f"exit {done.returncode}\n{stdout}\n{stderr}"
    assert "\r" not in stderr, f"a progress bar was drawn into a pipe:\n{stderr!r}"
    assert "ResourceWarning" not in stderr, stderr
    return stdout


def table_rows(out: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table that starts with ``header``."""
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    assert starts, f"no table starting {header!r} in:\n{out}"
    rows = []
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def assert_png(path: Path, out: str) -> None:
    """``--plot`` drew a picture of two panels (the table's rows as bars) into ``path``."""
    assert f"plot: {path}" in out
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 2 * height > 300  # two charts side by side


def check_results(path: Path, bench: str, rows: int) -> dict[str, object]:
    data = read_results(path)
    assert data["bench"] == bench
    assert Path(data["virtq"]).resolve() == ROOT / "virtq" / "__init__.py"
    assert len({v["row"] for v in data["values"]}) == rows
    assert all(v["better"] in ("lower", "higher", None) for v in data["values"])
    return data


# -- the scripts and commands -------------------------------------------------------------------


RING_HEADER = ("| ring | in-order | chain | batch | event_idx | indirect | API | virtq ns "
               "| naive ns |")


def ring_configs(rings=("split", "packed"), in_orders=("off", "on")):
    """The (ring, in-order, chain, batch, event_idx, indirect) of bench_ring's rows: 1- and
    3-descriptor chains, batch 1 and 32, event idx off/on, and indirect off/on for 3."""
    return [(ring, io, str(chain), str(batch), ev, ind)
            for ring in rings for io in in_orders
            for chain in (1, 3) for batch in (1, 32) for ev in ("off", "on")
            for ind in (("off", "on") if chain == 3 else ("off",))]


TEMPLATE_APIS = ("template, same buffers", "template, new data buffer")


def template_configs(rings=("split", "packed"), in_orders=("off", "on")):
    """bench_ring's template rows after the others: 32 chains per publish, event idx on,
    a refill with the same buffers and one with a new data buffer per chain."""
    return [(ring, io, str(chain), "32", "on", ind, api)
            for ring in rings for io in in_orders for api in TEMPLATE_APIS
            for chain in (1, 3) for ind in (("off", "on") if chain == 3 else ("off",))]


def test_bench_ring(tmp_path):
    out = run(BENCHMARKS / "bench_ring.py", "--seconds", "0.02", "--rounds", "1",
              "--json", tmp_path / "ring.json")
    assert "# skipped" not in out
    rows = table_rows(out, RING_HEADER)
    # One row per configuration, both formats and in-order off/on, in this order; a batch
    # of one is add(), a batch of 32 add_many(); then the template rows.
    assert [tuple(r[:6]) for r in rows[:48]] == ring_configs()
    assert all(r[6] == ("add()" if r[3] == "1" else "add_many()") for r in rows[:48])
    assert [tuple(r[:7]) for r in rows[48:]] == template_configs()
    assert len(rows) == 72
    assert all(float(r[7]) > 0 and float(r[8]) > 0 and float(r[10]) > 0 for r in rows)
    data = check_results(tmp_path / "ring.json", "ring", len(rows))
    assert any(v["row"].startswith("packed, in-order on, chain 3") for v in data["values"])


def test_bench_ring_one_format_both_apis():
    out = run(BENCHMARKS / "bench_ring.py", "--seconds", "0.02", "--rounds", "1",
              "--ring", "packed", "--in-order", "on", "--batched-api", "both",
              "--templates", "off")
    rows = table_rows(out, RING_HEADER)
    configs = ring_configs(rings=("packed",), in_orders=("on",))
    # The batched rows twice: 32 add() calls, then one add_many().
    expected = [(*c, api) for c in configs
                for api in (("add()", "add_many()") if c[3] == "32" else ("add()",))]
    assert [(*r[:6], r[6]) for r in rows] == expected


def test_bench_ring_refuses_an_unknown_ring():
    done = subprocess.run([sys.executable, BENCHMARKS / "bench_ring.py", "--ring", "split,ring"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "a comma-separated list of split, packed" in done.stderr


def test_bench_blk_ref(tmp_path):
    out = run(BENCHMARKS / "bench_blk_ref.py", "--seconds", "0.2", "--rounds", "1",
              "--depths", "8", "--json", tmp_path / "ref.json")
    rows = table_rows(out, "| QD | mode | front-end | IOPS |")
    assert [(r[1], r[2]) for r in rows] == [("eventfd", "naive"), ("eventfd", "virtq"),
                                            ("batch", "naive"), ("batch", "virtq")]
    check_results(tmp_path / "ref.json", "blk-ref", 4)


def test_bench_blk(tmp_path):
    out = run("-m", "virtq", "bench", "blk", "--seconds", "0.2", "--depths", "1,8",
              "--modes", "poll,eventfd,batch", "--json", tmp_path / "blk.json",
              "--plot", tmp_path / "blk.png")
    assert "zero-copy" in out
    assert_png(tmp_path / "blk.png", out)
    rows = table_rows(out, "| QD | mode | IOPS | p50 µs |")
    assert [(r[0], r[1]) for r in rows] == [(d, m) for d in ("1", "8")
                                            for m in ("poll", "eventfd", "batch")]
    check_results(tmp_path / "blk.json", "blk", 6)
    out = run("-m", "virtq", "bench", "blk", "--seconds", "0.2", "--depths", "8",
              "--modes", "batch", "--copy", "--batch", "3")
    assert "copied out as bytes" in out
    assert [r[:2] for r in table_rows(out, "| QD | mode | IOPS |")] == [["8", "batch"]]


def test_bench_blk_queues(tmp_path):
    out = run("-m", "virtq", "bench", "blk", "--seconds", "0.2", "--depths", "8",
              "--modes", "eventfd,batch", "--queues", "1,2,4", "--json",
              tmp_path / "blkq.json")
    rows = table_rows(out, "| queues | QD | mode | IOPS |")
    assert [(r[0], r[1], r[2]) for r in rows] == [(q, "8", m) for m in ("eventfd", "batch")
                                                  for q in ("1", "2", "4")]
    assert "num-queues=4" in out
    check_results(tmp_path / "blkq.json", "blk-queues", 6)


def test_bench_reconnect(tmp_path):
    out = run("-m", "virtq", "bench", "reconnect", "--kills", "1", "--per-kill", "200",
              "--json", tmp_path / "reconnect.json")
    rows = table_rows(out, "| back-end | kill | in flight |")
    assert [(r[0], r[1]) for r in rows] == [("qsd", "1"), ("embedded", "1")]
    qsd, embedded = rows
    assert int(qsd[7]) == 0  # QSD: the rings were reset, the driver resubmitted
    assert int(embedded[6]) == 0  # INFLIGHT_SHMFD: the rings were kept
    assert out.count("each completed once, 0 failed; the image matches the model") == 2
    check_results(tmp_path / "reconnect.json", "reconnect", 2)


NET_HEADER = "| dir | ring | front-end driver | packets | Mpps |"


def test_bench_net(tmp_path):
    out = run("-m", "virtq", "bench", "net", "--seconds", "0.2", "--warmup", "0.1",
              "--rounds", "1", "--json", tmp_path / "net.json", "--plot", tmp_path / "net.png")
    assert_png(tmp_path / "net.png", out)
    rows = table_rows(out, NET_HEADER)
    # The default: split, not in order, for both front-ends.
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (d, "split", who) for d in ("TX", "RX")
        for who in ("DPDK virtio-user (C)", "virtq (poll)", "virtq (notify)")]
    assert all(int(r[3]) > 0 for r in rows), out
    check_results(tmp_path / "net.json", "net", 6)


@pytest.mark.parametrize(("ring", "in_order"), [("packed", "on"), ("packed", "off"),
                                                ("split", "on")])
def test_bench_net_rings(tmp_path, ring, in_order):
    """virtq and DPDK's virtio-user on the same packed and/or in-order ring (virtq checks
    that it negotiated the ring it was asked for)."""
    out = run("-m", "virtq", "bench", "net", "--ring", ring, "--in-order", in_order,
              "--seconds", "0.2", "--warmup", "0.1", "--rounds", "1",
              "--json", tmp_path / "net.json")
    label = ring + (" in-order" if in_order == "on" else "")
    assert f"{label} ring" in out.splitlines()[0]
    rows = table_rows(out, NET_HEADER)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (d, label, who) for d in ("TX", "RX")
        for who in ("DPDK virtio-user (C)", "virtq (poll)", "virtq (notify)")]
    assert all(int(r[3]) > 0 for r in rows), out
    data = check_results(tmp_path / "net.json", "net", 6)
    assert all(v["row"].startswith((f"TX {label} ", f"RX {label} ")) for v in data["values"])


def test_bench_net_pairs(tmp_path):
    """``--pairs 1,2``: each count against a back-end serving as many, next to the C
    virtio-user with as many; every row moved packets (a smoke run, no timing claims)."""
    out = run("-m", "virtq", "bench", "net", "--seconds", "0.2", "--warmup", "0.1",
              "--rounds", "1", "--mode", "notify", "--pairs", "1,2",
              "--json", tmp_path / "net.json")
    rows = table_rows(out, NET_HEADER)
    assert [(r[0], r[2]) for r in rows] == [
        (d, who + suffix) for suffix in ("", ", 2 pairs") for d in ("TX", "RX")
        for who in ("DPDK virtio-user (C)", "virtq (notify)")]
    assert all(int(r[3]) > 0 for r in rows), out
    check_results(tmp_path / "net.json", "net", 8)


def test_bench_vfio(tmp_path):
    out = run("-m", "virtq", "bench", "vfio", "--iters", "5", "--out", tmp_path / "vm",
              timeout=330)
    assert "virtq / reference" in out
    for label in ("rng 64 B   poll ", "rng 64 B   MSI-X", "blk 4 KiB  poll ", "blk 4 KiB  MSI-X"):
        lines = [line for line in out.splitlines() if line.startswith(label)]
        assert len(lines) == 1, f"no row {label!r} in:\n{out}"
        assert len(lines[0][len(label) :].split()) == 9  # virtq, reference, ratio x 3


def test_bench_fs(tmp_path):
    out = run("-m", "virtq", "bench", "fs", "--size-mib", "2", "--files", "20",
              "--request-sizes", "4096,65536", "--json", tmp_path / "fs.json")
    rows = table_rows(out, "| operation | request | virtq | os | virtq / os |")
    assert [(r[0], r[1]) for r in rows] == [
        ("sequential read", "4 KiB"), ("sequential read", "64 KiB"),
        ("sequential write", "4 KiB"), ("sequential write", "64 KiB"),
        ("read_bytes(), READs in flight", "1 MiB"),
        ("small files: stat+open+read+close", "4 KiB")]
    assert all(float(r[4]) > 0 for r in rows)
    check_results(tmp_path / "fs.json", "fs", 6)


PROFILE_BLK_STAGES = ["submit", "publish + fence", "notify", "wait",
                      "wait (this thread's CPU)", "reap + validate", "complete",
                      "sum of the stages' CPU"]


def test_bench_profile(tmp_path):
    """The floor table, the blk stages over qemu-storage-daemon and the ring stages, split
    and packed: every row, each with a number and its floor (no timing is checked)."""
    out = run("-m", "virtq", "bench", "profile", "--seconds", "0.3", "--floor-ops", "5000",
              "--json", tmp_path / "profile.json")
    floor = table_rows(out, "| floor operation | ns |")
    assert len(floor) == 7
    assert all(float(r[1].replace(",", "")) >= 0 for r in floor)
    blk = table_rows(out, "| stage | ns/req | floor ns/req | x floor |")
    assert [r[0] for r in blk[:-1]] == PROFILE_BLK_STAGES
    assert blk[-1][0].startswith("process CPU per request")
    assert all(float(r[1].replace(",", "")) >= 0 for r in blk)
    ring = table_rows(out, "| ring | stage | ns/chain | floor ns/chain | x floor |")
    assert [(r[0], r[1]) for r in ring] == [
        (fmt, stage) for fmt in ("split", "packed")
        for stage in ("add", "publish", "reap", "driver total")]
    # net against a real dpdk-testpmd: TX and RX stages, split and packed.
    net = table_rows(out, "| dir | ring | stage | ns/pkt | floor ns/pkt | x floor |")
    tx = ["check frames", "copy in", "submit", "publish + fence", "notify",
          "reap + validate", "wait for room", "sum of the stages", "process CPU per packet"]
    rx = ["reap + validate", "copy out", "re-post", "publish + fence", "notify",
          "sum of the stages", "polls that found nothing", "process CPU per packet"]
    # (The ring column says "in-order" when NetDevice negotiated it: testpmd offers it.)
    assert [(r[0], r[1].removesuffix(" in-order"), r[2]) for r in net] == [
        (d, fmt, stage) for fmt in ("split", "packed")
        for d, stages in (("TX", tx), ("RX", rx)) for stage in stages]
    assert all(float(r[3].replace(",", "")) >= 0 for r in net)
    # Frames went through: a copy costs something in both directions.
    assert all(float(r[3].replace(",", "")) > 0 for r in net if r[2].startswith("copy"))
    # floor 7, blk 8, ring 6; net: 7 TX and 5 RX stages per ring, and two totals per
    # direction and ring.
    data = check_results(tmp_path / "profile.json", "profile",
                         7 + 8 + 6 + 2 * (7 + 5) + 2 * 2 * 2)
    metrics = {(v["row"], v["metric"]) for v in data["values"]}
    assert ("blk QD 32 reap + validate", "floor ns/req") in metrics
    assert ("ring packed add", "floor ns/chain") in metrics
    assert ("net RX packed copy out", "floor ns/pkt") in metrics


def test_bench_profile_without_blk():
    out = run("-m", "virtq", "bench", "profile", "--seconds", "0.2", "--floor-ops", "2000",
              "--skip-blk", "--skip-net")
    assert "| stage | ns/req |" not in out
    assert "| dir | ring | stage |" not in out
    assert len(table_rows(out, "| ring | stage | ns/chain |")) == 8


def test_bench_all_quick(tmp_path):
    """benchmarks/all.py --quick: every part's table in one Markdown report with the date,
    commit and host, and one verdict line per issue-18 target."""
    report = tmp_path / "perf.md"
    out = run(BENCHMARKS / "all.py", "--quick", "--markdown", report, "--json",
              tmp_path / "all.json", timeout=240)
    text = report.read_text()
    head = text.splitlines()[:6]
    assert head[0] == "# virtq performance"
    assert head[2].startswith("- date: 20") and head[2].endswith(" UTC")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout.strip()
    assert head[3].startswith(f"- commit: {rev}")
    assert "CPUs, Python 3." in head[4]
    verdicts = [line for line in text.splitlines()
                if line.startswith("- ") and (": met (" in line or ": missed (" in line)]
    # Ring: 2 formats x in-order off/on x 1/3 descriptors; blk at QD 32: CPU and IOPS;
    # queues at QD 32; net: TX and RX x split and packed.
    assert len(verdicts) == 8 + 2 + 1 + 4, text
    # Each ring verdict names virtq's way that did best: add_many() or a template refill.
    ring_verdicts = [v for v in verdicts if v.startswith("- ring ")]
    assert len(ring_verdicts) == 8
    assert all("(best: indirect o" in v and ("add_many()" in v or "template, same buffers" in v)
               for v in ring_verdicts), ring_verdicts
    assert f"targets: {sum(': met (' in v for v in verdicts)} of 15 met" in text
    for header in (RING_HEADER, "| QD | mode | front-end | IOPS |",
                   "| queues | QD | mode | IOPS |", NET_HEADER, "| floor operation | ns |",
                   "| stage | ns/req |", "| ring | stage | ns/chain |"):
        assert table_rows(text, header), header
    assert text.count(NET_HEADER) == 2  # split and packed
    assert "issue 18 targets" in out
    data = json.loads((tmp_path / "all.json").read_text())
    assert set(data) == {"ring", "blk", "queues", "net-split", "net-packed", "profile",
                         "targets", "elapsed_s"}
    assert len(data["targets"]) == 15


def test_bench_all_refuses_an_unknown_part():
    done = subprocess.run([sys.executable, BENCHMARKS / "all.py", "--only", "ring,disk"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "--only" in done.stderr


def _worktree_paths() -> set[str]:
    """The paths of this repository's worktrees (not their HEADs: other worktrees of the
    same repository may commit while the test runs)."""
    out = subprocess.run(["git", "-C", str(ROOT), "worktree", "list", "--porcelain"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("worktree ")}


def compare_trees(out):
    """The old and new trees' ``virtq/__init__.py`` from compare.py's header."""
    old = next(line for line in out.splitlines() if line.startswith("# old: "))
    new = next(line for line in out.splitlines() if line.startswith("# new: "))
    return (Path(old.split("virtq from ")[1].split(" (")[0]),
            Path(new.split("virtq from ")[1].split(" (")[0]))


def test_compare_ring_with_the_previous_commit(tmp_path):
    out = run(BENCHMARKS / "compare.py", "--rev", "HEAD~1", "--rounds", "2",
              "--json", tmp_path / "cmp.json", "--", "ring", "--seconds", "0.02",
              "--rounds", "1", "--ring", "split", "--in-order", "off", "--templates", "off")
    old_file, new_file = compare_trees(out)
    # Each side's virtq came from its own tree, not from the editable install.
    assert new_file.resolve() == ROOT / "virtq" / "__init__.py"
    assert old_file.name == "__init__.py"
    assert not old_file.resolve().is_relative_to(ROOT)
    assert not old_file.exists(), "the temporary worktree was left behind"
    rows = table_rows(out, "| row | metric | old | new | new/old |")
    assert len(rows) == 2 * 12  # virtq and the control, per ring row
    assert all(float(r[2].replace(",", "")) > 0 and float(r[4]) > 0 for r in rows)
    assert "# old '-'" not in out
    data = json.loads((tmp_path / "cmp.json").read_text())
    assert len(data["runs"]) == 2
    # git forgot the temporary worktree too (other worktrees, other runs of compare.py
    # among them, may come and go meanwhile: only this run's is checked).
    assert str(old_file.parent.parent) not in _worktree_paths()


def test_compare_ring_with_a_virtq_without_packed_rings(tmp_path):
    """Against the revision before the packed ring, bench_ring leaves the packed rows out
    of the old side; compare.py shows them as new only and says why."""
    added = subprocess.run(["git", "-C", str(ROOT), "log", "--diff-filter=A", "--format=%H",
                            "--", "virtq/queue/packed.py"], capture_output=True, text=True,
                           check=True).stdout.split()
    out = run(BENCHMARKS / "compare.py", "--rev", f"{added[-1]}~1", "--rounds", "1", "--",
              "ring", "--seconds", "0.02", "--rounds", "1", "--in-order", "off",
              "--templates", "off")
    rows = table_rows(out, "| row | metric | old | new | new/old |")
    assert len(rows) == 2 * 24
    for r in rows:
        assert float(r[3].replace(",", "")) > 0
        if r[0].startswith("packed, "):
            assert (r[2], r[4]) == ("-", "-")
        else:
            assert r[0].startswith("split, in-order off, ")
            assert float(r[2].replace(",", "")) > 0
    assert "# old '-': 12 row(s) the old revision did not produce" in out
    old_file, _ = compare_trees(out)
    assert str(old_file.parent.parent) not in _worktree_paths()


def test_compare_child_refuses_a_virtq_from_another_tree(tmp_path):
    """Without PYTHONPATH pointing at the tree, the child finds the working tree's virtq
    and must say so rather than measure the wrong code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "compare.py"), "--child",
                           str(tmp_path), "--results", str(tmp_path / "r.json"), "--", "ring"],
                          capture_output=True, text=True, timeout=60, check=False, env=env)
    assert done.returncode == 3, done.stderr
    assert "PYTHONPATH did not win" in done.stderr
    assert not (tmp_path / "r.json").exists()


# -- the naive references ---------------------------------------------------------------------


def bench_module(name):
    """A module of benchmarks/ (they import each other by plain name)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    return importlib.import_module(name)


@settings(max_examples=200, deadline=None)
@given(ring=st.sampled_from(["split", "packed"]), in_order=st.booleans(),
       # (chains in the batch, event flags, where the event is relative to the batch start)
       # (DESC, the event-idx form, most often; ENABLE, DISABLE and the reserved 3 too)
       rounds=st.lists(st.tuples(st.integers(1, 5), st.sampled_from([2, 2, 2, 0, 1, 3]),
                                 st.integers(-8, 15)), min_size=1, max_size=40))
def test_naive_rings_take_virtq_s_kick_decisions(ring, in_order, rounds):
    """The fair references decide to notify exactly when virtq does (event idx: VIRTIO 1.2
    §2.7.10 / §2.8.10), whatever the device's suppression words say, across the ring's end,
    and get every chain back in order with the lengths virtq reports."""
    echo = bench_module("echo_device")
    naive_split = bench_module("naive_ring")
    naive_packed = bench_module("naive_packed_ring")
    n = 8
    layout = ring_layout(n, buffer_size=64, ring=ring)
    with MemfdRegion(layout.nbytes) as r1, MemfdRegion(layout.nbytes) as r2:
        q = make_queue(r1, layout, iova=0x1000_0000, event_idx=True, in_order=in_order)
        mem = r2.view(0, layout.nbytes)
        if ring == "packed":
            naive = naive_packed.NaivePackedRing(mem, n, layout.desc, layout.device_event,
                                                 event_idx=True, in_order=in_order)
            devs = [echo.PackedEcho(r, layout, in_order=in_order) for r in (r1, r2)]
            events = [dev.dev_ev for dev in devs]
        else:
            cls = naive_split.NaiveInOrderRing if in_order else naive_split.NaiveRing
            naive = cls(mem, n, layout.desc, layout.avail, layout.used, event_idx=True)
            devcls = echo.SplitInOrderEcho if in_order else echo.SplitEcho
            devs = [devcls(r, layout) for r in (r1, r2)]
            events = [dev.used_h for dev in devs]  # used.flags at u16 0, avail_event 2 + 4n
        try:
            token = 0
            # Batches of up to 5 chains of 1 and 2 descriptors: at most 7 of the 8.
            for batch, flags, rel in rounds:
                if ring == "packed":
                    # The descriptor count `rel` past the next available one, as off_wrap
                    # (counts repeat every 2n: position, and wrap 1 in the first lap).
                    t = (naive.next + n * (1 - naive.wrap) + rel) % (2 * n)
                    words = (t % n | (1 ^ t // n) << 15, flags)
                else:
                    # used.flags (NO_NOTIFY, ignored with event idx) and avail_event
                    words = (flags & 1, (naive.next_avail + rel) & 0xFFFF)
                for ev in events:
                    if ring == "packed":
                        ev[0], ev[1] = words
                    else:
                        ev[0], ev[2 + 4 * n] = words
                chains = [([(0x1000_0000, 8)], [(0x1000_0040, 16)] if k % 2 else [], token + k)
                          for k in range(batch)]
                q.add_many(chains)
                naive.add_many(chains)
                token += batch
                assert q.publish() == naive.publish()
                for dev in devs:
                    dev.complete_all()
                assert q.drain_used() == naive.drain_used()
        finally:
            for dev in devs:
                dev.close()
            q.close()
            mem.release()


# -- benchutil ----------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal():
    pipe, tty = io.StringIO(), _Terminal()
    for stream in (pipe, tty):
        bar = ProgressBar("QD 32 batch", stream)
        bar.show(0.5)
        bar.show(2.0)  # clamped
        bar.close()
    assert pipe.getvalue() == ""
    drawn = tty.getvalue()
    assert drawn.count("\r") == 3
    assert "50%" in drawn
    assert "150%" not in drawn and "200%" not in drawn
    assert drawn.endswith("100%\n")


def test_markdown_table_and_its_errors():
    assert markdown_table(["a", "b"], [[1, "x"]], "lr") == "| a | b |\n|---|---:|\n| 1 | x |"
    with pytest.raises(ArgumentError, match="has 1 cells"):
        markdown_table(["a", "b"], [[1]])
    with pytest.raises(ArgumentError, match="align"):
        markdown_table(["a", "b"], [], "l")


def test_results_round_trip_and_io_stats(tmp_path):
    r = Results("x", "title")
    r.add("row", "IOPS", 10, "higher")
    with pytest.raises(ArgumentError, match="better"):
        r.add("row", "IOPS", 10, "more")
    r.write(tmp_path / "r.json")
    data = read_results(tmp_path / "r.json")
    assert data["values"] == [{"row": "row", "metric": "IOPS", "value": 10.0,
                               "better": "higher"}]
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ArgumentError, match="no values"):
        read_results(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ArgumentError, match="a benchmark results file"):
        read_results(tmp_path / "bad.json")
    with pytest.raises(VirtqOSError) as err:
        read_results(tmp_path / "missing.json")
    assert err.value.errno == errno.ENOENT
    row = io_stats([3000, 1000, 2000, 4000], 4, 2.0, 0.5, 1.0)
    assert row == {"iops": 2.0, "p50": 3.0, "p99": 4.0, "cpu_us": 125000.0, "cpu_util": 0.25,
                   "backend_cpu_us": 250000.0, "backend_util": 0.5}
    with pytest.raises(ArgumentError, match="no requests completed"):
        io_stats([], 0, 1.0, 0.0)
