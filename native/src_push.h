/* The source's end of the raw push channels: it sends runs of background
 * pages, one thread per channel, as the Python scheduler hands them out. */
#ifndef MIGRATE_SRC_PUSH_H
#define MIGRATE_SRC_PUSH_H
#include <stdint.h>
#include "src_ram.h"

/* cdef-begin */
/* Below this share of a run's page bytes (in percent) a zstd frame is sent;
 * at or above it the run goes raw (incompressible: random or encrypted pages
 * cost the destination a decompression for almost nothing). */
#define MG_ZSTD_KEEP_PCT 90
/* Runs with more non-zero page bytes than this go raw (the buffers a stream
 * keeps stay bounded: a 4 KiB-page run is at most 4 MiB). */
#define MG_ZSTD_MAX_RUN_BYTES 8388608   /* 8 MiB */

/* One push stream's zstd state and what its calls did (the counters only
 * grow). Python's policy (migrate.source.compress) sets compress before each
 * call; everything else is C's. */
struct mg_push_stream {
    int compress;                   /* this call compresses its runs (raw when libzstd is not loaded) */
    int level;                      /* zstd level: negative are zstd's fast levels */
    uint64_t page_bytes;            /* non-zero page bytes sent (a large page's zero blocks included) */
    uint64_t wire_bytes;            /* the payload bytes they took on the wire (frames, or the bytes raw) */
    uint64_t zstd_in;               /* page bytes compressed, whether their frame was sent or not */
    uint64_t zstd_out;              /* the frames' bytes */
    uint64_t zstd_ns;               /* time spent compressing (CLOCK_MONOTONIC) */
    uint64_t runs;                  /* runs sent */
    uint64_t runs_zstd;             /* of them as a zstd frame */
    uint64_t runs_incompressible;   /* compressed, then sent raw (frame >= MG_ZSTD_KEEP_PCT%) */
    void *cctx;                     /* the reused ZSTD_CCtx (created at the first compressed run) */
    uint8_t *gather;                /* a run's non-zero pages, when they are not contiguous */
    uint8_t *frame;                 /* the frame being sent */
    uint64_t frame_cap;
};
/* NULL: out of memory. Owned by the caller until mg_push_stream_free. */
struct mg_push_stream *mg_push_stream_new(int level);
void mg_push_stream_free(struct mg_push_stream *st);

/* Sends nruns runs of consecutive pages of ram (runs[2i] first page,
 * runs[2i+1] count; longer runs are split at MG_PUSH_MAX_RUN; frames:
 * wire.h) straight from the mapping (writev, no gather copy), at most 256 KiB
 * per syscall. Pages in ram's holes go as zero without being read; large
 * pages go sparse when ram->block_size is set (its block bitmaps, filled
 * ahead, are used). With st->compress, each run's non-zero pages go as one
 * zstd frame (MG_RUN_ZSTD) unless the frame is not smaller than
 * MG_ZSTD_KEEP_PCT% of them. hold: the demand server's busy flag; with pages
 * larger than MG_YIELD_PAGE_SIZE each syscall first waits (at most
 * MG_YIELD_MAX_US) while it is set (NULL: never waits). fd and st are
 * borrowed for the call. Returns payload bytes sent (zero pages and blocks
 * excluded, before compression) or -errno. */
int64_t mg_push_runs(int fd, struct mg_src_ram *ram, const uint64_t *runs, uint64_t nruns, const uint32_t *hold,
                     struct mg_push_stream *st);
/* cdef-end */

#endif
