/* The key/value cache and selfattn_forward_cached (in progress). */
#include "internal.h"
