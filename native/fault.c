#define _GNU_SOURCE
#include "fault.h"
#include "uffd.h"

/* Counters are bumped from the fault loop and from placement at once. */
#define STAT_ADD(s, field, n) __atomic_fetch_add(&(s)->stats.field, (n), __ATOMIC_RELAXED)

#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>

/* ---- bitmaps ---- */

static inline void set_bit(uint64_t *map, uint64_t bit)
{
    __atomic_fetch_or(&map[bit >> 6], 1ULL << (bit & 63), __ATOMIC_RELEASE);
}

static inline int test_and_set_bit(uint64_t *map, uint64_t bit)
{
    uint64_t m = 1ULL << (bit & 63);
    return (__atomic_fetch_or(&map[bit >> 6], m, __ATOMIC_ACQ_REL) & m) != 0;
}

static inline int test_bit(const uint64_t *map, uint64_t bit)
{
    return (__atomic_load_n(&map[bit >> 6], __ATOMIC_ACQUIRE) >> (bit & 63)) & 1;
}

static void change_range(uint64_t *map, uint64_t first, uint64_t count, int set)
{
    uint64_t end = first + count;
    while (first < end) {
        uint64_t w = first >> 6, lo = first & 63;
        uint64_t n = 64 - lo < end - first ? 64 - lo : end - first;
        uint64_t mask = (n == 64 ? ~0ULL : ((1ULL << n) - 1)) << lo;
        if (set)
            __atomic_fetch_or(&map[w], mask, __ATOMIC_RELEASE);
        else
            __atomic_fetch_and(&map[w], ~mask, __ATOMIC_RELEASE);
        first += n;
    }
}

void mg_bitmap_set_range(uint64_t *map, uint64_t first, uint64_t count)
{
    change_range(map, first, count, 1);
}

void mg_bitmap_clear_range(uint64_t *map, uint64_t first, uint64_t count)
{
    change_range(map, first, count, 0);
}

int mg_bitmap_test(const uint64_t *map, uint64_t bit)
{
    return test_bit(map, bit);
}

uint64_t mg_bitmap_count(const uint64_t *map, uint64_t first, uint64_t count)
{
    uint64_t end = first + count, total = 0;
    while (first < end) {
        uint64_t w = first >> 6, lo = first & 63;
        uint64_t n = 64 - lo < end - first ? 64 - lo : end - first;
        uint64_t mask = (n == 64 ? ~0ULL : ((1ULL << n) - 1)) << lo;
        total += (uint64_t)__builtin_popcountll(__atomic_load_n(&map[w], __ATOMIC_ACQUIRE) & mask);
        first += n;
    }
    return total;
}

static uint64_t next_bit(const uint64_t *map, uint64_t first, uint64_t end, int want_set)
{
    while (first < end) {
        uint64_t w = first >> 6, lo = first & 63;
        uint64_t word = __atomic_load_n(&map[w], __ATOMIC_ACQUIRE);
        if (!want_set)
            word = ~word;
        word &= ~0ULL << lo;
        if (word) {
            uint64_t bit = (w << 6) + (uint64_t)__builtin_ctzll(word);
            return bit < end ? bit : end;
        }
        first = (w + 1) << 6;
    }
    return end;
}

uint64_t mg_bitmap_next_clear(const uint64_t *map, uint64_t first, uint64_t end)
{
    return next_bit(map, first, end, 0);
}

uint64_t mg_bitmap_next_set(const uint64_t *map, uint64_t first, uint64_t end)
{
    return next_bit(map, first, end, 1);
}

/* ---- page space ---- */

static const struct mg_region *region_of_page(const struct mg_space *s, uint64_t page)
{
    for (int i = 0; i < s->nregions; i++) {
        const struct mg_region *r = &s->regions[i];
        if (page >= r->first_page && page < r->first_page + r->npages)
            return r;
    }
    return NULL;
}

int64_t mg_space_page_of(const struct mg_space *s, uint64_t guest_addr)
{
    for (int i = 0; i < s->nregions; i++) {
        const struct mg_region *r = &s->regions[i];
        if (guest_addr >= r->guest_addr && guest_addr < r->guest_addr + r->npages * s->page_size)
            return (int64_t)(r->first_page + (guest_addr - r->guest_addr) / s->page_size);
    }
    return -1;
}

uint64_t mg_space_addr_of(const struct mg_space *s, uint64_t page)
{
    const struct mg_region *r = region_of_page(s, page);
    return r ? r->guest_addr + (page - r->first_page) * s->page_size : 0;
}

/* Maps one run that lies inside one region and whose pages are all received and
 * not yet mapped. The only place where CONTINUE's errnos become outcomes. */
static int64_t continue_run(struct mg_space *s, const struct mg_region *r,
                            uint64_t first, uint64_t count, uint64_t *bad_page)
{
    uint64_t ps = s->page_size, done_pages = 0;
    while (done_pages < count) {
        uint64_t page = first + done_pages;
        uint64_t addr = r->guest_addr + (page - r->first_page) * ps;
        int64_t done = 0;
        STAT_ADD(s, map_calls, 1);
        int rc = mg_uffd_continue(s->uffd, addr, (count - done_pages) * ps, 0, &done);
        uint64_t ok = done > 0 ? (uint64_t)done / ps : 0;
        if (ok) {
            mg_bitmap_set_range(s->mapped, page, ok);
            done_pages += ok;
        }
        if (rc == 0)
            continue;
        if (rc == -EEXIST) {
            /* Someone mapped this page already (a racing CONTINUE from the fault
             * loop). It carries the guest's data now; wake any waiter, move on. */
            uint64_t p = first + done_pages;
            STAT_ADD(s, eexist, 1);
            mg_uffd_wake(s->uffd, r->guest_addr + (p - r->first_page) * ps, ps);
            set_bit(s->mapped, p);
            done_pages++;
            continue;
        }
        if (rc == -EAGAIN) /* mm changing under us: retry the rest */
            continue;
        *bad_page = first + done_pages;
        return rc;
    }
    return (int64_t)count;
}

int64_t mg_map_pages(struct mg_space *s, uint64_t first, uint64_t count, uint64_t *bad_page)
{
    uint64_t end = first + count, total = 0;
    if (end > s->npages)
        end = s->npages;
    if (s->mode == MG_PLACE_COPY)
        return 0; /* COPY placed and mapped in one step */
    uint64_t p = first;
    while (p < end) {
        p = mg_bitmap_next_set(s->received, p, end);
        if (p >= end)
            break;
        uint64_t q = mg_bitmap_next_clear(s->received, p, end);
        /* within [p, q) skip already-mapped pages */
        while (p < q) {
            p = mg_bitmap_next_clear(s->mapped, p, q);
            if (p >= q)
                break;
            uint64_t e = mg_bitmap_next_set(s->mapped, p, q);
            const struct mg_region *r = region_of_page(s, p);
            if (!r) {
                p = e;
                continue;
            }
            uint64_t rend = r->first_page + r->npages;
            if (e > rend)
                e = rend;
            int64_t rc = continue_run(s, r, p, e - p, bad_page);
            if (rc < 0)
                return rc;
            total += (uint64_t)rc;
            p = e;
        }
        p = q;
    }
    STAT_ADD(s, mapped_pages, total);
    return (int64_t)total;
}

int mg_claim_run(struct mg_space *s, uint64_t first, uint64_t count)
{
    if (first + count > s->npages)
        return 0;
    for (uint64_t i = 0; i < count; i++) {
        if (test_and_set_bit(s->claimed, first + i)) {
            mg_bitmap_clear_range(s->claimed, first, i);
            return 0;
        }
    }
    return 1;
}

static int copy_page(struct mg_space *s, uint64_t page, const uint8_t *src, int zero)
{
    const struct mg_region *r = region_of_page(s, page);
    if (!r)
        return -EFAULT;
    uint64_t addr = r->guest_addr + (page - r->first_page) * s->page_size;
    int64_t done = 0;
    int rc;
    STAT_ADD(s, map_calls, 1);
    if (zero && s->page_size == 4096)
        rc = mg_uffd_zeropage(s->uffd, addr, s->page_size, 0, &done);
    else if (zero) {
        /* ZEROPAGE is not supported on hugetlbfs: copy from a zero buffer. */
        static uint8_t *zeros;
        static uint64_t zeros_len;
        if (zeros_len < s->page_size) {
            uint8_t *z = calloc(1, s->page_size);
            if (!z)
                return -ENOMEM;
            zeros = z;
            zeros_len = s->page_size;
        }
        rc = mg_uffd_copy(s->uffd, addr, (uint64_t)(uintptr_t)zeros, s->page_size, 0, &done);
    } else
        rc = mg_uffd_copy(s->uffd, addr, (uint64_t)(uintptr_t)src, s->page_size, 0, &done);
    if (rc == -EEXIST) {
        STAT_ADD(s, eexist, 1);
        mg_uffd_wake(s->uffd, addr, s->page_size);
        return 0;
    }
    return rc;
}

int64_t mg_place_pages(struct mg_space *s, const uint64_t *pages, uint64_t n,
                       const uint8_t *data, const uint64_t *data_off,
                       const uint8_t *is_zero, uint8_t *placed_out, uint64_t *bad_page)
{
    uint64_t placed = 0, ps = s->page_size;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t page = pages[i];
        if (page >= s->npages) {
            *bad_page = page;
            return -ERANGE;
        }
        if (placed_out)
            placed_out[i] = 0;
        if (test_and_set_bit(s->claimed, page))
            continue; /* duplicate: the first copy won and may be the guest's now */
        if (s->mode == MG_PLACE_COPY) {
            int rc;
            do
                rc = copy_page(s, page, data + data_off[i], is_zero[i]);
            while (rc == -EAGAIN);
            if (rc < 0) {
                *bad_page = page;
                return rc;
            }
            set_bit(s->received, page);
            set_bit(s->mapped, page);
        } else {
            uint8_t *dst = (uint8_t *)(uintptr_t)(s->alias_base + page * ps);
            if (is_zero[i])
                memset(dst, 0, ps);
            else
                memcpy(dst, data + data_off[i], ps);
            /* received only after every byte is in the page cache (invariant 4) */
            set_bit(s->received, page);
        }
        if (placed_out)
            placed_out[i] = 1;
        placed++;
    }
    return (int64_t)placed;
}

/* ---- fault loop ---- */

int mg_fault_serve(struct mg_space *s, int stop_fd, uint64_t *need, int max, int timeout_ms)
{
    struct mg_uffd_event ev[64];
    int fds[2] = { s->uffd, stop_fd };
    for (;;) {
        int mask = mg_poll_in(fds, stop_fd >= 0 ? 2 : 1, timeout_ms);
        if (mask < 0) {
            if (mask == -EINTR)
                continue;
            return mask;
        }
        if (mask & 2)
            return -ESHUTDOWN;
        if (mask == 0)
            return 0;
        int want = max < 64 ? max : 64;
        int n = mg_uffd_read(s->uffd, ev, want);
        if (n == -EAGAIN || n == -EINTR)
            continue;
        if (n < 0)
            return n;
        if (n == 0)
            return -EPIPE;
        int k = 0;
        for (int i = 0; i < n; i++) {
            if (ev[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            STAT_ADD(s, faults, 1);
            if (ev[i].flags & UFFD_PAGEFAULT_FLAG_MINOR)
                STAT_ADD(s, minor, 1);
            int64_t page = mg_space_page_of(s, ev[i].address);
            if (page < 0) {
                STAT_ADD(s, outside, 1);
                continue;
            }
            if (test_bit(s->received, (uint64_t)page)) {
                uint64_t bad;
                STAT_ADD(s, fast, 1);
                if (s->mode == MG_PLACE_COPY || test_bit(s->mapped, (uint64_t)page)) {
                    /* mapped after this fault was queued: just wake */
                    uint64_t a = ev[i].address & ~(s->page_size - 1);
                    mg_uffd_wake(s->uffd, a, s->page_size);
                    continue;
                }
                int64_t rc = mg_map_pages(s, (uint64_t)page, 1, &bad);
                if (rc < 0)
                    return (int)rc;
                continue;
            }
            STAT_ADD(s, requested, 1);
            need[k++] = (uint64_t)page;
        }
        if (k > 0)
            return k;
    }
}
