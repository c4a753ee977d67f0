"""Transports: the only layer that does I/O with a device."""

from virtq.transport.base import DmaArena, QueueEnabling, Reconnectable, Transport
from virtq.transport.errors import DeviceRefusedError, TransportError
from virtq.transport.notify import NotificationSet
from virtq.transport.reconnect import ReconnectError, ReconnectPolicy
from virtq.transport.waiter import Waiter, deadline_after

__all__ = ["DeviceRefusedError", "DmaArena", "NotificationSet", "QueueEnabling",
           "ReconnectError", "ReconnectPolicy", "Reconnectable", "Transport", "TransportError",
           "Waiter", "deadline_after"]
