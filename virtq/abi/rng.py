"""virtio-rng (entropy device) constants (VIRTIO 1.2 §5.4): one queue, no features, no
configuration space."""

from __future__ import annotations

#: Device type (§5, "Device Types").
VIRTIO_ID_ENTROPY = 4
#: The only queue (§5.4.2).
REQUEST_QUEUE = 0
