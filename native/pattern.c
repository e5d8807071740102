/* The deterministic guest RAM image; the definition is spelled out in pattern.h.
 * Fill and check generate one 64-bit word at a time and never need a scratch
 * page, so check can run on a page the guest has only just faulted in. */
#include "pattern.h"

#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "pattern words are defined little-endian; add byte swaps for this host"
#endif

#define UNIT_WORDS (MG_PATTERN_UNIT / 8)
#define GOLDEN 0x9e3779b97f4a7c15ULL
#define TAG_TEXT 0x54ULL
#define TAG_RANDOM 0x52ULL
#define TEXT_TAIL 0x0a7478742d67696dULL /* "mig-txt\n" */

static inline uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t h2(uint64_t seed, uint64_t u)
{
    return mix(mix(seed ^ 0x6d696772617465ffULL) + u * GOLDEN);
}

static inline uint64_t h3_from(uint64_t hu, uint64_t k)
{
    return mix(hu ^ (k * 0xd6e8feb86659fd93ULL));
}

static inline int kind_of(uint64_t hu, uint32_t zero_ppm, uint32_t random_ppm)
{
    uint64_t r = hu % 1000000ULL;
    if (r < zero_ppm)
        return MG_KIND_ZERO;
    if (r < (uint64_t)zero_ppm + random_ppm)
        return MG_KIND_RANDOM;
    return MG_KIND_TEXT;
}

static inline uint64_t word0(uint64_t tag, uint64_t u)
{
    return (tag << 56) | (u & 0x00ffffffffffffffULL);
}

/* Unaligned-safe word access: the buffers come from Python and may be anywhere. */
static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

int mg_pattern_kind(uint64_t seed, uint64_t unit, uint32_t zero_ppm, uint32_t random_ppm)
{
    return kind_of(h2(seed, unit), zero_ppm, random_ppm);
}

/* Per-unit constants of a TEXT unit; line i adds its index and one hashed word. */
struct text_unit {
    uint64_t hu, w0, a, b, ab;
};

static inline void text_init(struct text_unit *t, uint64_t u, uint64_t hu)
{
    t->hu = hu;
    t->w0 = word0(TAG_TEXT, u);
    t->a = h3_from(hu, 1);
    t->b = h3_from(hu, 3);
    t->ab = t->a ^ t->b;
}

static void fill_unit(uint64_t seed, uint64_t u, uint32_t zero_ppm, uint32_t random_ppm,
                      uint8_t *out)
{
    uint64_t hu = h2(seed, u);
    switch (kind_of(hu, zero_ppm, random_ppm)) {
    case MG_KIND_ZERO:
        memset(out, 0, MG_PATTERN_UNIT);
        return;
    case MG_KIND_RANDOM: {
        uint64_t s = h3_from(hu, 2);
        st64(out, word0(TAG_RANDOM, u));
        for (unsigned i = 1; i < UNIT_WORDS; i++) {
            s += GOLDEN;
            st64(out + 8 * i, mix(s));
        }
        return;
    }
    default: {
        struct text_unit t;
        text_init(&t, u, hu);
        for (unsigned line = 0; line < MG_PATTERN_UNIT / 64; line++) {
            uint8_t *p = out + 64 * line;
            st64(p + 0, t.w0);
            st64(p + 8, seed);
            st64(p + 16, t.a);
            st64(p + 24, (uint64_t)line * 0x0101010101010101ULL);
            st64(p + 32, h3_from(hu, 16 + line) & 0x0f0f0f0f0f0f0f0fULL);
            st64(p + 40, t.b);
            st64(p + 48, t.ab);
            st64(p + 56, TEXT_TAIL);
        }
        return;
    }
    }
}

/* 1 if the unit at buf is exactly unit u of the image. */
static int check_unit(uint64_t seed, uint64_t u, uint32_t zero_ppm, uint32_t random_ppm,
                      const uint8_t *buf)
{
    uint64_t hu = h2(seed, u);
    switch (kind_of(hu, zero_ppm, random_ppm)) {
    case MG_KIND_ZERO: {
        uint64_t acc = 0;
        for (unsigned i = 0; i < UNIT_WORDS; i++)
            acc |= ld64(buf + 8 * i);
        return acc == 0;
    }
    case MG_KIND_RANDOM: {
        if (ld64(buf) != word0(TAG_RANDOM, u))
            return 0;
        uint64_t s = h3_from(hu, 2), diff = 0;
        for (unsigned i = 1; i < UNIT_WORDS; i++) {
            s += GOLDEN;
            diff |= ld64(buf + 8 * i) ^ mix(s);
        }
        return diff == 0;
    }
    default: {
        struct text_unit t;
        text_init(&t, u, hu);
        uint64_t diff = 0;
        for (unsigned line = 0; line < MG_PATTERN_UNIT / 64; line++) {
            const uint8_t *p = buf + 64 * line;
            diff |= ld64(p + 0) ^ t.w0;
            diff |= ld64(p + 8) ^ seed;
            diff |= ld64(p + 16) ^ t.a;
            diff |= ld64(p + 24) ^ ((uint64_t)line * 0x0101010101010101ULL);
            diff |= ld64(p + 32) ^ (h3_from(hu, 16 + line) & 0x0f0f0f0f0f0f0f0fULL);
            diff |= ld64(p + 40) ^ t.b;
            diff |= ld64(p + 48) ^ t.ab;
            diff |= ld64(p + 56) ^ TEXT_TAIL;
        }
        return diff == 0;
    }
    }
}

void mg_pattern_fill(uint64_t seed, uint64_t first_unit, uint64_t nunits,
                     uint32_t zero_ppm, uint32_t random_ppm, uint8_t *out)
{
    for (uint64_t i = 0; i < nunits; i++)
        fill_unit(seed, first_unit + i, zero_ppm, random_ppm, out + i * MG_PATTERN_UNIT);
}

int64_t mg_pattern_check(uint64_t seed, uint64_t first_unit, uint64_t nunits,
                         uint32_t zero_ppm, uint32_t random_ppm, const uint8_t *buf)
{
    for (uint64_t i = 0; i < nunits; i++)
        if (!check_unit(seed, first_unit + i, zero_ppm, random_ppm, buf + i * MG_PATTERN_UNIT))
            return (int64_t)(first_unit + i);
    return -1;
}
