/* Pre-copy pages at the destination (see dest_precopy.h). */
#include "dest_precopy.h"
#include "tls.h"
#include "wire.h"

#include <errno.h>
#include <string.h>
#include <sys/uio.h>

int64_t mg_precopy_write(struct mg_space *s, uint64_t *staged, const uint64_t *pages, uint64_t n,
                         const uint8_t *zero_bits, const uint8_t *data, uint64_t data_len,
                         uint64_t *bad_page)
{
    uint64_t ps = s->page_size, off = 0;
    if (!s->alias_base)
        return -EINVAL;   /* COPY placement has no alias to stage pages in */
    /* From the first pre-copy byte on, a page nobody placed may hold bytes:
     * a zero page placed later must be written, never skipped. */
    s->zero_fresh = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t page = pages[i];
        int zero = (zero_bits[i / 8] >> (i % 8)) & 1;
        if (!zero && off + ps > data_len) {
            *bad_page = page;
            return -EINVAL;
        }
        if (test_bit(s->claimed, page)) {
            /* placed (mapped, or about to be): the guest's from now on */
            *bad_page = page;
            return refuse(s, MG_BAD_PAGE, page, 0);
        }
        /* allocate first: a full backing is an errno, not SIGBUS in the copy */
        int rc = ensure_allocated(s, page, 1);
        if (rc < 0) {
            *bad_page = page;
            return rc;
        }
        if (zero) {
            memset(alias_of(s, page), 0, ps);
        } else {
            memcpy(alias_of(s, page), data + off, ps);
            off += ps;
        }
        set_bit(staged, page);
    }
    if (off != data_len) {
        *bad_page = n ? pages[n - 1] : 0;
        return -EINVAL;
    }
    return (int64_t)n;
}

uint64_t mg_precopy_commit(struct mg_space *s, const uint64_t *staged, const uint64_t *written)
{
    uint64_t n = 0, words = (s->npages + 63) / 64;
    /* a word at a time: 64 pages per claim (bits past npages are never staged) */
    for (uint64_t i = 0; i < words; i++) {
        uint64_t bits = staged[i] & ~written[i];
        if (!bits)
            continue;
        uint64_t old = __atomic_fetch_or(&s->claimed[i], bits, __ATOMIC_ACQ_REL);
        bits &= ~old;   /* claimed already: not ours to make received */
        __atomic_fetch_or(&s->received[i], bits, __ATOMIC_RELEASE);
        n += (uint64_t)__builtin_popcountll(bits);
    }
    STAT_ADD(s, placed_push, n);
    /* received last: a receiver seeing the count reach npages finds every bit set */
    __atomic_fetch_add(&s->stats.received, n, __ATOMIC_RELEASE);
    return n;
}

/* Atomic: a hostile source may write Precopy batches (under the Python lock)
 * while a raw channel writes runs (without it). */
static void staged_set(uint64_t *staged, uint64_t first, uint32_t count, int on)
{
    for (uint32_t i = 0; i < count; i++) {
        uint64_t p = first + i, bit = 1ull << (p % 64);
        if (on)
            __atomic_fetch_or(&staged[p / 64], bit, __ATOMIC_RELEASE);
        else
            __atomic_fetch_and(&staged[p / 64], ~bit, __ATOMIC_ACQ_REL);
    }
}

static int64_t precopy_receive(struct mg_space *s, uint64_t *staged, const struct wire_end *head,
                               const struct wire_end *payload, uint64_t *pages_in)
{
    uint64_t ps = s->page_size;
    struct iovec iov[MG_PUSH_MAX_RUN];
    uint8_t bits[MG_PUSH_MAX_RUN / 8];
    for (;;) {
        struct run_header h;
        int rc = wire_read(head, &h, sizeof(h));
        if (rc <= 0)
            return rc;   /* 0: the source ended the stream between runs, all of it written */
        /* every number is checked before a byte more is read */
        if (h.count == 0 || h.count > MG_PUSH_MAX_RUN || h.first >= s->npages || h.count > s->npages - h.first)
            return refuse(s, MG_BAD_PAGE, h.first, h.count);
        if (h.flags)
            return refuse(s, MG_BAD_FLAGS, h.first, h.flags);   /* pre-copy runs are dense */
        rc = wire_read_rest(head, bits, (h.count + 7) / 8);
        if (rc < 0)
            return rc;
        for (uint32_t i = 0; i < h.count; i++)
            if (test_bit(s->claimed, h.first + i))
                /* placed (mapped, or about to be): the guest's from now on */
                return refuse(s, MG_BAD_PAGE, h.first + i, UINT64_MAX);
        /* allocate first: a full backing is an errno, not SIGBUS in the read */
        rc = ensure_allocated(s, h.first, h.count);
        if (rc < 0) {
            s->error_page = h.first;
            return rc;
        }
        /* Not staged while their bytes change: a run cut part way leaves its
         * pages unstaged (fetched again after the switch), never half old,
         * half new and taken as whole. */
        staged_set(staged, h.first, h.count, 0);
        int niov = 0;
        for (uint32_t i = 0; i < h.count; i++) {
            if ((bits[i >> 3] >> (i & 7)) & 1)
                memset(alias_of(s, h.first + i), 0, ps);
            else
                iov_append(iov, &niov, 0, alias_of(s, h.first + i), ps);
        }
        rc = wire_readv_rest(payload, iov, niov);
        if (rc < 0)
            return rc;
        staged_set(staged, h.first, h.count, 1);
        __atomic_fetch_add(pages_in, h.count, __ATOMIC_RELAXED);
    }
}

int64_t mg_precopy_receive(struct mg_space *s, uint64_t *staged, int fd, int stop_fd, uint64_t *pages_in)
{
    if (!s->alias_base)
        return -EINVAL;
    s->zero_fresh = 0;   /* (as in mg_precopy_write) */
    struct mg_tls *tls = mg_tls_get(fd);   /* the channel's TLS session for the call, or NULL */
    struct wire_end head = { .fd = fd, .tls = tls, .stop_fd = stop_fd };
    struct wire_end payload = { .fd = fd, .tls = tls, .stop_fd = stop_fd, .chunked = 1 };
    int64_t rc = precopy_receive(s, staged, &head, &payload, pages_in);
    mg_tls_put(tls);
    return rc;
}
