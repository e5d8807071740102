/* The wire between the agents: the frames of the two raw channels (demand and
 * push), the iovec helpers that build and consume them, and THE one read and
 * write path every socket read and write of both channels on both sides goes
 * through (wire.c), so that a transport layer (TLS) plugs into one place.
 *
 * Demand channel (one TCP connection, both directions):
 *   destination -> source: u64 page, one per request (8 bytes, native endian).
 *   source -> destination: a reply per page, struct reply_header (u64 page,
 *     u32 flags: MG_REPLY_ZERO, MG_REPLY_SPARSE; u32 length) then length bytes:
 *     page_size bytes, none for a zero page, or (sparse) the page's block
 *     bitmap then its non-zero blocks.
 * Push channel (one TCP connection per stream, source -> destination): runs,
 *   struct run_header (u64 first page, u32 count <= MG_PUSH_MAX_RUN, u32 flags:
 *   0 or MG_RUN_SPARSE), a zero bitmap of (count+7)/8 bytes (bit i LSB first:
 *   page first+i is zero, no data), then the non-zero pages' bytes in order (or,
 *   sparse, each non-zero page's block bitmap and then its non-zero blocks),
 *   or (MG_RUN_ZSTD) a u64 frame length and one zstd frame that decompresses
 *   to exactly the non-zero pages' bytes, in order.
 * A block bitmap: page_size / MG_BLOCK bits, bit i LSB first set when block i
 *   is all zero and has no bytes on the wire. */
#ifndef MIGRATE_WIRE_H
#define MIGRATE_WIRE_H
#include <stdint.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <time.h>

/* cdef-begin */
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
 * its length bytes are a block bitmap and then the non-zero blocks. */
#define MG_REPLY_ZERO 1
#define MG_REPLY_SPARSE 2
#define MG_BLOCK 4096

/* The raw push channel: background pages over plain TCP, compressed only when
 * the link is slower than zstd (migrate.source.compress decides). At most
 * this many pages a run. */
#define MG_PUSH_MAX_RUN 1024
/* Run flag (only when the destination offered sparse pages): each non-zero
 * page comes as its block bitmap (as in a sparse demand reply) and then its
 * non-zero blocks. */
#define MG_RUN_SPARSE 1
/* Run flag (only when the destination offered zstd push runs, never with
 * MG_RUN_SPARSE): the non-zero pages come as a u64 length and a zstd frame of
 * that many bytes, whose stated and actual size are the non-zero pages' bytes
 * and whose window is at most 1 << MG_ZSTD_WINDOW_LOG (zstd.h). */
#define MG_RUN_ZSTD 2
/* cdef-end */

/* ---- frames ---- */

struct reply_header {
    uint64_t page;
    uint32_t flags;
    uint32_t length;
};

struct run_header {
    uint64_t first;
    uint32_t count;
    uint32_t flags;
};

/* CLOCK_MONOTONIC ns: the hold and spin deadlines, and demand latencies. */
static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- iovecs ---- */

/* Appends [p, p+len) to an iovec array, growing its last entry when p follows
 * it. Entries before `keep` are never grown (a header that must stay apart). */
static inline void iov_append(struct iovec *iov, int *niov, int keep, void *p, size_t len)
{
    if (*niov > keep && (uint8_t *)iov[*niov - 1].iov_base + iov[*niov - 1].iov_len == p) {
        iov[*niov - 1].iov_len += len;
        return;
    }
    iov[*niov].iov_base = p;
    iov[*niov].iov_len = len;
    (*niov)++;
}

/* Drops n bytes done from the front of an iovec array. */
static inline void iov_advance(struct iovec **iov, int *niov, size_t n)
{
    while (*niov > 0 && n >= (*iov)->iov_len) {
        n -= (*iov)->iov_len;
        (*iov)++;
        (*niov)--;
    }
    if (*niov > 0 && n) {
        (*iov)->iov_base = (uint8_t *)(*iov)->iov_base + n;
        (*iov)->iov_len -= n;
    }
}

/* ---- sparse pages: a large page's all-zero blocks stay off the wire ---- */

/* Bits set in n bytes of a bitmap. */
static inline uint64_t bits_set(const uint8_t *bits, uint64_t n)
{
    uint64_t k = 0;
    for (uint64_t i = 0; i < n; i++)
        k += (uint64_t)__builtin_popcount(bits[i]);
    return k;
}

/* Appends an iovec per run of non-zero blocks of the page at p (bits: its
 * block bitmap, bit b set when block b is zero; nb blocks of bs bytes) after
 * the first `keep` entries. */
static inline void block_iov(uint8_t *p, const uint8_t *bits, uint64_t nb, uint64_t bs, struct iovec *iov,
                             int *niov, int keep)
{
    for (uint64_t b = 0; b < nb; b++)
        if (!((bits[b >> 3] >> (b & 7)) & 1))
            iov_append(iov, niov, keep, p + b * bs, bs);
}

/* Room for one large page's block bitmap and its iovecs: one per run of
 * non-zero blocks, plus up to three more (a header, a bitmap). */
struct sparse_buf {
    uint8_t *bits;
    struct iovec *iov;
};

/* 0, or -ENOMEM (free what was allocated with sparse_free either way). */
int sparse_alloc(struct sparse_buf *b, uint64_t nblocks);
void sparse_free(struct sparse_buf *b);

/* ---- the one read and write path ---- */

/* The push moves at most this much per syscall (and checks its hold in
 * between): on a kernel without preemption a multi-megabyte send or receive
 * keeps the CPU from a waking demand thread until it returns. */
#define MG_HOLD_CHUNK (256u << 10)

/* The background push steps aside while hold(ctx) says so (a large demand
 * reply is on the way), for at most MG_YIELD_MAX_US at a time. */
typedef int (*hold_fn)(const void *ctx);
void hold_while(hold_fn hold, const void *ctx);
/* A hold_fn: ctx is a uint32_t flag, set while the push should step aside. */
int hold_flag(const void *flag);

struct mg_tls;

/* One end of a channel, as one transfer uses it. A thread that owns fd keeps
 * it open for the whole call; nothing here closes it. */
struct wire_end {
    int fd;
    struct mg_tls *tls;     /* the channel's TLS session (tls.h: the loop took it with mg_tls_get for
                             * the whole call), or NULL: plaintext */
    int stop_fd;            /* reads: readable means stop waiting (-ESHUTDOWN); -1: none */
    int chunked;            /* at most MG_HOLD_CHUNK bytes and 64 iovecs per syscall, asking hold before
                             * each (the push: it shares the CPU with the demand path) */
    hold_fn hold;           /* with chunked: step aside while hold(hold_ctx) says so (NULL: never) */
    const void *hold_ctx;
    const uint32_t *spin;   /* reads: while *spin is set, wait for data by polling for up to MG_SPIN_US
                             * before sleeping (a sleeping thread on this VM wakes 30-40 us late, several
                             * times per large reply). NULL: never */
};

/* Reads into an iovec array until all of it is filled. The start of a frame:
 * 1 = done; 0 = end of file before the first byte (the peer closed between
 * frames); -EPIPE = end of file part way; -ESHUTDOWN; -errno. */
int wire_readv(const struct wire_end *e, struct iovec *iov, int niov);
int wire_read(const struct wire_end *e, void *buf, uint64_t len);
/* The rest of a frame: end of file before its first byte is -EPIPE too.
 * 1 = done, or < 0. */
int wire_readv_rest(const struct wire_end *e, struct iovec *iov, int niov);
int wire_read_rest(const struct wire_end *e, void *buf, uint64_t len);
/* Reads what has arrived, at most len bytes, waiting for the first: the count
 * (> 0), 0 on end of file, -ESHUTDOWN, -errno. */
int64_t wire_read_some(const struct wire_end *e, void *buf, uint64_t len);
/* Writes the whole iovec array: 0, or -errno. */
int wire_writev(const struct wire_end *e, struct iovec *iov, int niov);
/* One send of a few bytes (a demand request) that is never split: concurrent
 * writers of whole small messages do not interleave on a stream socket (over
 * TLS: one record, the writers take turns). 1 when all of it was sent, 0 when
 * not (the caller resends it later). */
int wire_send_small(int fd, const void *buf, uint64_t len);

#endif
