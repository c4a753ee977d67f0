from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import psutil
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def resource_counts() -> tuple[int, int]:
    """(open fds, memory mappings) of this process."""
    gc.collect()
    proc = psutil.Process()
    return proc.num_fds(), len(proc.memory_maps(grouped=False))


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves fds or mappings behind."""
    before = resource_counts()
    yield
    after = resource_counts()
    assert after == before, f"(fds, mappings) before {before}, after {after}"
