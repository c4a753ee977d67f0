"""A small vhost-user-blk back-end in pure Python, serving a raw image file.

It exists for two reasons: the demo and the tests need *some* back-end when
qemu-storage-daemon is not installed, and only a back-end we control can misbehave on
purpose (:class:`Faults`: drop the connection mid-request, NACK, answer garbage, stay
silent, complete out of order, corrupt the used ring -- and one switch per rule that
``virtq check`` checks, so each check can be seen to fail).  ``device="net" | "fs" |
"rng"`` turns it into a net loopback, a small virtio-fs or an entropy device
(:mod:`virtq.testing.embedded.devices`).

It is a device-side peer of virtq's own front-end, written from QEMU's
``docs/interop/vhost-user.rst`` (section names are cited below as "vhost-user.rst, ...")
and VIRTIO 1.2 §5.2 (virtio-blk).  The rings are served by
:class:`~virtq.testing.DeviceQueue`, so no ring code is shared with the driver side.

Use it in-process (a background thread)::

    with VhostUserBlkBackend("disk.img", "/tmp/blk.sock") as backend:
        with BlkDevice.connect_vhost_user("/tmp/blk.sock") as dev:
            dev.read(0, 4096)

or as a process (``python -m virtq.testing.embedded IMAGE SOCKET [--faults SPEC]``, or
:class:`BackendProcess`), which a test can SIGKILL.  Like qemu-storage-daemon it serves one
front-end connection at a time and accepts the next one when that closes.
"""

from virtq.testing.embedded.process import BackendProcess
from virtq.testing.embedded.server import (
    BlkRecord,
    Faults,
    FrontendProtocolError,
    VhostUserBlkBackend,
)

__all__ = [
    "BackendProcess",
    "BlkRecord",
    "Faults",
    "FrontendProtocolError",
    "VhostUserBlkBackend",
]
