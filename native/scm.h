/* File descriptors over a UNIX socket (SCM_RIGHTS). */
#ifndef MIGRATE_SCM_H
#define MIGRATE_SCM_H
#include <stdint.h>

/* cdef-begin */
/* Sends len bytes of buf with nfds descriptors attached to the first byte.
 * Returns bytes sent or -errno. The caller keeps its own copies of the fds. */
int mg_send_fds(int sock, const void *buf, uint64_t len, const int *fds, int nfds);
/* Receives up to len bytes; fds received go to fds[0..*nfds) (at most maxfds,
 * extra ones are closed). Returns bytes read (0 on EOF) or -errno. The caller
 * owns the received descriptors. */
int mg_recv_fds(int sock, void *buf, uint64_t len, int *fds, int maxfds, int *nfds);
/* cdef-end */

#endif
