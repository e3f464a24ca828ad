/* The persistent worker pool: helper threads are started once, on first need, and shared by every
 * call on every layer of the process; between calls they watch for work for about 80 us, then
 * sleep on a condition variable (an idle process uses no CPU).
 *
 * A call posts a job that offers up to n_workers - 1 helper slots, runs the job itself as worker
 * 0, then withdraws the offer and waits only for the helpers that actually joined. Work inside a
 * job is handed out by the job's own counter (see sa_run_tasks), so a helper that joins late, or
 * never, changes only the speed, never the result. Concurrent calls post concurrent jobs; a call
 * never has more than its n_workers threads busy, and when the pool's threads are all busy the
 * caller simply does more of its own work.
 *
 * fork(): the child has none of the parent's helper threads, so a pthread_atfork handler resets
 * the pool in the child, which starts threads of its own on its first parallel call. */
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>

#include "internal.h"

#define SA_POOL_MAX (SA_MAX_THREADS - 1)

typedef struct sa_job {
    sa_job_fn fn;
    void *ctx;
    int slots;  /* helper slots still offered */
    int joined; /* helpers that took a slot: their worker ids are 1..joined */
    atomic_int active; /* helpers still running fn (raised under the lock, lowered without) */
    struct sa_job *next;
} sa_job;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t work; /* a job with free slots was posted, or shutdown */
    pthread_cond_t done; /* a helper left a job */
    sa_job *jobs;        /* jobs with free slots, oldest first */
    int n_threads;
    int shutdown;
    pthread_t tid[SA_POOL_MAX];
} sa_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0,
             0, {0}};

static pthread_once_t sa_pool_once = PTHREAD_ONCE_INIT;

/* Jobs posted so far: an idle helper watches it for a short while before it sleeps, so that the
   next phase of a call (a forward posts three or four in a row) finds it awake instead of paying
   a wake-up each time. 4000 pauses (80 us on AMD EPYC Zen 5) after the last job, then the
   condition variable: an idle process still uses no CPU. The caller waits for its helpers the
   same way at the end of a job (sa_pool_run). */
static atomic_uint sa_pool_posted;
#define SA_POOL_SPIN 4000

/* One step of such a wait. */
static inline void sa_pool_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void sa_pool_prepare(void)
{
    pthread_mutex_lock(&sa_pool.mu);
}

static void sa_pool_parent(void)
{
    pthread_mutex_unlock(&sa_pool.mu);
}

/* In the child only the forking thread exists: forget the parent's threads and jobs. */
static void sa_pool_child(void)
{
    pthread_mutex_init(&sa_pool.mu, NULL);
    pthread_cond_init(&sa_pool.work, NULL);
    pthread_cond_init(&sa_pool.done, NULL);
    sa_pool.jobs = NULL;
    sa_pool.n_threads = 0;
    sa_pool.shutdown = 0;
}

static void sa_pool_init(void)
{
    pthread_atfork(sa_pool_prepare, sa_pool_parent, sa_pool_child);
}

static void sa_unlink_job(sa_job *job)
{
    for (sa_job **p = &sa_pool.jobs; *p != NULL; p = &(*p)->next)
        if (*p == job) {
            *p = job->next;
            return;
        }
}

static void *sa_pool_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&sa_pool.mu);
    for (;;) {
        if (sa_pool.shutdown)
            break;
        sa_job *job = sa_pool.jobs;
        if (job == NULL) {
            const unsigned seen = atomic_load_explicit(&sa_pool_posted, memory_order_relaxed);
            pthread_mutex_unlock(&sa_pool.mu);
            int spins = 0;
            while (spins < SA_POOL_SPIN &&
                   atomic_load_explicit(&sa_pool_posted, memory_order_relaxed) == seen) {
                sa_pool_pause();
                spins++;
            }
            pthread_mutex_lock(&sa_pool.mu);
            if (spins == SA_POOL_SPIN && sa_pool.jobs == NULL && !sa_pool.shutdown)
                pthread_cond_wait(&sa_pool.work, &sa_pool.mu);
            continue;
        }
        const int id = ++job->joined;
        atomic_fetch_add_explicit(&job->active, 1, memory_order_relaxed);
        if (--job->slots == 0)
            sa_unlink_job(job);
        pthread_mutex_unlock(&sa_pool.mu);
        job->fn(job->ctx, id);
        /* the job (on its caller's stack) may be gone once `active` is 0: not touched after */
        const int last = atomic_fetch_sub_explicit(&job->active, 1, memory_order_release) == 1;
        pthread_mutex_lock(&sa_pool.mu);
        if (last) /* a caller that stopped spinning sleeps on `done` (under the lock) */
            pthread_cond_broadcast(&sa_pool.done);
    }
    pthread_mutex_unlock(&sa_pool.mu);
    return NULL;
}

/* Starts threads until the pool has `want` (under the lock). A start that fails leaves the pool
   smaller: fewer helpers, same results. */
static void sa_pool_grow(int want)
{
    if (want > SA_POOL_MAX)
        want = SA_POOL_MAX;
    while (sa_pool.n_threads < want && sa_thread_start_allowed()) {
        if (pthread_create(&sa_pool.tid[sa_pool.n_threads], NULL, sa_pool_main, NULL) != 0)
            break;
        sa_pool.n_threads++;
    }
}

void sa_pool_run(int n_workers, sa_job_fn fn, void *ctx)
{
    if (n_workers <= 1) {
        fn(ctx, 0);
        return;
    }
    pthread_once(&sa_pool_once, sa_pool_init);
    sa_job job = {fn, ctx, 0, 0, 0, NULL};
    pthread_mutex_lock(&sa_pool.mu);
    sa_pool_grow(n_workers - 1);
    job.slots = n_workers - 1 < sa_pool.n_threads ? n_workers - 1 : sa_pool.n_threads;
    if (job.slots > 0) {
        sa_job **tail = &sa_pool.jobs;
        while (*tail != NULL)
            tail = &(*tail)->next;
        *tail = &job;
        atomic_fetch_add_explicit(&sa_pool_posted, 1, memory_order_relaxed);
        if (job.slots == 1)
            pthread_cond_signal(&sa_pool.work);
        else
            pthread_cond_broadcast(&sa_pool.work);
    }
    pthread_mutex_unlock(&sa_pool.mu);

    fn(ctx, 0);

    pthread_mutex_lock(&sa_pool.mu);
    if (job.slots > 0) /* still offered: withdraw what nobody took */
        sa_unlink_job(&job);
    pthread_mutex_unlock(&sa_pool.mu);
    /* No helper joins from here on. The helpers' last tasks end within microseconds of the
       caller's (the tasks are handed out one at a time), so wait for them spinning first:
       sleeping on `done` made each phase's end cost the caller a wake-up (100-180 us on the
       2-vCPU EPYC VM) whenever a helper finished after it. */
    for (int spins = 0; spins < SA_POOL_SPIN; spins++) {
        if (atomic_load_explicit(&job.active, memory_order_acquire) == 0)
            return;
        sa_pool_pause();
    }
    pthread_mutex_lock(&sa_pool.mu);
    while (atomic_load_explicit(&job.active, memory_order_acquire) > 0)
        pthread_cond_wait(&sa_pool.done, &sa_pool.mu);
    pthread_mutex_unlock(&sa_pool.mu);
}

int sa_pool_size(void)
{
    pthread_mutex_lock(&sa_pool.mu);
    const int n = sa_pool.n_threads;
    pthread_mutex_unlock(&sa_pool.mu);
    return n;
}

/* Unloading the library (dlclose, or process exit) stops and joins the helpers, so that no thread
   is left running code that is about to be unmapped. */
__attribute__((destructor)) static void sa_pool_shutdown(void)
{
    pthread_mutex_lock(&sa_pool.mu);
    sa_pool.shutdown = 1;
    pthread_cond_broadcast(&sa_pool.work);
    const int n = sa_pool.n_threads;
    pthread_mutex_unlock(&sa_pool.mu);
    for (int i = 0; i < n; i++)
        pthread_join(sa_pool.tid[i], NULL);
    pthread_mutex_lock(&sa_pool.mu);
    sa_pool.n_threads = 0;
    sa_pool.shutdown = 0;
    pthread_mutex_unlock(&sa_pool.mu);
}

typedef struct sa_tasks {
    atomic_int next;
    int n_tasks;
    sa_task_fn task;
    void *arg;
} sa_tasks;

static void sa_tasks_worker(void *ctx, int worker)
{
    sa_tasks *t = ctx;
    for (;;) {
        const int i = atomic_fetch_add_explicit(&t->next, 1, memory_order_relaxed);
        if (i >= t->n_tasks)
            return;
        t->task(t->arg, worker, i);
    }
}

void sa_run_tasks(int n_workers, int n_tasks, sa_task_fn task, void *arg)
{
    sa_tasks t;
    atomic_init(&t.next, 0);
    t.n_tasks = n_tasks;
    t.task = task;
    t.arg = arg;
    sa_pool_run(n_workers < n_tasks ? n_workers : n_tasks, sa_tasks_worker, &t);
}
