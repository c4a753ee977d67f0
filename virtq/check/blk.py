"""virtio-blk checks (VIRTIO 1.2 §5.2).  Checks that write restore what they overwrote;
``--no-writes`` (``CheckOptions.allow_writes=False``) skips them."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from virtq.abi import VIRTIO_F_INDIRECT_DESC
from virtq.abi.blk import (
    BLK_CFG_CAPACITY,
    BLK_CFG_SEG_MAX,
    BLK_CFG_SIZE_MAX,
    BLK_REQ_HEADER,
    SECTOR_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from virtq.check.context import CheckContext, Done, Session
from virtq.check.model import CheckFailed, CheckSkipped, Level, check
from virtq.transport.vhost_user import protocol as P

MUST, SHOULD = Level.MUST, Level.SHOULD
BLK = ("blk",)
#: struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags (§5.2.6)
DWZ = struct.Struct("<QII")
DWZ_F_UNMAP = 1
_UNKNOWN_TYPE = 0x42
_STATUS = {VIRTIO_BLK_S_OK: "OK", VIRTIO_BLK_S_IOERR: "IOERR", VIRTIO_BLK_S_UNSUPP: "UNSUPP"}


def status_name(status: int) -> str:
    """A status byte by name (``OK``, ``IOERR``, ``UNSUPP``), else its number."""
    return _STATUS.get(status, str(status))


@dataclass
class BlkDone:
    status: int
    data: bytes  # the device-writable data part (without the status byte)
    done: Done


def blk_io(s: Session, kind: int, sector: int, *, out: bytes = b"", read_len: int = 0,
           segments: int = 1, indirect: bool = False) -> BlkDone:
    """One request: header, ``out`` (device-readable data), ``read_len`` device-writable
    bytes cut into ``segments`` buffers, and the status byte."""
    readable = [BLK_REQ_HEADER.pack(kind, 0, sector)]
    if out:
        step = max(1, -(-len(out) // segments))
        readable += [out[i : i + step] for i in range(0, len(out), step)]
    writable = []
    if read_len:
        step = max(1, -(-read_len // segments))
        writable = [min(step, read_len - i) for i in range(0, read_len, step)]
    req = s.request(0, readable, [*writable, 1], indirect=indirect)
    (done,) = s.run([req])
    written = done.written()
    return BlkDone(written[-1], written[:-1], done)


def _require_status(r: BlkDone, expected: int, what: str) -> None:
    if r.status != expected:
        raise CheckFailed(f"{what}: status {status_name(r.status)}, expected "
                          f"{status_name(expected)}", used_len=r.done.used_len)


def read(s: Session, sector: int, nbytes: int, **kw: object) -> bytes:
    """Read ``nbytes`` at ``sector`` in one request (``segments``/``indirect`` as :func:`blk_io`
    takes them) and return the data.  Raises :class:`~virtq.check.model.CheckFailed` unless the
    status is OK."""
    r = blk_io(s, VIRTIO_BLK_T_IN, sector, read_len=nbytes, **kw)  # type: ignore[arg-type]
    _require_status(r, VIRTIO_BLK_S_OK, f"read of {nbytes} bytes at sector {sector}")
    return r.data


def write(s: Session, sector: int, data: bytes) -> None:
    """Write ``data`` at ``sector`` in one request.  Raises
    :class:`~virtq.check.model.CheckFailed` unless the status is OK."""
    r = blk_io(s, VIRTIO_BLK_T_OUT, sector, out=data)
    _require_status(r, VIRTIO_BLK_S_OK, f"write of {len(data)} bytes at sector {sector}")


def flush(s: Session) -> None:
    """A FLUSH request when the device offers VIRTIO_BLK_F_FLUSH (else nothing).  Raises
    :class:`~virtq.check.model.CheckFailed` unless its status is OK."""
    if s.has_feature(VIRTIO_BLK_F_FLUSH):
        _require_status(blk_io(s, VIRTIO_BLK_T_FLUSH, 0), VIRTIO_BLK_S_OK, "flush")


def capacity(s: Session) -> int:
    """The device's capacity in sectors, from its config space.  Raises
    :class:`~virtq.check.model.CheckSkipped` when the back-end offers no config space."""
    if s.config is None:
        raise CheckSkipped("no configuration space (the CONFIG protocol feature is not "
                           "offered): the capacity is unknown")
    (cap,) = struct.unpack_from("<Q", s.config, BLK_CFG_CAPACITY)
    return int(cap)


def _writes(ctx: CheckContext) -> None:
    if not ctx.options.allow_writes:
        raise CheckSkipped("writes are not allowed (--no-writes)")


def _image_bytes(ctx: CheckContext, sector: int, nbytes: int) -> bytes:
    assert ctx.options.image is not None
    with open(ctx.options.image, "rb") as f:
        f.seek(sector * SECTOR_SIZE)
        return f.read(nbytes)


def _scratch(s: Session, which: int) -> int:
    """A sector range (8 sectors) for write checks, away from the start of the disk."""
    cap = capacity(s) if s.config is not None else 2048
    if cap < 64:
        raise CheckSkipped(f"the device has only {cap} sectors")
    return (cap // 2 + 16 * which) // 8 * 8


def _writable_scratch(ctx: CheckContext, which: int) -> tuple[Session, int]:
    """For a check that writes and reads back: a session and its scratch sector ``which``.
    Skips when writes are not allowed or the device is read-only."""
    _writes(ctx)
    s = ctx.session()
    if s.has_feature(VIRTIO_BLK_F_RO):
        raise CheckSkipped("the device is read-only (VIRTIO_BLK_F_RO)")
    return s, _scratch(s, which)


@contextmanager
def _restoring(s: Session, sector: int) -> Iterator[bytes]:
    """The 4 KiB at ``sector`` as they were (yielded), written back and flushed when the
    block ends however it ends: a write check leaves the disk as it found it."""
    original = read(s, sector, 4096)
    try:
        yield original
    finally:
        write(s, sector, original)
        flush(s)


def _differs(a: bytes, b: bytes) -> int:
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))


@check("blk.capacity", title="capacity matches the image",
       clause="VIRTIO 1.2 §5.2.4: The capacity of the device (expressed in 512-byte sectors) "
              "is always present.", level=MUST, devices=BLK)
def blk_capacity(ctx: CheckContext) -> str | None:
    s = ctx.session()
    cap = capacity(s)
    if ctx.options.image is None:
        raise CheckSkipped(f"capacity {cap}; no --image to compare with")
    size = os.path.getsize(ctx.options.image)
    if cap != size // SECTOR_SIZE:
        raise CheckFailed(f"capacity {cap} sectors, the image has {size // SECTOR_SIZE}",
                          capacity=cap, image_bytes=size)
    return f"{cap} sectors"


@check("blk.read", title="reads return the image's bytes",
       clause="VIRTIO 1.2 §5.2.6: VIRTIO_BLK_T_IN requests populate data with the contents "
              "of sectors read from the block device.", level=MUST, devices=BLK)
def blk_read(ctx: CheckContext) -> str | None:
    if ctx.options.image is None:
        raise CheckSkipped("no --image to compare with")
    s = ctx.session()
    sectors = os.path.getsize(ctx.options.image) // SECTOR_SIZE
    for sector in sorted({0, 1, sectors // 3, sectors - 8}):
        got = read(s, sector, 4096, segments=2)
        want = _image_bytes(ctx, sector, 4096)
        if got != want:
            at = _differs(got, want)
            raise CheckFailed(f"4 KiB at sector {sector}: byte {at} differs from the image",
                              sector=sector, offset=at, got=got[at : at + 16],
                              image=want[at : at + 16])
    return None


@check("blk.write-read", title="a read sees the data written before it",
       clause="VIRTIO 1.2 §5.2.6: VIRTIO_BLK_T_OUT requests write the contents of data to "
              "the block device; a later VIRTIO_BLK_T_IN returns them.", level=MUST,
       devices=BLK)
def blk_write_read(ctx: CheckContext) -> str | None:
    s, sector = _writable_scratch(ctx, 0)
    with _restoring(s, sector) as original:
        data = os.urandom(4096)
        write(s, sector, data)
        got = read(s, sector, 4096)
        if got != data:
            at = _differs(got, data)
            raise CheckFailed(f"read after write at sector {sector}: byte {at} is not what "
                              "was written", sector=sector, offset=at,
                              got=got[at : at + 16], written=data[at : at + 16],
                              original=original[at : at + 16])
    return None


@check("blk.flush-durable", title="written and flushed data reaches the image and survives "
       "a reconnect",
       clause="VIRTIO 1.2 §5.2.6.2: If the device is backed by persistent storage, the device "
              "MUST ensure that stable writes are committed to it, before reporting "
              "completion of the write or the flush.", level=MUST, devices=BLK)
def blk_flush_durable(ctx: CheckContext) -> str | None:
    s, sector = _writable_scratch(ctx, 1)
    original = read(s, sector, 4096)
    data = os.urandom(4096)
    write(s, sector, data)
    flush(s)
    try:
        if ctx.options.image is not None:
            on_disk = _image_bytes(ctx, sector, 4096)
            if on_disk != data:
                raise CheckFailed(f"after write + flush, the image at sector {sector} does "
                                  "not hold the data", sector=sector,
                                  image=on_disk[:16], written=data[:16])
        s.close()
        s = ctx.session()
        got = read(s, sector, 4096)
        if got != data:
            raise CheckFailed(f"after write + flush and a reconnect, sector {sector} reads "
                              "back different data", got=got[:16], written=data[:16],
                              original=original[:16])
    finally:
        if not s.drv.closed:
            write(s, sector, original)
            flush(s)
    return "data in the image and after a reconnect" if ctx.options.image else \
        "data after a reconnect (no --image to look at)"


@check("blk.get-id", title="GET_ID: at most 20 bytes of NUL-padded ASCII, as used.len says",
       clause="VIRTIO 1.2 §5.2.6: The device ID string is a NUL-padded ASCII string up to "
              "20 bytes long (with §2.7.8.2: the device MUST write at least len bytes).",
       level=MUST, devices=BLK)
def blk_get_id(ctx: CheckContext) -> str | None:
    s = ctx.session()
    r = blk_io(s, VIRTIO_BLK_T_GET_ID, 0, read_len=VIRTIO_BLK_ID_BYTES)
    if r.status == VIRTIO_BLK_S_UNSUPP:
        raise CheckSkipped("GET_ID is not supported (UNSUPP)")
    _require_status(r, VIRTIO_BLK_S_OK, "GET_ID")
    hits = [h for h in s.drv.mem.guard_hits() if h.what == "guard bytes"]
    if hits:
        raise CheckFailed(f"GET_ID wrote outside its 20-byte buffer: {hits[0].describe()}")
    claimed = r.done.used_len - 1  # used.len counts the id bytes and the status byte
    if not 0 <= claimed <= VIRTIO_BLK_ID_BYTES:
        raise CheckFailed(f"used.len {r.done.used_len}: the id can be at most 20 bytes")
    ident = r.data[:claimed]
    text, _, padding = ident.partition(b"\0")
    if any(not 0x20 <= c < 0x7F for c in text) or padding.strip(b"\0"):
        raise CheckFailed(f"the {claimed} id bytes used.len counts are {ident!r}, not a "
                          "NUL-padded ASCII string (bytes after the NUL were not written "
                          "as NULs)", used_len=r.done.used_len, id=ident)
    return f"{text.decode('ascii')!r} (used.len {r.done.used_len})"


@check("blk.ioerr-past-end", title="I/O past the capacity fails with IOERR",
       clause="VIRTIO 1.2 §5.2.6: the status byte is VIRTIO_BLK_S_IOERR for device or driver "
              "error (§5.2.6.1: A driver MUST NOT submit a request which would cause a read "
              "or write beyond capacity)", level=SHOULD, devices=BLK)
def blk_ioerr_past_end(ctx: CheckContext) -> str | None:
    s = ctx.session()
    cap = capacity(s)
    for sector, n in ((cap, 512), (cap - 1, 1024), (cap + 1000, 512)):
        r = blk_io(s, VIRTIO_BLK_T_IN, sector, read_len=n)
        if r.status != VIRTIO_BLK_S_IOERR:
            raise CheckFailed(f"read of {n} bytes at sector {sector} (capacity {cap}): "
                              f"status {status_name(r.status)}, expected IOERR",
                              sector=sector, status=r.status)
    return None


@check("blk.unsupp", title="an unknown request type fails with UNSUPP",
       clause="VIRTIO 1.2 §5.2.6: the status byte is VIRTIO_BLK_S_UNSUPP for a request "
              "unsupported by device", level=SHOULD, devices=BLK)
def blk_unsupp(ctx: CheckContext) -> str | None:
    s = ctx.session()
    r = blk_io(s, _UNKNOWN_TYPE, 0, read_len=512)
    _require_status(r, VIRTIO_BLK_S_UNSUPP, f"request type {_UNKNOWN_TYPE:#x}")
    return None


@check("blk.ro", title="a read-only device refuses writes with IOERR",
       clause="VIRTIO 1.2 §5.2.6.2: A device MUST set the status byte to VIRTIO_BLK_S_IOERR "
              "for a write request if the VIRTIO_BLK_F_RO feature if offered, and MUST NOT "
              "write any data.", level=MUST, devices=BLK)
def blk_ro(ctx: CheckContext) -> str | None:
    s = ctx.session()
    if not s.has_feature(VIRTIO_BLK_F_RO):
        raise CheckSkipped("VIRTIO_BLK_F_RO is not offered")
    original = read(s, 0, 512)
    r = blk_io(s, VIRTIO_BLK_T_OUT, 0, out=bytes(512))
    after = read(s, 0, 512)
    if r.status != VIRTIO_BLK_S_IOERR or after != original:
        raise CheckFailed(f"write to a read-only device: status {status_name(r.status)}, "
                          f"data {'unchanged' if after == original else 'CHANGED'}")
    return None


@check("blk.seg-max", title="requests at seg_max segments and size_max bytes are served",
       clause="VIRTIO 1.2 §5.2.4: seg_max is the maximum number of segments that can be in "
              "a command, size_max the maximum size of any single segment (a request "
              "within them must be served)", level=SHOULD, devices=BLK)
def blk_seg_max(ctx: CheckContext) -> str | None:
    s = ctx.session()
    size_note = ""
    if s.has_feature(VIRTIO_BLK_F_SIZE_MAX) and s.config is not None:
        (size_max,) = struct.unpack_from("<I", s.config, BLK_CFG_SIZE_MAX)
        n = min(size_max, 1 << 16) // SECTOR_SIZE * SECTOR_SIZE
        if not size_max:  # offered, and then no limit given (qemu-storage-daemon does this)
            size_note = "; VIRTIO_BLK_F_SIZE_MAX offered with size_max 0"
        elif n:
            if read(s, 8, n) != read(s, 8, n, segments=8):
                raise CheckFailed(f"a read in one {n}-byte segment (size_max {size_max}) "
                                  "differs from the same read in 8 segments")
            size_note = f"; one {n}-byte segment (size_max {size_max})"
    if not s.has_feature(VIRTIO_BLK_F_SEG_MAX) or s.config is None:
        if size_note:
            return size_note[2:]
        raise CheckSkipped("neither VIRTIO_BLK_F_SEG_MAX nor VIRTIO_BLK_F_SIZE_MAX is offered")
    (seg_max,) = struct.unpack_from("<I", s.config, BLK_CFG_SEG_MAX)
    indirect = s.has_feature(VIRTIO_F_INDIRECT_DESC)
    n = min(seg_max, 64 if indirect else ctx.options.queue_size - 2)
    if n < 2:
        raise CheckSkipped(f"seg_max is {seg_max}")
    plain = read(s, 8, n * SECTOR_SIZE)
    many = read(s, 8, n * SECTOR_SIZE, segments=n, indirect=indirect)
    if many != plain:
        raise CheckFailed(f"a read in {n} segments differs from the same read in one",
                          offset=_differs(many, plain))
    return f"{n} segments (seg_max {seg_max}){size_note}"


@check("blk.write-zeroes", title="WRITE_ZEROES leaves zeroes",
       clause="VIRTIO 1.2 §5.2.6.2: After a write zeroes command is completed, reads of the "
              "specified ranges of sectors MUST return zeroes.", level=MUST, devices=BLK)
def blk_write_zeroes(ctx: CheckContext) -> str | None:
    _writes(ctx)
    s = ctx.session()
    if not s.has_feature(VIRTIO_BLK_F_WRITE_ZEROES):
        raise CheckSkipped("VIRTIO_BLK_F_WRITE_ZEROES is not offered")
    sector = _scratch(s, 2)
    with _restoring(s, sector):
        write(s, sector, b"\xa5" * 4096)
        r = blk_io(s, VIRTIO_BLK_T_WRITE_ZEROES, 0, out=DWZ.pack(sector, 8, 0))
        _require_status(r, VIRTIO_BLK_S_OK, "WRITE_ZEROES")
        got = read(s, sector, 4096)
        if got != bytes(4096):
            raise CheckFailed(f"after WRITE_ZEROES of 8 sectors at {sector}, byte "
                              f"{_differs(got, bytes(4096))} is not zero", got=got[:16])
    return None


@check("blk.dwz-flags", title="discard / write-zeroes with unknown or forbidden flags: UNSUPP",
       clause="VIRTIO 1.2 §5.2.6.2: The device MUST set the status byte to "
              "VIRTIO_BLK_S_UNSUPP for discard, secure erase and write zeroes commands if any "
              "unknown flag is set. Furthermore, the device MUST set the status byte to "
              "VIRTIO_BLK_S_UNSUPP for discard commands if the unmap flag is set.",
       level=MUST, devices=BLK)
def blk_dwz_flags(ctx: CheckContext) -> str | None:
    _writes(ctx)
    s = ctx.session()
    cases = []
    if s.has_feature(VIRTIO_BLK_F_DISCARD):
        cases += [(VIRTIO_BLK_T_DISCARD, DWZ_F_UNMAP, "DISCARD with unmap"),
                  (VIRTIO_BLK_T_DISCARD, 0x100, "DISCARD with flag 0x100")]
    if s.has_feature(VIRTIO_BLK_F_WRITE_ZEROES):
        cases.append((VIRTIO_BLK_T_WRITE_ZEROES, 0x100, "WRITE_ZEROES with flag 0x100"))
    if not cases:
        raise CheckSkipped("neither DISCARD nor WRITE_ZEROES is offered")
    sector = _scratch(s, 3)
    bad = []
    with _restoring(s, sector):
        for kind, flags, what in cases:
            r = blk_io(s, kind, 0, out=DWZ.pack(sector, 8, flags))
            if r.status != VIRTIO_BLK_S_UNSUPP:
                bad.append(f"{what}: {status_name(r.status)}")
    if bad:
        raise CheckFailed("; ".join(bad) + " (expected UNSUPP)", results=bad)
    return None


@check("blk.disabled-ring", title="a disabled ring causes no side effects",
       clause="vhost-user.rst, Ring states: started and disabled: the back-end must process "
              "the ring without causing any side effects (a write must not reach the disk)",
       level=MUST, devices=BLK)
def blk_disabled_ring(ctx: CheckContext) -> str | None:
    _writes(ctx)
    if ctx.options.image is None:
        raise CheckSkipped("no --image to look at")
    s = ctx.session(enable=False)
    if not s.features >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1:
        raise CheckSkipped("rings start enabled without VHOST_USER_F_PROTOCOL_FEATURES")
    sector = 24
    original = _image_bytes(ctx, sector, 4096)
    data = os.urandom(4096)
    req = s.request(0, [BLK_REQ_HEADER.pack(VIRTIO_BLK_T_OUT, 0, sector), data], [1])
    s.submit([req])
    deadline = time.monotonic() + 0.5  # a back-end that serves it does so at once
    on_disk = _image_bytes(ctx, sector, 4096)
    while on_disk == original and time.monotonic() < deadline:
        time.sleep(0.02)
        on_disk = _image_bytes(ctx, sector, 4096)
    s.drv.enable(0, True)  # let it finish (or discard it) before restoring
    s.drv.wait_used(0, 1, ctx.options.timeout)
    s.ring(0).reap()
    write(s, sector, original)
    flush(s)
    if on_disk != original:
        raise CheckFailed(f"a write made available on a disabled ring reached sector "
                          f"{sector} of the image", image=on_disk[:16], written=data[:16])
    return None
