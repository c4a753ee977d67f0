"""A split virtqueue and a device, in one process: the whole life of a request.

    python examples/first_queue.py

The driver side is virtq's SplitQueue; the device side is virtq's test device
(DeviceQueue), an independent implementation of the other half of VIRTIO 1.2 §2.7 over the
same memory.
"""

from virtq.layout import SplitLayout
from virtq.memory import MemfdRegion
from virtq.queue import SplitQueue
from virtq.testing import DeviceQueue

# Where the ring's parts go: 8 descriptors, and a 512-byte buffer per descriptor.
layout = SplitLayout.compute(8, buffer_size=512)
# The device address of the region's byte 0: what descriptors point at.
IOVA = 0x1000_0000

with MemfdRegion(layout.nbytes) as region:       # memory we own (a memfd: shareable)
    queue = SplitQueue(region, layout, iova=IOVA, event_idx=True)
    device = DeviceQueue(region, layout, iova=IOVA, event_idx=True)
    try:
        # A request: 5 bytes the device reads, then 64 bytes it may write.
        buf = layout.buffer(0)
        region.view(buf, 5)[:] = b"hello"
        queue.add([(IOVA + buf, 5)], [(IOVA + buf + 64, 64)], token="request 1")
        if queue.publish():                      # barrier, avail.idx; True: wants a kick
            print("driver: published; the device asked to be notified")

        # The device: pop the chain, answer, push it to the used ring.
        head, segments = device.pop()
        data = device.read(segments[0].iova, segments[0].length)
        device.write(segments[1].iova, data.upper())
        device.push(head, len(data))
        print(f"device: chain at head {head}: {[(hex(s.iova), s.length) for s in segments]}")

        # The driver reaps (token, bytes written): every value was checked on the way in.
        for token, written in queue.drain_used():
            reply = bytes(region.view(buf + 64, written))
            print(f"driver: {token} completed, {written} bytes: {reply!r}")
            assert reply == b"HELLO"
    finally:
        device.close()                           # views first, then the region
        queue.close()
