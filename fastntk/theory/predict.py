"""What one gradient step does, predicted through the NTK and checked by taking it.

One step of tensorial gradient descent on the training set A moves the
parameters by -eta lambda g, with g = dL_A/dtheta, the learning rate eta and the
learning-rate tensor lambda.  To first order in eta:

- the training loss changes by  -eta g^T lambda g = -eta eps_A^T H_AA eps_A,
  where eps = dL_A/dz is the error factor and H the NTK (never positive for a
  positive-semidefinite lambda);
- the outputs on any inputs D change by  Delta z_D = -eta H_DA eps_A, through
  the cross kernel between D and A;
- any observable O(z_D) of those outputs changes by
  -eta sum (dO/dz_D) H_DA eps_A.

Higher orders: along the step direction v = -lambda g the outputs expand as
Delta z = eta d_1 + (eta^2/2) d_2 + (eta^3/6) d_3 + ..., with d_1 = -H eps and
d_k the k-th directional derivative of z along v, computed exactly by
Taylor-mode propagation (:mod:`fastntk.theory.taylor`).  A prediction "of order
k" keeps the terms up to eta^k; the loss and observables of order k >= 2 are
evaluated on the outputs predicted to that order, O(z + Delta z_k) - O(z).
The gap between the prediction of order k and the actual change is O(eta^(k+1)):
:func:`residual_order` measures that exponent by halving eta.

Every prediction comes with the actual change, from one real step taken by
:func:`fastntk.train`, and the residual (actual minus predicted).

Conventions: the kernels come from :func:`fastntk.ntk` in its layout
``H[a, b, i, j]`` (samples first); ``rates=None`` means the layerwise tensor
with lambda_b = lambda_W = 1 (the NTK engine's default), which is also the
tensor handed to the training engine, so that both see the same lambda.  Under
``reduction="mean"`` the error factor carries the 1/P, and so do all
predictions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from fastntk._validation import as_samples, as_targets, check_int, check_positive
from fastntk.model.losses import check_loss
from fastntk.model.rates import check_rates
from fastntk.theory.activations import MAX_ORDER
from fastntk.theory.taylor import _directional_derivatives

logger = logging.getLogger(__name__)

QUANTITIES = ("loss", "outputs", "observable")


# -- observables --------------------------------------------------------------------


class Observable:
    """A scalar function of the network's outputs on a set of inputs.

    Parameters
    ----------
    x : array_like, shape (M, n_0)
        Inputs D on which the outputs are read.
    value : callable
        ``value(z) -> float`` for outputs ``z`` of shape (M, n_out).
    gradient : callable
        ``gradient(z) -> ndarray`` of shape (M, n_out): dO/dz.
    name : str

    Examples
    --------
    >>> import numpy as np
    >>> from fastntk.theory import Observable
    >>> mean_output = Observable(np.ones((4, 2)), value=lambda z: z[:, 0].mean(),
    ...                          gradient=lambda z: np.eye(2)[[0] * 4] / 4)
    """

    def __init__(self, x, value, gradient, name="observable"):
        if not callable(value) or not callable(gradient):
            raise TypeError(
                "value, gradient: expected two callables of the outputs z (shape "
                "(M, n_out)), returning a float and an array of z's shape"
            )
        self.x = x
        self.value = value
        self.gradient = gradient
        self.name = str(name)

    def __repr__(self):
        return f"Observable({self.name!r}, M={np.shape(self.x)[0]})"


def test_loss(x, y, loss) -> Observable:
    """The loss on a held-out set B, L_B(z_B), as an observable.

    Its gradient is the test set's error factor eps_B, so its first-order change
    is -eta eps_B^T H_BA eps_A.
    """
    loss = check_loss(loss)
    y = np.asarray(y)

    def value(z):
        return loss.value(z, y.astype(z.dtype, copy=False))

    def gradient(z):
        return loss.error(z, y.astype(z.dtype, copy=False))

    return Observable(x, value, gradient, name=f"test {loss!r}")


test_loss.__test__ = False  # not a test function for pytest


def output_component(x, sample, output) -> Observable:
    """One output component z_{output; sample} on the inputs ``x``."""
    sample = check_int("sample", sample, 0)
    output = check_int("output", output, 0)

    def value(z):
        return float(z[sample, output])

    def gradient(z):
        g = np.zeros_like(z)
        g[sample, output] = 1.0
        return g

    return Observable(x, value, gradient, name=f"z[{sample}, {output}]")


def output_product(x, first, second) -> Observable:
    """The product z_{i1; a1} z_{i2; a2} of two output components on ``x``.

    ``first`` and ``second`` are (sample, output) pairs.
    """
    (a1, i1), (a2, i2) = first, second
    a1, i1 = check_int("first[0]", a1, 0), check_int("first[1]", i1, 0)
    a2, i2 = check_int("second[0]", a2, 0), check_int("second[1]", i2, 0)

    def value(z):
        return float(z[a1, i1] * z[a2, i2])

    def gradient(z):
        g = np.zeros_like(z)
        g[a1, i1] += z[a2, i2]
        g[a2, i2] += z[a1, i1]
        return g

    return Observable(x, value, gradient, name=f"z[{a1}, {i1}] z[{a2}, {i2}]")


# -- results ------------------------------------------------------------------------


@dataclass
class Prediction:
    """A predicted change, the actual change from taking the step, the residual.

    Attributes
    ----------
    quantity : str
        ``"loss"``, ``"outputs"`` or the observable's name.
    lr : float
        The learning rate eta of the step.
    order : int
        Highest power of eta kept in the prediction.
    predicted, actual : float or ndarray
        Predicted and actual change (for outputs: shape (M, n_out)).
    extra : dict
        Further forms of the same prediction (the loss's ``"gradient_form"``
        -eta g^T lambda g next to the kernel form -eta eps^T H eps).
    """

    quantity: str
    lr: float
    order: int
    predicted: object
    actual: object
    extra: dict = field(default_factory=dict)

    @property
    def residual(self):
        """actual - predicted."""
        return np.subtract(self.actual, self.predicted)

    @property
    def residual_norm(self) -> float:
        """Euclidean norm of the residual (absolute value for scalars)."""
        return float(np.linalg.norm(np.ravel(self.residual)))

    @property
    def relative_residual(self) -> float:
        """Residual norm over the norm of the actual change."""
        scale = float(np.linalg.norm(np.ravel(self.actual)))
        return self.residual_norm / scale if scale > 0 else math.inf


@dataclass
class ResidualOrder:
    """How the residual of a prediction shrinks with the learning rate.

    Attributes
    ----------
    lrs : ndarray
        eta, eta/2, eta/4, ...
    residuals : ndarray
        Residual norm at each learning rate.
    exponent : float
        Least-squares slope of log(residual) against log(eta): about k + 1 for a
        prediction of order k.
    predictions : list of Prediction
    """

    lrs: np.ndarray
    residuals: np.ndarray
    exponent: float
    predictions: list

    def __repr__(self):
        return (
            f"ResidualOrder(exponent={self.exponent:.3f}, lrs={self.lrs.tolist()}, "
            f"residuals={[f'{r:.3e}' for r in self.residuals]})"
        )


# -- the step and its predictions ----------------------------------------------------


class OneStep:
    """One gradient step on a training set, and what the NTK predicts of it.

    The gradient, the error factor and the step direction are computed once;
    the kernels and Taylor terms once per set of inputs; the real step once per
    learning rate.

    Parameters
    ----------
    net : MLP
    params : Params
    x : array_like, shape (P, n_0)
        Training inputs A, in the parameters' dtype.
    y : array_like, shape (P, n_out)
        Training targets.
    loss : Loss or str
        ``fastntk.MSE()``, ``fastntk.CrossEntropy()`` (reduction "sum" or
        "mean"), ``"mse"`` or ``"cross_entropy"``.
    rates : Rates, optional
        Learning-rate tensor; ``None`` means layerwise with lambda_b = lambda_W
        = 1.
    threads : int, optional
        Threads for the kernels, the step and the forward passes.

    Examples
    --------
    >>> import numpy as np, fastntk
    >>> from fastntk.theory import OneStep
    >>> rng = np.random.default_rng(0)
    >>> net = fastntk.MLP([3, 32, 1], activation="tanh", C_W=1.0)
    >>> params = net.init(seed=0)
    >>> x, y = rng.standard_normal((8, 3)), rng.standard_normal((8, 1))
    >>> step = OneStep(net, params, x, y, loss=fastntk.MSE())
    >>> change = step.loss_change(0.01)
    >>> bool(change.predicted < 0 and change.actual < 0)
    True
    >>> step.residual_order("outputs", 0.05, order=2).exponent > 2.5
    True
    """

    def __init__(self, net, params, x, y, *, loss, rates=None, threads=None):
        from fastntk.engines.backprop import _check_net, loss_and_gradient

        self.net = _check_net(net)
        self.params = net.check_params(params)
        self.loss = check_loss(loss)
        self.rates = check_rates(rates, net)
        self.threads = threads
        self.x = as_samples("x", x, net.n_in, params.dtype)
        self.y = as_targets("y", y, self.x.shape[0], net.n_out, params.dtype)

        # outputs, loss, error factor eps = dL/dz and gradient g = dL/dtheta
        self.z = net.apply(params, self.x, threads=threads)
        self.loss_value, self.eps = self.loss.value_and_error(self.z, self.y)
        _, grad = loss_and_gradient(
            net, params, self.x, self.y, self.loss, threads=threads
        )
        self.gradient = grad.astype(np.float64)

        # step direction v = -lambda g, and the first-order loss change per eta
        self.direction = -self.rates.apply(net, self.gradient)
        self.g_lambda_g = float(-self.gradient @ self.direction)
        self._train_kernel = None
        self._steps = {}

    # -- building blocks ----------------------------------------------------------

    def kernel(self, x_eval=None) -> np.ndarray:
        """NTK between ``x_eval`` (default: the training inputs) and the training
        inputs, shape (M, P, n_out, n_out), from :func:`fastntk.ntk`."""
        import fastntk

        if x_eval is None:
            if self._train_kernel is None:
                self._train_kernel = fastntk.ntk(
                    self.net,
                    self.params,
                    self.x,
                    rates=self.rates,
                    threads=self.threads,
                )
            return self._train_kernel
        x_eval = as_samples("x_eval", x_eval, self.net.n_in, self.params.dtype)
        return fastntk.ntk(
            self.net,
            self.params,
            x_eval,
            self.x,
            rates=self.rates,
            threads=self.threads,
        )

    def output_terms(self, x_eval=None, order=1) -> np.ndarray:
        """Coefficients T_k of eta^k in the output change, k = 1..order.

        T_1 = -H_DA eps_A (through the cross kernel) and T_k = d_k / k! for
        k >= 2 (Taylor-mode derivatives along the step direction).

        Returns
        -------
        ndarray, shape (order, M, n_out), float64
        """
        order = _check_order(order)
        x_eval = (
            self.x
            if x_eval is None
            else as_samples("x_eval", x_eval, self.net.n_in, self.params.dtype)
        )
        H = self.kernel(None if x_eval is self.x else x_eval).astype(np.float64)
        terms = np.empty((order, x_eval.shape[0], self.net.n_out))

        # first order: Delta z_{d,i} = -eta sum_{a,j} H[d, a, i, j] eps[a, j]
        terms[0] = -np.einsum("daij,aj->di", H, self.eps.astype(np.float64))

        # higher orders: d_k / k! along v = -lambda g
        if order >= 2:
            v = self.direction.astype(self.params.dtype)
            d = _directional_derivatives(
                self.net, self.params.theta, x_eval, v, order, self.threads
            )
            for k in range(2, order + 1):
                terms[k - 1] = d[k] / math.factorial(k)
        return terms

    def step(self, lr):
        """Parameters after one real step of learning rate ``lr`` (cached),
        taken by :func:`fastntk.train` with the same loss and tensor."""
        import fastntk

        lr = check_positive("lr", lr)
        if lr not in self._steps:
            new, _ = fastntk.train(
                self.net,
                self.params,
                self.x,
                self.y,
                loss=self.loss,
                lr=lr,
                rates=self.rates,
                steps=1,
                threads=self.threads,
            )
            self._steps[lr] = new
        return self._steps[lr]

    def _outputs_after(self, lr, x):
        return self.net.apply(self.step(lr), x, threads=self.threads)

    # -- predictions ----------------------------------------------------------------

    def loss_change(self, lr, order=1) -> Prediction:
        """Change of the training loss after one step of learning rate ``lr``.

        Order 1 is -eta eps^T H eps (``predicted``), given alongside as
        -eta g^T lambda g (``extra["gradient_form"]``); the two agree to
        rounding.  Order k >= 2 is L(z + Delta z_k) - L(z).
        """
        return self._loss_quantity(order)(check_positive("lr", lr))

    def output_change(self, lr, x_eval=None, order=1) -> Prediction:
        """Change of the outputs on ``x_eval`` (default: the training inputs)."""
        return self._output_quantity(x_eval, order)(check_positive("lr", lr))

    def observable_change(self, lr, observable, order=1) -> Prediction:
        """Change of an :class:`Observable` of the outputs."""
        return self._observable_quantity(observable, order)(check_positive("lr", lr))

    def residual_order(
        self, quantity, lr, *, x_eval=None, observable=None, order=1, halvings=2
    ) -> ResidualOrder:
        """Fit the exponent of the residual over eta, eta/2, ..., eta/2^halvings.

        Parameters
        ----------
        quantity : {"loss", "outputs", "observable"}
        lr : float
            The largest learning rate eta.
        x_eval : array_like, optional
            Inputs of the output change.
        observable : Observable, optional
            Required for ``quantity="observable"``.
        order : int
            Order of the prediction, 1 to 3: the exponent is about order + 1.
        halvings : int
            Number of halvings of eta (at least 1).
        """
        lr = check_positive("lr", lr)
        halvings = check_int("halvings", halvings, 1)
        if quantity == "loss":
            predict = self._loss_quantity(order)
        elif quantity == "outputs":
            predict = self._output_quantity(x_eval, order)
        elif quantity == "observable":
            if observable is None:
                raise ValueError(
                    "observable: expected an Observable for quantity='observable', "
                    "received None"
                )
            predict = self._observable_quantity(observable, order)
        else:
            raise ValueError(
                f"quantity: expected one of {', '.join(map(repr, QUANTITIES))}, "
                f"received {quantity!r}"
            )
        lrs = lr / 2.0 ** np.arange(halvings + 1)
        predictions = [predict(float(eta)) for eta in lrs]
        residuals = np.array([p.residual_norm for p in predictions])
        exponent = _fit_exponent(lrs, residuals)
        logger.debug("residual order of %s (order %d): %.3f", quantity, order, exponent)
        return ResidualOrder(
            lrs=lrs, residuals=residuals, exponent=exponent, predictions=predictions
        )

    # -- quantities: functions of eta returning a Prediction ------------------------

    def _loss_quantity(self, order):
        order = _check_order(order)
        if order == 1:
            H = self.kernel().astype(np.float64)
            eps = self.eps.astype(np.float64)
            # eps^T H eps over samples and outputs
            eps_h_eps = float(np.einsum("ai,abij,bj->", eps, H, eps))
        else:
            terms = self.output_terms(None, order)

        def predict(lr):
            actual = self.loss.value(self._outputs_after(lr, self.x), self.y)
            actual -= self.loss_value
            if order == 1:
                predicted = -lr * eps_h_eps
                extra = {"gradient_form": -lr * self.g_lambda_g}
            else:
                z = self.z.astype(np.float64) + _series(terms, lr)
                predicted = self.loss.value(z, self.y.astype(np.float64))
                predicted -= self.loss_value
                extra = {}
            return Prediction("loss", lr, order, predicted, actual, extra)

        return predict

    def _output_quantity(self, x_eval, order):
        order = _check_order(order)
        if x_eval is None:
            x_eval = self.x
        else:
            x_eval = as_samples("x_eval", x_eval, self.net.n_in, self.params.dtype)
        terms = self.output_terms(x_eval, order)
        z0 = (
            self.z
            if x_eval is self.x
            else self.net.apply(self.params, x_eval, threads=self.threads)
        )

        def predict(lr):
            actual = self._outputs_after(lr, x_eval).astype(np.float64) - z0.astype(
                np.float64
            )
            return Prediction("outputs", lr, order, _series(terms, lr), actual)

        return predict

    def _observable_quantity(self, observable, order):
        if not isinstance(observable, Observable):
            raise TypeError(
                f"observable: expected a fastntk.theory.Observable (or one of "
                f"test_loss, output_component, output_product), received "
                f"{type(observable).__name__}"
            )
        order = _check_order(order)
        x_obs = as_samples(
            "observable.x", observable.x, self.net.n_in, self.params.dtype
        )
        terms = self.output_terms(x_obs, order)
        z0 = self.net.apply(self.params, x_obs, threads=self.threads)
        z0 = z0.astype(np.float64)
        value0 = float(observable.value(z0))
        if order == 1:
            grad = np.asarray(observable.gradient(z0), dtype=np.float64)
            if grad.shape != z0.shape:
                raise ValueError(
                    f"observable.gradient: expected an array of shape {z0.shape} "
                    f"(that of the outputs), received shape {grad.shape}"
                )
            # -eta sum (dO/dz_D) H_DA eps_A, per unit eta
            slope = float(np.sum(grad * terms[0]))

        def predict(lr):
            z1 = self._outputs_after(lr, x_obs).astype(np.float64)
            actual = float(observable.value(z1)) - value0
            if order == 1:
                predicted = lr * slope
            else:
                predicted = float(observable.value(z0 + _series(terms, lr))) - value0
            return Prediction(observable.name, lr, order, predicted, actual)

        return predict


def _check_order(order):
    order = check_int("order", order, 1)
    if order > MAX_ORDER:
        raise ValueError(
            f"order: expected an integer from 1 to {MAX_ORDER}, received {order}"
        )
    return order


def _series(terms, lr):
    # sum_k lr^k T_k for terms T_1 .. T_order
    total = np.zeros_like(terms[0])
    for k in range(terms.shape[0], 0, -1):
        total = lr * (total + terms[k - 1])
    return total


def _fit_exponent(lrs, residuals):
    # slope of log(residual) against log(lr), by least squares
    if np.any(residuals <= 0) or not np.all(np.isfinite(residuals)):
        return math.nan
    return float(np.polyfit(np.log(lrs), np.log(residuals), 1)[0])


# -- function forms ------------------------------------------------------------------


def _one_step(net, params, x, y, loss, rates, threads):
    return OneStep(net, params, x, y, loss=loss, rates=rates, threads=threads)


def predict_loss_change(
    net, params, x, y, *, loss, lr, rates=None, order=1, threads=None
) -> Prediction:
    """Predicted and actual change of the training loss after one step.

    See :meth:`OneStep.loss_change`.  ``predicted`` is -eta eps^T H eps (order
    1) and ``extra["gradient_form"]`` is -eta g^T lambda g.

    Examples
    --------
    >>> import numpy as np, fastntk
    >>> from fastntk.theory import predict_loss_change
    >>> rng = np.random.default_rng(0)
    >>> net = fastntk.MLP([3, 16, 2], activation="erf", C_W=1.5)
    >>> x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    >>> p = predict_loss_change(net, net.init(seed=0), x, y, loss="mse", lr=1e-3)
    >>> bool(abs(p.predicted - p.extra["gradient_form"]) < 1e-10 * abs(p.predicted))
    True
    """
    return _one_step(net, params, x, y, loss, rates, threads).loss_change(lr, order)


def predict_output_change(
    net, params, x, y, x_eval=None, *, loss, lr, rates=None, order=1, threads=None
) -> Prediction:
    """Predicted and actual change of the outputs on ``x_eval`` after one step.

    See :meth:`OneStep.output_change`; ``predicted`` has shape (M, n_out).
    """
    step = _one_step(net, params, x, y, loss, rates, threads)
    return step.output_change(lr, x_eval, order)


def predict_observable_change(
    net, params, x, y, observable, *, loss, lr, rates=None, order=1, threads=None
) -> Prediction:
    """Predicted and actual change of an observable after one step.

    See :meth:`OneStep.observable_change` and :class:`Observable`.
    """
    step = _one_step(net, params, x, y, loss, rates, threads)
    return step.observable_change(lr, observable, order)


def residual_order(
    net,
    params,
    x,
    y,
    *,
    loss,
    lr,
    quantity="outputs",
    x_eval=None,
    observable=None,
    rates=None,
    order=1,
    halvings=2,
    threads=None,
) -> ResidualOrder:
    """Exponent of the residual of a one-step prediction, from eta, eta/2, eta/4.

    The residual of a prediction of order k falls like eta^(k+1): the fitted
    exponent is about 2 for the NTK prediction, 3 and 4 with the second- and
    third-order terms.  See :meth:`OneStep.residual_order`.

    Examples
    --------
    >>> import numpy as np, fastntk
    >>> from fastntk.theory import residual_order
    >>> rng = np.random.default_rng(0)
    >>> net = fastntk.MLP([3, 32, 32, 1], activation="tanh", C_W=1.0)
    >>> x, y = rng.standard_normal((8, 3)), rng.standard_normal((8, 1))
    >>> r = residual_order(net, net.init(seed=0), x, y, loss="mse", lr=0.05)
    >>> bool(1.8 < r.exponent < 2.2)
    True
    """
    step = _one_step(net, params, x, y, loss, rates, threads)
    return step.residual_order(
        quantity,
        lr,
        x_eval=x_eval,
        observable=observable,
        order=order,
        halvings=halvings,
    )
