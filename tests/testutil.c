#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

double tu_uniform(tu_rng *r)
{
    /* splitmix64 */
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

/* x rounded to sig significant bits, numbers below 2^min_exp on the fixed quantum of the
   subnormals, magnitudes past max_finite to infinity. */
static double tu_round_sig(double x, int sig, int min_exp, double max_finite)
{
    if (x == 0.0 || !isfinite(x))
        return x;
    int e;
    frexp(x, &e); /* x = m 2^e, 1/2 <= |m| < 1 */
    int q = e - sig;
    if (e - 1 < min_exp)
        q = min_exp - (sig - 1);
    const double r = ldexp(nearbyint(ldexp(x, -q)), q);
    return fabs(r) > max_finite ? copysign(INFINITY, x) : r;
}

float tu_round_f16(float f)
{
    return (float)tu_round_sig(f, 11, -14, 65504.0);
}

float tu_round_bf16(float f)
{
    return (float)tu_round_sig(f, 8, -126, ldexp(255.0, 120));
}

float tu_round(int dtype, float f)
{
    return dtype == 1 ? tu_round_f16(f) : dtype == 2 ? tu_round_bf16(f) : f;
}

void tu_round_all(int dtype, float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = tu_round(dtype, p[i]);
}

void tu_fill(tu_rng *r, float *p, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (float)(lo + (hi - lo) * tu_uniform(r));
}

float *tu_random(tu_rng *r, size_t n, float lo, float hi)
{
    float *p = malloc((n ? n : 1) * sizeof *p);
    tu_fill(r, p, n, lo, hi);
    return p;
}

selfattn_status tu_layer_make(const tu_spec *s, uint64_t seed, tu_layer *t)
{
    return tu_layer_make_typed(s, seed, 0, t);
}

selfattn_status tu_layer_make_typed(const tu_spec *s, uint64_t seed, int weight_dtype,
                                    tu_layer *t)
{
    return tu_layer_make_v(s, 0, seed, weight_dtype, t);
}

selfattn_status tu_layer_make_v(const tu_spec *s, int v_head_dim, uint64_t seed, int weight_dtype,
                                tu_layer *t)
{
    memset(t, 0, sizeof *t);
    tu_rng rng = {seed};
    selfattn_status st = selfattn_layer_create(s->d_model, s->n_heads, &t->layer);
    if (st != SELFATTN_OK)
        return st;
    const int nkvh = s->n_kv_heads ? s->n_kv_heads : s->n_heads;
    const int hd = s->head_dim ? s->head_dim : s->d_model / s->n_heads;
    if (s->n_kv_heads && (st = selfattn_layer_set(t->layer, SELFATTN_OPT_N_KV_HEADS, nkvh)))
        return st;
    if (s->head_dim && (st = selfattn_layer_set(t->layer, SELFATTN_OPT_HEAD_DIM, hd)))
        return st;
    const int dv = v_head_dim ? v_head_dim : hd;
    if (v_head_dim && (st = selfattn_layer_set(t->layer, SELFATTN_OPT_V_HEAD_DIM, dv)))
        return st;
    if ((st = selfattn_layer_set(t->layer, SELFATTN_OPT_CAUSAL, s->causal)))
        return st;
    if ((st = selfattn_layer_set(t->layer, SELFATTN_OPT_OUT_PROJ, s->out_proj)))
        return st;
    if ((st = selfattn_layer_set(t->layer, SELFATTN_OPT_THREADS, s->threads)))
        return st;
    if ((st = selfattn_layer_set_scale(t->layer, s->scale)))
        return st;
    if (weight_dtype &&
        (st = selfattn_layer_set(t->layer, SELFATTN_OPT_WEIGHT_DTYPE, weight_dtype)))
        return st;

    const size_t dm = (size_t)s->d_model, nq = (size_t)s->n_heads * hd, nkv = (size_t)nkvh * hd;
    const size_t nqv = (size_t)s->n_heads * dv, nkvv = (size_t)nkvh * dv;
    const float a = (float)(1.0 / sqrt((double)dm)), ao = (float)(1.0 / sqrt((double)nqv));
    const size_t sizes[8] = {nq * dm, nkv * dm, nkvv * dm, dm * nqv, nq, nkv, nkvv, dm};
    for (int i = 0; i < 8; i++) {
        if (i == 3 || i == 7) {
            if (!s->out_proj)
                continue;
        }
        if (i >= 4 && !s->biases)
            continue;
        t->w[i] = tu_random(&rng, sizes[i], i == 3 ? -ao : -a, i == 3 ? ao : a);
    }
    if (s->packed) {
        /* the same Q, K, V rows, packed as PyTorch's in_proj_weight / in_proj_bias */
        t->wqkv = malloc(sizeof(float) * 3 * nq * dm);
        memcpy(t->wqkv, t->w[0], sizeof(float) * nq * dm);
        memcpy(t->wqkv + nq * dm, t->w[1], sizeof(float) * nq * dm);
        memcpy(t->wqkv + 2 * nq * dm, t->w[2], sizeof(float) * nq * dm);
        if ((st = selfattn_layer_set_weight(t->layer, SELFATTN_W_QKV, t->wqkv,
                                            (int64_t)(3 * nq * dm))))
            return st;
        if (s->biases) {
            t->bqkv = malloc(sizeof(float) * 3 * nq);
            memcpy(t->bqkv, t->w[4], sizeof(float) * nq);
            memcpy(t->bqkv + nq, t->w[5], sizeof(float) * nq);
            memcpy(t->bqkv + 2 * nq, t->w[6], sizeof(float) * nq);
            if ((st = selfattn_layer_set_weight(t->layer, SELFATTN_B_QKV, t->bqkv,
                                                (int64_t)(3 * nq))))
                return st;
        }
    }
    static const selfattn_weight which[8] = {SELFATTN_W_Q, SELFATTN_W_K, SELFATTN_W_V,
                                             SELFATTN_W_O, SELFATTN_B_Q, SELFATTN_B_K,
                                             SELFATTN_B_V, SELFATTN_B_O};
    for (int i = 0; i < 8; i++) {
        if (t->w[i] == NULL || (s->packed && i != 3 && i != 7))
            continue;
        if ((st = selfattn_layer_set_weight(t->layer, which[i], t->w[i], (int64_t)sizes[i])))
            return st;
    }

    /* the library stores the weights rounded: so does the reference */
    for (int i = 0; i < 4; i++)
        if (t->w[i] != NULL)
            tu_round_all(weight_dtype, t->w[i], sizes[i]);
    ref_layer *r = &t->ref;
    r->d_model = s->d_model;
    r->n_heads = s->n_heads;
    r->n_kv_heads = nkvh;
    r->head_dim = hd;
    r->v_dim = dv;
    r->causal = s->causal;
    r->out_proj = s->out_proj;
    r->scale = s->scale != 0.0f ? (double)s->scale : 1.0 / sqrt((double)hd);
    r->wq = t->w[0];
    r->wk = t->w[1];
    r->wv = t->w[2];
    r->wo = t->w[3];
    r->bq = t->w[4];
    r->bk = t->w[5];
    r->bv = t->w[6];
    r->bo = t->w[7];
    return SELFATTN_OK;
}

void tu_layer_free(tu_layer *t)
{
    selfattn_layer_destroy(t->layer);
    for (int i = 0; i < 8; i++)
        free(t->w[i]);
    free(t->wqkv);
    free(t->bqkv);
    memset(t, 0, sizeof *t);
}

void tu_set(float *p, size_t n, float v)
{
    for (size_t i = 0; i < n; i++)
        p[i] = v;
}

int tu_all_equal(const float *p, size_t n, float v)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(&p[i], &v, sizeof v) != 0)
            return 0;
    return 1;
}

float tu_dyadic(tu_rng *r, int bits, double amp)
{
    return (float)(ldexp(floor(tu_uniform(r) * ldexp(2.0 * amp, bits)), -bits) - amp);
}

double tu_fd_forward_loss(const void *ctx)
{
    const tu_fd_forward *c = ctx;
    ref_forward_ex(c->l, c->o, c->batch, c->seq, c->x, c->lens, c->y, NULL, NULL);
    double s = 0.0;
    for (size_t i = 0; i < (size_t)c->batch * c->seq * c->l->d_model; i++)
        s += (double)c->dy[i] * c->y[i];
    return s;
}

double tu_fd_attend_loss(const void *ctx)
{
    const tu_fd_attend *c = ctx;
    ref_attend_ex(c->l, c->o, c->batch, c->ql, c->kl, c->q, c->k, c->v, c->lens, c->out, NULL,
                  NULL);
    const int dv = c->l->v_dim > 0 ? c->l->v_dim : c->l->head_dim;
    double s = 0.0;
    for (size_t i = 0; i < (size_t)c->batch * c->ql * c->l->n_heads * dv; i++)
        s += (double)c->go[i] * c->out[i];
    return s;
}

double tu_fd_error(float *p, size_t n, const double *g, double (*loss)(const void *ctx),
                   const void *ctx, double *scale)
{
    double mx = 0.0, err = 0.0;
    for (size_t i = 0; i < n; i++)
        mx = fabs(g[i]) > mx ? fabs(g[i]) : mx;
    for (size_t i = 0; i < n; i++) {
        const float keep = p[i], hi = keep + 1e-3f, lo = keep - 1e-3f;
        p[i] = hi;
        const double fh = loss(ctx);
        p[i] = lo;
        const double fl = loss(ctx);
        p[i] = keep;
        const double fd = (fh - fl) / ((double)hi - (double)lo);
        err = fabs(fd - g[i]) > err ? fabs(fd - g[i]) : err;
    }
    *scale = mx;
    return err;
}

selfattn_status tu_layer_set_opts(selfattn_layer *l, const ref_opts *o)
{
    selfattn_status st = selfattn_layer_set(l, SELFATTN_OPT_WINDOW, o->window);
    if (st == SELFATTN_OK)
        st = selfattn_layer_set(l, SELFATTN_OPT_ALIBI, o->alibi);
    if (st == SELFATTN_OK)
        st = selfattn_layer_set(l, SELFATTN_OPT_ROPE, o->rope);
    if (st == SELFATTN_OK)
        st = selfattn_layer_set(l, SELFATTN_OPT_ROPE_DIMS, o->rope_dims);
    if (st == SELFATTN_OK)
        st = selfattn_layer_set_float(l, SELFATTN_FOPT_SOFTCAP, o->softcap);
    if (st == SELFATTN_OK)
        st = selfattn_layer_set_float(l, SELFATTN_FOPT_ROPE_THETA, o->rope_theta);
    return st;
}

int32_t tu_decode_step(int n_seq, const float *const *x, int width, int32_t total,
                       const int32_t *prompt, const int32_t *done, int32_t *n_new, float *xin)
{
    int32_t max_new = 0;
    for (int s = 0; s < n_seq; s++) {
        const int32_t want = done[s] == 0 ? prompt[s] : 1;
        n_new[s] = done[s] + want <= total ? want : total - done[s];
        max_new = n_new[s] > max_new ? n_new[s] : max_new;
    }
    for (int s = 0; s < n_seq; s++)
        memcpy(xin + (size_t)s * max_new * width, x[s] + (size_t)done[s] * width,
               (size_t)n_new[s] * width * sizeof(float));
    return max_new;
}

const int32_t *tu_key_lengths(int lengths, int batch, int kv_len, int32_t *lens)
{
    if (!lengths)
        return NULL;
    for (int b = 0; b < batch; b++)
        lens[b] = b == 0 ? kv_len : b == 1 ? kv_len / 2 : 0;
    return lens;
}
