#define _GNU_SOURCE
#include "wire.h"
#include "uffd.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int sparse_alloc(struct sparse_buf *b, uint64_t nblocks)
{
    b->bits = malloc(nblocks / 8 + 1);
    b->iov = malloc((nblocks / 2 + 3) * sizeof(struct iovec));
    return b->bits && b->iov ? 0 : -ENOMEM;
}

void sparse_free(struct sparse_buf *b)
{
    free(b->bits);
    free(b->iov);
}

/* ---- holding back ---- */

void hold_while(hold_fn hold, const void *ctx)
{
    if (!hold || !hold(ctx))
        return;
    uint64_t until = now_ns() + MG_YIELD_MAX_US * 1000ull;
    struct timespec nap = { 0, 20000 };
    while (hold(ctx) && now_ns() < until)
        nanosleep(&nap, NULL);
}

int hold_flag(const void *flag)
{
    return flag && __atomic_load_n((const uint32_t *)flag, __ATOMIC_ACQUIRE) != 0;
}

/* Copies the front of iov, at most limit bytes, into out (up to max entries). */
static int iov_clip(const struct iovec *iov, int niov, size_t limit, struct iovec *out, int max)
{
    int k = 0;
    while (k < niov && k < max && limit) {
        out[k] = iov[k];
        if (out[k].iov_len > limit)
            out[k].iov_len = limit;
        limit -= out[k].iov_len;
        k++;
    }
    return k;
}

/* ---- waiting ---- */

/* Blocks until fd is readable: 0, -ESHUTDOWN when stop_fd fired, or -errno. */
static int wait_readable(int fd, int stop_fd)
{
    int fds[2] = { fd, stop_fd };
    int mask = mg_poll_in(fds, stop_fd >= 0 ? 2 : 1, -1);
    if (mask < 0 && mask != -EINTR)
        return mask;
    return (mask & 2) ? -ESHUTDOWN : 0;
}

/* Polls fd without sleeping for up to spin_ns: 1 once it is readable, 0 if it
 * did not become readable in time. */
static int spin_readable(int fd, uint64_t spin_ns)
{
    uint64_t until = now_ns() + spin_ns;
    struct pollfd p = { fd, POLLIN, 0 };
    do {
        if (poll(&p, 1, 0) > 0)
            return 1;
    } while (now_ns() < until);
    return 0;
}

/* Nothing to read yet (EAGAIN): spin if the end says so, else sleep until fd
 * is readable. 0 to read again, or -ESHUTDOWN / -errno. */
static int wait_data(const struct wire_end *e)
{
    if (e->spin && __atomic_load_n(e->spin, __ATOMIC_ACQUIRE) && spin_readable(e->fd, MG_SPIN_US * 1000ull))
        return 0;
    return wait_readable(e->fd, e->stop_fd);
}

/* ---- reading ---- */

/* A read that returned -1: EINTR reads again at once, EAGAIN (nothing yet)
 * waits for data; any other errno ends the channel, and the caller's caller
 * (wire.tcp.channel_end) says how. 0 to read again, or -errno. */
static int read_failed(const struct wire_end *e)
{
    if (errno == EINTR)
        return 0;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
        return -errno;
    int rc = wait_data(e);
    return rc < 0 ? rc : 0;
}

/* Every read of both channels: recvmsg without blocking, then wait_data. */
static int readv_all(const struct wire_end *e, struct iovec *iov, int niov, int eof_rc)
{
    int got_any = 0;
    struct iovec clip[64];
    while (niov > 0) {
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)(niov < IOV_MAX ? niov : IOV_MAX) };
        if (e->chunked) {
            hold_while(e->hold, e->hold_ctx);
            msg.msg_iov = clip;
            msg.msg_iovlen = (size_t)iov_clip(iov, niov, MG_HOLD_CHUNK, clip, 64);
        }
        ssize_t n = recvmsg(e->fd, &msg, MSG_DONTWAIT);
        if (n == 0)     /* the peer closed: between frames (eof_rc) or inside one */
            return got_any ? -EPIPE : eof_rc;
        if (n < 0) {
            int rc = read_failed(e);
            if (rc < 0)
                return rc;
            continue;
        }
        got_any = 1;
        iov_advance(&iov, &niov, (size_t)n);
    }
    return 1;
}

int wire_readv(const struct wire_end *e, struct iovec *iov, int niov)
{
    return readv_all(e, iov, niov, 0);
}

int wire_read(const struct wire_end *e, void *buf, uint64_t len)
{
    struct iovec iov = { buf, len };
    return readv_all(e, &iov, 1, 0);
}

int wire_readv_rest(const struct wire_end *e, struct iovec *iov, int niov)
{
    return readv_all(e, iov, niov, -EPIPE);
}

int wire_read_rest(const struct wire_end *e, void *buf, uint64_t len)
{
    struct iovec iov = { buf, len };
    return readv_all(e, &iov, 1, -EPIPE);
}

int64_t wire_read_some(const struct wire_end *e, void *buf, uint64_t len)
{
    for (;;) {
        ssize_t n = recv(e->fd, buf, len, MSG_DONTWAIT);
        if (n >= 0)
            return n;
        int rc = read_failed(e);
        if (rc < 0)
            return rc;
    }
}

/* ---- writing ---- */

int wire_writev(const struct wire_end *e, struct iovec *iov, int niov)
{
    struct iovec clip[64];
    while (niov > 0) {
        ssize_t n;
        if (e->chunked) {
            hold_while(e->hold, e->hold_ctx);
            n = writev(e->fd, clip, iov_clip(iov, niov, MG_HOLD_CHUNK, clip, 64));
        } else
            n = writev(e->fd, iov, niov < IOV_MAX ? niov : IOV_MAX);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;   /* a blocking socket: no EAGAIN; EPIPE/ECONNRESET end the channel */
        }
        iov_advance(&iov, &niov, (size_t)n);
    }
    return 0;
}

int wire_send_small(int fd, const void *buf, uint64_t len)
{
    /* MSG_NOSIGNAL: a source gone is a failed send, not a SIGPIPE */
    return send(fd, buf, len, MSG_NOSIGNAL) == (ssize_t)len;
}
