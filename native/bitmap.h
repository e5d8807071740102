/* Page bitmaps: arrays of uint64_t words, bit i = page i. Every access is
 * atomic, so the fault loop may read a bitmap while placement writes it, and
 * several senders may mark pages at once. */
#ifndef MIGRATE_BITMAP_H
#define MIGRATE_BITMAP_H
#include <stdint.h>

/* cdef-begin */
void mg_bitmap_set_range(uint64_t *map, uint64_t first, uint64_t count);
void mg_bitmap_clear_range(uint64_t *map, uint64_t first, uint64_t count);
int mg_bitmap_test(const uint64_t *map, uint64_t bit);
uint64_t mg_bitmap_count(const uint64_t *map, uint64_t first, uint64_t count);
/* First bit in [first, end) that is clear (or set), or end if none. */
uint64_t mg_bitmap_next_clear(const uint64_t *map, uint64_t first, uint64_t end);
uint64_t mg_bitmap_next_set(const uint64_t *map, uint64_t first, uint64_t end);
/* cdef-end */

/* The C callers use these inline forms (the fault loop and every receiver
 * test and set bits per page); bitmap.c exports them for Python. Setting
 * publishes (release) what was written before it. */

static inline void set_bit(uint64_t *map, uint64_t bit)
{
    __atomic_fetch_or(&map[bit >> 6], 1ULL << (bit & 63), __ATOMIC_RELEASE);
}

/* Sets the bit and says whether it was set already: the claim that makes one
 * thread of several the owner of a page. */
static inline int test_and_set_bit(uint64_t *map, uint64_t bit)
{
    uint64_t m = 1ULL << (bit & 63);
    return (__atomic_fetch_or(&map[bit >> 6], m, __ATOMIC_ACQ_REL) & m) != 0;
}

static inline int test_bit(const uint64_t *map, uint64_t bit)
{
    return (__atomic_load_n(&map[bit >> 6], __ATOMIC_ACQUIRE) >> (bit & 63)) & 1;
}

static inline void change_range(uint64_t *map, uint64_t first, uint64_t count, int set)
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

static inline void bitmap_set_range(uint64_t *map, uint64_t first, uint64_t count)
{
    change_range(map, first, count, 1);
}

static inline void bitmap_clear_range(uint64_t *map, uint64_t first, uint64_t count)
{
    change_range(map, first, count, 0);
}

static inline uint64_t next_bit(const uint64_t *map, uint64_t first, uint64_t end, int want_set)
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

static inline uint64_t bitmap_next_clear(const uint64_t *map, uint64_t first, uint64_t end)
{
    return next_bit(map, first, end, 0);
}

static inline uint64_t bitmap_next_set(const uint64_t *map, uint64_t first, uint64_t end)
{
    return next_bit(map, first, end, 1);
}

#endif
