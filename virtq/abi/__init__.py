"""Every virtio ring structure, once, as little-endian ctypes structures; device-specific
constants live in the submodules (:mod:`virtq.abi.blk`, :mod:`virtq.abi.net`, :mod:`virtq.abi.rng`).

VIRTIO 1.0+ devices use little-endian for all ring fields (§2.7, §2.8); these classes are
``ctypes.LittleEndianStructure`` so they are right on any host.  Variable-size rings
(``virtq_avail``, ``virtq_used``) are *not* modelled as one structure: a ctypes structure
with a trailing ``avail_event`` would be padded to 8 + 8N bytes instead of the spec's 6 + 8N.
Their headers are structures and their ring arrays are built per queue size by
:func:`avail_ring_type` / :func:`used_ring_type`; offsets always come from
:mod:`virtq.layout`.
"""

from __future__ import annotations

import ctypes
from functools import cache

# -- descriptor flags (§2.7.5, §2.8.1) ---------------------------------------------------
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
#: Packed ring only (§2.8.1).
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15

# -- notification suppression (§2.7.7, §2.7.10, §2.8.10) ------------------------------
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2

# -- device-independent feature bits (§6) ------------------------------------------------
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_RING_INDIRECT_DESC = VIRTIO_F_INDIRECT_DESC
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_RING_EVENT_IDX = VIRTIO_F_EVENT_IDX
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_NOTIF_CONFIG_DATA = 39
VIRTIO_F_RING_RESET = 40

# -- device status bits (§2.1) -----------------------------------------------------------
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80


class VirtqDesc(ctypes.LittleEndianStructure):
    """``struct virtq_desc`` (§2.7.5): one split-ring descriptor, 16 bytes."""

    _fields_ = (
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("flags", ctypes.c_uint16),
        ("next", ctypes.c_uint16),
    )


class VirtqAvailHeader(ctypes.LittleEndianStructure):
    """The fixed head of ``struct virtq_avail`` (§2.7.6): flags, idx."""

    _fields_ = (("flags", ctypes.c_uint16), ("idx", ctypes.c_uint16))


class VirtqUsedElem(ctypes.LittleEndianStructure):
    """``struct virtq_used_elem`` (§2.7.8): id is 32-bit "for padding reasons"."""

    _fields_ = (("id", ctypes.c_uint32), ("len", ctypes.c_uint32))


class VirtqUsedHeader(ctypes.LittleEndianStructure):
    """The fixed head of ``struct virtq_used`` (§2.7.8): flags, idx."""

    _fields_ = (("flags", ctypes.c_uint16), ("idx", ctypes.c_uint16))


class PvirtqDesc(ctypes.LittleEndianStructure):
    """``struct pvirtq_desc`` (§2.8.13): note ``id`` at 12 and ``flags`` at 14."""

    _fields_ = (
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("id", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
    )


class PvirtqEventSuppress(ctypes.LittleEndianStructure):
    """``struct pvirtq_event_suppress`` (§2.8.14): desc = off (bits 0-14) | wrap (bit 15)."""

    _fields_ = (("desc", ctypes.c_uint16), ("flags", ctypes.c_uint16))


@cache
def avail_ring_type(queue_size: int) -> type[ctypes.Structure]:
    """``struct virtq_avail`` for ``queue_size`` entries: flags, idx, ring[N], used_event.

    All fields are 16-bit so the structure has no padding: sizeof == 6 + 2N exactly.
    """
    return type(
        f"VirtqAvail{queue_size}",
        (ctypes.LittleEndianStructure,),
        {
            "_fields_": (
                ("flags", ctypes.c_uint16),
                ("idx", ctypes.c_uint16),
                ("ring", ctypes.c_uint16 * queue_size),
                ("used_event", ctypes.c_uint16),
            )
        },
    )


@cache
def used_ring_type(queue_size: int) -> type[ctypes.Structure]:
    """``struct virtq_used`` for ``queue_size`` entries: flags, idx, ring[N], avail_event.

    ``_pack_ = 2`` stops ctypes padding the trailing ``avail_event`` to a 4-byte boundary, so
    sizeof == 6 + 8N exactly, as in the spec.
    """
    return type(
        f"VirtqUsed{queue_size}",
        (ctypes.LittleEndianStructure,),
        {
            "_pack_": 2,
            "_fields_": (
                ("flags", ctypes.c_uint16),
                ("idx", ctypes.c_uint16),
                ("ring", VirtqUsedElem * queue_size),
                ("avail_event", ctypes.c_uint16),
            ),
        },
    )


# The spec sizes, asserted once at import so a broken ctypes can never lay out garbage.
assert ctypes.sizeof(VirtqDesc) == 16
assert ctypes.sizeof(VirtqAvailHeader) == 4
assert ctypes.sizeof(VirtqUsedElem) == 8
assert ctypes.sizeof(VirtqUsedHeader) == 4
assert ctypes.sizeof(PvirtqDesc) == 16
assert ctypes.sizeof(PvirtqEventSuppress) == 4

__all__ = [
    "RING_EVENT_FLAGS_DESC",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_ENABLE",
    "VIRTIO_CONFIG_S_ACKNOWLEDGE",
    "VIRTIO_CONFIG_S_DRIVER",
    "VIRTIO_CONFIG_S_DRIVER_OK",
    "VIRTIO_CONFIG_S_FAILED",
    "VIRTIO_CONFIG_S_FEATURES_OK",
    "VIRTIO_CONFIG_S_NEEDS_RESET",
    "VIRTIO_F_ACCESS_PLATFORM",
    "VIRTIO_F_ANY_LAYOUT",
    "VIRTIO_F_EVENT_IDX",
    "VIRTIO_F_INDIRECT_DESC",
    "VIRTIO_F_IN_ORDER",
    "VIRTIO_F_NOTIFICATION_DATA",
    "VIRTIO_F_NOTIFY_ON_EMPTY",
    "VIRTIO_F_NOTIF_CONFIG_DATA",
    "VIRTIO_F_ORDER_PLATFORM",
    "VIRTIO_F_RING_EVENT_IDX",
    "VIRTIO_F_RING_INDIRECT_DESC",
    "VIRTIO_F_RING_PACKED",
    "VIRTIO_F_RING_RESET",
    "VIRTIO_F_SR_IOV",
    "VIRTIO_F_VERSION_1",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_AVAIL",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_USED",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "PvirtqDesc",
    "PvirtqEventSuppress",
    "VirtqAvailHeader",
    "VirtqDesc",
    "VirtqUsedElem",
    "VirtqUsedHeader",
    "avail_ring_type",
    "used_ring_type",
]
