"""The MLP description, its flat parameters and initialization."""

import numpy as np
import pytest

import fastntk

from helpers import make_problem


def test_theta_layout_and_views_share_memory():
    net = fastntk.MLP([3, 4, 2])
    params = net.init(seed=0)
    assert net.n_params == 3 * 4 + 4 + 4 * 2 + 2
    assert params.theta.flags.c_contiguous
    # W^(1) row-major (n_1, n_0), then b^(1), then W^(2), b^(2)
    np.testing.assert_array_equal(params.weights[0].ravel(), params.theta[:12])
    np.testing.assert_array_equal(params.biases[0], params.theta[12:16])
    np.testing.assert_array_equal(params.weights[1].ravel(), params.theta[16:24])
    np.testing.assert_array_equal(params.biases[1], params.theta[24:26])
    for view in (*params.weights, *params.biases):
        assert np.shares_memory(view, params.theta)
    params.weights[1][0, 0] = 123.0
    assert params.theta[16] == 123.0


def test_init_is_seeded_and_float32_is_rounded_float64():
    net = fastntk.MLP([5, 7, 3], C_b=0.5, C_W=[1.0, 2.0])
    a = net.init(seed=3)
    b = net.init(seed=3)
    c = net.init(seed=4)
    np.testing.assert_array_equal(a.theta, b.theta)
    assert not np.array_equal(a.theta, c.theta)
    f32 = net.init(seed=3, dtype="float32")
    assert f32.dtype == np.float32
    np.testing.assert_array_equal(f32.theta, a.theta.astype(np.float32))


def test_init_variances_follow_C_b_and_C_W_over_fan_in():
    net = fastntk.MLP([400, 300, 200], C_b=[0.3, 0.7], C_W=[1.0, 2.0])
    params = net.init(seed=0)
    for l, (W, b) in enumerate(zip(params.weights, params.biases)):
        var_w = W.var() * net.widths[l]
        # standard error of a sample variance of n normals: sqrt(2/n)
        assert abs(var_w / net.C_W[l] - 1) < 6 * np.sqrt(2 / W.size)
        assert abs(b.var() / net.C_b[l] - 1) < 6 * np.sqrt(2 / b.size)


def test_zero_variance_gives_zero_biases():
    params = fastntk.MLP([2, 3, 1], C_b=0.0).init(seed=1)
    assert not params.biases[0].any()


def test_params_wraps_and_copies():
    net = fastntk.MLP([2, 3, 1])
    theta = np.arange(net.n_params, dtype=np.float64)
    p = net.params(theta)
    assert not np.shares_memory(p.theta, theta)
    np.testing.assert_array_equal(p.theta, theta)
    q = p.copy()
    q.theta[0] = -1
    assert p.theta[0] == 0
    assert p.astype("float32").dtype == np.float32


def test_repr_and_equality():
    a = fastntk.MLP([2, 3, 1], activation="leaky_relu", slope=0.2)
    b = fastntk.MLP([2, 3, 1], activation="leaky_relu", slope=0.2)
    assert a == b and hash(a) == hash(b)
    assert "leaky_relu" in repr(a) and "slope=0.2" in repr(a)
    assert a != fastntk.MLP([2, 3, 1])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_preactivations_shapes(dtype):
    net, params, x, _ = make_problem([4, 6, 5, 2], dtype=dtype)
    zs = net.preactivations(params, x)
    assert [z.shape for z in zs] == [(7, 6), (7, 5), (7, 2)]
    assert all(z.dtype == dtype for z in zs)
