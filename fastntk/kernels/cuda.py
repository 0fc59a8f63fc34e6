"""CUDA kernels of the forward and backward passes, the NTK and the training step.

The GPU twin of :mod:`fastntk.kernels.cpu`: the same raw-array conventions (flat
``theta`` in layer order W^(1) row-major, b^(1), W^(2), b^(2), ...; integer
``widths``; activation code and leaky-ReLU slope), on numba.cuda device arrays.

- Dense matrix products go through :func:`gemm`: cuBLAS through CuPy when CuPy is
  importable (CuPy views the numba device memory in place, no copy), otherwise a
  register-blocked, shared-memory tiled numba.cuda kernel, so that the backend
  needs numba-cuda alone.
- Everything else is small fused elementwise kernels: bias and activation,
  scaling of backpropagated output derivatives by sigma', the per-layer NTK
  combine-and-accumulate, Jacobian blocks, loss and error factor, column sums,
  the parameter update, row gathers.

Kernels take validated device arrays of one floating dtype; any strides are
accepted unless a docstring says otherwise.  Launch geometry (thread-block side,
GEMM tiles) and the matrix-product implementation come from :data:`LAUNCH`;
:func:`launch_config` changes them for a block of code (the tests use tiny
blocks so that multi-block grids run under the CUDA simulator).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time

import numba
import numpy as np
from numba import cuda

from fastntk._config import CUDA_JIT
from fastntk.kernels.activations import (
    ERF,
    GELU,
    LEAKY_RELU,
    LINEAR,
    RELU,
    SIGMOID,
    SIN,
    SWISH,
    TANH,
)
from fastntk.kernels.cpu import CROSS_ENTROPY, MSE

logger = logging.getLogger(__name__)

__all__ = [
    "LAUNCH",
    "launch_config",
    "blas_name",
    "gemm",
    "gemm_profile",
    "to_cupy",
    "layer_views",
    "forward_layers",
    "output_derivatives",
    "combine",
    "mirror",
    "fill_jacobian",
    "scale_columns",
    "loss_error",
    "gradient",
    "update",
    "update_dense",
    "reduce_loss",
    "gather_rows",
    "count_nonfinite",
    "MSE",
    "CROSS_ENTROPY",
]

_SQRT_HALF = 0.7071067811865476
_TWO_OVER_SQRT_PI = 1.1283791670955126
_INV_SQRT_2PI = 0.3989422804014327


class _Launch:
    """Launch geometry and matrix-product implementation of the CUDA kernels.

    Attributes
    ----------
    threads : int
        Side of the square thread block of the 2-D elementwise kernels (the 1-D
        kernels use ``threads ** 2`` threads per block).
    gemm : tuple of int or None
        (threads_y, threads_x, rows_per_thread, cols_per_thread, k_tile) of the
        tiled matrix-product kernel; one block computes a tile of
        (threads_y * rows_per_thread) x (threads_x * cols_per_thread) entries.
        None (default) picks :data:`GEMM_LARGE` for products with at least
        :data:`GEMM_LARGE_MIN_TILES` of its tiles, :data:`GEMM_SMALL` otherwise.
    blas : {"auto", "cublas", "numba"}
        ``"auto"`` uses cuBLAS through CuPy when CuPy imports, the tiled kernel
        otherwise.
    """

    def __init__(self):
        self.threads = 16
        self.gemm = None
        self.blas = "auto"


#: The launch configuration in use.
LAUNCH = _Launch()

#: GEMM tiles of 128 x 128 (8 x 8 entries per thread): four multiply-adds per
#: shared-memory load, for large products.
GEMM_LARGE = (16, 16, 8, 8, 8)

#: GEMM tiles of 64 x 64 (4 x 4 entries per thread): more blocks for small
#: products.
GEMM_SMALL = (16, 16, 4, 4, 16)

#: Products with at least this many 128 x 128 tiles use :data:`GEMM_LARGE`
#: (about two blocks per multiprocessor of a large GPU).
GEMM_LARGE_MIN_TILES = 256


@contextlib.contextmanager
def launch_config(threads=None, gemm=None, blas=None):
    """Run a block with another launch configuration, restored on exit.

    Parameters
    ----------
    threads : int, optional
        Side of the 2-D thread blocks of the elementwise kernels.
    gemm : tuple of 5 int, optional
        (threads_y, threads_x, rows_per_thread, cols_per_thread, k_tile).
        The default, None, chooses per product.
    blas : {"auto", "cublas", "numba"}, optional
    """
    previous = (LAUNCH.threads, LAUNCH.gemm, LAUNCH.blas)
    if threads is not None:
        LAUNCH.threads = int(threads)
    if gemm is not None:
        LAUNCH.gemm = tuple(int(v) for v in gemm)
        if len(LAUNCH.gemm) != 5 or min(LAUNCH.gemm) < 1:
            LAUNCH.gemm = previous[1]
            raise ValueError(
                f"gemm: expected 5 positive integers (threads_y, threads_x, "
                f"rows_per_thread, cols_per_thread, k_tile), received {gemm!r}"
            )
    if blas is not None:
        if blas not in ("auto", "cublas", "numba"):
            raise ValueError(
                f"blas: expected 'auto', 'cublas' or 'numba', received {blas!r}"
            )
        LAUNCH.blas = blas
    try:
        yield LAUNCH
    finally:
        LAUNCH.threads, LAUNCH.gemm, LAUNCH.blas = previous


def _grid1(n):
    # 1-D launch covering n items.
    tpb = LAUNCH.threads * LAUNCH.threads
    return (max(1, (n + tpb - 1) // tpb),), (tpb,)


def _grid2(rows, cols):
    # 2-D launch covering a rows x cols index space; x runs along columns.
    t = LAUNCH.threads
    return (max(1, (cols + t - 1) // t), max(1, (rows + t - 1) // t)), (t, t)


# -- activations (device functions) ------------------------------------------------


@cuda.jit(device=True, **CUDA_JIT)
def _sigmoid(x):
    # Numerically stable logistic function.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@cuda.jit(device=True, **CUDA_JIT)
def act(code, x, slope):
    """sigma(x) for the activation ``code`` (codes of fastntk.kernels.activations)."""
    if code == RELU:
        return x if x > 0 else 0.0 * x
    if code == LINEAR:
        return 1.0 * x
    if code == LEAKY_RELU:
        return x if x > 0 else slope * x
    if code == TANH:
        return math.tanh(x)
    if code == SIGMOID:
        return _sigmoid(x)
    if code == SIN:
        return math.sin(x)
    if code == ERF:
        return math.erf(x)
    if code == GELU:
        return 0.5 * x * (1.0 + math.erf(x * _SQRT_HALF))
    if code == SWISH:
        return x * _sigmoid(x)
    # softplus: log(1 + e^x) without overflow
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@cuda.jit(device=True, **CUDA_JIT)
def dact(code, x, slope):
    """sigma'(x) for the activation ``code``."""
    if code == RELU:
        return 1.0 if x > 0 else 0.0
    if code == LINEAR:
        return 1.0
    if code == LEAKY_RELU:
        return 1.0 if x > 0 else slope
    if code == TANH:
        t = math.tanh(x)
        return 1.0 - t * t
    if code == SIGMOID:
        s = _sigmoid(x)
        return s * (1.0 - s)
    if code == SIN:
        return math.cos(x)
    if code == ERF:
        return _TWO_OVER_SQRT_PI * math.exp(-x * x)
    if code == GELU:
        return 0.5 * (1.0 + math.erf(x * _SQRT_HALF)) + x * _INV_SQRT_2PI * math.exp(
            -0.5 * x * x
        )
    if code == SWISH:
        s = _sigmoid(x)
        return s + x * s * (1.0 - s)
    # softplus' = sigmoid
    return _sigmoid(x)


@cuda.jit(**CUDA_JIT)
def _activation_k(x, code, slope, out, derivative):
    # out = sigma(x) or sigma'(x), elementwise over a 1-D array.
    i = cuda.grid(1)
    if i < x.shape[0]:
        if derivative:
            out[i] = dact(code, x[i], slope)
        else:
            out[i] = act(code, x[i], slope)


def activation(x, code, slope, out, derivative=False, stream=0):
    """out = sigma(x) (or sigma'(x) when ``derivative``), 1-D device arrays."""
    grid, block = _grid1(x.shape[0])
    _activation_k[grid, block, stream](x, code, slope, out, derivative)


# -- matrix products ---------------------------------------------------------------


@functools.cache
def _gemm_kernel(dtype, ty, tx, rm, rn, bk):
    # Tiled kernel C = op(A) op(B) for one dtype and one tile geometry.  A block
    # of ty x tx threads computes a (ty*rm) x (tx*rn) tile of C; thread (y, x)
    # owns rows y, y + ty, ... and columns x, x + tx, ... of the tile, so that
    # neighbouring threads write neighbouring columns.  Each step stages a k-tile
    # of op(A) and op(B) in shared memory and accumulates rm x rn products in
    # registers.
    bm, bn, nthreads = ty * rm, tx * rn, ty * tx
    # one padding column keeps the staging stores free of bank conflicts; the
    # shapes are computed here so that the kernel sees them as constants
    sa_shape, sb_shape = (bk, bm + 1), (bk, bn + 1)
    nbtype = numba.from_dtype(np.dtype(dtype))

    @cuda.jit(**CUDA_JIT)
    def kernel(A, B, C, trans_a, trans_b):
        sa = cuda.shared.array(sa_shape, nbtype)
        sb = cuda.shared.array(sb_shape, nbtype)
        acc = cuda.local.array((rm, rn), nbtype)
        ra = cuda.local.array(rm, nbtype)
        rb = cuda.local.array(rn, nbtype)
        x = cuda.threadIdx.x
        y = cuda.threadIdx.y
        tid = y * tx + x
        r0 = cuda.blockIdx.y * bm
        c0 = cuda.blockIdx.x * bn
        M = C.shape[0]
        N = C.shape[1]
        K = A.shape[0] if trans_a else A.shape[1]
        for i in range(rm):
            for j in range(rn):
                acc[i, j] = 0
        for k0 in range(0, K, bk):
            # stage op(A)[r0:r0+bm, k0:k0+bk]; consecutive threads read
            # consecutive addresses of A in either layout
            for e in range(tid, bm * bk, nthreads):
                if trans_a:
                    kk = e // bm
                    r = e - kk * bm
                else:
                    r = e // bk
                    kk = e - r * bk
                v = 0
                if r0 + r < M and k0 + kk < K:
                    v = A[k0 + kk, r0 + r] if trans_a else A[r0 + r, k0 + kk]
                sa[kk, r] = v
            # stage op(B)[k0:k0+bk, c0:c0+bn]
            for e in range(tid, bn * bk, nthreads):
                if trans_b:
                    c = e // bk
                    kk = e - c * bk
                else:
                    kk = e // bn
                    c = e - kk * bn
                v = 0
                if c0 + c < N and k0 + kk < K:
                    v = B[c0 + c, k0 + kk] if trans_b else B[k0 + kk, c0 + c]
                sb[kk, c] = v
            cuda.syncthreads()
            # rank-1 updates of the register tile
            for kk in range(bk):
                for i in range(rm):
                    ra[i] = sa[kk, y + i * ty]
                for j in range(rn):
                    rb[j] = sb[kk, x + j * tx]
                for i in range(rm):
                    for j in range(rn):
                        acc[i, j] += ra[i] * rb[j]
            cuda.syncthreads()
        for i in range(rm):
            r = r0 + y + i * ty
            if r < M:
                for j in range(rn):
                    c = c0 + x + j * tx
                    if c < N:
                        C[r, c] = acc[i, j]

    return kernel


@functools.lru_cache(maxsize=1)
def _cupy():
    # CuPy module when it imports and can run here, else None.
    if numba.config.ENABLE_CUDASIM:
        return None
    try:
        import cupy

        # one small product proves that CuPy's CUDA matches the driver
        cupy.matmul(cupy.ones((2, 2)), cupy.ones((2, 2)))
    except Exception as exc:  # CuPy missing or built for another CUDA
        if not isinstance(exc, ImportError):
            logger.warning("CuPy is installed but unusable (%s); using numba GEMM", exc)
        return None
    return cupy


def blas_name() -> str:
    """Implementation :func:`gemm` uses now: ``"cublas"`` or ``"numba"``."""
    if LAUNCH.blas == "numba":
        return "numba"
    if _cupy() is not None:
        return "cublas"
    if LAUNCH.blas == "cublas":
        raise RuntimeError(
            "blas='cublas' needs CuPy, which could not be imported; install a CuPy "
            "wheel matching the CUDA driver (e.g. pip install cupy-cuda12x) or use "
            "blas='auto'"
        )
    return "numba"


def to_cupy(arr):
    """A CuPy view of a numba device array, sharing its memory (no copy, no sync).

    The view keeps ``arr`` alive.  Requires CuPy.
    """
    cp = _cupy()
    iface = arr.__cuda_array_interface__
    itemsize = np.dtype(arr.dtype).itemsize
    if arr.size == 0:
        return cp.empty(arr.shape, dtype=arr.dtype)
    # bytes spanned by the view, from its first to its last element
    span = itemsize + sum((n - 1) * abs(s) for n, s in zip(arr.shape, arr.strides))
    memory = cp.cuda.UnownedMemory(iface["data"][0], span, arr)
    return cp.ndarray(
        arr.shape,
        dtype=arr.dtype,
        memptr=cp.cuda.MemoryPointer(memory, 0),
        strides=arr.strides,
    )


def _cupy_stream(stream):
    # CuPy stream context matching a numba stream (0: the default stream).
    cp = _cupy()
    if not stream:
        # the legacy default stream, where numba launches with stream 0 run
        return cp.cuda.Stream.null
    # numba streams convert to their CUstream handle with int()
    return cp.cuda.ExternalStream(int(stream))


class _GemmProfile:
    """Operation count and device time of the matrix products run under it."""

    def __init__(self):
        self.flops = 0.0
        self.seconds = 0.0
        self.calls = 0
        self._events = []

    @property
    def rate(self) -> float:
        """Floating-point operations per second of the recorded products."""
        return self.flops / self.seconds if self.seconds > 0 else 0.0

    def _close(self):
        # Sum the event pairs once the device has finished.
        cuda.synchronize()
        for start, stop in self._events:
            self.seconds += start.elapsed_time(stop) / 1e3
        self._events = []


_PROFILE: list = []


@contextlib.contextmanager
def gemm_profile():
    """Record the work and device time of every :func:`gemm` call in a block.

    On a GPU each product is bracketed by CUDA events on its stream, which
    neither synchronizes nor changes the overlap of the work; the times are
    summed when the block exits.  Under the simulator (whose events do not
    time) each product is bracketed by synchronizations and host timers.

    Yields
    ------
    profile : object with ``flops``, ``seconds``, ``calls`` and ``rate``
        ``seconds`` and ``rate`` are complete once the block has exited.
    """
    profile = _GemmProfile()
    _PROFILE.append(profile)
    try:
        yield profile
    finally:
        _PROFILE.remove(profile)
        profile._close()


def _profile_start(stream):
    # A CUDA event on a GPU, a host time after synchronizing under the simulator.
    if numba.config.ENABLE_CUDASIM:
        cuda.synchronize()
        return time.perf_counter()
    event = cuda.event()
    event.record(stream)
    return event


def _profile_stop(start, stream, flops):
    if numba.config.ENABLE_CUDASIM:
        cuda.synchronize()
        elapsed = time.perf_counter() - start
        for profile in _PROFILE:
            profile.seconds += elapsed
    else:
        stop = cuda.event()
        stop.record(stream)
        for profile in _PROFILE:
            profile._events.append((start, stop))
    for profile in _PROFILE:
        profile.flops += flops
        profile.calls += 1


def gemm(A, B, C, trans_a=False, trans_b=False, stream=0):
    """C = op(A) op(B) on the device, op(X) = X or X^T.

    Parameters
    ----------
    A : device array, shape (M, K), or (K, M) when ``trans_a``
    B : device array, shape (K, N), or (N, K) when ``trans_b``
    C : device array, shape (M, N), written (not accumulated)
    trans_a, trans_b : bool
    stream : numba stream or 0

    Notes
    -----
    Products accumulate in the arrays' dtype (cuBLAS does the same).  Any
    strides are accepted; C must not overlap A or B.
    """
    start = _profile_start(stream) if _PROFILE else None
    if blas_name() == "cublas":
        cp = _cupy()
        a, b, c = to_cupy(A), to_cupy(B), to_cupy(C)
        with _cupy_stream(stream):
            cp.matmul(a.T if trans_a else a, b.T if trans_b else b, out=c)
    else:
        M, N = C.shape
        config = LAUNCH.gemm
        if config is None:
            tiles = (-(-M // 128)) * (-(-N // 128))
            config = GEMM_LARGE if tiles >= GEMM_LARGE_MIN_TILES else GEMM_SMALL
        ty, tx, rm, rn, bk = config
        kernel = _gemm_kernel(np.dtype(C.dtype).str, ty, tx, rm, rn, bk)
        grid = (max(1, -(-N // (tx * rn))), max(1, -(-M // (ty * rm))))
        kernel[grid, (tx, ty), stream](A, B, C, bool(trans_a), bool(trans_b))
    if start is not None:
        K = A.shape[0] if trans_a else A.shape[1]
        _profile_stop(start, stream, 2.0 * C.shape[0] * C.shape[1] * K)


# -- forward and backward passes ------------------------------------------------


def layer_views(theta, widths):
    """Per-layer views (W^(l) of shape (n_l, n_{l-1}), b^(l)) of a device theta."""
    Ws, bs = [], []
    pos = 0
    for l in range(len(widths) - 1):
        n, k = int(widths[l + 1]), int(widths[l])
        Ws.append(theta[pos : pos + n * k].reshape(n, k))
        pos += n * k
        bs.append(theta[pos : pos + n])
        pos += n
    return Ws, bs


@cuda.jit(**CUDA_JIT)
def _bias_activate_k(z, b, a, code, slope, activate):
    # z += b row by row; a = sigma(z) when ``activate``.
    i, p = cuda.grid(2)
    if p < z.shape[0] and i < z.shape[1]:
        v = z[p, i] + b[i]
        z[p, i] = v
        if activate:
            a[p, i] = act(code, v, slope)


def forward_layers(Ws, bs, x, code, slope, zs, acts, stream=0):
    """Every layer's preactivations and activations for a block of samples.

    Parameters
    ----------
    Ws, bs : lists of device arrays
        From :func:`layer_views`.
    x : device array, shape (m, n_0)
    zs : list of device arrays, ``zs[l]`` of shape (m, n_{l+1})
        Receives z^(l+1) (0-based layer l).
    acts : list of device arrays, ``acts[l]`` of shape (m, n_{l+1})
        Receives sigma(z^(l+1)) for every layer but the last (``acts[-1]`` may
        be None).
    """
    depth = len(Ws)
    a = x
    for l in range(depth):
        z = zs[l]
        # z = a W^T, then z += b and sigma(z) in one pass
        gemm(a, Ws[l], z, trans_b=True, stream=stream)
        last = l == depth - 1
        out = z if last else acts[l]
        grid, block = _grid2(z.shape[0], z.shape[1])
        _bias_activate_k[grid, block, stream](z, bs[l], out, code, slope, not last)
        a = out


@cuda.jit(**CUDA_JIT)
def _scale_dact_k(g, zprev, code, slope):
    # g[p, i, q] *= sigma'(zprev[p, q]) for every output row i.
    q, p = cuda.grid(2)
    if p < g.shape[0] and q < g.shape[2]:
        d = dact(code, zprev[p, q], slope)
        for i in range(g.shape[1]):
            g[p, i, q] *= d


@cuda.jit(**CUDA_JIT)
def _eye_k(g):
    # g[p] = identity (n_out x n_out) for every sample p.
    j, p = cuda.grid(2)
    if p < g.shape[0] and j < g.shape[2]:
        for i in range(g.shape[1]):
            g[p, i, j] = 1 if i == j else 0


def output_derivatives(Ws, zs, code, slope, gs, stream=0):
    """Backpropagated output derivatives g^(l) = dz^(L) / dz^(l) of every layer.

    ``gs[l]`` (0-based layer l) is a C-contiguous device array of shape
    (m, n_out, n_{l+1}); ``gs[-1]`` receives the identity and
    g^(l-1) = (g^(l) W^(l)) * sigma'(z^(l-1)) fills the layers below.
    """
    depth = len(Ws)
    m, n_out = gs[-1].shape[0], gs[-1].shape[1]
    grid, block = _grid2(m, n_out)
    _eye_k[grid, block, stream](gs[-1])
    for l in range(depth - 1, 0, -1):
        n, k = Ws[l].shape
        g, nxt = gs[l], gs[l - 1]
        # (g W) over all (sample, output) rows, then the sigma' factor
        gemm(g.reshape(m * n_out, n), Ws[l], nxt.reshape(m * n_out, k), stream=stream)
        grid, block = _grid2(m, k)
        _scale_dact_k[grid, block, stream](nxt, zs[l - 1], code, slope)


# -- the NTK: combine and accumulate ------------------------------------------------


@cuda.jit(**CUDA_JIT)
def _combine_full_k(H, Ga, Gg, lb, lw, use_ga, use_gg, accumulate):
    # H[a, b, i, j] (+)= (lb + lw Ga[a, b]) * Gg[a n_out + i, b n_out + j]
    b, a = cuda.grid(2)
    if a < H.shape[0] and b < H.shape[1]:
        n_out = H.shape[2]
        f = lb + lw * Ga[a, b] if use_ga else lb
        for i in range(n_out):
            for j in range(n_out):
                if use_gg:
                    v = f * Gg[a * n_out + i, b * n_out + j]
                else:
                    v = f if i == j else 0.0 * f
                if accumulate:
                    H[a, b, i, j] += v
                else:
                    H[a, b, i, j] = v


@cuda.jit(**CUDA_JIT)
def _combine_diagonal_k(H, Ga, Gg, lb, lw, use_ga, use_gg, accumulate):
    # H[a, b, i] (+)= (lb + lw Ga[a, b]) * Gg[i m1 + a, b]
    b, a = cuda.grid(2)
    m1 = H.shape[0]
    if a < m1 and b < H.shape[1]:
        f = lb + lw * Ga[a, b] if use_ga else lb
        for i in range(H.shape[2]):
            v = f * Gg[i * m1 + a, b] if use_gg else f
            if accumulate:
                H[a, b, i] += v
            else:
                H[a, b, i] = v


@cuda.jit(**CUDA_JIT)
def _combine_trace_k(H, Ga, Gg, lb, lw, use_ga, use_gg, n_out, accumulate):
    # H[a, b] (+)= (lb + lw Ga[a, b]) * sum_s Gg[s m1 + a, b] over the stacked
    # Gram matrices of Gg (one, or one per output); Gg absent: times n_out
    b, a = cuda.grid(2)
    m1 = H.shape[0]
    if a < m1 and b < H.shape[1]:
        f = lb + lw * Ga[a, b] if use_ga else lb
        if use_gg:
            s = Gg[a, b]
            for k in range(1, Gg.shape[0] // m1):
                s += Gg[k * m1 + a, b]
            v = f * s
        else:
            v = f * n_out
        if accumulate:
            H[a, b] += v
        else:
            H[a, b] = v


def combine(H, Ga, Gg, lb, lw, accumulate, n_out, stream=0):
    """Fused per-layer NTK term: H (+)= (lb + lw Ga) * Gg, in H's output layout.

    Parameters
    ----------
    H : device array
        A tile of the result: (m1, m2, n_out, n_out) ("full"), (m1, m2, n_out)
        ("diagonal") or (m1, m2) ("trace"), any strides.
    Ga : device array, shape (m1, m2), or None
        Gram matrix of the layer's inputs; None stands for zero (with ``lw``
        unused), as in the Jacobian contraction.
    Gg : device array or None
        Gram matrix of the output derivatives: (m1 n_out, m2 n_out) with rows
        (sample, output) for "full", (n_out m1, m2) stacked per output for
        "diagonal", (m1, m2) summed over outputs for "trace"; None stands for
        the identity (last layer).
    lb, lw : float
        Bias rate and weight rate of the layer.
    accumulate : bool
        Add to H instead of overwriting it.
    n_out : int
    """
    grid, block = _grid2(H.shape[0], H.shape[1])
    use_ga, use_gg = Ga is not None, Gg is not None
    # unused operands still need an array argument of the right kind
    Ga_ = Ga if use_ga else _dummy(H.dtype)
    Gg_ = Gg if use_gg else _dummy(H.dtype)
    lb, lw = float(lb), float(lw)
    if H.ndim == 4:
        _combine_full_k[grid, block, stream](
            H, Ga_, Gg_, lb, lw, use_ga, use_gg, accumulate
        )
    elif H.ndim == 3:
        _combine_diagonal_k[grid, block, stream](
            H, Ga_, Gg_, lb, lw, use_ga, use_gg, accumulate
        )
    else:
        _combine_trace_k[grid, block, stream](
            H, Ga_, Gg_, lb, lw, use_ga, use_gg, float(n_out), accumulate
        )


@functools.cache
def _dummy_cached(dtype_str, context_id):
    return cuda.device_array((1, 1), dtype=np.dtype(dtype_str))


def _dummy(dtype):
    # A 1 x 1 placeholder for absent operands (never read).
    return _dummy_cached(np.dtype(dtype).str, id(cuda.current_context()))


@cuda.jit(**CUDA_JIT)
def _mirror_full_k(dst, src):
    # dst[b, a, j, i] = src[a, b, i, j]
    b, a = cuda.grid(2)
    if a < src.shape[0] and b < src.shape[1]:
        for i in range(src.shape[2]):
            for j in range(src.shape[3]):
                dst[b, a, j, i] = src[a, b, i, j]


@cuda.jit(**CUDA_JIT)
def _mirror_diagonal_k(dst, src):
    # dst[b, a, i] = src[a, b, i]
    b, a = cuda.grid(2)
    if a < src.shape[0] and b < src.shape[1]:
        for i in range(src.shape[2]):
            dst[b, a, i] = src[a, b, i]


@cuda.jit(**CUDA_JIT)
def _mirror_trace_k(dst, src):
    # dst[b, a] = src[a, b]
    b, a = cuda.grid(2)
    if a < src.shape[0] and b < src.shape[1]:
        dst[b, a] = src[a, b]


def mirror(dst, src, stream=0):
    """dst = the transposed tile: H(x2, x1)[b, a, j, i] = H(x1, x2)[a, b, i, j]."""
    grid, block = _grid2(src.shape[0], src.shape[1])
    kernel = {4: _mirror_full_k, 3: _mirror_diagonal_k, 2: _mirror_trace_k}[src.ndim]
    kernel[grid, block, stream](dst, src)


# -- Jacobian blocks of the general path ----------------------------------------


@cuda.jit(**CUDA_JIT)
def _fill_jacobian_k(J, g, a_prev, w0, b0):
    # J[p n_out + i, w0 + j k + q] = g[p, i, j] a_prev[p, q];
    # J[p n_out + i, b0 + j] = g[p, i, j]
    col, row = cuda.grid(2)
    m, n_out, n = g.shape
    k = a_prev.shape[1]
    if row < m * n_out and col < n * k + n:
        p = row // n_out
        i = row - p * n_out
        if col < n * k:
            j = col // k
            q = col - j * k
            J[row, w0 + col] = g[p, i, j] * a_prev[p, q]
        else:
            j = col - n * k
            J[row, b0 + j] = g[p, i, j]


def fill_jacobian(J, gs, inputs, widths, stream=0):
    """Per-sample Jacobian block J[(p, i), mu] = dz_i(x_p) / dtheta_mu.

    Parameters
    ----------
    J : device array, shape (m n_out, n_params)
    gs : list of device arrays
        Output derivatives from :func:`output_derivatives`.
    inputs : list of device arrays
        Layer inputs a^(l-1): the samples, then the hidden activations.
    widths : sequence of int
    """
    pos = 0
    for l in range(len(widths) - 1):
        n, k = int(widths[l + 1]), int(widths[l])
        grid, block = _grid2(J.shape[0], n * k + n)
        _fill_jacobian_k[grid, block, stream](J, gs[l], inputs[l], pos, pos + n * k)
        pos += n * k + n


@cuda.jit(**CUDA_JIT)
def _scale_columns_k(J, d, out):
    # out[r, c] = J[r, c] d[c]
    c, r = cuda.grid(2)
    if r < J.shape[0] and c < J.shape[1]:
        out[r, c] = J[r, c] * d[c]


def scale_columns(J, d, out, stream=0):
    """out = J * d[None, :] (a diagonal learning-rate tensor applied on the right)."""
    grid, block = _grid2(J.shape[0], J.shape[1])
    _scale_columns_k[grid, block, stream](J, d, out)


# -- loss, gradient, update --------------------------------------------------------


@cuda.jit(**CUDA_JIT)
def _loss_error_k(z, y, loss, scale, eps, per):
    # Per-sample loss per[p] and error factor eps = dL/dz, both times ``scale``.
    p = cuda.grid(1)
    if p < z.shape[0]:
        n = z.shape[1]
        if loss == MSE:
            s = 0.0
            for i in range(n):
                d = z[p, i] - y[p, i]
                eps[p, i] = scale * d
                s += d * d
            per[p] = scale * 0.5 * s
        else:
            # softmax cross-entropy, with log-sum-exp shifted by the max logit
            zmax = z[p, 0]
            for i in range(1, n):
                zmax = max(zmax, z[p, i])
            se = 0.0
            for i in range(n):
                se += math.exp(z[p, i] - zmax)
            lse = zmax + math.log(se)
            ysum = 0.0
            yz = 0.0
            for i in range(n):
                ysum += y[p, i]
                yz += y[p, i] * z[p, i]
            for i in range(n):
                eps[p, i] = scale * (math.exp(z[p, i] - lse) * ysum - y[p, i])
            per[p] = scale * (lse * ysum - yz)


def loss_error(z, y, loss, scale, eps, per, stream=0):
    """Per-sample losses ``per`` (float64) and error factor ``eps`` = dL/dz.

    ``loss`` is :data:`MSE` or :data:`CROSS_ENTROPY`; ``scale`` is 1 for the
    summed loss, 1/P for the mean.  The loss value is ``per.sum()``.
    """
    grid, block = _grid1(z.shape[0])
    _loss_error_k[grid, block, stream](z, y, loss, float(scale), eps, per)


@cuda.jit(**CUDA_JIT)
def _column_sums_k(delta, out):
    # out[j] = sum_p delta[p, j], summed in float64
    j = cuda.grid(1)
    if j < delta.shape[1]:
        s = 0.0
        for p in range(delta.shape[0]):
            s += delta[p, j]
        out[j] = s


def gradient(Ws, zs, inputs, eps, code, slope, gWs, gbs, deltas, stream=0):
    """Gradient dL/dtheta of one block from its forward pass and error factor.

    Parameters
    ----------
    Ws : list of device arrays, ``Ws[l]`` of shape (n_{l+1}, n_l)
    zs : list of device arrays, preactivations (m, n_{l+1})
    inputs : list of device arrays
        Layer inputs (m, n_l): the samples, then the hidden activations.
    eps : device array, shape (m, n_out)
        Error factor of the block (overwritten only if it is in ``deltas``).
    gWs, gbs : lists of device arrays
        Receive dL/dW^(l) (n_{l+1}, n_l) and dL/db^(l) (n_{l+1},), e.g. views
        of one flat gradient in theta's layout.
    deltas : list of device arrays
        ``deltas[l]`` of shape (m, 1, n_{l+1}), C-contiguous, for l < L-1:
        receives dL/dz^(l+1).
    """
    depth = len(Ws)
    delta = eps
    for l in range(depth - 1, -1, -1):
        m, n = delta.shape
        # dL/dW = delta^T a_prev ; dL/db = column sums of delta
        gemm(delta, inputs[l], gWs[l], trans_a=True, stream=stream)
        grid, block = _grid1(n)
        _column_sums_k[grid, block, stream](delta, gbs[l])
        if l > 0:
            # delta below = (delta W) * sigma'(z below)
            k = Ws[l].shape[1]
            nxt = deltas[l - 1]
            gemm(delta, Ws[l], nxt.reshape(m, k), stream=stream)
            grid, block = _grid2(m, k)
            _scale_dact_k[grid, block, stream](nxt, zs[l - 1], code, slope)
            delta = nxt.reshape(m, k)


@cuda.jit(**CUDA_JIT)
def _update_k(cur, nxt, grad, scale, flag):
    # nxt = cur - scale * grad, unless the step's loss was not finite
    i = cuda.grid(1)
    if i < cur.shape[0] and flag[0] == 0:
        nxt[i] = cur[i] - grad[i] * scale[i]


@cuda.jit(**CUDA_JIT)
def _update_dense_k(cur, nxt, step, flag):
    # nxt = cur - step, unless the step's loss was not finite
    i = cuda.grid(1)
    if i < cur.shape[0] and flag[0] == 0:
        nxt[i] = cur[i] - step[i]


def update(cur, nxt, grad, scale, flag, stream=0):
    """nxt = cur - scale * grad (a diagonal learning-rate tensor times lr).

    Nothing is written when ``flag[0]`` is non-zero (a non-finite loss earlier
    in the run), so that both parameter buffers keep their last values.
    """
    grid, block = _grid1(cur.shape[0])
    _update_k[grid, block, stream](cur, nxt, grad, scale, flag)


def update_dense(cur, nxt, step, flag, stream=0):
    """nxt = cur - step, with step = lr lambda g formed beforehand; see update."""
    grid, block = _grid1(cur.shape[0])
    _update_dense_k[grid, block, stream](cur, nxt, step, flag)


@functools.cache
def _reduce_kernel(threads):
    # One block of ``threads`` threads sums a float64 vector in shared memory.
    @cuda.jit(**CUDA_JIT)
    def kernel(per, out, s, flag):
        part = cuda.shared.array(threads, numba.float64)
        t = cuda.threadIdx.x
        acc = 0.0
        for p in range(t, per.shape[0], threads):
            acc += per[p]
        part[t] = acc
        cuda.syncthreads()
        width = threads // 2
        while width > 0:
            if t < width:
                part[t] += part[t + width]
            cuda.syncthreads()
            width //= 2
        if t == 0:
            v = part[0]
            out[s] = v
            if math.isinf(v) or math.isnan(v):
                flag[0] = 1

    return kernel


def reduce_loss(per, out, s, flag, stream=0):
    """out[s] = sum(per) (float64); flag[0] = 1 when it is not finite."""
    threads = 1
    while threads * 2 <= LAUNCH.threads * LAUNCH.threads:
        threads *= 2
    _reduce_kernel(threads)[1, threads, stream](per, out, s, flag)


@cuda.jit(**CUDA_JIT)
def _gather_rows_k(src, index, dst):
    # dst[r, c] = src[index[r], c]
    c, r = cuda.grid(2)
    if r < dst.shape[0] and c < dst.shape[1]:
        dst[r, c] = src[index[r], c]


def gather_rows(src, index, dst, stream=0):
    """dst = src[index] (rows picked by an int64 device array)."""
    grid, block = _grid2(dst.shape[0], dst.shape[1])
    _gather_rows_k[grid, block, stream](src, index, dst)


@cuda.jit(**CUDA_JIT)
def _count_nonfinite_k(x, counter):
    # counter[0] += number of NaN or inf entries (x viewed as 2-D)
    c, r = cuda.grid(2)
    if r < x.shape[0] and c < x.shape[1]:
        v = x[r, c]
        if math.isinf(v) or math.isnan(v):
            cuda.atomic.add(counter, 0, 1)


def count_nonfinite(x) -> int:
    """Number of NaN or inf entries of a 2-D device array (synchronizes)."""
    counter = cuda.to_device(np.zeros(1, dtype=np.int64))
    grid, block = _grid2(x.shape[0], x.shape[1])
    _count_nonfinite_k[grid, block](x, counter)
    return int(counter.copy_to_host()[0])
