"""Errors raised by transports."""

from __future__ import annotations

from virtq.errors import DeviceError, VirtqError


class TransportError(VirtqError):
    """A transport could not do what was asked (setup failed, device refused)."""


class DeviceRefusedError(TransportError, DeviceError):
    """The device refused a step of initialisation (e.g. FEATURES_OK not set, queue size
    not allowed, a required feature missing)."""
