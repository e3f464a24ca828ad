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
