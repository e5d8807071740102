/* The destination's guest page space: which page is where, the page bitmaps,
 * claiming and placing pages (the one decision of how, place_target), mapping
 * them into the guest, and the fault loop with its demand requests. This is
 * the one C that holds more than wrappers, because it runs with the GIL
 * released on every fault; the two receivers (dest_demand, dest_push) place
 * through it. */
#ifndef MIGRATE_DEST_SPACE_H
#define MIGRATE_DEST_SPACE_H
#include <stdint.h>
#include "bitmap.h"

/* cdef-begin */
#define MG_MAX_REGIONS 16
#define MG_PLACE_CONTINUE 0
#define MG_PLACE_COPY 1
#define MG_VIA_PUSH 0
#define MG_VIA_DEMAND 1
#define MG_INFLIGHT 8192
#define MG_LAT_RING 1048576
/* Guest threads whose blocked time is kept apart (one per vCPU; a guest with
 * more faulting threads has the rest counted in threads_untracked). */
#define MG_MAX_THREADS 64
/* A receiver's result when every page has been received. */
#define MG_DEMAND_COMPLETE 1
/* What was wrong with a refused demand reply or push run (mg_space.error_kind). */
#define MG_BAD_PAGE 1       /* page outside the layout */
#define MG_BAD_FLAGS 2      /* unknown flags, or sparse where it cannot be */
#define MG_BAD_LENGTH 3     /* length does not match the flags (and bitmap) */
/* A page's memory could not be allocated in the RAM file (the backing is
 * full): error_page is the first page of the range, error_value its count. */
#define MG_ALLOC_FAILED 4
/* A push run's zstd frame was refused before any of its pages was received:
 * error_value says why (MG_FRAME_*), error_detail what it had. */
#define MG_BAD_FRAME 5
#define MG_FRAME_LENGTH 1    /* its length is 0 or more than the run's non-zero page bytes (detail: length) */
#define MG_FRAME_SIZE 2      /* it states another size or none (detail: what it states, or all ones) */
#define MG_FRAME_SHORT 3     /* it decompressed to fewer bytes (detail: how many) */
#define MG_FRAME_LONG 4      /* it decompressed to more bytes, or bytes follow its end (detail: its bytes
                              * out when it was cut off) */
#define MG_FRAME_CORRUPT 5   /* zstd refused it (detail: zstd's error code, mg_zstd_error_name; a window
                              * over 1 << MG_ZSTD_WINDOW_LOG is one) */

struct mg_region {
    uint64_t guest_addr;   /* host virtual address in the guest process */
    uint64_t first_page;   /* file offset / page_size */
    uint64_t npages;
};

struct mg_fault_stats {
    uint64_t faults;        /* page-fault events read */
    uint64_t minor;         /* of which MINOR (page in cache, not mapped) */
    uint64_t fast;          /* answered at once: page was already received */
    uint64_t requested;     /* faults on pages not received yet */
    uint64_t requests_sent; /* demand requests written to the source */
    uint64_t outside;       /* address outside every region (counted, not served) */
    uint64_t eexist;        /* CONTINUE found the page mapped: woken instead */
    uint64_t mapped_pages;  /* pages mapped by mg_map_pages */
    uint64_t map_calls;     /* UFFDIO_CONTINUE/COPY ioctls issued */
    uint64_t received;      /* pages placed, all ways */
    uint64_t placed_demand; /* non-zero pages placed from demand replies */
    uint64_t placed_push;   /* non-zero pages placed from background batches */
    uint64_t placed_zero;   /* zero pages placed (either way) */
    uint64_t duplicates;    /* pages dropped because already placed */
    uint64_t lat_count;     /* demand latencies recorded in lat_us (ring) */
    uint64_t placed_prior;  /* found mapped in the guest at attach (placed by an earlier agent) */
};

/* One guest thread that faulted on a page the source had to send, from the
 * fault event's thread id (UFFD_FEATURE_THREAD_ID). It is blocked from the
 * fault until the page is received; only the fault loop adds entries, the
 * receivers end waits. */
struct mg_thread_block {
    uint64_t tid;           /* the faulting thread's id, as the kernel gives it */
    uint64_t wait_page;     /* the page it waits for; UINT64_MAX: not waiting */
    uint64_t wait_since_ns; /* CLOCK_MONOTONIC ns of that fault */
    uint64_t blocked_ns;    /* waits that ended, summed */
    uint64_t faults;        /* its faults on pages not received yet */
};

/* A demand request in flight: when it was asked for (CLOCK_MONOTONIC ns). */
struct mg_inflight {
    uint64_t page;          /* UINT64_MAX: free slot */
    uint64_t t_ns;
};

/* The guest page space. The uffd, the alias mapping and every array here belong
 * to the Python FaultSpace object and outlive every call that uses this struct. */
struct mg_space {
    int uffd;
    int mode;               /* MG_PLACE_CONTINUE or MG_PLACE_COPY */
    uint64_t page_size;
    uint64_t npages;
    uint64_t alias_base;    /* agent's mapping of the RAM file at offset 0 (0 in COPY mode) */
    uint64_t *received;
    uint64_t *mapped;
    uint64_t *claimed;      /* placement claims a page before writing it */
    uint64_t *requested;    /* asked of the source (cleared never: resend filters on received) */
    int demand_fd;          /* socket to the source's demand server, -1 when none */
    struct mg_inflight *inflight;   /* MG_INFLIGHT slots */
    uint32_t *lat_us;       /* MG_LAT_RING demand latencies, microseconds */
    struct mg_thread_block *threads; /* MG_MAX_THREADS entries, NULL: not kept */
    uint32_t nthreads;      /* entries in use (atomic; only the fault loop adds) */
    uint64_t threads_untracked; /* demand faults of threads past MG_MAX_THREADS */
    const uint8_t *zero_page; /* page_size zero bytes (COPY mode's source for zero pages) */
    int ram_fd;             /* the RAM file: pwritev on shmem, fallocate (-1: neither) */
    uint64_t *allocated;    /* in the RAM file's page cache: populated by the background allocation
                             * or fallocated by a receiver before it writes through the alias */
    int zero_fresh;         /* the file held no page at attach: an allocated page nobody wrote reads as
                             * zero, so a zero page or block needs no write */
    uint32_t demand_waiting; /* demand requests in the inflight table (atomic) */
    int finished;           /* set once every page is mapped, before the range is unregistered */
    uint64_t block_size;    /* demand replies may be sparse in blocks of this size (0: never) */
    int zstd_runs;          /* push runs may come as zstd frames (the Welcome offered them) */
    uint64_t error_page;    /* what a failed call was looking at */
    uint64_t error_value;
    int error_kind;         /* MG_BAD_* for a refused demand reply */
    uint64_t error_detail;  /* MG_BAD_FRAME: what the frame had */
    int nregions;
    struct mg_region regions[16];
    struct mg_fault_stats stats;
    /* dest --record-hints: the guest's first touch of each page, in order.
     * touched (a bitmap) is NULL when not recording; touch_log holds npages
     * entries, so each page is logged at most once. Written only by the
     * fault loop's thread; read after it stops. */
    uint64_t *touched;
    uint64_t *touch_log;
    uint64_t touch_count;
};

/* Records pages [first, first+count) as placed and mapped by an earlier agent
 * (they are mapped in the guest: never written again). Returns how many of
 * them were not recorded yet. */
uint64_t mg_mark_prior(struct mg_space *s, uint64_t first, uint64_t count);

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

/* Places n pages from a batch: pages[i] is a zero page if bit i of zero_bits
 * (LSB first) is set, else its bytes are the next page_size bytes of data
 * (data_len must be exactly that many). A page already claimed is dropped
 * (invariant 2). CONTINUE mode writes through the alias, then records
 * received; COPY mode places with UFFDIO_COPY (or ZEROPAGE) directly and
 * records received and mapped. via: MG_VIA_PUSH or MG_VIA_DEMAND, for the
 * counters. Returns pages placed or -errno (*bad_page). Pages must have been
 * checked against npages by the caller. */
int64_t mg_place_batch(struct mg_space *s, const uint64_t *pages, uint64_t n,
                       const uint8_t *zero_bits, const uint8_t *data, uint64_t data_len,
                       int via, uint64_t *bad_page);

/* Serves faults. A fault on a received page is mapped at once (the fast path).
 * A fault on any other page is requested once from the source over demand_fd
 * (if connected) and also returned in need[] when max > 0. Returns the count
 * of needed pages (> 0), 0 on timeout, -ESHUTDOWN when stop_fd became
 * readable, -errno on failure. With max == 0 it returns only on stop, timeout
 * or failure. */
int mg_fault_serve(struct mg_space *s, int stop_fd, uint64_t *need, int max, int timeout_ms);

/* CLOCK_MONOTONIC now, in ns (what wait_since_ns is measured on). */
uint64_t mg_now_ns(void);

/* Writes a request for every page requested but not received (after a source
 * reconnects). Returns how many, or -errno. */
int64_t mg_demand_resend(struct mg_space *s);
/* When the oldest demand request still unanswered was made (CLOCK_MONOTONIC
 * ns; 0: none waiting). */
uint64_t mg_oldest_request_ns(struct mg_space *s);
/* Maps what placement just wrote of pages [first, first+count), as
 * mg_map_pages. While dest --record-hints records, only the pages the guest
 * already faulted on (it waits for them): the others stay placed but
 * unmapped, so the guest's first touch of each still faults (the fast path
 * maps it) and is logged. Mapped at once, a pushed page's touch would go
 * unseen and the hint file would hold only the pages the push had not
 * reached yet. (COPY maps as it places: there it logs demand only.) */
int64_t mg_map_placed(struct mg_space *s, uint64_t first, uint64_t count, uint64_t *bad_page);
/* cdef-end */

/* ---- for the receivers (dest_demand, dest_push) ---- */

/* Counters are bumped from the fault loop and from placement at once. */
#define STAT_ADD(s, field, n) __atomic_fetch_add(&(s)->stats.field, (n), __ATOMIC_RELAXED)

/* Which receiver places: one page at a time into the alias or a page of its
 * own (the demand receiver, a gRPC batch), or a run at a time, which may be
 * staged whole and written into the RAM file (the push receiver). */
enum placer {
    PLACER_PAGE,
    PLACER_RUN,
};

/* How a receiver places the pages it claims, decided by place_target from
 * the placement mode matrix: the mode (CONTINUE or COPY), whether the pages
 * are allocated already (and the file was fresh), its page size, and the
 * receiver (once per receiver, or once per run for the push). */
struct place_target {
    struct mg_space *s;
    int copy;       /* UFFDIO_COPY (or ZEROPAGE) places and maps each page in one step (COPY mode) */
    int staged;     /* the bytes land in the receiver's own memory (scratch, a staging run, a batch),
                     * not in the alias: COPY mode, or via_write */
    int via_write;  /* staged pages reach the RAM file by pwritev, then CONTINUE maps them */
    int zero_skip;  /* zero pages and zero blocks landing in the alias need no write (a fresh file's
                     * page reads zero once ensure_allocated made it); staged zero blocks are always
                     * written */
};

/* allocated: every page the target is for is allocated already (a push run
 * on shmem whose pages are not is staged and written with pwritev). */
struct place_target place_target(struct mg_space *s, enum placer who, int allocated);

/* Before a receiver writes through the alias into pages [first, first+count):
 * allocates those not allocated yet (write-populating the alias), so that a backing too small
 * fails here with -errno (error_kind MG_ALLOC_FAILED) rather than with SIGBUS
 * in the write. 0 or -errno. */
int ensure_allocated(struct mg_space *s, uint64_t first, uint64_t count);

/* Claims page for this receiver: 1 = it is ours to write, 0 = it was claimed
 * already (a duplicate, counted; its bytes are read and dropped). */
static inline int claim(struct mg_space *s, uint64_t page)
{
    if (test_and_set_bit(s->claimed, page)) {
        STAT_ADD(s, duplicates, 1);
        return 0;
    }
    return 1;
}

/* Gives back a claimed page whose bytes did not all arrive, so that a later
 * copy places it. The page was allocated (ensure_allocated) before a byte
 * of it was written through the alias. */
void unclaim(const struct place_target *t, uint64_t page);

/* The claimed page's bytes are where t puts them (src: the receiver's copy,
 * for COPY mode): makes it received (and, COPY mode, mapped). zero: a zero
 * page, no bytes. via: MG_VIA_*, for the counters. 0 or -errno. */
int finish_place(const struct place_target *t, uint64_t page, const uint8_t *src, int zero, int via);

/* Refuses a reply or run that breaks the protocol: says what in the space's
 * error fields. Returns -EPROTO. */
int refuse(struct mg_space *s, int kind, uint64_t page, uint64_t value);

/* The page's bytes in the alias mapping (CONTINUE mode). */
static inline uint8_t *alias_of(const struct mg_space *s, uint64_t page)
{
    return (uint8_t *)(uintptr_t)(s->alias_base + page * s->page_size);
}

/* Every page is received: the receivers stop. */
static inline int all_received(struct mg_space *s)
{
    return __atomic_load_n(&s->stats.received, __ATOMIC_ACQUIRE) == s->npages;
}

#endif
