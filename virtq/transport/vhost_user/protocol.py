"""vhost-user wire format (QEMU ``docs/interop/vhost-user.rst``), as tables.

Every message is a 12-byte header -- ``request`` u32, ``flags`` u32, ``size`` u32, in the
host's native byte order -- followed by ``size`` bytes of payload, with any file descriptors
in the same ``sendmsg`` as SCM_RIGHTS ancillary data.
"""

from __future__ import annotations

import enum
import struct

HEADER = struct.Struct("=III")  # request, flags, size
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")  # index, num
VRING_ADDR = struct.Struct("=IIQQQQ")  # index, flags, desc, used, avail, log (used first!)
MEM_TABLE_HEADER = struct.Struct("=II")  # nregions, padding
MEM_REGION = struct.Struct("=QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
#: "Single memory region description" (ADD_MEM_REG, REM_MEM_REG): u64 padding + a region.
SINGLE_MEM_REGION = struct.Struct("=QQQQQ")
CONFIG_HEADER = struct.Struct("=III")  # offset, size, flags
#: "Inflight description" (GET_INFLIGHT_FD, SET_INFLIGHT_FD): mmap size u64, mmap offset
#: u64, num queues u16, queue size u16.  Sent as QEMU's C struct is laid out, with its
#: 4 bytes of tail padding: libvhost-user and DPDK check the payload size against it (24).
INFLIGHT = struct.Struct("=QQHH4x")

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

MAX_MEM_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS
#: At most this many fds ride along one message: QEMU and libvhost-user receive up to
#: VHOST_MEMORY_BASELINE_NREGIONS (a full SET_MEM_TABLE); more would be truncated.
MAX_FDS = MAX_MEM_REGIONS
#: QEMU's VHOST_USER_MAX_CONFIG_SIZE: the config space GET_CONFIG can carry (its payload
#: buffer); QEMU's front-end always reads it from offset 0.
MAX_CONFIG_SIZE = 256
#: QEMU's VHOST_USER_MAX_RAM_SLOTS on targets without an ACPI/sPAPR limit: the most memory
#: slots a front-end uses, whatever GET_MAX_MEM_SLOTS reports (vhost-user.rst: "capped at
#: the maximum number of ram slots which can be supported by the target platform").
MAX_RAM_SLOTS = 512
#: Largest GET_QUEUE_NUM answer accepted: virtio's num_queues is a 16-bit field (VIRTIO 1.2
#: §4.1.4.3, common configuration ``le16 num_queues``).
MAX_QUEUE_NUM = 0xFFFF
#: Bits 0-7 of SET_VRING_KICK/CALL/ERR's u64 carry the ring index (vhost-user.rst), so a
#: front-end can set up rings 0..255 only.
VRING_IDX_MASK = 0xFF
MAX_VRINGS = VRING_IDX_MASK + 1
VRING_NOFD_MASK = 0x100
#: Largest split or packed ring (VIRTIO 1.2 §2.7 "Queue Size ... maximum 32768", §2.8).
MAX_VRING_NUM = 32768
#: Largest payload sent or accepted: far above any message virtq exchanges (a full memory
#: table is 264 bytes, a full GET_CONFIG 268), small enough that a garbage size field is
#: caught before it is waited for.
MAX_PAYLOAD = 4096

#: GET_FEATURES bit 30: the back-end speaks GET/SET_PROTOCOL_FEATURES.
VHOST_USER_F_PROTOCOL_FEATURES = 30
#: vhost's dirty-logging feature; a transport-internal bit, never a device feature.
VHOST_F_LOG_ALL = 26


class Request(enum.IntEnum):
    """Front-end -> back-end request codes."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """GET/SET_PROTOCOL_FEATURES bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


#: Requests whose reply carries a payload (so REPLY_ACK adds nothing to them).
HAS_REPLY = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_STATUS,
    Request.GET_MAX_MEM_SLOTS, Request.GET_INFLIGHT_FD,
})


def request_name(code: int) -> str:
    """The name of request ``code`` (``GET_FEATURES``), or ``request <code>`` for a code this
    module does not know."""
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


def pack_header(request: int, flags: int, size: int) -> bytes:
    """The 12-byte message header (vhost-user.rst "Message Specification"): request code, flags,
    payload size.  Raises ``struct.error`` for a value that does not fit its u32 field."""
    return HEADER.pack(request, flags, size)
