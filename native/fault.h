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
#define MG_VIA_PUSH 0
#define MG_VIA_DEMAND 1
#define MG_INFLIGHT 8192
#define MG_LAT_RING 1048576
#define MG_DEMAND_COMPLETE 1
/* Pages larger than this take long enough on the wire that the background push
 * steps aside while a demand reply for one is in flight (on both sides). */
#define MG_YIELD_PAGE_SIZE 65536
/* ... but never for longer than this at a time (a reply that never comes must
 * not stop the push). */
#define MG_YIELD_MAX_US 5000
/* ... and the demand receiver polls for a large reply this long before it
 * sleeps. */
#define MG_SPIN_US 300

/* Demand reply flags. A sparse reply (pages larger than a block, when the
 * destination offered sparse replies) leaves out the page's all-zero blocks:
 * its length bytes are a block bitmap (page_size / MG_BLOCK bits, bit i LSB
 * first: block i is zero and has no bytes) and then the non-zero blocks. */
#define MG_REPLY_ZERO 1
#define MG_REPLY_SPARSE 2
#define MG_BLOCK 4096
/* What was wrong with a refused demand reply (mg_space.error_kind). */
#define MG_BAD_PAGE 1       /* page outside the layout */
#define MG_BAD_FLAGS 2      /* unknown flags, or sparse where it cannot be */
#define MG_BAD_LENGTH 3     /* length does not match the flags (and bitmap) */

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
    const uint8_t *zero_page; /* page_size zero bytes (COPY mode's source for zero pages) */
    int ram_fd;             /* the RAM file, for pwritev on shmem when not prepared (-1: the alias) */
    int prepared;           /* every page is allocated and the alias is mapped: write through it */
    int zero_fresh;         /* pages never claimed read as zero: a zero page needs no write */
    uint32_t demand_waiting; /* demand requests in the inflight table (atomic) */
    int finished;           /* set once every page is mapped, before the range is unregistered */
    uint64_t block_size;    /* demand replies may be sparse in blocks of this size (0: never) */
    uint64_t error_page;    /* what a failed call was looking at */
    uint64_t error_value;
    int error_kind;         /* MG_BAD_* for a refused demand reply */
    int nregions;
    struct mg_region regions[16];
    struct mg_fault_stats stats;
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

/* Writes a request for every page requested but not received (after a source
 * reconnects). Returns how many, or -errno. */
int64_t mg_demand_resend(struct mg_space *s);
/* When the oldest demand request still unanswered was made (CLOCK_MONOTONIC
 * ns; 0: none waiting). */
uint64_t mg_oldest_request_ns(struct mg_space *s);

/* Reads demand replies from fd until EOF: a 16-byte header (u64 page, u32
 * flags: MG_REPLY_ZERO, MG_REPLY_SPARSE; u32 length) then length bytes, which
 * land straight in the alias mapping once the page is claimed (a sparse
 * reply's zero blocks are zeroed there unless the page is fresh). Each page is mapped (and its
 * waiters woken) as soon as it is placed. Returns MG_DEMAND_COMPLETE when every
 * page has been received, 0 on EOF, -ESHUTDOWN on stop_fd, -EPROTO for a reply
 * that breaks the protocol (error_page/error_value say what), -errno. scratch
 * holds page_size bytes for duplicates and COPY mode. */
int mg_demand_receive(struct mg_space *s, int fd, int stop_fd, uint8_t *scratch);

/* Source side of the demand channel: answers requests (u64 page) with replies,
 * straight from the read-only RAM mapping (sparse when block_size is set, the
 * page is larger and some but not all of its blocks are zero). Marks each page in sent (atomic),
 * and publishes the last demanded page for the push scheduler's locality. */
struct mg_demand_src {
    int fd;
    uint64_t base;          /* the RAM file's read-only mapping */
    uint64_t page_size;
    uint64_t npages;
    uint64_t *sent;         /* the push scheduler's bitmap */
    uint64_t last_page;     /* written atomically; read by the scheduler */
    uint64_t seq;           /* bumps with every request served */
    uint64_t bytes;         /* payload bytes sent */
    uint64_t zero;          /* zero pages answered with a flag */
    uint64_t bad_page;      /* an out-of-layout request, when -EPROTO */
    uint64_t readahead;     /* pages sent after a request because the faults look sequential */
    uint64_t window;        /* current readahead window (pages), grows on sequential faults */
    uint64_t max_window;    /* at most this many pages read ahead (0: no readahead) */
    uint32_t busy;          /* a demand reply of a large page is being written (push holds back) */
    uint64_t block_size;    /* the destination takes sparse replies in blocks of this size (0: dense only) */
    uint64_t zero_blocks;   /* zero blocks left out of sparse replies */
    uint8_t *block_bits;    /* with block_size: each page's zero-block bitmap (page_size / block_size / 8
                             * bytes a page), filled ahead by mg_scan_blocks (NULL: none) */
    uint64_t *scanned;      /* pages whose block_bits are filled (atomic) */
    uint64_t prescanned;    /* sparse replies sent from a bitmap filled ahead */
    uint64_t push_zero_blocks; /* zero blocks left out of sparse push runs (atomic: every push stream adds) */
    uint64_t *holes;        /* pages wholly in holes of the RAM file, found once it no longer changes: they
                             * read as zero and go as zero pages without being read (NULL: none) */
    uint64_t holes_end;     /* holes' bits are final for the pages below this (atomic: mg_find_holes
                             * advances it as it walks the file) */
    uint64_t hole_pages;    /* pages sent as zero because they were holes (atomic: every stream adds) */
};
/* Fills the zero-block bitmaps of pages [first, first+count) ahead of their
 * demand (finding a 2 MiB page's zero blocks means reading them: ~50 us that a
 * waiting vCPU would otherwise wait). Only for RAM that no longer changes. */
void mg_scan_blocks(struct mg_demand_src *d, uint64_t first, uint64_t count);
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
/* Returns 0 when the destination closed the channel, -ESHUTDOWN on stop_fd,
 * -EPROTO for a request outside the layout, -errno. */
int mg_demand_serve(struct mg_demand_src *d, int stop_fd);

/* The raw push channel (background pages over plain TCP, no compression: on
 * a fast link the copy is cheaper than zstd). A run is a 16-byte header
 * (u64 first page, u32 count <= MG_PUSH_MAX_RUN, u32 flags = 0), a zero bitmap
 * of (count+7)/8 bytes (bit i LSB first: page first+i is zero, no data), then
 * the non-zero pages' bytes in order. */
#define MG_PUSH_MAX_RUN 1024
/* Run flag (only when the destination offered sparse pages): each non-zero
 * page comes as its block bitmap (as in a sparse demand reply) and then its
 * non-zero blocks. */
#define MG_RUN_SPARSE 1

/* Source: sends nruns runs of consecutive pages (runs[2i] first page,
 * runs[2i+1] count; longer runs are split at MG_PUSH_MAX_RUN) of the mapping
 * at base, straight from the mapping (writev, no gather copy), at most 256 KiB
 * per syscall. hold: the demand server's busy flag; with pages larger than
 * MG_YIELD_PAGE_SIZE each syscall first waits (at most MG_YIELD_MAX_US) while
 * it is set (NULL: never waits). sparse: the demand server's struct when
 * the destination takes sparse pages (its block bitmaps, filled ahead, are
 * used; NULL or block_size 0: whole pages); its hole map, when set, says which
 * pages to send as zero without reading them. Returns payload bytes sent (zero
 * pages and blocks excluded) or -errno. */
int64_t mg_push_runs(int fd, uint64_t base, uint64_t page_size, const uint64_t *runs, uint64_t nruns,
                     const uint32_t *hold, struct mg_demand_src *sparse);

/* Destination: reads runs until EOF and places them: each non-zero page is
 * received straight into the alias mapping when this call claims it (into
 * scratch when it is a duplicate), zero pages are zeroed, then the run is
 * mapped with one CONTINUE. Returns MG_DEMAND_COMPLETE when every page has
 * been received, 0 on EOF, -ESHUTDOWN, -EPROTO (error_kind MG_BAD_PAGE:
 * error_page = first page, error_value = count; MG_BAD_FLAGS: error_value =
 * flags), -errno. scratch holds page_size bytes. */
int mg_push_receive(struct mg_space *s, int fd, int stop_fd, uint8_t *scratch);
/* cdef-end */

#endif
