/* Compiled by the header_c99 and header_cxx11 tests: the public header must stand alone. */
#include <selfattn/selfattn.h>

int main(void)
{
    selfattn_layer *layer = 0;
    selfattn_status st = selfattn_layer_create(64, 4, &layer);
    selfattn_layer_destroy(layer);
    return st == SELFATTN_OK && SELFATTN_VERSION_NUMBER == 10000 ? 0 : 1;
}
