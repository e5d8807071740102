/* See devstate.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <unistd.h>

#include "devstate.h"
#include "tls.h"

static uint64_t wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Waits until fd can do `want` or stop_fd is readable: 0, -ECANCELED, -errno. */
static int wait_or_stop(int fd, short want, int stop_fd)
{
    for (;;) {
        struct pollfd p[2] = { { fd, want, 0 }, { stop_fd, POLLIN, 0 } };
        int n = poll(p, stop_fd >= 0 ? 2 : 1, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (stop_fd >= 0 && p[1].revents)
            return -ECANCELED;
        if (p[0].revents)
            return 0;   /* (POLLERR/POLLHUP too: the next call says what) */
    }
}

/* An OpenSSL call's "not now" (-EAGAIN: wait readable, -EINPROGRESS:
 * writable) waited out: 0 to call again, else rc or the wait's error. */
static int tls_wait(struct mg_tls *t, int fd, int64_t rc, int stop_fd)
{
    (void)t;
    if (rc == -EAGAIN)
        return wait_or_stop(fd, POLLIN, stop_fd);
    if (rc == -EINPROGRESS)
        return wait_or_stop(fd, POLLOUT, stop_fd);
    return (int)rc;
}

/* buf whole into the session, flushed (the writer held throughout). */
static int tls_put(struct mg_tls *t, int fd, const uint8_t *buf, size_t len, int stop_fd)
{
    int rc = 0;
    mg_tls_writer(t, 1);
    while (len && rc == 0) {
        int64_t n = mg_tls_write(t, buf, len);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
        } else
            rc = tls_wait(t, fd, n, stop_fd);
    }
    while (rc == 0) {
        int f = mg_tls_flush(t);
        if (f == 1)
            break;
        rc = tls_wait(t, fd, f, stop_fd);
    }
    mg_tls_writer(t, 0);
    return rc;
}

/* Exactly len bytes from the session: 0, -ENODATA at its end, -errno. */
static int tls_get(struct mg_tls *t, int fd, uint8_t *buf, size_t len, int stop_fd)
{
    while (len) {
        int64_t n = mg_tls_read(t, buf, len);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
            continue;
        }
        if (n == 0)
            return -ENODATA;
        int rc = tls_wait(t, fd, n, stop_fd);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int mg_devstate_send(struct mg_devstate_relay *r)
{
    struct mg_tls *t = mg_tls_get(r->out);
    if (!t)
        return -EBADF;
    uint8_t *frame = malloc(4 + MG_DEVSTATE_FRAME);
    int rc = frame ? 0 : -ENOMEM;
    while (rc == 0) {
        if ((rc = wait_or_stop(r->in, POLLIN, r->stop_fd)) < 0)
            break;
        /* what QEMU wrote meanwhile goes in the same frame */
        ssize_t n = read(r->in, frame + 4, MG_DEVSTATE_FRAME);
        if (n < 0) {
            rc = errno == EINTR || errno == EAGAIN ? 0 : -errno;
            continue;
        }
        uint64_t now = wall_ns();
        if (n > 0) {
            if (!r->first_ns)
                r->first_ns = now;
            r->last_ns = now;
        }
        frame[0] = (uint8_t)(n >> 24);
        frame[1] = (uint8_t)(n >> 16);
        frame[2] = (uint8_t)(n >> 8);
        frame[3] = (uint8_t)n;
        rc = tls_put(t, r->out, frame, 4 + (size_t)n, r->stop_fd);
        if (rc == 0)
            __atomic_store_n(&r->bytes, r->bytes + (uint64_t)n, __ATOMIC_RELAXED);
        if (n == 0)
            break;   /* the end frame went out */
    }
    free(frame);
    mg_tls_put(t);
    return rc;
}

/* buf whole into the pipe (non-blocking or not). */
static int pipe_put(int fd, const uint8_t *buf, size_t len, int stop_fd)
{
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
        } else if (n < 0 && errno == EAGAIN) {
            int rc = wait_or_stop(fd, POLLOUT, stop_fd);
            if (rc < 0)
                return rc;
        } else if (n < 0 && errno != EINTR)
            return -errno;
    }
    return 0;
}

int mg_devstate_recv(struct mg_devstate_relay *r)
{
    struct mg_tls *t = mg_tls_get(r->in);
    if (!t)
        return -EBADF;
    uint8_t *buf = malloc(MG_DEVSTATE_FRAME);
    int rc = buf ? 0 : -ENOMEM;
    while (rc == 0) {
        uint8_t h[4];
        if ((rc = tls_get(t, r->in, h, 4, r->stop_fd)) < 0)
            break;
        uint32_t len = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
        if (len == 0)
            break;   /* the end: the stream arrived whole */
        if (len > MG_DEVSTATE_FRAME) {
            rc = -EPROTO;
            break;
        }
        /* checked before a byte of the frame is read: the bound holds whatever
         * the frames claim */
        if (r->bytes + len > r->max_bytes) {
            rc = -EFBIG;
            break;
        }
        if ((rc = tls_get(t, r->in, buf, len, r->stop_fd)) < 0)
            break;
        uint64_t now = wall_ns();
        if (!r->first_ns)
            r->first_ns = now;
        if ((rc = pipe_put(r->out, buf, len, r->stop_fd)) < 0)
            break;
        r->last_ns = wall_ns();
        __atomic_store_n(&r->bytes, r->bytes + len, __ATOMIC_RELAXED);
    }
    free(buf);
    mg_tls_put(t);
    return rc;
}

int mg_devstate_splice(struct mg_devstate_relay *r)
{
    for (;;) {
        int rc = wait_or_stop(r->in, POLLIN, r->stop_fd);
        if (rc < 0)
            return rc;
        uint64_t left = r->max_bytes - r->bytes;
        /* at the bound: one byte more (not its end) is one too many */
        size_t want = left ? (left < (1u << 20) ? (size_t)left : (1u << 20)) : 1;
        ssize_t n = left ? splice(r->in, NULL, r->out, NULL, want, SPLICE_F_NONBLOCK | SPLICE_F_MOVE)
                         : recv(r->in, &(char){0}, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n == 0)
            return 0;   /* the source's end: the stream arrived whole */
        if (n > 0 && !left)
            return -EFBIG;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                return -errno;
            /* readable, so QEMU's pipe is full: wait until it reads */
            if ((rc = wait_or_stop(r->out, POLLOUT, r->stop_fd)) < 0)
                return rc;
            continue;
        }
        uint64_t now = wall_ns();
        if (!r->first_ns)
            r->first_ns = now;
        r->last_ns = now;
        __atomic_store_n(&r->bytes, r->bytes + (uint64_t)n, __ATOMIC_RELAXED);
    }
}
