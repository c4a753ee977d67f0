"""A virtio-net NIC over vhost-user, looped back by dpdk-testpmd.

    python examples/nic_loopback.py
    python examples/nic_loopback.py --socket /tmp/vhost-net.sock   # your own testpmd

testpmd runs DPDK's vhost-user back-end (net_vhost) with one port in "io" forwarding: every
frame the NIC sends comes back on the same port, so what we send is what we receive.
"""

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

from virtq.devices import NetDevice
from virtq.devices.net import build_frame
from virtq.testing.testpmd import TestPmd

DST = bytes.fromhex("020000000001")  # locally administered unicast addresses
SRC = bytes.fromhex("020000000002")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--socket", help="a vhost-user-net back-end (forwarding frames back)")
    p.add_argument("--frames", type=int, default=100)
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        socket = args.socket
        if socket is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            testpmd = stack.enter_context(TestPmd.vhost(tmp / "net.sock", forward_mode="io"))
            testpmd.start_forwarding()
            socket = testpmd.socket_path
        nic = stack.enter_context(NetDevice.connect_vhost_user(socket))
        print(f"NIC up: MAC {nic.mac.hex(':') if nic.mac else 'none offered'}")

        # 0x88B5: the IEEE "local experimental" ethertype; each frame carries its number.
        frames = [build_frame(DST, SRC, 0x88B5, i.to_bytes(4, "big") + bytes(60))
                  for i in range(args.frames)]
        nic.send_batch(frames, timeout=5)        # one call, one notification
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < len(frames) and time.monotonic() < deadline:
            got += nic.recv_batch(len(frames) - len(got), timeout=1)
        assert got == frames, f"{len(got)} of {len(frames)} frames came back"
        print(f"{len(frames)} frames sent and received back byte for byte")


if __name__ == "__main__":
    main()
