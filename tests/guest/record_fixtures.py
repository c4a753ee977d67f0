"""Record the bytes the host-side unit tests parse (run in the guest, not by pytest).

    scripts/vfio-guest '$PY tests/guest/record_fixtures.py'

writes into the run folder (``--out``): the first 256 bytes of config space of the guest's
virtio-rng and virtio-blk functions as VFIO presents them, the raw VFIO_IOMMU_GET_INFO
answer (capability chain included) and the raw region info of each function's virtio BAR.
Copy them to tests/data/vfio/ to refresh the recorded fixtures.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from virtq._sys import vfio as _vfio
from virtq.transport.vfio_pci import VfioPciTransport, find_virtio_devices


def main() -> int:
    out = Path(os.environ.get("VIRTQ_GUEST_OUT", "/tmp"))
    summary = {}
    for name, device_type in (("virtio-rng-pci", 4), ("virtio-blk-pci", 2)):
        address = find_virtio_devices(device_type)[0]
        with VfioPciTransport.open(address, bind=True, poll=True) as t:
            (out / f"{name}.config").write_bytes(t.device.config_snapshot(256))
            bar = t.caps.common.bar
            (out / f"{name}.bar{bar}.region-info").write_bytes(
                _vfio.device_get_region_info_raw(t.device.fd, bar))
            (out / "iommu-info.bin").write_bytes(_vfio.iommu_get_info_raw(t.container.fd))
            summary[name] = {"address": address, "describe": t.describe()}
            print(t.describe())
    (out / "fixtures.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
