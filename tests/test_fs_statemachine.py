"""A Hypothesis state machine of file operations through virtq against the real virtiofsd,
checked step by step against a model (a dict of paths) and, at the end of each run,
against the host directory itself.

Each run shares a fresh directory through a fresh daemon (``-o cache=none``); the names
include a space and UTF-8.  Error cases are part of the model: an operation the model says
must fail must fail with that errno.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from virtq.testing.runners import Virtiofsd

DIR = object()  # the model's mark for a directory
NAMES = ["a", "b", "sp ace", "ü"]
PATHS = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
# Mostly small, sometimes more than one 64 KiB READ/WRITE (the machine's io_size).
DATA = st.binary(max_size=300) | st.sampled_from([0, 70_000, 140_001]).map(bytes)


class FsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="virtq-fsm-"))
        (self.tmp / "share").mkdir()
        self.daemon = Virtiofsd(self.tmp / "share", self.tmp / "fs.sock", cache="none")
        self.fs = self.daemon.connect(io_size=64 << 10, io_buffers=4)
        self.model: dict[str, object] = {}

    def teardown(self) -> None:
        try:
            self.fs.close()
            assert self.daemon.wait_exit() == 0
            assert self.host_tree() == self.model
        finally:
            self.daemon.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def host_tree(self) -> dict[str, object]:
        root = self.tmp / "share"
        tree: dict[str, object] = {}
        for dirpath, dirs, files in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for d in dirs:
                tree[os.path.normpath(os.path.join(rel, d))] = DIR
            for f in files:
                tree[os.path.normpath(os.path.join(rel, f))] = (Path(dirpath) / f).read_bytes()
        return tree

    # -- the model's verdicts ----------------------------------------------------------------

    def parent_error(self, path: str) -> int | None:
        """ENOENT / ENOTDIR if a directory on the way is missing or a file."""
        parts = path.split("/")
        for k in range(1, len(parts)):
            kind = self.model.get("/".join(parts[:k]))
            if kind is None:
                return errno.ENOENT
            if kind is not DIR:
                return errno.ENOTDIR
        return None

    def expect(self, err: int | None, call):  # type: ignore[no-untyped-def]
        try:
            result = call()
        except OSError as exc:
            assert err is not None, f"unexpected {exc!r}"
            assert exc.errno == err, f"{exc!r}, expected errno {errno.errorcode[err]}"
            return None
        assert err is None, f"expected errno {errno.errorcode[err]}, got {result!r}"
        return result

    def children(self, path: str) -> list[str]:
        prefix = path + "/"
        return [p for p in self.model if p.startswith(prefix)]

    # -- rules -------------------------------------------------------------------------------

    @rule(path=PATHS, data=DATA)
    def write(self, path: str, data: bytes) -> None:
        err = self.parent_error(path) or (errno.EISDIR if self.model.get(path) is DIR
                                          else None)
        self.expect(err, lambda: self.fs.write_bytes(path, data))
        if err is None:
            self.model[path] = data

    @rule(path=PATHS, data=st.binary(min_size=1, max_size=100))
    def append(self, path: str, data: bytes) -> None:
        err = self.parent_error(path) or (errno.EISDIR if self.model.get(path) is DIR
                                          else None)

        def call() -> None:
            with self.fs.open(path, "ab") as f:
                f.write(data)

        self.expect(err, call)
        if err is None:
            old = self.model.get(path, b"")
            assert isinstance(old, bytes)
            self.model[path] = old + data

    @rule(path=PATHS)
    def read(self, path: str) -> None:
        kind = self.model.get(path)
        err = self.parent_error(path) or (errno.ENOENT if kind is None else
                                          errno.EISDIR if kind is DIR else None)
        got = self.expect(err, lambda: self.fs.read_bytes(path))
        if err is None:
            assert got == kind

    @rule(path=PATHS)
    def mkdir(self, path: str) -> None:
        err = self.parent_error(path) or (errno.EEXIST if path in self.model else None)
        self.expect(err, lambda: self.fs.mkdir(path))
        if err is None:
            self.model[path] = DIR

    @rule(path=PATHS)
    def rmdir(self, path: str) -> None:
        kind = self.model.get(path)
        err = self.parent_error(path) or (
            errno.ENOENT if kind is None else errno.ENOTDIR if kind is not DIR
            else errno.ENOTEMPTY if self.children(path) else None)
        self.expect(err, lambda: self.fs.rmdir(path))
        if err is None:
            del self.model[path]

    @rule(path=PATHS)
    def remove(self, path: str) -> None:
        kind = self.model.get(path)
        err = self.parent_error(path) or (errno.ENOENT if kind is None else
                                          errno.EISDIR if kind is DIR else None)
        self.expect(err, lambda: self.fs.remove(path))
        if err is None:
            del self.model[path]

    @rule(path=PATHS, size=st.integers(0, 500))
    def truncate(self, path: str, size: int) -> None:
        kind = self.model.get(path)
        err = self.parent_error(path) or (errno.ENOENT if kind is None else
                                          errno.EISDIR if kind is DIR else None)
        self.expect(err, lambda: self.fs.truncate(path, size))
        if err is None:
            assert isinstance(kind, bytes)
            self.model[path] = kind[:size].ljust(size, b"\0")

    @rule(src=PATHS, dst=PATHS)
    def rename(self, src: str, dst: str) -> None:
        s, d = self.model.get(src), self.model.get(dst)
        err = self.parent_error(src) or (errno.ENOENT if s is None else None) \
            or self.parent_error(dst)
        if err is None and src != dst:
            if dst.startswith(src + "/"):
                err = errno.EINVAL
            elif s is not DIR and d is DIR:
                err = errno.EISDIR
            elif s is DIR and d is not None and d is not DIR:
                err = errno.ENOTDIR
            elif s is DIR and d is DIR and self.children(dst):
                err = errno.ENOTEMPTY
        self.expect(err, lambda: self.fs.rename(src, dst))
        if err is None and src != dst:
            moved = {p: v for p, v in self.model.items() if p == src or p.startswith(src + "/")}
            for p in moved:
                del self.model[p]
            self.model.pop(dst, None)
            for p, v in moved.items():
                self.model[dst + p[len(src):]] = v

    @invariant()
    def listings_match(self) -> None:
        dirs = [""] + [p for p, v in self.model.items() if v is DIR]
        for d in dirs:
            want = sorted({p[len(d) + 1 if d else 0 :].split("/")[0]
                           for p in self.model if (p.startswith(d + "/") if d else True)})
            assert sorted(self.fs.listdir(d or ".")) == want, d

    @invariant()
    def sizes_match(self) -> None:
        for p, v in self.model.items():
            st_ = self.fs.stat(p)
            if v is not DIR:
                assert isinstance(v, bytes)
                assert st_.st_size == len(v), p


FsMachine.TestCase.settings = settings(
    max_examples=10, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_file_operations_match_a_model = FsMachine.TestCase
