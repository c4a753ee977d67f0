"""``virtq check`` and ``virtq fuzz`` against the real back-ends on this machine, through
the command line.  What each back-end does is asserted as it is: where one deviates from
a rule, the report names the clause (docs/check.md lists them), and that is a result.
Fuzzing runs 20 s per back-end with a fixed seed; its findings are reported (and each has
a reproducer that loads), not asserted away."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtq.check.fuzz import load_case
from virtq.testing.runners import make_image

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
FUZZ_SECONDS = "20"


@pytest.fixture(scope="module")
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vqb-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def image(tmp: Path) -> Path:
    return make_image(tmp / "disk.img", 16 << 20)


@pytest.fixture(scope="module")
def shared_dir(tmp: Path) -> Path:
    d = tmp / "shared"
    d.mkdir()
    (d / "hello.txt").write_text("hello from the shared directory\n")
    return d


def qsd_cmd(image: Path) -> str:
    return (f"qemu-storage-daemon --blockdev driver=file,node-name=file0,filename={image} "
            "--blockdev driver=raw,node-name=disk0,file=file0 --export type=vhost-user-blk,"
            "id=exp0,node-name=disk0,addr.type=unix,addr.path={socket},writable=on")


TESTPMD = ("dpdk-testpmd --no-huge -m 128 --no-pci --no-shconf --no-telemetry -l 0,1 "
           "--log-level=lib.vhost.config:warning "
           "--vdev net_vhost0,iface={socket},queues=1,client=0 "
           "-- --forward-mode=io --total-num-mbufs=2048")


def virtiofsd_cmd(shared: Path) -> str:
    return f"{VIRTIOFSD} --socket-path={{socket}} -o source={shared} -o sandbox=chroot " \
           "-o cache=none"


def embedded_cmd(image: Path) -> str:
    return f"{sys.executable} -m virtq.testing.embedded {image} {{socket}}"


def virtq(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtq", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def check(tmp: Path, device: str, cmd: str, *extra: str) -> tuple[int, dict, str]:
    js = tmp / f"check-{device}.json"
    done = virtq("check", "--device", device, "--backend-cmd", cmd, "--json", str(js), *extra)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(js.read_text()), done.stdout


def by_outcome(report: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"pass": set(), "fail": set(), "skip": set(), "error": set()}
    for r in report["results"]:
        out[r["outcome"]].add(r["id"])
    return out


def test_qemu_storage_daemon(tmp, image):
    rc, report, text = check(tmp, "blk", qsd_cmd(image), "--image", str(image))
    got = by_outcome(report)
    assert got["error"] == set()
    # QSD 7.2 (libvhost-user) deviates from these rules (docs/check.md):
    assert got["fail"] == {"ring.indirect-after-direct", "blk.get-id", "blk.disabled-ring",
                           "notify.used-event-suppress"}
    assert got["skip"] == {"feat.features-ok", "blk.ro"}
    assert rc == 1 == report["exit_status"]
    results = {r["id"]: r for r in report["results"]}
    assert "§2.7.5.3.2" in results["ring.indirect-after-direct"]["clause"]
    assert "bytes after the NUL were not written" in results["blk.get-id"]["message"]
    assert "MUST checks failed: " in text


def test_dpdk_testpmd(tmp):
    rc, report, _ = check(tmp, "net", TESTPMD)
    got = by_outcome(report)
    assert got["error"] == set()
    assert got["fail"] == {"net.rx-header", "notify.used-event-suppress"}
    assert got["skip"] == {"ring.used-len-written"}
    assert {"net.loopback", "net.mrg-rxbuf", "ring.indirect-after-direct"} <= got["pass"]
    results = {r["id"]: r for r in report["results"]}
    assert "num_buffers" in results["net.rx-header"]["message"]
    assert rc == 1


def test_virtiofsd(tmp, shared_dir):
    rc, report, _ = check(tmp, "fs", virtiofsd_cmd(shared_dir), "--fs-lookup", "hello.txt")
    got = by_outcome(report)
    assert got["error"] == set()
    assert got["fail"] == {"ring.indirect-after-direct", "vu.reconnect"}
    assert got["skip"] == {"feat.features-ok", "fs.config"}
    assert {"fs.init", "fs.getattr-root", "fs.lookup"} <= got["pass"]
    assert any("exits when its front-end disconnects" in n for n in report["notes"])
    assert rc == 1


def test_embedded_back_end_passes(tmp, image):
    rc, report, text = check(tmp, "blk", embedded_cmd(image), "--image", str(image))
    got = by_outcome(report)
    assert got["fail"] == got["error"] == set()
    assert rc == 0, text


@pytest.mark.parametrize("which", ["qsd", "testpmd", "virtiofsd", "embedded"])
def test_fuzz_20_seconds(tmp, image, shared_dir, which):
    device, cmd = {"qsd": ("blk", qsd_cmd(image)), "testpmd": ("net", TESTPMD),
                   "virtiofsd": ("fs", virtiofsd_cmd(shared_dir)),
                   "embedded": ("blk", embedded_cmd(image))}[which]
    out = tmp / f"fuzz-{which}"
    js = tmp / f"fuzz-{which}.json"
    # virtq's own back-end is Python: give it more time to answer on a loaded machine.
    hang = "2" if which == "embedded" else "1"
    done = virtq("fuzz", "--device", device, "--seconds", FUZZ_SECONDS, "--seed", "0",
                 "--hang-timeout", hang, "--out", str(out), "--json", str(js),
                 "--backend-cmd", cmd)
    assert "Traceback" not in done.stderr, done.stderr
    report = json.loads(js.read_text())
    assert report["cases"] > 0 and sum(report["by_class"].values()) == report["cases"]
    confirmed = [f for f in report["findings"] if f["reproduced"] or f["class"] == "crash"]
    assert done.returncode == (1 if confirmed else 0)
    for finding in report["findings"]:
        rep = load_case(finding["reproducer"])
        assert rep.cls == finding["class"] in ("crash", "hang", "wrote-outside", "protocol")
    if which == "embedded":
        assert confirmed == []  # virtq's own back-end has none to report
    print(done.stdout)  # the summary, in the test log (pytest -s)


def test_the_binaries_are_there():
    for name in ("qemu-storage-daemon", "dpdk-testpmd"):
        assert shutil.which(name), name
    assert Path(VIRTIOFSD).exists()


FINDINGS = Path(__file__).resolve().parent.parent / "docs" / "check" / "findings"


@pytest.mark.parametrize(("name", "which", "signal"), [
    ("qsd-get-vring-base-bad-index", "qsd", "SIGABRT"),
    ("qsd-mem-table-nregions", "qsd", "SIGSEGV"),
    ("virtiofsd-short-fuse-header", "virtiofsd", "SIGABRT"),
    ("virtiofsd-vring-addr-bad-index", "virtiofsd", "SIGSEGV"),
])
def test_documented_crashes_still_reproduce(image, shared_dir, name, which, signal):
    """docs/check.md lists these crashes of the real back-ends; each reproducer still
    crashes the installed one (testpmd's is a race and is not asserted)."""
    device, cmd = {"qsd": ("blk", qsd_cmd(image)),
                   "virtiofsd": ("fs", virtiofsd_cmd(shared_dir))}[which]
    done = virtq("fuzz", "--device", device, "--replay", str(FINDINGS / f"{name}.json"),
                 "--backend-cmd", cmd)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f": crash: the back-end died on {signal}" in done.stdout
