/* The destination during pre-copy: pages that arrive while the source guest
 * still runs are written into the RAM file's page cache through the alias and
 * never mapped; a page sent again overwrites its bytes. At the switch, the
 * pages that arrived and are not in the source's final written list become
 * received (then mapped in one pass, mg_map_pages); the others stay
 * unreceived and are fetched again. */
#ifndef MIGRATE_DEST_PRECOPY_H
#define MIGRATE_DEST_PRECOPY_H
#include <stdint.h>
#include "dest_space.h"

/* cdef-begin */
/* Writes n pages of a pre-copy batch through the alias: pages[i] (checked
 * against npages by the caller) is zero if bit i of zero_bits is set, else the
 * next page_size bytes of data (data_len exactly that many). Sets their bits
 * in staged. A page claimed already (placed: the switch happened) is refused
 * with -EPROTO (error_page). Returns pages written or -errno (*bad_page). */
int64_t mg_precopy_write(struct mg_space *s, uint64_t *staged, const uint64_t *pages, uint64_t n,
                         const uint8_t *zero_bits, const uint8_t *data, uint64_t data_len,
                         uint64_t *bad_page);
/* The switch: every page set in staged and not in written becomes claimed
 * and received (counted as pushed). Returns
 * how many. Nothing is mapped here. */
uint64_t mg_precopy_commit(struct mg_space *s, const uint64_t *staged, const uint64_t *written);
/* A raw pre-copy channel (after its hello): dense push runs (wire.h, flags 0),
 * each written through the alias and set in staged once whole (a page sent
 * again overwrites; its bit is clear while it is rewritten). Adds the pages to
 * *pages_in. fd is borrowed for the call. Returns 0 when the source ended the
 * stream between runs (all of it written), -EPROTO for a bad run (error_kind,
 * error_page, error_value: UINT64_MAX for a page placed already), -ESHUTDOWN when stop_fd is readable, -errno. */
int64_t mg_precopy_receive(struct mg_space *s, uint64_t *staged, int fd, int stop_fd, uint64_t *pages_in);
/* cdef-end */

#endif
