"""What the request-based drivers (virtio-blk, virtio-fs) do the same way: checking an int
argument, and waiting until a set of requests is done.

Both drivers keep their requests as the tokens of their queues and follow one failure
policy (see ``docs/writing-a-driver.md``): ``poll()`` never raises for a device failure, it
completes the requests concerned with an ``error`` instead.  So waiting is only polling until
every request is done, the deadline passes, or nothing in flight is left that could complete
them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar

from virtq.errors import ArgumentError, VirtqError, VirtqTimeoutError
from virtq.transport.waiter import deadline_after


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``low..high`` (no upper bound when ``high``
    is None).  Raises :class:`ArgumentError` naming ``name`` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low \
            or (high is not None and value > high):
        rule = f">= {low}" if high is None else f"in {low}..{high}"
        raise ArgumentError(name, value, f"must be an int {rule}")
    return value


class _Request(Protocol):
    @property
    def done(self) -> bool: ...

    @property
    def _dev(self) -> object: ...


R = TypeVar("R", bound=_Request)


class _Device(Protocol[R]):
    @property
    def in_flight(self) -> int: ...

    def _check_open(self) -> None: ...

    def _in_flight(self) -> list[R]: ...

    def poll(self, timeout: float | None = 0) -> Sequence[Any]: ...


def wait_requests(device: _Device[R], requests: Iterable[R] | None, timeout: float | None,
                  request_type: type[R], what: str = "request(s)") -> None:
    """Poll ``device`` until every request in ``requests`` (None: all in flight) is done.
    Raises :class:`~virtq.errors.QueueStateError` (the device is closed),
    :class:`ArgumentError` for something not a ``request_type`` of this device,
    :class:`~virtq.errors.VirtqTimeoutError` after ``timeout`` seconds (the requests stay
    in flight; ``what`` names them in its message), and :class:`VirtqError` when requests
    are pending although nothing is in flight (a driver bug: nothing could complete them)."""
    device._check_open()
    deadline = deadline_after(timeout)
    if requests is None:
        pending = device._in_flight()
    else:
        try:
            pending = list(requests)
        except TypeError:
            raise ArgumentError("requests", requests,
                                f"must be an iterable of {request_type.__name__}") from None
    for r in pending:
        if not isinstance(r, request_type) or r._dev is not device:
            raise ArgumentError("requests", r, "must be requests of this device")
    pending = [r for r in pending if not r.done]
    while pending:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise VirtqTimeoutError(f"{len(pending)} {what} still in flight after "
                                    f"{timeout} s")
        if not device.in_flight:
            # Nothing can complete them: every pending request must be done by now.
            raise VirtqError(f"{len(pending)} request(s) neither done nor in flight")
        device.poll(timeout=remaining)
        pending = [r for r in pending if not r.done]
