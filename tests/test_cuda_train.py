"""The GPU training engine against the CPU engine, step by step.

Under the CUDA simulator (tiny networks, 2 x 2 thread blocks) or a real GPU with
FASTNTK_TEST_REAL_GPU=1.  Both engines use the same schedule, so trajectories,
recorded losses and divergence handling must agree within rounding.
"""

import warnings

import numpy as np
import pytest
from numba import cuda

import fastntk
from fastntk.engines.train_cuda import train_cuda
from fastntk.kernels import cuda as kernels
from fastntk.kernels import dispatch

from helpers import make_problem, one_hot
from tolerances import assert_close

pytestmark = pytest.mark.skipif(
    not cuda.is_available(), reason="no GPU and the CUDA simulator is off"
)


@pytest.fixture(autouse=True)
def tiny_blocks():
    with kernels.launch_config(threads=2, gemm=(2, 2, 2, 2, 8), blas="numba"):
        yield


def both(net, params, x, y, **kw):
    # Train on the GPU and on the CPU with the same arguments.
    gpu = train_cuda(net, params, x, y, **kw)
    cpu = fastntk.train(net, params, x, y, backend="cpu", **kw)
    return gpu, cpu


def assert_same_run(gpu, cpu, dtype, what):
    (pg, hg), (pc, hc) = gpu, cpu
    np.testing.assert_array_equal(hg.step, hc.step)
    assert_close(pg.theta, pc.theta, "gpu", dtype, f"{what}: parameters")
    assert_close(hg.train_loss, hc.train_loss, "gpu", dtype, f"{what}: train loss")
    if hc.test_loss is not None:
        assert_close(hg.test_loss, hc.test_loss, "gpu", dtype, f"{what}: test loss")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_full_batch_gradient_descent_matches_cpu(dtype):
    net, params, x, y = make_problem([3, 4, 2], "tanh", dtype, P=5)
    runs = both(net, params, x, y, loss="mse", lr=0.05, steps=3, test=(x[:2], y[:2]))
    assert_same_run(*runs, dtype, "GD identity")
    assert runs[0][0] is not params and runs[0][0].dtype == dtype


def test_sgd_with_layerwise_rates_and_cross_entropy_matches_cpu(rng):
    # 7 samples in batches of 3: the last batch of each epoch holds one sample
    net, params, x, _ = make_problem([2, 3, 3], "relu", np.float64, P=7)
    y = one_hot(rng, 7, 3)
    rates = fastntk.rates.layerwise(net, 0.5, [2.0, 1.0])
    runs = both(
        net,
        params,
        x,
        y,
        loss=fastntk.CrossEntropy("mean"),
        lr=0.2,
        rates=rates,
        epochs=2,
        batch_size=3,
        seed=4,
        record_every=2,
    )
    assert_same_run(*runs, np.float64, "SGD layerwise")


def test_dense_rates_in_float32_match_cpu(rng):
    net, params, x, y = make_problem([2, 3, 1], "sin", np.float32, P=4)
    B = rng.standard_normal((net.n_params, net.n_params))
    rates = fastntk.rates.dense(B @ B.T / net.n_params)
    runs = both(net, params, x, y, loss="mse", lr=0.02, rates=rates, steps=2)
    assert_same_run(*runs, np.float32, "GD dense")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_divergence_returns_the_last_finite_parameters():
    net, params, x, y = make_problem([2, 3, 1], "linear", np.float64, P=4)
    y = 100.0 * y
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (pg, hg), (pc, hc) = both(
            net, params, x, y, loss="mse", lr=5.0, steps=40, record_every=7
        )
    assert hg.diverged and hc.diverged
    assert hg.diverged_step == hc.diverged_step
    assert_close(pg.theta, pc.theta, "gpu", np.float64, "kept parameters")
    assert np.all(np.isfinite(pg.theta))
    assert sum("training diverged" in str(w.message) for w in caught) == 2
    with pytest.raises(fastntk.engines.train.TrainingDiverged):
        train_cuda(
            net, params, x, y, loss="mse", lr=5.0, steps=40, on_divergence="raise"
        )


def test_checkpoint_resume_is_bit_identical(tmp_path):
    net, params, x, y = make_problem([2, 3, 1], "tanh", np.float64, P=5)
    kw = dict(loss="mse", lr=0.1, batch_size=2, seed=3)
    straight, _ = train_cuda(net, params, x, y, steps=5, **kw)
    path = tmp_path / "run.npz"
    train_cuda(net, params, x, y, steps=2, checkpoint=path, **kw)
    resumed, hist = train_cuda(
        net, params, x, y, steps=5, checkpoint=path, resume=True, **kw
    )
    np.testing.assert_array_equal(resumed.theta, straight.theta)
    np.testing.assert_array_equal(hist.step, [0, 1, 2, 3, 4, 5])


def test_device_arrays_observables_and_ntk_snapshots():
    # training data already on the device; host callbacks see host parameters
    net, params, x, y = make_problem([2, 3, 1], "erf", np.float64, P=4)
    seen = []
    kw = dict(
        loss="mse",
        lr=0.1,
        steps=2,
        ntk_every=2,
        observables={"norm": lambda p: float(np.linalg.norm(p.theta))},
    )
    pg, hg = train_cuda(
        net,
        params,
        cuda.to_device(x),
        cuda.to_device(y),
        callback=lambda s, p, h: seen.append(s),
        **kw,
    )
    pc, hc = fastntk.train(net, params, x, y, **kw)
    assert seen == [0, 1, 2]
    assert_close(pg.theta, pc.theta, "gpu", np.float64, "device data")
    assert_close(
        hg.observables["norm"], hc.observables["norm"], "gpu", np.float64, "observable"
    )
    np.testing.assert_array_equal(hg.ntk_step, hc.ntk_step)
    for Hg, Hc in zip(hg.ntk, hc.ntk):
        assert_close(Hg, Hc, "gpu", np.float64, "NTK snapshot")


def test_public_train_takes_device_arrays_in_place():
    # fastntk.train hands device data to the GPU engine without a host round trip
    net, params, x, y = make_problem([2, 3, 1], "tanh", np.float64, P=5)
    kw = dict(loss="mse", lr=0.1, steps=3)
    pg, hg = fastntk.train(
        net, params, cuda.to_device(x), cuda.to_device(y), backend="cuda", **kw
    )
    pc, hc = fastntk.train(net, params, x, y, **kw)
    assert_close(pg.theta, pc.theta, "gpu", np.float64, "public train, device data")
    assert_close(hg.train_loss, hc.train_loss, "gpu", np.float64, "losses")


def test_public_train_routes_to_the_gpu_and_reports_a_missing_one(monkeypatch):
    net, params, x, y = make_problem([2, 3, 1], "tanh", np.float64, P=3)
    pg, _ = fastntk.train(
        net, params, x, y, loss="mse", lr=0.1, steps=1, backend="cuda"
    )
    pc, _ = fastntk.train(net, params, x, y, loss="mse", lr=0.1, steps=1)
    assert_close(pg.theta, pc.theta, "gpu", np.float64, "public train")

    monkeypatch.setattr(dispatch, "cuda_status", lambda: (False, "no device here"))
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        fastntk.train(net, params, x, y, loss="mse", lr=0.1, steps=1, backend="cuda")


def test_bad_device_training_data_raise_clear_errors():
    net, params, x, y = make_problem([2, 3, 1], "tanh", np.float64, P=3)
    with pytest.raises(TypeError, match="y: expected dtype float64"):
        train_cuda(
            net,
            params,
            x,
            cuda.to_device(y.astype(np.float32)),
            loss="mse",
            lr=0.1,
            steps=1,
        )
    with pytest.raises(ValueError, match=r"y: expected shape \(3, 1\)"):
        train_cuda(
            net, params, x, cuda.to_device(np.ones((2, 1))), loss="mse", lr=0.1, steps=1
        )
    bad = x.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="x: expected finite values"):
        train_cuda(net, params, cuda.to_device(bad), y, loss="mse", lr=0.1, steps=1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_public_gradient_and_jacobian_on_the_gpu(monkeypatch, rng, dtype):
    from fastntk import reference
    from fastntk.engines import ntk_cuda

    net, params, x, _ = make_problem([3, 4, 3], "softplus", dtype, P=5)
    y = one_hot(rng, 5, 3, dtype)
    loss = fastntk.CrossEntropy("mean")
    value, grad = fastntk.loss_and_gradient(net, params, x, y, loss, backend="cuda")
    z = reference.apply(net, params, x)
    assert_close(value, reference.loss_value(loss, z, y), "gpu", dtype, "loss")
    assert_close(
        grad, reference.gradient(net, params, x, y, loss), "gpu", dtype, "gradient"
    )
    assert_close(
        fastntk.gradient(net, params, x, y, loss, backend="cuda"),
        grad,
        "gpu",
        dtype,
        "gradient()",
    )

    # blocks of two samples: a device that reports little free memory
    per_sample = (3 * net.n_params + 3 * sum(net.widths) * 4) * np.dtype(dtype).itemsize
    monkeypatch.setattr(ntk_cuda, "_free_device_memory", lambda: 8.0 * per_sample)
    J = fastntk.jacobian(net, params, x, backend="cuda")
    assert_close(J, reference.jacobian(net, params, x), "gpu", dtype, "jacobian")
