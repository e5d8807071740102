/* Mutual TLS 1.3 on the raw demand and push channels, through the system's
 * OpenSSL (libssl.so.3, libcrypto.so.3) resolved at run time: a fresh machine
 * has the libraries (Python's ssl module loads them) but not their headers,
 * so the few prototypes and constants used are declared in tls.c, with
 * opaque SSL, SSL_CTX and X509 pointers. No cipher or record format of our
 * own: OpenSSL does all of TLS.
 *
 * A channel's TLS session is bound to its socket's fd (mg_tls_handshake binds
 * it, mg_tls_unbind drops it before the fd is closed): every read and write
 * of wire.c looks it up by fd (one load and one branch when the fd has none),
 * so the C that serves the channels and the structs Python fills keep taking
 * plain fds. Each session has a mutex: the destination's fault loop writes
 * requests while its demand receiver reads replies on the same session; the
 * lock is held only around a non-blocking OpenSSL call, never while waiting.
 *
 * Sockets are driven non-blocking whatever their O_NONBLOCK (recv/send with
 * MSG_DONTWAIT, through a BIO of our own), so Python's settimeout on them
 * changes nothing here. Records written go into a buffer of the session's and
 * leave in one send per MG_HOLD_CHUNK at most (a 4 KiB demand reply's header
 * and page in one send, the push's runs in large sends, as plaintext does).
 *
 * kTLS (the kernel doing the record layer) is not used: the kernel this was
 * built on has no CONFIG_TLS; the user-space path is the one measured. */
#ifndef MIGRATE_TLS_H
#define MIGRATE_TLS_H
#include <stdint.h>
#include <stddef.h>
#include <sys/uio.h>

/* cdef-begin */
/* Room for an OpenSSL reason returned to Python. */
#define MG_TLS_REASON 512

/* Resolves the OpenSSL functions used (libssl.so.3, libcrypto.so.3). 0, or
 * -ENOENT (a library or a symbol is missing: why says which). Idempotent. */
int mg_tls_load(char *why, size_t why_len);

/* A context: this agent's certificate chain and key, the CA its peers must
 * chain to, TLS 1.3 only, the peer's certificate always required and verified
 * (both ways). server: the destination (accepts channels). NULL with why
 * filled (which file, OpenSSL's reason). Lives until mg_tls_ctx_free. */
struct mg_tls_ctx;
struct mg_tls_ctx *mg_tls_ctx_new(int server, const char *cert, const char *key, const char *ca,
                                  char *why, size_t why_len);
void mg_tls_ctx_free(struct mg_tls_ctx *c);

/* What a failed handshake was doing (mg_tls_handshake's *stage). */
#define MG_TLS_STAGE_HANDSHAKE 1    /* the TLS handshake itself (protocol, alerts, the peer closed) */
#define MG_TLS_STAGE_VERIFY 2       /* the peer's certificate did not verify (why: OpenSSL's verdict) */
#define MG_TLS_STAGE_NAME 3         /* it verified, but names none of the allowed (why: its subject) */
#define MG_TLS_STAGE_ACCEPT 4       /* client: the handshake was done, then the server did not accept it */

/* The TLS handshake on connected socket fd, within timeout_ms. Client
 * (source): the server's certificate must carry peer_name (DNS SAN, or an IP
 * SAN when peer_name is an address). Server (destination): the client's
 * certificate must carry one of allow (a "\n"-separated list of names, DNS
 * SAN or, without SANs, CN; "" = any the CA signed); once it has, it sends
 * one byte (0x01) that the client waits for (in TLS 1.3 the client is done
 * before the server has checked it). On success the session
 * is bound to fd: 0. Else -ETIMEDOUT, -ECONNRESET (the peer closed),
 * -EPROTO (*stage MG_TLS_STAGE_*, why: OpenSSL's reason), -EMFILE (fd past
 * the table), -ENOMEM, -errno. The socket stays the caller's. */
int mg_tls_handshake(struct mg_tls_ctx *c, int fd, const char *peer_name, const char *allow, int timeout_ms,
                     int *stage, char *why, size_t why_len);

/* The bound session's peer certificate subject (for the agent's events). */
int mg_tls_peer_subject(int fd, char *out, size_t out_len);
/* 1 when the peer certificate carries name (DNS SAN, else CN), 0 if not, -EBADF. */
int mg_tls_peer_is(int fd, const char *name);

/* Bytes over the session bound to fd, waiting at most timeout_ms (< 0:
 * forever) for each wait: the hello, the one exchange Python does itself.
 * send_all: 0 or -errno; recv_some: count > 0, 0 at the end of the stream,
 * -ETIMEDOUT, -errno. -EBADF when fd has no session. */
int mg_tls_send_all(int fd, const void *buf, uint64_t len, int timeout_ms);
int64_t mg_tls_recv_some(int fd, void *buf, uint64_t len, int timeout_ms);

/* Sends close_notify (the end of the stream, before a shutdown of the write
 * side), waiting at most timeout_ms. 0 or -errno. */
int mg_tls_close_notify(int fd, int timeout_ms);

/* Drops fd's session (freed once no channel loop uses it any more). Called
 * before fd is closed: a later socket given the same fd number is plain. */
void mg_tls_unbind(int fd);
/* cdef-end */

/* ---- for wire.c and the channel loops ---- */

/* A channel loop takes its fd's session once, at entry (NULL: plaintext), and
 * puts it back at exit; the session lives until the last put. */
struct mg_tls;
struct mg_tls *mg_tls_get(int fd);
void mg_tls_put(struct mg_tls *t);

/* One non-blocking OpenSSL call under the session's lock. read: > 0 bytes,
 * 0 end of stream, -EAGAIN (wait until fd is readable), -EINPROGRESS (wait
 * until it is writable), -errno (a record that fails: -ECONNRESET).
 * write: > 0 bytes taken (all of len, or at least a record's worth), or as
 * read. */
int64_t mg_tls_read(struct mg_tls *t, void *buf, size_t len);
int64_t mg_tls_write(struct mg_tls *t, const void *buf, size_t len);
/* Sends what is buffered: 1 all sent, -EINPROGRESS (wait until writable),
 * -errno. */
int mg_tls_flush(struct mg_tls *t);
/* A writer holds the session from its first write to its flush (enter 1,
 * then 0): the destination's fault loop and a resend both write requests. */
void mg_tls_writer(struct mg_tls *t, int enter);
/* A few bytes, whole and flushed, waiting as long as it takes (as a send on a
 * blocking socket does): 0 or -errno. */
int mg_tls_send_small(struct mg_tls *t, const void *buf, uint64_t len);

#endif
