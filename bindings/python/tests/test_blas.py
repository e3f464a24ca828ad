"""The BLAS in use (selfattn.h, "The BLAS in use" and "The BLAS's threads") through the binding:
blas_info(), blas_mismatch() and blas_advice(), under other OPENBLAS_CORETYPE values in fresh
interpreters (OpenBLAS reads it when it loads), and OpenBLAS's thread count left as the program
set it by the binding's calls."""
import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

import selfattn
from selfattn import _lib
import reference as ref
from conftest import TOL, make_layer

pytestmark = pytest.mark.skipif(not selfattn.has("selfattn_blas_info"),
                                reason="the loaded libselfattn has no selfattn_blas_info")


def openblas():
    """OpenBLAS's (get, set) thread-count functions as the library links them, or None."""
    try:
        get, set_ = _lib.lib.openblas_get_num_threads, _lib.lib.openblas_set_num_threads
    except AttributeError:
        return None
    get.restype, get.argtypes = ctypes.c_int, []
    set_.restype, set_.argtypes = None, [ctypes.c_int]
    return get, set_


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_info_text():
    info = selfattn.blas_info()
    assert isinstance(info, str) and info
    assert selfattn.blas_mismatch() in (True, False)
    assert (selfattn.blas_advice() != "") == selfattn.blas_mismatch()
    if openblas() is not None:
        assert info.startswith("OpenBLAS ") and ", core " in info


def report_under(coretype):
    env = dict(os.environ, OPENBLAS_CORETYPE=coretype)
    code = ("import selfattn; print(selfattn.blas_info()); print(int(selfattn.blas_mismatch())); "
            "print(selfattn.blas_advice())")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                         text=True).stdout.split("\n")
    return out[0], out[1] == "1", out[2]


@pytest.mark.skipif(openblas() is None or "avx2" not in cpu_flags(),
                    reason="needs OpenBLAS and a CPU with AVX2")
def test_prescott_is_a_mismatch():
    info, mismatch, advice = report_under("Prescott")
    assert "core Prescott" in info
    assert mismatch
    assert "OPENBLAS_CORETYPE=" in advice and "already sets OPENBLAS_CORETYPE=Prescott" in advice
    core = "SkylakeX" if "avx512f" in cpu_flags() else "Haswell"
    info, mismatch, advice = report_under(core)
    assert "core " + core in info
    assert not mismatch and advice == ""


@pytest.mark.skipif(openblas() is None, reason="the BLAS is not OpenBLAS")
@pytest.mark.parametrize("threads", [2, 1])
def test_thread_count_unchanged(rng, threads):
    get, set_ = openblas()
    before = get()
    set_(threads)
    try:
        if get() != threads:
            pytest.skip("OpenBLAS cannot run %d threads here" % threads)
        layer, W = make_layer(rng, 64, 4, threads=2)
        x = rng.uniform(-1, 1, (2, 96, 64)).astype(np.float32)
        y = layer(x)
        assert get() == threads
        want, _, _ = ref.forward(x, W, 4)
        assert ref.max_err(y, want) <= TOL
    finally:
        set_(before)
