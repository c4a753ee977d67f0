"""virtio-fs (VIRTIO 1.2 §5.11) and the FUSE wire protocol it carries (``linux/fuse.h``),
in one place for the driver, the fake daemons of the tests and the tests themselves.

The device is a FUSE daemon; the driver is the FUSE client (the kernel's role).  A request
is one chain: the device-readable ``struct fuse_in_header`` and the opcode's arguments, then
the device-writable ``struct fuse_out_header`` and the reply (§5.11.6, ``struct
virtio_fs_req``).  Every structure is little-endian: the driver chooses the endianness by
the byte order of FUSE_INIT's opcode (§5.11.6) and virtq always speaks little-endian.

Sizes and field orders are those of FUSE 7.31 (the version virtq asks for; QEMU's C
virtiofsd refuses anything older).  Structures that grew after 7.31 (``fuse_init_in`` in
7.36) are used in their 7.31 form.
"""

from __future__ import annotations

import enum
import struct

# -- the virtio device (§5.11) -------------------------------------------------------------

#: Device type (§5, "Device Types"; §5.11.1).
VIRTIO_ID_FS = 26
#: Queue 0 carries FUSE_INTERRUPT, FUSE_FORGET and FUSE_BATCH_FORGET only (§5.11.2,
#: §5.11.6.2); queues 1..n are request queues.
HIPRIO_QUEUE = 0
FIRST_REQUEST_QUEUE = 1
#: ``struct virtio_fs_config`` (§5.11.4): ``char tag[36]`` (UTF-8, NUL-padded, not
#: NUL-terminated when it fills the field), then ``le32 num_request_queues`` (>= 1).
FS_TAG_SIZE = 36
FS_CFG_TAG = 0
FS_CFG_NUM_REQUEST_QUEUES = 36
FS_CONFIG_SIZE = 40

# -- FUSE protocol version ---------------------------------------------------------------

FUSE_KERNEL_VERSION = 7
#: The minor version virtq asks for.  The daemon answers with its own; both then use the
#: smaller (fuse.h, "Version negotiation").
FUSE_KERNEL_MINOR_VERSION = 31
#: The oldest minor version virtq accepts: the 64-byte ``fuse_init_out`` (7.23) and
#: FUSE_BATCH_FORGET (7.16), FUSE_READDIRPLUS (7.21) are used without fallbacks.
FUSE_MIN_MINOR_VERSION = 23
#: The node id of the root directory; it is never looked up, so never forgotten.
FUSE_ROOT_ID = 1
#: The kernel accepts ``fuse_out_header.error`` in -511..0 only (fs/fuse/dev.c:
#: ``oh.error <= -ERESTARTSYS || oh.error > 0`` is -EINVAL).
FUSE_MAX_ERRNO = 511
#: The kernel refuses a directory entry name longer than this (fs/fuse/readdir.c).
FUSE_NAME_MAX = 1024
#: Linux's NAME_MAX and PATH_MAX: the longest name and symlink target a request carries.
NAME_MAX = 255
PATH_MAX = 4096
#: Room the daemon needs beyond a request's data (libfuse's FUSE_BUFFER_HEADER_SIZE).
FUSE_BUFFER_HEADER_SIZE = 0x1000
#: Without FUSE_MAX_PAGES a request moves at most this many pages
#: (FUSE_DEFAULT_MAX_PAGES_PER_REQ).
FUSE_DEFAULT_MAX_PAGES = 32
FUSE_PAGE_SIZE = 4096


class FuseOpcode(enum.IntEnum):
    """``enum fuse_opcode``: the request types virtq sends (and a few it names)."""

    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42  # no reply
    READDIRPLUS = 44
    RENAME2 = 45


#: Requests that only go on the hiprio queue (§5.11.6.2) and get no reply.
HIPRIO_OPCODES = frozenset({FuseOpcode.FORGET, FuseOpcode.BATCH_FORGET, FuseOpcode.INTERRUPT})

# -- FUSE_INIT flags (fuse_init_in.flags / fuse_init_out.flags) --------------------------

FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_MAX_PAGES = 1 << 22

#: Names of the INIT flags, for showing what was negotiated.
INIT_FLAG_NAMES = {
    FUSE_ASYNC_READ: "ASYNC_READ", FUSE_POSIX_LOCKS: "POSIX_LOCKS",
    FUSE_ATOMIC_O_TRUNC: "ATOMIC_O_TRUNC", FUSE_EXPORT_SUPPORT: "EXPORT_SUPPORT",
    FUSE_BIG_WRITES: "BIG_WRITES", FUSE_DONT_MASK: "DONT_MASK",
    FUSE_AUTO_INVAL_DATA: "AUTO_INVAL_DATA", FUSE_DO_READDIRPLUS: "DO_READDIRPLUS",
    FUSE_READDIRPLUS_AUTO: "READDIRPLUS_AUTO", FUSE_ASYNC_DIO: "ASYNC_DIO",
    FUSE_WRITEBACK_CACHE: "WRITEBACK_CACHE", FUSE_PARALLEL_DIROPS: "PARALLEL_DIROPS",
    FUSE_HANDLE_KILLPRIV: "HANDLE_KILLPRIV", FUSE_MAX_PAGES: "MAX_PAGES",
}

# -- fuse_setattr_in.valid ---------------------------------------------------------------

FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8

# -- other flags ---------------------------------------------------------------------------

#: fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
#: fuse_release_in.release_flags
FUSE_RELEASE_FLUSH = 1 << 0
#: fuse_fsync_in.fsync_flags
FUSE_FSYNC_FDATASYNC = 1 << 0
#: fuse_getattr_in.getattr_flags: ``fh`` is valid
FUSE_GETATTR_FH = 1 << 0

# -- wire structures (all little-endian, padded to 8 bytes like fuse.h) ----------------------

#: struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, padding
FUSE_IN_HEADER = struct.Struct("<IIQQIIII")
#: struct fuse_out_header: len, error (s32, 0 or -errno), unique
FUSE_OUT_HEADER = struct.Struct("<IiQ")
#: struct fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec,
#: ctimensec, mode, nlink, uid, gid, rdev, blksize, flags
FUSE_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
#: struct fuse_entry_out: nodeid, generation, entry_valid, attr_valid, entry_valid_nsec,
#: attr_valid_nsec, then struct fuse_attr
FUSE_ENTRY_OUT = struct.Struct("<QQQQII" + FUSE_ATTR.format[1:])
#: struct fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then struct fuse_attr
FUSE_ATTR_OUT = struct.Struct("<QII" + FUSE_ATTR.format[1:])
#: struct fuse_init_in (7.31 form): major, minor, max_readahead, flags
FUSE_INIT_IN = struct.Struct("<IIII")
#: struct fuse_init_out: major, minor, max_readahead, flags, max_background,
#: congestion_threshold, max_write, time_gran, max_pages, map_alignment, unused[8]
FUSE_INIT_OUT = struct.Struct("<IIIIHHIIHH32x")
#: struct fuse_getattr_in: getattr_flags, dummy, fh
FUSE_GETATTR_IN = struct.Struct("<IIQ")
#: struct fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime, ctime,
#: atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5
FUSE_SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
#: struct fuse_open_in: flags, unused (open_flags in later versions)
FUSE_OPEN_IN = struct.Struct("<II")
#: struct fuse_open_out: fh, open_flags, padding
FUSE_OPEN_OUT = struct.Struct("<QII")
#: struct fuse_create_in: flags, mode, umask, padding
FUSE_CREATE_IN = struct.Struct("<IIII")
#: struct fuse_mkdir_in: mode, umask
FUSE_MKDIR_IN = struct.Struct("<II")
#: struct fuse_rename_in: newdir
FUSE_RENAME_IN = struct.Struct("<Q")
#: struct fuse_link_in: oldnodeid
FUSE_LINK_IN = struct.Struct("<Q")
#: struct fuse_release_in: fh, flags, release_flags, lock_owner
FUSE_RELEASE_IN = struct.Struct("<QIIQ")
#: struct fuse_flush_in: fh, unused, padding, lock_owner
FUSE_FLUSH_IN = struct.Struct("<QIIQ")
#: struct fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding
FUSE_READ_IN = struct.Struct("<QQIIQII")
#: struct fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding
FUSE_WRITE_IN = struct.Struct("<QQIIQII")
#: struct fuse_write_out: size, padding
FUSE_WRITE_OUT = struct.Struct("<II")
#: struct fuse_statfs_out (struct fuse_kstatfs): blocks, bfree, bavail, files, ffree,
#: bsize, namelen, frsize, padding, spare[6]
FUSE_STATFS_OUT = struct.Struct("<QQQQQIIII24x")
#: struct fuse_fsync_in: fh, fsync_flags, padding
FUSE_FSYNC_IN = struct.Struct("<QII")
#: struct fuse_forget_in: nlookup
FUSE_FORGET_IN = struct.Struct("<Q")
#: struct fuse_batch_forget_in: count, dummy; then count x struct fuse_forget_one
FUSE_BATCH_FORGET_IN = struct.Struct("<II")
#: struct fuse_forget_one: nodeid, nlookup
FUSE_FORGET_ONE = struct.Struct("<QQ")
#: struct fuse_dirent: ino, off, namelen, type, then the name (not NUL-terminated),
#: padded to 8 bytes
FUSE_DIRENT = struct.Struct("<QQII")

#: Reply payload sizes (after the out header) of the fixed-size replies.
ENTRY_OUT_SIZE = FUSE_ENTRY_OUT.size  # 128
ATTR_OUT_SIZE = FUSE_ATTR_OUT.size  # 104
INIT_OUT_SIZE = FUSE_INIT_OUT.size  # 64
OPEN_OUT_SIZE = FUSE_OPEN_OUT.size  # 16
CREATE_OUT_SIZE = ENTRY_OUT_SIZE + OPEN_OUT_SIZE  # 144
WRITE_OUT_SIZE = FUSE_WRITE_OUT.size  # 8
STATFS_OUT_SIZE = FUSE_STATFS_OUT.size  # 80


def fuse_dirent_align(n: int) -> int:
    """FUSE_DIRENT_ALIGN: directory entries are padded to 8 bytes."""
    return (n + 7) & ~7


