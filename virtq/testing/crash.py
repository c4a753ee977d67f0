"""A block workload that can prove a back-end restart lost nothing.

:class:`StampedWorkload` keeps a fixed number of 4 KiB requests in flight on a
:class:`~virtq.devices.BlkDevice` -- reads and writes mixed at random (seeded), spread
over every queue -- and keeps a model of the disk:

* every write stamps each of its sectors with the sector number, the write's sequence
  number and a fill derived from both (:func:`stamp`), so any sector tells which write
  put it there;
* no two requests in flight touch the same block, so the order of completion can never
  change the outcome: the model of a block is simply its last *acknowledged* write;
* every read is checked against the model when it completes, and :meth:`verify` checks
  the image file against the model at the end;
* every request must come back from ``poll()`` exactly once, without an error.

The crash tests SIGKILL the back-end in the middle of a run and start it again; the
workload goes on through the device's reconnect policy and must still satisfy all of it.
``virtq bench reconnect`` runs the same workload to time the outage.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from virtq.devices import BlkDevice, BlkRequest
from virtq.errors import QueueFullError, VirtqError
from virtq.testing.runners import sector_pattern

BLOCK = 4096
SECTORS_PER_BLOCK = BLOCK // 512
_STAMP = struct.Struct("<8sQQ")
_MAGIC = b"VIRTQSTM"


class WorkloadError(VirtqError):
    """The workload saw something a lossless run never shows: a wrong read, a request
    completed twice or with an error, an image that differs from the model."""


def stamp(sector: int, seq: int) -> bytes:
    """What write ``seq`` puts into ``sector``: a header and a fill derived from both."""
    head = _STAMP.pack(_MAGIC, sector, seq)
    fill = bytes((sector * 31 + seq * 7 + i) & 0xFF for i in range(512 - len(head)))
    return head + fill


def block_data(block: int, seq: int | None) -> bytes:
    """The 4 KiB of ``block`` after write ``seq`` (None: as the image was made)."""
    first = block * SECTORS_PER_BLOCK
    if seq is None:
        return b"".join(sector_pattern(s) for s in range(first, first + SECTORS_PER_BLOCK))
    return b"".join(stamp(s, seq) for s in range(first, first + SECTORS_PER_BLOCK))


def describe_block(data: bytes) -> str:
    """A short description of 4 KiB read back, for error messages."""
    out = []
    for i in range(0, len(data), 512):
        magic, sector, seq = _STAMP.unpack_from(data, i)
        out.append(f"s{sector}:w{seq}" if magic == _MAGIC else "pattern?")
    return " ".join(out)


@dataclass
class RunStats:
    """What a run did."""

    completed: int = 0
    reads: int = 0
    writes: int = 0
    #: time.monotonic() of every completion batch (with its size), for outage timing.
    batches: list[tuple[float, int]] = field(default_factory=list)


class StampedWorkload:
    """Keep ``depth`` 4 KiB requests in flight on ``dev`` over blocks ``0..blocks-1`` (see
    the module docstring).  ``write_fraction`` of them are writes; ``seed`` makes the run
    repeatable."""

    def __init__(self, dev: BlkDevice, *, blocks: int, depth: int = 128, seed: int = 0,
                 write_fraction: float = 0.5) -> None:
        self.dev = dev
        self.blocks = blocks
        self.depth = depth
        self.rng = random.Random(seed)
        self.write_fraction = write_fraction
        #: Per block, the sequence number of its last acknowledged write (None: never).
        self.model: list[int | None] = [None] * blocks
        #: Request -> (block, sequence number of the write, or None for a read).
        self.pending: dict[BlkRequest, tuple[int, int | None]] = {}
        self.busy: set[int] = set()
        self.seq = 0
        self.stats = RunStats()

    def _submit_one(self) -> bool:
        block = self.rng.randrange(self.blocks)
        while block in self.busy:
            block = self.rng.randrange(self.blocks)
        sector = block * SECTORS_PER_BLOCK
        try:
            if self.rng.random() < self.write_fraction:
                self.seq += 1
                req = self.dev.submit_write(sector, block_data(block, self.seq))
                self.pending[req] = (block, self.seq)
            else:
                req = self.dev.submit_read(sector, BLOCK)
                self.pending[req] = (block, None)
        except QueueFullError:
            return False
        self.busy.add(block)
        return True

    def refill(self) -> None:
        """Submit until ``depth`` requests are in flight (or the device is full)."""
        while len(self.pending) < self.depth and self._submit_one():
            pass

    def complete(self, done: list[BlkRequest]) -> None:
        """Check and account for what ``poll()`` returned.  Raises :class:`WorkloadError` for
        a request completed twice (or never submitted), a failed request, or a read that
        returned other data than the model of the acknowledged writes says."""
        now = time.monotonic()
        if done:
            self.stats.batches.append((now, len(done)))
        for req in done:
            entry = self.pending.pop(req, None)
            if entry is None:
                raise WorkloadError(f"{req!r} completed a second time (or was never "
                                    "submitted)")
            block, seq = entry
            self.busy.discard(block)
            if req.error is not None:
                raise WorkloadError(f"{req!r} failed: {req.error!r}") from req.error
            self.stats.completed += 1
            if seq is None:
                self.stats.reads += 1
                want = block_data(block, self.model[block])
                if req.result != want:
                    got = describe_block(req.result or b"")
                    raise WorkloadError(f"read of block {block} returned {got}; the model "
                                        f"says write {self.model[block]}")
            else:
                self.stats.writes += 1
                self.model[block] = seq

    def step(self) -> None:
        """One round: refill, then take what completes within a second."""
        self.refill()
        self.complete(self.dev.poll(timeout=1.0))

    def drain(self, timeout: float = 120.0) -> None:
        """Wait for every request in flight.  Raises :class:`WorkloadError`."""
        deadline = time.monotonic() + timeout
        while self.pending:
            if time.monotonic() > deadline:
                raise WorkloadError(f"{len(self.pending)} request(s) still in flight after "
                                    f"{timeout} s")
            self.complete(self.dev.poll(timeout=1.0))

    def run(self, completions: int, *,
            at: dict[int, Callable[[], None]] | None = None,
            timeout: float = 120.0) -> RunStats:
        """Until ``completions`` more requests completed; ``at[k]`` is called once the
        run's k-th completion is counted and the refill after it published (a crash test
        kills the back-end there).  Then waits for the rest.  Raises
        :class:`WorkloadError` (see the module docstring; also when the run takes over
        ``timeout`` seconds)."""
        events = dict(at or {})
        target = self.stats.completed + completions
        deadline = time.monotonic() + timeout
        while self.stats.completed < target:
            if time.monotonic() > deadline:
                raise WorkloadError(f"{self.stats.completed} of {target} completions after "
                                    f"{timeout} s")
            self.refill()
            # The events run with the refill published: the back-end is busy with it.
            for k in sorted(events):
                if self.stats.completed >= k:
                    self.dev.kick()
                    events.pop(k)()
            self.complete(self.dev.poll(timeout=1.0))
        self.drain(max(0.0, deadline - time.monotonic()))
        return self.stats

    def verify(self, image: str | Path) -> int:
        """Compare every block of the image file with the model; returns how many blocks
        were written.  Raises :class:`WorkloadError` naming the first block that differs."""
        written = 0
        with open(image, "rb") as f:
            for block, seq in enumerate(self.model):
                f.seek(block * BLOCK)
                data = f.read(BLOCK)
                if data != block_data(block, seq):
                    raise WorkloadError(f"block {block} of the image holds "
                                        f"{describe_block(data)}; the model says write {seq}")
                written += seq is not None
        return written


__all__ = ["BLOCK", "RunStats", "StampedWorkload", "WorkloadError", "block_data", "stamp"]
