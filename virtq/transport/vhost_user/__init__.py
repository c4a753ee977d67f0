"""vhost-user front-end: drive a vhost-user back-end over a Unix socket."""

from virtq.transport.vhost_user.errors import (
    VhostUserConnectError,
    VhostUserDisconnectedError,
    VhostUserError,
    VhostUserNackError,
    VhostUserProtocolError,
    VhostUserRegionLimitError,
    VhostUserTimeoutError,
)
from virtq.transport.vhost_user.frontend import VhostUserFrontend
from virtq.transport.vhost_user.transport import VhostUserTransport

__all__ = [
    "VhostUserConnectError",
    "VhostUserDisconnectedError",
    "VhostUserError",
    "VhostUserFrontend",
    "VhostUserNackError",
    "VhostUserProtocolError",
    "VhostUserRegionLimitError",
    "VhostUserTimeoutError",
    "VhostUserTransport",
]
