"""A guest booted without an IOMMU (``iommu=off``; the harness always adds
``intel_iommu=on`` last, which would win over ``intel_iommu=off``): no IOMMU groups, and the
error says what to do.  Run in its own boot (``-m noiommu_boot``)."""

from __future__ import annotations

import os

import pytest

from virtq.transport.vfio_pci import NoIommuGroupError, VfioPciTransport, find_virtio_devices

pytestmark = pytest.mark.noiommu_boot


def test_no_iommu_group():
    assert os.listdir("/sys/kernel/iommu_groups") == []
    address = find_virtio_devices(4)[0]
    with pytest.raises(NoIommuGroupError) as info:
        VfioPciTransport.open(address, bind=True)
    msg = str(info.value)
    assert f"{address} has no IOMMU group" in msg
    assert "intel_iommu=on" in msg and "bind the device to vfio-pci" in msg
