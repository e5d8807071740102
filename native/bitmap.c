#include "bitmap.h"

/* The exported forms of bitmap.h's inline functions, for Python. */

void mg_bitmap_set_range(uint64_t *map, uint64_t first, uint64_t count)
{
    bitmap_set_range(map, first, count);
}

void mg_bitmap_clear_range(uint64_t *map, uint64_t first, uint64_t count)
{
    bitmap_clear_range(map, first, count);
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

uint64_t mg_bitmap_next_clear(const uint64_t *map, uint64_t first, uint64_t end)
{
    return bitmap_next_clear(map, first, end);
}

uint64_t mg_bitmap_next_set(const uint64_t *map, uint64_t first, uint64_t end)
{
    return bitmap_next_set(map, first, end);
}
