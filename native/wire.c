#define _GNU_SOURCE
#include "wire.h"
#include "tls.h"
#include "uffd.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
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

static int tls_readv_all(const struct wire_end *e, struct iovec *iov, int niov, int eof_rc);
static int64_t tls_read_some(const struct wire_end *e, void *buf, uint64_t len);
static int tls_writev(const struct wire_end *e, struct iovec *iov, int niov);

/* Every read of both channels: recvmsg without blocking, then wait_data. */
static int readv_all(const struct wire_end *e, struct iovec *iov, int niov, int eof_rc)
{
    if (e->tls)
        return tls_readv_all(e, iov, niov, eof_rc);
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
    if (e->tls)
        return tls_read_some(e, buf, len);
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
    if (e->tls)
        return tls_writev(e, iov, niov);
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
    struct mg_tls *t = mg_tls_get(fd);
    if (t) {
        int rc = mg_tls_send_small(t, buf, len);
        mg_tls_put(t);
        return rc == 0;
    }
    /* MSG_NOSIGNAL: a source gone is a failed send, not a SIGPIPE */
    return send(fd, buf, len, MSG_NOSIGNAL) == (ssize_t)len;
}

/* ---- over TLS (tls.h): the same contracts, through the session ---- */

/* Blocks until fd can take more: 0, -ESHUTDOWN when stop_fd fired, -errno. */
static int wait_writable(int fd, int stop_fd)
{
    struct pollfd p[2] = { { fd, POLLOUT, 0 }, { stop_fd, POLLIN, 0 } };
    for (;;) {
        int n = poll(p, stop_fd >= 0 ? 2 : 1, -1);
        if (n < 0 && errno != EINTR)
            return -errno;
        if (n > 0)
            return (stop_fd >= 0 && p[1].revents) ? -ESHUTDOWN : 0;
    }
}

/* A TLS call that could not go on (rc < 0): -EAGAIN waits for data as a
 * plain read does (spinning when the end says so), -EINPROGRESS waits until
 * the socket takes more. Only called once OpenSSL asked for the socket, so
 * bytes it already holds decrypted (SSL_pending) were taken first. 0 to call
 * again, or -errno. */
static int tls_wait(const struct wire_end *e, int64_t rc)
{
    if (rc == -EAGAIN)
        return wait_data(e);
    if (rc == -EINPROGRESS)
        return wait_writable(e->fd, e->stop_fd);
    return (int)rc;
}

static int tls_readv_all(const struct wire_end *e, struct iovec *iov, int niov, int eof_rc)
{
    int got_any = 0;
    while (niov > 0) {
        if (!iov->iov_len) {
            iov++;
            niov--;
            continue;
        }
        /* a record (16 KiB at most) per call: the chunked hold is asked at
         * least as often as plaintext asks it */
        if (e->chunked)
            hold_while(e->hold, e->hold_ctx);
        int64_t n = mg_tls_read(e->tls, iov->iov_base, iov->iov_len);
        if (n == 0)
            return got_any ? -EPIPE : eof_rc;
        if (n < 0) {
            int rc = tls_wait(e, n);
            if (rc < 0)
                return rc;
            continue;
        }
        got_any = 1;
        iov_advance(&iov, &niov, (size_t)n);
    }
    return 1;
}

static int64_t tls_read_some(const struct wire_end *e, void *buf, uint64_t len)
{
    for (;;) {
        int64_t n = mg_tls_read(e->tls, buf, len);
        if (n >= 0)
            return n;
        int rc = tls_wait(e, n);
        if (rc < 0)
            return rc;
    }
}

/* All of [p, p+len) into the session (records; sent as its buffer fills). */
static int tls_write_all(const struct wire_end *e, const uint8_t *p, size_t len)
{
    while (len) {
        if (e->chunked)
            hold_while(e->hold, e->hold_ctx);
        int64_t n = mg_tls_write(e->tls, p, len);
        if (n < 0) {
            int rc = tls_wait(e, n);
            if (rc < 0)
                return rc;
            continue;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Small pieces (a header, a bitmap, a page's blocks) are gathered into one
 * record; a piece of a record or more goes as it is. */
#define TLS_GATHER 16384

static int tls_writev(const struct wire_end *e, struct iovec *iov, int niov)
{
    uint8_t gather[TLS_GATHER];
    size_t g = 0;
    int rc = 0;
    mg_tls_writer(e->tls, 1);
    while (rc == 0 && (niov > 0 || g)) {
        if (niov > 0 && g + iov->iov_len <= TLS_GATHER && iov->iov_len < TLS_GATHER) {
            memcpy(gather + g, iov->iov_base, iov->iov_len);
            g += iov->iov_len;
            iov++;
            niov--;
        } else if (g) {
            rc = tls_write_all(e, gather, g);
            g = 0;
        } else {
            rc = tls_write_all(e, iov->iov_base, iov->iov_len);
            iov++;
            niov--;
        }
    }
    /* what the session holds leaves now (a demand reply must not wait) */
    while (rc == 0 && (rc = mg_tls_flush(e->tls)) != 1)
        if (rc == -EINPROGRESS)
            rc = wait_writable(e->fd, -1);
    mg_tls_writer(e->tls, 0);
    return rc < 0 ? rc : 0;
}
