"""``virtq fs --socket S ls|cat|put|get|stat`` and ``virtq demo fs`` against the real
virtiofsd (one daemon per command: it exits when its client disconnects)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from virtq import cli


@pytest.fixture
def run(virtq_virtiofsd, capsysbinary):
    """Run one ``virtq fs`` command in-process with a fresh daemon: (status, stdout,
    stderr)."""
    def run_one(*argv: str) -> tuple[int, bytes, str]:
        if not virtq_virtiofsd.running:
            virtq_virtiofsd.start()
        capsysbinary.readouterr()
        status = cli.main(["fs", "--socket", str(virtq_virtiofsd.socket_path), *argv])
        out, err = capsysbinary.readouterr()
        assert virtq_virtiofsd.wait_exit() == 0
        return status, out, err.decode()
    return run_one


def test_fs_commands(run, virtq_fs_dir, tmp_path, no_leaks):
    (virtq_fs_dir / "sub").mkdir()
    (virtq_fs_dir / "sub" / "ünï code.txt").write_text("hello\n")
    (virtq_fs_dir / "blob").write_bytes(bytes(range(256)) * 4096)

    assert run("ls") == (0, b"blob\nsub\n", "")
    status, out, _ = run("ls", "-l", "sub")
    assert status == 0 and out.decode().split() == ["-rw-r--r--", "6", "ünï", "code.txt"]
    assert run("cat", "sub/ünï code.txt") == (0, b"hello\n", "")

    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(3 << 20))
    status, out, _ = run("put", str(local), "sub/uploaded.bin")
    assert status == 0 and out == b"3145728 bytes -> sub/uploaded.bin\n"
    assert (virtq_fs_dir / "sub" / "uploaded.bin").read_bytes() == local.read_bytes()
    back = tmp_path / "back.bin"
    status, out, _ = run("get", "blob", str(back))
    assert status == 0 and back.read_bytes() == (virtq_fs_dir / "blob").read_bytes()

    status, out, _ = run("stat", "blob")
    host = os.stat(virtq_fs_dir / "blob")
    assert status == 0
    text = out.decode()
    assert f"size: {host.st_size}" in text and f"inode: {host.st_ino}" in text
    assert stat.filemode(host.st_mode) in text

    # A FUSE error is one line and status 1, not a traceback.
    status, out, err = run("cat", "missing")
    assert status == 1 and out == b""
    assert err.strip() == ("virtq fs cat: [Errno 2] No such file or directory "
                           "(FUSE_LOOKUP): 'missing'")


def test_fs_command_without_a_back_end(tmp_path, capsys):
    assert cli.main(["fs", "--socket", str(tmp_path / "none.sock"), "ls"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("virtq fs ls: ") and len(err.splitlines()) == 1


def test_demo_fs():
    done = subprocess.run([sys.executable, "-m", "virtq", "demo", "fs"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "FUSE 7.31" in out
    assert "8 of 8 files byte-identical" in out
    assert "host copy identical" in out
    assert "FsOSError: [Errno 39] Directory not empty" in out
    assert "except FileNotFoundError caught FsFileNotFoundError" in out
    # Every node the daemon counted is back to 0 in its own count.
    last = out.strip().splitlines()[-1]
    nodes = last.split(" lookups of ")[1].split()[0]
    assert f"{nodes} of {nodes} nodes back to 0" in last
    assert "virtiofsd exited with 0" in last
