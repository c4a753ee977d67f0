"""One completion waiter for every device driver.

Sleeping correctly on a virtqueue takes three steps in this order (VIRTIO 1.2 §2.7.7 and the
example of §2.7.14, Linux ``virtqueue_enable_cb_prepare``/``virtqueue_poll``): *arm* (ask the
device for a
used-buffer notification), *re-check* (completions that raced in before the device could see
the request will never be signalled), and only then *sleep*.  :class:`Waiter` does it for all
of a device's queues at once: it arms every queue with chains in flight, re-checks them
all, and sleeps on every notification fd with one ``poll()``, so a completion on any queue
wakes it at once.  In polling mode it spins on the used rings instead, looking at the
transport's health now and then.  Every path ends by a deadline.

An event loop drives a device through the same steps without private calls::

    fds = waiter.fds()                   # add_reader() on each
    while not done:
        if not waiter.arm(want):         # False: nothing raced in, safe to sleep
            await any_readable(fds)
            waiter.drain()
        done = device.poll(0)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from virtq.errors import ArgumentError
from virtq.queue import QueueState, VirtQueue
from virtq.transport.base import Transport

_READY = QueueState.READY
_CLOSED = QueueState.CLOSED
#: Polling loops look at the transport's health (and the clock) once per this many spins.
CHECK_EVERY = 4096


def deadline_after(timeout: float | None) -> float | None:
    """The monotonic deadline ``timeout`` seconds from now (None: none).  Raises
    :class:`ArgumentError` for a negative or non-numeric timeout."""
    if timeout is None:
        return None
    # bool is an int: timeout=True would mean one second without a word.
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) \
            or math.isnan(timeout) or timeout < 0:
        raise ArgumentError("timeout", timeout, "must be None or a number of seconds >= 0")
    if timeout == math.inf:
        return None
    return time.monotonic() + timeout


class Waiter:
    """Arm, re-check and sleep over ``queues`` of ``transport``'s device.

    ``poll=True`` (or a polling transport) never sleeps: :meth:`wait` spins on the used
    rings, calling ``transport.check_alive()`` every :data:`CHECK_EVERY` spins.
    """

    def __init__(self, transport: Transport, queues: Sequence[VirtQueue[Any]], *,
                 poll: bool = False) -> None:
        self.transport = transport
        self.queues = list(queues)
        self.polling = bool(poll or transport.polling)

    def fds(self) -> list[int]:
        """The fds to watch for used-buffer notifications (empty when polling)."""
        return [] if self.polling else self.transport.notification_fds()

    def drain(self) -> bool:
        """Reset the notification fds after a wake-up (True if any had fired)."""
        return False if self.polling else self.transport.drain_notifications()

    def ready(self) -> bool:
        """True when any queue has completions not yet reaped, or was closed (the caller
        must look instead of sleeping).  A broken queue does not count: whoever reaped
        it saw it break and completed its requests with the error (the failure policy)."""
        return any(q.state is _CLOSED or (q.state is _READY and q.has_used())
                   for q in self.queues)

    def arm(self, want: int = 1) -> bool:
        """Ask every queue with chains in flight for a notification once its share of
        ``want`` more completions is there (event idx; without it, at the next one), then
        re-check.  Returns True when the caller must not sleep: completions are already
        there, or no usable queue has anything in flight to wait for."""
        queues = self.queues
        if len(queues) == 1:
            q = queues[0]
            if q.state is not _READY or not q.num_in_flight:
                return True
            return q.enable_interrupts_after(want)
        if any(q.state is _CLOSED for q in queues):
            return True
        # A broken queue is not waited on: the device driver has already completed its
        # requests with the error (the failure policy), so the others are what a wait is
        # for -- sleep on them instead of spinning.
        busy = [q for q in queues if q.state is _READY and q.num_in_flight]
        if not busy:
            return True
        total = sum(q.num_in_flight for q in busy)
        ready = False
        for q in busy:
            # Each busy queue is asked for its part of what is wanted (at least one), so
            # that completions spread over queues still wake the waiter in time.
            share = max(1, -(-want * q.num_in_flight // total))
            if q.enable_interrupts_after(share):
                ready = True
        return ready

    def disarm(self) -> None:
        """Ask every usable queue not to notify (while the caller is busy anyway)."""
        for q in self.queues:
            if q.state is _READY:
                q.disable_interrupts()

    def wait(self, deadline: float | None, want: int = 1) -> bool:
        """One round: arm and re-check, then sleep until a notification, the device
        failing, or ``deadline`` (``time.monotonic()`` seconds; None: none).  Returns False
        only when the deadline passed with nothing to look at; True means "reap now".
        Raises what the transport raises when the device goes away (a
        :class:`~virtq.errors.DeviceError`), and
        :class:`~virtq.errors.QueueStateError` when it was closed."""
        if self.polling:
            return self._spin(deadline)
        if self.arm(want):
            return True
        while True:
            if deadline is None:
                remaining = None
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self.ready()
            if self.transport.wait(remaining):
                return True
            # Without a deadline a False is a spurious wake-up or an eventfd drained
            # elsewhere: look at the rings again.
            if deadline is None and self.ready():
                return True

    def _spin(self, deadline: float | None) -> bool:
        queues = self.queues
        if not any(q.num_in_flight for q in queues if q.state is _READY):
            return True  # nothing in flight: nothing to wait for (as arm() says)
        check = self.transport.check_alive
        while True:
            for _ in range(CHECK_EVERY):
                for q in queues:
                    state = q.state
                    if state is _CLOSED or (state is _READY and q.has_used()):
                        return True
            check()
            if deadline is not None and time.monotonic() >= deadline:
                return False


__all__ = ["CHECK_EVERY", "Waiter", "deadline_after"]
