#define _GNU_SOURCE
#include "tls.h"
#include "wire.h"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* ---- OpenSSL, declared here (no headers on a fresh machine) ----
 * Opaque types, and the values of the macros used, from OpenSSL 3's public
 * headers (ssl.h, tls1.h, bio.h, x509v3.h): they are ABI, fixed for 3.x. */
typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;
typedef struct x509_st X509;
typedef struct X509_name_st X509_NAME;
typedef struct X509_VERIFY_PARAM_st X509_VERIFY_PARAM;
typedef struct bio_st BIO;
typedef struct bio_method_st BIO_METHOD;

#define SSL_ERROR_SSL 1
#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_WANT_WRITE 3
#define SSL_ERROR_SYSCALL 5
#define SSL_ERROR_ZERO_RETURN 6
#define SSL_VERIFY_PEER 0x01
#define SSL_VERIFY_FAIL_IF_NO_PEER_CERT 0x02
#define SSL_FILETYPE_PEM 1
#define SSL_CTRL_MODE 33
#define SSL_CTRL_SET_READ_AHEAD 41
#define SSL_CTRL_SET_MIN_PROTO_VERSION 123
#define SSL_CTRL_SET_MAX_PROTO_VERSION 124
#define SSL_MODE_ENABLE_PARTIAL_WRITE 0x1
#define SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER 0x2
#define SSL_OP_IGNORE_UNEXPECTED_EOF (1ull << 7)
#define TLS1_3_VERSION 0x0304
#define X509_V_OK 0
#define X509_CHECK_FLAG_NO_WILDCARDS 0x2
#define BIO_TYPE_SOURCE_SINK 0x0400
#define BIO_FLAGS_READ 0x01
#define BIO_FLAGS_WRITE 0x02
#define BIO_FLAGS_RWS 0x07
#define BIO_FLAGS_SHOULD_RETRY 0x08
#define BIO_CTRL_FLUSH 11

#define SSL_FUNCS(X) \
    X(ssl, const SSL_METHOD *, TLS_method, (void)) \
    X(ssl, SSL_CTX *, SSL_CTX_new, (const SSL_METHOD *)) \
    X(ssl, void, SSL_CTX_free, (SSL_CTX *)) \
    X(ssl, long, SSL_CTX_ctrl, (SSL_CTX *, int, long, void *)) \
    X(ssl, uint64_t, SSL_CTX_set_options, (SSL_CTX *, uint64_t)) \
    X(ssl, int, SSL_CTX_use_certificate_chain_file, (SSL_CTX *, const char *)) \
    X(ssl, int, SSL_CTX_use_PrivateKey_file, (SSL_CTX *, const char *, int)) \
    X(ssl, int, SSL_CTX_check_private_key, (const SSL_CTX *)) \
    X(ssl, int, SSL_CTX_load_verify_locations, (SSL_CTX *, const char *, const char *)) \
    X(ssl, void, SSL_CTX_set_verify, (SSL_CTX *, int, void *)) \
    X(ssl, int, SSL_CTX_set_num_tickets, (SSL_CTX *, size_t)) \
    X(ssl, int, SSL_CTX_set_ciphersuites, (SSL_CTX *, const char *)) \
    X(ssl, void, SSL_CTX_set_default_read_buffer_len, (SSL_CTX *, size_t)) \
    X(ssl, SSL *, SSL_new, (SSL_CTX *)) \
    X(ssl, void, SSL_free, (SSL *)) \
    X(ssl, void, SSL_set_bio, (SSL *, BIO *, BIO *)) \
    X(ssl, void, SSL_set_connect_state, (SSL *)) \
    X(ssl, void, SSL_set_accept_state, (SSL *)) \
    X(ssl, int, SSL_do_handshake, (SSL *)) \
    X(ssl, int, SSL_get_error, (const SSL *, int)) \
    X(ssl, int, SSL_read_ex, (SSL *, void *, size_t, size_t *)) \
    X(ssl, int, SSL_write_ex, (SSL *, const void *, size_t, size_t *)) \
    X(ssl, int, SSL_shutdown, (SSL *)) \
    X(ssl, int, SSL_set1_host, (SSL *, const char *)) \
    X(ssl, X509_VERIFY_PARAM *, SSL_get0_param, (SSL *)) \
    X(ssl, long, SSL_get_verify_result, (const SSL *)) \
    X(ssl, X509 *, SSL_get1_peer_certificate, (const SSL *)) \
    X(crypto, int, X509_VERIFY_PARAM_set1_ip_asc, (X509_VERIFY_PARAM *, const char *)) \
    X(crypto, const char *, X509_verify_cert_error_string, (long)) \
    X(crypto, int, X509_check_host, (X509 *, const char *, size_t, unsigned int, char **)) \
    X(crypto, void, X509_free, (X509 *)) \
    X(crypto, X509_NAME *, X509_get_subject_name, (const X509 *)) \
    X(crypto, char *, X509_NAME_oneline, (const X509_NAME *, char *, int)) \
    X(crypto, unsigned long, ERR_get_error, (void)) \
    X(crypto, void, ERR_error_string_n, (unsigned long, char *, size_t)) \
    X(crypto, const char *, ERR_reason_error_string, (unsigned long)) \
    X(crypto, void, ERR_clear_error, (void)) \
    X(crypto, int, BIO_get_new_index, (void)) \
    X(crypto, BIO_METHOD *, BIO_meth_new, (int, const char *)) \
    X(crypto, int, BIO_meth_set_write, (BIO_METHOD *, int (*)(BIO *, const char *, int))) \
    X(crypto, int, BIO_meth_set_read, (BIO_METHOD *, int (*)(BIO *, char *, int))) \
    X(crypto, int, BIO_meth_set_ctrl, (BIO_METHOD *, long (*)(BIO *, int, long, void *))) \
    X(crypto, BIO *, BIO_new, (const BIO_METHOD *)) \
    X(crypto, void, BIO_set_data, (BIO *, void *)) \
    X(crypto, void *, BIO_get_data, (BIO *)) \
    X(crypto, void, BIO_set_init, (BIO *, int)) \
    X(crypto, void, BIO_set_flags, (BIO *, int)) \
    X(crypto, void, BIO_clear_flags, (BIO *, int))

#define DECLARE(lib, ret, name, args) ret(*name) args;
static struct {
    SSL_FUNCS(DECLARE)
} F;

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static int loaded;
static BIO_METHOD *bio_method;

static int bio_write(BIO *b, const char *buf, int len);
static int bio_read(BIO *b, char *buf, int len);
static long bio_ctrl(BIO *b, int cmd, long num, void *ptr);

int mg_tls_load(char *why, size_t why_len)
{
    pthread_mutex_lock(&load_lock);
    int rc = 0;
    if (loaded)
        goto out;
    /* Python's ssl module has them loaded already: these find the same copy */
    void *ssl = dlopen("libssl.so.3", RTLD_NOW);
    void *crypto = dlopen("libcrypto.so.3", RTLD_NOW);
    if (!ssl || !crypto) {
        snprintf(why, why_len, "%s", dlerror());
        rc = -ENOENT;
        goto out;
    }
#define RESOLVE(lib, ret, name, args) \
    if (!(*(void **)&F.name = dlsym(lib, #name))) { \
        snprintf(why, why_len, "lib%s.so.3 has no %s (OpenSSL 3 is needed)", #lib, #name); \
        rc = -ENOENT; \
        goto out; \
    }
    SSL_FUNCS(RESOLVE)
    bio_method = F.BIO_meth_new(F.BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "migrate raw channel");
    if (!bio_method || !F.BIO_meth_set_write(bio_method, bio_write) || !F.BIO_meth_set_read(bio_method, bio_read)
        || !F.BIO_meth_set_ctrl(bio_method, bio_ctrl)) {
        snprintf(why, why_len, "BIO_meth_new failed");
        rc = -ENOMEM;
        goto out;
    }
    loaded = 1;
out:
    pthread_mutex_unlock(&load_lock);
    return rc;
}

/* OpenSSL's reason for the last failure (the first error on its queue, the
 * cause), or fallback. Empties the queue. */
static void reason(char *why, size_t why_len, const char *fallback)
{
    unsigned long first = F.ERR_get_error();
    while (F.ERR_get_error())
        ;
    /* a system error (OpenSSL 3's ERR_SYSTEM_FLAG): errno in the low bits */
    const char *r = first & (1ul << 31) ? strerror((int)(first & 0x7fffffff))
                  : first ? F.ERR_reason_error_string(first) : NULL;
    if (r)
        snprintf(why, why_len, "%s", r);
    else if (first)
        F.ERR_error_string_n(first, why, why_len);
    else
        snprintf(why, why_len, "%s", fallback);
}

/* ---- contexts ---- */

#define TLS_READ_AHEAD 65536

struct mg_tls_ctx {
    SSL_CTX *ctx;
    int server;
};

struct mg_tls_ctx *mg_tls_ctx_new(int server, const char *cert, const char *key, const char *ca,
                                  char *why, size_t why_len)
{
    if (!loaded && mg_tls_load(why, why_len) < 0)
        return NULL;
    F.ERR_clear_error();
    SSL_CTX *ctx = F.SSL_CTX_new(F.TLS_method());
    if (!ctx) {
        reason(why, why_len, "SSL_CTX_new failed");
        return NULL;
    }
    char r[256];
    if (F.SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        reason(r, sizeof(r), "no certificate");
        snprintf(why, why_len, "--tls-cert %s: %s", cert, r);
        goto fail;
    }
    if (F.SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        reason(r, sizeof(r), "no key");
        snprintf(why, why_len, "--tls-key %s: %s (it must be the key of --tls-cert %s)", key, r, cert);
        goto fail;
    }
    if (F.SSL_CTX_check_private_key(ctx) != 1) {
        reason(r, sizeof(r), "mismatch");
        snprintf(why, why_len, "--tls-key %s is not the key of --tls-cert %s: %s", key, cert, r);
        goto fail;
    }
    if (F.SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
        reason(r, sizeof(r), "no certificate");
        snprintf(why, why_len, "--tls-ca %s: %s", ca, r);
        goto fail;
    }
    F.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MIN_PROTO_VERSION, TLS1_3_VERSION, NULL);
    F.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MAX_PROTO_VERSION, TLS1_3_VERSION, NULL);
    /* AES-128-GCM first: the fastest with AES-NI (the others stay allowed) */
    F.SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
    /* both ends present a certificate, and both verify the other's */
    F.SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    /* a write returns once a record is out (wire.c advances its iovecs by it) */
    F.SSL_CTX_ctrl(ctx, SSL_CTRL_MODE, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, NULL);
    /* Read several records per recv (the push's throughput), but not many:
     * at the start of each record OpenSSL moves what is left of its read
     * buffer to the front, so a large buffer costs up to a copy of itself
     * per record when the receiver lags (a BIO of ours reading ahead
     * instead, and 256 KiB, measured no better on the push). */
    F.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_READ_AHEAD, 1, NULL);
    F.SSL_CTX_set_default_read_buffer_len(ctx, TLS_READ_AHEAD);
    /* A channel is never resumed: no tickets (a push receiver never reads
     * them). An EOF without close_notify ends the stream as in plaintext:
     * every frame is whole or refused (-EPIPE part way), and the pages a cut
     * channel did not bring are asked for again, as after any drop. */
    F.SSL_CTX_set_num_tickets(ctx, 0);
    F.SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
    struct mg_tls_ctx *c = calloc(1, sizeof(*c));
    if (!c) {
        snprintf(why, why_len, "out of memory");
        goto fail;
    }
    c->ctx = ctx;
    c->server = server;
    return c;
fail:
    F.SSL_CTX_free(ctx);
    return NULL;
}

void mg_tls_ctx_free(struct mg_tls_ctx *c)
{
    if (!c)
        return;
    F.SSL_CTX_free(c->ctx);
    free(c);
}

/* ---- sessions ---- */

struct mg_tls {
    SSL *ssl;
    int fd;
    int refs;               /* the fd table's, and each channel loop's (reg_lock) */
    int err;                /* errno of the socket call that failed last (the BIO) */
    pthread_mutex_t lock;   /* around every OpenSSL call on ssl, and wbuf */
    pthread_mutex_t wlock;  /* one writer at a time, from its first record to its flush: a write
                             * OpenSSL could not finish must be retried with the same bytes */
    uint8_t *wbuf;          /* records written, not sent yet: wbuf[woff, wlen) */
    size_t woff, wlen;
};

#define WBUF MG_HOLD_CHUNK

static void tls_free(struct mg_tls *t)
{
    F.SSL_free(t->ssl);     /* and its BIO */
    pthread_mutex_destroy(&t->lock);
    pthread_mutex_destroy(&t->wlock);
    free(t->wbuf);
    free(t);
}

/* Sends what wbuf holds without blocking: 1 all sent, 0 would block, -errno. */
static int wbuf_send(struct mg_tls *t)
{
    while (t->woff < t->wlen) {
        ssize_t n = send(t->fd, t->wbuf + t->woff, t->wlen - t->woff, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            t->err = errno;
            return -errno;
        }
        t->woff += (size_t)n;
    }
    t->woff = t->wlen = 0;
    return 1;
}

static int bio_write(BIO *b, const char *buf, int len)
{
    struct mg_tls *t = F.BIO_get_data(b);
    F.BIO_clear_flags(b, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY);
    /* Full, or part sent already: it is sent whole before more goes in (no
     * copying of what is left to the front; the socket takes a buffer at a
     * time). */
    if ((t->woff || t->wlen + (size_t)len > WBUF) && wbuf_send(t) < 0)
        return -1;
    size_t room = t->woff ? 0 : WBUF - t->wlen, n = (size_t)len < room ? (size_t)len : room;
    if (!n) {
        F.BIO_set_flags(b, BIO_FLAGS_WRITE | BIO_FLAGS_SHOULD_RETRY);
        return -1;
    }
    memcpy(t->wbuf + t->wlen, buf, n);
    t->wlen += n;
    return (int)n;
}

static int bio_read(BIO *b, char *buf, int len)
{
    struct mg_tls *t = F.BIO_get_data(b);
    F.BIO_clear_flags(b, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY);
    for (;;) {
        ssize_t n = recv(t->fd, buf, (size_t)len, MSG_DONTWAIT);
        if (n >= 0)
            return (int)n;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            F.BIO_set_flags(b, BIO_FLAGS_READ | BIO_FLAGS_SHOULD_RETRY);
        else
            t->err = errno;
        return -1;
    }
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)num;
    (void)ptr;
    if (cmd != BIO_CTRL_FLUSH)
        return 0;
    struct mg_tls *t = F.BIO_get_data(b);
    F.BIO_clear_flags(b, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY);
    int rc = wbuf_send(t);
    if (rc == 0)
        F.BIO_set_flags(b, BIO_FLAGS_WRITE | BIO_FLAGS_SHOULD_RETRY);
    return rc > 0 ? 1 : -1;
}

/* An OpenSSL call's result r (<= 0: failed) as wire.c reads it: -EAGAIN,
 * -EINPROGRESS, 0 (the end of the stream), -errno. Takes the error queue. */
static int64_t ssl_failed(struct mg_tls *t, int r)
{
    int e = F.SSL_get_error(t->ssl, r);
    switch (e) {
    case SSL_ERROR_WANT_READ:
        return -EAGAIN;
    case SSL_ERROR_WANT_WRITE:
        return -EINPROGRESS;
    case SSL_ERROR_ZERO_RETURN:
        return 0;
    case SSL_ERROR_SYSCALL:
        F.ERR_clear_error();
        return t->err ? -t->err : -ECONNRESET;
    default:
        /* a record that does not decrypt or authenticate, an alert: the
         * stream from this peer is broken, as after a reset */
        F.ERR_clear_error();
        return -ECONNRESET;
    }
}

int64_t mg_tls_read(struct mg_tls *t, void *buf, size_t len)
{
    size_t n = 0;
    pthread_mutex_lock(&t->lock);
    int r = F.SSL_read_ex(t->ssl, buf, len, &n);
    int64_t rc = r == 1 ? (int64_t)n : ssl_failed(t, r);
    /* a record OpenSSL wrote while reading (a key update's answer) goes now */
    if (t->wlen)
        wbuf_send(t);
    pthread_mutex_unlock(&t->lock);
    return rc;
}

int64_t mg_tls_write(struct mg_tls *t, const void *buf, size_t len)
{
    size_t n = 0;
    pthread_mutex_lock(&t->lock);
    int r = F.SSL_write_ex(t->ssl, buf, len, &n);
    int64_t rc = r == 1 ? (int64_t)n : ssl_failed(t, r);
    pthread_mutex_unlock(&t->lock);
    return rc == 0 ? -EPIPE : rc;
}

int mg_tls_flush(struct mg_tls *t)
{
    pthread_mutex_lock(&t->lock);
    int rc = wbuf_send(t);
    pthread_mutex_unlock(&t->lock);
    return rc == 0 ? -EINPROGRESS : rc;
}

/* ---- the fd table ---- */

#define REG_CHUNK 1024
#define REG_CHUNKS 256
static struct mg_tls **reg[REG_CHUNKS];   /* chunks are allocated once and never freed */
static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;

struct mg_tls *mg_tls_get(int fd)
{
    if (fd < 0 || fd >= REG_CHUNK * REG_CHUNKS)
        return NULL;
    struct mg_tls **c = __atomic_load_n(&reg[fd / REG_CHUNK], __ATOMIC_ACQUIRE);
    /* plaintext: one or two loads, no lock */
    if (!c || !__atomic_load_n(&c[fd % REG_CHUNK], __ATOMIC_ACQUIRE))
        return NULL;
    pthread_mutex_lock(&reg_lock);
    struct mg_tls *t = c[fd % REG_CHUNK];
    if (t)
        t->refs++;
    pthread_mutex_unlock(&reg_lock);
    return t;
}

void mg_tls_put(struct mg_tls *t)
{
    if (!t)
        return;
    pthread_mutex_lock(&reg_lock);
    int last = --t->refs == 0;
    pthread_mutex_unlock(&reg_lock);
    if (last)
        tls_free(t);
}

static int bind_fd(int fd, struct mg_tls *t)
{
    if (fd < 0 || fd >= REG_CHUNK * REG_CHUNKS)
        return -EMFILE;
    pthread_mutex_lock(&reg_lock);
    struct mg_tls **c = reg[fd / REG_CHUNK];
    if (!c) {
        c = calloc(REG_CHUNK, sizeof(*c));
        if (!c) {
            pthread_mutex_unlock(&reg_lock);
            return -ENOMEM;
        }
        __atomic_store_n(&reg[fd / REG_CHUNK], c, __ATOMIC_RELEASE);
    }
    struct mg_tls *old = c[fd % REG_CHUNK];
    t->refs = 1;
    __atomic_store_n(&c[fd % REG_CHUNK], t, __ATOMIC_RELEASE);
    int last = old && --old->refs == 0;
    pthread_mutex_unlock(&reg_lock);
    if (last)   /* an fd closed without unbind: its stale session goes */
        tls_free(old);
    return 0;
}

void mg_tls_unbind(int fd)
{
    if (fd < 0 || fd >= REG_CHUNK * REG_CHUNKS || !__atomic_load_n(&reg[fd / REG_CHUNK], __ATOMIC_ACQUIRE))
        return;
    pthread_mutex_lock(&reg_lock);
    struct mg_tls **c = reg[fd / REG_CHUNK];
    struct mg_tls *t = c[fd % REG_CHUNK];
    __atomic_store_n(&c[fd % REG_CHUNK], NULL, __ATOMIC_RELEASE);
    int last = t && --t->refs == 0;
    pthread_mutex_unlock(&reg_lock);
    if (last)
        tls_free(t);
}

/* ---- waiting with a deadline ---- */

/* Waits until fd is readable (want = POLLIN) or writable (POLLOUT), until
 * deadline (ns, CLOCK_MONOTONIC; 0: none). 0, -ETIMEDOUT, -errno. */
static int wait_fd(int fd, short want, uint64_t deadline)
{
    for (;;) {
        int ms = -1;
        if (deadline) {
            uint64_t now = now_ns();
            if (now >= deadline)
                return -ETIMEDOUT;
            ms = (int)((deadline - now + 999999) / 1000000);
        }
        struct pollfd p = { fd, want, 0 };
        int n = poll(&p, 1, ms);
        if (n > 0)
            return 0;
        if (n < 0 && errno != EINTR)
            return -errno;
    }
}

static uint64_t deadline_of(int timeout_ms)
{
    return timeout_ms < 0 ? 0 : now_ns() + (uint64_t)timeout_ms * 1000000ull;
}

/* ---- the handshake ---- */

/* Whether the peer's certificate names one of allow ("\n"-separated). */
static int allowed(X509 *cert, const char *allow)
{
    if (!*allow)
        return 1;
    const char *p = allow;
    while (*p) {
        const char *end = strchr(p, '\n');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        /* DNS SANs, or the CN when the certificate has none; no wildcards */
        if (n && F.X509_check_host(cert, p, n, X509_CHECK_FLAG_NO_WILDCARDS, NULL) == 1)
            return 1;
        p += n + (end ? 1 : 0);
    }
    return 0;
}

static void subject(X509 *cert, char *out, size_t out_len)
{
    char buf[256];
    if (!cert || !F.X509_NAME_oneline(F.X509_get_subject_name(cert), buf, sizeof(buf)))
        snprintf(buf, sizeof(buf), "(no certificate)");
    snprintf(out, out_len, "%s", buf);
}

/* In TLS 1.3 the client's handshake is done before the server has checked
 * the client's certificate: a refusal would only show at the first read. So
 * the server, once it has checked it (and its name), sends one byte, and the
 * client waits for it: a source learns at once, with OpenSSL's reason (the
 * alert the destination sent), that its certificate was refused. 0, -errno. */
#define ACCEPTED 0x01
static int accepted(struct mg_tls *t, int server, uint64_t deadline, char *why, size_t why_len)
{
    uint8_t b = ACCEPTED;
    for (;;) {
        size_t n = 0;
        int r = server ? F.SSL_write_ex(t->ssl, &b, 1, &n) : F.SSL_read_ex(t->ssl, &b, 1, &n);
        if (r == 1)
            break;
        int e = F.SSL_get_error(t->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            int rc = wait_fd(t->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline);
            if (rc < 0)
                return rc;
            continue;
        }
        if (e == SSL_ERROR_SYSCALL || e == SSL_ERROR_ZERO_RETURN) {
            reason(why, why_len, "the peer closed the connection");
            return t->err ? -t->err : -ECONNRESET;
        }
        reason(why, why_len, "refused");
        return -EPROTO;
    }
    if (!server && b != ACCEPTED) {
        snprintf(why, why_len, "the peer answered the handshake with %#x, not %#x", b, ACCEPTED);
        return -EPROTO;
    }
    int rc;
    while ((rc = wbuf_send(t)) == 0)
        if ((rc = wait_fd(t->fd, POLLOUT, deadline)) < 0)
            return rc;
    return rc < 0 ? rc : 0;
}

int mg_tls_handshake(struct mg_tls_ctx *c, int fd, const char *peer_name, const char *allow, int timeout_ms,
                     int *stage, char *why, size_t why_len)
{
    uint64_t deadline = deadline_of(timeout_ms);
    *stage = MG_TLS_STAGE_HANDSHAKE;
    why[0] = 0;
    struct mg_tls *t = calloc(1, sizeof(*t));
    if (!t || !(t->wbuf = malloc(WBUF))) {
        free(t);
        return -ENOMEM;
    }
    t->fd = fd;
    pthread_mutex_init(&t->lock, NULL);
    pthread_mutex_init(&t->wlock, NULL);
    F.ERR_clear_error();
    t->ssl = F.SSL_new(c->ctx);
    BIO *b = t->ssl ? F.BIO_new(bio_method) : NULL;
    if (!b) {
        reason(why, why_len, "out of memory");
        if (t->ssl)
            F.SSL_free(t->ssl);
        t->ssl = NULL;
        free(t->wbuf);
        free(t);
        return -ENOMEM;
    }
    F.BIO_set_data(b, t);
    F.BIO_set_init(b, 1);
    F.SSL_set_bio(t->ssl, b, b);   /* the SSL owns the BIO */
    int rc = 0;
    if (c->server)
        F.SSL_set_accept_state(t->ssl);
    else {
        struct in6_addr a;
        int ip = inet_pton(AF_INET, peer_name, &a) == 1 || inet_pton(AF_INET6, peer_name, &a) == 1;
        /* the destination's certificate must name the host the source meant */
        if (!*peer_name || (ip ? F.X509_VERIFY_PARAM_set1_ip_asc(F.SSL_get0_param(t->ssl), peer_name)
                               : F.SSL_set1_host(t->ssl, peer_name)) != 1) {
            snprintf(why, why_len, "cannot check the destination's name %s", peer_name);
            rc = -EINVAL;
            goto out;
        }
        F.SSL_set_connect_state(t->ssl);
    }
    for (;;) {
        int r = F.SSL_do_handshake(t->ssl);
        if (r == 1)
            break;
        int e = F.SSL_get_error(t->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            rc = wait_fd(fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline);
            if (rc < 0)
                goto out;
            continue;
        }
        long v = F.SSL_get_verify_result(t->ssl);
        if (v != X509_V_OK) {
            *stage = MG_TLS_STAGE_VERIFY;
            F.ERR_clear_error();
            snprintf(why, why_len, "%s", F.X509_verify_cert_error_string(v));
            rc = -EPROTO;
        } else if (e == SSL_ERROR_SYSCALL || e == SSL_ERROR_ZERO_RETURN) {
            reason(why, why_len, "the peer closed the connection");
            rc = t->err ? -t->err : -ECONNRESET;
        } else {
            reason(why, why_len, "handshake failed");
            rc = -EPROTO;
        }
        goto out;
    }
    /* the last flight (the client's Finished) leaves before we return */
    while ((rc = wbuf_send(t)) == 0)
        if ((rc = wait_fd(fd, POLLOUT, deadline)) < 0)
            goto out;
    if (rc < 0)
        goto out;
    rc = 0;
    if (c->server) {
        X509 *cert = F.SSL_get1_peer_certificate(t->ssl);
        if (!cert || !allowed(cert, allow)) {
            *stage = MG_TLS_STAGE_NAME;
            subject(cert, why, why_len);
            rc = -EPROTO;
        }
        if (cert)
            F.X509_free(cert);
        if (rc < 0)
            goto out;
    }
    if (!c->server)
        *stage = MG_TLS_STAGE_ACCEPT;
    rc = accepted(t, c->server, deadline, why, why_len);
    if (rc < 0)
        goto out;
    rc = bind_fd(fd, t);
    if (rc == 0)
        return 0;
out:
    tls_free(t);
    return rc;
}

/* The peer's certificate (a reference the caller frees), or NULL. */
static X509 *peer_cert(struct mg_tls *t)
{
    pthread_mutex_lock(&t->lock);
    X509 *cert = F.SSL_get1_peer_certificate(t->ssl);
    pthread_mutex_unlock(&t->lock);
    return cert;
}

int mg_tls_peer_subject(int fd, char *out, size_t out_len)
{
    struct mg_tls *t = mg_tls_get(fd);
    if (!t)
        return -EBADF;
    X509 *cert = peer_cert(t);
    subject(cert, out, out_len);
    if (cert)
        F.X509_free(cert);
    mg_tls_put(t);
    return 0;
}

/* Whether the peer certificate of fd's session carries name as a DNS SAN
 * (or, without SANs, as its CN), as --allow-source is matched: 1 or 0, or
 * -EBADF when fd has no TLS session. A raw channel joins a session only from
 * the certificate that opened it over gRPC. */
int mg_tls_peer_is(int fd, const char *name)
{
    struct mg_tls *t = mg_tls_get(fd);
    if (!t)
        return -EBADF;
    X509 *cert = peer_cert(t);
    int yes = cert && *name && F.X509_check_host(cert, name, strlen(name), X509_CHECK_FLAG_NO_WILDCARDS, NULL) == 1;
    if (cert)
        F.X509_free(cert);
    mg_tls_put(t);
    return yes;
}

/* ---- the hello, done from Python ---- */

/* Waits as an OpenSSL call's result rc asks (-EAGAIN readable,
 * -EINPROGRESS writable): 0 to call again, or rc / -ETIMEDOUT. */
static int wait_as(int fd, int64_t rc, uint64_t deadline)
{
    if (rc == -EAGAIN)
        return wait_fd(fd, POLLIN, deadline);
    if (rc == -EINPROGRESS)
        return wait_fd(fd, POLLOUT, deadline);
    return (int)rc;
}

static int flush_all(struct mg_tls *t, uint64_t deadline)
{
    int rc;
    while ((rc = mg_tls_flush(t)) == -EINPROGRESS)
        if ((rc = wait_fd(t->fd, POLLOUT, deadline)) < 0)
            return rc;
    return rc < 0 ? rc : 0;
}

void mg_tls_writer(struct mg_tls *t, int enter)
{
    if (enter)
        pthread_mutex_lock(&t->wlock);
    else
        pthread_mutex_unlock(&t->wlock);
}

/* All of buf, then flushed, as the one writer: 0 or -errno / -ETIMEDOUT. */
static int send_whole(struct mg_tls *t, const void *buf, uint64_t len, uint64_t deadline)
{
    int rc = 0;
    mg_tls_writer(t, 1);
    while (len && rc == 0) {
        int64_t n = mg_tls_write(t, buf, len);
        if (n > 0) {
            buf = (const uint8_t *)buf + n;
            len -= (uint64_t)n;
        } else
            rc = wait_as(t->fd, n, deadline);
    }
    if (rc == 0)
        rc = flush_all(t, deadline);
    mg_tls_writer(t, 0);
    return rc;
}

int mg_tls_send_small(struct mg_tls *t, const void *buf, uint64_t len)
{
    return send_whole(t, buf, len, 0);
}

int mg_tls_send_all(int fd, const void *buf, uint64_t len, int timeout_ms)
{
    struct mg_tls *t = mg_tls_get(fd);
    if (!t)
        return -EBADF;
    int rc = send_whole(t, buf, len, deadline_of(timeout_ms));
    mg_tls_put(t);
    return rc;
}

int64_t mg_tls_recv_some(int fd, void *buf, uint64_t len, int timeout_ms)
{
    struct mg_tls *t = mg_tls_get(fd);
    if (!t)
        return -EBADF;
    uint64_t deadline = deadline_of(timeout_ms);
    int64_t rc;
    for (;;) {
        rc = mg_tls_read(t, buf, len);
        if (rc >= 0)
            break;
        int w = wait_as(fd, rc, deadline);
        if (w < 0) {
            rc = w;
            break;
        }
    }
    mg_tls_put(t);
    return rc;
}

int mg_tls_close_notify(int fd, int timeout_ms)
{
    struct mg_tls *t = mg_tls_get(fd);
    if (!t)
        return -EBADF;
    mg_tls_writer(t, 1);
    pthread_mutex_lock(&t->lock);
    F.SSL_shutdown(t->ssl);     /* queues close_notify; we do not wait for the peer's */
    F.ERR_clear_error();
    pthread_mutex_unlock(&t->lock);
    int rc = flush_all(t, deadline_of(timeout_ms));
    mg_tls_writer(t, 0);
    mg_tls_put(t);
    return rc;
}
