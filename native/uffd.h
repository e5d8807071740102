/* userfaultfd: one thin wrapper per syscall or ioctl. Every function returns a
 * value >= 0 or -errno; none of them decides anything. */
#ifndef MIGRATE_UFFD_H
#define MIGRATE_UFFD_H
#include <stdint.h>

/* cdef-begin */
#define MG_UFFD_REGISTER_MISSING 1
#define MG_UFFD_REGISTER_WP 2
#define MG_UFFD_REGISTER_MINOR 4

#define MG_UFFD_EVENT_PAGEFAULT 18
#define MG_UFFD_EVENT_FORK 19
#define MG_UFFD_EVENT_REMAP 20
#define MG_UFFD_EVENT_REMOVE 21
#define MG_UFFD_EVENT_UNMAP 22

#define MG_UFFD_PAGEFAULT_FLAG_WRITE 1
#define MG_UFFD_PAGEFAULT_FLAG_WP 2
#define MG_UFFD_PAGEFAULT_FLAG_MINOR 4

#define MG_UFFD_FEATURE_SIGBUS 128
#define MG_UFFD_FEATURE_MISSING_HUGETLBFS 16
#define MG_UFFD_FEATURE_MISSING_SHMEM 32
#define MG_UFFD_FEATURE_THREAD_ID 256
#define MG_UFFD_FEATURE_MINOR_HUGETLBFS 512
#define MG_UFFD_FEATURE_MINOR_SHMEM 1024

/* One event read from a userfaultfd, flattened from struct uffd_msg. */
struct mg_uffd_event {
    uint8_t event;
    uint64_t flags;    /* pagefault flags */
    uint64_t address;  /* faulting address, or start for REMOVE/UNMAP */
    uint64_t arg;      /* thread id (pagefault), end (REMOVE/UNMAP) */
};

int mg_uffd_create_syscall(int flags);
int mg_uffd_create_dev(int flags);
/* UFFDIO_API: features in/out, ioctls out. */
int mg_uffd_api(int uffd, uint64_t *features, uint64_t *ioctls);
/* UFFDIO_REGISTER: ioctls out (which ioctls the range supports). */
int mg_uffd_register(int uffd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);
int mg_uffd_unregister(int uffd, uint64_t start, uint64_t len);
/* The three placement ioctls report bytes done through *done (also on error:
 * a partial count before an EEXIST or EAGAIN). */
int mg_uffd_continue(int uffd, uint64_t start, uint64_t len, int dontwake, int64_t *done);
int mg_uffd_copy(int uffd, uint64_t dst, uint64_t src, uint64_t len, int dontwake, int64_t *done);
int mg_uffd_zeropage(int uffd, uint64_t start, uint64_t len, int dontwake, int64_t *done);
int mg_uffd_wake(int uffd, uint64_t start, uint64_t len);
/* Reads up to max events; returns the count, 0 on EOF, -EAGAIN when none. */
int mg_uffd_read(int uffd, struct mg_uffd_event *out, int max);
/* poll() on fds for POLLIN; returns bitmask of readable fds (bit i = fds[i]). */
int mg_poll_in(const int *fds, int nfds, int timeout_ms);
/* cdef-end */

#endif
