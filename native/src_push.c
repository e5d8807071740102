#define _GNU_SOURCE
#include "src_push.h"
#include "mem.h"
#include "tls.h"
#include "wire.h"
#include "zstd.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Dense runs are written gathered: up to GATHER_RUNS runs, GATHER_BYTES of
 * pages, in one writev (and over TLS, in as few records). Hinted pages are
 * scattered and go one page a run: one syscall and one TLS record each held
 * the hinted part of the push to about half the link at 1 Gbit. */
#define GATHER_RUNS 64
#define GATHER_BYTES (256u << 10)
#define GATHER_IOV (2 * GATHER_RUNS + MG_PUSH_MAX_RUN)

struct gather {
    struct run_header h[GATHER_RUNS];
    uint8_t bits[GATHER_RUNS][MG_PUSH_MAX_RUN / 8];
    uint64_t flen[GATHER_RUNS];   /* a compressed run's frame length, sent before its frame */
    struct iovec iov[GATHER_IOV];
    int nruns, niov;
    uint64_t bytes;
};

static int gather_flush(const struct wire_end *e, struct gather *g)
{
    int rc = g->niov ? wire_writev(e, g->iov, g->niov) : 0;
    g->nruns = g->niov = 0;
    g->bytes = 0;
    return rc;
}

/* The run's non-zero pages as one zstd frame in st->frame: its length, or 0
 * when the run goes raw (no zstd, too large, or the frame saves too little).
 * iov[2..niov) are the pages, nz bytes in all. */
static uint64_t compress_run(struct mg_push_stream *st, const struct iovec *iov, int niov, uint64_t nz)
{
    if (!nz || nz > MG_ZSTD_MAX_RUN_BYTES || !mg_zstd_ready())
        return 0;
    if (!st->cctx) {
        if (!(st->cctx = Z.ZSTD_createCCtx()))
            return 0;
        Z.ZSTD_CCtx_setParameter(st->cctx, ZSTD_c_compressionLevel, st->level);
        Z.ZSTD_CCtx_setParameter(st->cctx, ZSTD_c_windowLog, MG_ZSTD_WINDOW_LOG);
        /* the destination checks the size a frame states against the run's */
        Z.ZSTD_CCtx_setParameter(st->cctx, ZSTD_c_contentSizeFlag, 1);
    }
    uint64_t cap = Z.ZSTD_compressBound(nz);
    if (cap > st->frame_cap) {
        free(st->frame);
        st->frame_cap = 0;
        if (!(st->frame = malloc(cap)))
            return 0;
        st->frame_cap = cap;
    }
    const void *src = iov[2].iov_base;
    if (niov > 3) {
        /* pages apart (zero pages between them): gathered, one copy */
        if (!st->gather && !(st->gather = malloc(MG_ZSTD_MAX_RUN_BYTES)))
            return 0;
        uint64_t at = 0;
        for (int i = 2; i < niov; i++) {
            memcpy(st->gather + at, iov[i].iov_base, iov[i].iov_len);
            at += iov[i].iov_len;
        }
        src = st->gather;
    }
    uint64_t t0 = now_ns();
    size_t n = Z.ZSTD_compress2(st->cctx, st->frame, st->frame_cap, src, nz);
    st->zstd_ns += now_ns() - t0;
    st->zstd_in += nz;
    if (Z.ZSTD_isError(n))
        return 0;   /* (cannot happen with a bound-sized buffer; raw is always right) */
    st->zstd_out += n;
    if (n * 100 >= nz * MG_ZSTD_KEEP_PCT) {
        st->runs_incompressible++;
        return 0;
    }
    return n;
}

/* A dense run, appended to g (flushed first when it could not take it
 * whole): header, zero bitmap, then the non-zero pages straight from the
 * mapping, consecutive ones in one iovec (referenced, not copied: the mapping
 * stays valid until the flush); or, compressed (st->compress), the frame's
 * length (u64) and the frame in their place (MG_RUN_ZSTD), flushed at once
 * (st->frame is the next run's too). */
static int send_run(const struct wire_end *e, struct gather *g, struct mg_src_ram *r, uint64_t first,
                    uint32_t count, int64_t *payload, struct mg_push_stream *st)
{
    uint64_t ps = r->page_size;
    if (g->nruns == GATHER_RUNS || g->niov + 4 + (int)count > GATHER_IOV ||
        (g->nruns && g->bytes + count * ps > GATHER_BYTES)) {
        int rc = gather_flush(e, g);
        if (rc < 0)
            return rc;
    }
    struct run_header *h = &g->h[g->nruns];
    uint8_t *bits = g->bits[g->nruns];
    uint64_t *flen = &g->flen[g->nruns];
    g->nruns++;
    *h = (struct run_header){ first, count, 0 };
    memset(bits, 0, (count + 7) / 8);
    g->iov[g->niov++] = (struct iovec){ h, sizeof(*h) };
    g->iov[g->niov++] = (struct iovec){ bits, (count + 7) / 8 };
    int keep = g->niov;
    uint64_t holes = 0, nz = 0;
    for (uint32_t i = 0; i < count; i++) {
        uint8_t *src = (uint8_t *)src_page(r, first + i);
        /* the zero check stalls on each page's first line: ask for later ones
         * early (16 pages ahead: 4-5% more push than 4 ahead, in interleaved
         * 1 GiB idle runs) */
        if (i + 16 < count)
            __builtin_prefetch(src + 16 * ps);
        if (in_hole(r, first + i)) {
            bits[i >> 3] |= (uint8_t)(1u << (i & 7));
            holes++;
            continue;
        }
        if (mg_is_zero(src, ps)) {
            bits[i >> 3] |= (uint8_t)(1u << (i & 7));
            continue;
        }
        /* consecutive non-zero pages are one iovec (never the header's two) */
        iov_append(g->iov, &g->niov, keep, src, ps);
        nz += ps;
    }
    if (holes)
        __atomic_fetch_add(&r->hole_pages, holes, __ATOMIC_RELAXED);
    *payload += (int64_t)nz;
    st->page_bytes += nz;
    st->runs++;
    /* (compress_run reads the pages at iov[2..niov): the run's header pair is iov[0..2)) */
    *flen = st->compress ? compress_run(st, g->iov + keep - 2, g->niov - keep + 2, nz) : 0;
    if (!*flen) {
        st->wire_bytes += nz;
        g->bytes += nz;
        return 0;
    }
    h->flags = MG_RUN_ZSTD;
    st->runs_zstd++;
    st->wire_bytes += *flen;
    g->niov = keep;
    g->iov[g->niov++] = (struct iovec){ flen, sizeof(*flen) };
    g->iov[g->niov++] = (struct iovec){ st->frame, *flen };
    return gather_flush(e, g);
}

/* A sparse run (MG_RUN_SPARSE): header, page bitmap, then for each non-zero
 * page its block bitmap and its non-zero blocks, one writev per page. The
 * bitmaps come from the scan when it got there first. */
static int send_sparse_run(const struct wire_end *e, struct mg_src_ram *r, uint64_t first, uint32_t count,
                           int64_t *payload, struct mg_push_stream *st)
{
    uint64_t ps = r->page_size, bs = r->block_size, nb = ps / bs;
    struct run_header h = { first, count, MG_RUN_SPARSE };
    uint8_t pagebits[MG_PUSH_MAX_RUN / 8];
    uint8_t *found = malloc((uint64_t)count * (nb / 8));   /* bitmaps of pages the scan had not reached */
    struct iovec *iov = malloc((nb / 2 + 2) * sizeof(struct iovec));
    const uint8_t **bits = malloc(count * sizeof(*bits));
    int rc = found && iov && bits ? 0 : -ENOMEM;
    memset(pagebits, 0, sizeof(pagebits));
    uint64_t zero_blocks = 0, holes = 0;
    for (uint32_t i = 0; i < count && rc == 0; i++) {
        int hole = in_hole(r, first + i);
        holes += (uint64_t)hole;
        bits[i] = page_block_bits(r, first + i, hole, found + (uint64_t)i * (nb / 8));
        uint64_t zeros = bits_set(bits[i], nb / 8);
        if (zeros == nb)
            pagebits[i >> 3] |= (uint8_t)(1u << (i & 7));
        else {
            zero_blocks += zeros;
            *payload += (int64_t)((nb - zeros) * bs);
            st->page_bytes += (nb - zeros) * bs;
            st->wire_bytes += (nb - zeros) * bs;
        }
    }
    if (rc == 0) {
        struct iovec head[2] = { { &h, sizeof(h) }, { pagebits, (count + 7) / 8 } };
        rc = wire_writev(e, head, 2);
    }
    for (uint32_t i = 0; i < count && rc == 0; i++) {
        if ((pagebits[i >> 3] >> (i & 7)) & 1)
            continue;
        int niov = 1;
        iov[0].iov_base = (void *)bits[i];
        iov[0].iov_len = nb / 8;
        block_iov((uint8_t *)src_page(r, first + i), bits[i], nb, bs, iov, &niov, 1);
        rc = wire_writev(e, iov, niov);
    }
    st->runs++;
    __atomic_fetch_add(&r->push_zero_blocks, zero_blocks, __ATOMIC_RELAXED);
    __atomic_fetch_add(&r->hole_pages, holes, __ATOMIC_RELAXED);
    free(found);
    free(iov);
    free(bits);
    return rc;
}

struct mg_push_stream *mg_push_stream_new(int level)
{
    struct mg_push_stream *st = calloc(1, sizeof(*st));
    if (st)
        st->level = level;
    return st;
}

void mg_push_stream_free(struct mg_push_stream *st)
{
    if (!st)
        return;
    if (st->cctx)
        Z.ZSTD_freeCCtx(st->cctx);
    free(st->gather);
    free(st->frame);
    free(st);
}

int64_t mg_push_runs(int fd, struct mg_src_ram *ram, const uint64_t *runs, uint64_t nruns, const uint32_t *hold,
                     struct mg_push_stream *st)
{
    int64_t payload = 0;
    /* a compressed run is dense (zstd takes a large page's zero blocks for
     * next to nothing), unless it is too large to compress */
    int sparse = src_sparse(ram), zstd = st->compress && mg_zstd_ready();
    /* chunked: at most 64 iovecs and MG_HOLD_CHUNK bytes per writev; large
     * pages wait on the demand server's busy flag before each */
    struct mg_tls *tls = mg_tls_get(fd);   /* the channel's TLS session for the call, or NULL */
    struct wire_end e = { .fd = fd, .tls = tls, .stop_fd = -1, .chunked = 1,
                          .hold = ram->page_size > MG_YIELD_PAGE_SIZE && hold ? hold_flag : NULL,
                          .hold_ctx = hold };
    struct gather *g = sparse && !zstd ? NULL : malloc(sizeof(*g));
    if ((!sparse || zstd) && !g) {
        payload = -ENOMEM;
        goto out;
    }
    if (g)
        g->nruns = g->niov = 0, g->bytes = 0;
    for (uint64_t i = 0; i < nruns; i++) {
        uint64_t first = runs[2 * i], left = runs[2 * i + 1];
        while (left) {
            uint32_t count = left < MG_PUSH_MAX_RUN ? (uint32_t)left : MG_PUSH_MAX_RUN;
            int rc;
            if (sparse && !(zstd && (uint64_t)count * ram->page_size <= MG_ZSTD_MAX_RUN_BYTES)) {
                /* (what was gathered goes first: runs keep their order on the stream) */
                rc = g ? gather_flush(&e, g) : 0;
                if (rc >= 0)
                    rc = send_sparse_run(&e, ram, first, count, &payload, st);
            } else {
                rc = send_run(&e, g, ram, first, count, &payload, st);
            }
            if (rc < 0) {
                payload = rc;
                goto out;
            }
            first += count;
            left -= count;
        }
    }
    if (g) {
        int rc = gather_flush(&e, g);
        if (rc < 0)
            payload = rc;
    }
out:
    free(g);
    mg_tls_put(tls);
    return payload;
}
