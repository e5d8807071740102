/* The TLS floors: the raw channels' own read and write path (native/wire.c,
 * native/tls.c, built in with them), plaintext or mutual TLS 1.3, between two
 * threads over TCP loopback, without userfaultfd, a RAM file or Python: what
 * TLS itself costs the push and the demand round trip.
 *
 *   tls_wire push MIB TLS CERTDIR   runs of MG_PUSH_MAX_RUN 4 KiB pages, as
 *       src_push.c writes them (header, zero bitmap, pages in one writev) and
 *       dest_push.c reads them (header and bitmap whole, pages chunked), from
 *       and into 64 MiB of populated memory; prints {"gbps",
 *       "send_cpu_s_per_gib", "recv_cpu_s_per_gib"} (each thread's CPU time)
 *   tls_wire rr ROUNDS TLS CERTDIR  a demand round trip: an 8-byte request
 *       (wire_send_small), a reply header and a 4 KiB page (wire_writev, one
 *       record), read as dest_demand.c reads it; prints {"samples_ns": [...]}
 *
 * TLS 1: CERTDIR holds ca.pem and a.pem/a.key (the server, which accepts) and
 * b.pem/b.key (the client, which checks the name "a"). Exit 1 with a message
 * on stderr on any failure, and when the bytes received differ. */
#define _GNU_SOURCE
#include "tls.h"
#include "wire.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define RING (64u << 20)
#define PAGE 4096u
#define RUN_BYTES ((uint64_t)MG_PUSH_MAX_RUN * PAGE)

static int server_fd, client_fd;
static struct mg_tls_ctx *server_ctx;
static uint64_t total;
static uint8_t *src, *dst;
static double cpu_s[2];   /* sender's, receiver's */

static void die(const char *what, long rc)
{
    fprintf(stderr, "tls_wire: %s: %ld\n", what, rc);
    exit(1);
}

static double thread_cpu_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void *accept_tls(void *arg)
{
    (void)arg;
    int stage;
    char why[MG_TLS_REASON];
    if (mg_tls_handshake(server_ctx, server_fd, "", "", 10000, &stage, why, sizeof(why)) < 0) {
        fprintf(stderr, "tls_wire: server handshake: %s\n", why);
        exit(1);
    }
    return NULL;
}

/* A connected pair on loopback (client_fd -> server_fd), TLS when tls. */
static void connect_pair(int tls, const char *dir)
{
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof(a);
    if (l < 0 || bind(l, (void *)&a, sizeof(a)) || listen(l, 1) || getsockname(l, (void *)&a, &len))
        die("listen", -1);
    client_fd = socket(AF_INET, SOCK_STREAM, 0);
    if (client_fd < 0 || connect(client_fd, (void *)&a, sizeof(a)) || (server_fd = accept(l, NULL, NULL)) < 0)
        die("connect", -1);
    close(l);
    /* as the agents set them (migrate/source/session.py, migrate/dest/agent.py) */
    setsockopt(client_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(server_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (!tls)
        return;
    char why[MG_TLS_REASON], p[5][512];
    const char *names[5] = { "ca.pem", "a.pem", "a.key", "b.pem", "b.key" };
    for (int i = 0; i < 5; i++)
        snprintf(p[i], sizeof(p[i]), "%s/%s", dir, names[i]);
    server_ctx = mg_tls_ctx_new(1, p[1], p[2], p[0], why, sizeof(why));
    struct mg_tls_ctx *client_ctx = server_ctx ? mg_tls_ctx_new(0, p[3], p[4], p[0], why, sizeof(why)) : NULL;
    if (!client_ctx) {
        fprintf(stderr, "tls_wire: %s\n", why);
        exit(1);
    }
    pthread_t t;
    pthread_create(&t, NULL, accept_tls, NULL);
    int stage;
    if (mg_tls_handshake(client_ctx, client_fd, "a", "", 10000, &stage, why, sizeof(why)) < 0) {
        fprintf(stderr, "tls_wire: client handshake: %s\n", why);
        exit(1);
    }
    pthread_join(t, NULL);
}

/* ---- push ---- */

static void *push_send(void *arg)
{
    (void)arg;
    double c0 = thread_cpu_s();
    struct mg_tls *tls = mg_tls_get(client_fd);
    struct wire_end e = { .fd = client_fd, .tls = tls, .stop_fd = -1, .chunked = 1 };
    for (uint64_t off = 0; off < total; off += RUN_BYTES) {
        struct run_header h = { off / PAGE, MG_PUSH_MAX_RUN, 0 };
        uint8_t bits[MG_PUSH_MAX_RUN / 8] = { 0 };
        struct iovec iov[3] = { { &h, sizeof(h) }, { bits, sizeof(bits) }, { src + off % RING, RUN_BYTES } };
        int rc = wire_writev(&e, iov, 3);
        if (rc < 0)
            die("push write", rc);
    }
    if (tls)
        mg_tls_close_notify(client_fd, 10000);
    shutdown(client_fd, SHUT_WR);
    mg_tls_put(tls);
    cpu_s[0] = thread_cpu_s() - c0;
    return NULL;
}

static void *push_receive(void *arg)
{
    (void)arg;
    double c0 = thread_cpu_s();
    struct mg_tls *tls = mg_tls_get(server_fd);
    struct wire_end head = { .fd = server_fd, .tls = tls, .stop_fd = -1 };
    struct wire_end payload = { .fd = server_fd, .tls = tls, .stop_fd = -1, .chunked = 1 };
    uint64_t got = 0;
    for (;;) {
        struct run_header h;
        uint8_t bits[MG_PUSH_MAX_RUN / 8];
        int rc = wire_read(&head, &h, sizeof(h));
        if (rc == 0)
            break;
        if (rc < 0 || h.count != MG_PUSH_MAX_RUN)
            die("push header", rc);
        if ((rc = wire_read_rest(&head, bits, sizeof(bits))) < 0
            || (rc = wire_read_rest(&payload, dst + h.first * PAGE % RING, RUN_BYTES)) < 0)
            die("push read", rc);
        got += RUN_BYTES;
    }
    if (got != total)
        die("push bytes received", (long)got);
    mg_tls_put(tls);
    cpu_s[1] = thread_cpu_s() - c0;
    return NULL;
}

static int push(uint64_t mib)
{
    total = (mib << 20) / RUN_BYTES * RUN_BYTES;
    src = mmap(NULL, RING, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    dst = mmap(NULL, RING, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (src == MAP_FAILED || dst == MAP_FAILED)
        die("mmap", -1);
    /* populated, incompressible-looking bytes (xorshift), as the all-random
     * push scenario's; the destination populated too (the alias is, once
     * the guest's RAM file is allocated) */
    uint64_t x = 88172645463325252ull;
    for (uint64_t i = 0; i < RING / 8; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((uint64_t *)src)[i] = x;
    }
    memset(dst, 1, RING);
    uint64_t t0 = now_ns();
    pthread_t s, r;
    pthread_create(&r, NULL, push_receive, NULL);
    pthread_create(&s, NULL, push_send, NULL);
    pthread_join(s, NULL);
    pthread_join(r, NULL);
    double secs = (double)(now_ns() - t0) * 1e-9, gib = (double)total / (1 << 30);
    if (memcmp(src, dst, total < RING ? total : RING))
        die("push: the bytes received differ from those sent", 0);
    printf("{\"bytes\": %lu, \"gbps\": %.3f, \"send_cpu_s_per_gib\": %.3f, \"recv_cpu_s_per_gib\": %.3f}\n",
           (unsigned long)total, (double)total / secs / 1e9, cpu_s[0] / gib, cpu_s[1] / gib);
    return 0;
}

/* ---- demand round trip ---- */

static uint8_t page[PAGE];

static void *rr_serve(void *arg)
{
    (void)arg;
    struct mg_tls *tls = mg_tls_get(server_fd);
    struct wire_end e = { .fd = server_fd, .tls = tls, .stop_fd = -1 };
    uint64_t req;
    while (wire_read(&e, &req, sizeof(req)) == 1) {
        struct reply_header h = { req, 0, PAGE };
        page[0] = (uint8_t)req;
        struct iovec iov[2] = { { &h, sizeof(h) }, { page, PAGE } };
        if (wire_writev(&e, iov, 2) < 0)
            break;
    }
    mg_tls_put(tls);
    return NULL;
}

static int rr(int rounds)
{
    static uint8_t got[PAGE];
    memset(page, 0x5a, sizeof(page));
    pthread_t t;
    pthread_create(&t, NULL, rr_serve, NULL);
    struct mg_tls *tls = mg_tls_get(client_fd);
    struct wire_end e = { .fd = client_fd, .tls = tls, .stop_fd = -1 };
    uint64_t *ns = malloc(sizeof(*ns) * (size_t)rounds);
    if (!ns)
        die("malloc", -1);
    for (int i = 0; i < rounds; i++) {
        uint64_t t0 = now_ns(), req = (uint64_t)i;
        struct reply_header h;
        int rc;
        if (!wire_send_small(client_fd, &req, sizeof(req)))
            die("rr request", i);
        if ((rc = wire_read(&e, &h, sizeof(h))) != 1 || (rc = wire_read_rest(&e, got, PAGE)) != 1)
            die("rr reply", rc);
        ns[i] = now_ns() - t0;
        if (h.page != req || h.length != PAGE || got[0] != (uint8_t)req || got[PAGE - 1] != 0x5a)
            die("rr: the reply differs from the one sent", i);
    }
    shutdown(client_fd, SHUT_WR);
    pthread_join(t, NULL);
    mg_tls_put(tls);
    printf("{\"samples_ns\": [");
    for (int i = 0; i < rounds; i++)
        printf("%s%lu", i ? ", " : "", (unsigned long)ns[i]);
    printf("]}\n");
    free(ns);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 5 || (strcmp(argv[1], "push") && strcmp(argv[1], "rr"))) {
        fprintf(stderr, "usage: tls_wire push MIB TLS CERTDIR | tls_wire rr ROUNDS TLS CERTDIR\n");
        return 2;
    }
    connect_pair(atoi(argv[3]), argv[4]);
    return !strcmp(argv[1], "push") ? push(strtoull(argv[2], NULL, 10)) : rr(atoi(argv[2]));
}
