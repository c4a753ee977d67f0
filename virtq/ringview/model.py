"""What a split ring holds, read from a :class:`~virtq.ringview.sources.RingSource`.

:func:`analyze` decodes the three parts of a split ring (VIRTIO 1.2 §2.7) without trusting
any of it -- the view exists for rings that went wrong -- and sorts the chains it finds:

* **added, not published** (snapshot only): the driver wrote avail entries past
  ``avail.idx`` and has not stored the index yet (§2.7.13.3);
* **in flight**: published, and the device has not put them into the used ring;
* **completed, not reaped** (snapshot only): in the used ring past the driver's last reap.

What the driver has reaped is the driver's private state (``last_used``), not in shared
memory: a live ring shows what the device has completed (``used.idx``) and, taking the
device to have consumed the avail ring in order, which chains it still holds: the
``avail.idx - used.idx`` entries before ``avail.idx``.  A snapshot (saved by the owner with
:func:`~virtq.ringview.save_snapshot`) has the driver's exact lists.

Everything impossible is reported in :attr:`RingState.problems` (and the chain it concerns
is cut there), never raised: indices further apart than the ring is long, heads out of
range, chains that loop, bad indirect descriptors, a readable buffer after a writable one,
used elements naming chains that are not in flight, one descriptor in two chains.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from virtq.abi import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from virtq.layout import distance, wrap_add
from virtq.layout.split import DESC_SIZE
from virtq.ringview.sources import RingSource

_DESC = struct.Struct("<QIHH")
_KNOWN_DESC_FLAGS = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT

#: What a chain is waiting for.
ADDED = "added, not published"
IN_FLIGHT = "in flight"
COMPLETED = "completed, not reaped"


def flag_text(flags: int) -> str:
    """``VIRTQ_DESC_F_*`` bits by name (``NEXT|WRITE``; unknown bits in hex; ``-`` for
    none)."""
    names = [name for bit, name in ((VIRTQ_DESC_F_NEXT, "NEXT"), (VIRTQ_DESC_F_WRITE, "WRITE"),
                                    (VIRTQ_DESC_F_INDIRECT, "INDIRECT")) if flags & bit]
    if flags & ~_KNOWN_DESC_FLAGS:
        names.append(f"{flags & ~_KNOWN_DESC_FLAGS:#x}")
    return "|".join(names) or "-"


@dataclass(frozen=True)
class Descriptor:
    """One descriptor as it is in memory: ``index`` in its table; ``table`` is None for
    the ring's descriptor table, else the device address of the indirect table."""

    index: int
    addr: int
    len: int
    flags: int
    next: int
    table: int | None = None

    @property
    def writable(self) -> bool:
        """VIRTQ_DESC_F_WRITE: the device writes this buffer."""
        return bool(self.flags & VIRTQ_DESC_F_WRITE)


@dataclass
class Chain:
    """A chain the ring holds for one of the reasons :data:`ADDED`, :data:`IN_FLIGHT`,
    :data:`COMPLETED`: its ``head``, the avail position it was published at (None when
    unknown), its ``descriptors`` in chain order (an indirect table's after the descriptor
    that points at it), and what is wrong with it (``problem``, None when nothing is)."""

    head: int
    status: str
    avail_pos: int | None = None
    descriptors: list[Descriptor] = field(default_factory=list)
    problem: str | None = None
    #: For a completed chain: its used element's position and ``len``.
    used_pos: int | None = None
    used_len: int | None = None
    #: True when the chain's indirect table is out of the source's reach (a live ring
    #: whose device address is unknown).
    unread_table: bool = False

    @property
    def ring_descriptors(self) -> list[int]:
        """Indices of the ring's descriptor table this chain occupies."""
        return [d.index for d in self.descriptors if d.table is None]


@dataclass
class RingState:
    """Everything :func:`analyze` found in one ring."""

    source: str
    size: int
    avail_flags: int
    avail_idx: int
    used_event: int
    used_flags: int
    used_idx: int
    avail_event: int
    #: avail.ring[0..N-1] and used.ring[0..N-1] as they are (``(id, len)`` pairs).
    avail_ring: list[int]
    used_ring: list[tuple[int, int]]
    #: The ring's descriptor table.
    table: list[Descriptor]
    chains: list[Chain]
    problems: list[str]
    #: The driver's state (a snapshot's), or None for a live ring.
    driver: dict[str, Any] | None
    #: The driver's reap position (``last_used``), when known.
    last_used: int | None

    def by_status(self, status: str) -> list[Chain]:
        """The chains with ``status`` (:data:`ADDED`, :data:`IN_FLIGHT`,
        :data:`COMPLETED`)."""
        return [c for c in self.chains if c.status == status]

    @property
    def in_flight(self) -> int:
        """``avail.idx - used.idx``: chains published and not yet used (mod 2**16)."""
        return distance(self.used_idx, self.avail_idx)

    @property
    def consistent(self) -> bool:
        """True when nothing impossible was found."""
        return not self.problems


def _descriptor(data: bytes, index: int, table: int | None) -> Descriptor:
    addr, length, flags, nxt = _DESC.unpack_from(data, index * DESC_SIZE)
    return Descriptor(index, addr, length, flags, nxt, table)


def _u16s(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 2}H", data[: len(data) // 2 * 2]))


def analyze(source: RingSource) -> RingState:
    """Decode ``source``'s ring and sort its chains (see the module's docstring).  Never
    raises for what the ring holds; only a source that fails to read raises (what it
    raises)."""
    n = source.size
    desc_bytes = source.part("desc")
    avail = _u16s(source.part("avail"))
    used_bytes = source.part("used")
    used_h = _u16s(used_bytes)
    table = [_descriptor(desc_bytes, i, None) for i in range(n)]
    used_ring = [struct.unpack_from("<II", used_bytes, 4 + 8 * i) for i in range(n)]
    state = RingState(
        source=source.description, size=n,
        avail_flags=avail[0], avail_idx=avail[1], used_event=avail[2 + n],
        used_flags=used_h[0], used_idx=used_h[1], avail_event=used_h[2 + 4 * n],
        avail_ring=avail[2 : 2 + n], used_ring=[(int(i), int(ln)) for i, ln in used_ring],
        table=table, chains=[], problems=[], driver=source.driver, last_used=None)
    if state.avail_flags & ~1:
        state.problems.append(f"avail.flags {state.avail_flags:#x} has bits no spec defines "
                              "(only VIRTQ_AVAIL_F_NO_INTERRUPT, §2.7.7)")
    if state.used_flags & ~1:
        state.problems.append(f"used.flags {state.used_flags:#x} has bits no spec defines "
                              "(only VIRTQ_USED_F_NO_NOTIFY, §2.7.10)")
    if source.driver is None:
        _live_chains(state)
    else:
        _driver_chains(state, source.driver)
    for chain in state.chains:
        _walk(state, source, chain)
    owners: dict[int, int] = {}
    for chain in state.chains:
        for index in chain.ring_descriptors:
            if index in owners and owners[index] != chain.head:
                state.problems.append(f"descriptor {index} is in the chains of heads "
                                      f"{owners[index]} and {chain.head}")
            owners[index] = chain.head
    return state


def _live_chains(state: RingState) -> None:
    """Shared memory only: the device holds the ``avail.idx - used.idx`` chains before
    ``avail.idx`` (taking it to consume the avail ring in order)."""
    n = state.size
    outstanding = state.in_flight
    if outstanding > n:
        state.problems.append(
            f"avail.idx {state.avail_idx:#06x} - used.idx {state.used_idx:#06x} = "
            f"{outstanding}, more than the {n} entries of the ring: the device used chains "
            "that were never published, or an index is corrupt")
        return
    for k in range(outstanding):
        pos = wrap_add(state.used_idx, k)
        state.chains.append(Chain(state.avail_ring[pos % n], IN_FLIGHT, avail_pos=pos))


def _driver_chains(state: RingState, driver: dict[str, Any]) -> None:
    """A snapshot: the driver's own counters say what is added, in flight, completed."""
    n = state.size
    published = int(driver["published"]) & 0xFFFF
    next_avail = int(driver["next_avail"]) & 0xFFFF
    last_used = int(driver["last_used"]) & 0xFFFF
    state.last_used = last_used
    heads = [int(h) for h in driver.get("in_flight_heads", [])]
    if published != state.avail_idx:
        state.problems.append(f"the driver published up to {published:#06x} but avail.idx "
                              f"is {state.avail_idx:#06x}")
    waiting = distance(last_used, state.used_idx)
    if waiting > distance(last_used, published):
        state.problems.append(
            f"used.idx {state.used_idx:#06x} is {waiting} past the driver's last reap "
            f"{last_used:#06x}, but only {distance(last_used, published)} chains were "
            "published since")
        waiting = 0
    completed: dict[int, Chain] = {}
    for k in range(waiting):
        pos = wrap_add(last_used, k)
        head, length = state.used_ring[pos % n]
        chain = Chain(head, COMPLETED, used_pos=pos, used_len=length)
        if head >= n or head not in heads:
            chain.problem = (f"used.ring[{pos % n}] names head {head}, which is not a chain "
                             "in flight")
            state.problems.append(chain.problem)
        elif head in completed:
            chain.problem = f"head {head} is completed twice"
            state.problems.append(chain.problem)
        completed.setdefault(head, chain)
        state.chains.append(chain)
    added: dict[int, int] = {}
    for k in range(distance(published, next_avail)):
        pos = wrap_add(published, k)
        added[state.avail_ring[pos % n]] = pos
    # Where each in-flight head was published: the latest avail position naming it.
    position: dict[int, int] = {}
    for k in range(min(n, distance(last_used, published))):
        pos = wrap_add(published, -1 - k)
        position.setdefault(state.avail_ring[pos % n], pos)
    for head in heads:
        if head in completed:
            completed[head].avail_pos = position.get(head)
            continue
        if head in added:
            state.chains.append(Chain(head, ADDED, avail_pos=added[head]))
        else:
            state.chains.append(Chain(head, IN_FLIGHT, avail_pos=position.get(head)))
    counts = Counter(heads)
    for head, times in counts.items():
        if times > 1:
            state.problems.append(f"the driver lists head {head} in flight {times} times")


def _walk(state: RingState, source: RingSource, chain: Chain) -> None:
    """Follow ``chain`` from its head through the ring (and an indirect table), checking
    §2.7.5 on the way; the first thing wrong ends the walk and becomes its problem."""
    if chain.problem is not None:
        return  # a used element that names no chain in flight: nothing to follow
    n = state.size
    if chain.head >= n:
        chain.problem = f"head {chain.head} is outside the {n}-entry descriptor table"
        state.problems.append(f"avail position {chain.avail_pos}: {chain.problem}")
        return
    table: list[Descriptor] = state.table
    index, limit, steps, indirect, seen_writable = chain.head, n, 0, False, False

    def fail(why: str) -> None:
        chain.problem = why
        state.problems.append(f"chain of head {chain.head}: {why}")

    while True:
        steps += 1
        if steps > limit:
            fail(f"longer than its {limit}-entry table: the next pointers loop")
            return
        d = table[index]
        chain.descriptors.append(d)
        if d.flags & VIRTQ_DESC_F_INDIRECT:
            if indirect:
                fail(f"an indirect descriptor inside an indirect table (index {index}, "
                     "§2.7.5.3.1)")
                return
            if d.flags & VIRTQ_DESC_F_NEXT:
                fail(f"descriptor {index} is INDIRECT and NEXT at once (§2.7.5.3.1)")
                return
            if not d.len or d.len % DESC_SIZE:
                fail(f"indirect table of {d.len} bytes is not a whole number of "
                     "descriptors (§2.7.5.3.1)")
                return
            raw = source.read(d.addr, d.len)
            if raw is None:
                chain.unread_table = True  # not wrong: out of this source's reach
                return
            table = [_descriptor(raw, i, d.addr) for i in range(d.len // DESC_SIZE)]
            index, limit, steps, indirect = 0, len(table), 0, True
            continue
        if seen_writable and not d.writable:
            fail(f"a readable buffer after a writable one (descriptor {d.index}, §2.7.4.2)")
            return
        seen_writable |= d.writable
        if not d.flags & VIRTQ_DESC_F_NEXT:
            return
        if d.next >= limit:
            fail(f"descriptor {d.index} points at next={d.next}, outside its "
                 f"{limit}-entry table")
            return
        index = d.next


__all__ = ["ADDED", "COMPLETED", "IN_FLIGHT", "Chain", "Descriptor", "RingState", "analyze",
           "flag_text"]
