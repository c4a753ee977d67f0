"""virtq from asyncio and trio, without threads (the ``virtq[async]`` extra: anyio).

:class:`AsyncBlkDevice` is a virtio-blk device whose waits are ``await``\\ s:
``await disk.read(...)``, ``async for req in disk.completions()``.  :class:`Pump` is what it
is built on, and drives any device that has a :class:`~virtq.transport.Waiter` and a
non-blocking ``poll``: it arms the queues, re-checks, and sleeps in the event loop on the
notification fds.  Cancelling a waiting task leaves the queues consistent.

Why anyio: one code path for asyncio and trio (``anyio.wait_readable`` on the call
eventfds, anyio's events and cancel scopes), and a small pure-Python dependency that only
this layer needs.
"""

from virtq.aio.blk import AsyncBlkDevice
from virtq.aio.pump import Pump, wait_any_readable

__all__ = ["AsyncBlkDevice", "Pump", "wait_any_readable"]
