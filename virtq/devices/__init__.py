"""Device drivers over any transport."""

from virtq.devices.blk import BlkDevice, BlkRequest
from virtq.devices.dma import DmaBuffer
from virtq.devices.errors import (
    BlkIOError,
    BlkUnsupportedError,
    FsBlockingIOError,
    FsFileExistsError,
    FsFileNotFoundError,
    FsInterruptedError,
    FsIsADirectoryError,
    FsNotADirectoryError,
    FsOSError,
    FsPermissionError,
    FsTimeoutError,
    fs_error,
)
from virtq.devices.fs import FsConfig, FsDevice, FsRequest
from virtq.devices.fsfile import FsFile
from virtq.devices.fswire import FsAttr, FsDirEntry, FsEntry, FsInit
from virtq.devices.net import NetDevice, NetTimeoutError
from virtq.devices.rng import RngDevice, RngTimeoutError
from virtq.transport.reconnect import ReconnectError, ReconnectPolicy

__all__ = [
    "BlkDevice",
    "BlkIOError",
    "BlkRequest",
    "BlkUnsupportedError",
    "DmaBuffer",
    "FsAttr",
    "FsBlockingIOError",
    "FsConfig",
    "FsDevice",
    "FsDirEntry",
    "FsEntry",
    "FsFile",
    "FsFileExistsError",
    "FsFileNotFoundError",
    "FsInit",
    "FsInterruptedError",
    "FsIsADirectoryError",
    "FsNotADirectoryError",
    "FsOSError",
    "FsPermissionError",
    "FsRequest",
    "FsTimeoutError",
    "NetDevice",
    "NetTimeoutError",
    "ReconnectError",
    "ReconnectPolicy",
    "RngDevice",
    "RngTimeoutError",
    "fs_error",
]
