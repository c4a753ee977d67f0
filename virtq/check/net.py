"""virtio-net checks (VIRTIO 1.2 §5.1) through a back-end that sends every frame it receives
back out (dpdk-testpmd ``--forward-mode=io`` on one port).  Without such a loop nothing
comes back, and the checks are skipped, not failed."""

from __future__ import annotations

import os

from virtq.abi.net import NET_HDR, NET_HDR_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_MRG_RXBUF
from virtq.check.context import CheckContext, Done, Session
from virtq.check.model import CheckFailed, CheckSkipped, Level, check

MUST = Level.MUST
NET = ("net",)
VIRTIO_NET_HDR_GSO_NONE = 0


def frame(n: int) -> bytes:
    """A broadcast frame of ``n`` bytes with a random payload (and the local
    experimental EtherType 0x88b5)."""
    return b"\xff" * 6 + b"\x02virtq" + b"\x88\xb5" + os.urandom(n - 14)


def loopback(ctx: CheckContext, s: Session, data: bytes, rx_sizes: list[int]) -> list[Done]:
    """Post receive buffers, transmit ``data`` (after a zeroed header), and return the
    receive completions that follow, in used-ring order.  Skips the check when nothing
    comes back.  Raises :class:`~virtq.check.model.CheckSkipped` then, and
    :class:`~virtq.check.model.CheckFailed` for a used id that was never made available."""
    rx = [s.request(RX_QUEUE, [], [n]) for n in rx_sizes]
    s.submit(rx)
    tx = s.request(TX_QUEUE, [bytes(NET_HDR_SIZE) + data], [])
    s.run([tx])
    if not s.drv.wait_used(RX_QUEUE, 1, ctx.options.timeout):
        raise CheckSkipped("no frame came back: the back-end does not loop frames back "
                           "(for dpdk-testpmd: --forward-mode=io)")
    by_head = {r.head: r for r in rx}
    ring = s.ring(RX_QUEUE)
    out = []
    for head, length in ring.reap():
        req = by_head.get(head)
        if req is None:
            raise CheckFailed(f"RX used id {head} was never made available")
        out.append(Done(req, length, s))
    return out


@check("net.loopback", title="a transmitted frame comes back intact",
       clause="VIRTIO 1.2 §5.1.6.2 / §5.1.6.4: the frame after the header is what was sent "
              "and what is received (through a looping back-end)", level=MUST, devices=NET)
def net_loopback(ctx: CheckContext) -> str | None:
    s = ctx.session()
    data = frame(200)
    (done, *_) = loopback(ctx, s, data, [2048] * 4)
    got = done.written(done.used_len)[NET_HDR_SIZE:]
    if got != data:
        raise CheckFailed(f"received {len(got)} bytes, sent {len(data)}; they differ",
                          used_len=done.used_len, got=got[:32], sent=data[:32])
    return None


@check("net.rx-header", title="the receive header says no offloads and one buffer",
       clause="VIRTIO 1.2 §5.1.6.4.1: If VIRTIO_NET_F_MRG_RXBUF has not been negotiated, "
              "the device MUST set num_buffers to 1. If VIRTIO_NET_F_GUEST_CSUM is not "
              "negotiated, the device MUST set flags to zero; without GUEST_TSO4/TSO6/UDP "
              "gso_type is not a GSO type.", level=MUST, devices=NET)
def net_rx_header(ctx: CheckContext) -> str | None:
    s = ctx.session()
    (done, *_) = loopback(ctx, s, frame(100), [2048] * 2)
    flags, gso_type, _, _, _, _, num_buffers = NET_HDR.unpack(done.written(NET_HDR_SIZE))
    problems = []
    if num_buffers != 1:
        problems.append(f"num_buffers {num_buffers}")
    if flags:
        problems.append(f"flags {flags:#x}")
    if gso_type != VIRTIO_NET_HDR_GSO_NONE:
        problems.append(f"gso_type {gso_type}")
    if problems:
        raise CheckFailed("receive header: " + ", ".join(problems),
                          header=done.written(NET_HDR_SIZE))
    return None


@check("net.mrg-rxbuf", title="MRG_RXBUF: a frame spread over buffers, num_buffers right",
       clause="VIRTIO 1.2 §5.1.6.4.1: If VIRTIO_NET_F_MRG_RXBUF has been negotiated, the "
              "device MUST set num_buffers to indicate the number of buffers the packet "
              "(including the header) is spread over ... MUST use all buffers but the last "
              "completely", level=MUST, devices=NET)
def net_mrg_rxbuf(ctx: CheckContext) -> str | None:
    s = ctx.session(features=1 << VIRTIO_NET_F_MRG_RXBUF)
    if not s.has_feature(VIRTIO_NET_F_MRG_RXBUF):
        raise CheckSkipped("VIRTIO_NET_F_MRG_RXBUF is not offered")
    data = frame(400)
    size = 128
    dones = loopback(ctx, s, data, [size] * 8)
    first = dones[0].written(NET_HDR_SIZE)
    num_buffers = NET_HDR.unpack(first)[6]
    if not 1 <= num_buffers <= len(dones):
        raise CheckFailed(f"num_buffers {num_buffers}, but {len(dones)} buffers were used",
                          header=first)
    used = dones[:num_buffers]
    short = [d.used_len for d in used[:-1] if d.used_len != size]
    if short:
        raise CheckFailed(f"buffers before the last were not filled: used.len {short} "
                          f"of {size}-byte buffers")
    got = b"".join(d.written(d.used_len) for d in used)[NET_HDR_SIZE:]
    if got != data:
        raise CheckFailed(f"the {num_buffers} buffers hold {len(got)} bytes that are not "
                          f"the {len(data)}-byte frame sent", got=got[:32], sent=data[:32])
    return f"{num_buffers} buffers"
