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
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from virtq.testing.embedded import VhostUserBlkBackend
from virtq.testing.runners import QemuStorageDaemon, make_image
from virtq.testing.testpmd import TestPmd

BLK_IMAGE_BYTES = 16 << 20


@pytest.fixture
def virtq_blk_image(tmp_path: Path) -> Path:
    """A 16 MiB raw image whose sectors carry :func:`~virtq.testing.runners.sector_pattern`."""
    return make_image(tmp_path / "virtq-disk.img", BLK_IMAGE_BYTES)


@pytest.fixture
def virtq_qsd(virtq_blk_image: Path, tmp_path: Path) -> Iterator[QemuStorageDaemon]:
    """qemu-storage-daemon exporting the image as vhost-user-blk, stopped afterwards.  Raises
    :class:`~virtq.testing.runners.BackendError` when it cannot start."""
    with QemuStorageDaemon(virtq_blk_image, tmp_path / "virtq-qsd.sock") as daemon:
        yield daemon


@pytest.fixture
def virtq_embedded_blk(virtq_blk_image: Path, tmp_path: Path) -> Iterator[VhostUserBlkBackend]:
    """The image served by virtq's pure-Python vhost-user-blk back-end."""
    with VhostUserBlkBackend(virtq_blk_image, tmp_path / "virtq-embedded.sock") as backend:
        yield backend


@pytest.fixture(scope="module")
def virtq_testpmd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestPmd]:
    """A dpdk-testpmd vhost-user-net back-end for the module (``rxonly``).  Raises
    :class:`~virtq.testing.runners.BackendError` when it cannot start."""
    sock = tmp_path_factory.mktemp("virtq-net") / "vhost-net.sock"
    with TestPmd.vhost(sock) as tp:
        yield tp
