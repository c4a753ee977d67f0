"""``virtq bench profile``: one request split into its stages, in ns, next to the CPython
floor of comparable work measured in the same run.

Four tables:

* **floor**: what the cheapest Python-level operation of each kind costs on this host, now
  (best of three passes of ``--floor-ops`` iterations; the empty loop is subtracted from
  the others): an empty ``for`` iteration, an attribute store on a ``__slots__`` object,
  one precompiled ``struct.Struct.pack_into`` (a 16-byte descriptor) and ``unpack_from``
  (an 8-byte used element), a 16-byte slice copy between memoryviews, an
  ``os.eventfd_write`` (a kick, as vhost-user sends it), and a ``select.poll`` call over
  one eventfd that is not ready (the syscall a wait makes).
* **blk**: 4 KiB random reads, zero-copy, ``--depth`` (32) in flight through
  :class:`~virtq.devices.BlkDevice` over a real qemu-storage-daemon, refilled the way
  ``virtq bench blk --modes batch`` refills them (sleep until 3/8 of the depth completed).
  Each round of the loop is timed stage by stage with ``time.perf_counter_ns`` around the
  whole batch (never per request), and each stage's total is divided by the requests:
  *submit* (``submit_read_many``: slots, header ``pack_into``, the template's chains, one
  request object each), *publish + fence* (the avail index store behind its fence and the
  kick decision, VIRTIO 1.2 §2.7.13), *notify* (the kick's ``eventfd_write``, when the
  device asked for one), *wait* (arm the used-event, re-check, ``poll`` and drain the call
  eventfd: wall time, which includes the device's work, and this thread's CPU time),
  *reap + validate* (``drain_used``: read used elements, check each id and length,
  §2.7.8), *complete* (status byte, request fields).  "floor" is the comparable work a
  request cannot avoid in CPython, built from the floor table; "x floor" is how far the
  stage is from it.
* **net**: 64-byte frames in batches of 32 through :class:`~virtq.devices.NetDevice` in
  poll mode against a real dpdk-testpmd (``net_vhost``), split and packed rings: TX
  (``send_batch`` to testpmd in rxonly mode) and RX (``recv_batch`` while testpmd floods
  in txonly mode).  NetDevice's own calls are wrapped with timers -- *check frames*
  (lengths, all or nothing), *submit* / *re-post* (the slot queue's lengths and avail
  entries), *publish + fence*, *notify*, *reap + validate* (used elements, §2.7.8 /
  §2.8.4), *wait for room* (TX: spinning on a full ring) -- and *copy in* / *copy out* is
  the rest of the call (the frame bytes, the loop around them).  RX counts only the polls
  that found frames; the others are shown apart.  ``--skip-net`` leaves it out.
* **ring**: the driver side of a 3-descriptor chain (a blk request's shape) on a split and
  a packed ring, 32 chains per batch, event idx on, no indirect descriptors: *add*
  (``add_many``), *publish* (with the fence and the kick decision) and *reap*
  (``drain_used``).  The device side (virtq's own test device, not timed) completes every
  chain between publish and reap.

Absolute numbers depend on the host and on what else runs on it; the ratios to the floor
measured in the same run are the point.
"""

from __future__ import annotations

import argparse
import os
import select
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virtq.cli import _args
from virtq.cli.benchutil import Results, host_line, markdown_table
from virtq.devices import BlkDevice
from virtq.layout import PackedLayout
from virtq.memory import MemfdRegion
from virtq.queue.factory import make_queue, ring_layout
from virtq.testing.device import DeviceQueue
from virtq.testing.packed_device import PackedDeviceQueue
from virtq.types import Iova

IO = 4096
RING_SIZE = 256
RING_BATCH = 32
RING_IOVA = 0x10_0000_0000

#: The floor operations: key -> what the table calls it.
FLOOR_OPS = {
    "loop": "empty for-loop iteration",
    "attr": "attribute store (__slots__)",
    "pack_into": "precompiled Struct.pack_into (16 bytes, 4 fields)",
    "unpack_from": "precompiled Struct.unpack_from (8 bytes)",
    "slice16": "16-byte slice copy (memoryview)",
    "eventfd_write": "os.eventfd_write",
    "poll": "select.poll().poll(0), one fd",
}


class _Obj:
    __slots__ = ("x",)

    def __init__(self) -> None:
        self.x = 0


def _best(fn: Callable[[range], None], n: int) -> float:
    """ns per iteration of ``fn(range(n))``, best of three passes."""
    pc = time.perf_counter_ns
    best = float("inf")
    r = range(n)
    for _ in range(3):
        t = pc()
        fn(r)
        best = min(best, (pc() - t) / n)
    return best


def measure_floor(n: int) -> dict[str, float]:
    """ns per operation of each :data:`FLOOR_OPS` entry (the empty loop subtracted from
    the others, never below 0).  Raises ``OSError`` from ``os.eventfd`` (a kernel without
    eventfds)."""
    obj = _Obj()
    # A 16-byte, four-field record (the size and shape of a ring descriptor).
    desc = struct.Struct("<qiHh")
    used = struct.Struct("<II")
    buf = bytearray(4096)
    mem = memoryview(buf)
    src = memoryview(bytes(range(16)))
    pack, unpack = desc.pack_into, used.unpack_from

    def loop(r: range) -> None:
        for _ in r:
            pass

    def attr(r: range) -> None:
        # Eight stores per iteration: one alone is within the loop's own noise.
        o = obj
        for i in r:
            o.x = i
            o.x = i
            o.x = i
            o.x = i
            o.x = i
            o.x = i
            o.x = i
            o.x = i

    def pack_into(r: range) -> None:
        m = mem
        for i in r:
            pack(m, 16, 0x1000, 4096, 3, i & 0x7FFF)

    def unpack_from(r: range) -> None:
        m = mem
        for _ in r:
            unpack(m, 8)

    def slice16(r: range) -> None:
        m, s = mem, src
        for _ in r:
            m[64:80] = s

    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        write = os.eventfd_write

        def eventfd_write(r: range) -> None:
            for _ in r:
                write(efd, 1)
            os.eventfd_read(efd)  # back to 0: the counter never nears its limit

        p = select.poll()
        p.register(efd, select.POLLIN)
        poll = p.poll

        def poll_call(r: range) -> None:
            for _ in r:
                poll(0)

        out = {"loop": _best(loop, n)}
        syscalls = max(1000, n // 20)  # a syscall is ~20x a field store
        for key, fn, count in (("attr", attr, n), ("pack_into", pack_into, n),
                               ("unpack_from", unpack_from, n), ("slice16", slice16, n),
                               ("eventfd_write", eventfd_write, syscalls),
                               ("poll", poll_call, syscalls)):
            per = 8 if key == "attr" else 1
            out[key] = max(0.0, _best(fn, count) - out["loop"]) / per
    finally:
        os.close(efd)
    return out


# -- blk through BlkDevice over qemu-storage-daemon --------------------------------------------

BLK_STAGES = ("submit", "publish + fence", "notify", "wait", "reap + validate", "complete")


def blk_floor(f: dict[str, float], batch: float) -> dict[str, float]:
    """The CPython floor of each blk stage per request, from the floor table, for rounds
    of ``batch`` requests: what the stage must do, done with the cheapest op of its kind.

    - submit: a loop iteration, the request header's ``pack_into``, and the request object
      (a handful of field stores: 4 counted);
    - publish + fence: one index store per round (the fence is free in CPython);
    - notify: one ``eventfd_write`` per round;
    - wait: one ``poll`` per round (the eventfd's drain is not counted);
    - reap + validate: a loop iteration and an ``unpack_from`` of the used element;
    - complete: a loop iteration and two field stores (status, length)."""
    return {
        "submit": f["loop"] + f["pack_into"] + 4 * f["attr"],
        "publish + fence": f["attr"] / batch,
        "notify": f["eventfd_write"] / batch,
        "wait": f["poll"] / batch,
        "reap + validate": f["loop"] + f["unpack_from"],
        "complete": f["loop"] + 2 * f["attr"],
    }


def profile_blk(socket_path: Path, depth: int, seconds: float) -> dict[str, float]:
    """Stage ns per request (keys :data:`BLK_STAGES`, plus ``wait cpu``, ``requests``,
    ``rounds``, ``kicks`` and ``total cpu`` (this process's CPU per request over the
    loop)) for ``depth`` zero-copy 4 KiB reads in flight, batch-mode refills.  Raises
    what the device raises, and :class:`RuntimeError` when a request fails."""
    from virtq.cli.bench_blk import batch_size, read_targets  # noqa: PLC0415 - one bench

    want = batch_size(depth)
    queue_size = 1 << max(7, (3 * depth - 1).bit_length())
    targets = read_targets(depth)
    totals = dict.fromkeys(BLK_STAGES, 0)
    wait_cpu = 0
    done_total = rounds = kicks = 0
    with BlkDevice.connect_vhost_user(socket_path, queue_size=queue_size, max_io=IO) as dev:
        dev.submit_read_many(targets[:depth], IO)  # warm up
        dev.wait(timeout=10)
        arena = dev.alloc_buffer(IO * depth)
        free = [arena.slice(i * IO, IO) for i in range(depth)]
        q = dev.queues[0]
        notify = dev.transport.notify
        waiter = dev.waiter
        # The stages below are the ones BlkDevice.poll() runs (kick, wait, _reap): called
        # one by one here so each can be timed (stats() does not count these completions).
        complete = dev._complete
        owner: dict[object, Any] = {}
        pc = time.perf_counter_ns
        tt = time.thread_time_ns
        k = 0
        done: list[Any] = []
        cpu0 = time.process_time_ns()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            bufs, free = free, []
            n = len(bufs)
            t0 = pc()
            reqs = dev.submit_read_many(targets[k : k + n], into=bufs)
            t1 = pc()
            kick = q.publish()
            t2 = pc()
            if kick:
                notify(0)
                kicks += 1
            t3 = pc()
            owner.update(zip(reqs, bufs, strict=True))
            k = (k + n) & 0xFFFF
            done.clear()
            deadline = time.monotonic() + 10
            while len(done) < want:
                c4 = tt()
                t4 = pc()
                woke = waiter.wait(deadline, want - len(done))
                t5 = pc()
                c5 = tt()
                if not woke:
                    raise RuntimeError(f"qemu-storage-daemon completed {len(done)} of "
                                       f"{want} requests in 10 s")
                got = q.drain_used()
                t6 = pc()
                complete(got, done)
                t7 = pc()
                totals["wait"] += t5 - t4
                wait_cpu += c5 - c4
                totals["reap + validate"] += t6 - t5
                totals["complete"] += t7 - t6
            totals["submit"] += t1 - t0
            totals["publish + fence"] += t2 - t1
            totals["notify"] += t3 - t2
            for req in done:
                if req.error is not None:
                    raise RuntimeError(f"request failed: {req.error!r}")
                free.append(owner.pop(req))
            done_total += len(done)
            rounds += 1
        cpu = time.process_time_ns() - cpu0
        dev.wait(timeout=10)
        # Before the device closes its memory: nothing may still view the buffers.
        del free, bufs, arena, reqs, done, got
        owner.clear()
    per = {stage: totals[stage] / done_total for stage in BLK_STAGES}
    per["wait cpu"] = wait_cpu / done_total
    per["total cpu"] = cpu / done_total
    per["requests"] = done_total
    per["rounds"] = rounds
    per["kicks"] = kicks
    return per


# -- the ring path, split and packed -------------------------------------------------------------

RING_STAGES = ("add", "publish", "reap")


def ring_floor(f: dict[str, float], chain: int, batch: int) -> dict[str, float]:
    """The CPython floor per chain of each ring stage: add = a loop iteration and one
    ``pack_into`` per descriptor, plus the avail entry (a field store); publish = one
    index store per batch; reap = a loop iteration and one ``unpack_from`` per used
    element."""
    return {"add": f["loop"] + chain * f["pack_into"] + f["attr"],
            "publish": f["attr"] / batch,
            "reap": f["loop"] + f["unpack_from"]}


def profile_ring(ring: str, seconds: float) -> dict[str, float]:
    """ns per 3-descriptor chain of add_many / publish / drain_used on ``ring`` ("split"
    or "packed"), 32 chains per batch, event idx on; the medians over the batches.  The
    test device completes the chains between publish and reap (not timed).  Raises
    :class:`RuntimeError` when a chain does not come back."""
    layout = ring_layout(RING_SIZE, buffer_size=64, ring=ring)
    region = MemfdRegion(layout.nbytes)
    dev: Any = None
    q: Any = None
    try:
        q = make_queue(region, layout, iova=Iova(RING_IOVA), event_idx=True)
        if isinstance(layout, PackedLayout):
            dev = PackedDeviceQueue(region, layout, iova=RING_IOVA, event_idx=True)
        else:
            dev = DeviceQueue(region, layout, iova=RING_IOVA, event_idx=True)
        assert layout.buffers is not None  # asked for by buffer_size
        buf = RING_IOVA + layout.buffers
        chains = [([(buf, 16), (buf + 16, 16)], [(buf + 32, 16)], i)
                  for i in range(RING_BATCH)]
        add_many, publish, drain = q.add_many, q.publish, q.drain_used
        pop, push, publish_used = dev.pop, dev.push, dev.publish_used
        pc = time.perf_counter_ns
        samples: dict[str, list[int]] = {s: [] for s in RING_STAGES}
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(20):
                t0 = pc()
                add_many(chains)
                t1 = pc()
                publish()
                t2 = pc()
                while (got := pop()) is not None:
                    push(got[0], 0, publish=False)
                publish_used()
                t3 = pc()
                reaped = drain()
                t4 = pc()
                if len(reaped) != RING_BATCH:
                    raise RuntimeError(f"{ring}: reaped {len(reaped)} of {RING_BATCH}")
                samples["add"].append(t1 - t0)
                samples["publish"].append(t2 - t1)
                samples["reap"].append(t4 - t3)
    finally:
        if dev is not None:
            dev.close()
        if q is not None:
            q.close()
        region.close()
    overhead = timer_overhead()
    out = {}
    for stage, values in samples.items():
        values.sort()
        out[stage] = max(0.0, values[len(values) // 2] - overhead) / RING_BATCH
    return out


# -- net through NetDevice against dpdk-testpmd -------------------------------------------------

NET_FRAME = 64
NET_BATCH = 32
#: Stages of a transmitted batch: send_batch's calls, timed one by one; "copy in" is the
#: rest of send_batch (the frames copied into their buffers, the loop around them);
#: "wait for room" spins (poll mode) until the device completes a transmit buffer.
NET_TX_STAGES = ("check frames", "copy in", "submit", "publish + fence", "notify",
                 "reap + validate", "wait for room")
#: Stages of a received batch (a harvest that found frames): "copy out" is the rest of it
#: (each frame's bytes taken out of its buffer, the one-buffer-per-frame check).
NET_RX_STAGES = ("reap + validate", "copy out", "re-post", "publish + fence", "notify")


def net_floor(f: dict[str, float], direction: str) -> dict[str, float]:
    """The CPython floor per packet of each net stage: checking frames is a ``len()`` per
    frame in one C-level pass (counted as a loop iteration); a copy is a loop iteration
    and a slice copy (the 16-byte one of the floor table: 64 bytes cost about the same);
    submit, re-post and reap write or read one field per packet in strided C-level slices
    (counted as a field store); publish is one store and notify one ``eventfd_write``
    per batch of 32."""
    per_batch = {"publish + fence": f["attr"] / NET_BATCH,
                 "notify": f["eventfd_write"] / NET_BATCH}
    copy = f["loop"] + f["slice16"]
    if direction == "TX":
        return {"check frames": f["loop"], "copy in": copy, "submit": f["attr"],
                "reap + validate": f["attr"], "wait for room": 0.0, **per_batch}
    return {"reap + validate": f["attr"], "copy out": copy, "re-post": f["attr"],
            **per_batch}


class _Stopwatch:
    """Per-stage ns totals of wrapped calls (each call's timer overhead subtracted)."""

    def __init__(self, stages: tuple[str, ...]) -> None:
        self.ns = dict.fromkeys(stages, 0.0)
        self.overhead = timer_overhead()
        self._attached: list[tuple[object, str]] = []

    def attach(self, obj: object, **stages: str) -> None:
        """Time each method ``name`` of ``obj`` as stage ``stages[name]`` (an instance
        attribute over the class's method, until :meth:`detach`)."""
        for name, stage in stages.items():
            setattr(obj, name, self.wrap(stage, getattr(obj, name)))
            self._attached.append((obj, name))

    def detach(self) -> None:
        """Every attached method back to the class's own."""
        for obj, name in self._attached:
            delattr(obj, name)
        self._attached.clear()

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        ns = self.ns
        pc = time.perf_counter_ns
        overhead = self.overhead

        def timed(*args: Any) -> Any:
            t = pc()
            try:
                return fn(*args)
            finally:
                ns[stage] += pc() - t - overhead
        return timed


def _net_device(sock: Path, ring: str) -> Any:
    from virtq.devices import NetDevice  # noqa: PLC0415 - one profile

    return NetDevice.connect_vhost_user(sock, queue_size=RING_SIZE, poll=True, ring=ring)


def profile_net_tx(backend: Any, sock: Path, ring: str, seconds: float) -> dict[str, float]:
    """ns per packet of each :data:`NET_TX_STAGES` stage (and ``total``, ``total cpu``,
    ``packets``) while ``NetDevice.send_batch`` sends batches of 32 64-byte frames to
    ``backend`` (testpmd, rxonly) in poll mode.  Raises ``RuntimeError`` if testpmd
    counted another number of frames, and what NetDevice raises."""
    from virtq.cli.bench_net import _frames  # noqa: PLC0415 - one profile

    backend.set_forward_mode("rxonly")
    backend.start_forwarding()
    frames = _frames(NET_FRAME, NET_BATCH)
    watch = _Stopwatch(NET_TX_STAGES)
    with _net_device(sock, ring) as dev:
        backend.wait_link(True)
        start = backend.port_stats().rx_packets
        for _ in range(200):  # warm up; every frame counted before the counters are zeroed
            dev.send_batch(frames, timeout=5)
        backend.wait_rx_packets(start + 200 * NET_BATCH, timeout=5)
        backend.clear_stats()
        watch.attach(dev._tx_pairs[0].txq, reap="reap + validate", submit="submit",
                     publish="publish + fence")
        watch.attach(dev, _frame_lengths="check frames", _wait_tx_room="wait for room")
        watch.attach(dev.transport, notify="notify")
        send = dev.send_batch
        pc = time.perf_counter_ns
        sent = 0
        total = 0.0
        cpu0 = time.process_time_ns()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(64):
                t = pc()
                sent += send(frames, timeout=5)
                total += pc() - t - watch.overhead
        cpu = time.process_time_ns() - cpu0
        watch.detach()
        in_order = dev.in_order
        # Every frame sent must reach the back-end.
        stats = backend.wait_rx_packets(sent, timeout=5)
        if stats.rx_packets != sent:
            raise RuntimeError(f"virtq sent {sent} frames, testpmd counted "
                               f"{stats.rx_packets}")
    backend.stop_forwarding()
    backend.wait_link(False)
    per = {stage: ns / sent for stage, ns in watch.ns.items()}
    per["copy in"] = max(0.0, total - sum(watch.ns.values())) / sent
    per["total"] = total / sent
    per["total cpu"] = cpu / sent
    per["packets"] = sent
    per["in_order"] = float(in_order)
    return per


def profile_net_rx(backend: Any, sock: Path, ring: str, seconds: float) -> dict[str, float]:
    """ns per packet of each :data:`NET_RX_STAGES` stage (and ``total``, ``empty polls``:
    the time of harvests that found nothing, per packet received, ``total cpu``,
    ``packets``) while testpmd (txonly) floods the receiveq and ``NetDevice.recv_batch``
    polls it.  Only harvests that found frames count toward the stages.  Raises what
    NetDevice raises."""
    watch = _Stopwatch(NET_RX_STAGES)
    pc = time.perf_counter_ns
    backend.set_forward_mode("txonly")
    with _net_device(sock, ring) as dev:
        backend.wait_link(True)
        backend.start_forwarding()
        warm = time.monotonic() + 0.3
        while time.monotonic() < warm:
            dev.recv_batch(RING_SIZE, 0)
        watch.attach(dev._rx_pairs[0].rxq, reap="reap + validate", submit="re-post",
                     publish="publish + fence")
        watch.attach(dev.transport, notify="notify")
        harvest = dev._harvest_rx
        kept = dict.fromkeys(NET_RX_STAGES, 0.0)
        counts = {"packets": 0.0, "total": 0.0, "empty": 0.0}

        def timed_harvest(pair: Any) -> list[bytes]:
            watch.ns.update(dict.fromkeys(NET_RX_STAGES, 0.0))
            t = pc()
            frames: list[bytes] = harvest(pair)
            spent = pc() - t - watch.overhead
            if frames:
                counts["packets"] += len(frames)
                counts["total"] += spent
                for stage, ns in watch.ns.items():
                    kept[stage] += ns
            else:
                counts["empty"] += spent
            return frames

        dev._harvest_rx = timed_harvest
        recv = dev.recv_batch
        cpu0 = time.process_time_ns()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(64):
                recv(RING_SIZE, 0)
        cpu = time.process_time_ns() - cpu0
        del dev._harvest_rx
        watch.detach()
        in_order = dev.in_order
        backend.stop_forwarding()
    backend.wait_link(False)
    got = int(counts["packets"])
    if not got:
        raise RuntimeError("testpmd sent virtq no frames")
    per = {stage: ns / got for stage, ns in kept.items()}
    per["copy out"] = max(0.0, counts["total"] - sum(kept.values())) / got
    per["total"] = counts["total"] / got
    per["empty polls"] = counts["empty"] / got
    per["total cpu"] = cpu / got
    per["packets"] = got
    per["in_order"] = float(in_order)
    return per


def timer_overhead() -> float:
    """ns of one ``perf_counter_ns()`` call (subtracted from each timed stage)."""
    pc = time.perf_counter_ns
    n = 20000
    t = pc()
    for _ in range(n):
        pc()
    return (pc() - t) / n


# -- the command -----------------------------------------------------------------------------


def _row(stage: str, ns: float, floor: float) -> list[object]:
    # Below 1 ns: timer noise, or a stage that did not run (a notify nobody asked for).
    ratio = f"{ns / floor:.1f}x" if floor >= 1 and ns >= 1 else "-"
    return [stage, f"{ns:,.0f}", f"{floor:,.0f}", ratio]


def run(depth: int, seconds: float, floor_ops: int, *, skip_blk: bool = False,
        skip_net: bool = False, out: Callable[[str], None] = print
        ) -> tuple[Results, list[str]]:
    """Measure and print the three tables; returns the results (for ``--json``) and the
    printed lines.  Raises what :func:`profile_blk` raises, and
    :class:`~virtq.testing.runners.BackendError` when qemu-storage-daemon cannot start."""
    from virtq.cli.bench_blk import make_bench_image  # noqa: PLC0415 - one bench
    from virtq.testing.runners import QemuStorageDaemon  # noqa: PLC0415 - CLI only

    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        out(text)

    title = (f"virtq bench profile: one request in stages, ns, next to the CPython floor of "
             f"the same work measured in this run; {host_line()}")
    results = Results("profile", title)
    say(f"# {title}")
    f = measure_floor(floor_ops)
    say("")
    say(markdown_table(["floor operation", "ns"],
                       [[FLOOR_OPS[k], f"{v:,.1f}"] for k, v in f.items()], "lr"))
    for k, v in f.items():
        results.add(f"floor {k}", "ns", v, None)
    if not skip_blk:
        with tempfile.TemporaryDirectory() as tmp:
            image = make_bench_image(Path(tmp))
            with QemuStorageDaemon(image, Path(tmp) / "profile.sock") as qsd:
                per = profile_blk(qsd.socket_path, depth, seconds)
        batch = per["requests"] / per["rounds"]
        floor = blk_floor(f, batch)
        rows = [_row(s, per[s], floor[s]) for s in BLK_STAGES]
        cpu_stages = sum(per[s] for s in BLK_STAGES if s != "wait") + per["wait cpu"]
        rows.insert(4, ["wait (this thread's CPU)", f"{per['wait cpu']:,.0f}",
                        f"{floor['wait']:,.0f}",
                        f"{per['wait cpu'] / floor['wait']:.1f}x" if floor["wait"] else "-"])
        rows.append(["sum of the stages' CPU", f"{cpu_stages:,.0f}",
                     f"{sum(floor.values()):,.0f}",
                     f"{cpu_stages / sum(floor.values()):.1f}x"])
        rows.append(["process CPU per request (psutil-free: process_time)",
                     f"{per['total cpu']:,.0f}", "", ""])
        say("")
        say(f"blk: 4 KiB random reads, zero-copy, QD {depth} through BlkDevice over "
            f"qemu-storage-daemon (io_uring), refilled in batch mode; {per['requests']:,.0f} "
            f"requests in {per['rounds']:,.0f} rounds ({batch:.1f} per round), "
            f"{per['kicks']:,.0f} kicks; ns per request")
        say("")
        say(markdown_table(["stage", "ns/req", "floor ns/req", "x floor"], rows, "lrrr"))
        for s in (*BLK_STAGES, "wait cpu", "total cpu"):
            results.add(f"blk QD {depth} {s}", "ns/req", per[s], "lower")
        for s in BLK_STAGES:
            results.add(f"blk QD {depth} {s}", "floor ns/req", floor[s], None)
    if not skip_net:
        _net_tables(f, seconds, results, say)
    rows = []
    for ring in ("split", "packed"):
        per_ring = profile_ring(ring, seconds / 2)
        rfloor = ring_floor(f, 3, RING_BATCH)
        for s in RING_STAGES:
            rows.append([ring, *_row(s, per_ring[s], rfloor[s])])
            results.add(f"ring {ring} {s}", "ns/chain", per_ring[s], "lower")
            results.add(f"ring {ring} {s}", "floor ns/chain", rfloor[s], None)
        total = sum(per_ring.values())
        ftotal = sum(rfloor.values())
        rows.append([ring, *_row("driver total", total, ftotal)])
    say("")
    say(f"ring: 3-descriptor chains, {RING_BATCH} per publish, event idx on, no indirect "
        f"descriptors, queue size {RING_SIZE}; median batch, ns per chain")
    say("")
    say(markdown_table(["ring", "stage", "ns/chain", "floor ns/chain", "x floor"], rows,
                       "llrrr"))
    return results, lines


def _net_tables(f: dict[str, float], seconds: float, results: Results,
                say: Callable[[str], None]) -> None:
    """The net stage table: TX and RX, split and packed, against one dpdk-testpmd."""
    from virtq.testing.testpmd import TestPmd  # noqa: PLC0415 - CLI only

    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "profile-net.sock"
        with TestPmd.vhost(sock, txpkts=NET_FRAME) as backend:
            for ring in ("split", "packed"):
                for direction, profile, stages in (
                        ("TX", profile_net_tx, NET_TX_STAGES),
                        ("RX", profile_net_rx, NET_RX_STAGES)):
                    per = profile(backend, sock, ring, seconds / 4)
                    floor = net_floor(f, direction)
                    # As a user gets it: VIRTIO_F_IN_ORDER when the device offers it.
                    shown = ring + (" in-order" if per["in_order"] else "")
                    for stage in stages:
                        rows.append([direction, shown, *_row(stage, per[stage], floor[stage])])
                        label = f"net {direction} {ring} {stage}"
                        results.add(label, "ns/pkt", per[stage], "lower")
                        results.add(label, "floor ns/pkt", floor[stage], None)
                    ftotal = sum(floor.values())
                    rows.append([direction, shown, *_row("sum of the stages", per["total"],
                                                         ftotal)])
                    if direction == "RX":
                        rows.append([direction, shown, "polls that found nothing",
                                     f"{per['empty polls']:,.0f}", "", ""])
                    rows.append([direction, shown, "process CPU per packet",
                                 f"{per['total cpu']:,.0f}", "", ""])
                    results.add(f"net {direction} {ring} total", "ns/pkt", per["total"],
                                "lower")
                    results.add(f"net {direction} {ring} total cpu", "ns/pkt",
                                per["total cpu"], "lower")
    say("")
    say(f"net: {NET_FRAME}-byte frames in batches of {NET_BATCH} through NetDevice (poll "
        "mode, the features it negotiates by default) against dpdk-testpmd's net_vhost (TX: "
        "rxonly, RX: txonly); each stage timed around NetDevice's own calls, ns per packet")
    say("")
    say(markdown_table(["dir", "ring", "stage", "ns/pkt", "floor ns/pkt", "x floor"], rows,
                       "lllrrr"))


def main(argv: list[str] | None = None) -> int:
    """``virtq bench profile [options]``: print the floor, blk and ring stage tables
    (``--json``: write the numbers too).  Returns 0; argparse exits on bad options; a
    back-end that cannot start raises :class:`~virtq.testing.runners.BackendError`."""
    p = argparse.ArgumentParser(prog="virtq bench profile",
                                description=_args.plain(__doc__ or ""))
    p.add_argument("--depth", type=_args.int_in(1, 4096), default=32,
                   help="blk requests in flight (default 32)")
    p.add_argument("--seconds", type=_args.seconds(), default=3.0,
                   help="blk run (the ring rows take half of it each)")
    p.add_argument("--floor-ops", type=_args.int_in(1000, 100_000_000), default=200_000,
                   help="iterations per floor operation pass")
    p.add_argument("--skip-blk", action="store_true",
                   help="no blk table (no qemu-storage-daemon needed)")
    p.add_argument("--skip-net", action="store_true",
                   help="no net table (no dpdk-testpmd needed)")
    p.add_argument("--json", help="also write the numbers to this file")
    args = _args.parse(p, argv)
    results, _ = run(args.depth, args.seconds, args.floor_ops, skip_blk=args.skip_blk,
                     skip_net=args.skip_net)
    if args.json:
        results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
