/* guestsim vCPU threads. All orders are decided before the threads start, from
 * the seed alone, so two runs with the same arguments fault pages in the same
 * per-vCPU order; only the interleaving between vCPUs varies. */
#define _GNU_SOURCE /* clock_gettime, CLOCK_MONOTONIC under -std=c11 */
#include "guestsim.h"
#include "pattern.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define HOT_PASSES 3
/* MG_GUESTSIM_WORKINGSET: a tenth of the pages is the working set, walked
 * WS_PASSES times; each touch of a page is followed by WS_WORK_ROUNDS rounds
 * of arithmetic over it (about 45 us a 4 KiB page here, unloaded). */
#define WS_PASSES 3
#define WS_WORK_ROUNDS 48

struct sim {
    uint8_t *base;            /* caller's guest RAM, mapped for the whole run */
    uint64_t page_size;
    uint64_t npages;
    uint64_t units_per_page;
    uint64_t seed;
    uint32_t zero_ppm, random_ppm;
    int pattern;
    int vcpus;
    uint32_t *lat_ns;         /* caller's, may be NULL */
    const uint64_t *perm;     /* MG_GUESTSIM_RANDOM: all pages, permuted */
    const uint8_t *hot;       /* HOTSET, WORKINGSET: hot[i] = 1 if page i is hot */
};

struct vcpu {
    pthread_t thread;
    const struct sim *sim;
    int index;
    uint64_t lo, hi;          /* contiguous slice (SEQ, HOTSET) */
    uint64_t *hot_list;       /* HOTSET, WORKINGSET: this vCPU's hot pages, owned by the run */
    uint64_t nhot;
    uint64_t rng;
    uint64_t touched;
    uint64_t mismatches;
    int64_t first_bad;
    uint64_t work;            /* WORKINGSET: the work's result, kept so it is not optimised away */
};

static inline uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Uniform in [0, n), n > 0 (Lemire's multiply-shift; the bias is < n / 2^64). */
static inline uint64_t below(uint64_t *s, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)splitmix(s) * n) >> 64);
}

static void shuffle(uint64_t *a, uint64_t n, uint64_t *s)
{
    for (uint64_t i = n; i > 1; i--) {
        uint64_t j = below(s, i);
        uint64_t t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline void load(const uint8_t *p)
{
    (void)*(const volatile uint64_t *)p;
}

/* The one timed access to a page, then a full check of its units. */
static void first_touch(struct vcpu *v, uint64_t page)
{
    const struct sim *s = v->sim;
    const uint8_t *p = s->base + page * s->page_size;

    uint64_t t0 = now_ns();
    load(p);
    uint64_t dt = now_ns() - t0;
    if (s->lat_ns)
        s->lat_ns[page] = dt > UINT32_MAX ? UINT32_MAX : (uint32_t)dt;
    v->touched++;

    uint64_t unit = page * s->units_per_page;
    uint64_t end = unit + s->units_per_page;
    while (unit < end) {
        int64_t bad = mg_pattern_check(s->seed, unit, end - unit, s->zero_ppm, s->random_ppm,
                                       s->base + unit * MG_PATTERN_UNIT);
        if (bad < 0)
            break;
        v->mismatches++;
        if (v->first_bad < 0 || bad < v->first_bad)
            v->first_bad = bad;
        unit = (uint64_t)bad + 1;
    }
}

/* The work a WORKINGSET vCPU does on a page it holds: rounds of a fold of
 * every 8-byte word of the page through a multiply, a fixed amount of
 * compute per page whatever its content (the page is already resident: the
 * first touch already faulted it in). */
static uint64_t work_on(const uint8_t *p, uint64_t page_size, uint64_t acc)
{
    const volatile uint64_t *w = (const volatile uint64_t *)p;
    for (int r = 0; r < WS_WORK_ROUNDS; r++)
        for (uint64_t i = 0; i < page_size / 8; i++)
            acc = (acc ^ w[i]) * 0x9e3779b97f4a7c15ULL + (uint64_t)r;
    return acc;
}

static void *vcpu_main(void *arg)
{
    struct vcpu *v = arg;
    const struct sim *s = v->sim;
    char name[16];

    /* the agent labels this thread's blocked time "vCPU <index>" by this name */
    snprintf(name, sizeof(name), "vcpu-%d", v->index);
    pthread_setname_np(pthread_self(), name);
    switch (s->pattern) {
    case MG_GUESTSIM_SEQ:
        for (uint64_t pg = v->lo; pg < v->hi; pg++)
            first_touch(v, pg);
        break;
    case MG_GUESTSIM_RANDOM:
        for (uint64_t i = (uint64_t)v->index; i < s->npages; i += (uint64_t)s->vcpus)
            first_touch(v, s->perm[i]);
        break;
    case MG_GUESTSIM_HOTSET:
        for (int pass = 0; pass < HOT_PASSES; pass++) {
            shuffle(v->hot_list, v->nhot, &v->rng);
            for (uint64_t i = 0; i < v->nhot; i++) {
                if (pass == 0)
                    first_touch(v, v->hot_list[i]);
                else
                    load(s->base + v->hot_list[i] * s->page_size);
            }
        }
        for (uint64_t pg = v->lo; pg < v->hi; pg++)
            if (!s->hot[pg])
                first_touch(v, pg);
        break;
    case MG_GUESTSIM_WORKINGSET:
        /* The same order every run (the seed's): the order a recorded run's
         * first touches replay. Cold pages are never read by the vCPU. */
        for (int pass = 0; pass < WS_PASSES; pass++) {
            shuffle(v->hot_list, v->nhot, &v->rng);
            for (uint64_t i = 0; i < v->nhot; i++) {
                const uint8_t *p = s->base + v->hot_list[i] * s->page_size;
                if (pass == 0)
                    first_touch(v, v->hot_list[i]);
                v->work = work_on(p, s->page_size, v->work);
            }
        }
        break;
    }
    return NULL;
}

int mg_guestsim_run(uint8_t *base, uint64_t size, uint64_t page_size, uint64_t seed,
                    uint32_t zero_ppm, uint32_t random_ppm, int pattern, int vcpus,
                    uint32_t *lat_ns, struct mg_guestsim_result *res)
{
    if (!base || !res || vcpus < 1 || page_size == 0 || page_size % MG_PATTERN_UNIT ||
        size % page_size || pattern < MG_GUESTSIM_SEQ || pattern > MG_GUESTSIM_WORKINGSET)
        return -EINVAL;

    struct sim s = {
        .base = base, .page_size = page_size, .npages = size / page_size,
        .units_per_page = page_size / MG_PATTERN_UNIT, .seed = seed,
        .zero_ppm = zero_ppm, .random_ppm = random_ppm, .pattern = pattern,
        .vcpus = vcpus, .lat_ns = lat_ns,
    };
    uint64_t rng = seed ^ 0x67756573747369ULL; /* "guestsi": orders independent of the image */
    uint64_t *perm = NULL, *hot_lists = NULL;
    uint8_t *hot = NULL;
    struct vcpu *v = calloc((size_t)vcpus, sizeof(*v));
    int ret = 0;
    if (!v)
        return -ENOMEM;

    for (int t = 0; t < vcpus; t++) {
        v[t].sim = &s;
        v[t].index = t;
        v[t].lo = s.npages * (uint64_t)t / (uint64_t)vcpus;
        v[t].hi = s.npages * (uint64_t)(t + 1) / (uint64_t)vcpus;
        v[t].rng = seed ^ (0x7663707500000000ULL + (uint64_t)t); /* "vcpu" + index */
        v[t].first_bad = -1;
    }

    if (pattern == MG_GUESTSIM_RANDOM && s.npages) {
        perm = malloc(s.npages * sizeof(*perm));
        if (!perm) {
            ret = -ENOMEM;
            goto out;
        }
        for (uint64_t i = 0; i < s.npages; i++)
            perm[i] = i;
        shuffle(perm, s.npages, &rng);
        s.perm = perm;
    } else if ((pattern == MG_GUESTSIM_HOTSET || pattern == MG_GUESTSIM_WORKINGSET) && s.npages) {
        uint64_t k = pattern == MG_GUESTSIM_HOTSET ? s.npages / 5 : s.npages / 10;
        if (k == 0)
            k = 1;
        hot = calloc(s.npages, 1);
        hot_lists = malloc(k * sizeof(*hot_lists));
        if (!hot || !hot_lists) {
            ret = -ENOMEM;
            goto out;
        }
        /* Floyd's sampling: exactly k distinct pages without a permutation. */
        for (uint64_t j = s.npages - k; j < s.npages; j++) {
            uint64_t r = below(&rng, j + 1);
            if (hot[r])
                hot[j] = 1;
            else
                hot[r] = 1;
        }
        uint64_t off = 0;
        for (int t = 0; t < vcpus; t++) {
            v[t].hot_list = hot_lists + off;
            for (uint64_t pg = v[t].lo; pg < v[t].hi; pg++)
                if (hot[pg])
                    hot_lists[off++] = pg;
            v[t].nhot = (uint64_t)(hot_lists + off - v[t].hot_list);
        }
        s.hot = hot;
    }

    uint64_t t0 = now_ns();
    int started = 0;
    for (; started < vcpus; started++) {
        int err = pthread_create(&v[started].thread, NULL, vcpu_main, &v[started]);
        if (err) {
            ret = -err;
            break;
        }
    }
    /* Started vCPUs use s, v and the order arrays: join them even on failure. */
    for (int t = 0; t < started; t++)
        pthread_join(v[t].thread, NULL);
    uint64_t t1 = now_ns();

    memset(res, 0, sizeof(*res));
    res->first_bad_unit = -1;
    for (int t = 0; t < started; t++) {
        res->pages_touched += v[t].touched;
        res->mismatches += v[t].mismatches;
        if (v[t].first_bad >= 0 &&
            (res->first_bad_unit < 0 || v[t].first_bad < res->first_bad_unit))
            res->first_bad_unit = v[t].first_bad;
    }
    res->seconds = (double)(t1 - t0) / 1e9;

out:
    free(perm);
    free(hot);
    free(hot_lists);
    free(v);
    return ret;
}
