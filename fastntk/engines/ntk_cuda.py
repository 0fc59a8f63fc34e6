"""The empirical neural tangent kernel on a CUDA GPU.

The GPU twin of :func:`fastntk.ntk`: same arguments, same result (layout
``H[a, b, i, j]``, outputs "full" / "trace" / "diagonal", per-layer kernels), same
two algorithms:

- *structured* (identity and layerwise tensors): per layer, the Gram matrix of
  the layer's inputs and that of the backpropagated output derivatives, each one
  matrix product, then one fused pass H (+)= (lambda_b + lambda_w A) * G over the
  tile;
- *jacobian* (any tensor): Jacobian blocks built on the device and contracted as
  ``J1 lambda J2^T``.

The kernel is computed tile by tile: rows and columns are cut into blocks of
samples, each tile's products run on the device, and the tile goes either into
a device result or back to the host result (a NumPy array or a ``numpy.memmap``),
through pinned staging buffers on two CUDA streams so that a tile's transfer
overlaps the next tile's computation (tiles made of whole rows of the result go
straight into it).  Per-sample features (layer inputs and
output derivatives) are computed once per block and kept on the device when they
fit; otherwise they are recomputed for each tile.  With ``x2=None`` only the
tiles on and above the diagonal are computed and the others are their mirror.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from fastntk.kernels.dispatch import device_kind, is_device_array, resolve_backend

logger = logging.getLogger(__name__)

#: Share of the device's free memory the working set may use by default.
DEVICE_MEMORY_SHARE = 0.8


def ntk_cuda(
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
):
    """Empirical neural tangent kernel between two sample sets, on the GPU.

    Same contract as :func:`fastntk.ntk` (``backend="cuda"`` routes there):
    ``H[a, b, i, j] = sum_{mu nu} dz_i(x1_a)/dtheta_mu lambda_{mu nu}
    dz_j(x2_b)/dtheta_nu``.

    Parameters
    ----------
    net : MLP
    params : Params
    x1 : array_like or device array, shape (P1, n_0)
        NumPy arrays are copied to the device once; device arrays (numba.cuda
        or CuPy, any strides) are used in place.  Same dtype as the parameters.
    x2 : array_like or device array, shape (P2, n_0), optional
        ``None`` means ``x1`` (symmetric kernel, tiles below the diagonal
        mirrored).
    rates : Rates, optional
        Learning-rate tensor; ``None`` is layerwise with lambda_b = lambda_W = 1.
    outputs : {"full", "trace", "diagonal"}
        Shapes (P1, P2, n_out, n_out), (P1, P2) and (P1, P2, n_out).
    per_layer : bool
        One kernel per layer along a leading axis of length L.
    method : {"auto", "structured", "jacobian"}
    memory_limit : int, optional
        Bytes of device memory the working set (everything but a device-resident
        result) may use; default 80% of the device's free memory.
    block_size : int, optional
        Samples per tile side; chosen from the memory budget by default.
    out : ndarray or device array, optional
        Result of the exact shape and dtype: a NumPy array or ``numpy.memmap``
        (tiles are streamed into it) or a device array (written in place).

    Returns
    -------
    H : ndarray or device array
        A NumPy array when the samples are NumPy arrays, a device array of the
        samples' kind (numba.cuda or CuPy) when they are on the device, or
        ``out`` when given.  In the parameters' dtype; float32 kernels are
        accumulated in float32.

    Raises
    ------
    RuntimeError
        When no usable GPU is present (saying what is missing).
    MemoryError
        When the result or the smallest working set cannot fit (before any
        work), with the sizes and what to change.

    Examples
    --------
    >>> import numpy as np, fastntk                      # doctest: +SKIP
    >>> net = fastntk.MLP([3, 64, 64, 1])                # doctest: +SKIP
    >>> params = net.init(seed=0, dtype="float32")       # doctest: +SKIP
    >>> x = np.random.default_rng(0).standard_normal((1000, 3), dtype=np.float32)
    >>> H = fastntk.ntk(net, params, x, backend="cuda")  # doctest: +SKIP
    >>> H.shape                                          # doctest: +SKIP
    (1000, 1000, 1, 1)
    """
    resolve_backend("cuda")
    args, out, result_kind, budget = _check_args(
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
    return _ntk_device(args, out, result_kind, budget)


# -- validation ----------------------------------------------------------------------


def _free_device_memory() -> float:
    # Free bytes on the current device (infinite under the simulator).
    from numba import cuda

    try:
        return float(cuda.current_context().get_memory_info()[0])
    except Exception:  # a context that cannot report memory
        return math.inf


def _to_numba(x):
    # A numba device view of a device array (CuPy arrays are wrapped, not copied).
    from numba import cuda

    if device_kind(x) == "cupy":
        return cuda.as_cuda_array(x)
    return x


def check_device_samples(name, x, n_in, dtype):
    """Validate a device sample matrix: dtype, shape (P, n_in) with P >= 1, finite.

    Returns the numba view of ``x``.
    """
    from fastntk.kernels import cuda as kernels

    x = _to_numba(x)
    if np.dtype(x.dtype) != np.dtype(dtype):
        raise TypeError(
            f"{name}: expected dtype {np.dtype(dtype)} (the parameters' dtype), "
            f"received a device array of dtype {np.dtype(x.dtype)}; mixing float32 "
            f"and float64 is not supported"
        )
    if len(x.shape) != 2 or x.shape[1] != n_in:
        raise ValueError(
            f"{name}: expected shape (P, {n_in}) to match the network's input width "
            f"{n_in}, received a device array of shape {tuple(x.shape)}"
        )
    if x.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one sample, received 0")
    bad = kernels.count_nonfinite(x)
    if bad:
        raise ValueError(
            f"{name}: expected finite values, received {bad} NaN or inf "
            f"entr{'y' if bad == 1 else 'ies'} in a device array of shape "
            f"{tuple(x.shape)}"
        )
    return x


def _check_args(
    net,
    params,
    x1,
    x2,
    rates,
    *,
    outputs,
    per_layer,
    method,
    memory_limit,
    block_size,
    out,
):
    # Validate with the CPU engine's checks, plus those of device arrays.
    from fastntk.engines.ntk import _check_ntk_args, _check_out

    on_device = is_device_array(x1) or is_device_array(x2)
    out_on_device = is_device_array(out)
    args, host_out = _check_ntk_args(
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
        out=None if (out_on_device or on_device) else out,
        arrays=not on_device,
    )
    if on_device:
        n_in, dt = args.net.n_in, args.dtype
        for name, x in (("x1", x1), ("x2", x2)):
            if x is None:
                continue
            if is_device_array(x):
                view = check_device_samples(name, x, n_in, dt)
            else:
                from fastntk._validation import as_samples

                view = as_samples(name, x, n_in, dt)
            setattr(args, name, view)
        if out is not None and not out_on_device:
            host_out = _check_out(out, args.shape, args.dtype)

    # the result: a device array (given, or for device samples) or the host
    if out_on_device:
        dev_out = _to_numba(out)
        if tuple(dev_out.shape) != tuple(args.shape):
            raise ValueError(
                f"out: expected shape {tuple(args.shape)}, received a device array "
                f"of shape {tuple(dev_out.shape)}"
            )
        if np.dtype(dev_out.dtype) != args.dtype:
            raise TypeError(
                f"out: expected dtype {args.dtype} (the parameters' dtype), "
                f"received a device array of dtype {np.dtype(dev_out.dtype)}"
            )
        result = ("device", device_kind(out), dev_out, out)
    elif host_out is not None:
        result = ("host", None, host_out, host_out)
    elif on_device:
        kind = device_kind(x1) if is_device_array(x1) else device_kind(x2)
        result = ("device", kind, None, None)
    else:
        result = ("host", None, None, None)

    # working-set budget on the device
    free = _free_device_memory()
    budget = DEVICE_MEMORY_SHARE * free
    if memory_limit is not None:
        budget = min(budget, float(args.memory_limit))
    if result[0] == "device" and result[2] is None:
        need = float(np.prod(args.shape, dtype=np.float64)) * args.dtype.itemsize
        if need > free - min(budget, 0.5 * free):
            raise MemoryError(
                f"ntk: the kernel of shape {args.shape} ({args.dtype}) needs "
                f"{need / 2**30:.2f} GiB of device memory, which does not fit "
                f"beside the working set in the {free / 2**30:.2f} GiB free; pass "
                f"NumPy samples or out=np.memmap(path, dtype, 'w+', "
                f"shape={args.shape}) to stream the kernel to the host, or ask for "
                f"outputs='trace'"
            )
        budget = min(budget, free - need)
    return args, result, result[1], budget


# -- plan ------------------------------------------------------------------------------


class _Plan:
    """Block size, feature caching and the number of streams of one call."""

    def __init__(self, args, budget, host_result):
        net = args.net
        widths = [int(w) for w in net.widths]
        n_out, depth = widths[-1], len(widths) - 1
        item = args.dtype.itemsize
        P1 = args.x1.shape[0]
        P2 = P1 if args.symmetric else args.x2.shape[0]
        self.P1, self.P2 = P1, P2
        jac = args.method == "jacobian"

        # device entries per sample of the features: z, activations, g
        hidden = sum(widths[1:])
        self.feature_per_sample = 2 * hidden + n_out * hidden
        # entries per pair of samples of the tile scratch and of the tile
        if jac:
            gram = n_out * n_out
        else:
            gram = {"full": n_out * n_out, "diagonal": n_out, "trace": 1}[args.outputs]
        per_pair_out = {"full": n_out * n_out, "diagonal": n_out, "trace": 1}[
            args.outputs
        ]
        if args.per_layer:
            per_pair_out *= depth
        self.gram = gram
        self.per_pair_out = per_pair_out
        self.streams = 2 if host_result else 1

        # features of every sample stay on the device when they take at most
        # half of the budget
        samples = P1 if args.symmetric else P1 + P2
        features_all = samples * self.feature_per_sample * item
        dense_rates = jac and args.rates.kind == "dense"
        fixed = (net.n_params**2 if dense_rates else 0) * item + net.n_params * item
        self.cache = features_all + fixed <= 0.5 * budget
        left = budget - fixed - (features_all if self.cache else 0)

        def tile_bytes(m):
            # scratch of one stream: Grams, tile, per-block features, Jacobians
            pair = (1 + gram + (per_pair_out if host_result else 0)) * m * m
            feats = 0 if self.cache else 2 * m * self.feature_per_sample
            jacs = 3 * m * n_out * net.n_params if jac else 0
            return self.streams * (pair + feats + jacs) * item

        largest = max(P1, P2)
        if args.block_size is not None:
            m = min(args.block_size, largest)
        else:
            m = largest
            while m > 1 and tile_bytes(m) > left:
                m = max(1, m // 2 if m > 256 else m - max(1, m // 8))
        if tile_bytes(m) > left and args.block_size is None:
            need = fixed + tile_bytes(1)
            raise MemoryError(
                f"ntk: the device working set needs at least {need / 2**20:.3f} MiB "
                f"(parameters and learning-rate tensor {fixed / 2**20:.3f} MiB, one "
                f"sample per block {tile_bytes(1) / 2**20:.3f} MiB), more than the "
                f"budget of {budget / 2**20:.3f} MiB; raise memory_limit, use "
                f"outputs='trace', or a structured learning-rate tensor"
            )
        self.m = m
        self.tile_bytes = tile_bytes(m)

    def blocks(self, P):
        return [(s, min(P, s + self.m)) for s in range(0, P, self.m)]


# -- device buffers ----------------------------------------------------------------


class _Features:
    """Layer inputs, preactivations and output derivatives of a block of samples."""

    def __init__(self, widths, m, dtype, n_params=None):
        from numba import cuda

        depth = len(widths) - 1
        n_out = widths[-1]
        self.m = m
        self.zs = [cuda.device_array((m, widths[l + 1]), dtype) for l in range(depth)]
        self.acts = [
            cuda.device_array((m, widths[l + 1]), dtype) for l in range(depth - 1)
        ]
        self.gs = [
            cuda.device_array((m, n_out, widths[l + 1]), dtype) for l in range(depth)
        ]
        self.J = None
        if n_params is not None:
            self.J = cuda.device_array((m * n_out, n_params), dtype)
        self.inputs = None

    def compute(self, Ws, bs, x, code, slope, stream, jacobian=False, widths=None):
        # forward pass, backpropagated output derivatives, optional Jacobian
        from fastntk.kernels import cuda as kernels

        mb = x.shape[0]
        zs = [z[:mb] for z in self.zs]
        acts = [a[:mb] for a in self.acts] + [None]
        gs = [g[:mb] for g in self.gs]
        kernels.forward_layers(Ws, bs, x, code, slope, zs, acts, stream=stream)
        kernels.output_derivatives(Ws, zs, code, slope, gs, stream=stream)
        self.inputs = [x] + acts[:-1]
        self.gs_view = gs
        self.mb = mb
        if jacobian:
            n_out = gs[-1].shape[1]
            J = self.J[: mb * n_out]
            kernels.fill_jacobian(J, gs, self.inputs, widths, stream=stream)
            self.J_view = J
        return self


class _Scratch:
    """Per-stream buffers of one tile: Gram matrices, Jacobian products, tile."""

    def __init__(self, plan, args, dtype, host_result):
        from numba import cuda

        m = plan.m
        n_out = args.net.n_out
        self.ga = cuda.device_array(m * m, dtype)
        self.gg = cuda.device_array(max(1, plan.gram) * m * m, dtype)
        self.tile = None
        self.pinned = None
        if host_result:
            self.tile = cuda.device_array(plan.per_pair_out * m * m, dtype)
        self.js = None
        if args.method == "jacobian":
            self.js = cuda.device_array((m * n_out, args.net.n_params), dtype)
        self.feats = None
        if not plan.cache:
            widths = [int(w) for w in args.net.widths]
            n_params = args.net.n_params if args.method == "jacobian" else None
            self.feats = (
                _Features(widths, m, dtype, n_params),
                _Features(widths, m, dtype, n_params),
            )


# -- driver ----------------------------------------------------------------------------


def _ntk_device(args, result, result_kind, budget):
    """Compute the kernel tile by tile; return it in the requested kind."""
    from numba import cuda

    from fastntk.kernels import cuda as kernels

    net, dt = args.net, args.dtype
    widths = [int(w) for w in net.widths]
    depth, n_out = len(widths) - 1, widths[-1]
    place, _, target, returned = result
    host_result = place == "host"
    plan = _Plan(args, budget, host_result)
    jac = args.method == "jacobian"
    logger.debug(
        "ntk_cuda: P1=%d P2=%d block=%d cache=%s streams=%d blas=%s",
        plan.P1,
        plan.P2,
        plan.m,
        plan.cache,
        plan.streams,
        kernels.blas_name(),
    )

    # parameters and samples on the device
    theta = cuda.to_device(args.params.theta)
    Ws, bs = kernels.layer_views(theta, widths)
    x1 = args.x1 if is_device_array(args.x1) else cuda.to_device(args.x1)
    if args.symmetric:
        x2 = x1
    else:
        x2 = args.x2 if is_device_array(args.x2) else cuda.to_device(args.x2)
    code, slope = net.activation_code, float(net.slope)

    # the learning-rate tensor: per-layer factors, a diagonal, or a matrix
    if jac:
        if args.rates.kind == "dense":
            lam = cuda.to_device(args.rates.matrix(net).astype(dt))
        else:
            lam = cuda.to_device(
                np.ascontiguousarray(args.rates.diagonal_vector(net), dt)
            )
        rate_kind = args.rates.kind
        factors = None
    else:
        lam, rate_kind = None, None
        factors = args.rates.layer_factors(net)

    # the result on the device, or the host result
    if not host_result and target is None:
        target = cuda.device_array(args.shape, dt)
    if host_result and target is None:
        target = np.empty(args.shape, dtype=dt)
        returned = target

    # features of every block, when they fit
    rows = plan.blocks(plan.P1)
    cols = rows if args.symmetric else plan.blocks(plan.P2)
    cached1 = cached2 = None
    if plan.cache:
        n_params = net.n_params if jac else None
        cached1 = [
            _Features(widths, r1 - r0, dt, n_params).compute(
                Ws, bs, x1[r0:r1], code, slope, 0, jac, widths
            )
            for r0, r1 in rows
        ]
        if args.symmetric:
            cached2 = cached1
        else:
            cached2 = [
                _Features(widths, c1 - c0, dt, n_params).compute(
                    Ws, bs, x2[c0:c1], code, slope, 0, jac, widths
                )
                for c0, c1 in cols
            ]
        cuda.synchronize()

    # tiles: upper triangle only when symmetric
    tiles = [
        (i, j)
        for i in range(len(rows))
        for j in range(len(cols))
        if not (args.symmetric and j < i)
    ]
    streams = [cuda.stream() for _ in range(plan.streams)] if host_result else [0]
    scratch = [_Scratch(plan, args, dt, host_result) for _ in streams]
    pending = [None] * len(streams)

    for t, (i, j) in enumerate(tiles):
        s = t % len(streams)
        stream, buf = streams[s], scratch[s]
        if pending[s] is not None:
            # the slot's previous tile has been copied: store it on the host
            stream.synchronize()
            _store_host(target, *pending[s], args)
            pending[s] = None
        (r0, r1), (c0, c1) = rows[i], cols[j]
        mb1, mb2 = r1 - r0, c1 - c0

        # features of the row block and the column block
        if plan.cache:
            f1, f2 = cached1[i], cached2[j]
        else:
            f1 = buf.feats[0].compute(
                Ws, bs, x1[r0:r1], code, slope, stream, jac, widths
            )
            if args.symmetric and i == j:
                f2 = f1
            else:
                f2 = buf.feats[1].compute(
                    Ws, bs, x2[c0:c1], code, slope, stream, jac, widths
                )

        # where the tile goes: a view of the device result or the tile buffer
        if host_result:
            shape = (depth,) if args.per_layer else ()
            shape += (mb1, mb2) + args.shape[len(shape) + 2 :]
            count = int(np.prod(shape))
            tile = buf.tile[:count].reshape(shape)
        elif args.per_layer:
            tile = target[:, r0:r1, c0:c1]
        else:
            tile = target[r0:r1, c0:c1]
        views = [tile[l] for l in range(depth)] if args.per_layer else None

        # the products and the fused combine of this tile
        if jac:
            _tile_jacobian(
                tile, views, f1, f2, lam, rate_kind, buf, args, n_out, stream
            )
        else:
            _tile_structured(tile, views, f1, f2, factors, buf, args, n_out, stream)

        # the mirrored tile below the diagonal, or the copy back to the host
        if host_result:
            mirrored = args.symmetric and i != j
            rows_of = target[:, r0:r1] if args.per_layer else target[r0:r1]
            if (
                c0 == 0
                and c1 == plan.P2
                and not mirrored
                and rows_of.flags.c_contiguous
            ):
                # whole rows of the result: straight into it, no staging
                tile.copy_to_host(rows_of, stream=stream)
            else:
                # pinned staging, stored on the host when the slot comes round
                if buf.pinned is None:
                    buf.pinned = cuda.pinned_array(buf.tile.shape[0], dt)
                pinned = buf.pinned[:count].reshape(shape)
                tile.copy_to_host(pinned, stream=stream)
                pending[s] = (pinned, r0, r1, c0, c1, mirrored)
        elif args.symmetric and i != j:
            if args.per_layer:
                for l in range(depth):
                    kernels.mirror(target[l, c0:c1, r0:r1], tile[l], stream=stream)
            else:
                kernels.mirror(target[c0:c1, r0:r1], tile, stream=stream)

    # drain the last tiles
    for s, stream in enumerate(streams):
        if pending[s] is not None:
            stream.synchronize()
            _store_host(target, *pending[s], args)
    cuda.synchronize()

    if host_result:
        return returned
    if returned is not None:
        return returned
    if result_kind == "cupy":
        return kernels.to_cupy(target)
    return target


def _store_host(target, tile, r0, r1, c0, c1, mirror, args):
    # Copy a finished tile into the host result, and its mirror when symmetric.
    if args.per_layer:
        target[:, r0:r1, c0:c1] = tile
        if mirror:
            target[:, c0:c1, r0:r1] = _swap(tile, args.outputs, 1)
    else:
        target[r0:r1, c0:c1] = tile
        if mirror:
            target[c0:c1, r0:r1] = _swap(tile, args.outputs, 0)


def _swap(tile, outputs, lead):
    # H(x2, x1)[b, a, j, i] = H(x1, x2)[a, b, i, j], with ``lead`` leading axes.
    axes = list(range(tile.ndim))
    a, b = lead, lead + 1
    axes[a], axes[b] = axes[b], axes[a]
    if outputs == "full":
        axes[-2], axes[-1] = axes[-1], axes[-2]
    return tile.transpose(axes)


def _tile_structured(tile, views, f1, f2, factors, buf, args, n_out, stream):
    # H(tile) = sum_l (lambda_b + lambda_w A_l) * G_l, one fused pass per layer.
    from fastntk.kernels import cuda as kernels

    bias_rate, weight_rate = factors
    depth = len(f1.gs_view)
    mb1, mb2 = f1.mb, f2.mb
    ga = buf.ga[: mb1 * mb2].reshape(mb1, mb2)
    for l in range(depth):
        # Gram matrix of the layer's inputs
        kernels.gemm(f1.inputs[l], f2.inputs[l], ga, trans_b=True, stream=stream)

        # Gram matrix of the output derivatives (the identity on the last layer)
        gg = None
        if l < depth - 1:
            g1, g2 = f1.gs_view[l], f2.gs_view[l]
            n = g1.shape[2]
            if args.outputs == "full":
                gg = buf.gg[: mb1 * n_out * mb2 * n_out].reshape(
                    mb1 * n_out, mb2 * n_out
                )
                kernels.gemm(
                    g1.reshape(mb1 * n_out, n),
                    g2.reshape(mb2 * n_out, n),
                    gg,
                    trans_b=True,
                    stream=stream,
                )
            elif args.outputs == "trace":
                gg = buf.gg[: mb1 * mb2].reshape(mb1, mb2)
                kernels.gemm(
                    g1.reshape(mb1, n_out * n),
                    g2.reshape(mb2, n_out * n),
                    gg,
                    trans_b=True,
                    stream=stream,
                )
            else:
                gg = buf.gg[: n_out * mb1 * mb2].reshape(n_out * mb1, mb2)
                for i in range(n_out):
                    block = buf.gg[i * mb1 * mb2 : (i + 1) * mb1 * mb2]
                    kernels.gemm(
                        g1[:, i, :],
                        g2[:, i, :],
                        block.reshape(mb1, mb2),
                        trans_b=True,
                        stream=stream,
                    )

        # fused combine-and-accumulate into the tile
        target = views[l] if views is not None else tile
        accumulate = views is None and l > 0
        kernels.combine(
            target,
            ga,
            gg,
            bias_rate[l],
            weight_rate[l],
            accumulate,
            n_out,
            stream=stream,
        )


def _tile_jacobian(tile, views, f1, f2, lam, rate_kind, buf, args, n_out, stream):
    # H(tile) = J1 lambda J2^T, per layer's columns when asked.
    from fastntk.kernels import cuda as kernels

    net = args.net
    mb1, mb2 = f1.mb, f2.mb
    J1, J2 = f1.J_view, f2.J_view
    js = buf.js[: mb2 * n_out]

    # lambda applied to the column block's Jacobian
    if rate_kind == "dense":
        kernels.gemm(J2, lam, js, stream=stream)
    else:
        kernels.scale_columns(J2, lam, js, stream=stream)

    if views is None:
        spans = [(0, net.n_params)]
        targets = [tile]
    else:
        spans = [(ws.start, bs.stop) for ws, bs in net.layer_slices()]
        targets = views
    for (p0, p1), target in zip(spans, targets):
        a, b = J1[:, p0:p1], js[:, p0:p1]
        if args.outputs == "full":
            gg = buf.gg[: mb1 * n_out * mb2 * n_out].reshape(mb1 * n_out, mb2 * n_out)
            kernels.gemm(a, b, gg, trans_b=True, stream=stream)
        else:
            # one Gram matrix per output, stacked: row i m1 + a
            a3 = f1.J_view.reshape(mb1, n_out, net.n_params)
            b3 = js.reshape(mb2, n_out, net.n_params)
            gg = buf.gg[: n_out * mb1 * mb2].reshape(n_out * mb1, mb2)
            for i in range(n_out):
                block = buf.gg[i * mb1 * mb2 : (i + 1) * mb1 * mb2]
                kernels.gemm(
                    a3[:, i, p0:p1],
                    b3[:, i, p0:p1],
                    block.reshape(mb1, mb2),
                    trans_b=True,
                    stream=stream,
                )
        kernels.combine(target, None, gg, 1.0, 0.0, False, n_out, stream=stream)


# -- Jacobian ------------------------------------------------------------------------


def jacobian_cuda(net, params, x, J):
    """Per-sample Jacobian of validated host samples, computed on the GPU.

    The engine behind ``fastntk.jacobian(..., backend="cuda")``: blocks of
    samples sized to a quarter of the device's free memory, each copied into
    the host array ``J`` of shape (P, n_out, n_params).
    """
    from numba import cuda

    from fastntk.kernels import cuda as kernels

    widths = [int(w) for w in net.widths]
    dt = params.dtype
    P, n_out = x.shape[0], net.n_out
    theta = cuda.to_device(params.theta)
    Ws, bs = kernels.layer_views(theta, widths)

    # samples per block: their Jacobian rows and features in a quarter of memory
    per_sample = (n_out * net.n_params + 3 * sum(widths) * (1 + n_out)) * dt.itemsize
    m = int(max(1, min(P, 0.25 * _free_device_memory() // per_sample)))
    feats = _Features(widths, m, dt, net.n_params)
    for start in range(0, P, m):
        stop = min(P, start + m)
        xb = cuda.to_device(x[start:stop])
        feats.compute(
            Ws, bs, xb, net.activation_code, float(net.slope), 0, True, widths
        )
        feats.J_view.copy_to_host(J[start:stop].reshape(-1, net.n_params))
    return J
