/* libFuzzer target: bytes become a sequence of API calls on one layer -- dimensions, options,
 * weights (with hostile values: NaN, +-inf, 1e30, subnormals), lengths, hostile sizes -- and the
 * contract is checked on every call:
 *   - no crash, no sanitizer report (built with ASan + UBSan);
 *   - a failing call leaves caller outputs and the handle's options untouched;
 *   - when forward/attend succeed on finite, moderate inputs, the output matches the float64
 *     reference within 1e-4 of its scale (plus a tiny absolute floor) and holds no NaN;
 *   - NaN is planted wherever the header says nothing is read (x and dy rows of padding, K and V
 *     rows past kv_lengths, bias elements at masked keys, cache rows past n_new): a call on
 *     otherwise moderate input still gives finite outputs that match the reference.
 * Build: cmake -DCMAKE_C_COMPILER=clang -DSELFATTN_BUILD_FUZZ=ON (see tests/CMakeLists.txt). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "reference.h"
#include "testutil.h"
#include "selfattn/selfattn.h"

typedef struct reader {
    const uint8_t *p;
    size_t n;
} reader;

static uint8_t rd(reader *r)
{
    if (r->n == 0)
        return 0;
    r->n--;
    return *r->p++;
}

static const float special[] = {NAN, INFINITY, -INFINITY, 1e30f, -1e30f, 1e-40f, 0.0f, -0.0f};

/* A float: mostly moderate values from the bytes, sometimes a hostile one. */
static float rd_float(reader *r, int *hostile)
{
    const uint8_t b = rd(r);
    if (b >= 248) {
        *hostile = 1;
        return special[b - 248];
    }
    return ((float)b - 124.0f) / 64.0f;
}

#define CHECK(c)                                                                                   \
    do {                                                                                           \
        if (!(c))                                                                                  \
            abort();                                                                               \
    } while (0)

static int is_sentinel(const float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(&p[i], &(float){-7777.0f}, sizeof(float)) != 0)
            return 0;
    return 1;
}

static void fill_sentinel(float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = -7777.0f;
}

#define N_OPTS 12 /* integer options 1..12 (10, 11: the 1.3 storage dtypes; 12: V_HEAD_DIM) */

static void snapshot(const selfattn_layer *l, int64_t v[N_OPTS])
{
    for (int o = 1; o <= N_OPTS; o++)
        CHECK(selfattn_layer_get(l, (selfattn_option)o, &v[o - 1]) == SELFATTN_OK);
}

/* Extras from one byte: bit 0 use them, bit 1 a [q][k] bias broadcast over batch and heads,
   bit 2 weights, bit 3 lse, bit 4 a struct_size that is too small (INVALID). */
typedef struct fz_extras {
    selfattn_extras e;
    float *bias, *weights, *lse;
    size_t n_w, n_l;
} fz_extras;

static void fz_extras_make(reader *r, fz_extras *x, int small, size_t rows, int32_t q_len,
                           int32_t kv_len, int *hostile)
{
    const uint8_t eb = rd(r);
    memset(x, 0, sizeof *x);
    /* too small: below the 1.1 struct (1.3 grew it; the 1.1 size is valid) */
    x->e.struct_size = (eb & 16) ? (uint32_t)offsetof(selfattn_extras, scores) - 8
                                 : (uint32_t)sizeof x->e;
    if (!small)
        return;
    if (eb & 2) {
        const size_t n = (size_t)q_len * (size_t)kv_len;
        x->bias = malloc(n * sizeof(float));
        for (size_t i = 0; i < n; i++)
            x->bias[i] = rd_float(r, hostile);
        x->e.attn_bias = x->bias;
        x->e.bias_stride_row = kv_len;
    }
    if (eb & 4) {
        x->n_w = rows * (size_t)kv_len;
        x->weights = malloc(x->n_w * sizeof(float));
        fill_sentinel(x->weights, x->n_w);
        x->e.weights = x->weights;
    }
    if (eb & 8) {
        x->n_l = rows;
        x->lse = malloc(x->n_l * sizeof(float));
        fill_sentinel(x->lse, x->n_l);
        x->e.lse = x->lse;
    }
}

static void fz_extras_free(fz_extras *x)
{
    free(x->bias);
    free(x->weights);
    free(x->lse);
}

/* On failure nothing is written; on success of a finite call, weights and lse match. */
static void fz_extras_check(const fz_extras *x, selfattn_status st, int compare,
                            const double *wr, const double *lr)
{
    if (st != SELFATTN_OK) {
        CHECK(x->weights == NULL || is_sentinel(x->weights, x->n_w));
        CHECK(x->lse == NULL || is_sentinel(x->lse, x->n_l));
        return;
    }
    if (!compare)
        return;
    for (size_t i = 0; x->weights != NULL && i < x->n_w; i++)
        CHECK(fabs((double)x->weights[i] - wr[i]) <= 1e-4);
    for (size_t i = 0; x->lse != NULL && i < x->n_l; i++)
        CHECK(isinf(lr[i]) ? x->lse[i] == (float)lr[i]
                           : fabs((double)x->lse[i] - lr[i]) <= 1e-4 * (1.0 + fabs(lr[i])));
}

/* A dimension: usually small, sometimes 0 or negative (INVALID). */
/* y matches the float64 reference within 1e-4 of its scale (plus a tiny floor), with no NaN. */
static void check_close(const float *y, const double *ref, size_t n)
{
    double err, mx;
    ref_max_err(y, ref, n, &err, &mx);
    CHECK(err <= 1e-4 * mx + 1e-6);
}

/* ---- NaN where the header says nothing is read: a call that succeeds on otherwise moderate
   input must still give finite outputs (checked against the reference, which never reads those
   elements either). ---- */
/* lens NULL, or each of lens[0 .. batch) in [0, max]: the call can succeed */
static int lens_valid(const int32_t *lens, int32_t batch, int32_t max)
{
    for (int32_t b = 0; lens != NULL && b < batch; b++)
        if (lens[b] < 0 || lens[b] > max)
            return 0;
    return 1;
}

/* NaN in rows [lens[b], rows) of each sequence of t [batch][rows][width] */
static void plant_rows(float *t, int32_t batch, int32_t rows, size_t width, const int32_t *lens)
{
    for (int32_t b = 0; lens != NULL && b < batch; b++)
        for (size_t e = (size_t)lens[b] * width; e < (size_t)rows * width; e++)
            t[(size_t)b * rows * width + e] = NAN;
}

/* The header's visibility rule: query i (at position kv_len - q_len + i; with causal 2 at i,
   with 3 at valid - q_len + i) and key j. */
static int key_masked(int causal, int window, int32_t q_len, int32_t kv_len, int32_t valid,
                      int32_t i, int32_t j)
{
    const long p = causal == 2 ? (long)i
                   : causal == 3 ? (long)valid - q_len + i
                                 : (long)kv_len - q_len + i;
    if (j >= valid || (causal && j > p))
        return 1;
    return window > 0 && (causal ? p - j >= window : labs(p - j) >= window);
}

/* NaN at the elements of a [q_len][kv_len] bias (broadcast over batch and heads) that no
   sequence reads: masked keys, and with pad_queries rows of padding. */
static void plant_bias(float *bias, int32_t q_len, int32_t kv_len, int32_t batch,
                       const int32_t *lens, int causal, int window, int pad_queries)
{
    for (int32_t i = 0; bias != NULL && i < q_len; i++)
        for (int32_t j = 0; j < kv_len; j++) {
            int read = 0;
            for (int32_t b = 0; b < batch && !read; b++) {
                const int32_t valid = lens != NULL ? lens[b] : kv_len;
                read = !(pad_queries && i >= valid) &&
                       !key_masked(causal, window, q_len, kv_len, valid, i, j);
            }
            if (!read)
                bias[(size_t)i * kv_len + j] = NAN;
        }
}

static int32_t rd_dim(reader *r, int32_t small_max)
{
    const uint8_t b = rd(r);
    if (b == 255)
        return -1;
    if (b == 254)
        return 0;
    return 1 + b % small_max;
}

/* A pair of dimensions whose product overflows every byte count (OVERFLOW, whatever else), or
   two ordinary dimensions. Huge single sizes are not fuzzed with small buffers: a call whose
   sizes fit in memory is entitled to read and write all of them. */
static void rd_pair(reader *r, int32_t *a, int32_t *b, int32_t max_a, int32_t max_b)
{
    if (rd(r) == 0xEE) {
        *a = *b = INT32_MAX;
        return;
    }
    *a = rd_dim(r, max_a);
    *b = rd_dim(r, max_b);
}

/* Create-time sizes may be huge: create touches no buffer. */
static int32_t rd_create_dim(reader *r, int32_t small_max)
{
    const uint8_t b = rd(r);
    if (b == 253)
        return INT32_MAX;
    if (b == 252)
        return 1 << 30;
    return rd_dim(&(reader){&b, 1}, small_max);
}

static double max_abs(const double *p, size_t n)
{
    double m = 0.0;
    for (size_t i = 0; i < n; i++)
        m = fabs(p[i]) > m ? fabs(p[i]) : m;
    return m;
}

/* Gradients match the float64 reference within 2e-3 of their own scale plus 1e-2 of the largest
   gradient of the call (all: one scale) plus 1e-4. dQ and dK go through dS = P (dP - D), whose
   terms cancel: their float32 error is relative to |dP| |K| (|dP| |Q|), not to the result, which
   can be 0 exactly (a row that sees one key: P = 1, dS = 0). With the fuzzer's bounded inputs and
   an unsaturated softmax (well_conditioned) that error stays below about 1e-2 of the largest
   gradient (dV = P^T dO has no cancellation). */
static void check_grad(const float *g, const double *ref, size_t n, double all)
{
    double err, mx;
    ref_max_err(g, ref, n, &err, &mx);
    CHECK(err <= 2e-3 * mx + 1e-2 * all + 1e-4);
}

/* The largest per-head norm of rows of in (n_rows x [heads][hd], row stride ld) times w^T + b
   when w is non-NULL (projected in double), else of in itself. */
static double max_head_norm(const float *in, size_t n_rows, size_t ld, const float *w,
                            const float *b, int heads, int hd)
{
    double m = 0.0;
    for (size_t r = 0; r < n_rows; r++)
        for (int h = 0; h < heads; h++) {
            double s = 0.0;
            for (int d = 0; d < hd; d++) {
                const size_t o = (size_t)h * hd + d;
                double t = b != NULL ? b[o] : 0.0;
                if (w != NULL)
                    for (size_t i = 0; i < ld; i++)
                        t += (double)in[r * ld + i] * w[o * ld + i];
                else
                    t = in[r * ld + o];
                s += t * t;
            }
            m = s > m ? s : m;
        }
    return sqrt(m);
}

/* Gradients are compared only where the softmax is not saturated: |score| <= scale |q_h| |k_h|
   (a bound RoPE does not change) below 30, or a softcap below 30. Past that the weights are
   one-hot to float precision and dS = P (dP - D) is a difference of nearly equal terms of the size
   of dP, ill-conditioned in float32 whatever the implementation. */
static int well_conditioned(double scale, double qn, double kn, double softcap)
{
    return fabs(scale) * qn * kn <= 30.0 || (softcap > 0.0 && softcap <= 30.0);
}

/* selfattn_forward_train then selfattn_backward_train (1.2): the status of the first that fails. */
static selfattn_status fz_train(const selfattn_layer *l, int32_t batch, int32_t seq,
                                const float *x, const int32_t *lens, const float *dy, float *dx,
                                const selfattn_grads *grads, size_t n_x)
{
    size_t bytes = 0;
    selfattn_status st = selfattn_train_state_size(l, batch, seq, &bytes);
    if (st != SELFATTN_OK)
        return st;
    if (bytes > ((size_t)64 << 20)) /* wide heads over a small d_model: not worth the memory */
        return selfattn_backward(l, batch, seq, x, lens, dy, dx, grads);
    void *state = malloc(bytes);
    float *y = malloc(n_x * sizeof(float));
    st = selfattn_forward_train(l, batch, seq, x, lens, y, state, bytes);
    if (st == SELFATTN_OK)
        st = selfattn_backward_train(l, batch, seq, x, lens, dy, dx, grads, state, bytes);
    free(state);
    free(y);
    return st;
}

/* selfattn_backward on the fuzzed layer. gb: bit 0 no grads, bit 1 no dx, bit 2 a struct_size
   too small (INVALID), bit 3 ask for w_o and b_o even without the output projection (INVALID),
   bit 4 through the train state (forward_train, backward_train) when the shapes are small. */
static void fz_backward(reader *r, const selfattn_layer *l, const ref_layer *shape, uint8_t gb,
                        int small, int32_t batch, int32_t seq, const float *x,
                        const int32_t *lens, float *const w[8], const size_t counts[8], size_t dm,
                        size_t nq, int hostile, const ref_opts *ro, int out_proj)
{
    const size_t n_x = small ? (size_t)batch * (size_t)seq * dm : 1;
    const int shapes_ok = small && nq > 0 && nq * dm <= 4096;
    float *dy = malloc(n_x * sizeof(float)), *dx = malloc(n_x * sizeof(float));
    for (size_t i = 0; i < n_x; i++)
        dy[i] = rd_float(r, &hostile);
    if (small && lens_valid(lens, batch, seq)) /* dy of padding rows is not read */
        plant_rows(dy, batch, seq, dm, lens);
    fill_sentinel(dx, n_x);
    float *g[8] = {0};
    selfattn_grads grads;
    memset(&grads, 0, sizeof grads);
    grads.struct_size = (gb & 4) ? (uint32_t)sizeof grads - 4 : (uint32_t)sizeof grads;
    for (int i = 0; i < 8 && shapes_ok; i++) {
        if ((i == 3 || i == 7) && !out_proj && !(gb & 8))
            continue;
        g[i] = malloc((counts[i] ? counts[i] : 1) * sizeof(float));
        fill_sentinel(g[i], counts[i]);
    }
    grads.w_q = g[0];
    grads.w_k = g[1];
    grads.w_v = g[2];
    grads.w_o = g[3];
    grads.b_q = g[4];
    grads.b_k = g[5];
    grads.b_v = g[6];
    grads.b_o = g[7];
    const int use_grads = !(gb & 1), use_dx = !(gb & 2);
    const selfattn_status st =
        (gb & 16) && small
            ? fz_train(l, batch, seq, x, lens, dy, use_dx ? dx : NULL, use_grads ? &grads : NULL,
                       n_x)
            : selfattn_backward(l, batch, seq, x, lens, dy, use_dx ? dx : NULL,
                                use_grads ? &grads : NULL);
    if (!small || (use_grads && (gb & 4)) || (use_grads && !out_proj && (gb & 8) && shapes_ok))
        CHECK(st != SELFATTN_OK);
    if (st != SELFATTN_OK) {
        CHECK(is_sentinel(dx, n_x));
        for (int i = 0; i < 8; i++)
            CHECK(g[i] == NULL || is_sentinel(g[i], counts[i]));
    } else if (!hostile && shapes_ok && w[0] && w[1] && w[2] && (!out_proj || w[3]) &&
               well_conditioned(shape->scale,
                                max_head_norm(x, n_x / dm, dm, w[0], w[4], shape->n_heads,
                                              shape->head_dim),
                                max_head_norm(x, n_x / dm, dm, w[1], w[5], shape->n_kv_heads,
                                              shape->head_dim),
                                ro->softcap)) {
        ref_layer rl = *shape;
        rl.wq = w[0];
        rl.wk = w[1];
        rl.wv = w[2];
        rl.wo = w[3];
        rl.bq = w[4];
        rl.bk = w[5];
        rl.bv = w[6];
        rl.bo = w[7];
        ref_opts o = *ro;
        o.bias = NULL;
        double *rdx = malloc(n_x * sizeof(double)), *rg[8];
        for (int i = 0; i < 8; i++)
            rg[i] = malloc((counts[i] ? counts[i] : 1) * sizeof(double));
        ref_backward(&rl, &o, batch, seq, x, lens, dy, rdx, rg);
        double all = max_abs(rdx, n_x);
        for (int i = 0; i < 8; i++)
            if (g[i] != NULL && (out_proj || (i != 3 && i != 7))) {
                const double m = max_abs(rg[i], counts[i]);
                all = m > all ? m : all;
            }
        if (use_dx)
            check_grad(dx, rdx, n_x, all);
        for (int i = 0; i < 8 && use_grads; i++)
            if (g[i] != NULL && (out_proj || (i != 3 && i != 7)))
                check_grad(g[i], rg[i], counts[i], all);
        free(rdx);
        for (int i = 0; i < 8; i++)
            free(rg[i]);
    }
    free(dy);
    free(dx);
    for (int i = 0; i < 8; i++)
        free(g[i]);
}

/* selfattn_attend_backward on the attend call's inputs; a byte chooses which outputs. */
/* (q, k: nqe, nke floats; v and out, of width dv: nve, noe) */
static void fz_attend_backward(reader *r, const selfattn_layer *l, const ref_layer *shape,
                               int a_small, int32_t qb, int32_t ql, int32_t kl, const float *q,
                               const float *k, const float *v, const int32_t *kvl, size_t nqe,
                               size_t nke, size_t nve, size_t noe, int hostile, const ref_opts *ro)
{
    const uint8_t which = rd(r);
    float *go = malloc(noe * sizeof(float));
    for (size_t i = 0; i < noe; i++)
        go[i] = rd_float(r, &hostile);
    const size_t n3[3] = {nqe, nke, nve};
    float *d[3] = {malloc(nqe * sizeof(float)), malloc(nke * sizeof(float)),
                   malloc(nve * sizeof(float))};
    fill_sentinel(d[0], nqe);
    fill_sentinel(d[1], nke);
    fill_sentinel(d[2], nve);
    const selfattn_status st = selfattn_attend_backward(
        l, qb, ql, kl, q, k, v, kvl, go, (which & 1) ? NULL : d[0], (which & 2) ? NULL : d[1],
        (which & 4) ? NULL : d[2]);
    if (!a_small)
        CHECK(st != SELFATTN_OK);
    if (st != SELFATTN_OK || (which & 7) == 7) {
        CHECK(is_sentinel(d[0], nqe) && is_sentinel(d[1], nke) && is_sentinel(d[2], nve));
    } else if (a_small && !hostile &&
               well_conditioned(shape->scale,
                                max_head_norm(q, nqe / ((size_t)shape->n_heads * shape->head_dim),
                                              (size_t)shape->n_heads * shape->head_dim, NULL,
                                              NULL, shape->n_heads, shape->head_dim),
                                max_head_norm(k, nke / ((size_t)shape->n_kv_heads * shape->head_dim),
                                              (size_t)shape->n_kv_heads * shape->head_dim, NULL,
                                              NULL, shape->n_kv_heads, shape->head_dim),
                                ro->softcap)) {
        const ref_layer rl = *shape;
        ref_opts o = *ro;
        o.bias = NULL;
        o.rope = 0;
        double *rd3[3] = {malloc(nqe * sizeof(double)), malloc(nke * sizeof(double)),
                          malloc(nve * sizeof(double))};
        ref_attend_backward(&rl, &o, qb, ql, kl, q, k, v, kvl, go, rd3[0], rd3[1], rd3[2]);
        double all = 0.0;
        for (int m = 0; m < 3; m++) {
            const double mx = max_abs(rd3[m], n3[m]);
            all = mx > all ? mx : all;
        }
        for (int m = 0; m < 3; m++) {
            if (which & (1 << m))
                CHECK(is_sentinel(d[m], n3[m]));
            else
                check_grad(d[m], rd3[m], n3[m], all);
            free(rd3[m]);
        }
    }
    free(go);
    for (int m = 0; m < 3; m++)
        free(d[m]);
}

/* A cache on the fuzzed layer and a sequence of cache operations from the bytes, checked against a
   model of the lengths written from the API text: which calls must fail (and with which status),
   that failures change nothing, and the lengths after each call. */
static void fz_cache(reader *r, selfattn_layer *l, int ready, int d_model, int hostile)
{
    const int32_t n_seqs = 1 + rd(r) % 3, cap = 1 + rd(r) % 12;
    int64_t win;
    CHECK(selfattn_layer_get(l, SELFATTN_OPT_WINDOW, &win) == SELFATTN_OK);
    selfattn_cache *c = NULL;
    const selfattn_status cs = selfattn_cache_create(l, n_seqs, cap, &c);
    if (cs != SELFATTN_OK) {
        CHECK(c == NULL);
        return;
    }
    int64_t len[3] = {0, 0, 0}, kept[3] = {0, 0, 0}; /* kept: the first position still stored */
    const int n_ops = rd(r) % 10;
    for (int op = 0; op < n_ops; op++) {
        const uint8_t kind = rd(r) % 4, a = rd(r), b = rd(r);
        const int32_t seq = (int32_t)(a % 5) - 1; /* -1 .. 3: 3 (and 2 for fewer) out of range */
        if (kind == 0) { /* forward_cached */
            const int32_t max_new = 1 + b % 4;
            int32_t n_new[3];
            int bad = 0, over = 0;
            for (int s = 0; s < n_seqs; s++) {
                n_new[s] = (int32_t)(rd(r) % (max_new + 2)) - (rd(r) == 0xFF ? 1 : 0);
                bad |= n_new[s] < 0 || n_new[s] > max_new;
                const int64_t first = win > 0 && len[s] - win + 1 > 0 ? len[s] - win + 1 : 0;
                over |= len[s] + n_new[s] - first > cap || first < kept[s];
            }
            const size_t n = (size_t)n_seqs * (size_t)max_new * (size_t)d_model;
            float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
            for (size_t i = 0; i < n; i++)
                x[i] = ((float)(i % 7) - 3.0f) * 0.125f;
            if (!bad) /* rows past n_new[s] are not read */
                plant_rows(x, n_seqs, max_new, (size_t)d_model, n_new);
            fill_sentinel(y, n);
            const selfattn_status st = selfattn_forward_cached(l, c, max_new, x, n_new, y);
            const selfattn_status want = !ready ? SELFATTN_ERR_STATE
                                         : bad || over ? SELFATTN_ERR_INVALID
                                                       : SELFATTN_OK;
            CHECK(st == want);
            if (st != SELFATTN_OK) {
                CHECK(is_sentinel(y, n));
            } else {
                for (size_t i = 0; !hostile && i < n; i++)
                    CHECK(isfinite(y[i]));
                for (int s = 0; s < n_seqs; s++) {
                    len[s] += n_new[s];
                    if (win > 0 && len[s] - cap > kept[s])
                        kept[s] = len[s] - cap; /* the ring overwrote the older positions */
                }
            }
            free(x);
            free(y);
        } else if (kind == 1) { /* truncate */
            const int32_t to = (int32_t)(b % 16) - 1;
            int want_ok = seq < n_seqs && to >= 0;
            for (int s = seq < 0 ? 0 : seq; want_ok && s < (seq < 0 ? n_seqs : seq + 1); s++) {
                if (to > len[s]) {
                    want_ok = seq < 0;
                    continue;
                }
                const int64_t first = win > 0 && to - win + 1 > 0 ? to - win + 1 : 0;
                want_ok = to == 0 || first >= kept[s];
            }
            const selfattn_status st = selfattn_cache_truncate(c, seq, to);
            CHECK(st == (want_ok ? SELFATTN_OK : SELFATTN_ERR_INVALID));
            for (int s = 0; want_ok && s < n_seqs; s++)
                if ((seq < 0 || s == seq) && to < len[s]) {
                    len[s] = to;
                    if (to == 0)
                        kept[s] = 0;
                }
        } else if (kind == 2) { /* copy */
            const int32_t dst = (int32_t)(b % 4);
            const int ok = seq >= 0 && seq < n_seqs && dst < n_seqs;
            CHECK(selfattn_cache_copy(c, seq, dst) == (ok ? SELFATTN_OK : SELFATTN_ERR_INVALID));
            if (ok) {
                len[dst] = len[seq];
                kept[dst] = kept[seq];
            }
        }
        for (int s = 0; s < n_seqs; s++) { /* the lengths agree with the model after every call */
            int32_t got;
            CHECK(selfattn_cache_length(c, s, &got) == SELFATTN_OK && got == len[s]);
        }
    }
    selfattn_cache_destroy(c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    reader r = {data, size};
    const int32_t d_model = rd_create_dim(&r, 40), n_heads = rd_create_dim(&r, 6);
    selfattn_layer *l = NULL;
    const selfattn_status cs = selfattn_layer_create(d_model, n_heads, &l);
    if (cs != SELFATTN_OK) {
        CHECK(l == NULL);
        return 0;
    }
    int hostile = 0;

    /* options, each checked for "unchanged on failure" */
    const int n_opts = rd(&r) % 8;
    for (int i = 0; i < n_opts; i++) {
        const uint8_t o = rd(&r), vb = rd(&r);
        const int64_t value = vb >= 250 ? (vb == 250   ? INT64_MAX
                                           : vb == 251 ? INT32_MAX
                                           : vb == 252 ? -5
                                                       : (int64_t)1 << 33)
                                        : vb % 10;
        int64_t before[N_OPTS], after[N_OPTS];
        snapshot(l, before);
        if (selfattn_layer_set(l, (selfattn_option)(o % (N_OPTS + 1)), value) != SELFATTN_OK) {
            snapshot(l, after);
            CHECK(memcmp(before, after, sizeof before) == 0);
        }
    }
    const uint8_t sb = rd(&r);
    const float scales[] = {0.0f, 1.0f, -0.5f, 0.01f, 1e30f, NAN, INFINITY, 3.0f};
    const selfattn_status ss = selfattn_layer_set_scale(l, scales[sb % 8]);
    CHECK(ss == (isfinite(scales[sb % 8]) ? SELFATTN_OK : SELFATTN_ERR_INVALID));
    if (sb % 8 == 4)
        hostile = 1; /* huge scale: saturates, but the reference compares differently */
    /* the scale in force: a rejected value leaves the default (0) */
    const double eff_scale = ss == SELFATTN_OK ? (double)scales[sb % 8] : 0.0;
    const double caps[] = {0.0, 0.0, 0.0, 1.5, 30.0, -1.0, NAN, 0.25};
    const uint8_t cb = rd(&r);
    const selfattn_status cst = selfattn_layer_set_float(l, SELFATTN_FOPT_SOFTCAP, caps[cb % 8]);
    CHECK(cst == (caps[cb % 8] >= 0.0 ? SELFATTN_OK : SELFATTN_ERR_INVALID));
    double softcap;
    CHECK(selfattn_layer_get_float(l, SELFATTN_FOPT_SOFTCAP, &softcap) == SELFATTN_OK);

    int64_t opt[N_OPTS];
    snapshot(l, opt);
    ref_opts ro = {(int)opt[5], (int)opt[8], softcap, NULL, 0, 0, 0, (int)opt[6],
                   opt[7] == opt[1] ? 0 : (int)opt[7], 0};
    const ref_opts ro_layer = ro; /* ro is changed for the attend checks below */
    const int nkv = (int)opt[0], hd = (int)opt[1], causal = (int)opt[2], out_proj = (int)opt[3];
    const int dv = (int)opt[11]; /* the value heads' width (head_dim unless V_HEAD_DIM) */
    const int layer_causal = causal != 0; /* the layer's own calls treat CAUSAL 2 and 3 as 1 */
    const size_t nq = (size_t)n_heads * (size_t)hd, nkvd = (size_t)nkv * (size_t)hd;
    const size_t nqv = (size_t)n_heads * (size_t)dv, nkvv = (size_t)nkv * (size_t)dv;
    const size_t dm = (size_t)d_model;
    /* weights, possibly with wrong counts */
    float *w[8] = {0};
    const size_t counts[8] = {nq * dm, nkvd * dm, nkvv * dm, dm * nqv, nq, nkvd, nkvv, dm};
    const uint8_t wmask = rd(&r);
    for (int i = 0; i < 8 && hd > 0 && nq * dm <= 4096 && nqv * dm <= 4096; i++) {
        if (!(wmask & (1u << i)) && i != 0 && i != 1 && i != 2)
            continue;
        w[i] = malloc((counts[i] ? counts[i] : 1) * sizeof(float));
        for (size_t j = 0; j < counts[i]; j++)
            w[i][j] = rd_float(&r, &hostile) * 0.25f;
        const int64_t cnt = (int64_t)counts[i] + ((wmask == 0x5a && i == 2) ? 1 : 0);
        const selfattn_status st =
            selfattn_layer_set_weight(l, (selfattn_weight)(i + 1), w[i], cnt);
        if (st != SELFATTN_OK) {
            free(w[i]);
            w[i] = NULL;
        } else if (i < 4) { /* the reference computes on the weights as the layer stores them */
            tu_round_all((int)opt[9], w[i], counts[i]);
        }
    }

    /* forward */
    int32_t batch, seq;
    rd_pair(&r, &batch, &seq, 3, 24);
    const int use_len = rd(&r) & 1;
    /* small: buffers of the real size are made. Otherwise they are tiny and the call must fail:
       sizes invalid or overflowing, or d_model so large that no weight could be set. */
    const int small = batch >= 1 && batch <= 3 && seq >= 1 && seq <= 24 && dm <= 4096;
    int32_t lens[3] = {0, 0, 0};
    const size_t n_x = small ? (size_t)batch * (size_t)seq * dm : 1;
    float *x = malloc(n_x * sizeof(float)), *y = malloc(n_x * sizeof(float));
    for (size_t i = 0; i < n_x; i++)
        x[i] = rd_float(&r, &hostile);
    for (int b = 0; b < 3; b++) {
        const uint8_t lb = rd(&r);
        lens[b] = lb == 255 ? -1 : (int32_t)(lb % ((small ? seq : 1) + 2));
    }
    fill_sentinel(y, n_x);
    const size_t f_rows = small ? (size_t)batch * (size_t)n_heads * (size_t)seq : 0;
    fz_extras fx;
    fz_extras_make(&r, &fx, small && n_heads <= 6, f_rows, seq, seq, &hostile);
    const int32_t *f_lens = use_len && batch <= 3 ? lens : NULL;
    if (small && lens_valid(f_lens, batch, seq)) { /* padding rows and masked bias: not read */
        plant_rows(x, batch, seq, dm, f_lens);
        plant_bias(fx.bias, seq, seq, batch, f_lens, layer_causal, ro.window, 1);
    }
    const int use_fx = fx.e.struct_size != sizeof fx.e || fx.bias || fx.weights || fx.lse;
    /* with invalid or overflowing sizes x and y are tiny: the call must fail before using them */
    const selfattn_status fs = selfattn_forward_ex(
        l, batch, seq, x, use_len && batch <= 3 ? lens : NULL, use_fx ? &fx.e : NULL, y);
    if (!small || fx.e.struct_size != sizeof fx.e)
        CHECK(fs != SELFATTN_OK);
    if (fs != SELFATTN_OK) {
        CHECK(is_sentinel(y, n_x));
        fz_extras_check(&fx, fs, 0, NULL, NULL);
    } else if (!hostile) {
        ref_layer rl = {d_model, n_heads, nkv,  hd,   layer_causal, out_proj, 0,   w[0],
                        w[1],    w[2],    w[3], w[4], w[5],   w[6],     w[7], dv};
        rl.scale = eff_scale != 0.0 ? eff_scale : 1.0 / sqrt((double)hd);
        double *yr = malloc(n_x * sizeof(double));
        double *wr = malloc((f_rows * (size_t)seq + 1) * sizeof(double));
        double *lr = malloc((f_rows + 1) * sizeof(double));
        ro.bias = fx.bias;
        ro.sr = seq;
        ref_forward_ex(&rl, &ro, batch, seq, x, use_len ? lens : NULL, yr, wr, lr);
        check_close(y, yr, n_x);
        fz_extras_check(&fx, fs, 1, wr, lr);
        free(yr);
        free(wr);
        free(lr);
    }
    fz_extras_free(&fx);
    free(y);

    /* attend on the same layer (needs no weights) */
    int32_t qb, ql;
    rd_pair(&r, &qb, &ql, 2, 9);
    const int32_t kl = rd_dim(&r, 9);
    const int a_dims_ok = qb >= 1 && qb <= 2 && ql >= 1 && ql <= 9 && kl >= 1 && kl <= 9;
    if (a_dims_ok && (nq > 4096 || nkvd > 4096 || nqv > 4096 || nkvv > 4096)) {
        /* valid but too large to fuzz: skip */
        free(x);
        for (int i = 0; i < 8; i++)
            free(w[i]);
        selfattn_layer_destroy(l);
        return 0;
    }
    const int a_small = a_dims_ok && hd > 0;
    const size_t nqe = a_small ? (size_t)qb * ql * nq : 1,
                 nke = a_small ? (size_t)qb * kl * nkvd : 1;
    const size_t noe = a_small ? (size_t)qb * ql * nqv : 1, /* out and v: dv wide heads */
        nve = a_small ? (size_t)qb * kl * nkvv : 1;
    float *q = malloc(nqe * sizeof(float)), *k = malloc(nke * sizeof(float)),
          *v = malloc(nve * sizeof(float)), *o = malloc(noe * sizeof(float));
    int a_hostile = hostile;
    for (size_t i = 0; i < nqe; i++)
        q[i] = rd_float(&r, &a_hostile);
    for (size_t i = 0; i < nke; i++)
        k[i] = rd_float(&r, &a_hostile);
    for (size_t i = 0; i < nve; i++)
        v[i] = rd_float(&r, &a_hostile);
    int32_t kvl[2] = {(int32_t)(rd(&r) % (kl > 0 ? kl + 2 : 2)), (int32_t)(rd(&r) % 11)};
    const int use_kvl = rd(&r) & 1;
    fill_sentinel(o, noe);
    const size_t a_rows = a_small ? (size_t)qb * (size_t)n_heads * (size_t)ql : 0;
    fz_extras ax;
    fz_extras_make(&r, &ax, a_small && n_heads <= 6, a_rows, ql, kl, &a_hostile);
    const int32_t *a_lens = use_kvl && qb <= 2 ? kvl : NULL;
    if (a_small && lens_valid(a_lens, qb, kl)) { /* keys past the lengths, masked bias */
        plant_rows(k, qb, kl, nkvd, a_lens);
        plant_rows(v, qb, kl, nkvv, a_lens);
        plant_bias(ax.bias, ql, kl, qb, a_lens, causal, ro.window, 0);
    }
    const int use_ax = ax.e.struct_size != sizeof ax.e || ax.bias || ax.weights || ax.lse;
    const selfattn_status as = selfattn_attend_ex(l, qb, ql, kl, q, k, v,
                                                  use_kvl && qb <= 2 ? kvl : NULL,
                                                  use_ax ? &ax.e : NULL, o);
    if (!a_small || ax.e.struct_size != sizeof ax.e)
        CHECK(as != SELFATTN_OK);
    if (as != SELFATTN_OK) {
        CHECK(is_sentinel(o, noe));
        fz_extras_check(&ax, as, 0, NULL, NULL);
    } else if (a_small && !a_hostile) {
        ref_layer rl = {d_model, n_heads, nkv,  hd,   causal, 1,    0,   NULL,
                        NULL,    NULL,    NULL, NULL, NULL,   NULL, NULL, dv};
        rl.scale = eff_scale != 0.0 ? eff_scale : 1.0 / sqrt((double)hd);
        double *od = malloc(noe * sizeof(double));
        double *wr = malloc((a_rows * (size_t)kl + 1) * sizeof(double));
        double *lr = malloc((a_rows + 1) * sizeof(double));
        ro.bias = ax.bias;
        ro.sr = kl;
        ro.rope = 0; /* attend takes q and k already rotated */
        ref_attend_ex(&rl, &ro, qb, ql, kl, q, k, v, use_kvl ? kvl : NULL, od, wr, lr);
        check_close(o, od, noe);
        fz_extras_check(&ax, as, 1, wr, lr);
        free(od);
        free(wr);
        free(lr);
    }
    fz_extras_free(&ax);
    free(o);

    /* backward of the forward above, then of the attend */
    ref_layer shape = {d_model, n_heads, nkv,  hd,   layer_causal, out_proj, 0,   NULL,
                       NULL,    NULL,    NULL, NULL, NULL,   NULL,     NULL, dv};
    shape.scale = eff_scale != 0.0 ? eff_scale : 1.0 / sqrt((double)(hd > 0 ? hd : 1));
    ref_layer a_shape = shape; /* attend_backward honours every alignment */
    a_shape.causal = causal;
    const uint8_t gb = rd(&r);
    fz_backward(&r, l, &shape, gb, small, batch, seq, x, use_len && batch <= 3 ? lens : NULL, w,
                counts, dm, nq, hostile, &ro_layer, out_proj);
    fz_attend_backward(&r, l, &a_shape, a_small, qb, ql, kl, q, k, v,
                       use_kvl && qb <= 2 ? kvl : NULL, nqe, nke, nve, noe, a_hostile, &ro);
    if (hd > 0 && d_model <= 64) {
        const int weights_ok = w[0] && w[1] && w[2] && (w[3] || !out_proj);
        fz_cache(&r, l, causal && weights_ok, d_model, hostile);
    }
    free(x);
    for (int i = 0; i < 8; i++)
        free(w[i]);
    free(q);
    free(k);
    free(v);
    selfattn_layer_destroy(l);
    return 0;
}
