"""A virtio-blk device for asyncio and trio: ``await disk.read(...)``.

:class:`AsyncBlkDevice` wraps a :class:`~virtq.devices.BlkDevice` and never blocks the event
loop: submitting is the device's own non-blocking call, and waiting goes through a
:class:`~virtq.aio.Pump` over the device's public waiter.  Any number of tasks may use one
device at once; completions go to whichever task waits for them, and
:meth:`AsyncBlkDevice.completions` is an async iterator over them::

    async with await AsyncBlkDevice.connect_vhost_user("/tmp/blk.sock") as disk:
        data = await disk.read(0, 4096)
        reqs = [disk.submit_read(8 * i, 4096) for i in range(32)]
        async for req in disk.completions():
            print(req.sector, len(req.result or b""), req.error)

Cancelling a task that awaits a request leaves the queue consistent (the request stays
with the device until it completes; its slot comes back when a later wait reaps it) -- so a
zero-copy buffer (``into=``) of a cancelled read may still be written until then.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Self

from virtq.aio.pump import Pump
from virtq.devices import BlkDevice, BlkRequest, DmaBuffer
from virtq.devices.dma import byte_view
from virtq.errors import ArgumentError, QueueFullError, QueueStateError

SECTOR = 512


def _check_sector(sector: object) -> None:
    """Before the first request: ``sector + off // SECTOR`` raised TypeError for None or
    a str, and True was taken as sector 1."""
    if not isinstance(sector, int) or isinstance(sector, bool) or not 0 <= sector < 1 << 64:
        raise ArgumentError("sector", sector, "must be an int in 0..2**64-1")


class AsyncBlkDevice:
    """``device`` (a :class:`~virtq.devices.BlkDevice`) for an event loop.  Closing this
    closes the device.  Its attributes (``capacity``, ``block_size``, ``max_io``, ...)
    are the device's: use :attr:`device`."""

    def __init__(self, device: BlkDevice) -> None:
        if not isinstance(device, BlkDevice):
            raise ArgumentError("device", device, "must be a BlkDevice")
        self.device = device
        self.pump: Pump[BlkRequest] = Pump(device.waiter, lambda: device.poll(0),
                                           lambda: device.in_flight, device.kick)

    @classmethod
    async def connect_vhost_user(cls, path: str | os.PathLike[str], **kwargs: Any) -> Self:
        """:meth:`BlkDevice.connect_vhost_user <virtq.devices.BlkDevice.connect_vhost_user>`
        wrapped.  The handshake is a few synchronous round trips on the socket (bounded by
        its timeout), done in the calling task.  Raises what it raises."""
        return cls(BlkDevice.connect_vhost_user(path, **kwargs))

    # -- one request ---------------------------------------------------------------------

    def submit_read(self, sector: int, nbytes: int = 0, *,
                    into: DmaBuffer | Sequence[DmaBuffer] | None = None) -> BlkRequest:
        """:meth:`BlkDevice.submit_read <virtq.devices.BlkDevice.submit_read>` (it never
        blocks); the request is published by the next wait or :meth:`kick`.  Raises what
        it raises (:class:`~virtq.errors.QueueFullError` when every slot is in flight)."""
        return self.device.submit_read(sector, nbytes, into=into)

    def submit_write(self, sector: int, data: Any) -> BlkRequest:
        """:meth:`BlkDevice.submit_write <virtq.devices.BlkDevice.submit_write>`.  Raises
        what it raises."""
        return self.device.submit_write(sector, data)

    def kick(self) -> None:
        """Publish submitted requests now (waits do it too)."""
        self.device.kick()

    async def wait(self, requests: Iterable[BlkRequest]) -> None:
        """Until every one of ``requests`` is done (each with its result or ``error``).
        Raises :class:`~virtq.errors.ArgumentError` for a request of another device and
        :class:`~virtq.errors.VirtqError` if one is neither done nor in flight."""
        try:
            pending = list(requests)
        except TypeError:
            raise ArgumentError("requests", requests,
                                "must be an iterable of BlkRequest") from None
        for r in pending:
            if not isinstance(r, BlkRequest) or r._dev is not self.device:
                raise ArgumentError("requests", r, "must be requests of this device")
        await self.pump.until(lambda: all(r.done for r in pending), want=len(pending) or 1)

    async def result(self, request: BlkRequest) -> bytes | None:
        """Wait for ``request``; its data (copying reads, GET_ID) or None.  Raises the
        request's error (:class:`~virtq.devices.BlkIOError`, ...) and what :meth:`wait`
        raises."""
        await self.wait([request])
        return request.wait(0)

    # -- convenience ---------------------------------------------------------------------

    async def _submit(self, submit: Any, *args: Any) -> BlkRequest:
        """``submit(*args)``, waiting for a free slot while every one is in flight."""
        while True:
            try:
                req: BlkRequest = submit(*args)
                return req
            except QueueFullError:
                if not self.device.in_flight:
                    raise
                await self._until_fewer(self.device.in_flight)

    async def _until_fewer(self, busy: int) -> None:
        await self.pump.until(lambda: self.device.in_flight < busy)

    async def read(self, sector: int, nbytes: int) -> bytes:
        """Read ``nbytes`` (a multiple of 512) at ``sector``; a transfer larger than
        ``max_io`` goes as several requests in flight together.  Raises the first failed
        request's error, and :class:`~virtq.errors.ArgumentError` for bad values."""
        dev = self.device
        _check_sector(sector)
        if not isinstance(nbytes, int) or nbytes <= 0 or nbytes % SECTOR:
            raise ArgumentError("nbytes", nbytes, "must be a positive multiple of 512")
        if nbytes > dev.capacity_bytes:
            raise ArgumentError("nbytes", nbytes, f"larger than the device "
                                f"({dev.capacity_bytes} bytes)")
        reqs = []
        for off in range(0, nbytes, dev.max_io):
            n = min(dev.max_io, nbytes - off)
            reqs.append(await self._submit(dev.submit_read, sector + off // SECTOR, n))
        await self.wait(reqs)
        return b"".join(r.wait(0) or b"" for r in reqs)

    async def write(self, sector: int, data: Any) -> None:
        """Write bytes-like ``data`` (a multiple of 512 bytes) at ``sector``, split like
        :meth:`read`.  Raises the first failed request's error, and
        :class:`~virtq.errors.ArgumentError` for bad values."""
        dev = self.device
        _check_sector(sector)
        view = byte_view(data)
        if not len(view) or len(view) % SECTOR:
            raise ArgumentError("data", f"<{len(view)} bytes>",
                                "must be a positive multiple of 512 bytes")
        reqs = []
        for off in range(0, len(view), dev.max_io):
            reqs.append(await self._submit(dev.submit_write, sector + off // SECTOR,
                                           view[off : off + dev.max_io]))
        await self.wait(reqs)
        for r in reqs:
            r.wait(0)

    async def flush(self) -> None:
        """Make earlier writes durable.  Raises
        :class:`~virtq.errors.QueueStateError` when the device has no flush, and the
        request's error."""
        if not self.device.flush_supported:
            raise QueueStateError("the device did not offer VIRTIO_BLK_F_FLUSH")
        await self.result(await self._submit(self.device.submit_flush))

    async def get_id(self) -> str:
        """The device's identifier string.  Raises the request's error."""
        raw = await self.result(await self._submit(self.device.submit_get_id)) or b""
        return raw.decode("ascii", "replace")

    async def completions(self, *, want: int = 1) -> AsyncIterator[BlkRequest]:
        """Yield each request as it completes (with its result or ``error``), until
        nothing is in flight.  Requests other tasks wait for are yielded too.  ``want``
        asks the device to notify after that many completions (fewer wake-ups for deep
        queues).  Raises what :meth:`Pump.until <virtq.aio.Pump.until>` raises."""
        box = self.pump.subscribe()
        try:
            while True:
                self.pump.reap()
                while box:
                    yield box.pop(0)
                if not self.device.in_flight:
                    return
                await self.pump.until(lambda: bool(box) or not self.device.in_flight,
                                      want=min(want, self.device.in_flight))
        finally:
            self.pump.unsubscribe(box)

    async def drain(self) -> None:
        """Until the device holds no request: what cancelled waits left behind is reaped
        and its slots are free again."""
        if self.device.in_flight:
            await self.pump.until(lambda: not self.device.in_flight)

    # -- life ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the device (requests still in flight fail with
        :class:`~virtq.errors.QueueStateError`).  Raises what
        :meth:`BlkDevice.close <virtq.devices.BlkDevice.close>` raises."""
        self.device.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = ["AsyncBlkDevice"]
