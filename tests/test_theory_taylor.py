"""sigma'' and sigma''', and Taylor-mode directional derivatives of the outputs."""

import numpy as np
import pytest

import fastntk
from fastntk.kernels import reference
from fastntk.theory import activation_derivatives, directional_derivatives

from tolerances import assert_close

ACTIVATIONS = list(reference.ACTIVATIONS)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivatives_match_finite_differences(activation):
    # points away from the kink of relu / leaky_relu at 0
    x = np.concatenate([np.linspace(-4.0, -0.05, 40), np.linspace(0.05, 4.0, 40)])
    h = 1e-5
    d = activation_derivatives(activation, x, slope=0.2)
    f, df = reference.ACTIVATIONS[activation]
    assert_close(d[0], f(x, 0.2), "reference", np.float64, f"{activation} sigma")
    assert_close(d[1], df(x, 0.2), "reference", np.float64, f"{activation} sigma'")
    dp = activation_derivatives(activation, x + h, slope=0.2)
    dm = activation_derivatives(activation, x - h, slope=0.2)
    for k in (1, 2, 3):
        # the k-th derivative is the central difference of the (k-1)-th
        fd = (dp[k - 1] - dm[k - 1]) / (2 * h)
        err = np.max(np.abs(d[k] - fd)) / max(1.0, np.max(np.abs(fd)))
        assert err < 1e-8, f"{activation}: derivative {k} vs finite differences {err}"


def test_activation_derivatives_shape_and_order():
    x = np.linspace(-1, 1, 6).reshape(2, 3).astype(np.float32)
    d = activation_derivatives("tanh", x, order=2)
    assert d.shape == (3, 2, 3) and d.dtype == np.float32
    with pytest.raises(ValueError, match="order"):
        activation_derivatives("tanh", x, order=4)
    with pytest.raises(ValueError, match="activation"):
        activation_derivatives("cube", x)


def _net_and_line(activation, rng, widths=(3, 7, 5, 2)):
    net = fastntk.MLP(list(widths), activation=activation, C_W=1.2, C_b=0.1, slope=0.2)
    params = net.init(seed=1)
    x = rng.standard_normal((4, widths[0]))
    v = 0.3 * rng.standard_normal(net.n_params)
    return net, params, x, v


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_directional_derivatives(activation, rng):
    net, params, x, v = _net_and_line(activation, rng)
    d = directional_derivatives(net, params, x, v, order=3)
    assert d.shape == (4, 4, 2)

    # order 0 is the output, order 1 the Jacobian-vector product
    assert_close(d[0], reference.apply(net, params, x), "reference", np.float64, "z")
    jvp = reference.jacobian(net, params, x) @ v
    assert_close(d[1], jvp, "reference", np.float64, f"{activation} d1")

    # order 2: central difference of the exact Jacobian-vector product
    h = 1e-4
    plus, minus = net.params(params.theta + h * v), net.params(params.theta - h * v)
    fd2 = reference.jacobian(net, plus, x) @ v - reference.jacobian(net, minus, x) @ v
    assert_close(
        d[2], fd2 / (2 * h), "finite_difference", np.float64, f"{activation} d2"
    )

    # order 3: central difference of order 2
    dp = directional_derivatives(net, plus, x, v, order=2)[2]
    dm = directional_derivatives(net, minus, x, v, order=2)[2]
    assert_close(
        d[3], (dp - dm) / (2 * h), "finite_difference", np.float64, f"{activation} d3"
    )


@pytest.mark.parametrize("activation", ["tanh", "gelu", "sin"])
def test_directional_derivatives_match_output_stencils(activation, rng):
    # Independent of the code under test: five- and seven-point stencils of z.
    net, params, x, v = _net_and_line(activation, rng)
    d = directional_derivatives(net, params, x, v)

    def z(s):
        return reference.apply(net, net.params(params.theta + s * v), x)

    h = 1e-2
    d2 = (-z(2 * h) + 16 * z(h) - 30 * z(0) + 16 * z(-h) - z(-2 * h)) / (12 * h * h)
    d3 = (
        -z(3 * h) + 8 * z(2 * h) - 13 * z(h) + 13 * z(-h) - 8 * z(-2 * h) + z(-3 * h)
    ) / (8 * h**3)
    assert np.max(np.abs(d[2] - d2)) < 1e-6 * np.max(np.abs(d2))
    assert np.max(np.abs(d[3] - d3)) < 1e-5 * np.max(np.abs(d3))


def test_directional_derivatives_blocks_float32_and_order(rng, monkeypatch):
    net, params, x, v = _net_and_line("tanh", rng)
    x = rng.standard_normal((300, 3))  # more samples than one block
    full = directional_derivatives(net, params, x, v)
    low = directional_derivatives(net, params, x, v, order=1)
    assert np.array_equal(low, full[:2])
    p32 = params.astype(np.float32)
    d32 = directional_derivatives(net, p32, x.astype(np.float32), v.astype(np.float32))
    assert d32.dtype == np.float32
    for k in range(4):
        assert_close(d32[k], full[k], "reference", np.float32, f"float32 d{k}")
    # a Params object is accepted as the direction
    as_params = directional_derivatives(net, params, x[:5], net.params(v), order=3)
    assert np.array_equal(as_params, full[:, :5])


def test_one_sample_one_unit_one_output(rng):
    net = fastntk.MLP([1, 1, 1], activation="sigmoid")
    params = net.init(seed=0)
    v = rng.standard_normal(net.n_params)
    d = directional_derivatives(net, params, np.array([[0.7]]), v)
    jvp = reference.jacobian(net, params, np.array([[0.7]])) @ v
    assert_close(d[1], jvp, "reference", np.float64, "d1")


def test_directional_derivatives_errors(rng):
    net, params, x, v = _net_and_line("tanh", rng)
    with pytest.raises(ValueError, match="direction"):
        directional_derivatives(net, params, x, v[:-1])
    with pytest.raises(TypeError, match="direction"):
        directional_derivatives(net, params, x, v.astype(np.float32))
    with pytest.raises(ValueError, match="order"):
        directional_derivatives(net, params, x, v, order=5)
    with pytest.raises(ValueError, match="x"):
        directional_derivatives(net, params, x[:, :2], v)
