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
