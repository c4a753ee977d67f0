"""A hostile device writing garbage into the used ring: only VirtqError or success."""

from __future__ import annotations

import os

import pytest

from virtq.errors import VirtqError
from virtq.layout import SplitLayout
from virtq.memory import MemfdRegion
from virtq.queue import SplitQueue
from virtq.testing import DeviceQueue, HostileDevice

BASE = 0x2000_0000


def fuzz(rounds: int, seed: int) -> dict[str, int]:
    layout = SplitLayout.compute(8, buffer_size=64, indirect_size=3)
    outcomes = {"ok": 0, "error": 0, "resets": 0}
    with MemfdRegion(layout.nbytes) as region:
        q = SplitQueue(region, layout, iova=BASE, indirect=True, event_idx=bool(seed % 2))
        hostile = HostileDevice(region, layout, seed=seed)
        dev = DeviceQueue(region, layout, iova=BASE)
        rng = hostile.rng
        for _ in range(rounds):
            try:
                # Keep some chains in flight so corruptions can hit real heads.
                while q.num_free and rng.random() < 0.7:
                    n_r, n_w = rng.randrange(0, 3), rng.randrange(0, 3)
                    if n_r + n_w == 0:
                        n_r = 1
                    slot = rng.randrange(8)
                    buf = BASE + layout.buffer(slot)
                    q.add([(buf, 8)] * n_r, [(buf + 32, 16)] * n_w, token=slot)
                q.publish()
                if rng.random() < 0.5:  # sometimes a legitimate completion
                    chain = dev.pop()
                    if chain:
                        dev.push(chain[0], 0)
                hostile.corrupt()
                q.drain_used() if rng.random() < 0.5 else q.pop_used()
                q.enable_interrupts()
                outcomes["ok"] += 1
            except VirtqError:
                outcomes["error"] += 1
                if q.broken is not None:
                    q.reset()
                    dev.close()
                    dev = DeviceQueue(region, layout, iova=BASE)
                    outcomes["resets"] += 1
        dev.close()
        hostile.close()
        q.close()
    return outcomes


def test_hostile_device_10000_corruptions():
    outcomes = fuzz(10_000, seed=int(os.environ.get("VIRTQ_FUZZ_SEED", "1")))
    assert outcomes["ok"] + outcomes["error"] == 10_000
    # Both branches are really exercised.
    assert outcomes["error"] > 1000
    assert outcomes["ok"] > 1000


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 12))
def test_hostile_device_long(seed):
    outcomes = fuzz(50_000, seed=seed)
    assert outcomes["ok"] + outcomes["error"] == 50_000
