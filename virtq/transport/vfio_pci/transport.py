"""virtio-pci through VFIO as a :class:`~virtq.transport.Transport`.

:meth:`VfioPciTransport.open` takes a PCI address and does, in order (each step with its
own error when it goes wrong on a real system):

1. sysfs: the function exists, has an IOMMU group, is bound to ``vfio-pci`` (or is rebound
   through ``driver_override`` with ``bind=True``);
2. VFIO: opens the group (its node, ``/dev/vfio/<n>``), checks it is viable, attaches it to
   a new type1v2 container, gets the device fd;
3. PCI: reads config space, walks the virtio capabilities (§4.1.4), maps the BARs holding
   them (mmap, or pread/pwrite), enables memory decoding and bus mastering;
4. virtio: reset, ACKNOWLEDGE, DRIVER (§3.1.1 steps 1-3), reads the device features; wires
   one MSI-X vector per queue to an eventfd unless ``poll=True``.

Then the driver negotiates, allocates DMA memory (mapped in the IOMMU at IOVAs from an
:class:`~virtq.iova.IovaAllocator`; by default a :class:`~virtq.iova.RangeAllocator` over
the ranges the IOMMU reports), attaches its queues and starts the device.  ``close()``
resets the device first -- so it stops DMA -- then undoes everything backwards.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from virtq._sys import vfio as _vfio
from virtq._sys.fence import doorbell_barrier
from virtq.abi import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
)
from virtq.errors import ArgumentError, DeviceError, QueueStateError
from virtq.iova import IovaAllocator, RangeAllocator
from virtq.memory import AnonymousRegion, MemoryRegion, VfioContainer, VfioDmaRegion
from virtq.queue import VirtQueue
from virtq.transport.base import QUEUE_FEATURES, DmaArena, arena_of, usable_features
from virtq.transport.errors import DeviceRefusedError
from virtq.transport.notify import NotificationSet
from virtq.transport.vfio_pci.caps import (
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    VIRTIO_PCI_MODERN_BASE,
    VIRTIO_PCI_MODERN_LAST,
    VIRTIO_PCI_TRANSITIONAL_FIRST,
    VIRTIO_PCI_VENDOR,
    VirtioPciCaps,
    check_windows,
    parse_virtio_caps,
)
from virtq.transport.vfio_pci.device import Bar, MmapBar, VfioDevice, VfioGroup, Window
from virtq.transport.vfio_pci.errors import (
    BadCapabilityError,
    DeviceBoundError,
    GroupNotViableError,
    NoIommuGroupError,
    NotVirtioError,
    VfioPciError,
)
from virtq.transport.vfio_pci.sysfs import VFIO_PCI_DRIVER, PciSysfs, normalize_address
from virtq.transport.vfio_pci.virtio import VIRTIO_MSI_NO_VECTOR, VirtioPciFunction

#: A memory backend: ``factory(nbytes)`` returns a fresh region of at least ``nbytes``
#: (``AnonymousRegion``, ``HugepageRegion``, ``MemfdRegion`` or your own).
MemoryFactory = Callable[[int], MemoryRegion]

#: Ring/transport feature bits (24..49) this transport can honour; the others are never
#: offered to the driver (e.g. RING_PACKED: attach_queue takes split rings; NOTIFICATION_DATA
#: would change what a kick writes).
SUPPORTED_TRANSPORT_FEATURES = QUEUE_FEATURES | 1 << VIRTIO_F_ACCESS_PLATFORM
#: Bits the transport always needs: a modern device, and one that goes through the IOMMU
#: (without ACCESS_PLATFORM the device would treat our IOVAs as physical addresses).
REQUIRED_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM
_EFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK


@dataclass(eq=False)
class _Attached:
    queue: VirtQueue[Any]
    arena: DmaArena
    vector: int
    notify_offset: int


@dataclass(eq=False)
class _Resources:
    """Everything the transport must undo, apart from the transport object itself (so the
    garbage-collection fallback can reach it)."""

    address: str
    container: VfioContainer | None = None
    group: VfioGroup | None = None
    device: VfioDevice | None = None
    function: VirtioPciFunction | None = None
    bars: dict[int, Bar] = field(default_factory=dict)
    eventfds: list[int] = field(default_factory=list)
    msix: bool = False
    arenas: list[DmaArena] = field(default_factory=list)
    queues: dict[int, _Attached] = field(default_factory=dict)
    pci_command: int | None = None

    def teardown(self, reset_timeout: float) -> list[BaseException]:
        """Undo everything, in the one safe order; returns the errors met (and goes on)."""
        errors: list[BaseException] = []

        def attempt(step: Callable[[], object]) -> None:
            try:
                step()
            except Exception as exc:  # teardown goes on; the caller re-raises the first
                errors.append(exc)

        device = self.device
        if device is not None and not device.closed:
            # Reset first: the device stops using the rings and buffers before they are
            # unmapped (§2.1.2 -- after reset reads 0 the device does no more DMA).
            if self.function is not None:
                function = self.function
                attempt(lambda: function.reset(reset_timeout))
            if self.pci_command is not None:
                command = self.pci_command
                attempt(lambda: device.config_write(PCI_COMMAND, 2, command))
            if self.msix:
                attempt(device.disable_msix)
        self.msix = False
        for fd in self.eventfds:
            attempt(_closer(fd))
        self.eventfds.clear()
        for attached in self.queues.values():
            attempt(attached.queue.close)
        self.queues.clear()
        # Unmap while the group still holds the container's IOMMU: when the last group
        # leaves, the container loses its IOMMU and UNMAP_DMA would fail.
        for arena in self.arenas:
            attempt(arena.region.close)
        self.arenas.clear()
        for bar in self.bars.values():
            attempt(bar.close)
        self.bars.clear()
        if device is not None:
            attempt(device.close)
        container, group = self.container, self.group
        if container is not None and group is not None and not group.closed:
            attempt(lambda: container.detach_group(group.fd))
        if group is not None:
            attempt(group.close)
        if container is not None:
            attempt(container.close)
        return errors


def _closer(fd: int) -> Callable[[], None]:
    return lambda: os.close(fd)


def _finalize(res: _Resources, notifier: NotificationSet, reset_timeout: float) -> None:
    warnings.warn(f"VfioPciTransport for {res.address} was not closed", ResourceWarning,
                  stacklevel=2)
    notifier.shutdown()
    res.teardown(reset_timeout)


class VfioPciTransport:
    """A modern virtio-pci function driven from this process through VFIO.

    Build it with :meth:`open`.  Implements :class:`~virtq.transport.Transport`; a context
    manager; ``close()`` resets the device and releases every fd, mapping and IOVA.
    """

    def __init__(self, res: _Resources, *, sysfs: PciSysfs, caps: VirtioPciCaps,
                 function: VirtioPciFunction, allocator: IovaAllocator,
                 memory: MemoryFactory, poll: bool, reset_timeout: float) -> None:
        self._res = res
        self.address = res.address
        self.sysfs = sysfs
        self.caps = caps
        self.function = function
        self.iova_allocator = allocator
        self.memory = memory
        self.poll = poll
        self.reset_timeout = reset_timeout
        assert res.container is not None and res.device is not None
        self.container: VfioContainer = res.container
        self.device: VfioDevice = res.device
        self.offered_features = function.device_features()
        self.accepted_features = 0
        self._num_queues = function.num_queues()
        self._started = False
        self._closed = False
        self._kick: dict[int, Callable[[], None]] = {}
        self._notifier = NotificationSet(f"VfioPciTransport for {self.address}")
        self._finalizer = weakref.finalize(self, _finalize, res, self._notifier, reset_timeout)

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        pci_address: str,
        *,
        iova_allocator: IovaAllocator | None = None,
        memory: MemoryFactory | None = None,
        poll: bool = False,
        bind: bool = False,
        bar_access: str = "auto",
        reset_timeout: float = 1.0,
        sysfs_root: str = "/sys",
        vfio_dir: str = "/dev/vfio",
    ) -> Self:
        """Open the virtio-pci function at ``pci_address`` (``0000:00:07.0``).

        ``iova_allocator``: where DMA memory appears to the device (default: a
        :class:`~virtq.iova.RangeAllocator` over the IOMMU's usable ranges, above 1 MiB).
        ``memory``: the backend for DMA memory (default :class:`~virtq.memory.AnonymousRegion`;
        ``HugepageRegion`` works too).  ``poll``: no interrupts -- completions are found by
        polling the used ring; otherwise one MSI-X vector per queue signals an eventfd.
        ``bind``: rebind the function to ``vfio-pci`` through ``driver_override`` if it is
        bound elsewhere (needs root).  ``bar_access``: ``"auto"``, ``"mmap"`` or ``"pio"``.
        Raises :class:`~virtq.errors.ArgumentError` for a bad address or ``bar_access``;
        :class:`~virtq.transport.vfio_pci.NoSuchDeviceError`,
        :class:`~virtq.transport.vfio_pci.DeviceBoundError` and other
        :class:`~virtq.transport.vfio_pci.VfioPciError` for a function that cannot be claimed or
        is not virtio; a :class:`~virtq.errors.VirtqOSError` with a hint when VFIO refuses
        (permissions, RLIMIT_MEMLOCK, the group); everything opened so far is closed again.
        """
        if bar_access not in ("auto", "mmap", "pio"):
            raise ArgumentError("bar_access", bar_access, "must be 'auto', 'mmap' or 'pio'")
        address = normalize_address(pci_address)
        sysfs = PciSysfs(sysfs_root)
        res = _Resources(address)
        try:
            cls._claim(sysfs, address, res, bind=bind, vfio_dir=vfio_dir)
            caps, function, allocator = cls._bring_up(
                address, res, iova_allocator=iova_allocator, poll=poll, bar_access=bar_access,
                reset_timeout=reset_timeout)
            return cls(res, sysfs=sysfs, caps=caps, function=function, allocator=allocator,
                       memory=memory or AnonymousRegion, poll=poll,
                       reset_timeout=reset_timeout)
        except BaseException:
            res.teardown(reset_timeout)
            raise

    @staticmethod
    def _claim(sysfs: PciSysfs, address: str, res: _Resources, *, bind: bool,
               vfio_dir: str) -> None:
        """sysfs and VFIO steps: group, binding, viability, container, device fd."""
        vendor, device_id = sysfs.ids(address)
        group_no = sysfs.iommu_group(address)
        if group_no is None:
            raise NoIommuGroupError(
                f"{address} has no IOMMU group: this kernel runs without an IOMMU, so VFIO "
                "cannot isolate the device. Enable VT-d/AMD-Vi in the firmware, boot with "
                "intel_iommu=on (or amd_iommu=on), then bind the device to vfio-pci",
                address=address)
        driver = sysfs.driver(address)
        if driver != VFIO_PCI_DRIVER:
            if bind:
                # Never take a function from its driver unless it is a virtio device: a
                # mistyped address must not unbind someone's disk or NIC.
                if vendor != VIRTIO_PCI_VENDOR or not (
                    VIRTIO_PCI_TRANSITIONAL_FIRST <= device_id <= VIRTIO_PCI_MODERN_LAST
                ):
                    raise NotVirtioError(
                        f"{address} is {vendor:04x}:{device_id:04x}, not a virtio-pci device; "
                        "refusing to rebind it", address=address)
                sysfs.bind(address, VFIO_PCI_DRIVER)
            else:
                dev = sysfs.device_dir(address)
                raise DeviceBoundError(
                    f"{address} is bound to {driver or 'no driver'}, not vfio-pci. Pass "
                    f"bind=True to rebind it, or as root: echo vfio-pci > {dev}/driver_override"
                    + (f"; echo {address} > {dev}/driver/unbind" if driver else "")
                    + f"; echo {address} > {sysfs.root}/bus/pci/drivers_probe",
                    address=address, driver=driver)
        res.group = group = VfioGroup(group_no, dev_dir=vfio_dir, address=address)
        if not group.viable:
            members = {m: sysfs.driver(m) for m in sysfs.group_members(group_no)}
            busy = [f"{m} ({d})" for m, d in members.items()
                    if m != address and d not in (None, VFIO_PCI_DRIVER)]
            raise GroupNotViableError(
                f"IOMMU group {group_no} of {address} is not viable: "
                f"{', '.join(busy) or 'another member'} "
                f"{'is' if len(busy) == 1 else 'are'} bound to a kernel driver. Every device "
                f"of the group ({', '.join(members)}) must be bound to vfio-pci or to no "
                "driver; rebind them, or put the device where it has a group of its own",
                address=address, group=group_no, members=members)
        res.container = VfioContainer(os.path.join(vfio_dir, "vfio"))
        res.container.attach_group(group.fd)
        res.device = VfioDevice(group, address)

    @staticmethod
    def _bring_up(address: str, res: _Resources, *, iova_allocator: IovaAllocator | None,
                  poll: bool, bar_access: str, reset_timeout: float,
                  ) -> tuple[VirtioPciCaps, VirtioPciFunction, IovaAllocator]:
        device, container = res.device, res.container
        assert device is not None and container is not None
        caps = parse_virtio_caps(device.config_snapshot(256))
        for cap in caps.windows():
            if cap.bar not in res.bars:
                res.bars[cap.bar] = device.map_bar(cap.bar, bar_access)
        check_windows(caps, {i: bar.size for i, bar in res.bars.items()})

        def window(cap: Any) -> Window:
            return Window(res.bars[cap.bar], cap.offset, cap.length)

        function = VirtioPciFunction(
            window(caps.common),
            window(caps.device_cfg) if caps.device_cfg else None,
            caps.device_cfg.length if caps.device_cfg else 0,
            name=f"virtio device at {address}")
        res.function = function
        # vfio-pci leaves bus mastering off, and a device that is not bus master cannot DMA;
        # INTx off because nobody services it (we poll, or use MSI-X).
        command = device.config_read(PCI_COMMAND, 2)
        res.pci_command = command
        device.config_write(PCI_COMMAND, 2, command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
                            | PCI_COMMAND_INTX_DISABLE)
        function.reset(reset_timeout)
        function.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        function.add_status(VIRTIO_CONFIG_S_DRIVER)
        if not poll:
            count = device.irq_count(_vfio.VFIO_PCI_MSIX_IRQ_INDEX)
            if count == 0:
                raise VfioPciError(f"{address} has no MSI-X vectors; open it with poll=True",
                                   address=address)
            nvec = min(count, max(1, function.num_queues()))
            res.eventfds.extend(os.eventfd(0, _EFD_FLAGS) for _ in range(nvec))
            device.set_msix(res.eventfds)
            res.msix = True
        # Configuration-change interrupts are not used: the driver re-reads config itself.
        function.set_config_vector(VIRTIO_MSI_NO_VECTOR)
        allocator = iova_allocator or RangeAllocator(container.usable_ranges())
        return caps, function, allocator

    # -- introspection ---------------------------------------------------------------------

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("polling" if self.poll else "MSI-X")
        return f"<VfioPciTransport {self.address} virtio type {self.device_type} {state}>"

    @property
    def device_type(self) -> int:
        """The virtio device type (§5: 1 net, 2 block, 4 entropy, ...)."""
        return self.caps.virtio_device_type

    @property
    def polling(self) -> bool:
        """True when opened with ``poll=True``: no MSI-X, drivers poll the used rings."""
        return self.poll

    @property
    def iova_ranges(self) -> tuple[tuple[int, int], ...]:
        """Usable IOVA ranges the IOMMU reports, ``(start, last)`` inclusive."""
        return self.container.iova_ranges

    @property
    def num_vectors(self) -> int:
        """MSI-X vectors wired to eventfds (0 when polling)."""
        return len(self._res.eventfds)

    def describe(self) -> str:
        """A multi-line summary: the capabilities, the IOMMU's page sizes and ranges, how each
        BAR is accessed, interrupts, features."""
        info = self.container.info
        ranges = ", ".join(f"{s:#x}-{e:#x}" for s, e in info.iova_ranges)
        bars = ", ".join(f"BAR{i} by {bar.mode}" for i, bar in sorted(self._res.bars.items()))
        return "\n".join([
            f"{self.address}: {self.caps.describe()}",
            f"IOMMU page sizes {info.page_sizes:#x}, IOVA ranges {ranges}",
            f"{bars}; {'polling' if self.poll else f'{self.num_vectors} MSI-X vector(s)'}",
            f"device features {self.offered_features:#018x}, "
            f"accepted {self.accepted_features:#018x}",
        ])

    # -- Transport: features and configuration ----------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise QueueStateError(f"VfioPciTransport for {self.address} is closed")

    @property
    def device_features(self) -> int:
        """What the device offers, minus ring/transport bits this transport cannot honour."""
        return usable_features(self.offered_features, SUPPORTED_TRANSPORT_FEATURES)

    def negotiate(self, wanted: int) -> int:
        """Accept ``device_features & wanted`` plus VERSION_1 and ACCESS_PLATFORM; set
        FEATURES_OK and verify it by read-back.  Raises
        :class:`~virtq.transport.errors.DeviceRefusedError` when the device lacks
        VIRTIO_F_VERSION_1 or VIRTIO_F_ACCESS_PLATFORM,
        :class:`~virtq.transport.vfio_pci.FeaturesRefusedError` when it refuses the set,
        :class:`~virtq.errors.QueueStateError` once closed."""
        self._check_open()
        offered = self.offered_features
        if not offered >> VIRTIO_F_VERSION_1 & 1:
            raise DeviceRefusedError(f"{self.address} does not offer VIRTIO_F_VERSION_1 "
                                     f"(features {offered:#x}): legacy devices are not "
                                     "supported")
        if not offered >> VIRTIO_F_ACCESS_PLATFORM & 1:
            raise DeviceRefusedError(
                f"{self.address} does not offer VIRTIO_F_ACCESS_PLATFORM: it would bypass "
                "the IOMMU and use our IOVAs as physical addresses (QEMU: iommu_platform=on)")
        accepted = self.device_features & wanted | REQUIRED_FEATURES
        self.negotiate_exact(accepted)
        return accepted

    def negotiate_exact(self, features: int) -> None:
        """Write exactly ``features`` and set FEATURES_OK, without the required-bits policy
        of :meth:`negotiate` (for experiments and tests of a device's refusal).  Raises
        :class:`~virtq.transport.vfio_pci.FeaturesRefusedError` if the device refuses."""
        self._check_open()
        self.function.accept_features(features)
        self.accepted_features = features

    def num_queues(self) -> int:
        """How many virtqueues the function has."""
        return self._num_queues

    def max_queue_size(self, index: int) -> int:
        """Queue ``index``'s maximum size (0: no such queue).  Raises
        :class:`~virtq.errors.QueueStateError` once closed."""
        self._check_open()
        return self.function.queue_max(index)

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of device configuration at ``offset``, read consistently
        (``config_generation``).  Raises :class:`~virtq.errors.QueueStateError` once closed,
        :class:`~virtq.errors.ArgumentError` for a range outside it,
        :class:`~virtq.transport.errors.DeviceRefusedError` when there is none or it keeps
        changing."""
        self._check_open()
        return self.function.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        """Write ``data`` into the device configuration at ``offset``.  Raises
        :class:`~virtq.errors.QueueStateError` once closed and
        :class:`~virtq.errors.ArgumentError` for a range outside it."""
        self._check_open()
        self.function.write_config(offset, data)

    # -- Transport: memory -----------------------------------------------------------------

    def alloc_dma(self, nbytes: int) -> DmaArena:
        """A fresh region from the memory backend, mapped in the IOMMU at an IOVA from the
        allocator (checked against the IOMMU's usable ranges)."""
        self._check_open()
        region = self.memory(nbytes)
        try:
            dma = VfioDmaRegion(self.container, region, self.iova_allocator, own=True)
        except BaseException:
            region.close()
            raise
        arena = DmaArena(dma, dma.iova, owner=self)
        self._res.arenas.append(arena)
        return arena

    def free_dma(self, arena: DmaArena) -> None:
        """Unmap and release one arena before :meth:`close` (no queue may use it).  Raises
        :class:`~virtq.errors.ArgumentError` while an attached queue lives in it, or for an
        arena this transport did not allocate (or freed already)."""
        if not any(a is arena for a in self._res.arenas):
            raise ArgumentError("arena", arena, "not allocated by this transport (or freed)")
        if any(a.arena is arena for a in self._res.queues.values()):
            raise ArgumentError("arena", arena, "a queue attached to the device lives in it")
        self._res.arenas.remove(arena)
        arena.region.close()

    # -- Transport: queues ------------------------------------------------------------------

    def attach_queue(self, index: int, queue: VirtQueue[Any]) -> None:
        """§4.1.5.1.3: size, ring IOVAs, MSI-X vector (read back), notify offset, then
        ``queue_enable``.  Raises :class:`~virtq.errors.QueueStateError` when closed or started,
        :class:`~virtq.errors.ArgumentError` for a queue attached already, memory not from
        :meth:`alloc_dma` or a ring at IOVA 0, and the device's refusals
        (:class:`~virtq.transport.vfio_pci.QueueSizeError`, ...)."""
        self._check_open()
        if self._started:
            raise QueueStateError("queues must be attached before start() (DRIVER_OK)")
        if index in self._res.queues:
            raise ArgumentError("index", index, "queue already attached")
        arena = arena_of(self._res.arenas, queue)
        if 0 in (queue.desc_area, queue.driver_area, queue.device_area):
            # Legal per the spec, but QEMU (and other devices) read a zero ring address as
            # "queue not configured" and silently ignore every kick.
            raise ArgumentError("queue.iova", queue.iova,
                                "a ring at IOVA 0 is taken for 'not configured' by devices; "
                                "allocate IOVAs above 0 (the default allocator starts at 1 MiB)")
        nvec = self.num_vectors
        vector = VIRTIO_MSI_NO_VECTOR if self.poll else index % nvec
        notify_off = self.function.configure_queue(
            index, queue.size, desc=queue.desc_area, driver=queue.driver_area,
            device=queue.device_area, vector=vector)
        notify = self.caps.notify
        rel = notify_off * self.caps.notify_off_multiplier
        # §4.1.4.4.1: the doorbell (2 bytes without NOTIFICATION_DATA) is inside the window.
        if rel + 2 > notify.length:
            raise BadCapabilityError(
                f"queue {index} notify offset {rel:#x} (queue_notify_off {notify_off} x "
                f"{self.caps.notify_off_multiplier}) is outside the {notify.length:#x}-byte "
                "notify window", address=self.address)
        offset = notify.offset + rel
        self._kick[index] = self._doorbell(self._res.bars[notify.bar], offset, index)
        if not self.poll:
            self._notifier.add(index, self._res.eventfds[vector])
        self.function.enable_queue(index)
        self._res.queues[index] = _Attached(queue, arena, vector, offset)

    @staticmethod
    def _doorbell(bar: Bar, offset: int, index: int) -> Callable[[], None]:
        # §4.1.4.4: without NOTIFICATION_DATA a kick is a 16-bit write of the queue index.
        # The avail.idx store it announces was made (and fenced) by SplitQueue.publish(),
        # and must reach the device before this MMIO store (§2.7.13 steps 5-7):
        # doorbell_barrier() is dsb sy on aarch64 (Linux mb()) and nothing on x86, where a
        # UC MMIO store is not reordered before earlier stores (docs/memory-ordering.md).
        if isinstance(bar, MmapBar):
            register = bar.register16(offset)

            def kick() -> None:
                doorbell_barrier()
                register.value = index
        else:
            def kick() -> None:
                doorbell_barrier()  # the same order, not left to the kernel's write path
                bar.write(offset, 2, index)
        return kick

    def start(self) -> None:
        """DRIVER_OK (checked by read-back): the device may use the queues now."""
        self._check_open()
        self.function.driver_ok()
        self._started = True
        for fd in self._res.eventfds:  # anything signalled during set-up is stale
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)

    # -- Transport: notifications ----------------------------------------------------------

    def notify(self, index: int) -> None:
        """Kick queue ``index``: one store to its doorbell in the notify window (after
        ``doorbell_barrier()``).  Raises :class:`~virtq.errors.ArgumentError` for a queue not
        attached and :class:`~virtq.errors.QueueStateError` once closed."""
        try:
            kick = self._kick[index]
        except KeyError:
            self._check_open()
            raise ArgumentError("index", index, "no such queue attached") from None
        kick()

    def notification_fds(self) -> list[int]:
        """The MSI-X eventfds of the attached queues (empty when polling)."""
        return [] if self.poll else self._notifier.fds()

    def drain_notifications(self) -> bool:
        """Reset the MSI-X eventfds without sleeping; True if any had fired."""
        return False if self.poll else self._notifier.drain()

    def wait(self, timeout: float | None) -> bool:
        """Block on the attached queues' MSI-X eventfds up to ``timeout`` seconds; True if
        one fired (the counts are drained).  When polling this returns False at once.
        Raises :class:`~virtq.errors.QueueStateError` when closed (also by another thread
        during the wait)."""
        self._check_open()
        if self.poll:
            return False
        return self._notifier.wait(timeout)

    def eventfd(self, index: int) -> int | None:
        """The eventfd queue ``index``'s MSI-X vector signals (for your own event loop), or
        None when polling."""
        attached = self._res.queues[index]
        return None if self.poll else self._res.eventfds[attached.vector]

    def stop_queue(self, index: int) -> bool:
        """False: stopping one queue needs VIRTIO_F_RING_RESET, which this transport does
        not negotiate; the queue's buffers stay the device's until :meth:`close` resets
        it."""
        self._check_open()
        return False

    def check_alive(self) -> None:
        """Raise :class:`~virtq.errors.DeviceError` if the device flagged an error or
        reset itself (cheap: one status read; for polling loops)."""
        self._check_open()
        status = self.function.status
        if status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) or (
            self._started and status == 0
        ):
            raise DeviceError(f"{self.address} reads device status {status:#x}: it needs a "
                              "reset (DEVICE_NEEDS_RESET/FAILED) or was reset")

    # -- teardown ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def close(self) -> None:
        """Reset the device, turn MSI-X off, close the attached queues, unmap and free every
        arena, unmap the BARs, close device, group and container (idempotent).  Raises the
        first error met, after finishing the rest."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        self._notifier.shutdown()  # a waiter in another thread leaves before fds close
        self._kick.clear()
        errors = self._res.teardown(self.reset_timeout)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_virtio_devices(device_type: int, *, sysfs_root: str = "/sys") -> list[str]:
    """PCI addresses of modern virtio functions of ``device_type`` (4: rng, 2: blk, 1: net),
    found by vendor:device id -- never assume an address."""
    return PciSysfs(sysfs_root).find(VIRTIO_PCI_VENDOR, VIRTIO_PCI_MODERN_BASE + device_type)


__all__ = [
    "REQUIRED_FEATURES",
    "SUPPORTED_TRANSPORT_FEATURES",
    "MemoryFactory",
    "VfioPciTransport",
    "find_virtio_devices",
]
