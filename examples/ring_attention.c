/* ring_attention: sequence-parallel (ring) self-attention over MPI, on the public API only.
 *
 * A sequence of L tokens is split over P processes: rank r holds rows [r*L/P, (r+1)*L/P) of Q, K
 * and V (L must be divisible by P). Each rank keeps its Q rows; the K/V chunks travel around the
 * ring (rank r sends to r+1 and receives from r-1), one hop per step, P-1 steps. At each step a
 * rank posts the non-blocking send of the chunk it holds and the receive of the next one, runs
 * selfattn_attend_ex of its queries over the chunk at hand (with extras.lse), waits, and merges
 * the partial result into its running output with the log-sum-exp rule (ring attention, Liu et
 * al. 2023):
 *     m = max(lse, lse_c),  lse' = m + log(e^(lse - m) + e^(lse_c - m)),
 *     o' = e^(lse - lse') o + e^(lse_c - lse') o_c
 * a partial whose lse is -INFINITY (its row saw no key) contributing nothing.
 *
 * Causal attention uses two layer handles: one with SELFATTN_OPT_CAUSAL 1 for the diagonal chunk
 * (the rank's own K/V: q_len == kv_len, so the library's bottom-right alignment, query i sees keys
 * j <= i, is exactly the global causal mask restricted to that block) and one with CAUSAL 0 for
 * chunks from earlier ranks (every key is in the past of every query). Chunks from later ranks
 * are entirely in the future: no attention call, but they are still forwarded around the ring.
 * No bias view is needed because all chunks have the same length.
 *
 *   mpirun -np P ring_attention [--L N] [--heads N] [--kv-heads N] [--head-dim N] [--causal]
 *                               [--threads N] [--check] [--repeat N] [--seed N]
 *
 * Defaults: L 4096, 8 heads, kv-heads = heads, head-dim 64, full (non-causal) attention,
 * 1 thread per process (SELFATTN_OPT_THREADS), one run. The tensors (batch 1) are generated
 * element by element from a hash of (seed, tensor, row, column), so every rank builds its own rows
 * and rank 0 can build the whole. --check gathers the output on rank 0 and compares it with one
 * selfattn_attend call over the full tensors: PASS when max |diff| <= 1e-5 * max |ref|; the exit
 * status is non-zero on FAIL. With -np 1 the "ring" is one plain selfattn_attend call (the
 * one-process baseline). Rank 0 prints the median wall time of the ring attention over --repeat
 * runs (the slowest rank's time in each run) and the communication volume per step. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mpi.h>
#include <selfattn/selfattn.h>

/* ---- Deterministic data: element (tensor, row, col) from a hash, so any rank makes any rows -- */
static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Rows [row0, row0 + rows) of a [L][cols] tensor, uniform in [-amp, amp). */
static void fill_rows(float *dst, uint64_t seed, uint64_t tensor, int64_t row0, int64_t rows,
                      int64_t cols, float amp)
{
    uint64_t base = splitmix64(seed ^ (tensor << 56));
    for (int64_t i = 0; i < rows; i++)
        for (int64_t c = 0; c < cols; c++) {
            uint64_t h = splitmix64(base + (uint64_t)((row0 + i) * cols + c));
            double u = (double)(h >> 11) * (1.0 / 9007199254740992.0); /* [0, 1) */
            dst[i * cols + c] = (float)(amp * (2.0 * u - 1.0));
        }
}

enum { T_Q = 1, T_K = 2, T_V = 3 };

/* ---- Helpers -------------------------------------------------------------------------------- */
static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "ring_attention: out of memory (%zu bytes)\n", n);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    return p;
}

#define CHECK(call)                                                                                \
    do {                                                                                           \
        selfattn_status st_ = (call);                                                              \
        if (st_ != SELFATTN_OK) {                                                                  \
            fprintf(stderr, "ring_attention: %s: %s (%s)\n", #call, selfattn_status_string(st_),   \
                    selfattn_last_error());                                                        \
            MPI_Abort(MPI_COMM_WORLD, 2);                                                          \
        }                                                                                          \
    } while (0)

static double cpu_s(void) /* CPU time of the whole process (all its threads) */
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void usage(int rank, FILE *f)
{
    if (rank == 0)
        fprintf(f, "usage: mpirun -np P ring_attention [--L N] [--heads N] [--kv-heads N]\n"
                   "           [--head-dim N] [--causal] [--threads N] [--check] [--repeat N]\n"
                   "           [--seed N] [--help]   (L divisible by P; kv-heads divides heads)\n");
}

/* One attention layer (no weights: selfattn_attend needs none). */
static selfattn_layer *make_layer(int heads, int kv_heads, int head_dim, int causal, int threads)
{
    selfattn_layer *layer = NULL;
    CHECK(selfattn_layer_create(heads * head_dim, heads, &layer));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_HEAD_DIM, head_dim));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_N_KV_HEADS, kv_heads));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_CAUSAL, causal));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_THREADS, threads));
    return layer;
}

/* Merge a partial result (o_c, lse_c) into the running (o, lse): rows x heads, lse [heads][rows],
   o [rows][heads * head_dim]. */
static void merge(float *o, float *lse, const float *o_c, const float *lse_c, int rows, int heads,
                  int head_dim)
{
    const int64_t width = (int64_t)heads * head_dim;
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < rows; i++) {
            const double a = lse[(int64_t)h * rows + i], b = lse_c[(int64_t)h * rows + i];
            float *dst = o + (int64_t)i * width + (int64_t)h * head_dim;
            const float *src = o_c + (int64_t)i * width + (int64_t)h * head_dim;
            if (b == -INFINITY) /* the partial saw no key: nothing to add */
                continue;
            if (a == -INFINITY) { /* nothing so far: take the partial as it is */
                memcpy(dst, src, sizeof(float) * (size_t)head_dim);
                lse[(int64_t)h * rows + i] = (float)b;
                continue;
            }
            const double m = a > b ? a : b;
            const double l = m + log(exp(a - m) + exp(b - m));
            const float wa = (float)exp(a - l), wb = (float)exp(b - l);
            for (int d = 0; d < head_dim; d++)
                dst[d] = wa * dst[d] + wb * src[d];
            lse[(int64_t)h * rows + i] = (float)l;
        }
}

typedef struct ring_stats {
    double compute_s;     /* in selfattn_attend_ex */
    double compute_cpu_s; /* CPU time of the process during those calls (less sensitive to other
                             load on the machine than wall time) */
    double merge_s;       /* in merge() */
    double wait_s;        /* in MPI_Waitall (communication not hidden by the step's compute) */
    int calls;            /* attention calls made (causal: chunks from the future are skipped) */
} ring_stats;

/* The ring: q [C][H*D] (this rank's rows), kv0 holds this rank's K then V chunk ([C][KV*D] each);
   kv1 is the receive buffer of the same size. Output o [C][H*D]. */
static void ring_attend(int rank, int nranks, int C, int heads, int kv_heads, int head_dim,
                        int causal, const selfattn_layer *full, const selfattn_layer *diag,
                        const float *q, float *kv0, float *kv1, float *o, float *lse, float *o_c,
                        float *lse_c, ring_stats *stats)
{
    const int64_t kv_elems = (int64_t)C * kv_heads * head_dim; /* one of K or V */
    const int left = (rank - 1 + nranks) % nranks, right = (rank + 1) % nranks;
    float *cur = kv0, *next = kv1;
    memset(stats, 0, sizeof *stats);
    for (int s = 0; s < nranks; s++) {
        const int src = (rank - s + nranks) % nranks; /* the rank whose K/V chunk is at hand */
        MPI_Request req[2];
        int nreq = 0;
        if (s < nranks - 1) { /* pass the chunk on while computing on it (reads only) */
            MPI_Irecv(next, (int)(2 * kv_elems), MPI_FLOAT, left, s, MPI_COMM_WORLD, &req[nreq++]);
            MPI_Isend(cur, (int)(2 * kv_elems), MPI_FLOAT, right, s, MPI_COMM_WORLD, &req[nreq++]);
        }
        const selfattn_layer *layer = NULL;
        if (!causal)
            layer = full;
        else if (src == rank)
            layer = diag; /* diagonal block: q_len == kv_len, bottom-right = top-left alignment */
        else if (src < rank)
            layer = full; /* every key is earlier than every query */
        /* else: a chunk from the future, skipped (but forwarded above) */
        if (layer) {
            const int first = stats->calls == 0; /* step 0 is always the diagonal chunk */
            selfattn_extras ex;
            memset(&ex, 0, sizeof ex);
            ex.struct_size = sizeof ex;
            ex.lse = first ? lse : lse_c;
            double t0 = MPI_Wtime(), c0 = cpu_s();
            /* with one rank there is nothing to merge: the plain one-process call */
            CHECK(selfattn_attend_ex(layer, 1, C, C, q, cur, cur + kv_elems, NULL,
                                     nranks > 1 ? &ex : NULL, first ? o : o_c));
            double t1 = MPI_Wtime();
            stats->compute_cpu_s += cpu_s() - c0;
            stats->compute_s += t1 - t0;
            if (!first) {
                merge(o, lse, o_c, lse_c, C, heads, head_dim);
                stats->merge_s += MPI_Wtime() - t1;
            }
            stats->calls++;
        }
        if (nreq) {
            double t0 = MPI_Wtime();
            MPI_Waitall(nreq, req, MPI_STATUSES_IGNORE);
            stats->wait_s += MPI_Wtime() - t0;
            float *t = cur;
            cur = next;
            next = t;
        }
    }
}

static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi)
        return 0;
    *out = v;
    return 1;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, nranks;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);

    long L = 4096, heads = 8, kv_heads = 0, head_dim = 64, threads = 1, repeat = 1, seed = 1;
    int causal = 0, check = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        long *dst = NULL, lo = 1, hi = INT32_MAX;
        if (!strcmp(a, "--causal")) {
            causal = 1;
            continue;
        }
        if (!strcmp(a, "--check")) {
            check = 1;
            continue;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(rank, stdout);
            MPI_Finalize();
            return 0;
        }
        if (!strcmp(a, "--L"))
            dst = &L;
        else if (!strcmp(a, "--heads"))
            dst = &heads, hi = 4096;
        else if (!strcmp(a, "--kv-heads"))
            dst = &kv_heads, hi = 4096;
        else if (!strcmp(a, "--head-dim"))
            dst = &head_dim, hi = 65536;
        else if (!strcmp(a, "--threads"))
            dst = &threads, hi = 64;
        else if (!strcmp(a, "--repeat"))
            dst = &repeat, hi = 1000000;
        else if (!strcmp(a, "--seed"))
            dst = &seed, lo = 0, hi = INT32_MAX;
        if (!dst || i + 1 >= argc || !parse_int(argv[i + 1], lo, hi, dst)) {
            if (rank == 0 && !dst)
                fprintf(stderr, "ring_attention: unknown option '%s'\n", a);
            else if (rank == 0 && i + 1 >= argc)
                fprintf(stderr, "ring_attention: %s needs a value\n", a);
            else if (rank == 0)
                fprintf(stderr, "ring_attention: %s '%s': not an integer in [%ld, %ld]\n", a,
                        argv[i + 1], lo, hi);
            usage(rank, stderr);
            MPI_Finalize();
            return 2;
        }
        i++;
    }
    if (kv_heads == 0)
        kv_heads = heads;
    if (L % nranks != 0 || heads % kv_heads != 0 || heads * head_dim > INT32_MAX) {
        if (rank == 0)
            fprintf(stderr,
                    "ring_attention: L (%ld) must be divisible by the number of ranks (%d) "
                    "and kv-heads (%ld) must divide heads (%ld)\n",
                    L, nranks, kv_heads, heads);
        MPI_Finalize();
        return 2;
    }
    const int C = (int)(L / nranks); /* rows per rank */
    const int H = (int)heads, KV = (int)kv_heads, D = (int)head_dim;
    const int64_t qw = (int64_t)H * D, kvw = (int64_t)KV * D;
    if ((int64_t)C * 2 * kvw > INT32_MAX || (int64_t)C * qw > INT32_MAX) {
        if (rank == 0)
            fprintf(stderr,
                    "ring_attention: a chunk of more than INT32_MAX floats; use more ranks\n");
        MPI_Finalize();
        return 2;
    }

    /* This rank's rows. Q is drawn wider than K and V so that the softmax is not flat. */
    const int64_t row0 = (int64_t)rank * C;
    float *q = xmalloc(sizeof(float) * (size_t)(C * qw));
    float *kv0 = xmalloc(sizeof(float) * (size_t)(2 * C * kvw));
    float *kv1 = xmalloc(sizeof(float) * (size_t)(2 * C * kvw));
    float *o = xmalloc(sizeof(float) * (size_t)(C * qw));
    float *o_c = xmalloc(sizeof(float) * (size_t)(C * qw));
    float *lse = xmalloc(sizeof(float) * (size_t)C * (size_t)H);
    float *lse_c = xmalloc(sizeof(float) * (size_t)C * (size_t)H);
    float *k_own = xmalloc(sizeof(float) * (size_t)(2 * C * kvw)); /* pristine copy for repeats */
    fill_rows(q, (uint64_t)seed, T_Q, row0, C, qw, 3.0f);
    fill_rows(k_own, (uint64_t)seed, T_K, row0, C, kvw, 1.0f);
    fill_rows(k_own + C * kvw, (uint64_t)seed, T_V, row0, C, kvw, 1.0f);

    selfattn_layer *full = make_layer(H, KV, D, 0, (int)threads);
    selfattn_layer *diag = causal ? make_layer(H, KV, D, 1, (int)threads) : NULL;

    const double chunk_bytes = 2.0 * C * (double)kvw * sizeof(float);
    if (rank == 0) {
        printf("ring_attention: %d rank(s), L %ld (%d rows per rank), %d heads, %d kv-heads, "
               "head_dim %d, %s, %ld thread(s) per rank, selfattn %s\n",
               nranks, L, C, H, KV, D, causal ? "causal" : "full", threads,
               selfattn_version_string());
        printf("communication: %d step(s), each rank sends and receives one K/V chunk per step of "
               "2*(L/P)*kv_heads*head_dim*4 = %.2f MiB; %.2f MiB per rank in total\n",
               nranks - 1, chunk_bytes / 1048576.0, (nranks - 1) * chunk_bytes / 1048576.0);
        printf("compute per step (one full chunk): 4*(L/P)^2*heads*head_dim = %.3f GFLOP\n",
               4.0 * C * (double)C * qw * 1e-9);
        fflush(stdout);
    }

    double *times = xmalloc(sizeof(double) * (size_t)repeat);
    ring_stats st = {0};
    for (long r = 0; r < repeat; r++) {
        memcpy(kv0, k_own, sizeof(float) * (size_t)(2 * C * kvw));
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        ring_attend(rank, nranks, C, H, KV, D, causal, full, diag, q, kv0, kv1, o, lse, o_c, lse_c,
                    &st);
        double dt = MPI_Wtime() - t0, dt_max = 0;
        MPI_Reduce(&dt, &dt_max, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        times[r] = dt_max;
    }

    /* Per-rank breakdown of the last run: the slowest rank sets the time. */
    double mine[4] = {st.compute_s, st.merge_s, st.wait_s, st.compute_cpu_s};
    double *all = rank == 0 ? xmalloc(sizeof(double) * 4 * (size_t)nranks) : NULL;
    int *calls = rank == 0 ? xmalloc(sizeof(int) * (size_t)nranks) : NULL;
    MPI_Gather(mine, 4, MPI_DOUBLE, all, 4, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    MPI_Gather(&st.calls, 1, MPI_INT, calls, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        qsort(times, (size_t)repeat, sizeof *times, cmp_double);
        const double med =
            repeat % 2 ? times[repeat / 2] : 0.5 * (times[repeat / 2 - 1] + times[repeat / 2]);
        const double flop = 4.0 * (double)L * (double)L * (double)qw * (causal ? 0.5 : 1.0);
        printf("time: median %.4f s over %ld run(s) (min %.4f s), %.1f GFLOP/s (%s work "
               "4*L^2*H*D%s)\n",
               med, repeat, times[0], flop / med * 1e-9, causal ? "causal" : "full",
               causal ? "/2" : "");
        double cpu_total = 0;
        for (int r = 0; r < nranks; r++) {
            printf("  rank %d (last run): %d attention call(s), attend %.4f s (CPU %.4f s), "
                   "merge %.4f s, waiting for K/V %.4f s\n",
                   r, calls[r], all[4 * r], all[4 * r + 3], all[4 * r + 1], all[4 * r + 2]);
            cpu_total += all[4 * r + 3];
        }
        printf("  attend CPU time summed over ranks (last run): %.4f s\n", cpu_total);
        fflush(stdout);
    }
    free(all);
    free(calls);

    int fail = 0;
    if (check) {
        float *gathered = rank == 0 ? xmalloc(sizeof(float) * (size_t)(L * qw)) : NULL;
        MPI_Gather(o, (int)(C * qw), MPI_FLOAT, gathered, (int)(C * qw), MPI_FLOAT, 0,
                   MPI_COMM_WORLD);
        if (rank == 0) {
            float *qf = xmalloc(sizeof(float) * (size_t)(L * qw));
            float *kf = xmalloc(sizeof(float) * (size_t)(L * kvw));
            float *vf = xmalloc(sizeof(float) * (size_t)(L * kvw));
            float *ref = xmalloc(sizeof(float) * (size_t)(L * qw));
            fill_rows(qf, (uint64_t)seed, T_Q, 0, L, qw, 3.0f);
            fill_rows(kf, (uint64_t)seed, T_K, 0, L, kvw, 1.0f);
            fill_rows(vf, (uint64_t)seed, T_V, 0, L, kvw, 1.0f);
            CHECK(selfattn_attend(causal ? diag : full, 1, (int32_t)L, (int32_t)L, qf, kf, vf, NULL,
                                  ref));
            double max_diff = 0, max_ref = 0;
            int finite = 1;
            for (int64_t i = 0; i < L * qw; i++) {
                double d = fabs((double)gathered[i] - (double)ref[i]);
                if (!isfinite(gathered[i]))
                    finite = 0;
                if (d > max_diff)
                    max_diff = d;
                if (fabs((double)ref[i]) > max_ref)
                    max_ref = fabs((double)ref[i]);
            }
            fail = !finite || !(max_diff <= 1e-5 * max_ref);
            printf("check against one-process selfattn_attend: max |diff| %.3g, max |ref| %.3g, "
                   "tolerance 1e-5 * max |ref| = %.3g: %s\n",
                   max_diff, max_ref, 1e-5 * max_ref, fail ? "FAIL" : "PASS");
            fflush(stdout);
            free(qf);
            free(kf);
            free(vf);
            free(ref);
        }
        free(gathered);
        MPI_Bcast(&fail, 1, MPI_INT, 0, MPI_COMM_WORLD);
    }

    selfattn_layer_destroy(full);
    selfattn_layer_destroy(diag);
    free(times);
    free(q);
    free(kv0);
    free(kv1);
    free(o);
    free(o_c);
    free(lse);
    free(lse_c);
    free(k_own);
    MPI_Finalize();
    return fail ? 1 : 0;
}
