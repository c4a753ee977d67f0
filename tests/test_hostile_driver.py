"""The hostile driver's own parts: guard bytes, the raw ring against the device-side peer,
raw vhost-user messages."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtq.abi import VIRTQ_DESC_F_NEXT
from virtq.testing import DeviceQueue, GuestMemory, HostileDriver, RawRing, VhostUserBlkBackend
from virtq.testing.runners import make_image
from virtq.transport.vhost_user import protocol as P


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(1 << 20, seed=1)
    yield m
    m.close()


def test_guards_catch_writes_around_buffers_and_into_readable_ones(mem):
    ring = RawRing(mem, 0, 8)
    r = mem.buffer(16, data=b"r" * 16)
    w = mem.buffer(32, writable=True)
    assert mem.guard_hits() == []
    mem.write(w.offset, b"x" * 32)  # inside the writable buffer: fine
    assert mem.guard_hits() == []
    mem.write(w.offset + 32, b"!")  # one byte past it
    mem.write(r.offset + 3, b"?")  # into the readable one
    hits = mem.guard_hits()
    assert [h.what for h in hits] == ["guard bytes", "device-readable buffer"]
    assert "byte 0 is 0x21" in hits[0].describe()
    ring.close()


@pytest.mark.parametrize(("indirect", "prefix"), [(False, 0), (True, 0), (True, 1)])
def test_raw_ring_round_trip_with_the_device_peer(mem, indirect, prefix):
    ring = RawRing(mem, 0, 8, start=0xFFFE)
    dev = DeviceQueue(mem.region, ring.layout.shifted(ring.base), iova=mem.gpa_base,
                      start_index=0xFFFE)
    try:
        for k in range(4):  # across the u16 wrap
            bufs = [mem.buffer(8, data=bytes([k]) * 8), mem.buffer(4, writable=True),
                    mem.buffer(4, writable=True)]
            head = ring.add(bufs[:1], bufs[1:], indirect=indirect, direct_prefix=prefix)
            ring.publish()
            got_head, segments = dev.pop()
            assert got_head == head
            assert [(s.iova, s.length, s.writable) for s in segments] == \
                [(b.gpa, b.length, b.writable) for b in bufs]
            dev.push(head, 5)
            assert ring.reap() == [(head, 5)]
        assert ring.used_idx == ring.next_avail == 2
        assert len(ring.free) == 8
    finally:
        dev.close()
        ring.close()


def test_raw_descriptors_and_indices_are_written_as_given(mem):
    ring = RawRing(mem, 0, 4)
    ring.write_desc(5, 1 << 63, 0xFFFFFFFF, 0xFFFF, 0xBEEF)  # index taken modulo the size
    assert ring.read_desc(1) == (1 << 63, 0xFFFFFFFF, 0xFFFF, 0xBEEF)
    ring.set_avail(9, 0x1234)
    assert ring.avail_entry(1) == 0x1234
    ring.avail_idx = 0x1_0005
    assert ring.avail_idx == 5
    ring.write_desc(0, mem.gpa_base, 16, VIRTQ_DESC_F_NEXT, 0)  # a loop onto itself
    assert ring.read_desc(0)[2:] == (VIRTQ_DESC_F_NEXT, 0)
    ring.close()


def test_raw_messages_to_a_back_end(no_leaks):
    with tempfile.TemporaryDirectory(prefix="vqh-") as d:
        image = make_image(Path(d) / "disk.img", 1 << 20)
        with VhostUserBlkBackend(image, Path(d) / "s.sock") as b, \
                HostileDriver.connect(b.socket_path) as drv:
            drv.send_raw(P.Request.GET_FEATURES)
            reply = drv.recv_raw(2.0)
            assert reply is not None and reply.code == P.Request.GET_FEATURES
            assert reply.flags & P.FLAG_REPLY and len(reply.payload) == 8
            drv.send_raw(0xDEAD, b"garbage")  # no such request: the back-end hangs up
            with pytest.raises(EOFError):
                drv.recv_raw(2.0)
            assert not drv.connection_open()
