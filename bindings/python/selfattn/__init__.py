"""selfattn: Python binding of libselfattn (transformer self-attention on the CPU).

ctypes over libselfattn.so.1 and NumPy; no compiled extension. See README.md beside this package.

    import numpy as np, selfattn
    layer = selfattn.Layer(64, 4, causal=True)
    layer.set_weights(w_q=wq, w_k=wk, w_v=wv, w_o=wo)     # [out][in], as torch.nn.Linear
    y = layer(x)                                          # x: [batch][seq][64] float32

The library is found through SELFATTN_LIBRARY (a path), then the install prefix of this
package, then the system loader (see selfattn._lib); it must be libselfattn 1.3 or newer, else
the import raises ImportError. Layer.forward_train(x) returns (y, TrainState), and
Layer.backward_train(x, dy, state) the gradients of Layer.backward without recomputing the forward.
"""
from . import _lib
from ._errors import (Error, NullError, InvalidError, NoMemoryError, SizeOverflowError,
                      StateError, UnsupportedError, status_string)
from ._layer import (Layer, Cache, TrainState, from_torch, option_bounds, ROPE_NONE, ROPE_HALF,
                     ROPE_ADJACENT)

__version__ = "1.3.0"

#: path or name the library was loaded from
library_path = _lib.path


def version():
    """Version string of the loaded library, e.g. "1.0.0"."""
    return _lib.lib.selfattn_version_string().decode()


def version_number():
    """Version of the loaded library as major*10000 + minor*100 + patch."""
    return int(_lib.lib.selfattn_version_number())


def kernel_name():
    """The softmax kernel this process uses, e.g. "f32-softmax-avx512-u64"."""
    return _lib.lib.selfattn_kernel_name().decode()


def _blas(name):
    if not hasattr(_lib.lib, name):
        raise UnsupportedError("%s is not exported by the loaded libselfattn %s (%s)"
                               % (name, version(), library_path))
    return getattr(_lib.lib, name)()


def blas_info():
    """The BLAS the library runs on, e.g. "OpenBLAS 0.3.21 pthread, core Haswell" (its version,
    threading and the core it chose, for OpenBLAS). The library never changes the BLAS's thread
    count; a call runs on one worker while OpenBLAS runs several threads. For full speed make
    the BLAS single-threaded, e.g. threadpoolctl.threadpool_limits(1, user_api="blas") around the
    calls, or OPENBLAS_NUM_THREADS=1 in the environment (selfattn.h, "The BLAS's threads")."""
    return _blas("selfattn_blas_info").decode()


def blas_mismatch():
    """True when OpenBLAS runs kernels below the CPU's instruction set (e.g. its SSE3 Prescott
    core on an AVX-512 CPU, several times slower); blas_advice() names the fix."""
    return bool(_blas("selfattn_blas_mismatch"))


def blas_advice():
    """The fix when blas_mismatch() (which OPENBLAS_CORETYPE to set before the process starts),
    else ""."""
    return _blas("selfattn_blas_advice").decode()


def has(symbol):
    """True when the loaded library exports the C function `symbol`
    (e.g. has("selfattn_forward_ex"))."""
    return hasattr(_lib.lib, symbol)


__all__ = ["Layer", "Cache", "TrainState", "from_torch", "Error", "NullError", "InvalidError",
           "NoMemoryError", "SizeOverflowError", "StateError", "UnsupportedError",
           "status_string", "option_bounds", "version", "version_number", "kernel_name", "has",
           "blas_info", "blas_mismatch", "blas_advice",
           "library_path", "ROPE_NONE", "ROPE_HALF", "ROPE_ADJACENT"]
