"""virtio-rng, the entropy device (VIRTIO 1.2 §5.4), over any
:class:`~virtq.transport.Transport`.

The device has one queue (requestq) and no features or configuration.  The driver posts
device-writable buffers; the device fills them with random bytes and reports how many it
wrote (possibly fewer than offered, possibly 0).  :meth:`RngDevice.read` keeps posting until
it has the bytes asked for; with more than one buffer's worth, several requests are in
flight at once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import EllipsisType
from typing import Any, Self

from virtq.abi.rng import REQUEST_QUEUE, VIRTIO_ID_ENTROPY
from virtq.devices._rings import ring_chosen, ring_wanted
from virtq.errors import (
    ArgumentError,
    DeviceError,
    DeviceProtocolError,
    QueueStateError,
    VirtqTimeoutError,
)
from virtq.iova import IovaAllocator
from virtq.memory import MemoryRegion
from virtq.queue import ChainTemplate, DriverQueue, make_queue, ring_layout
from virtq.transport.base import Transport
from virtq.transport.vfio_pci import VfioPciTransport
from virtq.transport.waiter import Waiter, deadline_after
from virtq.types import Iova

#: Queue size used when none is asked for: the device's maximum, capped here.
DEFAULT_MAX_QUEUE = 64


class RngTimeoutError(DeviceError, VirtqTimeoutError):
    """The device did not complete a request in time."""


class RngDevice:
    """A virtio entropy device.  Closing it closes the transport.

    ``queue_size``: None takes the device's maximum (at most 64); a size the device does not
    allow raises the transport's error (e.g.
    :class:`~virtq.transport.vfio_pci.QueueSizeError`).  ``buffer_size``: bytes per request.
    ``timeout``: the default for :meth:`read`.
    """

    def __init__(self, transport: Transport, *, queue_size: int | None = None,
                 buffer_size: int = 4096, timeout: float | None = 5.0,
                 poll: bool = False, ring: str = "auto",
                 in_order: bool | None = None) -> None:
        self.transport = transport
        deadline_after(timeout)  # validates it
        self.timeout = timeout
        self._closed = False
        self._mem: memoryview | None = None
        self.queue: DriverQueue[tuple[int, int]] | None = None
        try:
            self._setup(queue_size, buffer_size, poll, ring, in_order)
        except BaseException:
            self._release()
            transport.close()
            raise

    def _setup(self, queue_size: int | None, buffer_size: int, poll: bool, ring: str,
               in_order: bool | None) -> None:
        t = self.transport
        device_type = t.device_type
        if device_type is not None and device_type != VIRTIO_ID_ENTROPY:
            raise ArgumentError("transport", t, f"is a virtio type {device_type} device, not "
                                f"an entropy device ({VIRTIO_ID_ENTROPY})")
        if not isinstance(buffer_size, int) or not 0 < buffer_size < 1 << 32:
            raise ArgumentError("buffer_size", buffer_size, "must be an int in 1..2**32-1")
        # §5.4.3: no device-specific feature bits; the transport adds what it needs.
        self.features = t.negotiate(ring_wanted(ring, in_order))
        #: "split" or "packed", and whether VIRTIO_F_IN_ORDER is in use.
        self.ring, self.in_order = ring_chosen(self.features, ring, in_order)
        maximum = t.max_queue_size(REQUEST_QUEUE)
        size = min(maximum, DEFAULT_MAX_QUEUE) if queue_size is None else queue_size
        layout = ring_layout(size, buffer_size=buffer_size, ring=self.ring)
        self.arena = t.alloc_dma(layout.nbytes)
        self.layout = layout
        self.buffer_size = buffer_size
        self.queue = make_queue(self.arena.region, layout, iova=self.arena.iova,
                                in_order=self.in_order)
        # One buffer per request, so each slot keeps one descriptor for good.
        self._tpl: ChainTemplate[tuple[int, int]] = self.queue.template(1, slots=size)
        t.attach_queue(REQUEST_QUEUE, self.queue)
        self._waiter = Waiter(t, [self.queue], poll=poll)
        t.start()
        self._mem = self.arena.region.view()
        # Per slot: where its buffer is in the arena, and the whole buffer as the queue
        # takes it (a full-size request hands over the same tuple: no descriptor write).
        self._buf_off = [layout.buffer(slot) for slot in range(size)]
        self._full = [((Iova(self.arena.iova + off), buffer_size),) for off in self._buf_off]

    @classmethod
    def open_vfio(
        cls,
        pci_address: str,
        *,
        iova_allocator: IovaAllocator | None = None,
        memory: Callable[[int], MemoryRegion] | None = None,
        poll: bool = False,
        bind: bool = False,
        queue_size: int | None = None,
        buffer_size: int = 4096,
        timeout: float | None = 5.0,
        ring: str = "auto",
        in_order: bool | None = None,
        **transport_options: Any,
    ) -> Self:
        """Open a virtio-rng PCI function through VFIO (see ``docs/vfio.md``);
        ``transport_options`` go to :meth:`VfioPciTransport.open`."""
        transport = VfioPciTransport.open(
            pci_address, iova_allocator=iova_allocator, memory=memory, poll=poll, bind=bind,
            **transport_options)
        try:
            return cls(transport, queue_size=queue_size, buffer_size=buffer_size,
                       timeout=timeout, poll=poll, ring=ring, in_order=in_order)
        except BaseException:
            transport.close()
            raise

    # -- reading --------------------------------------------------------------------------

    def read(self, n: int, timeout: float | EllipsisType | None = ...) -> bytes:
        """``n`` random bytes from the device, within ``timeout`` seconds (default: the
        device's ``timeout``; None: no limit) in all.  Raises :class:`RngTimeoutError`
        when it runs out, :class:`~virtq.errors.DeviceProtocolError` (and breaks the queue)
        for a completion with no bytes (§5.4.6.1: the device MUST place one or more), the
        transport's error when the device fails."""
        # n=2**64 can never be returned (bytes hold at most sys.maxsize): refused, not read
        # until memory runs out.
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= sys.maxsize:
            raise ArgumentError("n", n, "must be an int in 0..sys.maxsize")
        mem = self._check_open()
        q = self.queue
        assert q is not None
        if isinstance(timeout, EllipsisType):
            timeout = self.timeout
        deadline = deadline_after(timeout)
        tpl = self._tpl
        offsets = self._buf_off
        full = self._full
        size = self.buffer_size
        out = bytearray()
        pending = 0  # bytes asked for in requests still in flight
        while len(out) < n:
            # Keep enough requests in flight to cover what is still missing.
            missing = n - len(out) - pending
            added = False
            while tpl.num_free and missing > 0:
                slot = tpl.acquire()
                if missing >= size:
                    length = size
                    tpl.submit(slot, (), full[slot], (slot, size))
                else:
                    length = missing
                    tpl.submit(slot, (), ((full[slot][0][0], length),), (slot, length))
                pending += length
                missing -= length
                added = True
            if added and q.publish():
                self.transport.notify(REQUEST_QUEUE)
            done = q.drain_used()
            if not done:
                if not self._waiter.wait(deadline) and not q.has_used():
                    raise RngTimeoutError(f"no entropy from the device within {timeout} s")
                continue
            if deadline is not None and time.monotonic() >= deadline:
                # "within timeout seconds in all": a device that answers fast must not
                # keep a huge read going past it (it was checked only while waiting).
                raise RngTimeoutError(f"{len(out)} of {n} bytes of entropy within "
                                      f"{timeout} s")
            for (slot, length), written in done:
                pending -= length
                if not written:
                    err = DeviceProtocolError(
                        f"used.len of a {length}-byte entropy request", 0,
                        ">= 1 (§5.4.6.1: the device MUST place one or more random bytes)")
                    q.mark_broken(err)
                    try:
                        raise err
                    finally:
                        del err  # no error -> traceback -> frame -> error cycle
                start = offsets[slot]
                take = n - len(out)
                out += mem[start : start + (written if written < take else take)]
        return bytes(out)

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
        """True after :meth:`close`."""
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
