"""Pure ring arithmetic: sizes, offsets, alignments and 16-bit index helpers.

No ctypes instances, no mmap, no I/O -- so it can be used to plan memory before any exists,
and tested exhaustively.
"""

from virtq.layout._align import align_up, is_power_of_two
from virtq.layout.index import U16_MASK, distance, need_event, wrap_add
from virtq.layout.packed import MAX_PACKED_QUEUE_SIZE, PackedLayout
from virtq.layout.split import (
    MAX_SPLIT_QUEUE_SIZE,
    SplitLayout,
    avail_nbytes,
    used_nbytes,
)

__all__ = [
    "MAX_PACKED_QUEUE_SIZE",
    "MAX_SPLIT_QUEUE_SIZE",
    "U16_MASK",
    "PackedLayout",
    "SplitLayout",
    "align_up",
    "avail_nbytes",
    "distance",
    "is_power_of_two",
    "need_event",
    "used_nbytes",
    "wrap_add",
]
