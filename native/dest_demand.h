/* The destination's end of the demand channel: it receives the source's
 * replies to the fault loop's requests (dest_space writes the requests). */
#ifndef MIGRATE_DEST_DEMAND_H
#define MIGRATE_DEST_DEMAND_H
#include <stdint.h>
#include "dest_space.h"
#include "wire.h"

/* cdef-begin */
/* Reads demand replies from fd until EOF (frames: wire.h): each lands straight
 * in the alias mapping once the page is claimed (a sparse reply's zero blocks
 * are zeroed there unless the page is fresh). Each page is mapped (and its
 * waiters woken) as soon as it is placed. Returns MG_DEMAND_COMPLETE when
 * every page has been received, 0 on EOF, -ESHUTDOWN on stop_fd, -EPROTO for
 * a reply that breaks the protocol (error_kind, error_page, error_value say
 * what), -errno. scratch holds page_size bytes for duplicates and COPY mode.
 * fd and scratch are borrowed for the call. */
int mg_demand_receive(struct mg_space *s, int fd, int stop_fd, uint8_t *scratch);
/* cdef-end */

/* A sparse page's bytes after its block bitmap (bits), arriving on e: reads
 * the non-zero blocks into dst, and zeroes the zero blocks there unless
 * zero_ok (zero already: a fresh page, or scratch that is thrown away).
 * iov: room for the page's block iovecs (struct sparse_buf). 1, or < 0 as
 * wire_readv_rest. Both receivers read sparse pages with it. */
int read_sparse(const struct wire_end *e, const struct mg_space *s, uint8_t *dst, const uint8_t *bits,
                struct iovec *iov, int zero_ok);

#endif
