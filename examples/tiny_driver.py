"""A device driver of your own: a read-only virtio-blk driver on virtq's seam, in 100 lines.

    python examples/tiny_driver.py                 # starts qemu-storage-daemon
    python examples/tiny_driver.py --socket /tmp/blk.sock

The driver sees only the three seams (docs/writing-a-driver.md): a Transport (features,
config space, memory, queues, notify), a DriverQueue with a template (it never writes a
descriptor), and a Waiter (arm, re-check, sleep).  Over VfioPciTransport it is the same
code.
"""

import argparse
import contextlib
import struct
import tempfile
from pathlib import Path

from virtq.abi import VIRTIO_F_EVENT_IDX
from virtq.abi.blk import (
    BLK_REQ_HEADER,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
)
from virtq.errors import DeviceProtocolError
from virtq.queue import make_queue, ring_layout
from virtq.testing.runners import QemuStorageDaemon, make_image, sector_pattern
from virtq.transport import Waiter, deadline_after
from virtq.transport.vhost_user import VhostUserTransport

CHUNK = 4096


class TinyBlk:
    """One request at a time: header (device-readable), data and status (device-writable)."""

    def __init__(self, transport):
        self.t = transport
        features = transport.negotiate(1 << VIRTIO_F_EVENT_IDX)  # VERSION_1 is implied
        (self.capacity,) = struct.unpack("<Q", transport.read_config(0, 8))  # §5.2.4
        layout = ring_layout(8)
        # One arena: the ring, then our request memory (header 16 + status 1, data).
        self.arena = transport.alloc_dma(layout.nbytes + 4096 + CHUNK)
        self.hdr, self.data = layout.nbytes, layout.nbytes + 4096
        self.q = make_queue(self.arena.region, layout, iova=self.arena.iova,
                            event_idx=bool(features >> VIRTIO_F_EVENT_IDX & 1))
        self.tpl = self.q.template(3, slots=1)           # the request shape, declared once
        transport.attach_queue(0, self.q)
        self.waiter = Waiter(transport, [self.q])
        transport.start()                                 # DRIVER_OK (§3.1.1)

    def _request(self, kind, sector, nbytes, timeout=5.0):
        mem = self.arena.region
        with mem.view(self.hdr, 17) as hdr:
            BLK_REQ_HEADER.pack_into(hdr, 0, kind, 0, sector)
            hdr[16] = 0xFF                                # poisoned: the device must write it
        a = self.arena.addr
        slot = self.tpl.acquire()
        self.tpl.submit(slot, [(a(self.hdr), 16)], [(a(self.data), nbytes), (a(self.hdr + 16), 1)],
                        token=kind)
        if self.q.publish():                              # True: the device wants a kick
            self.t.notify(0)
        deadline = deadline_after(timeout)
        while not (done := self.q.drain_used()):
            if not self.waiter.wait(deadline):
                raise TimeoutError("the device did not answer")
        (_, used_len), = done
        with mem.view(self.hdr + 16, 1) as status:
            if used_len < nbytes + 1 or status[0] != VIRTIO_BLK_S_OK:
                err = DeviceProtocolError("status", status[0], "0 with all data written")
                self.q.mark_broken(err)                   # the failure policy: stop here
                raise err
        with mem.view(self.data, nbytes) as data:
            return bytes(data)

    def read(self, sector):
        return self._request(VIRTIO_BLK_T_IN, sector, CHUNK)

    def get_id(self):
        return self._request(VIRTIO_BLK_T_GET_ID, 0, 20).split(b"\0")[0].decode()

    def close(self):
        self.t.close()                                    # closes the queue and the memory


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--socket", help="a vhost-user-blk back-end already listening here")
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        socket = args.socket
        if socket is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            image = make_image(tmp / "disk.img", 16 << 20)
            socket = stack.enter_context(QemuStorageDaemon(image, tmp / "blk.sock")).socket_path
        disk = TinyBlk(VhostUserTransport.connect(socket))
        stack.callback(disk.close)
        print(f"capacity {disk.capacity} sectors, id {disk.get_id()!r}")
        for sector in (0, 8, 1000):
            data = disk.read(sector)
            if args.socket is None:
                assert data[:512] == sector_pattern(sector)
            print(f"sector {sector}: {data[:16].hex()}...")


if __name__ == "__main__":
    main()
