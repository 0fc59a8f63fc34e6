"""Tolerances of every comparison in the test suite, in one table.

``RTOL[kind][dtype]`` is a relative tolerance, applied as
``|fast - ref| <= RTOL * (max|ref| + ATOL_FLOOR)`` by :func:`assert_close`.
"""

import numpy as np

RTOL = {
    # fast kernel vs the NumPy reference, same dtype
    "reference": {np.float64: 1e-11, np.float32: 2e-5},
    # analytic derivative vs central finite differences (float64 only)
    "finite_difference": {np.float64: 1e-6, np.float32: None},
    # two fast algorithms for the same quantity (e.g. two NTK methods)
    "algorithms": {np.float64: 1e-11, np.float32: 2e-5},
    # GPU (simulator or device) vs CPU
    "gpu": {np.float64: 1e-11, np.float32: 2e-5},
    # fastntk vs PyTorch on the same network (different summation orders)
    "interop": {np.float64: 1e-12, np.float32: 1e-5},
}

ATOL_FLOOR = 1e-30


def rtol(kind, dtype):
    return RTOL[kind][np.dtype(dtype).type]


def assert_close(actual, desired, kind, dtype, what=""):
    """Max-norm relative comparison with a message naming what was compared."""
    actual = np.asarray(actual, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, (
        f"{what}: shape {actual.shape} != {desired.shape}"
    )
    tol = rtol(kind, dtype)
    scale = float(np.abs(desired).max()) if desired.size else 0.0
    err = float(np.abs(actual - desired).max()) if desired.size else 0.0
    assert err <= tol * (scale + ATOL_FLOOR), (
        f"{what}: max abs error {err:.3e} exceeds {tol:g} x max|ref| "
        f"({scale:.3e}) [{kind}, {np.dtype(dtype)}]"
    )
