/* Per-layer workspaces kept between calls. A call takes one buffer from its layer's free list (a
 * mutex held for a few pointer moves, once per call), uses it alone, and gives it back, so
 * concurrent calls on one layer each hold their own buffer and a call in steady state allocates
 * nothing and touches no fresh page. A buffer too small for the call is replaced by a larger one;
 * buffers live until selfattn_layer_destroy. The list holds at most as many buffers as calls
 * ever ran at once on the layer. */
#include <pthread.h>
#include <string.h>

#include "internal.h"

struct sa_ws_cache {
    pthread_mutex_t mu;
    sa_ws *free; /* buffers not in use, any order */
};

sa_ws_cache *sa_ws_cache_create(void)
{
    sa_ws_cache *c = sa_malloc(sizeof *c);
    if (c == NULL)
        return NULL;
    if (pthread_mutex_init(&c->mu, NULL) != 0) {
        sa_free(c);
        return NULL;
    }
    c->free = NULL;
    return c;
}

void sa_ws_cache_destroy(sa_ws_cache *c)
{
    if (c == NULL)
        return;
    for (sa_ws *w = c->free, *next; w != NULL; w = next) {
        next = w->next;
        sa_free(w);
    }
    pthread_mutex_destroy(&c->mu);
    sa_free(c);
}

/* The header is padded to 64 bytes so that the data keeps the allocator's alignment. */
#define SA_WS_HEADER 64

sa_ws *sa_ws_acquire(sa_ws_cache *c, size_t bytes)
{
    pthread_mutex_lock(&c->mu);
    /* The first buffer large enough; failing that, the largest, to be replaced. */
    sa_ws **best = NULL;
    for (sa_ws **p = &c->free; *p != NULL; p = &(*p)->next) {
        if ((*p)->bytes >= bytes) {
            best = p;
            break;
        }
        if (best == NULL || (*p)->bytes > (*best)->bytes)
            best = p;
    }
    sa_ws *w = NULL;
    if (best != NULL) {
        w = *best;
        *best = w->next;
    }
    pthread_mutex_unlock(&c->mu);
    if (w != NULL && w->bytes >= bytes)
        return w;

    size_t total;
    if (!sa_add_size(bytes, SA_WS_HEADER, &total)) {
        sa_ws_release(c, w); /* keep the old one for later calls */
        return NULL;
    }
    sa_ws *fresh = sa_malloc(total);
    if (fresh == NULL) {
        sa_ws_release(c, w);
        return NULL;
    }
    sa_free(w);
    /* Fault every page in now, once: the workers that touch parts of it later (each its own
       scratch, whenever timing first gives it a task) then never fault inside a call. */
    memset((char *)fresh + SA_WS_HEADER, 0, bytes);
    fresh->bytes = bytes;
    fresh->next = NULL;
    fresh->data = (char *)fresh + SA_WS_HEADER;
    return fresh;
}

void sa_ws_release(sa_ws_cache *c, sa_ws *w)
{
    if (w == NULL)
        return;
    pthread_mutex_lock(&c->mu);
    w->next = c->free;
    c->free = w;
    pthread_mutex_unlock(&c->mu);
}

size_t sa_ws_plan_bytes(const sa_ws_plan *p)
{
    size_t bytes;
    if (p->overflow || !sa_mul_size(p->floats, sizeof(float), &bytes) ||
        bytes > (size_t)PTRDIFF_MAX)
        return 0;
    return bytes;
}

selfattn_status sa_ws_acquire_plan(sa_ws_cache *c, const sa_ws_plan *p, sa_ws **ws)
{
    const size_t bytes = sa_ws_plan_bytes(p);
    SA_CHECK(bytes != 0 || p->floats == 0, SELFATTN_ERR_OVERFLOW);
    *ws = sa_ws_acquire(c, bytes);
    SA_CHECK(*ws != NULL, SELFATTN_ERR_NOMEM);
    return SELFATTN_OK;
}
