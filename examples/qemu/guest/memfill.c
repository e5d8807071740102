/*
 * memfill: guest workload for the QEMU migration examples.
 *
 * Runs inside the guest (started by the initramfs /init).  It
 *   1. allocates most of guest RAM (MemAvailable - reserve, or a size given
 *      on the command line) with an anonymous MAP_POPULATE mapping,
 *   2. writes into every 4 KiB page a deterministic pattern:
 *        word[i] of page p = splitmix64(p * 512 + i)
 *   3. prints "FILLED <pages>" on stdout (the serial console),
 *   4. waits for a trigger: one line read from stdin (init points stdin at
 *      /dev/ttyS0, so the host writes "\n" into QEMU's serial chardev),
 *   5. verifies every page and prints "VERIFY OK <pages> <ms>" or
 *      "VERIFY BAD <page> <word> <got> <want>", then goes back to 4.
 *
 * The writer (-w N): while it waits in 4, every tick (-t, 100 ms) it writes
 * N pages chosen at random, each with its next generation g:
 *        word[i] of page p = splitmix64((p * 512 + i) ^ (g << 40))
 * (generation 0 is the fill's pattern).  The generations live in a table in
 * the same buffer's memory, so they migrate with the pages; 5 checks every
 * page against its last generation, so a write lost by a migration (a page
 * sent before it was written and not again) shows as VERIFY BAD.  Each tick
 * it prints "TICK <n> <us>": the microseconds the tick's writes took, the
 * guest's own loop time, for the host to compare with and without a
 * migration running.  A trigger is answered between two ticks, never inside
 * one, so what 5 reads is a whole tick's writes.
 *
 * Usage: memfill [-m MiB] [-r reserve_MiB] [-n rounds] [-w pages] [-t ms]
 *   -m MiB      size of the buffer (default: MemAvailable - reserve)
 *   -r MiB      reserve left to the guest kernel (default 48)
 *   -n rounds   how many trigger/verify rounds (default 0 = forever)
 *   -w pages    pages the writer writes per tick (default 0: no writer)
 *   -t ms       the writer's tick (default 100)
 *
 * Build: gcc -static -O2 -o memfill memfill.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)

static inline uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* the words of page p at generation g (g = 0: the fill's pattern) */
static void fill_page(uint64_t *w, size_t p, uint32_t g)
{
    uint64_t base = (uint64_t)p * WORDS, salt = (uint64_t)g << 40;
    for (size_t i = 0; i < WORDS; i++)
        w[i] = splitmix64((base + i) ^ salt);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static long meminfo_kb(const char *key)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    long v = -1;
    size_t kl = strlen(key);
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, key, kl) && line[kl] == ':') {
            v = strtol(line + kl + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return v;
}

int main(int argc, char **argv)
{
    long size_mb = -1, reserve_mb = 48, rounds = 0, wpages = 0, tick_ms = 100;
    int opt;

    setvbuf(stdout, NULL, _IONBF, 0);
    while ((opt = getopt(argc, argv, "m:r:n:w:t:")) != -1) {
        switch (opt) {
        case 'm': size_mb = atol(optarg); break;
        case 'r': reserve_mb = atol(optarg); break;
        case 'n': rounds = atol(optarg); break;
        case 'w': wpages = atol(optarg); break;
        case 't': tick_ms = atol(optarg); break;
        default:
            fprintf(stderr, "usage: memfill [-m MiB] [-r reserve_MiB] [-n rounds] [-w pages] [-t ms]\n");
            return 2;
        }
    }
    if (size_mb <= 0) {
        long avail = meminfo_kb("MemAvailable");
        if (avail < 0)
            avail = meminfo_kb("MemFree");
        size_mb = avail / 1024 - reserve_mb;
        if (size_mb < 1)
            size_mb = 1;
    }
    size_t pages = (size_t)size_mb * (1024 * 1024 / PAGE);
    size_t len = pages * PAGE;

    printf("memfill: MemTotal %ld kB, MemAvailable %ld kB, filling %ld MiB (%zu pages)\n",
           meminfo_kb("MemTotal"), meminfo_kb("MemAvailable"), size_mb, pages);
    double t0 = now_ms();
    uint64_t *buf = mmap(NULL, len, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (buf == MAP_FAILED) {
        printf("memfill: mmap %zu bytes: %s\n", len, strerror(errno));
        return 1;
    }
    for (size_t p = 0; p < pages; p++)
        fill_page(buf + p * WORDS, p, 0);
    /* the generations: guest memory like the pages, so they migrate too */
    uint32_t *gen = mmap(NULL, pages * sizeof *gen, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (gen == MAP_FAILED) {
        printf("memfill: mmap the generation table: %s\n", strerror(errno));
        return 1;
    }
    printf("FILLED %zu %.0f ms\n", pages, now_ms() - t0);
    if (wpages > 0)
        printf("WRITER %ld pages every %ld ms\n", wpages, tick_ms);
    uint64_t rng = 0x243f6a8885a308d3ULL, ticks = 0;
    double next_tick = now_ms() + tick_ms;

    char line[256];
    for (long r = 0; rounds == 0 || r < rounds; r++) {
        printf("WAITING (send a line on the serial console to verify)\n");
        /* the writer: one tick's writes at a time, until a line arrives */
        while (wpages > 0) {
            struct pollfd pfd = {.fd = 0, .events = POLLIN};
            double left = next_tick - now_ms();
            if (poll(&pfd, 1, left > 0 ? (int)left + 1 : 0) > 0)
                break;
            if (now_ms() < next_tick)
                continue;
            double t = now_ms();
            for (long k = 0; k < wpages; k++) {
                rng = splitmix64(rng);
                size_t p = rng % pages;
                fill_page(buf + p * WORDS, p, ++gen[p]);
            }
            printf("TICK %llu %.0f\n", (unsigned long long)++ticks, (now_ms() - t) * 1e3);
            next_tick += tick_ms;
            if (next_tick < now_ms())   /* late (the VM was paused): no burst of ticks */
                next_tick = now_ms() + tick_ms;
        }
        if (!fgets(line, sizeof line, stdin)) {
            /* no usable stdin: fall back to sleeping, verify every 10 s */
            clearerr(stdin);
            sleep(10);
        }
        double t1 = now_ms();
        size_t bad = (size_t)-1, badw = 0;
        uint64_t got = 0, want = 0;
        for (size_t p = 0; p < pages && bad == (size_t)-1; p++) {
            const uint64_t *w = buf + p * WORDS;
            uint64_t base = (uint64_t)p * WORDS, salt = (uint64_t)gen[p] << 40;
            for (size_t i = 0; i < WORDS; i++) {
                uint64_t e = splitmix64((base + i) ^ salt);
                if (w[i] != e) {
                    bad = p; badw = i; got = w[i]; want = e;
                    break;
                }
            }
        }
        if (bad == (size_t)-1)
            printf("VERIFY OK %zu %.0f ms\n", pages, now_ms() - t1);
        else
            printf("VERIFY BAD %zu word %zu got %016llx want %016llx gen %u\n", bad, badw,
                   (unsigned long long)got, (unsigned long long)want, gen[bad]);
        next_tick = now_ms() + tick_ms;
    }
    return 0;
}
