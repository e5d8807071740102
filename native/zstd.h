/* zstd on the raw push channels, through the system's libzstd.so.1 resolved
 * at run time: Debian installs the library everywhere (dpkg depends on it)
 * but not its headers, so the few prototypes and constants used are declared
 * here, as tls.c does for OpenSSL. Only the stable API of zstd 1.4+ is used
 * (ZSTD_compress2 with a reused context, ZSTD_decompressStream). */
#ifndef MIGRATE_ZSTD_H
#define MIGRATE_ZSTD_H
#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
/* The window a push frame may use: the sender sets it, the receiver refuses
 * a frame that asks for more (so a receiver holds at most this much a stream,
 * whatever a frame says). */
#define MG_ZSTD_WINDOW_LOG 19
/* Resolves the zstd functions used (libzstd.so.1). 0, or -ENOENT (why says
 * what is missing). Idempotent, thread-safe. */
int mg_zstd_load(char *why, size_t why_len);
/* zstd's text for one of its error codes (mg_space.error_detail). */
const char *mg_zstd_error_name(uint64_t code);
/* cdef-end */

/* ---- for the C senders and receivers (after mg_zstd_load succeeded) ---- */

typedef struct ZSTD_CCtx_s ZSTD_CCtx;
typedef struct ZSTD_DCtx_s ZSTD_DCtx;
typedef struct { const void *src; size_t size; size_t pos; } ZSTD_inBuffer;
typedef struct { void *dst; size_t size; size_t pos; } ZSTD_outBuffer;

/* zstd.h's values: ABI, fixed since 1.4 */
#define ZSTD_c_compressionLevel 100
#define ZSTD_c_windowLog 101
#define ZSTD_c_contentSizeFlag 200
#define ZSTD_d_windowLogMax 100
#define ZSTD_reset_session_only 1
#define ZSTD_CONTENTSIZE_UNKNOWN (0ULL - 1)
#define ZSTD_CONTENTSIZE_ERROR (0ULL - 2)

#define ZSTD_FUNCS(X) \
    X(ZSTD_CCtx *, ZSTD_createCCtx, (void)) \
    X(size_t, ZSTD_freeCCtx, (ZSTD_CCtx *)) \
    X(size_t, ZSTD_CCtx_setParameter, (ZSTD_CCtx *, int, int)) \
    X(size_t, ZSTD_compress2, (ZSTD_CCtx *, void *, size_t, const void *, size_t)) \
    X(size_t, ZSTD_compressBound, (size_t)) \
    X(ZSTD_DCtx *, ZSTD_createDCtx, (void)) \
    X(size_t, ZSTD_freeDCtx, (ZSTD_DCtx *)) \
    X(size_t, ZSTD_DCtx_setParameter, (ZSTD_DCtx *, int, int)) \
    X(size_t, ZSTD_DCtx_reset, (ZSTD_DCtx *, int)) \
    X(size_t, ZSTD_decompressStream, (ZSTD_DCtx *, ZSTD_outBuffer *, ZSTD_inBuffer *)) \
    X(unsigned long long, ZSTD_getFrameContentSize, (const void *, size_t)) \
    X(unsigned, ZSTD_isError, (size_t)) \
    X(int, ZSTD_getErrorCode, (size_t)) \
    X(const char *, ZSTD_getErrorString, (int))

#define ZSTD_DECLARE(ret, name, args) ret(*name) args;
struct mg_zstd_funcs {
    ZSTD_FUNCS(ZSTD_DECLARE)
};
#undef ZSTD_DECLARE
/* Filled by mg_zstd_load; read only once it returned 0 (mg_zstd_ready). */
extern struct mg_zstd_funcs Z;
int mg_zstd_ready(void);

#endif
