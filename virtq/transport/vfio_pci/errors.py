"""What goes wrong when a PCI function is driven through VFIO, one class per cause.

Each message says what was found and what to do about it.  OS refusals (no permission, a
group already open elsewhere) stay ``OSError``\\ s with the kernel's errno: they are the
:class:`~virtq._sys.vfio.VfioOSError` family, re-exported here.
"""

from __future__ import annotations

from virtq._sys.vfio import VfioNotFoundError, VfioOSError, VfioPermissionError
from virtq.errors import DeviceError, VirtqTimeoutError
from virtq.transport.errors import DeviceRefusedError, TransportError


class VfioPciError(TransportError):
    """Base of the VFIO/PCI set-up failures that are not an errno from the kernel."""

    def __init__(self, message: str, *, address: str | None = None) -> None:
        super().__init__(message)
        self.address = address


class NoSuchDeviceError(VfioPciError, LookupError):
    """No PCI function with that address exists."""


class NoIommuGroupError(VfioPciError):
    """The function has no IOMMU group: the kernel runs without an IOMMU (or it is off),
    so VFIO cannot isolate the device."""


class DeviceBoundError(VfioPciError):
    """The function is bound to another driver (``driver``) or to none, not ``vfio-pci``."""

    def __init__(self, message: str, *, address: str, driver: str | None) -> None:
        super().__init__(message, address=address)
        self.driver = driver


class GroupNotViableError(VfioPciError):
    """Another device in the IOMMU group is bound to a kernel driver that does DMA, so the
    group cannot be handed to user space.  ``members`` maps each device of the group to its
    driver (None: unbound)."""

    def __init__(self, message: str, *, address: str, group: int,
                 members: dict[str, str | None]) -> None:
        super().__init__(message, address=address)
        self.group = group
        self.members = members


class NotVirtioError(VfioPciError):
    """The function is not a modern (VIRTIO 1.x) virtio-pci device."""


class BadCapabilityError(VfioPciError, DeviceError):
    """The device's PCI capabilities break the rules of VIRTIO 1.2 §4.1.4 (a loop, a window
    outside its BAR, a missing common/notify structure, ...)."""


class FeaturesRefusedError(DeviceRefusedError):
    """The device did not keep FEATURES_OK set after the driver wrote its features
    (§3.1.1 step 6): it cannot work with that subset."""

    def __init__(self, message: str, *, features: int, status: int) -> None:
        super().__init__(message)
        self.features = features
        self.status = status


class QueueSizeError(DeviceRefusedError):
    """The device does not allow that queue size (above its maximum, or not read back)."""

    def __init__(self, message: str, *, index: int, size: int, maximum: int) -> None:
        super().__init__(message)
        self.index = index
        self.size = size
        self.maximum = maximum


class VectorRefusedError(DeviceRefusedError):
    """The device read back ``VIRTIO_MSI_NO_VECTOR`` for an MSI-X vector it was given
    (§4.1.5.1.2: it could not allocate it)."""


class DeviceResetTimeoutError(VfioPciError, DeviceError, VirtqTimeoutError):
    """The device did not read back status 0 after a reset (§2.1.2)."""


__all__ = [
    "BadCapabilityError",
    "DeviceBoundError",
    "DeviceResetTimeoutError",
    "FeaturesRefusedError",
    "GroupNotViableError",
    "NoIommuGroupError",
    "NoSuchDeviceError",
    "NotVirtioError",
    "QueueSizeError",
    "VectorRefusedError",
    "VfioNotFoundError",
    "VfioOSError",
    "VfioPciError",
    "VfioPermissionError",
]
