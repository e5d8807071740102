/* Standalone test of the pattern image and guestsim (no userfaultfd here: the
 * guest RAM is a plain anonymous mapping filled beforehand).
 *
 * Build and run from the repo root:
 *   gcc -O2 -std=gnu11 -Wall -pthread -Inative native/tests/test_pattern.c \
 *       native/pattern.c native/guestsim.c -o /tmp/tp && /tmp/tp
 *
 * The zstd ratio check dlopen()s libzstd.so.1 and is skipped without it, so
 * the build needs no library beyond libc and pthreads. Exit status 0 = pass. */
#define _GNU_SOURCE
#include "pattern.h"
#include "guestsim.h"

#include <dlfcn.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define UNIT 4096
#define MiB (1024ULL * 1024)
#define GiB (1024ULL * MiB)

static int failures;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            failures++;                                                    \
            printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);         \
            printf(__VA_ARGS__);                                           \
            printf("\n");                                                  \
        }                                                                  \
    } while (0)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint8_t *map(uint64_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    return p;
}

static void test_determinism(void)
{
    uint8_t *a = map(64 * UNIT), *b = map(64 * UNIT);
    mg_pattern_fill(42, 1000, 64, 300000, 300000, a);
    mg_pattern_fill(42, 1000, 64, 300000, 300000, b);
    CHECK(memcmp(a, b, 64 * UNIT) == 0, "same seed, different image");

    /* Filling a sub-range gives the same bytes as the whole. */
    mg_pattern_fill(42, 1010, 5, 300000, 300000, b);
    CHECK(memcmp(a + 10 * UNIT, b, 5 * UNIT) == 0, "sub-range fill differs");

    /* Misaligned output buffer. */
    uint8_t *c = malloc(3 * UNIT + 3);
    mg_pattern_fill(42, 1000, 3, 300000, 300000, c + 3);
    CHECK(memcmp(a, c + 3, 3 * UNIT) == 0, "misaligned fill differs");
    CHECK(mg_pattern_check(42, 1000, 3, 300000, 300000, c + 3) == -1, "misaligned check");
    free(c);

    mg_pattern_fill(43, 1000, 64, 300000, 300000, b);
    int same = 0;
    for (int i = 0; i < 64; i++)
        if (mg_pattern_kind(42, 1000 + i, 300000, 300000) != MG_KIND_ZERO &&
            memcmp(a + i * UNIT, b + i * UNIT, UNIT) == 0)
            same++;
    CHECK(same == 0, "%d non-zero units equal across seeds", same);

    /* Word 0 of every non-zero unit names the unit; TEXT units differ. */
    for (int i = 0; i < 64; i++) {
        uint64_t w0;
        memcpy(&w0, a + i * UNIT, 8);
        int k = mg_pattern_kind(42, 1000 + i, 300000, 300000);
        if (k == MG_KIND_ZERO)
            CHECK(w0 == 0, "zero unit %d", i);
        else
            CHECK((w0 & 0x00ffffffffffffffULL) == 1000ULL + i && (w0 >> 56) == (k == MG_KIND_TEXT ? 'T' : 'R'),
                  "unit %d word0 %016" PRIx64, i, w0);
    }
    munmap(a, 64 * UNIT);
    munmap(b, 64 * UNIT);
}

static void test_fractions(void)
{
    const uint64_t n = 100000;
    uint64_t count[3] = {0, 0, 0};
    for (uint64_t u = 0; u < n; u++)
        count[mg_pattern_kind(7, u, 300000, 300000)]++;
    printf("kinds over %" PRIu64 " units (30%%/30%%/40%%): zero %" PRIu64 " random %" PRIu64
           " text %" PRIu64 "\n", n, count[MG_KIND_ZERO], count[MG_KIND_RANDOM], count[MG_KIND_TEXT]);
    /* sigma ~ 145 at p = 0.3; 1% = 1000 is ~7 sigma. */
    CHECK(count[MG_KIND_ZERO] > 29000 && count[MG_KIND_ZERO] < 31000, "zero %" PRIu64, count[MG_KIND_ZERO]);
    CHECK(count[MG_KIND_RANDOM] > 29000 && count[MG_KIND_RANDOM] < 31000, "random %" PRIu64, count[MG_KIND_RANDOM]);
    CHECK(count[MG_KIND_TEXT] > 39000 && count[MG_KIND_TEXT] < 41000, "text %" PRIu64, count[MG_KIND_TEXT]);

    int all = 1;
    for (uint64_t u = 0; u < 1000; u++) {
        all &= mg_pattern_kind(7, u, 1000000, 0) == MG_KIND_ZERO;
        all &= mg_pattern_kind(7, u, 0, 1000000) == MG_KIND_RANDOM;
        all &= mg_pattern_kind(7, u, 0, 0) == MG_KIND_TEXT;
    }
    CHECK(all, "ppm extremes");
}

static void test_check_finds_flip(void)
{
    const uint64_t n = 256, first = 5000;
    uint8_t *a = map(n * UNIT);
    mg_pattern_fill(9, first, n, 300000, 300000, a);
    CHECK(mg_pattern_check(9, first, n, 300000, 300000, a) == -1, "clean image");
    CHECK(mg_pattern_check(10, first, n, 300000, 300000, a) != -1, "other seed accepted");
    CHECK(mg_pattern_check(9, first + 1, n - 1, 300000, 300000, a + UNIT) == -1, "offset check");

    /* One flipped byte anywhere in a unit of each kind is found, at that unit. */
    int seen[3] = {0, 0, 0};
    for (uint64_t i = 0; i < n; i++) {
        int k = mg_pattern_kind(9, first + i, 300000, 300000);
        if (seen[k] >= 3)
            continue;
        seen[k]++;
        uint64_t off[] = {0, 7, 8, 100, 2047, 4095};
        for (unsigned j = 0; j < sizeof(off) / sizeof(off[0]); j++) {
            uint8_t *p = a + i * UNIT + off[j];
            *p ^= 0x10;
            int64_t bad = mg_pattern_check(9, first, n, 300000, 300000, a);
            CHECK(bad == (int64_t)(first + i), "kind %d unit %" PRIu64 " off %" PRIu64 ": got %" PRId64,
                  k, first + i, off[j], bad);
            *p ^= 0x10;
        }
    }
    CHECK(seen[0] && seen[1] && seen[2], "not every kind seen");

    /* Two units swapped: the lower one is reported. */
    uint8_t tmp[UNIT];
    memcpy(tmp, a + 40 * UNIT, UNIT);
    memcpy(a + 40 * UNIT, a + 41 * UNIT, UNIT);
    memcpy(a + 41 * UNIT, tmp, UNIT);
    int64_t bad = mg_pattern_check(9, first, n, 300000, 300000, a);
    int both_zero = mg_pattern_kind(9, first + 40, 300000, 300000) == MG_KIND_ZERO &&
                    mg_pattern_kind(9, first + 41, 300000, 300000) == MG_KIND_ZERO;
    CHECK(both_zero || bad == (int64_t)(first + 40), "swapped: got %" PRId64, bad);
    munmap(a, n * UNIT);
}

typedef size_t (*zstd_compress_fn)(void *, size_t, const void *, size_t, int);
typedef size_t (*zstd_bound_fn)(size_t);
typedef unsigned (*zstd_iserror_fn)(size_t);

static void test_compression(void)
{
    void *lib = dlopen("libzstd.so.1", RTLD_NOW);
    if (!lib) {
        printf("SKIP compression: libzstd.so.1 not found\n");
        return;
    }
    zstd_compress_fn compress = (zstd_compress_fn)dlsym(lib, "ZSTD_compress");
    zstd_bound_fn bound = (zstd_bound_fn)dlsym(lib, "ZSTD_compressBound");
    zstd_iserror_fn iserr = (zstd_iserror_fn)dlsym(lib, "ZSTD_isError");
    if (!compress || !bound || !iserr) {
        printf("SKIP compression: symbols missing\n");
        dlclose(lib);
        return;
    }
    uint8_t *dst = malloc(bound(UNIT));
    uint8_t *page = malloc(UNIT);
    /* Per-unit ratio, the way pages travel, and a 2 MiB run of one kind. */
    uint64_t n[3] = {0}, in[3] = {0}, outb[3] = {0};
    for (uint64_t u = 0; u < 3000; u++) {
        int k = mg_pattern_kind(11, u, 300000, 300000);
        mg_pattern_fill(11, u, 1, 300000, 300000, page);
        size_t c = compress(dst, bound(UNIT), page, UNIT, 1);
        CHECK(!iserr(c), "zstd error");
        n[k]++;
        in[k] += UNIT;
        outb[k] += c;
    }
    double text = (double)in[MG_KIND_TEXT] / (double)outb[MG_KIND_TEXT];
    double rnd = (double)in[MG_KIND_RANDOM] / (double)outb[MG_KIND_RANDOM];
    double zero = (double)in[MG_KIND_ZERO] / (double)outb[MG_KIND_ZERO];
    printf("zstd -1 per 4 KiB unit: text %.2fx, random %.3fx, zero %.0fx\n", text, rnd, zero);
    CHECK(text >= 4.0 && text <= 12.0, "text ratio %.2f", text);
    CHECK(rnd < 1.01, "random ratio %.3f", rnd);

    const uint64_t run = 512;
    uint8_t *big = malloc(run * UNIT);
    uint8_t *bigdst = malloc(bound(run * UNIT));
    mg_pattern_fill(11, 0, run, 0, 0, big);
    size_t c = compress(bigdst, bound(run * UNIT), big, run * UNIT, 1);
    double bigtext = (double)(run * UNIT) / (double)c;
    mg_pattern_fill(11, 0, run, 300000, 300000, big);
    c = compress(bigdst, bound(run * UNIT), big, run * UNIT, 1);
    printf("zstd -1 per 2 MiB: all text %.2fx, 30/30/40 mix %.2fx\n", bigtext,
           (double)(run * UNIT) / (double)c);
    CHECK(bigtext >= 4.0, "2 MiB text ratio %.2f", bigtext);
    free(big);
    free(bigdst);
    free(dst);
    free(page);
    dlclose(lib);
}

static void test_throughput(void)
{
    const uint64_t len = GiB, n = len / UNIT;
    uint8_t *a = map(len);
    memset(a, 1, len); /* fault the memory in first: time the pattern, not the kernel */
    const char *names[] = {"30/30/40 mix", "all text", "all random", "all zero"};
    uint32_t zp[] = {300000, 0, 0, 1000000}, rp[] = {300000, 0, 1000000, 0};
    for (int i = 0; i < 4; i++) {
        double t0 = now();
        mg_pattern_fill(5, 0, n, zp[i], rp[i], a);
        double t1 = now();
        int64_t bad = mg_pattern_check(5, 0, n, zp[i], rp[i], a);
        double t2 = now();
        CHECK(bad == -1, "1 GiB check %" PRId64, bad);
        printf("1 GiB %-13s fill %.3f s (%.2f GiB/s), check %.3f s (%.2f GiB/s)\n", names[i],
               t1 - t0, 1.0 / (t1 - t0), t2 - t1, 1.0 / (t2 - t1));
    }
    munmap(a, len);

    /* Fill into fresh memory, the way the source builds an image: includes faults. */
    a = map(len);
    double t0 = now();
    mg_pattern_fill(5, 0, n, 300000, 300000, a);
    double t1 = now();
    printf("1 GiB 30/30/40 mix fill into fresh anonymous memory %.3f s\n", t1 - t0);
    munmap(a, len);
}

static void test_guestsim(void)
{
    const uint64_t len = 64 * MiB;
    const uint64_t seed = 1234;
    const char *pname[] = {"seq", "random", "hotset"};
    uint64_t page_sizes[] = {4096, 2 * MiB};
    uint8_t *a = map(len);
    mg_pattern_fill(seed, 0, len / UNIT, 300000, 300000, a);

    for (int ps = 0; ps < 2; ps++) {
        uint64_t psz = page_sizes[ps], np = len / psz;
        uint32_t *lat = malloc(np * sizeof(*lat));
        for (int pat = 0; pat < 3; pat++) {
            int vc[] = {1, 4};
            for (int vi = 0; vi < 2; vi++) {
                struct mg_guestsim_result r;
                memset(lat, 0xff, np * sizeof(*lat));
                int rc = mg_guestsim_run(a, len, psz, seed, 300000, 300000, pat, vc[vi], lat, &r);
                uint64_t unset = 0;
                for (uint64_t i = 0; i < np; i++)
                    unset += lat[i] == UINT32_MAX;
                printf("guestsim %-6s page %7" PRIu64 " vcpus %d: rc %d touched %" PRIu64
                       " mismatches %" PRIu64 " first_bad %" PRId64 " %.3f s\n",
                       pname[pat], psz, vc[vi], rc, r.pages_touched, r.mismatches,
                       r.first_bad_unit, r.seconds);
                CHECK(rc == 0, "rc %d", rc);
                CHECK(r.pages_touched == np, "touched %" PRIu64, r.pages_touched);
                CHECK(r.mismatches == 0 && r.first_bad_unit == -1, "clean run mismatched");
                CHECK(unset == 0, "%" PRIu64 " latency entries not written", unset);
            }
        }

        /* One corrupted byte: exactly that unit, whatever the order. */
        uint64_t bad_unit = (len / UNIT) * 3 / 5 + 17;
        uint64_t off = bad_unit * UNIT + 999;
        a[off] ^= 0x55;
        for (int pat = 0; pat < 3; pat++) {
            struct mg_guestsim_result r;
            int rc = mg_guestsim_run(a, len, psz, seed, 300000, 300000, pat, 4, NULL, &r);
            CHECK(rc == 0 && r.mismatches == 1 && r.first_bad_unit == (int64_t)bad_unit,
                  "%s page %" PRIu64 ": rc %d mismatches %" PRIu64 " first_bad %" PRId64,
                  pname[pat], psz, rc, r.mismatches, r.first_bad_unit);
        }
        /* A second bad unit lower down: the lowest is reported, both counted. */
        a[5 * UNIT + 1] ^= 0x01;
        struct mg_guestsim_result r;
        int rc = mg_guestsim_run(a, len, psz, seed, 300000, 300000, MG_GUESTSIM_RANDOM, 4, NULL, &r);
        CHECK(rc == 0 && r.mismatches == 2 && r.first_bad_unit == 5,
              "two bad: mismatches %" PRIu64 " first_bad %" PRId64, r.mismatches, r.first_bad_unit);
        a[5 * UNIT + 1] ^= 0x01;
        a[off] ^= 0x55;

        /* WORKINGSET: a tenth of the pages, the same ones on every run, and
         * nothing else read (untouched pages keep their latency slot). */
        for (int vi = 1; vi <= 4; vi += 3) {
            struct mg_guestsim_result w;
            memset(lat, 0xff, np * sizeof(*lat));
            int rc = mg_guestsim_run(a, len, psz, seed, 300000, 300000, MG_GUESTSIM_WORKINGSET, vi, lat, &w);
            uint64_t set = 0, expect_set = 0;
            for (uint64_t i = 0; i < np; i++)
                set += lat[i] != UINT32_MAX;
            printf("guestsim workingset page %7" PRIu64 " vcpus %d: rc %d touched %" PRIu64 " %.3f s\n",
                   psz, vi, rc, w.pages_touched, w.seconds);
            CHECK(rc == 0 && w.mismatches == 0, "workingset rc %d mismatches %" PRIu64, rc, w.mismatches);
            CHECK(w.pages_touched == np / 10 && set == np / 10, "workingset touched %" PRIu64 " set %" PRIu64,
                  w.pages_touched, set);
            uint32_t *again = malloc(np * sizeof(*again));
            memset(again, 0xff, np * sizeof(*again));
            mg_guestsim_run(a, len, psz, seed, 300000, 300000, MG_GUESTSIM_WORKINGSET, vi, again, &w);
            for (uint64_t i = 0; i < np; i++)
                expect_set += (lat[i] != UINT32_MAX) == (again[i] != UINT32_MAX);
            CHECK(expect_set == np, "workingset chose other pages on a second run");
            free(again);
        }
        free(lat);
    }

    struct mg_guestsim_result r;
    CHECK(mg_guestsim_run(a, len, 4096, seed, 0, 0, 4, 1, NULL, &r) == -22, "bad pattern");
    CHECK(mg_guestsim_run(a, len, 4096, seed, 0, 0, 0, 0, NULL, &r) == -22, "zero vcpus");
    CHECK(mg_guestsim_run(a, len - 1, 4096, seed, 0, 0, 0, 1, NULL, &r) == -22, "ragged size");
    CHECK(mg_guestsim_run(a, len, 1000, seed, 0, 0, 0, 1, NULL, &r) == -22, "bad page size");
    /* More vCPUs than pages: idle vCPUs are fine. */
    CHECK(mg_guestsim_run(a, 2 * UNIT, 4096, seed, 300000, 300000, 2, 8, NULL, &r) == 0 &&
          r.pages_touched == 2 && r.mismatches == 0, "tiny run");
    munmap(a, len);
}

int main(void)
{
    test_determinism();
    test_fractions();
    test_check_finds_flip();
    test_compression();
    test_guestsim();
    test_throughput();
    if (failures) {
        printf("%d FAILED\n", failures);
        return 1;
    }
    printf("all passed\n");
    return 0;
}
