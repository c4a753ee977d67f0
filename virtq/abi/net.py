"""virtio-net wire constants (VIRTIO 1.2 §5.1)."""

from __future__ import annotations

import struct

#: Device type (§5, "Device Types").
VIRTIO_ID_NET = 1

# Feature bits (§5.1.3)
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_MQ = 22

#: Queue indices of the first pair (§5.1.2).
RX_QUEUE = 0
TX_QUEUE = 1
#: sizeof(struct virtio_net_hdr) with VERSION_1: num_buffers is always there (only the
#: legacy interface drops it without MRG_RXBUF, §5.1.6.1).
NET_HDR_SIZE = 12
#: flags u8, gso_type u8, hdr_len le16, gso_size le16, csum_start le16, csum_offset le16,
#: num_buffers le16 (§5.1.6).
NET_HDR = struct.Struct("<BBHHHHH")
#: Ethernet header: a frame shorter than this is not a frame.
MIN_FRAME = 14
#: §5.1.6.3.1: without MRG_RXBUF (and without GUEST_TSO*/UFO) receive buffers SHOULD hold
#: at least 1526 bytes: the header plus a 1514-byte frame.
MIN_RX_BUFFER = NET_HDR_SIZE + 1514

#: struct virtio_net_config (§5.1.4): mac u8[6] at 0, status le16 at 6, max_virtqueue_pairs
#: le16 at 8 (with VIRTIO_NET_F_MQ or RSS), mtu le16 at 10 (with VIRTIO_NET_F_MTU).
CONFIG_MAC = 0
CONFIG_MAX_VIRTQUEUE_PAIRS = 8
#: §5.1.4.1: a device offering MQ sets max_virtqueue_pairs to 1..0x8000; the same bounds
#: hold for VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (§5.1.6.5.6, VQ_PAIRS_MIN / VQ_PAIRS_MAX).
VQ_PAIRS_MIN = 1
VQ_PAIRS_MAX = 0x8000
#: Offset of num_buffers (le16) in the 12-byte header (§5.1.6).
NUM_BUFFERS_OFFSET = 10

# Control virtqueue (§5.1.6.5): struct virtio_net_ctrl { u8 class; u8 command;
# u8 command-specific-data[]; u8 ack; } -- class and command device-readable, the ack
# device-writable.
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
#: Class VIRTIO_NET_CTRL_MQ and its command VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (automatic
#: receive steering, §5.1.6.5.6), whose data is ``le16 virtqueue_pairs``.
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0


def receiveq(pair: int) -> int:
    """Queue index of receiveq``pair + 1`` (§5.1.2: receiveqN is 2(N-1))."""
    return 2 * pair


def transmitq(pair: int) -> int:
    """Queue index of transmitq``pair + 1`` (§5.1.2: transmitqN is 2(N-1)+1)."""
    return 2 * pair + 1


def controlq(max_virtqueue_pairs: int) -> int:
    """Queue index of the controlq: 2N, N = max_virtqueue_pairs (1 without MQ, §5.1.2)."""
    return 2 * max_virtqueue_pairs
