"""CUDA kernels against NumPy, under the CUDA simulator (or a real GPU).

Thread blocks are tiny (2 x 2 threads, 4 x 4 GEMM tiles) so that every launch on
these small arrays runs a grid of several blocks.
"""

import numpy as np
import pytest
from numba import cuda

from fastntk import reference
from fastntk.kernels import activations
from fastntk.kernels import cuda as kernels
from fastntk.kernels.dispatch import device_kind, is_device_array
from fastntk.model.losses import MSE, CrossEntropy

from helpers import make_problem, one_hot
from tolerances import assert_close

pytestmark = pytest.mark.skipif(
    not cuda.is_available(), reason="no GPU and the CUDA simulator is off"
)

DTYPES = (np.float64, np.float32)


@pytest.fixture(autouse=True)
def tiny_blocks():
    with kernels.launch_config(threads=2, gemm=(2, 2, 2, 2, 4), blas="numba"):
        yield


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_every_transpose_and_strided_views(rng, dtype):
    # the tiled product against NumPy for op(A) op(B), ragged tile edges
    M, N, K = 9, 7, 6
    for trans_a in (False, True):
        for trans_b in (False, True):
            A = rng.standard_normal((K, M) if trans_a else (M, K)).astype(dtype)
            B = rng.standard_normal((N, K) if trans_b else (K, N)).astype(dtype)
            C = cuda.device_array((M, N), dtype)
            kernels.gemm(cuda.to_device(A), cuda.to_device(B), C, trans_a, trans_b)
            want = (A.T if trans_a else A) @ (B.T if trans_b else B)
            assert_close(
                C.copy_to_host(), want, "gpu", dtype, f"gemm {trans_a=} {trans_b=}"
            )

    # non-contiguous operands: every other row, a column window
    X = rng.standard_normal((10, 8)).astype(dtype)
    dX = cuda.to_device(X)
    C = cuda.device_array((5, 5), dtype)
    kernels.gemm(dX[::2, 1:6], dX[1::2, :5], C, trans_b=True)
    assert_close(C.copy_to_host(), X[::2, 1:6] @ X[1::2, :5].T, "gpu", dtype, "strided")


def test_gemm_profile_counts_operations(rng):
    A = cuda.to_device(rng.standard_normal((3, 4)))
    B = cuda.to_device(rng.standard_normal((4, 5)))
    C = cuda.device_array((3, 5))
    with kernels.gemm_profile() as prof:
        kernels.gemm(A, B, C)
        kernels.gemm(A, B, C)
    assert prof.calls == 2
    assert prof.flops == 2 * (2 * 3 * 5 * 4)
    assert prof.seconds > 0


def test_blas_selection():
    # without CuPy, asking for cuBLAS must say what is missing
    with kernels.launch_config(blas="numba"):
        assert kernels.blas_name() == "numba"
    if kernels._cupy() is None:
        with kernels.launch_config(blas="cublas"):
            with pytest.raises(RuntimeError, match="needs CuPy"):
                kernels.blas_name()
    with pytest.raises(ValueError, match="blas"):
        with kernels.launch_config(blas="mkl"):
            pass


@pytest.mark.parametrize("name", activations.NAMES)
def test_activation_and_derivative(name):
    # sigma and sigma' of every activation against the NumPy reference
    x = np.linspace(-3.0, 3.0, 9)
    code = activations.code_of(name)
    f, df = reference.ACTIVATIONS[name]
    out = cuda.device_array(x.shape[0])
    dx = cuda.to_device(x)
    kernels.activation(dx, code, 0.1, out)
    assert_close(out.copy_to_host(), f(x, 0.1), "gpu", np.float64, f"{name}")
    kernels.activation(dx, code, 0.1, out, derivative=True)
    assert_close(out.copy_to_host(), df(x, 0.1), "gpu", np.float64, f"{name}'")


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward_and_jacobian_blocks(dtype):
    # preactivations, output derivatives and Jacobian rows against the reference
    net, params, x, _ = make_problem([3, 5, 4, 2], "gelu", dtype, P=5)
    widths = list(net.widths)
    theta = cuda.to_device(params.theta)
    Ws, bs = kernels.layer_views(theta, widths)
    m, n_out = x.shape[0], net.n_out
    zs = [cuda.device_array((m, n), dtype) for n in widths[1:]]
    acts = [cuda.device_array((m, n), dtype) for n in widths[1:-1]] + [None]
    dx = cuda.to_device(x)
    kernels.forward_layers(Ws, bs, dx, net.activation_code, net.slope, zs, acts)
    for l, z in enumerate(reference.preactivations(net, params, x)):
        assert_close(zs[l].copy_to_host(), z, "gpu", dtype, f"z{l + 1}")

    gs = [cuda.device_array((m, n_out, n), dtype) for n in widths[1:]]
    kernels.output_derivatives(Ws, zs, net.activation_code, net.slope, gs)
    J = cuda.device_array((m * n_out, net.n_params), dtype)
    kernels.fill_jacobian(J, gs, [dx] + acts[:-1], widths)
    want = reference.jacobian(net, params, x).reshape(m * n_out, -1)
    assert_close(J.copy_to_host(), want, "gpu", dtype, "jacobian")


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_error_and_gradient(rng, dtype):
    # per-sample loss, error factor and gradient of both losses, sum and mean
    net, params, x, y = make_problem([3, 4, 3], "tanh", dtype, P=5)
    widths = list(net.widths)
    m = x.shape[0]
    for loss, target in ((MSE(), y), (CrossEntropy("mean"), one_hot(rng, m, 3, dtype))):
        theta = cuda.to_device(params.theta)
        Ws, bs = kernels.layer_views(theta, widths)
        zs = [cuda.device_array((m, n), dtype) for n in widths[1:]]
        acts = [cuda.device_array((m, n), dtype) for n in widths[1:-1]] + [None]
        dx = cuda.to_device(x)
        kernels.forward_layers(Ws, bs, dx, net.activation_code, net.slope, zs, acts)
        eps = cuda.device_array((m, 3), dtype)
        per = cuda.device_array(m, np.float64)
        kernels.loss_error(
            zs[-1], cuda.to_device(target), loss.code, loss.scale(m), eps, per
        )
        z = reference.apply(net, params, x)
        assert_close(
            per.copy_to_host().sum(),
            reference.loss_value(loss, z, target),
            "gpu",
            dtype,
            f"{loss} value",
        )
        assert_close(
            eps.copy_to_host(),
            reference.error_factor(loss, z, target),
            "gpu",
            dtype,
            f"{loss} error factor",
        )

        grad = cuda.device_array(net.n_params, dtype)
        gWs, gbs = kernels.layer_views(grad, widths)
        deltas = [cuda.device_array((m, 1, n), dtype) for n in widths[1:-1]]
        kernels.gradient(
            Ws,
            zs,
            [dx] + acts[:-1],
            eps,
            net.activation_code,
            net.slope,
            gWs,
            gbs,
            deltas,
        )
        want = reference.gradient(net, params, x, target, loss)
        assert_close(grad.copy_to_host(), want, "gpu", dtype, f"{loss} gradient")


def test_reduce_loss_update_and_stop_flag():
    # the step loss lands in its slot; a non-finite one raises the flag, after
    # which updates write nothing
    per = cuda.to_device(np.arange(1.0, 8.0))
    out = cuda.to_device(np.zeros(3))
    flag = cuda.to_device(np.zeros(1, np.int32))
    kernels.reduce_loss(per, out, 1, flag)
    assert out.copy_to_host()[1] == 28.0
    assert flag.copy_to_host()[0] == 0

    cur = cuda.to_device(np.array([1.0, 2.0, 3.0]))
    nxt = cuda.to_device(np.zeros(3))
    grad = cuda.to_device(np.array([1.0, 1.0, 2.0]))
    scale = cuda.to_device(np.array([0.5, 0.25, 0.5]))
    kernels.update(cur, nxt, grad, scale, flag)
    np.testing.assert_array_equal(nxt.copy_to_host(), [0.5, 1.75, 2.0])

    kernels.reduce_loss(cuda.to_device(np.array([1.0, np.inf])), out, 2, flag)
    assert flag.copy_to_host()[0] == 1
    kernels.update(cur, nxt, grad, cuda.to_device(np.zeros(3)), flag)
    np.testing.assert_array_equal(nxt.copy_to_host(), [0.5, 1.75, 2.0])


def test_gather_mirror_and_count_nonfinite(rng):
    src = rng.standard_normal((6, 3))
    index = np.array([4, 0, 5, 5], dtype=np.int64)
    dst = cuda.device_array((4, 3))
    kernels.gather_rows(cuda.to_device(src), cuda.to_device(index), dst)
    np.testing.assert_array_equal(dst.copy_to_host(), src[index])

    H = rng.standard_normal((3, 5, 2, 2))
    M = cuda.device_array((5, 3, 2, 2))
    kernels.mirror(M, cuda.to_device(H))
    np.testing.assert_array_equal(M.copy_to_host(), H.transpose(1, 0, 3, 2))

    x = np.ones((3, 4))
    x[1, 2], x[2, 0] = np.nan, -np.inf
    assert kernels.count_nonfinite(cuda.to_device(x)) == 2
    assert kernels.count_nonfinite(cuda.to_device(np.ones((2, 2)))) == 0


def test_device_array_detection():
    d = cuda.to_device(np.ones((2, 2)))
    assert is_device_array(d) and device_kind(d) == "numba"
    assert not is_device_array(np.ones(2)) and device_kind(np.ones(2)) is None
    assert not is_device_array(None) and not is_device_array([1.0])
