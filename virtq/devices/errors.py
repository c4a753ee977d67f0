"""Errors of the device drivers."""

from __future__ import annotations

from virtq.errors import DeviceError


class BlkIOError(DeviceError):
    """The block device completed a request with ``VIRTIO_BLK_S_IOERR`` (or an unknown
    status): a read past the end, a failed medium, a write to a read-only disk."""

    def __init__(self, message: str, *, kind: str, sector: int, nbytes: int, status: int):
        super().__init__(message)
        self.kind = kind
        self.sector = sector
        self.nbytes = nbytes
        self.status = status


class BlkUnsupportedError(BlkIOError):
    """The device answered ``VIRTIO_BLK_S_UNSUPP``: it does not implement the request type."""
