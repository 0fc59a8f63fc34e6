"""Test configuration shared by every test module.

The CUDA kernels are exercised under numba's CUDA simulator unless
FASTNTK_TEST_REAL_GPU=1 asks for a real device; the simulator must be switched on
before numba is imported for the first time.
"""

import os

if os.environ.get("FASTNTK_TEST_REAL_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
