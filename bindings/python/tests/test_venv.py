"""`pip install` of the binding into a fresh virtual environment, offline, as the README says:
the installed package has no library beside it, so `import selfattn` must fail with an
ImportError telling to set SELFATTN_LIBRARY, and work once it is set.

Skipped when this Python cannot make a venv with pip (Debian: python3-venv, python3-pip) or has
no setuptools to build with (python3-setuptools). Nothing is downloaded: pip runs with --no-index,
--no-deps and --no-build-isolation (NumPy comes from the system site-packages)."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import selfattn

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.dirname(HERE)                       # bindings/python


def _run(args, env=None, cwd=None, timeout=300):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _clean_env():
    """The environment without anything that points at the library or the source tree."""
    env = dict(os.environ)
    for k in ("SELFATTN_LIBRARY", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME",
              "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        env.pop(k, None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env["PIP_NO_CACHE_DIR"] = "1"                          # nothing written under $HOME
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(python of a venv with the binding pip-installed, working directory outside the tree)."""
    root = tmp_path_factory.mktemp("venv")
    env = _clean_env()
    r = _run([sys.executable, "-m", "venv", "--system-site-packages", str(root / "venv")],
             env=env)
    py, pip = root / "venv" / "bin" / "python", root / "venv" / "bin" / "pip"
    if r.returncode != 0 or not pip.exists():
        pytest.skip("%s -m venv cannot make a virtual environment with pip (Debian: apt-get "
                    "install python3-venv python3-pip): %s"
                    % (sys.executable, (r.stderr or r.stdout).strip()[-300:]))
    r = _run([str(py), "-c", "import setuptools, numpy"], env=env)
    if r.returncode != 0:
        pytest.skip("the venv sees no setuptools or NumPy to build and run the binding offline "
                    "(Debian: python3-setuptools, python3-numpy): " + r.stderr.strip()[-300:])
    # a copy of the package: an in-tree build would leave build/ and *.egg-info in the source
    src = root / "src"
    src.mkdir()
    shutil.copytree(os.path.join(PACKAGE_DIR, "selfattn"), src / "selfattn",
                    ignore=shutil.ignore_patterns("__pycache__", "_install.py"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(PACKAGE_DIR, f), src / f)
    r = _run([str(pip), "install", "--no-index", "--no-deps", "--no-build-isolation", str(src)],
             env=env, cwd=str(root))
    assert r.returncode == 0, "pip install failed:\n" + r.stdout + r.stderr
    return py, root


def test_pip_installed_package_without_library_says_set_selfattn_library(venv):
    py, cwd = venv
    env = _clean_env()
    probe = _run([str(py), "-c", "import ctypes, ctypes.util; ctypes.CDLL('libselfattn.so.1')"],
                 env=env, cwd=str(cwd))
    if probe.returncode == 0:
        pytest.skip("libselfattn.so.1 is installed where the system loader finds it, so the "
                    "import cannot fail for want of the library here")
    code = textwrap.dedent("""
        try:
            import selfattn
            print("NO ERROR", selfattn.library_path)
        except ImportError as e:
            print("ImportError")
            print(e)
    """)
    r = _run([str(py), "-c", code], env=env, cwd=str(cwd))
    assert r.returncode == 0, r.stderr
    kind, msg = r.stdout.split("\n", 1)
    assert kind == "ImportError", r.stdout
    assert "cannot find libselfattn.so.1" in msg, msg
    assert "Set the environment variable SELFATTN_LIBRARY to the library's path" in msg, msg
    assert "export SELFATTN_LIBRARY=" in msg, msg


def test_pip_installed_package_with_selfattn_library_runs(venv):
    py, cwd = venv
    lib = selfattn.library_path                           # a path, or a name for the loader
    lib = os.path.abspath(lib) if os.sep in lib else lib
    env = dict(_clean_env(), SELFATTN_LIBRARY=lib)
    code = textwrap.dedent("""
        import numpy as np, selfattn
        layer = selfattn.Layer(8, 2, causal=True)
        w = np.eye(8, dtype=np.float32)
        layer.set_weights(w_q=w, w_k=w, w_v=w, w_o=w)
        x = np.arange(24, dtype=np.float32).reshape(1, 3, 8) / 24
        y = layer(x)
        print(selfattn.__file__)
        print(selfattn.library_path)
        print(y.shape, bool(np.allclose(y[0, 0], x[0, 0])))
    """)
    r = _run([str(py), "-c", code], env=env, cwd=str(cwd))
    assert r.returncode == 0, r.stdout + r.stderr
    where, loaded, result = r.stdout.strip().split("\n")
    assert where.startswith(str(cwd / "venv")), where      # the installed copy, not the tree
    assert loaded == lib
    assert result == "(1, 3, 8) True", r.stdout             # the first row sees only itself
