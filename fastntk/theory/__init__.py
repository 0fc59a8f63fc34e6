"""Theory toolkit: what the neural tangent kernel predicts, checked against training.

- :mod:`~fastntk.theory.predict`: one-step predictions of the loss, the outputs
  and observables, with the actual step and the order of the residual.
- :mod:`~fastntk.theory.taylor`: exact directional derivatives of the outputs
  (the higher-order terms of a step).
- :mod:`~fastntk.theory.infinite`: infinite-width kernels K^(l), Theta^(l).
- :mod:`~fastntk.theory.ensemble`: NTK statistics over random initializations.
- :mod:`~fastntk.theory.linearized`: frozen-kernel dynamics of gradient descent,
  compared with the trained network.
- :mod:`~fastntk.theory.activations`: second and third derivatives of every
  activation.
"""

from fastntk.theory.activations import activation_derivatives
from fastntk.theory.ensemble import EnsembleStats, ntk_ensemble
from fastntk.theory.infinite import (
    InfiniteKernels,
    gaussian_expectations,
    infinite_kernels,
    infinite_ntk,
)
from fastntk.theory.linearized import (
    Linearized,
    LinearizedTrajectory,
    TrainingComparison,
    compare_with_training,
    linearized_outputs,
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
    "EnsembleStats",
    "InfiniteKernels",
    "Linearized",
    "LinearizedTrajectory",
    "Observable",
    "OneStep",
    "Prediction",
    "ResidualOrder",
    "TrainingComparison",
    "activation_derivatives",
    "compare_with_training",
    "directional_derivatives",
    "gaussian_expectations",
    "infinite_kernels",
    "infinite_ntk",
    "linearized_outputs",
    "ntk_ensemble",
    "output_component",
    "output_product",
    "predict_loss_change",
    "predict_observable_change",
    "predict_output_change",
    "residual_order",
    "test_loss",
]
