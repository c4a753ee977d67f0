"""Transports: the only layer that does I/O with a device."""

from virtq.transport.base import DmaArena, Transport
from virtq.transport.errors import DeviceRefusedError, TransportError

__all__ = ["DeviceRefusedError", "DmaArena", "Transport", "TransportError"]
