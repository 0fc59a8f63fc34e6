"""Theory toolkit: what the neural tangent kernel predicts, checked against training.

- :mod:`~fastntk.theory.infinite`: infinite-width kernels K^(l), Theta^(l).
- :mod:`~fastntk.theory.activations`: second and third derivatives of every
  activation.
- :mod:`~fastntk.theory.taylor`: exact directional derivatives of the outputs.
- :mod:`~fastntk.theory.predict`: one-step predictions of the loss, the outputs
  and observables, with the actual step and the order of the residual.
"""

from fastntk.theory.activations import activation_derivatives
from fastntk.theory.infinite import (
    InfiniteKernels,
    gaussian_expectations,
    infinite_kernels,
    infinite_ntk,
)
from fastntk.theory.predict import (
    Observable,
    OneStep,
    Prediction,
    ResidualOrder,
    output_component,
    output_product,
    predict_loss_change,
    predict_observable_change,
    predict_output_change,
    residual_order,
    test_loss,
)
from fastntk.theory.taylor import directional_derivatives

__all__ = [
    "InfiniteKernels",
    "Observable",
    "OneStep",
    "Prediction",
    "ResidualOrder",
    "output_component",
    "output_product",
    "predict_loss_change",
    "predict_observable_change",
    "predict_output_change",
    "residual_order",
    "test_loss",
    "activation_derivatives",
    "directional_derivatives",
    "gaussian_expectations",
    "infinite_kernels",
    "infinite_ntk",
]
