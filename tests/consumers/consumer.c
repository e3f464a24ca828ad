/* Built against the installed library through pkg-config. With W_Q = W_K = 0 every score is 0,
 * so attention is a plain average of the visible value rows; with W_V = W_O = identity that is
 * the average of the visible input rows, which this program computes itself. */
#include <math.h>
#include <stdio.h>

#include <selfattn/selfattn.h>

#define D 8
#define L 6

int main(void)
{
    float zero[D * D] = {0}, eye[D * D] = {0}, x[L * D], y[L * D];
    for (int i = 0; i < D; i++)
        eye[i * D + i] = 1.0f;
    for (int i = 0; i < L * D; i++)
        x[i] = (float)((i * 7) % 11) - 5.0f;
    if (selfattn_version_number() / 10000 != SELFATTN_VERSION_MAJOR)
        return 1;
    selfattn_layer *l = NULL;
    if (selfattn_layer_create(D, 2, &l) != SELFATTN_OK ||
        selfattn_layer_set_weight(l, SELFATTN_W_Q, zero, D * D) != SELFATTN_OK ||
        selfattn_layer_set_weight(l, SELFATTN_W_K, zero, D * D) != SELFATTN_OK ||
        selfattn_layer_set_weight(l, SELFATTN_W_V, eye, D * D) != SELFATTN_OK ||
        selfattn_layer_set_weight(l, SELFATTN_W_O, eye, D * D) != SELFATTN_OK)
        return 1;
    const int32_t len = 4; /* keys 4 and 5 masked, rows 4 and 5 zero */
    if (selfattn_forward(l, 1, L, x, &len, y) != SELFATTN_OK)
        return 1;
    selfattn_layer_destroy(l);
    double worst = 0.0;
    for (int i = 0; i < L; i++)
        for (int c = 0; c < D; c++) {
            double want = 0.0;
            if (i < len) {
                for (int j = 0; j < len; j++)
                    want += x[j * D + c];
                want /= len;
            }
            worst = fmax(worst, fabs(y[i * D + c] - want));
        }
    printf("C consumer (library %s, kernel %s): max err %.2e\n", selfattn_version_string(),
           selfattn_kernel_name(), worst);
    return worst <= 1e-5 ? 0 : 1;
}
