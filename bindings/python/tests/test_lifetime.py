"""Handles are released by garbage collection; a layer can be shared by Python threads."""
import gc
import resource
import threading
import time

import numpy as np

import selfattn
from conftest import make_layer


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def cycle(w, x):
    layer = selfattn.Layer(32, 4, causal=True)   # dropped by refcount at return: __del__ destroys
    layer.set_weights(**w)
    return layer(x)


def test_create_forward_destroy_cycles_hold_memory_flat(rng):
    """10,000 create/set weights/forward/destroy cycles: resident memory after them is within
    4 MiB of what it was after a 1,000-cycle warm-up (a leaked layer here is >= 16 KiB of
    weights, so a leak of every cycle would be >= 160 MiB)."""
    w = {n: rng.standard_normal((32, 32)).astype(np.float32) * 0.2 for n in ("w_q", "w_k", "w_v", "w_o")}
    w["b_q"] = rng.standard_normal(32).astype(np.float32)
    x = rng.standard_normal((2, 8, 32)).astype(np.float32)
    y0 = cycle(w, x)
    for _ in range(1000):
        cycle(w, x)
    gc.collect()
    before = rss_bytes()
    t0 = time.monotonic()
    for _ in range(10000):
        y = cycle(w, x)
    gc.collect()
    growth = rss_bytes() - before
    elapsed = time.monotonic() - t0
    np.testing.assert_array_equal(y, y0)
    assert growth <= 4 << 20, "resident memory grew by %.1f MiB over 10,000 cycles" % (growth / 2 ** 20)
    assert elapsed < 20, "10,000 cycles took %.1f s" % elapsed


def test_cycles_with_errors_do_not_leak(rng):
    """Failing constructors (handle created, then an option refused) release the handle."""
    for _ in range(200):
        try:
            selfattn.Layer(32, 4, n_kv_heads=3)
        except selfattn.InvalidError:
            pass
    gc.collect()
    before = rss_bytes()
    for _ in range(5000):
        try:
            selfattn.Layer(64, 4, n_kv_heads=3)
        except selfattn.InvalidError:
            pass
    gc.collect()
    assert rss_bytes() - before <= 2 << 20


def test_two_threads_share_a_layer(rng):
    """Two Python threads calling one layer at once give the bits of sequential calls (the C
    call releases the GIL, so the calls really overlap)."""
    layer, _ = make_layer(rng, 128, 8, causal=True, n_kv_heads=2)
    xs = [rng.standard_normal((2, 96, 128)).astype(np.float32) for _ in range(8)]
    lengths = [[96, 50], [1, 96]]
    expected = [[layer(x, lengths[t]) for x in xs] for t in range(2)]
    results = [[None] * len(xs) for _ in range(2)]
    errors = []
    barrier = threading.Barrier(2)

    def work(t):
        try:
            barrier.wait()
            for rep in range(5):
                for i, x in enumerate(xs):
                    y = layer(x, lengths[t])
                    if rep == 0:
                        results[t][i] = y
                    elif not np.array_equal(y, results[t][i]):
                        errors.append("thread %d: repetition %d differs" % (t, rep))
        except Exception as e:  # pragma: no cover (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t in range(2):
        for i in range(len(xs)):
            np.testing.assert_array_equal(results[t][i], expected[t][i])


def test_gil_is_released_during_the_call(rng):
    """While one thread is inside a long forward call, another thread keeps running Python
    code: its longest pause is much shorter than the call."""
    layer, _ = make_layer(rng, 256, 4, threads=1)
    x = rng.standard_normal((1, 3072, 256)).astype(np.float32)
    layer(x[:, :64])
    done = threading.Event()
    gap = [0.0]

    def spin():
        last = time.monotonic()
        while not done.is_set():
            now = time.monotonic()
            gap[0] = max(gap[0], now - last)
            last = now

    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.02)
        t0 = time.monotonic()
        layer(x)
        call = time.monotonic() - t0
    finally:
        done.set()
        t.join()
    assert call > 0.05, "the call (%.3f s) is too short to tell" % call
    assert gap[0] < 0.5 * call, "longest pause %.3f s during a %.3f s call" % (gap[0], call)
