#define _GNU_SOURCE
#include "mem.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/statfs.h>
#include <unistd.h>

int mg_memfd_create(const char *name, unsigned int flags)
{
    int fd = memfd_create(name, flags);
    return fd < 0 ? -errno : fd;
}

int mg_mmap(uint64_t hint, uint64_t len, int prot, int flags, int fd, uint64_t offset, uint64_t *addr)
{
    void *p = mmap((void *)(uintptr_t)hint, len, prot, flags, fd, (off_t)offset);
    if (p == MAP_FAILED)
        return -errno;
    *addr = (uint64_t)(uintptr_t)p;
    return 0;
}

int mg_munmap(uint64_t addr, uint64_t len)
{
    return munmap((void *)(uintptr_t)addr, len) < 0 ? -errno : 0;
}

int mg_madvise(uint64_t addr, uint64_t len, int advice)
{
    return madvise((void *)(uintptr_t)addr, (size_t)len, advice) < 0 ? -errno : 0;
}

int mg_ftruncate(int fd, uint64_t len)
{
    return ftruncate(fd, (off_t)len) < 0 ? -errno : 0;
}

int mg_fstatfs(int fd, uint64_t *fs_type, uint64_t *block_size)
{
    struct statfs st;
    if (fstatfs(fd, &st) < 0)
        return -errno;
    *fs_type = (uint64_t)st.f_type;
    *block_size = (uint64_t)st.f_bsize;
    return 0;
}

void mg_memcpy(uint64_t dst, const void *src, uint64_t len)
{
    memcpy((void *)(uintptr_t)dst, src, len);
}

void mg_memset(uint64_t dst, int c, uint64_t len)
{
    memset((void *)(uintptr_t)dst, c, len);
}

void mg_read_bytes(uint64_t src, void *dst, uint64_t len)
{
    memcpy(dst, (const void *)(uintptr_t)src, len);
}

/* The push and the block scan call this on every page of guest RAM; a zero
 * page is read to its end. 256 bytes per step in vector registers, compiled
 * for AVX2 where the CPU has it (GCC picks the version at load time): on
 * zero pages in cache 41 GB/s against 22 one word at a time, out of memory
 * 25 against 22; the 1 GiB idle push with typical content (30% zero pages)
 * went 5.68 to 5.77 GB/s (median of 6 interleaved runs each). */
typedef uint64_t zero_vec __attribute__((vector_size(32), aligned(1)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
int mg_is_zero(const void *addr, uint64_t len)
{
    const uint8_t *p = addr;
    uint64_t i = 0;
    /* a non-zero page is nearly always decided by its first bytes */
    for (; i + 8 <= len && i < 64; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        if (w)
            return 0;
    }
    for (; i + 256 <= len; i += 256) {
        const zero_vec *v = (const zero_vec *)(p + i);
        zero_vec acc = (v[0] | v[1]) | (v[2] | v[3]) | ((v[4] | v[5]) | (v[6] | v[7]));
        if (acc[0] | acc[1] | acc[2] | acc[3])
            return 0;
    }
    for (; i < len; i++)
        if (p[i])
            return 0;
    return 1;
}

uint64_t mg_gather_pages(uint64_t base, uint64_t page_size, const uint64_t *pages, uint64_t n,
                         uint8_t *out, uint8_t *zero_bits, const uint64_t *holes, const uint64_t *holes_end,
                         uint64_t *hole_count)
{
    uint64_t off = 0;
    uint64_t known = holes ? __atomic_load_n(holes_end, __ATOMIC_ACQUIRE) : 0;
    memset(zero_bits, 0, (n + 7) / 8);
    for (uint64_t i = 0; i < n; i++) {
        const uint8_t *src = (const uint8_t *)(uintptr_t)(base + pages[i] * page_size);
        int hole = pages[i] < known && (holes[pages[i] >> 6] >> (pages[i] & 63)) & 1;
        if (hole)
            __atomic_fetch_add(hole_count, 1, __ATOMIC_RELAXED);
        if (hole || mg_is_zero(src, page_size)) {
            zero_bits[i >> 3] |= (uint8_t)(1u << (i & 7));
            continue;
        }
        memcpy(out + off, src, page_size);
        off += page_size;
    }
    return off;
}
