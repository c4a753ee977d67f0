"""The driver side of a split virtqueue (VIRTIO 1.2 §2.7), sans-I/O.

:class:`SplitQueue` is built *over* memory you own: a :class:`~virtq.memory.MemoryRegion`, a
:class:`~virtq.layout.SplitLayout` saying where each part lives inside it, and the IOVA the
device uses for the region's byte 0.  It never allocates, never writes an eventfd or a
doorbell: :meth:`SplitQueue.publish` *returns* whether the device wants a notification and
the transport acts on it.

Trust model: the device is an untrusted peer.  Everything the driver needs to know about its
own chains (free list, per-head token, descriptor indices, writable capacity) is shadowed in
Python and never read back from shared memory; every value the device writes (``used.idx``,
``used.ring[].id``/``len``, ``used.flags``, ``avail_event``) passes one ingress point,
:meth:`SplitQueue._reap`, before it is acted on.  A violation raises
:class:`~virtq.errors.DeviceProtocolError` and marks the queue broken: every later operation
raises :class:`~virtq.errors.QueueBrokenError` until :meth:`SplitQueue.reset`.

Memory ordering (see ``docs/memory-ordering.md``): descriptors and ``avail.ring[]`` are
written before :func:`publish_barrier` and the single 2-byte ``avail.idx`` store; the
notification decision reads ``used.flags``/``avail_event`` only after :func:`full_fence`;
reaping reads ``used.idx`` once, then :func:`observe_barrier`, then the elements.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from virtq._sys.fence import (
    OBSERVE_BARRIER_NEEDED,
    PUBLISH_BARRIER_NEEDED,
    full_fence,
    observe_barrier,
    publish_barrier,
)
from virtq.abi import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    VirtqDesc,
    avail_ring_type,
    used_ring_type,
)
from virtq.errors import (
    ArgumentError,
    DeviceError,
    DeviceProtocolError,
    LayoutError,
    QueueBrokenError,
    QueueFullError,
    QueueStateError,
    VirtqError,
)
from virtq.layout import SplitLayout, distance, need_event, wrap_add
from virtq.layout.split import DESC_SIZE, avail_nbytes, used_nbytes
from virtq.memory import MemoryRegion
from virtq.types import Iova

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
    raise ImportError(
        "virtq.queue maps ring fields with native-endian memoryview casts; virtio 1.x rings "
        "are little-endian, so this host is not supported"
    )

#: One buffer of a chain: ``(iova, length)``.
Buffer = tuple[int, int]

# addr, len, flags, next (struct virtq_desc, §2.7.5); one call writes a whole descriptor.
_PACK_DESC = struct.Struct("<QIHH").pack_into
_U32_LIMIT = 1 << 32
_SEQUENTIAL = list(range(32769))  # indirect table entries are chained 0 -> 1 -> 2 ...
_U64_LIMIT = 1 << 64
#: Shadow state of an in-flight head: (token, writable capacity, other descriptors --
#: None for a reserved chain --, avail index at add time).
_HeadState = tuple[Any, int, tuple[int, ...] | None, int]

#: Public operations that are replaced by raisers once the queue is closed or broken.
_GUARDED = (
    "add", "add_many", "add_reserved", "add_reserved_many", "publish", "pop_used", "drain_used",
    "disable_interrupts", "enable_interrupts", "enable_interrupts_after",
    "enable_interrupts_delayed", "kick_needed",
)


class SplitQueue:
    """A split virtqueue, driver side.

    ``iova`` is the device-visible address of the region's byte 0 (so ``desc_iova`` is
    ``iova + layout.desc``).  ``start_index`` seeds ``avail.idx``, ``used.idx`` and the shadow
    counters -- vhost-user's SET_VRING_BASE uses it, and so do tests that want the u16
    wrap-around within a handful of operations.  With ``indirect=True`` chains of more than
    one buffer go into the per-head indirect tables that ``layout`` reserves
    (``SplitLayout.compute(..., indirect_size=K)``).
    """

    #: Operations replaced by raisers once the queue is closed or broken (subclasses add
    #: theirs).
    _guarded: tuple[str, ...] = _GUARDED
    #: The memoryviews close() releases (subclasses add theirs).
    _views: tuple[str, ...] = ("_avail", "_used_h", "_used_q", "_desc_w", "_desc_mem",
                               "_mem_h")

    def __init__(
        self,
        region: MemoryRegion,
        layout: SplitLayout,
        *,
        iova: Iova,
        event_idx: bool = False,
        indirect: bool = False,
        start_index: int = 0,
        strict_len: bool = True,
    ) -> None:
        if region.nbytes < layout.nbytes:
            raise LayoutError(
                "layout.nbytes", layout.nbytes, f"exceeds the region's {region.nbytes} bytes"
            )
        if indirect and not layout.indirect_size:
            raise LayoutError(
                "indirect", indirect,
                "needs a layout with indirect tables: SplitLayout.compute(..., indirect_size=K)",
            )
        if not isinstance(start_index, int) or not 0 <= start_index <= 0xFFFF:
            raise ArgumentError("start_index", start_index, "must be a u16 (0..65535)")
        if not isinstance(iova, int) or not 0 <= iova < _U64_LIMIT:
            raise ArgumentError("iova", iova, "must be a u64")
        n = layout.queue_size
        self.region = region
        self.layout = layout
        self.size = n
        self.event_idx = event_idx
        self.indirect = indirect
        self.strict_len = strict_len
        self.iova = iova
        self.desc_iova = Iova(iova + layout.desc)
        self.avail_iova = Iova(iova + layout.avail)
        self.used_iova = Iova(iova + layout.used)
        self._mask = n - 1

        # Zero-copy views.  Each index field is read/written as its own 2-byte element so
        # no access ever tears or spans a neighbouring field (spec-notes §4.3).
        self._mem = region.view(0, layout.nbytes)
        self._desc_mem = self._mem[layout.desc : layout.desc + DESC_SIZE * n]
        # avail as u16[]: [0] flags, [1] idx, [2 + i] ring[i], [2 + n] used_event
        self._avail = self._mem[layout.avail : layout.avail + avail_nbytes(n)].cast("H")
        used_mem = self._mem[layout.used : layout.used + used_nbytes(n)]
        # used as u16[]: [0] flags, [1] idx, [2 + 4n] avail_event
        self._used_h = used_mem.cast("H")
        # used elements as u64[]: ring[i] = id | len << 32, one load per element
        self._used_q = used_mem[4 : 4 + 8 * n].cast("Q")
        self._mem_h = self._mem.cast("H")  # 2-byte stores anywhere in the rings' region
        self._desc_w = self._desc_mem.cast("I")  # descriptor i's len at [4 * i + 2]
        self._layout_desc = layout.desc
        self._indirect_base = layout.indirect
        self._indirect_size = layout.indirect_size
        self._idx_used_event = 2 + n
        self._idx_avail_event = 2 + 4 * n
        self._reset_state(start_index)

    # -- set-up ---------------------------------------------------------------------------

    def _reset_state(self, start_index: int) -> None:
        n = self.size
        # The driver zeroes the rings (§2.7: "The driver MUST initialize ... used.flags to 0";
        # a recycled region may hold a previous queue's state).
        self._desc_mem[:] = bytes(len(self._desc_mem))
        self._avail[:] = memoryview(bytes(2 * len(self._avail))).cast("H")
        self._used_h[:] = memoryview(bytes(2 * len(self._used_h))).cast("H")
        # Both indices start at start_index; so do the event words, so the first publish and
        # the first completion notify even before the peer has written its event word.
        self._avail[1] = start_index
        self._used_h[1] = start_index
        self._avail[self._idx_used_event] = start_index
        self._used_h[self._idx_avail_event] = start_index
        self.next_avail = start_index  # shadow avail.idx, including added-but-unpublished
        self.published = start_index  # last value stored to avail.idx
        self.last_used = start_index  # next used.ring slot to reap
        # Reservations survive reset() (the caller rewrites its chains: the table was zeroed).
        self._reserved: bytearray = getattr(self, "_reserved", None) or bytearray(n)
        # stack of free descriptors
        self._free: list[int] = [d for d in range(n - 1, -1, -1) if not self._reserved[d]]
        # Per head: None when not in flight, else (token, writable capacity, the chain's
        # other descriptors, the avail index it was added at) -- one tuple, one store.
        self._state: list[_HeadState | None] = [None] * n
        self._interrupts = True
        self._broken: DeviceError | None = None
        for name in self._guarded:
            self.__dict__.pop(name, None)

    def reset(self, start_index: int | None = None) -> list[Any]:
        """Forget every chain and re-initialise the rings; returns the tokens that were in
        flight (in no particular order) so the caller can fail them.

        Only valid while the device is not using the rings (after a device reset, after a
        vhost-user backend died, before SET_VRING_BASE on a reconnect).  ``start_index``
        defaults to the current ``next_avail``, so a reconnecting backend told
        ``SET_VRING_BASE(next_avail)`` carries on where the old one stopped.
        """
        if self._mem is None:
            raise QueueStateError("queue is closed")
        lost = self.in_flight_tokens()
        self._reset_state(self.next_avail if start_index is None else start_index)
        return lost

    # -- properties -------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Free descriptors (a direct chain of k buffers needs k, an indirect one 1)."""
        return len(self._free)

    @property
    def num_in_flight(self) -> int:
        """Chains added and not yet reaped (published or not)."""
        return distance(self.last_used, self.next_avail)

    def in_flight_tokens(self) -> list[Any]:
        """The tokens of the chains added and not yet reaped (published or not), in head
        order -- for a driver that must fail them when its transport dies."""
        return [st[0] for st in self._state if st is not None]

    def _in_flight_heads(self) -> list[int]:
        return [h for h, st in enumerate(self._state) if st is not None]

    @property
    def broken(self) -> DeviceError | None:
        """The device error that broke the queue, or ``None``."""
        return self._broken

    # -- adding buffers -----------------------------------------------------------------

    def add(
        self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: Any = None
    ) -> int:
        """Add one chain: ``readable`` buffers (device reads them) then ``writable`` ones
        (device writes them), each ``(iova, length)`` -- the order §2.7.4.2 requires.
        Returns the head descriptor index.  Not visible to the device until
        :meth:`publish`.  ``token`` comes back from :meth:`pop_used`.

        Raises :class:`QueueFullError` (with ``needed``/``free``) when the chain does not fit
        and :class:`ArgumentError` for a malformed buffer.  On error the queue's state (free
        list, avail ring, indices, in-flight chains) is unchanged.
        """
        free = self._free
        nr = len(readable)
        if nr + len(writable) == 1 and free:
            # Fast path: one buffer, one descriptor.
            buf = readable[0] if nr else writable[0]
            try:
                iova, length = buf
                ok = length > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                _bad_buffer(buf)
            head = free[-1]
            try:
                # struct's range checks reject iova outside u64, length outside u32, and
                # non-integers.
                _PACK_DESC(self._desc_mem, head << 4, iova, length,
                           0 if nr else VIRTQ_DESC_F_WRITE, 0)
            except struct.error:
                _bad_buffer(buf)
            free.pop()
            state: _HeadState = (token, 0 if nr else length, (), self.next_avail)
        else:
            head, state = self._add_chain(readable, writable, token)
        idx = self.next_avail
        self._avail[2 + (idx & self._mask)] = head
        self._state[head] = state
        self.next_avail = (idx + 1) & 0xFFFF
        return head

    def add_many(self, chains: Sequence[tuple[Sequence[Buffer], Sequence[Buffer], Any]]) -> int:
        """Add several ``(readable, writable, token)`` chains in one call; returns how many.

        All or nothing: if they do not all fit, :class:`QueueFullError` is raised and none is
        added (likewise for a malformed buffer).  Same semantics as calling :meth:`add` for
        each, at a lower per-chain cost (one Python frame for the whole batch).
        """
        free = self._free
        needed = 0
        one_desc = True
        for readable, writable, _ in chains:
            k = len(readable) + len(writable)
            if k != 1:
                one_desc = False
                k = 1 if self.indirect and k > 1 else k
            needed += k
        if needed > len(free):
            raise QueueFullError(needed, len(free))
        if not one_desc:
            start = self._checkpoint()
            try:
                for readable, writable, token in chains:
                    self.add(readable, writable, token)
            except BaseException:
                self._rollback(start)
                raise
            return len(chains)
        # Every chain is one descriptor.  avail.ring entries past next_avail are invisible
        # to the device until publish(), so on a bad buffer only the shadow state written
        # so far needs undoing.
        desc_mem = self._desc_mem
        avail = self._avail
        state = self._state
        mask = self._mask
        idx = self.next_avail
        top = len(free)
        head = 0
        try:
            for readable, writable, token in chains:
                top -= 1
                head = free[top]
                if readable:
                    buf = readable[0]
                    iova, length = buf
                    _PACK_DESC(desc_mem, head << 4, iova, length, 0, 0)
                    state[head] = (token, 0, (), idx)
                else:
                    buf = writable[0]
                    iova, length = buf
                    _PACK_DESC(desc_mem, head << 4, iova, length, VIRTQ_DESC_F_WRITE, 0)
                    state[head] = (token, length, (), idx)
                if not length > 0:
                    raise ValueError
                avail[2 + (idx & mask)] = head
                idx = (idx + 1) & 0xFFFF
        except (TypeError, ValueError, struct.error):
            for undo in free[top:]:
                state[undo] = None
            _bad_buffer(buf)
        del free[top:]
        self.next_avail = idx
        return needed

    def _checkpoint(self) -> tuple[int, list[int]]:
        return self.next_avail, list(self._free)

    def _rollback(self, start: tuple[int, list[int]]) -> None:
        """Undo unpublished adds since ``start`` (used by add_many's all-or-nothing)."""
        next_avail, free = start
        idx = next_avail
        while idx != self.next_avail:
            head = self._avail[2 + (idx & self._mask)]
            self._state[head] = None
            idx = (idx + 1) & 0xFFFF
        self.next_avail = next_avail
        self._free[:] = free

    def _add_chain(
        self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: Any
    ) -> tuple[int, _HeadState]:
        count = len(readable) + len(writable)
        if count == 0:
            raise ArgumentError("buffers", count, "a chain needs at least one buffer")
        free = self._free
        if self.indirect and count > 1:
            if count > self._indirect_size:
                raise ArgumentError(
                    "buffers", count,
                    f"chain longer than the {self._indirect_size}-entry indirect table",
                )
            if not free:
                raise QueueFullError(1, 0)
            head = free[-1]
            table = self._indirect_base + head * DESC_SIZE * self._indirect_size  # type: ignore[operator]
            # Entries are chained 0 -> 1 -> ... inside the table (§2.7.5.3.2).
            capacity = self._write_chain(table, _SEQUENTIAL[: count + 1], readable, writable)
            # §2.7.5.3.1: the device ignores WRITE on the descriptor that points to a table.
            _PACK_DESC(self._desc_mem, head << 4, self.iova + table, DESC_SIZE * count,
                       VIRTQ_DESC_F_INDIRECT, 0)
            free.pop()
            return head, (token, capacity, (), self.next_avail)
        if count > len(free):
            raise QueueFullError(count, len(free))
        descs = free[-count:]
        descs.append(0)  # "next" of the last descriptor
        capacity = self._write_chain(self._layout_desc, descs, readable, writable)
        del free[-count:]
        return descs[0], (token, capacity, tuple(descs[1:count]), self.next_avail)

    def _write_chain(
        self, base: int, chain: list[int], readable: Sequence[Buffer], writable: Sequence[Buffer]
    ) -> int:
        """Write descriptors ``chain[:-1]`` (at ``base + 16 * d`` in the region), each linked
        to the next with NEXT; returns the writable capacity.  Raises ArgumentError for a
        malformed buffer before the caller commits anything (what was written so far sits
        in free slots nobody reads)."""
        mem = self._mem
        total = 0
        capacity = 0
        i = 0
        buf: object = None
        try:
            for buf in readable:
                iova, length = buf
                if not length > 0:
                    raise ValueError
                _PACK_DESC(mem, base + (chain[i] << 4), iova, length, VIRTQ_DESC_F_NEXT,
                           chain[i + 1])
                total += length
                i += 1
            for buf in writable:
                iova, length = buf
                if not length > 0:
                    raise ValueError
                _PACK_DESC(mem, base + (chain[i] << 4), iova, length,
                           VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, chain[i + 1])
                capacity += length
                i += 1
        except (TypeError, ValueError, struct.error):
            _bad_buffer(buf)
        # The last descriptor ends the chain: clear its NEXT (flags at byte 12, §2.7.5).
        self._mem_h[(base + (chain[i - 1] << 4) + 12) >> 1] = (
            VIRTQ_DESC_F_WRITE if writable else 0
        )
        if total + capacity >= _U32_LIMIT:  # §2.7.5.3.1: total length fits in 32 bits
            raise ArgumentError(
                "buffers", total + capacity, "a chain's total length must be < 2**32")
        return capacity

    # -- caller-built (persistent) chains -------------------------------------------------

    def reserve(self, count: int) -> list[int]:
        """Take ``count`` descriptors out of the free list for chains the caller builds and
        keeps (a driver whose requests always have the same shape rewrites only what
        changes, instead of building a chain per request).  Write them with
        :meth:`set_desc`, submit with :meth:`add_reserved`; they never return to the free
        list."""
        free = self._free
        if not 0 < count <= len(free):
            raise QueueFullError(count, len(free))
        taken = free[-count:]
        del free[-count:]
        for d in taken:
            self._reserved[d] = 1
        return taken[::-1]

    def set_desc(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Write reserved descriptor ``index`` (not while its chain is in flight)."""
        if not 0 <= index < self.size or not self._reserved[index]:
            raise ArgumentError("index", index, "not a reserved descriptor (see reserve())")
        if self._state[index] is not None:
            raise QueueStateError(f"descriptor {index} heads a chain in flight")
        if not 0 <= next_ < self.size:
            raise ArgumentError("next_", next_, f"must be in 0..{self.size - 1}")
        try:
            _PACK_DESC(self._desc_mem, index << 4, addr, length, flags, next_)
        except struct.error:
            _bad_buffer((addr, length))

    def add_reserved(self, head: int, token: Any, capacity: int) -> None:
        """Make the caller-built chain at reserved descriptor ``head`` available (visible
        after :meth:`publish`).  ``capacity`` is its device-writable byte count, against
        which the device's ``len`` is validated.  On completion the descriptors stay
        reserved."""
        states = self._state
        if not 0 <= head < self.size or not self._reserved[head] or states[head] is not None:
            if 0 <= head < self.size and self._reserved[head]:
                raise QueueStateError(f"chain {head} is already in flight")
            raise ArgumentError("head", head, "not a reserved descriptor (see reserve())")
        idx = self.next_avail
        self._avail[2 + (idx & self._mask)] = head
        states[head] = (token, capacity, None, idx)
        self.next_avail = (idx + 1) & 0xFFFF

    def add_reserved_many(self, heads: Sequence[int], lengths: Sequence[int] | None = None,
                          *, capacity: int = 0, tokens: Sequence[Any] | None = None) -> None:
        """Submit several caller-built chains at once; each one's token is its head, or the
        matching entry of ``tokens`` (not together with ``lengths``).

        With ``lengths``, first rewrite the ``len`` field of each head descriptor (for
        one-descriptor chains over fixed buffers: a transmit ring writes a frame into its
        slot and only the length changes).  ``capacity`` applies to every chain.  All or
        nothing: on a bad head or length nothing is submitted.
        """
        reserved = self._reserved
        states = self._state
        avail = self._avail
        desc_w = self._desc_w
        mask = self._mask
        n = self.size
        count = len(heads)
        if not count:
            return
        # Range checks with C-level min/max first; the loops below run once per chain and
        # keep only what must be per chain (CPython pays per line).
        if not (min(heads) >= 0 and max(heads) < n):
            bad = next(h for h in heads if not 0 <= h < n)
            raise ArgumentError("heads", bad, "must be reserved descriptors, each not in flight")
        if lengths is not None:
            if len(lengths) != count:
                raise ArgumentError("lengths", len(lengths), f"one per head ({count})")
            if not (min(lengths) > 0 and max(lengths) < _U32_LIMIT):
                bad = next(x for x in lengths if not 0 < x < _U32_LIMIT)
                raise ArgumentError("lengths", bad, "must be in 1..2**32-1")
        if tokens is not None and len(tokens) != count:
            raise ArgumentError("tokens", len(tokens), f"one per head ({count})")
        if tokens is not None and lengths is not None:
            raise ArgumentError("tokens", len(tokens), "not together with lengths")
        start = pos = self.next_avail
        # One loop per combination: each runs once per chain, and a zip over an argument
        # that was not given would cost every chain.
        try:
            if tokens is not None:
                for head, token in zip(heads, tokens, strict=True):
                    if not reserved[head] or states[head] is not None:
                        raise ArgumentError(
                            "heads", head, "must be reserved descriptors, each not in flight")
                    avail[2 + (pos & mask)] = head
                    states[head] = (token, capacity, None, pos & 0xFFFF)
                    pos += 1
            elif lengths is None:
                for head in heads:
                    if not reserved[head] or states[head] is not None:
                        raise ArgumentError(
                            "heads", head, "must be reserved descriptors, each not in flight")
                    avail[2 + (pos & mask)] = head
                    states[head] = (head, capacity, None, pos & 0xFFFF)
                    pos += 1
            else:
                for head, length in zip(heads, lengths, strict=True):
                    if not reserved[head] or states[head] is not None:
                        raise ArgumentError(
                            "heads", head, "must be reserved descriptors, each not in flight")
                    desc_w[(head << 2) + 2] = length  # virtq_desc.len at byte 8 (§2.7.5)
                    avail[2 + (pos & mask)] = head
                    states[head] = (head, capacity, None, pos & 0xFFFF)
                    pos += 1
        except BaseException:
            # Entries past next_avail are invisible until publish(): only undo the shadow.
            for head in heads[: pos - start]:
                states[head] = None
            raise
        self.next_avail = pos & 0xFFFF

    def publish(self) -> bool:
        """Expose every added chain to the device with one ``avail.idx`` store.

        Returns True when the device wants an available-buffer notification (§2.7.10:
        ``used.flags`` lacks ``VIRTQ_USED_F_NO_NOTIFY``, or with event idx
        ``vring_need_event(avail_event, new, old)``).  Returns False when nothing was added.
        """
        new = self.next_avail
        old = self.published
        if new == old:
            return False
        # Descriptors and ring entries must be visible before the index (§2.7.13.3.1 step 4).
        if PUBLISH_BARRIER_NEEDED:
            publish_barrier()
        self._avail[1] = new
        self.published = new
        # The decision below loads what the device wrote; it must not be satisfied before the
        # idx store is globally visible, or a device that just went to sleep is never woken.
        full_fence()
        if self.event_idx:
            return need_event(self._used_h[self._idx_avail_event], new, old)
        return not self._used_h[0] & VIRTQ_USED_F_NO_NOTIFY

    def kick_needed(self) -> bool:
        """Re-evaluate the notification decision for everything published so far (for a
        transport that wants to re-check after a spurious wake-up).  Always notifying is also
        correct: devices must tolerate spurious notifications."""
        full_fence()
        if self.event_idx:
            return need_event(self._used_h[self._idx_avail_event], self.published,
                              wrap_add(self.published, -1))
        return not self._used_h[0] & VIRTQ_USED_F_NO_NOTIFY

    # -- reaping ------------------------------------------------------------------------------

    def pop_used(self) -> tuple[Any, int] | None:
        """The next completed chain as ``(token, written_len)``, or None.

        Completions arrive in whatever order the device chooses.  ``written_len`` is what the
        device reported writing into the chain's device-writable part (validated against its
        capacity).
        """
        used_idx = self._used_h[1]
        if used_idx == self.last_used:
            return None
        got = self._reap(used_idx, 1)
        return got[0]

    def drain_used(self) -> list[tuple[Any, int]]:
        """All completed chains, in used-ring order (reads ``used.idx`` once)."""
        used_idx = self._used_h[1]
        if used_idx == self.last_used:
            return []
        return self._reap(used_idx, distance(self.last_used, used_idx))

    def _reap(self, used_idx: int, count: int) -> list[tuple[Any, int]]:
        """The single ingress point for device-written used-ring state."""
        last_used = self.last_used
        published = self.published
        # used.idx may run ahead of last_used by at most the number of published chains.
        if ((used_idx - last_used) & 0xFFFF) > ((published - last_used) & 0xFFFF):
            self._fail(DeviceProtocolError(
                "used.idx", used_idx,
                f"at most {distance(last_used, published)} ahead of last_used "
                f"{last_used:#x} (published avail.idx {published:#x})",
            ), [])
        # Read the elements only after the index that announced them (§2.7.14).
        if OBSERVE_BARRIER_NEEDED:
            observe_barrier()
        used_q = self._used_q
        states = self._state
        mask = self._mask
        n = self.size
        free = self._free
        strict = self.strict_len
        # Chains added but not yet published are invisible to the device; only when some
        # exist must each completion be checked against them.
        unpublished = (self.next_avail - published) & 0xFFFF
        out: list[tuple[Any, int]] = []
        # The elements as ints, in one C call per contiguous run of the ring: each is id
        # and len in one 8-byte load (both written before used.idx).
        elems = _ring_run(used_q, last_used & mask, count, n)
        for elem in elems:
            head = elem & 0xFFFFFFFF
            try:
                # IndexError: no such head; TypeError: unpacking None, a head not in
                # flight.  (Exceptions cost nothing until raised; an explicit check would
                # cost on every completion.)
                token, capacity, rest, position = states[head]  # type: ignore[misc]
            except (IndexError, TypeError):
                self._fail_at(len(out), "id", head, f"a head in flight (queue size {n})", out)
            if unpublished and ((position - published) & 0xFFFF) < unpublished:
                self._fail_at(len(out), "id", head, "a head that has been published", out)
            length = elem >> 32
            if length > capacity and strict:
                self._fail_at(len(out), "len", length,
                              f"<= {capacity}, the writable capacity of head {head}", out)
            out.append((token, length))
            states[head] = None
            if rest is not None:  # None: a reserved chain, which stays the caller's
                free.append(head)
                if rest:
                    free.extend(rest)
        self.last_used = (last_used + count) & 0xFFFF
        return out

    # -- interrupt (used-buffer notification) control ------------------------------------

    def disable_interrupts(self) -> None:
        """Ask the device not to send used-buffer notifications (advisory, §2.7.10)."""
        self._interrupts = False
        if self.event_idx:
            # used_event one behind last_used: the device notifies only after 65536 more.
            self._avail[self._idx_used_event] = wrap_add(self.last_used, -1)
        else:
            self._avail[0] = VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_interrupts(self) -> bool:
        """Ask for used-buffer notifications again.  Returns True if used entries arrived
        meanwhile: the caller must poll again instead of sleeping (the race of §2.7.13.5 --
        the device may have completed a buffer after the last poll and before it could see
        this request, and will not notify for it)."""
        self._interrupts = True
        if self.event_idx:
            self._avail[self._idx_used_event] = self.last_used
        else:
            self._avail[0] = 0
        # Store (flags/used_event) -> load (used.idx): needs a full fence.
        full_fence()
        return bool(self._used_h[1] != self.last_used)

    def enable_interrupts_after(self, count: int) -> bool:
        """Ask for a used-buffer notification only once ``count`` more chains have
        completed (event idx: ``used_event = last_used + count - 1``, §2.7.10; without event
        idx the device cannot be told, so this is :meth:`enable_interrupts`).  ``count`` is
        clamped to the chains published and not yet reaped, so the wake-up it asks for can
        happen.  Returns True if ``count`` completions are already there (reap instead of
        sleeping: the §2.7.13.5 race)."""
        if not self.event_idx:
            return self.enable_interrupts()
        self._interrupts = True
        last_used = self.last_used
        count = max(1, min(count, (self.published - last_used) & 0xFFFF))
        self._avail[self._idx_used_event] = (last_used + count - 1) & 0xFFFF
        full_fence()  # store used_event -> load used.idx (§2.7.13.5)
        return ((self._used_h[1] - last_used) & 0xFFFF) >= count

    def enable_interrupts_delayed(self) -> bool:
        """:meth:`enable_interrupts_after` about 3/4 of the chains in flight (Linux
        ``virtqueue_enable_cb_delayed``): one wake-up per batch instead of one per
        completion."""
        return self.enable_interrupts_after(
            ((self.published - self.last_used) & 0xFFFF) * 3 // 4 + 1)

    def has_used(self) -> bool:
        """True when the device has published completions not yet reaped."""
        return bool(self._used_h[1] != self.last_used)

    # -- failure and teardown -----------------------------------------------------------

    def _fail_at(self, k: int, part: str, value: int, expected: str,
                 completed: list[tuple[Any, int]]) -> NoReturn:
        """Element ``k`` of the batch being reaped has a bad ``part`` (id or len):
        ``last_used`` stops at it, so it and what follows are never reaped."""
        pos = (self.last_used + k) & 0xFFFF
        self.last_used = pos
        self._fail(DeviceProtocolError(f"used.ring[{pos & self._mask}].{part}", value,
                                       expected), completed)

    def _fail(self, err: DeviceProtocolError, completed: list[tuple[Any, int]]) -> NoReturn:
        # Completions validated before the bad element are handed over on the error, so no
        # token is lost: they are neither returned by reset() nor reaped again.
        err.completed = completed
        self._broken = err
        self._disable(lambda: QueueBrokenError(err))
        raise err

    def _disable(self, make_error: Callable[[], VirtqError]) -> None:
        # Instance attributes shadow the methods, so the hot paths need no state check.
        def refuse(*args: object, **kwargs: object) -> NoReturn:
            raise make_error()

        for name in self._guarded:
            setattr(self, name, refuse)

    def close(self) -> None:
        """Release the views of the region (idempotent), so the region can be closed."""
        if self._mem is None:
            return
        for name in self._views:
            getattr(self, name).release()
        self._mem.release()
        self._mem = None  # type: ignore[assignment]
        self._disable(lambda: QueueStateError("queue is closed"))

    def __enter__(self) -> SplitQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inspection ---------------------------------------------------------------------

    def ring(self) -> SplitRingView:
        """ctypes structures laid over the live rings (for inspection and tools; release
        with ``close()`` on the returned view before closing the region)."""
        if self._mem is None:
            raise QueueStateError("queue is closed")
        return SplitRingView(self._mem, self.layout)

    def snapshot(self) -> dict[str, Any]:
        """Driver state and ring indices as a plain dict (for logs, tests, the CLI)."""
        closed = self._mem is None
        return {
            "size": self.size,
            "next_avail": self.next_avail,
            "published": self.published,
            "last_used": self.last_used,
            "num_free": self.num_free,
            "num_in_flight": self.num_in_flight,
            "in_flight_heads": self._in_flight_heads(),
            "event_idx": self.event_idx,
            "indirect": self.indirect,
            "interrupts": self._interrupts,
            "broken": None if self._broken is None else str(self._broken),
            "closed": closed,
            "desc_iova": self.desc_iova,
            "avail_iova": self.avail_iova,
            "used_iova": self.used_iova,
            "avail.flags": None if closed else self._avail[0],
            "avail.idx": None if closed else self._avail[1],
            "avail.used_event": None if closed else self._avail[self._idx_used_event],
            "used.flags": None if closed else self._used_h[0],
            "used.idx": None if closed else self._used_h[1],
            "used.avail_event": None if closed else self._used_h[self._idx_avail_event],
        }

    def describe(self) -> str:
        """A human-readable dump of the driver state and the live rings."""
        snap = self.snapshot()
        lines = [
            f"{type(self).__name__} size={self.size} desc@{self.desc_iova:#x} "
            f"avail@{self.avail_iova:#x} used@{self.used_iova:#x} event_idx={self.event_idx} "
            f"indirect={self.indirect}",
            f"  driver: next_avail={snap['next_avail']:#06x} published={snap['published']:#06x} "
            f"last_used={snap['last_used']:#06x} free={snap['num_free']} "
            f"in_flight={snap['num_in_flight']} broken={snap['broken']}",
        ]
        if self._mem is None:
            lines.append("  (closed)")
            return "\n".join(lines)
        view = self.ring()
        try:
            avail, used = view.avail, view.used
            lines.append(f"  avail: flags={avail.flags:#x} idx={avail.idx:#06x} "
                         f"used_event={avail.used_event:#06x}")
            lines.append(f"  used:  flags={used.flags:#x} idx={used.idx:#06x} "
                         f"avail_event={used.avail_event:#06x}")
            for head in snap["in_flight_heads"]:
                chain = []
                d = head
                for _ in range(self.size):
                    desc = view.desc[d]
                    chain.append(f"[{d}] addr={desc.addr:#x} len={desc.len} "
                                 f"flags={_flag_names(desc.flags)} next={desc.next}")
                    if not desc.flags & VIRTQ_DESC_F_NEXT:
                        break
                    d = desc.next & self._mask
                lines.append(f"  head {head}: " + " -> ".join(chain))
            pending = distance(self.last_used, used.idx)
            for k in range(min(pending, self.size)):
                slot = wrap_add(self.last_used, k) & self._mask
                elem = used.ring[slot]
                lines.append(f"  used.ring[{slot}] = id {elem.id} len {elem.len} (unreaped)")
        finally:
            view.close()
        return "\n".join(lines)


class SplitRingView:
    """ctypes structures over a split ring: ``desc`` (VirtqDesc[N]), ``avail``, ``used``."""

    def __init__(self, mem: memoryview, layout: SplitLayout) -> None:
        n = layout.queue_size
        self._views = [
            mem[layout.desc : layout.desc + DESC_SIZE * n],
            mem[layout.avail : layout.avail + avail_nbytes(n)],
            mem[layout.used : layout.used + used_nbytes(n)],
        ]
        self.desc: Any = (VirtqDesc * n).from_buffer(self._views[0])
        self.avail: Any = avail_ring_type(n).from_buffer(self._views[1])
        self.used: Any = used_ring_type(n).from_buffer(self._views[2])

    def close(self) -> None:
        del self.desc, self.avail, self.used
        for v in self._views:
            v.release()

    def __enter__(self) -> SplitRingView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ring_run(view: memoryview, first: int, count: int, n: int, *, step: int = 1,
             offset: int = 0) -> list[int]:
    """Entries ``first .. first + count - 1`` (mod ``n``) of a ring held in ``view`` as a
    list, in one C-level ``tolist()`` per contiguous run (two when the run crosses the
    ring's end).  Entry ``i`` is ``view[step * i + offset]``: ``step=2`` picks one field of
    two-field elements (used.ring as u32 pairs: id at offset 0, len at offset 1)."""
    end = first + count
    if end <= n:
        return view[step * first + offset : step * end + offset : step].tolist()
    return (view[step * first + offset :: step].tolist()
            + view[offset : step * (end - n) + offset : step].tolist())


def _flag_names(flags: int) -> str:
    names = [n for bit, n in ((VIRTQ_DESC_F_NEXT, "NEXT"), (VIRTQ_DESC_F_WRITE, "WRITE"),
                              (VIRTQ_DESC_F_INDIRECT, "INDIRECT")) if flags & bit]
    return "|".join(names) or "0"


def _bad_buffer(buf: object) -> NoReturn:
    raise ArgumentError(
        "buffer", buf, "need (iova, length) ints with 0 <= iova < 2**64, 0 < length < 2**32"
    )
