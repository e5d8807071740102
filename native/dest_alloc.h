/* The destination's background allocation of the guest's RAM file: after
 * the attach is acked, threads allocate every page no receiver has claimed
 * yet, a chunk at a time, by write-populating the alias (what QEMU's
 * prealloc=on does, but off the guest's path), and a receiver that writes
 * through the alias first allocates what is not allocated yet, so that a
 * backing too small fails that write with an errno instead of SIGBUS. */
#ifndef MIGRATE_DEST_ALLOC_H
#define MIGRATE_DEST_ALLOC_H
#include <stdint.h>
#include "dest_space.h"

/* cdef-begin */
/* One allocation of a space's RAM file, shared by the threads that run it.
 * Owned by the Python object that starts the threads; it outlives them. */
struct mg_alloc {
    uint64_t chunk_pages;   /* pages a thread takes at a time */
    uint64_t next;          /* the next chunk to take (atomic) */
    uint64_t pages;         /* pages this allocation populated (atomic) */
    int stop;               /* set (atomic): each thread returns before its next chunk */
    int error;              /* the first failure's -errno (0: none) */
    uint64_t error_page;    /* where it failed */
};

/* Allocates chunks of the space's RAM file until none is left (0), stop is
 * set (-ESHUTDOWN) or populating fails (-errno, recorded in a->error and
 * a->error_page if it is the first; every thread then stops). Pages claimed
 * by a receiver are skipped: their receiver allocates them. Each chunk
 * waits first (at most MG_YIELD_MAX_US) while a vCPU waits for a demanded
 * page. Runs without the GIL; any number of threads may share a. */
int mg_alloc_run(struct mg_space *s, struct mg_alloc *a);
/* cdef-end */

#endif
