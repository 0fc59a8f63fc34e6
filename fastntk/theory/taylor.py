"""Directional derivatives of the network outputs along a parameter direction.

For a direction v in parameter space, the outputs along the line
theta(s) = theta + s v have the Taylor expansion

    z(theta + s v) = z + s d_1 + (s^2 / 2) d_2 + (s^3 / 6) d_3 + ...,
    d_k = (d^k / ds^k) z(theta + s v) at s = 0.

They are computed exactly, in one forward pass that carries the derivatives of
every preactivation along (Taylor-mode forward differentiation).  Writing W(s) =
W + s dW and b(s) = b + s db for one layer and a(s) for its input,

    z^(k) = W a^(k) + k dW a^(k-1)  (+ db when k = 1),

and through the activation (Faa di Bruno's formula up to third order)

    a'   = sigma'(z) z'
    a''  = sigma''(z) z'^2 + sigma'(z) z''
    a''' = sigma'''(z) z'^3 + 3 sigma''(z) z' z'' + sigma'(z) z'''.

The cost is that of (order + 1) forward passes plus ``order`` extra products by
the direction's weights, per layer; memory is bounded by processing the samples
in blocks.

With v = -lambda g (the step direction of tensorial gradient descent, g the
loss gradient), d_1 = -H eps is the NTK term of one step and eta^k d_k / k! its
higher-order terms; see :mod:`fastntk.theory.predict`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fastntk import _config
from fastntk._config import JIT, JIT_PARALLEL, SAMPLE_BLOCK
from fastntk._validation import as_array, as_samples, check_int
from fastntk.kernels.activations import act, dact
from fastntk.kernels.cpu import layer_offsets
from fastntk.theory.activations import MAX_ORDER, d2act, d3act


@njit(**JIT_PARALLEL)
def _taylor_activate(z, a, code, slope, order):
    # a^(k) = k-th derivative of sigma(z(s)) from those of z, k = 0..order;
    # z and a have shape (order + 1, m, n).
    m, n = z.shape[1], z.shape[2]
    for p in prange(m):
        for j in range(n):
            v = z[0, p, j]
            a[0, p, j] = act(code, v, slope)
            if order >= 1:
                s1 = dact(code, v, slope)
                z1 = z[1, p, j]
                a[1, p, j] = s1 * z1
            if order >= 2:
                s2 = d2act(code, v, slope)
                z2 = z[2, p, j]
                a[2, p, j] = s2 * z1 * z1 + s1 * z2
            if order >= 3:
                s3 = d3act(code, v, slope)
                z3 = z[3, p, j]
                a[3, p, j] = s3 * z1 * z1 * z1 + 3.0 * s2 * z1 * z2 + s1 * z3


@njit(**JIT_PARALLEL)
def _add_scaled(dst, src, factor):
    # dst += factor * src, for (m, n) arrays
    for p in prange(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[p, j] += factor * src[p, j]


@njit(**JIT_PARALLEL)
def _add_row(dst, row):
    # dst[p, :] += row for every p
    for p in prange(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[p, j] += row[j]


@njit(**JIT)
def taylor_forward(theta, direction, widths, x, code, slope, order, out):
    """Outputs and their first ``order`` derivatives along ``direction``.

    ``out`` has shape (order + 1, P, n_L); ``out[k]`` receives d^k z / ds^k at
    s = 0 for parameters theta + s direction.  Samples are processed in blocks.
    """
    P = x.shape[0]
    depth = widths.shape[0] - 1
    K = order + 1
    w_off, b_off = layer_offsets(widths)
    wmax = 1
    for l in range(depth + 1):
        wmax = max(wmax, widths[l])
    block = min(P, SAMPLE_BLOCK)
    zbuf = np.empty(K * block * wmax, dtype=theta.dtype)
    abuf = np.empty((2, K * block * wmax), dtype=theta.dtype)
    tmp = np.empty(block * wmax, dtype=theta.dtype)
    for start in range(0, P, block):
        stop = min(P, start + block)
        m = stop - start

        # the inputs do not depend on s: derivatives of order >= 1 vanish
        n0 = widths[0]
        a = abuf[0, : K * m * n0].reshape((K, m, n0))
        a[0] = x[start:stop]
        for k in range(1, K):
            a[k] = 0.0

        for l in range(depth):
            n, k_in = widths[l + 1], widths[l]
            W = theta[w_off[l] : w_off[l] + n * k_in].reshape((n, k_in))
            dW = direction[w_off[l] : w_off[l] + n * k_in].reshape((n, k_in))
            b = theta[b_off[l] : b_off[l] + n]
            db = direction[b_off[l] : b_off[l] + n]
            z = zbuf[: K * m * n].reshape((K, m, n))
            t = tmp[: m * n].reshape((m, n))

            # z^(k) = a^(k) W^T + k a^(k-1) dW^T, plus b (k = 0) and db (k = 1)
            for k in range(K):
                if l == 0 and k > 0:
                    z[k] = 0.0
                else:
                    np.dot(a[k], W.T, z[k])
                if k > 0:
                    np.dot(a[k - 1], dW.T, t)
                    _add_scaled(z[k], t, float(k))
            _add_row(z[0], b)
            if K > 1:
                _add_row(z[1], db)

            if l == depth - 1:
                for k in range(K):
                    out[k, start:stop] = z[k]
            else:
                nxt = abuf[(l + 1) % 2, : K * m * n].reshape((K, m, n))
                _taylor_activate(z, nxt, code, slope, order)
                a = nxt


def directional_derivatives(
    net, params, x, direction, order=MAX_ORDER, *, threads=None
):
    """d^k z / ds^k of the outputs along theta + s v, k = 0..order, at s = 0.

    Parameters
    ----------
    net : MLP
    params : Params
    x : array_like, shape (P, n_0)
        Inputs, in the parameters' dtype.
    direction : Params or array_like, shape (n_params,)
        The direction v, in theta's layout and the parameters' dtype.
    order : int
        Highest derivative, 0 to 3.
    threads : int, optional
        Threads for this call (numba and BLAS).

    Returns
    -------
    ndarray, shape (order + 1, P, n_L), the parameters' dtype
        ``[z, d_1, d_2, d_3][: order + 1]``.

    Notes
    -----
    relu and leaky_relu have a kink at 0; their expansion holds as long as no
    preactivation crosses 0 along the line (small s).

    Examples
    --------
    >>> import numpy as np, fastntk
    >>> from fastntk.theory import directional_derivatives
    >>> net = fastntk.MLP([2, 8, 1], activation="tanh", C_W=1.0)
    >>> params = net.init(seed=0)
    >>> v = np.random.default_rng(1).standard_normal(net.n_params)
    >>> d = directional_derivatives(net, params, np.ones((3, 2)), v, order=2)
    >>> d.shape
    (3, 3, 1)
    >>> J = fastntk.jacobian(net, params, np.ones((3, 2)))
    >>> bool(np.allclose(d[1], J @ v))
    True
    """
    from fastntk.engines.backprop import _check_net

    net = _check_net(net)
    params = net.check_params(params)
    x = as_samples("x", x, net.n_in, params.dtype)
    order = check_int("order", order, 0)
    if order > MAX_ORDER:
        raise ValueError(
            f"order: expected an integer from 0 to {MAX_ORDER}, received {order}"
        )
    if hasattr(direction, "theta"):
        direction = direction.theta
    direction = as_array("direction", direction, ndim=1, dtype=params.dtype)
    if direction.shape[0] != net.n_params:
        raise ValueError(
            f"direction: expected length {net.n_params} (the parameter count of "
            f"{net!r}), received length {direction.shape[0]}"
        )
    return _directional_derivatives(net, params.theta, x, direction, order, threads)


def _directional_derivatives(net, theta, x, direction, order, threads=None):
    # Validated arrays in one dtype -> (order + 1, P, n_out).
    out = np.empty((order + 1, x.shape[0], net.n_out), dtype=theta.dtype)
    with _config.thread_limit(threads):
        taylor_forward(
            theta, direction, net._widths, x, net.activation_code, net.slope, order, out
        )
    return out
