"""Random bytes from a real virtio-rng PCI function, through VFIO, from user space.

    scripts/vfio-guest -- '$PY examples/rng_through_vfio.py'

It needs a virtio-rng-pci function with an IOMMU group (see docs/vfio.md); the vfio-guest
VM has one (a QEMU guest with an intel-iommu), and scripts/vfio-guest runs a command there.
No kernel virtio driver is involved: virtq binds the function to vfio-pci, maps its
memory into the IOMMU, programs the rings through the BAR and polls the used ring (or
sleeps on an MSI-X eventfd).
"""

from virtq.devices import RngDevice
from virtq.transport.vfio_pci import find_virtio_devices

VIRTIO_ID_ENTROPY = 4  # VIRTIO 1.2 §5: device type 4, PCI id 1af4:1044


def main() -> None:
    found = find_virtio_devices(VIRTIO_ID_ENTROPY)  # by vendor:device id, never by address
    if not found:
        raise SystemExit("no modern virtio-rng PCI function here (try scripts/vfio-guest)")
    address = found[0]
    for poll in (True, False):                # polling the used ring, then MSI-X
        with RngDevice.open_vfio(address, bind=True, poll=poll) as rng:
            samples = [rng.read(32) for _ in range(4)]
        assert len(set(samples)) == 4 and bytes(32) not in samples
        how = "polling" if poll else "MSI-X"
        print(f"{address} ({how}): {samples[0].hex()}")


if __name__ == "__main__":
    main()
