"""Drive a device's completions from an event loop, without threads.

A :class:`Pump` runs the waiter's three steps (VIRTIO 1.2 §2.7.7; see
:class:`~virtq.transport.Waiter`) cooperatively: reap what is there, *arm* the queues and
re-check, and only then sleep -- in the event loop, on the notification fds
(``anyio.wait_readable``), never in a blocking call.  One task at a time does the sleeping;
every other task that waits for a completion waits for the end of that task's round and
looks again, so any number of tasks can await requests of one device.

Cancellation.  A task cancelled while it waits leaves the ring as it was: the pump only
ever sleeps between a re-check and the next reap, and a reap hands over whole completions
(the device driver's ``poll``) with no await in between.  A request whose waiter was
cancelled stays with the device until the device completes it; the next round of any task
reaps it and its slot comes back then (nothing is reused under the device).

anyio gives the same code on asyncio and on trio; it is the ``virtq[async]`` extra.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import anyio

from virtq.errors import VirtqError
from virtq.transport.waiter import Waiter

R = TypeVar("R")


async def wait_any_readable(fds: Sequence[int]) -> None:
    """Return once any of ``fds`` is readable (one fd: ``anyio.wait_readable``; more: one
    child task each, the first to wake cancels the rest)."""
    if len(fds) == 1:
        await anyio.wait_readable(fds[0])
        return
    async with anyio.create_task_group() as tg:
        async def one(fd: int) -> None:
            await anyio.wait_readable(fd)
            tg.cancel_scope.cancel()

        for fd in fds:
            tg.start_soon(one, fd)


class Pump(Generic[R]):
    """Completions of one device for any number of tasks.

    ``waiter`` is the device's :class:`~virtq.transport.Waiter`; ``poll`` publishes what was
    submitted and returns what completed without blocking (a device's ``poll(0)``);
    ``in_flight`` says how many requests the device still holds; ``publish`` (optional)
    makes what was submitted visible to the device and notifies it (a device's ``kick``):
    every waiting task calls it first, so a request submitted while another task sleeps in
    the pump is not left unpublished until that task wakes.  Every completion ``poll``
    returns is also handed to each :meth:`subscribe`\\ d list.
    """

    def __init__(self, waiter: Waiter, poll: Callable[[], list[R]],
                 in_flight: Callable[[], int],
                 publish: Callable[[], None] | None = None) -> None:
        self.waiter = waiter
        self._poll = poll
        self._in_flight = in_flight
        self._publish = publish
        self._busy = False
        self._round: anyio.Event | None = None
        self._subscribers: list[list[R]] = []

    def subscribe(self) -> list[R]:
        """A list that every later completion is appended to (until
        :meth:`unsubscribe`)."""
        box: list[R] = []
        self._subscribers.append(box)
        return box

    def unsubscribe(self, box: list[R]) -> None:
        """Stop appending completions to ``box``."""
        self._subscribers = [b for b in self._subscribers if b is not box]

    def reap(self) -> list[R]:
        """One non-blocking ``poll``, its completions handed to the subscribers.  Raises
        what ``poll`` raises (for a device driver: only misuse, e.g. closed)."""
        done = self._poll()
        if done:
            for box in self._subscribers:
                box.extend(done)
        return done

    async def until(self, condition: Callable[[], bool], want: int = 1) -> None:
        """Return once ``condition()`` is true, reaping and sleeping meanwhile (``want``:
        how many completions to ask the device to notify after, with event idx).
        Cancelling the task leaves the queues consistent (see the module's docstring).
        Raises :class:`~virtq.errors.VirtqError` when the condition is false and nothing
        is in flight (nothing could make it true), and what ``poll`` raises."""
        while not condition():
            if self._publish is not None:
                self._publish()
            if self._busy:
                # Another task is in a round: its reap may be what we wait for.
                if self._round is None:
                    self._round = anyio.Event()
                await self._round.wait()
                continue
            self._busy = True
            try:
                await self._one_round(condition, want)
            finally:
                self._busy = False
                event, self._round = self._round, None
                if event is not None:
                    event.set()

    async def _one_round(self, condition: Callable[[], bool], want: int) -> None:
        if self.reap() or condition():
            await anyio.sleep(0)  # a checkpoint: cancellation and fairness
            return
        if not self._in_flight():
            raise VirtqError("waiting for a completion with nothing in flight")
        fds = self.waiter.fds()
        if not fds:
            await anyio.sleep(0)  # a polling transport: spin, letting others run
            return
        if self.waiter.arm(want):
            await anyio.sleep(0)  # completions raced in (§2.7.7): reap, do not sleep
            return
        await wait_any_readable(fds)
        self.waiter.drain()


__all__ = ["Pump", "wait_any_readable"]
