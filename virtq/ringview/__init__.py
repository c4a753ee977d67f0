"""A read-only view of a live split ring: what ``virtq inspect`` shows.

Attach to a queue another process owns -- its memfd through ``/proc/PID/fd/N``, mapped
read-only (:class:`MappedFile`) -- or read a snapshot the owner saved
(:func:`save_snapshot`, :class:`SnapshotFile`); :func:`analyze` decodes the ring without
trusting it, and :func:`render_text` / :func:`render_svg` draw it: the indices, the chains in
flight with their descriptors, what the device completed and the driver has not reaped, and
anything inconsistent.  Useful when "traffic stopped"::

    with MappedFile("/proc/4242/fd/7", queue_size=128) as ring:
        print(render_text(analyze(ring)))

This layer sits above the memory layer and below devices: it reads descriptors (as the
device-side test peers do) and never writes the memory it looks at.
"""

from virtq.ringview.model import (
    ADDED,
    COMPLETED,
    IN_FLIGHT,
    Chain,
    Descriptor,
    RingState,
    analyze,
    flag_text,
)
from virtq.ringview.render import render_svg, render_text, used_waiting
from virtq.ringview.sources import (
    SNAPSHOT_FORMAT,
    MappedFile,
    RingSource,
    SharedFile,
    SnapshotFile,
    is_snapshot,
    load_snapshot,
    save_snapshot,
    shared_files,
    snapshot_data,
)

__all__ = [
    "ADDED",
    "COMPLETED",
    "IN_FLIGHT",
    "SNAPSHOT_FORMAT",
    "Chain",
    "Descriptor",
    "MappedFile",
    "RingSource",
    "RingState",
    "SharedFile",
    "SnapshotFile",
    "analyze",
    "flag_text",
    "is_snapshot",
    "load_snapshot",
    "render_svg",
    "render_text",
    "save_snapshot",
    "shared_files",
    "snapshot_data",
    "used_waiting",
]
