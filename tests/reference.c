#include "reference.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void ref_linear_d(const double *x, int rows, int in, const float *w, const float *b, int out,
                  double *y)
{
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < out; o++) {
            double acc = b ? (double)b[o] : 0.0;
            for (int i = 0; i < in; i++)
                acc += x[(size_t)r * in + i] * (double)w[(size_t)o * in + i];
            y[(size_t)r * out + o] = acc;
        }
}

void ref_linear(const float *x, int rows, int in, const float *w, const float *b, int out,
                double *y)
{
    double *xd = malloc(sizeof(double) * (size_t)rows * (size_t)in);
    for (size_t i = 0; i < (size_t)rows * (size_t)in; i++)
        xd[i] = x[i];
    ref_linear_d(xd, rows, in, w, b, out, y);
    free(xd);
}

static void ref_attend_one(const ref_layer *l, int i, int q_len, int kv_len, const double *q,
                           const double *k, const double *v, int kv_valid, double *scores,
                           double *out)
{
    const int hd = l->head_dim, nq = l->n_heads * hd, nkv = l->n_kv_heads * hd;
    const int group = l->n_heads / l->n_kv_heads;
    for (int h = 0; h < l->n_heads; h++) {
        const int kh = h / group;
        double mx = -INFINITY;
        for (int j = 0; j < kv_len; j++) {
            const int masked = j >= kv_valid || (l->causal && j > i + kv_len - q_len);
            if (masked) {
                scores[j] = -INFINITY;
                continue;
            }
            double s = 0.0;
            for (int d = 0; d < hd; d++)
                s += q[(size_t)i * nq + h * hd + d] * k[(size_t)j * nkv + kh * hd + d];
            scores[j] = s * l->scale;
            if (scores[j] > mx)
                mx = scores[j];
        }
        double *o = out + (size_t)i * nq + h * hd;
        for (int d = 0; d < hd; d++)
            o[d] = 0.0;
        if (mx == -INFINITY)
            continue; /* every key masked: zeros */
        double sum = 0.0;
        for (int j = 0; j < kv_len; j++) {
            scores[j] = scores[j] == -INFINITY ? 0.0 : exp(scores[j] - mx);
            sum += scores[j];
        }
        for (int j = 0; j < kv_len; j++) {
            const double p = scores[j] / sum;
            if (p == 0.0)
                continue;
            for (int d = 0; d < hd; d++)
                o[d] += p * v[(size_t)j * nkv + kh * hd + d];
        }
    }
}

void ref_attend_seq(const ref_layer *l, int q_len, int kv_len, const double *q, const double *k,
                    const double *v, int kv_valid, double *out)
{
    double *scores = malloc(sizeof(double) * (size_t)kv_len);
    for (int i = 0; i < q_len; i++)
        ref_attend_one(l, i, q_len, kv_len, q, k, v, kv_valid, scores, out);
    free(scores);
}

/* Projects K and V of one sequence and attends from the given query rows into y rows. */
static void ref_forward_seq_rows(const ref_layer *l, int seq_len, const float *xs, int length,
                                 int i_first, int i_end, double *ys /* rows i_first.. */)
{
    const int dm = l->d_model, nq = l->n_heads * l->head_dim, nkv = l->n_kv_heads * l->head_dim;
    double *q = calloc((size_t)seq_len * nq, sizeof(double));
    double *k = calloc((size_t)seq_len * nkv, sizeof(double));
    double *v = calloc((size_t)seq_len * nkv, sizeof(double));
    double *a = calloc((size_t)seq_len * nq, sizeof(double));
    double *scores = malloc(sizeof(double) * (size_t)seq_len);
    ref_linear(xs, length, dm, l->wk, l->bk, nkv, k);
    ref_linear(xs, length, dm, l->wv, l->bv, nkv, v);
    for (int i = i_first; i < i_end; i++) {
        double *y = ys + (size_t)(i - i_first) * dm;
        if (i >= length) {
            memset(y, 0, sizeof(double) * dm);
            continue;
        }
        ref_linear(xs + (size_t)i * dm, 1, dm, l->wq, l->bq, nq, q + (size_t)i * nq);
        ref_attend_one(l, i, seq_len, seq_len, q, k, v, length, scores, a);
        if (l->out_proj)
            ref_linear_d(a + (size_t)i * nq, 1, nq, l->wo, l->bo, dm, y);
        else
            memcpy(y, a + (size_t)i * nq, sizeof(double) * dm);
    }
    free(q);
    free(k);
    free(v);
    free(a);
    free(scores);
}

void ref_forward(const ref_layer *l, int batch, int seq_len, const float *x, const int32_t *lengths,
                 double *y)
{
    const size_t seq_elems = (size_t)seq_len * l->d_model;
    for (int b = 0; b < batch; b++)
        ref_forward_seq_rows(l, seq_len, x + b * seq_elems, lengths ? lengths[b] : seq_len, 0,
                             seq_len, y + b * seq_elems);
}

void ref_forward_row(const ref_layer *l, int seq_len, const float *x_seq, int length, int i,
                     double *y_row)
{
    ref_forward_seq_rows(l, seq_len, x_seq, length, i, i + 1, y_row);
}

static double *ref_to_double(const float *p, size_t n)
{
    double *d = malloc(sizeof(double) * (n ? n : 1));
    for (size_t i = 0; i < n; i++)
        d[i] = p[i];
    return d;
}

void ref_attend(const ref_layer *l, int batch, int q_len, int kv_len, const float *q,
                const float *k, const float *v, const int32_t *kv_lengths, double *out)
{
    const size_t nq = (size_t)l->n_heads * l->head_dim, nkv = (size_t)l->n_kv_heads * l->head_dim;
    const size_t qn = (size_t)batch * q_len * nq, kn = (size_t)batch * kv_len * nkv;
    double *qd = ref_to_double(q, qn), *kd = ref_to_double(k, kn), *vd = ref_to_double(v, kn);
    for (int b = 0; b < batch; b++)
        ref_attend_seq(l, q_len, kv_len, qd + (size_t)b * q_len * nq, kd + (size_t)b * kv_len * nkv,
                       vd + (size_t)b * kv_len * nkv, kv_lengths ? kv_lengths[b] : kv_len,
                       out + (size_t)b * q_len * nq);
    free(qd);
    free(kd);
    free(vd);
}

void ref_max_err(const float *a, const double *b, size_t n, double *err, double *ref_max)
{
    double e = 0.0, m = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)a[i] - b[i]);
        if (d != d)
            e = INFINITY; /* NaN in a counts as an infinite error */
        else if (d > e)
            e = d;
        if (fabs(b[i]) > m)
            m = fabs(b[i]);
    }
    *err = e;
    *ref_max = m;
}

/* ---- 1.1 options ---- */

/* The value heads' width. */
static int ref_dv(const ref_layer *l)
{
    return l->v_dim > 0 ? l->v_dim : l->head_dim;
}

static void ref_alibi_pow2(int n, double *out)
{
    /* a geometric sequence starting at 2^(-8/n), with that same ratio */
    const double start = pow(2.0, -8.0 / n);
    double s = start;
    for (int i = 0; i < n; i++, s *= start)
        out[i] = s;
}

void ref_alibi_slopes(int n, double *slopes)
{
    int p2 = 1;
    while (p2 * 2 <= n)
        p2 *= 2;
    ref_alibi_pow2(p2, slopes);
    if (p2 == n)
        return;
    double *extra = malloc(sizeof(double) * 2 * (size_t)p2);
    ref_alibi_pow2(2 * p2, extra);
    for (int i = 0; i < n - p2; i++)
        slopes[p2 + i] = extra[2 * i]; /* every other slope of the 2*p2 sequence */
    free(extra);
}

void ref_rope_row(const ref_opts *o, int n_heads, int head_dim, double pos, double *row)
{
    if (o->rope == 0)
        return;
    const int r = o->rope_dims ? o->rope_dims : head_dim;
    const double theta = o->rope_theta > 0 ? o->rope_theta : 10000.0;
    for (int h = 0; h < n_heads; h++) {
        double *x = row + (size_t)h * head_dim;
        for (int d = 0; d < r / 2; d++) {
            const double ang = pos * pow(theta, -2.0 * d / r);
            const int a = o->rope == 1 ? d : 2 * d, b = o->rope == 1 ? d + r / 2 : 2 * d + 1;
            const double x1 = x[a], x2 = x[b];
            x[a] = x1 * cos(ang) - x2 * sin(ang);
            x[b] = x1 * sin(ang) + x2 * cos(ang);
        }
    }
}

/* The position of query i as the API text aligns it: causal 2 (top-left) i, causal 3 (the
   bottom-right of the sequence's kv_valid keys) kv_valid - q_len + i, else kv_len - q_len + i. */
static long ref_query_pos(const ref_layer *l, int q_len, int kv_len, int kv_valid, int i)
{
    if (l->causal == 2)
        return i;
    if (l->causal == 3)
        return (long)kv_valid - q_len + i;
    return (long)kv_len - q_len + i;
}

/* The final score of query row i (position p) of sequence b and key j for head h, as the API
   text orders it: (q . k) scale, softcap, ALiBi, bias; -inf when causality, the window or the
   length masks the key. *raw (when non-NULL) gets (q . k) scale. */
static double ref_score(const ref_layer *l, const ref_opts *o, double slope, int b, int h, int i,
                        long p, int j, int kv_valid, const double *qi, const double *kj,
                        double *raw)
{
    int masked = j >= kv_valid || (l->causal && j > p);
    if (o->window > 0)
        masked = masked || (l->causal ? j <= p - o->window : labs(p - j) >= o->window);
    if (masked)
        return -INFINITY;
    double t = 0.0;
    for (int d = 0; d < l->head_dim; d++)
        t += qi[d] * kj[d];
    t *= l->scale;
    if (raw != NULL)
        *raw = t;
    if (o->softcap > 0)
        t = o->softcap * tanh(t / o->softcap);
    if (o->alibi)
        t -= slope * (double)labs(p - j);
    if (o->bias)
        t += o->bias[b * o->sb + h * o->sh + (int64_t)i * o->sr + j];
    return t;
}

/* One sequence b, from double tensors of that sequence. */
static void ref_attend_ex_seq(const ref_layer *l, const ref_opts *o, int b, int q_len, int kv_len,
                              const double *q, const double *k, const double *v, int kv_valid,
                              double *out, double *weights, double *lse)
{
    const int hd = l->head_dim, nq = l->n_heads * hd, nkv = l->n_kv_heads * hd;
    const int dv = ref_dv(l), nqv = l->n_heads * dv, nkvv = l->n_kv_heads * dv;
    const int group = l->n_heads / l->n_kv_heads;
    double *slopes = malloc(sizeof(double) * (size_t)l->n_heads);
    double *s = malloc(sizeof(double) * (size_t)kv_len);
    ref_alibi_slopes(l->n_heads, slopes);
    for (int h = 0; h < l->n_heads; h++) {
        const int kh = h / group;
        for (int i = 0; i < q_len; i++) {
            const long p = ref_query_pos(l, q_len, kv_len, kv_valid, i);
            double mx = -INFINITY;
            for (int j = 0; j < kv_len; j++) {
                s[j] = ref_score(l, o, slopes[h], b, h, i, p, j, kv_valid,
                                 q + (size_t)i * nq + h * hd, k + (size_t)j * nkv + kh * hd, NULL);
                if (s[j] > mx)
                    mx = s[j];
            }
            double *orow = out + (size_t)i * nqv + h * dv;
            double *wrow = weights ? weights + ((size_t)h * q_len + i) * kv_len : NULL;
            for (int d = 0; d < dv; d++)
                orow[d] = 0.0;
            if (mx == -INFINITY) { /* sees no key */
                if (wrow)
                    for (int j = 0; j < kv_len; j++)
                        wrow[j] = 0.0;
                if (lse)
                    lse[(size_t)h * q_len + i] = -INFINITY;
                continue;
            }
            double sum = 0.0;
            for (int j = 0; j < kv_len; j++)
                sum += s[j] == -INFINITY ? 0.0 : exp(s[j] - mx);
            if (lse)
                lse[(size_t)h * q_len + i] = mx + log(sum);
            for (int j = 0; j < kv_len; j++) {
                const double pj = s[j] == -INFINITY ? 0.0 : exp(s[j] - mx) / sum;
                if (wrow)
                    wrow[j] = pj;
                if (pj != 0.0)
                    for (int d = 0; d < dv; d++)
                        orow[d] += pj * v[(size_t)j * nkvv + kh * dv + d];
            }
        }
    }
    free(slopes);
    free(s);
}

void ref_scores(const ref_layer *l, const ref_opts *o, int b, int q_len, int kv_len,
                const double *q, const double *k, int kv_valid, int stage, double *scores)
{
    const int hd = l->head_dim, nq = l->n_heads * hd, nkv = l->n_kv_heads * hd;
    const int group = l->n_heads / l->n_kv_heads;
    double *slopes = malloc(sizeof(double) * (size_t)l->n_heads);
    ref_alibi_slopes(l->n_heads, slopes);
    for (int h = 0; h < l->n_heads; h++)
        for (int i = 0; i < q_len; i++) {
            const long p = ref_query_pos(l, q_len, kv_len, kv_valid, i);
            double *row = scores + ((size_t)h * q_len + i) * kv_len;
            for (int j = 0; j < kv_len; j++) {
                const double *qi = q + (size_t)i * nq + h * hd, *kj = k + (size_t)j * nkv + (h / group) * hd;
                if (j >= kv_valid) {
                    row[j] = -INFINITY;
                } else if (stage == 2) {
                    row[j] = ref_score(l, o, slopes[h], b, h, i, p, j, kv_valid, qi, kj, NULL);
                } else {
                    double t = 0.0;
                    for (int d = 0; d < hd; d++)
                        t += qi[d] * kj[d];
                    t *= l->scale;
                    if (stage == 1 && o->softcap > 0)
                        t = o->softcap * tanh(t / o->softcap);
                    row[j] = t;
                }
            }
        }
    free(slopes);
}

void ref_attend_ex(const ref_layer *l, const ref_opts *o, int batch, int q_len, int kv_len,
                   const float *q, const float *k, const float *v, const int32_t *kv_lengths,
                   double *out, double *weights, double *lse)
{
    const size_t nq = (size_t)l->n_heads * l->head_dim, nkv = (size_t)l->n_kv_heads * l->head_dim;
    const size_t nqv = (size_t)l->n_heads * ref_dv(l), nkvv = (size_t)l->n_kv_heads * ref_dv(l);
    const size_t qn = (size_t)batch * q_len * nq, kn = (size_t)batch * kv_len * nkv;
    const size_t vn = (size_t)batch * kv_len * nkvv;
    double *qd = ref_to_double(q, qn), *kd = ref_to_double(k, kn), *vd = ref_to_double(v, vn);
    for (int b = 0; b < batch; b++) {
        const size_t hr = (size_t)b * l->n_heads * q_len;
        ref_attend_ex_seq(l, o, b, q_len, kv_len, qd + (size_t)b * q_len * nq,
                          kd + (size_t)b * kv_len * nkv, vd + (size_t)b * kv_len * nkvv,
                          kv_lengths ? kv_lengths[b] : kv_len, out + (size_t)b * q_len * nqv,
                          weights ? weights + hr * kv_len : NULL, lse ? lse + hr : NULL);
    }
    free(qd);
    free(kd);
    free(vd);
}

/* Q, K, V of the first len rows of one sequence (rows past it zero), RoPE at positions 0.. */
static void ref_project_seq(const ref_layer *l, const ref_opts *o, const float *xs, int len,
                            int seq_len, double *q, double *k, double *v)
{
    const int dm = l->d_model, hd = l->head_dim;
    const size_t L = (size_t)seq_len, nq = (size_t)l->n_heads * hd;
    const size_t nkv = (size_t)l->n_kv_heads * hd, nkvv = (size_t)l->n_kv_heads * ref_dv(l);
    memset(q, 0, sizeof(double) * L * nq);
    memset(k, 0, sizeof(double) * L * nkv);
    memset(v, 0, sizeof(double) * L * nkvv);
    ref_linear(xs, len, dm, l->wq, l->bq, (int)nq, q);
    ref_linear(xs, len, dm, l->wk, l->bk, (int)nkv, k);
    ref_linear(xs, len, dm, l->wv, l->bv, (int)nkvv, v);
    for (int t = 0; t < len; t++) {
        ref_rope_row(o, l->n_heads, hd, t, q + (size_t)t * nq);
        ref_rope_row(o, l->n_kv_heads, hd, t, k + (size_t)t * nkv);
    }
}

void ref_forward_ex(const ref_layer *l, const ref_opts *o, int batch, int seq_len, const float *x,
                    const int32_t *lengths, double *y, double *weights, double *lse)
{
    const int dm = l->d_model, hd = l->head_dim;
    const size_t nq = (size_t)l->n_heads * hd, nkv = (size_t)l->n_kv_heads * hd;
    const size_t nqv = (size_t)l->n_heads * ref_dv(l), nkvv = (size_t)l->n_kv_heads * ref_dv(l);
    const size_t L = (size_t)seq_len;
    double *q = calloc(L * nq, sizeof(double)), *k = calloc(L * nkv, sizeof(double));
    double *v = calloc(L * nkvv, sizeof(double)), *a = calloc(L * nqv, sizeof(double));
    for (int b = 0; b < batch; b++) {
        const int len = lengths ? lengths[b] : seq_len;
        const float *xs = x + (size_t)b * L * dm;
        ref_project_seq(l, o, xs, len, seq_len, q, k, v);
        const size_t hr = (size_t)b * l->n_heads * L;
        double *wb = weights ? weights + hr * L : NULL, *lb = lse ? lse + hr : NULL;
        ref_attend_ex_seq(l, o, b, seq_len, seq_len, q, k, v, len, a, wb, lb);
        double *yb = y + (size_t)b * L * dm;
        for (int t = 0; t < seq_len; t++) {
            double *yr = yb + (size_t)t * dm;
            if (t >= len) { /* padding */
                memset(yr, 0, sizeof(double) * dm);
                for (int h = 0; h < l->n_heads; h++) {
                    if (wb)
                        memset(wb + ((size_t)h * L + t) * L, 0, sizeof(double) * L);
                    if (lb)
                        lb[(size_t)h * L + t] = -INFINITY;
                }
                continue;
            }
            if (l->out_proj)
                ref_linear_d(a + (size_t)t * nqv, 1, (int)nqv, l->wo, l->bo, dm, yr);
            else
                memcpy(yr, a + (size_t)t * nqv, sizeof(double) * dm);
        }
    }
    free(q);
    free(k);
    free(v);
    free(a);
}

/* ---- Gradients ---- */

/* One sequence: queries i < q_valid, keys j < kv_valid; accumulates into dq, dk, dv (zeroed by
   the caller). dS = P (dP - D), D = sum_j P_j dP_j; through the softcap c tanh(t / c) the factor
   1 - tanh^2; through the scale, the scale. */
static void ref_attend_bwd_seq(const ref_layer *l, const ref_opts *o, int q_len, int kv_len,
                               const double *q, const double *k, const double *v, int q_valid,
                               int kv_valid, const double *dout, double *dq, double *dk,
                               double *dv)
{
    const int hd = l->head_dim, nq = l->n_heads * hd, nkv = l->n_kv_heads * hd;
    const int dvw = ref_dv(l), nqv = l->n_heads * dvw, nkvv = l->n_kv_heads * dvw;
    const int group = l->n_heads / l->n_kv_heads;
    double *slopes = malloc(sizeof(double) * (size_t)l->n_heads);
    double *s = malloc(sizeof(double) * (size_t)kv_len), *raw = malloc(sizeof(double) * (size_t)kv_len);
    double *dp = malloc(sizeof(double) * (size_t)kv_len);
    ref_opts o_nobias = *o; /* the backward entry points take no bias */
    o_nobias.bias = NULL;
    ref_alibi_slopes(l->n_heads, slopes);
    for (int h = 0; h < l->n_heads; h++) {
        const int kh = h / group;
        for (int i = 0; i < q_valid; i++) {
            const long p = ref_query_pos(l, q_len, kv_len, kv_valid, i);
            double mx = -INFINITY;
            for (int j = 0; j < kv_len; j++) {
                s[j] = ref_score(l, &o_nobias, slopes[h], 0, h, i, p, j, kv_valid,
                                 q + (size_t)i * nq + h * hd, k + (size_t)j * nkv + kh * hd,
                                 &raw[j]);
                if (s[j] > mx)
                    mx = s[j];
            }
            if (mx == -INFINITY)
                continue; /* sees no key: out 0 whatever q, k, v are */
            double sum = 0.0;
            for (int j = 0; j < kv_len; j++)
                sum += s[j] == -INFINITY ? 0.0 : exp(s[j] - mx);
            const double *go = dout + (size_t)i * nqv + h * dvw;
            double dsum = 0.0;
            for (int j = 0; j < kv_len; j++) {
                if (s[j] == -INFINITY)
                    continue;
                s[j] = exp(s[j] - mx) / sum; /* now P */
                double acc = 0.0;
                for (int d = 0; d < dvw; d++)
                    acc += go[d] * v[(size_t)j * nkvv + kh * dvw + d];
                dp[j] = acc;
                dsum += s[j] * acc;
            }
            for (int j = 0; j < kv_len; j++) {
                if (s[j] == -INFINITY)
                    continue;
                double ds = s[j] * (dp[j] - dsum);
                if (o->softcap > 0) {
                    const double th = tanh(raw[j] / o->softcap);
                    ds *= 1.0 - th * th;
                }
                ds *= l->scale;
                for (int d = 0; d < hd; d++) {
                    dq[(size_t)i * nq + h * hd + d] += ds * k[(size_t)j * nkv + kh * hd + d];
                    dk[(size_t)j * nkv + kh * hd + d] += ds * q[(size_t)i * nq + h * hd + d];
                }
                for (int d = 0; d < dvw; d++)
                    dv[(size_t)j * nkvv + kh * dvw + d] += s[j] * go[d];
            }
        }
    }
    free(slopes);
    free(s);
    free(raw);
    free(dp);
}

void ref_attend_backward(const ref_layer *l, const ref_opts *o, int batch, int q_len, int kv_len,
                         const float *q, const float *k, const float *v, const int32_t *kv_lengths,
                         const float *dout, double *dq, double *dk, double *dv)
{
    const size_t nq = (size_t)l->n_heads * l->head_dim, nkv = (size_t)l->n_kv_heads * l->head_dim;
    const size_t nqv = (size_t)l->n_heads * ref_dv(l), nkvv = (size_t)l->n_kv_heads * ref_dv(l);
    const size_t qn = (size_t)batch * q_len * nq, kn = (size_t)batch * kv_len * nkv;
    const size_t qvn = (size_t)batch * q_len * nqv, vn = (size_t)batch * kv_len * nkvv;
    double *qd = ref_to_double(q, qn), *kd = ref_to_double(k, kn), *vd = ref_to_double(v, vn);
    double *gd = ref_to_double(dout, qvn);
    memset(dq, 0, sizeof(double) * qn);
    memset(dk, 0, sizeof(double) * kn);
    memset(dv, 0, sizeof(double) * vn);
    for (int b = 0; b < batch; b++) {
        const size_t qo = (size_t)b * q_len * nq, ko = (size_t)b * kv_len * nkv;
        const size_t qvo = (size_t)b * q_len * nqv, vo = (size_t)b * kv_len * nkvv;
        ref_attend_bwd_seq(l, o, q_len, kv_len, qd + qo, kd + ko, vd + vo, q_len,
                           kv_lengths ? kv_lengths[b] : kv_len, gd + qvo, dq + qo, dk + ko,
                           dv + vo);
    }
    free(qd);
    free(kd);
    free(vd);
    free(gd);
}

void ref_backward(const ref_layer *l, const ref_opts *o, int batch, int seq_len, const float *x,
                  const int32_t *lengths, const float *dy, double *dx, double *g[8])
{
    const int dm = l->d_model, hd = l->head_dim;
    const size_t nq = (size_t)l->n_heads * hd, nkv = (size_t)l->n_kv_heads * hd;
    const size_t nqv = (size_t)l->n_heads * ref_dv(l), nkvv = (size_t)l->n_kv_heads * ref_dv(l);
    const size_t L = (size_t)seq_len;
    const float *w[3] = {l->wq, l->wk, l->wv};
    const size_t width[3] = {nq, nkv, nkvv};
    for (int i = 0; i < 8; i++) {
        if (!l->out_proj && (i == 3 || i == 7))
            continue;
        const size_t n = i < 4 ? (i == 3 ? (size_t)dm * nqv : width[i] * dm)
                               : (i == 7 ? (size_t)dm : width[i - 4]);
        memset(g[i], 0, sizeof(double) * n);
    }
    double *q = calloc(L * nq, sizeof(double)), *k = calloc(L * nkv, sizeof(double));
    double *v = calloc(L * nkvv, sizeof(double)), *a = calloc(L * nqv, sizeof(double));
    double *go = calloc(L * nqv, sizeof(double));
    double *dq = calloc(L * nq, sizeof(double)), *dk = calloc(L * nkv, sizeof(double));
    double *dv = calloc(L * nkvv, sizeof(double));
    for (int b = 0; b < batch; b++) {
        const int len = lengths ? lengths[b] : seq_len;
        const float *xs = x + (size_t)b * L * dm, *dys = dy + (size_t)b * L * dm;
        double *dxs = dx + (size_t)b * L * dm;
        ref_project_seq(l, o, xs, len, seq_len, q, k, v);
        memset(go, 0, sizeof(double) * L * nqv);
        memset(dq, 0, sizeof(double) * L * nq);
        memset(dk, 0, sizeof(double) * L * nkv);
        memset(dv, 0, sizeof(double) * L * nkvv);
        ref_attend_ex_seq(l, o, b, seq_len, seq_len, q, k, v, len, a, NULL, NULL);
        for (int t = 0; t < len; t++) { /* back through W_O */
            const float *dyr = dys + (size_t)t * dm;
            double *gr = go + (size_t)t * nqv;
            if (!l->out_proj) {
                for (size_t c = 0; c < nqv; c++)
                    gr[c] = dyr[c];
                continue;
            }
            for (int oo = 0; oo < dm; oo++) {
                for (size_t c = 0; c < nqv; c++) {
                    gr[c] += (double)dyr[oo] * l->wo[(size_t)oo * nqv + c];
                    g[3][(size_t)oo * nqv + c] += (double)dyr[oo] * a[(size_t)t * nqv + c];
                }
                g[7][oo] += dyr[oo];
            }
        }
        ref_attend_bwd_seq(l, o, seq_len, seq_len, q, k, v, len, len, go, dq, dk, dv);
        for (int t = 0; t < len; t++) { /* back through RoPE: the opposite angle */
            ref_rope_row(o, l->n_heads, hd, -(double)t, dq + (size_t)t * nq);
            ref_rope_row(o, l->n_kv_heads, hd, -(double)t, dk + (size_t)t * nkv);
        }
        const double *d3[3] = {dq, dk, dv};
        memset(dxs, 0, sizeof(double) * L * dm);
        for (int m = 0; m < 3; m++)
            for (int t = 0; t < len; t++)
                for (size_t c = 0; c < width[m]; c++) {
                    const double gc = d3[m][(size_t)t * width[m] + c];
                    g[4 + m][c] += gc;
                    for (int i = 0; i < dm; i++) {
                        g[m][c * dm + i] += gc * xs[(size_t)t * dm + i];
                        dxs[(size_t)t * dm + i] += gc * w[m][c * dm + i];
                    }
                }
    }
    free(q);
    free(k);
    free(v);
    free(a);
    free(go);
    free(dq);
    free(dk);
    free(dv);
}
