/* selfattn_backward and selfattn_attend_backward (in progress). */
#include "internal.h"
