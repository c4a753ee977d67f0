"""virtio-fs checks (VIRTIO 1.2 §5.11): FUSE_INIT, GETATTR and LOOKUP of the shared root,
through the first request queue (queue 1; queue 0 is the high-priority queue)."""

from __future__ import annotations

import errno
import stat
import struct

from virtq.check import fuse
from virtq.check.context import CheckContext
from virtq.check.devices import fuse_call, next_unique
from virtq.check.model import CheckFailed, CheckSkipped, Level, check

MUST = Level.MUST
FS = ("fs",)
FUSE_CLAUSE = ("VIRTIO 1.2 §5.11.6.1: requests on the request queues are FUSE requests; "
               "the device-writable part holds struct fuse_out_header and the reply "
               "(FUSE protocol: out.unique echoes the request, out.len counts the reply)")


@check("fs.init", title="FUSE_INIT is answered with protocol 7.x", clause=FUSE_CLAUSE,
       level=MUST, devices=FS)
def fs_init(ctx: CheckContext) -> str | None:
    s = ctx.session(prepare=False)
    unique = next_unique(s)
    reply = fuse_call(s, fuse.init_request(unique), fuse.INIT_OUT_SIZE, unique)
    if reply.error:
        raise CheckFailed(f"FUSE_INIT failed with error {reply.error}")
    if len(reply.body) < fuse.INIT_OUT_HEAD.size:
        raise CheckFailed(f"FUSE_INIT reply of {len(reply.body)} bytes", body=reply.body)
    major, minor = fuse.INIT_OUT_HEAD.unpack_from(reply.body)
    if major != fuse.FUSE_KERNEL_VERSION:
        raise CheckFailed(f"FUSE_INIT answered major version {major}, expected 7")
    return f"FUSE {major}.{minor}"


@check("fs.getattr-root", title="GETATTR of the root is a directory", clause=FUSE_CLAUSE,
       level=MUST, devices=FS)
def fs_getattr_root(ctx: CheckContext) -> str | None:
    s = ctx.session()
    unique = next_unique(s)
    reply = fuse_call(s, fuse.getattr_request(unique), fuse.ATTR_OUT_SIZE, unique)
    if reply.error:
        raise CheckFailed(f"GETATTR(1) failed with error {reply.error}")
    mode = fuse.attr_mode(reply.body, fuse.ATTR_OUT_HEAD)
    if mode is None or not stat.S_ISDIR(mode):
        raise CheckFailed(f"the root's mode is {mode:o} (octal), not a directory" if mode
                          is not None else "GETATTR reply too short", body=reply.body)
    return f"mode {mode:o}"


@check("fs.lookup", title="LOOKUP in the root finds what exists, ENOENT for what does not",
       clause=FUSE_CLAUSE, level=MUST, devices=FS)
def fs_lookup(ctx: CheckContext) -> str | None:
    s = ctx.session()
    missing = "virtq-check-no-such-entry"
    unique = next_unique(s)
    reply = fuse_call(s, fuse.lookup_request(unique, missing), fuse.ENTRY_OUT_SIZE, unique)
    if reply.error != -errno.ENOENT:
        raise CheckFailed(f"LOOKUP of a missing name answered error {reply.error}, expected "
                          f"-ENOENT ({-errno.ENOENT})")
    name = ctx.options.fs_lookup
    if name is None:
        return "ENOENT for a missing name (no --fs-lookup NAME to find)"
    unique = next_unique(s)
    reply = fuse_call(s, fuse.lookup_request(unique, name), fuse.ENTRY_OUT_SIZE, unique)
    if reply.error:
        raise CheckFailed(f"LOOKUP of {name!r} failed with error {reply.error}")
    (nodeid,) = struct.unpack_from("<Q", reply.body, 0)
    if not nodeid:
        raise CheckFailed(f"LOOKUP of {name!r} returned node id 0")
    return f"{name!r} is node {nodeid}"


@check("fs.config", title="num_request_queues is at least 1",
       clause="VIRTIO 1.2 §5.11.4: The device MUST set num_request_queues to 1 or greater.",
       level=MUST, devices=FS)
def fs_config(ctx: CheckContext) -> str | None:
    s = ctx.session()
    if s.config is None:
        raise CheckSkipped("no configuration space (the CONFIG protocol feature is not "
                           "offered)")
    (queues,) = struct.unpack_from("<I", s.config, 36)
    if queues < 1:
        raise CheckFailed(f"num_request_queues is {queues}")
    tag = s.config[:36].split(b"\0", 1)[0]
    return f"tag {tag!r}, {queues} request queue(s)"
