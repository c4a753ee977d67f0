"""A hostile device writing garbage into the used ring: only VirtqError or success."""

from __future__ import annotations

import os

import pytest

from virtq.errors import DeviceProtocolError, VirtqError
from virtq.layout import SplitLayout
from virtq.memory import MemfdRegion
from virtq.queue import SplitQueue
from virtq.testing import DeviceQueue, HostileDevice

BASE = 0x2000_0000


def fuzz(rounds: int, seed: int) -> dict[str, int]:
    """``rounds`` of: add chains (plain and template), maybe a legitimate completion, one
    random corruption of the device-owned ring, a reap.  Every outcome is success or a
    VirtqError; and no token is ever lost or delivered twice: each token added comes back
    exactly once -- reaped, in a DeviceProtocolError's ``completed``, or from reset()."""
    layout = SplitLayout.compute(8, buffer_size=64, indirect_size=3)
    outcomes = {"ok": 0, "error": 0, "resets": 0}
    with MemfdRegion(layout.nbytes) as region:
        q = SplitQueue(region, layout, iova=BASE, indirect=True, event_idx=bool(seed % 2))
        tpl = q.template(3, slots=2)
        hostile = HostileDevice(region, layout, seed=seed)
        dev = DeviceQueue(region, layout, iova=BASE)
        rng = hostile.rng
        next_token = 0
        back: list[int] = []  # every token that came back, in any way

        def collect(got: list[tuple[int, int]]) -> None:
            back.extend(token for token, _ in got)

        for _ in range(rounds):
            try:
                # Keep some chains in flight so corruptions can hit real heads.
                while q.num_free and rng.random() < 0.7:
                    n_r, n_w = rng.randrange(0, 3), rng.randrange(0, 3)
                    if n_r + n_w == 0:
                        n_r = 1
                    slot = rng.randrange(8)
                    buf = BASE + layout.buffer(slot)
                    q.add([(buf, 8)] * n_r, [(buf + 32, 16)] * n_w, token=next_token)
                    next_token += 1
                if tpl.num_free and rng.random() < 0.5:
                    tslot = tpl.acquire()
                    buf = BASE + layout.buffer(tslot)
                    tpl.submit(tslot, [(buf, 16)], [(buf + 32, 8)], next_token)
                    next_token += 1
                q.publish()
                if rng.random() < 0.5:  # sometimes a legitimate completion
                    chain = dev.pop()
                    if chain:
                        dev.push(chain[0], 0)
                hostile.corrupt()
                if rng.random() < 0.5:
                    collect(q.drain_used())
                else:
                    got = q.pop_used()
                    collect([got] if got else [])
                q.enable_interrupts()
                outcomes["ok"] += 1
            except DeviceProtocolError as err:
                collect(err.completed)  # type: ignore[arg-type]
                outcomes["error"] += 1
            except VirtqError:
                outcomes["error"] += 1
            if q.broken is not None:
                back.extend(q.reset())
                dev.close()
                dev = DeviceQueue(region, layout, iova=BASE)
                outcomes["resets"] += 1
        back.extend(q.reset())
        assert sorted(back) == list(range(next_token)), "a token was lost or came back twice"
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
