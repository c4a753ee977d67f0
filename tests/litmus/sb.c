/* Store-buffering litmus test (the "SB" shape of the x86-TSO and ARM memory models).
 *
 *   thread 0: x = 1; fence(); r0 = y;      thread 1: y = 1; fence(); r1 = x;
 *
 * The outcome r0 == 0 && r1 == 0 is forbidden under sequential consistency but allowed on
 * every mainstream CPU when fence() is not a full barrier: each store can sit in its core's
 * store buffer while the following load is satisfied from cache. virtq's tests call this
 * with a no-op in place of fence() (expecting the forbidden outcome to appear) and with
 * virtq's full_fence stub (expecting it never to appear).
 *
 * Built by tests/test_fence.py with the system C compiler; not part of the package. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

typedef void (*fence_fn)(void);

static _Atomic int x, y;
static int r0, r1;
static _Atomic long arrive;   /* sense-free counting barrier */
static fence_fn fence;
static long iterations;

__attribute__((noinline)) void litmus_noop(void) { __asm__ volatile("" ::: "memory"); }

static void barrier(long *phase) {
    long target = (*phase += 2);
    atomic_fetch_add_explicit(&arrive, 1, memory_order_acq_rel);
    while (atomic_load_explicit(&arrive, memory_order_acquire) < target) {
    }
}

static void *side1(void *arg) {
    long phase = 0;
    (void)arg;
    for (long i = 0; i < iterations; i++) {
        barrier(&phase);
        atomic_store_explicit(&y, 1, memory_order_relaxed);
        fence();
        r1 = atomic_load_explicit(&x, memory_order_relaxed);
        barrier(&phase);
        barrier(&phase); /* thread 0 resets between these two */
    }
    return 0;
}

/* Returns how many of `n` rounds showed the forbidden outcome, or -1 on error. */
long sb_litmus(uintptr_t fence_addr, long n) {
    pthread_t t;
    long phase = 0, forbidden = 0;
    fence = fence_addr ? (fence_fn)fence_addr : litmus_noop;
    iterations = n;
    atomic_store(&arrive, 0);
    atomic_store(&x, 0);
    atomic_store(&y, 0);
    if (pthread_create(&t, 0, side1, 0) != 0) return -1;
    for (long i = 0; i < n; i++) {
        barrier(&phase);
        atomic_store_explicit(&x, 1, memory_order_relaxed);
        fence();
        r0 = atomic_load_explicit(&y, memory_order_relaxed);
        barrier(&phase);
        if (r0 == 0 && r1 == 0) forbidden++;
        atomic_store(&x, 0);
        atomic_store(&y, 0);
        barrier(&phase);
    }
    pthread_join(t, 0);
    return forbidden;
}
