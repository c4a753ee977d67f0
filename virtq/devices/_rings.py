"""Which ring format a device driver asks for, in one place for every device.

``ring``: ``"split"`` (VIRTIO 1.2 §2.7), ``"packed"`` (§2.8), or ``"auto"`` -- packed when
the device offers VIRTIO_F_RING_PACKED.  ``in_order``: True insists on VIRTIO_F_IN_ORDER,
False refuses it, None takes it when offered (and when virtq implements it for the chosen
format).  Asking for what the device does not offer is a :class:`DeviceRefusedError`.
"""

from __future__ import annotations

from virtq.abi import VIRTIO_F_IN_ORDER, VIRTIO_F_RING_PACKED
from virtq.errors import ArgumentError
from virtq.transport.errors import DeviceRefusedError

RINGS = ("auto", "split", "packed")
#: The formats virtq's queues implement VIRTIO_F_IN_ORDER for.
IN_ORDER_FORMATS = frozenset({"split", "packed"})


def ring_wanted(ring: str, in_order: bool | None) -> int:
    """The ring feature bits to ask for.  Raises :class:`ArgumentError` for a bad
    ``ring`` or ``in_order``."""
    if ring not in RINGS:
        raise ArgumentError("ring", ring, f"must be one of {RINGS}")
    if in_order not in (None, True, False):
        raise ArgumentError("in_order", in_order, "must be True, False or None (when offered)")
    wanted = 0
    if ring != "split":
        wanted |= 1 << VIRTIO_F_RING_PACKED
    if in_order is not False and (ring != "split" or "split" in IN_ORDER_FORMATS):
        wanted |= 1 << VIRTIO_F_IN_ORDER
    return wanted


def ring_chosen(accepted: int, ring: str, in_order: bool | None) -> tuple[str, bool]:
    """The format and in-order mode the negotiated ``accepted`` features give; raises
    :class:`DeviceRefusedError` when the device lacks what was insisted on."""
    packed = bool(accepted >> VIRTIO_F_RING_PACKED & 1)
    if ring == "packed" and not packed:
        raise DeviceRefusedError("ring='packed' asked, the device does not offer "
                                 "VIRTIO_F_RING_PACKED")
    fmt = "packed" if packed else "split"
    ordered = bool(accepted >> VIRTIO_F_IN_ORDER & 1)
    if in_order and not ordered:
        raise DeviceRefusedError("in_order=True asked, the device does not offer "
                                 "VIRTIO_F_IN_ORDER" if fmt in IN_ORDER_FORMATS else
                                 f"in_order=True asked: virtq's {fmt} ring does not "
                                 "implement VIRTIO_F_IN_ORDER")
    return fmt, ordered
