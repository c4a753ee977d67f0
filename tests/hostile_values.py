"""Hostile values for the tests of the public API's argument checks (test_hostile_api_*):
wrong types and out-of-range numbers where an int, an index or a timeout belongs."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from virtq.errors import VirtqUsageError

#: Wrong types and out-of-range numbers: what a hostile caller passes for an int.
HOSTILE_INTS = st.one_of(
    st.sampled_from([-1, 1 << 64, -(1 << 63), True, False, None, "1", b"x", [], 1.5]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(max_value=-1),
    st.integers(min_value=1 << 64),
    st.text(max_size=3),
    st.builds(object),
)
#: Not an index (of a queue pair, a queue): bools, floats (1.0 too), other types.
NOT_AN_INDEX = st.one_of(st.booleans(), st.floats(allow_nan=True),
                         st.sampled_from(["0", b"\0", [], (0,), 1.0, 0.0]))
#: Bad timeouts (None is valid: wait forever; so is any number >= 0 for deadline_after).
BAD_TIMEOUTS = st.one_of(st.floats(max_value=-1e-9), st.just(math.nan), st.booleans(),
                         st.sampled_from(["1", b"1", [], object()]))

quick = settings(max_examples=40, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


def misuse(exc: BaseException) -> bool:
    """The caller-misuse branch of the tree."""
    return isinstance(exc, VirtqUsageError)
