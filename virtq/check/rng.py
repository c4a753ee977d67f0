"""virtio-rng checks (VIRTIO 1.2 §5.4)."""

from __future__ import annotations

from virtq.check.context import CheckContext
from virtq.check.model import CheckFailed, Level, check


@check("rng.bytes", title="each request gets at least one random byte",
       clause="VIRTIO 1.2 §5.4.6.2: The device MUST place one or more random bytes into the "
              "buffer, but it MAY use less than the entire buffer length.", level=Level.MUST,
       devices=("rng",))
def rng_bytes(ctx: CheckContext) -> str | None:
    s = ctx.session()
    reqs = [s.request(0, [], [64]) for _ in range(4)]
    lens = [d.used_len for d in s.run(reqs)]
    if any(n < 1 or n > 64 for n in lens):
        raise CheckFailed(f"used.len {lens} for 64-byte buffers (each must be 1..64)",
                          lens=lens)
    return f"used.len {lens}"
