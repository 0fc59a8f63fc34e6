"""Frozen-kernel dynamics: closed form against direct recursion and training."""

import numpy as np
import pytest

import fastntk
from fastntk.kernels import reference
from fastntk.theory import Linearized, compare_with_training, linearized_outputs

from tolerances import assert_close


def _problem(rng, width=24, n_out=2, P=6):
    net = fastntk.MLP([3, width, width, n_out], activation="tanh", C_W=1.5, C_b=0.1)
    params = net.init(seed=2)
    x = rng.standard_normal((P, 3))
    y = rng.standard_normal((P, n_out))
    x_test = rng.standard_normal((4, 3))
    return net, params, x, y, x_test


def _direct(net, params, x, y, x_test, lr, rates, scale, steps):
    # The frozen-kernel recursion, one step at a time, from reference kernels.
    H = reference.ntk(net, params, x, None, rates)
    Hb = reference.ntk(net, params, x_test, x, rates)
    z = reference.apply(net, params, x)
    zb = reference.apply(net, params, x_test)
    out, out_b = [z.copy()], [zb.copy()]
    for _ in range(steps):
        eps = scale * (z - y)
        z = z - lr * np.einsum("abij,bj->ai", H, eps)
        zb = zb - lr * np.einsum("abij,bj->ai", Hb, eps)
        out.append(z.copy())
        out_b.append(zb.copy())
    return np.array(out), np.array(out_b)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("kind", ["layerwise", "identity", "diagonal"])
def test_steps_zero_one_and_more_match_direct_recursion(reduction, kind, rng):
    net, params, x, y, x_test = _problem(rng)
    rates = {
        "layerwise": fastntk.rates.layerwise(net, 0.5, [1.0, 2.0, 1.5]),
        "identity": fastntk.rates.identity(),
        "diagonal": fastntk.rates.diagonal(rng.uniform(0, 1, net.n_params)),
    }[kind]
    loss = fastntk.MSE(reduction=reduction)
    scale = loss.scale(x.shape[0])
    lin = Linearized(net, params, x, y, lr=1.0, loss=loss, rates=rates, x_test=x_test)
    lr = 0.5 / lin.eigenvalues[-1]
    lin = Linearized(net, params, x, y, lr=lr, loss=loss, rates=rates, x_test=x_test)
    want, want_b = _direct(net, params, x, y, x_test, lr, rates, scale, 7)
    traj = lin.trajectory([0, 1, 2, 7])
    for k, t in enumerate([0, 1, 2, 7]):
        assert_close(traj.train[k], want[t], "reference", np.float64, f"z_A({t})")
        assert_close(traj.test[k], want_b[t], "reference", np.float64, f"z_B({t})")


def test_long_times_converge_to_the_targets(rng):
    net, params, x, y, x_test = _problem(rng)
    lin = Linearized(net, params, x, y, lr=1e-2, x_test=x_test)
    lr = 1.0 / lin.eigenvalues[-1]
    lin = Linearized(net, params, x, y, lr=lr, x_test=x_test)
    # many steps in one evaluation; the slowest mode sets the time scale
    t_long = int(50 / (lr * lin.eigenvalues[0]))
    traj = lin.trajectory([t_long])
    assert np.max(np.abs(traj.train[0] - y)) < 1e-8
    assert np.all(np.isfinite(traj.test))


def test_zero_eigenvalue_moves_nothing_and_is_exact(rng):
    # More outputs than the rank of the kernel: a learning-rate tensor on the
    # last-layer biases only gives H = lambda_b delta_ij for every pair, rank
    # n_out; the other directions must stay put (geometric sum eta t, q = 1).
    net, params, x, y, x_test = _problem(rng, P=4)
    d = np.zeros(net.n_params)
    d[net.layer_slices()[-1][1]] = 1.0
    rates = fastntk.rates.diagonal(d)
    lin = Linearized(net, params, x, y, lr=0.1, rates=rates, x_test=x_test)
    assert np.sum(np.abs(lin.eigenvalues) < 1e-12) == x.shape[0] * 2 - 2
    want, want_b = _direct(net, params, x, y, x_test, 0.1, rates, 1.0, 3)
    traj = lin.trajectory([3])
    assert_close(traj.train[0], want[3], "reference", np.float64, "z_A")
    assert_close(traj.test[0], want_b[3], "reference", np.float64, "z_B")


def test_comparison_with_training(rng):
    net, params, x, y, x_test = _problem(rng, width=64)
    comp = compare_with_training(
        net, params, x, y, lr=0.02, steps=[5, 1, 5], x_test=x_test
    )
    assert comp.steps.tolist() == [0, 1, 5]
    # step 0: identical; step 1: one real step, its gap O(eta^2)
    assert_close(comp.train[0], comp.linear.train[0], "reference", np.float64, "t=0")
    assert comp.kernel_drift[0] == 0.0
    step1, _ = fastntk.train(
        net,
        params,
        x,
        y,
        loss=fastntk.MSE(),
        lr=0.02,
        rates=fastntk.rates.layerwise(net),
        steps=1,
    )
    assert np.array_equal(comp.train[1], net.apply(step1, x))
    assert comp.train_gap()[1] < 0.05 and comp.test_gap()[1] < 0.05
    assert np.all(comp.kernel_drift[1:] > 0)


def test_linear_model_tracks_wider_networks_better(rng):
    x = rng.standard_normal((6, 3))
    y = rng.standard_normal((6, 1))
    gaps, drifts = [], []
    for width in (16, 256):
        net = fastntk.MLP([3, width, width, 1], activation="tanh", C_W=1.5, C_b=0.1)
        comp = compare_with_training(net, net.init(seed=0), x, y, lr=0.05, steps=[40])
        gaps.append(comp.train_gap()[-1])
        drifts.append(comp.kernel_drift[-1])
    assert gaps[1] < gaps[0] and drifts[1] < drifts[0], (gaps, drifts)


def test_function_form_and_errors(rng):
    net, params, x, y, x_test = _problem(rng)
    traj = linearized_outputs(net, params, x, y, lr=0.01, steps=3)
    assert traj.steps.tolist() == [3] and traj.test is None
    lin = Linearized(net, params, x, y, lr=0.01)
    with pytest.raises(ValueError, match="x_test"):
        lin.test_outputs([1])
    with pytest.raises(ValueError, match="steps"):
        lin.train_outputs([-1])
    with pytest.raises(TypeError, match="steps"):
        lin.train_outputs([0.5])
    with pytest.raises(ValueError, match="loss"):
        Linearized(net, params, x, y, lr=0.01, loss=fastntk.CrossEntropy())
    with pytest.raises(ValueError, match="lr"):
        Linearized(net, params, x, y, lr=0.0)
