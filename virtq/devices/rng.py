"""virtio-rng, the entropy device (VIRTIO 1.2 §5.4), over any
:class:`~virtq.transport.Transport`.

The device has one queue (requestq) and no features or configuration.  The driver posts
device-writable buffers; the device fills them with random bytes and reports how many it
wrote (possibly fewer than offered, possibly 0).  :meth:`RngDevice.read` keeps posting until
it has the bytes asked for; with more than one buffer's worth, several requests are in
flight at once.
"""

from __future__ import annotations

import time
from typing import Any, Self

from virtq.abi.rng import VIRTIO_ID_ENTROPY
from virtq.errors import ArgumentError, DeviceError, QueueStateError
from virtq.iova import IovaAllocator
from virtq.layout import SplitLayout
from virtq.queue import SplitQueue
from virtq.transport.base import Transport
from virtq.transport.vfio_pci import VfioPciTransport

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
        # Per slot: where its buffer is in the arena, and where the device sees it.
        self._buf_off = [layout.buffer(slot) for slot in range(size)]
        self._buf_iova = [self.arena.iova + off for off in self._buf_off]
        self._notify = t.notify

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
        transport = VfioPciTransport.open(
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
        free = self._free
        offsets = self._buf_off
        iovas = self._buf_iova
        size = self.buffer_size
        out = bytearray()
        pending = 0  # bytes asked for in requests still in flight
        deadline = 0.0  # set when the first wait starts
        while len(out) < n:
            # Keep enough requests in flight to cover what is still missing.
            missing = n - len(out) - pending
            added = False
            while free and missing > 0:
                slot = free.pop()
                length = size if missing > size else missing
                q.add((), [(iovas[slot], length)], (slot, length))
                pending += length
                missing -= length
                added = True
            if added and q.publish():
                self._notify(0)
            done = q.drain_used()
            if not done:
                if not deadline:
                    deadline = time.monotonic() + self.timeout
                done = self._wait_used(deadline)
            for (slot, length), written in done:
                pending -= length
                start = offsets[slot]
                take = n - len(out)
                out += mem[start : start + (written if written < take else take)]
                free.append(slot)
        return bytes(out)

    def _wait_used(self, deadline: float) -> list[tuple[Any, int]]:
        q = self.queue
        assert q is not None
        t = self.transport
        has_used = q.has_used
        # A polling transport's wait() returns False at once; spin on used.idx in a tight
        # loop then, looking at the clock only now and then.
        spin = 1024 if getattr(t, "poll", False) else 0
        while True:
            for _ in range(spin):
                if has_used():
                    break
            done = q.drain_used()
            if done:
                return done
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RngTimeoutError(f"no entropy from the device within {self.timeout} s")
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
