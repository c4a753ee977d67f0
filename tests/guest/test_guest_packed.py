"""The packed virtqueue (VIRTIO 1.2 §2.8) on real virtio-pci devices through VFIO.

Run in a boot of its own whose devices offer VIRTIO_F_RING_PACKED (``scripts/vfio-guest
--devopt packed=on``, marker ``packed_boot``): QEMU's virtio-rng-pci and virtio-blk-pci
then read our packed descriptor ring, write used descriptors into it, and honour our event
suppression structures -- the device side is QEMU's, not ours.  QEMU 7.2 does not
implement VIRTIO_F_IN_ORDER, so only the ring format changes here.
"""

from __future__ import annotations

import os

import pytest

from tests.guest.conftest import DISK_IMAGE, SECTOR, MsixCounter, pattern
from virtq.abi import VIRTIO_F_RING_PACKED
from virtq.devices.blk import BlkDevice
from virtq.devices.errors import BlkIOError
from virtq.devices.rng import RngDevice
from virtq.queue import PackedQueue, SplitQueue

pytestmark = pytest.mark.packed_boot

ROUNDS = 1000


def _packed(dev: BlkDevice | RngDevice) -> None:
    """The device offered and we negotiated RING_PACKED, and the queues are packed."""
    assert dev.transport.device_features >> VIRTIO_F_RING_PACKED & 1, \
        "this boot's devices must offer RING_PACKED (--devopt packed=on)"
    assert dev.features >> VIRTIO_F_RING_PACKED & 1
    queues = dev.queues if isinstance(dev, BlkDevice) else [dev.queue]
    assert queues and all(isinstance(q, PackedQueue) for q in queues)


@pytest.mark.parametrize("poll", [True, False], ids=["poll", "msix"])
def test_rng_1000_requests_over_a_packed_ring(rng_address, poll):
    with RngDevice.open_vfio(rng_address, poll=poll) as rng:  # ring="auto": packed
        _packed(rng)
        samples = [rng.read(64) for _ in range(ROUNDS)]
        q = rng.queue
        assert q is not None
        # 1000 chains went around a ring far smaller than that: both wrap counters have
        # flipped many times and every used descriptor was read at the right lap.
        assert q.size < ROUNDS
        assert q.num_in_flight == 0
    assert len(set(samples)) == ROUNDS
    assert bytes(64) not in samples


def test_rng_msix_signals_every_packed_completion(rng_address):
    """Driver event suppression at RING_EVENT_FLAGS_ENABLE: QEMU raises one MSI-X message
    per used descriptor (§2.8.10)."""
    with RngDevice.open_vfio(rng_address, poll=False) as rng:
        _packed(rng)
        counter = MsixCounter(rng.transport)
        for _ in range(200):
            rng.read(32)
        signals = counter.settle(200)
    # As test_guest_rng: the guest APIC may merge a message arriving while the vector is
    # still pending, never invent one.
    assert 200 - 200 // 50 <= signals <= 200, f"{signals} MSI-X signals for 200"


@pytest.mark.parametrize("poll", [True, False], ids=["poll", "msix"])
def test_blk_over_a_packed_ring(blk_address, poll):
    payload = os.urandom(24 * SECTOR)
    sector = 256 if poll else 512
    with BlkDevice.open_vfio(blk_address, poll=poll, queue_size=64) as blk:
        _packed(blk)
        assert blk.capacity == DISK_IMAGE.stat().st_size // SECTOR
        assert blk.read(0, 8 * SECTOR) == pattern(0, 8)
        blk.write(sector, payload)
        assert blk.read(sector, len(payload)) == payload
        blk.flush()
        assert isinstance(blk.get_id(), str)
        # Many requests in flight, completed and reaped by id (QEMU may complete them in
        # any order), around the ring several times.
        for rnd in range(4):
            reqs = [blk.submit_read(1024 + 8 * i, 8 * SECTOR) for i in range(48)]
            blk.wait(reqs)
            for i, r in enumerate(reqs):
                assert r.wait() == pattern(1024 + 8 * i, 8), (rnd, i)
        with pytest.raises(BlkIOError):
            blk.read(blk.capacity, SECTOR)  # past the end: the device's IOERR status
        assert blk.read(sector, SECTOR) == payload[:SECTOR]  # the queue is still fine
    with open(DISK_IMAGE, "rb") as f:
        f.seek(sector * SECTOR)
        assert f.read(len(payload)) == payload


def test_split_is_still_the_drivers_choice(blk_address):
    """ring="split" on a device that offers RING_PACKED: the bit is not negotiated and the
    device reads a split ring."""
    with BlkDevice.open_vfio(blk_address, poll=True, ring="split") as blk:
        assert not blk.features >> VIRTIO_F_RING_PACKED & 1
        assert all(type(q) is SplitQueue for q in blk.queues)
        assert blk.read(0, SECTOR) == pattern(0, 1)
