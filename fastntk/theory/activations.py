"""Higher derivatives of the activation functions: sigma'' and sigma'''.

The compiled kernels of :mod:`fastntk.kernels.activations` provide sigma and
sigma'; the theory toolkit also needs the second and third derivatives, for the
higher-order terms of a gradient step (Taylor-mode propagation through the
network).  They are written in closed form here:

- linear, relu, leaky_relu: piecewise linear, so sigma'' = sigma''' = 0 away from
  the kink at 0 (where they are not differentiable; the kink is met with
  probability zero by a preactivation in floating point).
- tanh, with t = tanh(x): sigma'' = -2 t (1 - t^2), sigma''' = (1 - t^2)(6 t^2 - 2).
- sigmoid s: s' = s (1 - s), s'' = s' (1 - 2 s), s''' = s' (1 - 6 s + 6 s^2).
- sin: -sin, -cos.
- erf: with e = 2/sqrt(pi) exp(-x^2): sigma'' = -2 x e, sigma''' = (4 x^2 - 2) e.
- gelu x Phi(x), with the normal density phi: sigma'' = phi (2 - x^2),
  sigma''' = phi (x^3 - 4 x).
- swish x s(x): the n-th derivative is n s^(n-1) + x s^(n).
- softplus: its derivatives are those of the sigmoid, one order lower.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from fastntk import _config
from fastntk._config import JIT, JIT_PARALLEL
from fastntk._validation import as_array, check_int
from fastntk.kernels.activations import (
    ERF,
    GELU,
    LEAKY_RELU,
    LINEAR,
    RELU,
    SIGMOID,
    SIN,
    SWISH,
    TANH,
    _sigmoid,
    act,
    code_of,
    dact,
)

_TWO_OVER_SQRT_PI = 1.1283791670955126
_INV_SQRT_2PI = 0.3989422804014327

#: Highest derivative order provided.
MAX_ORDER = 3


@njit(**JIT)
def _sigmoid_derivatives(x):
    # (s, s', s'', s''') of the logistic function
    s = _sigmoid(x)
    s1 = s * (1.0 - s)
    s2 = s1 * (1.0 - 2.0 * s)
    s3 = s1 * (1.0 - 6.0 * s + 6.0 * s * s)
    return s, s1, s2, s3


@njit(**JIT)
def d2act(code, x, slope):
    """sigma''(x) for the activation ``code``."""
    if code == LINEAR or code == RELU or code == LEAKY_RELU:
        return 0.0 * x
    if code == TANH:
        t = math.tanh(x)
        return -2.0 * t * (1.0 - t * t)
    if code == SIGMOID:
        return _sigmoid_derivatives(x)[2]
    if code == SIN:
        return -math.sin(x)
    if code == ERF:
        return -2.0 * x * _TWO_OVER_SQRT_PI * math.exp(-x * x)
    if code == GELU:
        return _INV_SQRT_2PI * math.exp(-0.5 * x * x) * (2.0 - x * x)
    if code == SWISH:
        s, s1, s2, _ = _sigmoid_derivatives(x)
        return 2.0 * s1 + x * s2
    # softplus'' = sigmoid'
    return _sigmoid_derivatives(x)[1]


@njit(**JIT)
def d3act(code, x, slope):
    """sigma'''(x) for the activation ``code``."""
    if code == LINEAR or code == RELU or code == LEAKY_RELU:
        return 0.0 * x
    if code == TANH:
        t = math.tanh(x)
        return (1.0 - t * t) * (6.0 * t * t - 2.0)
    if code == SIGMOID:
        return _sigmoid_derivatives(x)[3]
    if code == SIN:
        return -math.cos(x)
    if code == ERF:
        return (4.0 * x * x - 2.0) * _TWO_OVER_SQRT_PI * math.exp(-x * x)
    if code == GELU:
        return _INV_SQRT_2PI * math.exp(-0.5 * x * x) * (x * x * x - 4.0 * x)
    if code == SWISH:
        s, s1, s2, s3 = _sigmoid_derivatives(x)
        return 3.0 * s2 + x * s3
    # softplus''' = sigmoid''
    return _sigmoid_derivatives(x)[2]


@njit(**JIT_PARALLEL)
def _derivatives_kernel(x, code, slope, order, out):
    # out[k, i] = k-th derivative of sigma at x[i], k = 0..order
    for i in prange(x.shape[0]):
        v = x[i]
        out[0, i] = act(code, v, slope)
        if order >= 1:
            out[1, i] = dact(code, v, slope)
        if order >= 2:
            out[2, i] = d2act(code, v, slope)
        if order >= 3:
            out[3, i] = d3act(code, v, slope)


def activation_derivatives(activation, x, order=MAX_ORDER, *, slope=0.01, threads=None):
    """An activation and its derivatives up to ``order``, elementwise.

    Parameters
    ----------
    activation : str
        One of ``linear, relu, leaky_relu, tanh, sigmoid, sin, erf, gelu, swish,
        softplus``.
    x : array_like of float32 or float64, any shape
        Points at which to evaluate.
    order : int
        Highest derivative, 0 to 3.
    slope : float
        Slope of leaky_relu for negative inputs.
    threads : int, optional
        Threads for this call.

    Returns
    -------
    ndarray, shape (order + 1, *x.shape), x's dtype
        ``[sigma(x), sigma'(x), sigma''(x), sigma'''(x)][: order + 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastntk.theory import activation_derivatives
    >>> d = activation_derivatives("sin", np.array([0.0]))
    >>> d[:, 0].round(12).tolist()
    [0.0, 1.0, -0.0, -1.0]
    """
    code = code_of(activation)
    order = check_int("order", order, 0)
    if order > MAX_ORDER:
        raise ValueError(
            f"order: expected an integer from 0 to {MAX_ORDER}, received {order}"
        )
    x = as_array("x", x, finite=False)
    flat = x.reshape(-1)
    out = np.empty((order + 1, flat.size), dtype=x.dtype)
    with _config.thread_limit(threads):
        _derivatives_kernel(flat, code, float(slope), order, out)
    return out.reshape((order + 1, *x.shape))
