"""Plain NumPy reference of everything fastntk computes fast.

Written to be obviously correct rather than fast: one layer at a time, explicit
formulas, full Jacobians.  Every fast path of the library is tested against these
functions, and the benchmarks time them as the baseline.  They read the network,
parameters, loss and learning-rate tensor through their public attributes only.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special


def _sigmoid(x):
    return special.expit(x)


#: name -> (sigma, sigma') as NumPy functions; leaky_relu takes the slope.
ACTIVATIONS = {
    "linear": (lambda x, s: x, lambda x, s: np.ones_like(x)),
    "relu": (
        lambda x, s: np.where(x > 0, x, 0.0 * x),
        lambda x, s: (x > 0).astype(x.dtype),
    ),
    "leaky_relu": (
        lambda x, s: np.where(x > 0, x, s * x),
        lambda x, s: np.where(x > 0, 1.0, s).astype(x.dtype),
    ),
    "tanh": (lambda x, s: np.tanh(x), lambda x, s: 1.0 - np.tanh(x) ** 2),
    "sigmoid": (
        lambda x, s: _sigmoid(x),
        lambda x, s: _sigmoid(x) * (1.0 - _sigmoid(x)),
    ),
    "sin": (lambda x, s: np.sin(x), lambda x, s: np.cos(x)),
    "erf": (
        lambda x, s: special.erf(x),
        lambda x, s: 2.0 / math.sqrt(math.pi) * np.exp(-x * x),
    ),
    "gelu": (
        lambda x, s: x * special.ndtr(x),
        lambda x, s: (
            special.ndtr(x) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        ),
    ),
    "swish": (
        lambda x, s: x * _sigmoid(x),
        lambda x, s: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x))),
    ),
    "softplus": (lambda x, s: np.logaddexp(0.0, x), lambda x, s: _sigmoid(x)),
}


def activation(net):
    """(sigma, sigma') of ``net`` as one-argument NumPy functions."""
    f, df = ACTIVATIONS[net.activation]
    return (lambda x: f(x, net.slope)), (lambda x: df(x, net.slope))


def preactivations(net, params, x):
    """[z^(1), ..., z^(L)], each of shape (P, n_l)."""
    sigma, _ = activation(net)
    zs = []
    a = np.asarray(x)
    for W, b in zip(params.weights, params.biases):
        z = a @ W.T + b
        zs.append(z)
        a = sigma(z)
    return zs


def apply(net, params, x):
    """Network output z^(L), shape (P, n_L)."""
    return preactivations(net, params, x)[-1]


def loss_value(loss, z, y):
    """Summed (or averaged) loss, one sample at a time."""
    total = 0.0
    for zr, yr in zip(np.asarray(z, np.float64), np.asarray(y, np.float64)):
        if loss.name == "mse":
            total += 0.5 * np.sum((zr - yr) ** 2)
        else:
            logp = zr - special.logsumexp(zr)
            total += -np.sum(yr * logp)
    return total / len(z) if loss.reduction == "mean" else total


def error_factor(loss, z, y):
    """eps = dL/dz, shape (P, n_out)."""
    z = np.asarray(z, np.float64)
    y = np.asarray(y, np.float64)
    if loss.name == "mse":
        eps = z - y
    else:
        soft = special.softmax(z, axis=1)
        eps = soft * y.sum(axis=1, keepdims=True) - y
    return eps / len(z) if loss.reduction == "mean" else eps


def jacobian(net, params, x):
    """dz^(L)_{i;a} / dtheta_mu, shape (P, n_L, n_params), by backpropagation.

    g^(l)_{i,j;a} = dz^(L)_{i;a} / dz^(l)_{j;a} starts as the identity at the
    output and moves down one layer as g^(l-1) = (g^(l) W^(l)) * sigma'(z^(l-1));
    then dz/dW^(l)_{jk} = g^(l)_{ij} a^(l-1)_k and dz/db^(l)_j = g^(l)_{ij}.
    """
    sigma, dsigma = activation(net)
    x = np.asarray(x)
    zs = preactivations(net, params, x)
    acts = [x] + [sigma(z) for z in zs[:-1]]
    P, n_out = x.shape[0], net.widths[-1]
    J = np.zeros((P, n_out, net.n_params), dtype=x.dtype)
    g = np.broadcast_to(np.eye(n_out, dtype=x.dtype), (P, n_out, n_out))
    for l in range(net.depth - 1, -1, -1):
        ws, bs = net.layer_slices()[l]
        dW = g[:, :, :, None] * acts[l][:, None, None, :]
        J[:, :, ws] = dW.reshape(P, n_out, -1)
        J[:, :, bs] = g
        if l > 0:
            g = (g @ params.weights[l]) * dsigma(zs[l - 1])[:, None, :]
    return J


def gradient(net, params, x, y, loss):
    """dL/dtheta = sum_{a,i} eps_{i;a} dz_{i;a}/dtheta, theta's layout."""
    z = apply(net, params, x)
    eps = error_factor(loss, z, y)
    J = jacobian(net, params, x).astype(np.float64)
    return np.einsum("ai,aim->m", eps, J).astype(params.theta.dtype)


def gd_step(net, params, x, y, loss, lr, rates):
    """theta - lr * lambda dL/dtheta, as a new flat vector (float64 algebra)."""
    g = gradient(net, params, x, y, loss).astype(np.float64)
    step = rates.matrix(net) @ g
    return (params.theta.astype(np.float64) - lr * step).astype(params.theta.dtype)


def ntk(net, params, x1, x2=None, rates=None):
    """H[a1, a2, i1, i2] = sum_{mu,nu} J1[a1,i1,mu] lambda[mu,nu] J2[a2,i2,nu].

    Shape (P1, P2, n_out, n_out), computed in float64 from full Jacobians.
    ``rates=None`` means layerwise with lambda_b = lambda_W = 1.
    """
    if rates is None:
        n_prev = np.asarray(net.widths[:-1], dtype=np.float64)
        lam = np.empty(net.n_params)
        for l, (ws, bs) in enumerate(net.layer_slices()):
            lam[ws] = 1.0 / n_prev[l]
            lam[bs] = 1.0
        lam = np.diag(lam)
    else:
        lam = rates.matrix(net)
    J1 = jacobian(net, params, x1).astype(np.float64)
    J2 = J1 if x2 is None else jacobian(net, params, x2).astype(np.float64)
    return np.einsum("aim,mn,bjn->abij", J1, lam, J2, optimize=True)
