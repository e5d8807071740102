#define _GNU_SOURCE
#include "dest_push.h"
#include "dest_demand.h"
#include "bitmap.h"
#include "tls.h"
#include "wire.h"
#include "zstd.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

/* One run being received: its header, its zero bitmap, which of its pages
 * this receiver claimed, and where they land. */
struct run {
    struct run_header h;
    uint8_t bits[MG_PUSH_MAX_RUN / 8];   /* bit i: page first+i is zero */
    uint8_t mine[MG_PUSH_MAX_RUN];       /* 1: this receiver claimed page first+i */
    uint8_t *staging;                    /* MG_PUSH_MAX_RUN pages when a run may be staged, else NULL */
    uint8_t *scratch;                    /* one page: where a duplicate's bytes are read and dropped */
    struct place_target t;               /* how this run's pages are placed (place_target, per run) */
};

static inline int run_zero(const struct run *r, uint32_t i)
{
    return (r->bits[i >> 3] >> (i & 7)) & 1;
}

/* Where page i of a run lands: the alias (or staging) when this receiver
 * claimed it, else scratch (a duplicate, read and dropped). */
static inline uint8_t *run_dst(const struct run *r, uint32_t i)
{
    if (!r->mine[i])
        return r->scratch;
    return r->t.staged ? r->staging + (uint64_t)i * r->t.s->page_size : alias_of(r->t.s, r->h.first + i);
}

/* pwritev()s the claimed pages of a run into the RAM file: staged bytes for
 * non-zero pages, the zero page for zero pages; consecutive pages in one call. */
static int write_claimed(const struct run *r)
{
    const struct mg_space *s = r->t.s;
    uint64_t ps = s->page_size;
    struct iovec iov[IOV_MAX];
    uint32_t i = 0;
    while (i < r->h.count) {
        if (!r->mine[i]) {
            i++;
            continue;
        }
        uint32_t j = i;
        int niov = 0;
        while (j < r->h.count && r->mine[j] && niov < IOV_MAX) {
            iov[niov].iov_base = run_zero(r, j) ? (void *)s->zero_page : (void *)(r->staging + (uint64_t)j * ps);
            iov[niov].iov_len = ps;
            niov++;
            j++;
        }
        uint64_t off = (r->h.first + i) * ps, left = (uint64_t)niov * ps;
        struct iovec *v = iov;
        while (left) {
            ssize_t n = pwritev(s->ram_fd, v, niov, (off_t)off);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            off += (uint64_t)n;
            left -= (uint64_t)n;
            iov_advance(&v, &niov, (size_t)n);
        }
        i = j;
    }
    return 0;
}

/* A push receiver part way through a run holds back while a demand is
 * outstanding, unless a page it claimed in this run is one a vCPU waits for. */
static int run_should_hold(const void *ctx)
{
    const struct run *r = ctx;
    const struct mg_space *s = r->t.s;
    if (!__atomic_load_n(&s->demand_waiting, __ATOMIC_ACQUIRE))
        return 0;
    for (uint32_t i = 0; i < r->h.count; i++)
        if (r->mine[i] && test_bit(s->requested, r->h.first + i))
            return 0;
    return 1;
}

/* A sparse run's pages after its page bitmap: each non-zero page is its block
 * bitmap and then its non-zero blocks (read where run_dst says, zero blocks
 * zeroed there unless the page is fresh). blocks: room for the iovecs and one
 * block bitmap. e: the run's payload end. */
static int read_sparse_run(const struct wire_end *e, const struct run *r, struct sparse_buf *blocks)
{
    const struct mg_space *s = r->t.s;
    uint64_t nb = s->page_size / s->block_size;
    /* a block bitmap is read whole, the blocks as the run's payload */
    struct wire_end head = { .fd = e->fd, .tls = e->tls, .stop_fd = e->stop_fd };
    for (uint32_t i = 0; i < r->h.count; i++) {
        if (run_zero(r, i))
            continue;
        int rc = wire_read_rest(&head, blocks->bits, nb / 8);
        if (rc < 0)
            return rc;
        rc = read_sparse(e, s, run_dst(r, i), blocks->bits, blocks->iov, !r->mine[i] || r->t.zero_skip);
        if (rc < 0)
            return rc;
    }
    return 1;
}

/* A receiver's zstd state, made at its first compressed run. */
struct unzstd {
    ZSTD_DCtx *d;
    uint8_t *in;                  /* MG_ZSTD_IN bytes of the frame at a time */
    uint8_t spill[64];            /* where output past the run's pages goes, to be refused */
};
#define MG_ZSTD_IN (128u << 10)

static int unzstd_init(struct unzstd *z)
{
    if (z->d)
        return 0;
    if (!(z->in = malloc(MG_ZSTD_IN)) || !(z->d = Z.ZSTD_createDCtx()))
        return -ENOMEM;
    /* the bound that does not trust the frame: a larger window is an error,
     * before zstd allocates it */
    Z.ZSTD_DCtx_setParameter(z->d, ZSTD_d_windowLogMax, MG_ZSTD_WINDOW_LOG);
    return 0;
}

static void unzstd_free(struct unzstd *z)
{
    if (z->d)
        Z.ZSTD_freeDCtx(z->d);
    free(z->in);
}

static int frame_refuse(struct mg_space *s, const struct run *r, int why, uint64_t detail)
{
    s->error_detail = detail;
    return refuse(s, MG_BAD_FRAME, r->h.first, (uint64_t)why);
}

/* The index of the next non-zero page of a run from i, or count. */
static uint32_t next_data(const struct run *r, uint32_t i)
{
    while (i < r->h.count && run_zero(r, i))
        i++;
    return i;
}

/* A compressed run's frame, length bytes, decompressed page by page where
 * run_dst says (the alias, staging or scratch, as raw bytes would land).
 * Its stated size must be want (the non-zero pages' bytes) before anything
 * is decompressed, and it must end exactly there, at the end of its bytes.
 * 1, or < 0 (-EPROTO: refused, error_* say why). e: the run's payload end. */
static int read_zstd_run(const struct wire_end *e, const struct run *r, struct unzstd *z, uint64_t length,
                         uint64_t want)
{
    struct mg_space *s = r->t.s;
    uint64_t ps = s->page_size, left = length, done = 0;
    Z.ZSTD_DCtx_reset(z->d, ZSTD_reset_session_only);
    uint32_t i = next_data(r, 0);
    ZSTD_outBuffer out = { run_dst(r, i), ps, 0 };
    ZSTD_inBuffer in = { z->in, 0, 0 };
    for (;;) {
        if (in.pos == in.size && left) {
            uint64_t n = left < MG_ZSTD_IN ? left : MG_ZSTD_IN;
            int rc = wire_read_rest(e, z->in, n);
            if (rc < 0)
                return rc;
            if (left == length) {
                unsigned long long stated = Z.ZSTD_getFrameContentSize(z->in, n);
                if (stated != want)
                    return frame_refuse(s, r, MG_FRAME_SIZE, stated);
            }
            left -= n;
            in = (ZSTD_inBuffer){ z->in, n, 0 };
        }
        if (out.pos == out.size && out.dst != z->spill) {
            done += out.pos;
            i = next_data(r, i + 1);
            out = i < r->h.count ? (ZSTD_outBuffer){ run_dst(r, i), ps, 0 }
                                 : (ZSTD_outBuffer){ z->spill, sizeof(z->spill), 0 };
        }
        size_t in0 = in.pos, out0 = out.pos;
        size_t ret = Z.ZSTD_decompressStream(z->d, &out, &in);
        if (Z.ZSTD_isError(ret))
            return frame_refuse(s, r, MG_FRAME_CORRUPT, (uint64_t)Z.ZSTD_getErrorCode(ret));
        if (out.dst == z->spill && out.pos)
            return frame_refuse(s, r, MG_FRAME_LONG, want + out.pos);
        if (ret == 0) {
            /* the frame is complete */
            if (in.pos < in.size || left)
                return frame_refuse(s, r, MG_FRAME_LONG, done + out.pos);
            if (done + (out.dst == z->spill ? 0 : out.pos) < want)
                return frame_refuse(s, r, MG_FRAME_SHORT, done + out.pos);
            return 1;
        }
        if (in.pos == in0 && out.pos == out0 && in.pos == in.size && !left)
            /* all its bytes taken, no output left to give: cut short */
            return frame_refuse(s, r, MG_FRAME_SHORT, done + (out.dst == z->spill ? 0 : out.pos));
    }
}

/* Places the claimed pages of a run that arrived whole, then maps it. 0, or
 * -errno with s->error_page set. */
static int place_run(const struct run *r)
{
    const struct place_target *t = &r->t;
    struct mg_space *s = t->s;
    if (t->via_write) {
        int rc = write_claimed(r);
        if (rc < 0) {
            /* ENOSPC: the backing is full (the write allocates the pages) */
            s->error_kind = MG_ALLOC_FAILED;
            s->error_page = r->h.first;
            s->error_value = r->h.count;
            return rc;
        }
    }
    for (uint32_t i = 0; i < r->h.count; i++) {
        if (!r->mine[i])
            continue;
        uint64_t page = r->h.first + i;
        int zero = run_zero(r, i);
        if (zero && !t->staged && !t->zero_skip)
            memset(alias_of(s, page), 0, s->page_size);
        int rc = finish_place(t, page, t->staged ? r->staging + (uint64_t)i * s->page_size : NULL, zero,
                              MG_VIA_PUSH);
        if (rc < 0) {
            s->error_page = page;
            return rc;
        }
    }
    uint64_t bad;
    int64_t m = mg_map_placed(s, r->h.first, r->h.count, &bad);
    if (m < 0) {
        s->error_page = bad;
        return (int)m;
    }
    return 0;
}

static int push_receive(struct mg_space *s, int fd, struct mg_tls *tls, int stop_fd, struct run *r,
                        struct sparse_buf *blocks, struct unzstd *z);

int mg_push_receive(struct mg_space *s, int fd, int stop_fd, uint8_t *scratch)
{
    uint64_t ps = s->page_size;
    struct run r = { .scratch = scratch };
    struct sparse_buf sb = { NULL, NULL };
    struct unzstd z = { NULL, NULL, { 0 } };
    struct mg_tls *tls = mg_tls_get(fd);   /* the channel's TLS session for the call, or NULL */
    int rc = 0;
    /* a run whose pages are not all allocated yet may be staged */
    if (place_target(s, PLACER_RUN, 0).staged && !(r.staging = malloc(ps * MG_PUSH_MAX_RUN)))
        rc = -ENOMEM;
    if (rc == 0 && s->block_size && ps > s->block_size)
        rc = sparse_alloc(&sb, ps / s->block_size);
    if (rc == 0)
        rc = push_receive(s, fd, tls, stop_fd, &r, sb.bits ? &sb : NULL, &z);
    unzstd_free(&z);
    sparse_free(&sb);
    free(r.staging);
    mg_tls_put(tls);
    return rc;
}

static int push_receive(struct mg_space *s, int fd, struct mg_tls *tls, int stop_fd, struct run *r,
                        struct sparse_buf *blocks, struct unzstd *z)
{
    uint64_t ps = s->page_size;
    struct iovec iov[MG_PUSH_MAX_RUN];
    /* a run's header and bitmap are read whole; its pages in chunks, holding
     * back (large pages) while a demand reply is outstanding */
    struct wire_end head = { .fd = fd, .tls = tls, .stop_fd = stop_fd };
    struct wire_end payload = { .fd = fd, .tls = tls, .stop_fd = stop_fd, .chunked = 1,
                                .hold = ps > MG_YIELD_PAGE_SIZE ? run_should_hold : NULL, .hold_ctx = r };
    for (;;) {
        /* between runs, when this thread has claimed nothing: a claimed page
         * may be the very one a vCPU waits for */
        if (ps > MG_YIELD_PAGE_SIZE)
            hold_while(hold_flag, &s->demand_waiting);
        int rc = wire_read(&head, &r->h, sizeof(r->h));
        if (rc <= 0)
            return rc;
        struct run_header h = r->h;
        /* Every number of the header is checked before a byte more is read or
         * a page claimed; what follows is bounded by it (the bitmap, count
         * pages) into buffers sized for MG_PUSH_MAX_RUN. Runs need not ascend
         * from one to the next (the source jumps back to the pages after its
         * latest demand), and a page sent twice is claimed once, its second
         * copy read into scratch: a repeat costs the sender its bytes, never
         * this side memory. */
        if (h.count == 0 || h.count > MG_PUSH_MAX_RUN || h.first >= s->npages || h.count > s->npages - h.first)
            return refuse(s, MG_BAD_PAGE, h.first, h.count);
        int sparse = h.flags & MG_RUN_SPARSE, zstd = h.flags & MG_RUN_ZSTD;
        if ((h.flags & ~(uint32_t)(MG_RUN_SPARSE | MG_RUN_ZSTD)) || (sparse && !blocks)
            || (zstd && (sparse || !s->zstd_runs || !mg_zstd_ready())))
            return refuse(s, MG_BAD_FLAGS, h.first, h.flags);
        rc = wire_read_rest(&head, r->bits, (h.count + 7) / 8);
        if (rc < 0)
            return rc;
        /* a frame's length is checked before its bytes are read: at most the
         * run's non-zero pages, raw (a sender keeps a larger frame to itself) */
        uint64_t flen = 0, want = 0;
        if (zstd) {
            if ((rc = wire_read_rest(&head, &flen, sizeof(flen))) < 0)
                return rc;
            for (uint32_t i = 0; i < h.count; i++)
                want += run_zero(r, i) ? 0 : ps;
            if (flen == 0 || flen > want) {
                s->error_detail = flen;
                return refuse(s, MG_BAD_FRAME, h.first, MG_FRAME_LENGTH);
            }
            if ((rc = unzstd_init(z)) < 0)
                return rc;
        }
        int niov = 0, any = 0;
        for (uint32_t i = 0; i < h.count; i++)
            any |= r->mine[i] = (uint8_t)claim(s, h.first + i);
        /* into the alias when the run's pages are allocated already (the
         * background allocation got there first), else staged where that is
         * cheaper (place_target); the alias is allocated before it is written */
        r->t = place_target(s, PLACER_RUN, bitmap_next_clear(s->allocated, h.first, h.first + h.count) >=
                                           h.first + h.count);
        if (any && !r->t.staged && (rc = ensure_allocated(s, h.first, h.count)) < 0) {
            for (uint32_t i = 0; i < h.count; i++)
                if (r->mine[i])
                    bitmap_clear_range(s->claimed, h.first + i, 1);   /* (nothing was written) */
            return rc;
        }
        for (uint32_t i = 0; i < h.count; i++) {
            if (run_zero(r, i) || sparse || zstd)
                continue;
            iov_append(iov, &niov, 0, run_dst(r, i), ps);
        }
        rc = sparse ? read_sparse_run(&payload, r, blocks)
           : zstd   ? read_zstd_run(&payload, r, z, flen, want)
                    : wire_readv_rest(&payload, iov, niov);
        if (rc < 0) {
            /* claimed pages that did not arrive whole: give them back */
            for (uint32_t i = 0; i < h.count; i++)
                if (r->mine[i])
                    unclaim(&r->t, h.first + i);
            return rc;
        }
        rc = place_run(r);
        if (rc < 0)
            return rc;
        if (all_received(s))
            return MG_DEMAND_COMPLETE;
    }
}
