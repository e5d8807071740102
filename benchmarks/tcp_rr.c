/* The wire floor of a demand fault on large pages: a small request over TCP
 * loopback, a whole page back, between two processes. The replying process
 * sends from a populated mapping and the asking one receives into a populated
 * mapping (as the agents do), cycling over more pages than the CPU caches
 * hold, so the bytes come from memory and land in memory as a migrated page's
 * do. No userfaultfd and no other traffic: only the wire and the copies.
 *
 *   tcp_rr PAGE_BYTES NPAGES ROUNDS HUGETLB(0|1)
 *
 * Prints {"page_bytes", "npages", "hugetlb", "samples_ns": [...]}. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int io_full(int fd, void *buf, size_t len, int sending)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = sending ? send(fd, (char *)buf + done, len - done, MSG_NOSIGNAL)
                            : recv(fd, (char *)buf + done, len - done, 0);
        if (n <= 0)
            return -1;
        done += (size_t)n;
    }
    return 0;
}

static void *map_pages(size_t len, int hugetlb)
{
    int flags = MAP_SHARED | MAP_ANONYMOUS | MAP_POPULATE | (hugetlb ? MAP_HUGETLB : 0);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) {
        perror(hugetlb ? "mmap MAP_HUGETLB (reserve huge pages)" : "mmap");
        exit(2);
    }
    return p;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: tcp_rr PAGE_BYTES NPAGES ROUNDS HUGETLB(0|1)\n");
        return 2;
    }
    size_t ps = strtoull(argv[1], NULL, 0);
    uint64_t npages = strtoull(argv[2], NULL, 0), rounds = strtoull(argv[3], NULL, 0);
    int hugetlb = atoi(argv[4]);
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t sl = sizeof(sa);
    if (bind(ls, (struct sockaddr *)&sa, sizeof(sa)) || listen(ls, 1) ||
        getsockname(ls, (struct sockaddr *)&sa, &sl)) {
        perror("listen");
        return 2;
    }
    pid_t child = fork();
    if (child == 0) { /* the replying side */
        uint8_t *src = map_pages(ps * npages, hugetlb);
        for (size_t i = 0; i < ps * npages; i += 64)
            src[i] = (uint8_t)(i >> 12);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
            _exit(2);
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        uint64_t page;
        while (io_full(fd, &page, sizeof(page), 0) == 0)
            if (page >= npages || io_full(fd, src + page * ps, ps, 1))
                _exit(1);
        _exit(0);
    }
    uint8_t *dst = map_pages(ps * npages, hugetlb);
    int fd = accept(ls, NULL, NULL);
    if (fd < 0) {
        perror("accept");
        return 2;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    uint64_t warm = rounds / 10 + 1, *lat = calloc(rounds, sizeof(uint64_t));
    for (uint64_t r = 0; r < rounds + warm; r++) {
        uint64_t page = (r * 7) % npages;
        uint64_t t0 = now_ns();
        if (io_full(fd, &page, sizeof(page), 1) || io_full(fd, dst + page * ps, ps, 0)) {
            fprintf(stderr, "the replying process went away\n");
            return 1;
        }
        if (r >= warm)
            lat[r - warm] = now_ns() - t0;
    }
    close(fd);
    waitpid(child, NULL, 0);
    printf("{\"page_bytes\": %zu, \"npages\": %llu, \"hugetlb\": %d, \"samples_ns\": [", ps,
           (unsigned long long)npages, hugetlb);
    for (uint64_t r = 0; r < rounds; r++)
        printf("%s%llu", r ? ", " : "", (unsigned long long)lat[r]);
    printf("]}\n");
    return 0;
}
