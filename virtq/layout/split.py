"""Split virtqueue layout (VIRTIO 1.2 §2.7, table in §2.7 "Virtqueue Part Alignment").

One contiguous region holds, in order:

=================  ===========  =======================  ===================================
part               alignment    size (bytes)             notes
=================  ===========  =======================  ===================================
descriptor table   16           16 * N                   ``struct virtq_desc`` [N]
available ring     2            6 + 2 * N                flags, idx, ring[N], used_event
used ring          4            6 + 8 * N                flags, idx, ring[N], avail_event
(legacy)           page_size    --                       used ring starts on a page boundary
per-slot buffers   see below    buffer_size * N          optional; crosvm UserQueue's layout
indirect tables    16           16 * indirect_size * N   optional; one table per head
=================  ===========  =======================  ===================================

The event-index words (``used_event``, ``avail_event``) are already inside the ring sizes;
nothing extra is needed for ``VIRTIO_F_EVENT_IDX`` (the seed's TODO saying otherwise was stale).
``nbytes`` is the end of the last part rounded up to ``page_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from virtq.errors import LayoutError
from virtq.layout._align import align_up, is_count, is_power_of_two
from virtq.types import Offset

DESC_SIZE = 16
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
USED_ELEM_SIZE = 8
MAX_SPLIT_QUEUE_SIZE = 32768
#: The largest buffer one descriptor describes (``len`` is a le32, VIRTIO 1.2 §2.7.5).
MAX_BUFFER_SIZE = 0xFFFFFFFF
#: Alignment of the buffer area when ``buffer_size`` is not a power of two (a cache line).
DEFAULT_BUFFER_ALIGN = 64


def avail_nbytes(queue_size: int) -> int:
    """Size of the available ring: flags, idx, ring[N], used_event (§2.7)."""
    return 6 + 2 * queue_size


def used_nbytes(queue_size: int) -> int:
    """Size of the used ring: flags, idx, ring[N] of 8-byte elements, avail_event (§2.7)."""
    return 6 + USED_ELEM_SIZE * queue_size


def check_page_size(page_size: int) -> None:
    """Raises :class:`~virtq.errors.LayoutError` unless ``page_size`` is a power of two >= 16
    (the descriptor table's alignment)."""
    if not is_count(page_size, DESC_ALIGN, 1 << 40) or not is_power_of_two(page_size):
        raise LayoutError("page_size", page_size, "must be a power of two >= 16")


def buffer_align(buffer_size: int, page_size: int) -> int:
    """The seed aligned its buffer area to the buffer size (1 KiB); keep that for powers of
    two (capped at a page), and use a cache line otherwise."""
    if is_power_of_two(buffer_size):
        return min(buffer_size, page_size)
    return DEFAULT_BUFFER_ALIGN


@dataclass(frozen=True, slots=True)
class SplitLayout:
    """Byte offsets of a split virtqueue's parts inside one region (all from byte 0)."""

    queue_size: int
    desc: Offset
    avail: Offset
    used: Offset
    buffers: Offset | None
    buffer_size: int
    indirect: Offset | None
    indirect_size: int
    nbytes: int
    page_size: int
    legacy: bool

    @classmethod
    def compute(
        cls,
        queue_size: int,
        *,
        buffer_size: int = 0,
        indirect_size: int = 0,
        page_size: int = 4096,
        legacy: bool = False,
    ) -> SplitLayout:
        """Lay out a split ring of ``queue_size`` entries.

        ``buffer_size``: bytes of fixed buffer per descriptor slot (0 = no buffer area).
        ``indirect_size``: entries of indirect descriptor table reserved per head (0 = none).
        ``legacy``: the pre-1.0 layout whose used ring starts on a ``page_size`` boundary
        (§2.7 "Legacy Interfaces: A Note on Virtqueue Layout").
        Raises :class:`~virtq.errors.LayoutError` for a queue size that is not a power of two in
        1..32768, a bad ``page_size``, a negative ``buffer_size`` or an ``indirect_size`` outside
        0..32768.
        """
        if (
            not is_count(queue_size, 1, MAX_SPLIT_QUEUE_SIZE)
            or not is_power_of_two(queue_size)
        ):
            raise LayoutError(
                "queue_size", queue_size, "split queue size must be a power of two in 1..32768"
            )
        check_page_size(page_size)
        # A buffer is one descriptor: its length is a le32 (§2.7.5).
        if not is_count(buffer_size, 0, MAX_BUFFER_SIZE):
            raise LayoutError("buffer_size", buffer_size, "must be an int in 0..2**32-1")
        if not is_count(indirect_size, 0, MAX_SPLIT_QUEUE_SIZE):
            raise LayoutError("indirect_size", indirect_size, "must be in 0..32768")

        desc = 0
        avail = align_up(desc + DESC_SIZE * queue_size, AVAIL_ALIGN)
        used_align = page_size if legacy else USED_ALIGN
        used = align_up(avail + avail_nbytes(queue_size), used_align)
        end = used + used_nbytes(queue_size)

        buffers: int | None = None
        if buffer_size:
            buffers = align_up(end, buffer_align(buffer_size, page_size))
            end = buffers + buffer_size * queue_size

        indirect: int | None = None
        if indirect_size:
            indirect = align_up(end, DESC_ALIGN)
            end = indirect + DESC_SIZE * indirect_size * queue_size

        return cls(
            queue_size=queue_size,
            desc=Offset(desc),
            avail=Offset(avail),
            used=Offset(used),
            buffers=None if buffers is None else Offset(buffers),
            buffer_size=buffer_size,
            indirect=None if indirect is None else Offset(indirect),
            indirect_size=indirect_size,
            nbytes=align_up(end, page_size),
            page_size=page_size,
            legacy=legacy,
        )

    def shifted(self, offset: int) -> SplitLayout:
        """The same layout placed ``offset`` bytes into a larger region (several queues
        sharing one region).  ``offset`` must keep every part's alignment.  Raises
        :class:`~virtq.errors.LayoutError` otherwise."""
        if offset < 0 or offset % self.page_size:
            raise LayoutError("offset", offset, f"must be a multiple of page_size "
                              f"{self.page_size}")
        return replace(
            self,
            desc=Offset(self.desc + offset),
            avail=Offset(self.avail + offset),
            used=Offset(self.used + offset),
            buffers=None if self.buffers is None else Offset(self.buffers + offset),
            indirect=None if self.indirect is None else Offset(self.indirect + offset),
            nbytes=self.nbytes + offset,
        )

    # Offsets of single fields, for tools that inspect a ring (the queue itself uses
    # precomputed views).
    @property
    def used_event(self) -> Offset:
        """``avail.used_event``: the word after ``avail.ring[N]`` (§2.7.10)."""
        return Offset(self.avail + 4 + 2 * self.queue_size)

    @property
    def avail_event(self) -> Offset:
        """``used.avail_event``: the word after ``used.ring[N]`` (§2.7.10)."""
        return Offset(self.used + 4 + USED_ELEM_SIZE * self.queue_size)

    def buffer(self, slot: int) -> Offset:
        """Offset of slot ``slot``'s fixed buffer.  Raises :class:`~virtq.errors.LayoutError`
        when the layout has no buffer area or ``slot`` is outside ``0..queue_size-1``."""
        if self.buffers is None:
            raise LayoutError("buffer_size", 0, "this layout has no per-slot buffers")
        if not 0 <= slot < self.queue_size:
            raise LayoutError("slot", slot, f"must be in 0..{self.queue_size - 1}")
        return Offset(self.buffers + slot * self.buffer_size)

    def indirect_table(self, head: int) -> Offset:
        """Offset of the indirect descriptor table reserved for ``head``.  Raises
        :class:`~virtq.errors.LayoutError` when the layout reserves no indirect tables or
        ``head`` is outside ``0..queue_size-1``."""
        if self.indirect is None:
            raise LayoutError("indirect_size", 0, "this layout reserves no indirect tables")
        if not 0 <= head < self.queue_size:
            raise LayoutError("head", head, f"must be in 0..{self.queue_size - 1}")
        return Offset(self.indirect + head * DESC_SIZE * self.indirect_size)
