"""Linearized (frozen-kernel) dynamics of gradient descent on the squared error.

If the NTK did not change during training, full-batch gradient descent on the
mean squared error would move the training outputs as a linear recursion,

    z_A(t + 1) = z_A(t) - eta s H_AA (z_A(t) - y),      s = 1 (sum) or 1/P (mean),

with the solution

    z_A(t) = y + (I - eta s H_AA)^t (z_A(0) - y),

and the outputs on other inputs B would follow through the cross kernel,

    z_B(t) = z_B(0) - eta s H_BA sum_{u < t} (z_A(u) - y).

Both are evaluated for any step t from one eigendecomposition
s H_AA = V diag(lambda) V^T (no t-fold matrix products):
z_A(t) - y = V diag(q^t) V^T (z_A(0) - y) with q = 1 - eta lambda, and the sum
of the geometric series gives z_B(t) = z_B(0) - s H_BA V diag((1 - q^t) /
lambda) V^T (z_A(0) - y), where (1 - q^t) / lambda is read as eta t for
lambda = 0.  Outputs are flattened sample-major, (a, i) -> a n_out + i, and the
kernel ``H[a, b, i, j]`` of :func:`fastntk.ntk` accordingly to (a n_out + i,
b n_out + j).

A wide network stays close to this linear model; :func:`compare_with_training`
trains the real network with :func:`fastntk.train` and reports how far apart
the two are at the same steps, and how much the kernel itself moved.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass

import numpy as np

from fastntk._validation import as_samples, as_targets, check_positive
from fastntk.model.losses import MSE, check_loss
from fastntk.model.rates import check_rates

logger = logging.getLogger(__name__)


def _flat_kernel(H):
    # (P1, P2, n, n) -> (P1 n, P2 n), rows (a, i), columns (b, j)
    P1, P2, n, _ = H.shape
    return np.ascontiguousarray(H.transpose(0, 2, 1, 3)).reshape(P1 * n, P2 * n)


def _check_steps(steps):
    # Non-negative integer steps, as an int64 array.
    arr = np.atleast_1d(np.asarray(steps))
    if (
        arr.ndim != 1
        or arr.size == 0
        or not (
            np.issubdtype(arr.dtype, np.integer)
            or all(isinstance(s, numbers.Integral) for s in arr.tolist())
        )
    ):
        raise TypeError(
            f"steps: expected a non-negative integer or a 1-D sequence of them, "
            f"received {steps!r}"
        )
    arr = arr.astype(np.int64)
    if np.any(arr < 0):
        raise ValueError(f"steps: expected integers >= 0, received {arr.min()}")
    return arr


@dataclass
class LinearizedTrajectory:
    """Outputs of the linearized model at given steps.

    Attributes
    ----------
    steps : ndarray of int64, shape (T,)
    train : ndarray, shape (T, P, n_out), float64
    test : ndarray, shape (T, Q, n_out), float64, or None
    """

    steps: np.ndarray
    train: np.ndarray
    test: np.ndarray | None


class Linearized:
    """Frozen-kernel gradient descent on the squared error, solved exactly.

    Parameters
    ----------
    net : MLP
    params : Params
        Parameters at step 0 (the kernel is taken here).
    x : array_like, shape (P, n_0)
        Training inputs A.
    y : array_like, shape (P, n_out)
        Training targets.
    lr : float
        Learning rate eta.
    loss : MSE, optional
        ``fastntk.MSE()`` (default) or ``fastntk.MSE(reduction="mean")``.
    rates : Rates, optional
        Learning-rate tensor; ``None`` means layerwise with lambda_b = lambda_W
        = 1.
    x_test : array_like, shape (Q, n_0), optional
        Inputs B whose outputs follow through the cross kernel.
    threads : int, optional

    Attributes
    ----------
    eigenvalues : ndarray, shape (P n_out,)
        Eigenvalues of s H_AA (ascending); the dynamics is stable when all of
        them are below 2 / eta.

    Examples
    --------
    >>> import numpy as np, fastntk
    >>> from fastntk.theory import Linearized
    >>> rng = np.random.default_rng(0)
    >>> net = fastntk.MLP([3, 64, 1], activation="tanh", C_W=1.0)
    >>> params = net.init(seed=0)
    >>> x, y = rng.standard_normal((8, 3)), rng.standard_normal((8, 1))
    >>> lin = Linearized(net, params, x, y, lr=0.05)
    >>> traj = lin.trajectory([0, 10, 1000])
    >>> bool(np.allclose(traj.train[0], net.apply(params, x)))
    True
    """

    def __init__(
        self, net, params, x, y, *, lr, loss=None, rates=None, x_test=None, threads=None
    ):
        import fastntk
        from fastntk.engines.backprop import _check_net

        self.net = _check_net(net)
        self.params = net.check_params(params)
        self.lr = check_positive("lr", lr)
        self.loss = check_loss(loss if loss is not None else MSE())
        if not isinstance(self.loss, MSE):
            raise ValueError(
                f"loss: the linearized dynamics is solved for the squared error; "
                f"expected fastntk.MSE(), received {self.loss!r}"
            )
        self.rates = check_rates(rates, net)
        self.x = as_samples("x", x, net.n_in, params.dtype)
        self.y = as_targets("y", y, self.x.shape[0], net.n_out, params.dtype)
        self.x_test = (
            None
            if x_test is None
            else as_samples("x_test", x_test, net.n_in, params.dtype)
        )
        self.threads = threads
        P, n = self.x.shape[0], net.n_out
        scale = self.loss.scale(P)

        # effective kernel s H_AA and its eigendecomposition
        H = fastntk.ntk(net, params, self.x, rates=self.rates, threads=threads)
        self.kernel = scale * _flat_kernel(H.astype(np.float64))
        self.kernel = 0.5 * (self.kernel + self.kernel.T)
        self.eigenvalues, self.eigenvectors = np.linalg.eigh(self.kernel)

        # initial residual r0 = z_A(0) - y in the eigenbasis
        self.z0 = net.apply(params, self.x, threads=threads).astype(np.float64)
        self._target = self.y.astype(np.float64).reshape(P * n)
        self._coeffs = self.eigenvectors.T @ (self.z0.reshape(P * n) - self._target)

        # cross kernel s H_BA, already in the eigenbasis
        self._cross = None
        if self.x_test is not None:
            Hb = fastntk.ntk(
                net, params, self.x_test, self.x, rates=self.rates, threads=threads
            )
            self._cross = (
                scale * _flat_kernel(Hb.astype(np.float64)) @ (self.eigenvectors)
            )
            self.z0_test = net.apply(params, self.x_test, threads=threads).astype(
                np.float64
            )
        if self.eigenvalues[-1] * self.lr >= 2.0:
            logger.warning(
                "linearized dynamics diverges: eta * largest eigenvalue = %.3g >= 2",
                self.eigenvalues[-1] * self.lr,
            )

    def _powers(self, steps):
        # q^t for q = 1 - eta lambda, shape (T, P n)
        q = 1.0 - self.lr * self.eigenvalues
        return q[None, :] ** steps[:, None].astype(np.float64)

    def _geometric(self, steps):
        # eta sum_{u < t} q^u = (1 - q^t) / lambda, shape (T, P n); eta t at 0
        lam = self.eigenvalues[None, :]
        t = steps[:, None].astype(np.float64)
        x = self.lr * lam
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # -expm1(t log(1 - x)) is accurate for small x; direct form otherwise
            small = np.abs(x) < 0.5
            direct = (1.0 - (1.0 - x) ** t) / lam
            series = -np.expm1(t * np.log1p(-np.where(small, x, 0.0))) / lam
            out = np.where(small, series, direct)
        return np.where(lam == 0.0, self.lr * t, out)

    def train_outputs(self, steps) -> np.ndarray:
        """z_A(t) for each t in ``steps``: shape (T, P, n_out), float64."""
        steps = _check_steps(steps)
        P, n = self.x.shape[0], self.net.n_out
        resid = (self._powers(steps) * self._coeffs) @ self.eigenvectors.T
        return (self._target + resid).reshape(len(steps), P, n)

    def test_outputs(self, steps) -> np.ndarray:
        """z_B(t) for each t in ``steps``: shape (T, Q, n_out), float64."""
        if self._cross is None:
            raise ValueError(
                "x_test: expected test inputs at construction to follow their "
                "outputs, received None"
            )
        steps = _check_steps(steps)
        change = (self._geometric(steps) * self._coeffs) @ self._cross.T
        return self.z0_test[None] - change.reshape(len(steps), *self.z0_test.shape)

    def trajectory(self, steps) -> LinearizedTrajectory:
        """Training (and test) outputs at the given steps."""
        steps = _check_steps(steps)
        test = None if self._cross is None else self.test_outputs(steps)
        return LinearizedTrajectory(steps, self.train_outputs(steps), test)


@dataclass
class TrainingComparison:
    """The linearized model next to the real network, at the same steps.

    Attributes
    ----------
    steps : ndarray of int64, shape (T,)
    linear : LinearizedTrajectory
    train : ndarray, shape (T, P, n_out)
        Real network's outputs on the training inputs.
    test : ndarray, shape (T, Q, n_out) or None
    kernel_drift : ndarray, shape (T,)
        ||H(t) - H(0)||_F / ||H(0)||_F of the training kernel.
    """

    steps: np.ndarray
    linear: LinearizedTrajectory
    train: np.ndarray
    test: np.ndarray | None
    kernel_drift: np.ndarray

    def train_gap(self) -> np.ndarray:
        """||z_real - z_linear|| over samples and outputs at each step, divided
        by ||z_real(t) - z(0)||, the distance the outputs travelled (0/0 -> 0)."""
        return _relative_gap(self.train, self.linear.train)

    def test_gap(self) -> np.ndarray:
        """The same on the test inputs."""
        if self.test is None:
            raise ValueError("x_test: the comparison was run without test inputs")
        return _relative_gap(self.test, self.linear.test)


def _relative_gap(real, linear):
    gap = np.linalg.norm((real - linear).reshape(len(real), -1), axis=1)
    moved = np.linalg.norm((real - real[:1]).reshape(len(real), -1), axis=1)
    return np.divide(gap, moved, out=np.zeros_like(gap), where=moved > 0)


def linearized_outputs(
    net, params, x, y, *, lr, steps, loss=None, rates=None, x_test=None, threads=None
) -> LinearizedTrajectory:
    """Outputs of the frozen-kernel model at the given steps.

    See :class:`Linearized`.

    Examples
    --------
    >>> import numpy as np, fastntk
    >>> from fastntk.theory import linearized_outputs
    >>> net = fastntk.MLP([2, 32, 1], activation="erf")
    >>> x, y = np.eye(2), np.ones((2, 1))
    >>> traj = linearized_outputs(net, net.init(seed=0), x, y, lr=0.1,
    ...                           steps=[0, 10_000])
    >>> bool(np.allclose(traj.train[-1], y))
    True
    """
    lin = Linearized(
        net, params, x, y, lr=lr, loss=loss, rates=rates, x_test=x_test, threads=threads
    )
    return lin.trajectory(steps)


def compare_with_training(
    net, params, x, y, *, lr, steps, loss=None, rates=None, x_test=None, threads=None
) -> TrainingComparison:
    """Train the real network and the linearized model side by side.

    The real network is trained by full-batch gradient descent with
    :func:`fastntk.train` (same loss, learning rate and tensor), stopping at
    each requested step to read its outputs and kernel.

    Parameters
    ----------
    net, params, x, y, lr, loss, rates, x_test, threads
        As in :class:`Linearized`.
    steps : sequence of int
        Steps at which to compare, >= 0 (sorted and made unique; step 0 is
        always included).

    Returns
    -------
    TrainingComparison
    """
    import fastntk

    lin = Linearized(
        net, params, x, y, lr=lr, loss=loss, rates=rates, x_test=x_test, threads=threads
    )
    steps = np.unique(np.concatenate([[0], _check_steps(steps)]))
    linear = lin.trajectory(steps)
    H0 = lin.kernel / lin.loss.scale(lin.x.shape[0])
    norm0 = np.linalg.norm(H0)

    # the real network, trained segment by segment up to each requested step
    train, test, drift = [], [], []
    current, done = lin.params, 0
    for t in steps:
        if t > done:
            current, _ = fastntk.train(
                net,
                current,
                lin.x,
                lin.y,
                loss=lin.loss,
                lr=lin.lr,
                rates=lin.rates,
                steps=int(t - done),
                record_every=int(t - done),
                threads=threads,
            )
            done = int(t)
        train.append(net.apply(current, lin.x, threads=threads))
        if lin.x_test is not None:
            test.append(net.apply(current, lin.x_test, threads=threads))
        H = _flat_kernel(
            fastntk.ntk(net, current, lin.x, rates=lin.rates, threads=threads).astype(
                np.float64
            )
        )
        drift.append(np.linalg.norm(H - H0) / norm0)
        logger.debug("compared at step %d: kernel drift %.3g", t, drift[-1])
    return TrainingComparison(
        steps=steps,
        linear=linear,
        train=np.asarray(train, dtype=np.float64),
        test=np.asarray(test, dtype=np.float64) if test else None,
        kernel_drift=np.asarray(drift),
    )
