#define _GNU_SOURCE
#include "dest_demand.h"
#include "bitmap.h"
#include "tls.h"

#include <errno.h>
#include <string.h>

int read_sparse(const struct wire_end *e, const struct mg_space *s, uint8_t *dst, const uint8_t *bits,
                struct iovec *iov, int zero_ok)
{
    uint64_t bs = s->block_size, nb = s->page_size / bs;
    int niov = 0;
    if (!zero_ok)
        for (uint64_t b = 0; b < nb; b++)
            if ((bits[b >> 3] >> (b & 7)) & 1)
                memset(dst + b * bs, 0, bs);
    block_iov(dst, bits, nb, bs, iov, &niov, 0);
    return wire_readv_rest(e, iov, niov);
}

static int demand_receive(struct mg_space *s, int fd, struct mg_tls *tls, int stop_fd, uint8_t *scratch,
                          struct sparse_buf *sb);

int mg_demand_receive(struct mg_space *s, int fd, int stop_fd, uint8_t *scratch)
{
    struct sparse_buf sb = { NULL, NULL };
    struct mg_tls *tls = mg_tls_get(fd);   /* the channel's TLS session for the call, or NULL */
    int rc = s->block_size && s->page_size > s->block_size ? sparse_alloc(&sb, s->page_size / s->block_size) : 0;
    if (rc == 0)
        rc = demand_receive(s, fd, tls, stop_fd, scratch, &sb);
    sparse_free(&sb);
    mg_tls_put(tls);
    return rc;
}

static int demand_receive(struct mg_space *s, int fd, struct mg_tls *tls, int stop_fd, uint8_t *scratch,
                          struct sparse_buf *sb)
{
    uint64_t ps = s->page_size, nb = sb->bits ? ps / s->block_size : 0;
    uint8_t *bits = sb->bits;
    struct place_target t = place_target(s, PLACER_PAGE, 1);
    /* large pages: while a vCPU waits, poll for its reply rather than sleep */
    struct wire_end e = { .fd = fd, .tls = tls, .stop_fd = stop_fd,
                          .spin = ps > MG_YIELD_PAGE_SIZE ? &s->demand_waiting : NULL };
    for (;;) {
        struct reply_header h;
        int rc = wire_read(&e, &h, sizeof(h));
        if (rc <= 0)
            return rc;
        int zero = h.flags & MG_REPLY_ZERO, sparse = h.flags & MG_REPLY_SPARSE;
        /* page, flags and length are checked before a byte of the page is
         * read: the length must be exactly what the flags (and the bitmap)
         * say, so nothing beyond one page is ever read for a reply */
        if (h.page >= s->npages)
            return refuse(s, MG_BAD_PAGE, h.page, h.length);
        if ((h.flags & ~(uint32_t)(MG_REPLY_ZERO | MG_REPLY_SPARSE)) || (zero && sparse) || (sparse && !nb))
            return refuse(s, MG_BAD_FLAGS, h.page, h.flags);
        if (sparse) {
            /* the bitmap first: the length it implies is checked before any
             * byte of the page is read (or the page claimed) */
            if (h.length < nb / 8)
                return refuse(s, MG_BAD_LENGTH, h.page, h.length);
            rc = wire_read_rest(&e, bits, nb / 8);
            if (rc < 0)
                return rc;
            if (h.length != nb / 8 + (nb - bits_set(bits, nb / 8)) * s->block_size)
                return refuse(s, MG_BAD_LENGTH, h.page, h.length);
        } else if (h.length != (zero ? 0 : ps))
            return refuse(s, MG_BAD_LENGTH, h.page, h.length);
        int mine = claim(s, h.page);
        if (mine && !t.staged && (rc = ensure_allocated(s, h.page, 1)) < 0) {
            bitmap_clear_range(s->claimed, h.page, 1);   /* (nothing was written) */
            return rc;
        }
        /* ours and not staged: straight into the alias; else scratch (a
         * duplicate's bytes are dropped, COPY mode copies from there) */
        uint8_t *dst = mine && !t.staged ? alias_of(s, h.page) : scratch;
        if (sparse || !zero) {
            /* zero blocks need no write in a duplicate's scratch, nor in a
             * fresh page of the alias */
            rc = sparse ? read_sparse(&e, s, dst, bits, sb->iov, !mine || t.zero_skip)
                        : wire_read_rest(&e, dst, ps);
            if (rc < 0) {
                if (mine)
                    unclaim(&t, h.page);
                return rc;
            }
        } else if (mine && !t.staged && !t.zero_skip)
            memset(dst, 0, ps);
        if (!mine)
            continue;
        /* a page nobody asked for was read ahead by the source: a push */
        rc = finish_place(&t, h.page, dst, zero, test_bit(s->requested, h.page) ? MG_VIA_DEMAND : MG_VIA_PUSH);
        if (rc < 0) {
            s->error_page = h.page;
            return rc;
        }
        uint64_t bad;
        int64_t m = mg_map_placed(s, h.page, 1, &bad);
        if (m < 0) {
            s->error_page = bad;
            return (int)m;
        }
        if (all_received(s))
            return MG_DEMAND_COMPLETE;
    }
}
