"""The virtio-pci modern register protocol (VIRTIO 1.2 §4.1.4.3, §3.1), over any
:class:`~virtq.transport.vfio_pci.device.RegisterSpace`.

:class:`VirtioPciFunction` knows the common configuration's registers and the order the
spec wants them touched in -- reset, status, features, queues, vectors, device config --
but nothing about VFIO, so it is tested against a register model as well as the real
device.  The transport adds VFIO, DMA memory and interrupts around it.
"""

from __future__ import annotations

import time

from virtq.abi import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
)
from virtq.errors import ArgumentError
from virtq.transport.errors import DeviceRefusedError
from virtq.transport.vfio_pci.device import RegisterSpace
from virtq.transport.vfio_pci.errors import (
    DeviceResetTimeoutError,
    FeaturesRefusedError,
    QueueSizeError,
    VectorRefusedError,
)

#: ``struct virtio_pci_common_cfg`` (§4.1.4.3): name -> (offset, width).  64-bit fields are
#: accessed as two 32-bit halves, low half first (§4.1.3.1).
COMMON_CFG: dict[str, tuple[int, int]] = {
    "device_feature_select": (0x00, 4),
    "device_feature": (0x04, 4),
    "driver_feature_select": (0x08, 4),
    "driver_feature": (0x0C, 4),
    "config_msix_vector": (0x10, 2),
    "num_queues": (0x12, 2),
    "device_status": (0x14, 1),
    "config_generation": (0x15, 1),
    "queue_select": (0x16, 2),
    "queue_size": (0x18, 2),
    "queue_msix_vector": (0x1A, 2),
    "queue_enable": (0x1C, 2),
    "queue_notify_off": (0x1E, 2),
    "queue_desc": (0x20, 8),
    "queue_driver": (0x28, 8),
    "queue_device": (0x30, 8),
}
VIRTIO_MSI_NO_VECTOR = 0xFFFF
_MAX_VECTOR = 0x7FF  # §4.1.5.1.2: MSI-X vectors 0..0x7FF
_GENERATION_RETRIES = 16


def status_names(status: int) -> str:
    """``device_status`` bits by name, ``|``-joined (``ACKNOWLEDGE|DRIVER``; ``0`` for none)."""
    names = [name for bit, name in ((1, "ACKNOWLEDGE"), (2, "DRIVER"), (4, "DRIVER_OK"),
                                    (8, "FEATURES_OK"), (0x40, "DEVICE_NEEDS_RESET"),
                                    (0x80, "FAILED")) if status & bit]
    return "|".join(names) or "0"


class CommonCfg:
    """Named access to the common configuration window, each register at its own width."""

    def __init__(self, window: RegisterSpace) -> None:
        self.window = window

    def read(self, name: str) -> int:
        """Common configuration register ``name`` (a key of ``COMMON_CFG``), read at its width
        (64-bit ones as two 32-bit halves, low first).  Raises ``KeyError`` for an unknown name."""
        offset, width = COMMON_CFG[name]
        if width == 8:
            return self.window.read(offset, 4) | self.window.read(offset + 4, 4) << 32
        return self.window.read(offset, width)

    def write(self, name: str, value: int) -> None:
        """Store ``value`` into register ``name`` at its width (64-bit ones as two halves, low
        first).  Raises ``KeyError`` for an unknown name."""
        offset, width = COMMON_CFG[name]
        if width == 8:
            self.window.write(offset, 4, value & 0xFFFF_FFFF)
            self.window.write(offset + 4, 4, value >> 32)
        else:
            self.window.write(offset, width, value)


class VirtioPciFunction:
    """Driver-side steps of VIRTIO 1.2 §3.1.1 on a modern virtio-pci function."""

    def __init__(self, common: RegisterSpace, device_cfg: RegisterSpace | None = None,
                 device_cfg_len: int = 0, *, name: str = "device") -> None:
        self.cfg = CommonCfg(common)
        self.device_cfg = device_cfg
        self.device_cfg_len = device_cfg_len if device_cfg is not None else 0
        self.name = name
        self._queue_max: dict[int, int] = {}

    # -- status --------------------------------------------------------------------------

    @property
    def status(self) -> int:
        """``device_status`` as the device reads it now."""
        return self.cfg.read("device_status")

    def add_status(self, bits: int) -> int:
        """Set ``bits`` on top of the current status (§2.1.2: the driver never clears a
        bit except by reset); returns what the device reads back."""
        self.cfg.write("device_status", self.status | bits)
        return self.status

    def fail(self) -> None:
        """Tell the device the driver gave up (FAILED, §3.1.1 'if any of these steps go
        irrecoverably wrong')."""
        self.add_status(VIRTIO_CONFIG_S_FAILED)

    def reset(self, timeout: float = 1.0) -> float:
        """Write 0 and wait until status reads 0 (§2.1.2, §4.1.4.3.2); returns the seconds
        it took.  Queue vectors and sizes go back to their defaults.  Raises
        :class:`DeviceResetTimeoutError` when status is not 0 after ``timeout`` seconds."""
        self._queue_max.clear()
        t0 = time.monotonic()
        self.cfg.write("device_status", 0)
        spins = 0
        while self.status != 0:
            spins += 1
            if spins > 100:
                if time.monotonic() - t0 > timeout:
                    raise DeviceResetTimeoutError(
                        f"{self.name} still reads status {status_names(self.status)} "
                        f"{timeout} s after a reset")
                time.sleep(0.001)
        return time.monotonic() - t0

    # -- features ------------------------------------------------------------------------

    def device_features(self) -> int:
        """The 64 feature bits the device offers (both ``device_feature_select`` halves)."""
        features = 0
        for select in (0, 1):
            self.cfg.write("device_feature_select", select)
            features |= self.cfg.read("device_feature") << (32 * select)
        return features

    def write_driver_features(self, features: int) -> None:
        """Write the 64 feature bits the driver accepts (both halves); nothing is checked until
        FEATURES_OK (:meth:`accept_features`)."""
        for select in (0, 1):
            self.cfg.write("driver_feature_select", select)
            self.cfg.write("driver_feature", features >> (32 * select) & 0xFFFF_FFFF)

    def accept_features(self, features: int) -> None:
        """Write ``features``, set FEATURES_OK and read it back (§3.1.1 steps 5-6).  If the
        device cleared it, set FAILED and raise :class:`FeaturesRefusedError`."""
        self.write_driver_features(features)
        status = self.add_status(VIRTIO_CONFIG_S_FEATURES_OK)
        if not status & VIRTIO_CONFIG_S_FEATURES_OK:
            self.fail()
            raise FeaturesRefusedError(
                f"{self.name} did not accept features {features:#x} (FEATURES_OK did not stay "
                f"set; status reads {status_names(status)}); a QEMU device with "
                "iommu_platform=on refuses any set without VIRTIO_F_ACCESS_PLATFORM",
                features=features, status=status)

    # -- queues --------------------------------------------------------------------------

    def num_queues(self) -> int:
        """How many virtqueues the function has (``num_queues``)."""
        return self.cfg.read("num_queues")

    def queue_max(self, index: int) -> int:
        """The device's maximum for queue ``index`` (0: no such queue).  Read once, before
        any smaller size is written (queue_size reads back what was written)."""
        if index not in self._queue_max:
            if not 0 <= index < self.num_queues():
                return 0
            self.cfg.write("queue_select", index)
            self._queue_max[index] = self.cfg.read("queue_size")
        return self._queue_max[index]

    def configure_queue(self, index: int, size: int, *, desc: int, driver: int, device: int,
                        vector: int = VIRTIO_MSI_NO_VECTOR) -> int:
        """§4.1.5.1.3 steps 1-6 for queue ``index``: size, the three ring addresses and the
        MSI-X vector (verified by read-back).  Returns ``queue_notify_off``.  The queue is
        not enabled yet: :meth:`enable_queue`.  Raises :class:`QueueSizeError` for a queue the
        device does not have, a size above its maximum or one it does not keep;
        :class:`DeviceRefusedError` when the queue is enabled already;
        :class:`~virtq.errors.ArgumentError` for a bad vector and :class:`VectorRefusedError`
        when the device refuses it."""
        maximum = self.queue_max(index)
        if maximum == 0:
            raise QueueSizeError(f"{self.name} has no queue {index} "
                                 f"(num_queues {self.num_queues()})",
                                 index=index, size=size, maximum=0)
        if size > maximum:
            raise QueueSizeError(f"{self.name} queue {index} allows at most {maximum} entries; "
                                 f"{size} were asked for", index=index, size=size,
                                 maximum=maximum)
        cfg = self.cfg
        cfg.write("queue_select", index)
        if cfg.read("queue_enable"):
            raise DeviceRefusedError(f"{self.name} queue {index} is already enabled; "
                                     "reset the device first")
        cfg.write("queue_size", size)
        got = cfg.read("queue_size")
        if got != size:
            raise QueueSizeError(f"{self.name} queue {index} reads back size {got} after "
                                 f"{size} was written", index=index, size=size,
                                 maximum=maximum)
        cfg.write("queue_desc", desc)
        cfg.write("queue_driver", driver)
        cfg.write("queue_device", device)
        self._set_vector("queue_msix_vector", vector, f"queue {index}")
        return cfg.read("queue_notify_off")

    def enable_queue(self, index: int) -> None:
        """``queue_enable = 1`` -- after everything else of the queue is set (§4.1.4.3.2)."""
        self.cfg.write("queue_select", index)
        self.cfg.write("queue_enable", 1)

    def set_config_vector(self, vector: int) -> None:
        """Route configuration-change interrupts to MSI-X ``vector`` (``VIRTIO_MSI_NO_VECTOR``:
        none), verified by read-back.  Raises :class:`~virtq.errors.ArgumentError` for a vector
        outside 0..0x7ff/0xffff and :class:`VectorRefusedError` when the device refuses it."""
        self._set_vector("config_msix_vector", vector, "configuration changes")

    def _set_vector(self, register: str, vector: int, what: str) -> None:
        if vector != VIRTIO_MSI_NO_VECTOR and not 0 <= vector <= _MAX_VECTOR:
            raise ArgumentError("vector", vector, "MSI-X vectors are 0..0x7ff or 0xffff")
        self.cfg.write(register, vector)
        got = self.cfg.read(register)
        # §4.1.5.1.2.1: the device answers NO_VECTOR when it could not map the vector.
        if got != vector:
            raise VectorRefusedError(
                f"{self.name} refused MSI-X vector {vector:#x} for {what} "
                f"(reads back {got:#x}); use fewer vectors or poll=True")

    # -- running -------------------------------------------------------------------------

    def driver_ok(self) -> None:
        """Set DRIVER_OK (§3.1.1 step 8) and check the device did not flag an error.  Raises
        :class:`DeviceRefusedError` when it did (FAILED or DEVICE_NEEDS_RESET set, or DRIVER_OK
        not kept)."""
        status = self.add_status(VIRTIO_CONFIG_S_DRIVER_OK)
        if status & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) or not (
            status & VIRTIO_CONFIG_S_DRIVER_OK
        ):
            raise DeviceRefusedError(f"{self.name} reads status {status_names(status)} after "
                                     "DRIVER_OK")

    # -- device configuration ------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of device configuration, each piece read at its natural width,
        repeated until ``config_generation`` is the same before and after (§4.1.4.3.1,
        §2.5.1): a multi-register field must not be torn by a concurrent change.  Raises
        :class:`DeviceRefusedError` when the function has no device configuration or it never
        stops changing, :class:`~virtq.errors.ArgumentError` for a range outside it."""
        if self.device_cfg is None:
            raise DeviceRefusedError(f"{self.name} has no device configuration structure")
        if offset < 0 or size < 0 or offset + size > self.device_cfg_len:
            raise ArgumentError("offset", offset, f"[{offset}, {offset + size}) is outside the "
                                f"{self.device_cfg_len}-byte device configuration")
        space = self.device_cfg
        for _ in range(_GENERATION_RETRIES):
            before = self.cfg.read("config_generation")
            out = bytearray()
            pos, end = offset, offset + size
            while pos < end:
                width = 4 if pos % 4 == 0 and end - pos >= 4 else (
                    2 if pos % 2 == 0 and end - pos >= 2 else 1)
                out += space.read(pos, width).to_bytes(width, "little")
                pos += width
            if self.cfg.read("config_generation") == before:
                return bytes(out)
        raise DeviceRefusedError(f"{self.name} configuration kept changing while being read")

    def write_config(self, offset: int, data: bytes) -> None:
        """Write ``data`` into the device configuration at ``offset``, each piece at its natural
        width.  Raises :class:`~virtq.errors.ArgumentError` for a range outside the device
        configuration (or when there is none)."""
        if self.device_cfg is None or offset < 0 or offset + len(data) > self.device_cfg_len:
            raise ArgumentError("offset", offset, "outside the device configuration")
        pos = 0
        while pos < len(data):
            at = offset + pos
            width = 4 if at % 4 == 0 and len(data) - pos >= 4 else (
                2 if at % 2 == 0 and len(data) - pos >= 2 else 1)
            self.device_cfg.write(at, width, int.from_bytes(data[pos : pos + width], "little"))
            pos += width
