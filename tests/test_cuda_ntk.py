"""The GPU NTK engine against the NumPy reference and the CPU engine.

Runs under the CUDA simulator (tiny networks, 2 x 2 thread blocks, blocks of two
or three samples so that tiling, mirroring and streaming are all exercised) or
on a real GPU with FASTNTK_TEST_REAL_GPU=1.
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from numba import cuda

import fastntk
from fastntk import reference
from fastntk.engines import ntk_cuda as engine
from fastntk.kernels import cuda as kernels
from fastntk.kernels import dispatch

from helpers import make_problem
from tolerances import assert_close

pytestmark = pytest.mark.skipif(
    not cuda.is_available(), reason="no GPU and the CUDA simulator is off"
)


@pytest.fixture(autouse=True)
def tiny_blocks():
    with kernels.launch_config(threads=2, gemm=(2, 2, 2, 2, 8), blas="numba"):
        yield


def expected(net, params, x1, x2=None, rates=None, outputs="full"):
    # The reference kernel (float64, full Jacobians) in the requested layout.
    H = reference.ntk(net, params, x1, x2, rates)
    if outputs == "trace":
        return np.einsum("abii->ab", H)
    if outputs == "diagonal":
        return np.einsum("abii->abi", H)
    return H


def samples(rng, P, n, dtype):
    return rng.standard_normal((P, n)).astype(dtype)


@pytest.mark.parametrize(
    "activation, dtype, outputs, cross, block, per_layer",
    [
        ("relu", np.float64, "full", True, 2, False),
        ("tanh", np.float32, "trace", False, 2, False),
        ("erf", np.float64, "diagonal", True, None, True),
        ("softplus", np.float64, "full", False, 3, True),
        ("swish", np.float32, "full", True, None, False),
    ],
)
def test_structured_matches_reference(
    rng, activation, dtype, outputs, cross, block, per_layer
):
    net, params, x1, _ = make_problem([3, 5, 4, 2], activation, dtype, P=5)
    x2 = samples(rng, 4, 3, dtype) if cross else None
    rates = fastntk.rates.layerwise(net, [0.5, 1.0, 2.0], [1.5, 1.0, 0.5])
    H = engine.ntk_cuda(
        net,
        params,
        x1,
        x2,
        rates,
        outputs=outputs,
        per_layer=per_layer,
        block_size=block,
    )
    assert isinstance(H, np.ndarray) and H.dtype == dtype
    want = expected(net, params, x1, x2, rates, outputs)
    if per_layer:
        assert H.shape == (net.depth, *want.shape)
        H = H.sum(axis=0, dtype=np.float64)
    assert_close(H, want, "gpu", dtype, f"{activation} {outputs} cross={cross}")


@pytest.mark.parametrize(
    "kind, outputs, cross, block, per_layer",
    [
        ("diagonal", "full", False, 2, True),
        ("dense", "trace", True, 2, False),
        ("identity", "diagonal", True, None, True),
    ],
)
def test_jacobian_matches_reference(rng, kind, outputs, cross, block, per_layer):
    net, params, x1, _ = make_problem([2, 4, 3, 2], "sigmoid", np.float64, P=4)
    x2 = samples(rng, 3, 2, np.float64) if cross else None
    if kind == "diagonal":
        rates = fastntk.rates.diagonal(rng.uniform(0.1, 2.0, net.n_params))
    elif kind == "dense":
        B = rng.standard_normal((net.n_params, net.n_params))
        rates = fastntk.rates.dense(B @ B.T / net.n_params)
    else:
        rates = fastntk.rates.identity()
    H = engine.ntk_cuda(
        net,
        params,
        x1,
        x2,
        rates,
        outputs=outputs,
        per_layer=per_layer,
        method="jacobian",
        block_size=block,
    )
    want = expected(net, params, x1, x2, rates, outputs)
    if per_layer:
        # each layer's kernel is its own block of parameters
        for l, (ws, bs) in enumerate(net.layer_slices()):
            d = rates.diagonal_vector(net).copy()
            d[: ws.start] = 0.0
            d[bs.stop :] = 0.0
            layer = expected(net, params, x1, x2, fastntk.rates.diagonal(d), outputs)
            assert_close(H[l], layer, "gpu", np.float64, f"{kind} layer {l}")
        H = H.sum(axis=0)
    assert_close(H, want, "gpu", np.float64, f"jacobian {kind} {outputs}")


def test_features_recomputed_when_they_do_not_fit(rng):
    # a budget below the cached features: per-tile recomputation, same kernel
    net, params, x1, _ = make_problem([3, 4, 2], "tanh", np.float64, P=5)
    x2 = samples(rng, 3, 3, np.float64)
    args, _ = fastntk.engines.ntk._check_ntk_args(net, params, x1, x2)
    limit = 3000
    plan = engine._Plan(args, float(limit), host_result=True)
    assert plan.cache is False and plan.m < 5
    H = engine.ntk_cuda(net, params, x1, x2, memory_limit=limit)
    assert_close(H, expected(net, params, x1, x2), "gpu", np.float64, "uncached")


def test_device_samples_give_device_kernel(rng):
    # device in, device out (mirrored tiles written on the device); out= in place
    net, params, x, _ = make_problem([3, 4, 2], "relu", np.float64, P=5)
    dx = cuda.to_device(x)
    H = engine.ntk_cuda(net, params, dx, outputs="full", block_size=2)
    assert dispatch.is_device_array(H)
    assert_close(
        H.copy_to_host(),
        expected(net, params, x),
        "gpu",
        np.float64,
        "device symmetric",
    )

    x2 = samples(rng, 3, 3, np.float64)
    out = cuda.device_array((5, 3), np.float64)
    got = engine.ntk_cuda(net, params, dx, x2, outputs="trace", out=out)
    assert got is out
    assert_close(
        out.copy_to_host(),
        expected(net, params, x, x2, outputs="trace"),
        "gpu",
        np.float64,
        "device out",
    )


def test_streams_tiles_into_a_memmap(tmp_path, rng):
    net, params, x, _ = make_problem([3, 4, 2], "tanh", np.float32, P=5)
    out = np.lib.format.open_memmap(
        tmp_path / "H.npy", mode="w+", dtype=np.float32, shape=(5, 5, 2)
    )
    got = engine.ntk_cuda(net, params, x, outputs="diagonal", block_size=2, out=out)
    assert got is out
    out.flush()
    H = np.load(tmp_path / "H.npy")
    assert_close(
        H, expected(net, params, x, outputs="diagonal"), "gpu", np.float32, "memmap"
    )


def test_public_ntk_with_backend_cuda_equals_cpu():
    net, params, x, _ = make_problem([3, 5, 2], "gelu", np.float64, P=4)
    H_gpu = fastntk.ntk(net, params, x, backend="cuda")
    H_cpu = fastntk.ntk(net, params, x, backend="cpu")
    assert isinstance(H_gpu, np.ndarray)
    assert_close(H_gpu, H_cpu, "gpu", np.float64, "public ntk cuda vs cpu")


def test_backend_auto_picks_the_gpu_only_when_usable_and_large(monkeypatch):
    net, params, x, _ = make_problem([3, 4, 1], "relu", np.float64, P=3)
    calls = []
    real = engine.ntk_cuda

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "ntk_cuda", spy)
    fastntk.ntk(net, params, x, backend="auto")
    assert calls == []  # far below the size where the GPU pays

    monkeypatch.setattr(dispatch, "AUTO_GPU_MIN_FLOPS", 0.0)
    fastntk.ntk(net, params, x, backend="auto")
    assert calls == [1]

    monkeypatch.setattr(dispatch, "cuda_status", lambda: (False, "no device here"))
    fastntk.ntk(net, params, x, backend="auto")
    assert calls == [1]


def test_backend_cuda_without_gpu_says_what_is_missing(monkeypatch):
    net, params, x, _ = make_problem([3, 4, 1], "relu", np.float64, P=3)
    monkeypatch.setattr(
        dispatch, "cuda_status", lambda: (False, "numba.cuda found no usable GPU")
    )
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: numba"):
        fastntk.ntk(net, params, x, backend="cuda")
    with pytest.raises(RuntimeError, match="no usable GPU"):
        engine.ntk_cuda(net, params, x)


@pytest.mark.skipif(
    os.environ.get("FASTNTK_TEST_REAL_GPU") == "1", reason="a real GPU is in use"
)
def test_backend_cuda_error_in_a_process_without_gpu():
    # a fresh interpreter without the simulator: the real driver lookup fails
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    code = (
        "import numpy as np, fastntk\n"
        "net = fastntk.MLP([2, 3, 1])\n"
        "fastntk.ntk(net, net.init(seed=0), np.ones((2, 2)), backend='cuda')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if run.returncode == 0:
        pytest.skip("this machine has a usable GPU")
    assert "backend='cuda' is not available" in run.stderr
    assert "GPU" in run.stderr and "backend='cpu'" in run.stderr


def test_bad_device_inputs_raise_clear_errors():
    net, params, x, _ = make_problem([3, 4, 1], "relu", np.float64, P=3)
    with pytest.raises(TypeError, match="x1: expected dtype float64"):
        engine.ntk_cuda(net, params, cuda.to_device(x.astype(np.float32)))
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="x1: expected finite values, received 1"):
        engine.ntk_cuda(net, params, cuda.to_device(bad))
    with pytest.raises(ValueError, match="x2: expected shape"):
        engine.ntk_cuda(
            net,
            params,
            cuda.to_device(x),
            cuda.to_device(np.ascontiguousarray(x[:, :2])),
        )
    with pytest.raises(ValueError, match="out: expected shape"):
        engine.ntk_cuda(
            net, params, cuda.to_device(x), out=cuda.device_array((3, 2, 1, 1))
        )
    with pytest.raises(MemoryError, match="raise memory_limit"):
        engine.ntk_cuda(net, params, x, memory_limit=64)


def test_gpu_guide_examples_run():
    # the Python blocks of docs/gpu.md, in order, in one namespace
    text = (pathlib.Path(__file__).parents[1] / "docs" / "gpu.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:
        exec(compile(block, "docs/gpu.md", "exec"), namespace)
