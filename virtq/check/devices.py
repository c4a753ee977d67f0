"""Device profiles: which queues a device type has, which features the checker accepts,
and a *probe*: one ordinary request with device-readable and device-writable parts whose
answer can be judged.  The generic ring checks are written once over probes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from virtq.abi.blk import (
    BLK_REQ_HEADER,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
)
from virtq.abi.net import NET_HDR_SIZE, TX_QUEUE
from virtq.check import fuse
from virtq.check.context import Done, Req, Session
from virtq.check.model import CheckFailed

__all__ = ["PROFILES", "Probe", "ProbeSpec", "Profile", "fuse_call", "make_probe", "next_unique"]

Judge = Callable[[Done], "str | None"]


@dataclass(frozen=True)
class ProbeSpec:
    """An ordinary request: its device-readable bytes, its device-writable buffer sizes
    (in chain order), and how to judge the completion (None: fine; else what is wrong)."""

    readable: list[bytes]
    writable: list[int]
    judge: Judge


@dataclass(frozen=True)
class Probe:
    req: Req
    judge: Judge


def _halves(parts: list[bytes]) -> list[bytes]:
    out = []
    for p in parts:
        out += [p[: len(p) // 2], p[len(p) // 2 :]] if len(p) > 1 else [p]
    return out


def make_probe(s: Session, *, split: bool = False, indirect: bool = False,
               direct_prefix: int = 0) -> Probe:
    """The profile's probe as one chain (not published).  ``split``: every buffer cut in
    two descriptors (§2.7.4: the device MUST NOT assume an arrangement)."""
    spec = s.profile.probe_spec(s)
    readable, writable = spec.readable, spec.writable
    if split:
        readable = _halves(readable)
        writable = [n for w in writable for n in ((w // 2, w - w // 2) if w > 1 else (w,))]
    req = s.request(s.profile.probe_queue, readable, writable, indirect=indirect,
                    direct_prefix=direct_prefix)
    return Probe(req, spec.judge)


@dataclass(frozen=True)
class Profile:
    name: str
    queues: tuple[int, ...]
    probe_queue: int
    features: int = 0
    config_size: int = 0

    def prepare(self, s: Session) -> None:
        """Anything the device needs before ordinary requests (FUSE_INIT)."""

    def probe_spec(self, s: Session) -> ProbeSpec:
        raise NotImplementedError


class BlkProfile(Profile):
    def probe_spec(self, s: Session) -> ProbeSpec:
        # A one-sector read split over two data buffers, then the status byte (§5.2.6).
        def judge(done: Done) -> str | None:
            status = done.written()[-1]
            return None if status == VIRTIO_BLK_S_OK else f"status byte {status}, expected 0"

        return ProbeSpec([BLK_REQ_HEADER.pack(VIRTIO_BLK_T_IN, 0, 0)], [256, 256, 1], judge)


#: A 60-byte broadcast frame (the shortest Ethernet frame without FCS).
PROBE_FRAME = b"\xff" * 6 + b"\x02virtq" + b"\x88\xb5" + b"virtq check probe".ljust(46, b".")


class NetProfile(Profile):
    def probe_spec(self, s: Session) -> ProbeSpec:
        # TX: a zeroed virtio_net_hdr (no offloads, §5.1.6.2) and a frame, read-only.
        return ProbeSpec([bytes(NET_HDR_SIZE), PROBE_FRAME], [], lambda done: None)


def next_unique(s: Session) -> int:
    unique = int(s.state.get("unique", 0)) + 2  # FUSE uniques are even, non-zero
    s.state["unique"] = unique
    return unique


def fuse_call(s: Session, request: bytes, reply_size: int, unique: int) -> fuse.FuseReply:
    """One FUSE request on the request queue; fails the check unless the reply's header is
    well-formed (``unique`` echoed, ``len`` == used.len)."""
    req = s.request(s.profile.probe_queue, [request], [fuse.OUT_HEADER.size, reply_size])
    (done,) = s.run([req])
    reply = fuse.parse_reply(done.written(done.used_len))
    if reply is None or reply.unique != unique or reply.length != done.used_len:
        raise CheckFailed(
            "the FUSE reply header is malformed: out.unique must echo the request and "
            "out.len count the bytes written (used.len)", unique=unique,
            used_len=done.used_len, reply=done.written()[:64])
    return reply


class FsProfile(Profile):
    def prepare(self, s: Session) -> None:
        # FUSE_INIT must come first on a new session (the FUSE protocol).
        unique = next_unique(s)
        reply = fuse_call(s, fuse.init_request(unique), fuse.INIT_OUT_SIZE, unique)
        if reply.error:
            raise CheckFailed(f"FUSE_INIT failed with error {reply.error}", reply=reply.body)
        s.state["init"] = reply

    def probe_spec(self, s: Session) -> ProbeSpec:
        unique = next_unique(s)

        def judge(done: Done) -> str | None:
            reply = fuse.parse_reply(done.written())
            if reply is None or reply.error or reply.unique != unique:
                return ("FUSE_GETATTR of the root: out header " + (
                    "missing" if reply is None else
                    f"len={reply.length} error={reply.error} unique={reply.unique:#x}")
                    + f" (expected error 0, unique {unique:#x}; used.len {done.used_len})")
            return None

        return ProbeSpec([fuse.getattr_request(unique)],
                         [fuse.OUT_HEADER.size, fuse.ATTR_OUT_SIZE], judge)


class RngProfile(Profile):
    def probe_spec(self, s: Session) -> ProbeSpec:
        return ProbeSpec([], [32, 32], lambda done: None if done.used_len >= 1 else
                         f"used.len {done.used_len}: no random bytes (§5.4.6.2)")


_BLK_FEATURES = (1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX
                 | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_RO
                 | 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES)

PROFILES: dict[str, Profile] = {
    "blk": BlkProfile("blk", (0,), 0, _BLK_FEATURES, config_size=60),
    "net": NetProfile("net", (0, 1), TX_QUEUE),
    "fs": FsProfile("fs", (0, 1), 1, config_size=40),
    "rng": RngProfile("rng", (0,), 0),
}

