/* Memory files and mappings: memfd, mmap, fallocate, plus the copies into the
 * alias mapping. Thin wrappers, -errno on failure. */
#ifndef MIGRATE_MEM_H
#define MIGRATE_MEM_H
#include <stdint.h>

/* cdef-begin */
#define MG_MFD_CLOEXEC 1
#define MG_MFD_HUGETLB 4
#define MG_MFD_HUGE_2MB 1409286144
#define MG_MFD_HUGE_1GB 2013265920

#define MG_PROT_NONE 0
#define MG_PROT_READ 1
#define MG_PROT_WRITE 2
#define MG_MAP_SHARED 1
#define MG_MAP_PRIVATE 2
#define MG_MAP_FIXED 16
#define MG_MAP_ANONYMOUS 32
#define MG_MAP_NORESERVE 16384
#define MG_MAP_POPULATE 32768

int mg_memfd_create(const char *name, unsigned int flags);
/* Returns 0 and the address through *addr, or -errno. */
int mg_mmap(uint64_t hint, uint64_t len, int prot, int flags, int fd, uint64_t offset, uint64_t *addr);
int mg_munmap(uint64_t addr, uint64_t len);
#define MG_MADV_POPULATE_READ 22
#define MG_MADV_POPULATE_WRITE 23
int mg_madvise(uint64_t addr, uint64_t len, int advice);
int mg_ftruncate(int fd, uint64_t len);
/* fstatfs f_type and f_bsize of an open file. */
int mg_fstatfs(int fd, uint64_t *fs_type, uint64_t *block_size);
/* memcpy/memset between raw addresses: used to fill the alias mapping. */
void mg_memcpy(uint64_t dst, const void *src, uint64_t len);
void mg_memset(uint64_t dst, int c, uint64_t len);
void mg_read_bytes(uint64_t src, void *dst, uint64_t len);
/* 1 if [addr, addr+len) is all zero bytes. */
int mg_is_zero(const void *addr, uint64_t len);
/* Gathers pages (indexes) of the mapping at base into out: zero pages only set
 * their bit in zero_bits (LSB first, (n+7)/8 bytes, cleared here), the others
 * are copied one after another. Pages set in holes (a page bitmap, or NULL)
 * below *holes_end (read atomically) are zero without being read, and counted
 * in *hole_count (atomically). Returns the bytes written to out, which must hold
 * n * page_size. */
uint64_t mg_gather_pages(uint64_t base, uint64_t page_size, const uint64_t *pages, uint64_t n,
                         uint8_t *out, uint8_t *zero_bits, const uint64_t *holes, const uint64_t *holes_end,
                         uint64_t *hole_count);
/* cdef-end */

#endif
