"""The empirical neural tangent kernel of an MLP.

For two sample sets x1 (P1 rows) and x2 (P2 rows) and a learning-rate tensor
lambda, the neural tangent kernel is

    H[a, b, i, j] = sum_{mu, nu} dz_i(x1_a)/dtheta_mu lambda_{mu nu}
                                 dz_j(x2_b)/dtheta_nu,

stored samples first: ``H[a, b, i, j]`` is H_{i j; a b} in the usual notation,
for output i on sample a of x1 and output j on sample b of x2 (the layout of
neural-tangents and torch.func).  Two algorithms compute it:

- *structured* (identity and layerwise tensors): per layer, the Gram matrix of the
  layer's inputs and the Gram matrix of the backpropagated output derivatives,
  combined elementwise and summed over layers; no Jacobian is formed.
- *jacobian* (any tensor, needed for diagonal and dense ones): ``J lambda J^T``
  contracted block by block over samples and parameters.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import logging
import os
import threading
from dataclasses import dataclass

import numba
import numpy as np

from fastntk import _config
from fastntk._validation import as_samples, check_int
from fastntk.kernels import cpu_ntk
from fastntk.model.rates import check_rates

logger = logging.getLogger(__name__)

OUTPUTS = ("full", "trace", "diagonal")
METHODS = ("auto", "structured", "jacobian")

#: Default working-set budget (bytes, beyond the output) when no limit is given.
DEFAULT_MEMORY_LIMIT = 1 << 30


@dataclass
class NTKArgs:
    """Validated arguments of :func:`ntk`, shared by the CPU and GPU drivers."""

    net: object
    params: object
    x1: object
    x2: object
    symmetric: bool
    rates: object
    outputs: str
    per_layer: bool
    method: str
    memory_limit: int
    block_size: int | None
    shape: tuple
    dtype: np.dtype


# -- validation -------------------------------------------------------------------


def _check_net(net):
    from fastntk.model.mlp import MLP

    if not isinstance(net, MLP):
        raise TypeError(f"net: expected fastntk.MLP, received {type(net).__name__}")
    return net


def ntk_shape(net, P1, P2, outputs="full", per_layer=False) -> tuple:
    """Shape of the kernel :func:`ntk` returns for P1 x P2 samples."""
    n_out = net.n_out
    base = {
        "full": (P1, P2, n_out, n_out),
        "trace": (P1, P2),
        "diagonal": (P1, P2, n_out),
    }[outputs]
    return (net.depth, *base) if per_layer else base


def _check_ntk_options(
    net, params, rates, *, outputs, per_layer, method, memory_limit, block_size
):
    # Everything but the sample arrays and ``out``: returns the validated pieces.
    net = _check_net(net)
    params = net.check_params(params)
    rates = check_rates(rates, net)
    if outputs not in OUTPUTS:
        raise ValueError(
            f"outputs: expected one of {', '.join(map(repr, OUTPUTS))}, received "
            f"{outputs!r}"
        )
    if not isinstance(per_layer, (bool, np.bool_)):
        raise TypeError(
            f"per_layer: expected True or False, received {type(per_layer).__name__}"
        )
    if method not in METHODS:
        raise ValueError(
            f"method: expected one of {', '.join(map(repr, METHODS))}, received "
            f"{method!r}"
        )
    if method == "auto":
        method = "structured" if rates.structured else "jacobian"
    elif method == "structured" and not rates.structured:
        raise ValueError(
            f"method: 'structured' needs an identity or layerwise learning-rate "
            f"tensor, received a {rates.kind} one; use method='jacobian' (or "
            f"'auto')"
        )
    if per_layer and rates.kind == "dense":
        raise ValueError(
            "per_layer: per-layer kernels are not defined for a dense "
            "learning-rate tensor (its blocks couple layers); use per_layer=False "
            "or a diagonal tensor"
        )
    if memory_limit is None:
        memory_limit = DEFAULT_MEMORY_LIMIT
    else:
        memory_limit = check_int("memory_limit", memory_limit, 1)
    if block_size is not None:
        block_size = check_int("block_size", block_size, 1)
    return (
        net,
        params,
        rates,
        str(outputs),
        bool(per_layer),
        method,
        memory_limit,
        block_size,
    )


def _check_samples(net, params, x1, x2):
    # Sample matrices in the parameters' dtype; x2 None when it is x1.
    x1 = as_samples("x1", x1, net.n_in, params.dtype)
    if x2 is None:
        return x1, None
    if np.ndim(x2) == 2 and np.shape(x2)[1] != net.n_in:
        raise ValueError(
            f"x2: expected shape (P2, {net.n_in}) to match x1's and the network's "
            f"input width {net.n_in}, received shape {np.shape(x2)}"
        )
    x2 = as_samples("x2", x2, net.n_in, params.dtype)
    return x1, x2


def _check_out(out, shape, dtype):
    # A caller-supplied result array: exact shape and dtype, C-contiguous, writable.
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(
            f"out: expected a numpy.ndarray (or numpy.memmap) of shape {shape} and "
            f"dtype {dtype}, received {type(out).__name__}"
        )
    if out.shape != tuple(shape):
        raise ValueError(f"out: expected shape {tuple(shape)}, received {out.shape}")
    if out.dtype != dtype:
        raise TypeError(
            f"out: expected dtype {dtype} (the parameters' dtype), received {out.dtype}"
        )
    if not out.flags.c_contiguous:
        raise ValueError("out: expected a C-contiguous array; use np.empty(shape)")
    if not out.flags.writeable:
        raise ValueError("out: expected a writeable array, received a read-only one")
    return out


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (MemAvailable), if known."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _check_output_fits(shape, dtype, memory_limit):
    # Refuse before allocating a result that cannot fit in memory.
    need = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    avail = available_memory()
    if avail is not None and need + min(memory_limit, avail // 4) > avail:
        raise MemoryError(
            f"ntk: the kernel of shape {shape} ({np.dtype(dtype)}) needs "
            f"{need / 2**30:.2f} GiB but only {avail / 2**30:.2f} GiB of memory is "
            f"available; pass out=np.memmap(path, dtype, 'w+', shape={shape}) to "
            f"write it to disk, ask for outputs='trace' or 'diagonal', or use "
            f"fewer samples"
        )


def _check_ntk_args(
    net,
    params,
    x1,
    x2=None,
    rates=None,
    *,
    outputs="full",
    per_layer=False,
    method="auto",
    memory_limit=None,
    block_size=None,
    out=None,
    arrays=True,
):
    """Validate every argument of :func:`ntk` before any work.

    With ``arrays=False`` the sample matrices are only checked for shape (device
    arrays stay where they are) and the result's memory is not checked.
    Returns ``(NTKArgs, out)``.
    """
    net, params, rates, outputs, per_layer, method, memory_limit, block_size = (
        _check_ntk_options(
            net,
            params,
            rates,
            outputs=outputs,
            per_layer=per_layer,
            method=method,
            memory_limit=memory_limit,
            block_size=block_size,
        )
    )
    if arrays:
        x1, x2 = _check_samples(net, params, x1, x2)
    else:
        for name, x in (("x1", x1), ("x2", x2)):
            if x is not None and (len(x.shape) != 2 or x.shape[1] != net.n_in):
                raise ValueError(
                    f"{name}: expected shape (P, {net.n_in}) to match the network's "
                    f"input width {net.n_in}, received shape {tuple(x.shape)}"
                )
    symmetric = x2 is None
    P1 = x1.shape[0]
    P2 = P1 if symmetric else x2.shape[0]
    shape = ntk_shape(net, P1, P2, outputs, per_layer)
    if arrays:
        out = _check_out(out, shape, params.dtype)
        if out is None:
            _check_output_fits(shape, params.dtype, memory_limit)
    args = NTKArgs(
        net=net,
        params=params,
        x1=x1,
        x2=x2,
        symmetric=symmetric,
        rates=rates,
        outputs=outputs,
        per_layer=per_layer,
        method=method,
        memory_limit=memory_limit,
        block_size=block_size,
        shape=shape,
        dtype=params.dtype,
    )
    return args, out


# -- operation count ----------------------------------------------------------------


def ntk_flops(
    net,
    P1,
    P2=None,
    outputs="full",
    symmetric=None,
    method="structured",
    per_layer=False,
) -> float:
    """Floating-point operations of one :func:`ntk` call.

    The count is that of the algorithm as run: symmetric products (x2 = x1)
    are counted once, the forward and backward passes are included, and a
    multiply-add counts as two operations.

    Parameters
    ----------
    net : MLP
    P1, P2 : int
        Sample counts; ``P2=None`` means the symmetric case x2 = x1.
    outputs : {"full", "trace", "diagonal"}
    symmetric : bool, optional
        Defaults to ``P2 is None``.
    method : {"structured", "jacobian"}
    per_layer : bool
        Unused by the count (the same products are computed); accepted for
        symmetry with :func:`ntk`.

    Examples
    --------
    >>> import fastntk
    >>> net = fastntk.MLP([64, 256, 256, 1])
    >>> f = fastntk.ntk_flops(net, 4096, outputs="trace")
    >>> round(f / 1e9, 1)
    19.5
    """
    if symmetric is None:
        symmetric = P2 is None
    if P2 is None:
        P2 = P1
    widths = [int(w) for w in net.widths]
    depth = len(widths) - 1
    n_out = widths[-1]
    pairs = P1 * (P1 + 1) / 2 if symmetric else float(P1) * P2
    samples = P1 if symmetric else P1 + P2

    # forward pass through the hidden layers, then the backward pass of the
    # n_out output derivatives (elementwise through the last layer)
    fwd = sum(2.0 * widths[l] * widths[l + 1] for l in range(depth - 1))
    bwd = sum(2.0 * n_out * widths[l] * widths[l + 1] for l in range(1, depth - 1))
    bwd += n_out * widths[depth - 1] if depth > 1 else 0.0
    total = samples * (fwd + bwd)
    if method == "jacobian":
        # one product J1 J2^T over all parameters, plus filling the Jacobians
        rows = {"full": n_out * n_out, "trace": n_out, "diagonal": n_out}[outputs]
        total += 2.0 * pairs * rows * net.n_params
        return total

    per_pair = {"full": n_out * n_out, "trace": n_out, "diagonal": n_out}[outputs]
    for l in range(depth):
        # input Gram A (K = n_l) and output-derivative Gram G (none on the last
        # layer, whose derivatives are the identity), then the combine pass
        total += 2.0 * pairs * widths[l]
        if l < depth - 1:
            total += 2.0 * pairs * per_pair * widths[l + 1]
        total += 2.0 * pairs * (per_pair if outputs == "full" else n_out)
    return total


# -- public function -----------------------------------------------------------------


def ntk(
    net,
    params,
    x1,
    x2=None,
    rates=None,
    *,
    outputs="full",
    per_layer=False,
    method="auto",
    memory_limit=None,
    block_size=None,
    out=None,
    threads=None,
    backend="cpu",
):
    """Empirical neural tangent kernel between two sample sets.

    ``H[a, b, i, j] = sum_{mu nu} dz_i(x1_a)/dtheta_mu lambda_{mu nu}
    dz_j(x2_b)/dtheta_nu``: sample a of ``x1``, sample b of ``x2``, outputs i
    and j.  In the notation H_{i1 i2; a1 a2} this is ``H[a1, a2, i1, i2]``.

    Parameters
    ----------
    net : MLP
    params : Params
    x1 : array_like, shape (P1, n_0)
        Samples as rows, in the parameters' dtype.
    x2 : array_like, shape (P2, n_0), optional
        Second sample set; ``None`` means ``x1`` (the kernel is then symmetric
        and each pair of samples is computed once).
    rates : Rates, optional
        Learning-rate tensor from :mod:`fastntk.rates`; ``None`` means layerwise
        with lambda_b = lambda_W = 1 (weights of layer l scaled by 1 / n_{l-1}).
    outputs : {"full", "trace", "diagonal"}
        ``"full"``: shape (P1, P2, n_out, n_out); ``"trace"``: the sum over
        outputs ``sum_i H[a, b, i, i]``, shape (P1, P2); ``"diagonal"``:
        ``H[a, b, i, i]``, shape (P1, P2, n_out).
    per_layer : bool
        Return one kernel per layer (leading axis of length L) whose sum over
        that axis is the kernel.  Not available for dense tensors.
    method : {"auto", "structured", "jacobian"}
        ``"structured"`` (identity or layerwise tensors, the default for them)
        builds the kernel from per-layer Gram matrices; ``"jacobian"`` contracts
        Jacobians block by block and handles any tensor.
    memory_limit : int, optional
        Bytes of working memory beyond the result (default 1 GiB); the sample
        blocks are sized to stay under it.
    block_size : int, optional
        Samples per block (rows and columns of one tile of the result);
        chosen automatically by default.
    out : ndarray, optional
        Result array of the exact shape and dtype, C-contiguous; may be a
        ``numpy.memmap`` for kernels larger than memory.  Returned.
    threads : int, optional
        Threads for this call (numba and BLAS), restored afterwards.
    backend : {"cpu", "cuda", "auto"}

    Returns
    -------
    H : ndarray
        In the parameters' dtype; float32 kernels are accumulated in float32.

    Raises
    ------
    MemoryError
        When the result cannot fit in the available memory and no ``out`` is
        given (before anything is allocated).

    Examples
    --------
    >>> import numpy as np, fastntk
    >>> net = fastntk.MLP([3, 32, 32, 2], activation="tanh")
    >>> params = net.init(seed=0)
    >>> x = np.random.default_rng(0).standard_normal((5, 3))
    >>> H = fastntk.ntk(net, params, x)
    >>> H.shape
    (5, 5, 2, 2)
    >>> bool(np.allclose(H, H.transpose(1, 0, 3, 2)))
    True
    """
    from fastntk.kernels.dispatch import resolve_backend

    _config.check_threads(threads)
    on_device = hasattr(x1, "__cuda_array_interface__") or hasattr(
        x2, "__cuda_array_interface__"
    )
    if backend != "cpu" or on_device:
        flops = _flops_estimate(net, x1, x2, outputs)
        if resolve_backend("cuda" if on_device else backend, flops) == "cuda":
            from fastntk.engines.ntk_cuda import ntk_cuda

            return ntk_cuda(
                net,
                params,
                x1,
                x2,
                rates,
                outputs=outputs,
                per_layer=per_layer,
                method=method,
                memory_limit=memory_limit,
                block_size=block_size,
                out=out,
            )

    args, out = _check_ntk_args(
        net,
        params,
        x1,
        x2,
        rates,
        outputs=outputs,
        per_layer=per_layer,
        method=method,
        memory_limit=memory_limit,
        block_size=block_size,
        out=out,
    )
    plan = _plan(args, on_disk=_page_releaser(out) is not None)
    if out is None:
        out = np.empty(args.shape, dtype=args.dtype)
    with _config.thread_limit(threads), _serial_blas():
        if args.method == "structured":
            _structured(args, out, plan)
        else:
            _jacobian(args, out, plan)
    return out


def _flops_estimate(net, x1, x2, outputs):
    # Operation count for the choice of a backend; None when the arguments are
    # not yet known to be valid (the chosen backend's validation reports them).
    try:
        P1 = int(np.shape(x1)[0])
        P2 = None if x2 is None else int(np.shape(x2)[0])
        return ntk_flops(_check_net(net), P1, P2, outputs=outputs)
    except (TypeError, ValueError, IndexError, KeyError):
        return None


# -- BLAS threads ---------------------------------------------------------------------

_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None


@contextlib.contextmanager
def _serial_blas():
    """Run a block with single-threaded BLAS in the library the kernels call.

    The compiled kernels parallelize over tiles and sample blocks and call BLAS
    from every thread; a multithreaded BLAS would then oversubscribe the cores
    (its idle workers spin while the other threads run).  The limit is shared by
    concurrent calls and lifted when the last one leaves, even on an exception.
    """
    global _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = _kernel_blas().limit(limits=1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


@functools.lru_cache(maxsize=1)
def _kernel_blas():
    # threadpoolctl controller of SciPy's BLAS (the one scipy.linalg.cython_blas
    # and numba's np.dot call), or of every BLAS when it cannot be told apart.
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController().select(user_api="blas")
    import scipy

    root = os.path.dirname(os.path.abspath(scipy.__file__))
    own = [
        c.filepath for c in blas.lib_controllers
        if os.path.abspath(c.filepath).startswith((root + os.sep, root + ".libs"))
    ]  # fmt: skip
    return blas.select(filepath=own) if own else blas


# -- planning ------------------------------------------------------------------------


@dataclass
class _Plan:
    """Blocking of one kernel computation, chosen to fit the memory limit."""

    tile: int  # rows per stripe, and columns per tile of the structured kernel
    cols: int  # columns whose features are held at once (all of them if whole)
    whole: bool  # features of every sample computed once, before the stripes
    work: int  # scratch entries of the structured kernel
    units: int  # units per parameter chunk of the Jacobian algorithm


def _plan(args, on_disk=False) -> _Plan:
    # Tile and chunk sizes for ``args``; raises when the limit cannot be met.
    # A result mapped from a file (``on_disk``) gets tiles twice as large, so
    # that fewer stripes fault its pages in and release them.
    net, s = args.net, args.dtype.itemsize
    P1 = args.x1.shape[0]
    P2 = P1 if args.symmetric else args.x2.shape[0]
    n_out, hidden = net.n_out, sum(net.widths[1:-1])
    fan_in = max(net.widths[:-1]) + 1
    per_sample = hidden * (1 + n_out) * s
    threads = numba.get_num_threads()
    # forward-pass buffers of one block of samples per thread
    feature_temps = 2 * min(max(P1, P2), _config.SAMPLE_BLOCK) * hidden * s * threads
    qg = {"full": n_out * n_out, "trace": 1, "diagonal": n_out}[args.outputs]
    dense = args.method == "jacobian" and args.rates.kind == "dense"
    if dense:
        # whole Jacobians of the rows and the columns, and J1 lambda
        per_sample += 2 * n_out * net.n_params * s
    if args.block_size is not None:
        tiles = [args.block_size]
    else:
        # about 512 rows of the output-derivative Gram per tile, smaller when
        # that leaves fewer than four tiles per thread (down to a quarter), and
        # halved further only to meet the memory limit
        first = max(8, 512 // (n_out if args.outputs == "full" else 1))
        first *= 2 if on_disk else 1
        for _ in range(2):
            rows = -(-P1 // first)
            count = rows * (rows + 1) // 2 if args.symmetric else rows * -(-P2 // first)
            if count < 4 * threads and first >= 16:
                first //= 2
        tiles = [first >> k for k in range(first.bit_length())]
    for tile in tiles:
        tile = min(tile, max(P1, P2))
        if args.method == "structured":
            units = 0
            # tile-local accumulator, input Gram, output-derivative Gram
            q = {"full": n_out * n_out, "trace": 1, "diagonal": n_out}[args.outputs]
            work = tile * tile * (q + 1 + qg)
        else:
            # two Jacobian chunks of ``units`` units, their product and its copy
            units = max(1, (1 << 21) // (tile * n_out * fan_in))
            units = min(units, max(net.widths[1:]))
            work = 2 * tile * n_out * units * fan_in + 2 * tile * tile * qg
        # one scratch per thread for the structured kernel; the Jacobian
        # algorithm takes the columns a tile at a time
        fixed = work * s * (threads if units == 0 else 1) + feature_temps
        sets = P1 if args.symmetric else P1 + P2
        if fixed + sets * per_sample <= args.memory_limit:
            return _Plan(tile, P2 if units == 0 else tile, True, work, units)
        cols = (args.memory_limit - fixed - tile * per_sample) // per_sample
        if cols >= tile:
            cols = min(cols, P2) if units == 0 else tile
            return _Plan(tile, int(cols), False, work, units)
    need = fixed + 2 * tile * per_sample
    raise ValueError(
        f"memory_limit: expected at least {need} bytes for the smallest blocks "
        f"of this kernel ({tile} samples per block), received {args.memory_limit}; "
        f"raise memory_limit or use a smaller block_size"
    )


# -- drivers --------------------------------------------------------------------------


def _feature_set(net, params, x):
    # Features of every sample of x: (x flat, acts, grads, n_rows).
    hidden = sum(net.widths[1:-1])
    P = x.shape[0]
    acts = np.empty(P * hidden, dtype=params.dtype)
    grads = np.empty(P * net.n_out * hidden, dtype=params.dtype)
    cpu_ntk.features(
        params.theta, net._widths, x, net.activation_code, net.slope, acts, grads,
        numba.get_num_threads(),
    )  # fmt: skip
    return x.reshape(-1), acts, grads, P


class _Features:
    """Features of a sample set, whole or computed block by block on demand."""

    def __init__(self, net, params, x, whole):
        self.net, self.params, self.x = net, params, x
        self.all = _feature_set(net, params, x) if whole else None

    def block(self, start, stop):
        # (x flat, acts, grads, n_rows, first, count) of samples [start, stop)
        if self.all is not None:
            return (*self.all, start, stop - start)
        part = _feature_set(self.net, self.params, self.x[start:stop])
        return (*part, 0, stop - start)


def _page_releaser(out):
    # A function dropping out's resident pages when out maps a file shared with
    # the disk (np.memmap, modes 'r+' and 'w+'), so that resident memory stays
    # bounded by one stripe; None for arrays in memory.
    if not isinstance(out, np.memmap) or out.mode not in ("r+", "w+"):
        return None
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = -(-out.ctypes.data // page) * page
    stop = (out.ctypes.data + out.nbytes) // page * page

    def release():
        # whole pages inside out only; the file keeps the data (shared mapping)
        if stop > start:
            done = libc.madvise(
                ctypes.c_void_p(start),
                ctypes.c_size_t(stop - start),
                mmap.MADV_DONTNEED,
            )
            if done != 0:
                logger.warning(
                    "ntk: could not release the pages of out (madvise: %s); its "
                    "resident memory may grow to the whole result",
                    os.strerror(ctypes.get_errno()),
                )

    return release


def _stripes(args, out, plan, compute):
    # Drive the stripes of rows: compute(H, rows, cols, r0, c0, sym) for each
    # range of columns, then mirror the lower part of symmetric kernels.
    net, params = args.net, args.params
    P1 = args.x1.shape[0]
    P2 = P1 if args.symmetric else args.x2.shape[0]
    slots = net.depth if args.per_layer else 1
    H = np.asarray(out).reshape(slots, P1, P2, -1)
    f1 = _Features(net, params, args.x1, plan.whole)
    f2 = f1 if args.symmetric else _Features(net, params, args.x2, plan.whole)
    release = _page_releaser(out)
    for r0 in range(0, P1, plan.tile):
        r1 = min(P1, r0 + plan.tile)
        rows = f1.block(r0, r1)
        for c0 in range(r0 if args.symmetric else 0, P2, plan.cols):
            cols = f2.block(c0, min(P2, c0 + plan.cols))
            compute(H, rows, cols, r0, c0, args.symmetric and c0 == r0)
        if args.symmetric:
            # lower part of the stripe from the upper part already computed
            cpu_ntk.mirror_stripe(H, r0, r1, args.outputs == "full")
        if release is not None:
            release()
    logger.debug("ntk: %d x %d kernel in stripes of %d rows", P1, P2, plan.tile)


def _mode(outputs, n_out):
    # With one output the three modes hold the same single value per pair;
    # the trace layout is the simplest of them to combine and store.
    if n_out == 1:
        return cpu_ntk.TRACE
    return {"full": cpu_ntk.FULL, "trace": cpu_ntk.TRACE}.get(outputs, cpu_ntk.DIAGONAL)


def _tile_list(r_lo, r_hi, cols, tile, diagonal):
    # Tiles (i0, j0, tm, tn, diag) of local rows [r_lo, r_hi) against local
    # columns [0, cols), in stripes of ``tile`` rows.  With ``diagonal`` column c
    # is the sample of row c, and only tiles on or above the diagonal are listed.
    tiles = []
    for i0 in range(r_lo, r_hi, tile):
        tm = min(tile, r_hi - i0)
        j = i0 + tm if diagonal else 0
        if diagonal:
            tiles.append((i0, i0, tm, tm, 1))
        tiles += [(i0, j0, tm, min(tile, cols - j0), 0) for j0 in range(j, cols, tile)]
    return np.array(tiles, dtype=np.int64).reshape(-1, 5)


def _share(tiles, n_threads):
    # The tiles grouped by thread, and each thread's range in the groups.  The
    # costliest tile not yet given goes to the thread with the least work so
    # far (a diagonal tile computes half its pairs), which evens out the
    # threads' loads far better than dealing the tiles in turn.
    cost = tiles[:, 2] * tiles[:, 3] // (1 + tiles[:, 4])
    loads = [(0, t) for t in range(n_threads)]
    owner = np.empty(len(tiles), dtype=np.int64)
    for k in np.argsort(-cost, kind="stable"):
        load, t = heapq.heappop(loads)
        owner[k] = t
        heapq.heappush(loads, (load + int(cost[k]), t))
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(n_threads + 1))
    return tiles[order], bounds.astype(np.int64)


def _structured(args, out, plan):
    # H = sum_l (bias_rate_l + weight_rate_l A_l) * G_l, tile by tile, the tiles
    # in parallel; a symmetric kernel is computed on and above the diagonal and
    # mirrored tile by tile.
    net, params, sym = args.net, args.params, args.symmetric
    bias_rate, weight_rate = args.rates.layer_factors(net)
    rates = np.empty((net.depth, 3), dtype=args.dtype)
    rates[:, 0], rates[:, 1], rates[:, 2] = bias_rate, weight_rate, net.n_out
    mode = _mode(args.outputs, args.net.n_out)
    P1 = args.x1.shape[0]
    P2 = P1 if sym else args.x2.shape[0]
    slots = net.depth if args.per_layer else 1
    H = np.asarray(out).reshape(slots, P1, P2, -1)
    work = np.empty((numba.get_num_threads(), plan.work), dtype=args.dtype)
    release = _page_releaser(out)

    def run(rows, cols, tiles, origin):
        tiles, bounds = _share(tiles, work.shape[0])
        cpu_ntk.structured_tiles(
            rows, cols, net._widths, rates, mode, tiles, bounds, H, origin,
            args.per_layer, sym, work,
        )  # fmt: skip

    f1 = _Features(net, params, args.x1, plan.whole)
    f2 = f1 if sym else _Features(net, params, args.x2, plan.whole)
    if plan.whole:
        # every tile at once; a result mapped from a file goes stripe by
        # stripe, its pages released after each
        band = plan.tile if release is not None else P1
        rows, cols = f1.block(0, P1), f2.block(0, P2)
        for r0 in range(0, P1, band):
            tiles = _tile_list(r0, min(P1, r0 + band), P2, plan.tile, sym)
            run(rows, cols, tiles, (0, 0))
            if release is not None:
                release()
        return
    # features recomputed per stripe of rows and per chunk of columns
    for r0 in range(0, P1, plan.tile):
        r1 = min(P1, r0 + plan.tile)
        rows = f1.block(r0, r1)
        for c0 in range(r0 if sym else 0, P2, plan.cols):
            c1 = min(P2, c0 + plan.cols)
            tiles = _tile_list(0, r1 - r0, c1 - c0, plan.tile, sym and c0 == r0)
            run(rows, f2.block(c0, c1), tiles, (r0, c0))
        if release is not None:
            release()


def _jacobian_chunk(net, feats, layer, j0, j1):
    # Jacobian columns of units [j0, j1) of a layer for the samples of ``feats``:
    # weights W[j, q] (theta's order) then biases b[j], shape (m, n_out, cols).
    x, acts, grads, n_rows, first, m = feats
    widths, n_out = net.widths, net.n_out
    k, n = widths[layer], widths[layer + 1]
    if layer == 0:
        inputs = x.reshape(n_rows, k)[first : first + m]
    else:
        o = n_rows * sum(widths[1:layer])
        inputs = acts[o : o + n_rows * k].reshape(n_rows, k)[first : first + m]
    if layer == net.depth - 1:
        # output derivatives of the last layer: the identity
        g = np.zeros((m, n_out, j1 - j0), dtype=x.dtype)
        for j in range(j0, j1):
            g[:, j, j - j0] = 1
    else:
        o = n_rows * n_out * sum(widths[1 : layer + 1])
        g = grads[o : o + n_rows * n_out * n].reshape(n_rows, n_out, n)
        g = g[first : first + m, :, j0:j1]
    J = np.empty((m, n_out, (j1 - j0) * (k + 1)), dtype=x.dtype)
    # dz_i / dW_jq = g_ij a_q ; dz_i / db_j = g_ij
    w = J[:, :, : (j1 - j0) * k].reshape(m, n_out, j1 - j0, k)
    np.multiply(g[:, :, :, None], inputs[:, None, None, :], out=w)
    J[:, :, (j1 - j0) * k :] = g
    return J


def _chunk_indices(net, layer, j0, j1):
    # theta indices of the columns of _jacobian_chunk
    k = net.widths[layer]
    w0, b0 = net.weight_offsets[layer], net.bias_offsets[layer]
    return np.r_[w0 + j0 * k : w0 + j1 * k, b0 + j0 : b0 + j1]


def _contract(J1, J2, mode, target):
    # target (m, nc, q) += J1 J2^T, contracted over parameters as ``mode`` asks
    m, n_out, p = J1.shape
    nc = J2.shape[0]
    if mode == cpu_ntk.FULL:
        G = J1.reshape(m * n_out, p) @ J2.reshape(nc * n_out, p).T
        target += (
            G.reshape(m, n_out, nc, n_out)
            .transpose(0, 2, 1, 3)
            .reshape(m, nc, n_out * n_out)
        )
    elif mode == cpu_ntk.TRACE:
        target[:, :, 0] += J1.reshape(m, n_out * p) @ J2.reshape(nc, n_out * p).T
    else:
        for i in range(n_out):
            target[:, :, i] += J1[:, i, :] @ J2[:, i, :].T


def _jacobian(args, out, plan):
    # H = J1 lambda J2^T over chunks of parameters (units of one layer).
    net = args.net
    mode = _mode(args.outputs, args.net.n_out)
    dense = args.rates.kind == "dense"
    if dense:
        lam = args.rates.matrix(net).astype(args.dtype)
    else:
        lam = args.rates.diagonal_vector(net).astype(args.dtype)
    chunks = [
        (l, j0, min(j0 + plan.units, net.widths[l + 1]))
        for l in range(net.depth)
        for j0 in range(0, net.widths[l + 1], plan.units)
    ]

    def compute(H, rows, cols, r0, c0, sym):
        target = H[:, r0 : r0 + rows[5], c0 : c0 + cols[5]]
        target[...] = 0
        if dense:
            # whole Jacobians in theta's order, then (J1 lambda) J2^T
            J1 = np.empty((rows[5], net.n_out, net.n_params), dtype=args.dtype)
            J2 = np.empty((cols[5], net.n_out, net.n_params), dtype=args.dtype)
            for l, j0, j1 in chunks:
                idx = _chunk_indices(net, l, j0, j1)
                J1[:, :, idx] = _jacobian_chunk(net, rows, l, j0, j1)
                J2[:, :, idx] = _jacobian_chunk(net, cols, l, j0, j1)
            _contract(J1 @ lam, J2, mode, target[0])
            return
        for l, j0, j1 in chunks:
            # diagonal rates: (J1 * lambda) J2^T, chunk by chunk
            J1 = _jacobian_chunk(net, rows, l, j0, j1)
            J1 *= lam[_chunk_indices(net, l, j0, j1)]
            J2 = _jacobian_chunk(net, cols, l, j0, j1)
            _contract(J1, J2, mode, target[l if args.per_layer else 0])

    _stripes(args, out, plan, compute)
