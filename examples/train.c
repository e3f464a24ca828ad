/* Training one self-attention layer with selfattn_forward_train and selfattn_backward_train (the
 * forward keeps its activations in a train state the backward reads; --recompute uses
 * selfattn_forward and selfattn_backward instead, which recomputes them): a causal layer with
 * rotary position embeddings learns to copy the token K_BACK positions back. Tokens are one-hot-ish
 * random embeddings; the loss is the mean squared error between y at position t and the embedding
 * of the token at t - K_BACK. The optimiser (Adam, or plain SGD with --sgd) is written here: the
 * library gives the gradients, the caller owns the weights and the update.
 *
 *     example-train [--sgd] [--recompute] [--lr RATE] [--steps N] [--out FILE.npz] [--help]
 *
 * At the end the learned weights are saved as an uncompressed .npz (a zip of .npy files, written
 * here without any library) with the keys examples/attention_map.py reads: w_q, w_k, w_v, w_o,
 * b_q, b_k, b_v, b_o, d_model, n_heads, plus causal, rope, rope_theta, the tokens and the inputs
 * x of one sample sequence, so that
 *     SELFATTN_LIBRARY=build/libselfattn.so.1 PYTHONPATH=bindings/python \
 *         python3 examples/attention_map.py --weights train.npz map.png
 * draws the learned "look K_BACK tokens back" pattern. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <selfattn/selfattn.h>

#include "args.h"

#define VOCAB 12
#define DM 32
#define HEADS 2
#define BATCH 16
#define SEQ 24
#define K_BACK 2
#define THETA 100.0

/* ---- A small deterministic generator ---- */
static uint64_t rng_state = 0x2545F4914F6CDD1Dull;

static double uniform(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (double)((z ^ (z >> 31)) >> 11) * (1.0 / 9007199254740992.0);
}

static double normal(void)
{
    const double u = uniform() + 1e-300, v = uniform();
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* ---- Parameters and Adam ---- */
enum { P_WQ, P_WK, P_WV, P_WO, P_BQ, P_BK, P_BV, P_BO, N_PARAMS };
static const selfattn_weight which[N_PARAMS] = {SELFATTN_W_Q, SELFATTN_W_K, SELFATTN_W_V,
                                                SELFATTN_W_O, SELFATTN_B_Q, SELFATTN_B_K,
                                                SELFATTN_B_V, SELFATTN_B_O};
static const char *names[N_PARAMS] = {"w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o"};

typedef struct param {
    float *w, *g, *m, *v;
    size_t n;
} param;

static param params[N_PARAMS];

static void adam_step(int t, double lr)
{
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
    const double c1 = 1.0 - pow(b1, t), c2 = 1.0 - pow(b2, t);
    for (int p = 0; p < N_PARAMS; p++)
        for (size_t i = 0; i < params[p].n; i++) {
            const double g = params[p].g[i];
            params[p].m[i] = (float)(b1 * params[p].m[i] + (1 - b1) * g);
            params[p].v[i] = (float)(b2 * params[p].v[i] + (1 - b2) * g * g);
            params[p].w[i] -=
                (float)(lr * (params[p].m[i] / c1) / (sqrt(params[p].v[i] / c2) + eps));
        }
}

static void sgd_step(double lr)
{
    for (int p = 0; p < N_PARAMS; p++)
        for (size_t i = 0; i < params[p].n; i++)
            params[p].w[i] -= (float)(lr * params[p].g[i]);
}

/* ---- .npz: a zip archive (stored, no compression) of .npy files ---- */
static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_of(const unsigned char *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

typedef struct npz {
    FILE *f;
    int n;
    uint32_t offset;
    unsigned char cd[8192]; /* the central directory, written at the end */
    size_t cd_len;
} npz;

static void put16(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put32(unsigned char *p, uint32_t v)
{
    put16(p, v & 0xFFFF);
    put16(p + 2, v >> 16);
}

/* One array: descr like "<f4", shape as text like "(32, 32)", raw little-endian data. */
static int npz_add(npz *z, const char *name, const char *descr, const char *shape, const void *data,
                   size_t bytes)
{
    char header[256];
    int hl = snprintf(header, sizeof header,
                      "{'descr': '%s', 'fortran_order': False, 'shape': %s, }", descr, shape);
    const int total = (10 + hl + 1 + 63) / 64 * 64; /* magic .. '\n', 64-byte aligned */
    memset(header + hl, ' ', (size_t)(total - 10 - hl - 1));
    header[total - 10 - 1] = '\n';
    hl = total - 10;
    const size_t size = (size_t)total + bytes;
    unsigned char *npy = malloc(size);
    if (npy == NULL)
        return 0;
    memcpy(npy, "\x93NUMPY\x01\x00", 8);
    put16(npy + 8, (uint32_t)hl);
    memcpy(npy + 10, header, (size_t)hl);
    memcpy(npy + total, data, bytes);
    const uint32_t crc = crc32_of(npy, size);
    char file[64];
    const int fl = snprintf(file, sizeof file, "%s.npy", name);
    unsigned char lh[30] = {0};
    put32(lh, 0x04034b50u);
    put16(lh + 4, 20);
    put16(lh + 12, 0x21); /* 1980-01-01 */
    put32(lh + 14, crc);
    put32(lh + 18, (uint32_t)size);
    put32(lh + 22, (uint32_t)size);
    put16(lh + 26, (uint32_t)fl);
    int ok = fwrite(lh, 1, 30, z->f) == 30 && fwrite(file, 1, (size_t)fl, z->f) == (size_t)fl &&
             fwrite(npy, 1, size, z->f) == size;
    free(npy);
    unsigned char *c = z->cd + z->cd_len;
    if (!ok || z->cd_len + 46 + (size_t)fl > sizeof z->cd)
        return 0;
    memset(c, 0, 46);
    put32(c, 0x02014b50u);
    put16(c + 4, 20);
    put16(c + 6, 20);
    put16(c + 14, 0x21);
    put32(c + 16, crc);
    put32(c + 20, (uint32_t)size);
    put32(c + 24, (uint32_t)size);
    put16(c + 28, (uint32_t)fl);
    put32(c + 42, z->offset);
    memcpy(c + 46, file, (size_t)fl);
    z->cd_len += 46 + (size_t)fl;
    z->offset += 30 + (uint32_t)fl + (uint32_t)size;
    z->n++;
    return 1;
}

static int npz_close(npz *z)
{
    unsigned char end[22] = {0};
    put32(end, 0x06054b50u);
    put16(end + 8, (uint32_t)z->n);
    put16(end + 10, (uint32_t)z->n);
    put32(end + 12, (uint32_t)z->cd_len);
    put32(end + 16, z->offset);
    int ok = fwrite(z->cd, 1, z->cd_len, z->f) == z->cd_len && fwrite(end, 1, 22, z->f) == 22;
    return fclose(z->f) == 0 && ok;
}

static int save(const char *path, const int *tokens, const float *x)
{
    npz z;
    memset(&z, 0, sizeof z);
    z.f = fopen(path, "wb");
    if (z.f == NULL)
        return 0;
    crc_init();
    char shape[32];
    int ok = 1;
    for (int p = 0; p < N_PARAMS; p++) {
        if (p < P_BQ)
            snprintf(shape, sizeof shape, "(%d, %d)", DM, DM);
        else
            snprintf(shape, sizeof shape, "(%d,)", DM);
        ok = ok && npz_add(&z, names[p], "<f4", shape, params[p].w, params[p].n * sizeof(float));
    }
    const int64_t ints[5] = {DM, HEADS, HEADS, 1, 1};
    const char *int_names[5] = {"d_model", "n_heads", "n_kv_heads", "causal", "rope"};
    for (int i = 0; i < 5; i++)
        ok = ok && npz_add(&z, int_names[i], "<i8", "()", &ints[i], sizeof ints[i]);
    const double theta = THETA;
    ok = ok && npz_add(&z, "rope_theta", "<f8", "()", &theta, sizeof theta);
    uint32_t text[SEQ][2]; /* '<U2': UTF-32LE, two characters per token */
    for (int t = 0; t < SEQ; t++) {
        text[t][0] = (uint32_t)('a' + tokens[t]);
        text[t][1] = 0;
    }
    snprintf(shape, sizeof shape, "(%d,)", SEQ);
    ok = ok && npz_add(&z, "tokens", "<U2", shape, text, sizeof text);
    snprintf(shape, sizeof shape, "(%d, %d)", SEQ, DM);
    ok = ok && npz_add(&z, "x", "<f4", shape, x, sizeof(float) * SEQ * DM);
    return npz_close(&z) && ok;
}

/* ---- The task ---- */
static float embed[VOCAB][DM];

static void make_batch(int *tok, float *x, float *target)
{
    for (int i = 0; i < BATCH * SEQ; i++) {
        tok[i] = (int)(uniform() * VOCAB);
        memcpy(x + (size_t)i * DM, embed[tok[i]], sizeof embed[0]);
    }
    for (int b = 0; b < BATCH; b++)
        for (int t = 0; t < SEQ; t++) {
            float *tr = target + ((size_t)b * SEQ + t) * DM;
            if (t >= K_BACK)
                memcpy(tr, embed[tok[b * SEQ + t - K_BACK]], sizeof embed[0]);
            else
                memset(tr, 0, sizeof embed[0]);
        }
}

/* MSE over the positions that have a target, dy = dL/dy, and the share of positions whose
   nearest embedding is the right token. */
static double loss_and_grad(const float *y, const float *target, const int *tok, float *dy,
                            double *accuracy)
{
    const double n = (double)BATCH * (SEQ - K_BACK) * DM;
    double loss = 0.0;
    int right = 0;
    for (int b = 0; b < BATCH; b++)
        for (int t = 0; t < SEQ; t++) {
            const size_t r = ((size_t)b * SEQ + t) * DM;
            if (t < K_BACK) {
                memset(dy + r, 0, sizeof(float) * DM);
                continue;
            }
            for (int i = 0; i < DM; i++) {
                const double d = (double)y[r + i] - target[r + i];
                loss += d * d;
                dy[r + i] = (float)(2.0 * d / n);
            }
            int best = 0;
            double best_d = INFINITY;
            for (int v = 0; v < VOCAB; v++) {
                double s = 0.0;
                for (int i = 0; i < DM; i++)
                    s += (y[r + i] - embed[v][i]) * (double)(y[r + i] - embed[v][i]);
                if (s < best_d) {
                    best_d = s;
                    best = v;
                }
            }
            right += best == tok[b * SEQ + t - K_BACK];
        }
    *accuracy = right / ((double)BATCH * (SEQ - K_BACK));
    return loss / n;
}

static const char usage_text[] =
    "usage: example-train [--sgd] [--recompute] [--lr RATE] [--steps N] [--out FILE.npz]\n"
    "                     [--help]\n";

#define CHECK(call)                                                                                \
    do {                                                                                           \
        selfattn_status st_ = (call);                                                              \
        if (st_ != SELFATTN_OK) {                                                                  \
            fprintf(stderr, "%s: %s (%s)\n", #call, selfattn_status_string(st_),                   \
                    selfattn_last_error());                                                        \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

int main(int argc, char **argv)
{
    ex_prog = "example-train";
    ex_usage_text = usage_text;
    int steps = 600, use_sgd = 0, recompute = 0;
    double lr = 0.0; /* 0: 1e-2 for Adam (3e-3 in the second half), 20 for SGD */
    const char *out = "train.npz";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            ex_usage(stdout, 0);
        } else if (strcmp(a, "--sgd") == 0) {
            use_sgd = 1;
        } else if (strcmp(a, "--recompute") == 0) {
            recompute = 1;
        } else if (strcmp(a, "--steps") == 0) {
            const char *v = ex_opt_value(argc, argv, &i);
            char *end;
            errno = 0;
            const long n = strtol(v, &end, 10);
            if (end == v || *end != '\0')
                ex_bad_usage("--steps '%s': not an integer", v);
            if (errno == ERANGE || n < 1 || n > INT_MAX)
                ex_bad_usage("--steps %s: out of range [1, %d]", v, INT_MAX);
            steps = (int)n;
        } else if (strcmp(a, "--lr") == 0) { /* 0: the optimiser's default */
            const char *v = ex_opt_value(argc, argv, &i);
            char *end;
            errno = 0;
            lr = strtod(v, &end);
            if (end == v || *end != '\0')
                ex_bad_usage("--lr '%s': not a number", v);
            if (errno == ERANGE || !(lr >= 0.0) || isinf(lr))
                ex_bad_usage("--lr %s: not a finite rate >= 0", v);
        } else if (strcmp(a, "--out") == 0) {
            out = ex_opt_value(argc, argv, &i);
        } else {
            ex_bad_usage("unknown option '%s'", a);
        }
    }
    for (int v = 0; v < VOCAB; v++) /* one-hot, plus a little noise */
        for (int i = 0; i < DM; i++)
            embed[v][i] = (float)((i == v ? 1.0 : 0.0) + 0.1 * normal());
    for (int p = 0; p < N_PARAMS; p++) {
        params[p].n = p < P_BQ ? (size_t)DM * DM : DM;
        params[p].w = malloc(sizeof(float) * params[p].n);
        params[p].g = malloc(sizeof(float) * params[p].n);
        params[p].m = calloc(params[p].n, sizeof(float));
        params[p].v = calloc(params[p].n, sizeof(float));
        for (size_t i = 0; i < params[p].n; i++) /* nn.Linear's range; small random biases */
            params[p].w[i] = (float)((2 * uniform() - 1) / sqrt((double)DM) * (p < P_BQ ? 1 : 0.5));
    }

    selfattn_layer *layer = NULL;
    CHECK(selfattn_layer_create(DM, HEADS, &layer));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_CAUSAL, 1));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_ROPE, 1));
    CHECK(selfattn_layer_set_float(layer, SELFATTN_FOPT_ROPE_THETA, THETA));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_THREADS, 1));

    const size_t n_x = (size_t)BATCH * SEQ * DM;
    float *x = malloc(sizeof(float) * n_x), *y = malloc(sizeof(float) * n_x);
    float *target = malloc(sizeof(float) * n_x), *dy = malloc(sizeof(float) * n_x);
    int *tok = malloc(sizeof(int) * BATCH * SEQ);
    selfattn_grads g = {sizeof g,       params[P_WQ].g, params[P_WK].g,
                        params[P_WV].g, params[P_WO].g, params[P_BQ].g,
                        params[P_BK].g, params[P_BV].g, params[P_BO].g};
    size_t state_bytes = 0; /* the train state: Q, K, V, O and lse of one batch */
    CHECK(selfattn_train_state_size(layer, BATCH, SEQ, &state_bytes));
    void *state = recompute ? NULL : malloc(state_bytes);
    printf("copy the token %d back: %d tokens, d_model %d, %d heads, causal, RoPE; %s, batch %d x "
           "%d; %s\n",
           K_BACK, VOCAB, DM, HEADS, use_sgd ? "SGD" : "Adam", BATCH, SEQ,
           recompute ? "the backward recomputes the forward"
                     : "the forward keeps its activations for the backward");
    double loss = 0, acc = 0, first = -1;
    for (int step = 1; step <= steps; step++) {
        for (int p = 0; p < N_PARAMS; p++) /* the layer keeps a copy of the weights */
            CHECK(selfattn_layer_set_weight(layer, which[p], params[p].w, (int64_t)params[p].n));
        make_batch(tok, x, target);
        if (recompute)
            CHECK(selfattn_forward(layer, BATCH, SEQ, x, NULL, y));
        else
            CHECK(selfattn_forward_train(layer, BATCH, SEQ, x, NULL, y, state, state_bytes));
        loss = loss_and_grad(y, target, tok, dy, &acc);
        if (first < 0)
            first = loss;
        if (recompute)
            CHECK(selfattn_backward(layer, BATCH, SEQ, x, NULL, dy, NULL, &g));
        else
            CHECK(selfattn_backward_train(layer, BATCH, SEQ, x, NULL, dy, NULL, &g, state,
                                          state_bytes));
        if (use_sgd)
            sgd_step(lr > 0 ? lr : 20.0);
        else
            adam_step(step, lr > 0 ? lr : step <= steps / 2 ? 1e-2 : 3e-3);
        if (step == 1 || step % 50 == 0)
            printf("step %5d  loss %.5f  accuracy %5.1f%%\n", step, loss, 100 * acc);
    }
    printf("loss %.5f -> %.5f\n", first, loss);

    /* one sample sequence, with the final weights, for the attention map */
    for (int p = 0; p < N_PARAMS; p++)
        CHECK(selfattn_layer_set_weight(layer, which[p], params[p].w, (int64_t)params[p].n));
    make_batch(tok, x, target);
    if (!save(out, tok, x)) {
        fprintf(stderr, "could not write %s\n", out);
        return 1;
    }
    printf("weights saved to %s (numpy.load reads it; examples/attention_map.py --weights %s "
           "map.png draws the attention)\n",
           out, out);
    selfattn_layer_destroy(layer);
    free(state);
    for (int p = 0; p < N_PARAMS; p++) {
        free(params[p].w);
        free(params[p].g);
        free(params[p].m);
        free(params[p].v);
    }
    free(x);
    free(y);
    free(target);
    free(dy);
    free(tok);
    return acc > 0.9 ? 0 : 1;
}
