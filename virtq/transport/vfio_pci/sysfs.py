"""PCI functions as sysfs shows them: ids, driver, IOMMU group, (re)binding.

Everything goes through one :class:`PciSysfs` object whose root defaults to ``/sys``, so
the error paths (no IOMMU group, bound elsewhere, not viable) can be tested against a fake
tree on any machine.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from virtq._sys.vfio import vfio_error
from virtq.errors import ArgumentError
from virtq.transport.vfio_pci.errors import DeviceBoundError, NoSuchDeviceError, VfioPciError

VFIO_PCI_DRIVER = "vfio-pci"
_ADDRESS = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):"
    r"(?P<slot>[0-9a-fA-F]{1,2})\.(?P<func>[0-7])$"
)


def normalize_address(address: str) -> str:
    """``"7.0"``-style shorthands are not guessed; ``"00:07.0"`` becomes ``"0000:00:07.0"``
    (the domain defaults to 0), case is folded -- the form sysfs and VFIO use.  Raises
    :class:`~virtq.errors.ArgumentError` for anything else."""
    m = _ADDRESS.match(address.strip()) if isinstance(address, str) else None
    if m is None:
        raise ArgumentError("pci_address", address,
                            "must look like 0000:00:07.0 (domain:bus:slot.function)")
    slot = int(m["slot"], 16)
    if slot > 0x1F:
        raise ArgumentError("pci_address", address, "slot must be 00..1f")
    domain = int(m["domain"] or "0", 16)
    return f"{domain:04x}:{int(m['bus'], 16):02x}:{slot:02x}.{m['func']}"


class PciSysfs:
    """Read and rebind PCI functions under ``<root>/bus/pci``."""

    def __init__(self, root: str | os.PathLike[str] = "/sys") -> None:
        self.root = Path(root)
        self.devices = self.root / "bus" / "pci" / "devices"
        self.drivers = self.root / "bus" / "pci" / "drivers"

    def device_dir(self, address: str) -> Path:
        """The function's sysfs folder.  Raises :class:`NoSuchDeviceError` when there is no such
        function."""
        path = self.devices / address
        if not path.exists():
            raise NoSuchDeviceError(
                f"no PCI device {address} (not in {self.devices}); list them with lspci -D",
                address=address)
        return path

    def ids(self, address: str) -> tuple[int, int]:
        """``(vendor, device)``.  Raises :class:`NoSuchDeviceError` for an unknown function."""
        d = self.device_dir(address)
        return (int((d / "vendor").read_text(), 16), int((d / "device").read_text(), 16))

    def driver(self, address: str) -> str | None:
        """Name of the bound driver, or None.  Raises :class:`NoSuchDeviceError` for an unknown
        function."""
        link = self.device_dir(address) / "driver"
        if not os.path.lexists(link):
            return None
        return os.path.basename(os.readlink(link))

    def iommu_group(self, address: str) -> int | None:
        """The number of the function's IOMMU group, or None when it has none (no IOMMU).  Raises
        :class:`NoSuchDeviceError` for an unknown function."""
        link = self.device_dir(address) / "iommu_group"
        if not os.path.lexists(link):
            return None
        return int(os.path.basename(os.readlink(link)))

    def group_members(self, group: int) -> list[str]:
        """The addresses of every function in IOMMU group ``group``, sorted (empty for an unknown
        group)."""
        path = self.root / "kernel" / "iommu_groups" / str(group) / "devices"
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def find(self, vendor: int, device: int) -> list[str]:
        """Addresses of every function with these ids, sorted."""
        found: list[str] = []
        if not self.devices.is_dir():
            return found
        for address in sorted(os.listdir(self.devices)):
            try:
                if self.ids(address) == (vendor, device):
                    found.append(address)
            except (OSError, ValueError, VfioPciError):
                continue
        return found

    def _write(self, path: Path, text: str, what: str) -> None:
        try:
            path.write_text(text)
        except OSError as exc:
            hint = ("rebinding PCI devices needs root" if exc.errno in (errno.EACCES, errno.EPERM)
                    else "see dmesg for the driver's reason")
            raise vfio_error(exc.errno or errno.EIO, f"{what} ({path})", hint) from None

    def bind(self, address: str, driver: str = VFIO_PCI_DRIVER) -> None:
        """Hand ``address`` to ``driver``: ``driver_override``, unbind the current driver,
        ``drivers_probe`` -- then check it took.  A no-op if already bound to it.  Raises
        :class:`NoSuchDeviceError` for an unknown function, :class:`VfioPciError` when ``driver``
        is not loaded, a :class:`~virtq.errors.VirtqOSError` when a sysfs write fails (not root),
        and :class:`DeviceBoundError` when the function ended up bound elsewhere."""
        current = self.driver(address)
        if current == driver:
            return
        if not (self.drivers / driver).is_dir():
            hint = "modprobe vfio-pci" if driver == VFIO_PCI_DRIVER else f"load {driver}"
            raise VfioPciError(f"cannot bind {address}: driver {driver} is not loaded ({hint})",
                               address=address)
        d = self.device_dir(address)
        self._write(d / "driver_override", driver, f"setting driver_override of {address}")
        if current is not None:
            self._write(d / "driver" / "unbind", address, f"unbinding {address} from {current}")
        self._write(self.root / "bus" / "pci" / "drivers_probe", address,
                    f"probing {address} for {driver}")
        now = self.driver(address)
        if now != driver:
            raise DeviceBoundError(
                f"binding {address} to {driver} failed: it is bound to {now or 'no driver'} "
                "(dmesg says why; vfio-pci refuses devices without an IOMMU group)",
                address=address, driver=now)
