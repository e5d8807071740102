/* userfaultfd wrappers. See uffd.h: mechanism only, -errno on failure. */
#define _GNU_SOURCE
#include "uffd.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int mg_uffd_create_syscall(int flags)
{
    long fd = syscall(__NR_userfaultfd, flags);
    return fd < 0 ? -errno : (int)fd;
}

int mg_uffd_create_dev(int flags)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int err = errno;
    close(dev);
    return fd < 0 ? -err : fd;
}

int mg_uffd_api(int uffd, uint64_t *features, uint64_t *ioctls)
{
    struct uffdio_api api = { .api = UFFD_API, .features = *features };
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        return -errno;
    *features = api.features;
    *ioctls = api.ioctls;
    return 0;
}

int mg_uffd_register(int uffd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls)
{
    struct uffdio_register reg = { .range = { start, len }, .mode = mode };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    *ioctls = reg.ioctls;
    return 0;
}

int mg_uffd_unregister(int uffd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = { start, len };
    return ioctl(uffd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
}

int mg_uffd_continue(int uffd, uint64_t start, uint64_t len, int dontwake, int64_t *done)
{
    struct uffdio_continue c = {
        .range = { start, len },
        .mode = dontwake ? UFFDIO_CONTINUE_MODE_DONTWAKE : 0,
    };
    int rc = ioctl(uffd, UFFDIO_CONTINUE, &c) < 0 ? -errno : 0;
    *done = c.mapped;
    return rc;
}

int mg_uffd_copy(int uffd, uint64_t dst, uint64_t src, uint64_t len, int dontwake, int64_t *done)
{
    struct uffdio_copy c = {
        .dst = dst, .src = src, .len = len,
        .mode = dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0,
    };
    int rc = ioctl(uffd, UFFDIO_COPY, &c) < 0 ? -errno : 0;
    *done = c.copy;
    return rc;
}

int mg_uffd_zeropage(int uffd, uint64_t start, uint64_t len, int dontwake, int64_t *done)
{
    struct uffdio_zeropage z = {
        .range = { start, len },
        .mode = dontwake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0,
    };
    int rc = ioctl(uffd, UFFDIO_ZEROPAGE, &z) < 0 ? -errno : 0;
    *done = z.zeropage;
    return rc;
}

int mg_uffd_wake(int uffd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = { start, len };
    return ioctl(uffd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

int mg_uffd_read(int uffd, struct mg_uffd_event *out, int max)
{
    struct uffd_msg msgs[64];
    if (max > 64)
        max = 64;
    ssize_t n = read(uffd, msgs, sizeof(msgs[0]) * (size_t)max);
    if (n < 0)
        return -errno;
    int count = (int)(n / (ssize_t)sizeof(msgs[0]));
    for (int i = 0; i < count; i++) {
        out[i].event = msgs[i].event;
        out[i].flags = 0;
        out[i].address = 0;
        out[i].arg = 0;
        switch (msgs[i].event) {
        case UFFD_EVENT_PAGEFAULT:
            out[i].flags = msgs[i].arg.pagefault.flags;
            out[i].address = msgs[i].arg.pagefault.address;
            out[i].arg = msgs[i].arg.pagefault.feat.ptid;
            break;
        case UFFD_EVENT_REMOVE:
        case UFFD_EVENT_UNMAP:
            out[i].address = msgs[i].arg.remove.start;
            out[i].arg = msgs[i].arg.remove.end;
            break;
        case UFFD_EVENT_REMAP:
            out[i].address = msgs[i].arg.remap.from;
            out[i].arg = msgs[i].arg.remap.to;
            break;
        default:
            break;
        }
    }
    return count;
}

int mg_poll_in(const int *fds, int nfds, int timeout_ms)
{
    struct pollfd p[8];
    if (nfds > 8)
        return -EINVAL;
    for (int i = 0; i < nfds; i++) {
        p[i].fd = fds[i];
        p[i].events = POLLIN;
        p[i].revents = 0;
    }
    int rc = poll(p, (nfds_t)nfds, timeout_ms);
    if (rc < 0)
        return -errno;
    int mask = 0;
    for (int i = 0; i < nfds; i++)
        if (p[i].revents & (POLLIN | POLLHUP | POLLERR))
            mask |= 1 << i;
    return mask;
}
