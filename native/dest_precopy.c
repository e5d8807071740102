/* Pre-copy pages at the destination (see dest_precopy.h). */
#include "dest_precopy.h"

#include <errno.h>
#include <string.h>

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
