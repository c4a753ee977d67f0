"""NetDevice against hostile arguments, over a loopback device with a controlq: a bad
timeout places no controlq command and queues no frame, a pair is an int (not True or
1.0), counts are ints.

Every test names the finding of the hostile-input campaign it guards."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given

from virtq.abi import VIRTIO_F_EVENT_IDX, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
from virtq.abi.net import VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ
from virtq.devices.net import NetDevice, build_frame
from virtq.errors import ArgumentError
from virtq.testing.loopback import LoopbackTransport

from .hostile_values import BAD_TIMEOUTS, NOT_AN_INDEX, quick

MAC = bytes.fromhex("020000abcdef")


class _NetLoopback(LoopbackTransport):
    """A 4-pair virtio-net device whose controlq answers every command at once (inside
    notify), counting them."""

    def __init__(self, packed: bool) -> None:
        features = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_NET_F_MAC
                    | 1 << VIRTIO_NET_F_MQ | 1 << VIRTIO_NET_F_CTRL_VQ
                    | (1 << VIRTIO_F_RING_PACKED if packed else 0))
        super().__init__(features=features, queue_sizes=[16] * 9,
                         config=MAC + struct.pack("<HH", 1, 4))
        self.commands = 0

    def notify(self, index: int) -> None:
        super().notify(index)
        if index != 8:
            return
        d = self.devices[8]
        while (chain := d.pop()) is not None:
            head, segs = chain
            ack = next(s for s in segs if s.writable)
            d.write(ack.iova, b"\0")  # VIRTIO_NET_OK
            d.push(head, 1)
            self.commands += 1
        d.enable_notifications()  # event idx: kick me at the next command too

    def complete_tx(self) -> None:
        """The device transmits every frame queued (transmitq of pair k: queue 2k + 1)."""
        for index in (1, 3, 5, 7):
            d = self.devices[index]
            while (chain := d.pop()) is not None:
                d.push(chain[0], 0)


@pytest.fixture(params=["split", "packed"])
def net(request: pytest.FixtureRequest) -> Iterator[tuple[NetDevice, _NetLoopback]]:
    t = _NetLoopback(request.param == "packed")
    with NetDevice(t, queue_pairs=4, queue_size=16) as dev:
        yield dev, t


def frame(i: int) -> bytes:
    return build_frame(b"\xff" * 6, MAC, 0x88B5, bytes([i]) * 46)


@quick
@given(timeout=BAD_TIMEOUTS)
def test_set_queue_pairs_bad_timeout_places_no_command(
        net: tuple[NetDevice, _NetLoopback], timeout: Any) -> None:
    """Finding: set_queue_pairs(2, timeout=-1) put the command on the controlq, then raised;
    the device answered it, so the next command reaped two completions and raised
    ``ValueError: too many values to unpack`` -- and the transmit pairs stayed cut to 2."""
    dev, t = net
    sent = t.commands
    with pytest.raises(ArgumentError):
        dev.set_queue_pairs(2, timeout=timeout)
    assert t.commands == sent  # nothing reached the device
    dev.send(frame(1), pair=3)  # every pair still usable
    t.complete_tx()
    dev.set_queue_pairs(4)
    assert t.commands == sent + 1 and dev.active_pairs == 4


@quick
@given(pair=NOT_AN_INDEX)
def test_pair_is_an_int(net: tuple[NetDevice, _NetLoopback], pair: Any) -> None:
    """Finding: pair=True / 1.0 / 0.0 found pair 1 / 0 in the dict of pairs."""
    dev, t = net
    before = dev.tx_in_flight
    for call in (lambda: dev.send(frame(2), pair=pair), lambda: dev.recv(0, pair=pair),
                 lambda: dev.recv_batch(4, 0, pair=pair), lambda: dev.reclaim(pair)):
        with pytest.raises(ArgumentError):
            call()
    assert dev.tx_in_flight == before
    dev.send(frame(2), pair=1)
    t.complete_tx()
    dev.reclaim()


@quick
@given(timeout=BAD_TIMEOUTS)
def test_send_batch_bad_timeout_queues_nothing(net: tuple[NetDevice, _NetLoopback],
                                               timeout: Any) -> None:
    """Finding: send_batch(frames, timeout=-1) checked the timeout only when the ring was
    full -- after queueing the frames that fit, which ArgumentError does not report."""
    dev, _ = net
    before = dev.tx_in_flight
    with pytest.raises(ArgumentError):
        dev.send_batch([frame(i) for i in range(40)], pair=2, timeout=timeout)
    assert dev.tx_in_flight == before


@pytest.mark.parametrize("value", [True, 0, -1, 1.5])
def test_net_counts_are_ints(value: Any) -> None:
    """Finding: NetDevice(queue_size=True) built 1-entry rings; max_frames=True was taken."""
    with pytest.raises(ArgumentError):
        NetDevice(_NetLoopback(False), queue_size=value)
    with NetDevice(_NetLoopback(False), queue_pairs=4) as dev:
        with pytest.raises(ArgumentError):
            dev.recv_batch(value)
        with pytest.raises(ArgumentError):
            dev.recv_any(value)
