"""Activation functions of the compiled kernels, selected by an integer code.

One compiled kernel serves every activation: the activation travels as a small
integer (its position in :data:`NAMES`) plus the leaky-ReLU slope, and the scalar
functions below branch on it.  The branch is the same for every element of a
loop, so it costs nothing measurable next to the arithmetic, and the kernels are
compiled once per dtype instead of once per activation.
"""

from __future__ import annotations

import math

from numba import njit

from fastntk._config import JIT

#: Activation names, in code order.
NAMES = (
    "linear",
    "relu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "sin",
    "erf",
    "gelu",
    "swish",
    "softplus",
)
LINEAR, RELU, LEAKY_RELU, TANH, SIGMOID, SIN, ERF, GELU, SWISH, SOFTPLUS = range(10)

_SQRT_HALF = 0.7071067811865476
_TWO_OVER_SQRT_PI = 1.1283791670955126
_INV_SQRT_2PI = 0.3989422804014327


def code_of(name: str) -> int:
    """Integer code of an activation name; raises ``ValueError`` if unknown."""
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(
            f"activation: expected one of {', '.join(NAMES)}, received {name!r}"
        )
    return NAMES.index(name)


@njit(**JIT)
def _sigmoid(x):
    # Numerically stable logistic function.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@njit(**JIT)
def act(code, x, slope):
    """sigma(x) for the activation ``code``."""
    if code == RELU:
        return x if x > 0 else 0.0 * x
    if code == LINEAR:
        return x
    if code == LEAKY_RELU:
        return x if x > 0 else slope * x
    if code == TANH:
        return math.tanh(x)
    if code == SIGMOID:
        return _sigmoid(x)
    if code == SIN:
        return math.sin(x)
    if code == ERF:
        return math.erf(x)
    if code == GELU:
        return 0.5 * x * (1.0 + math.erf(x * _SQRT_HALF))
    if code == SWISH:
        return x * _sigmoid(x)
    # softplus: log(1 + e^x) without overflow
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@njit(**JIT)
def dact(code, x, slope):
    """sigma'(x) for the activation ``code``."""
    if code == RELU:
        return 1.0 if x > 0 else 0.0
    if code == LINEAR:
        return 1.0
    if code == LEAKY_RELU:
        return 1.0 if x > 0 else slope
    if code == TANH:
        t = math.tanh(x)
        return 1.0 - t * t
    if code == SIGMOID:
        s = _sigmoid(x)
        return s * (1.0 - s)
    if code == SIN:
        return math.cos(x)
    if code == ERF:
        return _TWO_OVER_SQRT_PI * math.exp(-x * x)
    if code == GELU:
        return 0.5 * (1.0 + math.erf(x * _SQRT_HALF)) + x * _INV_SQRT_2PI * math.exp(
            -0.5 * x * x
        )
    if code == SWISH:
        s = _sigmoid(x)
        return s + x * s * (1.0 - s)
    # softplus' = sigmoid
    return _sigmoid(x)
