/* QEMU's device-state stream over a TLS device-state channel, relayed in C
 * with the GIL released (migrate.qemu): on the source from QEMU's pipe into
 * the channel's TLS session, on the destination from the session into the
 * destination QEMU's incoming pipe. A plaintext channel needs none of this:
 * the socket itself is handed to both QEMUs.
 *
 * On the wire, inside TLS: frames of a 4-byte big-endian length and that many
 * bytes of QEMU's stream (at most MG_DEVSTATE_FRAME); a frame of length 0
 * ends the stream, so the destination knows it arrived whole (a cut TLS
 * connection is not an end). */
#ifndef MIGRATE_DEVSTATE_H
#define MIGRATE_DEVSTATE_H
#include <stdint.h>

/* cdef-begin */
#define MG_DEVSTATE_FRAME 262144

struct mg_devstate_relay {
    int in;               /* send: QEMU's pipe (read end); recv: the TLS channel's fd */
    int out;              /* send: the TLS channel's fd; recv: QEMU's incoming pipe (write end) */
    int stop_fd;          /* readable: give up at once (-ECANCELED); -1: none */
    uint64_t max_bytes;   /* recv: the most the stream may carry (more: -EFBIG, nothing of that frame written) */
    uint64_t bytes;       /* bytes of QEMU's stream relayed so far (read by Python while it runs) */
    uint64_t first_ns;    /* CLOCK_REALTIME of the first byte relayed; 0 before */
    uint64_t last_ns;     /* of the last byte relayed */
};

/* Relays until QEMU's end of file on r->in, then sends the end frame.
 * 0, or -errno of the channel (-EBADF: r->out has no TLS session), or
 * -ECANCELED. r->in and r->out stay the caller's. */
int mg_devstate_send(struct mg_devstate_relay *r);
/* A plaintext channel into QEMU's pipe with splice(2) (no copy through user
 * space) until the channel's end (the source's FIN after its QEMU completed):
 * 0; -EFBIG once r->max_bytes were passed on and more comes (nothing of it
 * passed on); -EPIPE; -ECANCELED; else -errno of the channel. */
int mg_devstate_splice(struct mg_devstate_relay *r);
/* Relays until the end frame. 0; -EFBIG (over r->max_bytes); -EPROTO (a
 * frame over MG_DEVSTATE_FRAME); -ENODATA (the channel ended before the end
 * frame); -EPIPE (QEMU closed its pipe: it stopped reading); -ECANCELED;
 * else -errno of the channel. r->in and r->out stay the caller's. */
int mg_devstate_recv(struct mg_devstate_relay *r);
/* cdef-end */

#endif
