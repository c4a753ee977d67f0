"""What a FUSE daemon says, parsed and checked: the one place a virtio-fs reply's payload is
read (:class:`~virtq.devices.fs.FsDevice` checks the out header, then calls these).

The daemon is untrusted, like every device: each function validates what the Linux kernel's
FUSE client validates (fs/fuse/dir.c, fs/fuse/readdir.c, fs/fuse/inode.c) and raises
:class:`~virtq.errors.DeviceProtocolError` for anything else -- never ``struct.error`` or
``IndexError``.  The results are small frozen dataclasses.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from virtq.abi.fs import (
    ENTRY_OUT_SIZE,
    FUSE_ATTR,
    FUSE_DIRENT,
    FUSE_ENTRY_OUT,
    FUSE_INIT_OUT,
    FUSE_NAME_MAX,
    FUSE_ROOT_ID,
    FUSE_STATFS_OUT,
    INIT_FLAG_NAMES,
    fuse_dirent_align,
)
from virtq.errors import DeviceProtocolError

_S64_MAX = (1 << 63) - 1


def _need(buf: bytes | memoryview, offset: int, size: int, what: str) -> None:
    """A reply that ends before the structure at ``offset`` is the daemon's error, not a
    ``struct.error``."""
    if not 0 <= offset <= len(buf) - size:
        raise DeviceProtocolError(f"{what} length", len(buf) - offset,
                                  f">= {size} bytes of the structure")
#: The file types a fuse_attr.mode may name (the kernel's fuse_valid_type()).
_VALID_TYPES = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR,
                          stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK})
_DIRENTPLUS_HEAD = ENTRY_OUT_SIZE + FUSE_DIRENT.size
#: d_type of a directory entry (``struct fuse_dirent.type`` is the mode's type >> 12).
DT_UNKNOWN = 0
DT_DIR = stat.S_IFDIR >> 12
DT_REG = stat.S_IFREG >> 12
DT_LNK = stat.S_IFLNK >> 12


@dataclass(frozen=True, slots=True)
class FsAttr:
    """``struct fuse_attr``: a node's attributes as the daemon reports them (times in
    nanoseconds since the epoch)."""

    ino: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int

    @property
    def is_dir(self) -> bool:
        """The node is a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        """The node is a regular file."""
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        """The node is a symlink."""
        return stat.S_ISLNK(self.mode)

    def to_stat_result(self) -> os.stat_result:
        """The attributes as :func:`os.stat` would return them (``st_dev`` is 0: FUSE does
        not say which host file system a node lives on)."""
        a, m, c = self.atime_ns, self.mtime_ns, self.ctime_ns
        return os.stat_result(
            (self.mode, self.ino, 0, self.nlink, self.uid, self.gid, self.size,
             a // 10**9, m // 10**9, c // 10**9),
            {"st_atime": a / 1e9, "st_mtime": m / 1e9, "st_ctime": c / 1e9,
             "st_atime_ns": a, "st_mtime_ns": m, "st_ctime_ns": c,
             "st_blksize": self.blksize, "st_blocks": self.blocks, "st_rdev": self.rdev})


@dataclass(frozen=True, slots=True)
class FsEntry:
    """``struct fuse_entry_out``: a node the daemon looked up (or created).  Every entry
    with a non-zero ``nodeid`` is one lookup the daemon counts until it is forgotten."""

    nodeid: int
    generation: int
    attr: FsAttr


@dataclass(frozen=True, slots=True)
class FsDirEntry:
    """One ``struct fuse_dirent`` (READDIR), or ``fuse_direntplus`` (READDIRPLUS: then
    ``entry`` holds the node, looked up, and its attributes; None for ``.``/``..`` and
    entries the daemon did not look up).  ``type`` is a ``DT_*`` value, ``offset`` the
    cookie a READDIR continues after this entry with."""

    name: str
    ino: int
    type: int
    offset: int
    entry: FsEntry | None = None

    @property
    def is_dir(self) -> bool:
        """The entry's own type is a directory (a symlink to one is not)."""
        return self.type == DT_DIR

    @property
    def is_symlink(self) -> bool:
        """The entry is a symlink (DT_LNK)."""
        return self.type == DT_LNK


@dataclass(frozen=True, slots=True)
class FsInit:
    """What FUSE_INIT negotiated: the protocol version both sides use (``major``, the
    smaller ``minor``), the daemon's limits and the flags both sides want."""

    major: int
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int

    @property
    def flag_names(self) -> list[str]:
        """The negotiated flags by name (unknown bits as hex)."""
        names = [name for bit, name in sorted(INIT_FLAG_NAMES.items()) if self.flags & bit]
        rest = self.flags & ~sum(INIT_FLAG_NAMES)
        return names + ([f"{rest:#x}"] if rest else [])


def _check_attr_fields(mode: int, size: int, what: str) -> None:
    # The kernel's fuse_invalid_attr(): a valid file type, a size that fits loff_t.
    if stat.S_IFMT(mode) not in _VALID_TYPES:
        raise DeviceProtocolError(f"{what}.mode", mode, "a valid file type (S_IFMT)")
    if size > _S64_MAX:
        raise DeviceProtocolError(f"{what}.size", size, "at most 2**63-1 (loff_t)")


def parse_attr(buf: bytes | memoryview, offset: int, what: str) -> FsAttr:
    """``struct fuse_attr`` at ``offset`` of ``buf`` (the caller checked the length), as
    an :class:`FsAttr` (``what`` names it in errors).  Raises
    :class:`~virtq.errors.DeviceProtocolError` for a buffer too short for it, a mode that
    is no valid file type, a size above 2**63-1, or a nanoseconds field of 10**9 or
    more."""
    _need(buf, offset, FUSE_ATTR.size, what)
    (ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink,
     uid, gid, rdev, blksize, _flags) = FUSE_ATTR.unpack_from(buf, offset)
    _check_attr_fields(mode, size, what)
    for name, nsec in (("atimensec", atimensec), ("mtimensec", mtimensec),
                       ("ctimensec", ctimensec)):
        if nsec >= 10**9:
            raise DeviceProtocolError(f"{what}.{name}", nsec, "below 10**9")
    return FsAttr(ino, size, blocks, atime * 10**9 + atimensec, mtime * 10**9 + mtimensec,
                  ctime * 10**9 + ctimensec, mode, nlink, uid, gid, rdev, blksize)


def entry_nodeid(buf: bytes | memoryview, offset: int = 0) -> int:
    """The ``nodeid`` of a ``fuse_entry_out`` whose rest may be invalid: a reply that
    failed validation still made the daemon count a lookup, which must be forgotten.
    Raises :class:`~virtq.errors.DeviceProtocolError` for a buffer too short for it."""
    _need(buf, offset, FUSE_ENTRY_OUT.size, "entry")
    nodeid: int = FUSE_ENTRY_OUT.unpack_from(buf, offset)[0]
    return nodeid


def parse_entry(buf: bytes | memoryview, offset: int, what: str, *,
                created: int | None = None) -> FsEntry | None:
    """``struct fuse_entry_out`` at ``offset``.  For LOOKUP (``created`` None) a
    ``nodeid`` of 0 is a negative entry: None (the name does not exist; nothing to
    forget).  For MKDIR/SYMLINK/LINK/CREATE ``created`` is the file type that was asked
    for: the node must be new (not 0, not the root) and of that type, as the kernel's
    create_new_entry() insists.  Returns the :class:`FsEntry` (the caller checked the
    length).  Raises :class:`~virtq.errors.DeviceProtocolError` for a buffer too short
    for it, a created node that is 0, the root or of another type, and for invalid
    attributes (:func:`parse_attr`)."""
    _need(buf, offset, FUSE_ENTRY_OUT.size, what)
    nodeid, generation = FUSE_ENTRY_OUT.unpack_from(buf, offset)[:2]
    if created is None and nodeid == 0:
        return None
    if created is not None and nodeid in (0, FUSE_ROOT_ID):
        raise DeviceProtocolError(f"{what}.nodeid", nodeid,
                                  "a new node (neither 0 nor the root's 1)")
    attr = parse_attr(buf, offset + FUSE_ENTRY_OUT.size - FUSE_ATTR.size, f"{what}.attr")
    if created is not None and stat.S_IFMT(attr.mode) != created:
        raise DeviceProtocolError(f"{what}.attr.mode", attr.mode,
                                  f"file type {created:#o} (what was created)")
    return FsEntry(nodeid, generation, attr)


def parse_init(buf: bytes | memoryview) -> tuple[int, int, int, int, int, int, int, int, int]:
    """``struct fuse_init_out``'s fields.  Raises
    :class:`~virtq.errors.DeviceProtocolError` for a buffer too short for it."""
    _need(buf, 0, FUSE_INIT_OUT.size, "init_out")
    (major, minor, max_readahead, flags, max_background, congestion, max_write, time_gran,
     max_pages, _map_alignment) = FUSE_INIT_OUT.unpack_from(buf, 0)
    return (major, minor, max_readahead, flags, max_background, congestion, max_write,
            time_gran, max_pages)


def parse_statfs(buf: bytes | memoryview) -> os.statvfs_result:
    """``struct fuse_statfs_out`` as :func:`os.statvfs` returns it.  Raises
    :class:`~virtq.errors.DeviceProtocolError` for a buffer too short for it."""
    _need(buf, 0, FUSE_STATFS_OUT.size, "statfs_out")
    blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, _pad = \
        FUSE_STATFS_OUT.unpack_from(buf, 0)
    return os.statvfs_result((bsize, frsize, blocks, bfree, bavail, files, ffree, ffree, 0,
                              namelen))


def _dirent_name(buf: bytes | memoryview, offset: int, namelen: int, what: str) -> str:
    raw = bytes(buf[offset : offset + namelen])
    # The kernel refuses a name with '/' (-EIO); a NUL cannot be in a name either.
    if b"/" in raw or b"\0" in raw:
        raise DeviceProtocolError(f"{what}.name", int.from_bytes(raw[:8], "little"),
                                  "a name without '/' or NUL")
    return os.fsdecode(raw)


def parse_dirents(buf: bytes | memoryview, *, plus: bool,
                  looked_up: list[int] | None = None) -> list[FsDirEntry]:
    """A READDIR (``plus`` False) or READDIRPLUS reply: whole, 8-byte aligned records,
    each name 1..FUSE_NAME_MAX bytes without '/'.  For READDIRPLUS an entry's node must be
    valid unless its ``nodeid`` is 0 (the daemon did not look it up) or the name is ``.``
    or ``..`` (which the kernel never counts as a lookup, so neither does virtq).

    Every nodeid the reply made the daemon count is appended to ``looked_up`` as it is
    read -- also those of the records before (and of) a record that fails, so that the
    caller can forget them however the parse ends.

    Returns the entries in reply order.  Raises :class:`~virtq.errors.DeviceProtocolError`
    for a truncated record, a ``namelen`` outside 1..FUSE_NAME_MAX, a ``type`` above 15, a
    name with '/' or NUL, a READDIRPLUS entry naming the root, and an invalid entry
    (:func:`parse_entry`)."""
    out: list[FsDirEntry] = []
    if looked_up is None:
        looked_up = []
    pos = 0
    n = len(buf)
    head = _DIRENTPLUS_HEAD if plus else FUSE_DIRENT.size
    while pos < n:
        what = f"{'direntplus' if plus else 'dirent'}[{len(out)}]"
        if n - pos < head:
            raise DeviceProtocolError(f"{what} length", n - pos,
                                      f">= {head} bytes (a whole record)")
        dpos = pos + ENTRY_OUT_SIZE if plus else pos
        ino, off, namelen, dtype = FUSE_DIRENT.unpack_from(buf, dpos)
        if not 0 < namelen <= FUSE_NAME_MAX:
            raise DeviceProtocolError(f"{what}.namelen", namelen,
                                      f"in 1..{FUSE_NAME_MAX}")
        reclen = fuse_dirent_align(head + namelen)
        if reclen > n - pos:
            raise DeviceProtocolError(f"{what} length", n - pos,
                                      f">= {reclen} bytes (the record with its name)")
        if dtype > 15:
            raise DeviceProtocolError(f"{what}.type", dtype, "a DT_* value (0..15)")
        name = _dirent_name(buf, dpos + FUSE_DIRENT.size, namelen, what)
        entry = None
        if plus and name not in (".", ".."):
            nodeid = entry_nodeid(buf, pos)
            if nodeid:
                looked_up.append(nodeid)
                if nodeid == FUSE_ROOT_ID:
                    raise DeviceProtocolError(f"{what}.nodeid", nodeid,
                                              "not the root's (it is never looked up)")
                entry = parse_entry(buf, pos, f"{what}.entry_out")
        out.append(FsDirEntry(name, ino, dtype, off, entry))
        pos += reclen
    return out


__all__ = ["DT_DIR", "DT_LNK", "DT_REG", "DT_UNKNOWN", "FsAttr", "FsDirEntry", "FsEntry",
           "FsInit", "entry_nodeid", "parse_attr", "parse_dirents", "parse_entry",
           "parse_init", "parse_statfs"]
