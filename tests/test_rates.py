"""Learning-rate tensors: application, matrices, and the descent guarantee."""

import numpy as np
import pytest

import fastntk
from fastntk import reference as ref

from helpers import make_problem


def _all_rates(net, rng):
    A = rng.standard_normal((net.n_params, net.n_params))
    return [
        fastntk.rates.identity(),
        fastntk.rates.layerwise(net, lambda_b=[0.5, 2.0], lambda_W=[1.5, 0.25]),
        fastntk.rates.diagonal(rng.uniform(0.1, 2.0, net.n_params)),
        fastntk.rates.dense(A @ A.T / net.n_params),
    ]


def test_apply_equals_matrix_product(rng):
    net = fastntk.MLP([3, 4, 2])
    g = rng.standard_normal(net.n_params)
    for rates in _all_rates(net, rng):
        np.testing.assert_allclose(
            rates.apply(net, g),
            rates.matrix(net) @ g,
            rtol=1e-13,
            atol=1e-13,
            err_msg=repr(rates),
        )


def test_layerwise_divides_weight_rates_by_fan_in():
    net = fastntk.MLP([3, 4, 2])
    d = fastntk.rates.layerwise(net, lambda_b=[0.5, 2.0], lambda_W=[1.5, 0.25])
    v = d.diagonal_vector(net)
    (w1, b1), (w2, b2) = net.layer_slices()
    np.testing.assert_allclose(v[w1], 1.5 / 3)
    np.testing.assert_allclose(v[b1], 0.5)
    np.testing.assert_allclose(v[w2], 0.25 / 4)
    np.testing.assert_allclose(v[b2], 2.0)
    bias_rate, weight_rate = d.layer_factors(net)
    np.testing.assert_allclose(weight_rate, [0.5, 0.0625])
    assert fastntk.rates.identity().structured and d.structured
    assert not fastntk.rates.diagonal(v).structured


def test_dense_accepts_psd_within_tolerance(rng):
    A = rng.standard_normal((6, 3))
    m = A @ A.T  # rank 3: zero eigenvalues up to rounding
    m = m + 1e-14 * (rng.standard_normal((6, 6)))
    m = 0.5 * (m + m.T)
    r = fastntk.rates.dense(m)
    assert np.allclose(r.matrix_, m)


@pytest.mark.parametrize("kind", range(4))
def test_small_step_decreases_loss_for_every_tensor(kind, rng):
    net, params, x, y = make_problem([3, 6, 2], "tanh", P=10)
    rates = _all_rates(net, rng)[kind]
    loss = fastntk.MSE()
    before = loss.value(net.apply(params, x), y)
    theta = ref.gd_step(net, params, x, y, loss, 1e-3, rates)
    after = loss.value(net.apply(net.params(theta), x), y)
    g = fastntk.gradient(net, params, x, y, loss)
    # first-order prediction -eta g^T lambda g is never positive
    predicted = -1e-3 * g @ rates.apply(net, g)
    assert predicted <= 0
    assert after < before
    assert after - before == pytest.approx(predicted, rel=0.05)
