"""Memory barriers for Python, which has none.

Why this exists
---------------
A virtqueue is shared memory between two agents that run concurrently (a device thread in
another process, a vhost-user backend, real hardware doing DMA).  VIRTIO 1.2 §2.7.13 and the
Linux driver (``virtio_wmb``/``virtio_rmb``/``virtio_mb``) require three orderings, and a
PCI transport a fourth:

* **publish** (store -> store): descriptors and ``avail.ring[]`` entries must be visible before
  the ``avail.idx`` store that exposes them (§2.7.13 step 4, §2.7.13.3.1).
* **observe** (load -> load): ``used.idx`` must be read before the used elements and buffer
  bytes it announces (§2.7.8, §2.7.14).
* **full** (store -> load): after storing ``avail.idx`` the driver reads ``used.flags`` or
  ``avail_event`` to decide whether to notify (§2.7.13 step 6, §2.7.13.4.1; Linux
  ``virtqueue_kick_prepare_split`` uses ``virtio_mb``); after re-enabling used-buffer
  notifications (``avail.flags``/``used_event`` store, §2.7.7) it re-reads ``used.idx``
  (the ``mb()`` in the §2.7.14 example; Linux ``virtqueue_poll``).  Without a full fence a
  CPU may satisfy the load before the store leaves its store buffer: the driver misses a
  kick the device asked for, or sleeps forever on a completion that already arrived.  Every
  mainstream CPU, x86 included, does this reordering.
* **doorbell** (memory store -> MMIO store): the ``avail.idx`` store must reach the device
  before the notification register write that tells it to look (§2.7.13 step 7,
  §2.7.13.4, §4.1.4.4; Linux ``writel`` orders it with ``__iowmb()``).

The device may be another CPU (a vhost-user back-end) or a PCI function doing DMA
(VFIO), so every barrier here is the one Linux uses for DMA-coherent memory, not the
CPU-to-CPU one: VIRTIO 1.2 §6.1 (VIRTIO_F_ORDER_PLATFORM) asks for "the barriers suitable
for hardware devices", and those also order against a back-end on another CPU (Linux picks
per queue between ``virt_*`` and ``dma_*``/``mb``; virtq keeps one set that is right for
both).

The mechanism
-------------
CPython has no fence primitive, and ctypes stores are plain stores.  virtq writes the fence
instruction itself into one page of executable memory (mapped read-write, filled, then
``mprotect``-ed to read-execute; never writable and executable at once) and calls it through
``ctypes.PYFUNCTYPE`` (which does not drop the GIL, so it is cheap):

=======  ===============  ===============  ===============  ================
arch     full_fence       publish_barrier  observe_barrier  doorbell_barrier
=======  ===============  ===============  ===============  ================
x86-64   ``mfence; ret``  nothing (TSO)    nothing (TSO)    nothing
aarch64  ``dmb osh``      ``dmb oshst``    ``dmb oshld``    ``dsb sy``
=======  ===============  ===============  ===============  ================

(each aarch64 stub is the instruction followed by ``ret``).  On x86-64 (TSO) the hardware
keeps store->store and load->load order; the interpreter executes each ctypes/memoryview
access as its own C call in program order, which is also a compiler barrier, so
publish/observe need no instruction.  ``mfence`` is strong enough for coherent DMA as well
(``VIRTIO_F_ORDER_PLATFORM``).  The doorbell needs nothing more: vfio-pci maps a BAR
uncached (UC), a UC store is not reordered before earlier stores, and ``publish`` has
already run ``mfence`` (Linux's x86 ``writel`` is likewise a plain ``mov`` with only a
compiler barrier, and its ``dma_wmb`` is ``barrier()``).

On aarch64 the outer-shareable ``dmb osh*`` forms are Linux's ``dma_mb``/``dma_wmb``/
``dma_rmb``: a DMA-capable device is an observer in the outer-shareable domain, which the
inner-shareable ``dmb ish*`` (``smp_*mb``, CPU-to-CPU) does not promise to cover.  Before
the MMIO doorbell store virtq issues ``dsb sy`` (Linux ``mb()``, which is what
``virtio_mb`` runs between the ``avail.idx`` store and the notify for a queue with
VIRTIO_F_ORDER_PLATFORM; ``writel``'s own ``__iowmb()`` is ``dmb oshst``): the strongest of
the two, and its cost is lost in a Python call.  ``docs/memory-ordering.md`` has the
per-site table and ``tests/test_fence_aarch64.py`` checks the encodings with binutils and
runs these very bytes under ``qemu-aarch64``.  If executable memory is refused (an
SELinux ``execmem`` policy), x86-64 falls back to glibc's ``pthread_spin_lock`` +
``pthread_spin_unlock``, whose ``lock``-prefixed read-modify-write is a full barrier on x86.
``MECHANISM`` names the one in use.  ``tests/test_fence.py`` proves the fence is real with a
store-buffering litmus test that observes the forbidden outcome with a no-op in its place and
never with :func:`full_fence`.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable

from virtq._sys import libc

_X86_64 = {"x86_64", "amd64"}
_AARCH64 = {"aarch64", "arm64"}

# Machine code stubs.  x86-64: mfence (0F AE F0), ret (C3).
_X86_FULL = bytes((0x0F, 0xAE, 0xF0, 0xC3))
_X86_RET = bytes((0xC3,))


def _a64(*words: int) -> bytes:
    return b"".join(w.to_bytes(4, "little") for w in words)


# A64 barriers (Arm ARM, "DMB"/"DSB"): 0xD503_3000 | CRm << 8 | opc << 5 | 0b11111, with
# opc 0b101 for DMB and 0b100 for DSB; CRm is the <option>: OSHLD 0b0001, OSHST 0b0010,
# OSH 0b0011, SY 0b1111.  Cross-checked with GNU as/objdump for aarch64 (binutils 2.40):
# tests/test_fence_aarch64.py assembles the mnemonics and compares.
_A64_RET = 0xD65F03C0
_A64_DMB_OSH = 0xD50333BF  # Linux dma_mb()
_A64_DMB_OSHST = 0xD50332BF  # Linux dma_wmb()
_A64_DMB_OSHLD = 0xD50331BF  # Linux dma_rmb()
_A64_DSB_SY = 0xD5033F9F  # Linux mb()

#: The aarch64 stubs, exactly as mapped on an aarch64 machine, by the name of the function
#: each becomes.  Public so the emulator harness runs the bytes virtq ships.
AARCH64_STUBS: dict[str, bytes] = {
    "full_fence": _a64(_A64_DMB_OSH, _A64_RET),
    "publish_barrier": _a64(_A64_DMB_OSHST, _A64_RET),
    "observe_barrier": _a64(_A64_DMB_OSHLD, _A64_RET),
    "doorbell_barrier": _a64(_A64_DSB_SY, _A64_RET),
}

_STUB_SLOT = 64  # bytes between stubs in the page
_PAGE = 4096


def _noop() -> None:
    """Nothing to do: the hardware already gives this order (x86-64 TSO)."""


class _CodePage:
    """One page holding fence stubs; mapped for the life of the process (never unmapped:
    function pointers into it may be cached anywhere)."""

    def __init__(self, stubs: list[bytes]) -> None:
        addr = libc.mmap_raw(
            _PAGE, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS
        )
        for i, code in enumerate(stubs):
            ctypes.memmove(addr + i * _STUB_SLOT, code, len(code))
        try:
            libc.mprotect(addr, _PAGE, libc.PROT_READ | libc.PROT_EXEC)
        except OSError:
            libc.munmap_raw(addr, _PAGE)
            raise
        self.addr = addr
        proto = ctypes.PYFUNCTYPE(None)
        self.functions: list[Callable[[], None]] = [
            proto(addr + i * _STUB_SLOT) for i in range(len(stubs))
        ]

    def code(self, index: int, length: int) -> bytes:
        return ctypes.string_at(self.addr + index * _STUB_SLOT, length)


def _spinlock_fence() -> Callable[[], None]:
    lib = ctypes.CDLL(None)
    lock = ctypes.c_int(1)  # pthread_spinlock_t is an int on glibc
    acquire = lib.pthread_spin_lock
    release = lib.pthread_spin_unlock
    ref = ctypes.byref(lock)

    def fence() -> None:
        acquire(ref)
        release(ref)

    lib.pthread_spin_init(ref, 0)
    return fence


_Fn = Callable[[], None]


def _build() -> tuple[str, _Fn, _Fn, _Fn, _Fn, bytes]:
    machine = platform.machine().lower()
    if machine in _X86_64:
        # No doorbell barrier on x86-64: vfio-pci maps the notify BAR uncached (UC), UC
        # accesses are strongly ordered and stores are not reordered with older stores
        # (Intel SDM vol. 3A, "Memory Ordering"; "Methods of Caching Available"), and
        # publish() already ran mfence after the avail.idx store.
        try:
            page = _CodePage([_X86_FULL])
        except OSError:
            return ("x86-64 pthread_spin_lock (lock-prefixed RMW)", _spinlock_fence(), _noop,
                    _noop, _noop, b"")
        return ("x86-64 mfence stub", page.functions[0], _noop, _noop, _noop, page.code(0, 4))
    if machine in _AARCH64:
        names = ("full_fence", "publish_barrier", "observe_barrier", "doorbell_barrier")
        page = _CodePage([AARCH64_STUBS[name] for name in names])
        full, store, load, doorbell = page.functions
        return ("aarch64 dmb osh/dsb sy stubs", full, store, load, doorbell,
                page.code(0, len(AARCH64_STUBS["full_fence"])))
    raise ImportError(
        f"virtq has no memory-barrier implementation for {machine!r}; "
        "supported: x86-64, aarch64"
    )


(MECHANISM, full_fence, publish_barrier, observe_barrier, doorbell_barrier,
 FULL_FENCE_CODE) = _build()
"""``full_fence()``: store->load (and everything else); ``publish_barrier()``: store->store;
``observe_barrier()``: load->load; ``doorbell_barrier()``: ring memory -> MMIO notify store.
None of them raises.  ``FULL_FENCE_CODE`` is the machine code actually mapped, read back
from the executable page (empty for the spinlock fallback)."""

#: False where the hardware already orders stores (loads), so hot paths can skip the call.
PUBLISH_BARRIER_NEEDED = publish_barrier is not _noop
OBSERVE_BARRIER_NEEDED = observe_barrier is not _noop

__all__ = [
    "AARCH64_STUBS",
    "FULL_FENCE_CODE",
    "MECHANISM",
    "OBSERVE_BARRIER_NEEDED",
    "PUBLISH_BARRIER_NEEDED",
    "doorbell_barrier",
    "full_fence",
    "observe_barrier",
    "publish_barrier",
]
