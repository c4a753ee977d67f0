"""IOVA allocation (reservation) and DMA mapping seams."""

from virtq.iova.allocators import (
    BumpAllocator,
    IdentityAllocator,
    IovaAllocator,
    RangeAllocator,
    TaggedAllocator,
)
from virtq.iova.mapper import DmaMapper, NullDmaMapper

__all__ = [
    "BumpAllocator",
    "DmaMapper",
    "IdentityAllocator",
    "IovaAllocator",
    "NullDmaMapper",
    "RangeAllocator",
    "TaggedAllocator",
]
