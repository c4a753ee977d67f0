"""``virtq check`` against the embedded back-end with each fault switch: the matching checks
fail, and only those.  Without a fault every check passes or is skipped."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtq.check import CheckOptions, CommandBackend, SocketBackend, run_checks
from virtq.testing import BackendProcess, Faults, VhostUserBlkBackend
from virtq.testing.runners import make_image

IMAGE_BYTES = 1 << 20

#: fault -> the checks it must fail (all others pass or skip).
EXPECTED = {
    "": set(),
    "write_past_buffer": {"ring.guard-bytes", "blk.get-id"},
    "write_readable": {"ring.readable-untouched"},
    "write_desc_table": {"ring.desc-untouched"},
    "bad_used_len": {"ring.used-len-capacity", "blk.get-id"},
    "unwritten_len": {"ring.used-len-written", "blk.read", "blk.seg-max"},
    "duplicate_used": {"ring.used-ids"},
    "corrupt_used": None,  # breaks every request: checked below as "most checks fail"
    "used_flags_garbage": {"ring.used-flags"},
    "no_notify": {"notify.flags-zero", "notify.used-event"},
    "spurious_notify": {"notify.no-interrupt", "notify.used-event-suppress"},
    "vring_base_off_by_one": {"ring.get-vring-base"},
    "wrap_bug": {"ring.index-wrap"},
    "indirect_head_only": {"ring.indirect-after-direct"},
    "header_split_refused": {"ring.message-framing"},
    "process_disabled": {"blk.disabled-ring"},
    "accept_unoffered": {"feat.features-ok"},
    "no_version_1": {"feat.version-1"},
    "wrong_capacity": {"blk.capacity"},
    "stale_data": {"blk.write-read"},
    "lost_write": {"blk.flush-durable"},
    "long_id": {"blk.get-id"},
    "no_ioerr": {"blk.ioerr-past-end"},
    "unsupp_as_ok": {"blk.unsupp"},
    "never_answer=SET_VRING_ERR": {"vu.reply-ack"},
    "nack=SET_VRING_ERR": {"vu.reply-ack"},
}


@pytest.fixture
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vqc-") as d:
        yield Path(d)


def run_embedded(tmp: Path, spec: str, **kw):
    image = make_image(tmp / "disk.img", IMAGE_BYTES)
    with VhostUserBlkBackend(image, tmp / "s.sock", faults=Faults.parse(spec), **kw) as b:
        return run_checks("blk", SocketBackend(b.socket_path),
                          options=CheckOptions(image=image, timeout=0.5))


@pytest.mark.parametrize("spec", [k for k, v in EXPECTED.items() if v is not None])
def test_each_fault_fails_exactly_its_checks(tmp, spec):
    report = run_embedded(tmp, spec)
    outcomes = report.outcomes()
    assert not [i for i, o in outcomes.items() if o == "error"], report.to_json()
    failed = {i for i, o in outcomes.items() if o == "fail"}
    assert failed == EXPECTED[spec], {i: r.message for i, r in report.by_id().items()
                                      if i in failed ^ EXPECTED[spec]}
    must_failed = any(report.by_id()[i].level == "MUST" for i in failed)
    assert report.exit_status == (1 if must_failed else 0)
    for i in failed:
        assert report.by_id()[i].message  # evidence: says what went wrong


def test_a_clean_embedded_back_end_passes_every_check(tmp):
    report = run_embedded(tmp, "")
    outcomes = report.outcomes()
    assert set(outcomes.values()) <= {"pass", "skip"}
    skipped = {i for i, o in outcomes.items() if o == "skip"}
    # the embedded back-end offers neither RO, DISCARD nor WRITE_ZEROES
    assert skipped == {"blk.ro", "blk.write-zeroes", "blk.dwz-flags"}


def test_read_only_back_end_passes_the_read_only_check(tmp):
    report = run_embedded(tmp, "", read_only=True)
    assert report.outcomes()["blk.ro"] == "pass"
    assert report.outcomes()["blk.write-read"] == "skip"


def test_corrupt_used_ids_fail_the_checks_that_look_at_completions(tmp):
    report = run_embedded(tmp, "corrupt_used")
    failed = set(report.failed())
    assert {"ring.setup", "ring.used-ids", "blk.read"} <= failed
    assert "feat.version-1" not in failed
    assert "not a head in flight" in report.by_id()["ring.setup"].message


def test_completions_out_of_order_are_legal(tmp):
    report = run_embedded(tmp, "out_of_order")
    assert not report.failed()


def process_backend(tmp: Path, spec: str) -> CommandBackend:
    image = make_image(tmp / "disk.img", IMAGE_BYTES)
    cmd = BackendProcess(image, "{socket}", faults=Faults.parse(spec)).command()
    return CommandBackend(cmd)


def test_a_back_end_that_exits_after_one_front_end_fails_only_reconnect(tmp):
    # A representative subset: every session restarts the process (a second each).
    with process_backend(tmp, "exit_on_disconnect") as backend:
        report = run_checks("blk", backend, options=CheckOptions(image=tmp / "disk.img",
                                                                 timeout=0.5),
                            only=["feat.*", "vu.*", "ring.setup", "ring.used-ids",
                                  "blk.read", "blk.flush-durable"])
    assert set(report.failed()) == {"vu.reconnect"}
    assert report.by_id()["vu.reconnect"].level == "info"
    assert report.exit_status == 0  # info checks never fail a run
    assert "exited with status 0" in report.by_id()["vu.reconnect"].message
    assert any("exits when its front-end disconnects" in n for n in report.notes)


def test_a_back_end_that_dies_on_indirect_descriptors(tmp):
    with process_backend(tmp, "crash_on_indirect") as backend:
        report = run_checks("blk", backend,
                            options=CheckOptions(image=tmp / "disk.img", timeout=0.5),
                            only=["ring.indirect", "ring.setup", "ring.message-framing"])
    outcomes = report.outcomes()
    assert outcomes == {"ring.setup": "pass", "ring.message-framing": "pass",
                        "ring.indirect": "fail"}
    assert "died on SIGABRT" in report.by_id()["ring.indirect"].message


#: The embedded back-end's other device types: (device, fault) -> the checks that fail.
RNG_PROBE_CHECKS = {"feat.subset", "vu.reconnect", "ring.setup", "ring.index-wrap",
                    "ring.message-framing", "ring.indirect", "ring.indirect-after-direct"}
DEVICE_EXPECTED = {
    ("rng", ""): set(),
    ("rng", "rng_no_bytes"): {"rng.bytes"} | RNG_PROBE_CHECKS,
    ("net", ""): set(),
    ("net", "net_corrupt_frame"): {"net.loopback", "net.mrg-rxbuf"},
    ("net", "net_bad_header"): {"net.rx-header", "net.mrg-rxbuf"},
    ("net", "mrg_wrong_count"): {"net.mrg-rxbuf"},
    ("fs", ""): set(),
    ("fs", "fuse_init_major"): {"fs.init"},
    ("fs", "fuse_root_not_dir"): {"fs.getattr-root"},
    ("fs", "fuse_lookup_any"): {"fs.lookup"},
    ("fs", "fs_zero_queues"): {"fs.config"},
}


@pytest.mark.parametrize(("device", "spec"), list(DEVICE_EXPECTED))
def test_other_device_types_fail_exactly_their_checks(tmp, device, spec):
    image = make_image(tmp / "disk.img", IMAGE_BYTES)
    with VhostUserBlkBackend(image, tmp / "s.sock", device=device,
                             faults=Faults.parse(spec)) as b:
        report = run_checks(device, SocketBackend(b.socket_path),
                            options=CheckOptions(timeout=0.5, fs_lookup="hello.txt"))
        assert not b.errors
    outcomes = report.outcomes()
    assert "error" not in outcomes.values(), report.to_json()
    failed = {i for i, o in outcomes.items() if o == "fail"}
    assert failed == DEVICE_EXPECTED[device, spec], report.to_json()
    skipped = {i for i, o in outcomes.items() if o == "skip"}
    # What cannot apply: no readable part in an rng request, no writable one in a net probe.
    expected_skips = {"rng": {"ring.readable-untouched"}, "net": {"ring.used-len-written"},
                      "fs": set()}[device]
    if spec == "rng_no_bytes":  # nothing written: no used.len bytes to look at
        expected_skips = expected_skips | {"ring.used-len-written"}
    assert skipped == expected_skips
    assert {r.id.split(".")[0] for r in report.results} >= {device}
