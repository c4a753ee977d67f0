/* Run virtq's aarch64 barrier stubs: the very bytes of virtq._sys.fence.AARCH64_STUBS.
 *
 * tests/test_fence_aarch64.py writes those bytes into "stubs.h" (STUB_COUNT, stub_names[],
 * stub_code[][]), cross-compiles this file (and sb.c) into a static aarch64 program and runs
 * it under qemu-aarch64 user emulation.  The page is laid out as virtq lays it out
 * (_CodePage in virtq/_sys/fence.py): one page mapped read-write, each stub copied to its
 * 64-byte slot, then mprotect-ed read-execute, and each stub called as a C function of no
 * arguments -- which is how ctypes.PYFUNCTYPE(None) calls it.
 *
 *   a64_stubs               call every stub once; print "<name> ok" after each; exit 0.
 *                           A stub that is not a valid instruction dies of SIGILL; one
 *                           without its "ret" runs into the zeroed slot (UDF #0), SIGILL.
 *   a64_stubs sb NAME N     the store-buffering litmus test of sb.c with stub NAME (or
 *                           "noop") as the fence, N rounds; print the forbidden count.
 *
 * Not part of the package; built only by the test. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "stubs.h"

#define SLOT 64
#define PAGE 4096

long sb_litmus(uintptr_t fence_addr, long n);

static unsigned char *map_stubs(void) {
    unsigned char *page = mmap(0, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                               -1, 0);
    if (page == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    for (int i = 0; i < STUB_COUNT; i++) memcpy(page + i * SLOT, stub_code[i], stub_len[i]);
    if (mprotect(page, PAGE, PROT_READ | PROT_EXEC) != 0) {
        perror("mprotect");
        exit(2);
    }
    __builtin___clear_cache((char *)page, (char *)page + PAGE);
    return page;
}

int main(int argc, char **argv) {
    unsigned char *page = map_stubs();
    if (argc == 1) {
        for (int i = 0; i < STUB_COUNT; i++) {
            void (*stub)(void) = (void (*)(void))(page + i * SLOT);
            stub();
            printf("%s ok\n", stub_names[i]);
            fflush(stdout);
        }
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "sb") == 0) {
        uintptr_t fence = 0; /* 0: sb.c's own no-op */
        if (strcmp(argv[2], "noop") != 0) {
            int i = 0;
            while (i < STUB_COUNT && strcmp(stub_names[i], argv[2]) != 0) i++;
            if (i == STUB_COUNT) {
                fprintf(stderr, "no stub %s\n", argv[2]);
                return 2;
            }
            fence = (uintptr_t)(page + i * SLOT);
        }
        long forbidden = sb_litmus(fence, strtol(argv[3], 0, 10));
        printf("%ld\n", forbidden);
        return forbidden < 0 ? 2 : 0;
    }
    fprintf(stderr, "usage: %s [sb NAME ROUNDS]\n", argv[0]);
    return 2;
}
