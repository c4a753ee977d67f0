"""A hostile device writing garbage into a packed ring (VIRTIO 1.2 §2.8): used descriptors
(flags of either lap, AVAIL != USED, ids, lengths, skips), raw words anywhere in the
descriptor ring, the device event suppression structure.  Only VirtqErrors or success, no
hang, and every token comes back exactly once."""

from __future__ import annotations

import os

import pytest

from virtq.errors import DeviceProtocolError, VirtqError
from virtq.layout import PackedLayout
from virtq.memory import MemfdRegion
from virtq.queue import PackedQueue
from virtq.testing import PackedDeviceQueue, PackedHostileDevice

BASE = 0x3000_0000
N = 8


def _device(region: MemfdRegion, layout: PackedLayout, q: PackedQueue[int]) -> PackedDeviceQueue:
    base = q.vring_base & 0xFFFF
    return PackedDeviceQueue(region, layout, iova=BASE, event_idx=q.event_idx,
                             avail_index=base & 0x7FFF, avail_wrap=base >> 15)


def fuzz(rounds: int, seed: int, *, in_order: bool) -> dict[str, int]:
    """``rounds`` of: add chains (plain, indirect, from a template), publish, sometimes a
    legitimate completion by the real device side, one random corruption, a reap (all, one,
    or a has_used/enable_interrupts probe).  Tokens are conserved: each added token comes
    back once -- reaped, in a DeviceProtocolError's ``completed``, or from reset()."""
    layout = PackedLayout.compute(N, buffer_size=64, indirect_size=3)
    outcomes = {"ok": 0, "error": 0, "resets": 0}
    with MemfdRegion(layout.nbytes) as region:
        q: PackedQueue[int] = PackedQueue(region, layout, iova=BASE, indirect=bool(seed % 3),
                                          event_idx=bool(seed % 2), in_order=in_order,
                                          start_index=(N - 2) | (seed % 2) << 15)
        tpl = q.template(3, slots=2)
        hostile = PackedHostileDevice(region, layout, seed=seed, used_index=N - 2,
                                      used_wrap=seed % 2)
        dev = _device(region, layout, q)
        rng = hostile.rng
        next_token = 0
        back: list[int] = []

        def collect(got: list[tuple[int, int]]) -> None:
            back.extend(token for token, _ in got)

        for _ in range(rounds):
            try:
                while q.num_free and rng.random() < 0.7:
                    n_r, n_w = rng.randrange(0, 3), rng.randrange(0, 3)
                    if n_r + n_w == 0:
                        n_r = 1
                    buf = BASE + layout.buffer(rng.randrange(N))
                    q.add([(buf, 8)] * n_r, [(buf + 32, 16)] * n_w, token=next_token)
                    next_token += 1
                if tpl.num_free and rng.random() < 0.5:
                    tslot = tpl.acquire()
                    buf = BASE + layout.buffer(tslot)
                    try:
                        tpl.submit(tslot, [(buf, 16)], [(buf + 32, 8)], next_token)
                    except VirtqError:
                        tpl.release(tslot)
                        raise
                    next_token += 1
                q.publish()
                if rng.random() < 0.5:  # sometimes a legitimate completion
                    chain = dev.pop()
                    if chain:
                        if in_order and rng.random() < 0.5:
                            dev.push_in_order(chain[0], 0)
                        else:
                            dev.push(chain[0], 0)
                hostile.corrupt()
                pick = rng.randrange(3)
                if pick == 0:
                    collect(q.drain_used())
                elif pick == 1:
                    got = q.pop_used()
                    collect([got] if got else [])
                else:
                    q.has_used()
                    q.enable_interrupts_after(rng.randrange(4))
                outcomes["ok"] += 1
            except DeviceProtocolError as err:
                collect(err.completed)  # type: ignore[arg-type]
                outcomes["error"] += 1
            except VirtqError:  # the device side refusing what the hostile one scribbled
                outcomes["error"] += 1
            if q.broken is not None or rng.random() < 0.01:
                back.extend(q.reset())
                dev.close()
                dev = _device(region, layout, q)
                outcomes["resets"] += 1
        back.extend(q.reset())
        assert sorted(back) == list(range(next_token)), "a token was lost or came back twice"
        dev.close()
        hostile.close()
        q.close()
    return outcomes


@pytest.mark.parametrize("in_order", [False, True], ids=["any-order", "in-order"])
def test_hostile_packed_device_5000_corruptions_each(in_order):
    """5000 per mode: 10 000 corruptions of packed rings in every run."""
    outcomes = fuzz(5_000, seed=int(os.environ.get("VIRTQ_FUZZ_SEED", "1")),
                    in_order=in_order)
    assert outcomes["ok"] + outcomes["error"] == 5_000
    assert outcomes["error"] > 500
    assert outcomes["ok"] > 500


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 8))
@pytest.mark.parametrize("in_order", [False, True], ids=["any-order", "in-order"])
def test_hostile_packed_device_long(seed, in_order):
    outcomes = fuzz(30_000, seed=seed, in_order=in_order)
    assert outcomes["ok"] + outcomes["error"] == 30_000
