"""Making reserved IOVAs real for the device."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from virtq.types import HostAddr, Iova


@runtime_checkable
class DmaMapper(Protocol):
    """Maps host memory at an IOVA so the device can reach it (VFIO ``MAP_DMA``, a
    vhost-user memory table entry, ...).  The crosvm seed's ``map_iova``."""

    def map(self, iova: Iova, host_addr: HostAddr, nbytes: int) -> None:
        """Make ``nbytes`` of host memory at ``host_addr`` reachable by the device at ``iova``.
        Implementations raise :class:`~virtq.errors.VirtqOSError` when the kernel refuses (VFIO
        ``MAP_DMA``)."""
        ...

    def unmap(self, iova: Iova, nbytes: int) -> None:
        """Undo :meth:`map` of the ``nbytes`` at ``iova``.  Implementations raise
        :class:`~virtq.errors.VirtqOSError` when the kernel refuses."""
        ...


class NullDmaMapper:
    """For peers that need no mapping (an in-process device, identity without an IOMMU).
    Records what was mapped so tests can check the calls."""

    def __init__(self) -> None:
        self.mapped: dict[int, tuple[int, int]] = {}

    def map(self, iova: Iova, host_addr: HostAddr, nbytes: int) -> None:
        """Record the mapping (nothing to tell a device).  Never raises."""
        self.mapped[iova] = (host_addr, nbytes)

    def unmap(self, iova: Iova, nbytes: int) -> None:
        """Forget the mapping at ``iova`` if there is one.  Never raises."""
        self.mapped.pop(iova, None)
