"""virtq.iova: every strategy passes the conformance suite, plus Hypothesis sequences."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtq.errors import ArgumentError, IovaError, IovaExhaustedError
from virtq.iova import (
    BumpAllocator,
    IdentityAllocator,
    NullDmaMapper,
    RangeAllocator,
    TaggedAllocator,
)
from virtq.testing import check_iova_allocator

SPAN = 1 << 20


def test_conformance_bump():
    check_iova_allocator(lambda: BumpAllocator(0x10000, 0x10000 + SPAN), span=SPAN)


def test_conformance_range():
    check_iova_allocator(lambda: RangeAllocator([(0, SPAN)]), span=SPAN)


def test_conformance_tagged():
    check_iova_allocator(lambda: TaggedAllocator(1 << 32, SPAN), span=SPAN)


def test_conformance_identity():
    check_iova_allocator(IdentityAllocator, span=SPAN, needs_host_addr=True)


def test_exhaustion_reports_largest_free_span():
    r = RangeAllocator([(0, 0x4000), (0x10000, 0x13000)])
    with pytest.raises(IovaExhaustedError) as info:
        r.alloc(0x5000)
    assert info.value.size == 0x5000
    assert info.value.largest_free == 0x4000


def test_range_allocator_skips_reserved_hole_and_accepts_inclusive_ranges():
    # x86 MSI window 0xFEE00000..0xFEEFFFFF is reserved, as VFIO reports.
    r = RangeAllocator.from_inclusive([(0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFF)])
    a = r.alloc(0xFEE00000 - 0x1000)
    b = r.alloc(0x2000)
    assert a == 0
    assert b == 0xFEF00000


def test_tagged_windows_are_disjoint():
    t = TaggedAllocator(0x1000_0000, 0x10_0000)
    rx = t.alloc(0x1000, tag=0)
    tx = t.alloc(0x1000, tag=1)
    assert rx == 0x1000_0000
    assert tx == 0x1010_0000
    with pytest.raises(ArgumentError):
        t.alloc(0x1000, tag=256)
    with pytest.raises(IovaExhaustedError):
        t.alloc(0x20_0000, tag=2)


def test_identity_requires_host_addr_and_rejects_overlap():
    ident = IdentityAllocator()
    with pytest.raises(ArgumentError):
        ident.alloc(4096)
    assert ident.alloc(8192, host_addr=0x7000_0000) == 0x7000_0000
    with pytest.raises(IovaError):
        ident.alloc(4096, host_addr=0x7000_1000)


def test_bump_rewinds_when_all_freed():
    b = BumpAllocator(0, 0x3000)
    x = b.alloc(0x1000)
    y = b.alloc(0x1000)
    b.free(x)
    assert b.alloc(0x1000) == 0x2000
    b.free(y)
    b.free(0x2000)
    assert b.alloc(0x3000) == 0


def test_null_mapper_records():
    m = NullDmaMapper()
    m.map(0x1000, 0x7F00_0000, 4096)
    assert m.mapped == {0x1000: (0x7F00_0000, 4096)}
    m.unmap(0x1000, 4096)
    assert m.mapped == {}


ops = st.lists(
    st.tuples(st.booleans(), st.integers(1, 0x9000), st.sampled_from([1, 16, 4096, 0x4000])),
    max_size=60,
)


@given(ops)
def test_range_allocator_sequences(seq):
    windows = [(0x1000, 0x20000), (0x30000, 0x48000)]
    r = RangeAllocator(windows)
    live: dict[int, int] = {}
    for do_alloc, size, align in seq:
        if do_alloc or not live:
            try:
                iova = r.alloc(size, align=align)
            except IovaExhaustedError as exc:
                assert exc.largest_free <= max(e - s for s, e in windows)
                continue
            assert iova % align == 0
            assert any(s <= iova and iova + size <= e for s, e in windows)
            for o, osize in live.items():
                assert iova + size <= o or o + osize <= iova
            live[iova] = size
        else:
            victim = sorted(live)[size % len(live)]
            r.free(victim)
            del live[victim]
    for iova in list(live):
        r.free(iova)
    # Everything coalesced back into the original windows.
    assert tuple(zip(r._starts, r._ends, strict=True)) == tuple(windows)
