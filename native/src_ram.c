#define _GNU_SOURCE
#include "src_ram.h"
#include "mem.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22   /* Linux 5.14 */
#endif

/* ---- zero blocks of large pages ---- */

/* bits (nb / 8 bytes): bit b set when block b of the page at src is all zero */
static void scan_blocks(const uint8_t *src, uint64_t nb, uint64_t bs, uint8_t *bits)
{
    memset(bits, 0, nb / 8);
    for (uint64_t b = 0; b < nb; b++) {
        const uint8_t *p = src + b * bs;
        if (b + 2 < nb)
            __builtin_prefetch(p + 2 * bs);
        if (mg_is_zero(p, bs))
            bits[b >> 3] |= (uint8_t)(1u << (b & 7));
    }
}

void mg_scan_blocks(struct mg_src_ram *r, uint64_t first, uint64_t count)
{
    uint64_t bs = r->block_size;
    if (!r->block_bits || !src_sparse(r))
        return;
    uint64_t nb = r->page_size / bs;
    for (uint64_t p = first; p < first + count && p < r->npages; p++) {
        if (test_bit(r->scanned, p) || in_hole(r, p))   /* a hole is all zero blocks, unread */
            continue;
        /* only this thread writes block_bits; readers look after the flag */
        scan_blocks(src_page(r, p), nb, bs, r->block_bits + p * (nb / 8));
        set_bit(r->scanned, p);   /* release: the bits are there before the flag */
    }
}

const uint8_t *page_block_bits(const struct mg_src_ram *r, uint64_t page, int hole, uint8_t *scratch)
{
    uint64_t nb = r->page_size / r->block_size;
    if (hole) {
        memset(scratch, 0xff, nb / 8);
        return scratch;
    }
    if (r->block_bits && test_bit(r->scanned, page))
        return r->block_bits + page * (nb / 8);
    scan_blocks(src_page(r, page), nb, r->block_size, scratch);
    return scratch;
}

/* ---- holes of the RAM file ---- */

static void publish(uint64_t *done, uint64_t page)
{
    if (done)
        __atomic_store_n(done, page, __ATOMIC_RELEASE);   /* after the bits below it */
}

static int64_t find_holes(int fd, uint64_t size, uint64_t page_size, uint64_t *holes, uint64_t *done)
{
    uint64_t off = 0;
    int64_t found = 0;
    while (off < size) {
        off_t data = lseek(fd, (off_t)off, SEEK_DATA);
        if (data < 0 && errno == EINVAL)
            return 0;                       /* no SEEK_DATA here: all data */
        if (data < 0 && errno != ENXIO)
            return -errno;
        uint64_t end = data < 0 || (uint64_t)data > size ? size : (uint64_t)data;   /* ENXIO: no data after off */
        uint64_t first = (off + page_size - 1) / page_size, last = end / page_size;
        if (last > first) {
            bitmap_set_range(holes, first, last - first);
            found += (int64_t)(last - first);
        }
        publish(done, last);
        if (end >= size)
            break;
        off_t hole = lseek(fd, (off_t)end, SEEK_HOLE);
        if (hole < 0)
            return -errno;
        off = (uint64_t)hole;
        publish(done, off / page_size);     /* a page the next hole starts inside is data */
    }
    return found;
}

int64_t mg_find_holes(int fd, uint64_t size, uint64_t page_size, uint64_t *holes, uint64_t *done)
{
    int64_t rc = find_holes(fd, size, page_size, holes, done);
    publish(done, size / page_size);        /* pages not found to be holes are read */
    return rc;
}

static int64_t probe_holes(uint64_t addr, uint64_t size, uint64_t page_size, uint64_t *holes, uint64_t *done)
{
    int64_t found = 0;
    for (uint64_t p = 0; p < size / page_size; p++) {
        int rc;
        do
            rc = madvise((void *)(uintptr_t)(addr + p * page_size), page_size, MADV_POPULATE_READ);
        while (rc < 0 && errno == EINTR);
        /* EFAULT: the probe's userfaultfd refused to allocate the page (SIGBUS
         * feature): it is not in the file, a hole. Anything else fails. */
        if (rc < 0 && errno != EFAULT)
            return -errno;
        if (rc < 0) {
            set_bit(holes, p);
            found++;
        }
        publish(done, p + 1);
    }
    return found;
}

int64_t mg_probe_holes(uint64_t addr, uint64_t size, uint64_t page_size, uint64_t *holes, uint64_t *done)
{
    int64_t rc = probe_holes(addr, size, page_size, holes, done);
    publish(done, size / page_size);
    return rc;
}
