/* The fault-handling floor: what one userfaultfd round trip costs with no
 * network and no Python. One thread touches pages one at a time; a handler
 * thread does a blocking read() of the uffd and resolves each fault with
 * UFFDIO_CONTINUE (MINOR: the page is already in the page cache, written
 * through an alias mapping beforehand) or UFFDIO_COPY (MISSING: the handler
 * copies the page in, as before the MINOR series).
 *
 * Built by benchmarks/floors.py at run time: cc -O2 -pthread fault_floor.c.
 * Usage: fault_floor continue|copy 4k|2m NPAGES
 * Prints one JSON object: per-fault round trip (ns, as the faulting thread
 * sees it) and handler ioctl time, as sorted samples' percentiles, plus the
 * raw round-trip samples (for CDF plots).
 *
 * With a 4th argument "dontwake" the ioctl is issued with DONTWAKE and the
 * faulting thread is woken by a separate UFFDIO_WAKE after it, so the ioctl
 * time is the placement alone (on these VMs waking a thread on an idle CPU
 * costs 1-6 us of IPI that has nothing to do with placing the page); the
 * round trip then has one more syscall in it. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef MFD_HUGETLB
#define MFD_HUGETLB 4U
#endif
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif

static int uffd;
static int use_copy;
static int dontwake;
static uint64_t page_size, npages;
static uint8_t *guest, *src;
static uint64_t *ioctl_ns;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "fault_floor: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void *handler(void *arg)
{
    (void)arg;
    for (uint64_t i = 0; i < npages; i++) {
        struct uffd_msg msg;
        ssize_t n = read(uffd, &msg, sizeof msg);  /* blocking */
        if (n != sizeof msg)
            die("read uffd");
        if (msg.event != UFFD_EVENT_PAGEFAULT)
            die("unexpected uffd event");
        uint64_t addr = msg.arg.pagefault.address & ~(page_size - 1);
        uint64_t t0 = now_ns();
        if (use_copy) {
            uint64_t off = addr - (uint64_t)(uintptr_t)guest;
            struct uffdio_copy c = {.dst = addr, .src = (uint64_t)(uintptr_t)src + off, .len = page_size,
                                    .mode = dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0};
            if (ioctl(uffd, UFFDIO_COPY, &c) < 0 && errno != EEXIST)
                die("UFFDIO_COPY");
        } else {
            struct uffdio_continue c = {.range = {.start = addr, .len = page_size},
                                        .mode = dontwake ? UFFDIO_CONTINUE_MODE_DONTWAKE : 0};
            if (ioctl(uffd, UFFDIO_CONTINUE, &c) < 0 && errno != EEXIST)
                die("UFFDIO_CONTINUE");
        }
        ioctl_ns[i] = now_ns() - t0;
        struct uffdio_range wake = {.start = addr, .len = page_size};
        if (dontwake && ioctl(uffd, UFFDIO_WAKE, &wake) < 0)
            die("UFFDIO_WAKE");
    }
    return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(const uint64_t *sorted, uint64_t n, double q)
{
    uint64_t k = (uint64_t)(q / 100.0 * (double)(n - 1) + 0.5);
    return (double)sorted[k < n ? k : n - 1];
}

int main(int argc, char **argv)
{
    if (argc != 4 && !(argc == 5 && strcmp(argv[4], "dontwake") == 0)) {
        fprintf(stderr, "usage: fault_floor continue|copy 4k|2m NPAGES [dontwake]\n");
        return 2;
    }
    use_copy = strcmp(argv[1], "copy") == 0;
    dontwake = argc == 5;
    int huge = strcmp(argv[2], "2m") == 0;
    page_size = huge ? (2u << 20) : 4096;
    npages = strtoull(argv[3], NULL, 10);
    if (npages < 2)
        npages = 2;
    uint64_t size = page_size * npages;

    int fd = memfd_create("fault-floor", MFD_CLOEXEC | (huge ? MFD_HUGETLB | MFD_HUGE_2MB : 0));
    if (fd < 0)
        die("memfd_create");
    if (ftruncate(fd, (off_t)size) < 0)
        die("ftruncate");
    guest = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (guest == MAP_FAILED)
        die("mmap guest");
    /* COPY reads each page from its own source buffer, as an agent copies
     * from the buffer a page arrived in: one reused buffer would stay in the
     * CPU cache and flatter COPY. */
    if (use_copy) {
        src = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (src == MAP_FAILED)
            die("mmap src");
        memset(src, 0x5a, size);
    }
    if (!use_copy) {
        /* Every page in the page cache before the guest touches it: the alias
         * write the destination agent does when a page arrives. */
        uint8_t *alias = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (alias == MAP_FAILED)
            die("mmap alias");
        for (uint64_t i = 0; i < npages; i++)
            memset(alias + i * page_size, 0x5a, page_size);
        (void)alias; /* stays mapped, as the agent keeps its alias */
    }

    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
    if (uffd < 0) {
        uffd = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (uffd >= 0) {
            int u = ioctl(uffd, USERFAULTFD_IOC_NEW, O_CLOEXEC);
            close(uffd);
            uffd = u;
        }
        if (uffd < 0)
            die("userfaultfd");
    }
    struct uffdio_api api = {.api = UFFD_API,
                             .features = use_copy ? 0 : (huge ? UFFD_FEATURE_MINOR_HUGETLBFS : UFFD_FEATURE_MINOR_SHMEM)};
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        die("UFFDIO_API");
    struct uffdio_register reg = {.range = {.start = (uint64_t)(uintptr_t)guest, .len = size},
                                  .mode = use_copy ? UFFDIO_REGISTER_MODE_MISSING : UFFDIO_REGISTER_MODE_MINOR};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        die("UFFDIO_REGISTER");

    uint64_t *rt = calloc(npages, sizeof *rt);
    ioctl_ns = calloc(npages, sizeof *ioctl_ns);
    if (!rt || !ioctl_ns)
        die("calloc");
    pthread_t th;
    if (pthread_create(&th, NULL, handler, NULL))
        die("pthread_create");
    uint64_t t_start = now_ns();
    for (uint64_t i = 0; i < npages; i++) {
        volatile uint8_t *p = guest + i * page_size;
        uint64_t t0 = now_ns();
        (void)*p;
        rt[i] = now_ns() - t0;
    }
    uint64_t t_total = now_ns() - t_start;
    pthread_join(th, NULL);

    printf("{\"mode\": \"%s\", \"page_size\": %lu, \"faults\": %lu, \"seconds\": %.6f, \"samples_ns\": [",
           use_copy ? "copy" : "continue", (unsigned long)page_size, (unsigned long)npages, t_total / 1e9);
    for (uint64_t i = 0; i < npages; i++)
        printf("%s%lu", i ? ", " : "", (unsigned long)rt[i]);
    qsort(rt, npages, sizeof *rt, cmp_u64);
    qsort(ioctl_ns, npages, sizeof *ioctl_ns, cmp_u64);
    printf("], \"p50_us\": %.3f, \"p99_us\": %.3f, \"p999_us\": %.3f, \"ioctl_p50_us\": %.3f, \"ioctl_p99_us\": %.3f}\n",
           pct(rt, npages, 50) / 1e3, pct(rt, npages, 99) / 1e3, pct(rt, npages, 99.9) / 1e3,
           pct(ioctl_ns, npages, 50) / 1e3, pct(ioctl_ns, npages, 99) / 1e3);
    return 0;
}
