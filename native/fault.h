/* The fault path: page bitmaps, the guest page space, placement and the fault
 * loop. This is the one C file that holds more than wrappers, because it runs
 * with the GIL released on every fault. */
#ifndef MIGRATE_FAULT_H
#define MIGRATE_FAULT_H
#include <stdint.h>

/* cdef-begin */
#define MG_MAX_REGIONS 16
#define MG_PLACE_CONTINUE 0
#define MG_PLACE_COPY 1

/* Bitmaps: arrays of uint64_t words, bit i = page i. Set/claim are atomic so the
 * fault loop may read while placement writes. */
void mg_bitmap_set_range(uint64_t *map, uint64_t first, uint64_t count);
void mg_bitmap_clear_range(uint64_t *map, uint64_t first, uint64_t count);
int mg_bitmap_test(const uint64_t *map, uint64_t bit);
uint64_t mg_bitmap_count(const uint64_t *map, uint64_t first, uint64_t count);
/* First bit in [first, end) that is clear (or set), or end if none. */
uint64_t mg_bitmap_next_clear(const uint64_t *map, uint64_t first, uint64_t end);
uint64_t mg_bitmap_next_set(const uint64_t *map, uint64_t first, uint64_t end);

struct mg_region {
    uint64_t guest_addr;   /* host virtual address in the guest process */
    uint64_t first_page;   /* file offset / page_size */
    uint64_t npages;
};

struct mg_fault_stats {
    uint64_t faults;       /* page-fault events read */
    uint64_t minor;        /* of which MINOR (page in cache, not mapped) */
    uint64_t fast;         /* answered at once: page was already received */
    uint64_t requested;    /* handed back as needing the source */
    uint64_t outside;      /* address outside every region (woken, counted) */
    uint64_t eexist;       /* CONTINUE found the page mapped: woken instead */
    uint64_t mapped_pages; /* pages mapped by mg_map_pages */
    uint64_t map_calls;    /* UFFDIO_CONTINUE/COPY ioctls issued */
};

/* The guest page space: who owns what. The uffd and the alias mapping belong to
 * the Python GuestSpace object and outlive every call that uses this struct. */
struct mg_space {
    int uffd;
    int mode;               /* MG_PLACE_CONTINUE or MG_PLACE_COPY */
    uint64_t page_size;
    uint64_t npages;
    uint64_t alias_base;    /* agent's mapping of the RAM file at offset 0 (0 in COPY mode) */
    uint64_t *received;
    uint64_t *mapped;
    uint64_t *claimed;      /* placement claims a page before writing it */
    int nregions;
    struct mg_region regions[16];
    struct mg_fault_stats stats;
};

/* Page index of a guest address, or -1 if it lies outside every region. */
int64_t mg_space_page_of(const struct mg_space *s, uint64_t guest_addr);
/* Guest address of a page (0 if no region maps it). */
uint64_t mg_space_addr_of(const struct mg_space *s, uint64_t page);

/* Maps received pages [first, first+count) into the guest (UFFDIO_CONTINUE in
 * CONTINUE mode), waking waiters. Pages not received or already mapped are
 * skipped; EEXIST from a racing CONTINUE wakes that page instead. Returns the
 * number of pages newly mapped, or -errno for any other failure, with the
 * failing page in *bad_page. */
int64_t mg_map_pages(struct mg_space *s, uint64_t first, uint64_t count, uint64_t *bad_page);

/* Places n pages from a batch: pages[i] gets data at data + data_off[i]
 * (page_size bytes) or zeros if is_zero[i]. A page already claimed is dropped
 * (invariant 2). CONTINUE mode writes through the alias, then records
 * received; COPY mode places with UFFDIO_COPY (or ZEROPAGE) directly and
 * records received and mapped. placed[i] (if not NULL) is set to 1 for each
 * page this call placed. Returns pages placed or -errno (*bad_page). */
int64_t mg_place_pages(struct mg_space *s, const uint64_t *pages, uint64_t n,
                       const uint8_t *data, const uint64_t *data_off,
                       const uint8_t *is_zero, uint8_t *placed, uint64_t *bad_page);

/* Claims a contiguous run for writing by a caller that fills the alias itself
 * (decompressing straight into it). Returns 1 if every page of the run was
 * unclaimed and is now claimed by the caller, 0 if any page was already
 * claimed (then nothing is claimed). */
int mg_claim_run(struct mg_space *s, uint64_t first, uint64_t count);

/* Serves faults until some need the source. Reads events from the uffd; a fault
 * on a received page is mapped at once; the others are returned in need[]
 * (page indexes, at most max). Returns the count (> 0), 0 on timeout,
 * -ESHUTDOWN when stop_fd became readable, -errno on failure. */
int mg_fault_serve(struct mg_space *s, int stop_fd, uint64_t *need, int max, int timeout_ms);
/* cdef-end */

#endif
