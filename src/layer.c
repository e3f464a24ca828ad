/* The layer handle: creation, options, weights, status strings and versions. */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "kernels/half-scalar.h"

uint32_t selfattn_version_number(void)
{
    return SELFATTN_VERSION_NUMBER;
}

const char *selfattn_version_string(void)
{
    return SELFATTN_VERSION_STRING;
}

/* Checks that the weight shapes of a configuration are addressable and that their row widths fit
   the int dimensions of CBLAS;
   v_dim is the value heads' width (SELFATTN_OPT_V_HEAD_DIM: 0 = head_dim). */
static selfattn_status sa_check_shape(int64_t d_model, int64_t n_heads, int64_t n_kv_heads,
                                      int64_t head_dim, int64_t v_dim)
{
    if (head_dim == 0)
        return SELFATTN_OK; /* undetermined: checked again when it is set */
    const int64_t dv = v_dim != 0 ? v_dim : head_dim;
    const int64_t nq = n_heads * head_dim; /* all < 2^31: no int64 overflow */
    const int64_t nkv = n_kv_heads * head_dim;
    const int64_t nkv_v = n_kv_heads * dv, nq_v = n_heads * dv; /* W_V's rows, W_O's columns */
    /* each part is checked before their sum is formed (each may be near 2^62) */
    const int64_t nqkv =
        nq <= INT32_MAX && nkv <= INT32_MAX && nkv_v <= INT32_MAX ? nq + nkv + nkv_v : INT64_MAX;
    size_t bytes;
    if (nqkv > INT32_MAX || nq_v > INT32_MAX ||
        !sa_mul_size((size_t)nqkv, (size_t)d_model, &bytes) ||
        !sa_mul_size(bytes, sizeof(float), &bytes) || bytes > (size_t)PTRDIFF_MAX ||
        sa_array_bytes((size_t)nq_v, (size_t)d_model) == 0) {
        sa_fail(SELFATTN_ERR_OVERFLOW,
                "the weights of d_model %lld, %lld heads (%lld K/V heads) of head_dim %lld "
                "(value heads of %lld) do not fit (the weight rows, n_heads + n_kv_heads times "
                "head_dim plus n_kv_heads times dv, and W_O's n_heads x dv columns must fit an "
                "int32, and the weights memory's address range)",
                (long long)d_model, (long long)n_heads, (long long)n_kv_heads, (long long)head_dim,
                (long long)dv);
        return SELFATTN_ERR_OVERFLOW;
    }
    return SELFATTN_OK;
}

selfattn_status selfattn_layer_create(int32_t d_model, int32_t n_heads, selfattn_layer **out)
{
    sa_err_begin("selfattn_layer_create");
    SA_CHECKF(out != NULL, SELFATTN_ERR_NULL, "out is NULL");
    SA_CHECKF(d_model >= 1 && n_heads >= 1, SELFATTN_ERR_INVALID,
              "d_model %d and n_heads %d must both be >= 1", d_model, n_heads);
    const int32_t head_dim = (d_model % n_heads == 0) ? d_model / n_heads : 0;
    selfattn_status st = sa_check_shape(d_model, n_heads, n_heads, head_dim, 0);
    if (st != SELFATTN_OK)
        return st;
    selfattn_layer *l = sa_calloc(1, sizeof *l);
    SA_CHECKF(l != NULL, SELFATTN_ERR_NOMEM, "out of memory for the layer");
    l->ws = sa_ws_cache_create();
    if (l->ws == NULL) {
        sa_free(l);
        sa_fail(SELFATTN_ERR_NOMEM, "out of memory for the layer");
        return SELFATTN_ERR_NOMEM;
    }
    l->d_model = d_model;
    l->n_heads = n_heads;
    l->n_kv_heads = n_heads;
    l->head_dim = head_dim;
    l->out_proj = 1;
    static _Atomic uint64_t serials;
    l->serial = ++serials;
    *out = l;
    return SELFATTN_OK;
}

void selfattn_layer_destroy(selfattn_layer *layer)
{
    if (layer == NULL)
        return;
    sa_free(layer->w_qkv);
    sa_free(layer->b_qkv);
    sa_free(layer->w_o);
    sa_free(layer->b_o);
    sa_free(layer->h_qkv);
    sa_free(layer->h_o);
    sa_ws_cache_destroy(layer->ws);
    sa_free(layer);
}

float sa_layer_scale(const selfattn_layer *layer)
{
    if (layer->scale_opt != 0.0f)
        return layer->scale_opt;
    return layer->head_dim != 0 ? (float)(1.0 / sqrt((double)layer->head_dim)) : 0.0f;
}

/* Whether the rotary settings fit a head size (head_dim 0: undetermined, checked when set). */
static int sa_rope_fits(int64_t rope, int64_t rope_dims, int64_t head_dim)
{
    if (rope == 0 && rope_dims == 0)
        return 1;
    const int64_t r = rope_dims != 0 ? rope_dims : head_dim;
    if (head_dim == 0)
        return r % 2 == 0;
    return r % 2 == 0 && r <= head_dim;
}

/* The default worker count, the online CPUs, read once per process: glibc's sysconf answers
   _SC_NPROCESSORS_ONLN by opening and reading /sys/devices/system/cpu/online, three system calls
   that took 6 us a call with everything cached and 46 us after a 256 MB read (AMD EPYC, Zen 5
   VM), on every call that planned its workers: 5% of a one-token decoding step at d_model 2048. */
static pthread_once_t sa_cpus_once = PTHREAD_ONCE_INIT;
static int sa_cpus_online = 1;

static void sa_cpus_probe(void)
{
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    sa_cpus_online = n < 1 ? 1 : n > SA_MAX_THREADS ? SA_MAX_THREADS : (int)n;
}

int sa_layer_threads(const selfattn_layer *layer)
{
    if (layer->threads_opt > 0)
        return layer->threads_opt;
    pthread_once(&sa_cpus_once, sa_cpus_probe);
    return sa_cpus_online;
}

static selfattn_status sa_option_bounds(selfattn_option opt, int64_t *lower, int64_t *upper);

selfattn_status selfattn_option_bounds(selfattn_option opt, int64_t *lower, int64_t *upper)
{
    sa_err_begin("selfattn_option_bounds");
    SA_CHECK(lower != NULL && upper != NULL, SELFATTN_ERR_NULL);
    return sa_option_bounds(opt, lower, upper);
}

static selfattn_status sa_option_bounds(selfattn_option opt, int64_t *lower, int64_t *upper)
{
    int64_t lo, hi;
    switch (opt) {
    case SELFATTN_OPT_N_KV_HEADS:
    case SELFATTN_OPT_HEAD_DIM:
    case SELFATTN_OPT_V_HEAD_DIM:
        lo = 1;
        hi = INT32_MAX;
        break;
    case SELFATTN_OPT_CAUSAL: /* 0 off, 1 bottom-right, 2 top-left, 3 bottom-right per length */
        lo = 0;
        hi = 3;
        break;
    case SELFATTN_OPT_OUT_PROJ:
        lo = 0;
        hi = 1;
        break;
    case SELFATTN_OPT_THREADS:
        lo = 1;
        hi = SA_MAX_THREADS;
        break;
    case SELFATTN_OPT_WINDOW:
        lo = 1;
        hi = INT32_MAX;
        break;
    case SELFATTN_OPT_ROPE:
        lo = 0;
        hi = 2;
        break;
    case SELFATTN_OPT_ROPE_DIMS:
        lo = 2;
        hi = INT32_MAX - 1;
        break;
    case SELFATTN_OPT_ALIBI:
        lo = 0;
        hi = 1;
        break;
    case SELFATTN_OPT_WEIGHT_DTYPE:
    case SELFATTN_OPT_KV_DTYPE:
        lo = SELFATTN_DTYPE_F16; /* 0 (F32) is the default */
        hi = SELFATTN_DTYPE_BF16;
        break;
    default: {
        sa_fail(SELFATTN_ERR_INVALID, "%d is not an option (selfattn_option)", (int)opt);
        return SELFATTN_ERR_INVALID;
    }
    }
    *lower = lo;
    *upper = hi;
    return SELFATTN_OK;
}

selfattn_status selfattn_layer_set(selfattn_layer *layer, selfattn_option opt, int64_t value)
{
    sa_err_begin("selfattn_layer_set");
    SA_CHECKF(layer != NULL, SELFATTN_ERR_NULL, "layer is NULL");
    int64_t lo = 0, hi = 0;
    SA_CHECKF(sa_option_bounds(opt, &lo, &hi) == SELFATTN_OK, SELFATTN_ERR_INVALID,
              "%d is not an option (selfattn_option)", (int)opt);
    const int shape_option = opt == SELFATTN_OPT_N_KV_HEADS || opt == SELFATTN_OPT_HEAD_DIM ||
                             opt == SELFATTN_OPT_OUT_PROJ || opt == SELFATTN_OPT_WEIGHT_DTYPE ||
                             opt == SELFATTN_OPT_V_HEAD_DIM;
    SA_CHECKF(!(shape_option && layer->weights_set), SELFATTN_ERR_STATE,
              "option %d changes how the weights are laid out or stored: not allowed once a "
              "weight is set (set the options first, then the weights)",
              (int)opt);
    const int has_default = opt != SELFATTN_OPT_CAUSAL && opt != SELFATTN_OPT_OUT_PROJ;
    SA_CHECKF((value == 0 && has_default) || (value >= lo && value <= hi), SELFATTN_ERR_INVALID,
              "option %d: value %lld is outside [%lld, %lld]%s", (int)opt, (long long)value,
              (long long)lo, (long long)hi, has_default ? " (0: the default)" : "");

    const int64_t d_model = layer->d_model, n_heads = layer->n_heads;
    selfattn_status st;
    switch (opt) {
    case SELFATTN_OPT_N_KV_HEADS: {
        const int64_t nkv = value == 0 ? n_heads : value;
        SA_CHECKF(nkv <= n_heads && n_heads % nkv == 0, SELFATTN_ERR_INVALID,
                  "N_KV_HEADS %lld must divide n_heads %lld", (long long)nkv, (long long)n_heads);
        st = sa_check_shape(d_model, n_heads, nkv, layer->head_dim, layer->v_head_dim);
        SA_CHECK(st == SELFATTN_OK, st);
        layer->n_kv_heads = (int32_t)nkv;
        break;
    }
    case SELFATTN_OPT_HEAD_DIM: {
        const int64_t hd = value != 0 ? value : (d_model % n_heads == 0 ? d_model / n_heads : 0);
        const int64_t dv = layer->v_head_dim != 0 ? layer->v_head_dim : hd;
        SA_CHECKF(layer->out_proj || dv * n_heads == d_model, SELFATTN_ERR_INVALID,
                  "HEAD_DIM %lld: with OUT_PROJ 0, n_heads %lld x dv %lld (the value heads' "
                  "width) must equal d_model %lld",
                  (long long)hd, (long long)n_heads, (long long)dv, (long long)d_model);
        SA_CHECKF(sa_rope_fits(layer->rope, layer->rope_dims, hd), SELFATTN_ERR_INVALID,
                  "HEAD_DIM %lld does not fit ROPE_DIMS %d (even, <= head_dim)", (long long)hd,
                  layer->rope_dims);
        st = sa_check_shape(d_model, n_heads, layer->n_kv_heads, hd, layer->v_head_dim);
        SA_CHECK(st == SELFATTN_OK, st);
        layer->head_dim = (int32_t)hd;
        break;
    }
    case SELFATTN_OPT_V_HEAD_DIM: {
        const int64_t dv = value != 0 ? value : layer->head_dim;
        SA_CHECKF(layer->out_proj || dv * n_heads == d_model, SELFATTN_ERR_INVALID,
                  "V_HEAD_DIM %lld: with OUT_PROJ 0, n_heads %lld x dv %lld must equal d_model "
                  "%lld",
                  (long long)value, (long long)n_heads, (long long)dv, (long long)d_model);
        st = sa_check_shape(d_model, n_heads, layer->n_kv_heads, layer->head_dim, value);
        SA_CHECK(st == SELFATTN_OK, st);
        layer->v_head_dim = (int32_t)value;
        break;
    }
    case SELFATTN_OPT_CAUSAL:
        layer->causal = (int32_t)value;
        break;
    case SELFATTN_OPT_OUT_PROJ:
        SA_CHECKF(value == 1 || (int64_t)sa_layer_dv(layer) * n_heads == d_model,
                  SELFATTN_ERR_INVALID,
                  "OUT_PROJ 0 needs n_heads %lld x dv %d (the value heads' width) == d_model %lld",
                  (long long)n_heads, sa_layer_dv(layer), (long long)d_model);
        layer->out_proj = (int32_t)value;
        break;
    case SELFATTN_OPT_THREADS:
        layer->threads_opt = (int32_t)value;
        break;
    case SELFATTN_OPT_WINDOW:
        layer->window = (int32_t)value;
        break;
    case SELFATTN_OPT_ROPE:
        SA_CHECKF(sa_rope_fits(value, layer->rope_dims, layer->head_dim), SELFATTN_ERR_INVALID,
                  "ROPE %lld: ROPE_DIMS %d does not fit head_dim %d", (long long)value,
                  layer->rope_dims, layer->head_dim);
        layer->rope = (int32_t)value;
        break;
    case SELFATTN_OPT_ROPE_DIMS:
        SA_CHECKF(sa_rope_fits(layer->rope, value, layer->head_dim), SELFATTN_ERR_INVALID,
                  "ROPE_DIMS %lld must be even and <= head_dim %d", (long long)value,
                  layer->head_dim);
        layer->rope_dims = (int32_t)value;
        break;
    case SELFATTN_OPT_ALIBI:
        layer->alibi = (int32_t)value;
        break;
    case SELFATTN_OPT_WEIGHT_DTYPE:
        layer->weight_dtype = (int32_t)value;
        break;
    case SELFATTN_OPT_KV_DTYPE:
        layer->kv_dtype = (int32_t)value;
        break;
    }
    if (opt != SELFATTN_OPT_THREADS)
        layer->version++;
    return SELFATTN_OK;
}

selfattn_status selfattn_layer_get(const selfattn_layer *layer, selfattn_option opt, int64_t *value)
{
    sa_err_begin("selfattn_layer_get");
    SA_CHECK(layer != NULL && value != NULL, SELFATTN_ERR_NULL);
    switch (opt) {
    case SELFATTN_OPT_N_KV_HEADS:
        *value = layer->n_kv_heads;
        return SELFATTN_OK;
    case SELFATTN_OPT_HEAD_DIM:
        *value = layer->head_dim;
        return SELFATTN_OK;
    case SELFATTN_OPT_CAUSAL:
        *value = layer->causal;
        return SELFATTN_OK;
    case SELFATTN_OPT_OUT_PROJ:
        *value = layer->out_proj;
        return SELFATTN_OK;
    case SELFATTN_OPT_THREADS:
        *value = sa_layer_threads(layer);
        return SELFATTN_OK;
    case SELFATTN_OPT_WINDOW:
        *value = layer->window;
        return SELFATTN_OK;
    case SELFATTN_OPT_ROPE:
        *value = layer->rope;
        return SELFATTN_OK;
    case SELFATTN_OPT_ROPE_DIMS:
        *value = layer->rope_dims != 0 ? layer->rope_dims : layer->head_dim;
        return SELFATTN_OK;
    case SELFATTN_OPT_ALIBI:
        *value = layer->alibi;
        return SELFATTN_OK;
    case SELFATTN_OPT_WEIGHT_DTYPE:
        *value = layer->weight_dtype;
        return SELFATTN_OK;
    case SELFATTN_OPT_KV_DTYPE:
        *value = layer->kv_dtype;
        return SELFATTN_OK;
    case SELFATTN_OPT_V_HEAD_DIM:
        *value = sa_layer_dv(layer);
        return SELFATTN_OK;
    }
    sa_fail(SELFATTN_ERR_INVALID, "%d is not an option", (int)opt);
    return SELFATTN_ERR_INVALID;
}

selfattn_status selfattn_layer_set_scale(selfattn_layer *layer, float scale)
{
    sa_err_begin("selfattn_layer_set_scale");
    SA_CHECK(layer != NULL, SELFATTN_ERR_NULL);
    SA_CHECK(isfinite(scale), SELFATTN_ERR_INVALID);
    layer->scale_opt = scale;
    layer->version++;
    return SELFATTN_OK;
}

/* A finite double that a float option can hold: within float range, and not a non-zero value
   that would narrow to 0 (which means "default" or "off"). */
static int sa_float_exact_enough(double value)
{
    return fabs(value) <= FLT_MAX && (value == 0.0 || (float)value != 0.0f);
}

selfattn_status selfattn_layer_set_float(selfattn_layer *layer, selfattn_float_option opt,
                                         double value)
{
    sa_err_begin("selfattn_layer_set_float");
    SA_CHECK(layer != NULL, SELFATTN_ERR_NULL);
    SA_CHECKF(isfinite(value), SELFATTN_ERR_INVALID, "float option %d: value %g is not finite",
              (int)opt, value);
    switch (opt) {
    case SELFATTN_FOPT_SCALE:
        SA_CHECKF(sa_float_exact_enough(value), SELFATTN_ERR_INVALID,
                  "SCALE %g does not fit a float (past FLT_MAX, or a non-zero value that "
                  "would round to 0, the default)",
                  value);
        layer->scale_opt = (float)value;
        layer->version++;
        return SELFATTN_OK;
    case SELFATTN_FOPT_ROPE_THETA:
        SA_CHECKF(value >= 0.0, SELFATTN_ERR_INVALID, "ROPE_THETA %g must be > 0 (0: default)",
                  value);
        layer->rope_theta = value;
        layer->version++;
        return SELFATTN_OK;
    case SELFATTN_FOPT_SOFTCAP:
        SA_CHECKF(value >= 0.0 && sa_float_exact_enough(value), SELFATTN_ERR_INVALID,
                  "SOFTCAP %g must be >= 0 and fit a float (a non-zero value that would round "
                  "to 0 would mean off)",
                  value);
        layer->softcap = (float)value;
        layer->version++;
        return SELFATTN_OK;
    }
    sa_fail(SELFATTN_ERR_INVALID, "%d is not an option", (int)opt);
    return SELFATTN_ERR_INVALID;
}

selfattn_status selfattn_layer_get_float(const selfattn_layer *layer, selfattn_float_option opt,
                                         double *value)
{
    sa_err_begin("selfattn_layer_get_float");
    SA_CHECK(layer != NULL && value != NULL, SELFATTN_ERR_NULL);
    switch (opt) {
    case SELFATTN_FOPT_SCALE:
        *value = sa_layer_scale(layer);
        return SELFATTN_OK;
    case SELFATTN_FOPT_ROPE_THETA:
        *value = layer->rope_theta != 0.0 ? layer->rope_theta : 10000.0;
        return SELFATTN_OK;
    case SELFATTN_FOPT_SOFTCAP:
        *value = layer->softcap;
        return SELFATTN_OK;
    }
    sa_fail(SELFATTN_ERR_INVALID, "%d is not an option", (int)opt);
    return SELFATTN_ERR_INVALID;
}

/* Element i of data given in dtype, as float (exact). */
static float sa_elem(selfattn_dtype dtype, const void *data, size_t i)
{
    if (dtype == SELFATTN_DTYPE_F32)
        return ((const float *)data)[i];
    const uint16_t h = ((const uint16_t *)data)[i];
    return dtype == SELFATTN_DTYPE_F16 ? sa_f16_to_f32(h) : sa_bf16_to_f32(h);
}

static uint16_t sa_round16(int32_t dtype, float f)
{
    return dtype == SELFATTN_DTYPE_F16 ? sa_f32_to_f16(f) : sa_f32_to_bf16(f);
}

/* Whether a finite value would round to infinity in dtype (a weight that cannot be stored). */
static int sa_overflows16(int32_t dtype, float f)
{
    if (!isfinite(f))
        return 0;
    const uint16_t h = sa_round16(dtype, f);
    const uint16_t exp_mask = dtype == SELFATTN_DTYPE_F16 ? 0x7C00u : 0x7F80u;
    return (h & exp_mask) == exp_mask;
}

static selfattn_status sa_set_weight(selfattn_layer *layer, selfattn_weight which,
                                     selfattn_dtype dtype, const void *data, int64_t count);

selfattn_status selfattn_layer_set_weight(selfattn_layer *layer, selfattn_weight which,
                                          const float *data, int64_t count)
{
    sa_err_begin("selfattn_layer_set_weight");
    return sa_set_weight(layer, which, SELFATTN_DTYPE_F32, data, count);
}

selfattn_status selfattn_layer_set_weight_typed(selfattn_layer *layer, selfattn_weight which,
                                                selfattn_dtype dtype, const void *data,
                                                int64_t count)
{
    sa_err_begin("selfattn_layer_set_weight_typed");
    return sa_set_weight(layer, which, dtype, data, count);
}

/* Where a weight or bias goes: rows [first, first + rows) of a buffer of buf_rows x width (the
   float32 one, or for a 16-bit weight the uint16 one), and the SA_HAVE_* bits it provides. */
typedef struct sa_weight_slot {
    float **buf;
    uint16_t **hbuf;
    size_t buf_rows, width, first, rows;
    int is_bias;
    unsigned have_bits;
} sa_weight_slot;

static selfattn_status sa_weight_slot_of(const selfattn_layer *layer, selfattn_weight which,
                                         sa_weight_slot *w)
{
    const size_t d_model = (size_t)layer->d_model;
    const sa_widths wd = sa_layer_widths(layer); /* fit: checked when the shape was set */
    const size_t nq = wd.nq, nkv = wd.nkv, nqkv = wd.nqkv;
    selfattn_layer *l = (selfattn_layer *)layer;
    const int is_bias = which == SELFATTN_B_Q || which == SELFATTN_B_K || which == SELFATTN_B_V ||
                        which == SELFATTN_B_QKV || which == SELFATTN_B_O;
    if (which == SELFATTN_W_O || which == SELFATTN_B_O) {
        SA_CHECKF(layer->out_proj, SELFATTN_ERR_INVALID,
                  "W_O/B_O with the output projection off (OUT_PROJ 0)");
        *w = (sa_weight_slot){.buf = is_bias ? &l->b_o : &l->w_o,
                              .hbuf = &l->h_o,
                              .buf_rows = d_model,
                              .width = is_bias ? 1 : wd.nq_v,
                              .first = 0,
                              .rows = d_model,
                              .is_bias = is_bias,
                              .have_bits = SA_HAVE_O};
    } else {
        const int slot = which == SELFATTN_W_Q || which == SELFATTN_B_Q   ? 0
                         : which == SELFATTN_W_K || which == SELFATTN_B_K ? 1
                         : which == SELFATTN_W_V || which == SELFATTN_B_V ? 2
                                                                          : 3; /* packed */
        if (slot == 3)
            SA_CHECKF(layer->n_kv_heads == layer->n_heads && nq == d_model &&
                          sa_layer_dv(layer) == layer->head_dim,
                      SELFATTN_ERR_INVALID,
                      "W_QKV/B_QKV need n_kv_heads == n_heads, n_heads x head_dim == d_model and "
                      "dv == head_dim (here %d, %d, %zu, %zu, dv %d): set W_Q, W_K, W_V apart",
                      layer->n_kv_heads, layer->n_heads, nq, d_model, sa_layer_dv(layer));
        static const unsigned bits[4] = {SA_HAVE_Q, SA_HAVE_K, SA_HAVE_V,
                                         SA_HAVE_Q | SA_HAVE_K | SA_HAVE_V};
        const size_t first[4] = {0, nq, nq + nkv, 0}, rows[4] = {nq, nkv, wd.nkv_v, nqkv};
        *w = (sa_weight_slot){.buf = is_bias ? &l->b_qkv : &l->w_qkv,
                              .hbuf = &l->h_qkv,
                              .buf_rows = nqkv,
                              .width = is_bias ? 1 : d_model,
                              .first = first[slot],
                              .rows = rows[slot],
                              .is_bias = is_bias,
                              .have_bits = bits[slot]};
    }
    if (is_bias)
        w->have_bits = 0; /* biases are optional: they do not count as weights present */
    return SELFATTN_OK;
}

/* Copies elems values given in dtype into the slot, stored in wdt (checked storable). */
static selfattn_status sa_weight_store(const sa_weight_slot *w, int32_t wdt, selfattn_dtype dtype,
                                       const void *data, size_t elems)
{
    const size_t total = w->buf_rows * w->width;
    if (wdt == SELFATTN_DTYPE_F32) {
        if (*w->buf == NULL) {
            /* Biases start zeroed (a bias never set is zero); weights are tracked by `have`. */
            float *fresh =
                w->is_bias ? sa_calloc(total, sizeof(float)) : sa_malloc(total * sizeof(float));
            SA_CHECKF(fresh != NULL, SELFATTN_ERR_NOMEM, "out of memory for %zu floats", total);
            *w->buf = fresh;
        }
        float *dst = *w->buf + w->first * w->width;
        if (dtype == SELFATTN_DTYPE_F32)
            memcpy(dst, data, elems * sizeof(float));
        else
            for (size_t i = 0; i < elems; i++)
                dst[i] = sa_elem(dtype, data, i);
        return SELFATTN_OK;
    }
    if (*w->hbuf == NULL) {
        uint16_t *fresh = sa_malloc(total * sizeof(uint16_t));
        SA_CHECKF(fresh != NULL, SELFATTN_ERR_NOMEM, "out of memory for %zu 16-bit values", total);
        *w->hbuf = fresh;
    }
    uint16_t *dst = *w->hbuf + w->first * w->width;
    if ((int32_t)dtype == wdt) /* already in the stored type: bit for bit */
        memcpy(dst, data, elems * sizeof(uint16_t));
    else
        for (size_t i = 0; i < elems; i++)
            dst[i] = sa_round16(wdt, sa_elem(dtype, data, i));
    return SELFATTN_OK;
}

static selfattn_status sa_set_weight(selfattn_layer *layer, selfattn_weight which,
                                     selfattn_dtype dtype, const void *data, int64_t count)
{
    SA_CHECK_NULL(layer);
    SA_CHECK_NULL(data);
    SA_CHECKF(which >= SELFATTN_W_Q && which <= SELFATTN_B_QKV, SELFATTN_ERR_INVALID,
              "%d is not a weight (selfattn_weight)", (int)which);
    SA_CHECKF(dtype >= SELFATTN_DTYPE_F32 && dtype <= SELFATTN_DTYPE_BF16, SELFATTN_ERR_INVALID,
              "%d is not a dtype (selfattn_dtype)", (int)dtype);
    selfattn_status st = sa_check_head_dim(layer);
    SA_CHECK(st == SELFATTN_OK, st);
    sa_weight_slot w = {0};
    st = sa_weight_slot_of(layer, which, &w);
    SA_CHECK(st == SELFATTN_OK, st);
    size_t elems;
    SA_CHECK(sa_mul_size(w.rows, w.width, &elems), SELFATTN_ERR_OVERFLOW);
    SA_CHECKF(count >= 0 && (uint64_t)count == (uint64_t)elems, SELFATTN_ERR_INVALID,
              "weight %d: count %lld, but this layer's shape needs %zu x %zu = %zu elements",
              (int)which, (long long)count, w.rows, w.width, elems);
    const int32_t wdt = w.is_bias ? SELFATTN_DTYPE_F32 : layer->weight_dtype;
    if (wdt != SELFATTN_DTYPE_F32 && (int32_t)dtype != wdt) /* every value must be storable */
        for (size_t i = 0; i < elems; i++)
            SA_CHECKF(!sa_overflows16(wdt, sa_elem(dtype, data, i)), SELFATTN_ERR_INVALID,
                      "weight %d: element %zu = %g rounds to infinity in %s (WEIGHT_DTYPE)",
                      (int)which, i, (double)sa_elem(dtype, data, i),
                      wdt == SELFATTN_DTYPE_F16 ? "f16" : "bf16");
    st = sa_weight_store(&w, wdt, dtype, data, elems);
    SA_CHECK(st == SELFATTN_OK, st);
    layer->have |= w.have_bits;
    layer->weights_set = 1;
    layer->version++;
    return SELFATTN_OK;
}
