"""virtio-net through VFIO: QEMU's own device model, a second implementation of what
test_vhost_user_net_mq.py drives in DPDK.

The boot (tests/test_vfio_guest.py, NET_DEVICES) adds three virtio-net-pci functions:

* ``mq``: 2 queue pairs (``mq=on`` over a ``tap,queues=2`` back-end that nothing reads);
  QEMU implements the controlq itself (virtio_net_handle_ctrl), so here VQ_PAIRS_SET goes to
  a real controlq at index 2 * max_virtqueue_pairs and its ack comes from the device;
* ``a`` and ``b``: one pair each, joined by a QEMU hub: what ``a`` transmits, ``b``
  receives -- with MRG_RXBUF, so frames longer than a receive buffer arrive in several.

They are told apart by MAC address (the harness's other devices shift PCI addresses).  The
packed boot (``packed_boot``) gives them ``packed=on`` too: the same tests then run over
QEMU's packed rings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from virtq.abi.net import (
    NET_HDR_SIZE,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MQ,
)
from virtq.devices.net import NetControlError, NetDevice, build_frame
from virtq.transport.vfio_pci import PciSysfs, VfioPciTransport, find_virtio_devices

#: The MACs tests/test_vfio_guest.py gives the three functions.
MQ_MAC = bytes.fromhex("5254000000a1")
A_MAC = bytes.fromhex("5254000000a2")
B_MAC = bytes.fromhex("5254000000a3")


@pytest.fixture(scope="module")
def net_addresses() -> dict[bytes, str]:
    """MAC -> PCI address of every virtio-net function, each bound to vfio-pci and looked
    at once (while no other transport holds its VFIO group)."""
    sysfs = PciSysfs()
    found = {}
    for address in find_virtio_devices(1):
        sysfs.bind(address)
        with NetDevice(VfioPciTransport.open(address), queue_size=8) as probe:
            assert probe.mac is not None
            found[probe.mac] = address
    assert {MQ_MAC, A_MAC, B_MAC} <= set(found), f"virtio-net functions: {found}"
    return found


#: split in the main boot, packed in the packed one (whose devices offer RING_PACKED).
RINGS = [pytest.param("split", id="split"),
         pytest.param("packed", id="packed", marks=pytest.mark.packed_boot)]


@pytest.fixture(params=RINGS)
def ring(request: pytest.FixtureRequest) -> str:
    fmt: str = request.param
    return fmt


@pytest.fixture
def hub_pair(net_addresses: dict[bytes, str],
             ring: str) -> Iterator[tuple[NetDevice, NetDevice]]:
    a = NetDevice(VfioPciTransport.open(net_addresses[A_MAC]), queue_size=64, max_frame=9000,
                  ring=ring)
    try:
        b = NetDevice(VfioPciTransport.open(net_addresses[B_MAC]), queue_size=64,
                      max_frame=9000, ring=ring)
        try:
            yield a, b
        finally:
            b.close()
    finally:
        a.close()


def frame(i: int, size: int) -> bytes:
    body = i.to_bytes(4, "little") + bytes((i * 13 + k) & 0xFF for k in range(size))
    return build_frame(B_MAC, A_MAC, 0x88B5, body[: size - 14])


def test_queue_pairs_through_qemus_controlq(net_addresses: dict[bytes, str],
                                            ring: str) -> None:
    with NetDevice(VfioPciTransport.open(net_addresses[MQ_MAC]), queue_pairs=2,
                   queue_size=64, ring=ring) as dev:
        assert dev.ring == ring
        assert dev.features >> VIRTIO_NET_F_MQ & 1 and dev.features >> VIRTIO_NET_F_CTRL_VQ & 1
        assert (dev.control, dev.max_queue_pairs, dev.active_pairs) == ("controlq", 2, 2)
        assert isinstance(dev.transport, VfioPciTransport)
        # QEMU acknowledged VQ_PAIRS_SET(2) during set-up; switch down and up again.
        dev.set_queue_pairs(1)
        dev.set_queue_pairs(2)
        # The device's own refusals: more pairs than it has, a command it does not know.
        control = dev._control
        assert control is not None
        for cls, cmd, data in ((VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                                (3).to_bytes(2, "little")), (0x7E, 0, b"")):
            with pytest.raises(NetControlError) as info:
                control.command(cls, cmd, data, 5.0)
            assert info.value.ack == VIRTIO_NET_ERR
        # Both transmitqs are served (the tap drops what nobody reads; buffers complete).
        for pair in (0, 1):
            dev.send_batch([frame(pair << 8 | i, 60) for i in range(20)], pair=pair,
                           timeout=5)
        deadline = time.monotonic() + 10
        while dev.tx_in_flight and time.monotonic() < deadline:
            dev.reclaim()
            time.sleep(0.01)
        assert dev.tx_in_flight == 0
        assert [s.tx_packets for s in dev.pair_stats()] == [20, 20]


def test_mrg_rxbuf_frames_across_a_hub(hub_pair: tuple[NetDevice, NetDevice]) -> None:
    a, b = hub_pair
    assert b.mrg_rxbuf and b.buffer_size == 2048 and a.ring == b.ring
    sizes = [60, 2036, 2037, 4085, 9000, 1514, 6000]
    frames = [frame(i, n) for i, n in enumerate(sizes)]
    got: list[bytes] = []
    for f in frames:  # one at a time: 64 receive buffers hold one 9000-byte frame easily
        a.send(f, timeout=5)
        g = b.recv(timeout=10)
        assert g is not None
        got.append(g)
    assert got == frames
    assert b.recv(timeout=0.2) is None
    s = b.pair_stats()[0]
    # Exactly as many buffers as §5.1.6.4.1 allows: every one but a frame's last is full.
    assert (s.rx_packets, s.rx_buffers) == (
        len(frames), sum(-(-(NET_HDR_SIZE + n) // 2048) for n in sizes))
