"""Small builders shared by the test modules."""

import numpy as np

import fastntk
from fastntk.kernels.activations import NAMES

ACTIVATIONS = NAMES
DTYPES = (np.float64, np.float32)


def make_problem(
    widths,
    activation="tanh",
    dtype=np.float64,
    P=7,
    seed=0,
    C_b=0.1,
    C_W=1.5,
    slope=0.1,
):
    """A network, its parameters and random inputs/targets of matching dtype."""
    net = fastntk.MLP(widths, activation=activation, C_b=C_b, C_W=C_W, slope=slope)
    params = net.init(seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((P, widths[0])).astype(dtype)
    y = rng.standard_normal((P, widths[-1])).astype(dtype)
    return net, params, x, y


def one_hot(rng, P, n, dtype=np.float64):
    y = np.zeros((P, n), dtype=dtype)
    y[np.arange(P), rng.integers(0, n, P)] = 1.0
    return y
