"""vhost-user as a :class:`~virtq.transport.Transport`.

Two address spaces are kept apart (vhost-user.rst, "Memory regions"):

* ring addresses in SET_VRING_ADDR are the *front-end's virtual addresses*
  (``userspace_addr`` in the memory table) -- ``region.host_addr + offset`` here;
* addresses inside descriptors are *guest physical* (``guest_phys_addr``) -- the arena's
  ``iova``, reserved by an :class:`~virtq.iova.IovaAllocator` (identity: GPA == host
  address; bump: any window you like).
"""

from __future__ import annotations

import contextlib
import os
import select
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Self

from virtq.abi import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
)
from virtq.errors import ArgumentError, QueueStateError, RegionBusyError
from virtq.iova import IdentityAllocator, IovaAllocator
from virtq.memory import MemfdRegion
from virtq.queue import QueueState, VirtQueue
from virtq.transport.base import QUEUE_FEATURES, DmaArena, arena_of, usable_features
from virtq.transport.errors import DeviceRefusedError
from virtq.transport.notify import NotificationSet
from virtq.transport.vhost_user import protocol as P
from virtq.transport.vhost_user.errors import (
    VhostUserDisconnectedError,
    VhostUserProtocolError,
    VhostUserRegionLimitError,
)
from virtq.transport.vhost_user.frontend import (
    DEFAULT_TIMEOUT,
    VhostUserFrontend,
    check_path,
    check_timeout,
)

#: Ring/transport feature bits (24..49) accepted over vhost-user: what the queue implements.
SUPPORTED_TRANSPORT_FEATURES = QUEUE_FEATURES
#: Protocol features virtq implements.
SUPPORTED_PROTOCOL_FEATURES = (
    1 << P.ProtocolFeature.MQ
    | 1 << P.ProtocolFeature.REPLY_ACK
    | 1 << P.ProtocolFeature.CONFIG
    | 1 << P.ProtocolFeature.STATUS
    | 1 << P.ProtocolFeature.CONFIGURE_MEM_SLOTS
)
#: Asked for only when the transport is to keep an inflight region (``inflight=True``).
INFLIGHT_PROTOCOL_FEATURE = 1 << P.ProtocolFeature.INFLIGHT_SHMFD
_EFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK


@dataclass(frozen=True)
class InflightRegion:
    """The buffer a back-end tracks its in-flight requests in (GET_INFLIGHT_FD's answer),
    owned by the front-end so that it outlives the back-end (vhost-user.rst, "Inflight
    I/O tracking").  ``fd`` is closed by the transport."""

    fd: int
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(eq=False)
class _Ring:
    queue: VirtQueue[Any]
    arena: DmaArena
    kick: int
    call: int
    enabled: bool = False
    #: False once the front-end switched the ring off (enable_queue): start() and a
    #: reconnect leave it disabled.
    wanted: bool = True


def _finalize(fds: list[int], notifier: NotificationSet, what: str) -> None:
    warnings.warn(f"{what} was not closed", ResourceWarning, stacklevel=2)
    notifier.shutdown()
    for fd in fds:
        os.close(fd)


class VhostUserTransport:
    """Drive a vhost-user back-end (qemu-storage-daemon, DPDK, ...) from this process."""

    def __init__(
        self,
        frontend: VhostUserFrontend,
        *,
        iova_allocator: IovaAllocator | None = None,
        hugepages: bool = False,
        inflight: bool = False,
    ) -> None:
        if iova_allocator is not None and not (callable(getattr(iova_allocator, "alloc", None))
                                               and callable(getattr(iova_allocator, "free", None))):
            # Checked here, not at the first alloc_dma(): the device constructor would fail
            # half-way with an AttributeError.
            raise ArgumentError("iova_allocator", iova_allocator,
                                "must be None or an IovaAllocator (alloc() and free())")
        self.frontend = frontend
        self.path = frontend.path
        self.timeout = frontend.timeout
        self.iova_allocator = IdentityAllocator() if iova_allocator is None else iova_allocator
        self.hugepages = hugepages
        #: Whether to keep an inflight region when the back-end offers INFLIGHT_SHMFD.
        self.inflight = bool(inflight)
        #: The inflight region in use (None: the back-end does not track, or not asked).
        self.inflight_region: InflightRegion | None = None
        # Per ring, the tokens a reconnect that failed half-way had already taken out of
        # it (reset): the next successful reconnect returns them.
        self._unreported: dict[int, list[Any]] = {}
        self._arenas: list[DmaArena] = []
        self._rings: dict[int, _Ring] = {}
        self._fds: list[int] = []  # eventfds, for the finalizer
        self._mem_table_sent = False
        self._started = False
        self._closed = False
        #: Why the back-end cannot be reached (a failed reconnect), None while connected.
        self._disconnected: BaseException | None = None
        self.accepted_features = 0
        self._notifier = NotificationSet(f"vhost-user transport to {self.path}")
        self._finalizer = weakref.finalize(self, _finalize, self._fds, self._notifier,
                                           f"vhost-user {self.path}")
        try:
            self._handshake()
        except BaseException:
            self._finalizer.detach()  # nothing is owned yet; connect() closes the socket
            self._notifier.shutdown()
            raise
        self._watch_socket()

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        iova_allocator: IovaAllocator | None = None,
        hugepages: bool = False,
        inflight: bool = False,
    ) -> Self:
        """Connect to the back-end listening on the Unix socket ``path`` and do the handshake
        (SET_OWNER, features, protocol features, queue count).  ``timeout`` bounds every reply;
        ``iova_allocator`` places memory in the back-end's guest address space (default:
        identity, the owner's own addresses); ``hugepages`` backs the memfds with hugepages;
        ``inflight``: when the back-end offers VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, get an
        inflight region before the rings are set up and keep it, so that
        ``reconnect(resume=True)`` lets a restarted back-end resume the rings.
        Raises :class:`~virtq.transport.vhost_user.VhostUserConnectError` when nobody listens,
        another :class:`~virtq.transport.vhost_user.VhostUserError` when the handshake fails (the
        socket is closed then), :class:`~virtq.errors.ArgumentError` for a bad path or timeout."""
        frontend = VhostUserFrontend.connect(path, timeout=timeout)
        try:
            return cls(frontend, iova_allocator=iova_allocator, hugepages=hugepages,
                       inflight=inflight)
        except BaseException:
            frontend.close()
            raise

    # -- session set-up ---------------------------------------------------------------------

    def _handshake(self) -> None:
        fe = self.frontend
        fe.set_owner()
        self.offered_features = fe.get_features()
        self.protocol_features = 0
        if self.offered_features >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            offered = fe.get_protocol_features()
            supported = SUPPORTED_PROTOCOL_FEATURES
            if self.inflight:
                supported |= INFLIGHT_PROTOCOL_FEATURE
            self.protocol_features = offered & supported
            fe.set_protocol_features(self.protocol_features)
        self._queue_num = fe.get_queue_num() if self._has(P.ProtocolFeature.MQ) else 1
        self._set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)

    def _has(self, feature: P.ProtocolFeature) -> bool:
        return bool(self.protocol_features >> feature & 1)

    def _set_status(self, status: int) -> None:
        if self._has(P.ProtocolFeature.STATUS):
            self.frontend.set_status(status)

    def _watch_socket(self) -> None:
        # A back-end that dies closes the socket: a sleeping waiter must wake and say so.
        self._notifier.watch(self.frontend.sock.fileno(), self.check_alive)

    @property
    def device_type(self) -> int | None:
        """None: vhost-user has no message that names the device type."""
        return None

    @property
    def polling(self) -> bool:
        """False: the back-end signals used buffers on the call eventfds."""
        return False

    @property
    def device_features(self) -> int:
        """What the device offers, minus transport bits virtq does not implement."""
        offered = self.offered_features & ~(1 << P.VHOST_USER_F_PROTOCOL_FEATURES)
        return usable_features(offered)

    def negotiate(self, wanted: int) -> int:
        """Accept ``device_features & wanted`` plus VIRTIO_F_VERSION_1 (SET_FEATURES; FEATURES_OK
        with the STATUS protocol feature) and return them.  Raises
        :class:`~virtq.transport.errors.DeviceRefusedError` when the back-end does not offer
        VIRTIO_F_VERSION_1, and the front-end's
        :class:`~virtq.transport.vhost_user.VhostUserError`."""
        if not self.device_features >> VIRTIO_F_VERSION_1 & 1:
            raise DeviceRefusedError(
                f"back-end at {self.path} does not offer VIRTIO_F_VERSION_1 "
                f"(features {self.offered_features:#x}); virtq drives modern devices only")
        accepted = self.device_features & (wanted | 1 << VIRTIO_F_VERSION_1)
        extra = self.offered_features & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES)
        self.frontend.set_features(accepted | extra)
        self.accepted_features = accepted
        self._set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                         | VIRTIO_CONFIG_S_FEATURES_OK)
        return accepted

    def num_queues(self) -> int:
        """How many queues the back-end has (GET_QUEUE_NUM with the MQ protocol feature, else 1)."""
        return self._queue_num

    def max_queue_size(self, index: int) -> int:
        # vhost-user has no per-queue maximum; the virtio spec's split ring limit applies.
        """32768 for a queue the back-end has (vhost-user has no per-queue maximum), 0 otherwise."""
        return 32768 if 0 <= index < self._queue_num else 0

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the device's config space at ``offset`` (GET_CONFIG).  Raises
        :class:`~virtq.transport.errors.DeviceRefusedError` when the back-end does not offer the
        CONFIG protocol feature, and what :meth:`VhostUserFrontend.get_config
        <virtq.transport.vhost_user.VhostUserFrontend.get_config>` raises."""
        if not self._has(P.ProtocolFeature.CONFIG):
            raise DeviceRefusedError(f"back-end at {self.path} does not offer GET_CONFIG")
        return self.frontend.get_config(offset, size)

    # -- memory ---------------------------------------------------------------------------------
    #
    # Without CONFIGURE_MEM_SLOTS the back-end learns about memory from SET_MEM_TABLE, which
    # replaces its whole table and holds at most 8 regions (VHOST_MEMORY_BASELINE_NREGIONS):
    # every allocation after the first table resends all of them.  With it (vhost-user.rst,
    # GET_MAX_MEM_SLOTS / ADD_MEM_REG) each allocation sends one ADD_MEM_REG, up to the
    # back-end's slot count.  A region is counted as sent per connection (in
    # ``arena.private``), so a reconnect sends every region again and a failure half-way
    # through the regions never sends one twice.

    #: (the connection it was asked on, GET_MAX_MEM_SLOTS capped at MAX_RAM_SLOTS)
    _mem_slots: tuple[VhostUserFrontend, int] | None = None

    def _uses_mem_slots(self) -> bool:
        return self._has(P.ProtocolFeature.CONFIGURE_MEM_SLOTS)

    def _region_limit(self) -> int:
        """How many memory regions the back-end holds (asked once per connection)."""
        if not self._uses_mem_slots():
            return P.MAX_MEM_REGIONS
        cached = self._mem_slots
        if cached is None or cached[0] is not self.frontend:
            cached = (self.frontend, min(self.frontend.get_max_mem_slots(), P.MAX_RAM_SLOTS))
            self._mem_slots = cached
        return cached[1]

    def _check_region_limit(self, regions: int) -> None:
        limit = self._region_limit()
        if regions > limit:
            how = ("GET_MAX_MEM_SLOTS" if self._uses_mem_slots()
                   else "SET_MEM_TABLE without CONFIGURE_MEM_SLOTS")
            raise VhostUserRegionLimitError(
                f"the back-end at {self.path} holds at most {limit} memory regions ({how}); "
                f"{regions} would be needed: allocate fewer, larger DMA arenas",
                limit=limit, regions=regions)

    @staticmethod
    def _describe(arena: DmaArena) -> tuple[int, int, int, int, int]:
        fd = arena.region.fd
        assert fd is not None  # memfd regions always have one
        return (arena.iova, arena.region.nbytes, arena.region.host_addr,
                arena.region.fd_offset, fd)

    def _add_mem_reg(self, arena: DmaArena) -> None:
        self.frontend.add_mem_reg(self._describe(arena))
        arena.private["vhost_user_sent_on"] = self.frontend

    def alloc_dma(self, nbytes: int) -> DmaArena:
        """A shareable memfd region of ``nbytes`` (rounded up to the page) that the
        back-end can reach, at a guest address from the IOVA allocator.

        Once memory has been sent to the back-end, the new region is sent at once: one
        ADD_MEM_REG with CONFIGURE_MEM_SLOTS, a whole new SET_MEM_TABLE without.  A failed
        allocation leaves no trace (region closed, guest address freed, not in the table).

        Raises :class:`VhostUserRegionLimitError` (before allocating anything) when the
        back-end cannot hold another region, :class:`~virtq.errors.ArgumentError` for a bad
        ``nbytes``, :class:`~virtq.errors.VirtqOSError` when the memory cannot be mapped,
        :class:`~virtq.errors.QueueStateError` after :meth:`close`, and the back-end's
        :class:`VhostUserError` if it refuses the region.
        """
        if self._closed:
            raise QueueStateError(f"vhost-user transport to {self.path} is closed")
        self._check_region_limit(len(self._arenas) + 1)
        region = MemfdRegion(nbytes, name="virtq-vhost-user", hugepages=self.hugepages)
        arena: DmaArena | None = None
        try:
            gpa = self.iova_allocator.alloc(region.nbytes, host_addr=region.host_addr)
            arena = DmaArena(region, gpa, owner=self)
            if self._mem_table_sent:
                if self._uses_mem_slots():
                    self._add_mem_reg(arena)
                else:  # back-ends remap on a new table (rings included)
                    self.frontend.set_mem_table(
                        [self._describe(a) for a in (*self._arenas, arena)])
        except BaseException:
            if arena is not None:
                self.iova_allocator.free(arena.iova)
            region.close()
            raise
        self._arenas.append(arena)
        return arena

    def _send_mem_table(self) -> None:
        """Tell a (new) connection about every region: ADD_MEM_REG for each one not yet
        sent on it with CONFIGURE_MEM_SLOTS, else one SET_MEM_TABLE."""
        self._check_region_limit(len(self._arenas))
        if self._uses_mem_slots():
            for arena in self._arenas:
                if arena.private.get("vhost_user_sent_on") is not self.frontend:
                    self._add_mem_reg(arena)
        else:
            self.frontend.set_mem_table([self._describe(a) for a in self._arenas])
        self._mem_table_sent = True

    # -- rings ----------------------------------------------------------------------------------

    def attach_queue(self, index: int, queue: VirtQueue[Any]) -> None:
        """Hand queue ``index`` to the back-end: SET_VRING_NUM/BASE/ADDR/KICK/CALL (and
        SET_VRING_ENABLE once started).  Raises :class:`~virtq.errors.QueueStateError` when
        closed, :class:`~virtq.transport.vhost_user.VhostUserDisconnectedError` when
        disconnected, :class:`~virtq.errors.ArgumentError` for a queue the back-end does not
        have, one attached already or memory not from :meth:`alloc_dma`, and the back-end's
        refusals."""
        self._check_usable()
        if not isinstance(index, int) or not 0 <= index < self._queue_num:
            raise ArgumentError("index", index, f"the back-end has {self._queue_num} queue(s)")
        if index in self._rings:
            raise ArgumentError("index", index, "queue already attached")
        arena = arena_of(self._arenas, queue)
        kick = os.eventfd(0, _EFD_FLAGS)
        self._fds.append(kick)
        call = os.eventfd(0, _EFD_FLAGS)
        self._fds.append(call)
        ring = _Ring(queue, arena, kick, call)
        self._rings[index] = ring
        self._notifier.add(index, call)
        self._setup_ring(index, ring)

    def _tracks_inflight(self) -> bool:
        return self.inflight and self._has(P.ProtocolFeature.INFLIGHT_SHMFD)

    def _get_inflight(self, queue: VirtQueue[Any]) -> None:
        """GET_INFLIGHT_FD then SET_INFLIGHT_FD, after SET_FEATURES and before the memory
        table and the first ring -- the order of QEMU's vhost-user-blk front-end
        (``vhost_dev_get_inflight``/``vhost_dev_set_inflight`` before
        ``vhost_dev_start``).  Sized for every queue the back-end has (GET_QUEUE_NUM), each
        of ``queue``'s size: the region is indexed by descriptor head, so every ring must
        have that size.  Only for rings that can be resumed in place."""
        if queue.resume_index() is None:
            return
        num_queues, size = self._queue_num, queue.size
        fd, mmap_size, offset = self.frontend.get_inflight_fd(num_queues, size)
        self._fds.append(fd)
        self.inflight_region = InflightRegion(fd, mmap_size, offset, num_queues, size)
        self._set_inflight()

    def _set_inflight(self) -> None:
        r = self.inflight_region
        assert r is not None
        self.frontend.set_inflight_fd(r.fd, r.mmap_size, r.mmap_offset, r.num_queues,
                                      r.queue_size)

    def _drop_inflight(self) -> None:
        r = self.inflight_region
        if r is not None:
            self.inflight_region = None
            self._fds.remove(r.fd)
            os.close(r.fd)

    def _setup_ring(self, index: int, ring: _Ring, base: int | None = None) -> None:
        """SET_VRING_NUM/BASE/ADDR/KICK/CALL (and ENABLE once started) for ``ring``, at
        ``base`` (default: the queue's ``vring_base``)."""
        if self._tracks_inflight() and self.inflight_region is None:
            self._get_inflight(ring.queue)
        r = self.inflight_region
        if r is not None and ring.queue.size != r.queue_size:
            raise ArgumentError("queue.size", ring.queue.size,
                                f"must be {r.queue_size}, the size of every ring in the "
                                "inflight region")
        if not self._mem_table_sent:
            self._send_mem_table()
        fe, q = self.frontend, ring.queue
        # Ring addresses in SET_VRING_ADDR are front-end virtual addresses
        # (vhost-user.rst, "Memory regions"): the region's host address plus the offset.
        uva = q.region.host_addr - q.iova
        fe.set_vring_num(index, q.size)
        # The back-end starts consuming avail at this index and reads used.idx from memory;
        # the queue initialised both to it (start_index / reset()) -- or, for a ring
        # resumed in place, it is used.idx and the back-end adds its inflight chains.
        fe.set_vring_base(index, q.vring_base if base is None else base)
        fe.set_vring_addr(index, desc=uva + q.desc_area, used=uva + q.device_area,
                          avail=uva + q.driver_area)
        fe.set_vring_kick(index, ring.kick)
        fe.set_vring_call(index, ring.call)
        if self._started and ring.wanted:
            self._enable(index, ring)

    def _enable(self, index: int, ring: _Ring) -> None:
        # With PROTOCOL_FEATURES negotiated rings start disabled (vhost-user.rst "Ring states").
        if self.offered_features >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            self.frontend.set_vring_enable(index, True)
        ring.enabled = True

    def start(self) -> None:
        """Enable every attached ring (SET_VRING_ENABLE) and set DRIVER_OK (with the STATUS
        protocol feature).  Raises the front-end's
        :class:`~virtq.transport.vhost_user.VhostUserError`."""
        for index, ring in self._rings.items():
            if ring.wanted:
                self._enable(index, ring)
        self._started = True
        self._set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                         | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)

    def enable_queue(self, index: int, enable: bool) -> None:
        """Switch attached ring ``index`` on or off with SET_VRING_ENABLE: the front-end's
        way to choose which of a multiple queue device's rings the back-end serves
        (vhost-user.rst, "Multiple queue support": "The front-end enables queues by
        sending message VHOST_USER_SET_VRING_ENABLE").  A disabled ring stays set up; the
        back-end must not supply new receive packets on it ("Ring states").  Before
        :meth:`start` only the wish is recorded (start() enables the rings still wanted).

        Raises :class:`~virtq.errors.ArgumentError` for a ring not attached,
        :class:`DeviceRefusedError` when disabling without VHOST_USER_F_PROTOCOL_FEATURES
        (such a back-end has every ring enabled for good), and the back-end's
        :class:`VhostUserError` when it refuses."""
        self._check_usable()
        if not isinstance(enable, bool):
            raise ArgumentError("enable", enable, "must be True or False")
        ring = self._rings.get(index) if isinstance(index, int) else None
        if ring is None:
            raise ArgumentError("index", index, "no such queue attached")
        protocol = bool(self.offered_features >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1)
        if not enable and not protocol:
            raise DeviceRefusedError(
                f"back-end at {self.path} has no VHOST_USER_F_PROTOCOL_FEATURES: its rings "
                "start enabled and cannot be disabled (vhost-user.rst, \"Ring states\")")
        if self._started and protocol:
            self.frontend.set_vring_enable(index, enable)
        ring.wanted = enable
        ring.enabled = enable and self._started

    def get_vring_base(self, index: int) -> int:
        """Stop ring ``index`` and return the next avail index the back-end would process."""
        self._check_usable()
        return self.frontend.get_vring_base(index)

    def stop_queue(self, index: int) -> bool:
        """GET_VRING_BASE: the back-end stops ring ``index`` (vhost-user.rst, "Ring
        states": it must stop before replying), so none of its buffers is touched again."""
        self.get_vring_base(index)
        if index in self._rings:
            self._rings[index].enabled = False
        return True

    # -- notifications --------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise QueueStateError(f"vhost-user transport to {self.path} is closed")
        if self._disconnected is not None:
            raise VhostUserDisconnectedError(
                f"not connected to a back-end at {self.path}: {self._disconnected}; "
                "reconnect() first") from self._disconnected

    def notify(self, index: int) -> None:
        """Kick ring ``index`` (an eventfd write: a system call, so the avail.idx store
        before it is visible to the back-end first).  Raises :class:`~virtq.errors.ArgumentError`
        for a queue not attached, :class:`~virtq.errors.QueueStateError` once closed."""
        try:
            os.eventfd_write(self._rings[index].kick, 1)
        except KeyError:
            self._check_usable()
            raise ArgumentError("index", index, "no such queue attached") from None

    def call_fd(self, index: int) -> int:
        """The eventfd the back-end signals for used buffers on ring ``index``."""
        return self._rings[index].call

    def notification_fds(self) -> list[int]:
        """Every attached ring's call eventfd (for an event loop)."""
        return self._notifier.fds()

    def drain_notifications(self) -> bool:
        """Reset the call eventfds without sleeping; True if any had fired."""
        return self._notifier.drain()

    def wait(self, timeout: float | None) -> bool:
        """Wait for a used-buffer notification on any ring; raises
        :class:`VhostUserDisconnectedError` at once if the back-end goes away meanwhile (or
        is not connected), :class:`~virtq.errors.QueueStateError` if the transport is
        closed, also by another thread during the wait."""
        self._check_usable()
        return self._notifier.wait(timeout)

    def check_alive(self) -> None:
        """Raise :class:`VhostUserDisconnectedError` if the back-end closed the socket
        (non-blocking; for polling loops)."""
        self._check_usable()
        sock = self.frontend.sock
        if sock.fileno() < 0:
            raise VhostUserDisconnectedError(f"connection to {self.path} is closed")
        r, _, x = select.select([sock], [], [sock], 0)
        if r or x:
            try:
                data = sock.recv(1, 0x40 | 0x2)  # MSG_DONTWAIT | MSG_PEEK
            except BlockingIOError:
                return
            except OSError as exc:
                raise VhostUserDisconnectedError(
                    f"back-end at {self.path} is gone ({exc.strerror})") from exc
            if not data:
                raise VhostUserDisconnectedError(
                    f"back-end at {self.path} closed the connection")
            raise VhostUserProtocolError(
                f"back-end at {self.path} sent an unsolicited message", got=data)

    # -- reconnect and teardown -----------------------------------------------------------

    def reconnect(self, path: str | os.PathLike[str] | None = None, *,
                  timeout: float | None = None, resume: bool = False) -> dict[int, list[Any]]:
        """Connect to a (new) back-end and bring every ring back, with the same memory,
        features and ring addresses.  Features: the new back-end must offer every one
        negotiated before (:class:`DeviceRefusedError` otherwise).

        Without the back-end's inflight tracking, in-flight chains cannot survive a
        back-end that died: their tokens are returned per queue (in submission order) so
        the caller can fail or resubmit them; each ring is reset and restarts at its
        ``vring_base`` (SET_VRING_BASE).

        With ``resume``, an inflight region (``inflight=True`` and a back-end offering
        INFLIGHT_SHMFD, before and now) and every ring usable and resumable, the rings are
        kept as they are: SET_INFLIGHT_FD hands the region to the new back-end, each ring
        restarts at :meth:`~virtq.queue.VirtQueue.resume_index`, and no token is returned
        -- the back-end carries out what it had taken (vhost-user.rst, "Inflight I/O
        tracking") and then takes the rest.  Otherwise the region is replaced by a fresh
        one (a reset ring must not be resumed from an old region).

        If the new connection fails, the transport stays disconnected (every later call
        raises :class:`VhostUserDisconnectedError`) until a reconnect succeeds.  Raises
        :class:`~virtq.errors.QueueStateError` when closed.
        """
        if self._closed:
            raise QueueStateError(f"vhost-user transport to {self.path} is closed")
        # Bad arguments are the caller's, not a failed connection: refuse them before the
        # working connection is closed (connect() would check them only afterwards).
        if path is not None:
            check_path(path)
        if timeout is not None:
            check_timeout(timeout)
        self.frontend.close()
        try:
            self.frontend = VhostUserFrontend.connect(
                self.path if path is None else path,
                timeout=self.timeout if timeout is None else timeout)
        except BaseException as exc:
            self._disconnected = exc
            raise
        try:
            self.path = self.frontend.path
            self._mem_table_sent = False
            wanted = self.accepted_features
            self._handshake()
            if self.accepted_features:
                if self.device_features & wanted != wanted:
                    raise DeviceRefusedError(
                        f"the new back-end offers {self.device_features:#x}, "
                        f"which lacks negotiated features {wanted & ~self.device_features:#x}")
                self.negotiate(wanted)
            self._disconnected = None
            self._watch_socket()
            keep = (resume and not self._unreported and self.inflight_region is not None
                    and self._tracks_inflight()
                    and all(ring.queue.state is QueueState.READY
                            and ring.queue.resume_index() is not None
                            for ring in self._rings.values()))
            if keep:
                self._set_inflight()
            else:
                # Its entries describe rings that are about to be reset: a new back-end
                # must not resubmit from it.  _setup_ring gets a fresh one.
                self._drop_inflight()
            lost = self._unreported
            for index, ring in self._rings.items():
                base = None
                if keep:
                    base = ring.queue.resume_index()
                else:
                    lost.setdefault(index, []).extend(ring.queue.reset())
                for fd in (ring.kick, ring.call):  # stale signals from the old back-end
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                self._setup_ring(index, ring, base)
            if self._started:
                self._set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                                 | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)
        except BaseException as exc:
            self._disconnected = exc
            self.frontend.close()
            raise
        self._unreported = {}
        return {index: lost.get(index, []) for index in self._rings}

    def close(self) -> None:
        """Disconnect (the back-end stops every ring), close the queues, release eventfds,
        memory and guest addresses.  If a region cannot be unmapped because views of it are
        alive, :class:`~virtq.errors.RegionBusyError` is raised and that memory is kept; a
        later ``close()`` (after releasing the views) finishes the job."""
        if not self._closed:
            self._closed = True
            self._notifier.shutdown()  # a waiter in another thread leaves before fds go
            self.frontend.close()  # the back-end stops and resets the device on disconnect
            for ring in self._rings.values():
                ring.queue.close()
            self._rings.clear()
            self._finalizer.detach()
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
        busy: RegionBusyError | None = None
        for arena in list(self._arenas):
            try:
                arena.region.close()
            except RegionBusyError as exc:
                busy = busy or exc
                continue
            self.iova_allocator.free(arena.iova)
            self._arenas.remove(arena)
        if busy is not None:
            raise busy

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
