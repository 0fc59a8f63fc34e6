"""NTK statistics over seeds, against direct computation and infinite width."""

import numpy as np
import pytest

import fastntk
from fastntk.theory import ntk_ensemble

# |z| above this for an estimate with no bias has probability about 6e-7
Z_BOUND = 5.0


def _x(P=3, n0=4):
    return np.random.default_rng(7).standard_normal((P, n0))


@pytest.mark.parametrize("workers", [1, 2])
def test_streaming_statistics_match_stacked_kernels(workers):
    net = fastntk.MLP([4, 9, 7, 2], activation="tanh", C_W=1.3, C_b=0.2)
    x1, x2 = _x(3), _x(2)
    seeds = [3, 11, 5, 8, 21, 1, 13]
    stats = ntk_ensemble(net, x1, x2, seeds=seeds, workers=workers)
    stack = np.stack([fastntk.ntk(net, net.init(seed=s), x1, x2) for s in seeds])
    np.testing.assert_allclose(stats.mean, stack.mean(axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        stats.variance, stack.var(axis=0, ddof=1), rtol=1e-10, atol=1e-14
    )
    assert stats.n_seeds == 7 and stats.mean.shape == (3, 2, 2, 2)
    assert stats.infinite.shape == (3, 2, 2, 2)
    np.testing.assert_allclose(stats.std_error, np.sqrt(stats.variance / 7))


def test_trace_and_diagonal_layouts():
    net = fastntk.MLP([4, 8, 3], activation="erf")
    x = _x(2)
    full = ntk_ensemble(net, x, seeds=4, workers=1)
    trace = ntk_ensemble(net, x, seeds=4, outputs="trace")
    diag = ntk_ensemble(net, x, seeds=4, outputs="diagonal")
    np.testing.assert_allclose(trace.mean, np.einsum("abii->ab", full.mean))
    np.testing.assert_allclose(diag.mean, np.einsum("abii->abi", full.mean))
    np.testing.assert_allclose(trace.infinite, np.einsum("abii->ab", full.infinite))
    np.testing.assert_allclose(diag.infinite, np.einsum("abii->abi", full.infinite))


@pytest.mark.parametrize("width", [8, 128])
def test_one_hidden_layer_mean_is_the_infinite_width_kernel(width):
    # With one hidden layer the first-layer preactivations are exactly Gaussian
    # and the readout weights independent of them: E[NTK] = Theta^(2) at every
    # width, so the mean must agree within its standard error.
    net = fastntk.MLP([4, width, 2], activation="tanh", C_W=1.5, C_b=0.1)
    stats = ntk_ensemble(net, _x(), seeds=400)
    z = (stats.mean - stats.infinite) / stats.std_error
    assert np.max(np.abs(z)) < Z_BOUND, f"width {width}: max |z| = {np.abs(z).max()}"


def test_deeper_mean_approaches_infinite_width_and_spread_falls_like_inverse_width():
    # Two hidden layers: the mean carries a 1/width bias, too small to resolve
    # with a few hundred seeds.  At both widths the mean must be consistent with
    # Theta^(L) within its standard error; the upper confidence bound on the
    # distance, |error| + 3 standard errors, must shrink with the width (by
    # about sqrt(16) = 4 when the variance falls like 1/width); and the variance
    # itself must fall about 16-fold.
    x = _x()
    bound, variance = {}, {}
    for width in (16, 256):
        net = fastntk.MLP([4, width, width, 1], activation="tanh", C_W=1.5, C_b=0.1)
        stats = ntk_ensemble(net, x, seeds=300, outputs="trace")
        err = stats.mean - stats.infinite
        z = err / stats.std_error
        assert np.max(np.abs(z)) < Z_BOUND, f"width {width}: max |z| {np.abs(z).max()}"
        bound[width] = np.max((np.abs(err) + 3 * stats.std_error) / stats.infinite)
        variance[width] = np.mean(stats.variance)

    assert bound[256] < 0.6 * bound[16], bound
    ratio = variance[16] / variance[256]
    assert 8.0 < ratio < 32.0, f"variance ratio {ratio} for a 16x width ratio"


def test_no_infinite_kernel_for_unstructured_tensors():
    net = fastntk.MLP([4, 6, 1])
    rates = fastntk.rates.diagonal(np.ones(net.n_params))
    stats = ntk_ensemble(net, _x(2), rates=rates, seeds=3)
    assert stats.infinite is None
    off = ntk_ensemble(net, _x(2), seeds=3, infinite=False)
    assert off.infinite is None


def test_float32_and_single_seed():
    net = fastntk.MLP([4, 6, 1])
    stats = ntk_ensemble(net, _x(2), seeds=[5], dtype="float32")
    want = fastntk.ntk(net, net.init(seed=5, dtype="float32"), _x(2).astype(np.float32))
    np.testing.assert_allclose(stats.mean, want, rtol=1e-6)
    assert stats.mean.dtype == np.float64 and np.all(stats.variance == 0)


def test_errors():
    net = fastntk.MLP([4, 6, 1])
    with pytest.raises(ValueError, match="seeds"):
        ntk_ensemble(net, _x(2), seeds=0)
    with pytest.raises(ValueError, match="seeds"):
        ntk_ensemble(net, _x(2), seeds=[])
    with pytest.raises(TypeError, match="seeds"):
        ntk_ensemble(net, _x(2), seeds="many")
    with pytest.raises(ValueError, match="workers"):
        ntk_ensemble(net, _x(2), seeds=2, workers=0)
    with pytest.raises(ValueError, match="x1"):
        ntk_ensemble(net, np.ones((2, 3)), seeds=2)
