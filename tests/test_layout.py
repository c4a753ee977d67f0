"""virtq.layout: the seed's table, the spec rules for every size, the u16 helpers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtq.errors import LayoutError
from virtq.layout import (
    PackedLayout,
    SplitLayout,
    distance,
    need_event,
    wrap_add,
)

POW2 = [1 << k for k in range(16)]


def spec_split(n: int, buffer_size: int, page: int, legacy: bool) -> tuple[int, ...]:
    """Independent computation straight from VIRTIO 1.2 §2.7 and the seed's table."""

    def up(x: int, a: int) -> int:
        return -(-x // a) * a

    desc = 0
    avail = up(16 * n, 2)
    used = up(avail + 6 + 2 * n, page if legacy else 4)
    end = used + 6 + 8 * n
    buffers = None
    if buffer_size:
        buffers = up(end, buffer_size if buffer_size & (buffer_size - 1) == 0 else 64)
        if buffer_size & (buffer_size - 1) == 0 and buffer_size > page:
            buffers = up(end, page)
        end = buffers + buffer_size * n
    return desc, avail, used, buffers, up(end, page)


@pytest.mark.parametrize(
    ("n", "desc", "avail", "used", "buffers", "nbytes"),
    [(8, 0, 128, 152, 1024, 12288), (16, 0, 256, 296, 1024, 20480),
     (256, 0, 4096, 4616, 7168, 270336)],
)
def test_reproduces_seed_table(n, desc, avail, used, buffers, nbytes):
    lay = SplitLayout.compute(n, buffer_size=1024)
    assert (lay.desc, lay.avail, lay.used, lay.buffers, lay.nbytes) == (
        desc, avail, used, buffers, nbytes)


@given(
    n=st.sampled_from(POW2),
    buffer_size=st.sampled_from([0, 64, 512, 1024, 1500, 4096, 8192]),
    page=st.sampled_from([4096, 65536]),
    legacy=st.booleans(),
)
def test_split_matches_spec_formulas(n, buffer_size, page, legacy):
    lay = SplitLayout.compute(n, buffer_size=buffer_size, page_size=page, legacy=legacy)
    assert (lay.desc, lay.avail, lay.used, lay.buffers, lay.nbytes) == spec_split(
        n, buffer_size, page, legacy)
    # Alignment rules (§2.7 table) and no overlap.
    assert lay.desc % 16 == 0
    assert lay.avail % 2 == 0
    assert lay.used % (page if legacy else 4) == 0
    assert lay.avail >= lay.desc + 16 * n
    assert lay.used >= lay.avail + 6 + 2 * n
    assert lay.used_event == lay.avail + 4 + 2 * n
    assert lay.avail_event == lay.used + 4 + 8 * n
    assert lay.nbytes % page == 0


def test_legacy_n256_total_matches_spec_example():
    lay = SplitLayout.compute(256, legacy=True)
    # §2.7.2 legacy: align(16N + 2(3+N), 4096) + 2*3 + 8N = 8192 + 2054.
    assert lay.used == 8192
    assert lay.used + 6 + 8 * 256 == 10246


def test_indirect_area_follows_everything_and_keeps_seed_offsets():
    plain = SplitLayout.compute(8, buffer_size=1024)
    lay = SplitLayout.compute(8, buffer_size=1024, indirect_size=4)
    assert (lay.desc, lay.avail, lay.used, lay.buffers) == (
        plain.desc, plain.avail, plain.used, plain.buffers)
    assert lay.indirect == 1024 + 8 * 1024
    assert lay.indirect_table(3) == lay.indirect + 3 * 64


@pytest.mark.parametrize("bad", [0, 3, 6, 65536, 32769, -8, 1.5, "8"])
def test_split_rejects_bad_sizes(bad):
    with pytest.raises(LayoutError) as info:
        SplitLayout.compute(bad)
    assert isinstance(info.value, ValueError)
    assert info.value.name == "queue_size"
    assert info.value.value == bad
    assert "power of two" in str(info.value)


@pytest.mark.parametrize("bad", [0, 32769, 65536, -1])
def test_packed_rejects_bad_sizes(bad):
    with pytest.raises(LayoutError, match=r"1\.\.32768"):
        PackedLayout.compute(bad)


@given(st.integers(1, 32768))
def test_packed_layout_rules(n):
    lay = PackedLayout.compute(n)
    assert lay.desc == 0
    assert lay.driver_event == -(-16 * n // 4) * 4
    assert lay.device_event == lay.driver_event + 4
    assert lay.nbytes % 4096 == 0
    assert lay.nbytes >= lay.device_event + 4


def test_other_parameters_validated():
    with pytest.raises(LayoutError):
        SplitLayout.compute(8, page_size=3000)
    with pytest.raises(LayoutError):
        SplitLayout.compute(8, buffer_size=-1)
    with pytest.raises(LayoutError):
        SplitLayout.compute(8).buffer(0)
    with pytest.raises(LayoutError):
        SplitLayout.compute(8, buffer_size=64).buffer(8)


def test_need_event_spec_examples():
    # Worked examples in spec-notes §2.6.
    assert need_event(0, 1, 0)
    assert not need_event(5, 3, 0)
    assert need_event(65535, 2, 65534)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0x7FFF))
def test_need_event_is_window_membership(event, old, steps):
    new = wrap_add(old, steps)
    window = {wrap_add(old, k) for k in range(steps)}
    assert need_event(event, new, old) == (event in window)


@given(st.integers(0, 0xFFFF), st.integers(-70000, 70000))
def test_wrap_add_and_distance(a, n):
    b = wrap_add(a, n)
    assert 0 <= b <= 0xFFFF
    assert distance(a, b) == n % 65536


def test_shifted_layout_keeps_sizes_and_alignment():
    lay = SplitLayout.compute(64, buffer_size=512, indirect_size=4)
    moved = lay.shifted(3 * 4096)
    assert moved.desc == 3 * 4096
    assert moved.avail - moved.desc == lay.avail - lay.desc
    assert moved.used - moved.desc == lay.used - lay.desc
    assert moved.buffer(1) == lay.buffer(1) + 3 * 4096
    assert moved.indirect_table(2) == lay.indirect_table(2) + 3 * 4096
    assert moved.nbytes == lay.nbytes + 3 * 4096
    with pytest.raises(LayoutError):
        lay.shifted(100)
