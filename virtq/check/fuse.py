"""The few FUSE messages ``virtq check --device fs`` sends (Linux
``include/uapi/linux/fuse.h``; VIRTIO 1.2 §5.11.6: a virtio-fs request is a FUSE request
in the device-readable part and its reply in the device-writable part).

Encoders return the device-readable bytes; :func:`parse_reply` checks the out header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "FUSE_GETATTR",
    "FUSE_INIT",
    "FUSE_LOOKUP",
    "FUSE_ROOT_ID",
    "FuseReply",
    "getattr_request",
    "init_request",
    "lookup_request",
    "parse_reply",
]

FUSE_LOOKUP = 1
FUSE_GETATTR = 3
FUSE_INIT = 26
FUSE_ROOT_ID = 1
FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 31  # what the C virtiofsd of QEMU 7.2 speaks

#: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: len, error (negative errno), unique
OUT_HEADER = struct.Struct("<IiQ")
#: major, minor, max_readahead, flags
INIT_IN = struct.Struct("<IIII")
#: major, minor (the start of fuse_init_out)
INIT_OUT_HEAD = struct.Struct("<II")
#: getattr_flags, dummy, fh
GETATTR_IN = struct.Struct("<IIQ")
#: attr_valid, attr_valid_nsec, dummy: then struct fuse_attr
ATTR_OUT_HEAD = 16
#: fuse_entry_out: nodeid, generation, entry_valid, attr_valid, two nsec words: then fuse_attr
ENTRY_OUT_HEAD = 40
#: offset of ``mode`` inside struct fuse_attr (ino, size, blocks, a/m/ctime, 3 nsec words)
ATTR_MODE = 60
ATTR_SIZE = 88
INIT_OUT_SIZE = 64
ATTR_OUT_SIZE = ATTR_OUT_HEAD + ATTR_SIZE
ENTRY_OUT_SIZE = ENTRY_OUT_HEAD + ATTR_SIZE


def _request(opcode: int, unique: int, nodeid: int, body: bytes) -> bytes:
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 0, 0,
                          0) + body


def init_request(unique: int) -> bytes:
    return _request(FUSE_INIT, unique, 0,
                    INIT_IN.pack(FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION, 0, 0))


def getattr_request(unique: int, nodeid: int = FUSE_ROOT_ID) -> bytes:
    return _request(FUSE_GETATTR, unique, nodeid, GETATTR_IN.pack(0, 0, 0))


def lookup_request(unique: int, name: str, parent: int = FUSE_ROOT_ID) -> bytes:
    return _request(FUSE_LOOKUP, unique, parent, name.encode() + b"\0")


@dataclass(frozen=True)
class FuseReply:
    length: int
    error: int
    unique: int
    body: bytes


def parse_reply(data: bytes) -> FuseReply | None:
    """The out header and the body it announces (None if fewer than 16 bytes)."""
    if len(data) < OUT_HEADER.size:
        return None
    length, error, unique = OUT_HEADER.unpack_from(data)
    return FuseReply(length, error, unique, data[OUT_HEADER.size : max(length, OUT_HEADER.size)])


def attr_mode(body: bytes, offset: int) -> int | None:
    """``mode`` of the fuse_attr at ``offset`` in a reply body."""
    at = offset + ATTR_MODE
    if len(body) < at + 4:
        return None
    (mode,) = struct.unpack_from("<I", body, at)
    return int(mode)
