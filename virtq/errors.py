"""The exception tree.

Three kinds of failure are kept apart so callers can react to each:

* :class:`VirtqUsageError` -- the caller asked for something impossible (a queue size that
  is not a power of two, a view past the end of a region, a full queue).  Fix the call.
* :class:`DeviceError` -- the peer on the other side of the shared memory misbehaved (a used
  element naming a descriptor that is not in flight, a length beyond what was offered).
  The peer is untrusted; these are expected, catchable conditions, never crashes.
* :class:`VirtqOSError` -- the operating system refused (no hugepages, mmap failed).  These
  are also :class:`OSError` with the real ``errno``.

Every exception carries the offending values as attributes so that a log line or a test can
show exactly what happened.
"""

from __future__ import annotations

import errno as _errno


class VirtqError(Exception):
    """Root of every exception virtq raises on purpose."""


# -- caller misuse -----------------------------------------------------------------------


class VirtqUsageError(VirtqError):
    """The caller used the API in a way it does not allow."""


class ArgumentError(VirtqUsageError, ValueError):
    """An argument breaks a documented rule; ``name``, ``value`` and ``rule`` say which."""

    def __init__(self, name: str, value: object, rule: str) -> None:
        super().__init__(f"{name}={value!r}: {rule}")
        self.name = name
        self.value = value
        self.rule = rule


class LayoutError(ArgumentError):
    """A ring layout parameter breaks a rule of the VIRTIO spec (or of virtq)."""


class RegionClosedError(VirtqUsageError):
    """The memory region was used after ``close()``."""


class RegionBusyError(VirtqUsageError):
    """``close()`` was refused because views of the region are still alive."""


class RegionBoundsError(VirtqUsageError, ValueError):
    """A view or access falls outside the memory region."""

    def __init__(self, offset: int, length: int, nbytes: int) -> None:
        super().__init__(
            f"range offset={offset} length={length} is outside the region of {nbytes} bytes"
        )
        self.offset = offset
        self.length = length
        self.nbytes = nbytes


class IovaExhaustedError(VirtqUsageError):
    """No free IOVA span can satisfy the request."""

    def __init__(self, size: int, align: int, largest_free: int) -> None:
        super().__init__(
            f"cannot allocate {size:#x} bytes of IOVA (align {align:#x}); "
            f"largest free span is {largest_free:#x} bytes"
        )
        self.size = size
        self.align = align
        self.largest_free = largest_free


class IovaError(VirtqUsageError, ValueError):
    """An IOVA operation was invalid (double free, unknown address, bad tag)."""


class QueueFullError(VirtqUsageError):
    """The queue (or device) has no room: the chain does not fit into the free descriptors,
    or every request slot is in flight.  ``needed``/``free`` count ``what``."""

    def __init__(self, needed: int, free: int, what: str = "descriptors") -> None:
        super().__init__(f"{needed} {what} needed but only {free} are free")
        self.needed = needed
        self.free = free
        self.what = what


class QueueStateError(VirtqUsageError):
    """The call is not valid in the queue's current state (e.g. after ``close()``)."""


class VirtqTimeoutError(VirtqError, TimeoutError):
    """A wait ran out of time (the device did not complete in time).  Also a
    :class:`TimeoutError`; the requests waited for stay in flight."""


# -- peer misbehaviour -------------------------------------------------------------------


class DeviceError(VirtqError):
    """The device (the untrusted peer) broke the protocol."""


class DeviceProtocolError(DeviceError):
    """A value the device wrote into shared memory is impossible.

    ``field`` names what was read (``"used.idx"``, ``"used.ring[3].id"``, ...), ``value`` is
    what the device wrote and ``expected`` describes what would have been valid.
    """

    def __init__(self, field: str, value: int, expected: str) -> None:
        super().__init__(f"device wrote {field}={value:#x}; expected {expected}")
        self.field = field
        self.value = value
        self.expected = expected
        #: ``(token, written_len)`` pairs that were valid and reaped in the same call before
        #: the bad element (set by the queue; empty otherwise).
        self.completed: list[tuple[object, int]] = []


class QueueBrokenError(DeviceError):
    """The queue was marked broken by an earlier :class:`DeviceProtocolError` (or another
    :class:`DeviceError` found above the ring).

    Once the device has shown it cannot be trusted, further use of the queue would act on
    state that may be corrupt, so every later call raises this, with the original error as
    ``cause`` (and ``__cause__``).  Device drivers also complete the requests a broken queue
    held with it.
    """

    def __init__(self, cause: DeviceError) -> None:
        super().__init__(f"queue is broken: {cause}")
        self.cause = cause


# -- operating system --------------------------------------------------------------------


class VirtqOSError(VirtqError, OSError):
    """The OS refused; also an :class:`OSError` carrying the real errno."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)


class HugepagesUnavailableError(VirtqOSError):
    """The kernel has no free hugepages of the requested size."""

    def __init__(self, page_size: int, nbytes: int, err: int = _errno.ENOMEM) -> None:
        pages = -(-nbytes // page_size)
        super().__init__(
            err,
            f"no free {page_size // 1024} KiB hugepages for {nbytes} bytes ({pages} needed); "
            f"reserve some as root, e.g. `sysctl vm.nr_hugepages={max(pages, 16)}` "
            f"(or write /sys/kernel/mm/hugepages/hugepages-{page_size // 1024}kB/nr_hugepages)",
        )
        self.page_size = page_size
        self.nbytes = nbytes
