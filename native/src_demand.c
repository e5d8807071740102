#define _GNU_SOURCE
#include "src_demand.h"
#include "bitmap.h"
#include "mem.h"
#include "tls.h"
#include "wire.h"

#include <errno.h>
#include <string.h>

static int send_reply(struct mg_demand_src *d, struct mg_tls *tls, uint64_t page, struct sparse_buf *sb)
{
    const struct mg_src_ram *r = d->ram;
    uint64_t ps = r->page_size, bs = r->block_size;
    const uint8_t *src = src_page(r, page);
    struct reply_header h = { page, 0, (uint32_t)ps };
    struct iovec dense[2] = { { &h, sizeof(h) }, { (void *)src, ps } };
    struct iovec *iov = dense;
    int niov = 2;
    uint64_t payload = ps;
    int hole = in_hole(r, page);
    if (hole)
        __atomic_fetch_add(&d->ram->hole_pages, 1, __ATOMIC_RELAXED);
    if (sb->iov) {
        /* a large page: its zero blocks, found ahead or now */
        uint64_t nb = ps / bs;
        const uint8_t *bits = page_block_bits(r, page, hole, sb->bits);
        if (bits != sb->bits)
            d->prescanned++;
        uint64_t zeros = bits_set(bits, nb / 8);
        block_iov((uint8_t *)src, bits, nb, bs, sb->iov, &niov, 2);
        if (zeros == nb) {
            h.flags = MG_REPLY_ZERO;
            h.length = 0;
            niov = 1;
            payload = 0;
        } else if (zeros) {
            payload = (nb - zeros) * bs;
            h.flags = MG_REPLY_SPARSE;
            h.length = (uint32_t)(nb / 8 + payload);
            iov = sb->iov;
            iov[0] = dense[0];
            iov[1].iov_base = (void *)bits;
            iov[1].iov_len = nb / 8;
            d->zero_blocks += zeros;
        } else
            niov = 2;
    } else if (hole || mg_is_zero(src, ps)) {
        h.flags = MG_REPLY_ZERO;
        h.length = 0;
        niov = 1;
        payload = 0;
    }
    /* a reply goes whole: the demand path never holds back */
    struct wire_end e = { .fd = d->fd, .tls = tls, .stop_fd = -1 };
    int rc = wire_writev(&e, iov, niov);
    if (rc < 0)
        return rc;
    set_bit(d->sent, page);
    if (!payload)
        d->zero++;
    else
        d->bytes += payload;
    return 0;
}

static int demand_serve(struct mg_demand_src *d, struct mg_tls *tls, int stop_fd, struct sparse_buf *sb);

int mg_demand_serve(struct mg_demand_src *d, int stop_fd)
{
    const struct mg_src_ram *r = d->ram;
    struct sparse_buf sb = { NULL, NULL };
    struct mg_tls *tls = mg_tls_get(d->fd);   /* the channel's TLS session for the call, or NULL */
    int rc = src_sparse(r) ? sparse_alloc(&sb, r->page_size / r->block_size) : 0;
    if (rc == 0)
        rc = demand_serve(d, tls, stop_fd, &sb);
    sparse_free(&sb);
    mg_tls_put(tls);
    return rc;
}

static int demand_serve(struct mg_demand_src *d, struct mg_tls *tls, int stop_fd, struct sparse_buf *sb)
{
    const struct mg_src_ram *r = d->ram;
    struct wire_end e = { .fd = d->fd, .tls = tls, .stop_fd = stop_fd };
    uint64_t req[64];
    uint64_t have = 0;     /* bytes of req filled */
    uint64_t ahead_end = 0; /* pages before this were read ahead after the last request */
    for (;;) {
        int64_t n = wire_read_some(&e, (uint8_t *)req + have, sizeof(req) - have);
        if (n <= 0)
            return (int)n;   /* 0: the destination closed the channel */
        have += (uint64_t)n;
        uint64_t count = have / 8;
        for (uint64_t i = 0; i < count; i++) {
            uint64_t page = req[i];
            if (page >= r->npages) {
                d->bad_page = page;
                return -EPROTO;
            }
            int big = r->page_size > MG_YIELD_PAGE_SIZE;
            if (big)
                __atomic_store_n(&d->busy, 1, __ATOMIC_RELEASE);
            int rc = send_reply(d, tls, page, sb);
            if (big)
                __atomic_store_n(&d->busy, 0, __ATOMIC_RELEASE);
            if (rc < 0)
                return rc;
            __atomic_store_n(&d->last_page, page, __ATOMIC_RELEASE);
            __atomic_fetch_add(&d->seq, 1, __ATOMIC_RELEASE);
            /* Readahead, as the kernel does for files: a fault just past the
             * last one (or past what we read ahead) means a sequential scan, and
             * the window doubles; any other fault resets it. The demanded page
             * always goes first, so the waiting vCPU never waits for these. */
            if (page >= ahead_end && page <= ahead_end + 1 + d->window)
                d->window = d->window ? (d->window * 2 < d->max_window ? d->window * 2 : d->max_window) : 4;
            else
                d->window = 0;
            if (d->window > d->max_window)
                d->window = d->max_window;
            uint64_t end = page + 1 + d->window;
            if (end > r->npages)
                end = r->npages;
            for (uint64_t p = page + 1; p < end && have - (i + 1) * 8 < 8; p++) {
                if (test_bit(d->sent, p))
                    continue;
                rc = send_reply(d, tls, p, sb);
                if (rc < 0)
                    return rc;
                d->readahead++;
            }
            ahead_end = end;
        }
        uint64_t rest = have - count * 8;
        memmove(req, (uint8_t *)req + count * 8, rest);
        have = rest;
    }
}
