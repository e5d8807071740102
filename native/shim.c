/*
 * shim.c: LD_PRELOAD library that hands an unmodified QEMU's guest RAM to the
 * destination agent (docs/attach-protocol.md).
 *
 *   MIGRATE_ATTACH=/path/to/attach.sock LD_PRELOAD=/path/to/shim.so \
 *       qemu-system-x86_64 ... -object memory-backend-file,...,share=on ... -incoming defer
 *
 * Environment:
 *   MIGRATE_ATTACH     path of the agent's UNIX socket.  Unset: the shim does nothing.
 *                      Read once at load time and then removed from the environment,
 *                      so processes QEMU spawns never attach.
 *   MIGRATE_MIN_RAM    smallest mapping treated as guest RAM, bytes (suffix K/M/G
 *                      allowed), default 64M.
 *   MIGRATE_ATTACH_WAIT seconds to wait at start-up for an agent on MIGRATE_ATTACH
 *                      (nobody listening there yet), default 60; 0: do not wait.
 *   MIGRATE_SHIM_DEBUG set to print what the shim does on stderr.
 *
 * What it does: it interposes mmap and mmap64 (QEMU 7.2 imports mmap64).  For a
 * successful MAP_SHARED mapping of a file descriptor on tmpfs (memfd or /dev/shm
 * file) or hugetlbfs whose length is >= MIGRATE_MIN_RAM, right after the real
 * mmap it
 *   1. creates a userfaultfd (O_CLOEXEC|O_NONBLOCK; syscall, else
 *      /dev/userfaultfd + USERFAULTFD_IOC_NEW),
 *   2. connects to MIGRATE_ATTACH and sends [u32 BE length][JSON hello] with
 *      SCM_RIGHTS [uffd, ramfd] on the first byte; one region: the mapping,
 *   3. waits for the ack; on {"ok": false, ...}, EOF or any error it prints the
 *      reason and exits the process (status 1): running on without the agent
 *      would let the guest read RAM that has not arrived.
 *      While nobody listens on the path (no socket yet, or a dead agent's), it
 *      tries again every 10 ms for MIGRATE_ATTACH_WAIT seconds first, so QEMU
 *      and the agent may be started in either order.
 * The uffd and the socket stay open for the life of the process (never closed).
 * Every other mapping is passed through untouched.
 *
 * QEMU 7.2's qemu_ram_mmap() (util/mmap-alloc.c), as seen with strace:
 *   mmap(NULL, size + align, PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)   reserve
 *   mmap(resv, size, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_FIXED, ramfd, 0)  RAM
 * so the second call is the one attached; its length is the backend size.
 *
 * Build: gcc -shared -fPIC -O2 -o shim.so native/shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>
#include <pthread.h>

#ifndef TMPFS_MAGIC
#define TMPFS_MAGIC 0x01021994
#endif
#ifndef HUGETLBFS_MAGIC
#define HUGETLBFS_MAGIC 0x958458f6
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

#define EXPORT __attribute__((visibility("default")))

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);

static mmap_fn real_mmap;
static mmap_fn real_mmap64;
static __thread int in_shim;            /* no recursion through our own calls */
static int debug;
static char attach_path[108];           /* MIGRATE_ATTACH, captured at load time */
static double attach_wait = 60.0;       /* MIGRATE_ATTACH_WAIT, seconds */

static void say(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    int n = snprintf(buf, sizeof buf, "migrate-shim[%d]: ", (int)getpid());
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - n, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t w = write(2, buf, n);
    (void)w;
}

#define DBG(...) do { if (debug) say(__VA_ARGS__); } while (0)

static void die(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    say("fatal: %s", buf);
    _exit(1);
}

static void resolve(void)
{
    if (!real_mmap)
        real_mmap = (mmap_fn)dlsym(RTLD_NEXT, "mmap");
    if (!real_mmap64)
        real_mmap64 = (mmap_fn)dlsym(RTLD_NEXT, "mmap64");
    if (!real_mmap64)
        real_mmap64 = real_mmap;
    if (!real_mmap)
        real_mmap = real_mmap64;
}

__attribute__((constructor)) static void shim_init(void)
{
    debug = getenv("MIGRATE_SHIM_DEBUG") != NULL && getenv("MIGRATE_SHIM_DEBUG")[0] != '\0';
    resolve();
    const char *p = getenv("MIGRATE_ATTACH");
    if (p && *p) {
        if (strlen(p) >= sizeof attach_path)
            die("MIGRATE_ATTACH path too long (max %zu bytes): %s", sizeof attach_path - 1, p);
        strcpy(attach_path, p);
        /* Still single-threaded here, so unsetenv is safe.  Children QEMU
         * spawns (exec: migration helpers, ifup scripts) inherit LD_PRELOAD but
         * must not attach to the agent themselves. */
        unsetenv("MIGRATE_ATTACH");
        const char *w = getenv("MIGRATE_ATTACH_WAIT");
        if (w && *w) {
            char *end;
            errno = 0;
            double v = strtod(w, &end);
            if (errno || end == w || *end != '\0' || !(v >= 0) || v > 86400)
                die("MIGRATE_ATTACH_WAIT=%s: not a number of seconds from 0 to 86400 (how long to wait at "
                    "start-up for `migrate dest` on MIGRATE_ATTACH; default 60)", w);
            attach_wait = v;
        }
        DBG("loaded, attach socket %s, waits up to %g s for its agent", attach_path, attach_wait);
    }
}

static uint64_t min_ram(void)
{
    const char *s = getenv("MIGRATE_MIN_RAM");
    uint64_t v = 64ULL << 20;
    if (s && *s) {
        char *end;
        unsigned long long x = strtoull(s, &end, 0);
        switch (*end) {
        case 'k': case 'K': x <<= 10; break;
        case 'm': case 'M': x <<= 20; break;
        case 'g': case 'G': x <<= 30; break;
        default: break;
        }
        v = x;
    }
    return v;
}

static int make_uffd(void)
{
    int fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0)
        return fd;
    int err = errno;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        die("userfaultfd(): %s, and /dev/userfaultfd: %s (run as root, set "
            "vm.unprivileged_userfaultfd=1, or give access to /dev/userfaultfd)",
            strerror(err), strerror(errno));
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    int err2 = errno;
    close(dev);
    if (fd < 0)
        die("userfaultfd(): %s; ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW): %s",
            strerror(err), strerror(err2));
    return fd;
}

/* append s to out as a JSON string literal */
static size_t json_str(char *out, size_t cap, const char *s)
{
    size_t n = 0;
#define PUT(c) do { if (n + 1 < cap) out[n] = (c); n++; } while (0)
    PUT('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            PUT('\\'); PUT(c);
        } else if (c < 0x20) {
            char esc[8];
            snprintf(esc, sizeof esc, "\\u%04x", c);
            for (char *e = esc; *e; e++)
                PUT(*e);
        } else {
            PUT(c);
        }
    }
    PUT('"');
#undef PUT
    if (n < cap)
        out[n] = '\0';
    else if (cap)
        out[cap - 1] = '\0';
    return n;
}

static int send_all(int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t w = send(fd, buf, len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

static int recv_all(int fd, char *buf, size_t len)
{
    while (len) {
        ssize_t r = recv(fd, buf, len, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0) {
            errno = ECONNRESET;
            return 0;
        }
        buf += r;
        len -= (size_t)r;
    }
    return 1;
}

/* The value of "key" in one of the agent's messages (a small flat JSON
 * object): a pointer to its first character, or NULL. The protocol promises
 * JSON, not a spelling of it (docs/attach-protocol.md): whitespace may stand
 * around the ':', so it is skipped, never matched. A "key" that is not
 * followed by ':' is a string value, and an escaped \"key\" sits inside one:
 * neither is the key. */
static const char *json_value(const char *js, const char *key)
{
    size_t kl = strlen(key);
    for (const char *p = js; (p = strchr(p, '"')) != NULL; p++) {
        if ((p > js && p[-1] == '\\') || strncmp(p + 1, key, kl) != 0 || p[1 + kl] != '"')
            continue;
        const char *v = p + 2 + kl;
        v += strspn(v, " \t\r\n");
        if (*v != ':')
            continue;
        v++;
        return v + strspn(v, " \t\r\n");
    }
    return NULL;
}

/* value of "error" in a small JSON object, unescaped enough for a message */
static void json_error(const char *js, char *out, size_t cap)
{
    const char *p = json_value(js, "error");
    size_t n = 0;
    out[0] = '\0';
    if (!p)
        return;
    if (*p != '"') {
        snprintf(out, cap, "%.200s", p);
        return;
    }
    for (p++; *p && *p != '"' && n + 1 < cap; p++) {
        if (*p == '\\' && p[1]) {
            p++;
            out[n++] = *p == 'n' ? '\n' : *p == 't' ? '\t' : *p;
        } else {
            out[n++] = *p;
        }
    }
    out[n] = '\0';
}

static int ack_ok(const char *js)
{
    const char *v = json_value(js, "ok");
    return v && strncmp(v, "true", 4) == 0;
}

/* One attached RAM mapping: what a re-attach needs to say again. Lives for the
 * life of the process (like the uffd and ramfd it names, never closed). */
struct attachment {
    int uffd;
    int ramfd;
    int sock;                 /* the current connection to an agent */
    char hello[2048];         /* [u32 BE length][JSON], "reattach": false */
    size_t hello_len;
    char target[512];
};

#define UNTRUSTED_AGENT (-2)
#define NO_AGENT (-3)         /* nobody listens on the path (yet, or any more) */

/* Connects, sends the hello with [uffd, ramfd] and reads the ack. Returns the
 * connected socket, or -1 with why[] filled (the caller decides to die or
 * retry), UNTRUSTED_AGENT when the listener is neither root nor our uid,
 * NO_AGENT when nobody listens on the path. */
static int hello_and_ack(struct attachment *a, int reattach, char *why, size_t why_cap)
{
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        snprintf(why, why_cap, "socket(AF_UNIX): %s", strerror(errno));
        return -1;
    }
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    strcpy(sa.sun_path, attach_path);   /* length checked at load time (< 108) */
    while (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
        if (errno == EINTR)
            continue;
        int err = errno;
        snprintf(why, why_cap, "cannot connect to the migrate agent at MIGRATE_ATTACH=%s: %s "
                 "(start `migrate dest` first, or unset MIGRATE_ATTACH)", attach_path, strerror(err));
        close(s);
        return (err == ENOENT || err == ECONNREFUSED || err == EAGAIN) ? NO_AGENT : -1;
    }
    /* Before a byte, above all the descriptors, goes out: whoever listens on
     * the path gets the guest's userfaultfd and all of its RAM.  The kernel
     * says who that is (as of its listen()): root or our own uid only, never
     * another user who bound a dead agent's path. */
    struct ucred agent;
    socklen_t agent_len = sizeof agent;
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &agent, &agent_len) < 0) {
        snprintf(why, why_cap, "SO_PEERCRED of the migrate agent at %s: %s", attach_path, strerror(errno));
        close(s);
        return -1;
    }
    if (agent.uid != 0 && agent.uid != geteuid()) {
        snprintf(why, why_cap, "the attach socket MIGRATE_ATTACH=%s is served by pid %d of uid %u, which is "
                 "neither root nor this process's uid %u: not handing it the guest's userfaultfd and RAM (%s; "
                 "another user took the path over?); run `migrate dest` as root or as uid %u, in a directory "
                 "only it can enter", attach_path, (int)agent.pid, (unsigned)agent.uid, (unsigned)geteuid(),
                 a->target, (unsigned)geteuid());
        close(s);
        return UNTRUSTED_AGENT;
    }
    char msg[sizeof a->hello + 1];
    size_t total = a->hello_len;
    memcpy(msg, a->hello, total);
    msg[total] = '\0';   /* the JSON after the length prefix is searched and logged as a string */
    if (reattach) {
        /* "reattach": false -> true, and fix the length prefix */
        char *f = strstr(msg + 4, "\"reattach\": false");
        if (f) {
            memmove(f + 16, f + 17, total - (size_t)(f + 17 - msg));
            memcpy(f + 12, "true", 4);
            total -= 1;
            msg[total] = '\0';
            uint32_t jl = (uint32_t)(total - 4);
            msg[0] = (char)((jl >> 24) & 0xff);
            msg[1] = (char)((jl >> 16) & 0xff);
            msg[2] = (char)((jl >> 8) & 0xff);
            msg[3] = (char)(jl & 0xff);
        }
    }
    /* first byte(s) with SCM_RIGHTS [uffd, ramfd], the rest plainly */
    int fds[2] = { a->uffd, a->ramfd };
    char cbuf[CMSG_SPACE(sizeof fds)];
    memset(cbuf, 0, sizeof cbuf);
    struct iovec iov = { .iov_base = msg, .iov_len = total };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = cbuf, .msg_controllen = sizeof cbuf };
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cm), fds, sizeof fds);
    ssize_t sent;
    do {
        sent = sendmsg(s, &mh, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent <= 0 || ((size_t)sent < total && send_all(s, msg + sent, total - (size_t)sent) < 0)) {
        snprintf(why, why_cap, "sending the attach hello to %s: %s", attach_path, strerror(errno));
        close(s);
        return -1;
    }
    DBG("sent hello (%zu bytes) uffd=%d ramfd=%d: %s", total - 4, a->uffd, a->ramfd, msg + 4);

    unsigned char lb[4];
    int r = recv_all(s, (char *)lb, 4);
    if (r <= 0) {
        snprintf(why, why_cap, "no ack from the migrate agent at %s: %s", attach_path,
                 r == 0 ? "it closed the connection" : strerror(errno));
        close(s);
        return -1;
    }
    uint32_t al = ((uint32_t)lb[0] << 24) | ((uint32_t)lb[1] << 16) | ((uint32_t)lb[2] << 8) | lb[3];
    if (al == 0 || al > (1u << 20)) {
        snprintf(why, why_cap, "bad ack length %u from the migrate agent at %s", al, attach_path);
        close(s);
        return -1;
    }
    char *ack = malloc(al + 1);
    if (!ack)
        die("out of memory");
    r = recv_all(s, ack, al);
    if (r <= 0) {
        snprintf(why, why_cap, "truncated ack from the migrate agent at %s: %s", attach_path,
                 r == 0 ? "it closed the connection" : strerror(errno));
        free(ack);
        close(s);
        return -1;
    }
    ack[al] = '\0';
    if (!ack_ok(ack)) {
        char err[512];
        json_error(ack, err, sizeof err);
        snprintf(why, why_cap, "the migrate agent refused the guest RAM (%s): %s", a->target,
                 err[0] ? err : ack);
        free(ack);
        close(s);
        return -1;
    }
    DBG("attached %s: %s", a->target, ack);
    free(ack);
    return s;
}

/* Watches the agent's messages. {"event": "complete"} then EOF ends the
 * migration; EOF without it means the agent died: the vCPUs that fault stay
 * blocked in the kernel (this process keeps the uffd), and the same uffd and
 * RAM file are attached again to the next agent on the path. */
static void *watch(void *arg)
{
    struct attachment *a = arg;
    int complete = 0;
    for (;;) {
        unsigned char lb[4];
        while (recv_all(a->sock, (char *)lb, 4) > 0) {
            uint32_t n = ((uint32_t)lb[0] << 24) | ((uint32_t)lb[1] << 16) | ((uint32_t)lb[2] << 8) | lb[3];
            if (n == 0 || n > (1u << 20))
                break;
            char *m = malloc(n + 1);
            if (!m || recv_all(a->sock, m, n) <= 0) {
                free(m);
                break;
            }
            m[n] = '\0';
            const char *ev = json_value(m, "event");
            if (ev && strncmp(ev, "\"complete\"", 10) == 0)
                complete = 1;
            free(m);
        }
        close(a->sock);
        if (complete) {
            DBG("migration complete for %s", a->target);
            return NULL;
        }
        say("the migrate agent went away before the end; vCPUs that fault wait; attaching %s again "
            "to the next agent at %s", a->target, attach_path);
        char why[1024], refused[1024] = "";
        int s = -1;
        for (int tries = 0; tries < 30000 && s < 0; tries++) {   /* 300 s */
            s = hello_and_ack(a, 1, why, sizeof why);
            /* an untrusted listener is said once, and the shim goes on
             * trying: once it is gone, a real agent may listen there */
            if (s == UNTRUSTED_AGENT && strcmp(why, refused) != 0) {
                say("%s", why);
                strcpy(refused, why);
            }
            if (s < 0)   /* (a new agent's listener is found within 10 ms) */
                usleep(10 * 1000);
        }
        if (s < 0) {
            say("giving up re-attaching %s: %s", a->target, why);
            return NULL;
        }
        a->sock = s;
        say("attached %s again", a->target);
    }
}

/* The first attach. While nobody listens on the path (the agent not started
 * yet) it tries again every 10 ms for MIGRATE_ATTACH_WAIT seconds; a listener
 * of another user is said once and waited out the same way. Anything else (the
 * agent refused the guest, or broke off) exits the process at once. QEMU waits
 * meanwhile inside its mmap of the RAM, before the guest has run. */
static int first_attach(struct attachment *a)
{
    char why[1024], said[1024] = "";
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int waited = 0;
    for (;;) {
        int s = hello_and_ack(a, 0, why, sizeof why);
        if (s >= 0) {
            if (waited)
                say("the migrate agent at %s is there: attached %s", attach_path, a->target);
            return s;
        }
        if (s != NO_AGENT && s != UNTRUSTED_AGENT)
            die("%s", why);
        clock_gettime(CLOCK_MONOTONIC, &now);
        double spent = (double)(now.tv_sec - t0.tv_sec) + (double)(now.tv_nsec - t0.tv_nsec) / 1e9;
        if (spent >= attach_wait)
            die("no migrate agent took %s within MIGRATE_ATTACH_WAIT=%g s: %s; start `migrate dest --attach %s` "
                "(before this process, or within that time), or set MIGRATE_ATTACH_WAIT higher",
                a->target, attach_wait, why, attach_path);
        if (!waited || (s == UNTRUSTED_AGENT && strcmp(why, said) != 0)) {
            say("%s; waiting up to %g s (MIGRATE_ATTACH_WAIT) for it", why, attach_wait);
            strcpy(said, why);
        }
        waited = 1;
        usleep(10 * 1000);
    }
}

static void attach(void *addr, size_t len, int ramfd, off_t off, const struct statfs *sfs)
{
    struct stat st;
    char link[64];
    uint64_t page_size = 4096;
    const char *backing;
    struct attachment *a = calloc(1, sizeof *a);
    if (!a)
        die("out of memory");

    if (fstat(ramfd, &st) < 0)
        die("fstat(RAM fd %d): %s", ramfd, strerror(errno));
    snprintf(link, sizeof link, "/proc/self/fd/%d", ramfd);
    ssize_t tl = readlink(link, a->target, sizeof a->target - 1);
    if (tl < 0)
        tl = 0;
    a->target[tl] = '\0';

    if ((uint32_t)sfs->f_type == (uint32_t)HUGETLBFS_MAGIC) {
        page_size = (uint64_t)sfs->f_bsize;
        backing = "hugetlbfs";
    } else if (strncmp(a->target, "/memfd:", 7) == 0) {
        backing = "memfd";
    } else {
        backing = "tmpfs-file";
    }
    if ((uintptr_t)addr % page_size || len % page_size || (uint64_t)off % page_size)
        die("RAM mapping %p+%zu offset %lld of %s is not aligned to its page size %llu",
            addr, len, (long long)off, a->target, (unsigned long long)page_size);

    a->uffd = make_uffd();
    a->ramfd = ramfd;
    char name[600];
    json_str(name, sizeof name, a->target);
    int jl = snprintf(a->hello + 4, sizeof a->hello - 4,
                      "{\"version\": 1, \"pid\": %d, \"page_size\": %llu, \"ram_size\": %llu, "
                      "\"regions\": [{\"guest_addr\": %llu, \"length\": %llu, \"offset\": %llu}], "
                      "\"backing\": \"%s\", \"name\": %s, \"reattach\": false}",
                      (int)getpid(), (unsigned long long)page_size, (unsigned long long)st.st_size,
                      (unsigned long long)(uintptr_t)addr, (unsigned long long)len,
                      (unsigned long long)off, backing, name);
    if (jl < 0 || jl >= (int)sizeof a->hello - 4)
        die("hello message too long");
    a->hello[0] = (char)((jl >> 24) & 0xff);
    a->hello[1] = (char)((jl >> 16) & 0xff);
    a->hello[2] = (char)((jl >> 8) & 0xff);
    a->hello[3] = (char)(jl & 0xff);
    a->hello_len = (size_t)jl + 4;

    a->sock = first_attach(a);
    DBG("attached %s (%s, page %llu) %p+%zu offset %lld", a->target, backing,
        (unsigned long long)page_size, addr, len, (long long)off);
    pthread_t t;
    if (pthread_create(&t, NULL, watch, a) != 0)
        die("cannot start the attach watcher thread");
    pthread_detach(t);
    /* a, its uffd and ramfd live as long as the process */
}

static void *do_mmap(mmap_fn fn, void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    if (!fn) {
        resolve();
        fn = real_mmap64 ? real_mmap64 : real_mmap;
        if (!fn) {
            errno = ENOSYS;
            return MAP_FAILED;
        }
    }
    void *p = fn(addr, len, prot, flags, fd, off);
    int type = flags & MAP_TYPE;
    if (p == MAP_FAILED || in_shim || fd < 0 || (type != MAP_SHARED && type != MAP_SHARED_VALIDATE))
        return p;
    if (!attach_path[0])
        return p;
    if ((uint64_t)len < min_ram())
        return p;
    int saved = errno;
    in_shim = 1;
    struct statfs sfs;
    if (fstatfs(fd, &sfs) == 0 &&
        ((uint32_t)sfs.f_type == (uint32_t)TMPFS_MAGIC ||
         (uint32_t)sfs.f_type == (uint32_t)HUGETLBFS_MAGIC))
        attach(p, len, fd, off, &sfs);
    else
        DBG("ignoring MAP_SHARED fd %d mapping of %zu bytes: not tmpfs/hugetlbfs", fd, len);
    in_shim = 0;
    errno = saved;
    return p;
}

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    return do_mmap(real_mmap, addr, len, prot, flags, fd, off);
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    return do_mmap(real_mmap64, addr, len, prot, flags, fd, off);
}
