"""vhost-user errors: each names the request and what came back."""

from __future__ import annotations

from virtq.errors import DeviceError, VirtqTimeoutError
from virtq.transport.errors import TransportError


class VhostUserError(TransportError):
    """Base of every vhost-user failure; ``request`` is the request's name (or None)."""

    def __init__(self, message: str, *, request: str | None = None, got: object = None):
        super().__init__(message)
        self.request = request
        self.got = got


class VhostUserConnectError(VhostUserError, OSError):
    """The socket could not be connected (no such path, refused, not a socket).  Also an
    ``OSError`` with the real errno."""

    def __init__(self, path: str, err: OSError) -> None:
        VhostUserError.__init__(self, f"cannot connect to vhost-user socket {path!r}: {err}")
        self.errno = err.errno
        self.strerror = err.strerror
        self.filename = path


class VhostUserTimeoutError(VhostUserError, VirtqTimeoutError):
    """The back-end did not answer in time."""


class VhostUserDisconnectedError(VhostUserError, DeviceError):
    """The back-end closed the connection (libvhost-user does this instead of NACKing bad
    input; a crashed back-end looks the same)."""


class VhostUserNackError(VhostUserError, DeviceError):
    """The back-end answered a REPLY_ACK request with a non-zero status."""


class VhostUserProtocolError(VhostUserError, DeviceError):
    """The back-end sent something that is not a valid reply to what was asked."""


class VhostUserRegionLimitError(VhostUserError):
    """The back-end cannot hold another memory region: ``limit`` is how many it takes (8
    with SET_MEM_TABLE; GET_MAX_MEM_SLOTS's answer, at most ``MAX_RAM_SLOTS``, with
    CONFIGURE_MEM_SLOTS) and ``regions`` how many the transport would need."""

    def __init__(self, message: str, *, limit: int, regions: int) -> None:
        super().__init__(message, request="ADD_MEM_REG/SET_MEM_TABLE", got=regions)
        self.limit = limit
        self.regions = regions
