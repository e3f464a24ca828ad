/* What the 1.1 score options and extras cost, through the public API, each against the plain call
 * in the same benchmark (alternating, medians):
 *   window/L/E/H/w           causal forward with SELFATTN_OPT_WINDOW w against plain causal:
 *                            time_ratio = causal / windowed, flop_ratio = the same for the FLOPs
 *                            needed (projections + 4 head_dim per visible query-key pair per head),
 *                            and their quotient (1 = the window saves all the work it skips)
 *   bias/L/E/H               forward_ex with a [L][L] bias broadcast over batch and heads
 *   weights/L/E/H            forward_ex returning the attention weights ([H][L][L] floats)
 *   lse/L/E/H                forward_ex returning the log-sum-exp
 *   alibi_softcap/L/E/H      ALiBi and a softcap (tanh per score)
 *   causal_attend/L/E/H/a    1.3: selfattn_attend with SELFATTN_OPT_CAUSAL a (1 bottom-right,
 *                            2 top-left) at q_len = kv_len = L against the same call without a
 *                            mask: speedup = full / causal (about 2 when the blocks above the
 *                            diagonal are skipped, whatever the alignment)
 * ratio = the option's time / the plain forward's. --smoke: small shapes, a quick pass. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <selfattn/selfattn.h>

#include "bench_util.h"
#include "shim.h"

enum { K_WINDOW, K_BIAS, K_WEIGHTS, K_LSE, K_ALIBI_SOFTCAP, K_CAUSAL_ATTEND };
static const char *kind_names[] = {"window", "bias",          "weights",
                                   "lse",    "alibi_softcap", "causal_attend"};

typedef struct mcfg {
    int kind, L, E, H, w; /* w: the window, or for causal_attend the CAUSAL value */
} mcfg;

/* FLOPs a causal forward needs with window w (0: none). */
static double causal_flops(const mcfg *c, int w)
{
    double pairs = 0.0;
    for (long i = 0; i < c->L; i++)
        pairs += (w > 0 && i + 1 > w) ? w : (double)(i + 1);
    return 2.0 * c->L * (double)c->E * 4.0 * c->E + 4.0 * (double)c->E * pairs;
}

#define MAX_RUNS 64

static void bm_option(sb_state *s, const void *arg)
{
    const mcfg *c = arg;
    /* two layers with the same weights: the plain one and the one the option is set on */
    const sb_layer_opts lo = {.d_model = c->E, .n_heads = c->H, .causal = 1, .threads = 1};
    selfattn_layer *plain = sb_make_layer(&lo), *opt = sb_make_layer(&lo);
    const size_t n = (size_t)c->L * c->E;
    float *x = sb_filled(n, 1.0f, 3), *y = malloc(n * sizeof(float));
    float *bias = NULL, *weights = NULL, *lse = NULL;
    selfattn_extras e = {.struct_size = sizeof e};
    int ok = plain && opt && x && y;
    if (ok && c->kind == K_WINDOW)
        ok = selfattn_layer_set(opt, SELFATTN_OPT_WINDOW, c->w) == SELFATTN_OK;
    if (ok && c->kind == K_ALIBI_SOFTCAP)
        ok = selfattn_layer_set(opt, SELFATTN_OPT_ALIBI, 1) == SELFATTN_OK &&
             selfattn_layer_set_float(opt, SELFATTN_FOPT_SOFTCAP, 30.0) == SELFATTN_OK;
    if (ok && c->kind == K_BIAS) {
        bias = sb_filled((size_t)c->L * c->L, 1.0f, 5);
        e.attn_bias = bias;
        e.bias_stride_row = c->L;
        ok = bias != NULL;
    }
    if (ok && c->kind == K_WEIGHTS) {
        weights = malloc(sizeof(float) * c->H * (size_t)c->L * c->L);
        e.weights = weights;
        ok = weights != NULL;
    }
    if (ok && c->kind == K_LSE) {
        lse = malloc(sizeof(float) * c->H * (size_t)c->L);
        e.lse = lse;
        ok = lse != NULL;
    }
    static double tp[MAX_RUNS], to[MAX_RUNS];
    int k = 0;
    if (!ok) {
        sb_skip_with_error(s, "set-up failed");
    } else {
        /* warm-up: workspaces, and the weights output's pages */
        selfattn_status st = selfattn_forward(plain, 1, c->L, x, NULL, y);
        st |= selfattn_forward_ex(opt, 1, c->L, x, NULL, &e, y);
        while (st == SELFATTN_OK && sb_keep_running(s)) {
            double t[2];
            for (int i = 0; i < 2; i++) {
                const int which = (i + k) % 2; /* which goes first alternates */
                const double t0 = sb_now_s();
                st |= which == 0 ? selfattn_forward(plain, 1, c->L, x, NULL, y)
                                 : selfattn_forward_ex(opt, 1, c->L, x, NULL, &e, y);
                t[which] = sb_now_s() - t0;
            }
            if (k < MAX_RUNS) {
                tp[k] = t[0];
                to[k] = t[1];
                k++;
            }
        }
        if (st != SELFATTN_OK)
            sb_skip_with_error(s, "call failed");
    }
    if (k > 0) {
        const double a = sb_median(tp, k), b = sb_median(to, k);
        sb_counter(s, "plain_ms", a * 1e3);
        sb_counter(s, "option_ms", b * 1e3);
        sb_counter(s, "ratio", b / a);
        if (c->kind == K_WINDOW) {
            const double fr = causal_flops(c, 0) / causal_flops(c, c->w);
            sb_counter(s, "time_ratio", a / b);
            sb_counter(s, "flop_ratio", fr);
            sb_counter(s, "time_over_flop_ratio", (a / b) / fr);
        }
    }
    free(x);
    free(y);
    free(bias);
    free(weights);
    free(lse);
    selfattn_layer_destroy(plain);
    selfattn_layer_destroy(opt);
}

/* attend with CAUSAL c->w against the full (unmasked) attend of the same q, k, v. */
static void bm_causal_attend(sb_state *s, const void *arg)
{
    const mcfg *c = arg;
    const sb_layer_opts lo = {.d_model = c->E, .n_heads = c->H, .causal = 0, .threads = 1};
    selfattn_layer *full = sb_make_layer(&lo), *causal = sb_make_layer(&lo);
    const size_t n = (size_t)c->L * c->E;
    float *q = sb_filled(n, 1.0f, 7), *k = sb_filled(n, 1.0f, 8), *v = sb_filled(n, 1.0f, 9);
    float *o = malloc(n * sizeof(float));
    int ok = full && causal && q && k && v && o &&
             selfattn_layer_set(causal, SELFATTN_OPT_CAUSAL, c->w) == SELFATTN_OK;
    static double tf[MAX_RUNS], tc[MAX_RUNS];
    int m = 0;
    if (!ok) {
        sb_skip_with_error(s, "set-up failed");
    } else {
        selfattn_status st = selfattn_attend(full, 1, c->L, c->L, q, k, v, NULL, o);
        st |= selfattn_attend(causal, 1, c->L, c->L, q, k, v, NULL, o);
        while (st == SELFATTN_OK && sb_keep_running(s)) {
            double t[2];
            for (int i = 0; i < 2; i++) {
                const int which = (i + m) % 2; /* which goes first alternates */
                const double t0 = sb_now_s();
                st |= selfattn_attend(which == 0 ? full : causal, 1, c->L, c->L, q, k, v, NULL, o);
                t[which] = sb_now_s() - t0;
            }
            if (m < MAX_RUNS) {
                tf[m] = t[0];
                tc[m] = t[1];
                m++;
            }
        }
        if (st != SELFATTN_OK)
            sb_skip_with_error(s, "call failed");
    }
    if (m > 0) {
        const double a = sb_median(tf, m), b = sb_median(tc, m);
        sb_counter(s, "full_ms", a * 1e3);
        sb_counter(s, "causal_ms", b * 1e3);
        sb_counter(s, "speedup", a / b);
    }
    free(q);
    free(k);
    free(v);
    free(o);
    selfattn_layer_destroy(full);
    selfattn_layer_destroy(causal);
}

int main(int argc, char **argv)
{
    sb_blas_setup();
    const int smoke = sb_smoke(argc, argv);
    static mcfg cfgs[7];
    static char names[7][96];
    cfgs[0] = (mcfg){
        .kind = K_WINDOW, .L = smoke ? 1024 : 16384, .E = 512, .H = 8, .w = smoke ? 64 : 1024};
    for (int i = 1; i < 5; i++)
        cfgs[i] = (mcfg){.kind = i, .L = smoke ? 256 : 2048, .E = 768, .H = 12, .w = 0};
    for (int i = 0; i < 5; i++) {
        if (cfgs[i].kind == K_WINDOW)
            snprintf(names[i], sizeof names[i], "%s/%d/%d/%d/%d", kind_names[cfgs[i].kind],
                     cfgs[i].L, cfgs[i].E, cfgs[i].H, cfgs[i].w);
        else
            snprintf(names[i], sizeof names[i], "%s/%d/%d/%d", kind_names[cfgs[i].kind],
                     cfgs[i].L, cfgs[i].E, cfgs[i].H);
        sb_register(names[i], bm_option, &cfgs[i], smoke ? 1 : (i == 0 ? 3 : 7));
    }
    for (int i = 5; i < 7; i++) {
        cfgs[i] = (mcfg){
            .kind = K_CAUSAL_ATTEND, .L = smoke ? 512 : 4096, .E = 512, .H = 8, .w = i - 4};
        snprintf(names[i], sizeof names[i], "%s/%d/%d/%d/%d", kind_names[cfgs[i].kind],
                 cfgs[i].L, cfgs[i].E, cfgs[i].H, cfgs[i].w);
        sb_register(names[i], bm_causal_attend, &cfgs[i], smoke ? 1 : 5);
    }
    return sb_main(argc, argv);
}
