"""The multilayer perceptron: its description, its parameters, its forward pass.

A network is described by its widths [n_0, n_1, ..., n_L], an activation sigma
and the initialization variances C_b, C_W (a scalar, or one value per layer).
The preactivations are

    z^(1) = W^(1) x + b^(1),    z^(l+1) = W^(l+1) sigma(z^(l)) + b^(l+1),

and the output is z^(L), with no activation on the output layer.  At
initialization b^(l)_i ~ N(0, C_b^(l)) and W^(l)_ij ~ N(0, C_W^(l) / n_{l-1}).

All parameters live in one flat, contiguous vector ``theta``, layer by layer:
W^(1) (row-major, shape (n_1, n_0)), b^(1), W^(2), b^(2), ...  The flat index is
the one learning-rate tensors and Jacobians refer to; ``Params.weights[l]`` and
``Params.biases[l]`` are views into it (0-based layers), not copies.
"""

from __future__ import annotations

import numbers

import numpy as np

from fastntk import _config
from fastntk._validation import (
    as_array,
    as_samples,
    check_dtype,
    check_nonnegative,
    per_layer,
)
from fastntk.kernels import activations, cpu


class Params:
    """Parameters of an :class:`MLP`: a flat vector and per-layer views.

    Attributes
    ----------
    theta : ndarray, shape (n_params,)
        All parameters, C-contiguous, float32 or float64.
    weights : tuple of ndarray
        ``weights[l]`` has shape (n_{l+1}, n_l), a view into ``theta``.
    biases : tuple of ndarray
        ``biases[l]`` has shape (n_{l+1},), a view into ``theta``.
    """

    __slots__ = ("net", "theta", "weights", "biases")

    def __init__(self, net: MLP, theta: np.ndarray):
        self.net = net
        self.theta = theta
        weights, biases = [], []
        for l in range(net.depth):
            n, k = net.widths[l + 1], net.widths[l]
            w0, b0 = net.weight_offsets[l], net.bias_offsets[l]
            weights.append(theta[w0 : w0 + n * k].reshape(n, k))
            biases.append(theta[b0 : b0 + n])
        self.weights = tuple(weights)
        self.biases = tuple(biases)

    @property
    def dtype(self) -> np.dtype:
        return self.theta.dtype

    def copy(self) -> Params:
        """A deep copy (new ``theta``)."""
        return Params(self.net, self.theta.copy())

    def astype(self, dtype) -> Params:
        """A copy in another floating dtype."""
        return Params(self.net, self.theta.astype(check_dtype("dtype", dtype)))

    def __repr__(self) -> str:
        return f"Params(n_params={self.theta.size}, dtype={self.dtype})"


class MLP:
    """A multilayer perceptron.

    Parameters
    ----------
    widths : sequence of int
        [n_0, n_1, ..., n_L]: input width, hidden widths, output width.  At least
        two entries, each a positive integer.
    activation : str
        One of ``linear, relu, leaky_relu, tanh, sigmoid, sin, erf, gelu, swish,
        softplus``.
    C_b, C_W : float or sequence of float
        Initialization variances of biases and (times n_{l-1}) weights, scalars
        or one per layer; non-negative.
    slope : float
        Slope of leaky_relu for negative inputs (ignored otherwise).

    Examples
    --------
    >>> import numpy as np, fastntk
    >>> net = fastntk.MLP([3, 16, 2], activation="tanh", C_W=1.0)
    >>> params = net.init(seed=0)
    >>> net.apply(params, np.ones((5, 3))).shape
    (5, 2)
    """

    def __init__(self, widths, activation="relu", C_b=0.0, C_W=2.0, slope=0.01):
        self.widths = _check_widths(widths)
        self.depth = len(self.widths) - 1
        self.activation = activation
        self.activation_code = activations.code_of(activation)
        self.slope = (
            check_nonnegative("slope", slope)
            if activation == ("leaky_relu")
            else float(slope)
        )
        self.C_b = per_layer("C_b", C_b, self.depth)
        self.C_W = per_layer("C_W", C_W, self.depth)
        self._widths = np.asarray(self.widths, dtype=np.int64)
        w_off, b_off = [], []
        pos = 0
        for l in range(self.depth):
            w_off.append(pos)
            pos += self.widths[l + 1] * self.widths[l]
            b_off.append(pos)
            pos += self.widths[l + 1]
        self.weight_offsets = tuple(w_off)
        self.bias_offsets = tuple(b_off)
        self.n_params = pos

    # -- description -------------------------------------------------------------

    @property
    def n_in(self) -> int:
        return self.widths[0]

    @property
    def n_out(self) -> int:
        return self.widths[-1]

    def __repr__(self) -> str:
        extra = f", slope={self.slope}" if self.activation == "leaky_relu" else ""
        return (
            f"MLP({list(self.widths)}, activation={self.activation!r}{extra}, "
            f"n_params={self.n_params})"
        )

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, MLP)
            and self.widths == other.widths
            and self.activation == other.activation
            and self.slope == other.slope
            and np.array_equal(self.C_b, other.C_b)
            and np.array_equal(self.C_W, other.C_W)
        )

    def __hash__(self) -> int:
        return hash((self.widths, self.activation, self.slope))

    def layer_slices(self):
        """For each layer l, the slices of W^(l) and b^(l) in theta."""
        return [
            (
                slice(w0, w0 + self.widths[l + 1] * self.widths[l]),
                slice(b0, b0 + self.widths[l + 1]),
            )
            for l, (w0, b0) in enumerate(zip(self.weight_offsets, self.bias_offsets))
        ]

    # -- parameters --------------------------------------------------------------

    def init(self, seed=0, dtype="float64") -> Params:
        """Draw parameters at initialization.

        Biases ~ N(0, C_b^(l)), weights ~ N(0, C_W^(l) / n_{l-1}), independent.
        The draws are made in float64 and then cast, so float32 parameters are
        the float64 ones rounded.

        Parameters
        ----------
        seed : int or numpy.random.Generator
        dtype : {'float64', 'float32'}
        """
        dt = check_dtype("dtype", dtype)
        if isinstance(seed, np.random.Generator):
            rng = seed
        elif isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            rng = np.random.default_rng(int(seed))
        else:
            raise TypeError(
                f"seed: expected an integer or numpy.random.Generator, received "
                f"{type(seed).__name__}"
            )
        theta = np.empty(self.n_params, dtype=np.float64)
        for l, (ws, bs) in enumerate(self.layer_slices()):
            std_w = np.sqrt(self.C_W[l] / self.widths[l])
            theta[ws] = std_w * rng.standard_normal(ws.stop - ws.start)
            theta[bs] = np.sqrt(self.C_b[l]) * rng.standard_normal(bs.stop - bs.start)
        return Params(self, theta.astype(dt, copy=False))

    def params(self, theta, *, copy=True) -> Params:
        """Wrap a flat parameter vector of length ``n_params`` (validated)."""
        theta = as_array("theta", theta, ndim=1)
        if theta.shape[0] != self.n_params:
            raise ValueError(
                f"theta: expected length {self.n_params} (the parameter count of "
                f"{self!r}), received length {theta.shape[0]}"
            )
        return Params(self, theta.copy() if copy else theta)

    def check_params(self, params) -> Params:
        """Validate ``params`` against this network (shape, dtype, finiteness)."""
        if not isinstance(params, Params):
            raise TypeError(
                f"params: expected fastntk.Params (from net.init), received "
                f"{type(params).__name__}"
            )
        theta = params.theta
        if theta.ndim != 1 or theta.shape[0] != self.n_params:
            raise ValueError(
                f"params: expected {self.n_params} parameters for {self!r}, "
                f"received {theta.shape}"
            )
        as_array("params.theta", theta, ndim=1)
        if not theta.flags.c_contiguous:
            raise ValueError("params.theta: expected a C-contiguous array")
        return params

    # -- forward pass ------------------------------------------------------------

    def apply(self, params: Params, x, *, threads=None) -> np.ndarray:
        """Network output z^(L) for the samples in ``x``.

        Parameters
        ----------
        params : Params
        x : array_like, shape (P, n_0)
            Samples as rows, in the parameters' dtype.
        threads : int, optional
            Threads for this call (numba and BLAS); restored afterwards.

        Returns
        -------
        z : ndarray, shape (P, n_L), the parameters' dtype
        """
        params = self.check_params(params)
        x = as_samples("x", x, self.n_in, params.dtype)
        out = np.empty((x.shape[0], self.n_out), dtype=params.dtype)
        with _config.thread_limit(threads):
            cpu.forward_output(
                params.theta, self._widths, x, self.activation_code, self.slope, out
            )
        return out

    def preactivations(self, params: Params, x, *, threads=None) -> list:
        """Every layer's preactivations [z^(1), ..., z^(L)], each (P, n_l)."""
        params = self.check_params(params)
        x = as_samples("x", x, self.n_in, params.dtype)
        zs, _ = self._forward_layers(params, x, threads)
        return zs

    def _forward_layers(self, params, x, threads=None):
        # Validated input; returns per-layer views of preactivations, activations.
        P = x.shape[0]
        total = P * sum(self.widths[1:])
        zs = np.empty(total, dtype=params.dtype)
        acts = np.empty(total, dtype=params.dtype)
        with _config.thread_limit(threads):
            cpu.forward_layers(
                params.theta,
                self._widths,
                x,
                self.activation_code,
                self.slope,
                zs,
                acts,
            )
        z_list, a_list = [], []
        pos = 0
        for n in self.widths[1:]:
            z_list.append(zs[pos : pos + P * n].reshape(P, n))
            a_list.append(acts[pos : pos + P * n].reshape(P, n))
            pos += P * n
        return z_list, a_list


def _check_widths(widths) -> tuple:
    try:
        seq = list(widths)
    except TypeError:
        raise TypeError(
            f"widths: expected a sequence of positive integers, received "
            f"{type(widths).__name__}"
        ) from None
    if len(seq) < 2:
        raise ValueError(
            f"widths: expected at least two entries [n_in, ..., n_out], received {seq}"
        )
    out = []
    for i, w in enumerate(seq):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            if isinstance(w, float) and w.is_integer():
                w = int(w)
            else:
                raise TypeError(
                    f"widths[{i}]: expected a positive integer, received {w!r}"
                )
        if w < 1:
            raise ValueError(f"widths[{i}]: expected a positive integer, received {w}")
        out.append(int(w))
    return tuple(out)
