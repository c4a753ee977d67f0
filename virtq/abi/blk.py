"""virtio-blk wire constants (VIRTIO 1.2 §5.2), shared by the driver, the embedded back-end,
the conformance checks and the tests."""

from __future__ import annotations

import struct

#: Device type (§5, "Device Types").
VIRTIO_ID_BLOCK = 2
#: Every sector number and transfer size is in units of 512 bytes (§5.2.6), whatever
#: ``blk_size`` says.
SECTOR_SIZE = 512

# Feature bits (§5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types (§5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

# Status byte (§5.2.6)
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

#: GET_ID writes at most this many bytes (§5.2.6: "up to 20 bytes").
VIRTIO_BLK_ID_BYTES = 20
#: ``struct virtio_blk_req`` header: le32 type, le32 reserved, le64 sector (§5.2.6).
BLK_REQ_HEADER = struct.Struct("<IIQ")

# struct virtio_blk_config offsets (§5.2.4)
BLK_CFG_CAPACITY = 0  # le64
BLK_CFG_SIZE_MAX = 8  # le32
BLK_CFG_SEG_MAX = 12  # le32
BLK_CFG_BLK_SIZE = 20  # le32
BLK_CFG_NUM_QUEUES = 34  # le16
