"""Shared helpers of the benchmark suite (not a benchmark module itself)."""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import fastntk


def problem(widths, P, dtype, activation="relu", seed=0):
    """Network, parameters, inputs and targets for a benchmark workload."""
    net = fastntk.MLP(widths, activation=activation, C_b=0.0, C_W=2.0)
    params = net.init(seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((P, widths[0])).astype(dtype)
    y = rng.standard_normal((P, widths[-1])).astype(dtype)
    return net, params, x, y


def rel_error(fast, ref):
    """Max-norm relative error of ``fast`` against ``ref``."""
    fast = np.asarray(fast, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.abs(fast - ref).max() / max(np.abs(ref).max(), 1e-300))


def cold_compile_seconds(statement, setup):
    """Seconds of the first call of ``statement`` in a fresh process and cache.

    The numba cache is pointed at an empty folder, so the figure is the JIT
    compilation a user pays once per machine (later runs load from the cache).
    """
    code = (
        f"{setup}\nimport time\nt0 = time.perf_counter()\n{statement}\n"
        f"print(time.perf_counter() - t0)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        del t0
    return float(out.stdout.strip().splitlines()[-1])
