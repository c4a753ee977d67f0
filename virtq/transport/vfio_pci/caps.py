"""The virtio-pci capability parser (VIRTIO 1.2 §4.1.4), on plain config-space bytes.

A modern virtio-pci function describes where its registers live with vendor-specific PCI
capabilities (id 0x09): the common configuration, the notification area, the ISR byte and
the device-specific configuration, each a window ``(bar, offset, length)``.  This module
walks the standard capability list of a config-space snapshot and returns those windows
plus the MSI-X table size.  It does no I/O, so it is tested on recorded bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from virtq.transport.vfio_pci.errors import BadCapabilityError, NotVirtioError

# PCI configuration header (PCI Local Bus 3.0 §6.1).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2
PCI_COMMAND_INTX_DISABLE = 1 << 10
PCI_STATUS_CAP_LIST = 1 << 4
PCI_CAP_ID_MSIX = 0x11
PCI_CAP_ID_VNDR = 0x09
PCI_STD_HEADER_SIZE = 0x40
PCI_CFG_SPACE_SIZE = 0x100
_MAX_CAPS = 48  # (256 - 64) / 4: more entries than that means a loop

# virtio (§4.1.2, §4.1.4).
VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_MODERN_BASE = 0x1040  # modern device id = 0x1040 + virtio device type
VIRTIO_PCI_MODERN_LAST = 0x107F
VIRTIO_PCI_TRANSITIONAL_FIRST = 0x1000
VIRTIO_PCI_TRANSITIONAL_LAST = 0x103F
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8
VIRTIO_PCI_CAP_VENDOR_CFG = 9
CAP_NAMES = {
    VIRTIO_PCI_CAP_COMMON_CFG: "common",
    VIRTIO_PCI_CAP_NOTIFY_CFG: "notify",
    VIRTIO_PCI_CAP_ISR_CFG: "isr",
    VIRTIO_PCI_CAP_DEVICE_CFG: "device",
    VIRTIO_PCI_CAP_PCI_CFG: "pci_cfg",
    VIRTIO_PCI_CAP_SHARED_MEMORY_CFG: "shared_memory",
    VIRTIO_PCI_CAP_VENDOR_CFG: "vendor",
}
VIRTIO_PCI_CAP_LEN = 16  # struct virtio_pci_cap
VIRTIO_PCI_NOTIFY_CAP_LEN = 20  # + le32 notify_off_multiplier
#: struct virtio_pci_common_cfg up to queue_device_hi (§4.1.4.3): what virtq touches.
COMMON_CFG_MIN_LEN = 0x38

#: Transitional device ids (§4.1.2.3) -> virtio device type, for the few that have one.
_TRANSITIONAL_TYPES = {0x1000: 1, 0x1001: 2, 0x1002: 5, 0x1003: 3, 0x1004: 8, 0x1005: 4,
                       0x1009: 9}

_CAP = struct.Struct("<BBBBBBxxII")  # vndr, next, len, cfg_type, bar, id, pad[2], offset, length


@dataclass(frozen=True)
class VirtioCap:
    """One ``virtio_pci_cap``: a window of ``length`` bytes at ``offset`` in BAR ``bar``."""

    cfg_type: int
    bar: int
    offset: int
    length: int
    #: Where the capability itself sits in config space.
    position: int
    id: int = 0

    @property
    def name(self) -> str:
        """The capability's type by name (``common``, ``notify``, ``isr``, ``device``, ``pci``),
        else ``type<N>``."""
        return CAP_NAMES.get(self.cfg_type, f"type{self.cfg_type}")

    def describe(self) -> str:
        """One line for logs: position, type, BAR, offset and length."""
        return (f"cap@{self.position:#04x} virtio {self.name:<7} bar={self.bar} "
                f"offset={self.offset:#07x} length={self.length:#x}")


@dataclass(frozen=True)
class MsixCap:
    """The MSI-X capability (PCI 3.0 §6.8.2): table size and where table and PBA live."""

    position: int
    table_size: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int


@dataclass(frozen=True)
class VirtioPciCaps:
    """Everything the transport needs from config space."""

    vendor: int
    device: int
    revision: int
    subsystem_vendor: int
    subsystem_device: int
    common: VirtioCap
    notify: VirtioCap
    notify_off_multiplier: int
    isr: VirtioCap | None
    device_cfg: VirtioCap | None
    pci_cfg: VirtioCap | None
    msix: MsixCap | None
    #: Every capability in list order: ``(position, id)``.
    chain: tuple[tuple[int, int], ...] = field(default=())
    #: Every virtio capability, including the ones not used (later duplicates, unknown).
    virtio_caps: tuple[VirtioCap, ...] = field(default=())

    @property
    def virtio_device_type(self) -> int:
        """The virtio device type (§5: 1 net, 2 block, 4 entropy, ...)."""
        if self.device >= VIRTIO_PCI_MODERN_BASE:
            return self.device - VIRTIO_PCI_MODERN_BASE
        return _TRANSITIONAL_TYPES.get(self.device, self.subsystem_device)

    def windows(self) -> list[VirtioCap]:
        """The virtio windows the transport maps, in the order common, notify, ISR, device config
        (the optional ones when present)."""
        return [c for c in (self.common, self.notify, self.isr, self.device_cfg) if c]

    def describe(self) -> str:
        """A multi-line summary: ids, every virtio capability, the notify multiplier, MSI-X."""
        lines = [f"{self.vendor:04x}:{self.device:04x} rev {self.revision} "
                 f"(virtio type {self.virtio_device_type})"]
        lines += [c.describe() for c in self.virtio_caps]
        lines.append(f"notify_off_multiplier={self.notify_off_multiplier}")
        if self.msix:
            lines.append(f"MSI-X: {self.msix.table_size} vectors, table in BAR "
                         f"{self.msix.table_bar} at {self.msix.table_offset:#x}")
        return "\n".join(lines)


def _u8(cfg: bytes, off: int) -> int:
    return cfg[off]


def _u16(cfg: bytes, off: int) -> int:
    return int.from_bytes(cfg[off : off + 2], "little")


def _u32(cfg: bytes, off: int) -> int:
    return int.from_bytes(cfg[off : off + 4], "little")


def walk_capabilities(cfg: bytes) -> list[tuple[int, int]]:
    """The standard capability list as ``(position, id)`` pairs.  Raises
    :class:`BadCapabilityError` for a pointer into the header, past the end, or a loop."""
    if not _u16(cfg, PCI_STATUS) & PCI_STATUS_CAP_LIST:
        return []
    found: list[tuple[int, int]] = []
    seen: set[int] = set()
    # The bottom two bits of every pointer are reserved (PCI 3.0 §6.7).
    pos = _u8(cfg, PCI_CAPABILITY_LIST) & ~3
    while pos:
        if pos < PCI_STD_HEADER_SIZE or pos + 2 > len(cfg):
            raise BadCapabilityError(f"capability pointer {pos:#x} is outside "
                                     f"{PCI_STD_HEADER_SIZE:#x}..{len(cfg):#x}")
        if pos in seen or len(seen) >= _MAX_CAPS:
            raise BadCapabilityError(f"capability list loops at {pos:#x}")
        seen.add(pos)
        found.append((pos, _u8(cfg, pos)))
        pos = _u8(cfg, pos + 1) & ~3
    return found


def _parse_virtio_cap(cfg: bytes, pos: int) -> tuple[VirtioCap, int] | None:
    """The vendor capability at ``pos`` and its notify multiplier (0 for other types);
    None for a capability the driver must ignore (reserved BAR, §4.1.4)."""
    if pos + VIRTIO_PCI_CAP_LEN > len(cfg):
        raise BadCapabilityError(f"virtio capability at {pos:#x} runs past config space")
    _vndr, _next, cap_len, cfg_type, bar, cap_id, offset, length = _CAP.unpack_from(cfg, pos)
    if cap_len < VIRTIO_PCI_CAP_LEN:
        raise BadCapabilityError(f"virtio capability at {pos:#x} has cap_len {cap_len} < 16")
    if bar > 5:
        return None  # "The driver MUST ignore any vendor-specific capability ... reserved bar"
    multiplier = 0
    if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
        if cap_len < VIRTIO_PCI_NOTIFY_CAP_LEN or pos + VIRTIO_PCI_NOTIFY_CAP_LEN > len(cfg):
            raise BadCapabilityError(f"notify capability at {pos:#x} has cap_len {cap_len}; "
                                     "it needs 20 bytes for notify_off_multiplier")
        multiplier = _u32(cfg, pos + 16)
    return VirtioCap(cfg_type, bar, offset, length, pos, cap_id), multiplier


def parse_virtio_caps(config: bytes | bytearray | memoryview) -> VirtioPciCaps:
    """Parse a config-space snapshot (at least the first 256 bytes) of a virtio-pci
    function.  Raises :class:`NotVirtioError` for a non-virtio or legacy-only function and
    :class:`BadCapabilityError` for capabilities that break §4.1.4's rules."""
    cfg = bytes(config)
    if len(cfg) < PCI_CFG_SPACE_SIZE:
        raise BadCapabilityError(f"config space snapshot is {len(cfg)} bytes; need 256")
    vendor, device = _u16(cfg, PCI_VENDOR_ID), _u16(cfg, PCI_DEVICE_ID)
    if vendor != VIRTIO_PCI_VENDOR or not (
        VIRTIO_PCI_TRANSITIONAL_FIRST <= device <= VIRTIO_PCI_MODERN_LAST
    ):
        raise NotVirtioError(f"{vendor:04x}:{device:04x} is not a virtio-pci function "
                             f"(vendor {VIRTIO_PCI_VENDOR:04x}, device 1000..107f)")
    chain = walk_capabilities(cfg)
    first: dict[int, tuple[VirtioCap, int]] = {}
    virtio_caps: list[VirtioCap] = []
    msix = None
    for pos, cap_id in chain:
        if cap_id == PCI_CAP_ID_VNDR:
            parsed = _parse_virtio_cap(cfg, pos)
            if parsed is None:
                continue
            virtio_caps.append(parsed[0])
            # "The driver SHOULD use the first instance of each virtio structure type."
            first.setdefault(parsed[0].cfg_type, parsed)
        elif cap_id == PCI_CAP_ID_MSIX and msix is None:
            control, table, pba = _u16(cfg, pos + 2), _u32(cfg, pos + 4), _u32(cfg, pos + 8)
            msix = MsixCap(pos, (control & 0x7FF) + 1, table & 7, table & ~7, pba & 7, pba & ~7)
    if VIRTIO_PCI_CAP_COMMON_CFG not in first or VIRTIO_PCI_CAP_NOTIFY_CFG not in first:
        missing = [CAP_NAMES[t] for t in (VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG)
                   if t not in first]
        raise NotVirtioError(
            f"{vendor:04x}:{device:04x} has no virtio {' or '.join(missing)} capability: a "
            "legacy-only device (QEMU: disable-legacy=on gives a modern one)")
    common = first[VIRTIO_PCI_CAP_COMMON_CFG][0]
    notify, multiplier = first[VIRTIO_PCI_CAP_NOTIFY_CFG]
    # §4.1.4.3.1 / §4.1.4.4.1 / §4.1.4.6.1: alignment and size of the windows.
    if common.offset % 4 or common.length < COMMON_CFG_MIN_LEN:
        raise BadCapabilityError(
            f"common configuration at offset {common.offset:#x} length {common.length:#x}: "
            f"must be 4-aligned and at least {COMMON_CFG_MIN_LEN:#x} bytes")
    if notify.offset % 2:
        raise BadCapabilityError(f"notify area offset {notify.offset:#x} is not 2-aligned")
    if multiplier % 2 or (multiplier and multiplier & (multiplier - 1)):
        raise BadCapabilityError(f"notify_off_multiplier {multiplier} is not 0 or an even "
                                 "power of two")
    device_cfg = first.get(VIRTIO_PCI_CAP_DEVICE_CFG, (None, 0))[0]
    if device_cfg is not None and device_cfg.offset % 4:
        raise BadCapabilityError(f"device configuration offset {device_cfg.offset:#x} is "
                                 "not 4-aligned")
    return VirtioPciCaps(
        vendor=vendor,
        device=device,
        revision=_u8(cfg, PCI_REVISION_ID),
        subsystem_vendor=_u16(cfg, PCI_SUBSYSTEM_VENDOR_ID),
        subsystem_device=_u16(cfg, PCI_SUBSYSTEM_ID),
        common=common,
        notify=notify,
        notify_off_multiplier=multiplier,
        isr=first.get(VIRTIO_PCI_CAP_ISR_CFG, (None, 0))[0],
        device_cfg=device_cfg,
        pci_cfg=first.get(VIRTIO_PCI_CAP_PCI_CFG, (None, 0))[0],
        msix=msix,
        chain=tuple(chain),
        virtio_caps=tuple(virtio_caps),
    )


def check_windows(caps: VirtioPciCaps, bar_sizes: dict[int, int]) -> None:
    """Every window the driver uses must lie inside its BAR (``bar_sizes``: index -> size
    from VFIO); raises :class:`BadCapabilityError` naming the first one that does not."""
    for cap in caps.windows():
        size = bar_sizes.get(cap.bar, 0)
        if cap.offset + cap.length > size:
            raise BadCapabilityError(
                f"virtio {cap.name} window [{cap.offset:#x}, {cap.offset + cap.length:#x}) "
                f"is outside BAR {cap.bar} ({size:#x} bytes)")
