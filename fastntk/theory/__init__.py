"""Theory toolkit: what the neural tangent kernel predicts, checked against training.

- :mod:`~fastntk.theory.infinite`: infinite-width kernels K^(l), Theta^(l).
- :mod:`~fastntk.theory.activations`: sigma'' and sigma''' of every activation.
"""

from fastntk.theory.activations import activation_derivatives
from fastntk.theory.infinite import (
    InfiniteKernels,
    gaussian_expectations,
    infinite_kernels,
    infinite_ntk,
)

__all__ = [
    "InfiniteKernels",
    "activation_derivatives",
    "gaussian_expectations",
    "infinite_kernels",
    "infinite_ntk",
]
