"""fastntk: fast exact neural tangent kernels and training of multilayer perceptrons.

The package is layered, data flowing from the top down:

- ``fastntk.cli``, ``fastntk.distributed``: command line and Dask shells;
- ``fastntk.theory``: predictions through the NTK, infinite width, ensembles;
- ``fastntk.engines``: gradients, the NTK engine, the training loop;
- ``fastntk.model``: network description, flat parameters, losses, rates;
- ``fastntk.kernels``: compiled kernels per backend and the NumPy reference.

Public names are imported on first use, so that ``import fastntk`` stays quick and
optional dependencies load only when needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "MLP": "fastntk.model.mlp",
    "Params": "fastntk.model.mlp",
    "Loss": "fastntk.model.losses",
    "MSE": "fastntk.model.losses",
    "CrossEntropy": "fastntk.model.losses",
    "gradient": "fastntk.engines.backprop",
    "jacobian": "fastntk.engines.backprop",
    "loss_and_gradient": "fastntk.engines.backprop",
    "ntk": "fastntk.engines.ntk",
    "ntk_flops": "fastntk.engines.ntk",
    "train": "fastntk.engines.train",
    "load_checkpoint": "fastntk.engines.train",
    "History": "fastntk.engines.train",
    "TrainingDiverged": "fastntk.engines.train",
    "save_params": "fastntk.model.io",
    "load_params": "fastntk.model.io",
}
# public submodules reachable as attributes
_SUBMODULES = {
    "rates": "fastntk.model.rates",
    "reference": "fastntk.kernels.reference",
    "theory": "fastntk.theory",
    "data": "fastntk.data",
    "interop": "fastntk.interop",
    "distributed": "fastntk.distributed",
}

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
    else:
        raise AttributeError(f"module 'fastntk' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
