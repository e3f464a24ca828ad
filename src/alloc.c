/* The one allocator of the library: 64-byte aligned blocks (a cache line, and a full AVX-512
   vector), so that kernels see aligned rows. Every allocation goes through here so that tests
   can make the n-th one fail (sa_test_fail_allocation, reachable from the static test archive
   only: it is not exported from the shared library). Helper-thread starts can be made to fail
   the same way (sa_test_fail_thread_starts). */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* 0: never fail. n > 0: the n-th allocation from now fails (and only that one); counts down to
   0 as allocations happen. */
static atomic_long sa_fail_countdown;

long sa_test_fail_allocation(long n)
{
    return atomic_exchange(&sa_fail_countdown, n);
}

static int sa_should_fail(void)
{
    long c = atomic_load_explicit(&sa_fail_countdown, memory_order_relaxed);
    while (c > 0) {
        if (atomic_compare_exchange_weak(&sa_fail_countdown, &c, c - 1))
            return c == 1;
    }
    return 0;
}

void *sa_malloc(size_t bytes)
{
    void *p = NULL;
    if (sa_should_fail())
        return NULL;
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

static atomic_int sa_fail_threads;

void sa_test_fail_thread_starts(int on)
{
    atomic_store(&sa_fail_threads, on);
}

int sa_thread_start_allowed(void)
{
    return !atomic_load_explicit(&sa_fail_threads, memory_order_relaxed);
}
