"""Forward pass, losses, error factor, gradient and Jacobian: fast vs reference
vs central finite differences."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastntk
from fastntk import reference as ref

from helpers import ACTIVATIONS, DTYPES, make_problem, one_hot
from tolerances import assert_close

ARCHS = [[3, 1], [4, 9, 2], [5, 8, 7, 3], [2, 1, 1, 1], [6, 5, 4, 3, 2, 4]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_apply_and_preactivations_match_reference(activation, dtype):
    net, params, x, _ = make_problem([5, 8, 7, 3], activation, dtype, P=11)
    assert_close(
        net.apply(params, x),
        ref.apply(net, params, x),
        "reference",
        dtype,
        f"apply {activation}",
    )
    for l, (z, zr) in enumerate(
        zip(net.preactivations(params, x), ref.preactivations(net, params, x))
    ):
        assert_close(z, zr, "reference", dtype, f"z^({l + 1}) {activation}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_and_jacobian_match_reference(activation, dtype):
    net, params, x, y = make_problem([4, 9, 6, 3], activation, dtype, P=9)
    g = fastntk.gradient(net, params, x, y, loss=fastntk.MSE())
    assert g.dtype == dtype
    assert_close(
        g,
        ref.gradient(net, params, x, y, fastntk.MSE()),
        "reference",
        dtype,
        f"gradient {activation}",
    )
    J = fastntk.jacobian(net, params, x)
    assert J.shape == (9, 3, net.n_params)
    assert_close(
        J, ref.jacobian(net, params, x), "reference", dtype, f"jacobian {activation}"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("loss_cls", [fastntk.MSE, fastntk.CrossEntropy])
def test_losses_and_error_factor_match_reference(loss_cls, reduction, dtype, rng):
    loss = loss_cls(reduction)
    z = (3 * rng.standard_normal((13, 4))).astype(dtype)
    y = (
        one_hot(rng, 13, 4, dtype)
        if loss_cls is fastntk.CrossEntropy
        else (rng.standard_normal((13, 4)).astype(dtype))
    )
    value, eps = loss.value_and_error(z, y)
    assert_close(value, ref.loss_value(loss, z, y), "reference", dtype, f"{loss} value")
    assert_close(eps, ref.error_factor(loss, z, y), "reference", dtype, f"{loss} eps")


def test_cross_entropy_is_stable_for_huge_logits():
    loss = fastntk.CrossEntropy()
    z = np.array([[1000.0, 0.0, -1000.0], [-800.0, 800.0, 0.0]])
    y = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    value, eps = loss.value_and_error(z, y)
    assert np.isfinite(value) and np.isfinite(eps).all()
    assert value == pytest.approx(1000.0)
    np.testing.assert_allclose(eps, [[1, -1, 0], [0, 0, 0]], atol=1e-12)
    # a probability vector target (rows summing to 1)
    p = np.array([[0.2, 0.3, 0.5]])
    zz = np.array([[0.1, -0.4, 2.0]])
    assert loss.value(zz, p) == pytest.approx(ref.loss_value(loss, zz, p), rel=1e-14)


@pytest.mark.parametrize("activation", ["tanh", "gelu", "softplus", "relu", "sin"])
@pytest.mark.parametrize("loss", [fastntk.MSE(), fastntk.CrossEntropy("mean")])
def test_gradient_matches_central_finite_differences(activation, loss, rng):
    net, params, x, y = make_problem([3, 6, 5, 3], activation, P=5, seed=2)
    if isinstance(loss, fastntk.CrossEntropy):
        y = one_hot(rng, 5, 3)
    value, g = fastntk.loss_and_gradient(net, params, x, y, loss)
    h = 1e-6
    fd = np.empty(net.n_params)
    for mu in range(net.n_params):
        tp, tm = params.theta.copy(), params.theta.copy()
        tp[mu] += h
        tm[mu] -= h
        zp = net.apply(net.params(tp), x)
        zm = net.apply(net.params(tm), x)
        fd[mu] = (loss.value(zp, y) - loss.value(zm, y)) / (2 * h)
    assert value == pytest.approx(loss.value(net.apply(params, x), y), rel=1e-13)
    assert_close(g, fd, "finite_difference", np.float64, f"gradient fd {activation}")


@pytest.mark.parametrize("activation", ["erf", "swish", "leaky_relu", "sigmoid"])
def test_jacobian_matches_central_finite_differences(activation):
    net, params, x, _ = make_problem([4, 7, 3], activation, P=4, seed=5)
    J = fastntk.jacobian(net, params, x)
    h = 1e-6
    for mu in range(net.n_params):
        tp, tm = params.theta.copy(), params.theta.copy()
        tp[mu] += h
        tm[mu] -= h
        fd = (net.apply(net.params(tp), x) - net.apply(net.params(tm), x)) / (2 * h)
        assert_close(
            J[:, :, mu],
            fd,
            "finite_difference",
            np.float64,
            f"jacobian fd {activation} mu={mu}",
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_samples_cross_block_boundaries(dtype):
    # more samples than one block of the blocked kernels
    net, params, x, y = make_problem([3, 5, 2], "tanh", dtype, P=601)
    assert_close(
        net.apply(params, x),
        ref.apply(net, params, x),
        "reference",
        dtype,
        "apply P=601",
    )
    assert_close(
        fastntk.gradient(net, params, x, y, fastntk.MSE("mean")),
        ref.gradient(net, params, x, y, fastntk.MSE("mean")),
        "reference",
        dtype,
        "gradient P=601",
    )


def test_noncontiguous_and_fortran_inputs_give_same_results():
    net, params, x, y = make_problem([4, 6, 2], "tanh", P=8)
    expected = net.apply(params, x)
    xf = np.asfortranarray(x)
    wide = np.zeros((8, 8))
    wide[:, ::2] = x
    xs = wide[:, ::2]
    assert not xs.flags.c_contiguous
    np.testing.assert_array_equal(net.apply(params, xf), expected)
    np.testing.assert_array_equal(net.apply(params, xs), expected)
    g = fastntk.gradient(net, params, x, y)
    np.testing.assert_array_equal(
        fastntk.gradient(net, params, xs, np.asfortranarray(y)), g
    )


def test_threads_argument_gives_same_results_and_restores_count():
    import numba

    net, params, x, y = make_problem([4, 16, 3], "tanh", P=40)
    before = numba.get_num_threads()
    g1 = fastntk.gradient(net, params, x, y, threads=1)
    g2 = fastntk.gradient(net, params, x, y, threads=2)
    assert numba.get_num_threads() == before
    assert_close(g1, g2, "algorithms", np.float64, "threads 1 vs 2")


@st.composite
def architectures(draw):
    depth = draw(st.integers(1, 5))
    widths = [draw(st.integers(1, 300)) for _ in range(depth + 1)]
    # keep the Jacobian small: few samples when the network is wide
    n_params = sum(widths[i] * widths[i + 1] + widths[i + 1] for i in range(depth))
    max_p = max(1, min(200, 300_000 // (n_params * widths[-1])))
    P = draw(st.integers(1, max_p))
    activation = draw(st.sampled_from(ACTIVATIONS))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    return widths, activation, dtype, P, seed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(architectures())
def test_random_architectures_match_reference(case):
    widths, activation, dtype, P, seed = case
    net, params, x, y = make_problem(widths, activation, dtype, P=P, seed=seed % 1000)
    what = f"{widths} {activation} {np.dtype(dtype)} P={P}"
    zr = ref.apply(net, params, x)
    assert_close(net.apply(params, x), zr, "reference", dtype, "apply " + what)
    assert_close(
        fastntk.gradient(net, params, x, y),
        ref.gradient(net, params, x, y, fastntk.MSE()),
        "reference",
        dtype,
        "gradient " + what,
    )
    assert_close(
        fastntk.jacobian(net, params, x),
        ref.jacobian(net, params, x),
        "reference",
        dtype,
        "jacobian " + what,
    )
