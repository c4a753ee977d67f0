"""Ring layouts and driver queues against hostile arguments: sizes are ints (not bools),
a region is a MemoryRegion, add_many() takes triples, a closed queue says so.

Every test names the finding of the hostile-input campaign it guards."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from virtq.errors import ArgumentError, QueueStateError
from virtq.memory import MemfdRegion
from virtq.queue import make_queue, ring_layout

from .hostile_values import HOSTILE_INTS


@pytest.mark.parametrize("ring", ["split", "packed"])
@given(value=HOSTILE_INTS)
@settings(max_examples=60, deadline=None)
def test_ring_layout_arguments(ring: str, value: Any) -> None:
    """Finding: ring_layout(True) laid out a 1-entry ring; indirect_size / buffer_size of
    None, "1" or nan raised TypeError; buffer_size=2**64 was accepted (one descriptor's len
    is a le32)."""
    for kw in ({"size": value}, {"size": 8, "indirect_size": value},
               {"size": 8, "buffer_size": value}):
        if kw.get("indirect_size", kw.get("buffer_size")) is False:
            continue  # False == 0: "none", as documented
        with pytest.raises(ArgumentError):
            ring_layout(kw.pop("size"), ring=ring, **kw)


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_queue_arguments_and_closed_queue(ring: str) -> None:
    """Findings: make_queue(5, layout) raised AttributeError; add_many(5) and (packed)
    add_many([(1, 2)]) raised TypeError/ValueError; has_used() on a closed split queue
    raised ``ValueError: operation forbidden on released memoryview``."""
    layout = ring_layout(8, ring=ring, indirect_size=4)
    with MemfdRegion(layout.nbytes + 4096) as region:
        for bad in (5, None, object()):
            with pytest.raises(ArgumentError):
                make_queue(bad, layout, iova=region.host_addr)  # type: ignore[arg-type]
        q = make_queue(region, layout, iova=region.host_addr, indirect=True)
        buf = region.host_addr + layout.nbytes
        for bad in (5, None, [(1, 2)], [None], [([(buf, 8)], [], 1, 2)]):
            with pytest.raises(ArgumentError):
                q.add_many(bad)  # type: ignore[arg-type]
            assert q.num_in_flight == 0
        assert q.add_many([([(buf, 8)], [], "t")]) == 1
        q.close()
        if ring == "split":  # (a closed packed queue answers False)
            with pytest.raises(QueueStateError):
                q.has_used()


class _ArrayLike:
    """== answers with something that has no truth value (as a numpy array does)."""

    def __eq__(self, other: object) -> Any:
        return self

    def __ne__(self, other: object) -> Any:
        return self

    def __bool__(self) -> bool:
        raise ValueError("ambiguous")

    __hash__ = None  # type: ignore[assignment]


def _valid(buf: Any) -> bool:
    """What the queues take as a buffer (documented, and the same in add()): anything that
    unpacks to two ints (a bool is an int; two bytes are two ints), a u64 address and a
    length in 1 .. 2**32 - 1."""
    try:
        iova, length = buf
    except (TypeError, ValueError):
        return False
    return (isinstance(iova, int) and isinstance(length, int) and 0 <= iova < 1 << 64
            and 0 < length < 1 << 32)


@pytest.mark.parametrize(("ring", "indirect"), [("split", False), ("split", True),
                                                ("packed", False), ("packed", True)])
@given(bad=st.one_of(
    st.tuples(HOSTILE_INTS, st.just(512)),
    st.tuples(st.just(0x10_0000), HOSTILE_INTS),
    st.sampled_from([None, (), (1,), (0x10_0000, 512, 0), "ab", b"ab", 7, _ArrayLike(),
                     [0x10_0000, 512], (0x20_0000, 512), (float(0x20_0000), 512),
                     (0x20_0000, 512.0), (0x20_0000, 511)])),
    position=st.integers(0, 2), many=st.booleans())
@example(bad=(float(0x20_0000), 512), position=1, many=False)
@example(bad=(float(0x20_0000), 512), position=2, many=True)
@example(bad=(0x20_0000, 512.0), position=1, many=True)
@settings(max_examples=40, deadline=None)
def test_template_refill_with_a_hostile_buffer(ring: str, indirect: bool, bad: Any,
                                               position: int, many: bool) -> None:
    """Finding (this wave): template refills compare each buffer with what the slot holds
    to rewrite only what moved; a hostile buffer in any position of a refill is refused
    with ArgumentError and nothing submitted (the slot stays held, the queue unchanged),
    or, if it is a valid buffer, the device sees exactly it."""
    from virtq.testing import DeviceQueue  # noqa: PLC0415
    from virtq.testing.packed_device import PackedDeviceQueue  # noqa: PLC0415

    base = 0x10_0000
    layout = ring_layout(8, ring=ring, indirect_size=4, buffer_size=4096)
    # The device also reaches [0, base): a small valid address (two bytes unpacked) is
    # mapped too, so that what the device sees can be compared.
    with MemfdRegion(layout.nbytes + (4 << 20)) as region, MemfdRegion(base) as low:
        q = make_queue(region, layout, iova=base, indirect=indirect)
        dev = (PackedDeviceQueue(region, layout, iova=base, regions=[(0, low)])
               if ring == "packed" else DeviceQueue(region, layout, iova=base,
                                                    regions=[(0, low)]))
        try:
            tpl = q.template(3, slots=1)
            r, w = [(base, 16)], [(base + 0x1000, 512), (base + 32, 1)]
            (slot,) = tpl.acquire_many(1)
            tpl.submit(slot, r, w, "first")
            q.publish()
            head, _ = dev.pop()
            dev.push(head, 1)
            assert q.drain_used() == [("first", 1)]
            (slot,) = tpl.acquire_many(1)
            chain = [*r, *w]
            chain[position] = bad
            r2, w2 = chain[:1], chain[1:]
            before = q.snapshot()
            try:
                if many:
                    tpl.submit_many((slot,), [r2], [w2], ["second"])
                else:
                    tpl.submit(slot, r2, w2, "second")
            except ArgumentError:
                assert not _valid(bad)
                assert q.snapshot() == before
                tpl.release(slot)  # still held: release works
                return
            assert _valid(bad), bad
            q.publish()
            head, segs = dev.pop()
            seen = [(g.iova, g.length) for g in segs]
            del segs  # (their views keep the regions open)
            assert seen == [(int(b[0]), int(b[1])) for b in chain]
        finally:
            dev.close()
            q.close()
