"""Memory barriers for Python, which has none.

Why this exists
---------------
A virtqueue is shared memory between two agents that run concurrently (a device thread in
another process, a vhost-user backend, real hardware doing DMA).  VIRTIO 1.2 §2.7.13 and the
Linux driver (``virtio_wmb``/``virtio_rmb``/``virtio_mb``) require three orderings:

* **publish** (store -> store): descriptors and ``avail.ring[]`` entries must be visible before
  the ``avail.idx`` store that exposes them (§2.7.13.3.1 step 4).
* **observe** (load -> load): ``used.idx`` must be read before the used elements and buffer
  bytes it announces (§2.7.13.4 / §2.7.14).
* **full** (store -> load): after storing ``avail.idx`` the driver reads ``used.flags`` or
  ``avail_event`` to decide whether to notify (§2.7.13.3.1 step 6, Linux
  ``virtqueue_kick_prepare_split`` uses ``virtio_mb``); after re-enabling interrupts
  (``used_event`` store) it re-reads ``used.idx`` (§2.7.13.5 / Linux ``virtqueue_poll``).
  Without a full fence a CPU may satisfy the load before the store leaves its store buffer:
  the driver misses a kick the device asked for, or sleeps forever on a completion that
  already arrived.  Every mainstream CPU, x86 included, does this reordering.

The mechanism
-------------
CPython has no fence primitive, and ctypes stores are plain stores.  virtq writes the fence
instruction itself into one page of executable memory (mapped read-write, filled, then
``mprotect``-ed to read-execute; never writable and executable at once) and calls it through
``ctypes.PYFUNCTYPE`` (which does not drop the GIL, so it is cheap):

=========  ==================  ================  ================
arch       full_fence          publish_barrier   observe_barrier
=========  ==================  ================  ================
x86-64     ``mfence; ret``     nothing (TSO)     nothing (TSO)
aarch64    ``dmb ish; ret``    ``dmb ishst``     ``dmb ishld``
=========  ==================  ================  ================

On x86-64 (TSO) the hardware keeps store->store and load->load order; the interpreter
executes each ctypes/memoryview access as its own C call in program order, which is also a
compiler barrier, so publish/observe need no instruction.  ``mfence`` is strong enough for
coherent DMA as well (``VIRTIO_F_ORDER_PLATFORM``).  If executable memory is refused (an
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


_A64_RET = 0xD65F03C0
_A64_FULL = _a64(0xD5033BBF, _A64_RET)  # dmb ish; ret
_A64_STORE = _a64(0xD5033ABF, _A64_RET)  # dmb ishst; ret
_A64_LOAD = _a64(0xD50339BF, _A64_RET)  # dmb ishld; ret

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


def _build() -> tuple[str, Callable[[], None], Callable[[], None], Callable[[], None], bytes]:
    machine = platform.machine().lower()
    if machine in _X86_64:
        try:
            page = _CodePage([_X86_FULL])
        except OSError:
            return ("x86-64 pthread_spin_lock (lock-prefixed RMW)", _spinlock_fence(), _noop,
                    _noop, b"")
        return ("x86-64 mfence stub", page.functions[0], _noop, _noop, page.code(0, 4))
    if machine in _AARCH64:
        page = _CodePage([_A64_FULL, _A64_STORE, _A64_LOAD])
        full, store, load = page.functions
        return ("aarch64 dmb stubs", full, store, load, page.code(0, 8))
    raise ImportError(
        f"virtq has no memory-barrier implementation for {machine!r}; "
        "supported: x86-64, aarch64"
    )


MECHANISM, full_fence, publish_barrier, observe_barrier, FULL_FENCE_CODE = _build()
"""``full_fence()``: store->load (and everything else); ``publish_barrier()``: store->store;
``observe_barrier()``: load->load.  ``FULL_FENCE_CODE`` is the machine code actually mapped,
read back from the executable page (empty for the spinlock fallback)."""

#: False where the hardware already orders stores (loads), so hot paths can skip the call.
PUBLISH_BARRIER_NEEDED = publish_barrier is not _noop
OBSERVE_BARRIER_NEEDED = observe_barrier is not _noop

__all__ = [
    "FULL_FENCE_CODE",
    "MECHANISM",
    "OBSERVE_BARRIER_NEEDED",
    "PUBLISH_BARRIER_NEEDED",
    "full_fence",
    "observe_barrier",
    "publish_barrier",
]
