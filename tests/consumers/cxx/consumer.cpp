// Built against the installed library through find_package(selfattn 1), as C++11. Causal
// attention with W_Q = W_K = 0 averages the value rows 0..i; with W_V = W_O = identity that is
// the running mean of the input rows, computed here independently.
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include <selfattn/selfattn.h>

namespace {
struct layer_deleter {
    void operator()(selfattn_layer *l) const { selfattn_layer_destroy(l); }
};
} // namespace

int main()
{
    const int d = 12, heads = 3, len = 9;
    std::vector<float> zero(d * d, 0.0f), eye(d * d, 0.0f), x(len * d), y(len * d);
    for (int i = 0; i < d; i++)
        eye[i * d + i] = 1.0f;
    for (int i = 0; i < len * d; i++)
        x[i] = static_cast<float>((i * 5) % 13) - 6.0f;
    selfattn_layer *raw = nullptr;
    if (selfattn_layer_create(d, heads, &raw) != SELFATTN_OK)
        return 1;
    std::unique_ptr<selfattn_layer, layer_deleter> layer(raw);
    if (selfattn_layer_set(raw, SELFATTN_OPT_CAUSAL, 1) != SELFATTN_OK ||
        selfattn_layer_set(raw, SELFATTN_OPT_N_KV_HEADS, 1) != SELFATTN_OK)
        return 1;
    const int nkv = d / heads;
    std::vector<float> eye_kv(eye.begin(), eye.begin() + nkv * d), zero_kv(nkv * d, 0.0f);
    if (selfattn_layer_set_weight(raw, SELFATTN_W_Q, zero.data(), d * d) != SELFATTN_OK ||
        selfattn_layer_set_weight(raw, SELFATTN_W_K, zero_kv.data(), nkv * d) != SELFATTN_OK ||
        selfattn_layer_set_weight(raw, SELFATTN_W_V, eye_kv.data(), nkv * d) != SELFATTN_OK)
        return 1;
    // W_O maps each head's copy of the single kv head's 4 columns back to those columns / heads
    std::vector<float> wo(d * d, 0.0f);
    for (int o = 0; o < nkv; o++)
        for (int h = 0; h < heads; h++)
            wo[o * d + h * nkv + o] = 1.0f / heads;
    if (selfattn_layer_set_weight(raw, SELFATTN_W_O, wo.data(), d * d) != SELFATTN_OK)
        return 1;
    if (selfattn_forward(raw, 1, len, x.data(), nullptr, y.data()) != SELFATTN_OK)
        return 1;
    double worst = 0.0;
    for (int i = 0; i < len; i++)
        for (int c = 0; c < d; c++) {
            double want = 0.0;
            if (c < nkv) {
                for (int j = 0; j <= i; j++)
                    want += x[j * d + c];
                want /= (i + 1);
            }
            worst = std::fmax(worst, std::fabs(y[i * d + c] - want));
        }
    std::printf("C++11 consumer (library %s): max err %.2e\n", selfattn_version_string(), worst);
    return worst <= 1e-5 ? 0 : 1;
}
