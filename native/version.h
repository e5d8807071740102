/* The compiled module's version: migrate/_binding.py refuses a stale build. */
#ifndef MIGRATE_VERSION_H
#define MIGRATE_VERSION_H

/* cdef-begin */
#define MG_NATIVE_VERSION 6
int mg_native_version(void);
/* cdef-end */

#endif
