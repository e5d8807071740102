/* The destination's end of the raw push channels: it receives the source's
 * background runs of pages, one thread per channel. */
#ifndef MIGRATE_DEST_PUSH_H
#define MIGRATE_DEST_PUSH_H
#include <stdint.h>
#include "dest_space.h"

/* cdef-begin */
/* Reads runs (frames: wire.h) until EOF and places them: each non-zero page
 * is received straight into the alias mapping when this call claims it (into
 * scratch when it is a duplicate), zero pages are zeroed, then the run is
 * mapped with one CONTINUE. Returns MG_DEMAND_COMPLETE when every page has
 * been received, 0 on EOF, -ESHUTDOWN, -EPROTO (error_kind MG_BAD_PAGE:
 * error_page = first page, error_value = count; MG_BAD_FLAGS: error_value =
 * flags), -errno. scratch holds page_size bytes. fd and scratch are borrowed
 * for the call. */
int mg_push_receive(struct mg_space *s, int fd, int stop_fd, uint8_t *scratch);
/* cdef-end */

#endif
