"""Loading libselfattn.so.1 and declaring its C functions for ctypes.

Lookup order (the first that loads wins):
  1. the environment variable SELFATTN_LIBRARY: a path to the library (nothing else is tried
     when it is set, so a wrong path is an error rather than a silent fallback);
  2. the install prefix this package belongs to: `cmake --install` writes _install.py beside
     this file with the library directory relative to the package; without it, the usual
     <prefix>/lib[/<multiarch>] and <prefix>/lib64 above <prefix>/lib/python3*/*-packages/selfattn;
  3. the system loader: "libselfattn.so.1" (LD_LIBRARY_PATH, ld.so.cache, default directories),
     then ctypes.util.find_library("selfattn").
ctypes.CDLL releases the GIL for the duration of every call into the library.
The library found must be libselfattn 1.3 or newer (REQUIRED_VERSION_NUMBER), else ImportError.
"""
import ctypes
import ctypes.util
import os
import sysconfig

SONAME = "libselfattn.so.1"

c_int32, c_int64, c_uint32, c_float, c_double = (
    ctypes.c_int32, ctypes.c_int64, ctypes.c_uint32, ctypes.c_float, ctypes.c_double)
c_void_p, c_char_p, c_int = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
c_size_t = ctypes.c_size_t


def _prefix_candidates():
    here = os.path.dirname(os.path.abspath(__file__))
    out = []
    try:
        from . import _install  # written by cmake --install
        libdir = _install.LIBDIR
        if not os.path.isabs(libdir):
            libdir = os.path.normpath(os.path.join(here, libdir))
        out.append(os.path.join(libdir, SONAME))
    except ImportError:
        pass
    # <prefix>/lib/python3/dist-packages/selfattn or <prefix>/lib/python3.X/{dist,site}-packages/selfattn
    parts = here.split(os.sep)
    if len(parts) >= 4 and parts[-2].endswith("-packages") and parts[-3].startswith("python3"):
        libroot = os.sep.join(parts[:-3])          # <prefix>/lib (or <prefix>/lib/<multiarch>)
        prefix = os.path.dirname(libroot)
        multiarch = sysconfig.get_config_var("MULTIARCH") or ""
        for d in (libroot, os.path.join(prefix, "lib", multiarch) if multiarch else None,
                  os.path.join(prefix, "lib"), os.path.join(prefix, "lib64")):
            if d:
                p = os.path.join(d, SONAME)
                if p not in out:
                    out.append(p)
    return out


def _load():
    env = os.environ.get("SELFATTN_LIBRARY")
    if env:
        try:
            return ctypes.CDLL(env), env
        except OSError as e:
            raise ImportError("selfattn: SELFATTN_LIBRARY=%r cannot be loaded: %s" % (env, e)) from e
    tried = []
    for path in _prefix_candidates():
        if os.path.exists(path):
            try:
                return ctypes.CDLL(path), path
            except OSError as e:
                tried.append("%s (%s)" % (path, e))
        else:
            tried.append(path + " (absent)")
    names = [SONAME]
    found = ctypes.util.find_library("selfattn")
    if found and found not in names:
        names.append(found)
    for name in names:
        try:
            return ctypes.CDLL(name), name
        except OSError as e:
            tried.append("%s (%s)" % (name, e))
    raise ImportError(
        "selfattn: cannot find %s, the C library this package calls (pip installs the Python "
        "package only). Set the environment variable SELFATTN_LIBRARY to the library's path, e.g. "
        "export SELFATTN_LIBRARY=/path/to/libselfattn/build/%s (built with cmake), or install "
        "the library where the system loader finds it (cmake --install build; or add its "
        "directory to LD_LIBRARY_PATH). Tried: %s" % (SONAME, SONAME, "; ".join(tried)))


# The version this binding is written for (selfattn.h: SELFATTN_VERSION_MAJOR/MINOR/PATCH). The
# binding ships with its library: an older one is refused at import, so every function of the
# table below exists and nothing is probed later.
REQUIRED_VERSION_NUMBER = 10300                 # 1.3.0 = major*10000 + minor*100 + patch


def _version_text(number):
    return "%d.%d.%d" % (number // 10000, number // 100 % 100, number % 100)


def check_version(number, where):
    """Raise ImportError unless `number` (selfattn_version_number() of the library loaded from
    `where`) is at least REQUIRED_VERSION_NUMBER."""
    if number < REQUIRED_VERSION_NUMBER:
        raise ImportError(
            "selfattn: the library %s is libselfattn %s (%d); this binding needs libselfattn %s "
            "(%d) or newer. Set SELFATTN_LIBRARY to the path of a libselfattn.so.1 of version %s "
            "or newer (e.g. SELFATTN_LIBRARY=/path/to/build/libselfattn.so.1)"
            % (where, _version_text(number), number, _version_text(REQUIRED_VERSION_NUMBER),
               REQUIRED_VERSION_NUMBER, _version_text(REQUIRED_VERSION_NUMBER)))


def _loaded_version(lib):
    f = lib.selfattn_version_number  # AttributeError here means this is not libselfattn 1.x
    f.restype, f.argtypes = c_uint32, []
    return int(f())


lib, path = _load()
check_version(_loaded_version(lib), path)

# ---- Declarations of every function (include/selfattn/selfattn.h) ----------------------------
_P = c_void_p
_DECLS = {
    "selfattn_version_number": (c_uint32, []),
    "selfattn_version_string": (c_char_p, []),
    "selfattn_status_string": (c_char_p, [c_int]),
    "selfattn_kernel_name": (c_char_p, []),
    "selfattn_last_error": (c_char_p, []),
    "selfattn_layer_create": (c_int, [c_int32, c_int32, ctypes.POINTER(c_void_p)]),
    "selfattn_layer_destroy": (None, [_P]),
    "selfattn_layer_set": (c_int, [_P, c_int, c_int64]),
    "selfattn_layer_get": (c_int, [_P, c_int, ctypes.POINTER(c_int64)]),
    "selfattn_layer_set_scale": (c_int, [_P, c_float]),
    "selfattn_layer_set_weight": (c_int, [_P, c_int, _P, c_int64]),
    "selfattn_option_bounds": (c_int, [c_int, ctypes.POINTER(c_int64), ctypes.POINTER(c_int64)]),
    "selfattn_forward": (c_int, [_P, c_int32, c_int32, _P, _P, _P]),
    "selfattn_attend": (c_int, [_P, c_int32, c_int32, c_int32, _P, _P, _P, _P, _P]),
    # 1.1 additions (selfattn.h)
    "selfattn_layer_set_float": (c_int, [_P, c_int, c_double]),
    "selfattn_layer_get_float": (c_int, [_P, c_int, ctypes.POINTER(c_double)]),
    "selfattn_forward_ex": (c_int, [_P, c_int32, c_int32, _P, _P, _P, _P]),
    "selfattn_attend_ex": (c_int, [_P, c_int32, c_int32, c_int32, _P, _P, _P, _P, _P, _P]),
    "selfattn_cache_create": (c_int, [_P, c_int32, c_int32, ctypes.POINTER(c_void_p)]),
    "selfattn_cache_destroy": (None, [_P]),
    "selfattn_cache_length": (c_int, [_P, c_int32, ctypes.POINTER(c_int32)]),
    "selfattn_cache_truncate": (c_int, [_P, c_int32, c_int32]),
    "selfattn_cache_copy": (c_int, [_P, c_int32, c_int32]),
    "selfattn_forward_cached": (c_int, [_P, _P, c_int32, _P, _P, _P]),
    "selfattn_backward": (c_int, [_P, c_int32, c_int32, _P, _P, _P, _P, _P]),
    "selfattn_attend_backward": (c_int, [_P, c_int32, c_int32, c_int32, _P, _P, _P, _P, _P,
                                         _P, _P, _P]),
    # 1.2 (selfattn.h, "Training with kept activations")
    "selfattn_train_state_size": (c_int, [_P, c_int32, c_int32, ctypes.POINTER(c_size_t)]),
    "selfattn_forward_train": (c_int, [_P, c_int32, c_int32, _P, _P, _P, _P, c_size_t]),
    "selfattn_backward_train": (c_int, [_P, c_int32, c_int32, _P, _P, _P, _P, _P, _P, c_size_t]),
    # 1.3 (selfattn.h, half-precision storage: SELFATTN_OPT_WEIGHT_DTYPE, SELFATTN_OPT_KV_DTYPE)
    "selfattn_layer_set_weight_typed": (c_int, [_P, c_int, c_int, _P, c_int64]),
}

for _name, (_res, _args) in _DECLS.items():
    _f = getattr(lib, _name)
    _f.restype, _f.argtypes = _res, _args

# 1.3, the BLAS in use (selfattn.h, "The BLAS in use"): declared when the library has them (a 1.3.0
# library built before them lacks them; selfattn.blas_info() says so then)
_BLAS_DECLS = {
    "selfattn_blas_info": (c_char_p, []),
    "selfattn_blas_mismatch": (c_int, []),
    "selfattn_blas_advice": (c_char_p, []),
}
for _name, (_res, _args) in _BLAS_DECLS.items():
    if hasattr(lib, _name):
        _f = getattr(lib, _name)
        _f.restype, _f.argtypes = _res, _args


# ---- Enums (values fixed forever by the API contract) -----------------------------------------
OK, ERR_NULL, ERR_INVALID, ERR_NOMEM, ERR_OVERFLOW, ERR_STATE, ERR_UNSUPPORTED = range(7)

OPT_N_KV_HEADS, OPT_HEAD_DIM, OPT_CAUSAL, OPT_OUT_PROJ, OPT_THREADS = 1, 2, 3, 4, 5
OPT_WINDOW, OPT_ROPE, OPT_ROPE_DIMS, OPT_ALIBI = 6, 7, 8, 9          # 1.1
OPT_WEIGHT_DTYPE, OPT_KV_DTYPE = 10, 11                              # 1.3
OPT_V_HEAD_DIM = 12                                                  # 1.3
DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2                           # 1.3: selfattn_dtype
FOPT_SCALE, FOPT_ROPE_THETA, FOPT_SOFTCAP = 1, 2, 3                  # 1.1

W_Q, W_K, W_V, W_O, B_Q, B_K, B_V, B_O, W_QKV, B_QKV = range(1, 11)


class Extras(ctypes.Structure):
    """struct selfattn_extras (API 1.1; scores and scores_stage 1.3)."""
    _fields_ = [("struct_size", c_uint32),
                ("attn_bias", c_void_p),
                ("bias_stride_batch", c_int64),
                ("bias_stride_head", c_int64),
                ("bias_stride_row", c_int64),
                ("weights", c_void_p),
                ("lse", c_void_p),
                ("scores", c_void_p),
                ("scores_stage", ctypes.c_int32)]


class Grads(ctypes.Structure):
    """struct selfattn_grads (API 1.1)."""
    _fields_ = [("struct_size", c_uint32),
                ("w_q", c_void_p), ("w_k", c_void_p), ("w_v", c_void_p), ("w_o", c_void_p),
                ("b_q", c_void_p), ("b_k", c_void_p), ("b_v", c_void_p), ("b_o", c_void_p)]
