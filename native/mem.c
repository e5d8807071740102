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

int mg_is_zero(const void *addr, uint64_t len)
{
    const uint64_t *w = addr;
    uint64_t n = len / 8, acc = 0;
    for (uint64_t i = 0; i < n; i += 8) {
        uint64_t end = i + 8 < n ? i + 8 : n;
        for (uint64_t j = i; j < end; j++)
            acc |= w[j];
        if (acc)
            return 0;
    }
    const uint8_t *b = (const uint8_t *)addr + n * 8;
    for (uint64_t i = 0; i < len % 8; i++)
        if (b[i])
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
