"""Losses and their error factor.

A training loss over a set A is the sum of per-sample losses (the default,
``reduction="sum"``) or their mean (``reduction="mean"``).  The error factor is
eps_{i;a} = dL_A / dz_{i;a}, the derivative of the whole loss with respect to each
output of each sample; every gradient and every NTK prediction of the loss goes
through it.

- Mean squared error: loss(z, y) = 1/2 sum_i (z_i - y_i)^2, eps = z - y.
- Softmax cross-entropy: loss(z, y) = -sum_i y_i log softmax(z)_i, with y one-hot
  or a probability vector; eps = softmax(z) sum_i y_i - y (= softmax(z) - y when
  the row of y sums to one).  Computed with a shifted log-sum-exp, so large
  logits neither overflow nor lose the loss.

Under the mean both the loss and eps are divided by the number of samples.
"""

from __future__ import annotations

import numpy as np

from fastntk._validation import as_array
from fastntk.kernels import cpu

REDUCTIONS = ("sum", "mean")


class Loss:
    """Base class: a per-sample loss with a reduction."""

    name = ""
    code = -1

    def __init__(self, reduction="sum"):
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"reduction: expected 'sum' or 'mean', received {reduction!r}"
            )
        self.reduction = reduction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.reduction == other.reduction

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.reduction))

    def scale(self, n_samples: int) -> float:
        """Factor applied to the summed loss: 1, or 1/P under the mean."""
        return 1.0 if self.reduction == "sum" else 1.0 / n_samples

    def _check(self, z, y):
        z = as_array("z", z, ndim=2)
        y = as_array("y", y, ndim=2, dtype=z.dtype)
        if y.shape != z.shape:
            raise ValueError(
                f"y: expected shape {z.shape} (that of the outputs z), received "
                f"shape {y.shape}"
            )
        return z, y

    def value_and_error(self, z, y):
        """Loss value and error factor eps = dL/dz (same shape as ``z``).

        Parameters
        ----------
        z : ndarray, shape (P, n_out)
            Network outputs.
        y : ndarray, shape (P, n_out)
            Targets, same dtype as ``z``.

        Returns
        -------
        value : float
        eps : ndarray, shape (P, n_out)
        """
        z, y = self._check(z, y)
        eps = np.empty_like(z)
        value = cpu._loss_error(z, y, self.code, self.scale(z.shape[0]), eps)
        return float(value), eps

    def value(self, z, y) -> float:
        """Loss value over all rows of ``z``."""
        return self.value_and_error(z, y)[0]

    def error(self, z, y) -> np.ndarray:
        """Error factor eps = dL/dz."""
        return self.value_and_error(z, y)[1]


class MSE(Loss):
    """Mean squared error, 1/2 sum_i (z_i - y_i)^2 per sample."""

    name = "mse"
    code = cpu.MSE


class CrossEntropy(Loss):
    """Softmax cross-entropy, -sum_i y_i log softmax(z)_i per sample."""

    name = "cross_entropy"
    code = cpu.CROSS_ENTROPY


def check_loss(loss) -> Loss:
    """Accept a Loss instance or the names 'mse' / 'cross_entropy'."""
    if isinstance(loss, Loss):
        return loss
    if loss == "mse":
        return MSE()
    if loss in ("cross_entropy", "xent"):
        return CrossEntropy()
    raise TypeError(
        f"loss: expected fastntk.MSE(), fastntk.CrossEntropy() or one of 'mse', "
        f"'cross_entropy', received {loss!r}"
    )
