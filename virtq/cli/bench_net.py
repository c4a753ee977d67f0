"""Packets per second of virtq's NetDevice against dpdk-testpmd, next to DPDK's own C
virtio-user driver doing the same work against the same kind of back-end, in one run.

    python -m virtq.cli.bench_net [--seconds 3] [--frame-size 64] [--batch 32] [--pairs 1,2]
                                  [--ring split|packed] [--in-order off|on]

* **TX**: the back-end (testpmd ``net_vhost0``) runs ``rxonly`` and counts; the front-end
  transmits as fast as it can -- virtq's :meth:`NetDevice.send_batch`, or a second testpmd
  with ``net_virtio_user0`` in ``txonly`` mode.  The rate is what the back-end counted.
* **RX**: the back-end runs ``txonly`` and floods the front-end's receiveq; the rate is what
  the front-end received (virtq's :meth:`NetDevice.recv_batch`, or the C front-end's
  ``rxonly`` counter).

``--pairs 1,2`` measures each count of queue pairs (VIRTIO_NET_F_MQ) in turn, against a
back-end serving exactly that many (``net_vhost0,queues=N``, ``--rxq=N --txq=N``, one
forwarding lcore for all of them): virtq transmits on its pairs in turn and receives with
:meth:`NetDevice.recv_any` (one sleep on every receiveq); the C driver is a virtio-user with
``queues=N``.

Both front-ends run the same ring (``--ring``, ``--in-order``): virtq's NetDevice is built
with ``ring=`` and ``in_order=`` (and checked to have negotiated them), DPDK's with the
``packed_vq=`` and ``in_order=`` devargs of ``net_virtio_user`` (which would otherwise ask
for VIRTIO_F_IN_ORDER whatever virtq does).  Both take VIRTIO_NET_F_MRG_RXBUF when the
back-end offers it.

Placement on a 2-CPU machine: the back-end's forwarding lcore is CPU 1; the front-end's
data path runs on CPU 0 (this process is pinned there; the C front-end's forwarding lcore
is 0 too).  "CPU µs/pkt" is the front-end's user+system CPU time over the window divided by
the packets: for virtq this process (``psutil``), for the C driver its whole testpmd
process -- a poll-mode driver burns one core whatever the rate, so that is its cost too.
Numbers are for comparison within one run only; no absolute claim is made.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from virtq.cli import _args, plot
from virtq.cli.benchutil import Results, cpu_seconds, host_line, markdown_table
from virtq.devices import NetDevice
from virtq.testing.testpmd import TestPmd

#: The target of issue 5: virtq's rate within this factor of the C driver's.
TARGET_RATIO = 10.0


@dataclass
class Result:
    """One row: ``packets`` moved in ``seconds`` by ``driver`` in ``direction``, costing it
    ``cpu_seconds``."""

    direction: str  # "TX" or "RX"
    driver: str
    packets: int
    seconds: float
    cpu_seconds: float
    pairs: int = 1
    ring: str = "split"  # the ring format, and "in-order" when VIRTIO_F_IN_ORDER is on

    @property
    def pps(self) -> float:
        """Packets per second (0 for an empty window)."""
        return self.packets / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_packet(self) -> float:
        """The front-end's CPU µs per packet (infinite when none moved)."""
        return self.cpu_seconds * 1e6 / self.packets if self.packets else float("inf")


@contextlib.contextmanager
def _pinned(cpu: int) -> Iterator[None]:
    """Run this process on ``cpu`` only (the CPU the C front-end's data path gets)."""
    before = os.sched_getaffinity(0)
    target = {cpu} if cpu in before else before
    os.sched_setaffinity(0, target)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _frames(size: int, count: int) -> list[bytes]:
    # Broadcast destination, locally administered source, IPv4 ethertype, then a counter:
    # distinct frames, as a traffic generator would send.
    head = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"
    body = size - len(head)
    return [head + i.to_bytes(4, "little") + bytes(body - 4) for i in range(count)]


def _ring(args: argparse.Namespace) -> str:
    """The ring column of a row: the format, and "in-order" when it is on."""
    return str(args.ring) + (" in-order" if args.in_order == "on" else "")


def _connect(sock: Path, args: argparse.Namespace, poll: bool, pairs: int) -> NetDevice:
    """virtq's NetDevice on the ring the run asks for.  Raises ``RuntimeError`` when it
    negotiated another one, and what NetDevice raises."""
    in_order = args.in_order == "on"
    rings: dict[str, Any] = {"ring": args.ring, "in_order": in_order}
    if "ring" not in inspect.signature(NetDevice.connect_vhost_user).parameters:
        # An older virtq (benchmarks/compare.py): split rings only, never in order.
        if (args.ring, in_order) != ("split", False):
            raise RuntimeError("this virtq's NetDevice has split rings only")
        rings = {}
    if pairs != 1:
        # (Only then: an older virtq, benchmarks/compare.py, has no queue_pairs.)
        rings["queue_pairs"] = pairs
    dev = NetDevice.connect_vhost_user(sock, queue_size=args.queue_size, poll=poll, **rings)
    got = (getattr(dev, "ring", "split"), getattr(dev, "in_order", False))
    if got != (args.ring, in_order):
        dev.close()
        raise RuntimeError(f"virtq negotiated {got[0]} in_order={got[1]}, not "
                           f"{args.ring} in_order={in_order}")
    return dev


# -- virtq ------------------------------------------------------------------------------------


def virtq_tx(backend: TestPmd, sock: Path, args: argparse.Namespace, poll: bool,
             pairs: int = 1) -> Result:
    """virtq transmits batches for ``args.seconds`` (on ``pairs`` queue pairs in turn); the
    rate is what ``backend`` counted.  Raises ``RuntimeError`` if the back-end counted
    another number of frames than were sent, and what NetDevice and TestPmd raise."""
    backend.set_forward_mode("rxonly")
    backend.start_forwarding()
    frames = _frames(args.frame_size, args.batch)
    me = psutil.Process()
    with _connect(sock, args, poll, pairs) as dev:
        backend.wait_link(True)
        send = dev.send_batch
        each = range(pairs)
        # Every warm-up frame is counted before the counters are zeroed (counting from
        # what the back-end had counted before: the C driver's run used it too).
        warm = backend.port_stats().rx_packets
        warm_end = time.monotonic() + args.warmup
        while time.monotonic() < warm_end:
            if pairs == 1:
                warm += send(frames, timeout=5)
            else:
                for k in each:
                    warm += send(frames, pair=k, timeout=5)
        backend.wait_rx_packets(warm, timeout=5)
        backend.clear_stats()
        sent = 0
        c0, t0 = cpu_seconds(me), time.perf_counter()
        end = t0 + args.seconds
        while True:
            if pairs == 1:
                # (No pair=: the one-pair loop is the same code an older virtq runs,
                # benchmarks/compare.py.)
                for _ in range(64):
                    sent += send(frames, timeout=5)
            else:
                for _ in range(64):
                    for k in each:
                        sent += send(frames, pair=k, timeout=5)
            if time.perf_counter() >= end:
                break
        t1, c1 = time.perf_counter(), cpu_seconds(me)
        # Every frame sent must reach the back-end: the rate is what it counted.
        stats = backend.wait_rx_packets(sent, timeout=5)
    backend.wait_link(False)
    if stats.rx_packets != sent:
        raise RuntimeError(f"virtq sent {sent} frames, testpmd counted {stats.rx_packets}")
    mode = "poll" if poll else "notify"
    return Result("TX", f"virtq ({mode})", stats.rx_packets, t1 - t0, c1 - c0, pairs,
                  _ring(args))


def virtq_rx(backend: TestPmd, sock: Path, args: argparse.Namespace, poll: bool,
             pairs: int = 1) -> Result:
    """``backend`` floods virtq's receiveqs (``pairs`` of them) for ``args.seconds``; the
    rate is what virtq received.  Raises what NetDevice and TestPmd raise."""
    backend.set_forward_mode("txonly")
    me = psutil.Process()
    with _connect(sock, args, poll, pairs) as dev:
        backend.wait_link(True)
        backend.start_forwarding()
        # Several pairs: one call takes what every receiveq has (and sleeps on all).
        recv: Callable[[int, float], Sized] = dev.recv_batch if pairs == 1 else dev.recv_any
        wait = 0 if poll else 0.1
        warm_end = time.monotonic() + args.warmup
        while time.monotonic() < warm_end:
            recv(args.queue_size, wait)
        got = 0
        c0, t0 = cpu_seconds(me), time.perf_counter()
        end = t0 + args.seconds
        while True:
            for _ in range(64):
                got += len(recv(args.queue_size, wait))
            if time.perf_counter() >= end:
                break
        t1, c1 = time.perf_counter(), cpu_seconds(me)
        backend.stop_forwarding()
    backend.wait_link(False)
    mode = "poll" if poll else "notify"
    return Result("RX", f"virtq ({mode})", got, t1 - t0, c1 - c0, pairs, _ring(args))


# -- DPDK's C virtio-user ---------------------------------------------------------------------


def _c_window(counter: TestPmd, cpu_of: TestPmd, rx: bool, seconds: float) -> tuple[int, float,
                                                                                   float]:
    """(packets, seconds, front-end CPU seconds) over a window read from ``counter``."""
    assert cpu_of.pid is not None
    fe = psutil.Process(cpu_of.pid)
    s0 = counter.port_stats()
    t0, c0 = time.perf_counter(), cpu_seconds(fe)
    time.sleep(seconds)
    s1 = counter.port_stats()
    t1, c1 = time.perf_counter(), cpu_seconds(fe)
    packets = s1.rx_packets - s0.rx_packets if rx else s1.tx_packets - s0.tx_packets
    return packets, t1 - t0, c1 - c0


def c_tx(backend: TestPmd, sock: Path, args: argparse.Namespace, pairs: int = 1) -> Result:
    """:func:`virtq_tx` with DPDK's C virtio-user (a second testpmd, ``txonly``)."""
    backend.set_forward_mode("rxonly")
    backend.start_forwarding()
    with TestPmd.virtio_user(sock, forward_mode="txonly", queue_size=args.queue_size,
                             txpkts=args.frame_size, queues=pairs,
                             packed_vq=args.ring == "packed",
                             in_order=args.in_order == "on") as fe:
        backend.wait_link(True)
        fe.start_forwarding()
        time.sleep(args.warmup)
        packets, secs, cpu = _c_window(backend, fe, rx=True, seconds=args.seconds)
        fe.stop_forwarding()
    backend.wait_link(False)
    return Result("TX", "DPDK virtio-user (C)", packets, secs, cpu, pairs, _ring(args))


def c_rx(backend: TestPmd, sock: Path, args: argparse.Namespace, pairs: int = 1) -> Result:
    """:func:`virtq_rx` with DPDK's C virtio-user (a second testpmd, ``rxonly``)."""
    backend.set_forward_mode("txonly")
    with TestPmd.virtio_user(sock, forward_mode="rxonly", queue_size=args.queue_size,
                             queues=pairs, packed_vq=args.ring == "packed",
                             in_order=args.in_order == "on") as fe:
        backend.wait_link(True)
        fe.start_forwarding()
        backend.start_forwarding()
        time.sleep(args.warmup)
        packets, secs, cpu = _c_window(fe, fe, rx=True, seconds=args.seconds)
        backend.stop_forwarding()
        fe.stop_forwarding()
    backend.wait_link(False)
    return Result("RX", "DPDK virtio-user (C)", packets, secs, cpu, pairs, _ring(args))


# -- report ----------------------------------------------------------------------------------


def table(results: Sequence[Result]) -> str:
    """The Markdown table of ``results``, each row next to the C driver's in its
    direction with as many queue pairs."""
    c = {(r.direction, r.pairs): r for r in results if "(C)" in r.driver}
    rows = []
    for r in results:
        base = c.get((r.direction, r.pairs))
        if base is None or r is base:
            ratio = cpu_ratio = "1.0" if base else "-"
            verdict = "-"
        else:
            x = base.pps / r.pps if r.pps else float("inf")
            ratio, verdict = f"{x:.1f}", "yes" if x <= TARGET_RATIO else "no"
            cpu_ratio = f"{r.cpu_us_per_packet / base.cpu_us_per_packet:.1f}"
        who = r.driver if r.pairs == 1 else f"{r.driver}, {r.pairs} pairs"
        rows.append([r.direction, r.ring, who, r.packets, f"{r.pps / 1e6:.3f}", ratio,
                     f"{r.cpu_us_per_packet:.3f}", cpu_ratio, verdict])
    return markdown_table(
        ["dir", "ring", "front-end driver", "packets", "Mpps", "C rate / this", "CPU µs/pkt",
         "this CPU / C CPU", f"rate within {TARGET_RATIO:g}x of C"], rows, "lllrrrrrl")


def _rounds(backend: TestPmd, sock: Path, args: argparse.Namespace, modes: list[bool],
            pairs: int, totals: dict[tuple[str, str, int], Result]) -> None:
    """Both directions' interleaved rounds on ``backend``, with ``pairs`` queue pairs, added
    into ``totals``."""
    for direction in ("TX", "RX"):
        for rnd in range(args.rounds):
            measured = []
            if not args.skip_c:
                measured.append((c_tx if direction == "TX" else c_rx)(
                    backend, sock, args, pairs))
            with _pinned(0):
                for poll in modes:
                    run = virtq_tx if direction == "TX" else virtq_rx
                    measured.append(run(backend, sock, args, poll, pairs))
            for r in measured:
                print(f"# {direction} {pairs} pair(s) round {rnd + 1}: {r.driver}: "
                      f"{r.pps / 1e6:.3f} Mpps", file=sys.stderr)
                key = (r.direction, r.driver, r.pairs)
                if key in totals:
                    t = totals[key]
                    t.packets += r.packets
                    t.seconds += r.seconds
                    t.cpu_seconds += r.cpu_seconds
                else:
                    totals[key] = r


def main(argv: Sequence[str] | None = None) -> int:
    """``virtq bench net [options]``: start testpmd, run the rounds, print the table
    (``--json``: write the numbers too).  Returns 0; argparse exits on bad options; a
    back-end that cannot start raises :class:`~virtq.testing.runners.BackendError`."""
    ap = argparse.ArgumentParser(prog="virtq bench net",
                                 description=_args.plain(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=_args.seconds(), default=3.0,
                    help="measurement window per row")
    ap.add_argument("--warmup", type=_args.seconds(allow_zero=True), default=0.5,
                    help="seconds before each window")
    # Ethernet frames without FCS: 60..1514 bytes (IEEE 802.3 minimum and maximum).
    ap.add_argument("--frame-size", type=_args.int_in(60, 1514), default=64,
                    help="bytes per frame (no FCS), 60..1514")
    ap.add_argument("--batch", type=_args.positive_int, default=32,
                    help="frames per virtq send_batch (at most the queue size)")
    ap.add_argument("--queue-size", type=_args.queue_size, default=256)
    ap.add_argument("--mode", choices=("poll", "notify", "both"), default="both",
                    help="virtq: busy-poll, sleep on notifications, or both rows")
    ap.add_argument("--rounds", type=_args.positive_int, default=2,
                    help="interleaved rounds per direction (rows sum them)")
    ap.add_argument("--skip-c", action="store_true", help="no DPDK virtio-user baseline")
    ap.add_argument("--pairs", type=_args.int_list(_args.int_in(1, 8)), default=[1],
                    help="queue pair counts to measure, comma-separated (1..8; default 1)")
    ap.add_argument("--ring", choices=("split", "packed"), default="split",
                    help="ring format of both front-ends (VIRTIO 1.2 §2.7 / §2.8)")
    ap.add_argument("--in-order", choices=("off", "on"), default="off",
                    help="VIRTIO_F_IN_ORDER for both front-ends")
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("--plot", metavar="FILE.png",
                    help="also draw the table: Mpps and CPU per packet of virtq next to "
                         "DPDK's C driver (needs matplotlib: virtq[plot])")
    args = _args.parse(ap, list(argv) if argv is not None else None)
    if args.plot:
        plot.require()  # before the measuring, not after
    if args.batch > args.queue_size:
        ap.error(f"--batch {args.batch}: more than --queue-size {args.queue_size}")
    modes = {"poll": [True], "notify": [False], "both": [True, False]}[args.mode]

    title = (f"bench net: {host_line()}, {args.frame_size}-byte frames, queue size "
             f"{args.queue_size}, {_ring(args)} ring, virtq batch {args.batch}, "
             f"{args.rounds} x {args.seconds:g} s per row")
    print(f"# {title}")
    print("# back-end: dpdk-testpmd net_vhost0 (--no-huge), forwarding lcore on CPU 1; "
          "front-end data path on CPU 0")
    # Rounds interleave the drivers, so a noisy neighbour on the machine hits them alike;
    # each row sums its rounds (packets, seconds and CPU time).
    totals: dict[tuple[str, str, int], Result] = {}
    with tempfile.TemporaryDirectory(prefix="virtq-bench-net-") as tmp:
        sock = Path(tmp) / "vhost-net.sock"
        for pairs in args.pairs:
            # A back-end serving exactly this many pairs: each count is measured alike.
            with TestPmd.vhost(sock, txpkts=args.frame_size, queues=pairs) as backend:
                _rounds(backend, sock, args, modes, pairs, totals)
    results = list(totals.values())
    print(table(results))
    if args.json:
        out = Results("net", title)
        for r in results:
            row = (f"{r.direction} {r.ring} {r.driver}"
                   + (f" {r.pairs} pairs" if r.pairs > 1 else ""))
            mine = "(C)" not in r.driver  # the C driver's rows are a control, not judged
            out.add(row, "Mpps", r.pps / 1e6, "higher" if mine else None)
            out.add(row, "CPU µs/pkt", r.cpu_us_per_packet, "lower" if mine else None)
        out.write(args.json)
    if args.plot:
        draw(args.plot, title, results)
        print(f"plot: {args.plot}")
    return 0


def draw(path: str, title: str, results: list[Result]) -> None:
    """``--plot``: Mpps and CPU-µs per packet by direction, a bar per front-end driver (the
    C driver is the reference).  Raises what :func:`virtq.cli.plot.bar_charts` raises."""
    directions = [d for d in ("TX", "RX") if any(r.direction == d for r in results)]
    drivers = list(dict.fromkeys(r.driver for r in results))
    by = {(r.direction, r.driver): r for r in results}

    def series(value: Callable[[Result], float]) -> dict[str, list[float | None]]:
        return {drv: [value(by[d, drv]) if (d, drv) in by else None for d in directions]
                for drv in drivers}

    plot.bar_charts(path, title, [
        plot.Panel("Mpps", directions, series(lambda r: r.pps / 1e6)),
        plot.Panel("CPU-µs per packet", directions, series(lambda r: r.cpu_us_per_packet),
                   lower_is_better=True)])


if __name__ == "__main__":
    sys.exit(main())
