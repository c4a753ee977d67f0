"""The live-ring view (virtq.ringview, ``virtq inspect``): it shows what the driver and the
device really hold, reports what is impossible without raising, never writes the memory it
looks at, and shows a queue stuck behind a stopped back-end."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from virtq.devices import BlkDevice
from virtq.errors import ArgumentError, VirtqOSError
from virtq.layout import SplitLayout
from virtq.memory import MemfdRegion
from virtq.queue import SplitQueue
from virtq.ringview import (
    ADDED,
    COMPLETED,
    IN_FLIGHT,
    MappedFile,
    SnapshotFile,
    analyze,
    render_svg,
    render_text,
    save_snapshot,
    shared_files,
    snapshot_data,
)
from virtq.testing import DeviceQueue, HostileDevice

SIZE = 8


def virtq_cli(*args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "virtq", *args], capture_output=True,
                          text=True, timeout=60, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    if check is not None:
        assert done.returncode == check, done.stdout + done.stderr
    return done


class Ring:
    """A split queue and its device side over one memfd (iova = host address, as
    vhost-user's identity allocator makes it)."""

    def __init__(self, size: int = SIZE, *, indirect: bool = True, start: int = 0) -> None:
        self.layout = SplitLayout.compute(size, buffer_size=256, indirect_size=4)
        self.region = MemfdRegion(self.layout.nbytes)
        self.iova = self.region.host_addr
        self.q: SplitQueue[int] = SplitQueue(self.region, self.layout, iova=self.iova,
                                             event_idx=True, indirect=indirect,
                                             start_index=start)
        self.dev = DeviceQueue(self.region, self.layout, iova=self.iova, event_idx=True)

    def buf(self, slot: int, off: int, length: int) -> tuple[int, int]:
        return (self.iova + self.layout.buffer(slot % self.layout.queue_size) + off, length)

    def close(self) -> None:
        self.dev.close()
        self.q.close()
        self.region.close()


# -- what the view finds is what is there -------------------------------------------------------

ops = st.lists(st.sampled_from(["add", "add3", "publish", "pop", "complete", "reap"]),
               max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops=ops, start=st.sampled_from([0, 0xFFFA]), indirect=st.booleans())
@example(ops=["add", "publish", "pop", "complete", "reap"], start=0, indirect=False)
def test_a_snapshot_shows_exactly_the_driver_and_device_state(ops, start, indirect):
    """Any sequence of adds, publishes, device pops and completions (in any order), and
    reaps: the snapshot's chains are exactly the ones added-not-published, in flight and
    completed-not-reaped, each with the buffers it was added with, and nothing is
    reported as wrong."""
    r = Ring(indirect=indirect, start=start)
    try:
        buffers: dict[int, list[tuple[int, int]]] = {}
        added: list[int] = []        # tokens since the last publish
        published: list[int] = []    # tokens the device may pop
        popped: dict[int, int] = {}  # head -> token, popped and not completed
        done: list[int] = []         # tokens completed, not reaped
        token = 0
        by_head: dict[int, int] = {}
        for op in ops:
            if op in ("add", "add3") and r.q.num_free >= (3 if op == "add3" else 1):
                token += 1
                bufs = [r.buf(token, 0, 16)]
                if op == "add3":
                    bufs += [r.buf(token, 32, 64), r.buf(token, 128, 1)]
                readable, writable = bufs[:1], bufs[1:]
                head = r.q.add(readable, writable, token)
                by_head[head] = token
                buffers[token] = bufs
                added.append(token)
            elif op == "publish":
                r.q.publish()
                published += added
                added = []
            elif op == "pop" and published:
                head, _ = r.dev.pop()
                popped[head] = by_head[head]
                published.remove(by_head[head])
            elif op == "complete" and popped:
                head = sorted(popped)[len(popped) // 2]  # not in pop order
                tok = popped.pop(head)
                done.append(tok)
                # one byte written when the chain has a writable buffer, else none
                r.dev.push(head, 1 if len(buffers[tok]) > 1 else 0)
            elif op == "reap":
                for tok, _ in r.q.drain_used():
                    done.remove(tok)
        state = analyze(SnapshotFile.from_data(snapshot_data(r.q)))
        assert state.problems == []
        tokens = {s: sorted(by_head[c.head] for c in state.by_status(s))
                  for s in (ADDED, IN_FLIGHT, COMPLETED)}
        assert tokens[ADDED] == sorted(added)
        assert tokens[IN_FLIGHT] == sorted(published + list(popped.values()))
        assert tokens[COMPLETED] == sorted(done)
        for chain in state.chains:
            data = [(d.addr, d.len) for d in chain.descriptors if not d.flags & 4]
            assert data == buffers[by_head[chain.head]]
        text = render_text(state)
        assert f"in flight ({len(tokens[IN_FLIGHT])})" in text
        assert "consistent: nothing impossible found" in text
        ET.fromstring(render_svg(state))  # well-formed
    finally:
        r.close()


def test_a_live_ring_shows_what_the_device_has_not_used(no_leaks):
    r = Ring()
    try:
        heads = [r.q.add([r.buf(i, 0, 16)], [r.buf(i, 32, 8)], i) for i in range(4)]
        r.q.publish()
        head, _ = r.dev.pop()
        r.dev.push(head, 8)
        with MappedFile(f"/proc/{os.getpid()}/fd/{r.region.fd}", SIZE) as live:
            assert live.iova == r.iova  # found in /proc/PID/maps
            state = analyze(live)
        assert state.in_flight == 3 and state.problems == []
        assert [c.head for c in state.by_status(IN_FLIGHT)] == heads[1:]
        assert state.by_status(COMPLETED) == []  # the driver's reap position is private
        # the indirect tables were followed through the owner's mapping
        assert [(d.addr, d.len) for d in state.chains[0].descriptors[1:]] == \
            [r.buf(1, 0, 16), r.buf(1, 32, 8)]
        assert "completed, not reaped: unknown for a live ring" in render_text(state)
    finally:
        r.close()


def test_the_attach_is_read_only(no_leaks):
    """PROT_READ: the view cannot write the ring, and looking at it changes nothing."""
    r = Ring()
    try:
        r.q.add([r.buf(0, 0, 16)], [], 0)
        r.q.publish()
        whole = r.region.view()
        before = hashlib.sha256(whole).digest()
        with MappedFile(f"/proc/{os.getpid()}/fd/{r.region.fd}", SIZE) as live:
            with pytest.raises(TypeError):
                live._map[0] = 1
            with pytest.raises(TypeError):
                memoryview(live._map)[0] = 1
            analyze(live)
        assert hashlib.sha256(whole).digest() == before
        whole.release()
    finally:
        r.close()


# -- what is impossible is reported, never raised -------------------------------------------------

def test_a_hostile_device_is_reported_and_nothing_raises():
    r = Ring()
    hostile = HostileDevice(r.region, r.layout, seed=7)
    try:
        for i in range(3):
            r.q.add([r.buf(i, 0, 16)], [r.buf(i, 32, 8)], i)
        r.q.publish()
        for _ in range(300):
            hostile.corrupt()
            for data in (snapshot_data(r.q), None):
                source = SnapshotFile.from_data(data) if data else MappedFile(
                    f"/proc/{os.getpid()}/fd/{r.region.fd}", SIZE)
                state = analyze(source)
                render_text(state)
                ET.fromstring(render_svg(state))
                if isinstance(source, MappedFile):
                    source.close()
        # one chosen corruption: a used.idx far ahead of avail.idx
        hostile.set_used_idx(0x100)
        state = analyze(SnapshotFile.from_data(snapshot_data(r.q)))
        assert any("past the driver's last reap" in p for p in state.problems)
        with MappedFile(f"/proc/{os.getpid()}/fd/{r.region.fd}", SIZE) as live:
            state = analyze(live)
        assert any("more than the 8 entries" in p for p in state.problems)
    finally:
        hostile.close()
        r.close()


def test_a_scribbled_descriptor_table_is_reported():
    r = Ring(indirect=False)
    try:
        head = r.q.add([r.buf(0, 0, 16)], [r.buf(0, 32, 8), r.buf(0, 64, 8)], 0)
        r.q.publish()
        data = snapshot_data(r.q)
        view = r.region.view(r.layout.desc, 16 * SIZE)
        desc = bytearray(view)
        view.release()
        second = desc[head * 16 + 14]
        third = desc[second * 16 + 14]
        desc[third * 16 + 12] |= 1  # the last descriptor gets NEXT ...
        desc[third * 16 + 14] = second  # ... back to the second one: a loop
        data["memory"][0]["data"] = base64.b64encode(bytes(desc)).decode()
        state = analyze(SnapshotFile.from_data(data))
        assert any("loop" in p for p in state.problems)
        assert not state.consistent
    finally:
        r.close()


def test_bad_snapshots_and_sources_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.json"
    for text in ("{", "[]", '{"format": "other"}', '{"format": "virtq-ring-snapshot", '
                 '"version": 99}', '{"format": "virtq-ring-snapshot", "version": 1}'):
        bad.write_text(text)
        with pytest.raises(ArgumentError):
            SnapshotFile(bad)
    with pytest.raises(VirtqOSError):
        SnapshotFile(tmp_path / "missing.json")
    with pytest.raises(VirtqOSError):
        MappedFile(tmp_path / "missing", 8)
    small = tmp_path / "small"
    small.write_bytes(b"\0" * 64)
    with pytest.raises(ArgumentError, match="past the end"):
        MappedFile(small, 8)
    with pytest.raises(ArgumentError):
        MappedFile(small, 3)


# -- the command line -----------------------------------------------------------------------------

def test_inspect_a_snapshot_file_and_its_exit_status(tmp_path):
    r = Ring()
    try:
        r.q.add([r.buf(0, 0, 16)], [r.buf(0, 32, 8)], 0)
        r.q.publish()
        good = tmp_path / "ring.json"
        save_snapshot(r.q, good)
        out = virtq_cli("inspect", str(good), "--svg", str(tmp_path / "ring.svg")).stdout
        assert "in flight (1)" in out and "consistent" in out
        ET.parse(tmp_path / "ring.svg")
        assert json.loads(good.read_text())["snapshot"]["in_flight_heads"] == [0]
        head, _ = r.dev.pop()
        r.dev.push(head, 1)
        data = snapshot_data(r.q)
        data["snapshot"]["in_flight_heads"] = []  # as if the driver had forgotten its chain
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(data))
        done = virtq_cli("inspect", str(bad), check=1)
        assert "INCONSISTENT" in done.stdout and "not a chain in flight" in done.stdout
    finally:
        r.close()


def test_inspect_lists_a_process_memfds_and_refuses_what_it_cannot_read(tmp_path):
    r = Ring()
    try:
        out = virtq_cli("inspect", f"/proc/{os.getpid()}").stdout
        assert f"fd {r.region.fd} " in out and "memfd:" in out
        assert any(f.fd == r.region.fd for f in shared_files(os.getpid()))
        live = f"/proc/{os.getpid()}/fd/{r.region.fd}"
        done = virtq_cli("inspect", live, check=2)
        assert "needs --queue-size" in done.stderr
        done = virtq_cli("inspect", str(tmp_path / "nothing"), check=2)
        assert "neither a queue size nor a file" in done.stderr
        done = virtq_cli("inspect", "/proc/999999999", check=2)
        assert "error:" in done.stderr
        out = virtq_cli("inspect", live, "--queue-size", str(SIZE)).stdout
        assert "published and not used" in out
    finally:
        r.close()


def test_inspect_shows_a_queue_stuck_behind_a_stopped_backend(virtq_qsd, tmp_path, no_leaks):
    """The "traffic stopped" case: qemu-storage-daemon under SIGSTOP, five reads
    submitted and kicked.  ``virtq inspect`` (another process, attached read-only to this
    process's memfd) shows the five chains in flight with their descriptors -- header,
    data, status -- and changes no byte; after SIGCONT they complete and the ring is
    empty again."""
    with BlkDevice.connect_vhost_user(virtq_qsd.socket_path) as disk:
        assert disk.read(0, 512)  # running
        pid = virtq_qsd.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            reqs = [disk.submit_read(8 * i, 4096) for i in range(5)]
            disk.kick()
            live = f"/proc/{os.getpid()}/fd/{disk.arena.region.fd}"
            whole = disk.arena.region.view()
            before = hashlib.sha256(whole).digest()
            svg = tmp_path / "stuck.svg"
            out = virtq_cli("inspect", live, "--queue-size", str(disk.queues[0].size),
                            "--svg", str(svg)).stdout
            assert hashlib.sha256(whole).digest() == before
            whole.release()
            assert "5 chain(s) published and not used" in out
            assert "in flight (5)" in out
            # each chain: one INDIRECT ring descriptor, then header (16, R), data (4096, W),
            # status (1, W) in its table
            assert out.count("R INDIRECT") == 5
            assert out.count("len 16      R") == 5
            assert out.count("len 4096    W") == 5
            assert out.count("len 1       W") == 5
            assert "consistent: nothing impossible found" in out
            tree = ET.parse(svg)
            assert "in flight (5)" in "".join(tree.getroot().itertext())
        finally:
            os.kill(pid, signal.SIGCONT)
        disk.wait(reqs, timeout=10)
        assert all(r.error is None for r in reqs)
        out = virtq_cli("inspect", live, "--queue-size", str(disk.queues[0].size)).stdout
        assert "0 chain(s) published and not used" in out
