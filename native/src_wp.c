/* Async write-protect and PAGEMAP_SCAN (see src_wp.h). */
#include "src_wp.h"
#include "bitmap.h"

#include <errno.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

/* Linux 6.7 uapi (include/uapi/linux/fs.h), absent from Debian 12's headers. */
#ifndef PAGEMAP_SCAN
struct page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

struct pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#endif

/* (Debian 12's 6.1 headers have the first, not the others) */
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFDIO_WRITEPROTECT_MODE_WP
#define UFFDIO_WRITEPROTECT_MODE_WP ((uint64_t)1 << 0)
#endif

_Static_assert(UFFD_FEATURE_WP_ASYNC == MG_UFFD_FEATURE_WP_ASYNC, "WP_ASYNC");
_Static_assert(UFFD_FEATURE_WP_HUGETLBFS_SHMEM == MG_UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM");
_Static_assert(UFFD_FEATURE_WP_UNPOPULATED == MG_UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED");
_Static_assert(sizeof(struct pm_scan_arg) == 96, "pm_scan_arg is 96 bytes in the uapi");

int mg_wp_protect(int uffd, uint64_t start, uint64_t len, int wp)
{
    struct uffdio_writeprotect w = {
        .range = {.start = start, .len = len},
        .mode = wp ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    return ioctl(uffd, UFFDIO_WRITEPROTECT, &w) < 0 ? -errno : 0;
}

/* Regions per call: a scan of few written pages takes one call; a range
 * written all over (each page alone) takes one call per VEC_LEN runs. */
#define VEC_LEN 1024

int mg_wp_scan(int pagemap_fd, uint64_t start, uint64_t npages, uint64_t page_size,
               uint64_t *bitmap, uint64_t first_page, struct mg_wp_scan_result *res)
{
    struct page_region vec[VEC_LEN];
    uint64_t end = start + npages * page_size;
    memset(res, 0, sizeof(*res));
    uint64_t at = start;
    while (at < end) {
        struct pm_scan_arg arg = {
            .size = sizeof(arg),
            /* WP_MATCHING: what is reported is protected again in the same
             * walk, so a write after it is seen by the next scan and none is
             * lost between reading and protecting. CHECK_WPASYNC: refuse
             * (EPERM) a range not registered for async write-protect,
             * instead of reporting nothing. */
            .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            .start = at,
            .end = end,
            .vec = (uint64_t)(uintptr_t)vec,
            .vec_len = VEC_LEN,
            .category_mask = PAGE_IS_WRITTEN,
            .return_mask = PAGE_IS_WRITTEN,
        };
        long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
        res->calls++;
        if (n < 0)
            return -errno;
        for (long i = 0; i < n; i++) {
            /* the kernel reports in base pages; a huge page is written whole */
            uint64_t p0 = (vec[i].start - start) / page_size;
            uint64_t p1 = (vec[i].end - start + page_size - 1) / page_size;
            for (uint64_t p = p0; p < p1; p++) {
                if (!test_and_set_bit(bitmap, first_page + p))
                    res->pages++;
            }
        }
        res->regions += (uint64_t)n;
        /* walk_end: where the kernel stopped (the vector filled up, or end) */
        if (arg.walk_end <= at)
            return -EIO;
        at = arg.walk_end;
    }
    return 0;
}
