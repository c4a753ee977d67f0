"""Riding out a back-end restart: the policy a device is given, and one outage's clock.

A vhost-user back-end is a separate process; it can crash or be restarted under a running
front-end (vhost-user.rst, "Communication": "An optional reconnection mechanism can be
implemented").  A device built with a :class:`ReconnectPolicy` does not fail its requests
when that happens: it keeps them, waits (bounded by :attr:`ReconnectPolicy.timeout`) for a
back-end on the same socket path, renegotiates, and has every request that had not
completed carried out -- by the new back-end from its inflight region
(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, vhost-user.rst "Inflight I/O tracking") where it
keeps one, else by resubmitting it.  Only when the deadline passes do the requests fail,
each with a :class:`ReconnectError`.

:class:`Outage` is the device-independent half: when the outage began, its deadline, the
connection attempts.  Device drivers own the other half (which requests to resubmit, how).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virtq.errors import ArgumentError, DeviceError, VirtqUsageError
from virtq.transport.base import Reconnectable
from virtq.transport.errors import DeviceRefusedError, TransportError

#: The longest reconnect deadline accepted (seconds): what the transports' own timeouts
#: accept (poll(2)'s int milliseconds).
MAX_RECONNECT_TIMEOUT = 2_147_483.0


def _seconds(name: str, value: object, *, low_exclusive: float = 0.0) -> float:
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not math.isfinite(value) or not low_exclusive < value <= MAX_RECONNECT_TIMEOUT):
        raise ArgumentError(name, value, f"must be a number of seconds in "
                            f"({low_exclusive:g}, {MAX_RECONNECT_TIMEOUT:.0f}]")
    return float(value)


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """Keep in-flight requests across a back-end restart (see the module docstring).

    ``timeout``: seconds from the moment the device notices the back-end is gone until
    the requests still waiting fail with :class:`ReconnectError`.  ``interval``: seconds
    between two connection attempts (a new back-end is usually listening within
    milliseconds of its start).  ``inflight``: use the back-end's inflight region
    (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) when it offers one, so that the back-end
    itself resumes what it had taken from the rings; False: the device always resubmits.

    Raises :class:`~virtq.errors.ArgumentError` for a timeout or interval that is not a
    positive, finite number of seconds (at most :data:`MAX_RECONNECT_TIMEOUT`)."""

    timeout: float = 30.0
    interval: float = 0.05
    inflight: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "timeout", _seconds("timeout", self.timeout))
        object.__setattr__(self, "interval", _seconds("interval", self.interval))
        if not isinstance(self.inflight, bool):
            raise ArgumentError("inflight", self.inflight, "must be True or False")


class ReconnectError(TransportError, DeviceError):
    """A request failed because its back-end did not come back in time, or the one that
    came back cannot serve the device (it lacks negotiated features).

    ``__cause__`` is the transport error that ended the connection; ``last_error`` the
    error of the last connection attempt (None if none was made); ``elapsed`` the seconds
    from the outage's start to giving up; ``attempts`` how many connections were tried."""

    def __init__(self, message: str, *, last_error: BaseException | None = None,
                 elapsed: float = 0.0, attempts: int = 0) -> None:
        super().__init__(message)
        self.last_error = last_error
        self.elapsed = elapsed
        self.attempts = attempts


def retryable(err: BaseException) -> bool:
    """Whether another connection attempt may succeed after ``err``: nobody listening
    yet, the connection dropped or timed out during the handshake, a back-end that
    answered garbage -- yes; a back-end that refused the device (fewer features), or a
    usage error -- no."""
    if isinstance(err, DeviceRefusedError | VirtqUsageError):
        return False
    return isinstance(err, OSError | DeviceError)


class Outage:
    """One stretch without a back-end, from the error that ended the connection
    (``cause``) until a reconnect succeeds or ``policy.timeout`` seconds pass.

    ``started``: when the outage began (default: now).  A device whose back-end dies
    again before completing anything after a reconnect passes the first outage's start:
    a back-end that crashes on the same request every time is not waited for forever."""

    __slots__ = ("attempts", "cause", "deadline", "last_error", "last_try", "policy",
                 "started")

    def __init__(self, policy: ReconnectPolicy, cause: BaseException, *,
                 started: float | None = None) -> None:
        self.policy = policy
        self.cause = cause
        self.started = time.monotonic() if started is None else started
        self.deadline = self.started + policy.timeout
        self.attempts = 0
        self.last_try = -math.inf
        self.last_error: BaseException | None = None

    @property
    def elapsed(self) -> float:
        """Seconds since the outage began."""
        return time.monotonic() - self.started

    def attempt(self, transport: Reconnectable, until: float | None, *, resume: bool,
                before: Callable[[], object] | None = None) -> dict[int, list[Any]] | None:
        """Try to reconnect ``transport``, once per ``policy.interval``, until it works,
        ``until`` (a ``time.monotonic()`` deadline of the caller; None: none) or the
        outage's own deadline; ``before()`` is called before each try (a try that fails
        half-way may have taken tokens out of the rings: the caller notes them first).
        Returns what :meth:`Reconnectable.reconnect` returns (per queue, the tokens the
        device lost), or None when ``until`` came first.

        Raises :class:`ReconnectError` when the outage's deadline passed or the new
        back-end refused the device (both end the outage: the caller fails its requests),
        and whatever a connection attempt raises that is not a transport failure
        (KeyboardInterrupt, ...), with the outage still running."""
        interval = self.policy.interval
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                raise self._expired()
            if now - self.last_try >= interval:
                self.last_try = now
                self.attempts += 1
                if before is not None:
                    before()
                try:
                    return transport.reconnect(resume=resume)
                except Exception as exc:
                    if not retryable(exc):
                        raise ReconnectError(
                            f"the back-end that came back cannot serve the device: {exc}",
                            last_error=exc, elapsed=self.elapsed,
                            attempts=self.attempts) from exc
                    self.last_error = exc
                continue
            if until is not None and now >= until:
                return None
            stop = self.deadline if until is None else min(until, self.deadline)
            time.sleep(max(0.0, min(self.last_try + interval, stop) - now))

    def _expired(self) -> ReconnectError:
        last = self.last_error
        tail = f"; the last attempt: {last}" if last is not None else ""
        return ReconnectError(
            f"no back-end came back within {self.policy.timeout:g} s "
            f"({self.attempts} connection attempt(s)){tail}",
            last_error=last, elapsed=self.elapsed, attempts=self.attempts)


__all__ = ["MAX_RECONNECT_TIMEOUT", "Outage", "ReconnectError", "ReconnectPolicy", "retryable"]
