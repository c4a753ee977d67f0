"""``virtq.devices._requests.wait_requests``: the wait loop BlkDevice and FsDevice share, on a
stand-in device whose poll() completes requests as a test says."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtq.devices._requests import check_int, wait_requests
from virtq.errors import ArgumentError, QueueStateError, VirtqError, VirtqTimeoutError


class Req:
    def __init__(self, dev: object) -> None:
        self._dev = dev
        self.done = False


class Dev:
    """Completes, on each poll, the requests the next entry of ``script`` names (indexes)."""

    def __init__(self, n: int, script: list[list[int]]) -> None:
        self.reqs = [Req(self) for _ in range(n)]
        self.script = list(script)
        self.polls = 0
        self.closed = False

    @property
    def in_flight(self) -> int:
        return sum(not r.done for r in self.reqs)

    def _check_open(self) -> None:
        if self.closed:
            raise QueueStateError("closed")

    def _in_flight(self) -> list[Req]:
        return [r for r in self.reqs if not r.done]

    def poll(self, timeout: float | None = 0) -> list[Req]:
        self.polls += 1
        step = self.script.pop(0) if self.script else []
        got = [self.reqs[i] for i in step if not self.reqs[i].done]
        for r in got:
            r.done = True
        return got


@given(st.integers(1, 8).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.lists(st.integers(0, n - 1), max_size=3), max_size=12),
    st.sets(st.integers(0, n - 1)))))
def test_it_returns_once_the_requests_waited_for_are_done(case):
    n, script, chosen = case
    script = [*script, list(range(n))]  # the device completes everything in the end
    dev = Dev(n, script)
    wanted = [dev.reqs[i] for i in sorted(chosen)] if chosen else None
    wait_requests(dev, wanted, None, Req)
    assert all(r.done for r in (wanted if wanted is not None else dev.reqs))
    # It stopped polling at the first moment they were all done.
    done_after = next(k for k in range(len(script) + 1)
                      if set(chosen or range(n)) <= {i for s in script[:k] for i in s})
    assert dev.polls == done_after


def test_a_request_of_another_device_or_type_is_an_argument_error():
    dev, other = Dev(1, []), Dev(1, [])
    with pytest.raises(ArgumentError, match="must be requests of this device"):
        wait_requests(dev, [other.reqs[0]], None, Req)
    with pytest.raises(ArgumentError):
        wait_requests(dev, ["not a request"], None, Req)  # type: ignore[list-item]


def test_the_timeout_names_what_is_still_in_flight():
    dev = Dev(2, [])  # never completes anything
    with pytest.raises(VirtqTimeoutError, match=r"^2 FUSE request\(s\) still in flight after 0"):
        wait_requests(dev, None, 0, Req, "FUSE request(s)")
    assert not any(r.done for r in dev.reqs)  # they stay in flight


def test_pending_requests_with_nothing_in_flight_are_a_driver_bug():
    dev = Dev(1, [])
    dev.reqs[0].done = True
    lost = Req(dev)  # this device's, yet in no queue: nothing can complete it
    with pytest.raises(VirtqError, match="neither done nor in flight"):
        wait_requests(dev, [lost], None, Req)


def test_a_closed_device_refuses():
    dev = Dev(1, [[0]])
    dev.closed = True
    with pytest.raises(QueueStateError):
        wait_requests(dev, None, None, Req)
    assert dev.polls == 0


@pytest.mark.parametrize(("value", "low", "high"), [
    (True, 0, None), (1.0, 0, None), (-1, 0, None), (5, 0, 4), ("3", 0, 9)])
def test_check_int_refuses(value, low, high):
    with pytest.raises(ArgumentError, match="must be an int"):
        check_int("x", value, low, high)


def test_check_int_passes_the_value_through():
    assert check_int("x", 4, 0, 4) == 4
    assert check_int("x", 1 << 70, 1) == 1 << 70
