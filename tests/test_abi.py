"""virtq.abi: every field offset and size against VIRTIO 1.2 (spec-notes §2.1, §2.10)."""

from __future__ import annotations

import ctypes

import pytest

from virtq import abi


@pytest.mark.parametrize(
    ("struct", "fields", "size"),
    [
        (abi.VirtqDesc, {"addr": 0, "len": 8, "flags": 12, "next": 14}, 16),
        (abi.VirtqAvailHeader, {"flags": 0, "idx": 2}, 4),
        (abi.VirtqUsedElem, {"id": 0, "len": 4}, 8),
        (abi.VirtqUsedHeader, {"flags": 0, "idx": 2}, 4),
        (abi.PvirtqDesc, {"addr": 0, "len": 8, "id": 12, "flags": 14}, 16),
        (abi.PvirtqEventSuppress, {"desc": 0, "flags": 2}, 4),
    ],
)
def test_struct_offsets(struct, fields, size):
    assert ctypes.sizeof(struct) == size
    for name, offset in fields.items():
        assert getattr(struct, name).offset == offset, name


@pytest.mark.parametrize("n", [1, 8, 256, 32768])
def test_variable_rings_have_spec_sizes(n):
    avail = abi.avail_ring_type(n)
    used = abi.used_ring_type(n)
    assert ctypes.sizeof(avail) == 6 + 2 * n
    assert avail.used_event.offset == 4 + 2 * n
    assert ctypes.sizeof(used) == 6 + 8 * n
    assert used.ring.offset == 4
    assert used.avail_event.offset == 4 + 8 * n


def test_little_endian_on_the_wire():
    d = abi.VirtqDesc(addr=0x0102030405060708, len=0x0A0B0C0D, flags=1, next=0x0203)
    assert bytes(d) == bytes.fromhex("0807060504030201" "0d0c0b0a" "0100" "0302")


def test_constants():
    assert (abi.VIRTQ_DESC_F_NEXT, abi.VIRTQ_DESC_F_WRITE, abi.VIRTQ_DESC_F_INDIRECT) == (1, 2, 4)
    assert (abi.VIRTQ_DESC_F_AVAIL, abi.VIRTQ_DESC_F_USED) == (0x80, 0x8000)
    assert abi.VIRTIO_F_VERSION_1 == 32
    assert abi.VIRTIO_F_RING_EVENT_IDX == 29
    assert abi.VIRTIO_F_INDIRECT_DESC == 28
    assert abi.VIRTIO_F_ACCESS_PLATFORM == 33
    assert abi.VIRTIO_F_RING_PACKED == 34
