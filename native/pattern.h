/* The deterministic guest RAM image: every 4096-byte unit is a pure function of
 * (seed, unit number, zero_ppm, random_ppm), so the source can generate the
 * image and the guest can verify every byte it received without either side
 * storing a copy. The unit is 4096 bytes whatever the backing page size; a
 * 2 MiB page holds 512 units.
 *
 * Exact definition (so another implementation can reproduce it):
 *   mix(z)        = splitmix64 finalizer:
 *                   z = (z ^ z>>30) * 0xbf58476d1ce4e5b9;
 *                   z = (z ^ z>>27) * 0x94d049bb133111eb; z ^ z>>31
 *   H(seed, u)    = mix(mix(seed ^ 0x6d696772617465ff) + u * 0x9e3779b97f4a7c15)
 *   H3(seed,u,k)  = mix(H(seed, u) ^ (k * 0xd6e8feb86659fd93))
 *   kind          = r = H(seed, u) % 1000000;
 *                   r < zero_ppm ? ZERO : r < zero_ppm + random_ppm ? RANDOM : TEXT
 *   word 0 of a non-zero unit (little-endian) = (tag << 56) | (u & 2^56-1),
 *                   tag 'T' (0x54) for TEXT, 'R' (0x52) for RANDOM, so a
 *                   misplaced page shows its unit number in a hexdump.
 *   RANDOM words 1..511: splitmix64 stream, state s = H3(seed, u, 2):
 *                   s += 0x9e3779b97f4a7c15; word = mix(s)
 *   TEXT: 64 lines of 8 words; a = H3(seed, u, 1), b = H3(seed, u, 3); line i:
 *                   w0 = word 0, w1 = seed, w2 = a, w3 = i * 0x0101010101010101,
 *                   w4 = H3(seed, u, 16 + i) & 0x0f0f0f0f0f0f0f0f,
 *                   w5 = b, w6 = a ^ b, w7 = 0x0a7478742d67696d ("mig-txt\n")
 *                   (zstd level 1 compresses it about 7x; RANDOM not at all).
 */
#ifndef MIGRATE_PATTERN_H
#define MIGRATE_PATTERN_H
#include <stdint.h>

/* cdef-begin */
#define MG_PATTERN_UNIT 4096
#define MG_KIND_ZERO 0
#define MG_KIND_TEXT 1
#define MG_KIND_RANDOM 2

/* Kind of one unit: MG_KIND_ZERO, MG_KIND_TEXT or MG_KIND_RANDOM. */
int mg_pattern_kind(uint64_t seed, uint64_t unit, uint32_t zero_ppm, uint32_t random_ppm);
/* Writes units [first_unit, first_unit + nunits) to out (nunits * 4096 bytes,
 * owned by the caller, any alignment). */
void mg_pattern_fill(uint64_t seed, uint64_t first_unit, uint64_t nunits,
                     uint32_t zero_ppm, uint32_t random_ppm, uint8_t *out);
/* Compares buf (nunits * 4096 bytes) with units [first_unit, first_unit + nunits).
 * Returns -1 if every unit matches, else the absolute unit number of the first
 * unit that differs. */
int64_t mg_pattern_check(uint64_t seed, uint64_t first_unit, uint64_t nunits,
                         uint32_t zero_ppm, uint32_t random_ppm, const uint8_t *buf);
/* cdef-end */

#endif
