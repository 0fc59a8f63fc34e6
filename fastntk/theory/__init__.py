"""Theory toolkit: what the neural tangent kernel predicts, checked against training.

- :mod:`~fastntk.theory.infinite`: infinite-width kernels K^(l), Theta^(l).
- :mod:`~fastntk.theory.activations`: second and third derivatives of every
  activation.
- :mod:`~fastntk.theory.taylor`: exact directional derivatives of the outputs.
"""

from fastntk.theory.activations import activation_derivatives
from fastntk.theory.infinite import (
    InfiniteKernels,
    gaussian_expectations,
    infinite_kernels,
    infinite_ntk,
)
from fastntk.theory.taylor import directional_derivatives

__all__ = [
    "InfiniteKernels",
    "activation_derivatives",
    "directional_derivatives",
    "gaussian_expectations",
    "infinite_kernels",
    "infinite_ntk",
]
