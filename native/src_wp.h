/* Write tracking on the source guest's RAM while it runs (pre-copy):
 * userfaultfd write-protect in async mode, and PAGEMAP_SCAN, which reads the
 * pages written since the last scan and protects them again in one call.
 * Debian 12's headers predate both (Linux 6.7), so what is needed of them is
 * declared here. One thin wrapper per ioctl, each returning >= 0 or -errno. */
#ifndef MIGRATE_SRC_WP_H
#define MIGRATE_SRC_WP_H
#include <stdint.h>

/* cdef-begin */
#define MG_UFFD_FEATURE_WP_HUGETLBFS_SHMEM 4096
#define MG_UFFD_FEATURE_WP_UNPOPULATED 8192
#define MG_UFFD_FEATURE_WP_ASYNC 32768

/* What one scan found and what it cost. */
struct mg_wp_scan_result {
    uint64_t pages;     /* written pages found (set in the bitmap) */
    uint64_t regions;   /* page_region entries the kernel returned */
    uint64_t calls;     /* PAGEMAP_SCAN ioctls issued */
};

/* UFFDIO_WRITEPROTECT on [start, start+len) of the uffd's creator's mm:
 * wp 1 protects, 0 removes the protection. */
int mg_wp_protect(int uffd, uint64_t start, uint64_t len, int wp);

/* PAGEMAP_SCAN on pagemap_fd (/proc/PID/pagemap of the uffd's creator) over
 * [start, start + npages * page_size), registered for async write-protect:
 * every page written since it was last protected is set in bitmap (bit
 * first_page + its index in the range; the caller's bitmap covers them) and
 * protected again, atomically per page. Returns 0 or -errno; res is filled
 * either way. */
int mg_wp_scan(int pagemap_fd, uint64_t start, uint64_t npages, uint64_t page_size,
               uint64_t *bitmap, uint64_t first_page, struct mg_wp_scan_result *res);
/* cdef-end */

#endif
