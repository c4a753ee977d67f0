"""Memory regions a virtqueue lives in: one protocol, several backends.

The queue never allocates; it is built over a region you choose.  Regions hand out
zero-copy views and refuse to unmap while any view is alive.
"""

from virtq.memory.backends import (
    HUGEPAGE_2M,
    PAGE_SIZE,
    AnonymousRegion,
    HugepageRegion,
    MemfdRegion,
)
from virtq.memory.base import MemoryRegion, MmapRegion
from virtq.memory.vfio import IovaRangeError, VfioContainer, VfioDmaRegion

__all__ = [
    "HUGEPAGE_2M",
    "PAGE_SIZE",
    "AnonymousRegion",
    "HugepageRegion",
    "IovaRangeError",
    "MemfdRegion",
    "MemoryRegion",
    "MmapRegion",
    "VfioContainer",
    "VfioDmaRegion",
]
