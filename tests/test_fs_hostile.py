"""A FUSE daemon that lies: every malformed reply is a DeviceProtocolError (which breaks
the queue, as the failure policy says), never a struct.error, IndexError or a hang; the
lookups a rejected reply made the daemon count are forgotten all the same.

The daemon is :class:`virtq.testing.fake_fs.FakeFsDaemon` (in-process, over the loopback
transport), whose ``tamper`` hook rewrites a reply before the driver sees it.  The same
driver runs against the real virtiofsd in ``test_fs_virtiofsd.py``.
"""

from __future__ import annotations

import errno
import stat
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtq.abi.fs import (
    FOPEN_NONSEEKABLE,
    FUSE_ATTR,
    FUSE_DIRENT,
    FUSE_ENTRY_OUT,
    FUSE_OPEN_OUT,
    FUSE_OUT_HEADER,
    FUSE_ROOT_ID,
    FuseOpcode,
)
from virtq.devices import FsOSError, fswire
from virtq.errors import (
    ArgumentError,
    DeviceError,
    DeviceProtocolError,
    QueueBrokenError,
    QueueStateError,
    VirtqTimeoutError,
)
from virtq.queue import QueueState
from virtq.testing.fake_fs import FakeFsDaemon
from virtq.transport import DeviceRefusedError

OUT = FUSE_OUT_HEADER.size
OP = FuseOpcode


def on(opcode, change):
    """A tamper hook that rewrites replies to ``opcode`` only: ``change(reply)`` returns
    (bytes, used_len)."""
    def tamper(op, _args, reply):
        return change(bytearray(reply)) if op == opcode else None
    return tamper


def header(reply, *, length=None, error=None, unique=None):
    old_len, old_err, old_unique = FUSE_OUT_HEADER.unpack_from(reply)
    FUSE_OUT_HEADER.pack_into(reply, 0, old_len if length is None else length,
                              old_err if error is None else error,
                              old_unique if unique is None else unique)
    return bytes(reply), len(reply)


def attr_field(reply, index, value, base=OUT + FUSE_ENTRY_OUT.size - FUSE_ATTR.size):
    fields = list(FUSE_ATTR.unpack_from(reply, base))
    fields[index] = value
    FUSE_ATTR.pack_into(reply, base, *fields)
    return bytes(reply), len(reply)


def shortened(reply, by):
    reply = reply[:-by]
    FUSE_OUT_HEADER.pack_into(reply, 0, len(reply), 0, FUSE_OUT_HEADER.unpack_from(reply)[2])
    return bytes(reply), len(reply)


def padded(reply, by):
    reply = reply + bytes(by)
    FUSE_OUT_HEADER.pack_into(reply, 0, len(reply), 0, FUSE_OUT_HEADER.unpack_from(reply)[2])
    return bytes(reply), len(reply)


def dirent_field(reply, index, value, base=OUT):
    fields = list(FUSE_DIRENT.unpack_from(reply, base))
    fields[index] = value
    FUSE_DIRENT.pack_into(reply, base, *fields)
    return bytes(reply), len(reply)


def set_name_byte(reply, char):
    # The first record is "." (namelen 1): its name byte follows the 24-byte dirent.
    reply[OUT + FUSE_DIRENT.size] = char
    return bytes(reply), len(reply)


# (what, opcode it targets, the corruption, the call that meets it).  Two are caught by
# the queue itself (a used.len beyond the chain's writable buffers): the request then fails
# with QueueBrokenError, whose cause is the queue's DeviceProtocolError (the queue cannot
# always tell which chain a bad used element meant).
RING_LEVEL = {"a long attr reply", "a READ longer than asked"}
CASES = [
    ("used.len below the out header", OP.LOOKUP, lambda r: (bytes(r), 8),
     lambda fs: fs.stat("file")),
    ("out.len above used.len", OP.LOOKUP, lambda r: header(r, length=len(r) + 8),
     lambda fs: fs.stat("file")),
    ("out.len below used.len", OP.GETATTR, lambda r: header(r, length=OUT),
     lambda fs: fs.stat(".")),
    ("a foreign unique", OP.LOOKUP, lambda r: header(r, unique=0xDEAD),
     lambda fs: fs.stat("file")),
    ("a positive error", OP.LOOKUP, lambda r: header(r, error=5),
     lambda fs: fs.stat("file")),
    ("an errno out of range", OP.LOOKUP, lambda r: header(r, error=-600),
     lambda fs: fs.stat("file")),
    ("an error with a payload", OP.LOOKUP, lambda r: header(r, error=-errno.ENOENT),
     lambda fs: fs.stat("file")),
    ("a short entry", OP.LOOKUP, lambda r: shortened(r, 8), lambda fs: fs.stat("file")),
    ("a long attr reply", OP.GETATTR, lambda r: padded(r, 8), lambda fs: fs.stat(".")),
    ("an entry of no file type", OP.LOOKUP, lambda r: attr_field(r, 9, 0o644),
     lambda fs: fs.stat("file")),
    ("a size beyond loff_t", OP.LOOKUP, lambda r: attr_field(r, 1, 1 << 63),
     lambda fs: fs.stat("file")),
    ("nanoseconds past a second", OP.GETATTR,
     lambda r: attr_field(r, 7, 10**9, base=OUT + 16), lambda fs: fs.stat(".")),
    ("mkdir answered with node 0", OP.MKDIR,
     lambda r: (FUSE_ENTRY_OUT.pack_into(r, OUT, 0, *FUSE_ENTRY_OUT.unpack_from(r, OUT)[1:])
                or (bytes(r), len(r))), lambda fs: fs.mkdir("new")),
    ("mkdir answered with the root", OP.MKDIR,
     lambda r: (FUSE_ENTRY_OUT.pack_into(r, OUT, FUSE_ROOT_ID,
                                         *FUSE_ENTRY_OUT.unpack_from(r, OUT)[1:])
                or (bytes(r), len(r))), lambda fs: fs.mkdir("new")),
    ("mkdir answered with a file", OP.MKDIR,
     lambda r: attr_field(r, 9, stat.S_IFREG | 0o644), lambda fs: fs.mkdir("new")),
    ("a write of more than was sent", OP.WRITE,
     lambda r: (bytes(r[:OUT]) + struct.pack("<II", 1 << 20, 0), len(r)),
     lambda fs: fs.write_bytes("file", b"abc")),
    ("an empty readlink", OP.READLINK, lambda r: shortened(r, len(r) - OUT),
     lambda fs: fs.read_bytes("link")),
    ("a readlink with a NUL", OP.READLINK,
     lambda r: (bytes(r[:OUT]) + b"fi\0e", len(r)), lambda fs: fs.read_bytes("link")),
    ("a dirent name with '/'", OP.READDIR, lambda r: set_name_byte(r, ord("/")),
     lambda fs: fs.listdir()),
    ("a dirent name with NUL", OP.READDIR, lambda r: set_name_byte(r, 0),
     lambda fs: fs.listdir()),
    ("a dirent of no name", OP.READDIR, lambda r: dirent_field(r, 2, 0),
     lambda fs: fs.listdir()),
    ("a dirent name past the reply", OP.READDIR, lambda r: dirent_field(r, 2, 1000),
     lambda fs: fs.listdir()),
    ("a dirent name past FUSE_NAME_MAX", OP.READDIR, lambda r: dirent_field(r, 2, 5000),
     lambda fs: fs.listdir()),
    ("a dirent type past DT_*", OP.READDIR, lambda r: dirent_field(r, 3, 99),
     lambda fs: fs.listdir()),
    ("a trailing half record", OP.READDIR, lambda r: padded(r, 8), lambda fs: fs.listdir()),
    ("a READ longer than asked", OP.READ, lambda r: (bytes(r), 1 << 30),
     lambda fs: fs.read_bytes("file")),
]


@pytest.mark.parametrize(("what", "opcode", "change", "call"), CASES,
                         ids=[c[0] for c in CASES])
def test_malformed_reply_is_a_protocol_error(what, opcode, change, call, no_leaks):
    daemon = FakeFsDaemon()
    with daemon.connect(timeout=10) as fs:
        assert fs.read_bytes("file") == b"hello world"
        daemon.tamper = on(opcode, change)
        if what in RING_LEVEL:
            with pytest.raises(QueueBrokenError) as broken:
                call(fs)
            assert isinstance(broken.value.__cause__, DeviceProtocolError)
            assert "used.ring" in str(broken.value.__cause__)
        else:
            with pytest.raises(DeviceProtocolError):
                call(fs)
        # The queue is broken and says so; the device refuses more, pointing at the cause.
        assert fs.queues[1].state is QueueState.BROKEN
        daemon.tamper = None
        with pytest.raises(QueueStateError) as refused:
            fs.stat("file")
        assert refused.value.__cause__ is not None
    assert not daemon.errors
    # Never more forgotten than counted -- unless the tampering itself named another node
    # than the daemon counted.  (After a reply rejected by its header nothing is known of
    # what the daemon counted, so nothing is forgotten; an entry rejected for its contents
    # names the node the daemon counted, which is forgotten.)
    if "answered with node" not in what and "answered with the root" not in what:
        assert all(n >= 0 for n in daemon.lookups.values())
    if "entry of no file type" in what or "beyond loff_t" in what:
        assert not +daemon.lookups


def test_a_rejected_readdirplus_still_forgets_its_lookups(no_leaks):
    daemon = FakeFsDaemon(readdirplus=True)
    with daemon.connect(timeout=10) as fs:
        assert fs.readdirplus

        def bad_last_entry(reply):
            # The records are ".", "..", "dir", "file", "link": break "link"'s attributes.
            base = len(reply) - (FUSE_ENTRY_OUT.size + FUSE_DIRENT.size + 8)
            return attr_field(reply, 9, 0, base=base + FUSE_ENTRY_OUT.size - FUSE_ATTR.size)

        daemon.tamper = on(OP.READDIRPLUS, bad_last_entry)
        with pytest.raises(DeviceProtocolError):
            list(fs.walk())
        daemon.tamper = None
        fs.flush_forgets()
        assert not fs.lookups
    # "dir", "file" and "link" were looked up for the reply; all three were forgotten.
    assert daemon.lookups and not +daemon.lookups


def test_a_readdir_cookie_loop_is_a_protocol_error(no_leaks):
    daemon = FakeFsDaemon()
    with daemon.connect(timeout=10) as fs:
        # Every READDIR answers as if asked from the start: the listing never ends.
        daemon.tamper = None
        real = daemon._readdir
        daemon._readdir = lambda nodeid, args, plus: real(  # type: ignore[method-assign]
            nodeid, args[:8] + bytes(8) + args[16:], plus)
        with pytest.raises(DeviceProtocolError, match="cookie"):
            fs.listdir()
        with pytest.raises(QueueStateError):
            fs.listdir()
    assert not daemon.errors


@pytest.mark.parametrize(("major", "minor", "error"), [
    (8, 0, DeviceRefusedError), (7, 20, DeviceRefusedError)])
def test_init_version_refused(major, minor, error, no_leaks):
    daemon = FakeFsDaemon(major=major, minor=minor)
    with pytest.raises(error):
        daemon.connect(timeout=10)
    assert daemon.transport.closed


def test_malformed_init_and_config(no_leaks):
    daemon = FakeFsDaemon()
    daemon.tamper = on(OP.INIT, lambda r: shortened(r, 40))
    with pytest.raises(DeviceProtocolError, match="INIT"):
        daemon.connect(timeout=10)
    assert daemon.transport.closed
    with pytest.raises(DeviceProtocolError, match="tag"):
        FakeFsDaemon(tag=b"\xff\xfe").connect(timeout=10)
    with pytest.raises(DeviceProtocolError, match="tag"):
        FakeFsDaemon(tag=b"ab\0cd").connect(timeout=10)
    with pytest.raises(DeviceProtocolError, match="num_request_queues"):
        FakeFsDaemon(config_queues=0).connect(timeout=10)
    with pytest.raises(DeviceRefusedError):
        FakeFsDaemon().connect(num_request_queues=2, timeout=10)
    # A full-width tag is not NUL-terminated (§5.11.4).
    with FakeFsDaemon(tag="t" * 36).connect(timeout=10) as fs:
        assert fs.config.tag == "t" * 36


@pytest.mark.parametrize("ring", [False, True])
def test_a_bad_reply_fails_the_requests_in_flight(ring, no_leaks):
    daemon = FakeFsDaemon()
    with daemon.connect(timeout=10) as fs:
        # Three READs in flight; the first answer is malformed: in its out header (the
        # request's own error is the DeviceProtocolError), or with a used.len beyond its
        # buffers (the queue's).  The others fail with QueueBrokenError, caused by it.
        entry = fs.fuse_lookup(FUSE_ROOT_ID, "file")
        fh, _ = fs.fuse_open(entry.nodeid)
        seen = []

        def first_read(op, _args, reply):
            if op != OP.READ or seen:
                return None
            seen.append(op)
            return (bytes(reply), 1 << 20) if ring else header(bytearray(reply),
                                                               length=len(reply) + 1)

        daemon.tamper = first_read
        reqs = [fs.submit_read(entry.nodeid, fh, 0, 4) for _ in range(3)]
        fs.wait(reqs, timeout=10)
        errors = [r.error for r in reqs]
        if ring:
            assert all(isinstance(e, QueueBrokenError) for e in errors)
            cause = errors[0].__cause__
            assert isinstance(cause, DeviceProtocolError)
        else:
            cause = errors[0]
            assert isinstance(cause, DeviceProtocolError)
            assert all(isinstance(e, QueueBrokenError) for e in errors[1:])
        assert all(e.__cause__ is cause for e in errors[1:])
        with pytest.raises(QueueStateError):
            fs.fuse_read(entry.nodeid, fh, 0, 4)


def test_several_request_queues_round_robin(no_leaks):
    daemon = FakeFsDaemon(num_request_queues=3)
    with daemon.connect(num_request_queues=3, timeout=10) as fs:
        assert fs.config == type(fs.config)("fakefs", 3)
        for _ in range(6):
            assert fs.read_bytes("file") == b"hello world"
        used = {qi for qi, op in daemon.requests if op == OP.READ}
        assert used == {1, 2, 3}
    # The hiprio queue carried FORGET / BATCH_FORGET (close() waits for them), and nothing
    # else; every lookup was forgotten.
    assert {op for qi, op in daemon.requests if qi == 0} == {OP.FORGET}  # one node
    assert not +daemon.lookups and all(v >= 0 for v in daemon.lookups.values())


def test_fuse_errors_from_the_fake(no_leaks):
    daemon = FakeFsDaemon()
    with daemon.connect(timeout=10) as fs:
        with pytest.raises(FileNotFoundError):
            fs.stat("missing")
        with pytest.raises(IsADirectoryError):
            fs.read_bytes("dir")
        daemon.tamper = on(OP.GETATTR, lambda r: header(r[:OUT], length=OUT,
                                                        error=-errno.EACCES))
        with pytest.raises(PermissionError) as info:
            fs.stat(".")
        assert isinstance(info.value, FsOSError)
        daemon.tamper = on(OP.STATFS, lambda r: header(r[:OUT], length=OUT,
                                                       error=-errno.ENOSYS))
        with pytest.raises(FsOSError) as info2:
            fs.statvfs()
        assert info2.value.errno == errno.ENOSYS
        daemon.tamper = None
        # FUSE errors do not break anything.
        assert fs.read_bytes("link") == b"hello world"
        with pytest.raises(ArgumentError):
            fs.fuse_lookup(FUSE_ROOT_ID, "..")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opcode=st.sampled_from([OP.LOOKUP, OP.GETATTR, OP.OPEN, OP.READ, OP.READDIR,
                               OP.READLINK, OP.RELEASE, OP.FLUSH]),
       offset=st.integers(0, 200), garbage=st.binary(min_size=1, max_size=64),
       cut=st.integers(-8, 8))
def test_random_reply_corruption(opcode, offset, garbage, cut):
    """Any bytes in any reply: the call returns, raises a FUSE errno or a device error
    (DeviceProtocolError, or QueueBrokenError caused by one) -- nothing else, and nothing
    hangs."""
    daemon = FakeFsDaemon()

    def corrupt(reply):
        end = min(len(reply), offset + len(garbage))
        reply[offset:end] = garbage[: max(0, end - offset)]
        return bytes(reply), max(0, len(reply) + cut)

    with daemon.connect(timeout=10, io_size=64 << 10, io_buffers=2) as fs:
        daemon.tamper = on(opcode, corrupt)
        for call in (lambda: fs.read_bytes("link"), lambda: fs.listdir("dir")):
            try:
                call()
            except (DeviceError, FsOSError, QueueStateError) as err:
                if isinstance(err, QueueBrokenError):
                    assert isinstance(err.__cause__, DeviceProtocolError)
    assert not daemon.errors


@pytest.mark.parametrize(("packed", "in_order", "indirect"), [
    (False, True, True), (True, False, True), (True, True, True), (True, False, False)])
def test_ring_formats(packed, in_order, indirect, no_leaks):
    """The same FUSE session over a packed ring and with VIRTIO_F_IN_ORDER (QEMU 7.2's
    virtiofsd offers neither; the fake daemon serves them with the independent device
    peers), with and without indirect descriptors."""
    daemon = FakeFsDaemon(num_request_queues=2, packed=packed, in_order=in_order,
                          readdirplus=True)
    with daemon.connect(num_request_queues=2, indirect=indirect, queue_size=32,
                        io_size=64 << 10, io_buffers=4, timeout=10) as fs:
        assert (fs.ring, fs.in_order, fs.indirect) == (
            "packed" if packed else "split", in_order, indirect)
        data = bytes(range(256)) * 1000
        fs.write_bytes("dir/big", data)  # 4 WRITEs of 64 KiB in flight
        assert fs.read_bytes("dir/big") == data
        assert [d for d, _, _ in fs.walk()] == [".", "./dir"]
        assert fs.read_bytes("link") == b"hello world"
    assert not daemon.errors
    assert not +daemon.lookups and all(v >= 0 for v in daemon.lookups.values())
    assert {qi for qi, _ in daemon.requests} == {0, 1, 2}


def test_wire_parsers_refuse_short_buffers_with_protocol_errors() -> None:
    """The public fswire parsers never leak struct.error (whatever the caller checked)."""
    for call in (lambda: fswire.parse_attr(b"\0" * 10, 0, "attr"),
                 lambda: fswire.parse_attr(b"\0" * 200, 150, "attr"),
                 lambda: fswire.parse_entry(b"\0" * 64, 0, "entry"),
                 lambda: fswire.entry_nodeid(b"\0" * 3),
                 lambda: fswire.parse_init(b"\0" * 8),
                 lambda: fswire.parse_statfs(b"")):
        with pytest.raises(DeviceProtocolError, match="length"):
            call()


def test_utime_and_seek_refuse_bad_arguments_in_the_error_tree(no_leaks):
    daemon = FakeFsDaemon()
    with daemon.connect(timeout=10) as fs:
        for times in [(float("nan"), 0), (float("inf"), 0), (1.0,), (1, 2, 3), "12",
                      (True, 1), (1, None)]:
            with pytest.raises(ArgumentError):
                fs.utime("file", times)  # type: ignore[arg-type]
        for ns in [(1,), (1.5, 2), (1, "2"), 5]:
            with pytest.raises(ArgumentError):
                fs.utime("file", ns=ns)  # type: ignore[arg-type]
        with fs.open("file", "rb") as f:
            for offset, whence in [(-1, 0), (1 << 63, 0), (1.5, 0), (True, 0), (0, 7)]:
                with pytest.raises(ArgumentError):
                    f.seek(offset, whence)  # type: ignore[arg-type]
            assert f.read() == b"hello world"

        def nonseekable(reply):
            fh, _flags, pad = FUSE_OPEN_OUT.unpack_from(reply, OUT)
            FUSE_OPEN_OUT.pack_into(reply, OUT, fh, FOPEN_NONSEEKABLE, pad)
            return bytes(reply), len(reply)

        daemon.tamper = on(OP.OPEN, nonseekable)
        with fs.open("file", "rb") as f:
            assert not f.seekable()
            with pytest.raises(FsOSError) as info:
                f.seek(3)
            assert info.value.errno == errno.ESPIPE  # as lseek() on a pipe
            assert f.read() == b"hello world"
        daemon.tamper = None


def test_walk_raises_a_daemon_that_stops_answering(no_leaks):
    """os.walk's onerror is for errors the file system answered; a daemon that does not
    answer in time must not make directories silently disappear from the walk."""
    daemon = FakeFsDaemon()
    with daemon.connect(timeout=0.5) as fs:
        real = daemon._handle

        def slow(op, nodeid, args):
            if op in (OP.READDIR, OP.READDIRPLUS):
                time.sleep(1.5)
            return real(op, nodeid, args)

        daemon._handle = slow  # type: ignore[method-assign]
        errors: list[OSError] = []
        with pytest.raises(VirtqTimeoutError):
            list(fs.walk(".", onerror=errors.append))
        assert errors == []
        daemon._handle = real  # type: ignore[method-assign]
        time.sleep(1.5)  # let the slow answer arrive before closing
    assert not daemon.errors
