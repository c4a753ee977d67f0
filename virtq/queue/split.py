"""The driver side of a split virtqueue (VIRTIO 1.2 §2.7), sans-I/O.

:class:`SplitQueue` is built *over* memory you own: a :class:`~virtq.memory.MemoryRegion`, a
:class:`~virtq.layout.SplitLayout` saying where each part lives inside it, and the IOVA the
device uses for the region's byte 0.  It never allocates, never writes an eventfd or a
doorbell: :meth:`SplitQueue.publish` *returns* whether the device wants a notification and
the transport acts on it.

Chains come in three ways, all ending in the same shadow state:

* :meth:`SplitQueue.add` / :meth:`SplitQueue.add_many` -- any chain of readable then writable
  buffers, from the free list (direct), or through the head's indirect table
  (``indirect=True``, §2.7.5.3);
* :meth:`SplitQueue.template` -- a request shape declared once (:class:`SplitTemplate`):
  each of its slots keeps a persistent chain (a reserved ring descriptor and its indirect
  table, or one reserved descriptor for one-buffer shapes), and a submission rewrites only
  the descriptors whose content changed.  Without indirect descriptors, a shape longer than
  one buffer takes its descriptors from the free list at each submission.

Trust model: the device is an untrusted peer.  Everything the driver needs to know about its
own chains (free list, per-head token, descriptor indices, writable capacity, when it was
made available) is shadowed in Python and never read back from shared memory; every value
the device writes (``used.idx``, ``used.ring[].id``/``len``, ``used.flags``,
``avail_event``) passes one ingress point, :meth:`SplitQueue._reap`, before it is acted on.
A violation raises :class:`~virtq.errors.DeviceProtocolError` and breaks the queue (see
:class:`~virtq.queue.QueueState`).
"""

from __future__ import annotations

import itertools
import operator
import struct
from collections.abc import Iterable, Sequence
from typing import Any, Generic, NoReturn, TypeVar

from virtq.abi import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from virtq.errors import ArgumentError, DeviceProtocolError, LayoutError, QueueFullError
from virtq.layout import SplitLayout
from virtq.layout.split import DESC_SIZE
from virtq.memory import MemoryRegion
from virtq.queue._splitcore import _READY, SplitRingView, _SplitCore, ring_run
from virtq.queue._template import TemplateSlots
from virtq.queue.interface import Buffer
from virtq.types import Iova

T = TypeVar("T")

# addr, len, flags, next (struct virtq_desc, §2.7.5); one call writes a whole descriptor.
_PACK_DESC = struct.Struct("<QIHH").pack_into
_U32_LIMIT = 1 << 32
_U64_LIMIT = 1 << 64
_SEQUENTIAL = list(range(32769))  # indirect table entries are chained 0 -> 1 -> 2 ...
_F_NEXT = VIRTQ_DESC_F_NEXT
_F_WRITE = VIRTQ_DESC_F_WRITE
_F_INDIRECT = VIRTQ_DESC_F_INDIRECT
#: The flags of a chain's last descriptor (no NEXT), as the le16 bytes stored.
_LAST_WRITABLE = _F_WRITE.to_bytes(2, "little")
_LAST_READABLE = bytes(2)

#: Shadow state of an in-flight head: (token, writable capacity, descriptors to return to
#: the queue's free list, the chain's position in avail order (unbounded), the free list
#: that takes ``item`` back on completion, ``item``).  One tuple, one store.
_HeadState = tuple[Any, int, Sequence[int], int, list[int], int]


def _bad_buffer(buf: object) -> NoReturn:
    raise ArgumentError(
        "buffer", buf, "need (iova, length) ints with 0 <= iova < 2**64, 0 < length < 2**32"
    )


def _as_seq(value: object, name: str) -> Sequence[Any]:
    """``value`` as something with len() and indexing (a generator is materialised)."""
    if isinstance(value, list | tuple):
        return value
    try:
        return tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ArgumentError(name, value, "must be a sequence of (iova, length)") from None


def _copy(buffers: Sequence[Buffer]) -> tuple[Buffer, ...]:
    """A template's own copy of buffers it wrote (each an (iova, length) pair already
    checked), which a caller's later in-place change cannot reach."""
    return tuple(map(tuple, buffers))  # type: ignore[arg-type]  # (a tuple maps to itself)


def _chain_entries(readable: Sequence[Buffer], writable: Sequence[Buffer], nr: int, n: int
                   ) -> tuple[list[tuple[int, int, int]], int]:
    """The ``(iova, length, flags)`` of each descriptor of a chain of ``nr`` readable then
    writable buffers (``n`` in all), chained by NEXT, and its writable capacity -- every
    buffer checked (u64 address, 0 < length < 2**32, total < 2**32, §2.7.5.3.1) before the
    caller writes anything."""
    entries: list[tuple[int, int, int]] = []
    total = 0
    capacity = 0
    buf: object = None
    last = n - 1
    try:
        for k, buf in enumerate(itertools.chain(readable, writable)):
            iova, length = buf
            if not (isinstance(iova, int) and isinstance(length, int)):
                raise TypeError
            if not (0 <= iova < 1 << 64 and 0 < length < _U32_LIMIT):
                raise ValueError
            if k < nr:
                entries.append((iova, length, _F_NEXT if k < last else 0))
            else:
                entries.append((iova, length, _F_WRITE | _F_NEXT if k < last else _F_WRITE))
                capacity += length
            total += length
    except (TypeError, ValueError, OverflowError):
        _bad_buffer(buf)
    if total >= _U32_LIMIT:
        raise ArgumentError("buffers", total, "a chain's total length must be < 2**32")
    return entries, capacity


class SplitQueue(_SplitCore[T]):
    """A split virtqueue, driver side; tokens of type ``T`` come back with completions.

    (:class:`InOrderSplitQueue` is the same queue with VIRTIO_F_IN_ORDER.)

    ``iova`` is the device-visible address of the region's byte 0 (so :attr:`desc_area` is
    ``iova + layout.desc``).  ``start_index`` seeds ``avail.idx``, ``used.idx`` and the
    shadow counters -- vhost-user's SET_VRING_BASE uses it, and so do tests that want the
    u16 wrap-around within a handful of operations.  With ``indirect=True`` chains of more
    than one buffer go into the per-head indirect tables that ``layout`` reserves
    (``SplitLayout.compute(..., indirect_size=K)``).  ``strict_len=False`` accepts a
    ``used.len`` larger than the chain's writable capacity (for devices known to report it
    wrongly); the default rejects it (§2.7.8.2: the device MUST NOT report more).
    """

    #: Templates may keep ring descriptors for good (an in-order ring uses descriptors in
    #: ring order, so its templates cannot).
    _persistent_templates = True
    #: Chains take free descriptors in ring order (VIRTIO_F_IN_ORDER, §2.7.5.1).
    _ring_order = False

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
        if indirect and isinstance(layout, SplitLayout) and not layout.indirect_size:
            raise LayoutError(
                "indirect", indirect,
                "needs a layout with indirect tables: SplitLayout.compute(..., indirect_size=K)",
            )
        super().__init__(region, layout, iova=iova, event_idx=event_idx,
                         start_index=start_index, strict_len=strict_len)
        n = self.size
        self.indirect = bool(indirect)
        self._indirect_base = layout.indirect or 0
        self._indirect_size = layout.indirect_size
        # Templates keep some descriptors for good (their heads): never on the free list.
        self._templates: list[SplitTemplate[T]] = []
        # Stack of free descriptors (pop() takes the lowest index first).
        self._free: list[int] = list(range(n - 1, -1, -1))
        # Per head: None when not in flight, else its _HeadState.
        self._state: list[_HeadState | None] = [None] * n

    # -- state --------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Free descriptors (a direct chain of k buffers needs k, an indirect one 1)."""
        return len(self._free)

    def in_flight_tokens(self) -> list[T]:
        """The tokens of the chains added and not yet reaped (published or not), in the
        order they were made available."""
        live = [st for st in self._state if st is not None]
        live.sort(key=lambda st: st[3])
        return [st[0] for st in live]

    def _in_flight_heads(self) -> list[int]:
        return [h for h, st in enumerate(self._state) if st is not None]

    def _snapshot_extra(self) -> dict[str, Any]:
        return {"num_free": self.num_free, "indirect": self.indirect,
                "templates": [t.describe() for t in self._templates]}

    def _forget(self) -> list[T]:
        lost = self.in_flight_tokens()
        n = self.size
        self._state = [None] * n
        reserved = {head for tpl in self._templates for head in tpl._heads}
        self._free = [d for d in range(n - 1, -1, -1) if d not in reserved]
        return lost

    def _rebuild(self) -> None:
        # The rings were zeroed: every template writes its persistent heads again.
        for tpl in self._templates:
            tpl._rebuild()

    # -- adding chains ------------------------------------------------------------------------

    def add(
        self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: T = None,  # type: ignore[assignment]
    ) -> int:
        """Add one chain: ``readable`` buffers (device reads them) then ``writable`` ones
        (device writes them), each ``(iova, length)`` -- the order §2.7.4.2 requires.
        Returns the head descriptor index.  Not visible to the device until
        :meth:`publish`.  ``token`` comes back from :meth:`pop_used`.

        Raises :class:`QueueFullError` (with ``needed``/``free``) when the chain does not fit
        and :class:`ArgumentError` for a malformed buffer.  On error the queue's state (free
        list, avail ring, indices, in-flight chains) is unchanged.
        """
        if self._state_v is not _READY:
            self._refuse()
        free = self._free
        try:
            nr = len(readable)
            nw = len(writable)
        except TypeError:
            readable = _as_seq(readable, "readable")
            writable = _as_seq(writable, "writable")
            nr, nw = len(readable), len(writable)
        seq = self._avail_seq
        if nr + nw == 1 and free:
            # Fast path: one buffer, one descriptor.
            buf: object  # an annotation only: nothing runs on the fast path
            try:
                buf = readable[0] if nr else writable[0]
                iova, length = buf
                ok = length > 0
            except (TypeError, ValueError, IndexError, KeyError):
                buf, ok = readable if nr else writable, False
            if not ok:
                _bad_buffer(buf)
            head = free[-1]
            try:
                # struct's range checks reject iova outside u64, length outside u32, and
                # non-integers.
                _PACK_DESC(self._desc_mem, head << 4, iova, length, 0 if nr else _F_WRITE, 0)
            except struct.error:
                _bad_buffer(buf)
            free.pop()
            state: _HeadState = (token, 0 if nr else length, (), seq, free, head)
        else:
            head, state = self._add_chain(readable, writable, token, free, -1)
        self._avail[2 + (seq & self._mask)] = head
        self._state[head] = state
        self._avail_seq = seq + 1
        return head

    def add_many(self, chains: Iterable[tuple[Sequence[Buffer], Sequence[Buffer], T]]) -> int:
        """Add several ``(readable, writable, token)`` chains in one call; returns how many.

        All or nothing: if they do not all fit, :class:`QueueFullError` is raised and none is
        added (likewise :class:`ArgumentError` for a malformed buffer).  Same semantics as
        calling :meth:`add` for each, at a lower per-chain cost.  Any iterable is taken (it
        is read once).
        """
        if self._state_v is not _READY:
            self._refuse()
        if not isinstance(chains, list | tuple):
            try:
                chains = list(chains)
            except TypeError:
                raise ArgumentError("chains", chains, "must be an iterable of "
                                    "(readable, writable, token)") from None
        free = self._free
        needed = 0
        one_desc = True
        try:
            for readable, writable, _ in chains:
                k = len(readable) + len(writable)
                if k != 1:
                    one_desc = False
                    k = 1 if self.indirect and k > 1 else k
                needed += k
        except (TypeError, ValueError):
            raise ArgumentError("chains", chains,
                                "must be (readable, writable, token) triples of sequences"
                                ) from None
        if needed > len(free):
            raise QueueFullError(needed, len(free))
        if not one_desc:
            if type(self)._add_chain in _ONE_LOOP_ADD:
                return self._add_chains(chains)
            return self._add_each(chains)  # a subclass places descriptors its own way
        return self._add_singles(chains)

    def _add_singles(self, chains: Sequence[tuple[Sequence[Buffer], Sequence[Buffer], T]],
                     items: Sequence[int] | None = None, home: list[int] | None = None
                     ) -> int:
        """add_many() when every chain is one descriptor (the caller checked that they fit):
        one loop.  ``items``/``home`` as for :meth:`_add_chains`.  avail.ring entries past
        next_avail are invisible to the device until publish(), so on a bad buffer only the
        shadow state written so far needs undoing."""
        free = self._free
        desc_mem = self._desc_mem
        avail = self._avail
        state = self._state
        mask = self._mask
        start = seq = self._avail_seq
        top = len(free)
        buf: object = None
        try:
            for readable, writable, token in chains:
                top -= 1
                head = free[top]
                if readable:
                    buf = readable[0]
                    iova, length = buf
                    _PACK_DESC(desc_mem, head << 4, iova, length, 0, 0)
                    capacity = 0
                else:
                    buf = writable[0]
                    iova, length = buf
                    _PACK_DESC(desc_mem, head << 4, iova, length, _F_WRITE, 0)
                    capacity = length
                if not length > 0:
                    raise ValueError
                if items is None:
                    state[head] = (token, capacity, (), seq, free, head)
                else:  # a direct template's slot: its descriptor goes back to the free list
                    state[head] = (token, capacity, (head,), seq, home,  # type: ignore[assignment]
                                   items[seq - start])
                avail[2 + (seq & mask)] = head
                seq += 1
        except (TypeError, ValueError, struct.error):
            for undo in free[top:]:
                state[undo] = None
            _bad_buffer(buf)
        del free[top:]
        self._avail_seq = seq
        return seq - start

    def _add_chains(self, chains: Sequence[tuple[Sequence[Buffer], Sequence[Buffer], T]],
                    items: Sequence[int] | None = None, home: list[int] | None = None
                    ) -> int:
        """:meth:`add` for each of ``chains`` (the caller checked that they fit), in one
        loop: what add() -> _add_chain() -> _write_chain() do per chain, without their
        three calls and the lists between them (on CPython a call costs as much as the
        descriptor it writes).  Every buffer is checked as there, and on any error the
        shadow state of the chains added so far is undone: the descriptors written sit in
        free entries, the avail entries past ``next_avail``, both invisible to the device
        until publish() (§2.7.13).  ``items`` and ``home``: a direct template's slots, one
        per chain, which completion gives back to ``home`` (the chain's descriptors,
        head included, go back to the free list)."""
        mem = self._mem
        desc_mem = self._desc_mem
        avail = self._avail
        state = self._state
        mask = self._mask
        free = self._free
        indirect = self.indirect
        isize = self._indirect_size
        table_bytes = DESC_SIZE * isize
        ibase = self._indirect_base
        iova0 = self.iova
        ring_order = self._ring_order
        size = self.size
        pack = _PACK_DESC
        start = seq = self._avail_seq
        top = len(free)
        buf: object = None
        rest: tuple[int, ...]
        # The heads added, for an undo: never read back from avail.ring, which the device
        # can scribble on.
        heads: list[int] = []
        added = heads.append
        try:
            for readable, writable, token in chains:
                k = len(readable) + len(writable)
                total = capacity = 0
                if indirect and k > 1:
                    if k > isize:
                        raise ArgumentError("buffers", k, f"chain longer than the {isize}-entry "
                                            "indirect table")
                    top -= 1
                    head = free[top]
                    table = ibase + head * table_bytes
                    # Entries are chained 0 -> 1 -> ... inside the table (§2.7.5.3.2).
                    off = table
                    nxt = 1
                    for buf in readable:
                        iova, length = buf
                        if not length > 0:
                            raise ValueError
                        pack(mem, off, iova, length, _F_NEXT, nxt)
                        total += length
                        off += DESC_SIZE
                        nxt += 1
                    for buf in writable:
                        iova, length = buf
                        if not length > 0:
                            raise ValueError
                        pack(mem, off, iova, length, _F_NEXT | _F_WRITE, nxt)
                        capacity += length
                        off += DESC_SIZE
                        nxt += 1
                    # The last entry ends the chain: its flags (le16 at byte 12) lose NEXT.
                    mem[off - 4 : off - 2] = _LAST_WRITABLE if writable else _LAST_READABLE
                    if total + capacity >= _U32_LIMIT:  # §2.7.5.3.1
                        raise ArgumentError("buffers", total + capacity,
                                            "a chain's total length must be < 2**32")
                    # §2.7.5.3.1: the device ignores WRITE on the descriptor to a table.
                    pack(desc_mem, head << 4, iova0 + table, DESC_SIZE * k, _F_INDIRECT, 0)
                    rest = ()
                elif k:
                    # The next k free descriptors, head first (as add() takes free[-k:]);
                    # with VIRTIO_F_IN_ORDER the stack's top is the next in ring order,
                    # and the last one's "next" is x + 1 (§2.7.5.1), as _add_chain does.
                    top -= k
                    if ring_order:
                        descs = free[top : top + k][::-1]
                        # (A lone descriptor is written as add()'s fast path does.)
                        descs.append((descs[-1] + 1) % size if k > 1 else 0)
                    else:
                        descs = free[top : top + k]
                        descs.append(0)  # "next" of the last descriptor
                    head = descs[0]
                    i = 0
                    for buf in readable:
                        iova, length = buf
                        if not length > 0:
                            raise ValueError
                        i += 1
                        pack(desc_mem, descs[i - 1] << 4, iova, length, _F_NEXT, descs[i])
                        total += length
                    for buf in writable:
                        iova, length = buf
                        if not length > 0:
                            raise ValueError
                        i += 1
                        pack(desc_mem, descs[i - 1] << 4, iova, length, _F_NEXT | _F_WRITE,
                             descs[i])
                        capacity += length
                    last = (descs[i - 1] << 4) + 12
                    desc_mem[last : last + 2] = _LAST_WRITABLE if writable else _LAST_READABLE
                    if total + capacity >= _U32_LIMIT:  # §2.7.5.3.1
                        raise ArgumentError("buffers", total + capacity,
                                            "a chain's total length must be < 2**32")
                    rest = tuple(descs[1:k])
                else:
                    raise ArgumentError("buffers", 0, "a chain needs at least one buffer")
                if items is None:
                    state[head] = (token, capacity, rest, seq, free, head)
                else:
                    state[head] = (token, capacity, (head, *rest), seq, home,  # type: ignore[assignment]
                                   items[seq - start])
                added(head)
                avail[2 + (seq & mask)] = head
                seq += 1
        except BaseException as exc:
            for head in heads:
                state[head] = None
            if isinstance(exc, ArgumentError) or not isinstance(
                    exc, TypeError | ValueError | struct.error):
                raise
            _bad_buffer(buf)
        del free[top:]
        self._avail_seq = seq
        return seq - start

    def _add_each(self, chains: Sequence[tuple[Sequence[Buffer], Sequence[Buffer], T]]) -> int:
        """add() for each chain; on an error undo the ones added (from the shadow: the
        driver never reads its own state back from shared memory, §2.7 trust model)."""
        start_seq = self._avail_seq
        start_free = list(self._free)
        heads: list[int] = []
        try:
            for readable, writable, token in chains:
                heads.append(self.add(readable, writable, token))
        except BaseException:
            for head in heads:
                self._state[head] = None
            self._avail_seq = start_seq
            self._free[:] = start_free
            raise
        return len(heads)

    def _add_chain(
        self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: T,
        home: list[int], item: int,
    ) -> tuple[int, _HeadState]:
        """Write a chain of any length (indirect when enabled and longer than one buffer);
        returns its head and shadow state.  ``item`` -1 means "the head itself"."""
        count = len(readable) + len(writable)
        if count == 0:
            raise ArgumentError("buffers", count, "a chain needs at least one buffer")
        free = self._free
        seq = self._avail_seq
        if self.indirect and count > 1:
            if count > self._indirect_size:
                raise ArgumentError(
                    "buffers", count,
                    f"chain longer than the {self._indirect_size}-entry indirect table",
                )
            if not free:
                raise QueueFullError(1, 0)
            head = free[-1]
            table = self._indirect_base + head * DESC_SIZE * self._indirect_size
            # Entries are chained 0 -> 1 -> ... inside the table (§2.7.5.3.2).
            capacity = self._write_chain(table, _SEQUENTIAL[: count + 1], readable, writable)
            # §2.7.5.3.1: the device ignores WRITE on the descriptor that points to a table.
            _PACK_DESC(self._desc_mem, head << 4, self.iova + table, DESC_SIZE * count,
                       _F_INDIRECT, 0)
            free.pop()
            if item < 0:
                return head, (token, capacity, (), seq, free, head)
            return head, (token, capacity, (head,), seq, home, item)
        if count > len(free):
            raise QueueFullError(count, len(free))
        descs = free[-count:]
        descs.append(0)  # "next" of the last descriptor
        capacity = self._write_chain(self.layout.desc, descs, readable, writable)
        del free[-count:]
        del descs[-1]
        if item < 0:
            return descs[0], (token, capacity, tuple(descs[1:]), seq, free, descs[0])
        return descs[0], (token, capacity, tuple(descs), seq, home, item)

    def _write_chain(
        self, base: int, chain: list[int], readable: Sequence[Buffer], writable: Sequence[Buffer]
    ) -> int:
        """Write descriptors ``chain[:-1]`` (at ``base + 16 * d`` in the region), each linked
        to the next with NEXT; returns the writable capacity.  Raises ArgumentError for a
        malformed buffer before the caller commits anything (what was written so far sits
        in free descriptors nobody reads)."""
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
                _PACK_DESC(mem, base + (chain[i] << 4), iova, length, _F_NEXT, chain[i + 1])
                total += length
                i += 1
            for buf in writable:
                iova, length = buf
                if not length > 0:
                    raise ValueError
                _PACK_DESC(mem, base + (chain[i] << 4), iova, length, _F_NEXT | _F_WRITE,
                           chain[i + 1])
                capacity += length
                i += 1
        except (TypeError, ValueError, struct.error):
            _bad_buffer(buf)
        # The last descriptor ends the chain: clear its NEXT (le16 flags at byte 12, §2.7.5;
        # not yet visible to the device, so two plain byte stores are fine).
        last = base + (chain[i - 1] << 4) + 12
        mem[last : last + 2] = _LAST_WRITABLE if writable else _LAST_READABLE
        if total + capacity >= _U32_LIMIT:  # §2.7.5.3.1: total length fits in 32 bits
            raise ArgumentError(
                "buffers", total + capacity, "a chain's total length must be < 2**32")
        return capacity

    # -- templates ----------------------------------------------------------------------------

    def template(self, max_buffers: int, *, slots: int | None = None,
                 typical_buffers: int | None = None) -> SplitTemplate[T]:
        """Declare a request shape of up to ``max_buffers`` buffers (see
        :class:`SplitTemplate`) with ``slots`` request slots.

        The queue decides how its chains are laid out: with indirect descriptors (or for
        one-buffer shapes) every slot keeps a reserved ring descriptor for good, so
        ``slots`` defaults to -- and may not exceed -- the free descriptors; otherwise each
        submission takes direct descriptors from the free list, and ``slots`` defaults to the
        free descriptors divided by ``typical_buffers`` (default ``max_buffers``).  Raises
        :class:`ArgumentError` for a bad size and :class:`QueueFullError` when the slots do
        not fit."""
        if self._state_v is not _READY:
            self._refuse()
        if not isinstance(max_buffers, int) or max_buffers < 1:
            raise ArgumentError("max_buffers", max_buffers, "must be an int >= 1")
        one_desc = max_buffers == 1 or (self.indirect and max_buffers <= self._indirect_size)
        persistent = one_desc and self._persistent_templates
        if not one_desc and max_buffers > self.size:
            raise ArgumentError("max_buffers", max_buffers,
                                f"a direct chain cannot exceed the queue size {self.size}")
        free = len(self._free)
        if typical_buffers is not None and (
                not isinstance(typical_buffers, int) or not 1 <= typical_buffers <= max_buffers):
            raise ArgumentError("typical_buffers", typical_buffers,
                                f"must be an int in 1..max_buffers ({max_buffers})")
        if slots is None:
            slots = free if one_desc else free // (typical_buffers or max_buffers)
        if not isinstance(slots, int) or slots < 1:
            raise ArgumentError("slots", slots, "must be an int >= 1")
        if persistent and slots > free:
            raise QueueFullError(slots, free)
        tpl = SplitTemplate(self, max_buffers, slots, persistent)
        self._templates.append(tpl)
        return tpl

    # -- reaping ------------------------------------------------------------------------------

    def pop_used(self) -> tuple[T, int] | None:
        """The next completed chain as ``(token, written_len)``, or None.

        Completions arrive in whatever order the device chooses.  ``written_len`` is what the
        device reported writing into the chain's device-writable part (validated against its
        capacity).  Raises :class:`~virtq.errors.DeviceProtocolError` for an impossible
        completion (the queue is then broken).
        """
        if self._state_v is not _READY:
            self._refuse()
        used_idx = self._used_h[1]
        if used_idx == self._used_seq & 0xFFFF:
            return None
        self._used_count(used_idx)
        return self._reap(1)[0]

    def drain_used(self) -> list[tuple[T, int]]:
        """All completed chains, in used-ring order (reads ``used.idx`` once).  Raises
        :class:`~virtq.errors.DeviceProtocolError` for an impossible completion; its
        ``completed`` lists the valid completions before it."""
        if self._state_v is not _READY:
            self._refuse()
        used_idx = self._used_h[1]
        if used_idx == self._used_seq & 0xFFFF:
            return []
        return self._reap(self._used_count(used_idx))

    def _reap(self, count: int) -> list[tuple[T, int]]:
        """The single ingress point for device-written used elements: ``count`` of them
        (``used.idx`` was validated by :meth:`_used_count`)."""
        used_seq = self._used_seq
        pub_seq = self._pub_seq
        states = self._state
        n = self.size
        free = self._free
        strict = self.strict_len
        # Chains added but not yet published are invisible to the device; only when some
        # exist must each completion be checked against them.
        unpublished = self._avail_seq - pub_seq
        out: list[tuple[T, int]] = []
        # The elements as ints, in one C call per contiguous run of the ring: each is id
        # and len in one 8-byte load (both written before used.idx).
        for elem in ring_run(self._used_q, used_seq & self._mask, count, n):
            head = elem & 0xFFFFFFFF
            try:
                # IndexError: no such head; TypeError: unpacking None, a head not in
                # flight.  (Exceptions cost nothing until raised; an explicit check would
                # cost on every completion.)
                token, capacity, rest, seq, home, item = states[head]  # type: ignore[misc]
            except (IndexError, TypeError):
                self._fail_at(len(out), "id", head, f"a head in flight (queue size {n})", out)
            if unpublished and seq >= pub_seq:
                self._fail_at(len(out), "id", head, "a head that has been published", out)
            length = elem >> 32
            if length > capacity and strict:
                self._fail_at(len(out), "len", length,
                              f"<= {capacity}, the writable capacity of head {head}", out)
            out.append((token, length))
            states[head] = None
            home.append(item)
            if rest:
                free.extend(rest)
        self._used_seq = used_seq + count
        return out


class SplitTemplate(TemplateSlots, Generic[T]):
    """A request shape on a :class:`SplitQueue`: up to ``max_buffers`` buffers, ``slots``
    request slots (see :class:`~virtq.queue.ChainTemplate`).

    Each slot's last submitted buffers are remembered (as the template's own copies).  A
    submission is compared with them buffer by buffer and only the descriptors that
    differ are rewritten (a block request with a new data buffer rewrites one 16-byte
    entry; its header and status entries stay); ``submit_many(slots, None, None, tokens)``
    repeats every slot's chain writing nothing but the avail entries.
    """

    def __init__(self, queue: SplitQueue[T], max_buffers: int, slots: int,
                 persistent: bool) -> None:
        self._q = queue
        self.max_buffers = max_buffers
        self.slots = slots
        #: True: each slot keeps a reserved ring descriptor (indirect table, or one
        #: descriptor for one-buffer shapes); False: direct descriptors per submission.
        self.persistent = persistent
        self.indirect = persistent and max_buffers > 1
        self._free: list[int] = list(range(slots - 1, -1, -1))
        self._held: set[int] = set()
        self._heads: list[int] = []
        self._tables: list[int] = []
        if persistent:
            free = queue._free
            self._heads = free[-slots:][::-1]
            del free[-slots:]
            if self.indirect:
                base = queue._indirect_base
                per_head = DESC_SIZE * queue._indirect_size
                self._tables = [base + head * per_head for head in self._heads]
        self._rebuild()

    def _rebuild(self) -> None:
        """Every slot free, nothing remembered; persistent heads written again."""
        slots = self.slots
        self._free = list(range(slots - 1, -1, -1))
        # Slots handed out by acquire*() and not yet submitted or released.
        self._held = set()
        # The tuple the last acquire_many() returned, all of its slots still held: a
        # submit_many() of that very tuple needs no per-slot check.
        self._batch: tuple[int, ...] | None = None
        self._r: list[object] = [None] * slots
        self._w: list[object] = [None] * slots
        self._entries: list[list[tuple[int, int, int]]] = [[] for _ in range(slots)]
        self._snap: list[tuple[list[tuple[int, int]], list[tuple[int, int]]] | None] = \
            [None] * slots
        self._cap = [0] * slots
        self._nent = [0] * slots
        if self.indirect:
            q = self._q
            for head, table in zip(self._heads, self._tables, strict=True):
                # §2.7.5.3.1: the device ignores WRITE on the descriptor that points to a
                # table; its length is set per shape (16 bytes per entry).
                _PACK_DESC(q._desc_mem, head << 4, q.iova + table, DESC_SIZE, _F_INDIRECT, 0)

    # -- submitting -----------------------------------------------------------------------------

    def submit(self, slot: int, readable: Sequence[Buffer], writable: Sequence[Buffer],
               token: T) -> None:
        """Make held ``slot``'s chain available (visible after ``publish()``): ``readable``
        buffers (device reads them), then ``writable`` ones, each ``(iova, length)``.

        Raises :class:`ArgumentError` for a slot not held or a malformed chain,
        :class:`QueueFullError` when direct descriptors run out, and the queue's state
        errors; on error nothing is submitted and the slot stays held."""
        q = self._q
        if q._state_v is not _READY:
            q._refuse()
        held = self._held
        if not self._is_held(slot):
            self._bad_slot(slot)
        seq = q._avail_seq
        if self.persistent:
            if not self._patch(slot, readable, writable):
                self._write(slot, readable, writable)
            head = self._heads[slot]
            q._state[head] = (token, self._cap[slot], (), seq, self._free, slot)
        else:
            readable = _as_seq(readable, "readable")
            writable = _as_seq(writable, "writable")
            head, state = q._add_chain(readable, writable, token, self._free, slot)
            q._state[head] = state
            self._r[slot], self._w[slot] = _copy(readable), _copy(writable)
        held.discard(slot)
        self._batch = None
        q._avail[2 + (seq & q._mask)] = head
        q._avail_seq = seq + 1

    def submit_many(self, slots: Sequence[int],
                    readables: Sequence[Sequence[Buffer]] | None,
                    writables: Sequence[Sequence[Buffer]] | None, tokens: Sequence[T]) -> None:
        """:meth:`submit` each ``(slots[i], readables[i], writables[i], tokens[i])``, in one
        call and all or nothing: on any error none of them is submitted (their slots stay
        held).  Direct chains are checked against the free descriptors first.

        ``readables`` and ``writables`` None submit every slot with the buffers it held the
        last time (the cheapest refill: nothing but the avail entries is written); a slot
        that never held any is an :class:`ArgumentError`.  Raises
        :class:`~virtq.errors.ArgumentError` (mismatched sequences, slots not held, a slot never
        submitted when repeating, a bad buffer), :class:`QueueFullError` (direct descriptors) and
        the queue's state errors."""
        q = self._q
        if q._state_v is not _READY:
            q._refuse()
        same = self._check_submit_many(slots, readables, writables, tokens)
        count = len(slots)
        if not count:
            return
        if not self.persistent:
            self._submit_direct_many(slots, readables, writables, tokens)
            return
        held = self._held
        # Unless these are the very slots acquire_many() handed out, check every one (held,
        # and only once).
        if slots is not self._batch:
            self._check_held_all(slots)
        state = q._state
        avail = q._avail
        mask = q._mask
        heads = self._heads
        caps = self._cap
        home = self._free
        start = seq = q._avail_seq
        try:
            if same:
                snaps = self._snap
                if None in map(snaps.__getitem__, slots):  # one C-level pass
                    slot = next(s for s in slots if snaps[s] is None)
                    raise ArgumentError("slot", slot,
                                        "has never been submitted: nothing to repeat")
                for slot, token in zip(slots, tokens, strict=True):
                    head = heads[slot]
                    state[head] = (token, caps[slot], (), seq, home, slot)
                    avail[2 + (seq & mask)] = head
                    seq += 1
            else:
                assert readables is not None and writables is not None
                patch = self._patch
                for slot, readable, writable, token in zip(slots, readables, writables,
                                                           tokens, strict=True):
                    if not patch(slot, readable, writable):
                        self._write(slot, readable, writable)
                    head = heads[slot]
                    state[head] = (token, caps[slot], (), seq, home, slot)
                    avail[2 + (seq & mask)] = head
                    seq += 1
        except BaseException:
            # Entries past next_avail are invisible until publish(): only undo the shadow.
            for slot in slots[: seq - start]:
                state[heads[slot]] = None
            raise
        held.difference_update(slots)
        self._batch = None
        q._avail_seq = seq

    def _last(self, slot: object) -> tuple[Sequence[Buffer], Sequence[Buffer]]:
        """What ``slot`` was last submitted with (:class:`ArgumentError` if nothing)."""
        if not self._is_held(slot):
            self._bad_slot(slot)
        assert isinstance(slot, int)
        r, w = self._r[slot], self._w[slot]
        if r is None or w is None:
            raise ArgumentError("slot", slot, "has never been submitted: nothing to repeat")
        return r, w  # type: ignore[return-value]

    def _submit_direct_many(self, slots: Sequence[int],
                            readables: Sequence[Sequence[Buffer]] | None,
                            writables: Sequence[Sequence[Buffer]] | None,
                            tokens: Sequence[T]) -> None:
        """submit_many() of a direct template: checks first, then the queue's add_many
        loop with each chain's slot as the item its completion gives back.  None buffers:
        each slot's last ones."""
        q = self._q
        if slots is not self._batch:
            self._check_held_all(slots)
        if readables is None or writables is None:
            r_cache, w_cache = self._r, self._w
            if None in map(r_cache.__getitem__, slots):
                self._last(next(s for s in slots if r_cache[s] is None))  # raises
            readables = list(map(r_cache.__getitem__, slots))  # type: ignore[arg-type]
            writables = list(map(w_cache.__getitem__, slots))  # type: ignore[arg-type]
            repeat = True
        else:
            readables = [_as_seq(r, "readable") for r in readables]
            writables = [_as_seq(w, "writable") for w in writables]
            repeat = False
        counts = list(map(operator.add, map(len, readables), map(len, writables)))
        needed = sum(counts)
        if needed > len(q._free):
            raise QueueFullError(needed, len(q._free))
        chains = list(zip(readables, writables, tokens, strict=True))
        if counts.count(1) == len(counts):  # one buffer each: add_many's one-descriptor loop
            q._add_singles(chains, slots, self._free)
        elif type(q)._add_chain in _ONE_LOOP_ADD:
            # One loop for the whole batch (add_many's), each chain's slot its item.
            q._add_chains(chains, slots, self._free)
        else:
            self._direct_each(chains, slots)
        if not repeat:
            # Copies: a caller's list changed in place later must not change a repeat.
            r_cache, w_cache = self._r, self._w
            for slot, readable, writable in zip(slots, readables, writables, strict=True):
                r_cache[slot], w_cache[slot] = _copy(readable), _copy(writable)
        self._held.difference_update(slots)
        self._batch = None

    def _direct_each(self, chains: Sequence[tuple[Sequence[Buffer], Sequence[Buffer], T]],
                     slots: Sequence[int]) -> None:
        """A direct batch chain by chain, for a queue subclass that places descriptors its
        own way; undone from the shadow on an error (the avail entries past
        ``next_avail`` were never visible)."""
        q = self._q
        start_seq = seq = q._avail_seq
        start_free = list(q._free)
        done: list[int] = []
        try:
            for slot, (readable, writable, token) in zip(slots, chains, strict=True):
                head, state = q._add_chain(readable, writable, token, self._free, slot)
                q._state[head] = state
                done.append(head)
                q._avail[2 + (seq & q._mask)] = head
                seq += 1
                q._avail_seq = seq  # _add_chain records the position from it
        except BaseException:
            for head in done:
                q._state[head] = None
            q._avail_seq = start_seq
            q._free[:] = start_free
            raise

    def _write(self, slot: int, readable: Sequence[Buffer], writable: Sequence[Buffer]) -> None:
        """Bring slot's persistent chain to these buffers, writing only the descriptors
        that differ from what it holds.  Everything is validated before the first write."""
        q = self._q
        try:
            nr = len(readable)
            n = nr + len(writable)
        except TypeError:
            readable = _as_seq(readable, "readable")
            writable = _as_seq(writable, "writable")
            nr = len(readable)
            n = nr + len(writable)
        if not 1 <= n <= self.max_buffers:
            raise ArgumentError("buffers", n, f"a chain of this template has 1..{self.max_buffers}"
                                " buffers")
        entries, capacity = _chain_entries(readable, writable, nr, n)
        old = self._entries[slot]
        if self.indirect:
            mem = q._mem
            base = self._tables[slot]
            nold = len(old)
            for k, entry in enumerate(entries):
                if k >= nold or old[k] != entry:
                    # Entries are chained 0 -> 1 -> ... inside the table (§2.7.5.3.2).
                    _PACK_DESC(mem, base + (k << 4), entry[0], entry[1], entry[2], k + 1)
            if n != self._nent[slot]:
                q._desc_w[(self._heads[slot] << 2) + 2] = DESC_SIZE * n  # virtq_desc.len
                self._nent[slot] = n
        elif not old or old[0] != entries[0]:
            addr, size, flags = entries[0]
            _PACK_DESC(q._desc_mem, self._heads[slot] << 4, addr, size, flags, 0)
        self._keep(slot, entries, nr)
        self._cap[slot] = capacity

    def _patch(self, slot: int, readable: Sequence[Buffer], writable: Sequence[Buffer]) -> bool:
        """A refill where only buffer addresses moved (see ``_moved``): rewrite just those
        descriptors.  False (nothing written): :meth:`_write` takes the general path."""
        new = self._moved(slot, readable, writable)
        if new is None:
            return False
        if new:
            q = self._q
            if self.indirect:
                mem = q._mem
                base = self._tables[slot]
                for k, iova, length, flags in self._move(slot, new):
                    # Entries are chained 0 -> 1 -> ... inside the table (§2.7.5.3.2).
                    _PACK_DESC(mem, base + (k << 4), iova, length, flags, k + 1)
            else:  # one buffer, one ring descriptor of its own
                ((_, iova, length, flags),) = self._move(slot, new)
                _PACK_DESC(q._desc_mem, self._heads[slot] << 4, iova, length, flags, 0)
        return True

    def describe(self) -> str:
        """One line for logs: the shape, the slots and how many are free."""
        kind = ("indirect" if self.indirect else "one descriptor") if self.persistent \
            else "direct"
        return (f"template max_buffers={self.max_buffers} slots={self.slots} ({kind}), "
                f"{len(self._free)} free")


class InOrderSplitQueue(SplitQueue[T]):
    """A split virtqueue with VIRTIO_F_IN_ORDER (VIRTIO 1.2 §2.7.9, §2.7.5.1).

    The driver uses descriptors in ring order: a chain takes the next free descriptors of
    the table, wrapping at its end, with ``next`` = x + 1 (0 after the last).  The device
    completes chains in the order they were made available and may retire a whole batch
    with one used element, at the used position of the batch's first chain, naming the
    *last* chain's head, with ``used.idx`` advanced by the batch's size; the chains it
    skipped were used completely (their length is their writable capacity).

    Everything else is :class:`SplitQueue`'s.  The free list is kept as a stack whose top
    is the next descriptor in ring order, and completed descriptors go to its bottom.
    Templates cannot keep ring descriptors, so each submission writes its chain (an
    indirect one writes one ring descriptor and the head's table).
    """

    _persistent_templates = False
    _ring_order = True

    def _add_chain(
        self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: T,
        home: list[int], item: int,
    ) -> tuple[int, _HeadState]:
        count = len(readable) + len(writable)
        if count == 0:
            raise ArgumentError("buffers", count, "a chain needs at least one buffer")
        if self.indirect and count > 1:
            return super()._add_chain(readable, writable, token, home, item)
        free = self._free
        if count > len(free):
            raise QueueFullError(count, len(free))
        descs = free[-count:][::-1]  # ring order: the top of the stack is the next one
        descs.append((descs[-1] + 1) % self.size)  # "next" of the last (§2.7.5.1: x + 1)
        capacity = self._write_chain(self.layout.desc, descs, readable, writable)
        del free[-count:]
        del descs[-1]
        if item < 0:
            return descs[0], (token, capacity, tuple(descs[1:]), self._avail_seq, free,
                              descs[0])
        return descs[0], (token, capacity, tuple(descs), self._avail_seq, home, item)

    # The batch being handed out when a limited reap (pop_used) stopped inside it: (avail
    # sequence of its last chain, the length its used element reported).  The chains up to
    # that one need no used element of their own; used.idx already counts them.
    _batch: tuple[int, int] | None = None

    def _forget(self) -> list[T]:
        self._batch = None
        return super()._forget()

    def pop_used(self) -> tuple[T, int] | None:
        """The next completed chain as ``(token, written_len)``, or None; a chain retired
        by a batch without a used element of its own reports its writable capacity
        (§2.7.9).  Raises as :meth:`SplitQueue.pop_used`."""
        if self._state_v is not _READY:
            self._refuse()
        used_idx = self._used_h[1]
        if used_idx == self._used_seq & 0xFFFF:
            return None
        return self._reap(self._used_count(used_idx), 1)[0]

    def _reap(self, count: int, limit: int | None = None) -> list[tuple[T, int]]:
        """In-order ingress: ``count`` chains completed (``used.idx`` advanced by that
        much), announced by one used element per batch (§2.7.9); hands out at most
        ``limit`` of them, remembering where it stopped inside a batch."""
        used_seq = self._used_seq
        end = used_seq + count
        stop = end if limit is None else min(end, used_seq + limit)
        out: list[tuple[T, int]] = []
        # Freed descriptors, in the order their chains completed: they go to the bottom
        # of the free stack in one splice at the end (also when the device is caught
        # lying half-way: what was reaped before stays reaped).
        freed: list[int] = []
        try:
            seq, batch = self._reap_run(used_seq, end, stop, self._batch, out, freed)
        finally:
            if freed:
                self._free[0:0] = freed[::-1]
        self._batch = batch
        self._used_seq = seq
        return out

    def _reap_run(self, seq: int, end: int, stop: int, batch: tuple[int, int] | None,
                  out: list[tuple[T, int]], freed: list[int]
                  ) -> tuple[int, tuple[int, int] | None]:
        """_reap's loop, from avail count ``seq`` up to ``stop`` (``end``: what used.idx
        says completed): the new avail count and the batch left unfinished."""
        states = self._state
        n = self.size
        mask = self._mask
        free = self._free
        pub_seq = self._pub_seq
        avail = self._avail
        used_q = self._used_q
        # The head of the chain made available at count s: the avail entry the driver
        # wrote there, taken only when the driver's own shadow agrees (that head is in
        # flight, made available at s) -- the ring is shared memory a device can
        # scribble on.  Otherwise the shadow alone answers (by_seq: one pass over it,
        # which the old code made on every reap).
        by_seq: dict[int, int] | None = None
        while seq < stop:
            if batch is None:
                elem = used_q[seq & mask]
                head = elem & 0xFFFFFFFF
                length = elem >> 32
                st = states[head] if head < n else None
                if st is None or st[3] >= pub_seq or st[3] < seq:
                    self._used_seq = seq
                    self._fail(DeviceProtocolError(
                        f"used.ring[{seq & mask}].id", head,
                        f"the head of a published chain in flight at or after avail "
                        f"position {seq & 0xFFFF:#x} (in order)"), out)
                last = st[3]
                if last >= end:
                    self._used_seq = seq
                    self._fail(DeviceProtocolError(
                        "used.idx", end & 0xFFFF,
                        f"room for the batch up to head {head} ({last - seq + 1} chains)"),
                        out)
                if length > st[1] and self.strict_len:
                    self._used_seq = seq
                    self._fail(DeviceProtocolError(
                        f"used.ring[{seq & mask}].len", length,
                        f"<= {st[1]}, the writable capacity of head {head}"), out)
            else:
                last, length = batch
            upto = min(last, stop - 1)
            for s in range(seq, upto + 1):
                h = avail[2 + (s & mask)]
                st = states[h] if h < n else None
                if st is None or st[3] != s:
                    if by_seq is None:
                        by_seq = {x[3]: head for head, x in enumerate(states)
                                  if x is not None}
                    h = by_seq[s]
                    st = states[h]
                token, capacity, rest, _, home, item = st  # type: ignore[misc]
                out.append((token, length if s == last else capacity))
                states[h] = None
                # Freed descriptors come after every free one in ring order: the bottom.
                if home is free:
                    freed.append(item)
                else:
                    home.append(item)
                if rest:
                    freed.extend(rest)
            seq = upto + 1
            batch = (last, length) if upto < last else None
        return seq, batch


#: The descriptor placements _add_chains knows (a subclass with its own takes add()).
_ONE_LOOP_ADD = (SplitQueue._add_chain, InOrderSplitQueue._add_chain)

__all__ = ["Buffer", "InOrderSplitQueue", "SplitQueue", "SplitRingView", "SplitTemplate"]
