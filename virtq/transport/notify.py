"""Sleeping on used-buffer notifications, safely against a concurrent ``close()``.

A transport that signals used buffers through eventfds (vhost-user's call fds, VFIO's MSI-X
eventfds) sleeps on all of them at once with one ``poll()``.  :class:`NotificationSet` does
that for every such transport, and closes the race the obvious code has: if another thread
closes the transport while one sleeps, the sleeper would wake (or not) and then read the fd
*numbers* it remembered -- which may by then belong to a file somebody else opened.  Here
``close()`` (:meth:`NotificationSet.shutdown`) wakes the sleeper through an eventfd of its
own and waits until it has left before the caller closes any fd; the woken sleeper raises
:class:`~virtq.errors.QueueStateError` instead of touching an fd again.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable

from virtq.errors import QueueStateError

_EFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK
_POLL_ERR = select.POLLERR | select.POLLHUP | select.POLLNVAL
#: The longest single sleep, in seconds: poll() takes a C int of milliseconds (callers with
#: longer deadlines sleep again).
_MAX_SLEEP = min(2**31 - 1, int(threading.TIMEOUT_MAX * 1000)) / 1000


class NotificationSet:
    """The eventfds of a transport's queues (and fds to watch for the device going away),
    slept on together.  Owns only its own wake-up eventfd; the others stay the caller's."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._lock = threading.Lock()  # held while a thread sleeps or drains
        self._wake = os.eventfd(0, _EFD_FLAGS)
        self._poller = select.poll()
        self._poller.register(self._wake, select.POLLIN)
        self._fds: dict[int, int] = {}  # queue index -> eventfd
        # The distinct eventfds of _fds (queues may share a vector), kept so that the
        # drain after every wake-up does not rebuild them.
        self._unique: tuple[int, ...] = ()
        self._watches: dict[int, Callable[[], None]] = {}  # fd -> raises if the peer is gone
        self._closing = False

    def add(self, index: int, fd: int) -> None:
        """Watch ``fd`` (an eventfd) for queue ``index``'s used-buffer notifications."""
        with self._lock:
            self._fds[index] = fd
            self._unique = tuple(dict.fromkeys(self._fds.values()))
            self._poller.register(fd, select.POLLIN)

    def watch(self, fd: int, check: Callable[[], None]) -> None:
        """When ``fd`` becomes readable or hangs up during a sleep, call ``check`` (which
        raises if the device is gone).  Replaces an earlier watch."""
        with self._lock:
            for old in list(self._watches):
                self._poller.unregister(old)
            self._watches = {fd: check}
            self._poller.register(fd, select.POLLIN | _POLL_ERR)

    def fds(self) -> list[int]:
        """The queues' notification eventfds (each once: queues may share a vector)."""
        return list(self._unique)

    def drain(self) -> bool:
        """Reset every eventfd's counter without sleeping; True if any had fired."""
        if not self._lock.acquire(blocking=False):
            return False  # another thread is sleeping on them and will drain
        try:
            self._check_open()
            return self._drain()
        finally:
            self._lock.release()

    def _drain(self) -> bool:
        fired = False
        for fd in self._unique:
            try:
                os.eventfd_read(fd)  # one read resets the counter
                fired = True
            except BlockingIOError:
                pass
        return fired

    def _check_open(self) -> None:
        if self._closing:
            raise QueueStateError(f"{self._what} is closed")

    def wait(self, timeout: float | None) -> bool:
        """Sleep until a queue's eventfd fires or ``timeout`` seconds pass (None: forever);
        drain the counters; True if any fired.  A watched fd that becomes ready runs its
        check (which raises when the device is gone).  Raises
        :class:`~virtq.errors.QueueStateError` if the transport is (or gets) closed."""
        if timeout is not None and not timeout < _MAX_SLEEP:  # also +inf
            timeout = _MAX_SLEEP  # poll() takes an int of milliseconds; a waiter loops on
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        lock = self._lock
        # This runs once per wake-up of every device driver: the lock is free unless two
        # threads wait on one transport, and an uncontended non-blocking acquire is a
        # third of the price of a timed one.
        if not lock.acquire(False) and not lock.acquire(
                timeout=-1 if timeout is None else max(0.0, timeout)):
            return False  # another thread held the sleep for the whole timeout
        try:
            if self._closing:
                self._check_open()
            events = self._poller.poll(ms)
            # close() from another thread woke us: the fds may be closed (and their numbers
            # reused) any moment after we return -- touch none of them.
            if self._closing:
                self._check_open()
            watches = self._watches
            for fd, _ in events:
                check = watches.get(fd)
                if check is not None:
                    check()
            return self._drain()
        finally:
            lock.release()

    def shutdown(self) -> None:
        """Wake a sleeper, wait until it has left, and refuse every later wait: after
        this the caller may close the fds (idempotent)."""
        if self._closing:
            return
        self._closing = True
        os.eventfd_write(self._wake, 1)
        with self._lock:  # the sleeper, if any, has raised and released it
            self._fds.clear()
            self._unique = ()
            self._watches.clear()
            with contextlib.suppress(OSError):
                os.close(self._wake)

    def reopen(self) -> None:
        """After :meth:`shutdown` (e.g. a reconnect that keeps the transport object): a
        fresh wake-up eventfd and poller, no fds."""
        with self._lock:
            if not self._closing:
                return
            self._wake = os.eventfd(0, _EFD_FLAGS)
            self._poller = select.poll()
            self._poller.register(self._wake, select.POLLIN)
            self._closing = False
