/* The source's RAM as its senders read it: the RAM file's read-only mapping,
 * and what is found out about its contents ahead of sending (pages in holes of
 * the file, zero blocks of large pages), so that the demand server and every
 * push stream send those as zero without reading them again. */
#ifndef MIGRATE_SRC_RAM_H
#define MIGRATE_SRC_RAM_H
#include <stdint.h>
#include "bitmap.h"

/* cdef-begin */
/* The Python Source owns this struct and every array it points to; they
 * outlive every sender that reads them. */
struct mg_src_ram {
    uint64_t base;          /* the RAM file's read-only mapping */
    uint64_t page_size;
    uint64_t npages;
    uint64_t *holes;        /* pages wholly in holes of the RAM file, found once it no longer changes: they
                             * read as zero and go as zero pages without being read (NULL: none) */
    uint64_t holes_end;     /* holes' bits are final for the pages below this (atomic: mg_find_holes
                             * advances it as it walks the file) */
    uint64_t block_size;    /* the destination takes large pages sparse, in blocks of this size (0: whole
                             * pages only) */
    uint8_t *block_bits;    /* with block_size: each page's zero-block bitmap (page_size / block_size / 8
                             * bytes a page), filled ahead by mg_scan_blocks (NULL: none) */
    uint64_t *scanned;      /* pages whose block_bits are filled (atomic) */
    uint64_t hole_pages;    /* pages sent as zero because they were holes (atomic: every sender adds) */
    uint64_t push_zero_blocks; /* zero blocks left out of sparse push runs (atomic: every push stream adds) */
};
/* Fills the zero-block bitmaps of pages [first, first+count) ahead of their
 * demand (finding a 2 MiB page's zero blocks means reading them: ~50 us that a
 * waiting vCPU would otherwise wait). Only for RAM that no longer changes. */
void mg_scan_blocks(struct mg_src_ram *r, uint64_t first, uint64_t count);
/* Sets in holes (a page bitmap, all clear) the pages wholly in holes of the
 * first size bytes of fd (SEEK_DATA / SEEK_HOLE): they read as zero. As it
 * walks, it stores in *done (when not NULL) the page below which the bits are
 * final (all pages at the end, also on error). Returns how many, 0 where the
 * file system reports no holes, or -errno. */
int64_t mg_find_holes(int fd, uint64_t size, uint64_t page_size, uint64_t *holes, uint64_t *done);
/* The same for a file system that reports no holes (hugetlbfs: SEEK_DATA
 * says every byte is data). addr: the file's first size bytes mapped shared,
 * read-only, and registered with a userfaultfd in MISSING mode with
 * UFFD_FEATURE_SIGBUS; this mapping is the caller's probe, no other. A page
 * not in the file (never written) is then refused (EFAULT) instead of
 * allocated; a page that is there gets mapped in the probe. Same results. */
int64_t mg_probe_holes(uint64_t addr, uint64_t size, uint64_t page_size, uint64_t *holes, uint64_t *done);
/* cdef-end */

/* The page's bytes in the mapping. */
static inline const uint8_t *src_page(const struct mg_src_ram *r, uint64_t page)
{
    return (const uint8_t *)(uintptr_t)(r->base + page * r->page_size);
}

/* A page in a hole of the RAM file reads as zero: no need to read it. */
static inline int in_hole(const struct mg_src_ram *r, uint64_t page)
{
    return r->holes && page < __atomic_load_n(&r->holes_end, __ATOMIC_ACQUIRE) && test_bit(r->holes, page);
}

/* The RAM goes sparse: the destination agreed, and its pages are larger than
 * a block. */
static inline int src_sparse(const struct mg_src_ram *r)
{
    return r->block_size && r->page_size > r->block_size;
}

/* A large page's zero-block bitmap (bit b set when block b is all zero):
 * every block zero for a hole (the caller decided, once), the scan's when it
 * got there first, else found now into scratch (page_size / block_size / 8
 * bytes). */
const uint8_t *page_block_bits(const struct mg_src_ram *r, uint64_t page, int hole, uint8_t *scratch);

#endif
