"""Checks every vhost-user back-end must pass, whatever its device type: the handshake and
feature rules, the vhost-user message rules, and the split ring rules of VIRTIO 1.2 §2.7
-- observed from the driver's side, with guard bytes around every buffer."""

from __future__ import annotations

import os
import time
from typing import Any

from virtq.abi import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
)
from virtq.check.backend import CommandBackend
from virtq.check.context import CheckContext, Done, Session
from virtq.check.devices import Probe, make_probe
from virtq.check.model import CheckFailed, CheckSkipped, Level, check
from virtq.testing.hostile_driver import HostileDriver
from virtq.transport.vhost_user import (
    VhostUserDisconnectedError,
    VhostUserNackError,
)
from virtq.transport.vhost_user import protocol as P

MUST, SHOULD, INFO = Level.MUST, Level.SHOULD, Level.INFO
VHOST_USER = "vhost-user.rst"


def _run_probes(s: Session, count: int = 1, **kw: Any) -> list[tuple[Probe, Done]]:
    probes = [make_probe(s, **kw) for _ in range(count)]
    dones = s.run([p.req for p in probes])
    by_head = {d.req.head: d for d in dones}
    return [(p, by_head[p.req.head]) for p in probes]


def _judge(pairs: list[tuple[Probe, Done]]) -> None:
    for probe, done in pairs:
        problem = probe.judge(done)
        if problem:
            raise CheckFailed(f"the request completed, but wrongly: {problem}",
                              used_len=done.used_len, written=done.written()[:64])


def _offers(ctx: CheckContext, s: Session, bit: int, name: str) -> None:
    if not (s.drv.neg.offered >> bit & 1):
        raise CheckSkipped(f"{name} is not offered")


# -- features and the handshake ---------------------------------------------------------


@check("feat.version-1", title="VIRTIO_F_VERSION_1 is offered",
       clause="VIRTIO 1.2 §6.2: A device MUST offer VIRTIO_F_VERSION_1.", level=MUST)
def version_1(ctx: CheckContext) -> str | None:
    with ctx.connect() as drv:
        drv.frontend.set_owner()
        offered = drv.frontend.get_features()
    if not offered >> VIRTIO_F_VERSION_1 & 1:
        raise CheckFailed("GET_FEATURES lacks bit 32 (VIRTIO_F_VERSION_1)",
                          offered=f"{offered:#x}")
    return f"offered {offered:#x}"


def _bogus_bit(offered: int) -> int:
    """A transport feature bit the device did not offer (packed, in-order, notification
    data, ...): accepting it is never valid."""
    for bit in (38, 35, 34, 39, 40, 41, 42):
        if not offered >> bit & 1:
            return bit
    raise CheckSkipped("the device offers every candidate transport bit")


@check("feat.features-ok", title="an unoffered feature is refused (FEATURES_OK not set)",
       clause="VIRTIO 1.2 §2.2.2: The device SHOULD accept any valid subset of features the "
              "driver accepts, otherwise it MUST fail to set the FEATURES_OK device status "
              "bit when the driver writes it.", level=MUST)
def features_ok(ctx: CheckContext) -> str | None:
    with ctx.connect() as drv:
        fe = drv.frontend
        fe.set_owner()
        offered = fe.get_features()
        if offered >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            proto = fe.get_protocol_features()
            drv.neg.protocol = proto & (1 << P.ProtocolFeature.REPLY_ACK
                                        | 1 << P.ProtocolFeature.STATUS)
            fe.set_protocol_features(drv.neg.protocol)
        bit = _bogus_bit(offered)
        try:
            fe.set_features(offered | 1 << bit)
            if not drv.has(P.ProtocolFeature.STATUS):
                raise CheckSkipped(
                    f"SET_FEATURES with unoffered bit {bit} was accepted; without the STATUS "
                    "protocol feature there is no FEATURES_OK to read back")
            fe.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                          | VIRTIO_CONFIG_S_FEATURES_OK)
            status = fe.get_status()
        except VhostUserNackError as exc:
            return f"refused with a NACK: {exc}"
        except VhostUserDisconnectedError as exc:
            return f"refused by hanging up: {exc}"
    if status & VIRTIO_CONFIG_S_FEATURES_OK:
        raise CheckFailed(f"the driver accepted unoffered feature bit {bit} and GET_STATUS "
                          f"still shows FEATURES_OK (status {status:#x})",
                          offered=f"{offered:#x}", accepted=f"{offered | 1 << bit:#x}",
                          status=status)
    return f"FEATURES_OK cleared (status {status:#x})"


@check("feat.subset", title="a minimal valid feature subset works",
       clause="VIRTIO 1.2 §2.2.2: The device SHOULD accept any valid subset of features the "
              "driver accepts.", level=SHOULD)
def feature_subset(ctx: CheckContext) -> str | None:
    s = ctx.session(event_idx=False, indirect=False, device_features=0)
    if s.drv.has(P.ProtocolFeature.STATUS):
        status = s.drv.frontend.get_status()
        if not status & VIRTIO_CONFIG_S_FEATURES_OK:
            raise CheckFailed(f"VERSION_1 alone was refused: status {status:#x}")
    _judge(_run_probes(s))
    return f"accepted {s.features:#x}"


@check("vu.reply-ack", title="REPLY_ACK: every NEED_REPLY request is acknowledged",
       clause=f"{VHOST_USER}, REPLY_ACK: when the NEED_REPLY flag is set the back-end MUST "
              "respond with a payload indicating success or failure (zero on success); "
              "replies carry the request's code, the reply flag and version 1 (Header)",
       level=MUST)
def reply_ack(ctx: CheckContext) -> str | None:
    drv = ctx.connect()
    ctx.adopt(drv)
    t = ctx.options.timeout
    problems: list[str] = []
    seen: list[str] = []

    def exchange(req: P.Request, payload: bytes = b"", fds: tuple[int, ...] = (),
                 ack: bool = True) -> bytes:
        flags = P.VERSION | (P.FLAG_NEED_REPLY if ack and req not in P.HAS_REPLY else 0)
        try:
            drv.send_raw(req, payload, fds, flags=flags)
            if req not in P.HAS_REPLY and not ack:
                return b""
            reply = drv.recv_raw(t)
        except (EOFError, OSError) as exc:
            raise CheckFailed(f"{req.name}: the back-end closed the connection ({exc})",
                              replies=seen) from None
        if reply is None:
            problems.append(f"{req.name}: no reply within {t} s")
            raise CheckFailed("; ".join(problems), replies=seen)
        seen.append(f"{req.name} -> {reply.describe()}")
        if reply.code != req or not reply.flags & P.FLAG_REPLY or \
                reply.flags & P.FLAG_VERSION_MASK != P.VERSION:
            problems.append(f"{req.name}: reply header {reply.describe()}")
        if req not in P.HAS_REPLY:
            if len(reply.payload) != 8:
                problems.append(f"{req.name}: ack of {len(reply.payload)} bytes, expected 8")
            elif int.from_bytes(reply.payload, "little"):
                problems.append(f"{req.name}: ack status "
                                f"{int.from_bytes(reply.payload, 'little')} for a valid request")
        return reply.payload

    exchange(P.Request.SET_OWNER, ack=False)
    offered = int.from_bytes(exchange(P.Request.GET_FEATURES)[:8], "little")
    if not offered >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1:
        raise CheckSkipped("VHOST_USER_F_PROTOCOL_FEATURES is not offered")
    proto = int.from_bytes(exchange(P.Request.GET_PROTOCOL_FEATURES)[:8], "little")
    if not proto >> P.ProtocolFeature.REPLY_ACK & 1:
        raise CheckSkipped("the REPLY_ACK protocol feature is not offered")
    exchange(P.Request.SET_PROTOCOL_FEATURES,
             P.U64.pack(proto & (1 << P.ProtocolFeature.REPLY_ACK | 1 << P.ProtocolFeature.MQ)),
             ack=False)
    exchange(P.Request.SET_OWNER)
    exchange(P.Request.SET_FEATURES, P.U64.pack(
        offered & (1 << VIRTIO_F_VERSION_1 | 1 << P.VHOST_USER_F_PROTOCOL_FEATURES)))
    table = drv.mem.mem_table()
    exchange(P.Request.SET_MEM_TABLE, P.MEM_TABLE_HEADER.pack(1, 0) + b"".join(
        P.MEM_REGION.pack(g, n, u, o) for g, n, u, o, _ in table), (table[0][4],))
    q = ctx.profile.probe_queue
    ring = drv.add_ring(q, ctx.options.queue_size)
    kick, call = drv.queues[q].kick, drv.queues[q].call
    err = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        exchange(P.Request.SET_VRING_NUM, P.VRING_STATE.pack(q, ring.size))
        exchange(P.Request.SET_VRING_BASE, P.VRING_STATE.pack(q, 0))
        exchange(P.Request.SET_VRING_ADDR, P.VRING_ADDR.pack(
            q, 0, ring.desc_uva, ring.used_uva, ring.avail_uva, 0))
        exchange(P.Request.SET_VRING_KICK, P.U64.pack(q), (kick,))
        exchange(P.Request.SET_VRING_CALL, P.U64.pack(q), (call,))
        exchange(P.Request.SET_VRING_ERR, P.U64.pack(q), (err,))
        exchange(P.Request.SET_VRING_ENABLE, P.VRING_STATE.pack(q, 1))
    finally:
        os.close(err)
    if problems:
        raise CheckFailed("; ".join(problems), replies=seen)
    return f"{len(seen)} replies, all well-formed"


# -- ring set-up and ring states -----------------------------------------------------------


@check("ring.setup", title="rings set up; an ordinary request completes",
       clause=f"{VHOST_USER}, Ring states: a started and enabled ring is processed normally "
              "(VIRTIO 1.2 §2.7.13, §2.7.14)", level=MUST)
def ring_setup(ctx: CheckContext) -> str | None:
    s = ctx.session()
    pairs = _run_probes(s)
    _judge(pairs)
    return f"features {s.features:#x}, used.len {pairs[0][1].used_len}"


# -- what the device writes -----------------------------------------------------------------


def _varied_probes(s: Session) -> list[tuple[Probe, Done]]:
    pairs = _run_probes(s, 2)
    pairs += _run_probes(s, 1, split=True)
    if s.has_feature(VIRTIO_F_INDIRECT_DESC):
        pairs += _run_probes(s, 1, indirect=True)
    return pairs


def _fail_on_hits(s: Session, what: str, damage: str) -> None:
    """Fail when the device wrote where it must not: ``what`` is the kind of guarded area
    (``guard bytes``, ``device-readable buffer``), ``damage`` says what happened to one of
    them in the message; the first eight go into the evidence."""
    hits = [h for h in s.drv.mem.guard_hits() if h.what == what]
    if hits:
        raise CheckFailed(f"{len(hits)} {damage}: {hits[0].describe()}",
                          hits=[h.describe() for h in hits[:8]])


@check("ring.guard-bytes", title="nothing is written outside the buffers given",
       clause="VIRTIO 1.2 §2.7.5: a descriptor gives the device the buffer [addr, addr + len) "
              "and nothing else (§2.7.5.1: A device MUST NOT write to a device-readable "
              "buffer); guard bytes around every buffer must survive", level=MUST)
def guard_bytes(ctx: CheckContext) -> str | None:
    s = ctx.session()
    pairs = _varied_probes(s)
    _fail_on_hits(s, "guard bytes", "guard area(s) overwritten")
    return f"{len(pairs)} requests, {len(s.drv.mem.guarded)} guard areas intact"


@check("ring.readable-untouched", title="device-readable buffers are not written",
       clause="VIRTIO 1.2 §2.7.5.1: A device MUST NOT write to a device-readable buffer.",
       level=MUST)
def readable_untouched(ctx: CheckContext) -> str | None:
    s = ctx.session()
    pairs = _varied_probes(s)
    if not s.drv.mem.readable:
        raise CheckSkipped(f"a {ctx.device} request has no device-readable part")
    _fail_on_hits(s, "device-readable buffer", "readable buffer(s) changed")
    return f"{len(pairs)} requests"


@check("ring.desc-untouched", title="the descriptor table is not written",
       clause="VIRTIO 1.2 §2.7.5.1: A device MUST NOT write to any descriptor table entry.",
       level=MUST)
def desc_untouched(ctx: CheckContext) -> str | None:
    s = ctx.session()
    ring = s.ring(ctx.profile.probe_queue)
    probes = [make_probe(s) for _ in range(3)] + [make_probe(s, split=True)]
    before = ring.desc_table()
    s.run([p.req for p in probes])
    after = ring.desc_table()
    if after != before:
        i = next(k for k in range(len(before)) if before[k] != after[k])
        raise CheckFailed(f"descriptor {i // 16} changed (byte {i % 16})",
                          before=before[i // 16 * 16 : i // 16 * 16 + 16],
                          after=after[i // 16 * 16 : i // 16 * 16 + 16])
    return None


@check("ring.used-ids", title="used ids are heads made available, each used once",
       clause="VIRTIO 1.2 §2.7.8: id indicates the head entry of the descriptor chain "
              "describing the buffer; each chain made available is used once", level=MUST)
def used_ids(ctx: CheckContext) -> str | None:
    s = ctx.session()
    q = ctx.profile.probe_queue
    ring = s.ring(q)
    probes = [make_probe(s) for _ in range(8)]
    heads = sorted(p.req.head for p in probes)
    s.submit([p.req for p in probes])
    if not s.drv.wait_used(q, len(probes), ctx.options.timeout):
        raise CheckFailed(f"{ring.pending()} of {len(probes)} requests completed"
                          f"{ctx.backend_state(s.drv)}", **s.ring_evidence(q))
    time.sleep(0.05)  # anything extra the back-end is about to publish
    extra = ring.pending() - len(probes)
    ids = sorted(i for i, _ in ring.reap())
    if extra > 0 or ids != heads:
        raise CheckFailed(f"made available heads {heads}, used ids {ids}"
                          + (f" ({extra} more used entries than requests)" if extra > 0 else ""),
                          heads=heads, ids=ids)
    return None


def _len_pairs(s: Session) -> list[tuple[Probe, Done]]:
    return _run_probes(s, 4) + _run_probes(s, 1, split=True)


@check("ring.used-len-capacity", title="used.len never exceeds the writable capacity",
       clause="VIRTIO 1.2 §2.7.8.2: The device MUST write at least len bytes to descriptor, "
              "beginning at the first device-writable buffer (so len cannot exceed them)",
       level=MUST)
def used_len_capacity(ctx: CheckContext) -> str | None:
    s = ctx.session()
    for _, done in _len_pairs(s):
        if done.used_len > done.req.capacity:
            raise CheckFailed(f"used.len {done.used_len} for a chain with "
                              f"{done.req.capacity} device-writable bytes",
                              head=done.req.head, used_len=done.used_len,
                              capacity=done.req.capacity)
    return None


@check("ring.used-len-written", title="the first used.len bytes were really written",
       clause="VIRTIO 1.2 §2.7.8.2: The device MUST write at least len bytes to descriptor, "
              "beginning at the first device-writable buffer, prior to updating the used idx.",
       level=MUST)
def used_len_written(ctx: CheckContext) -> str | None:
    s = ctx.session()
    checked = 0
    for _, done in _len_pairs(s):
        n = min(done.used_len, done.req.capacity)
        written = done.written(n)
        poison = b"".join(b.poison for b in done.req.writable)[:n]
        # The writable buffers were filled with random bytes; an 8-byte word that still
        # holds them was not written (a chance of 2**-64 per word).
        for at in range(0, n - 7, 8):
            if written[at : at + 8] == poison[at : at + 8]:
                raise CheckFailed(
                    f"used.len is {done.used_len}, but bytes {at}..{at + 7} of the writable "
                    "part still hold what the driver put there",
                    head=done.req.head, used_len=done.used_len, offset=at,
                    unchanged=written[at : at + 8])
        checked += n
    if not checked:
        raise CheckSkipped(f"{ctx.device} probe requests have no device-writable bytes")
    return f"{checked} bytes checked"


@check("ring.used-flags", title="used.flags holds only the defined bits",
       clause="VIRTIO 1.2 §2.7.10.2: without VIRTIO_F_EVENT_IDX the device MUST set flags to "
              "0 or 1; with it, the device MUST set flags to 0.", level=MUST)
def used_flags(ctx: CheckContext) -> str | None:
    seen = []
    for event_idx in (False, True):
        with ctx.opened(event_idx=event_idx) as s:
            _run_probes(s, 2)
            flags = s.ring(ctx.profile.probe_queue).used_flags
            allowed = (0,) if s.drv.event_idx else (0, 1)
            seen.append(f"event_idx={s.drv.event_idx}: {flags:#x}")
            if flags not in allowed:
                raise CheckFailed(f"used.flags is {flags:#x} with EVENT_IDX "
                                  f"{'negotiated' if s.drv.event_idx else 'not negotiated'}",
                                  flags=flags)
    return ", ".join(seen)


# -- notifications ------------------------------------------------------------------------


def _settle_calls(s: Session, q: int) -> None:
    time.sleep(0.02)
    s.drv.take_calls(q)  # whatever the back-end signalled while starting


def _one(s: Session) -> Done:
    probe = make_probe(s)
    (done,) = s.run([probe.req])
    return done


@check("notify.flags-zero", title="without EVENT_IDX, a notification for each used buffer",
       clause="VIRTIO 1.2 §2.7.7.2: (EVENT_IDX not negotiated) If flags is 0, the device "
              "MUST send a notification.", level=MUST)
def notify_flags_zero(ctx: CheckContext) -> str | None:
    s = ctx.session(event_idx=False)
    q = ctx.profile.probe_queue
    _settle_calls(s, q)
    for k in range(3):
        s.drv.take_calls(q)
        _one(s)
        if not s.drv.wait_call(q, min(1.0, ctx.options.timeout)):
            raise CheckFailed(f"request {k} completed (used.idx {s.ring(q).used_idx}) with "
                              "avail.flags 0 and no notification on the call eventfd",
                              **s.ring_evidence(q))
    return None


@check("notify.no-interrupt", title="VIRTQ_AVAIL_F_NO_INTERRUPT suppresses notifications",
       clause="VIRTIO 1.2 §2.7.7.2: (EVENT_IDX not negotiated) If flags is 1, the device "
              "SHOULD NOT send a notification.", level=SHOULD)
def notify_no_interrupt(ctx: CheckContext) -> str | None:
    s = ctx.session(event_idx=False)
    q = ctx.profile.probe_queue
    s.ring(q).avail_flags = VIRTQ_AVAIL_F_NO_INTERRUPT
    _settle_calls(s, q)
    for _ in range(3):
        _one(s)
    time.sleep(0.05)
    calls = s.drv.take_calls(q)
    if calls:
        raise CheckFailed(f"{calls} notification(s) for 3 used buffers while avail.flags "
                          "was VIRTQ_AVAIL_F_NO_INTERRUPT", notifications=calls)
    return None


def _used_event_run(ctx: CheckContext) -> tuple[list[int], Session]:
    s = ctx.session(event_idx=True)
    if not s.drv.event_idx:
        raise CheckSkipped("VIRTIO_F_EVENT_IDX is not offered")
    q = ctx.profile.probe_queue
    ring = s.ring(q)
    _settle_calls(s, q)
    target = (ring.last_used + 2) & 0xFFFF
    ring.used_event = target  # notify when the element at used index `target` is written
    counts = []
    for k in range(4):
        _one(s)
        # The notification the rule requires is waited for (however loaded the machine);
        # for the others a short grace: a late one is counted against the next request,
        # never invented.
        s.drv.wait_call(q, min(1.0, ctx.options.timeout) if k == 2 else 0.05)
        time.sleep(0.01)
        counts.append(s.drv.take_calls(q))
    return counts, s


@check("notify.used-event", title="EVENT_IDX: a notification when used_event is reached",
       clause="VIRTIO 1.2 §2.7.7.2: (EVENT_IDX negotiated) If the idx field in the used ring "
              "... was equal to used_event, the device MUST send a notification.", level=MUST)
def notify_used_event(ctx: CheckContext) -> str | None:
    counts, _ = _used_event_run(ctx)
    if not counts[2]:
        raise CheckFailed("no notification for the used buffer placed at used_event "
                          f"(notifications per completion: {counts})", counts=counts)
    return f"notifications per completion: {counts}"


@check("notify.used-event-suppress", title="EVENT_IDX: no notification before used_event",
       clause="VIRTIO 1.2 §2.7.7.2: (EVENT_IDX negotiated) Otherwise the device SHOULD NOT "
              "send a notification.", level=SHOULD)
def notify_used_event_suppress(ctx: CheckContext) -> str | None:
    counts, _ = _used_event_run(ctx)
    extra = counts[0] + counts[1] + counts[3]
    if extra:
        raise CheckFailed(f"{extra} notification(s) for used buffers not at used_event "
                          f"(notifications per completion: {counts}; used_event was the "
                          "third)", counts=counts)
    return f"notifications per completion: {counts}"


# -- indices -------------------------------------------------------------------------------


@check("ring.get-vring-base", title="GET_VRING_BASE returns the next avail index",
       clause=f"{VHOST_USER}, GET_VRING_BASE: stops the vring and returns the current "
              "descriptor index (the next available index the back-end would process)",
       level=MUST)
def get_vring_base(ctx: CheckContext) -> str | None:
    s = ctx.session(start=1000)
    q = ctx.profile.probe_queue
    for _ in range(3):
        _one(s)
    expected = s.ring(q).next_avail
    got = s.drv.frontend.get_vring_base(q)
    if got != expected:
        raise CheckFailed(f"GET_VRING_BASE({q}) = {got}; the driver's avail.idx is {expected} "
                          "and every request completed (SET_VRING_BASE was 1000)",
                          got=got, expected=expected)
    return f"{got}"


@check("ring.index-wrap", title="indices wrap from 0xffff to 0",
       clause="VIRTIO 1.2 §2.7.13.3: idx always increments, and wraps naturally at 65536 "
              "(rings started at 0xfffb with SET_VRING_BASE)", level=MUST)
def index_wrap(ctx: CheckContext) -> str | None:
    s = ctx.session(start=0xFFFB)
    q = ctx.profile.probe_queue
    for k in range(10):
        probe = make_probe(s)
        try:
            (done,) = s.run([probe.req])
        except CheckFailed as exc:
            raise CheckFailed(f"request {k} (avail index {(0xFFFB + k) & 0xFFFF:#06x}): "
                              f"{exc.message}", **exc.evidence) from None
        problem = probe.judge(done)
        if problem:
            raise CheckFailed(f"request {k} (avail index {(0xFFFB + k) & 0xFFFF:#06x}): "
                              f"{problem}")
    ring = s.ring(q)
    if ring.used_idx != ring.next_avail:
        raise CheckFailed(f"used.idx {ring.used_idx:#06x}, expected {ring.next_avail:#06x}")
    return f"used.idx {ring.used_idx:#06x}"


# -- descriptor arrangements -------------------------------------------------------------


@check("ring.message-framing", title="any arrangement of descriptors is accepted",
       clause="VIRTIO 1.2 §2.7.4.1: The device MUST NOT make assumptions about the particular "
              "arrangement of descriptors (every buffer split in two here).", level=MUST)
def message_framing(ctx: CheckContext) -> str | None:
    s = ctx.session()
    _judge(_run_probes(s, 2, split=True))
    return None


@check("ring.indirect", title="indirect descriptor tables are served",
       clause="VIRTIO 1.2 §2.7.5.3 (VIRTIO_F_INDIRECT_DESC negotiated): a descriptor with "
              "VIRTQ_DESC_F_INDIRECT refers to a table of descriptors holding the chain",
       level=MUST)
def indirect(ctx: CheckContext) -> str | None:
    s = ctx.session()
    _offers(ctx, s, VIRTIO_F_INDIRECT_DESC, "VIRTIO_F_INDIRECT_DESC")
    _judge(_run_probes(s, 2, indirect=True))
    return None


@check("ring.indirect-after-direct", title="direct descriptors chained to an indirect one",
       clause="VIRTIO 1.2 §2.7.5.3.2: The device MUST handle the case of zero or more normal "
              "chained descriptors followed by a single descriptor with "
              "flags&VIRTQ_DESC_F_INDIRECT.", level=MUST)
def indirect_after_direct(ctx: CheckContext) -> str | None:
    s = ctx.session()
    _offers(ctx, s, VIRTIO_F_INDIRECT_DESC, "VIRTIO_F_INDIRECT_DESC")
    _judge(_run_probes(s, 1, indirect=True, direct_prefix=1))
    return None


# -- connections --------------------------------------------------------------------------


@check("vu.reconnect", title="a new front-end is accepted after a disconnect",
       clause=f"{VHOST_USER}: a back-end that keeps serving can take a new front-end after "
              "the previous one disconnected (some back-ends exit by design)", level=INFO,
       fresh=True)
def reconnect(ctx: CheckContext) -> str | None:
    with ctx.opened() as s:
        _judge(_run_probes(s))
    if isinstance(ctx.backend, CommandBackend):
        end = ctx.backend.wait_exit(0.5)
        if end is not None:
            raise CheckFailed(f"the back-end {end.describe()} when its front-end disconnected")
    try:
        drv = HostileDriver.connect(ctx.backend.socket_path, timeout=ctx.options.timeout,
                                    connect_timeout=1.0)
    except OSError as exc:
        raise CheckFailed(f"the second connection was refused: {exc}") from None
    ctx.adopt(drv)
    drv.close()
    s = ctx.session()
    _judge(_run_probes(s))
    return None
