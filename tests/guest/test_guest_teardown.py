"""Teardown leaves nothing open or mapped (psutil), and the device can be opened again."""

from __future__ import annotations

import gc
import os

import psutil
import pytest

from tests.conftest import resource_counts
from virtq.devices.blk import BlkDevice
from virtq.devices.rng import RngDevice
from virtq.errors import QueueStateError
from virtq.memory import HugepageRegion


def _vfio_handles() -> tuple[list[str], list[str]]:
    """Open fds that are VFIO nodes or eventfds, and mappings of a VFIO device (BARs)."""
    proc = psutil.Process()
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        if "vfio" in target or "eventfd" in target:
            fds.append(target)
    maps = [m.path for m in proc.memory_maps(grouped=False) if "vfio" in m.path]
    return fds, maps


@pytest.mark.parametrize("poll", [True, False], ids=["poll", "msix"])
def test_rng_teardown_releases_everything(rng_address, poll):
    with RngDevice.open_vfio(rng_address, poll=poll) as rng:  # warm-up: imports, caches
        rng.read(8)
    before = resource_counts()
    rng = RngDevice.open_vfio(rng_address, poll=poll)
    during = _vfio_handles()
    assert any("/dev/vfio/" in fd for fd in during[0]) and during[1], "open: fds and BAR maps"
    assert len(rng.read(64)) == 64
    rng.close()
    gc.collect()
    assert resource_counts() == before
    assert _vfio_handles() == ([], [])
    with RngDevice.open_vfio(rng_address, poll=poll) as again:  # the device opens again
        assert len(again.read(64)) == 64


def test_blk_teardown_releases_everything(blk_address, hugepages):
    with BlkDevice.open_vfio(blk_address) as blk:
        blk.read(0, 4096)
    before = resource_counts()
    for memory in (None, "hugepage"):
        blk = BlkDevice.open_vfio(blk_address, memory=HugepageRegion if memory else None)
        buf = blk.alloc_buffer(4096).slice(0, 4096)
        blk.submit_read(0, into=buf).wait()
        del buf
        blk.close()
        gc.collect()
        assert resource_counts() == before
        assert _vfio_handles() == ([], [])
    with BlkDevice.open_vfio(blk_address, poll=True) as again:
        assert len(again.read(0, 4096)) == 4096


def test_close_is_idempotent_and_use_after_close_is_refused(rng_address):
    rng = RngDevice.open_vfio(rng_address, poll=True)
    t = rng.transport
    rng.close()
    rng.close()
    t.close()
    with pytest.raises(QueueStateError):
        rng.read(1)
    with pytest.raises(QueueStateError):
        t.negotiate(0)
