"""16-bit ring index arithmetic (VIRTIO 1.2 §2.7.6, §2.7.8, §2.7.10).

``avail.idx`` and ``used.idx`` are free-running 16-bit counters: they are never reduced
modulo the queue size, they simply wrap from 0xFFFF to 0.  Python integers do not wrap, and
ctypes fields truncate silently, so every piece of index arithmetic in virtq goes through
these named helpers instead of scattering ``& 0xFFFF`` around.
"""

from __future__ import annotations

U16_MASK = 0xFFFF
U16_MOD = 0x10000


def wrap_add(index: int, n: int) -> int:
    """``index + n`` modulo 2**16 (``n`` may be negative)."""
    return (index + n) & U16_MASK


def distance(older: int, newer: int) -> int:
    """How many steps ``newer`` is ahead of ``older`` modulo 2**16.

    With ``older = last_used`` and ``newer = used.idx`` this is the number of used entries
    waiting; with ``older = last_used`` and ``newer = next_avail`` the number in flight.
    """
    return (newer - older) & U16_MASK


def need_event(event: int, new: int, old: int) -> bool:
    """VIRTIO 1.2 §2.7.10 ``vring_need_event``: does moving an index from ``old`` to
    ``new`` cross ``event``?

    True iff ``event`` lies in the half-open window ``[old, new)`` modulo 2**16, i.e. the
    peer asked to be notified when the index passes ``event`` and this step passed it.
    """
    return ((new - event - 1) & U16_MASK) < ((new - old) & U16_MASK)


__all__ = ["U16_MASK", "U16_MOD", "distance", "need_event", "wrap_add"]
