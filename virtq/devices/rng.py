"""virtio-rng, the entropy device (VIRTIO 1.2 §5.4), over any
:class:`~virtq.transport.Transport`.

The device has one queue (requestq) and no features or configuration.  The driver posts
device-writable buffers; the device fills them with random bytes and reports how many it
wrote (possibly fewer than offered, possibly 0).  :meth:`RngDevice.read` keeps posting until
it has the bytes asked for; with more than one buffer's worth, several requests are in
flight at once.
"""

from __future__ import annotations

import importlib
import time
from typing import Any, Self

from virtq.errors import ArgumentError, DeviceError, QueueStateError
from virtq.iova import IovaAllocator
from virtq.layout import SplitLayout
from virtq.queue import SplitQueue
from virtq.transport.base import Transport

VIRTIO_ID_ENTROPY = 4
#: Queue size used when none is asked for: the device's maximum, capped here.
DEFAULT_MAX_QUEUE = 64


class RngTimeoutError(DeviceError, TimeoutError):
    """The device did not complete a request in time."""


class RngDevice:
    """A virtio entropy device.  Closing it closes the transport.

    ``queue_size``: None takes the device's maximum (at most 64); a size the device does not
    allow raises the transport's error (e.g.
    :class:`~virtq.transport.vfio_pci.QueueSizeError`).  ``buffer_size``: bytes per request.
    """

    def __init__(self, transport: Transport, *, queue_size: int | None = None,
                 buffer_size: int = 4096, timeout: float = 5.0) -> None:
        self.transport = transport
        self.timeout = timeout
        self._closed = False
        self._mem: memoryview | None = None
        self.queue: SplitQueue | None = None
        try:
            self._setup(queue_size, buffer_size)
        except BaseException:
            self._release()
            transport.close()
            raise

    def _setup(self, queue_size: int | None, buffer_size: int) -> None:
        t = self.transport
        device_type = getattr(t, "device_type", VIRTIO_ID_ENTROPY)
        if device_type != VIRTIO_ID_ENTROPY:
            raise ArgumentError("transport", t, f"is a virtio type {device_type} device, not "
                                f"an entropy device ({VIRTIO_ID_ENTROPY})")
        if not isinstance(buffer_size, int) or buffer_size <= 0:
            raise ArgumentError("buffer_size", buffer_size, "must be a positive int")
        # §5.4.3: no device-specific feature bits; the transport adds what it needs.
        self.features = t.negotiate(0)
        maximum = t.max_queue_size(0)
        size = min(maximum, DEFAULT_MAX_QUEUE) if queue_size is None else queue_size
        layout = SplitLayout.compute(size, buffer_size=buffer_size)
        self.arena = t.alloc_dma(layout.nbytes)
        self.layout = layout
        self.buffer_size = buffer_size
        self.queue = SplitQueue(self.arena.region, layout, iova=self.arena.iova)
        t.attach_queue(0, self.queue)
        t.start()
        self._mem = self.arena.region.view()
        self._free = list(range(size - 1, -1, -1))

    @classmethod
    def open_vfio(
        cls,
        pci_address: str,
        *,
        iova_allocator: IovaAllocator | None = None,
        memory: Any = None,
        poll: bool = False,
        bind: bool = False,
        queue_size: int | None = None,
        **transport_options: Any,
    ) -> Self:
        """Open a virtio-rng PCI function through VFIO (see ``docs/vfio.md``)."""
        # Imported on use: VFIO is Linux-only machinery the other transports never need.
        vfio_pci = importlib.import_module("virtq.transport.vfio_pci")
        transport = vfio_pci.VfioPciTransport.open(
            pci_address, iova_allocator=iova_allocator, memory=memory, poll=poll, bind=bind,
            **transport_options)
        return cls(transport, queue_size=queue_size)

    # -- reading --------------------------------------------------------------------------

    def read(self, n: int) -> bytes:
        """``n`` random bytes from the device."""
        if not isinstance(n, int) or n < 0:
            raise ArgumentError("n", n, "must be a non-negative int")
        mem = self._check_open()
        q = self.queue
        assert q is not None
        layout = self.layout
        iova = self.arena.iova
        out = bytearray()
        pending = 0  # bytes asked for in requests still in flight
        deadline = time.monotonic() + self.timeout
        while len(out) < n:
            # Keep enough requests in flight to cover what is still missing.
            added = False
            while self._free and len(out) + pending < n:
                slot = self._free.pop()
                length = min(self.buffer_size, n - len(out) - pending)
                q.add((), [(iova + layout.buffer(slot), length)], (slot, length))
                pending += length
                added = True
            if added and q.publish():
                self.transport.notify(0)
            for (slot, length), written in self._wait_used(deadline):
                pending -= length
                start = layout.buffer(slot)
                out += mem[start : start + min(written, n - len(out))]
                self._free.append(slot)
        return bytes(out)

    def _wait_used(self, deadline: float) -> list[tuple[Any, int]]:
        q = self.queue
        assert q is not None
        t = self.transport
        while True:
            done = q.drain_used()
            if done:
                return done
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RngTimeoutError(f"no entropy from the device within {self.timeout} s")
            # A polling transport returns False at once: this loop then spins on used.idx.
            t.wait(0, min(remaining, 0.1))

    # -- teardown ---------------------------------------------------------------------------

    def _check_open(self) -> memoryview:
        if self._closed or self._mem is None:
            raise QueueStateError("RngDevice is closed")
        return self._mem

    def _release(self) -> None:
        # Views of the arena go first, so the transport can unmap and close it.
        if self._mem is not None:
            self._mem.release()
            self._mem = None
        if self.queue is not None:
            self.queue.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the queue memory and close the transport (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._release()
        self.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
