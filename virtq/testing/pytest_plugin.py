"""pytest fixtures that start real vhost-user back-ends, for your own tests.

Enable them in a ``conftest.py``::

    pytest_plugins = ["virtq.testing.pytest_plugin"]

Fixtures (each stops its process, by pid, and removes its socket afterwards):

``virtq_blk_image``
    a 16 MiB raw image whose sectors carry :func:`~virtq.testing.runners.sector_pattern`.
``virtq_qsd``
    a running :class:`~virtq.testing.runners.QemuStorageDaemon` exporting that image as
    vhost-user-blk (``.socket_path``).  Needs the ``qemu-system-common`` package.
``virtq_embedded_blk``
    the same image served by virtq's pure-Python back-end
    (:class:`~virtq.testing.embedded.VhostUserBlkBackend`): no system package needed.
``virtq_testpmd``
    a module-scoped ``dpdk-testpmd`` vhost-user-net back-end
    (:class:`~virtq.testing.testpmd.TestPmd`, ``rxonly``).  Needs ``dpdk-dev``.
``virtq_dpdk_vhost_blk``
    DPDK's ``vhost_blk`` example (:class:`~virtq.testing.runners.DpdkVhostBlk`): a
    packed-ring-only vhost-user-blk back-end with a 128 MiB RAM disk (``.socket_path``).
    Needs the binary ``scripts/build-dpdk-vhost-blk.sh`` builds.
``virtq_check``
    runs ``virtq check``'s conformance catalogue (:mod:`virtq.check`) against *your*
    back-end and returns the :class:`~virtq.check.Report`::

        def test_my_backend_conforms(virtq_check):
            report = virtq_check("blk", backend_cmd="my-daemon --socket {socket}")
            assert report.exit_status == 0, report.failed()

    Give ``socket=`` for a back-end your test started, or ``backend_cmd=`` (with
    ``{socket}``) to have it started, restarted as the checks need and stopped by pid;
    ``only=["ring.*"]`` selects checks; other keywords are
    :class:`~virtq.check.CheckOptions` fields (``image=``, ``timeout=``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from virtq.check import (
    Backend,
    CheckOptions,
    CommandBackend,
    Report,
    SocketBackend,
    run_checks,
)
from virtq.errors import ArgumentError
from virtq.testing.embedded import VhostUserBlkBackend
from virtq.testing.runners import DpdkVhostBlk, QemuStorageDaemon, make_image
from virtq.testing.testpmd import TestPmd

BLK_IMAGE_BYTES = 16 << 20


@pytest.fixture
def virtq_blk_image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "virtq-disk.img", BLK_IMAGE_BYTES)


@pytest.fixture
def virtq_qsd(virtq_blk_image: Path, tmp_path: Path) -> Iterator[QemuStorageDaemon]:
    with QemuStorageDaemon(virtq_blk_image, tmp_path / "virtq-qsd.sock") as daemon:
        yield daemon


@pytest.fixture
def virtq_embedded_blk(virtq_blk_image: Path, tmp_path: Path) -> Iterator[VhostUserBlkBackend]:
    with VhostUserBlkBackend(virtq_blk_image, tmp_path / "virtq-embedded.sock") as backend:
        yield backend


@pytest.fixture(scope="module")
def virtq_testpmd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestPmd]:
    sock = tmp_path_factory.mktemp("virtq-net") / "vhost-net.sock"
    with TestPmd.vhost(sock) as tp:
        yield tp


CheckRunner = Callable[..., Report]


@pytest.fixture
def virtq_check() -> Iterator[CheckRunner]:
    started: list[CommandBackend] = []

    def run(device: str, socket: str | os.PathLike[str] | None = None, *,
            backend_cmd: str | list[str] | None = None, only: Iterable[str] = (),
            **options: Any) -> Report:
        if (socket is None) == (backend_cmd is None):
            raise ArgumentError("socket/backend_cmd", (socket, backend_cmd),
                                "give exactly one of them")
        backend: Backend
        if backend_cmd is not None:
            cmd = CommandBackend(backend_cmd).start()
            started.append(cmd)
            backend = cmd
        else:
            assert socket is not None
            backend = SocketBackend(socket)
        return run_checks(device, backend, options=CheckOptions(**options), only=only)

    yield run
    for backend in started:
        backend.close()


@pytest.fixture
def virtq_dpdk_vhost_blk(tmp_path: Path) -> Iterator[DpdkVhostBlk]:
    with DpdkVhostBlk(tmp_path / "virtq-vhost-blk") as backend:
        yield backend
