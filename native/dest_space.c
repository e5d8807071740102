#define _GNU_SOURCE
#include "dest_space.h"
#include "bitmap.h"
#include "mem.h"
#include "uffd.h"
#include "wire.h"

#include <errno.h>
#include <linux/userfaultfd.h>
#include <string.h>

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

/* ---- mapping ---- */

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
            bitmap_set_range(s->mapped, page, ok);
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
        p = bitmap_next_set(s->received, p, end);
        if (p >= end)
            break;
        uint64_t q = bitmap_next_clear(s->received, p, end);
        /* within [p, q) skip already-mapped pages */
        while (p < q) {
            p = bitmap_next_clear(s->mapped, p, q);
            if (p >= q)
                break;
            uint64_t e = bitmap_next_set(s->mapped, p, q);
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

int64_t mg_map_placed(struct mg_space *s, uint64_t first, uint64_t count, uint64_t *bad_page)
{
    if (!s->touched || s->mode == MG_PLACE_COPY)
        return mg_map_pages(s, first, count, bad_page);
    /* Pairs with the fault loop's fence: it logs a touch, then looks for the
     * page received; we marked the pages received, then look for touches.
     * One of the two sees the other, so a waiting guest is always mapped. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int64_t total = 0;
    uint64_t end = first + count > s->npages ? s->npages : first + count;
    for (uint64_t p = first; p < end; p++) {
        if (!test_bit(s->touched, p))
            continue;
        int64_t rc = mg_map_pages(s, p, 1, bad_page);
        if (rc < 0)
            return rc;
        total += rc;
    }
    return total;
}

/* ---- demand bookkeeping: in-flight requests and their latencies ---- */

/* A request's slot is found within this many slots of page % MG_INFLIGHT,
 * or it goes untimed: a lookup stops there too, where a page with no entry
 * (requested before its entry was added, or untimed) walked all MG_INFLIGHT
 * slots on every placement. Requests in flight are about one per blocked
 * vCPU thread, far fewer than the slots. */
#define INFLIGHT_PROBE 64

static void inflight_add(struct mg_space *s, uint64_t page)
{
    if (!s->inflight)
        return;
    uint64_t t = now_ns();
    for (uint64_t i = 0; i < INFLIGHT_PROBE; i++) {
        struct mg_inflight *e = &s->inflight[(page + i) % MG_INFLIGHT];
        uint64_t free_slot = UINT64_MAX;
        if (__atomic_compare_exchange_n(&e->page, &free_slot, page, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&e->t_ns, t, __ATOMIC_RELEASE);
            __atomic_fetch_add(&s->demand_waiting, 1, __ATOMIC_RELEASE);
            return;
        }
    }
    /* no free slot near: this request goes untimed */
}

static void inflight_done(struct mg_space *s, uint64_t page)
{
    if (!s->inflight)
        return;
    for (uint64_t i = 0; i < INFLIGHT_PROBE; i++) {
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

/* ---- blocked time per guest thread ---- */

uint64_t mg_now_ns(void)
{
    return now_ns();
}

/* The entry of thread tid, added when new (the fault loop's thread only). */
static struct mg_thread_block *thread_entry(struct mg_space *s, uint64_t tid)
{
    uint32_t n = __atomic_load_n(&s->nthreads, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n; i++)
        if (s->threads[i].tid == tid)
            return &s->threads[i];
    if (n >= MG_MAX_THREADS)
        return NULL;
    struct mg_thread_block *t = &s->threads[n];
    t->tid = tid;
    __atomic_store_n(&t->wait_page, UINT64_MAX, __ATOMIC_RELAXED);
    __atomic_store_n(&s->nthreads, n + 1, __ATOMIC_RELEASE);
    return t;
}

/* Ends t's wait for page, if it still waits for it: the receiver that placed
 * the page and the fault loop may both try, and the exchange lets one win. */
static void thread_unblock(struct mg_thread_block *t, uint64_t page)
{
    uint64_t expect = page;
    if (!__atomic_compare_exchange_n(&t->wait_page, &expect, UINT64_MAX, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return;
    uint64_t since = __atomic_load_n(&t->wait_since_ns, __ATOMIC_ACQUIRE);
    uint64_t now = now_ns();
    __atomic_fetch_add(&t->blocked_ns, now > since ? now - since : 0, __ATOMIC_RELAXED);
}

/* Page is received: every thread waiting for it runs again. */
static void threads_release(struct mg_space *s, uint64_t page)
{
    if (!s->threads)
        return;
    uint32_t n = __atomic_load_n(&s->nthreads, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n; i++)
        if (__atomic_load_n(&s->threads[i].wait_page, __ATOMIC_ACQUIRE) == page)
            thread_unblock(&s->threads[i], page);
}

/* Thread tid faulted on page, which is not received: it is blocked from now.
 * A wait still open is closed first (its page came by a path that did not
 * see it; a thread blocked in a fault cannot fault again). */
static void thread_wait(struct mg_space *s, uint64_t tid, uint64_t page)
{
    if (!s->threads)
        return;
    struct mg_thread_block *t = thread_entry(s, tid);
    if (!t) {
        __atomic_fetch_add(&s->threads_untracked, 1, __ATOMIC_RELAXED);
        return;
    }
    uint64_t old = __atomic_load_n(&t->wait_page, __ATOMIC_ACQUIRE);
    if (old != UINT64_MAX)
        thread_unblock(t, old);
    __atomic_fetch_add(&t->faults, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&t->wait_since_ns, now_ns(), __ATOMIC_RELEASE);
    __atomic_store_n(&t->wait_page, page, __ATOMIC_RELEASE);
}

static void send_request(struct mg_space *s, uint64_t page)
{
    int fd = __atomic_load_n(&s->demand_fd, __ATOMIC_ACQUIRE);
    if (fd < 0)
        return; /* no source yet: mg_demand_resend sends it when one connects */
    /* the fault loop and a resend may write concurrently: one small send each.
     * A send that fails means the source is gone: the page stays requested,
     * and mg_demand_resend asks again once a source reconnects. */
    if (wire_send_small(fd, &page, sizeof(page)))
        STAT_ADD(s, requests_sent, 1);
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
    while ((p = bitmap_next_set(s->requested, p, s->npages)) < s->npages) {
        if (!test_bit(s->received, p)) {
            send_request(s, p);
            count++;
        }
        p++;
    }
    return count;
}

/* ---- placement ---- */

struct place_target place_target(struct mg_space *s, enum placer who, int allocated)
{
    struct place_target t = { .s = s, .copy = s->mode == MG_PLACE_COPY };
    /* COPY mode needs each page's bytes in our memory before UFFDIO_COPY.
     * Pages allocated already (by the background allocation) are received
     * straight into the alias. Otherwise, on shmem, a receiver of runs stages
     * in CONTINUE mode too and then pwritev()s into the RAM file: a full-page
     * write allocates the page-cache page without zeroing it and without a
     * fault on the alias. */
    t.via_write = who == PLACER_RUN && !t.copy && s->ram_fd >= 0 && s->page_size == 4096 && !allocated;
    t.staged = t.copy || t.via_write;
    /* a page written through the alias is allocated first (ensure_allocated):
     * in a fresh file it reads zero until its claimant writes it */
    t.zero_skip = !t.staged && s->zero_fresh;
    return t;
}

void unclaim(const struct place_target *t, uint64_t page)
{
    /* Zero pages and zero blocks of a fresh file are never written (they read
     * as zero already): what did arrive in the alias is wiped first, or a
     * later sparse or zero copy would leave it in the page. */
    if (t->zero_skip)
        memset(alias_of(t->s, page), 0, t->s->page_size);
    bitmap_clear_range(t->s->claimed, page, 1);
}

int ensure_allocated(struct mg_space *s, uint64_t first, uint64_t count)
{
    uint64_t end = first + count, ps = s->page_size;
    if (!s->alias_base || bitmap_next_clear(s->allocated, first, end) >= end)
        return 0;
    /* Write-populating keeps what a page holds and allocates a zero page
     * where there is none (tmpfs and hugetlbfs), as the background
     * allocation does; a full backing is an errno here (EFAULT), where a
     * write through the alias would be SIGBUS. (fallocate would take the
     * file's lock, which a push receiver's pwritev holds for a whole run.) */
    int rc = mg_madvise(s->alias_base + first * ps, count * ps, MG_MADV_POPULATE_WRITE);
    if (rc < 0) {
        s->error_kind = MG_ALLOC_FAILED;
        s->error_page = first;
        s->error_value = count;
        return rc;
    }
    bitmap_set_range(s->allocated, first, count);
    return 0;
}

/* UFFDIO_COPY (ZEROPAGE) of one page. Where a copy's errnos become outcomes. */
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
        /* the page is mapped already (and carries the guest's data): wake
         * any waiter and move on, as continue_run does */
        STAT_ADD(s, eexist, 1);
        mg_uffd_wake(s->uffd, addr, s->page_size);
        return 0;
    }
    return rc;   /* -EAGAIN: the caller retries; anything else fails the placement */
}

int finish_place(const struct place_target *t, uint64_t page, const uint8_t *src, int zero, int via)
{
    struct mg_space *s = t->s;
    if (t->copy) {
        int rc;
        do
            rc = copy_page(s, page, src, zero);
        while (rc == -EAGAIN);   /* mm changing under us: copy again */
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
    /* Pairs with the fence in the fault loop: either this sees the page
     * requested, or the fault loop sees it received (a thread's wait ends
     * either way). */
    if (s->threads)
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (test_bit(s->requested, page)) {
        inflight_done(s, page);
        threads_release(s, page);
    }
    STAT_ADD(s, received, 1);
    return 0;
}

int refuse(struct mg_space *s, int kind, uint64_t page, uint64_t value)
{
    s->error_kind = kind;
    s->error_page = page;
    s->error_value = value;
    return -EPROTO;
}

int64_t mg_place_batch(struct mg_space *s, const uint64_t *pages, uint64_t n,
                       const uint8_t *zero_bits, const uint8_t *data, uint64_t data_len,
                       int via, uint64_t *bad_page)
{
    /* a batch's bytes are in our memory already: COPY mode copies from them */
    struct place_target t = place_target(s, PLACER_PAGE, 1);
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
        if (!t.staged) {
            uint8_t *dst = alias_of(s, page);
            int rc = ensure_allocated(s, page, 1);
            if (rc < 0) {
                bitmap_clear_range(s->claimed, page, 1);   /* (nothing was written) */
                *bad_page = page;
                return rc;
            }
            if (!zero)
                memcpy(dst, src, ps);
            else if (!t.zero_skip)
                memset(dst, 0, ps);
        }
        int rc = finish_place(&t, page, src, zero, via);
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
            if (s->touched && !test_and_set_bit(s->touched, (uint64_t)page))
            {
                /* the entry is stored before the count that publishes it */
                s->touch_log[s->touch_count] = (uint64_t)page;
                __atomic_store_n(&s->touch_count, s->touch_count + 1, __ATOMIC_RELEASE);
            }
            if (s->touched)
                __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* see mg_map_placed */
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
            thread_wait(s, ev[i].arg, (uint64_t)page);
            if (!test_and_set_bit(s->requested, (uint64_t)page)) {
                inflight_add(s, (uint64_t)page);
                send_request(s, (uint64_t)page);
            }
            /* see finish_place: a page received meanwhile ends the wait here */
            if (s->threads) {
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                if (test_bit(s->received, (uint64_t)page))
                    threads_release(s, (uint64_t)page);
            }
            if (k < max)
                need[k++] = (uint64_t)page;
        }
        if (k > 0)
            return k;
    }
}
