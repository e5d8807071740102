#define _GNU_SOURCE
#include "zstd.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>

struct mg_zstd_funcs Z;
static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static int loaded;

int mg_zstd_ready(void)
{
    return __atomic_load_n(&loaded, __ATOMIC_ACQUIRE);
}

int mg_zstd_load(char *why, size_t why_len)
{
    pthread_mutex_lock(&load_lock);
    int rc = 0;
    if (loaded)
        goto out;
    /* the library is never closed: its functions are used until exit */
    void *lib = dlopen("libzstd.so.1", RTLD_NOW);
    if (!lib) {
        snprintf(why, why_len, "%s", dlerror());
        rc = -ENOENT;
        goto out;
    }
#define ZSTD_RESOLVE(ret, name, args) \
    if (!(*(void **)&Z.name = dlsym(lib, #name))) { \
        snprintf(why, why_len, "libzstd.so.1 has no %s (zstd 1.4 or later is needed)", #name); \
        rc = -ENOENT; \
        goto out; \
    }
    ZSTD_FUNCS(ZSTD_RESOLVE)
    __atomic_store_n(&loaded, 1, __ATOMIC_RELEASE);
out:
    pthread_mutex_unlock(&load_lock);
    return rc;
}

const char *mg_zstd_error_name(uint64_t code)
{
    return mg_zstd_ready() ? Z.ZSTD_getErrorString((int)code) : "libzstd not loaded";
}
