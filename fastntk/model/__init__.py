"""The model layer: network description, parameters, losses, learning-rate tensors."""

from fastntk.model import rates
from fastntk.model.losses import MSE, CrossEntropy, Loss
from fastntk.model.mlp import MLP, Params

__all__ = ["MLP", "Params", "Loss", "MSE", "CrossEntropy", "rates"]
