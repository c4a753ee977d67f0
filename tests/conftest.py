from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import psutil
import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["virtq.testing.pytest_plugin"]

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def resource_counts() -> tuple[int, int]:
    """(open fds, all memory mappings) of this process -- exact, for tight loops where the
    interpreter itself allocates nothing new."""
    gc.collect()
    proc = psutil.Process()
    return proc.num_fds(), len(proc.memory_maps(grouped=False))


def _backed(path: str) -> bool:
    # memfd, hugetlb and file mappings; not [heap]/[stack]/anonymous ones, which CPython's
    # arenas and glibc's thread-stack cache create and drop on their own schedule.
    return bool(path) and not path.startswith("[")


def named_resource_counts() -> tuple[int, int]:
    """(open fds, file/memfd/hugetlb mappings): what virtq creates per region."""
    gc.collect()
    proc = psutil.Process()
    maps = proc.memory_maps(grouped=False)
    return proc.num_fds(), sum(1 for m in maps if _backed(m.path))


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves fds or fd-backed mappings behind."""
    before = named_resource_counts()
    yield
    after = named_resource_counts()
    assert after == before, f"(fds, mappings) before {before}, after {after}"
