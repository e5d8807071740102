/* guestsim: the simulated VM's vCPUs. Threads walk guest RAM in a chosen order,
 * time the first access to each backing page (which blocks in userfaultfd until
 * the destination places the page), then verify the page byte for byte against
 * the deterministic image of pattern.h. Runs with the GIL released. */
#ifndef MIGRATE_GUESTSIM_H
#define MIGRATE_GUESTSIM_H
#include <stdint.h>

/* cdef-begin */
#define MG_GUESTSIM_SEQ 0
#define MG_GUESTSIM_RANDOM 1
#define MG_GUESTSIM_HOTSET 2
#define MG_GUESTSIM_WORKINGSET 3

struct mg_guestsim_result {
    uint64_t pages_touched;  /* backing pages given a timed first access */
    uint64_t mismatches;     /* 4096-byte units that differ from the image */
    int64_t first_bad_unit;  /* lowest differing unit, -1 if none */
    double seconds;          /* wall time from starting the vCPUs to joining them */
};

/* Walks guest RAM [base, base + size), which holds units 0 .. size/4096 - 1 of the
 * image (seed, zero_ppm, random_ppm). base stays owned and mapped by the caller
 * for the whole call. page_size is the backing page size (4096 or 2097152); size
 * must be a multiple of it.
 *   pattern MG_GUESTSIM_SEQ: vcpus contiguous slices, each walked in order.
 *   MG_GUESTSIM_RANDOM: a seeded permutation of all pages dealt round-robin.
 *   MG_GUESTSIM_HOTSET: a seeded 20% of the pages is hot; each vCPU walks the hot
 *     pages of its contiguous slice three times in random order, then the rest
 *     of its slice in order.
 *   MG_GUESTSIM_WORKINGSET: a seeded 10% of the pages is the working set; each
 *     vCPU walks the working-set pages of its slice three times, each time in
 *     a new seeded random order, and after each touch computes over the page
 *     (a fixed number of multiply rounds over its words). Other pages are never
 *     touched and their lat_ns entries are left as they were. The first pass's
 *     order is the same on every run with the same seed.
 * lat_ns (size / page_size entries, owned by the caller, or NULL): entry i = ns
 * the first 8-byte load of page i took, saturating at 4294967295. The call
 * blocks until every page is touched: a fault that is never resolved hangs it.
 * Returns 0, -EINVAL for bad arguments, -ENOMEM, or -errno of pthread_create
 * (after joining the vCPUs already started). */
int mg_guestsim_run(uint8_t *base, uint64_t size, uint64_t page_size, uint64_t seed,
                    uint32_t zero_ppm, uint32_t random_ppm, int pattern, int vcpus,
                    uint32_t *lat_ns, struct mg_guestsim_result *res);
/* cdef-end */

#endif
