/* libFuzzer target: bytes become a sequence of API calls on one layer -- dimensions, options,
 * weights (with hostile values: NaN, +-inf, 1e30, subnormals), lengths, hostile sizes -- and the
 * contract is checked on every call:
 *   - no crash, no sanitizer report (built with ASan + UBSan);
 *   - a failing call leaves caller outputs and the handle's options untouched;
 *   - when forward/attend succeed on finite, moderate inputs, the output matches the float64
 *     reference within 1e-4 of its scale (plus a tiny absolute floor) and holds no NaN.
 * Build: cmake -DCMAKE_C_COMPILER=clang -DSELFATTN_BUILD_FUZZ=ON (see tests/CMakeLists.txt). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "reference.h"
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

static void snapshot(const selfattn_layer *l, int64_t v[5])
{
    for (int o = 1; o <= 5; o++)
        CHECK(selfattn_layer_get(l, (selfattn_option)o, &v[o - 1]) == SELFATTN_OK);
}

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

/* A dimension: usually small, sometimes 0 or negative (INVALID). */
/* y matches the float64 reference within 1e-4 of its scale (plus a tiny floor), with no NaN. */
static void check_close(const float *y, const double *ref, size_t n)
{
    double err, mx;
    ref_max_err(y, ref, n, &err, &mx);
    CHECK(err <= 1e-4 * mx + 1e-6);
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
    const int n_opts = rd(&r) % 6;
    for (int i = 0; i < n_opts; i++) {
        const uint8_t o = rd(&r), vb = rd(&r);
        const int64_t value = vb >= 250 ? (vb == 250   ? INT64_MAX
                                           : vb == 251 ? INT32_MAX
                                           : vb == 252 ? -5
                                                       : (int64_t)1 << 33)
                                        : vb % 10;
        int64_t before[5], after[5];
        snapshot(l, before);
        if (selfattn_layer_set(l, (selfattn_option)(o % 7), value) != SELFATTN_OK) {
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

    int64_t opt[5];
    snapshot(l, opt);
    const int nkv = (int)opt[0], hd = (int)opt[1], causal = (int)opt[2], out_proj = (int)opt[3];
    const size_t nq = (size_t)n_heads * (size_t)hd, nkvd = (size_t)nkv * (size_t)hd;
    const size_t dm = (size_t)d_model;
    /* weights, possibly with wrong counts */
    float *w[8] = {0};
    const size_t counts[8] = {nq * dm, nkvd * dm, nkvd * dm, dm * nq, nq, nkvd, nkvd, dm};
    const uint8_t wmask = rd(&r);
    for (int i = 0; i < 8 && hd > 0 && nq * dm <= 4096; i++) {
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
    /* with invalid or overflowing sizes x and y are tiny: the call must fail before using them */
    const selfattn_status fs =
        selfattn_forward(l, batch, seq, x, use_len && batch <= 3 ? lens : NULL, y);
    if (!small)
        CHECK(fs != SELFATTN_OK);
    if (fs != SELFATTN_OK) {
        CHECK(is_sentinel(y, n_x));
    } else if (!hostile) {
        ref_layer rl = {d_model, n_heads, nkv,  hd,   causal, out_proj, 0,   w[0],
                        w[1],    w[2],    w[3], w[4], w[5],   w[6],     w[7]};
        rl.scale = eff_scale != 0.0 ? eff_scale : 1.0 / sqrt((double)hd);
        double *yr = malloc(n_x * sizeof(double));
        ref_forward(&rl, batch, seq, x, use_len ? lens : NULL, yr);
        check_close(y, yr, n_x);
        free(yr);
    }
    free(x);
    free(y);
    for (int i = 0; i < 8; i++)
        free(w[i]);

    /* attend on the same layer (needs no weights) */
    int32_t qb, ql;
    rd_pair(&r, &qb, &ql, 2, 9);
    const int32_t kl = rd_dim(&r, 9);
    const int a_dims_ok = qb >= 1 && qb <= 2 && ql >= 1 && ql <= 9 && kl >= 1 && kl <= 9;
    if (a_dims_ok && (nq > 4096 || nkvd > 4096)) { /* valid but too large to fuzz: skip */
        selfattn_layer_destroy(l);
        return 0;
    }
    const int a_small = a_dims_ok && hd > 0;
    const size_t nqe = a_small ? (size_t)qb * ql * nq : 1,
                 nke = a_small ? (size_t)qb * kl * nkvd : 1;
    float *q = malloc(nqe * sizeof(float)), *k = malloc(nke * sizeof(float)),
          *v = malloc(nke * sizeof(float)), *o = malloc(nqe * sizeof(float));
    int a_hostile = hostile;
    for (size_t i = 0; i < nqe; i++)
        q[i] = rd_float(&r, &a_hostile);
    for (size_t i = 0; i < nke; i++) {
        k[i] = rd_float(&r, &a_hostile);
        v[i] = rd_float(&r, &a_hostile);
    }
    int32_t kvl[2] = {(int32_t)(rd(&r) % (kl > 0 ? kl + 2 : 2)), (int32_t)(rd(&r) % 11)};
    const int use_kvl = rd(&r) & 1;
    fill_sentinel(o, nqe);
    const selfattn_status as =
        selfattn_attend(l, qb, ql, kl, q, k, v, use_kvl && qb <= 2 ? kvl : NULL, o);
    if (!a_small)
        CHECK(as != SELFATTN_OK);
    if (as != SELFATTN_OK) {
        CHECK(is_sentinel(o, nqe));
    } else if (a_small && !a_hostile) {
        ref_layer rl = {d_model, n_heads, nkv,  hd,   causal, 1,    0,   NULL,
                        NULL,    NULL,    NULL, NULL, NULL,   NULL, NULL};
        rl.scale = eff_scale != 0.0 ? eff_scale : 1.0 / sqrt((double)hd);
        double *od = malloc(nqe * sizeof(double));
        ref_attend(&rl, qb, ql, kl, q, k, v, use_kvl ? kvl : NULL, od);
        check_close(o, od, nqe);
        free(od);
    }
    free(q);
    free(k);
    free(v);
    free(o);
    selfattn_layer_destroy(l);
    return 0;
}
