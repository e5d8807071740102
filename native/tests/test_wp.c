/* Standalone test of pre-copy's write tracking (src_wp.c) on a memfd: async
 * write-protect of all of it, scattered writes, PAGEMAP_SCAN returning exactly
 * the pages written since the last scan, and the protection removed.
 *
 * Build and run from the repo root (tests/test_precopy.py does):
 *   gcc -O2 -std=gnu11 -Wall -Inative native/tests/test_wp.c native/src_wp.c \
 *       native/uffd.c -o /tmp/twp && /tmp/twp [MiB]
 *
 * Prints one line of timings. Exit status 0 = pass, 77 = the kernel lacks
 * async write-protect (skip). */
#define _GNU_SOURCE
#include "bitmap.h"
#include "src_wp.h"
#include "uffd.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PS 4096ULL

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int fail(const char *what, long rc)
{
    fprintf(stderr, "FAIL %s: %ld\n", what, rc);
    return 1;
}

int main(int argc, char **argv)
{
    uint64_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 1024;
    uint64_t size = mib << 20, npages = size / PS;
    int fd = memfd_create("test-wp", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, size) < 0)
        return fail("memfd", -1);
    uint8_t *ram = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ram == MAP_FAILED)
        return fail("mmap", -1);
    int uffd = mg_uffd_create_syscall(O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        uffd = mg_uffd_create_dev(O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        return fail("userfaultfd", uffd);
    uint64_t feats = MG_UFFD_FEATURE_WP_ASYNC | MG_UFFD_FEATURE_WP_HUGETLBFS_SHMEM | MG_UFFD_FEATURE_WP_UNPOPULATED;
    uint64_t want = feats, ioctls = 0;
    int rc = mg_uffd_api(uffd, &feats, &ioctls);
    if (rc < 0 || (feats & want) != want) {
        printf("SKIP: no async write-protect (%d, features %#" PRIx64 ")\n", rc, feats);
        return 77;
    }
    if ((rc = mg_uffd_register(uffd, (uint64_t)(uintptr_t)ram, size, MG_UFFD_REGISTER_WP, &ioctls)) < 0)
        return fail("register WP", rc);
    double t0 = now_ms();
    if ((rc = mg_wp_protect(uffd, (uint64_t)(uintptr_t)ram, size, 1)) < 0)
        return fail("write-protect", rc);
    double protect_ms = now_ms() - t0;

    int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    uint64_t *bits = calloc((npages + 63) / 64, 8), *want_bits = calloc((npages + 63) / 64, 8);
    struct mg_wp_scan_result res;
    /* nothing written yet */
    if ((rc = mg_wp_scan(pagemap, (uint64_t)(uintptr_t)ram, npages, PS, bits, 0, &res)) < 0 || res.pages)
        return fail("first scan (nothing written)", rc < 0 ? rc : (long)res.pages);
    /* 1000 scattered writes (some land on the same page) */
    uint64_t x = 88172645463325252ULL, distinct = 0;
    for (int i = 0; i < 1000; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        uint64_t p = x % npages;
        ram[p * PS + (x >> 40) % PS] = 1;
        if (!test_and_set_bit(want_bits, p))
            distinct++;
    }
    t0 = now_ms();
    if ((rc = mg_wp_scan(pagemap, (uint64_t)(uintptr_t)ram, npages, PS, bits, 0, &res)) < 0)
        return fail("scan", rc);
    double scan_ms = now_ms() - t0;
    uint64_t calls = res.calls;
    if (res.pages != distinct || memcmp(bits, want_bits, (npages + 63) / 64 * 8))
        return fail("scan found other pages than written", (long)res.pages);
    /* the next scan: only what was written since */
    memset(bits, 0, (npages + 63) / 64 * 8);
    ram[7 * PS] = 2;
    ram[(npages - 1) * PS + PS - 1] = 3;
    t0 = now_ms();
    if ((rc = mg_wp_scan(pagemap, (uint64_t)(uintptr_t)ram, npages, PS, bits, 0, &res)) < 0)
        return fail("second scan", rc);
    double scan2_ms = now_ms() - t0;
    if (res.pages != 2 || !test_bit(bits, 7) || !test_bit(bits, npages - 1))
        return fail("second scan found", (long)res.pages);
    /* unprotected and unregistered: writes are no longer tracked */
    if ((rc = mg_wp_protect(uffd, (uint64_t)(uintptr_t)ram, size, 0)) < 0 ||
        (rc = mg_uffd_unregister(uffd, (uint64_t)(uintptr_t)ram, size)) < 0)
        return fail("unprotect", rc);
    ram[9 * PS] = 4;
    if (mg_wp_scan(pagemap, (uint64_t)(uintptr_t)ram, npages, PS, bits, 0, &res) != -EPERM)
        return fail("a scan of an unregistered range is refused (CHECK_WPASYNC)", 0);
    printf("%" PRIu64 " MiB: protect-all %.2f ms; %" PRIu64 " distinct of 1000 writes found in %.3f ms "
           "(%" PRIu64 " calls); next scan %.3f ms\n", mib, protect_ms, distinct, scan_ms, calls, scan2_ms);
    return 0;
}
