"""virtio-pci devices driven from user space through VFIO (VIRTIO 1.2 §4.1, Linux VFIO).

Open a function by PCI address, get a :class:`~virtq.transport.Transport`::

    from virtq.transport.vfio_pci import VfioPciTransport, find_virtio_devices
    address = find_virtio_devices(4)[0]          # virtio-rng, found by vendor:device id
    with VfioPciTransport.open(address, bind=True) as t:
        ...

See ``docs/vfio.md`` for the host set-up (IOMMU, vfio-pci, permissions).
"""

from virtq.transport.vfio_pci.caps import (
    MsixCap,
    VirtioCap,
    VirtioPciCaps,
    parse_virtio_caps,
    walk_capabilities,
)
from virtq.transport.vfio_pci.device import MmapBar, PioBar, VfioDevice, VfioGroup, Window
from virtq.transport.vfio_pci.errors import (
    BadCapabilityError,
    DeviceBoundError,
    DeviceResetTimeoutError,
    FeaturesRefusedError,
    GroupNotViableError,
    NoIommuGroupError,
    NoSuchDeviceError,
    NotVirtioError,
    QueueSizeError,
    VectorRefusedError,
    VfioNotFoundError,
    VfioOSError,
    VfioPciError,
    VfioPermissionError,
)
from virtq.transport.vfio_pci.sysfs import VFIO_PCI_DRIVER, PciSysfs, normalize_address
from virtq.transport.vfio_pci.transport import (
    REQUIRED_FEATURES,
    SUPPORTED_TRANSPORT_FEATURES,
    MemoryFactory,
    VfioPciTransport,
    find_virtio_devices,
)
from virtq.transport.vfio_pci.virtio import (
    COMMON_CFG,
    VIRTIO_MSI_NO_VECTOR,
    CommonCfg,
    VirtioPciFunction,
)

__all__ = [
    "COMMON_CFG",
    "REQUIRED_FEATURES",
    "SUPPORTED_TRANSPORT_FEATURES",
    "VFIO_PCI_DRIVER",
    "VIRTIO_MSI_NO_VECTOR",
    "BadCapabilityError",
    "CommonCfg",
    "DeviceBoundError",
    "DeviceResetTimeoutError",
    "FeaturesRefusedError",
    "GroupNotViableError",
    "MemoryFactory",
    "MmapBar",
    "MsixCap",
    "NoIommuGroupError",
    "NoSuchDeviceError",
    "NotVirtioError",
    "PciSysfs",
    "PioBar",
    "QueueSizeError",
    "VectorRefusedError",
    "VfioDevice",
    "VfioGroup",
    "VfioNotFoundError",
    "VfioOSError",
    "VfioPciError",
    "VfioPciTransport",
    "VfioPermissionError",
    "VirtioCap",
    "VirtioPciCaps",
    "VirtioPciFunction",
    "Window",
    "find_virtio_devices",
    "normalize_address",
    "parse_virtio_caps",
    "walk_capabilities",
]
