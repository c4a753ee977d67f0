"""The embedded back-end's other device types, for testing the checker: virtio-rng
(VIRTIO 1.2 §5.4), a virtio-net loopback (§5.1: every frame transmitted comes back on the
receive queue) and a virtio-fs device answering the three FUSE requests ``virtq check``
sends (INIT, GETATTR, LOOKUP) over a fixed namespace: a root directory holding
``hello.txt``.  Each has fault switches (see :class:`~virtq.testing.embedded.Faults`)."""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from virtq.abi import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from virtq.abi.net import NET_HDR, NET_HDR_SIZE, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF
from virtq.testing.device import DeviceQueue, Segment
from virtq.transport.vhost_user import protocol as P

if TYPE_CHECKING:
    from virtq.testing.embedded.server import Faults

DEVICE_TYPES = ("blk", "net", "fs", "rng")
_RING = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_INDIRECT_DESC
         | 1 << P.VHOST_USER_F_PROTOCOL_FEATURES)
FEATURES = {
    "net": _RING | 1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_NET_F_MAC,
    "fs": _RING,
    "rng": _RING,
}
QUEUES = {"net": 2, "fs": 2, "rng": 1}
MAC = b"\x02\x00virtq"[:6]
FS_TAG = b"virtq-embedded"
HELLO = b"hello\n"

# FUSE (include/uapi/linux/fuse.h): the opcodes and structures the checker uses.
_IN_HEADER = struct.Struct("<IIQQIIIHH")
_OUT_HEADER = struct.Struct("<IiQ")
_FUSE_LOOKUP, _FUSE_GETATTR, _FUSE_INIT = 1, 3, 26
_ROOT = 1
_HELLO_NODE = 2


def config(device: str, faults: Faults) -> bytes:
    """The device configuration space (zero-padded by the caller)."""
    if device == "net":
        return MAC + struct.pack("<HH", 1, 1)  # mac, status LINK_UP, max_virtqueue_pairs
    if device == "fs":
        return FS_TAG.ljust(36, b"\0") + struct.pack("<I", 0 if faults.fs_zero_queues else 1)
    return b""


def _write(dev: DeviceQueue, segments: Sequence[Segment], data: bytes) -> int:
    """Scatter ``data`` over the writable segments; returns the bytes written."""
    done = 0
    for s in segments:
        if done >= len(data):
            break
        part = data[done : done + s.length]
        dev.write(s.iova, part)
        done += len(part)
    return done


def _readable(dev: DeviceQueue, segments: Sequence[Segment]) -> bytes:
    return b"".join(dev.read(s.iova, s.length) for s in segments if not s.writable)


def serve_rng(dev: DeviceQueue, segments: Sequence[Segment], faults: Faults) -> int:
    """§5.4.6.2: one or more random bytes; returns used.len."""
    writable = [s for s in segments if s.writable]
    if faults.rng_no_bytes:
        return 0
    return _write(dev, writable, os.urandom(sum(s.length for s in writable)))


def _attr(ino: int, mode: int, size: int) -> bytes:
    # ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink,
    # uid, gid, rdev, blksize, flags
    return struct.pack("<QQQQQQIIIIIIIIII", ino, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0,
                       mode, 2 if stat.S_ISDIR(mode) else 1, 0, 0, 0, 4096, 0)


def serve_fs(dev: DeviceQueue, queue: int, segments: Sequence[Segment],
             faults: Faults) -> int:
    """One FUSE request (VIRTIO 1.2 §5.11.6.1); returns used.len."""
    request = _readable(dev, segments)
    writable = [s for s in segments if s.writable]
    if queue == 0 or len(request) < _IN_HEADER.size:
        return 0  # hiprio (FORGET, INTERRUPT: no reply) or no header to answer to
    _, opcode, unique, nodeid, *_ = _IN_HEADER.unpack_from(request)
    body = request[_IN_HEADER.size :]
    error, reply = 0, b""
    if opcode == _FUSE_INIT:
        major = 8 if faults.fuse_init_major else 7
        # major, minor, max_readahead, flags, max_background, congestion_threshold,
        # max_write, time_gran, max_pages, map_alignment, flags2, unused[7]
        reply = struct.pack("<IIIIHHIIHHI", major, 31, 0, 0, 16, 12, 1 << 16, 1, 32, 0, 0)
        reply = reply.ljust(64, b"\0")
    elif opcode == _FUSE_GETATTR and nodeid == _ROOT:
        mode = (stat.S_IFREG if faults.fuse_root_not_dir else stat.S_IFDIR) | 0o755
        reply = struct.pack("<QII", 1, 0, 0) + _attr(_ROOT, mode, 4096)
    elif opcode == _FUSE_LOOKUP and nodeid == _ROOT:
        name = body.split(b"\0", 1)[0]
        if name == b"hello.txt" or faults.fuse_lookup_any:
            reply = struct.pack("<QQQQII", _HELLO_NODE, 0, 1, 1, 0, 0) + \
                _attr(_HELLO_NODE, stat.S_IFREG | 0o644, len(HELLO))
        else:
            error = -errno.ENOENT
    else:
        error = -errno.ENOSYS
    out = _OUT_HEADER.pack(_OUT_HEADER.size + len(reply), error, unique) + reply
    return _write(dev, writable, out)


def deliver_frame(rx: DeviceQueue, frame: bytes, *, mrg_rxbuf: bool,
                  faults: Faults) -> bool:
    """Loop one transmitted frame back into the receive queue (§5.1.6.4): a header, then
    the frame; with MRG_RXBUF spread over as many buffers as it takes (num_buffers says how
    many).  Returns whether the driver wants a notification; a frame that does not fit the
    buffers there are is dropped, as a NIC drops it."""
    if faults.net_corrupt_frame and frame:
        frame = bytes([frame[0] ^ 0xFF]) + frame[1:]
    chains: list[tuple[int, list[Segment]]] = []
    room = 0
    needed = NET_HDR_SIZE + len(frame)
    while room < needed and (mrg_rxbuf or not chains):
        chain = rx.pop()
        if chain is None:
            break
        chains.append(chain)
        room += sum(s.length for s in chain[1] if s.writable)
    if not chains:
        return False
    if room < needed:  # no room: the buffers are returned unused
        for head, _ in chains:
            rx.push(head, 0, publish=False)
        return rx.publish_used()
    num_buffers = len(chains) + (1 if faults.mrg_wrong_count and mrg_rxbuf else 0)
    flags = 1 if faults.net_bad_header else 0  # 1: VIRTIO_NET_HDR_F_NEEDS_CSUM
    if faults.net_bad_header:
        num_buffers = 0
    data = NET_HDR.pack(flags, 0, 0, 0, 0, 0, num_buffers) + frame
    done = 0
    for head, segments in chains:
        writable = [s for s in segments if s.writable]
        n = _write(rx, writable, data[done:])
        done += n
        rx.push(head, n, publish=False)
    return rx.publish_used()


def tx_frame(dev: DeviceQueue, segments: Sequence[Segment]) -> bytes:
    """The frame of a transmit chain (after its virtio_net_hdr)."""
    return _readable(dev, segments)[NET_HDR_SIZE:]
