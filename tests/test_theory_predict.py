"""One-step predictions through the NTK, checked against real steps."""

import numpy as np
import pytest

import fastntk
from fastntk.kernels import reference
from fastntk.theory import (
    Observable,
    OneStep,
    output_component,
    output_product,
    predict_loss_change,
    predict_observable_change,
    predict_output_change,
    residual_order,
)
from fastntk.theory import test_loss as held_out_loss

from tolerances import assert_close


def _problem(rng, activation="tanh", widths=(3, 24, 24, 2), P=8, loss="mse"):
    net = fastntk.MLP(list(widths), activation=activation, C_W=1.5, C_b=0.1)
    params = net.init(seed=3)
    x = rng.standard_normal((P, widths[0]))
    x_test = rng.standard_normal((5, widths[0]))
    if loss == "cross_entropy":
        y = np.eye(widths[-1])[rng.integers(0, widths[-1], P)]
        y_test = np.eye(widths[-1])[rng.integers(0, widths[-1], 5)]
    else:
        y = rng.standard_normal((P, widths[-1]))
        y_test = rng.standard_normal((5, widths[-1]))
    return net, params, x, y, x_test, y_test


def _tensors(net, rng):
    # one learning-rate tensor of each kind, all PSD
    A = rng.standard_normal((net.n_params, net.n_params)) / net.n_params
    return {
        "identity": fastntk.rates.identity(),
        "layerwise": fastntk.rates.layerwise(net, [0.5, 1.0, 2.0], [2.0, 1.0, 0.5]),
        "diagonal": fastntk.rates.diagonal(rng.uniform(0.0, 2.0, net.n_params)),
        "dense": fastntk.rates.dense(A @ A.T),
    }


def _safe_lr(step, fraction):
    # fraction / (largest eigenvalue of the step's effective kernel)
    H = step.kernel()
    P, n = H.shape[0], H.shape[2]
    flat = H.transpose(0, 2, 1, 3).reshape(P * n, P * n)
    return fraction / np.linalg.eigvalsh(flat)[-1] / step.loss.scale(P)


@pytest.mark.parametrize("loss", ["mse", "mean", "cross_entropy"])
@pytest.mark.parametrize("kind", ["identity", "layerwise", "diagonal", "dense"])
def test_gradient_and_kernel_forms_of_the_loss_change_agree(loss, kind, rng):
    net, params, x, y, _, _ = _problem(
        rng,
        widths=(3, 6, 5, 3),
        loss=("cross_entropy" if loss == "cross_entropy" else "mse"),
    )
    loss_obj = {
        "mse": fastntk.MSE(),
        "mean": fastntk.MSE(reduction="mean"),
        "cross_entropy": fastntk.CrossEntropy(),
    }[loss]
    rates = _tensors(net, rng)[kind]
    change = predict_loss_change(net, params, x, y, loss=loss_obj, lr=0.01, rates=rates)
    kernel_form = change.predicted
    gradient_form = change.extra["gradient_form"]
    assert abs(kernel_form - gradient_form) <= 1e-10 * abs(gradient_form), (
        f"{kind}/{loss}: -eta eps^T H eps = {kernel_form!r} vs -eta g^T lambda g = "
        f"{gradient_form!r}"
    )

    # both against the reference: full Jacobians and the dense tensor
    g = reference.gradient(net, params, x, y, loss_obj)
    want = -0.01 * g @ rates.matrix(net) @ g
    assert abs(gradient_form - want) <= 1e-10 * abs(want)


@pytest.mark.parametrize("kind", ["identity", "layerwise", "diagonal", "dense"])
def test_loss_decreases_for_small_lr_with_any_psd_tensor(kind, rng):
    net, params, x, y, _, _ = _problem(rng, widths=(3, 6, 5, 2))
    rates = _tensors(net, rng)[kind]
    step = OneStep(net, params, x, y, loss=fastntk.MSE(), rates=rates)
    lr = _safe_lr(step, 0.05)
    change = step.loss_change(lr)
    assert change.predicted < 0 and change.extra["gradient_form"] < 0
    assert change.actual < 0, f"{kind}: the loss rose by {change.actual}"
    assert abs(change.residual) < 0.1 * abs(change.predicted)


def test_rank_deficient_tensor_never_raises_the_loss(rng):
    # A PSD tensor that freezes every parameter but a few: the first-order
    # change is still <= 0.
    net, params, x, y, _, _ = _problem(rng, widths=(3, 6, 5, 2))
    d = np.zeros(net.n_params)
    d[rng.choice(net.n_params, 4, replace=False)] = 1.0
    change = predict_loss_change(
        net, params, x, y, loss="mse", lr=1e-3, rates=fastntk.rates.diagonal(d)
    )
    assert change.predicted <= 0 and change.actual <= 1e-15


def test_real_step_is_the_tensorial_gradient_step(rng):
    net, params, x, y, _, _ = _problem(rng, widths=(3, 6, 5, 2))
    rates = _tensors(net, rng)["dense"]
    step = OneStep(net, params, x, y, loss=fastntk.MSE(), rates=rates)
    want = reference.gd_step(net, params, x, y, fastntk.MSE(), 0.01, rates)
    assert_close(step.step(0.01).theta, want, "reference", np.float64, "step")
    assert step.step(0.01) is step.step(0.01)  # cached


def test_output_prediction_is_the_cross_kernel_contraction(rng):
    net, params, x, y, x_test, _ = _problem(rng)
    rates = fastntk.rates.layerwise(net, 0.5, 2.0)
    pred = predict_output_change(
        net, params, x, y, x_test, loss="mse", lr=0.01, rates=rates
    )
    H = reference.ntk(net, params, x_test, x, rates)
    eps = reference.error_factor(fastntk.MSE(), reference.apply(net, params, x), y)
    want = -0.01 * np.einsum("daij,aj->di", H, eps)
    assert_close(pred.predicted, want, "reference", np.float64, "Delta z_test")

    # the kernel term equals the first directional derivative along -lambda g
    step = OneStep(net, params, x, y, loss="mse", rates=rates)
    d1 = fastntk.theory.directional_derivatives(net, params, x_test, step.direction)
    assert_close(
        step.output_terms(x_test)[0],
        d1[1],
        "algorithms",
        np.float64,
        "kernel term vs Taylor d1",
    )


def test_observable_first_order_formulas(rng):
    net, params, x, y, x_test, y_test = _problem(rng)
    step = OneStep(net, params, x, y, loss="mse")
    lr = 0.01
    H = reference.ntk(net, params, x_test, x)
    eps_a = reference.error_factor(fastntk.MSE(), reference.apply(net, params, x), y)
    z_b = reference.apply(net, params, x_test)
    eps_b = reference.error_factor(fastntk.MSE(), z_b, y_test)
    dz = -lr * np.einsum("daij,aj->di", H, eps_a)

    # test loss: -eta eps_B^T H_BA eps_A
    p = step.observable_change(lr, held_out_loss(x_test, y_test, "mse"))
    want = -lr * np.einsum("di,daij,aj->", eps_b, H, eps_a)
    assert abs(p.predicted - want) <= 1e-11 * abs(want)

    # one component, and a product of two
    p = step.observable_change(lr, output_component(x_test, 3, 1))
    assert abs(p.predicted - dz[3, 1]) <= 1e-11 * abs(dz[3, 1])
    p = step.observable_change(lr, output_product(x_test, (0, 1), (2, 0)))
    want = z_b[2, 0] * dz[0, 1] + z_b[0, 1] * dz[2, 0]
    assert abs(p.predicted - want) <= 1e-11 * abs(want)


def _observables(x_test, y_test):
    # built-ins and a user-supplied one: the sum of squared outputs
    user = Observable(
        x_test,
        value=lambda z: float(np.sum(z * z)),
        gradient=lambda z: 2 * z,
        name="|z|^2",
    )
    return [
        held_out_loss(x_test, y_test, "mse"),
        output_component(x_test, 1, 0),
        output_product(x_test, (0, 0), (4, 1)),
        user,
    ]


@pytest.mark.parametrize("activation", ["tanh", "gelu", "erf", "relu"])
def test_first_order_residual_exponent_is_two(activation, rng):
    net, params, x, y, x_test, y_test = _problem(rng, activation=activation)
    step = OneStep(net, params, x, y, loss="mse")
    # relu: a step small enough that no preactivation crosses its kink
    lr = _safe_lr(step, 0.05 if activation != "relu" else 1e-3)
    results = {
        "loss": step.residual_order("loss", lr),
        "train outputs": step.residual_order("outputs", lr),
    }
    if activation != "relu":
        results["test outputs"] = step.residual_order("outputs", lr, x_eval=x_test)
        for obs in _observables(x_test, y_test):
            results[obs.name] = step.residual_order("observable", lr, observable=obs)
    for name, r in results.items():
        assert 1.8 <= r.exponent <= 2.2, f"{activation} {name}: {r}"


def test_first_order_residual_exponent_cross_entropy_and_mean(rng):
    net, params, x, y, x_test, _ = _problem(rng, loss="cross_entropy")
    for loss in (fastntk.CrossEntropy(), fastntk.CrossEntropy(reduction="mean")):
        step = OneStep(net, params, x, y, loss=loss, rates=fastntk.rates.identity())
        lr = _safe_lr(step, 0.05)
        for quantity in ("loss", "outputs"):
            r = step.residual_order(quantity, lr, x_eval=x_test)
            assert 1.8 <= r.exponent <= 2.2, f"{loss} {quantity}: {r}"


@pytest.mark.parametrize("activation", ["tanh", "gelu", "sin", "softplus"])
def test_higher_order_residual_exponents(activation, rng):
    net, params, x, y, x_test, _ = _problem(rng, activation=activation)
    step = OneStep(net, params, x, y, loss="mse")
    lr = _safe_lr(step, 0.1)
    for x_eval in (None, x_test):
        r2 = step.residual_order("outputs", lr, x_eval=x_eval, order=2)
        r3 = step.residual_order("outputs", lr, x_eval=x_eval, order=3)
        assert 2.8 <= r2.exponent <= 3.2, f"{activation} order 2: {r2}"
        assert 3.8 <= r3.exponent <= 4.2, f"{activation} order 3: {r3}"
        # each order shrinks the residual at the smallest learning rate
        r1 = step.residual_order("outputs", lr, x_eval=x_eval, order=1)
        assert r3.residuals[-1] < r2.residuals[-1] < r1.residuals[-1]


def test_higher_orders_of_the_loss_and_observables(rng):
    net, params, x, y, x_test, y_test = _problem(rng)
    step = OneStep(net, params, x, y, loss="mse")
    lr = _safe_lr(step, 0.02)
    r2 = step.residual_order("loss", lr, order=2)
    assert 2.8 <= r2.exponent <= 3.2, r2
    obs = held_out_loss(x_test, y_test, "mse")
    r2 = step.residual_order("observable", lr, observable=obs, order=2)
    assert 2.8 <= r2.exponent <= 3.2, r2


def test_mean_reduction_is_the_sum_at_a_scaled_rate(rng):
    net, params, x, y, x_test, _ = _problem(rng)
    P = x.shape[0]
    summed = predict_output_change(net, params, x, y, x_test, loss="mse", lr=0.02 / P)
    mean = predict_output_change(
        net, params, x, y, x_test, loss=fastntk.MSE(reduction="mean"), lr=0.02
    )
    assert_close(mean.predicted, summed.predicted, "algorithms", np.float64, "mean")
    assert_close(mean.actual, summed.actual, "reference", np.float64, "actual")


def test_function_forms_agree_with_one_step(rng):
    net, params, x, y, x_test, y_test = _problem(rng)
    obs = output_component(x_test, 0, 0)
    step = OneStep(net, params, x, y, loss="mse")
    a = predict_observable_change(net, params, x, y, obs, loss="mse", lr=0.01)
    b = step.observable_change(0.01, obs)
    assert a.predicted == b.predicted and a.actual == b.actual
    r = residual_order(net, params, x, y, loss="mse", lr=0.01, quantity="loss")
    assert r.lrs.tolist() == [0.01, 0.005, 0.0025]
    assert len(r.predictions) == 3 and r.residuals.shape == (3,)


def test_float32_parameters(rng):
    net, params, x, y, x_test, _ = _problem(rng)
    p32 = params.astype(np.float32)
    change = predict_loss_change(
        net, p32, x.astype(np.float32), y.astype(np.float32), loss="mse", lr=1e-3
    )
    assert abs(change.predicted - change.extra["gradient_form"]) <= 1e-4 * abs(
        change.predicted
    )
    assert change.actual < 0


def test_errors_name_the_argument(rng):
    net, params, x, y, x_test, _ = _problem(rng)
    step = OneStep(net, params, x, y, loss="mse")
    with pytest.raises(ValueError, match="lr"):
        step.loss_change(-1.0)
    with pytest.raises(ValueError, match="order"):
        step.output_change(0.1, order=4)
    with pytest.raises(ValueError, match="quantity"):
        step.residual_order("weights", 0.1)
    with pytest.raises(ValueError, match="observable"):
        step.residual_order("observable", 0.1)
    with pytest.raises(TypeError, match="observable"):
        step.observable_change(0.1, lambda z: 0.0)
    bad = Observable(x_test, value=lambda z: 0.0, gradient=lambda z: np.ones(3))
    with pytest.raises(ValueError, match="observable.gradient"):
        step.observable_change(0.1, bad)
    with pytest.raises(ValueError, match="x_eval"):
        step.output_change(0.1, x_eval=np.ones((2, 5)))
    with pytest.raises(TypeError, match="loss"):
        OneStep(net, params, x, y, loss="hinge")
    with pytest.raises(ValueError, match="y"):
        OneStep(net, params, x, y[:3], loss="mse")
