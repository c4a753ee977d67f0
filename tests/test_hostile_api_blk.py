"""BlkDevice against hostile arguments, over the embedded vhost-user-blk back-end: bad
reconnect arguments leave the working connection alone, wait() takes an iterable, a
sector is never a bool, connect() refuses a non-allocator.

Every test names the finding of the hostile-input campaign it guards."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtq.abi import VIRTIO_F_VERSION_1
from virtq.abi.blk import VIRTIO_BLK_F_MQ
from virtq.aio import AsyncBlkDevice
from virtq.devices import BlkDevice
from virtq.errors import ArgumentError
from virtq.testing import VhostUserBlkBackend
from virtq.testing.loopback import LoopbackTransport
from virtq.transport import DeviceRefusedError

from .hostile_values import BAD_TIMEOUTS, quick


@pytest.fixture
def blk(virtq_embedded_blk: VhostUserBlkBackend) -> Iterator[BlkDevice]:
    with BlkDevice.connect_vhost_user(virtq_embedded_blk.socket_path, queue_size=16) as dev:
        yield dev


@quick
@given(timeout=st.one_of(BAD_TIMEOUTS, st.just(0), st.floats(min_value=1e10)))
def test_reconnect_bad_timeout_keeps_the_working_connection(blk: BlkDevice,
                                                            timeout: Any) -> None:
    """Finding: reconnect(timeout=-1 / nan / 0 / object()) closed the working connection
    first, then refused the argument: the device stayed refused ("reconnect failed
    (ArgumentError ...)") until a good reconnect."""
    before = blk.read(0, 512)
    with pytest.raises(ArgumentError):
        blk.reconnect(timeout=timeout)
    assert blk.read(0, 512) == before  # the same connection still serves


@quick
@given(path=st.one_of(st.sampled_from(["", b"", "a\0b", 1, -1, 1.5, "x" * 200]),
                      st.builds(object)))
def test_reconnect_bad_path_keeps_the_working_connection(blk: BlkDevice, path: Any) -> None:
    """Finding: reconnect("") reconnected to the old path (an empty path is not "the same
    one"), reconnect("a\\0b") closed the connection before refusing the path."""
    with pytest.raises(ArgumentError):
        blk.reconnect(path)
    assert len(blk.read(8, 1024)) == 1024


@quick
@given(requests=st.one_of(st.integers(), st.floats(), st.booleans(), st.builds(object)))
def test_blk_wait_takes_an_iterable(blk: BlkDevice, requests: Any) -> None:
    """Finding: wait(5) raised a bare TypeError ('int' object is not iterable)."""
    with pytest.raises(ArgumentError):
        blk.wait(requests)
    blk.wait([blk.submit_read(0, 512)])


@pytest.mark.parametrize("call", ["submit_read", "submit_write", "read", "write"])
def test_blk_sector_is_not_a_bool(blk: BlkDevice, call: str) -> None:
    """Finding: sector=True was taken as sector 1."""
    fn = getattr(blk, call)
    arg: Any = 512 if call in ("submit_read", "read") else bytes(512)
    with pytest.raises(ArgumentError):
        fn(True, arg)
    assert blk.in_flight == 0


@pytest.mark.parametrize("allocator", [1, "identity", 1.5, object()])
def test_connect_refuses_a_non_allocator(virtq_embedded_blk: VhostUserBlkBackend,
                                         allocator: Any) -> None:
    """Finding: iova_allocator=1 failed inside the device's set-up with AttributeError."""
    with pytest.raises(ArgumentError):
        BlkDevice.connect_vhost_user(virtq_embedded_blk.socket_path, iova_allocator=allocator)
    with BlkDevice.connect_vhost_user(virtq_embedded_blk.socket_path) as dev:
        assert dev.read(0, 512)


class _TwoQueueBlk(LoopbackTransport):
    """A virtio-blk device with two request queues (MQ) that records every arena asked."""

    def __init__(self) -> None:
        super().__init__(features=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_MQ,
                         queue_sizes=[16, 16], config=struct.pack("<Q", 1 << 12).ljust(64, b"\0"))


@pytest.mark.parametrize("num_queues", [3, 64, 0xFFFF])
def test_more_queues_than_the_device_has_allocate_nothing(num_queues: int) -> None:
    """Finding: num_queues=65535 against a 2-queue back-end laid out rings and bounce
    buffers for all of them (minutes, ~1 TiB of address space) before attach_queue()
    refused queue 2.  The queue count is checked before any memory is asked for."""
    t = _TwoQueueBlk()
    with pytest.raises(DeviceRefusedError):
        BlkDevice(t, num_queues=num_queues)
    assert t.arenas == [] and t.closed


@pytest.mark.parametrize("sector", [True, None, "1", -1, 1 << 64, 1.5])
def test_async_read_write_check_the_sector(virtq_embedded_blk: VhostUserBlkBackend,
                                           sector: Any) -> None:
    """Finding: AsyncBlkDevice.read(None, 512) raised TypeError from ``sector + off``, and
    read(True, 512) read sector 1; wait(5) raised TypeError."""

    async def main() -> None:
        async with await AsyncBlkDevice.connect_vhost_user(
                virtq_embedded_blk.socket_path) as disk:
            with pytest.raises(ArgumentError):
                await disk.read(sector, 512)
            with pytest.raises(ArgumentError):
                await disk.write(sector, bytes(512))
            with pytest.raises(ArgumentError):
                await disk.wait(5)  # type: ignore[arg-type]
            assert disk.device.in_flight == 0
            assert len(await disk.read(0, 512)) == 512

    anyio.run(main)


@quick
@given(timeout=BAD_TIMEOUTS)
def test_poll_and_wait_timeouts(blk: BlkDevice, timeout: Any) -> None:
    """Finding: poll(timeout=True) / wait(timeout=True) waited one second (a bool is an
    int); every device's timeouts go through deadline_after, which refuses it now."""
    req = blk.submit_read(0, 512)
    with pytest.raises(ArgumentError):
        blk.poll(timeout)
    with pytest.raises(ArgumentError):
        blk.wait([req], timeout=timeout)
    assert len(req.wait() or b"") == 512
