#include "version.h"

int mg_native_version(void)
{
    return MG_NATIVE_VERSION;
}
