"""virtq.memory: every backend passes the conformance suite; sharing, hugepages, leaks."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from tests.conftest import resource_counts
from virtq.errors import ArgumentError, HugepagesUnavailableError, RegionClosedError, VirtqError
from virtq.memory import HUGEPAGE_2M, AnonymousRegion, HugepageRegion, MemfdRegion
from virtq.testing import check_memory_region

BACKENDS = {
    "anonymous": lambda: AnonymousRegion(3 * 4096),
    "memfd": lambda: MemfdRegion(5 * 4096 + 1),
    "memfd-hugetlb": lambda: MemfdRegion(4096, hugepages=True),
    "hugepage": lambda: HugepageRegion(HUGEPAGE_2M),
}


@pytest.mark.parametrize("name", BACKENDS)
def test_conformance(name, no_leaks):
    check_memory_region(BACKENDS[name])


def test_sizes_round_up():
    with AnonymousRegion(1) as a, MemfdRegion(4097) as m, HugepageRegion(1) as h:
        assert (a.nbytes, m.nbytes, h.nbytes) == (4096, 8192, HUGEPAGE_2M)
        assert h.host_addr % HUGEPAGE_2M == 0


def test_hugepage_region_really_uses_hugetlb():
    with HugepageRegion(HUGEPAGE_2M) as region:
        region.view(0, 8)[:] = b"hugepage"  # fault the page in
        with open("/proc/self/smaps") as f:
            smaps = f.read()
        start = f"{region.host_addr:x}-"
        block = smaps[smaps.index(start):].split("\nVmFlags:")[1].split("\n")[0]
        assert " ht" in block, f"mapping is not hugetlb: VmFlags {block}"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4096"])
def test_bad_sizes(bad):
    with pytest.raises(ArgumentError):
        AnonymousRegion(bad)
    with pytest.raises(ArgumentError):
        MemfdRegion(bad)


def test_hugepage_exhaustion_says_how_to_reserve():
    # Far more than any CI machine reserves.
    with pytest.raises(HugepagesUnavailableError) as info:
        HugepageRegion(64 * 1024 * HUGEPAGE_2M)
    err = info.value
    assert isinstance(err, OSError)
    assert isinstance(err, VirtqError)
    assert err.errno is not None
    assert "vm.nr_hugepages" in str(err)


def test_memfd_cross_process_sees_and_changes_bytes(no_leaks):
    with MemfdRegion(8192) as region:
        region.view(100, 5)[:] = b"hello"
        child = textwrap.dedent(f"""
            from virtq.memory import MemfdRegion
            with MemfdRegion.attach({region.fd}, {region.nbytes}) as r:
                v = r.view(100, 5)
                assert bytes(v) == b"hello", bytes(v)
                r.view(200, 5)[:] = b"world"
                v.release()
        """)
        subprocess.run([sys.executable, "-c", child], check=True, pass_fds=[region.fd],
                       timeout=30)
        assert bytes(region.view(200, 5)) == b"world"


def test_attach_checks_size_and_dups_fd():
    with MemfdRegion(4096) as region:
        with pytest.raises(ArgumentError):
            MemfdRegion.attach(region.fd, 8192)
        other = MemfdRegion.attach(region.fd, 4096)
        assert other.fd != region.fd
        other.close()
        assert os.fstat(region.fd)  # the original fd survives


def test_unclosed_region_warns(recwarn):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        r = MemfdRegion(4096)
        del r
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in recwarn.list)


def test_closed_region_errors():
    r = AnonymousRegion(4096)
    r.close()
    with pytest.raises(RegionClosedError):
        r.view(0, 1)
    with pytest.raises(RegionClosedError), r:
        pass


@pytest.mark.parametrize("name", ["anonymous", "memfd", "hugepage"])
def test_no_leaks_after_1000_cycles(name):
    factory = BACKENDS[name]
    before = resource_counts()
    for _ in range(1000):
        with factory() as region:
            region.view(0, 8)[:] = b"12345678"
    assert resource_counts() == before
