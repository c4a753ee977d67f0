"""``virtq fuzz``: a hostile driver that feeds a back-end malformed but targeted inputs and
classifies what it does with each.

A :class:`Case` is one input: a ``level`` (``ring``: descriptors and ring indices;
``request``: the device's request format; ``protocol``: vhost-user messages), a ``kind``
and the ``params`` that fully determine it.  :func:`run_case` opens a fresh connection,
applies the case and returns a :class:`Verdict`:

``ok``        served as if valid (fine when it was valid enough)
``ignored``   no completion, no complaint, still answering messages
``rejected``  refused cleanly: an error status, a NACK, NEEDS_RESET, or a disconnect
``crash``     the process died on a signal (which one is in the detail)
``hang``      no answer to a simple message within the deadline, connection still open
``wrote-outside``  bytes outside the buffers it was given changed (guard bytes, or a
              device-readable buffer)
``protocol``  it broke the ring protocol: a used id never made available or used twice,
              an impossible ``used.len``, ``used.idx`` running ahead, a malformed reply

The last four are *findings*.  :func:`fuzz` generates cases from a seed (the same seed
replays the same sequence), restarts a back-end that crashed or hung, minimises each
finding to a short case and writes it as JSON that :func:`replay` (``virtq fuzz --replay``)
runs again.
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from virtq.abi import (
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_INDIRECT_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from virtq.abi.blk import BLK_REQ_HEADER, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from virtq.abi.net import NET_HDR, NET_HDR_SIZE
from virtq.check import fuse
from virtq.check.backend import Backend, BackendStartError, CommandBackend
from virtq.check.context import CheckContext, CheckOptions, Session
from virtq.check.devices import PROBE_FRAME, PROFILES, next_unique
from virtq.check.model import CheckFailed
from virtq.errors import ArgumentError, DeviceError, VirtqError
from virtq.layout.split import DESC_SIZE
from virtq.testing.hostile_driver import Buf
from virtq.transport.vhost_user import VhostUserError
from virtq.transport.vhost_user import protocol as P

__all__ = [
    "CLASSES",
    "FINDINGS",
    "Case",
    "Finding",
    "FuzzOptions",
    "FuzzReport",
    "Reproducer",
    "Verdict",
    "fuzz",
    "generate",
    "load_case",
    "replay",
    "run_case",
]

CLASSES = ("ok", "ignored", "rejected", "crash", "hang", "wrote-outside", "protocol", "error")
FINDINGS = frozenset({"crash", "hang", "wrote-outside", "protocol"})
LEVELS = ("ring", "request", "protocol")
CASE_FORMAT = 1
_U64 = (1 << 64) - 1


@dataclass
class Case:
    device: str
    level: str
    kind: str
    params: dict[str, Any]

    def describe(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.params.items())
        return f"{self.level}/{self.kind}({args})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(v: Any) -> str:
    if isinstance(v, int) and v > 0xFFFF:
        return hex(v)
    text = repr(v)
    return text if len(text) < 40 else text[:37] + "..."


@dataclass(frozen=True)
class Verdict:
    cls: str
    detail: str = ""

    @property
    def finding(self) -> bool:
        return self.cls in FINDINGS


class _Outcome(Exception):
    """Raised inside a case to classify it at once."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.detail)
        self.verdict = verdict


# -- the chain a ring or request case lays out ---------------------------------------------


@dataclass
class _Desc:
    buf: Buf | None
    addr: int
    length: int
    flags: int
    nxt: int = 0


@dataclass
class _Chain:
    """Descriptors (direct, in ring slots 0..k-1, head 0) as a case lays them out."""

    descs: list[_Desc]
    table: list[_Desc] = field(default_factory=list)  # an indirect table, if any
    table_offset: int | None = None
    heads: list[int] = field(default_factory=lambda: [0])
    avail_extra: int = 0  # avail.idx is published this far beyond the heads

    def writable_ranges(self) -> list[tuple[int, int]]:
        return [(d.addr, d.addr + d.length) for d in self.descs + self.table
                if d.flags & VIRTQ_DESC_F_WRITE and not d.flags & VIRTQ_DESC_F_INDIRECT]


def _lay(s: Session, readable: list[bytes], writable: list[int]) -> _Chain:
    """A valid chain for the given parts (direct descriptors, each buffer guarded)."""
    mem = s.drv.mem
    descs = [_Desc(b, b.gpa, b.length, 0) for b in (mem.buffer(len(d), data=d)
                                                    for d in readable)]
    descs += [_Desc(b, b.gpa, b.length, VIRTQ_DESC_F_WRITE)
              for b in (mem.buffer(n, writable=True) for n in writable)]
    for i, d in enumerate(descs[:-1]):
        d.flags |= VIRTQ_DESC_F_NEXT
        d.nxt = i + 1
    return _Chain(descs)


def _indirect(s: Session, chain: _Chain) -> _Chain:
    """Move the chain into an indirect table referenced by one ring descriptor."""
    table = chain.descs
    for i, d in enumerate(table):
        d.nxt = i + 1 if d.flags & VIRTQ_DESC_F_NEXT else 0
    off = s.drv.mem.table(len(table) + 8)  # room for cases that grow the table
    head = _Desc(None, s.drv.mem.gpa(off), len(table) * DESC_SIZE, VIRTQ_DESC_F_INDIRECT)
    return _Chain([head], table, off)


def _write(s: Session, chain: _Chain) -> None:
    q = s.profile.probe_queue
    ring = s.ring(q)
    for i, d in enumerate(chain.descs):
        ring.write_desc(i, d.addr, d.length, d.flags, d.nxt)
    if chain.table_offset is not None:
        for i, d in enumerate(chain.table):
            s.drv.mem.write_desc_at(chain.table_offset, i, d.addr, d.length, d.flags, d.nxt)
    for h in chain.heads:
        ring.set_avail(ring.next_avail, h)
        ring.next_avail = (ring.next_avail + 1) & 0xFFFF
    ring.avail_idx = ring.next_avail + chain.avail_extra
    s.drv.kick(q)


# -- ring level: mutations of the device's own probe request ---------------------------------

RING_KINDS = ("addr_oob", "len_overflow", "zero_len", "loop", "next_oob", "write_then_read",
              "indirect_next", "indirect_nested", "indirect_bad_len", "chain_too_long",
              "avail_jump", "head_twice", "head_oob", "random_descs")


def _gen_ring(rng: random.Random, kind: str) -> dict[str, Any]:
    p: dict[str, Any] = {"target": rng.randrange(8), "indirect": rng.random() < 0.3}
    if kind == "addr_oob":
        p["where"] = rng.choice(["end", "far", "zero", "wrap", "before"])
    elif kind == "len_overflow":
        p["length"] = rng.choice([0xFFFFFFFF, 0x80000000, 0x10000000, 5 << 20])
    elif kind == "loop":
        p["to"] = rng.randrange(4)
    elif kind == "next_oob":
        p["next"] = rng.choice([256, 1024, 0xFFFF, 4096])
    elif kind == "indirect_bad_len":
        p["length"] = rng.choice([0, 7, 17, 33, 0xFFFFFFF0])
    elif kind == "chain_too_long":
        p["extra"] = rng.randrange(1, 9)
    elif kind == "avail_jump":
        p["by"] = rng.choice([2, 129, 257, 0x8000, 0xFFFF])
    elif kind == "head_oob":
        p["head"] = rng.choice([128, 129, 1000, 0xFFFF])
    elif kind == "random_descs":
        p["seed"] = rng.randrange(1 << 30)
        p["count"] = rng.randrange(1, 6)
    return p


def _ring_case(s: Session, case: Case, size: int) -> _Chain:
    spec = s.profile.probe_spec(s)
    chain = _lay(s, spec.readable, spec.writable)
    p = case.params
    kind = case.kind
    if p.get("indirect") and s.has_feature(VIRTIO_F_INDIRECT_DESC) and kind not in (
            "indirect_next", "indirect_nested", "indirect_bad_len", "chain_too_long"):
        chain = _indirect(s, chain)
    descs = chain.table or chain.descs
    t = descs[p.get("target", 0) % len(descs)]
    mem = s.drv.mem
    if kind == "addr_oob":
        t.addr = {"end": mem.gpa_end, "far": mem.gpa_end + (1 << 30), "zero": 0,
                  "wrap": _U64 - 15, "before": mem.gpa_base - 4096}[p["where"]]
    elif kind == "len_overflow":
        t.length = p["length"]
    elif kind == "zero_len":
        t.length = 0
    elif kind == "loop":
        last = descs[-1]
        last.flags |= VIRTQ_DESC_F_NEXT
        last.nxt = p["to"] % len(descs)
    elif kind == "next_oob":
        t.flags |= VIRTQ_DESC_F_NEXT
        t.nxt = p["next"]
    elif kind == "write_then_read":
        t.flags ^= VIRTQ_DESC_F_WRITE
    elif kind in ("indirect_next", "indirect_nested", "indirect_bad_len", "chain_too_long"):
        chain = _indirect(s, chain)
        head = chain.descs[0]
        if kind == "indirect_next":
            head.flags |= VIRTQ_DESC_F_NEXT
            head.nxt = 1
            chain.descs.append(_Desc(None, head.addr, head.length, 0))
        elif kind == "indirect_nested":
            inner = chain.table[0]
            inner.addr, inner.length = head.addr, head.length
            inner.flags = VIRTQ_DESC_F_INDIRECT | (inner.flags & VIRTQ_DESC_F_NEXT)
        elif kind == "indirect_bad_len":
            head.length = p["length"]
        else:
            extra = size + p["extra"]
            tail = chain.table[-1]
            tail.flags |= VIRTQ_DESC_F_NEXT
            tail.nxt = len(chain.table)
            off = mem.table(len(chain.table) + extra)
            for _ in range(extra):
                b = mem.buffer(1, writable=True)
                chain.table.append(_Desc(b, b.gpa, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                                         len(chain.table) + 1))
            chain.table[-1].flags &= ~VIRTQ_DESC_F_NEXT
            chain.table[-1].nxt = 0
            chain.table_offset = off
            head.addr, head.length = mem.gpa(off), len(chain.table) * DESC_SIZE
    elif kind == "avail_jump":
        chain.avail_extra = p["by"]
    elif kind == "head_twice":
        chain.heads = [0, 0]
    elif kind == "head_oob":
        chain.heads = [p["head"]]
    elif kind == "random_descs":
        r = random.Random(p["seed"])
        for _ in range(p["count"]):
            d = descs[r.randrange(len(descs))]
            field_ = r.randrange(4)
            if field_ == 0:
                d.addr = r.choice([r.randrange(1 << 64), mem.gpa_base + r.randrange(mem.nbytes)])
            elif field_ == 1:
                d.length = r.randrange(1 << 32)
            elif field_ == 2:
                d.flags = r.randrange(8)
            else:
                d.nxt = r.randrange(size * 2)
    return chain


# -- request level: the device's request format, malformed ------------------------------

REQUEST_KINDS: dict[str, tuple[str, ...]] = {
    "blk": ("bad_type", "bad_sector", "short_header", "status_readable", "no_status",
            "odd_length", "tiny_get_id", "huge_request"),
    "net": ("short_tx", "bad_gso", "huge_tx"),
    "fs": ("bad_opcode", "len_mismatch", "short_in_header", "tiny_out"),
    "rng": ("zero_buffer", "readable_only"),
}


def _gen_request(rng: random.Random, device: str, kind: str) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if kind == "bad_type":
        p["type"] = rng.choice([3, 5, 7, 9, 10, 16, 0xFF, 0x80000000, rng.randrange(1 << 32)])
    elif kind == "bad_sector":
        p["sector"] = rng.choice([_U64, 1 << 63, (1 << 55) + 1, 0xFFFFFFFF])
        p["type"] = rng.choice([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT])
    elif kind == "short_header":
        p["length"] = rng.randrange(0, 16)
    elif kind == "odd_length":
        p["length"] = rng.choice([1, 511, 513, 100])
    elif kind == "huge_request":
        p["sectors"] = rng.choice([2048, 4096])
    elif kind in ("bad_gso", "short_tx"):
        p["gso_type"] = rng.choice([1, 3, 4, 5, 0x80, 0xFF])
        p["length"] = rng.randrange(0, NET_HDR_SIZE + 14)
    elif kind == "bad_opcode":
        p["opcode"] = rng.choice([0, 99, 4096, 0xFFFFFFFF, 52, 53])
    elif kind == "len_mismatch":
        p["len"] = rng.choice([0, 1, 39, 41, 0xFFFFFFFF, 1 << 20])
    elif kind == "short_in_header":
        p["length"] = rng.randrange(1, 40)
    return p


def _request_case(s: Session, case: Case) -> _Chain:
    p, kind = case.params, case.kind
    readable: list[bytes]
    writable: list[int]
    if case.device == "blk":
        readable = [BLK_REQ_HEADER.pack(VIRTIO_BLK_T_IN, 0, 0)]
        writable = [512, 1]
        if kind == "bad_type":
            readable = [BLK_REQ_HEADER.pack(p["type"] & 0xFFFFFFFF, 0, 0)]
        elif kind == "bad_sector":
            readable = [BLK_REQ_HEADER.pack(p["type"], 0, p["sector"])]
            if p["type"] == VIRTIO_BLK_T_OUT:
                readable.append(bytes(512))
                writable = [1]
        elif kind == "short_header":
            readable = [readable[0][: p["length"]]] if p["length"] else []
        elif kind == "status_readable":
            readable = [readable[0], bytes(512), b"\x00"]
            writable = []
        elif kind == "no_status":
            writable = [512]
        elif kind == "odd_length":
            writable = [p["length"], 1]
        elif kind == "tiny_get_id":
            readable = [BLK_REQ_HEADER.pack(VIRTIO_BLK_T_GET_ID, 0, 0)]
            writable = [1]
        elif kind == "huge_request":
            writable = [p["sectors"] * 512, 1]
    elif case.device == "net":
        hdr = NET_HDR.pack(0, p.get("gso_type", 0), 0, 1400, 0, 0, 0)
        writable = []
        if kind == "short_tx":
            readable = [(hdr + PROBE_FRAME)[: max(1, p["length"])]]
        elif kind == "bad_gso":
            readable = [hdr, PROBE_FRAME]
        else:
            readable = [bytes(NET_HDR_SIZE), PROBE_FRAME * 1200]
    elif case.device == "fs":
        unique = next_unique(s)
        req = fuse.getattr_request(unique)
        writable = [fuse.OUT_HEADER.size, fuse.ATTR_OUT_SIZE]
        if kind == "bad_opcode":
            req = fuse.IN_HEADER.pack(fuse.IN_HEADER.size + 16, p["opcode"] & 0xFFFFFFFF,
                                      unique, 1, 0, 0, 0, 0, 0) + bytes(16)
        elif kind == "len_mismatch":
            req = struct.pack("<I", p["len"] & 0xFFFFFFFF) + req[4:]
        elif kind == "short_in_header":
            req = req[: p["length"]]
        elif kind == "tiny_out":
            writable = [4]
        readable = [req]
    else:
        readable, writable = [], [64]
        if kind == "zero_buffer":
            writable = [0]
        elif kind == "readable_only":
            readable, writable = [bytes(64)], []
    if not readable and not writable:
        writable = [1]
    return _lay(s, readable, writable)


# -- protocol level: vhost-user messages ---------------------------------------------------

PROTOCOL_KINDS = ("bad_size", "unknown_code", "vring_num", "mem_overlap", "mem_zero",
                  "mem_offset", "mem_count", "fds_missing", "fds_extra", "vring_index",
                  "bad_flags", "vring_addr")
_SET_REQUESTS = ("SET_FEATURES", "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
                 "SET_VRING_ENABLE", "SET_MEM_TABLE", "SET_PROTOCOL_FEATURES",
                 "GET_VRING_BASE", "SET_VRING_KICK")


def _gen_protocol(rng: random.Random, kind: str) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if kind == "bad_size":
        p["request"] = rng.choice(_SET_REQUESTS)
        p["size"] = rng.choice([0, 1, 4, 7, 9, 12, 31, 47, 64])
    elif kind == "unknown_code":
        p["code"] = rng.choice([0, 26, 27, 41, 42, 100, 0xFFFF, 0xFFFFFFFF])
    elif kind == "vring_num":
        p["num"] = rng.choice([0, 1, 3, 100, 32769, 65535, 0xFFFFFFFF])
    elif kind in ("mem_offset",):
        p["offset"] = rng.choice([4096 << 10, 1 << 40, _U64 - 4095])
    elif kind == "mem_count":
        p["nregions"] = rng.choice([0, 2, 9, 255, 0xFFFFFFFF])
    elif kind == "fds_missing":
        p["request"] = rng.choice(["SET_VRING_KICK", "SET_VRING_CALL", "SET_MEM_TABLE"])
    elif kind == "fds_extra":
        p["request"] = rng.choice(["SET_OWNER", "GET_FEATURES", "SET_VRING_NUM"])
        p["count"] = rng.randrange(1, 8)
    elif kind == "vring_index":
        p["index"] = rng.choice([2, 200, 0xFF, 0xFFFFFFFF])
        p["request"] = rng.choice(["SET_VRING_NUM", "SET_VRING_BASE", "GET_VRING_BASE",
                                   "SET_VRING_ENABLE", "SET_VRING_ADDR"])
    elif kind == "bad_flags":
        p["flags"] = rng.choice([0, 2, 3, 0x5, 0xFFFFFFFF])
    elif kind == "vring_addr":
        p["where"] = rng.choice(["unmapped", "misaligned", "zero"])
    return p


def _protocol_case(s: Session, case: Case) -> None:
    """Send the malformed message(s); replies are left for the liveness probe to skip."""
    drv, p, kind = s.drv, case.params, case.kind
    q = s.profile.probe_queue
    ring = s.ring(q)
    table = drv.mem.mem_table()
    fd = table[0][4]
    gpa, nbytes, uva, _, _ = table[0]
    region = P.MEM_REGION.pack(gpa, nbytes, uva, 0)
    if kind == "bad_size":
        req = P.Request[p["request"]]
        drv.send_raw(req, bytes(p["size"]), (fd,) if req is P.Request.SET_MEM_TABLE else ())
    elif kind == "unknown_code":
        drv.send_raw(p["code"], bytes(8))
    elif kind == "vring_num":
        drv.send_raw(P.Request.SET_VRING_NUM, P.VRING_STATE.pack(q, p["num"] & 0xFFFFFFFF))
        drv.send_raw(P.Request.SET_VRING_ADDR, P.VRING_ADDR.pack(
            q, 0, ring.desc_uva, ring.used_uva, ring.avail_uva, 0))
        drv.kick(q)
    elif kind == "mem_overlap":
        drv.send_raw(P.Request.SET_MEM_TABLE, P.MEM_TABLE_HEADER.pack(2, 0) + region
                     + P.MEM_REGION.pack(gpa + 4096, nbytes, uva + 4096, 4096), (fd, fd))
    elif kind == "mem_zero":
        drv.send_raw(P.Request.SET_MEM_TABLE, P.MEM_TABLE_HEADER.pack(1, 0)
                     + P.MEM_REGION.pack(gpa, 0, uva, 0), (fd,))
    elif kind == "mem_offset":
        drv.send_raw(P.Request.SET_MEM_TABLE, P.MEM_TABLE_HEADER.pack(1, 0)
                     + P.MEM_REGION.pack(gpa, nbytes, uva, p["offset"]), (fd,))
    elif kind == "mem_count":
        drv.send_raw(P.Request.SET_MEM_TABLE,
                     P.MEM_TABLE_HEADER.pack(p["nregions"] & 0xFFFFFFFF, 0) + region, (fd,))
    elif kind == "fds_missing":
        req = P.Request[p["request"]]
        payload = (P.MEM_TABLE_HEADER.pack(1, 0) + region if req is P.Request.SET_MEM_TABLE
                   else P.U64.pack(q))
        drv.send_raw(req, payload)
    elif kind == "fds_extra":
        req = P.Request[p["request"]]
        payload = P.VRING_STATE.pack(q, ring.size) if req is P.Request.SET_VRING_NUM else b""
        drv.send_raw(req, payload, [fd] * p["count"])
    elif kind == "vring_index":
        req = P.Request[p["request"]]
        index = p["index"] & 0xFFFFFFFF
        payload = (P.VRING_ADDR.pack(index, 0, ring.desc_uva, ring.used_uva, ring.avail_uva, 0)
                   if req is P.Request.SET_VRING_ADDR else P.VRING_STATE.pack(index, 1))
        drv.send_raw(req, payload)
    elif kind == "bad_flags":
        drv.send_raw(P.Request.GET_FEATURES, b"", flags=p["flags"])
    elif kind == "vring_addr":
        bad = {"unmapped": uva + nbytes + (1 << 20), "misaligned": ring.desc_uva + 1,
               "zero": 0}[p["where"]]
        drv.send_raw(P.Request.SET_VRING_ADDR, P.VRING_ADDR.pack(
            q, 0, bad, ring.used_uva, ring.avail_uva, 0))
        drv.kick(q)


# -- running one case ------------------------------------------------------------------------


@dataclass
class FuzzOptions:
    seconds: float = 20.0
    #: Stop after this many cases (None: run for ``seconds``).
    cases: int | None = None
    seed: int = 0
    #: A back-end that neither answers a message nor hangs up within this is hung.
    hang_timeout: float = 1.0
    levels: tuple[str, ...] = LEVELS
    minimise: bool = True
    out: Path | None = None
    queue_size: int = 128


def _ctx(device: str, backend: Backend, options: FuzzOptions, exits: bool) -> CheckContext:
    return CheckContext(device, PROFILES[device], backend,
                        CheckOptions(timeout=options.hang_timeout, queue_size=options.queue_size,
                                     seed=options.seed),
                        exits_on_disconnect=exits)


def _alive_probe(s: Session, timeout: float) -> Verdict | None:
    """A simple message must still be answered: returns the verdict if it is not."""
    drv = s.drv
    status = drv.has(P.ProtocolFeature.STATUS)
    req = P.Request.GET_STATUS if status else P.Request.GET_FEATURES
    try:
        drv.send_raw(req)
        deadline = time.monotonic() + timeout
        while True:
            reply = drv.recv_raw(max(0.0, deadline - time.monotonic()))
            if reply is None:
                return Verdict("hang", f"no reply to {req.name} within {timeout} s and the "
                               "connection is still open")
            if reply.code == req:
                break
    except (EOFError, OSError):
        return Verdict("rejected", "disconnected")
    if status and len(reply.payload) == 8 and \
            int.from_bytes(reply.payload, "little") & VIRTIO_CONFIG_S_NEEDS_RESET:
        return Verdict("rejected", "NEEDS_RESET")
    return None


def _judge_ring(s: Session, chain: _Chain, timeout: float) -> Verdict:
    q = s.profile.probe_queue
    ring = s.ring(q)
    expected = len(chain.heads)
    # A completion normally comes at once; waiting the whole hang timeout for chains a
    # back-end silently dropped would make every ignored case cost a second.
    s.drv.wait_used(q, expected, min(timeout, 0.25))
    time.sleep(0.02)  # anything more it is about to publish
    pending = ring.pending()
    mem = s.drv.mem
    covered = chain.writable_ranges()
    hits = [h for h in mem.guard_hits()
            if not any(a <= h.gpa and h.gpa + len(h.expected) <= b for a, b in covered)
            and not (h.what == "device-readable buffer"
                     and any(a <= h.gpa < b for a, b in covered))]
    if hits:
        return Verdict("wrote-outside", hits[0].describe())
    if pending > expected + chain.avail_extra:
        return Verdict("protocol", f"used.idx moved by {pending} for {expected} chain(s) "
                       "made available")
    in_mem = [(a, b) for a, b in covered if mem.gpa_base <= a <= b <= mem.gpa_end]
    plausible = sum(b - a for a, b in in_mem)
    # What was made available: the heads written, and -- when avail.idx was published
    # past them (by less than the queue size, which a device may take as valid) -- the
    # entries the ring held at those positions.
    available = Counter(chain.heads)
    if chain.avail_extra < ring.size:
        start = ring.avail_idx - chain.avail_extra
        for k in range(chain.avail_extra):
            available[ring.avail_entry(start + k)] += 1
    statuses = []
    for _ in range(min(pending, ring.size)):
        head, length = ring.used_elem(ring.last_used)
        ring.last_used = (ring.last_used + 1) & 0xFFFF
        if available[head] <= 0:
            return Verdict("protocol", f"used id {head} was never made available, or used "
                           f"more often than made available (heads {sorted(chain.heads)})")
        available[head] -= 1
        if length > plausible:
            return Verdict("protocol", f"used.len {length} for a chain with {plausible} "
                           "device-writable bytes in guest memory")
        statuses.append((head, length))
    if statuses:
        if s.profile.name == "blk" and chain.descs:
            last = (chain.table or chain.descs)[-1]
            if last.buf is not None and last.buf.writable and last.length == 1 and \
                    statuses[0][1] >= 1:
                status = mem.contents(last.buf)[0]
                if status != 0:
                    return Verdict("rejected", f"status {status}")
        return Verdict("ok", f"completed: {statuses}")
    return Verdict("ignored", "no completion")


def run_case(case: Case, backend: Backend, options: FuzzOptions, *,
             exits_on_disconnect: bool = False) -> Verdict:
    """Run one case against ``backend`` on a fresh connection; never raises for what the
    back-end does (``error`` when the case itself could not be set up)."""
    ctx = _ctx(case.device, backend, options, exits_on_disconnect)
    log_at = backend.log_size() if isinstance(backend, CommandBackend) else 0
    try:
        verdict = _run_case(ctx, case, options)
    except _Outcome as out:
        verdict = out.verdict
    except (CheckFailed, VhostUserError, DeviceError, EOFError, ConnectionError) as exc:
        verdict = Verdict("error", f"set-up failed before the case: {exc}")
    finally:
        ctx.close()
    if verdict.cls == "rejected" and isinstance(backend, CommandBackend):
        # A back-end that hung up may be on its way down (DPDK's datapath thread can die
        # a moment after the message thread dropped the connection; a later death is still
        # caught, on the next case, and the reproducer then carries this one as prelude).
        end = backend.wait_exit(0.1)
    else:
        end = backend.poll()
    if end is not None:
        if end.signal is not None:
            said = ""
            if isinstance(backend, CommandBackend):
                lines = [ln for ln in backend.log_since(log_at).splitlines() if ln.strip()]
                said = f"; it said: {lines[-1].strip()[:200]}" if lines else ""
            return Verdict("crash", f"the back-end {end.describe()}{said}")
        if verdict.cls in ("ok", "ignored", "error"):
            return Verdict("rejected", f"the back-end {end.describe()}")
    return verdict


def _run_case(ctx: CheckContext, case: Case, options: FuzzOptions) -> Verdict:
    s = ctx.session()
    t = options.hang_timeout
    if case.level == "protocol":
        try:
            _protocol_case(s, case)
        except OSError:
            return Verdict("rejected", "disconnected while sending")
        time.sleep(0.02)
        bad = _alive_probe(s, t)
        return bad or Verdict("ok", "still answering")
    chain = _ring_case(s, case, options.queue_size) if case.level == "ring" else \
        _request_case(s, case)
    _write(s, chain)
    verdict = _judge_ring(s, chain, t)
    if not s.drv.connection_open():
        return Verdict("rejected", "disconnected") if verdict.cls in ("ok", "ignored") \
            else verdict
    bad = _alive_probe(s, t)
    if bad is not None and (bad.cls == "hang" or verdict.cls in ("ok", "ignored")):
        return bad
    return verdict


# -- generation, minimisation, the loop ------------------------------------------------------


def generate(rng: random.Random, device: str, levels: tuple[str, ...] = LEVELS) -> Case:
    """One case from ``rng`` (the same state gives the same case)."""
    level = rng.choice(levels)
    if level == "ring":
        kind = rng.choice(RING_KINDS)
        return Case(device, level, kind, _gen_ring(rng, kind))
    if level == "request":
        kind = rng.choice(REQUEST_KINDS[device])
        return Case(device, level, kind, _gen_request(rng, device, kind))
    kind = rng.choice(PROTOCOL_KINDS)
    return Case(device, level, kind, _gen_protocol(rng, kind))


def _simpler(case: Case) -> Iterator[Case]:
    """Smaller variants: drop the indirect table, then each integer towards 0 / 1."""
    for key, value in case.params.items():
        if key == "indirect" and value:
            yield Case(case.device, case.level, case.kind, {**case.params, key: False})
        elif isinstance(value, int) and not isinstance(value, bool):
            for v in (0, 1, value // 2):
                if 0 <= v < value:
                    yield Case(case.device, case.level, case.kind, {**case.params, key: v})


def minimise(case: Case, verdict: Verdict, run: Callable[[Case], Verdict],
             budget: int = 12, deadline: float = float("inf")) -> Case:
    """The simplest variant of ``case`` (within ``budget`` runs, and not after the
    monotonic ``deadline``) that gives the same class of verdict."""
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for smaller in _simpler(case):
            if tries >= budget or time.monotonic() > deadline:
                break
            tries += 1
            if run(smaller).cls == verdict.cls:
                case, improved = smaller, True
                break
    return case


def shrink_prelude(prelude: list[Case], reproduces: Callable[[list[Case]], bool],
                   budget: int = 8, deadline: float = float("inf")) -> list[Case]:
    """Drop cases from ``prelude`` (halves, then quarters, ...) while ``reproduces`` still
    holds, within ``budget`` tries and the ``deadline`` (delta debugging, simplified)."""
    tries = 0
    chunk = max(1, len(prelude) // 2)
    while prelude and tries < budget and time.monotonic() < deadline:
        i = 0
        while i < len(prelude) and tries < budget and time.monotonic() < deadline:
            candidate = prelude[:i] + prelude[i + chunk :]
            tries += 1
            if reproduces(candidate):
                prelude = candidate
            else:
                i += chunk
        if chunk == 1:
            break
        chunk //= 2
    return prelude


@dataclass
class Finding:
    case: Case
    verdict: Verdict
    first: Case
    #: Cases that must run first (on the same back-end process) for it to reproduce.
    prelude: list[Case] = field(default_factory=list)
    #: Whether a replay on a fresh back-end gave the same class again.
    reproduced: bool = True
    path: Path | None = None
    repeats: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.verdict.cls, "detail": self.verdict.detail,
                "case": self.case.to_dict(), "found_as": self.first.describe(),
                "prelude": [c.describe() for c in self.prelude],
                "reproduced": self.reproduced, "repeats": self.repeats,
                "reproducer": None if self.path is None else str(self.path)}


@dataclass
class FuzzReport:
    device: str
    backend: str
    seed: int
    cases: int = 0
    seconds: float = 0.0
    restarts: int = 0
    by_class: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def confirmed(self) -> list[Finding]:
        """Findings that stand: every crash (a process that died on a signal did), and
        the others when they happened again on a fresh back-end.  A hang seen once on a
        loaded machine is reported, not counted."""
        return [f for f in self.findings if f.reproduced or f.verdict.cls == "crash"]

    @property
    def exit_status(self) -> int:
        return 1 if self.confirmed else 0

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "backend": self.backend, "seed": self.seed,
                "cases": self.cases, "seconds": round(self.seconds, 1),
                "restarts": self.restarts, "by_class": dict(self.by_class),
                "by_kind": {k: dict(v) for k, v in sorted(self.by_kind.items())},
                "findings": [f.to_dict() for f in self.findings],
                "exit_status": self.exit_status}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _probe_exits(backend: Backend) -> bool:
    if isinstance(backend, CommandBackend):
        backend.ensure_running()
        from virtq.testing.hostile_driver import HostileDriver  # noqa: PLC0415

        try:
            with HostileDriver.connect(backend.socket_path) as drv:
                drv.frontend.set_owner()
                drv.frontend.get_features()
        except (VirtqError, OSError) as exc:
            raise BackendStartError(f"cannot talk to the back-end: {exc}") from exc
        return backend.wait_exit(1.0) is not None
    return False


class _Fuzzer:
    def __init__(self, device: str, backend: Backend, options: FuzzOptions,
                 report: FuzzReport) -> None:
        self.device = device
        self.backend = backend
        self.options = options
        self.report = report
        self.exits = _probe_exits(backend)
        #: Cases run on the current back-end process (a crash may be their doing).
        self.history: list[Case] = []

    def fresh(self) -> None:
        if self.backend.restartable:
            self.backend.restart()
            self.report.restarts += 1
        self.history = []

    def run(self, case: Case) -> Verdict:
        verdict = run_case(case, self.backend, self.options,
                           exits_on_disconnect=self.exits)
        self.history.append(case)
        if verdict.cls in ("crash", "hang"):
            self.fresh()
        return verdict

    def sequence(self, cases: list[Case]) -> Verdict:
        """Run ``cases`` on a fresh back-end; the verdict of the last one (``error`` if an
        earlier one already crashed or hung it)."""
        self.fresh()
        for c in cases[:-1]:
            if self.run(c).cls in ("crash", "hang"):
                return Verdict("error", "the prelude itself failed")
        return self.run(cases[-1])

    def finding(self, case: Case, verdict: Verdict, history: list[Case],
                deadline: float) -> Finding:
        """Check the finding reproduces; minimise it and its prelude (not after
        ``deadline``: a run must end near its time budget)."""
        if not self.options.minimise or time.monotonic() > deadline:
            return Finding(case, verdict, case, history if verdict.cls in ("crash", "hang")
                           else [], reproduced=False)
        stateful = verdict.cls in ("crash", "hang") and self.backend.restartable
        if not stateful or self.sequence([case]).cls == verdict.cls:
            small = minimise(case, verdict, lambda c: (self.sequence([c]) if stateful
                                                       else self.run(c)), deadline=deadline)
            return Finding(small, verdict, case)
        # Not on its own: it needs what ran before on the same process.
        if self.sequence([*history, case]).cls != verdict.cls:
            return Finding(case, verdict, case, history, reproduced=False)
        prelude = shrink_prelude(history, lambda pre: self.sequence(
            [*pre, case]).cls == verdict.cls, deadline=deadline)
        return Finding(case, verdict, case, prelude)


def fuzz(device: str, backend: Backend, options: FuzzOptions, *,
         on_progress: Callable[[FuzzReport, Case, Verdict], None] | None = None) -> FuzzReport:
    """Generate and run cases for ``options.seconds`` (or ``options.cases``); each finding is
    checked to reproduce on a fresh back-end, minimised (with the earlier cases it needs,
    if any) and, with ``options.out``, written there as a JSON reproducer.  A back-end that
    crashed or hung is restarted (a :class:`CommandBackend`)."""
    if device not in PROFILES:
        raise ArgumentError("device", device, f"must be one of {', '.join(PROFILES)}")
    bad_levels = set(options.levels) - set(LEVELS)
    if bad_levels or not options.levels:
        raise ArgumentError("levels", options.levels, f"must be among {LEVELS}")
    report = FuzzReport(device, backend.describe(), options.seed)
    fz = _Fuzzer(device, backend, options, report)
    rng = random.Random(options.seed)
    t0 = time.monotonic()
    seen: dict[tuple[str, str, str], Finding] = {}
    while True:
        if options.cases is not None and report.cases >= options.cases:
            break
        if options.cases is None and time.monotonic() - t0 >= options.seconds:
            break
        case = generate(rng, device, options.levels)
        history = list(fz.history)
        verdict = fz.run(case)
        report.cases += 1
        report.by_class[verdict.cls] += 1
        report.by_kind.setdefault(f"{case.level}/{case.kind}", Counter())[verdict.cls] += 1
        if verdict.finding:
            key = (verdict.cls, case.level, case.kind)
            if key in seen:
                seen[key].repeats += 1
            else:
                # Minimising may take the run past its budget by a quarter, no more.
                finding = fz.finding(case, verdict, history,
                                     t0 + options.seconds * 1.25 if options.cases is None
                                     else float("inf"))
                if options.out is not None:
                    finding.path = write_case(options.out, len(report.findings), finding,
                                              options.seed)
                seen[key] = finding
                report.findings.append(finding)
                fz.fresh()  # the search goes on from a known state
        if on_progress is not None:
            on_progress(report, case, verdict)
    report.seconds = time.monotonic() - t0
    return report


def write_case(out: Path, n: int, finding: Finding, seed: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{n:03d}-{finding.verdict.cls}-{finding.case.level}-{finding.case.kind}.json"
    path.write_text(json.dumps({
        "virtq_fuzz_case": CASE_FORMAT, "seed": seed, "class": finding.verdict.cls,
        "detail": finding.verdict.detail, "reproduced": finding.reproduced,
        **finding.case.to_dict(),
        "prelude": [c.to_dict() for c in finding.prelude]}, indent=2) + "\n")
    return path


@dataclass
class Reproducer:
    """A reproducer file: the case, the cases to run before it on the same back-end
    process, and the class it was found as."""

    case: Case
    prelude: list[Case]
    cls: str | None


def load_case(path: str | Path) -> Reproducer:
    """Read a reproducer written by :func:`fuzz`.  Raises :class:`ArgumentError` for a
    file that is not one."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("virtq_fuzz_case") != CASE_FORMAT:
            raise ValueError("not a virtq fuzz case (no virtq_fuzz_case: 1)")
        case = Case(data["device"], data["level"], data["kind"], dict(data["params"]))
        prelude = [Case(c["device"], c["level"], c["kind"], dict(c["params"]))
                   for c in data.get("prelude", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArgumentError("replay", str(path), f"cannot read a fuzz case: {exc}") from None
    for c in (*prelude, case):
        if c.device not in PROFILES or c.level not in LEVELS or c.device != case.device:
            raise ArgumentError("replay", str(path), "unknown device or level")
    return Reproducer(case, prelude, data.get("class"))


def replay(path: str | Path, backend: Backend, options: FuzzOptions) -> tuple[Case, Verdict]:
    """Run a reproducer once."""
    rep = load_case(path)
    exits = _probe_exits(backend)
    for k, earlier in enumerate(rep.prelude):
        verdict = run_case(earlier, backend, options, exits_on_disconnect=exits)
        if verdict.cls in ("crash", "hang"):
            # The damage the prelude does may surface while it still runs.
            return earlier, Verdict(verdict.cls, f"{verdict.detail} (during prelude case "
                                    f"{k + 1} of {len(rep.prelude)})")
    return rep.case, run_case(rep.case, backend, options, exits_on_disconnect=exits)
