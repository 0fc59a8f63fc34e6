"""CPU kernels of the forward and backward passes (Numba).

The network travels into these kernels as raw arrays: the flat parameter vector
``theta`` (layer by layer: W^(1) row-major with shape (n_1, n_0), b^(1), W^(2),
b^(2), ...), the integer ``widths`` [n_0, ..., n_L], the activation code and the
leaky-ReLU slope.  Matrix products go to BLAS through ``np.dot``; the elementwise
work (bias, activation, its derivative) is fused into ``prange`` loops.  Inputs
are assumed validated: C-contiguous, one floating dtype, finite.

Samples are processed in blocks of :data:`fastntk._config.SAMPLE_BLOCK`, so that
the working set of :func:`forward_output` and :func:`loss_gradient` does not grow
with the number of samples.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fastntk._config import JIT, JIT_PARALLEL, SAMPLE_BLOCK
from fastntk.kernels.activations import act, dact

#: Loss codes understood by :func:`loss_gradient`.
MSE, CROSS_ENTROPY = 0, 1


@njit(**JIT)
def layer_offsets(widths):
    """Start of W^(l) and b^(l) in theta, for l = 0..L-1 (0-based layers)."""
    depth = widths.shape[0] - 1
    w_off = np.empty(depth, np.int64)
    b_off = np.empty(depth, np.int64)
    pos = 0
    for l in range(depth):
        w_off[l] = pos
        pos += widths[l + 1] * widths[l]
        b_off[l] = pos
        pos += widths[l + 1]
    return w_off, b_off


@njit(**JIT)
def layer_rows(widths, n_samples):
    """Start of each layer's (P, n_l) block in a flat per-layer buffer."""
    depth = widths.shape[0] - 1
    off = np.empty(depth + 1, np.int64)
    off[0] = 0
    for l in range(depth):
        off[l + 1] = off[l] + n_samples * widths[l + 1]
    return off


@njit(**JIT_PARALLEL)
def _bias_activate(z, b, a, code, slope, activate):
    # z += b row by row; a = sigma(z) when ``activate``.
    m, n = z.shape
    for p in prange(m):
        for i in range(n):
            v = z[p, i] + b[i]
            z[p, i] = v
            if activate:
                a[p, i] = act(code, v, slope)


@njit(**JIT)
def forward_layers(theta, widths, x, code, slope, zs, acts):
    """Every layer's preactivations and activations for all samples.

    ``zs`` and ``acts`` are flat buffers of length P * (n_1 + ... + n_L); layer l
    (0-based) occupies ``[off[l], off[l+1])`` of :func:`layer_rows`, as a C-ordered
    (P, n_{l+1}) block.  The last layer's activations are not computed.
    """
    P = x.shape[0]
    depth = widths.shape[0] - 1
    w_off, b_off = layer_offsets(widths)
    off = layer_rows(widths, P)
    a = x
    for l in range(depth):
        n, k = widths[l + 1], widths[l]
        W = theta[w_off[l] : w_off[l] + n * k].reshape((n, k))
        b = theta[b_off[l] : b_off[l] + n]
        z = zs[off[l] : off[l + 1]].reshape((P, n))
        out = acts[off[l] : off[l + 1]].reshape((P, n))
        # z = a W^T + b ; out = sigma(z)
        np.dot(a, W.T, z)
        _bias_activate(z, b, out, code, slope, l < depth - 1)
        a = out


@njit(**JIT)
def forward_output(theta, widths, x, code, slope, out):
    """Network output z^(L), shape (P, n_L), written into ``out``; blocked."""
    P = x.shape[0]
    depth = widths.shape[0] - 1
    w_off, b_off = layer_offsets(widths)
    wmax = 1
    for l in range(1, depth + 1):
        wmax = max(wmax, widths[l])
    block = min(P, SAMPLE_BLOCK)
    bufs = np.empty((2, block * wmax), dtype=theta.dtype)
    for start in range(0, P, block):
        stop = min(P, start + block)
        m = stop - start
        a = x[start:stop]
        for l in range(depth):
            n, k = widths[l + 1], widths[l]
            W = theta[w_off[l] : w_off[l] + n * k].reshape((n, k))
            b = theta[b_off[l] : b_off[l] + n]
            if l == depth - 1:
                z = out[start:stop]
            else:
                z = bufs[l % 2, : m * n].reshape((m, n))
            # z = a W^T + b, then sigma in place on hidden layers
            np.dot(a, W.T, z)
            _bias_activate(z, b, z, code, slope, l < depth - 1)
            a = z


@njit(**JIT_PARALLEL)
def _loss_error(z, y, loss, scale, eps):
    # Per-sample loss and error factor eps = dL/dz, both times ``scale``.
    m, n = z.shape
    per = np.empty(m, dtype=np.float64)
    for p in prange(m):
        if loss == MSE:
            s = 0.0
            for i in range(n):
                d = z[p, i] - y[p, i]
                eps[p, i] = scale * d
                s += d * d
            per[p] = 0.5 * s
        else:
            # softmax cross-entropy, with log-sum-exp shifted by the max logit
            zmax = z[p, 0]
            for i in range(1, n):
                zmax = max(zmax, z[p, i])
            se = 0.0
            for i in range(n):
                se += np.exp(z[p, i] - zmax)
            lse = zmax + np.log(se)
            ysum = 0.0
            yz = 0.0
            for i in range(n):
                ysum += y[p, i]
                yz += y[p, i] * z[p, i]
            for i in range(n):
                eps[p, i] = scale * (np.exp(z[p, i] - lse) * ysum - y[p, i])
            per[p] = lse * ysum - yz
    return scale * per.sum()


@njit(**JIT_PARALLEL)
def _backprop_delta(delta, W, zprev, code, slope, out):
    # out = (delta W) * sigma'(zprev)
    np.dot(delta, W, out)
    m, k = out.shape
    for p in prange(m):
        for j in range(k):
            out[p, j] *= dact(code, zprev[p, j], slope)


@njit(**JIT_PARALLEL)
def _accumulate(dst, src, first):
    # dst = src (first block) or dst += src
    for i in prange(dst.shape[0]):
        if first:
            dst[i] = src[i]
        else:
            dst[i] += src[i]


@njit(**JIT)
def loss_gradient(theta, widths, x, y, code, slope, loss, scale, grad):
    """Loss value and its gradient dL/dtheta (written into ``grad``).

    ``loss`` is :data:`MSE` or :data:`CROSS_ENTROPY`; ``scale`` multiplies the
    summed per-sample losses (1 for the sum, 1/P for the mean).
    """
    P = x.shape[0]
    depth = widths.shape[0] - 1
    n_out = widths[depth]
    w_off, b_off = layer_offsets(widths)
    block = min(P, SAMPLE_BLOCK)
    off = layer_rows(widths, block)
    wmax = 1
    wsize = 1
    for l in range(depth):
        wmax = max(wmax, widths[l + 1])
        wsize = max(wsize, widths[l + 1] * widths[l])
    zs = np.empty(off[depth], dtype=theta.dtype)
    acts = np.empty(off[depth], dtype=theta.dtype)
    deltas = np.empty((2, block * max(wmax, widths[0])), dtype=theta.dtype)
    tmp = np.empty(wsize + wmax, dtype=theta.dtype)
    total = 0.0
    first = True
    for start in range(0, P, block):
        stop = min(P, start + block)
        m = stop - start
        xb = x[start:stop]
        offb = layer_rows(widths, m)

        # forward pass of the block, keeping every layer
        forward_layers(
            theta, widths, xb, code, slope, zs[: offb[depth]], acts[: offb[depth]]
        )

        # error factor of the output layer
        zL = zs[offb[depth - 1] : offb[depth]].reshape((m, n_out))
        delta = deltas[0, : m * n_out].reshape((m, n_out))
        total += _loss_error(zL, y[start:stop], loss, scale, delta)

        # backward pass: gradient of each layer, then the delta below it
        for l in range(depth - 1, -1, -1):
            n, k = widths[l + 1], widths[l]
            if l == 0:
                a_prev = xb
            else:
                a_prev = acts[offb[l - 1] : offb[l]].reshape((m, k))
            gW = tmp[: n * k].reshape((n, k))
            gb = tmp[n * k : n * k + n]
            # dL/dW = delta^T a_prev ; dL/db = column sums of delta
            np.dot(delta.T, a_prev, gW)
            for j in range(n):
                gb[j] = 0.0
            for p in range(m):
                for j in range(n):
                    gb[j] += delta[p, j]
            _accumulate(grad[w_off[l] : w_off[l] + n * k], tmp[: n * k], first)
            _accumulate(grad[b_off[l] : b_off[l] + n], gb, first)
            if l > 0:
                W = theta[w_off[l] : w_off[l] + n * k].reshape((n, k))
                zprev = zs[offb[l - 1] : offb[l]].reshape((m, k))
                nxt = deltas[(depth - l) % 2, : m * k].reshape((m, k))
                _backprop_delta(delta, W, zprev, code, slope, nxt)
                delta = nxt
        first = False
    return total


@njit(**JIT_PARALLEL)
def _fill_jacobian_layer(J, g, a_prev, w0, b0):
    # J[p, i, w0 + j*k + q] = g[p, i, j] a_prev[p, q] ;  J[p, i, b0 + j] = g[p, i, j]
    m, n_out, n = g.shape
    k = a_prev.shape[1]
    for p in prange(m):
        for i in range(n_out):
            for j in range(n):
                gij = g[p, i, j]
                base = w0 + j * k
                for q in range(k):
                    J[p, i, base + q] = gij * a_prev[p, q]
                J[p, i, b0 + j] = gij


@njit(**JIT_PARALLEL)
def output_derivatives_step(g, W, zprev, code, slope, out):
    """Backpropagate output derivatives through one layer.

    g has shape (m, n_out, n) and holds dz^(L)_i / dz^(l)_j per sample; ``out``
    (m, n_out, k) receives dz^(L)_i / dz^(l-1)_q = sum_j g_ij W_jq sigma'(z^(l-1)_q).
    """
    m, n_out, n = g.shape
    k = W.shape[1]
    flat = out.reshape((m * n_out, k))
    np.dot(g.reshape((m * n_out, n)), W, flat)
    for p in prange(m):
        for q in range(k):
            d = dact(code, zprev[p, q], slope)
            for i in range(n_out):
                out[p, i, q] *= d


@njit(**JIT)
def jacobian(theta, widths, x, code, slope, J):
    """Per-sample Jacobian dz^(L)/dtheta, shape (P, n_L, n_params), into ``J``."""
    P = x.shape[0]
    depth = widths.shape[0] - 1
    n_out = widths[depth]
    w_off, b_off = layer_offsets(widths)
    block = min(P, SAMPLE_BLOCK)
    off = layer_rows(widths, block)
    wmax = 1
    for l in range(depth + 1):
        wmax = max(wmax, widths[l])
    zs = np.empty(off[depth], dtype=theta.dtype)
    acts = np.empty(off[depth], dtype=theta.dtype)
    gbuf = np.empty((2, block * n_out * wmax), dtype=theta.dtype)
    for start in range(0, P, block):
        stop = min(P, start + block)
        m = stop - start
        xb = x[start:stop]
        offb = layer_rows(widths, m)
        forward_layers(
            theta, widths, xb, code, slope, zs[: offb[depth]], acts[: offb[depth]]
        )

        # output derivatives of the last layer: the identity
        g = gbuf[0, : m * n_out * n_out].reshape((m, n_out, n_out))
        g[:] = 0.0
        for p in range(m):
            for i in range(n_out):
                g[p, i, i] = 1.0

        for l in range(depth - 1, -1, -1):
            n, k = widths[l + 1], widths[l]
            if l == 0:
                a_prev = xb
            else:
                a_prev = acts[offb[l - 1] : offb[l]].reshape((m, k))
            _fill_jacobian_layer(J[start:stop], g, a_prev, w_off[l], b_off[l])
            if l > 0:
                W = theta[w_off[l] : w_off[l] + n * k].reshape((n, k))
                zprev = zs[offb[l - 1] : offb[l]].reshape((m, k))
                nxt = gbuf[(depth - l) % 2, : m * n_out * k].reshape((m, n_out, k))
                output_derivatives_step(g, W, zprev, code, slope, nxt)
                g = nxt
