/* selfattn-generate (examples/generate.c): autoregressive decoding with the key/value cache. One
 * causal self-attention layer with rotary embeddings and grouped-query heads (random weights), a
 * random token embedding table as both input embedding and output head, greedy decoding: a prompt
 * is run through the cache in one call, then each step feeds the last token and picks the next.
 * Prints the tokens, the prompt's throughput and the steps' tokens/s and GB/s (weights + cached
 * K/V read per step).
 *
 *   selfattn-generate [--d-model N] [--heads N] [--kv-heads N] [--prompt N] [--steps N]
 *                     [--seqs N] [--window N] [--threads N] [--vocab N] [--seed N] [--help]
 *
 * Defaults: d_model 2048, 16 heads, 4 K/V heads (Llama-style GQA), RoPE, a 512-token prompt,
 * 64 steps, one sequence. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <selfattn/selfattn.h>

#include "args.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng = 1;
static uint64_t rnd_bits(void)
{
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return rng;
}

static float rnd(float a) /* uniform in [-a, a) */
{
    return a * (float)((double)(rnd_bits() >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

static float *rnd_array(size_t n, float a)
{
    float *p = malloc((n ? n : 1) * sizeof *p);
    if (!p) {
        fprintf(stderr, "selfattn-generate: out of memory\n");
        exit(2);
    }
    for (size_t i = 0; i < n; i++)
        p[i] = rnd(a);
    return p;
}

#define CHECK(call)                                                                                \
    do {                                                                                           \
        selfattn_status st_ = (call);                                                              \
        if (st_ != SELFATTN_OK) {                                                                  \
            fprintf(stderr, "selfattn-generate: %s: %s (%s)\n", #call,                             \
                    selfattn_status_string(st_), selfattn_last_error());                           \
            return 2;                                                                              \
        }                                                                                          \
    } while (0)

static const char usage_text[] =
    "usage: selfattn-generate [--d-model N] [--heads N] [--kv-heads N] [--prompt N] [--steps N]\n"
    "                         [--seqs N] [--window N] [--threads N] [--vocab N] [--seed N]\n"
    "                         [--weight-dtype f32|f16|bf16] [--kv-dtype f32|f16|bf16]\n"
    "                         [--help]\n";

/* The token whose embedding has the largest dot product with y. */
static int next_token(const float *y, const float *emb, int vocab, int dm)
{
    int best = 0;
    double best_v = -INFINITY;
    for (int t = 0; t < vocab; t++) {
        double v = 0.0;
        for (int i = 0; i < dm; i++)
            v += (double)y[i] * emb[(size_t)t * dm + i];
        if (v > best_v) {
            best_v = v;
            best = t;
        }
    }
    return best;
}

int main(int argc, char **argv)
{
    ex_prog = "selfattn-generate";
    ex_usage_text = usage_text;
    int dm = 2048, heads = 16, kv_heads = 4, prompt = 512, steps = 64, seqs = 1, window = 0;
    int threads = 0, vocab = 512, wdt = 0, kvdt = 0;
    const char *blas_threads = ex_blas_one_thread();
    static const char *const dtypes[3] = {"f32", "f16", "bf16"};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h"))
            ex_usage(stdout, 0);
        else if (!strcmp(a, "--d-model"))
            dm = (int)ex_int_arg(argc, argv, &i, 1, INT_MAX);
        else if (!strcmp(a, "--heads"))
            heads = (int)ex_int_arg(argc, argv, &i, 1, INT_MAX);
        else if (!strcmp(a, "--kv-heads"))
            kv_heads = (int)ex_int_arg(argc, argv, &i, 1, INT_MAX);
        else if (!strcmp(a, "--prompt"))
            prompt = (int)ex_int_arg(argc, argv, &i, 1, INT_MAX);
        else if (!strcmp(a, "--steps"))
            steps = (int)ex_int_arg(argc, argv, &i, 1, INT_MAX);
        else if (!strcmp(a, "--seqs"))
            seqs = (int)ex_int_arg(argc, argv, &i, 1, INT_MAX);
        else if (!strcmp(a, "--window")) /* 0: no window */
            window = (int)ex_int_arg(argc, argv, &i, 0, INT_MAX);
        else if (!strcmp(a, "--threads")) /* 0: the library's default */
            threads = (int)ex_int_arg(argc, argv, &i, 0, INT_MAX);
        else if (!strcmp(a, "--vocab"))
            vocab = (int)ex_int_arg(argc, argv, &i, 1, INT_MAX);
        else if (!strcmp(a, "--weight-dtype") || !strcmp(a, "--kv-dtype")) {
            if (i + 1 >= argc)
                ex_bad_usage("%s needs a value", a);
            const char *val = argv[++i];
            int d = 0;
            while (d < 3 && strcmp(val, dtypes[d]) != 0)
                d++;
            if (d == 3)
                ex_bad_usage("%s '%s': not one of f32, f16, bf16", a, val);
            *(!strcmp(a, "--weight-dtype") ? &wdt : &kvdt) = d;
        } else if (!strcmp(a, "--seed"))
            rng = (uint64_t)ex_int_arg(argc, argv, &i, 0, LONG_MAX);
        else
            ex_bad_usage("unknown option '%s'", a);
    }
    if (dm % heads != 0)
        ex_bad_usage("--heads %d does not divide --d-model %d", heads, dm);
    if (heads % kv_heads != 0)
        ex_bad_usage("--kv-heads %d does not divide --heads %d", kv_heads, heads);
    const int hd = dm / heads;
    const size_t nq = (size_t)heads * hd, nkv = (size_t)kv_heads * hd;

    selfattn_layer *layer;
    CHECK(selfattn_layer_create(dm, heads, &layer));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_N_KV_HEADS, kv_heads));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_CAUSAL, 1));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_ROPE, 1));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_WINDOW, window));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_THREADS, threads));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_WEIGHT_DTYPE, wdt));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_KV_DTYPE, kvdt));
    const float a = 1.0f / sqrtf((float)dm);
    float *wq = rnd_array(nq * dm, a), *wk = rnd_array(nkv * dm, a), *wv = rnd_array(nkv * dm, a);
    float *wo = rnd_array((size_t)dm * nq, 1.0f / sqrtf((float)nq));
    CHECK(selfattn_layer_set_weight(layer, SELFATTN_W_Q, wq, (int64_t)(nq * dm)));
    CHECK(selfattn_layer_set_weight(layer, SELFATTN_W_K, wk, (int64_t)(nkv * dm)));
    CHECK(selfattn_layer_set_weight(layer, SELFATTN_W_V, wv, (int64_t)(nkv * dm)));
    CHECK(selfattn_layer_set_weight(layer, SELFATTN_W_O, wo, (int64_t)(dm * nq)));
    int64_t v;
    CHECK(selfattn_layer_get(layer, SELFATTN_OPT_THREADS, &v));
    threads = (int)v;

    /* A window's cache is a ring: a call needs min(L, w - 1) + n_new rows, so the prompt (L = 0)
       and then single steps fit in max(prompt, w) whatever the length reached. */
    const int capacity = window > 0 ? (prompt > window ? prompt : window) : prompt + steps;
    selfattn_cache *cache;
    CHECK(selfattn_cache_create(layer, seqs, capacity, &cache));
    float *emb = rnd_array((size_t)vocab * dm, 1.0f);
    float *x = malloc(sizeof(float) * seqs * prompt * dm),
          *y = malloc(sizeof(float) * seqs * prompt * dm);
    int *tokens = malloc(sizeof(int) * seqs * (prompt + steps));
    for (int s = 0; s < seqs; s++)
        for (int t = 0; t < prompt; t++) {
            const int tok = (int)((rnd_bits() >> 33) % (uint64_t)vocab);
            tokens[s * (prompt + steps) + t] = tok;
            memcpy(x + ((size_t)s * prompt + t) * dm, emb + (size_t)tok * dm, sizeof(float) * dm);
        }
    double t0 = now_s();
    CHECK(selfattn_forward_cached(layer, cache, prompt, x, NULL, y));
    const double t_prompt = now_s() - t0;
    for (int s = 0; s < seqs; s++)
        tokens[s * (prompt + steps) + prompt] =
            next_token(y + ((size_t)s * prompt + prompt - 1) * dm, emb, vocab, dm);

    double t_attn = 0.0;
    for (int k = 1; k < steps; k++) {
        for (int s = 0; s < seqs; s++)
            memcpy(x + (size_t)s * dm,
                   emb + (size_t)tokens[s * (prompt + steps) + prompt + k - 1] * dm,
                   sizeof(float) * dm);
        t0 = now_s();
        CHECK(selfattn_forward_cached(layer, cache, 1, x, NULL, y));
        t_attn += now_s() - t0;
        for (int s = 0; s < seqs; s++)
            tokens[s * (prompt + steps) + prompt + k] =
                next_token(y + (size_t)s * dm, emb, vocab, dm);
    }
    /* bytes a step reads: the weights once, the cached K/V of every sequence */
    int32_t len;
    CHECK(selfattn_cache_length(cache, 0, &len));
    const double avg_ctx = window > 0 ? fmin(window, prompt + steps / 2.0) : prompt + steps / 2.0;
    const double step_bytes = (wdt ? 2.0 : 4.0) * ((double)(nq + 2 * nkv) * dm + (double)dm * nq) +
                              (kvdt ? 2.0 : 4.0) * 2.0 * nkv * avg_ctx * seqs;
    const double per_step = t_attn / (steps - 1);

    printf("libselfattn %s, %s, %d thread%s\n", selfattn_version_string(), selfattn_kernel_name(),
           threads, threads == 1 ? "" : "s");
    printf("blas: %s (%s)\n", selfattn_blas_info(), blas_threads);
    if (selfattn_blas_mismatch())
        printf("WARNING: %s\n", selfattn_blas_advice());
    printf("layer: d_model %d, %d heads, %d K/V heads, head_dim %d, RoPE, causal%s; weights %s, "
           "K/V cache %s\n",
           dm, heads, kv_heads, hd, window > 0 ? ", sliding window" : "", dtypes[wdt],
           dtypes[kvdt]);
    printf("prompt: %d sequence%s x %d tokens in %.1f ms (%.0f tokens/s)\n", seqs,
           seqs == 1 ? "" : "s", prompt, t_prompt * 1e3, seqs * prompt / t_prompt);
    printf("decode: %d steps, %.3f ms per step: %.1f tokens/s, %.1f GB/s of weights and K/V\n",
           steps - 1, per_step * 1e3, seqs / per_step, step_bytes / per_step * 1e-9);
    printf("cache: sequence 0 at position %d, in a cache of %d rows\n", len, capacity);
    printf("sequence 0, last 16 tokens:");
    for (int k = steps - 16 > 0 ? steps - 16 : 0; k < steps; k++)
        printf(" %d", tokens[prompt + k]);
    printf("\n");
    selfattn_cache_destroy(cache);
    selfattn_layer_destroy(layer);
    free(wq);
    free(wk);
    free(wv);
    free(wo);
    free(emb);
    free(x);
    free(y);
    free(tokens);
    return 0;
}
