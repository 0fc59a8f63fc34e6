"""Compiled kernels of one training step, callable from the Cython step loop.

The training loop (:mod:`fastntk.engines._loop`) runs in Cython without the GIL
and calls the kernels of this module through their C addresses (Numba
``@cfunc``), which costs a few nanoseconds per call.  Two families:

- **Fused step** (:func:`fused_step`): forward pass, loss, backward pass and
  update of one mini-batch in one call, on hand-tiled loops without BLAS and
  without allocation.  It wins for small widths and batches, where a BLAS call
  costs more than its arithmetic.
- **Elementwise kernels** of the BLAS step, which the Cython loop interleaves
  with its direct BLAS calls: bias and activation, loss and error factor,
  column sums (bias gradients), the activation derivative, the update.

The fused step keeps activations *feature-major* (one row per unit, one column
per sample of the batch, the batch padded with zero columns to a multiple of
:data:`LANES`), so that every product is a sum of rank-one updates of rows of
``LANES`` contiguous entries.  Those run on an explicit SIMD tile: four rows of
``LANES`` accumulators held in vector registers (see :func:`_tile4`), written
with LLVM vector intrinsics because Numba's automatic vectorization leaves such
short loops scalar.  Vectors of ``LANES`` elements are legal on every CPU LLVM
targets (they are split into narrower registers where needed), so the kernels
stay portable.

Every kernel receives the description of the step in a *plan*: an int64 array
built by :func:`make_plan` (depth, activation, loss, reduction, update kind,
widths, parameter offsets, workspace offsets).  Inputs are assumed validated:
C-contiguous, one floating dtype, finite.
"""

from __future__ import annotations

import llvmlite.ir as llir
import numpy as np
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastntk._config import JIT
from fastntk.kernels.activations import RELU, act, dact
from fastntk.kernels.cpu import MSE

#: Entries of one SIMD vector of the fused step (both dtypes).
LANES = 8

#: Rows of one register tile of the fused step.
TILE_ROWS = 4

#: How the update applies the learning-rate tensor: theta -= r[0] g (identity),
#: theta -= r * g (any diagonal tensor), theta -= R g (dense).
UPDATE_SCALAR, UPDATE_DIAGONAL, UPDATE_DENSE = 0, 1, 2

# -- plan layout -----------------------------------------------------------------
# Header entries of a plan; widths, offsets and workspace offsets follow.
PLAN_DEPTH = 0
PLAN_ACTIVATION = 1
PLAN_LOSS = 2
PLAN_MEAN = 3
PLAN_UPDATE = 4
PLAN_N_PARAMS = 5
PLAN_N_SAMPLES = 6
PLAN_BATCH = 7
PLAN_WORK = 8  # workspace length of the fused step
PLAN_HEADER = 9


@njit(**JIT)
def _plan_w_off(depth):
    return PLAN_HEADER + depth + 1


@njit(**JIT)
def _plan_b_off(depth):
    return PLAN_HEADER + 2 * depth + 1


@njit(**JIT)
def _plan_work(depth):
    # Workspace offsets of the fused step: xs, xT, grad, delta0, delta1, zeros,
    # then per layer zT, aT, as.
    return PLAN_HEADER + 3 * depth + 1


@njit(**JIT)
def padded(n):
    """``n`` rounded up to a multiple of :data:`LANES`."""
    return -(-n // LANES) * LANES


def make_plan(widths, activation_code, loss_code, mean, update_kind, n_samples, batch):
    """The int64 plan of a step, and the workspace length of the fused step.

    Parameters
    ----------
    widths : sequence of int
        [n_0, ..., n_L].
    activation_code, loss_code : int
    mean : bool
        Mean reduction (the loss and error factor divided by the batch size).
    update_kind : int
        One of :data:`UPDATE_SCALAR`, :data:`UPDATE_DIAGONAL`,
        :data:`UPDATE_DENSE`.
    n_samples : int
        Rows of the training inputs.
    batch : int
        Largest batch a step will see.

    Returns
    -------
    plan : ndarray of int64
    work_size : int
        Entries of the workspace :func:`fused_step` needs.
    """
    widths = [int(w) for w in widths]
    depth = len(widths) - 1
    w_off, b_off = [], []
    pos = 0
    for l in range(depth):
        w_off.append(pos)
        pos += widths[l + 1] * widths[l]
        b_off.append(pos)
        pos += widths[l + 1]
    n_params = pos

    # workspace of the fused step, every block a multiple of LANES entries
    bp = padded(batch)
    wmax = max(widths)
    sizes = [
        batch * widths[0],
        widths[0] * bp,
        padded(n_params),
        wmax * bp,
        wmax * bp,
        wmax,
    ]
    for l in range(depth):
        n = widths[l + 1]
        sizes += [n * bp, n * bp, padded(batch * n)]
    offsets = np.concatenate([[0], np.cumsum([padded(s) for s in sizes])])
    header = [
        depth,
        activation_code,
        loss_code,
        int(bool(mean)),
        update_kind,
        n_params,
        n_samples,
        batch,
        int(offsets[-1]),
    ]
    plan = np.array(
        header + widths + w_off + b_off + offsets[:-1].tolist(), dtype=np.int64
    )
    return plan, int(offsets[-1])


# -- explicit SIMD tiles ---------------------------------------------------------
# A tile is an array of TILE_ROWS vectors of LANES entries on the stack of the
# function that creates it; LLVM keeps it in vector registers.


def _vector_type(context, dtype):
    return llir.VectorType(context.get_value_type(dtype), LANES)


def _element_vector(context, builder, aryty, ary, offset):
    # Pointer to the LANES entries of ``ary`` starting at element ``offset``.
    data = context.make_array(aryty)(context, builder, ary).data
    ptr = builder.gep(data, [offset])
    return builder.bitcast(ptr, llir.PointerType(_vector_type(context, aryty.dtype)))


def _tile_slot(context, builder, tile, row, dtype):
    base = builder.bitcast(tile, llir.PointerType(_vector_type(context, dtype)))
    return builder.gep(base, [row])


def _splat(context, builder, value, fromty, dtype):
    # A vector with every entry equal to ``value``.
    vt = _vector_type(context, dtype)
    v = context.cast(builder, value, fromty, dtype)
    zero = llir.Constant(llir.IntType(32), 0)
    v = builder.insert_element(llir.Constant(vt, llir.Undefined), v, zero)
    mask = llir.Constant(llir.VectorType(llir.IntType(32), LANES), [0] * LANES)
    return builder.shuffle_vector(v, llir.Constant(vt, llir.Undefined), mask)


@intrinsic
def _tile_new(typingctx, like):
    """A tile of TILE_ROWS x LANES accumulators of ``like``'s dtype (stack)."""

    def codegen(context, builder, sig, args):
        vt = _vector_type(context, like.dtype)
        ptr = cgutils.alloca_once(builder, llir.ArrayType(vt, TILE_ROWS))
        return builder.bitcast(ptr, llir.PointerType(vt.element))

    return types.CPointer(like.dtype)(like), codegen


@intrinsic
def _tile_fill(typingctx, tile, row, value):
    """tile[row, :] = value."""

    def codegen(context, builder, sig, args):
        dt = tile.dtype
        v = _splat(context, builder, args[2], value, dt)
        builder.store(v, _tile_slot(context, builder, args[0], args[1], dt))
        return context.get_dummy_value()

    return types.void(tile, row, value), codegen


@intrinsic
def _tile_fma(typingctx, tile, row, coef, ary, offset):
    """tile[row, :] += coef * ary[offset:offset + LANES] (fused multiply-add)."""

    def codegen(context, builder, sig, args):
        dt = tile.dtype
        vt = _vector_type(context, dt)
        slot = _tile_slot(context, builder, args[0], args[1], dt)
        c = _splat(context, builder, args[2], coef, dt)
        v = builder.load(
            _element_vector(context, builder, ary, args[3], args[4]), align=1
        )
        name = f"llvm.fma.v{LANES}{'f64' if dt.bitwidth == 64 else 'f32'}"
        fma = cgutils.get_or_insert_function(
            builder.module, llir.FunctionType(vt, [vt, vt, vt]), name
        )
        builder.store(builder.call(fma, [c, v, builder.load(slot)]), slot)
        return context.get_dummy_value()

    return types.void(tile, row, coef, ary, offset), codegen


@intrinsic
def _tile_store(typingctx, tile, row, ary, offset):
    """ary[offset:offset + LANES] = tile[row, :]."""

    def codegen(context, builder, sig, args):
        dt = tile.dtype
        value = builder.load(_tile_slot(context, builder, args[0], args[1], dt))
        ptr = _element_vector(context, builder, ary, args[2], args[3])
        builder.store(value, ptr, align=1)
        return context.get_dummy_value()

    return types.void(tile, row, ary, offset), codegen


@njit(**JIT)
def _tile4(out, o0, old, init, i0, C, c0, cr, cj, nj, V, v0, vld):
    # Four rows r = 0..3, LANES columns:
    # out[o0 + r old + c] = init[i0 + r] + sum_j C[c0 + r cr + j cj] V[v0 + j vld + c]
    tile = _tile_new(out)
    _tile_fill(tile, 0, init[i0])
    _tile_fill(tile, 1, init[i0 + 1])
    _tile_fill(tile, 2, init[i0 + 2])
    _tile_fill(tile, 3, init[i0 + 3])
    for j in range(nj):
        cp = c0 + j * cj
        vp = v0 + j * vld
        _tile_fma(tile, 0, C[cp], V, vp)
        _tile_fma(tile, 1, C[cp + cr], V, vp)
        _tile_fma(tile, 2, C[cp + 2 * cr], V, vp)
        _tile_fma(tile, 3, C[cp + 3 * cr], V, vp)
    _tile_store(tile, 0, out, o0)
    _tile_store(tile, 1, out, o0 + old)
    _tile_store(tile, 2, out, o0 + 2 * old)
    _tile_store(tile, 3, out, o0 + 3 * old)


@njit(**JIT)
def _tile1(out, o0, init, i0, C, c0, cj, nj, V, v0, vld):
    # One row of LANES columns: out[o0 + c] = init[i0] + sum_j C[c0 + j cj] V[...]
    tile = _tile_new(out)
    _tile_fill(tile, 0, init[i0])
    for j in range(nj):
        _tile_fma(tile, 0, C[c0 + j * cj], V, v0 + j * vld)
    _tile_store(tile, 0, out, o0)


@njit(**JIT)
def matmul_rows(out, o0, old, rows, cols, init, i0, C, c0, cr, cj, nj, V, v0, vld):
    """Small matrix product on flat arrays, by register tiles.

    out[o0 + r old + c] = init[i0 + r] + sum_{j < nj} C[c0 + r cr + j cj]
    V[v0 + j vld + c] for r < rows, c < cols.  ``C`` may have any strides (its
    entries are broadcast); rows of ``V`` and ``out`` are contiguous.  Columns
    beyond the last multiple of :data:`LANES` are summed one by one.
    """
    full = cols - cols % LANES
    r = 0
    while r + TILE_ROWS <= rows:
        for c in range(0, full, LANES):
            _tile4(
                out,
                o0 + r * old + c,
                old,
                init,
                i0 + r,
                C,
                c0 + r * cr,
                cr,
                cj,
                nj,
                V,
                v0 + c,
                vld,
            )
        r += TILE_ROWS
    while r < rows:
        for c in range(0, full, LANES):
            _tile1(
                out,
                o0 + r * old + c,
                init,
                i0 + r,
                C,
                c0 + r * cr,
                cj,
                nj,
                V,
                v0 + c,
                vld,
            )
        r += 1
    # columns left over: plain sums
    for r in range(rows):
        for c in range(full, cols):
            s = init[i0 + r]
            for j in range(nj):
                s += C[c0 + r * cr + j * cj] * V[v0 + j * vld + c]
            out[o0 + r * old + c] = s


# -- fused step ------------------------------------------------------------------


@njit(**JIT)
def _loss_columns(zT, bp, y, idx, nb, n_out, loss, scale, dT):
    # Loss of the batch and its error factor, feature-major: column b of zT is
    # sample idx[b]; dT receives scale * dL/dz, zero on padding columns.
    total = 0.0
    for b in range(nb):
        row = idx[b] * n_out
        if loss == MSE:
            s = 0.0
            for i in range(n_out):
                d = zT[i * bp + b] - y[row + i]
                dT[i * bp + b] = scale * d
                s += d * d
            total += 0.5 * s
        else:
            # softmax cross-entropy with the log-sum-exp shifted by the max logit
            zmax = zT[b]
            for i in range(1, n_out):
                zmax = max(zmax, zT[i * bp + b])
            se = 0.0
            for i in range(n_out):
                se += np.exp(zT[i * bp + b] - zmax)
            lse = zmax + np.log(se)
            ysum = 0.0
            yz = 0.0
            for i in range(n_out):
                ysum += y[row + i]
                yz += y[row + i] * zT[i * bp + b]
            for i in range(n_out):
                p = np.exp(zT[i * bp + b] - lse)
                dT[i * bp + b] = scale * (p * ysum - y[row + i])
            total += lse * ysum - yz
    for i in range(n_out):
        for b in range(nb, bp):
            dT[i * bp + b] = 0.0
    return scale * total


@njit(**JIT)
def fused_gradient(theta, x, y, idx, nb, plan, fpar, work):
    """Loss of the batch ``idx[:nb]`` and its gradient, in one pass.

    Returns the loss (with the plan's reduction over the batch); the gradient
    dL/dtheta is left in ``work[plan[PLAN_WORK + ...]]``, see
    :func:`gradient_offset`, and is only complete when the loss is finite (the
    backward pass is skipped otherwise).  ``x`` (P, n_0) and ``y`` (P, n_L) are
    flat; ``fpar[0]`` is the leaky-ReLU slope.
    """
    depth = plan[PLAN_DEPTH]
    code = plan[PLAN_ACTIVATION]
    slope = fpar[0]
    wi = PLAN_HEADER
    wo = _plan_w_off(depth)
    bo = _plan_b_off(depth)
    ko = _plan_work(depth)
    n0 = plan[wi]
    n_out = plan[wi + depth]
    bp = padded(nb)
    xs, xT, grad = plan[ko], plan[ko + 1], plan[ko + 2]
    dbuf = (plan[ko + 3], plan[ko + 4])
    zeros = plan[ko + 5]

    # batch rows, sample-major (xs) and feature-major with zero padding (xT)
    for b in range(nb):
        src = idx[b] * n0
        for q in range(n0):
            work[xs + b * n0 + q] = x[src + q]
    for q in range(n0):
        for b in range(nb):
            work[xT + q * bp + b] = work[xs + b * n0 + q]
        for b in range(nb, bp):
            work[xT + q * bp + b] = 0.0

    # forward pass: zT = W aT_prev + b, aT = sigma(zT), as = aT transposed
    prev = xT
    for l in range(depth):
        n, k = plan[wi + l + 1], plan[wi + l]
        zT = plan[ko + 6 + 3 * l]
        matmul_rows(
            work,
            zT,
            bp,
            n,
            bp,
            theta,
            plan[bo + l],
            theta,
            plan[wo + l],
            k,
            1,
            k,
            work,
            prev,
            bp,
        )
        if l < depth - 1:
            aT = plan[ko + 7 + 3 * l]
            a_s = plan[ko + 8 + 3 * l]
            for m in range(n * bp):
                work[aT + m] = act(code, work[zT + m], slope)
            for b in range(nb):
                for i in range(n):
                    work[a_s + b * n + i] = work[aT + i * bp + b]
            prev = aT

    # loss and error factor of the output layer
    scale = 1.0 / nb if plan[PLAN_MEAN] else 1.0
    zL = plan[ko + 6 + 3 * (depth - 1)]
    dT = dbuf[0]
    value = _loss_columns(
        work[zL:], bp, y, idx, nb, n_out, plan[PLAN_LOSS], scale, work[dT:]
    )
    if not np.isfinite(value):
        return value

    # backward pass: weight and bias gradients, then the error one layer down
    for l in range(depth - 1, -1, -1):
        n, k = plan[wi + l + 1], plan[wi + l]
        a_prev = xs if l == 0 else plan[ko + 8 + 3 * (l - 1)]
        # dL/dW = dT[:, :nb] as_prev
        matmul_rows(
            work,
            grad + plan[wo + l],
            k,
            n,
            k,
            work,
            zeros,
            work,
            dT,
            bp,
            1,
            nb,
            work,
            a_prev,
            k,
        )
        # dL/db = row sums of dT
        for i in range(n):
            s = 0.0
            for b in range(nb):
                s += work[dT + i * bp + b]
            work[grad + plan[bo + l] + i] = s
        if l > 0:
            # dT_prev = (W^T dT) * sigma'(zT_prev)
            nxt = dbuf[(depth - l) % 2]
            zp = plan[ko + 6 + 3 * (l - 1)]
            matmul_rows(
                work,
                nxt,
                bp,
                k,
                bp,
                work,
                zeros,
                theta,
                plan[wo + l],
                1,
                k,
                n,
                work,
                dT,
                bp,
            )
            for m in range(k * bp):
                work[nxt + m] *= dact(code, work[zp + m], slope)
            dT = nxt
    return value


def gradient_offset(plan):
    """Where :func:`fused_gradient` leaves the gradient in its workspace."""
    return int(plan[_plan_work(int(plan[PLAN_DEPTH])) + 2])


# -- elementwise kernels of the BLAS step ----------------------------------------


@njit(**JIT)
def bias_activate(z, b, a, m, n, code, slope, hidden):
    """z[p, i] += b[i] and, for hidden layers, a[p, i] = sigma(z[p, i]).

    ``z`` and ``a`` are flat (m, n) row-major blocks.
    """
    if not hidden:
        for p in range(m):
            for i in range(n):
                z[p * n + i] += b[i]
    elif code == RELU:
        for p in range(m):
            for i in range(n):
                v = z[p * n + i] + b[i]
                z[p * n + i] = v
                a[p * n + i] = v if v > 0 else 0.0 * v
    else:
        for p in range(m):
            for i in range(n):
                v = z[p * n + i] + b[i]
                z[p * n + i] = v
                a[p * n + i] = act(code, v, slope)


@njit(**JIT)
def times_derivative(d, z, count, code, slope):
    """d *= sigma'(z), entry by entry, over ``count`` entries."""
    if code == RELU:
        for m in range(count):
            d[m] = d[m] if z[m] > 0 else 0.0 * d[m]
    else:
        for m in range(count):
            d[m] *= dact(code, z[m], slope)


@njit(**JIT)
def loss_rows(z, y, eps, m, n, loss, scale):
    """Loss of m samples (rows of z, y) and eps = scale dL/dz; returns the loss."""
    total = 0.0
    for p in range(m):
        r = p * n
        if loss == MSE:
            s = 0.0
            for i in range(n):
                d = z[r + i] - y[r + i]
                eps[r + i] = scale * d
                s += d * d
            total += 0.5 * s
        else:
            # softmax cross-entropy with the log-sum-exp shifted by the max logit
            zmax = z[r]
            for i in range(1, n):
                zmax = max(zmax, z[r + i])
            se = 0.0
            for i in range(n):
                se += np.exp(z[r + i] - zmax)
            lse = zmax + np.log(se)
            ysum = 0.0
            yz = 0.0
            for i in range(n):
                ysum += y[r + i]
                yz += y[r + i] * z[r + i]
            for i in range(n):
                eps[r + i] = scale * (np.exp(z[r + i] - lse) * ysum - y[r + i])
            total += lse * ysum - yz
    return scale * total


@njit(**JIT)
def column_sums(d, m, n, out, accumulate):
    """out[i] = sum_p d[p, i] (added to ``out`` when ``accumulate``)."""
    if not accumulate:
        for i in range(n):
            out[i] = 0.0
    for p in range(m):
        for i in range(n):
            out[i] += d[p * n + i]


@njit(**JIT)
def update(theta, new, grad, n, kind, rate):
    """new = theta - step: step = rate[0] grad, rate * grad, or ``new`` itself.

    For a dense tensor the caller has already written R grad into ``new``.
    """
    if kind == UPDATE_SCALAR:
        c = rate[0]
        for m in range(n):
            new[m] = theta[m] - c * grad[m]
    elif kind == UPDATE_DIAGONAL:
        for m in range(n):
            new[m] = theta[m] - rate[m] * grad[m]
    else:
        for m in range(n):
            new[m] = theta[m] - new[m]


# -- C entry points --------------------------------------------------------------
# Each kernel above has a C entry point taking raw pointers and sizes, compiled
# as a cfunc once per dtype on first use; the Cython loop calls them through
# their addresses (see :func:`addresses`).


def _c_fused_gradient(theta_p, x_p, y_p, idx_p, nb, plan_p, fpar_p, work_p):
    depth = carray(plan_p, (PLAN_HEADER,))[PLAN_DEPTH]
    plan = carray(plan_p, (_plan_work(depth) + 6 + 3 * depth,))
    n_samples = plan[PLAN_N_SAMPLES]
    theta = carray(theta_p, (plan[PLAN_N_PARAMS],))
    x = carray(x_p, (n_samples * plan[PLAN_HEADER],))
    y = carray(y_p, (n_samples * plan[PLAN_HEADER + depth],))
    idx = carray(idx_p, (nb,))
    fpar = carray(fpar_p, (1,))
    work = carray(work_p, (plan[PLAN_WORK],))
    return fused_gradient(theta, x, y, idx, nb, plan, fpar, work)


def _c_bias_activate(z_p, b_p, a_p, m, n, code, slope, hidden):
    z = carray(z_p, (m * n,))
    b = carray(b_p, (n,))
    a = carray(a_p, (m * n if hidden else 0,))
    bias_activate(z, b, a, m, n, code, slope, hidden)


def _c_times_derivative(d_p, z_p, count, code, slope):
    times_derivative(carray(d_p, (count,)), carray(z_p, (count,)), count, code, slope)


def _c_loss_rows(z_p, y_p, eps_p, m, n, loss, scale):
    z = carray(z_p, (m * n,))
    y = carray(y_p, (m * n,))
    eps = carray(eps_p, (m * n,))
    return loss_rows(z, y, eps, m, n, loss, scale)


def _c_column_sums(d_p, m, n, out_p, accumulate):
    column_sums(carray(d_p, (m * n,)), m, n, carray(out_p, (n,)), accumulate)


def _c_update(theta_p, new_p, grad_p, n, kind, rate_p, n_rate):
    update(
        carray(theta_p, (n,)),
        carray(new_p, (n,)),
        carray(grad_p, (n,)),
        n,
        kind,
        carray(rate_p, (n_rate,)),
    )


def _signatures(T):
    # C signature of each entry point for the floating type T.
    ptr = types.CPointer(T)
    iptr = types.CPointer(types.int64)
    dptr = types.CPointer(types.float64)
    i64, f64, void = types.int64, types.float64, types.void
    return {
        "fused_gradient": (
            _c_fused_gradient,
            f64(ptr, ptr, ptr, iptr, i64, iptr, dptr, ptr),
        ),
        "bias_activate": (
            _c_bias_activate,
            void(ptr, ptr, ptr, i64, i64, i64, f64, i64),
        ),
        "times_derivative": (_c_times_derivative, void(ptr, ptr, i64, i64, f64)),
        "loss_rows": (_c_loss_rows, f64(ptr, ptr, ptr, i64, i64, i64, f64)),
        "column_sums": (_c_column_sums, void(ptr, i64, i64, ptr, i64)),
        "update": (_c_update, void(ptr, ptr, ptr, i64, i64, ptr, i64)),
    }


_ADDRESSES = {}


def addresses(dtype) -> dict:
    """C addresses of the step kernels for ``dtype``, compiled on first use.

    Returns a dict name -> int (the address of a C function); the kernels are
    cached on disk like every other kernel of the package.
    """
    dt = np.dtype(dtype)
    if dt not in _ADDRESSES:
        T = types.float64 if dt == np.float64 else types.float32
        _ADDRESSES[dt] = {
            name: cfunc(sig, **JIT)(py).address
            for name, (py, sig) in _signatures(T).items()
        }
    return _ADDRESSES[dt]
