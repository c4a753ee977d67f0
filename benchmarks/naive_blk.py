"""A plain-stdlib vhost-user-blk front-end data path: the reference virtq's blk CPU cost is
compared against (bench_blk_ref.py).

Only the control plane is virtq's, through public API: :class:`VhostUserTransport` does the
socket handshake, the memory table, feature negotiation (event idx, no indirect
descriptors), registers a split ring that a :class:`SplitQueue` zeroed, and hands over the
kick (``notify``) and the call eventfd (``call_fd``), which this front-end sleeps on with
``select.poll`` and drains with ``os.eventfd_read``.  From then on
that queue object is never touched: the ring memory is written with ``struct.pack_into`` /
read with ``struct.unpack_from`` at the layout's offsets, the way someone writes it with
struct and os -- three direct descriptors per read (header, 4 KiB data, status), a Python
list of free descriptors, a dict from head to request.  No fences (x86 TSO), no checks of
what the device writes.

One departure from "struct everywhere": the four u16 index words the device reads or writes
while this process runs (avail.idx, used_event, used.idx, avail_event) go through a
``memoryview.cast("H")``, one 2-byte load or store each.  ``struct.pack_into`` first
zeroes the bytes it is about to write (CPython's ``s_pack_internal`` does a ``memset``),
so a ``pack_into("<H", ..., avail.idx)`` briefly shows ``avail.idx == 0`` to a device
polling the ring: qemu-storage-daemon then pops stale ring entries ("virtio-blk request
missing headers", "vu_panic: Virtqueue size exceeded") and reports heads that are not in
flight.  Descriptors, ring entries, headers and used elements are not shared at the
moment they are written or read, so struct is fine for them.

``run_naive`` does the same work as :func:`virtq.cli.bench_blk.run_depth` (same targets,
same warm-up, same latency bookkeeping, same CPU accounting, the data left in the
request's buffer or, with ``copy``, copied out into ``bytes``) and returns the same keys,
with the same two waiting strategies:

- ``eventfd``: wake for every completion (``used_event = last_used``);
- ``batch``: what virtq's ``poll(min_completions=N)`` does -- ask the device, through event
  idx, to notify only once N more requests have completed (``used_event = last_used + N -
  1``, VIRTIO 1.2 §2.7.10), then re-check used.idx before sleeping (§2.7.13.5).
"""

from __future__ import annotations

import os
import select
import struct
import time
from pathlib import Path

import psutil

from virtq.cli.bench_blk import batch_size, read_targets
from virtq.cli.benchutil import ProgressBar, cpu_seconds, io_stats
from virtq.layout import SplitLayout
from virtq.queue import SplitQueue
from virtq.transport.vhost_user import VhostUserTransport

IO = 4096
# The constants a stdlib author copies out of the spec.
VIRTIO_F_EVENT_IDX = 29  # VIRTIO 1.2 §6
VIRTQ_DESC_F_NEXT = 1  # §2.7.5
VIRTQ_DESC_F_WRITE = 2
VIRTIO_BLK_T_IN = 0  # §5.2.6
STATUS_POISON = 0xFF  # the device overwrites it; still 0xFF = no status written
# Per-request bytes: 16-byte header, then the status byte; a cache line each, as virtq does,
# so the comparison is of the code and not of false sharing.
META = 64
#: What any 4 KiB read of the bench image returns (``bytes(range(256))`` repeated).
EXPECTED = bytes(range(256)) * (IO // 256)
#: The waiting strategies, as in ``virtq bench blk``.
MODES = ("eventfd", "batch")

DESC = struct.Struct("<QIHH")  # struct virtq_desc (§2.7.5)
HEADER = struct.Struct("<IIQ")  # struct virtio_blk_req: type, reserved, sector (§5.2.6)
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem (§2.7.8)


class NaiveBlk:
    """One request queue of a vhost-user-blk device, driven with struct and os."""

    def __init__(self, socket_path: Path, queue_size: int, slots: int, *,
                 copy: bool = False) -> None:
        self.copy = copy
        self.t = t = VhostUserTransport.connect(socket_path)
        q = None
        try:
            t.negotiate(1 << VIRTIO_F_EVENT_IDX)
            if not t.accepted_features >> VIRTIO_F_EVENT_IDX & 1:
                raise RuntimeError("the back-end does not offer VIRTIO_F_EVENT_IDX")
            layout = SplitLayout.compute(queue_size)
            self.data_off = layout.nbytes  # page-aligned: slot i's 4 KiB at data_off + i*IO
            self.meta_off = self.data_off + slots * IO
            arena = t.alloc_dma(self.meta_off + slots * META)
            # The transport registers the ring through a SplitQueue (it zeroes the ring and
            # supplies the addresses); the data path below never uses it.
            q = SplitQueue(arena.region, layout, iova=arena.iova, event_idx=True)
            t.attach_queue(0, q)
            t.start()
        except BaseException:
            if q is not None:
                q.close()  # idempotent; t.close() closes it again if it was attached
            t.close()
            raise
        self.call = t.call_fd(0)  # the back-end signals used buffers here
        self.poller = select.poll()
        self.poller.register(self.call, select.POLLIN)
        self.mem = arena.region.view()
        self.u16 = self.mem.cast("H")  # the shared index words, one access each
        self.iova = arena.iova
        self.n = queue_size
        self.desc = layout.desc
        self.avail_ring = layout.avail + 4
        self.used_ring = layout.used + 4
        # u16 indices into self.u16
        self.avail_idx = (layout.avail + 2) // 2
        self.used_idx = (layout.used + 2) // 2
        self.used_event = (layout.avail + 4 + 2 * queue_size) // 2
        self.avail_event = (layout.used + 4 + 8 * queue_size) // 2
        self.free_desc = list(range(queue_size))
        self.free_slots = list(range(slots))
        self.inflight: dict[int, tuple[int, int, int, int]] = {}  # head -> slot, d1, d2, sector
        self.next_avail = 0  # shadow avail.idx (entries added)
        self.published = 0  # avail.idx as last written
        self.last_used = 0

    def submit_read(self, sector: int) -> int:
        """Add a 4 KiB read of ``sector`` (published by the next ``poll``); returns its
        slot."""
        mem = self.mem
        slot = self.free_slots.pop()
        hdr = self.meta_off + slot * META
        status = hdr + 16
        data = self.data_off + slot * IO
        HEADER.pack_into(mem, hdr, VIRTIO_BLK_T_IN, 0, sector)
        mem[status] = STATUS_POISON
        free = self.free_desc
        d0 = free.pop()
        d1 = free.pop()
        d2 = free.pop()
        iova, desc = self.iova, self.desc
        DESC.pack_into(mem, desc + 16 * d0, iova + hdr, 16, VIRTQ_DESC_F_NEXT, d1)
        DESC.pack_into(mem, desc + 16 * d1, iova + data, IO,
                       VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, d2)
        DESC.pack_into(mem, desc + 16 * d2, iova + status, 1, VIRTQ_DESC_F_WRITE, 0)
        U16.pack_into(mem, self.avail_ring + 2 * (self.next_avail % self.n), d0)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        self.inflight[d0] = (slot, d1, d2, sector)
        return slot

    def publish(self) -> None:
        """Write avail.idx; kick if the device asked (vring_need_event, §2.7.10)."""
        new, old = self.next_avail, self.published
        if new == old:
            return
        self.u16[self.avail_idx] = new
        self.published = new
        event = self.u16[self.avail_event]
        if (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF:
            self.t.notify(0)

    def wait(self, timeout: float) -> bool:
        """Sleep until the back-end signals the call eventfd, at most ``timeout`` s; True if
        it did (the eventfd is drained: one read resets its counter)."""
        if not self.poller.poll(max(0, int(timeout * 1000))):
            return False
        try:
            os.eventfd_read(self.call)
        except BlockingIOError:  # drained meanwhile (the fd is non-blocking)
            return False
        return True

    def data(self, slot: int) -> bytes:
        """A copy of the 4 KiB in ``slot``'s buffer."""
        off = self.data_off + slot * IO
        return bytes(self.mem[off : off + IO])

    def reap(self, done: list[tuple[int, bytes | None]]) -> None:
        """Append (slot, data) for every used chain; the data is copied out of its slot
        (``copy``), or left there (None)."""
        mem = self.mem
        used_idx = self.u16[self.used_idx]
        while self.last_used != used_idx:
            head, _written = USED_ELEM.unpack_from(
                mem, self.used_ring + 8 * (self.last_used % self.n))
            self.last_used = (self.last_used + 1) & 0xFFFF
            slot, d1, d2, sector = self.inflight.pop(head)
            status = mem[self.meta_off + slot * META + 16]
            if status != 0:
                raise OSError(f"read of sector {sector}: status {status}")
            if self.copy:
                data = self.data_off + slot * IO
                done.append((slot, bytes(mem[data : data + IO])))
            else:
                done.append((slot, None))
            self.free_desc += (head, d1, d2)
            self.free_slots.append(slot)

    def poll(self, timeout: float, min_completions: int = 1) -> list[tuple[int, bytes | None]]:
        """Publish, then return what completed; block up to ``timeout`` s until at least
        ``min_completions`` have (fewer if fewer are in flight)."""
        self.publish()
        done: list[tuple[int, bytes | None]] = []
        self.reap(done)
        if len(done) >= min_completions or not self.inflight:
            return done
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return done
            # Ask for a notification once `want` more chains are used (used_event =
            # last_used + want - 1: the device notifies when used.idx moves past it,
            # §2.7.10), then re-check used.idx so completions that raced in are not slept
            # through (§2.7.13.5).  Everything in flight is published, so `want` can happen.
            want = min(min_completions - len(done), len(self.inflight))
            last_used = self.last_used
            self.u16[self.used_event] = (last_used + want - 1) & 0xFFFF
            if (self.u16[self.used_idx] - last_used) & 0xFFFF < want \
                    and not self.wait(min(0.1, remaining)):
                # Nothing for 0.1 s.  Without a fence the kick decision in publish() may
                # have read avail_event before the device saw the new avail.idx (x86 lets
                # a load pass an earlier store): notify again, which is always allowed.
                self.t.notify(0)
            self.reap(done)
            if len(done) >= min_completions or not self.inflight:
                return done

    def close(self) -> None:
        self.u16.release()
        self.mem.release()
        self.t.close()  # closes the SplitQueue's views and the region too


def run_naive(socket_path: Path, depth: int, seconds: float, mode: str = "eventfd", *,
              backend_pid: int | None = None, label: str = "naive",
              copy: bool = False, batch: int | None = None) -> dict[str, float]:
    """:func:`virtq.cli.bench_blk.run_depth` with the plain front-end: keep ``depth``
    random 4 KiB reads in flight for ``seconds``, waking per completion (``eventfd``) or
    once ``batch`` (default 3/8 of the depth) have completed (``batch``); ``copy`` returns
    each read's data as ``bytes``, otherwise it stays in the request's buffer (as virtq's
    zero-copy reads)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
    min_completions = batch_size(depth, batch) if mode == "batch" else 1
    queue_size = 1 << max(7, (3 * depth - 1).bit_length())
    targets = read_targets(depth)
    backend = psutil.Process(backend_pid) if backend_pid else None
    bar = ProgressBar(label)
    dev = NaiveBlk(socket_path, queue_size, depth, copy=copy)
    try:
        for i in range(min(depth, 64)):  # warm up, one at a time; check the data
            dev.submit_read(targets[i])
            got: list[tuple[int, bytes | None]] = []
            while not got:
                got = dev.poll(1.0)
            if dev.data(got[0][0]) != EXPECTED:
                raise AssertionError(f"read of sector {targets[i]} returned wrong data")
        lat: list[int] = []
        # Slot -> submission time: a dict, as virtq's run keeps one keyed by request.
        started: dict[int, int] = {}
        pc = time.perf_counter_ns
        submit = dev.submit_read
        t = pc()
        for k in range(depth):
            started[submit(targets[k])] = t
        k = depth
        cpu0 = cpu_seconds()
        bcpu0 = cpu_seconds(backend) if backend else 0.0
        t0 = time.monotonic()
        end = t0 + seconds
        next_progress = t0
        done = 0
        checked = 0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_progress:
                bar.show((now - t0) / seconds)
                next_progress = now + 0.2
            completed = dev.poll(1.0, min_completions)
            if not completed:
                continue
            t = pc()
            if checked < 16:  # a handful of the timed reads, too
                checked += 1
                if dev.data(completed[0][0]) != EXPECTED:
                    raise AssertionError("a timed read returned wrong data")
            # Every completion first, then the refill: a refill reuses the slots just
            # freed (last in, first out), which must not be read as still in flight.
            pop = started.pop
            lat += [t - pop(slot) for slot, _data in completed]
            for _ in completed:
                started[submit(targets[k])] = t
                k = (k + 1) & 0xFFFF
            done += len(completed)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds() - cpu0
        bcpu = cpu_seconds(backend) - bcpu0 if backend else None
        deadline = time.monotonic() + 10
        while dev.inflight:  # drain
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(dev.inflight)} reads still in flight after 10 s")
            for slot, _data in dev.poll(1.0):
                if dev.data(slot) != EXPECTED:
                    raise AssertionError("a drained read returned wrong data")
    finally:
        dev.close()
    bar.close()
    return io_stats(lat, done, elapsed, cpu, bcpu)
