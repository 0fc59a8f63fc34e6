"""The NTK engine against the NumPy reference, and its two algorithms pairwise."""

import numpy as np
import pytest

import fastntk
from fastntk import rates as R
from fastntk.kernels import activations

from tolerances import assert_close

DTYPES = [np.float64, np.float32]


def _net(rng, activation, depth, n_out, n_in=None):
    # random widths between 1 and 9, C_b > 0 so that biases matter
    n_in = n_in or int(rng.integers(1, 7))
    hidden = [int(w) for w in rng.integers(1, 10, size=depth - 1)]
    return fastntk.MLP([n_in, *hidden, n_out], activation=activation, C_b=0.3)


def _rates(kind, net, rng):
    if kind == "none":
        return None
    if kind == "identity":
        return R.identity()
    if kind == "layerwise":
        return R.layerwise(
            net, rng.uniform(0.1, 2, net.depth), rng.uniform(0.1, 2, net.depth)
        )
    if kind == "diagonal":
        return R.diagonal(rng.uniform(0, 2, net.n_params))
    M = rng.standard_normal((net.n_params, net.n_params))
    return R.dense(M @ M.T / net.n_params)


def _grid():
    # a sample of (activation, depth, n_out) covering every activation and each
    # depth 1-5 and output count 1-10, instead of the full product
    rng = np.random.default_rng(7)
    cases = []
    for k, act in enumerate(activations.NAMES):
        cases.append((act, 1 + k % 5, [1, 3, 10, 2, 5, 1, 4, 7, 1, 2][k]))
    cases.append(("relu", int(rng.integers(1, 6)), 6))
    return cases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation,depth,n_out", _grid())
def test_structured_jacobian_reference(activation, depth, n_out, dtype, rng):
    net = _net(rng, activation, depth, n_out)
    params = net.init(seed=rng, dtype=dtype)
    x1 = rng.standard_normal((5, net.n_in)).astype(dtype)
    x2 = rng.standard_normal((3, net.n_in)).astype(dtype)
    for kind in ("none", "identity", "layerwise"):
        rates = _rates(kind, net, rng)
        ref = fastntk.reference.ntk(net, params, x1, x2, rates)
        hs = fastntk.ntk(net, params, x1, x2, rates, method="structured")
        hj = fastntk.ntk(net, params, x1, x2, rates, method="jacobian")
        assert hs.dtype == dtype and hs.shape == (5, 3, n_out, n_out)
        what = f"{net!r} {kind}"
        assert_close(hs, ref, "reference", dtype, f"structured vs reference, {what}")
        assert_close(hj, ref, "reference", dtype, f"jacobian vs reference, {what}")
        assert_close(hs, hj, "algorithms", dtype, f"structured vs jacobian, {what}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["diagonal", "dense"])
def test_general_rates_against_reference(kind, dtype, rng):
    net = _net(rng, "tanh", 3, 3)
    params = net.init(seed=rng, dtype=dtype)
    x1 = rng.standard_normal((6, net.n_in)).astype(dtype)
    x2 = rng.standard_normal((4, net.n_in)).astype(dtype)
    rates = _rates(kind, net, rng)
    for xx in (x2, None):
        ref = fastntk.reference.ntk(net, params, x1, xx, rates)
        got = fastntk.ntk(net, params, x1, xx, rates)
        assert_close(got, ref, "reference", dtype, f"jacobian, {kind} rates")


def test_symmetry_and_psd(rng):
    net = fastntk.MLP([4, 9, 7, 3], activation="gelu", C_b=0.2)
    params = net.init(seed=3)
    x1 = rng.standard_normal((7, 4))
    x2 = rng.standard_normal((5, 4))
    h12 = fastntk.ntk(net, params, x1, x2)
    h21 = fastntk.ntk(net, params, x2, x1)
    assert_close(h12, h21.transpose(1, 0, 3, 2), "algorithms", np.float64, "swap")
    h11 = fastntk.ntk(net, params, x1)
    flat = h11.transpose(0, 2, 1, 3).reshape(7 * 3, 7 * 3)
    assert_close(flat, flat.T, "algorithms", np.float64, "symmetric on one set")
    eig = np.linalg.eigvalsh(flat)
    assert eig[0] >= -1e-12 * eig[-1], f"not PSD: smallest eigenvalue {eig[0]}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_outputs_and_per_layer(method, dtype, rng):
    net = fastntk.MLP([3, 6, 5, 4], activation="tanh", C_b=0.1)
    params = net.init(seed=4, dtype=dtype)
    x1 = rng.standard_normal((6, 3)).astype(dtype)
    x2 = rng.standard_normal((5, 3)).astype(dtype)
    for xx in (x2, None):
        full = fastntk.ntk(net, params, x1, xx, method=method)
        trace = fastntk.ntk(net, params, x1, xx, method=method, outputs="trace")
        diag = fastntk.ntk(net, params, x1, xx, method=method, outputs="diagonal")
        assert_close(trace, np.einsum("abii->ab", full), "algorithms", dtype, "trace")
        assert_close(diag, np.einsum("abii->abi", full), "algorithms", dtype, "diag")
        for outputs, whole in (("full", full), ("trace", trace), ("diagonal", diag)):
            layers = fastntk.ntk(
                net, params, x1, xx, method=method, outputs=outputs, per_layer=True
            )
            assert layers.shape == (net.depth, *whole.shape)
            assert_close(layers.sum(0), whole, "algorithms", dtype, f"{outputs} sum")


def test_bad_inputs(rng):
    net = fastntk.MLP([3, 5, 2])
    params = net.init(seed=0)
    x = rng.standard_normal((4, 3))
    other = fastntk.MLP([3, 6, 2])
    with pytest.raises(ValueError, match="x2: expected shape"):
        fastntk.ntk(net, params, x, rng.standard_normal((4, 2)))
    with pytest.raises(ValueError, match="rates: expected"):
        fastntk.ntk(net, params, x, rates=R.layerwise(other))
    with pytest.raises(ValueError, match="rates: expected a diagonal"):
        fastntk.ntk(net, params, x, rates=R.diagonal(np.ones(other.n_params)))
    with pytest.raises(ValueError, match="outputs: expected"):
        fastntk.ntk(net, params, x, outputs="sum")
    with pytest.raises(ValueError, match="method: expected"):
        fastntk.ntk(net, params, x, method="fast")
    with pytest.raises(ValueError, match="method: 'structured' needs"):
        fastntk.ntk(
            net, params, x, rates=R.diagonal(np.ones(net.n_params)), method="structured"
        )
    with pytest.raises(ValueError, match="out: expected shape"):
        fastntk.ntk(net, params, x, out=np.empty((4, 4)))
    with pytest.raises(TypeError, match="out: expected dtype"):
        fastntk.ntk(net, params, x, out=np.empty((4, 4, 2, 2), np.float32))
