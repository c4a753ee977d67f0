"""Where a ring is read from: another process's memory, read-only, or a snapshot file.

A :class:`RingSource` hands the analysis (:mod:`virtq.ringview.model`) the bytes of the three
parts of a split ring (VIRTIO 1.2 §2.7: descriptor table, available ring, used ring) and
reads device addresses (to follow indirect descriptor tables).  Two kinds exist:

* :class:`MappedFile` maps a shareable file -- a queue owner's memfd through
  ``/proc/PID/fd/N``, a hugetlbfs file -- with ``PROT_READ`` only.  The mapping cannot be
  written: a store through it would fault, and Python refuses to create a writable view of
  it.  Reading never changes what the driver and the device see.
* :class:`SnapshotFile` reads a file written by :func:`save_snapshot`: the driver's own
  state (``queue.snapshot()``: what it published, what it reaped) and a copy of the ring
  bytes, taken by the process that owns the queue.
"""

from __future__ import annotations

import base64
import errno
import json
import mmap
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from virtq.abi import VIRTQ_DESC_F_INDIRECT
from virtq.errors import ArgumentError, VirtqOSError
from virtq.layout import SplitLayout, avail_nbytes, used_nbytes
from virtq.layout.split import DESC_SIZE

#: What a snapshot file says it is (first key of its JSON object).
SNAPSHOT_FORMAT = "virtq-ring-snapshot"
SNAPSHOT_VERSION = 1
_DESC = struct.Struct("<QIHH")
#: The largest indirect table a snapshot copies (4096 entries, 64 KiB): a longer "table" is
#: a scribbled descriptor, and the view reports it without needing its bytes.
_MAX_TABLE = 16 * 4096


class RingSource(Protocol):
    """The bytes of one split ring, and a way to read device addresses."""

    #: What was attached, for the picture's title (a path, a pid and fd).
    description: str
    #: Ring entries (queue size).
    size: int
    #: The driver's own state when the source has it (a snapshot's ``queue.snapshot()``
    #: dict), else None: a live ring only shows what is in shared memory.
    driver: dict[str, Any] | None

    def part(self, name: str) -> bytes:
        """The bytes of ``"desc"``, ``"avail"`` or ``"used"``."""
        ...

    def read(self, iova: int, length: int) -> bytes | None:
        """``length`` bytes at device address ``iova``, or None when this source cannot
        reach them (outside the file, or the file's device address is unknown)."""
        ...


def _part_sizes(size: int) -> dict[str, int]:
    return {"desc": DESC_SIZE * size, "avail": avail_nbytes(size), "used": used_nbytes(size)}


class MappedFile:
    """A ring inside a shareable file, mapped read-only.

    ``path`` is the file (``/proc/PID/fd/N`` for another process's memfd).  ``queue_size``
    and ``offset`` (where the descriptor table starts in the file, default 0) place the
    ring as :class:`~virtq.layout.SplitLayout` does (``legacy``: the pre-1.0 layout).
    ``iova`` is the device address of the file's byte 0, used to follow indirect tables;
    None (the default) takes it from where the owning process maps the file, when ``path``
    is ``/proc/PID/fd/N`` and the owner maps it -- right for vhost-user, whose guest
    addresses are the owner's own addresses -- and otherwise leaves indirect tables
    unfollowed.

    Raises :class:`~virtq.errors.VirtqOSError` (with the errno) when the file cannot be
    opened or mapped, and :class:`~virtq.errors.ArgumentError` for a queue size the split
    layout does not allow or a ring that does not fit in the file.
    """

    def __init__(self, path: str | os.PathLike[str], queue_size: int, *, offset: int = 0,
                 iova: int | None = None, legacy: bool = False) -> None:
        try:
            self.path = os.fspath(path)
        except TypeError:
            raise ArgumentError("path", path, "must be a str, bytes or os.PathLike") from None
        if iova is not None and (not isinstance(iova, int) or isinstance(iova, bool)
                                 or not 0 <= iova < 1 << 64):
            raise ArgumentError("iova", iova, "must be None or an int in 0..2**64-1")
        layout = SplitLayout.compute(queue_size, legacy=legacy)
        if not isinstance(offset, int) or offset < 0:
            raise ArgumentError("offset", offset, "must be an int >= 0")
        self.size = queue_size
        self.driver: dict[str, Any] | None = None
        self._offsets = {"desc": layout.desc + offset, "avail": layout.avail + offset,
                         "used": layout.used + offset}
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise VirtqOSError(exc.errno or errno.EIO,
                               f"cannot open {self.path}: {exc.strerror}") from None
        try:
            nbytes = os.fstat(fd).st_size
            end = self._offsets["used"] + used_nbytes(queue_size)
            if end > nbytes:
                raise ArgumentError("queue_size", queue_size,
                                    f"a ring at offset {offset:#x} ends at {end:#x}, past the "
                                    f"end of {self.path} ({nbytes:#x} bytes)")
            owner = _owner_address(self.path, fd)  # before this process maps it too
            try:
                # PROT_READ only: this process cannot write the driver's memory, whatever
                # it does (ACCESS_READ maps PROT_READ + MAP_SHARED).
                self._map = mmap.mmap(fd, nbytes, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise VirtqOSError(exc.errno or errno.EIO,
                                   f"cannot map {self.path}: {exc.strerror}") from None
            self.nbytes = nbytes
            self.iova = iova if iova is not None else owner
        finally:
            os.close(fd)
        where = f"{self.path}, ring at offset {offset:#x}"
        if self.iova is not None:
            where += f", device address {self.iova:#x}"
        self.description = where

    def part(self, name: str) -> bytes:
        """The bytes of ``"desc"``, ``"avail"`` or ``"used"`` as they are now (a copy)."""
        start = self._offsets[name]
        return self._map[start : start + _part_sizes(self.size)[name]]

    def read(self, iova: int, length: int) -> bytes | None:
        """``length`` bytes at device address ``iova`` (None: outside the file, or the
        file's device address is unknown)."""
        if self.iova is None or length < 0:
            return None
        start = iova - self.iova
        if start < 0 or start + length > self.nbytes:
            return None
        return self._map[start : start + length]

    def close(self) -> None:
        """Unmap the file (idempotent)."""
        self._map.close()

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _owner_address(path: str, fd: int) -> int | None:
    """Where the process behind ``/proc/PID/fd/N`` maps that file (its byte 0), from
    ``/proc/PID/maps``; None when ``path`` is no such link or the file is not mapped."""
    m = re.fullmatch(r"/proc/(\d+)/fd/\d+", os.path.normpath(path))
    if m is None:
        return None
    st = os.fstat(fd)
    try:
        with open(f"/proc/{m[1]}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        span, _, offset, dev, inode = fields[:5]
        major, _, minor = dev.partition(":")
        if int(inode) != st.st_ino or os.makedev(int(major, 16), int(minor, 16)) != st.st_dev:
            continue
        return int(span.split("-")[0], 16) - int(offset, 16)
    return None


@dataclass(frozen=True)
class SharedFile:
    """One shareable file a process holds open (what ``virtq inspect /proc/PID`` lists)."""

    fd: int
    path: str
    target: str
    nbytes: int


def shared_files(pid: int) -> list[SharedFile]:
    """The memfds (and hugetlbfs files) process ``pid`` holds open: where its rings may
    live.  Raises :class:`~virtq.errors.VirtqOSError` when ``/proc/PID/fd`` cannot be read
    (no such process, or not yours)."""
    folder = f"/proc/{pid}/fd"
    try:
        names = sorted(os.listdir(folder), key=int)
    except OSError as exc:
        raise VirtqOSError(exc.errno or errno.EIO,
                           f"cannot list {folder}: {exc.strerror}") from None
    found = []
    for name in names:
        path = f"{folder}/{name}"
        try:
            target = os.readlink(path)
            nbytes = os.stat(path).st_size
        except OSError:
            continue  # closed meanwhile
        if target.startswith("/memfd:") or "hugepages" in target:
            found.append(SharedFile(int(name), path, target, nbytes))
    return found


# -- snapshot files --------------------------------------------------------------------------


class SnapshotFile:
    """A ring saved by :func:`save_snapshot`, with the driver's state.  Raises
    :class:`~virtq.errors.VirtqOSError` when the file cannot be read and
    :class:`~virtq.errors.ArgumentError` when it is not a ring snapshot."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            text = Path(self.path).read_text()
        except OSError as exc:
            raise VirtqOSError(exc.errno or errno.EIO,
                               f"cannot read {self.path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ArgumentError("path", self.path, "is not a ring snapshot (not text)") \
                from None
        self._load(load_snapshot(text, self.path), self.path)

    @classmethod
    def from_data(cls, data: dict[str, Any], name: str = "snapshot") -> SnapshotFile:
        """A snapshot from :func:`snapshot_data`'s dict (no file).  Raises
        :class:`~virtq.errors.ArgumentError` when it is not one."""
        self = cls.__new__(cls)
        self.path = name
        self._load(load_snapshot(json.dumps(data), name), name)
        return self

    def _load(self, data: dict[str, Any], name: str) -> None:
        self.driver: dict[str, Any] | None = data["snapshot"]
        self.size = int(data["snapshot"]["size"])
        self._areas = {area: int(data["areas"][area]) for area in ("desc", "avail", "used")}
        self._pieces = [(int(p["iova"]), base64.b64decode(p["data"])) for p in data["memory"]]
        for area, size in _part_sizes(self.size).items():
            if self.read(self._areas[area], size) is None:
                raise ArgumentError("path", name, f"is not a ring snapshot (no {area})")
        self.description = f"{name} (snapshot taken {data.get('taken', '?')})"

    def part(self, name: str) -> bytes:
        """The saved bytes of ``"desc"``, ``"avail"`` or ``"used"``."""
        data = self.read(self._areas[name], _part_sizes(self.size)[name])
        assert data is not None  # checked when the file was read
        return data

    def read(self, iova: int, length: int) -> bytes | None:
        """Saved bytes at device address ``iova`` (None: the snapshot has not got them)."""
        for start, data in self._pieces:
            if start <= iova and iova + length <= start + len(data):
                return data[iova - start : iova - start + length]
        return None


def is_snapshot(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file that starts like a snapshot (a JSON object)."""
    try:
        if not os.path.isfile(path):  # before open(): opening a FIFO blocks
            return False
        with open(path, "rb") as f:
            return f.read(64).lstrip().startswith(b"{")
    except (OSError, TypeError, ValueError):
        return False


def load_snapshot(text: str, name: str = "snapshot") -> dict[str, Any]:
    """Parse and check a snapshot file's text.  Raises :class:`~virtq.errors.ArgumentError`
    when it is not one (or of a newer version)."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ArgumentError("path", name, f"is not a ring snapshot ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
        raise ArgumentError("path", name, f"is not a {SNAPSHOT_FORMAT} file")
    if data.get("version") != SNAPSHOT_VERSION:
        raise ArgumentError("path", name, f"has version {data.get('version')!r}; this virtq "
                            f"reads version {SNAPSHOT_VERSION}")
    try:
        snap = data["snapshot"]
        if snap.get("format") != "split":
            raise ArgumentError("path", name, f"holds a {snap.get('format')!r} ring; the "
                                "view reads split rings")
        size = int(snap["size"])
        # The driver's counters the view reads (ringview.model): a damaged file must be
        # refused here, not fail half-way through drawing it.
        for counter in ("published", "next_avail", "last_used"):
            if not isinstance(snap[counter], int) or isinstance(snap[counter], bool):
                raise ArgumentError("path", name, f"has a damaged {counter} "
                                    f"({snap[counter]!r})")
        heads = snap.get("in_flight_heads", [])
        if not isinstance(heads, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) and 0 <= h < size
                for h in heads):
            raise ArgumentError("path", name, "has damaged in_flight_heads (ring positions "
                                "expected)")
        for area in ("desc", "avail", "used"):
            int(data["areas"][area])
        for piece in data["memory"]:
            int(piece["iova"])
            base64.b64decode(piece["data"], validate=True)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ArgumentError):
            raise
        raise ArgumentError("path", name, f"is a damaged ring snapshot ({exc!r})") from None
    if not 1 <= size <= 32768:
        raise ArgumentError("path", name, f"has a queue size of {size}")
    return data


def snapshot_data(queue: Any) -> dict[str, Any]:
    """What :func:`save_snapshot` writes, as JSON-ready data: ``queue.snapshot()``, the
    device addresses of the three ring parts, and a copy of their bytes plus every
    indirect table a descriptor of the ring points at (read from ``queue.region``).

    ``queue`` is a split-ring :class:`~virtq.queue.VirtQueue` that is not closed.  Raises
    :class:`~virtq.errors.ArgumentError` for anything else."""
    try:
        snap = queue.snapshot()
        region, base = queue.region, int(queue.iova)
        areas = {"desc": int(queue.desc_area), "avail": int(queue.driver_area),
                 "used": int(queue.device_area)}
    except AttributeError as exc:
        raise ArgumentError("queue", queue, f"must be a virtqueue ({exc})") from None
    if snap.get("format") != "split":
        raise ArgumentError("queue", queue, "must be a split ring (the view reads split rings)")
    if snap.get("closed"):
        raise ArgumentError("queue", queue, "is closed: nothing is left to save")
    size = int(snap["size"])

    def copy(iova: int, length: int) -> bytes | None:
        start = iova - base
        if start < 0 or length < 0 or start + length > region.nbytes:
            return None
        view = region.view(start, length)
        try:
            return bytes(view)
        finally:
            view.release()

    memory: list[dict[str, Any]] = []
    for name, nbytes in _part_sizes(size).items():
        data = copy(areas[name], nbytes)
        assert data is not None  # the queue's own rings are in its region
        memory.append({"iova": areas[name], "data": base64.b64encode(data).decode()})
    desc = copy(areas["desc"], DESC_SIZE * size) or b""
    seen = set()
    for i in range(size):
        addr, length, flags, _ = _DESC.unpack_from(desc, i * DESC_SIZE)
        if flags & VIRTQ_DESC_F_INDIRECT and 0 < length <= _MAX_TABLE and addr not in seen:
            seen.add(addr)
            table = copy(addr, length)
            if table is not None:
                memory.append({"iova": addr, "data": base64.b64encode(table).decode()})
    return {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION,
            "taken": time.strftime("%Y-%m-%d %H:%M:%S %z"), "snapshot": snap,
            "areas": areas, "memory": memory}


def save_snapshot(queue: Any, path: str | os.PathLike[str]) -> None:
    """Write a snapshot of ``queue`` (see :func:`snapshot_data`) to ``path``, for
    ``virtq inspect PATH``.  Only reads the queue's memory.  Raises
    :class:`~virtq.errors.ArgumentError` for a queue it cannot save and
    :class:`~virtq.errors.VirtqOSError` when the file cannot be written."""
    data = snapshot_data(queue)
    try:
        Path(path).write_text(json.dumps(data, indent=1) + "\n")
    except OSError as exc:
        raise VirtqOSError(exc.errno or errno.EIO,
                           f"cannot write {os.fspath(path)}: {exc.strerror}") from None


__all__ = [
    "SNAPSHOT_FORMAT",
    "MappedFile",
    "RingSource",
    "SharedFile",
    "SnapshotFile",
    "is_snapshot",
    "load_snapshot",
    "save_snapshot",
    "shared_files",
    "snapshot_data",
]
