/* The one allocator of the library: 64-byte aligned blocks (a cache line, and a full AVX-512
   vector), so that kernels see aligned rows. Every allocation goes through here so that a test
   build can inject failures in one place. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

void *sa_malloc(size_t bytes)
{
    void *p = NULL;
    if (bytes == 0)
        bytes = 1;
    if (posix_memalign(&p, 64, bytes) != 0)
        return NULL;
    return p;
}

void *sa_calloc(size_t n, size_t size)
{
    size_t bytes;
    if (!sa_mul_size(n, size, &bytes))
        return NULL;
    void *p = sa_malloc(bytes);
    if (p != NULL)
        memset(p, 0, bytes);
    return p;
}

void sa_free(void *p)
{
    free(p);
}
