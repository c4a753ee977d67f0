"""The device-side test helpers (DeviceQueue, PackedDeviceQueue, LoopbackTransport)
against hostile arguments: addresses, lengths and ids are checked, memory is never
sliced by a negative length, a closed queue says so.

Every test names the finding of the hostile-input campaign it guards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from virtq.errors import ArgumentError, QueueStateError, VirtqError
from virtq.memory import MemfdRegion
from virtq.queue import ring_layout
from virtq.testing import DeviceQueue, PackedDeviceQueue, VhostUserBlkBackend
from virtq.testing.loopback import LoopbackTransport
from virtq.testing.runners import BackendError

from .hostile_values import HOSTILE_INTS


@pytest.mark.parametrize("ring", ["split", "packed"])
@given(value=HOSTILE_INTS)
@settings(max_examples=60, deadline=None)
def test_device_side_memory_access(ring: str, value: Any) -> None:
    """Findings: DeviceQueue.read(iova, -1) returned the rest of the region without a word,
    read(1.5, 8) raised ValueError, write(iova, 5) TypeError, push(-1, 0) a bare
    ValueError from the memoryview, desc(nan) TypeError; PackedDeviceQueue the same for
    read/write."""
    layout = ring_layout(8, ring=ring)
    with MemfdRegion(layout.nbytes) as region:
        base = region.host_addr
        dq: DeviceQueue | PackedDeviceQueue = (
            DeviceQueue(region, layout, iova=base) if ring == "split"  # type: ignore[arg-type]
            else PackedDeviceQueue(region, layout, iova=base))  # type: ignore[arg-type]
        with dq:
            calls = [lambda: dq.read(value, 8), lambda: dq.read(base, value),
                     lambda: dq.view(base, value), lambda: dq.push(value, 0),
                     lambda: dq.push(0, value)]
            if not isinstance(value, bytes | list):
                calls.append(lambda: dq.write(base, value))
            if isinstance(dq, DeviceQueue):
                calls += [lambda: dq.desc(value), lambda: dq.write_desc_len(0, value)]
            for call in calls:
                with pytest.raises(ArgumentError):
                    call()
            assert dq.read(base, 4) == bytes(4)
        with pytest.raises(QueueStateError):
            dq.read(base, 4)
        with pytest.raises(VirtqError):
            dq.pop()


@pytest.mark.parametrize("kw", [{"features": 1.5}, {"features": -1}, {"queue_sizes": 8},
                                {"queue_sizes": ["8"]}, {"queue_sizes": [True]},
                                {"config": "text"}])
def test_loopback_transport_arguments(kw: dict[str, Any]) -> None:
    """Finding: LoopbackTransport(queue_sizes=["8"]) was accepted and failed later inside a
    driver's set-up with TypeError."""
    args: dict[str, Any] = {"features": 1 << 32, "queue_sizes": [8], "config": b""}
    with pytest.raises(ArgumentError):
        LoopbackTransport(**(args | kw))


@pytest.mark.parametrize("missing", ["image", "socket directory"])
def test_embedded_backend_start_failure_is_a_backend_error(tmp_path: Path,
                                                           missing: str) -> None:
    """Finding: VhostUserBlkBackend(missing image).start() raised a bare
    FileNotFoundError (and a socket path in a missing directory another OSError)."""
    image = tmp_path / "disk.img"
    sock = tmp_path / "s.sock"
    if missing == "image":
        image = tmp_path / "nope.img"
    else:
        image.write_bytes(bytes(4096))
        sock = tmp_path / "nodir" / "s.sock"
    backend = VhostUserBlkBackend(image, sock)
    with pytest.raises(BackendError) as info:
        backend.start()
    assert isinstance(info.value, VirtqError) and not backend.serving
