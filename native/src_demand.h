/* The source's end of the demand channel: the server that answers the
 * destination's requests for pages its guest faulted on. */
#ifndef MIGRATE_SRC_DEMAND_H
#define MIGRATE_SRC_DEMAND_H
#include <stdint.h>
#include "src_ram.h"

/* cdef-begin */
/* Answers requests with replies (frames: wire.h), straight from the RAM's
 * read-only mapping (sparse when ram->block_size is set, the page is larger
 * and some but not all of its blocks are zero). Marks each page in sent
 * (atomic), and publishes the last demanded page for the push scheduler's
 * locality. The Python Source owns this struct, ram and sent; fd is the
 * demand channel's socket, kept open by the Source for the whole call. */
struct mg_demand_src {
    int fd;
    struct mg_src_ram *ram; /* what is sent: the mapping, its holes and zero blocks */
    uint64_t *sent;         /* the push scheduler's bitmap */
    uint64_t last_page;     /* written atomically; read by the scheduler */
    uint64_t seq;           /* bumps with every request served */
    uint64_t bytes;         /* payload bytes sent */
    uint64_t zero;          /* zero pages answered with a flag */
    uint64_t bad_page;      /* an out-of-layout request, when -EPROTO */
    uint64_t readahead;     /* pages sent after a request because the faults look sequential */
    uint64_t window;        /* current readahead window (pages), grows on sequential faults */
    uint64_t max_window;    /* at most this many pages read ahead (0: no readahead) */
    uint32_t busy;          /* a demand reply of a large page is being written (push holds back) */
    uint64_t zero_blocks;   /* zero blocks left out of sparse replies */
    uint64_t prescanned;    /* sparse replies sent from a bitmap filled ahead */
};
/* Returns 0 when the destination closed the channel, -ESHUTDOWN on stop_fd,
 * -EPROTO for a request outside the layout, -errno. */
int mg_demand_serve(struct mg_demand_src *d, int stop_fd);
/* cdef-end */

#endif
