"""virtio-rng through VFIO: random bytes arrive, by polling and by MSI-X eventfd."""

from __future__ import annotations

import select

import pytest

from tests.guest.conftest import MsixCounter
from virtq.devices.rng import RngDevice
from virtq.memory import HugepageRegion
from virtq.transport.vfio_pci import VfioPciTransport

ROUNDS = 1000


def _check_random(samples: list[bytes], size: int) -> None:
    assert all(len(s) == size for s in samples)
    # 64 random bytes never repeat and are never all zero (what unwritten memory reads as).
    assert len(set(samples)) == len(samples)
    assert bytes(size) not in samples


def test_rng_polling_1000_requests(rng_address):
    with RngDevice.open_vfio(rng_address, poll=True) as rng:
        t = rng.transport
        assert isinstance(t, VfioPciTransport) and t.poll and t.num_vectors == 0
        samples = [rng.read(64) for _ in range(ROUNDS)]
    _check_random(samples, 64)


def test_rng_msix_1000_requests(rng_address):
    with RngDevice.open_vfio(rng_address, poll=False) as rng:
        t = rng.transport
        assert isinstance(t, VfioPciTransport) and not t.poll and t.num_vectors >= 1
        # The vector was read back after it was written (§4.1.5.1.2); check it again.
        cfg = t.function.cfg
        cfg.write("queue_select", 0)
        assert cfg.read("queue_msix_vector") == 0
        counter = MsixCounter(t)
        samples = [rng.read(64) for _ in range(ROUNDS)]
        signals = counter.settle(ROUNDS)
    _check_random(samples, 64)
    # Every completion raises its MSI-X message (the driver never sets NO_INTERRUPT and
    # negotiates no EVENT_IDX), but the guest's APIC merges an edge-triggered vector that
    # arrives while the same vector is still pending: under a loaded TCG host one in a
    # thousand or so is merged (measured: 999 of 1000 now and then).  More signals than
    # completions, or a real loss (a notification decision gone wrong), fails.
    assert ROUNDS - ROUNDS // 50 <= signals <= ROUNDS, \
        f"{signals} MSI-X signals for {ROUNDS} completions"


def test_msix_eventfd_fires_for_a_completion(rng_address):
    """One request posted by hand: the eventfd becomes readable before anyone looks at the
    used ring."""
    with RngDevice.open_vfio(rng_address) as rng:
        t = rng.transport
        assert isinstance(t, VfioPciTransport)
        efd = t.eventfd(0)
        assert efd is not None
        q = rng.queue
        assert q is not None
        tpl = rng._tpl  # the device's one-buffer request template: take a slot by hand
        slot = tpl.acquire()
        tpl.submit(slot, (), [(rng.arena.iova + rng.layout.buffer(slot), 32)], "token")
        q.publish()
        t.notify(0)
        readable, _, _ = select.select([efd], [], [], 5.0)
        assert readable == [efd], "no MSI-X interrupt within 5 s"
        assert t.wait(0) is True  # drains the count
        assert q.drain_used() == [("token", 32)]
        assert tpl.num_free == tpl.slots


def test_rng_bar_access_by_pread_pwrite(rng_address):
    with RngDevice.open_vfio(rng_address, poll=True, bar_access="pio") as rng:
        t = rng.transport
        assert isinstance(t, VfioPciTransport)
        assert {bar.mode for bar in t._res.bars.values()} == {"pio"}
        _check_random([rng.read(64) for _ in range(50)], 64)


@pytest.mark.parametrize("poll", [True, False])
def test_rng_hugepage_memory(rng_address, hugepages, poll):
    with RngDevice.open_vfio(rng_address, memory=HugepageRegion, poll=poll) as rng:
        region = rng.arena.region
        assert isinstance(region.inner, HugepageRegion)  # type: ignore[attr-defined]
        assert rng.arena.iova % (2 << 20) == 0, "hugepage memory gets a 2 MiB-aligned IOVA"
        _check_random([rng.read(64) for _ in range(100)], 64)


def test_rng_large_reads_keep_several_requests_in_flight(rng_address):
    with RngDevice.open_vfio(rng_address, poll=True) as rng:
        data = rng.read(40_000)
        assert len(data) == 40_000 and len(set(data)) > 200
