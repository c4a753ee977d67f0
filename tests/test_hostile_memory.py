"""Hostile arguments to every memory region constructor and method (review 2026-11-30,
hostile finding 12): each must end in a ``VirtqError`` -- ``ArgumentError`` for a bad
argument, ``VirtqOSError`` with the kernel's errno for a refusal -- never a raw
``OSError``/``OverflowError``/``TypeError``/``ValueError``, and never leave an fd or a
mapping behind."""

from __future__ import annotations

import errno
import mmap
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtq.errors import (
    ArgumentError,
    HugepagesUnavailableError,
    RegionBoundsError,
    VirtqError,
    VirtqOSError,
)
from virtq.memory import (
    HUGEPAGE_2M,
    PAGE_SIZE,
    AnonymousRegion,
    HugepageRegion,
    MemfdRegion,
    MmapRegion,
    VfioContainer,
)

HUGE = 1 << 50  # more than any address space or overcommit limit here allows
MEMFD_NAME_MAX = 249  # memfd_create(2)
MAX_REGION_BYTES = 1 << 56  # virtq.memory.base.MAX_REGION_BYTES
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

#: Anything a caller might pass where a size, offset or fd belongs.
junk = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.sampled_from([0, -1, 1, 4095, 4096, HUGE, 1 << 63, 1 << 64, MAX_REGION_BYTES + 1,
                     2**31, 2**31 - 1, 2**32]),
    st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=4),
    st.binary(max_size=4), st.just(object()), st.just([4096]),
)


def _either_works_or_virtq_error(make, *args, **kwargs):
    """Call ``make``; close what it returns.  Any exception must be a VirtqError."""
    try:
        region = make(*args, **kwargs)
    except VirtqError as exc:
        return exc
    region.close()
    return None


# -- the review's reproducers ---------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: AnonymousRegion(HUGE),
    lambda: MemfdRegion(HUGE),
    lambda: MemfdRegion(HUGE, hugepages=True),
    lambda: HugepageRegion(HUGE),
], ids=["anonymous", "memfd", "memfd-hugetlb", "hugepage"])
def test_region_too_large_for_the_machine_is_a_virtq_os_error_with_enomem(make, no_leaks):
    with pytest.raises(VirtqOSError) as info:
        make()
    assert isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOMEM
    assert "Cannot allocate memory" in str(info.value) or "hugepages" in str(info.value)


@pytest.mark.parametrize("nbytes", [1 << 63, 1 << 64, 2**63 - 1, MAX_REGION_BYTES + 1])
def test_sizes_beyond_any_address_space_are_argument_errors(nbytes):
    for make in (AnonymousRegion, MemfdRegion, HugepageRegion):
        with pytest.raises(ArgumentError) as info:
            make(nbytes)
        assert info.value.name == "nbytes"


def test_memfd_name_rules(no_leaks):
    for bad in ("a\0b", "\0", "x" * (MEMFD_NAME_MAX + 1), "é" * 125, 3, b"virtq", None):
        with pytest.raises(ArgumentError) as info:
            MemfdRegion(4096, name=bad)
        assert info.value.name == "name"
    with MemfdRegion(4096, name="x" * MEMFD_NAME_MAX) as region:
        assert os.readlink(f"/proc/self/fd/{region.fd}").startswith("/memfd:xxx")


def test_attach_rejects_bad_fds_and_offsets(no_leaks):
    with MemfdRegion(4 * PAGE_SIZE) as region:
        fd = region.fd
        for kwargs, name in (
            ({"fd": -1}, "fd"), ({"fd": -5}, "fd"), ({"fd": "3"}, "fd"), ({"fd": True}, "fd"),
            ({"fd": 2.0}, "fd"), ({"offset": 1}, "offset"), ({"offset": -PAGE_SIZE}, "offset"),
            ({"offset": PAGE_SIZE // 2}, "offset"), ({"offset": 1.0}, "offset"),
            ({"offset": None}, "offset"), ({"offset": 1 << 64}, "nbytes"),
            ({"nbytes": 0}, "nbytes"), ({"nbytes": -4096}, "nbytes"),
            ({"nbytes": 5 * PAGE_SIZE}, "nbytes"), ({"nbytes": "4096"}, "nbytes"),
            ({"offset": 4 * PAGE_SIZE}, "nbytes"),
        ):
            args = {"fd": fd, "nbytes": PAGE_SIZE, "offset": 0, **kwargs}
            with pytest.raises(ArgumentError) as info:
                MemfdRegion.attach(args["fd"], args["nbytes"], offset=args["offset"])
            assert info.value.name == name, (kwargs, info.value)
        # The good call still works after all the bad ones.
        with MemfdRegion.attach(fd, PAGE_SIZE, offset=3 * PAGE_SIZE) as tail:
            tail.view(0, 4)[:] = b"tail"
        assert bytes(region.view(3 * PAGE_SIZE, 4)) == b"tail"


def test_attach_to_a_closed_fd_is_an_argument_error(no_leaks):
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(ArgumentError) as info:
        MemfdRegion.attach(r, PAGE_SIZE)
    assert info.value.name == "fd"


def test_attach_to_unmappable_files_is_a_virtq_os_error_with_the_errno(tmp_path, no_leaks):
    path = tmp_path / "file"
    path.write_bytes(bytes(2 * PAGE_SIZE))
    ro = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(VirtqOSError) as info:
            MemfdRegion.attach(ro, PAGE_SIZE)  # MAP_SHARED + PROT_WRITE on a read-only fd
        assert info.value.errno == errno.EACCES
    finally:
        os.close(ro)
    r, w = os.pipe()
    try:
        with pytest.raises(ArgumentError):  # a pipe has no bytes to map
            MemfdRegion.attach(r, PAGE_SIZE)
    finally:
        os.close(r)
        os.close(w)


def test_attach_to_a_hugetlb_memfd_uses_its_page_size(no_leaks):
    with MemfdRegion(HUGEPAGE_2M, hugepages=True) as region:
        with pytest.raises(ArgumentError) as info:
            MemfdRegion.attach(region.fd, PAGE_SIZE, offset=PAGE_SIZE)
        assert info.value.name == "offset" and str(HUGEPAGE_2M) in str(info.value)
        region.view(0, 4)[:] = b"huge"
        with MemfdRegion.attach(region.fd, PAGE_SIZE) as again:  # rounded up to the hugepage
            assert again.nbytes == HUGEPAGE_2M and again.page_size == HUGEPAGE_2M
            assert bytes(again.view(0, 4)) == b"huge"


def test_hugepage_sizes_are_checked_against_the_kernel(no_leaks):
    from virtq.memory.backends import hugepage_sizes  # noqa: PLC0415 - new in this change

    assert HUGEPAGE_2M in hugepage_sizes()
    for bad in (3 * HUGEPAGE_2M, 1 << 70, 1 << 63, PAGE_SIZE, 2.0**21, "2M", True, None, -1):
        with pytest.raises(ArgumentError) as info:
            HugepageRegion(HUGEPAGE_2M, page_size=bad)
        assert info.value.name == "page_size"
        if bad is not None:  # None: the default (2 MiB) for a memfd
            with pytest.raises(ArgumentError):
                MemfdRegion(HUGEPAGE_2M, hugepages=True, page_size=bad)


def test_memfd_flags_are_checked(no_leaks):
    for bad in ("no", 1, None, 0.0):
        with pytest.raises(ArgumentError) as info:
            MemfdRegion(4096, hugepages=bad)
        assert info.value.name == "hugepages"
    with pytest.raises(ArgumentError) as info:
        MemfdRegion(4096, page_size=HUGEPAGE_2M)  # without hugepages=True it would be ignored
    assert info.value.name == "page_size"


def test_view_with_non_int_offsets_is_a_bounds_error():
    with AnonymousRegion(PAGE_SIZE) as region:
        for offset, length in (("a", None), (None, None), (1.5, None), (True, 1), (0, 1.0),
                               (0, "1"), (b"", None)):
            with pytest.raises(RegionBoundsError):
                region.view(offset, length)


def test_mmap_region_constructor_checks_its_arguments(no_leaks):
    mapping = mmap.mmap(-1, PAGE_SIZE)
    try:
        for args, kwargs in (((b"x" * 10, 10, None), {}), ((mapping, PAGE_SIZE + 1, None), {}),
                             ((mapping, 0, None), {}), ((mapping, PAGE_SIZE, -1), {}),
                             ((mapping, PAGE_SIZE, "3"), {}),
                             ((mapping, PAGE_SIZE, None), {"fd_offset": -1})):
            with pytest.raises(ArgumentError):
                MmapRegion(*args, **kwargs)
    finally:
        mapping.close()


def test_closing_a_region_whose_fd_was_closed_behind_its_back(no_leaks):
    region = MemfdRegion(PAGE_SIZE)
    os.close(region.fd)
    with pytest.raises(VirtqOSError) as info:
        region.close()
    assert info.value.errno == errno.EBADF
    assert region.closed
    region.close()  # idempotent afterwards


def test_vfio_container_path_is_checked():
    for bad in ("/dev/vfio/\0vfio", 3, None, b"/dev/vfio/vfio"):
        with pytest.raises(ArgumentError):
            VfioContainer(bad)


# -- properties: any argument, any backend ------------------------------------------------


@FIXTURE_OK
@given(nbytes=junk)
def test_any_size_gives_a_region_or_a_virtq_error(nbytes, no_leaks):
    for make in (AnonymousRegion, MemfdRegion, HugepageRegion):
        exc = _either_works_or_virtq_error(make, nbytes)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            assert isinstance(exc, ArgumentError), (make, nbytes, exc)


@FIXTURE_OK
@given(nbytes=junk, name=st.one_of(st.text(max_size=300), junk),
       hugepages=st.one_of(st.booleans(), junk), page_size=st.one_of(
           st.sampled_from([None, PAGE_SIZE, HUGEPAGE_2M, 1 << 30]), junk))
def test_any_memfd_arguments_give_a_region_or_a_virtq_error(nbytes, name, hugepages,
                                                           page_size, no_leaks):
    exc = _either_works_or_virtq_error(MemfdRegion, nbytes, name=name, hugepages=hugepages,
                                       page_size=page_size)
    if not isinstance(hugepages, bool):
        assert isinstance(exc, ArgumentError)


@FIXTURE_OK
@given(fd=st.one_of(st.just("own"), junk), nbytes=junk,
       offset=st.one_of(st.sampled_from([0, PAGE_SIZE, 1, -1]), junk))
def test_any_attach_arguments_give_a_region_or_a_virtq_error(fd, nbytes, offset, no_leaks):
    with MemfdRegion(4 * PAGE_SIZE) as region:
        if fd == "own":
            fd = region.fd
        elif isinstance(fd, int) and not isinstance(fd, bool) and 0 <= fd < 1 << 16:
            # An fd number that might be open in this process: do not map random files.
            fd = fd % 2 + 1000 if fd > 2 else -1
        exc = _either_works_or_virtq_error(MemfdRegion.attach, fd, nbytes, offset=offset)
        if exc is None:
            assert fd == region.fd


@given(offset=junk, length=st.one_of(st.none(), junk))
def test_any_view_arguments_give_a_view_or_a_bounds_error(offset, length):
    with AnonymousRegion(2 * PAGE_SIZE) as region:
        try:
            view = region.view(offset, length)
        except RegionBoundsError:
            return
        expected = (2 * PAGE_SIZE - offset) if length is None else length
        assert len(view) == expected
        view.release()


def test_hugepages_unavailable_is_still_a_virtq_os_error():
    # Exhaustion (the pool has 16 pages here) keeps its own subclass and the errno.
    with pytest.raises(HugepagesUnavailableError) as info:
        HugepageRegion(4096 * HUGEPAGE_2M)
    assert isinstance(info.value, VirtqOSError) and info.value.errno == errno.ENOMEM
