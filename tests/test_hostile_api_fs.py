"""FsDevice, FsFile and FakeFsDaemon against hostile arguments: FUSE ids, handles and flags
are checked before a struct packs them; text, times, perms, buffer lists and read sizes
raise ArgumentError; the fake daemon answers what a real one would (EINVAL, EFBIG).

Every test names the finding of the hostile-input campaign it guards."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtq.devices import FsDevice
from virtq.devices.errors import FsOSError
from virtq.errors import ArgumentError, VirtqError
from virtq.testing import FakeFsDaemon

from .hostile_values import HOSTILE_INTS, misuse, quick


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def fs(request: pytest.FixtureRequest) -> Iterator[tuple[FsDevice, FakeFsDaemon]]:
    daemon = FakeFsDaemon(packed=request.param)
    with daemon.connect() as dev:
        yield dev, daemon
    assert not daemon.errors


@quick
@given(value=HOSTILE_INTS.filter(lambda v: v is not None))  # fh=None: "no handle"
def test_fuse_ids_and_handles_are_checked(fs: tuple[FsDevice, FakeFsDaemon],
                                          value: Any) -> None:
    """Finding: node ids, file handles, cookies and flags went straight into struct.pack:
    ``struct.error`` ('argument out of range', 'required argument is not an integer') or
    TypeError from fuse_getattr/release/flush/fsync/read/readdir/create/statfs/rename."""
    dev, _ = fs
    fh, _flags = dev.fuse_open(2)
    calls = [
        lambda: dev.fuse_getattr(value),
        lambda: dev.fuse_getattr(2, value),
        lambda: dev.fuse_statfs(value),
        lambda: dev.fuse_readlink(value),
        lambda: dev.fuse_release(2, value),
        lambda: dev.fuse_release(2, fh, value),
        lambda: dev.fuse_flush(2, value),
        lambda: dev.fuse_fsync(2, value),
        lambda: dev.fuse_read(2, value, 0, 8),
        lambda: dev.fuse_read(2, fh, 0, 8, flags=value),
        lambda: dev.fuse_write(2, value, 0, b"x"),
        lambda: dev.fuse_readdir(1, value),
        lambda: dev.fuse_readdir(1, 0, value),
        lambda: dev.fuse_create(1, "new", value),
        lambda: dev.fuse_rename(1, "file", value, "other"),
        lambda: dev.fuse_link(value, 1, "other"),
    ]
    for call in calls:
        with pytest.raises(VirtqError) as info:
            call()
        assert misuse(info.value), info.value
    assert dev.fuse_read(2, fh, 0, 5) == b"hello"  # nothing half-submitted, nothing broken
    dev.fuse_release(2, fh)


@quick
@given(text=st.one_of(st.binary(), st.integers(), st.none(), st.lists(st.text())))
def test_write_text_takes_a_str(fs: tuple[FsDevice, FakeFsDaemon], text: Any) -> None:
    """Finding: write_text(path, b"x") raised AttributeError ('bytes' has no 'encode')."""
    dev, _ = fs
    with pytest.raises(ArgumentError):
        dev.write_text("t", text)
    assert not dev.exists("t")


@pytest.mark.parametrize("times", [(1e300, 1.0), (-1e300, 0), (1.0, 1e300)])
def test_utime_out_of_range(fs: tuple[FsDevice, FakeFsDaemon],
                            times: tuple[float, float]) -> None:
    """Finding: utime(path, (1e300, 1)) raised OverflowError."""
    dev, _ = fs
    with pytest.raises(ArgumentError):
        dev.utime("file", times)


@quick
@given(perms=HOSTILE_INTS)
def test_open_checks_perms_even_when_the_file_exists(fs: tuple[FsDevice, FakeFsDaemon],
                                                     perms: Any) -> None:
    """Finding: open("file", "wb", perms=nan) was accepted because "file" existed."""
    dev, _ = fs
    with pytest.raises(ArgumentError):
        dev.open("file", "rb", perms=perms)
    assert dev.read_bytes("file") == b"hello world"


@quick
@given(value=st.one_of(st.integers(), st.floats(), st.booleans(), st.builds(object)))
def test_fs_buffer_lists_and_request_lists(fs: tuple[FsDevice, FakeFsDaemon],
                                           value: Any) -> None:
    """Finding: FsFile.readinto_dma(5) and FsDevice.wait(5) raised bare TypeErrors."""
    dev, _ = fs
    with dev.open("file", "rb") as f:
        with pytest.raises(ArgumentError):
            f.readinto_dma(value)
        with pytest.raises(ArgumentError):
            dev.wait(value)
        assert f.read(5) == b"hello"


@quick
@given(size=st.one_of(st.floats(), st.text(max_size=2), st.booleans(), st.builds(object)))
def test_fsfile_read_size_is_an_int(fs: tuple[FsDevice, FakeFsDaemon], size: Any) -> None:
    """Finding: FsFile.read(1.5) / read("1") raised io's bare TypeError."""
    dev, _ = fs
    with dev.open("file", "rb") as f:
        with pytest.raises(ArgumentError):
            f.read(size)
        assert f.read(None) == b"hello world"


def test_fake_daemon_readlink_of_a_file_is_einval(fs: tuple[FsDevice, FakeFsDaemon]) -> None:
    """Finding: the fake daemon answered READLINK of a non-symlink with an empty target, a
    reply the driver must treat as a protocol error: one test call broke every request
    queue.  readlink(2) says EINVAL."""
    dev, _ = fs
    for node in (1, 2):  # the root directory, /file
        with pytest.raises(FsOSError) as info:
            dev.fuse_readlink(node)
        assert info.value.errno == 22  # EINVAL
    assert dev.readlink("link") == "file"


def test_fake_daemon_refuses_a_huge_file(fs: tuple[FsDevice, FakeFsDaemon]) -> None:
    """Finding: truncate("file", 2**32) made the fake daemon allocate 4 GiB (minutes, or
    MemoryError in its thread); it answers EFBIG past its limit now."""
    dev, _ = fs
    for call in (lambda: dev.truncate("file", 1 << 32),
                 lambda: dev.fuse_write(2, 0, 1 << 32, b"x")):
        with pytest.raises(FsOSError) as info:
            call()
        assert info.value.errno == 27  # EFBIG
    assert dev.read_bytes("file") == b"hello world"


@pytest.mark.parametrize("kw", [{"major": -1}, {"minor": 1 << 32}, {"queue_size": math.nan},
                                {"num_request_queues": 0}, {"tag": 5},
                                {"config_queues": -1}, {"queue_size": True}])
def test_fake_daemon_arguments(kw: dict[str, Any]) -> None:
    """Finding: FakeFsDaemon(major=-1) killed its thread at INIT and connect() hung;
    tag=5 raised TypeError, num_request_queues=-1 struct.error."""
    with pytest.raises(ArgumentError):
        FakeFsDaemon(**kw)


@pytest.mark.parametrize("size", [1 << 32, 1 << 64, (1 << 63) - 1, (16 << 20) + 1])
def test_fsfile_read_huge_size_of_a_small_file(fs: tuple[FsDevice, FakeFsDaemon],
                                               size: int) -> None:
    """Finding: FsFile.read(2**32) of an 11-byte file zero-filled a 4 GiB buffer first (and
    sent 4096 READs); read(2**64) raised OverflowError.  Large sizes go in bounded pieces
    and stop at the end of the file."""
    dev, _ = fs
    with dev.open("file", "rb") as f:
        f.seek(6)
        assert f.read(size) == b"world"
        assert f.read(size) == b""


def test_fsfile_read_in_pieces_returns_everything(fs: tuple[FsDevice, FakeFsDaemon]) -> None:
    """The pieces of a large read() join into exactly what was asked (the first piece is
    full, the last one short at the end of the file)."""
    dev, _ = fs
    data = bytes(range(251)) * ((17 << 20) // 251)
    dev.write_bytes("big", data)
    with dev.open("big", "rb") as f:
        assert f.read((16 << 20) + 7) == data[: (16 << 20) + 7]
        assert f.read(1 << 40) == data[(16 << 20) + 7 :]
