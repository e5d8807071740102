#define _GNU_SOURCE
#include "dest_alloc.h"
#include "bitmap.h"
#include "mem.h"
#include "wire.h"

#include <errno.h>

static int alloc_failed(struct mg_alloc *a, int rc, uint64_t page)
{
    int none = 0;
    if (__atomic_compare_exchange_n(&a->error, &none, rc, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        a->error_page = page;
    __atomic_store_n(&a->stop, 1, __ATOMIC_RELEASE);
    return rc;
}

int mg_alloc_run(struct mg_space *s, struct mg_alloc *a)
{
    uint64_t ps = s->page_size, chunk = a->chunk_pages ? a->chunk_pages : 1;
    for (;;) {
        if (__atomic_load_n(&a->stop, __ATOMIC_ACQUIRE))
            return -ESHUTDOWN;
        uint64_t first = __atomic_fetch_add(&a->next, 1, __ATOMIC_ACQ_REL) * chunk;
        if (first >= s->npages)
            return 0;
        uint64_t end = first + chunk < s->npages ? first + chunk : s->npages;
        /* a vCPU waiting for its page comes first (2 CPUs: the allocation
         * would take one from the demand receiver) */
        hold_while(hold_flag, &s->demand_waiting);
        uint64_t p = first;
        while (p < end) {
            /* runs of pages neither claimed nor allocated: a claimed page is
             * its receiver's to allocate, and populating one a receiver
             * claims meanwhile only maps it (it never changes a byte) */
            while (p < end && (test_bit(s->claimed, p) || test_bit(s->allocated, p)))
                p++;
            if (p >= end)
                break;
            uint64_t q = p + 1;
            while (q < end && !test_bit(s->claimed, q) && !test_bit(s->allocated, q))
                q++;
            int rc = mg_madvise(s->alias_base + p * ps, (q - p) * ps, MG_MADV_POPULATE_WRITE);
            if (rc < 0)
                return alloc_failed(a, rc, p);
            /* allocated only once populated: a receiver that reads the bit
             * writes through the alias without allocating first */
            bitmap_set_range(s->allocated, p, q - p);
            __atomic_fetch_add(&a->pages, q - p, __ATOMIC_RELAXED);
            p = q;
        }
    }
}
