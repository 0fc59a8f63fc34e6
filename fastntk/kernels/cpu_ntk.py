"""CPU kernels of the neural tangent kernel (Numba + BLAS).

The structured algorithm writes the kernel of an L-layer MLP as

    H[a, b, i, j] = sum_t (bias_rate_t + weight_rate_t A_t[a, b]) G_t[a, i, b, j],
    A_t = a^(t) a^(t)T                (input Gram of 0-based layer t),
    G_t = g^(t+1) g^(t+1)T            (Gram of the output derivatives),

where a^(t) (P, n_t) are the layer's inputs (a^(0) = x) and g^(t+1)
(P, n_out, n_{t+1}) the derivatives dz^(L)_i / dz^(t+1)_j; the last layer's
derivatives are the identity, so its G is the identity.

*Features* are these per-sample quantities, computed once by :func:`features`:
``acts`` holds a^(h) for hidden layers h = 1..L-1 as consecutive (P, n_h) blocks,
``grads`` holds g^(h) for h = 1..L-1 as consecutive (P, n_out, n_h) blocks.

The kernel is produced tile by tile (:func:`structured_tiles`), the tiles in
parallel, one thread per tile, each thread calling single-threaded BLAS: for each
layer, BLAS computes A and G of the tile into small buffers (``syrk`` on tiles on
the diagonal of a symmetric kernel, ``gemm`` elsewhere, both reading the features
in place through their leading dimensions), and one fused pass adds
``(bias_rate + weight_rate A) * G`` into a tile-local accumulator while all three
are in cache.  The finished tile is stored into the result, and for a symmetric
kernel (only tiles on and above the diagonal are listed) also stored transposed.

The result is addressed as a 4-D C-ordered array ``H`` of shape
(n_slots, P1, P2, q): one slot per layer for per-layer kernels (else one), and
q = n_out^2 (full), 1 (trace) or n_out (diagonal) values per pair of samples.

BLAS is SciPy's (``scipy.linalg.cython_blas``), called through its C addresses;
float32 features are multiplied and accumulated in float32.
"""

from __future__ import annotations

import llvmlite.binding as ll
import numpy as np
from numba import njit, prange, types
from numba.extending import get_cython_function_address, intrinsic

from fastntk._config import JIT, JIT_PARALLEL, SAMPLE_BLOCK
from fastntk.kernels.activations import RELU, act, dact

#: Output modes of the kernels.
FULL, TRACE, DIAGONAL = 0, 1, 2

# -- BLAS ----------------------------------------------------------------------------


def _blas(name, n_args):
    # A BLAS routine of scipy.linalg.cython_blas, every argument a pointer.  The
    # routine is registered under a fixed symbol name, so that compiled kernels
    # calling it can be cached on disk and relinked in a later process.
    symbol = f"fastntk_{name}"
    ll.add_symbol(symbol, get_cython_function_address("scipy.linalg.cython_blas", name))
    return types.ExternalFunction(symbol, types.void(*([types.voidptr] * n_args)))


_dgemm = _blas("dgemm", 13)
_sgemm = _blas("sgemm", 13)
_dsyrk = _blas("dsyrk", 10)
_ssyrk = _blas("ssyrk", 10)


@intrinsic
def _ptr(typingctx, arr, offset):
    # Address of arr.flat[offset] as a void pointer (no bounds check).
    sig = types.voidptr(arr, offset)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        addr = builder.gep(ary.data, [args[1]])
        return builder.bitcast(addr, context.get_value_type(types.voidptr))

    return sig, codegen


@njit(**JIT)
def gemm_nt(m, n, k, alpha, x, xo, ldx, y, yo, ldy, beta, c, co, ldc):
    """Row-major C = alpha X Y^T + beta C on raw buffers.

    X is (m, k) at ``x[xo:]`` with row stride ``ldx``, Y is (n, k) at
    ``y[yo:]`` with row stride ``ldy``, C is (m, n) at ``c[co:]`` with row
    stride ``ldc``; all three share one dtype, float32 or float64.
    """
    # In column-major terms C^T = Y X^T: gemm('T', 'N', n, m, k, Y, X, C).
    ints = np.empty(6, np.int32)
    ints[0], ints[1], ints[2] = n, m, k
    ints[3], ints[4], ints[5] = ldy, ldx, ldc
    trans = np.empty(2, np.int8)
    trans[0], trans[1] = ord("T"), ord("N")
    scal = np.empty(2, c.dtype)
    scal[0], scal[1] = alpha, beta
    args = (
        _ptr(trans, 0), _ptr(trans, 1), _ptr(ints, 0), _ptr(ints, 1),
        _ptr(ints, 2), _ptr(scal, 0), _ptr(y, yo), _ptr(ints, 3), _ptr(x, xo),
        _ptr(ints, 4), _ptr(scal, 1), _ptr(c, co), _ptr(ints, 5),
    )  # fmt: skip
    if c.itemsize == 8:
        _dgemm(*args)
    else:
        _sgemm(*args)


@njit(**JIT)
def syrk_upper(m, k, alpha, x, xo, ldx, beta, c, co, ldc):
    """Row-major upper triangle (b >= a) of C = alpha X X^T + beta C.

    X is (m, k) at ``x[xo:]`` with row stride ``ldx``; C is (m, m) at ``c[co:]``
    with row stride ``ldc``.  The strict lower triangle of C is left untouched.
    """
    # The row-major upper triangle is the column-major lower one of X_cm^T X_cm.
    ints = np.empty(4, np.int32)
    ints[0], ints[1], ints[2], ints[3] = m, k, ldx, ldc
    flags = np.empty(2, np.int8)
    flags[0], flags[1] = ord("L"), ord("T")
    scal = np.empty(2, c.dtype)
    scal[0], scal[1] = alpha, beta
    args = (
        _ptr(flags, 0), _ptr(flags, 1), _ptr(ints, 0), _ptr(ints, 1),
        _ptr(scal, 0), _ptr(x, xo), _ptr(ints, 2), _ptr(scal, 1), _ptr(c, co),
        _ptr(ints, 3),
    )  # fmt: skip
    if c.itemsize == 8:
        _dsyrk(*args)
    else:
        _ssyrk(*args)


# -- features: forward and backward passes -------------------------------------------


@njit(**JIT)
def hidden_starts(widths):
    """Column starts of the hidden layers: entry h - 1 is n_1 + ... + n_{h-1}.

    Hidden layer h (1 <= h <= L-1) of a P-sample feature set starts at
    ``P * start`` in ``acts`` and at ``P * n_out * start`` in ``grads``; the last
    entry is the total width n_1 + ... + n_{L-1}.
    """
    depth = widths.shape[0] - 1
    start = np.zeros(depth, np.int64)
    for h in range(1, depth):
        start[h] = start[h - 1] + widths[h]
    return start


@njit(**JIT)
def weight_offsets(widths):
    """Start of W^(l) in theta for 0-based layers l (b^(l) follows W^(l))."""
    depth = widths.shape[0] - 1
    w_off = np.empty(depth, np.int64)
    pos = 0
    for l in range(depth):
        w_off[l] = pos
        pos += widths[l + 1] * widths[l] + widths[l + 1]
    return w_off


@njit(**JIT)
def _activate(z, b, a, d, code, slope):
    # a = sigma(z + b) and d = sigma'(z + b), row by row; relu, the common
    # case, in a branch-free loop that vectorizes.
    m, n = z.shape
    one = b[0] - b[0] + 1
    for p in range(m):
        zr, ar, dr = z[p], a[p], d[p]
        if code == RELU:
            for j in range(n):
                v = zr[j] + b[j]
                pos = v > 0
                ar[j] = v if pos else 0 * v
                dr[j] = one if pos else 0 * one
        else:
            for j in range(n):
                v = zr[j] + b[j]
                ar[j] = act(code, v, slope)
                dr[j] = dact(code, v, slope)


@njit(**JIT)
def _last_derivatives(W, d, g):
    # g[p, i, j] = W[i, j] d[p, j]: derivatives of the outputs w.r.t. z^(L-1).
    m, n_out, n = g.shape
    for p in range(m):
        dr = d[p]
        for i in range(n_out):
            gr, wr = g[p, i], W[i]
            for j in range(n):
                gr[j] = wr[j] * dr[j]


@njit(**JIT)
def _scale_columns(g, d):
    # g[p, i, q] *= d[p, q]
    m, n_out, k = g.shape
    for p in range(m):
        dr = d[p]
        for i in range(n_out):
            gr = g[p, i]
            for q in range(k):
                gr[q] *= dr[q]


@njit(**JIT)
def _features_block(theta, widths, x, code, slope, acts, grads, s0, s1):
    # Features of samples [s0, s1) of x, written into the whole-set buffers.
    P = x.shape[0]
    m = s1 - s0
    depth = widths.shape[0] - 1
    n_out = widths[depth]
    w_off = weight_offsets(widths)
    start = hidden_starts(widths)
    zbuf = np.empty(m * start[depth - 1], dtype=theta.dtype)
    dbuf = np.empty(m * start[depth - 1], dtype=theta.dtype)

    # forward pass: a^(h) into acts, sigma'(z^(h)) into dbuf
    a = x[s0:s1]
    for h in range(1, depth):
        n, k = widths[h], widths[h - 1]
        W = theta[w_off[h - 1] : w_off[h - 1] + n * k].reshape((n, k))
        b = theta[w_off[h - 1] + n * k : w_off[h - 1] + n * k + n]
        z = zbuf[m * start[h - 1] : m * start[h]].reshape((m, n))
        d = dbuf[m * start[h - 1] : m * start[h]].reshape((m, n))
        o = P * start[h - 1]
        out = acts[o + s0 * n : o + s1 * n].reshape((m, n))
        # z = a W^T, then a^(h) = sigma(z + b), sigma'(z + b)
        np.dot(a, W.T, z)
        _activate(z, b, out, d, code, slope)
        a = out

    # backward pass: g^(L-1) = W^(L) sigma'(z^(L-1)), then
    # g^(h-1) = (g^(h) W^(h)) * sigma'(z^(h-1)) down to h = 2
    h = depth - 1
    n = widths[h]
    WL = theta[w_off[h] : w_off[h] + n_out * n].reshape((n_out, n))
    d = dbuf[m * start[h - 1] : m * start[h]].reshape((m, n))
    o = P * n_out * start[h - 1]
    g = grads[o + s0 * n_out * n : o + s1 * n_out * n].reshape((m, n_out, n))
    _last_derivatives(WL, d, g)
    for h in range(depth - 1, 1, -1):
        n, k = widths[h], widths[h - 1]
        W = theta[w_off[h - 1] : w_off[h - 1] + n * k].reshape((n, k))
        d = dbuf[m * start[h - 2] : m * start[h - 1]].reshape((m, k))
        o = P * n_out * start[h - 2]
        nxt = grads[o + s0 * n_out * k : o + s1 * n_out * k].reshape((m, n_out, k))
        # g^(h-1) = (g^(h) W^(h)) * sigma'(z^(h-1))
        np.dot(g.reshape((m * n_out, n)), W, nxt.reshape((m * n_out, k)))
        _scale_columns(nxt, d)
        g = nxt


@njit(**JIT_PARALLEL)
def features(theta, widths, x, code, slope, acts, grads, n_threads):
    """Hidden activations and output derivatives of every sample of ``x``.

    Blocks of samples are processed in parallel, each calling BLAS on its own
    thread (run with single-threaded BLAS).

    Parameters
    ----------
    theta : (n_params,) float array
    widths : (L + 1,) int64 array
    x : (P, n_0) C-contiguous array, theta's dtype
    code, slope : activation code and leaky-ReLU slope
    acts : (P * (n_1 + ... + n_{L-1}),) output
        a^(h) for h = 1..L-1, consecutive (P, n_h) blocks.
    grads : (P * n_out * (n_1 + ... + n_{L-1}),) output
        g^(h)[p, i, j] = dz^(L)_i / dz^(h)_j, consecutive (P, n_out, n_h) blocks.
    n_threads : int
        Threads of the calling context (``numba.get_num_threads()``).
    """
    P = x.shape[0]
    if widths.shape[0] <= 2:
        return
    # blocks small enough for every thread to get a few, large enough for BLAS
    block = min(SAMPLE_BLOCK, max(32, -(-P // (2 * max(1, n_threads)))))
    n_blocks = -(-P // block)
    for k in prange(n_blocks):
        s0 = k * block
        _features_block(
            theta, widths, x, code, slope, acts, grads, s0, min(P, s0 + block)
        )


# -- structured kernel, tile by tile --------------------------------------------------


@njit(**JIT)
def _combine(acc, A, G, shape, rate, how):
    """Fused pass over one tile: acc (+)= (bias + weight A) * G.

    acc has the layout of G: (tm * n_out, tn * n_out) full, (tm, tn) trace,
    (n_out, tm, tn) diagonal, flat; A is (tm, tn) flat.  shape = (tm, tn,
    upper): the tile's rows and columns, and whether only its upper triangle is
    needed (a tile on the diagonal of a symmetric kernel, where A and G hold
    upper triangles only; entries below are left undefined).  rate = (bias,
    weight, n_out) in acc's dtype; how = (mode, assign, identity): output mode,
    whether to overwrite rather than add, and whether G is the identity (the
    last layer).  Every loop runs along a contiguous row from index 0, so that
    it vectorizes.
    """
    tm, tn, upper = shape
    bias, weight, n_outf = rate[0], rate[1], rate[2]
    mode, assign, identity = how
    n_out = int(n_outf + 0.5)
    # layer factor of the input Gram, one row at a time, expanded to the
    # columns (b, j) of G in full mode
    width = tn * n_out if mode == FULL else tn
    c = np.empty(width, dtype=acc.dtype)
    for a in range(tm):
        b_lo = a if upper else 0
        ar = A[a * tn : (a + 1) * tn]
        if mode == FULL:
            for b in range(tn):
                cab = bias + weight * ar[b]
                for j in range(n_out):
                    c[b * n_out + j] = cab
        else:
            for b in range(tn):
                c[b] = bias + weight * ar[b]
        lo = b_lo * n_out if mode == FULL else b_lo
        cr = c[lo:]
        n_rows = n_out if mode != TRACE else 1
        for i in range(n_rows):
            # row (a, i) of acc and G: (a * n_out + i) in full mode, (i, a) in
            # diagonal mode, a in trace mode
            if mode == FULL:
                r = (a * n_out + i) * width
            elif mode == DIAGONAL:
                r = (i * tm + a) * width
            else:
                r = a * width
            h = acc[r + lo : r + width]
            if identity:
                # G = delta_ij (full), 1 (diagonal), n_out (trace)
                if mode == FULL:
                    if assign:
                        h[:] = 0
                    for b in range(b_lo, tn):
                        h[(b - b_lo) * n_out + i] += c[b * n_out + i]
                elif mode == TRACE:
                    for t in range(cr.shape[0]):
                        v = cr[t] * n_outf
                        h[t] = v if assign else h[t] + v
                elif assign:
                    h[:] = cr
                else:
                    for t in range(cr.shape[0]):
                        h[t] += cr[t]
                continue
            gr = G[r + lo : r + width]
            if assign:
                for t in range(cr.shape[0]):
                    h[t] = cr[t] * gr[t]
            else:
                for t in range(cr.shape[0]):
                    h[t] += cr[t] * gr[t]


@njit(**JIT)
def _store(H, slot, pos, acc, mirror, mode):
    """Copy a finished tile from acc (G's layout) into H, and its mirror image.

    pos = (r0, c0, tm, tn, upper): the tile's rows and columns in H and whether
    only its upper triangle was computed (then its lower triangle, and the
    outputs below the diagonal of its diagonal pairs, are filled from their
    symmetric counterparts).  With ``mirror`` (a symmetric kernel) the tile is
    also written transposed at (c0, r0), output indices swapped.
    """
    r0, c0, tm, tn, upper = pos
    _, P1, P2, q = H.shape
    n_out = int(np.sqrt(q) + 0.5) if mode == FULL else q
    ldg = tn * n_out
    Hf = H.reshape(-1)

    # the tile, row by row (from the diagonal on for an upper-only tile)
    for a in range(tm):
        lo = a if upper else 0
        base = ((slot * P1 + r0 + a) * P2 + c0) * q
        h = Hf[base : base + tn * q]
        if mode == TRACE:
            h[lo:] = acc[a * tn + lo : (a + 1) * tn]
        elif mode == DIAGONAL:
            # H[a, b, i] = acc[i, a, b]
            for i in range(n_out):
                src = acc[(i * tm + a) * tn : (i * tm + a + 1) * tn]
                for b in range(lo, tn):
                    h[b * q + i] = src[b]
        else:
            # H[a, b, i, j] = acc[(a, i), (b, j)], H written in order
            r = a * n_out * ldg
            for b in range(lo, tn):
                for i in range(n_out):
                    d = b * q + i * n_out
                    e = r + i * ldg + b * n_out
                    for j in range(n_out):
                        h[d + j] = acc[e + j]
            if upper:
                # H[a, a, i, j] = H[a, a, j, i] below the computed triangle
                for i in range(n_out):
                    for j in range(i):
                        h[a * q + i * n_out + j] = h[a * q + j * n_out + i]
    if upper:
        # strict lower triangle of a diagonal tile, from the upper one
        _store_transposed(H, slot, r0, c0, acc, (tm, tn), mode, True)
    elif mirror:
        _store_transposed(H, slot, c0, r0, acc, (tm, tn), mode, False)


@njit(**JIT)
def _store_transposed(H, slot, row0, col0, acc, shape, mode, strict):
    # H[slot, row0 + b, col0 + a] = value (a, b) of acc, output indices swapped,
    # for a < b only with ``strict``.  In the trace and diagonal layouts the
    # columns of acc go 16 at a time through a small transposed buffer, so that
    # H is written along its rows.
    tm, tn = shape
    _, P1, P2, q = H.shape
    n_out = int(np.sqrt(q) + 0.5) if mode == FULL else q
    ldg = tn * n_out
    Hf = H.reshape(-1)
    if mode == FULL:
        # H[b, a, j, i] = acc[(a, i), (b, j)]: blocks of n_out x n_out values,
        # each read along rows of acc and written transposed into one place
        for b in range(tn):
            stop = b if strict else tm
            base = ((slot * P1 + row0 + b) * P2 + col0) * q
            for a in range(stop):
                d = base + a * q
                for i in range(n_out):
                    e = (a * n_out + i) * ldg + b * n_out
                    for j in range(n_out):
                        Hf[d + j * n_out + i] = acc[e + j]
        return
    tbuf = np.empty((16, tm * q), dtype=acc.dtype)
    for b0 in range(0, tn, 16):
        nb = min(16, tn - b0)
        rows = min(tm, b0 + nb) if strict else tm
        # tbuf[bb, a] = value (a, b0 + bb), outputs swapped
        for a in range(rows):
            if mode == TRACE:
                src = acc[a * tn + b0 : a * tn + b0 + nb]
                for bb in range(nb):
                    tbuf[bb, a] = src[bb]
            else:
                for i in range(n_out):
                    src = acc[(i * tm + a) * tn + b0 : (i * tm + a) * tn + b0 + nb]
                    for bb in range(nb):
                        tbuf[bb, a * q + i] = src[bb]
        # row row0 + b of H, columns col0 .. col0 + stop
        for bb in range(nb):
            b = b0 + bb
            stop = b if strict else tm
            base = ((slot * P1 + row0 + b) * P2 + col0) * q
            Hf[base : base + stop * q] = tbuf[bb, : stop * q]


@njit(**JIT)
def _gram(m, n, k, x, xo, y, yo, ld, c, co, ldc, diag):
    # c = X Y^T (upper triangle only when diag, where X is Y)
    if diag:
        syrk_upper(m, k, 1.0, x, xo, ld, 0.0, c, co, ldc)
    else:
        gemm_nt(m, n, k, 1.0, x, xo, ld, y, yo, ld, 0.0, c, co, ldc)


@njit(**JIT)
def _tile(f1, f2, widths, rates, mode, tile, H, origin, per_layer, sym, work):
    # Every layer of one tile: Gram matrices by BLAS, fused combine into a
    # tile-local accumulator, then the tile (and its mirror image for a
    # symmetric kernel) stored into H.  tile = (i0, j0, tm, tn, diag) in the
    # local rows of f1 and columns of f2; origin = (R0, C0), their place in H.
    x1, acts1, grads1, rows1, first1, _ = f1
    x2, acts2, grads2, rows2, first2, _ = f2
    i0, j0, tm, tn, diag = tile
    R0, C0 = origin
    depth = widths.shape[0] - 1
    n_out = widths[depth]
    q = H.shape[3]
    start = hidden_starts(widths)
    acc = work[: tm * tn * q]
    A = work[tm * tn * q : tm * tn * (q + 1)]
    G = work[tm * tn * (q + 1) :]
    a1, a2 = first1 + i0, first2 + j0
    pos = (R0 + i0, C0 + j0, tm, tn, diag)
    for l in range(depth):
        last = l == depth - 1

        # input Gram A = a^(l)[rows] a^(l)[columns]^T
        k = widths[l]
        if l == 0:
            _gram(tm, tn, k, x1, a1 * k, x2, a2 * k, k, A, 0, tn, diag)
        else:
            o1 = rows1 * start[l - 1] + a1 * k
            o2 = rows2 * start[l - 1] + a2 * k
            _gram(tm, tn, k, acts1, o1, acts2, o2, k, A, 0, tn, diag)

        # output-derivative Gram G of g^(l+1) (the identity on the last layer)
        if not last:
            n = widths[l + 1]
            o1 = rows1 * n_out * start[l] + a1 * n_out * n
            o2 = rows2 * n_out * start[l] + a2 * n_out * n
            if mode == FULL:
                # rows (a, i), columns (b, j), contracted over units
                _gram(
                    tm * n_out,
                    tn * n_out,
                    n,
                    grads1,
                    o1,
                    grads2,
                    o2,
                    n,
                    G,
                    0,
                    tn * n_out,
                    diag,
                )
            elif mode == TRACE:
                # the sum over outputs folded into the contraction
                _gram(
                    tm, tn, n_out * n, grads1, o1, grads2, o2, n_out * n, G, 0, tn, diag
                )
            else:
                for i in range(n_out):
                    _gram(
                        tm,
                        tn,
                        n,
                        grads1,
                        o1 + i * n,
                        grads2,
                        o2 + i * n,
                        n_out * n,
                        G,
                        i * tm * tn,
                        tn,
                        diag,
                    )

        # fused combine-and-accumulate, and the store of a finished kernel
        assign = per_layer or l == 0
        _combine(acc, A, G, (tm, tn, diag), rates[l], (mode, assign, last))
        if per_layer or last:
            _store(H, l if per_layer else 0, pos, acc, sym, mode)


@njit(**JIT_PARALLEL)
def structured_tiles(
    f1, f2, widths, rates, mode, tiles, bounds, H, origin, per_layer, sym, work
):
    """Kernel entries of a list of tiles, the tiles in parallel.

    Parameters
    ----------
    f1, f2 : tuple (x, acts, grads, n_rows, first, count)
        Feature sets of the rows and the columns: ``x`` flattened (n_rows * n_0,),
        ``acts`` and ``grads`` as produced by :func:`features` for n_rows
        samples; local sample r is sample first + r of the set.
    widths : (L + 1,) int64
    rates : (L, 3) array in H's dtype: bias_rate, weight_rate, n_out per layer.
    mode : FULL, TRACE or DIAGONAL.
    tiles : (n_tiles, 5) int64
        (i0, j0, tm, tn, diag): local rows [i0, i0 + tm) against local columns
        [j0, j0 + tn); ``diag`` marks a tile on the diagonal of a symmetric
        kernel (i0 = j0, tm = tn), of which only the upper triangle is computed.
    bounds : (n_threads + 1,) int64
        Thread t computes the tiles bounds[t] .. bounds[t + 1] - 1.
    H : (n_slots, P1, P2, q) result; local (row, column) goes to
        (origin[0] + row, origin[1] + column).
    per_layer : bool
        Layer l goes to slot l (else every layer adds into slot 0).
    sym : bool
        A symmetric kernel: each tile is also written transposed (and diagonal
        tiles completed), so the tiles cover the upper triangle only.
    work : (n_threads, size) scratch, one row per thread (one thread per row,
        so give it as many rows as ``numba.get_num_threads()``), size >= tm * tn *
        (1 + q_gram), where
        q_gram is n_out^2 (full), 1 (trace) or n_out (diagonal).

    BLAS runs inside each tile on the calling thread: call with single-threaded
    BLAS, the parallelism comes from the tiles.
    """
    for t in prange(bounds.shape[0] - 1):
        for k in range(bounds[t], bounds[t + 1]):
            i0, j0, tm, tn, diag = tiles[k]
            tile = (i0, j0, tm, tn, diag != 0)
            _tile(f1, f2, widths, rates, mode, tile, H, origin, per_layer, sym, work[t])


@njit(**JIT_PARALLEL)
def mirror_stripe(H, r0, r1, full):
    """Fill the lower part of rows [r0, r1) of a symmetric kernel from its upper.

    H[s, a, b] = H[s, b, a] (with the two output indices swapped when ``full``)
    for r0 <= a < r1 and b < a; the entries with b >= a must be computed.
    """
    n_slots, P, _, q = H.shape
    n_out = int(np.sqrt(q) + 0.5) if full else 1
    chunk = 64
    n_chunks = (r1 + chunk - 1) // chunk
    for c in prange(n_slots * n_chunks):
        s = c // n_chunks
        b0 = (c % n_chunks) * chunk
        b1 = min(b0 + chunk, r1)
        for a in range(max(r0, b0), r1):
            for b in range(b0, min(b1, a)):
                src = H[s, b, a]
                dst = H[s, a, b]
                if full:
                    for i in range(n_out):
                        for j in range(n_out):
                            dst[i * n_out + j] = src[j * n_out + i]
                else:
                    for k in range(q):
                        dst[k] = src[k]
