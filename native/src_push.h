/* The source's end of the raw push channels: it sends runs of background
 * pages, one thread per channel, as the Python scheduler hands them out. */
#ifndef MIGRATE_SRC_PUSH_H
#define MIGRATE_SRC_PUSH_H
#include <stdint.h>
#include "src_ram.h"

/* cdef-begin */
/* Sends nruns runs of consecutive pages of ram (runs[2i] first page,
 * runs[2i+1] count; longer runs are split at MG_PUSH_MAX_RUN; frames:
 * wire.h) straight from the mapping (writev, no gather copy), at most 256 KiB
 * per syscall. Pages in ram's holes go as zero without being read; large
 * pages go sparse when ram->block_size is set (its block bitmaps, filled
 * ahead, are used). hold: the demand server's busy flag; with pages larger
 * than MG_YIELD_PAGE_SIZE each syscall first waits (at most MG_YIELD_MAX_US)
 * while it is set (NULL: never waits). fd is borrowed for the call. Returns
 * payload bytes sent (zero pages and blocks excluded) or -errno. */
int64_t mg_push_runs(int fd, struct mg_src_ram *ram, const uint64_t *runs, uint64_t nruns, const uint32_t *hold);
/* cdef-end */

#endif
