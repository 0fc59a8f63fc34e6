"""Learning-rate tensors.

Tensorial gradient descent moves the parameters by

    theta_mu <- theta_mu - eta sum_nu lambda_{mu nu} dL/dtheta_nu,

with a global learning rate eta > 0 and a symmetric positive-semidefinite
learning-rate tensor lambda.  The kinds offered:

- :func:`identity`: lambda = I, plain gradient descent.
- :func:`layerwise`: lambda_b^(l) on the biases of layer l and lambda_W^(l) / n_{l-1}
  on its weights (scalars or one per layer), the choice under which the NTK has
  a finite limit as the width grows.
- :func:`diagonal`: any non-negative per-parameter vector.
- :func:`dense`: any symmetric PSD matrix of shape (n_params, n_params).

Identity and layerwise tensors are *structured*: each layer's block is a multiple
of the identity, which lets the NTK be computed from per-layer Gram matrices
without forming a Jacobian.
"""

from __future__ import annotations

import numpy as np

from fastntk._validation import as_array, per_layer

#: Default tolerance of the symmetry and PSD checks of dense tensors, relative to
#: the largest absolute entry (symmetry) and the largest eigenvalue (PSD).
DENSE_RTOL = 1e-10


class Rates:
    """A learning-rate tensor.  Build one with the functions of this module."""

    kind = ""
    structured = False

    def check(self, net):
        """Raise ValueError when this tensor does not fit ``net``; return self."""
        return self

    def apply(self, net, g: np.ndarray) -> np.ndarray:
        """lambda g for a flat gradient ``g`` (theta's layout); a new array."""
        raise NotImplementedError

    def matrix(self, net) -> np.ndarray:
        """The dense (n_params, n_params) float64 matrix (small models only)."""
        raise NotImplementedError

    def diagonal_vector(self, net) -> np.ndarray:
        """Per-parameter rates for diagonal kinds (identity, layerwise, diagonal)."""
        raise ValueError(f"rates: a {self.kind} learning-rate tensor is not diagonal")

    def layer_factors(self, net):
        """(bias_rate, weight_rate) per layer for structured kinds.

        ``weight_rate[l]`` multiplies each weight of layer l, i.e. lambda_W^(l) /
        n_{l-1} for layerwise tensors and 1 for the identity.
        """
        raise ValueError(
            f"rates: a {self.kind} learning-rate tensor has no per-layer structure"
        )


class Identity(Rates):
    kind = "identity"
    structured = True

    def __repr__(self):
        return "rates.identity()"

    def apply(self, net, g):
        return np.array(g, copy=True)

    def matrix(self, net):
        return np.eye(net.n_params)

    def diagonal_vector(self, net):
        return np.ones(net.n_params)

    def layer_factors(self, net):
        return np.ones(net.depth), np.ones(net.depth)


class Layerwise(Rates):
    kind = "layerwise"
    structured = True

    def __init__(self, net, lambda_b, lambda_W):
        self.widths = net.widths
        self.lambda_b = per_layer("lambda_b", lambda_b, net.depth)
        self.lambda_W = per_layer("lambda_W", lambda_W, net.depth)

    def __repr__(self):
        return (
            f"rates.layerwise(lambda_b={self.lambda_b.tolist()}, "
            f"lambda_W={self.lambda_W.tolist()})"
        )

    def check(self, net):
        if tuple(net.widths) != tuple(self.widths):
            raise ValueError(
                f"rates: expected a layerwise tensor built for widths "
                f"{list(net.widths)}, received one built for {list(self.widths)}"
            )
        return self

    def layer_factors(self, net):
        self.check(net)
        n_prev = np.asarray(net.widths[:-1], dtype=np.float64)
        return self.lambda_b.copy(), self.lambda_W / n_prev

    def diagonal_vector(self, net):
        bias_rate, weight_rate = self.layer_factors(net)
        d = np.empty(net.n_params)
        for l, (ws, bs) in enumerate(net.layer_slices()):
            d[ws] = weight_rate[l]
            d[bs] = bias_rate[l]
        return d

    def apply(self, net, g):
        return self.diagonal_vector(net).astype(g.dtype) * g

    def matrix(self, net):
        return np.diag(self.diagonal_vector(net))


class Diagonal(Rates):
    kind = "diagonal"

    def __init__(self, vector):
        v = as_array("vector", vector, ndim=1)
        if np.any(v < 0):
            raise ValueError(
                f"vector: expected non-negative per-parameter rates (a diagonal "
                f"tensor is PSD only then), received minimum {v.min()}"
            )
        self.vector = v.astype(np.float64)

    def __repr__(self):
        return f"rates.diagonal(<{self.vector.size} entries>)"

    def check(self, net):
        if self.vector.shape[0] != net.n_params:
            raise ValueError(
                f"rates: expected a diagonal of length {net.n_params} (the "
                f"network's parameter count), received length {self.vector.shape[0]}"
            )
        return self

    def diagonal_vector(self, net):
        self.check(net)
        return self.vector

    def apply(self, net, g):
        return self.diagonal_vector(net).astype(g.dtype) * g

    def matrix(self, net):
        return np.diag(self.diagonal_vector(net))


class Dense(Rates):
    kind = "dense"

    def __init__(self, matrix, rtol=DENSE_RTOL):
        m = as_array("matrix", matrix, ndim=2)
        if m.shape[0] != m.shape[1]:
            raise ValueError(
                f"matrix: expected a square (n_params, n_params) matrix, received "
                f"shape {m.shape}"
            )
        m = m.astype(np.float64)
        scale = float(np.abs(m).max()) if m.size else 0.0
        asym = float(np.abs(m - m.T).max()) if m.size else 0.0
        if asym > rtol * scale:
            raise ValueError(
                f"matrix: expected a symmetric matrix (|M - M^T| <= {rtol:g} "
                f"max|M|), received max|M - M^T| = {asym:.3g} with max|M| = "
                f"{scale:.3g}; symmetrize with (M + M.T) / 2"
            )
        m = 0.5 * (m + m.T)
        eig = np.linalg.eigvalsh(m) if m.size else np.zeros(0)
        if eig.size and eig[0] < -rtol * max(abs(eig[-1]), np.finfo(float).tiny):
            raise ValueError(
                f"matrix: expected a positive-semidefinite matrix (eigenvalues "
                f">= -{rtol:g} times the largest), received smallest "
                f"eigenvalue {eig[0]:.3g} (largest {eig[-1]:.3g})"
            )
        self.matrix_ = m

    def __repr__(self):
        return f"rates.dense(<{self.matrix_.shape[0]} x {self.matrix_.shape[1]}>)"

    def check(self, net):
        if self.matrix_.shape[0] != net.n_params:
            raise ValueError(
                f"rates: expected a dense matrix of shape ({net.n_params}, "
                f"{net.n_params}) (the network's parameter count), received "
                f"shape {self.matrix_.shape}"
            )
        return self

    def apply(self, net, g):
        self.check(net)
        return (self.matrix_ @ g.astype(np.float64)).astype(g.dtype)

    def matrix(self, net):
        self.check(net)
        return self.matrix_


def identity() -> Identity:
    """lambda = I (plain gradient descent)."""
    return Identity()


def layerwise(net, lambda_b=1.0, lambda_W=1.0) -> Layerwise:
    """lambda_b^(l) on biases and lambda_W^(l) / n_{l-1} on weights of layer l.

    Parameters
    ----------
    net : MLP
    lambda_b, lambda_W : float or sequence of float
        Non-negative, scalars or one per layer.
    """
    return Layerwise(net, lambda_b, lambda_W)


def diagonal(vector) -> Diagonal:
    """Per-parameter rates (non-negative), in theta's layout."""
    return Diagonal(vector)


def dense(matrix, rtol=DENSE_RTOL) -> Dense:
    """A dense symmetric PSD matrix; rejected when not symmetric PSD within rtol."""
    return Dense(matrix, rtol=rtol)


def check_rates(rates, net) -> Rates:
    """Validate ``rates`` for ``net``; None means layerwise(1, 1)."""
    if rates is None:
        return layerwise(net)
    if not isinstance(rates, Rates):
        raise TypeError(
            f"rates: expected a tensor from fastntk.rates (identity, layerwise, "
            f"diagonal, dense) or None, received {type(rates).__name__}"
        )
    return rates.check(net)
