"""The driver handle a check works with: :class:`Session` (one connection, set up for the
device type, with guarded buffers) and :class:`CheckContext` (the back-end handle, the
options, and the sessions to clean up)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtq.abi import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from virtq.check.backend import Backend, CommandBackend
from virtq.check.model import CheckFailed
from virtq.testing.hostile_driver import Buf, HostileDriver, RawRing
from virtq.transport.vhost_user import protocol as P

if TYPE_CHECKING:
    from virtq.check.devices import Profile

__all__ = ["CheckContext", "CheckOptions", "Done", "Req", "Session"]


@dataclass
class CheckOptions:
    """What a run may do and knows beyond the socket."""

    #: The image a blk back-end serves (capacity and content are compared with it).
    image: Path | None = None
    #: Checks that write to the device restore what they overwrote; False skips them.
    allow_writes: bool = True
    #: Seconds to wait for a completion or a reply before calling it missing.
    timeout: float = 2.0
    queue_size: int = 128
    #: fs: a name that exists in the shared directory (LOOKUP must find it).
    fs_lookup: str | None = None
    seed: int = 0


@dataclass
class Req:
    """One chain made available: its buffers and where it went."""

    queue: int
    head: int
    readable: list[Buf]
    writable: list[Buf]

    @property
    def capacity(self) -> int:
        return sum(b.length for b in self.writable)


@dataclass
class Done:
    """A completion: the request and the ``used.len`` the back-end reported."""

    req: Req
    used_len: int
    session: Session = field(repr=False)

    def written(self, n: int | None = None) -> bytes:
        """The first ``n`` bytes (default: all) of the chain's writable part."""
        out = b"".join(self.session.drv.mem.contents(b) for b in self.req.writable)
        return out if n is None else out[:n]


class Session:
    """One connection to the back-end, handshaken and with its rings set up.

    ``run()`` publishes, kicks and waits for completions by polling ``used.idx`` (so it
    works whatever notifications the back-end sends), and fails the check -- with the
    state of the rings as evidence -- when they do not come."""

    def __init__(self, ctx: CheckContext, drv: HostileDriver) -> None:
        self.ctx = ctx
        self.drv = drv
        self.profile = ctx.profile
        self.config: bytes | None = None
        self.state: dict[str, Any] = {}  # per-device state (FUSE unique counter, ...)

    @property
    def features(self) -> int:
        return self.drv.neg.features

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def ring(self, queue: int) -> RawRing:
        return self.drv.ring(queue)

    def request(self, queue: int, readable: Sequence[bytes], writable: Sequence[int], *,
                indirect: bool = False, direct_prefix: int = 0) -> Req:
        """Guarded buffers holding ``readable`` and of the ``writable`` sizes, as one chain
        on ``queue`` (not published yet)."""
        mem = self.drv.mem
        rbufs = [mem.buffer(len(d), data=d) for d in readable]
        wbufs = [mem.buffer(n, writable=True) for n in writable]
        head = self.ring(queue).add(rbufs, wbufs, indirect=indirect,
                                    direct_prefix=direct_prefix)
        return Req(queue, head, rbufs, wbufs)

    def submit(self, reqs: Sequence[Req]) -> None:
        for q in sorted({r.queue for r in reqs}):
            self.ring(q).publish()
            self.drv.kick(q)

    def wait(self, reqs: Sequence[Req], *, timeout: float | None = None,
             strict: bool = True) -> list[Done]:
        """Wait for every request in ``reqs`` to complete (they may complete in any order,
        §2.7.14).  ``strict``: a used id that is not one of them fails the check."""
        timeout = self.ctx.options.timeout if timeout is None else timeout
        by_queue: dict[int, dict[int, Req]] = {}
        for r in reqs:
            by_queue.setdefault(r.queue, {})[r.head] = r
        done: list[Done] = []
        for q, heads in by_queue.items():
            ring = self.ring(q)
            if not self.drv.wait_used(q, len(heads), timeout):
                got = ring.reap()
                raise CheckFailed(
                    f"queue {q}: {len(got)} of {len(heads)} requests completed within "
                    f"{timeout} s{self.ctx.backend_state(self.drv)}",
                    used=got, **self.ring_evidence(q))
            for head, length in ring.reap():
                req = heads.pop(head, None)
                if req is None:
                    if strict:
                        raise CheckFailed(
                            f"queue {q}: used.ring names id {head}, which is not a head "
                            "in flight (§2.7.8: id is the head of a chain made available)",
                            id=head, len=length, **self.ring_evidence(q))
                    continue
                done.append(Done(req, length, self))
        return done

    def run(self, reqs: Sequence[Req], **kw: Any) -> list[Done]:
        self.submit(reqs)
        return self.wait(reqs, **kw)

    def ring_evidence(self, q: int) -> dict[str, Any]:
        ring = self.ring(q)
        return {"avail.idx": ring.avail_idx, "used.idx": ring.used_idx,
                "used.flags": ring.used_flags, "last_used": ring.last_used}

    def close(self) -> None:
        self.drv.close()


@dataclass
class CheckContext:
    """Everything a check function gets."""

    device: str
    profile: Profile
    backend: Backend
    options: CheckOptions
    #: The back-end exits when its front-end disconnects (virtiofsd): it is restarted
    #: before every session.
    exits_on_disconnect: bool = False
    sessions: list[Session] = field(default_factory=list)
    drivers: list[HostileDriver] = field(default_factory=list)
    offered: int | None = None

    def connect(self) -> HostileDriver:
        """A bare connection (no message sent)."""
        if self.exits_on_disconnect and isinstance(self.backend, CommandBackend):
            self.backend.wait_exit(2.0)
        self.backend.ensure_running()
        return HostileDriver.connect(self.backend.socket_path, timeout=self.options.timeout,
                                     seed=self.options.seed + len(self.sessions))

    def adopt(self, drv: HostileDriver) -> HostileDriver:
        """Close ``drv`` with the context."""
        self.drivers.append(drv)
        return drv

    def session(self, *, event_idx: bool = True, indirect: bool = True, features: int = 0,
                device_features: int | None = None, protocol_features: int | None = None,
                queue_size: int | None = None, start: int = 0, enable: bool = True,
                prepare: bool = True) -> Session:
        """Connect, negotiate (VERSION_1, the profile's device features, ``features``,
        EVENT_IDX / INDIRECT_DESC as asked, when offered), set up the profile's rings
        starting at ``start`` and DRIVER_OK; then the profile's own preparation
        (FUSE_INIT for fs)."""
        drv = self.connect()
        s = Session(self, drv)
        self.sessions.append(s)
        device = self.profile.features if device_features is None else device_features
        wanted = (1 << VIRTIO_F_VERSION_1 | device | features
                  | (1 << VIRTIO_F_EVENT_IDX if event_idx else 0)
                  | (1 << VIRTIO_F_INDIRECT_DESC if indirect else 0))
        drv.handshake(features=wanted, protocol_features=protocol_features)
        if self.offered is None:
            self.offered = drv.neg.offered
        if drv.has(P.ProtocolFeature.CONFIG) and self.profile.config_size:
            s.config = drv.frontend.get_config(0, self.profile.config_size)
        size = queue_size or self.options.queue_size
        for q in self.profile.queues:
            drv.add_ring(q, size, start=start)
        for q in self.profile.queues:
            drv.setup_ring(q, enable=enable)
        drv.driver_ok()
        if prepare:
            self.profile.prepare(s)
        return s

    @contextlib.contextmanager
    def opened(self, **kw: Any) -> Iterator[Session]:
        """:meth:`session` that is closed at the end of the ``with``."""
        s = self.session(**kw)
        try:
            yield s
        finally:
            s.close()

    def backend_state(self, drv: HostileDriver | None = None) -> str:
        """A phrase for failure messages: did the back-end hang up, or die?"""
        parts = []
        if drv is not None and not drv.connection_open():
            parts.append("the back-end closed the connection")
        end = self.backend.poll()
        if end is not None:
            parts.append(f"the back-end {end.describe()}")
        return f" ({'; '.join(parts)})" if parts else ""

    def close(self) -> None:
        for s in self.sessions:
            s.close()
        self.sessions.clear()
        for drv in self.drivers:
            drv.close()
        self.drivers.clear()
