"""Infinite-width kernels: closed forms, quadrature, the layer recursion."""

import math

import numpy as np
import pytest
from scipy import integrate

import fastntk
from fastntk.kernels import reference
from fastntk.theory import gaussian_expectations, infinite_kernels, infinite_ntk
from fastntk.theory.infinite import CLOSED_FORMS

from tolerances import assert_close

ALL_ACTIVATIONS = reference.ACTIVATIONS.keys()


def covariance_grid():
    # variances from 1e-4 to 1e4, correlations from -1 to 1 (both included)
    variances = [1e-4, 1e-2, 0.3, 1.0, 3.0, 20.0, 1e4]
    rhos = [-1.0, -0.9, -0.3, 0.0, 0.5, 0.99, 0.999999, 1.0]
    kaa, kbb, kab = [], [], []
    for a in variances:
        for b in variances:
            for r in rhos:
                kaa.append(a)
                kbb.append(b)
                kab.append(r * math.sqrt(a * b))
    return np.array(kaa), np.array(kbb), np.array(kab)


@pytest.mark.parametrize("activation", CLOSED_FORMS)
def test_quadrature_matches_closed_forms(activation):
    kaa, kbb, kab = covariance_grid()
    if activation == "sin":
        # sin's expectations decay like exp(-K): keep to the variances of use
        keep = (kaa <= 20) & (kbb <= 20)
        kaa, kbb, kab = kaa[keep], kbb[keep], kab[keep]
    ss_c, dd_c = gaussian_expectations(
        activation, kaa, kbb, kab, slope=0.2, method="closed"
    )
    ss_q, dd_q = gaussian_expectations(
        activation, kaa, kbb, kab, slope=0.2, method="quadrature"
    )
    # <sigma sigma> scales like sqrt(K_aa K_bb) for the unbounded activations
    scale = np.sqrt(kaa * kbb) if activation in ("linear", "relu", "leaky_relu") else 1
    err_ss = np.max(np.abs(ss_q - ss_c) / scale)
    err_dd = np.max(np.abs(dd_q - dd_c) / np.maximum(np.abs(dd_c), 1.0))
    assert err_ss < 1e-8, f"{activation} <sigma sigma>: quadrature vs closed {err_ss}"
    assert err_dd < 1e-8, f"{activation} <sigma' sigma'>: quadrature vs closed {err_dd}"


def _dblquad_expectations(activation, kaa, kbb, kab, slope=0.2):
    # Independent check: scipy's adaptive quadrature in (xi_1, xi_2).
    f, df = reference.ACTIVATIONS[activation]
    sa, sb = math.sqrt(kaa), math.sqrt(kbb)
    rho = kab / (sa * sb)
    c = math.sqrt(1 - rho * rho)

    def density(x2, x1):
        return math.exp(-0.5 * (x1 * x1 + x2 * x2)) / (2 * math.pi)

    def term(g):
        def integrand(x2, x1):
            ua = np.array(sa * x1)
            ub = np.array(sb * (rho * x1 + c * x2))
            return float(g(ua, slope) * g(ub, slope)) * density(x2, x1)

        val, _ = integrate.dblquad(integrand, -9, 9, -9, 9, epsabs=1e-12, epsrel=1e-12)
        return val

    return term(f), term(df)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "gelu", "swish", "softplus"])
def test_quadrature_of_smooth_activations_matches_adaptive_quadrature(activation):
    for kaa, kbb, kab in [(0.7, 1.3, 0.4), (2.5, 0.4, -0.8)]:
        ss, dd = gaussian_expectations(activation, kaa, kbb, kab, method="quadrature")
        ss_ref, dd_ref = _dblquad_expectations(activation, kaa, kbb, kab)
        assert abs(ss - ss_ref) < 1e-8 * max(1.0, abs(ss_ref)), (activation, ss, ss_ref)
        assert abs(dd - dd_ref) < 1e-8 * max(1.0, abs(dd_ref)), (activation, dd, dd_ref)


def test_quadrature_converges_with_points_for_tanh():
    kaa, kbb, kab = covariance_grid()
    ss12, dd12 = gaussian_expectations("tanh", kaa, kbb, kab, method="quadrature")
    ss20, dd20 = gaussian_expectations(
        "tanh", kaa, kbb, kab, method="quadrature", points=20
    )
    assert np.max(np.abs(ss12 - ss20)) < 1e-9
    assert np.max(np.abs(dd12 - dd20)) < 1e-9


def test_hermite_agrees_at_moderate_variance():
    # The Gauss-Hermite rule is accurate when sqrt(K) is of order one.
    kaa, kbb, kab = np.array([0.5, 1.0]), np.array([0.8, 0.6]), np.array([0.3, -0.2])
    for activation in ("tanh", "erf", "sin"):
        ss_h, dd_h = gaussian_expectations(
            activation, kaa, kbb, kab, method="hermite", points=128
        )
        ss_q, dd_q = gaussian_expectations(
            activation, kaa, kbb, kab, method="quadrature"
        )
        assert np.max(np.abs(ss_h - ss_q)) < 1e-10, activation
        assert np.max(np.abs(dd_h - dd_q)) < 1e-10, activation


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_recursion_closed_form_matches_quadrature(activation, rng):
    x1 = rng.standard_normal((7, 5))
    x2 = rng.standard_normal((4, 5))
    kw = dict(
        depth=4,
        activation=activation,
        C_b=[0.1, 0.0, 0.3, 0.2],
        C_W=[1.5, 2.0, 1.2, 1.0],
        lambda_b=[1.0, 0.5, 0.0, 2.0],
        lambda_W=[1.0, 2.0, 0.7, 1.1],
    )
    for xb in (None, x2):
        closed = infinite_kernels(x1, xb, method="closed", **kw)
        quad = infinite_kernels(x1, xb, method="quadrature", **kw)
        assert closed.method == "closed" and quad.method == "quadrature"
        for name in ("K", "Theta"):
            a, b = getattr(quad, name), getattr(closed, name)
            err = np.max(np.abs(a - b)) / np.max(np.abs(b))
            assert err < 1e-8, f"{activation} {name}: quadrature vs closed {err}"


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_relu_criticality_ntk_grows_linearly_with_depth(depth, rng):
    n0 = 6
    x = rng.standard_normal((5, n0)) * rng.uniform(0.5, 2.0, size=(5, 1))
    lambda_W = 0.7
    for method in ("closed", "quadrature"):
        kern = infinite_kernels(
            x,
            depth=depth,
            activation="relu",
            C_b=0.0,
            C_W=2.0,
            lambda_b=0.0,
            lambda_W=lambda_W,
            method=method,
        )
        sq = np.sum(x * x, axis=1) / n0
        for l in range(depth):
            want = (l + 1) * lambda_W * sq
            got = np.diagonal(kern.Theta[l])
            assert np.max(np.abs(got - want)) <= 1e-10 * np.max(want), (method, l)
            # K^(l) is preserved on the diagonal at criticality
            assert np.allclose(np.diagonal(kern.K[l]), 2.0 * sq, rtol=1e-12)


def test_cross_and_symmetric_paths_agree(rng):
    x = rng.standard_normal((6, 3))
    kw = dict(depth=3, activation="tanh", C_b=0.2, C_W=1.3)
    sym = infinite_kernels(x, **kw)
    cross = infinite_kernels(x, x[:4], **kw)
    assert_close(cross.Theta, sym.Theta[:, :, :4], "algorithms", np.float64, "Theta")
    assert_close(cross.K, sym.K[:, :, :4], "algorithms", np.float64, "K")
    assert np.array_equal(sym.Theta, np.swapaxes(sym.Theta, 1, 2))


def test_first_layer_and_linear_network_are_exact(rng):
    # A linear network's kernels are polynomials in x . x' (no expectation to
    # approximate): K^(l) = C_b + C_W K^(l-1), Theta^(l) = lambda_b +
    # lambda_W K^(l-1) + C_W Theta^(l-1).
    x1, x2 = rng.standard_normal((3, 4)), rng.standard_normal((2, 4))
    g = x1 @ x2.T / 4
    kern = infinite_kernels(
        x1,
        x2,
        depth=3,
        activation="linear",
        C_b=0.5,
        C_W=1.5,
        lambda_b=0.3,
        lambda_W=2.0,
    )
    K = 0.5 + 1.5 * g
    T = 0.3 + 2.0 * g
    for l in range(3):
        assert_close(kern.K[l], K, "reference", np.float64, f"K[{l}]")
        assert_close(kern.Theta[l], T, "reference", np.float64, f"Theta[{l}]")
        K, T = 0.5 + 1.5 * K, 0.3 + 2.0 * K + 1.5 * T


def test_infinite_ntk_reads_the_network(rng):
    net = fastntk.MLP(
        [3, 50, 40, 2], activation="erf", C_b=[0.1, 0.2, 0.0], C_W=[1.0, 1.5, 2.0]
    )
    x = rng.standard_normal((4, 3))
    kern = infinite_ntk(net, x, rates=fastntk.rates.layerwise(net, 0.5, [1, 2, 3]))
    want = infinite_kernels(
        x,
        depth=3,
        activation="erf",
        C_b=[0.1, 0.2, 0.0],
        C_W=[1.0, 1.5, 2.0],
        lambda_b=0.5,
        lambda_W=[1, 2, 3],
    )
    assert np.array_equal(kern.Theta, want.Theta)
    full = kern.full(net.n_out)
    assert full.shape == (4, 4, 2, 2)
    assert np.array_equal(full[:, :, 0, 0], kern.ntk)
    assert np.all(full[:, :, 0, 1] == 0)

    # the identity tensor is lambda_b = 1, lambda_W^(l) = n_{l-1}
    ident = infinite_ntk(net, x, rates=fastntk.rates.identity())
    want = infinite_kernels(
        x,
        depth=3,
        activation="erf",
        C_b=[0.1, 0.2, 0.0],
        C_W=[1.0, 1.5, 2.0],
        lambda_b=1.0,
        lambda_W=[3, 50, 40],
    )
    assert_close(ident.Theta, want.Theta, "reference", np.float64, "identity")


def test_wide_network_ntk_is_close_to_infinite_width():
    # One very wide network: the empirical NTK is within a few percent.
    rng = np.random.default_rng(3)
    net = fastntk.MLP([4, 2048, 2048, 1], activation="tanh", C_b=0.1, C_W=1.5)
    x = rng.standard_normal((3, 4))
    params = net.init(seed=1)
    emp = fastntk.ntk(net, params, x, outputs="trace")
    inf = infinite_ntk(net, x).ntk
    assert np.max(np.abs(emp - inf)) < 0.05 * np.max(np.abs(inf))


def test_errors_name_the_argument(rng):
    x = rng.standard_normal((2, 3))
    with pytest.raises(ValueError, match="method: 'closed'"):
        infinite_kernels(x, depth=2, activation="tanh", method="closed")
    with pytest.raises(ValueError, match="method"):
        infinite_kernels(x, depth=2, method="simpson")
    with pytest.raises(ValueError, match="activation"):
        infinite_kernels(x, depth=2, activation="cube")
    with pytest.raises(ValueError, match="x2"):
        infinite_kernels(x, np.ones((2, 4)), depth=2)
    with pytest.raises(ValueError, match="C_W"):
        infinite_kernels(x, depth=2, C_W=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="depth"):
        infinite_kernels(x, depth=0)
    net = fastntk.MLP([3, 4, 1])
    with pytest.raises(ValueError, match="layerwise"):
        infinite_ntk(net, x, rates=fastntk.rates.diagonal(np.ones(net.n_params)))
    with pytest.raises(ValueError, match="kaa"):
        gaussian_expectations("relu", -1.0, 1.0, 0.0)


def test_all_activations_run(rng):
    x = rng.standard_normal((3, 2))
    for activation in ALL_ACTIVATIONS:
        kern = infinite_kernels(x, depth=3, activation=activation, C_W=1.0, C_b=0.1)
        assert np.all(np.isfinite(kern.Theta)), activation
        # a Gram matrix of features: positive semidefinite
        assert np.linalg.eigvalsh(kern.ntk).min() > -1e-12, activation
