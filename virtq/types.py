"""Distinct address types.

Three address spaces meet in a virtqueue and mixing them up is the classic driver bug:

* :data:`HostAddr` -- a virtual address in *this* process (what ``mmap`` returned).
* :data:`Iova` -- an address the *device* uses: an IOVA behind an IOMMU, a guest-physical
  address in a vhost-user memory table, or (identity) the host address itself.
* :data:`Offset` -- a byte offset from the start of a memory region.

They are ``typing.NewType``s over ``int``: free at run time, checked by mypy.
"""

from __future__ import annotations

from typing import NewType

HostAddr = NewType("HostAddr", int)
Iova = NewType("Iova", int)
Offset = NewType("Offset", int)

__all__ = ["HostAddr", "Iova", "Offset"]
