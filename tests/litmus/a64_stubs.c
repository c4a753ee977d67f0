/* Run virtq's aarch64 barrier stubs: the very bytes of virtq._sys.fence.AARCH64_STUBS.
 *
 * tests/test_fence_aarch64.py writes those bytes into "stubs.h" (STUB_COUNT, stub_names[],
 * stub_len[], stub_code[][]), cross-compiles this file into a static aarch64 program and runs
 * it under qemu-aarch64 user emulation.  The page is laid out as virtq lays it out
 * (_CodePage in virtq/_sys/fence.py): one page mapped read-write, each stub copied to its
 * 64-byte slot, then mprotect-ed read-execute, and each stub called as a C function of no
 * arguments -- which is how ctypes.PYFUNCTYPE(None) calls it.
 *
 * Output: "page 0x...", then "<name> ok" after each stub returns; exit status 0.  A stub that
 * is not a valid instruction dies of SIGILL; one without its "ret" runs into the zeroed rest
 * of its slot (UDF #0), SIGILL too.
 *
 * A second thread is started (and joined) before the stubs run: QEMU then translates code
 * for parallel execution, where a DMB/DSB becomes a real TCG "mb" op (single-threaded it is
 * dropped), so `-d op` shows how QEMU decodes each barrier.
 *
 * Not part of the package; built only by the test. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "stubs.h"

#define SLOT 64
#define PAGE 4096

static void *idle(void *arg) { return arg; }

int main(void) {
    unsigned char *page = mmap(0, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                               -1, 0);
    if (page == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    for (int i = 0; i < STUB_COUNT; i++) memcpy(page + i * SLOT, stub_code[i], stub_len[i]);
    if (mprotect(page, PAGE, PROT_READ | PROT_EXEC) != 0) {
        perror("mprotect");
        return 2;
    }
    __builtin___clear_cache((char *)page, (char *)page + PAGE);
    printf("page %p\n", (void *)page);

    pthread_t thread;
    if (pthread_create(&thread, 0, idle, 0) != 0 || pthread_join(thread, 0) != 0) {
        fprintf(stderr, "pthread failed\n");
        return 2;
    }
    for (int i = 0; i < STUB_COUNT; i++) {
        void (*stub)(void) = (void (*)(void))(page + i * SLOT);
        stub();
        printf("%s ok\n", stub_names[i]);
        fflush(stdout);
    }
    return 0;
}
