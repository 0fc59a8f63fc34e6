"""Gradients and Jacobians of an MLP by backpropagation (CPU kernels)."""

from __future__ import annotations

import numpy as np

from fastntk import _config
from fastntk._validation import as_samples, as_targets
from fastntk.kernels import cpu
from fastntk.kernels.dispatch import resolve_backend
from fastntk.model.losses import check_loss


def _check_net(net):
    from fastntk.model.mlp import MLP

    if not isinstance(net, MLP):
        raise TypeError(f"net: expected fastntk.MLP, received {type(net).__name__}")
    return net


def loss_and_gradient(net, params, x, y, loss=None, *, threads=None, backend="cpu"):
    """Training loss and its gradient dL/dtheta.

    Parameters
    ----------
    net : MLP
    params : Params
    x : array_like, shape (P, n_0)
    y : array_like, shape (P, n_L)
        Targets, in the parameters' dtype.
    loss : Loss, optional
        ``fastntk.MSE()`` (default) or ``fastntk.CrossEntropy()``, each with
        ``reduction="sum"`` or ``"mean"``.
    threads : int, optional
    backend : {"cpu", "cuda", "auto"}
        Where to compute (see ``docs/gpu.md``); host arrays in and out.

    Returns
    -------
    value : float
    grad : ndarray, shape (n_params,), the parameters' dtype, theta's layout
    """
    net = _check_net(net)
    params = net.check_params(params)
    loss = check_loss(loss if loss is not None else "mse")
    x = as_samples("x", x, net.n_in, params.dtype)
    y = as_targets("y", y, x.shape[0], net.n_out, params.dtype)
    if resolve_backend(backend, 6.0 * x.shape[0] * net.n_params) == "cuda":
        from fastntk.engines.train_cuda import loss_and_gradient_cuda

        return loss_and_gradient_cuda(net, params, x, y, loss)
    grad = np.empty(net.n_params, dtype=params.dtype)
    with _config.thread_limit(threads):
        value = cpu.loss_gradient(
            params.theta,
            net._widths,
            x,
            y,
            net.activation_code,
            net.slope,
            loss.code,
            loss.scale(x.shape[0]),
            grad,
        )
    return float(value), grad


def gradient(net, params, x, y, loss=None, *, threads=None, backend="cpu"):
    """Gradient dL/dtheta of the training loss, flat in theta's layout.

    Examples
    --------
    >>> import numpy as np, fastntk
    >>> net = fastntk.MLP([2, 8, 1])
    >>> params = net.init(seed=1)
    >>> x, y = np.ones((4, 2)), np.zeros((4, 1))
    >>> fastntk.gradient(net, params, x, y, loss=fastntk.MSE()).shape
    (33,)
    """
    _, grad = loss_and_gradient(
        net, params, x, y, loss, threads=threads, backend=backend
    )
    return grad


def jacobian(net, params, x, *, threads=None, backend="cpu"):
    """Per-sample Jacobian dz_{i;a} / dtheta_mu.

    Returns
    -------
    J : ndarray, shape (P, n_L, n_params), the parameters' dtype

    Raises
    ------
    MemoryError
        When the Jacobian's P * n_L * n_params entries cannot be allocated.
    """
    net = _check_net(net)
    params = net.check_params(params)
    x = as_samples("x", x, net.n_in, params.dtype)
    shape = (x.shape[0], net.n_out, net.n_params)
    try:
        J = np.empty(shape, dtype=params.dtype)
    except MemoryError:
        need = np.prod(shape, dtype=np.float64) * params.dtype.itemsize
        raise MemoryError(
            f"jacobian: the Jacobian of shape {shape} needs {need / 2**30:.1f} GiB; "
            f"use fewer samples per call, or fastntk.ntk, which never forms it"
        ) from None
    if resolve_backend(backend, 2.0 * x.shape[0] * net.n_out * net.n_params) == "cuda":
        from fastntk.engines.ntk_cuda import jacobian_cuda

        return jacobian_cuda(net, params, x, J)
    with _config.thread_limit(threads):
        cpu.jacobian(params.theta, net._widths, x, net.activation_code, net.slope, J)
    return J
