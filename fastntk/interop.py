"""Moving networks between PyTorch and fastntk.

:func:`from_torch` reads a ``torch.nn.Sequential`` made of ``Linear`` layers with
one kind of activation between them and returns the equivalent :class:`~fastntk.MLP`
and :class:`~fastntk.Params`; :func:`to_torch` builds the ``nn.Sequential`` back.
A ``Linear`` layer stores its weight as (out_features, in_features), the same
layout as fastntk's W^(l), so parameters are copied without transposing.

Supported activation modules and the fastntk activation they map to:

============================================  ==============
PyTorch                                       fastntk
============================================  ==============
``ReLU``                                      ``relu``
``LeakyReLU(negative_slope)``                 ``leaky_relu``
``Tanh``                                      ``tanh``
``Sigmoid``                                   ``sigmoid``
``GELU(approximate="none")``                  ``gelu``
``SiLU``                                      ``swish``
``Softplus(beta=1)``                          ``softplus``
``Identity`` (or no activation)               ``linear``
============================================  ==============

PyTorch's ``Softplus`` returns x itself above ``threshold`` (20 by default), where
fastntk computes log(1 + e^x); the two differ there by less than e^-20 ~ 2e-9.
fastntk's ``sin`` and ``erf`` have no PyTorch module and cannot be exported.

PyTorch is optional: it is imported only when these functions are called.
"""

from __future__ import annotations

import numpy as np

from fastntk._validation import check_dtype

# PyTorch module class name -> fastntk activation name
_ACTIVATIONS = {
    "ReLU": "relu",
    "LeakyReLU": "leaky_relu",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "GELU": "gelu",
    "SiLU": "swish",
    "Softplus": "softplus",
}

_SUPPORTED = "Linear, " + ", ".join([*_ACTIVATIONS, "Identity"])


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError(
            "fastntk.interop needs PyTorch, which is not installed; install it "
            "with `pip install torch`"
        ) from None
    return torch


def from_torch(module, *, C_b=0.0, C_W=None, dtype=None):
    """A fastntk network and parameters equal to a PyTorch ``nn.Sequential``.

    Parameters
    ----------
    module : torch.nn.Sequential
        ``Linear`` layers, each hidden one followed by the same activation
        module (see the table of this module); ``Identity`` modules anywhere
        are ignored.  The last module must be a ``Linear`` layer (the output of
        an MLP has no activation).
    C_b, C_W : float or sequence of float
        Initialization variances recorded in the returned :class:`~fastntk.MLP`
        (PyTorch modules do not carry them).  ``C_W`` defaults to 2 for relu
        and leaky_relu, 1 otherwise.
    dtype : {'float64', 'float32'}, optional
        Dtype of the parameters; by default that of the first ``Linear`` weight
        (float16 and bfloat16 weights need an explicit ``dtype``).

    Returns
    -------
    net : MLP
    params : Params

    Raises
    ------
    TypeError
        When ``module`` is not an ``nn.Sequential``, or holds an unsupported
        layer (named in the message).
    ValueError
        When widths do not chain, activations differ between layers, the last
        module is an activation, or an activation's options have no fastntk
        equivalent.

    Examples
    --------
    >>> import torch, fastntk  # doctest: +SKIP
    >>> seq = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
    ...                           torch.nn.Linear(8, 1))  # doctest: +SKIP
    >>> net, params = fastntk.interop.from_torch(seq)  # doctest: +SKIP
    >>> net  # doctest: +SKIP
    MLP([3, 8, 1], activation='tanh', n_params=41)
    """
    from fastntk.model.mlp import MLP

    torch = _torch()
    if not isinstance(module, torch.nn.Sequential):
        raise TypeError(
            f"module: expected a torch.nn.Sequential of {_SUPPORTED} modules, "
            f"received {type(module).__name__}"
        )

    # walk the modules: Linear layers, at most one activation after each
    linears, gaps, current = [], [], None
    for index, layer in enumerate(module):
        kind = type(layer).__name__
        if isinstance(layer, torch.nn.Identity):
            continue
        if isinstance(layer, torch.nn.Linear):
            if linears:
                gaps.append(current or ("linear", 0.01, index))
            linears.append((index, layer))
            current = None
            continue
        if kind not in _ACTIVATIONS:
            raise TypeError(
                f"module[{index}]: unsupported layer {kind}; fastntk reads "
                f"Sequential models of {_SUPPORTED} modules"
            )
        if not linears or current is not None:
            raise ValueError(
                f"module[{index}]: expected {kind} right after a Linear layer, "
                f"found it {'first' if not linears else 'after another activation'}"
            )
        current = (*_activation_of(index, layer), index)
    if not linears:
        raise ValueError("module: expected at least one Linear layer, found none")
    if current is not None:
        raise ValueError(
            f"module[{current[2]}]: expected the last module to be a Linear layer "
            f"(an MLP has no activation on its output), found "
            f"{type(module[current[2]]).__name__}"
        )

    # every hidden layer must use the same activation
    activation, slope = gaps[0][:2] if gaps else ("linear", 0.01)
    for name, this_slope, index in gaps:
        if (name, this_slope) != (activation, slope):
            raise ValueError(
                f"module[{index}]: expected the same activation after every hidden "
                f"layer ({activation!r}), received {name!r}; fastntk networks use "
                f"one activation"
            )

    # widths must chain from one Linear layer to the next
    widths = [linears[0][1].in_features]
    for index, lin in linears:
        if lin.in_features != widths[-1]:
            raise ValueError(
                f"module[{index}]: expected in_features={widths[-1]} (the previous "
                f"layer's out_features), received {lin.in_features}"
            )
        widths.append(lin.out_features)

    # parameters, layer by layer, in the dtype asked for
    first = linears[0][1].weight
    if dtype is None:
        dtype = str(first.dtype).replace("torch.", "")
    dt = check_dtype("dtype", dtype)
    if C_W is None:
        C_W = 2.0 if activation in ("relu", "leaky_relu") else 1.0
    net = MLP(widths, activation=activation, C_b=C_b, C_W=C_W, slope=slope)
    theta = np.zeros(net.n_params, dtype=dt)
    params = net.params(theta, copy=False)
    with torch.no_grad():
        for l, (_, lin) in enumerate(linears):
            params.weights[l][...] = lin.weight.detach().cpu().double().numpy()
            if lin.bias is not None:
                params.biases[l][...] = lin.bias.detach().cpu().double().numpy()
    return net, net.params(theta, copy=False)


def to_torch(net, params, *, dtype=None):
    """A PyTorch ``nn.Sequential`` computing the same function as ``net``.

    Parameters
    ----------
    net : MLP
        Its activation must have a PyTorch module (not ``sin`` or ``erf``).
    params : Params
    dtype : {'float64', 'float32'}, optional
        Dtype of the PyTorch parameters; by default that of ``params``.

    Returns
    -------
    torch.nn.Sequential
        ``Linear, act, Linear, act, ..., Linear``; no activation module when
        ``net.activation == "linear"``.

    Examples
    --------
    >>> import fastntk  # doctest: +SKIP
    >>> net = fastntk.MLP([3, 8, 1], activation="relu")  # doctest: +SKIP
    >>> seq = fastntk.interop.to_torch(net, net.init(seed=0))  # doctest: +SKIP
    >>> [type(m).__name__ for m in seq]  # doctest: +SKIP
    ['Linear', 'ReLU', 'Linear']
    """
    from fastntk.engines.backprop import _check_net

    net = _check_net(net)
    params = net.check_params(params)
    dt = params.dtype if dtype is None else check_dtype("dtype", dtype)
    if net.activation in ("sin", "erf"):
        raise ValueError(
            f"net: activation {net.activation!r} has no PyTorch module; export "
            f"supports {', '.join(sorted({*_ACTIVATIONS.values(), 'linear'}))}"
        )
    torch = _torch()
    torch_dtype = getattr(torch, str(dt))

    # one Linear per layer with an activation module between them
    modules = []
    for l in range(net.depth):
        lin = torch.nn.Linear(net.widths[l], net.widths[l + 1], dtype=torch_dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(params.weights[l])))
            lin.bias.copy_(torch.from_numpy(np.array(params.biases[l])))
        modules.append(lin)
        if l < net.depth - 1 and net.activation != "linear":
            modules.append(_torch_activation(torch, net))
    return torch.nn.Sequential(*modules)


def _activation_of(index, layer):
    # fastntk name and slope of a supported PyTorch activation module.
    kind = type(layer).__name__
    if kind == "LeakyReLU":
        return "leaky_relu", float(layer.negative_slope)
    if kind == "GELU" and layer.approximate != "none":
        raise ValueError(
            f"module[{index}]: GELU(approximate={layer.approximate!r}) is not "
            f"supported; fastntk's gelu is the exact (erf) form, "
            f"GELU(approximate='none')"
        )
    if kind == "Softplus" and float(layer.beta) != 1.0:
        raise ValueError(
            f"module[{index}]: Softplus(beta={layer.beta}) is not supported; "
            f"fastntk's softplus has beta=1"
        )
    return _ACTIVATIONS[kind], 0.01


def _torch_activation(torch, net):
    # The PyTorch module of net's activation.
    nn = torch.nn
    return {
        "relu": lambda: nn.ReLU(),
        "leaky_relu": lambda: nn.LeakyReLU(negative_slope=net.slope),
        "tanh": lambda: nn.Tanh(),
        "sigmoid": lambda: nn.Sigmoid(),
        "gelu": lambda: nn.GELU(approximate="none"),
        "swish": lambda: nn.SiLU(),
        "softplus": lambda: nn.Softplus(beta=1.0),
    }[net.activation]()
