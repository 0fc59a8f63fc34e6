"""The empirical neural tangent kernel of an MLP.

For two sample sets x1 (P1 rows) and x2 (P2 rows) and a learning-rate tensor
lambda, the neural tangent kernel is

    H[a, b, i, j] = sum_{mu, nu} dz_i(x1_a)/dtheta_mu lambda_{mu nu}
                                 dz_j(x2_b)/dtheta_nu,

stored samples first: ``H[a, b, i, j]`` is H_{i j; a b} of the spec, for output
i on sample a of x1 and output j on sample b of x2 (the layout of
neural-tangents and torch.func).  Two algorithms compute it:

- *structured* (identity and layerwise tensors): per layer, the Gram matrix of the
  layer's inputs and the Gram matrix of the backpropagated output derivatives,
  combined elementwise and summed over layers; no Jacobian is formed.
- *jacobian* (any tensor, needed for diagonal and dense ones): ``J lambda J^T``
  contracted block by block over samples and parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fastntk import _config
from fastntk._validation import as_samples, check_int
from fastntk.kernels import cpu
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
        (memory_limit),
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

    # forward pass, then backward pass of the n_out output derivatives
    fwd = sum(2.0 * widths[l] * widths[l + 1] for l in range(depth))
    bwd = sum(2.0 * n_out * widths[l] * widths[l + 1] for l in range(1, depth))
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
        P1 = int(x1.shape[0])
        P2 = None if x2 is None else int(x2.shape[0])
        flops = ntk_flops(
            _check_net(net), P1, P2, outputs=outputs if outputs in (OUTPUTS) else "full"
        )
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
    if out is None:
        out = np.empty(args.shape, dtype=args.dtype)
    with _config.thread_limit(threads):
        if args.method == "structured":
            _structured(args, out)
        else:
            _jacobian(args, out)
    return out


# -- drivers --------------------------------------------------------------------------


def _features(net, params, x):
    # Inputs a^(l-1) of every layer, (P, n_{l-1}), and output derivatives g^(l),
    # (P, n_out, n_l), for layers below the last (whose g is the identity).
    zs, acts = net._forward_layers(params, x)
    inputs = [x] + acts[:-1]
    depth, n_out = net.depth, net.n_out
    grads = [None] * depth
    P = x.shape[0]
    g = np.broadcast_to(np.eye(n_out, dtype=x.dtype), (P, n_out, n_out))
    g = np.ascontiguousarray(g)
    for l in range(depth - 1, 0, -1):
        k = net.widths[l]
        nxt = np.empty((P, n_out, k), dtype=x.dtype)
        cpu.output_derivatives_step(
            g, params.weights[l], zs[l - 1], net.activation_code, net.slope, nxt
        )
        grads[l - 1] = nxt
        g = nxt
    return inputs, grads


def _structured(args, out):
    # H = sum_l (bias_rate_l + weight_rate_l A_l) * G_l, one layer at a time.
    net, params = args.net, args.params
    bias_rate, weight_rate = args.rates.layer_factors(net)
    in1, g1 = _features(net, params, args.x1)
    in2, g2 = (in1, g1) if args.symmetric else _features(net, params, args.x2)
    P1, P2, n_out = in1[0].shape[0], in2[0].shape[0], net.n_out
    dt = args.dtype
    if not args.per_layer:
        out[...] = 0
    for l in range(net.depth):
        target = out[l] if args.per_layer else out
        if args.per_layer:
            target[...] = 0
        # input Gram and its layer factor
        c = in1[l] @ in2[l].T
        c *= dt.type(weight_rate[l])
        c += dt.type(bias_rate[l])
        if l == net.depth - 1:
            # last layer: output derivatives are the identity
            if args.outputs == "full":
                for i in range(n_out):
                    target[:, :, i, i] += c
            elif args.outputs == "trace":
                target += dt.type(n_out) * c
            else:
                target += c[:, :, None]
            continue
        # output-derivative Gram, combined with the input Gram
        if args.outputs == "full":
            G = g1[l].reshape(P1 * n_out, -1) @ g2[l].reshape(P2 * n_out, -1).T
            G = G.reshape(P1, n_out, P2, n_out).transpose(0, 2, 1, 3)
            target += c[:, :, None, None] * G
        elif args.outputs == "trace":
            target += c * (g1[l].reshape(P1, -1) @ g2[l].reshape(P2, -1).T)
        else:
            for i in range(n_out):
                target[:, :, i] += c * (g1[l][:, i, :] @ g2[l][:, i, :].T)


def _jacobian(args, out):
    # H = J1 lambda J2^T, Jacobians built per block of samples.
    net, params = args.net, args.params
    J1 = _jac(net, params, args.x1)
    J2 = J1 if args.symmetric else _jac(net, params, args.x2)
    rates = args.rates
    slices = [(0, net.n_params)]
    if args.per_layer:
        slices = [(ws.start, bs.stop) for ws, bs in net.layer_slices()]
    for k, (s0, s1) in enumerate(slices):
        target = out[k] if args.per_layer else out
        if rates.kind == "dense":
            M = np.einsum("aim,mn->ain", J1, rates.matrix(net).astype(args.dtype))
        else:
            d = rates.diagonal_vector(net)[s0:s1].astype(args.dtype)
            M = J1[:, :, s0:s1] * d
        R = J2[:, :, s0:s1] if rates.kind != "dense" else J2
        if args.outputs == "full":
            target[...] = np.einsum("aim,bjm->abij", M, R)
        elif args.outputs == "trace":
            target[...] = np.einsum("aim,bim->ab", M, R)
        else:
            target[...] = np.einsum("aim,bim->abi", M, R)


def _jac(net, params, x):
    J = np.empty((x.shape[0], net.n_out, net.n_params), dtype=params.dtype)
    cpu.jacobian(params.theta, net._widths, x, net.activation_code, net.slope, J)
    return J
