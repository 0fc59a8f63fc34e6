"""Bad input is refused before any work, with a message naming the argument."""

import numpy as np
import pytest

import fastntk

from helpers import make_problem


@pytest.fixture
def problem():
    return make_problem([3, 5, 2], "tanh", np.float64, P=4)


@pytest.mark.parametrize(
    "widths, exc, match",
    [
        ([3], ValueError, "at least two"),
        ([], ValueError, "at least two"),
        ([3, 0, 2], ValueError, r"widths\[1\]"),
        ([3, -4, 2], ValueError, r"widths\[1\]"),
        ([3, 2.5, 2], TypeError, r"widths\[1\]"),
        ([3, "4", 2], TypeError, r"widths\[1\]"),
        (7, TypeError, "widths"),
    ],
)
def test_bad_widths(widths, exc, match):
    with pytest.raises(exc, match=match):
        fastntk.MLP(widths)


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="activation.*relu.*received 'rleu'"):
        fastntk.MLP([2, 2], activation="rleu")


@pytest.mark.parametrize(
    "kw",
    [
        {"C_W": -1.0},
        {"C_b": -0.1},
        {"C_W": [1.0, -2.0]},
        {"C_b": [0.0, 0.0, 0.0]},
        {"C_W": float("nan")},
    ],
)
def test_negative_or_malformed_variances(kw):
    with pytest.raises(ValueError, match="C_"):
        fastntk.MLP([2, 3, 1], **kw)


@pytest.mark.parametrize("dtype", ["int32", "complex128", "float16", "object"])
def test_unsupported_parameter_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        fastntk.MLP([2, 1]).init(dtype=dtype)


def test_x_wrong_columns_or_dims(problem):
    net, params, x, y = problem
    with pytest.raises(ValueError, match=r"x: expected shape \(P, 3\)"):
        net.apply(params, x[:, :2])
    with pytest.raises(ValueError, match="x: expected a 2-D array"):
        net.apply(params, x[0])
    with pytest.raises(ValueError, match="x: expected a 2-D array"):
        fastntk.jacobian(net, params, x[None])
    with pytest.raises(ValueError, match="at least one sample"):
        net.apply(params, x[:0])


def test_y_shape_must_match_outputs(problem):
    net, params, x, y = problem
    with pytest.raises(ValueError, match=r"y: expected shape \(4, 2\)"):
        fastntk.gradient(net, params, x, y[:, :1])
    with pytest.raises(ValueError, match=r"y: expected shape \(4, 2\)"):
        fastntk.gradient(net, params, x, y[:3])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(problem, bad):
    net, params, x, y = problem
    xb = x.copy()
    xb[1, 2] = bad
    with pytest.raises(ValueError, match="x: expected finite values"):
        net.apply(params, xb)
    yb = y.copy()
    yb[0, 0] = bad
    with pytest.raises(ValueError, match="y: expected finite values"):
        fastntk.gradient(net, params, x, yb)
    pb = params.copy()
    pb.theta[3] = bad
    with pytest.raises(ValueError, match="theta: expected finite values"):
        net.apply(pb, x)
    with pytest.raises(ValueError, match="theta: expected finite values"):
        net.params(pb.theta)


@pytest.mark.parametrize("dtype", [np.int64, np.complex128, np.float16, bool])
def test_unsupported_input_dtype(problem, dtype):
    net, params, x, y = problem
    with pytest.raises(TypeError, match="x: expected"):
        net.apply(params, x.astype(dtype))


def test_mixed_dtypes_are_refused(problem):
    net, params, x, y = problem
    with pytest.raises(TypeError, match="x: expected dtype float64.*float32"):
        net.apply(params, x.astype(np.float32))
    with pytest.raises(TypeError, match="y: expected dtype float64"):
        fastntk.gradient(net, params, x, y.astype(np.float32))


def test_params_of_another_network(problem):
    net, params, x, y = problem
    other = fastntk.MLP([3, 4, 2]).init()
    with pytest.raises(ValueError, match="params: expected"):
        net.apply(other, x)
    with pytest.raises(TypeError, match="params: expected fastntk.Params"):
        net.apply(params.theta, x)
    with pytest.raises(ValueError, match="theta: expected length"):
        net.params(np.zeros(3))


def test_bad_reduction_and_loss():
    with pytest.raises(ValueError, match="reduction: expected 'sum' or 'mean'"):
        fastntk.MSE(reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        fastntk.CrossEntropy(reduction=None)
    net, params, x, y = make_problem([3, 2], P=2)
    with pytest.raises(TypeError, match="loss: expected"):
        fastntk.gradient(net, params, x, y, loss="hinge")


def test_bad_threads(problem):
    net, params, x, y = problem
    with pytest.raises(ValueError, match="threads"):
        net.apply(params, x, threads=0)
    with pytest.raises(TypeError, match="threads"):
        net.apply(params, x, threads=1.5)


def test_bad_learning_rate_tensors():
    net = fastntk.MLP([2, 3, 1])
    g = np.ones(net.n_params)
    with pytest.raises(ValueError, match="rates: expected a diagonal of length 13"):
        fastntk.rates.diagonal(np.ones(12)).apply(net, g)
    with pytest.raises(ValueError, match="non-negative"):
        fastntk.rates.diagonal(-np.ones(13))
    with pytest.raises(ValueError, match="square"):
        fastntk.rates.dense(np.ones((13, 12)))
    m = np.eye(13)
    m[0, 1] = 0.5
    with pytest.raises(ValueError, match="symmetric"):
        fastntk.rates.dense(m)
    m = np.eye(13)
    m[4, 4] = -1e-3
    with pytest.raises(ValueError, match="positive-semidefinite.*smallest eigenvalue"):
        fastntk.rates.dense(m)
    with pytest.raises(ValueError, match=r"shape \(13, 13\)"):
        fastntk.rates.dense(np.eye(5)).apply(net, g)
    with pytest.raises(ValueError, match="lambda_W"):
        fastntk.rates.layerwise(net, lambda_W=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="lambda_b"):
        fastntk.rates.layerwise(net, lambda_b=-1.0)
    with pytest.raises(ValueError, match="built for widths"):
        fastntk.rates.layerwise(fastntk.MLP([2, 4, 1])).apply(net, g)
    with pytest.raises(ValueError, match="finite"):
        fastntk.rates.dense(np.full((13, 13), np.nan))
