#define _GNU_SOURCE
#include "fault.h"
#include "uffd.h"
#include "mem.h"

/* Counters are bumped from the fault loop and from placement at once. */
#define STAT_ADD(s, field, n) __atomic_fetch_add(&(s)->stats.field, (n), __ATOMIC_RELAXED)

#include <errno.h>
#include <linux/userfaultfd.h>
#include <limits.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22   /* Linux 5.14 */
#endif

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

uint64_t mg_mark_prior(struct mg_space *s, uint64_t first, uint64_t count)
{
    uint64_t n = 0;
    for (uint64_t p = first; p < first + count && p < s->npages; p++) {
        if (test_and_set_bit(s->claimed, p))
            continue;
        set_bit(s->received, p);
        set_bit(s->mapped, p);
        n++;
    }
    STAT_ADD(s, placed_prior, n);
    STAT_ADD(s, received, n);
    return n;
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
        if (rc == -ENOENT && __atomic_load_n(&s->finished, __ATOMIC_ACQUIRE)) {
            /* The completing thread mapped every page and unregistered the range
             * between our look at the bitmaps and this ioctl: nothing is left
             * to map here. */
            return (int64_t)done_pages;
        }
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

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- demand bookkeeping: in-flight requests and their latencies ---- */

static void inflight_add(struct mg_space *s, uint64_t page)
{
    if (!s->inflight)
        return;
    uint64_t t = now_ns();
    for (uint64_t i = 0; i < MG_INFLIGHT; i++) {
        struct mg_inflight *e = &s->inflight[(page + i) % MG_INFLIGHT];
        uint64_t free_slot = UINT64_MAX;
        if (__atomic_compare_exchange_n(&e->page, &free_slot, page, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&e->t_ns, t, __ATOMIC_RELEASE);
            __atomic_fetch_add(&s->demand_waiting, 1, __ATOMIC_RELEASE);
            return;
        }
    }
    /* table full: this request goes untimed */
}

static void inflight_done(struct mg_space *s, uint64_t page)
{
    if (!s->inflight)
        return;
    for (uint64_t i = 0; i < MG_INFLIGHT; i++) {
        struct mg_inflight *e = &s->inflight[(page + i) % MG_INFLIGHT];
        uint64_t cur = __atomic_load_n(&e->page, __ATOMIC_ACQUIRE);
        if (cur == page) {
            uint64_t t0 = __atomic_load_n(&e->t_ns, __ATOMIC_ACQUIRE);
            uint64_t expect = page;
            /* the demand and push receivers may both finish this page's entry */
            if (!__atomic_compare_exchange_n(&e->page, &expect, UINT64_MAX, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                return;
            __atomic_fetch_sub(&s->demand_waiting, 1, __ATOMIC_RELEASE);
            if (t0 && s->lat_us) {
                uint64_t us = (now_ns() - t0) / 1000;
                uint64_t k = __atomic_fetch_add(&s->stats.lat_count, 1, __ATOMIC_RELAXED);
                s->lat_us[k % MG_LAT_RING] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
            }
            return;
        }
        if (cur == UINT64_MAX)
            continue; /* removed entries leave holes: keep probing */
    }
}

static void send_request(struct mg_space *s, uint64_t page)
{
    int fd = __atomic_load_n(&s->demand_fd, __ATOMIC_ACQUIRE);
    if (fd < 0)
        return; /* no source yet: mg_demand_resend sends it when one connects */
    /* One 8-byte send is atomic on a stream socket: the fault loop and a
     * resend may write concurrently without interleaving. */
    if (send(fd, &page, sizeof(page), MSG_NOSIGNAL) == (ssize_t)sizeof(page))
        STAT_ADD(s, requests_sent, 1);
}

/* ---- placement ---- */

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
        /* ZEROPAGE is not supported on hugetlbfs: copy from a zero page. */
        rc = mg_uffd_copy(s->uffd, addr, (uint64_t)(uintptr_t)s->zero_page, s->page_size, 0, &done);
    } else
        rc = mg_uffd_copy(s->uffd, addr, (uint64_t)(uintptr_t)src, s->page_size, 0, &done);
    if (rc == -EEXIST) {
        STAT_ADD(s, eexist, 1);
        mg_uffd_wake(s->uffd, addr, s->page_size);
        return 0;
    }
    return rc;
}

/* Claims page; returns 0 if it was placed already (a duplicate). */
static int claim(struct mg_space *s, uint64_t page)
{
    if (test_and_set_bit(s->claimed, page)) {
        STAT_ADD(s, duplicates, 1);
        return 0;
    }
    return 1;
}

/* Gives back a claimed page whose bytes did not all arrive, so that a later
 * copy places it. On a fresh file zero pages and zero blocks are never
 * written (they read as zero already): what did arrive is wiped first, or a
 * later sparse or zero copy would leave it in the page. */
static void unclaim(struct mg_space *s, uint64_t page)
{
    if (s->mode == MG_PLACE_CONTINUE && s->zero_fresh)
        memset((uint8_t *)(uintptr_t)(s->alias_base + page * s->page_size), 0, s->page_size);
    mg_bitmap_clear_range(s->claimed, page, 1);
}

/* The claimed page's bytes are in the alias (or src for COPY): make it received. */
static int finish_place(struct mg_space *s, uint64_t page, const uint8_t *src, int zero, int via)
{
    if (s->mode == MG_PLACE_COPY) {
        int rc;
        do
            rc = copy_page(s, page, src, zero);
        while (rc == -EAGAIN);
        if (rc < 0)
            return rc;
        set_bit(s->received, page);
        set_bit(s->mapped, page);
    } else {
        /* received only after every byte is in the page cache (invariant 4) */
        set_bit(s->received, page);
    }
    if (zero)
        STAT_ADD(s, placed_zero, 1);
    else if (via == MG_VIA_DEMAND)
        STAT_ADD(s, placed_demand, 1);
    else
        STAT_ADD(s, placed_push, 1);
    if (test_bit(s->requested, page))
        inflight_done(s, page);
    STAT_ADD(s, received, 1);
    return 0;
}

int64_t mg_place_batch(struct mg_space *s, const uint64_t *pages, uint64_t n,
                       const uint8_t *zero_bits, const uint8_t *data, uint64_t data_len,
                       int via, uint64_t *bad_page)
{
    uint64_t placed = 0, ps = s->page_size, off = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t page = pages[i];
        int zero = (zero_bits[i >> 3] >> (i & 7)) & 1;
        const uint8_t *src = zero ? NULL : data + off;
        if (!zero) {
            if (off + ps > data_len) {
                *bad_page = page;
                return -EPROTO;
            }
            off += ps;
        }
        if (page >= s->npages) {
            *bad_page = page;
            return -ERANGE;
        }
        if (!claim(s, page))
            continue; /* duplicate: the first copy won and may be the guest's now */
        if (s->mode == MG_PLACE_CONTINUE) {
            uint8_t *dst = (uint8_t *)(uintptr_t)(s->alias_base + page * ps);
            if (!zero)
                memcpy(dst, src, ps);
            else if (!s->zero_fresh)
                memset(dst, 0, ps);
        }
        int rc = finish_place(s, page, src, zero, via);
        if (rc < 0) {
            *bad_page = page;
            return rc;
        }
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
        int n = mg_uffd_read(s->uffd, ev, 64);
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
                if (rc < 0) {
                    s->error_page = bad;
                    return (int)rc;
                }
                continue;
            }
            STAT_ADD(s, requested, 1);
            if (!test_and_set_bit(s->requested, (uint64_t)page)) {
                inflight_add(s, (uint64_t)page);
                send_request(s, (uint64_t)page);
            }
            if (k < max)
                need[k++] = (uint64_t)page;
        }
        if (k > 0)
            return k;
    }
}

uint64_t mg_oldest_request_ns(struct mg_space *s)
{
    uint64_t oldest = 0;
    if (!s->inflight || !__atomic_load_n(&s->demand_waiting, __ATOMIC_ACQUIRE))
        return 0;
    for (uint64_t i = 0; i < MG_INFLIGHT; i++) {
        struct mg_inflight *e = &s->inflight[i];
        if (__atomic_load_n(&e->page, __ATOMIC_ACQUIRE) == UINT64_MAX)
            continue;
        uint64_t t = __atomic_load_n(&e->t_ns, __ATOMIC_ACQUIRE);
        if (t && (!oldest || t < oldest))
            oldest = t;
    }
    return oldest;
}

int64_t mg_demand_resend(struct mg_space *s)
{
    int64_t count = 0;
    uint64_t p = 0;
    while ((p = mg_bitmap_next_set(s->requested, p, s->npages)) < s->npages) {
        if (!test_bit(s->received, p)) {
            send_request(s, p);
            count++;
        }
        p++;
    }
    return count;
}

/* ---- socket helpers for the demand and push channels ---- */

/* The background push steps aside while should_hold(ctx) says so (a large
 * demand reply is on the way), for at most MG_YIELD_MAX_US at a time. */
typedef int (*hold_fn)(const void *ctx);

static void hold_while_fn(hold_fn should_hold, const void *ctx)
{
    if (!should_hold || !should_hold(ctx))
        return;
    uint64_t until = now_ns() + MG_YIELD_MAX_US * 1000ull;
    struct timespec nap = { 0, 20000 };
    while (should_hold(ctx) && now_ns() < until)
        nanosleep(&nap, NULL);
}

static int flag_set(const void *flag)
{
    return __atomic_load_n((const uint32_t *)flag, __ATOMIC_ACQUIRE) != 0;
}

static void hold_while(const uint32_t *flag)
{
    if (flag)
        hold_while_fn(flag_set, flag);
}

/* The push moves at most this much per syscall (and checks its hold flag in
 * between): on a kernel without preemption a multi-megabyte send or receive
 * keeps the CPU from a waking demand thread until it returns. */
#define MG_HOLD_CHUNK (256u << 10)

/* Copies the front of iov, at most limit bytes, into out (up to max entries). */
static int iov_clip(const struct iovec *iov, int niov, size_t limit, struct iovec *out, int max)
{
    int k = 0;
    while (k < niov && k < max && limit) {
        out[k] = iov[k];
        if (out[k].iov_len > limit)
            out[k].iov_len = limit;
        limit -= out[k].iov_len;
        k++;
    }
    return k;
}

/* Appends [p, p+len) to an iovec array, growing its last entry when p follows
 * it. Entries before `keep` are never grown (a header that must stay apart). */
static void iov_append(struct iovec *iov, int *niov, int keep, void *p, size_t len)
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
static void iov_advance(struct iovec **iov, int *niov, size_t n)
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
static uint64_t bits_set(const uint8_t *bits, uint64_t n)
{
    uint64_t k = 0;
    for (uint64_t i = 0; i < n; i++)
        k += (uint64_t)__builtin_popcount(bits[i]);
    return k;
}

/* Room for one large page's block bitmap and its iovecs: one per run of
 * non-zero blocks, plus up to three more (a header, a bitmap). */
struct sparse_buf {
    uint8_t *bits;
    struct iovec *iov;
};

static int sparse_alloc(struct sparse_buf *b, uint64_t nblocks)
{
    b->bits = malloc(nblocks / 8 + 1);
    b->iov = malloc((nblocks / 2 + 3) * sizeof(struct iovec));
    return b->bits && b->iov ? 0 : -ENOMEM;
}

static void sparse_free(struct sparse_buf *b)
{
    free(b->bits);
    free(b->iov);
}

/* Appends an iovec per run of non-zero blocks of the page at p (bits: its
 * block bitmap, bit b set when block b is zero; nb blocks of bs bytes) after
 * the first `keep` entries. zero_fill: also zero the zero blocks at p. */
static void block_iov(uint8_t *p, const uint8_t *bits, uint64_t nb, uint64_t bs, struct iovec *iov, int *niov,
                      int keep, int zero_fill)
{
    for (uint64_t b = 0; b < nb; b++) {
        if ((bits[b >> 3] >> (b & 7)) & 1) {
            if (zero_fill)
                memset(p + b * bs, 0, bs);
            continue;
        }
        iov_append(iov, niov, keep, p + b * bs, bs);
    }
}

/* Blocks until fd is readable: 0, -ESHUTDOWN when stop_fd fired, or -errno. */
static int wait_readable(int fd, int stop_fd)
{
    int fds[2] = { fd, stop_fd };
    int mask = mg_poll_in(fds, stop_fd >= 0 ? 2 : 1, -1);
    if (mask < 0 && mask != -EINTR)
        return mask;
    return (mask & 2) ? -ESHUTDOWN : 0;
}

/* ---- demand channel, destination side ---- */

/* Polls fd without sleeping for up to spin_ns: 1 once it is readable, 0 if it
 * did not become readable in time. */
static int spin_readable(int fd, uint64_t spin_ns)
{
    uint64_t until = now_ns() + spin_ns;
    struct pollfd p = { fd, POLLIN, 0 };
    do {
        if (poll(&p, 1, 0) > 0)
            return 1;
    } while (now_ns() < until);
    return 0;
}

/* Reads into an iovec array until all of it is filled, watching stop_fd.
 * 1 = done; 0 = end of file before the first byte (only when clean_eof);
 * -EPIPE = end of file part way; -ESHUTDOWN; -errno.
 * chunked: at most MG_HOLD_CHUNK bytes per recvmsg, should_hold (if any) asked
 * before each. spin: a flag; while it is set, wait for data by polling for up
 * to MG_SPIN_US before sleeping (a sleeping thread on this VM wakes 30-40 us
 * late, several times per large reply). */
static int readv_chunked(int fd, int stop_fd, struct iovec *iov, int niov, int clean_eof, int chunked,
                         hold_fn should_hold, const void *ctx, const uint32_t *spin)
{
    int got_any = 0;
    struct iovec clip[64];
    while (niov > 0) {
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)(niov < IOV_MAX ? niov : IOV_MAX) };
        if (chunked) {
            hold_while_fn(should_hold, ctx);
            msg.msg_iov = clip;
            msg.msg_iovlen = (size_t)iov_clip(iov, niov, MG_HOLD_CHUNK, clip, 64);
        }
        ssize_t n = recvmsg(fd, &msg, MSG_DONTWAIT);
        if (n == 0)
            return clean_eof && !got_any ? 0 : -EPIPE;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return -errno;
            if (spin && __atomic_load_n(spin, __ATOMIC_ACQUIRE) && spin_readable(fd, MG_SPIN_US * 1000ull))
                continue;
            int rc = wait_readable(fd, stop_fd);
            if (rc < 0)
                return rc;
            continue;
        }
        got_any = 1;
        iov_advance(&iov, &niov, (size_t)n);
    }
    return 1;
}

static int readv_full(int fd, int stop_fd, struct iovec *iov, int niov, int clean_eof)
{
    return readv_chunked(fd, stop_fd, iov, niov, clean_eof, 0, NULL, NULL, NULL);
}

static int read_full_spin(int fd, int stop_fd, uint8_t *buf, uint64_t len, const uint32_t *spin)
{
    struct iovec iov = { buf, len };
    return readv_chunked(fd, stop_fd, &iov, 1, 1, 0, NULL, NULL, spin);
}

/* Reads exactly len bytes: 1 = done, 0 = EOF at the start, < 0 error. */
static int read_full(int fd, int stop_fd, uint8_t *buf, uint64_t len)
{
    struct iovec iov = { buf, len };
    return readv_full(fd, stop_fd, &iov, 1, 1);
}

struct reply_header {
    uint64_t page;
    uint32_t flags;
    uint32_t length;
};

static int refuse(struct mg_space *s, int kind, uint64_t page, uint64_t value)
{
    s->error_kind = kind;
    s->error_page = page;
    s->error_value = value;
    return -EPROTO;
}

/* Reads a sparse page's non-zero blocks into dst (bits: its block bitmap) and
 * zeroes its zero blocks there unless zero_ok (zero already: a fresh page,
 * or scratch that is thrown away). hold/ctx: as readv_chunked's (the push). */
static int read_sparse(struct mg_space *s, int fd, int stop_fd, uint8_t *dst, const uint8_t *bits,
                       struct iovec *iov, int zero_ok, const uint32_t *spin, hold_fn hold, const void *ctx)
{
    int niov = 0;
    block_iov(dst, bits, s->page_size / s->block_size, s->block_size, iov, &niov, 0, !zero_ok);
    return readv_chunked(fd, stop_fd, iov, niov, 0, hold != NULL, hold, ctx, spin);
}

static int demand_receive(struct mg_space *s, int fd, int stop_fd, uint8_t *scratch, struct sparse_buf *sb);

int mg_demand_receive(struct mg_space *s, int fd, int stop_fd, uint8_t *scratch)
{
    struct sparse_buf sb = { NULL, NULL };
    int rc = s->block_size && s->page_size > s->block_size ? sparse_alloc(&sb, s->page_size / s->block_size) : 0;
    if (rc == 0)
        rc = demand_receive(s, fd, stop_fd, scratch, &sb);
    sparse_free(&sb);
    return rc;
}

static int demand_receive(struct mg_space *s, int fd, int stop_fd, uint8_t *scratch, struct sparse_buf *sb)
{
    uint64_t ps = s->page_size, nb = sb->bits ? ps / s->block_size : 0;
    uint8_t *bits = sb->bits;
    /* large pages: while a vCPU waits, poll for its reply rather than sleep */
    const uint32_t *spin = ps > MG_YIELD_PAGE_SIZE ? &s->demand_waiting : NULL;
    for (;;) {
        struct reply_header h;
        int rc = read_full_spin(fd, stop_fd, (uint8_t *)&h, sizeof(h), spin);
        if (rc <= 0)
            return rc;
        int zero = h.flags & MG_REPLY_ZERO, sparse = h.flags & MG_REPLY_SPARSE;
        if (h.page >= s->npages)
            return refuse(s, MG_BAD_PAGE, h.page, h.length);
        if ((h.flags & ~(uint32_t)(MG_REPLY_ZERO | MG_REPLY_SPARSE)) || (zero && sparse) || (sparse && !nb))
            return refuse(s, MG_BAD_FLAGS, h.page, h.flags);
        if (sparse) {
            /* the bitmap first: the length it implies is checked before any
             * byte of the page is read (or the page claimed) */
            if (h.length < nb / 8)
                return refuse(s, MG_BAD_LENGTH, h.page, h.length);
            rc = read_full_spin(fd, stop_fd, bits, nb / 8, spin);
            if (rc <= 0)
                return rc == 0 ? -EPIPE : rc;
            if (h.length != nb / 8 + (nb - bits_set(bits, nb / 8)) * s->block_size)
                return refuse(s, MG_BAD_LENGTH, h.page, h.length);
        } else if (h.length != (zero ? 0 : ps))
            return refuse(s, MG_BAD_LENGTH, h.page, h.length);
        int mine = claim(s, h.page);
        uint8_t *dst = scratch;
        if (mine && s->mode == MG_PLACE_CONTINUE)
            dst = (uint8_t *)(uintptr_t)(s->alias_base + h.page * ps);
        if (sparse || !zero) {
            /* zero blocks need no write in a duplicate's scratch, nor in a
             * fresh page of the alias */
            int zero_ok = !mine || (s->mode == MG_PLACE_CONTINUE && s->zero_fresh);
            rc = sparse ? read_sparse(s, fd, stop_fd, dst, bits, sb->iov, zero_ok, spin, NULL, NULL)
                        : read_full_spin(fd, stop_fd, dst, ps, spin);
            if (rc <= 0) {
                if (mine)
                    unclaim(s, h.page);
                return rc == 0 ? -EPIPE : rc;
            }
        } else if (mine && s->mode == MG_PLACE_CONTINUE && !s->zero_fresh)
            memset(dst, 0, ps);
        if (!mine)
            continue;
        /* a page nobody asked for was read ahead by the source: a push */
        rc = finish_place(s, h.page, dst, zero, test_bit(s->requested, h.page) ? MG_VIA_DEMAND : MG_VIA_PUSH);
        if (rc < 0) {
            s->error_page = h.page;
            return rc;
        }
        uint64_t bad;
        int64_t m = mg_map_pages(s, h.page, 1, &bad);
        if (m < 0) {
            s->error_page = bad;
            return (int)m;
        }
        if (__atomic_load_n(&s->stats.received, __ATOMIC_ACQUIRE) == s->npages)
            return MG_DEMAND_COMPLETE;
    }
}

/* ---- demand channel, source side ---- */

/* chunked: at most MG_HOLD_CHUNK bytes per writev, waiting on hold (if any)
 * before each */
static int write_chunked(int fd, struct iovec *iov, int iovcnt, int chunked, const uint32_t *hold)
{
    struct iovec clip[64];
    while (iovcnt > 0) {
        ssize_t n;
        if (chunked) {
            hold_while(hold);
            n = writev(fd, clip, iov_clip(iov, iovcnt, MG_HOLD_CHUNK, clip, 64));
        } else
            n = writev(fd, iov, iovcnt < IOV_MAX ? iovcnt : IOV_MAX);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        iov_advance(&iov, &iovcnt, (size_t)n);
    }
    return 0;
}

static int write_full(int fd, struct iovec *iov, int iovcnt)
{
    return write_chunked(fd, iov, iovcnt, 0, NULL);
}

/* a page in a hole of the source's RAM file reads as zero: no need to read it */
static inline int in_hole(struct mg_demand_src *d, uint64_t page)
{
    return d->holes && page < __atomic_load_n(&d->holes_end, __ATOMIC_ACQUIRE) && test_bit(d->holes, page);
}

/* bits (nb / 8 bytes): bit b set when block b of the page at src is all zero */
static void scan_blocks(const uint8_t *src, uint64_t nb, uint64_t bs, uint8_t *bits)
{
    memset(bits, 0, nb / 8);
    for (uint64_t b = 0; b < nb; b++) {
        const uint8_t *p = src + b * bs;
        if (b + 2 < nb)
            __builtin_prefetch(p + 2 * bs);
        if (mg_is_zero(p, bs))
            bits[b >> 3] |= (uint8_t)(1u << (b & 7));
    }
}

void mg_scan_blocks(struct mg_demand_src *d, uint64_t first, uint64_t count)
{
    uint64_t ps = d->page_size, bs = d->block_size;
    if (!d->block_bits || !bs || ps <= bs)
        return;
    uint64_t nb = ps / bs;
    for (uint64_t p = first; p < first + count && p < d->npages; p++) {
        if (test_bit(d->scanned, p) || in_hole(d, p))   /* a hole is all zero blocks, unread */
            continue;
        /* only this thread writes block_bits; readers look after the flag */
        scan_blocks((const uint8_t *)(uintptr_t)(d->base + p * ps), nb, bs, d->block_bits + p * (nb / 8));
        set_bit(d->scanned, p);   /* release: the bits are there before the flag */
    }
}

static void publish(uint64_t *done, uint64_t page)
{
    if (done)
        __atomic_store_n(done, page, __ATOMIC_RELEASE);   /* after the bits below it */
}

static int64_t find_holes(int fd, uint64_t size, uint64_t page_size, uint64_t *holes, uint64_t *done)
{
    uint64_t off = 0;
    int64_t found = 0;
    while (off < size) {
        off_t data = lseek(fd, (off_t)off, SEEK_DATA);
        if (data < 0 && errno == EINVAL)
            return 0;                       /* no SEEK_DATA here: all data */
        if (data < 0 && errno != ENXIO)
            return -errno;
        uint64_t end = data < 0 || (uint64_t)data > size ? size : (uint64_t)data;   /* ENXIO: no data after off */
        uint64_t first = (off + page_size - 1) / page_size, last = end / page_size;
        if (last > first) {
            change_range(holes, first, last - first, 1);
            found += (int64_t)(last - first);
        }
        publish(done, last);
        if (end >= size)
            break;
        off_t hole = lseek(fd, (off_t)end, SEEK_HOLE);
        if (hole < 0)
            return -errno;
        off = (uint64_t)hole;
        publish(done, off / page_size);     /* a page the next hole starts inside is data */
    }
    return found;
}

int64_t mg_find_holes(int fd, uint64_t size, uint64_t page_size, uint64_t *holes, uint64_t *done)
{
    int64_t rc = find_holes(fd, size, page_size, holes, done);
    publish(done, size / page_size);        /* pages not found to be holes are read */
    return rc;
}

static int64_t probe_holes(uint64_t addr, uint64_t size, uint64_t page_size, uint64_t *holes, uint64_t *done)
{
    int64_t found = 0;
    for (uint64_t p = 0; p < size / page_size; p++) {
        int rc;
        do
            rc = madvise((void *)(uintptr_t)(addr + p * page_size), page_size, MADV_POPULATE_READ);
        while (rc < 0 && errno == EINTR);
        if (rc < 0 && errno != EFAULT)
            return -errno;
        if (rc < 0) {
            set_bit(holes, p);
            found++;
        }
        publish(done, p + 1);
    }
    return found;
}

int64_t mg_probe_holes(uint64_t addr, uint64_t size, uint64_t page_size, uint64_t *holes, uint64_t *done)
{
    int64_t rc = probe_holes(addr, size, page_size, holes, done);
    publish(done, size / page_size);
    return rc;
}

/* A large page's zero-block bitmap: every block zero for a hole (the caller
 * decided, once), the scan's when it got there first, else found now into
 * scratch (nb / 8 bytes). */
static uint8_t *page_block_bits(struct mg_demand_src *d, uint64_t page, int hole, uint8_t *scratch)
{
    uint64_t nb = d->page_size / d->block_size;
    if (hole) {
        memset(scratch, 0xff, nb / 8);
        return scratch;
    }
    if (d->block_bits && test_bit(d->scanned, page))
        return d->block_bits + page * (nb / 8);
    scan_blocks((const uint8_t *)(uintptr_t)(d->base + page * d->page_size), nb, d->block_size, scratch);
    return scratch;
}

static int send_reply(struct mg_demand_src *d, uint64_t page, struct sparse_buf *sb)
{
    uint64_t ps = d->page_size, bs = d->block_size;
    const uint8_t *src = (const uint8_t *)(uintptr_t)(d->base + page * ps);
    struct reply_header h = { page, 0, (uint32_t)ps };
    struct iovec dense[2] = { { &h, sizeof(h) }, { (void *)src, ps } };
    struct iovec *iov = dense;
    int niov = 2;
    uint64_t payload = ps;
    int hole = in_hole(d, page);
    if (hole)
        __atomic_fetch_add(&d->hole_pages, 1, __ATOMIC_RELAXED);
    if (sb->iov) {
        /* a large page: its zero blocks, found ahead or now */
        uint64_t nb = ps / bs;
        uint8_t *bits = page_block_bits(d, page, hole, sb->bits);
        if (bits != sb->bits)
            d->prescanned++;
        uint64_t zeros = bits_set(bits, nb / 8);
        block_iov((uint8_t *)src, bits, nb, bs, sb->iov, &niov, 2, 0);
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
            iov[1].iov_base = bits;
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
    int rc = write_full(d->fd, iov, niov);
    if (rc < 0)
        return rc;
    set_bit(d->sent, page);
    if (!payload)
        d->zero++;
    else
        d->bytes += payload;
    return 0;
}

static int demand_serve(struct mg_demand_src *d, int stop_fd, struct sparse_buf *sb);

int mg_demand_serve(struct mg_demand_src *d, int stop_fd)
{
    struct sparse_buf sb = { NULL, NULL };
    int rc = d->block_size && d->page_size > d->block_size ? sparse_alloc(&sb, d->page_size / d->block_size) : 0;
    if (rc == 0)
        rc = demand_serve(d, stop_fd, &sb);
    sparse_free(&sb);
    return rc;
}

static int demand_serve(struct mg_demand_src *d, int stop_fd, struct sparse_buf *sb)
{
    uint64_t req[64];
    uint64_t have = 0;     /* bytes of req filled */
    uint64_t ahead_end = 0; /* pages before this were read ahead after the last request */
    for (;;) {
        ssize_t n = recv(d->fd, (uint8_t *)req + have, sizeof(req) - have, MSG_DONTWAIT);
        if (n == 0)
            return 0;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return -errno;
            int rc = wait_readable(d->fd, stop_fd);
            if (rc < 0)
                return rc;
            continue;
        }
        have += (uint64_t)n;
        uint64_t count = have / 8;
        for (uint64_t i = 0; i < count; i++) {
            uint64_t page = req[i];
            if (page >= d->npages) {
                d->bad_page = page;
                return -EPROTO;
            }
            int big = d->page_size > MG_YIELD_PAGE_SIZE;
            if (big)
                __atomic_store_n(&d->busy, 1, __ATOMIC_RELEASE);
            int rc = send_reply(d, page, sb);
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
            if (end > d->npages)
                end = d->npages;
            for (uint64_t p = page + 1; p < end && have - (i + 1) * 8 < 8; p++) {
                if (test_bit(d->sent, p))
                    continue;
                rc = send_reply(d, p, sb);
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

/* ---- raw push channel ---- */

struct run_header {
    uint64_t first;
    uint32_t count;
    uint32_t flags;
};

static int send_run(int fd, uint64_t base, uint64_t ps, uint64_t first, uint32_t count, int64_t *payload,
                    const uint32_t *hold, struct mg_demand_src *d)
{
    struct run_header h = { first, count, 0 };
    uint8_t bits[MG_PUSH_MAX_RUN / 8];
    struct iovec iov[2 + MG_PUSH_MAX_RUN];
    int niov = 2;
    uint64_t holes = 0;
    memset(bits, 0, sizeof(bits));
    iov[0].iov_base = &h;
    iov[0].iov_len = sizeof(h);
    iov[1].iov_base = bits;
    iov[1].iov_len = (count + 7) / 8;
    for (uint32_t i = 0; i < count; i++) {
        uint8_t *src = (uint8_t *)(uintptr_t)(base + (first + i) * ps);
        /* the zero check stalls on each page's first line: ask for later ones
         * early (16 pages ahead: 4-5% more push than 4 ahead, in interleaved
         * 1 GiB idle runs) */
        if (i + 16 < count)
            __builtin_prefetch(src + 16 * ps);
        if (d && in_hole(d, first + i)) {
            bits[i >> 3] |= (uint8_t)(1u << (i & 7));
            holes++;
            continue;
        }
        if (mg_is_zero(src, ps)) {
            bits[i >> 3] |= (uint8_t)(1u << (i & 7));
            continue;
        }
        /* consecutive non-zero pages are one iovec (never the header's two) */
        iov_append(iov, &niov, 2, src, ps);
        *payload += (int64_t)ps;
    }
    if (holes)
        __atomic_fetch_add(&d->hole_pages, holes, __ATOMIC_RELAXED);
    /* chunked: at most 64 iovecs and MG_HOLD_CHUNK bytes per writev */
    return write_chunked(fd, iov, niov, 1, hold);
}

/* A sparse run (MG_RUN_SPARSE): header, page bitmap, then for each non-zero
 * page its block bitmap and its non-zero blocks, one writev per page. The
 * bitmaps come from d's scan when it got there first. */
static int send_sparse_run(int fd, struct mg_demand_src *d, uint64_t first, uint32_t count, int64_t *payload,
                           const uint32_t *hold)
{
    uint64_t ps = d->page_size, bs = d->block_size, nb = ps / bs;
    struct run_header h = { first, count, MG_RUN_SPARSE };
    uint8_t pagebits[MG_PUSH_MAX_RUN / 8];
    uint8_t *found = malloc((uint64_t)count * (nb / 8));   /* bitmaps of pages the scan had not reached */
    struct iovec *iov = malloc((nb / 2 + 2) * sizeof(struct iovec));
    const uint8_t **bits = malloc(count * sizeof(*bits));
    int rc = found && iov && bits ? 0 : -ENOMEM;
    memset(pagebits, 0, sizeof(pagebits));
    uint64_t zero_blocks = 0, holes = 0;
    for (uint32_t i = 0; i < count && rc == 0; i++) {
        int hole = in_hole(d, first + i);
        holes += (uint64_t)hole;
        bits[i] = page_block_bits(d, first + i, hole, found + (uint64_t)i * (nb / 8));
        uint64_t zeros = bits_set(bits[i], nb / 8);
        if (zeros == nb)
            pagebits[i >> 3] |= (uint8_t)(1u << (i & 7));
        else {
            zero_blocks += zeros;
            *payload += (int64_t)((nb - zeros) * bs);
        }
    }
    if (rc == 0) {
        struct iovec head[2] = { { &h, sizeof(h) }, { pagebits, (count + 7) / 8 } };
        rc = write_chunked(fd, head, 2, 1, hold);
    }
    for (uint32_t i = 0; i < count && rc == 0; i++) {
        if ((pagebits[i >> 3] >> (i & 7)) & 1)
            continue;
        int niov = 1;
        iov[0].iov_base = (void *)bits[i];
        iov[0].iov_len = nb / 8;
        block_iov((uint8_t *)(uintptr_t)(d->base + (first + i) * ps), bits[i], nb, bs, iov, &niov, 1, 0);
        rc = write_chunked(fd, iov, niov, 1, hold);
    }
    __atomic_fetch_add(&d->push_zero_blocks, zero_blocks, __ATOMIC_RELAXED);
    __atomic_fetch_add(&d->hole_pages, holes, __ATOMIC_RELAXED);
    free(found);
    free(iov);
    free(bits);
    return rc;
}

int64_t mg_push_runs(int fd, uint64_t base, uint64_t page_size, const uint64_t *runs, uint64_t nruns,
                     const uint32_t *hold, struct mg_demand_src *sparse)
{
    int64_t payload = 0;
    struct mg_demand_src *d = sparse;   /* its hole map, whatever the page size */
    if (sparse && !(sparse->block_size && page_size > sparse->block_size))
        sparse = NULL;
    for (uint64_t r = 0; r < nruns; r++) {
        uint64_t first = runs[2 * r], left = runs[2 * r + 1];
        while (left) {
            uint32_t count = left < MG_PUSH_MAX_RUN ? (uint32_t)left : MG_PUSH_MAX_RUN;
            const uint32_t *h = page_size > MG_YIELD_PAGE_SIZE ? hold : NULL;
            int rc = sparse ? send_sparse_run(fd, sparse, first, count, &payload, h)
                            : send_run(fd, base, page_size, first, count, &payload, h, d);
            if (rc < 0)
                return rc;
            first += count;
            left -= count;
        }
    }
    return payload;
}

/* pwritev()s the claimed pages of a run into the RAM file: staged bytes for
 * non-zero pages, the zero page for zero pages; consecutive pages in one call. */
static int write_claimed(struct mg_space *s, uint64_t first, uint32_t count, const uint8_t *bits,
                         const uint8_t *mine, const uint8_t *staging)
{
    uint64_t ps = s->page_size;
    struct iovec iov[IOV_MAX];
    uint32_t i = 0;
    while (i < count) {
        if (!mine[i]) {
            i++;
            continue;
        }
        uint32_t j = i;
        int niov = 0;
        while (j < count && mine[j] && niov < IOV_MAX) {
            int zero = (bits[j >> 3] >> (j & 7)) & 1;
            iov[niov].iov_base = zero ? (void *)s->zero_page : (void *)(staging + (uint64_t)j * ps);
            iov[niov].iov_len = ps;
            niov++;
            j++;
        }
        uint64_t off = (first + i) * ps, left = (uint64_t)niov * ps;
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
struct run_hold {
    struct mg_space *s;
    uint64_t first;
    uint32_t count;
    const uint8_t *mine;
};

static int run_should_hold(const void *ctx)
{
    const struct run_hold *r = ctx;
    if (!__atomic_load_n(&r->s->demand_waiting, __ATOMIC_ACQUIRE))
        return 0;
    for (uint32_t i = 0; i < r->count; i++)
        if (r->mine[i] && test_bit(r->s->requested, r->first + i))
            return 0;
    return 1;
}

/* Where page i of a run lands: the alias (or staging) when this receiver
 * claimed it, else scratch (a duplicate, read and dropped). */
static uint8_t *run_dst(struct mg_space *s, uint64_t first, uint32_t i, int mine, uint8_t *staging,
                        uint8_t *scratch)
{
    if (!mine)
        return scratch;
    return staging ? staging + (uint64_t)i * s->page_size
                   : (uint8_t *)(uintptr_t)(s->alias_base + (first + i) * s->page_size);
}

/* A sparse run's pages after its page bitmap: each non-zero page is its block
 * bitmap and then its non-zero blocks (read where run_dst says, zero blocks
 * zeroed there unless the page is fresh). blocks: scratch for the iovecs and
 * one block bitmap. */
static int read_sparse_run(struct mg_space *s, int fd, int stop_fd, const struct run_header *h,
                           const uint8_t *bits, const uint8_t *mine, uint8_t *staging, uint8_t *scratch,
                           struct sparse_buf *blocks, struct run_hold *rh)
{
    for (uint32_t i = 0; i < h->count; i++) {
        if ((bits[i >> 3] >> (i & 7)) & 1)
            continue;
        uint64_t nb = s->page_size / s->block_size;
        int rc = read_full(fd, stop_fd, blocks->bits, nb / 8);
        if (rc <= 0)
            return rc == 0 ? -EPIPE : rc;
        uint8_t *dst = run_dst(s, h->first, i, mine[i], staging, scratch);
        int zero_ok = !mine[i] || (s->mode == MG_PLACE_CONTINUE && !staging && s->zero_fresh);
        rc = read_sparse(s, fd, stop_fd, dst, blocks->bits, blocks->iov, zero_ok, NULL,
                         s->page_size > MG_YIELD_PAGE_SIZE ? run_should_hold : NULL, rh);
        if (rc < 0)
            return rc;
    }
    return 1;
}

int mg_push_receive(struct mg_space *s, int fd, int stop_fd, uint8_t *scratch)
{
    uint64_t ps = s->page_size;
    uint8_t bits[MG_PUSH_MAX_RUN / 8];
    uint8_t mine[MG_PUSH_MAX_RUN];
    struct iovec iov[MG_PUSH_MAX_RUN];
    /* COPY mode needs each page's bytes in our memory before UFFDIO_COPY. A
     * prepared RAM file (every page allocated, the alias mapped) takes pages
     * straight into the alias. Otherwise, on shmem, CONTINUE mode stages too
     * and then pwritev()s into the RAM file: a full-page write allocates the
     * page-cache page without zeroing it and without a fault on the alias. */
    uint8_t *staging = NULL;
    int via_write = s->mode == MG_PLACE_CONTINUE && s->ram_fd >= 0 && ps == 4096 && !s->prepared;
    if (s->mode == MG_PLACE_COPY || via_write) {
        staging = malloc(ps * MG_PUSH_MAX_RUN);
        if (!staging)
            return -ENOMEM;
    }
    struct sparse_buf sb = { NULL, NULL }, *blocks = NULL;
    if (s->block_size && ps > s->block_size) {
        if (sparse_alloc(&sb, ps / s->block_size) < 0) {
            sparse_free(&sb);
            free(staging);
            return -ENOMEM;
        }
        blocks = &sb;
    }
    const uint32_t *hold = ps > MG_YIELD_PAGE_SIZE ? &s->demand_waiting : NULL;
    int result;
    for (;;) {
        struct run_header h;
        /* between runs, when this thread has claimed nothing: a claimed page
         * may be the very one a vCPU waits for */
        hold_while(hold);
        int rc = read_full(fd, stop_fd, (uint8_t *)&h, sizeof(h));
        if (rc <= 0) {
            result = rc;
            break;
        }
        if (h.count == 0 || h.count > MG_PUSH_MAX_RUN || h.first >= s->npages ||
            h.count > s->npages - h.first) {
            result = refuse(s, MG_BAD_PAGE, h.first, h.count);
            break;
        }
        int sparse = h.flags & MG_RUN_SPARSE;
        if ((h.flags & ~(uint32_t)MG_RUN_SPARSE) || (sparse && !blocks)) {
            result = refuse(s, MG_BAD_FLAGS, h.first, h.flags);
            break;
        }
        rc = read_full(fd, stop_fd, bits, (h.count + 7) / 8);
        if (rc <= 0) {
            result = rc == 0 ? -EPIPE : rc;
            break;
        }
        int niov = 0;
        for (uint32_t i = 0; i < h.count; i++) {
            uint64_t page = h.first + i;
            int zero = (bits[i >> 3] >> (i & 7)) & 1;
            mine[i] = (uint8_t)claim(s, page);
            if (zero || sparse)
                continue;
            iov_append(iov, &niov, 0, run_dst(s, h.first, i, mine[i], staging, scratch), ps);
        }
        struct run_hold rh = { s, h.first, h.count, mine };
        if (sparse)
            rc = read_sparse_run(s, fd, stop_fd, &h, bits, mine, staging, scratch, blocks, &rh);
        else
            rc = readv_chunked(fd, stop_fd, iov, niov, 0, 1, hold ? run_should_hold : NULL, &rh, NULL);
        if (rc < 0) {
            /* claimed pages that did not arrive whole: give them back */
            for (uint32_t i = 0; i < h.count; i++)
                if (mine[i])
                    unclaim(s, h.first + i);
            result = rc;
            break;
        }
        result = 0;
        if (via_write) {
            rc = write_claimed(s, h.first, h.count, bits, mine, staging);
            if (rc < 0) {
                s->error_page = h.first;
                result = rc;
                break;
            }
        }
        for (uint32_t i = 0; i < h.count; i++) {
            if (!mine[i])
                continue;
            uint64_t page = h.first + i;
            int zero = (bits[i >> 3] >> (i & 7)) & 1;
            const uint8_t *src = staging ? staging + (uint64_t)i * ps : NULL;
            if (zero && s->mode == MG_PLACE_CONTINUE && !via_write && !s->zero_fresh)
                memset((uint8_t *)(uintptr_t)(s->alias_base + page * ps), 0, ps);
            rc = finish_place(s, page, src, zero, MG_VIA_PUSH);
            if (rc < 0) {
                s->error_page = page;
                result = rc;
                break;
            }
        }
        if (result < 0)
            break;
        uint64_t bad;
        int64_t m = mg_map_pages(s, h.first, h.count, &bad);
        if (m < 0) {
            s->error_page = bad;
            result = (int)m;
            break;
        }
        if (__atomic_load_n(&s->stats.received, __ATOMIC_ACQUIRE) == s->npages) {
            result = MG_DEMAND_COMPLETE;
            break;
        }
    }
    sparse_free(&sb);
    free(staging);
    return result;
}
