/* The smallest complete use of libselfattn (also shown in the README). */
#include <stdio.h>
#include <stdlib.h>

#include <selfattn/selfattn.h>

int main(void)
{
    enum { D = 64, H = 4, L = 10 };
    static float wq[D * D], wk[D * D], wv[D * D], wo[D * D], x[L * D], y[L * D];
    for (int i = 0; i < D * D; i++) { /* any weights; PyTorch layout [out][in] */
        wq[i] = (float)((i * 37) % 101 - 50) / 400.0f;
        wk[i] = (float)((i * 53) % 103 - 51) / 400.0f;
        wv[i] = (float)((i * 71) % 107 - 53) / 400.0f;
        wo[i] = (float)((i * 89) % 109 - 54) / 400.0f;
    }
    for (int i = 0; i < L * D; i++)
        x[i] = (float)((i * 13) % 17 - 8) / 8.0f;

    selfattn_layer *layer = NULL;
    selfattn_status st = selfattn_layer_create(D, H, &layer);
    if (st == SELFATTN_OK)
        st = selfattn_layer_set(layer, SELFATTN_OPT_CAUSAL, 1);
    if (st == SELFATTN_OK)
        st = selfattn_layer_set_weight(layer, SELFATTN_W_Q, wq, D * D);
    if (st == SELFATTN_OK)
        st = selfattn_layer_set_weight(layer, SELFATTN_W_K, wk, D * D);
    if (st == SELFATTN_OK)
        st = selfattn_layer_set_weight(layer, SELFATTN_W_V, wv, D * D);
    if (st == SELFATTN_OK)
        st = selfattn_layer_set_weight(layer, SELFATTN_W_O, wo, D * D);
    if (st == SELFATTN_OK)
        st = selfattn_forward(layer, 1, L, x, NULL, y);
    if (st != SELFATTN_OK) {
        fprintf(stderr, "selfattn: %s (%s)\n", selfattn_status_string(st), selfattn_last_error());
        selfattn_layer_destroy(layer);
        return 1;
    }
    printf("y[%d][0..2] = %f %f %f\n", L - 1, y[(L - 1) * D], y[(L - 1) * D + 1],
           y[(L - 1) * D + 2]);
    selfattn_layer_destroy(layer);
    return 0;
}
