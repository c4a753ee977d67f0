"""RngDevice against hostile arguments: a read that can never be returned is refused, and
the timeout bounds a read "in all" even when the device answers at once.

Every test names the finding of the hostile-input campaign it guards."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from virtq.abi import VIRTIO_F_VERSION_1
from virtq.abi.rng import VIRTIO_ID_ENTROPY
from virtq.devices.rng import RngDevice, RngTimeoutError
from virtq.errors import ArgumentError
from virtq.testing.loopback import LoopbackTransport


class _EagerRng(LoopbackTransport):
    """A virtio-rng device that fills every buffer inside notify(): a read never waits."""

    def __init__(self) -> None:
        super().__init__(features=1 << VIRTIO_F_VERSION_1, queue_sizes=[16], config=b"",
                         device_type=VIRTIO_ID_ENTROPY)

    def notify(self, index: int) -> None:
        super().notify(index)
        d = self.devices[0]
        while (chain := d.pop()) is not None:
            head, segs = chain
            d.write(segs[0].iova, b"\x5a" * segs[0].length)
            d.push(head, segs[0].length)


@pytest.mark.parametrize("n", [1 << 64, sys.maxsize + 1, True, -1, 1.5, None])
def test_rng_read_size(n: Any) -> None:
    """Finding: read(2**64) was taken and read until memory ran out (no bytes object can
    hold it); read(True) returned one byte."""
    with RngDevice(_EagerRng(), buffer_size=64) as rng:
        with pytest.raises(ArgumentError):
            rng.read(n, timeout=5)  # (bounded, should the check ever be lost)
        assert len(rng.read(100)) == 100


def test_rng_timeout_bounds_a_read_in_all() -> None:
    """Finding: the timeout was looked at only while waiting for the device: against a
    device that answers at once, read(64 MiB, timeout=1e-9) ran to the end (and a read of
    2**40 bytes until memory ran out), although the docstring says "within timeout
    seconds in all"."""
    with RngDevice(_EagerRng(), buffer_size=64) as rng:
        with pytest.raises(RngTimeoutError):
            rng.read(64 << 20, timeout=1e-9)
        assert len(rng.read(10, timeout=None)) == 10
