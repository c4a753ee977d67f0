from __future__ import annotations


def align_up(value: int, align: int) -> int:
    """Round ``value`` up to a multiple of ``align`` (a power of two)."""
    return (value + align - 1) & ~(align - 1)


def is_power_of_two(value: int) -> bool:
    """Whether ``value`` is a power of two (1, 2, 4, ...); False for 0 and negatives."""
    return value > 0 and value & (value - 1) == 0


def is_count(value: object, low: int, high: int) -> bool:
    """Whether ``value`` is an int (not a bool: ``True`` would lay out a 1-entry ring) in
    ``low..high``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
