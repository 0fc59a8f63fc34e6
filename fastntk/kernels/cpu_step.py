"""Compiled kernels of one training step, callable from the Cython step loop.

The training loop (:mod:`fastntk.engines._loop`) runs in Cython without the GIL
and calls the kernels of this module through their C addresses (Numba
``@cfunc``), which costs a few nanoseconds per call.  Each step is two calls:
a *gradient kernel* (forward pass, loss, backward pass of one batch; it
returns the loss and leaves dL/dtheta in its workspace) and :func:`update`
(theta - lr lambda dL/dtheta into the other parameter buffer).  Two gradient
kernels:

- :func:`fused_gradient`: hand-tiled loops without BLAS and without
  allocation, for narrow networks and small batches, where a BLAS call costs
  more than its arithmetic.  Activations are *feature-major* (one row per unit,
  one column per sample, the batch padded with zero columns to a multiple of
  :data:`LANES`), so that every product is a sum of rank-one updates of rows of
  ``LANES`` contiguous entries.  Those run on an explicit SIMD tile, 8 or 4
  rows of ``LANES`` accumulators held in vector registers (see
  :func:`matmul_rows`), written with LLVM vector intrinsics because Numba's
  automatic vectorization leaves such short loops scalar; transposes and row
  sums go by 8 x 8 blocks shuffled in registers.  Vectors of ``LANES``
  entries are legal on every CPU LLVM targets (split into narrower registers
  where needed).
- :func:`blas_part`: BLAS matrix products and fused elementwise loops, for
  wide layers and large batches.  The batch is cut into one range of samples
  (a *part*) per thread; the step loop runs each part on its own thread with
  single-threaded BLAS, then sums the parts' gradients in a fixed order
  (deterministic for a given thread count).

Every kernel receives the description of the step in a *plan*: an int64 array
built by :func:`make_plan` (depth, activation, loss, reduction, update kind,
widths, parameter offsets, workspace layout).  Inputs are assumed validated:
C-contiguous, one floating dtype, finite.
"""

from __future__ import annotations

import llvmlite.binding as llb
import llvmlite.ir as llir
import numpy as np
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastntk._config import JIT, JIT_INLINE
from fastntk.kernels.activations import RELU, act, dact
from fastntk.kernels.cpu import MSE

#: Entries of one SIMD vector of the fused step (both dtypes).
LANES = 8

#: Rows of the largest register tile of the fused step.
TILE_ROWS = 8

#: Whether the CPU has 512-bit vector registers.  A tile needs about eight
#: independent register accumulators to hide the latency of its fused
#: multiply-adds, without spilling: with 256-bit registers that is 8 rows of
#: float32 or 4 rows of float64 (see :func:`matmul_rows`).
WIDE_REGISTERS = bool(llb.get_host_cpu_features().get("avx512f", False))

#: How the update applies the learning-rate tensor: theta -= r[0] g (identity),
#: theta -= r * g (any diagonal tensor), theta -= R g (dense).
UPDATE_SCALAR, UPDATE_DIAGONAL, UPDATE_DENSE = 0, 1, 2

# -- plan layout -----------------------------------------------------------------
# Header entries of a plan; widths [n_0..n_L], weight offsets, bias offsets and
# the offsets of the kernel's workspace follow.
PLAN_DEPTH = 0
PLAN_ACTIVATION = 1
PLAN_LOSS = 2
PLAN_MEAN = 3
PLAN_UPDATE = 4
PLAN_N_PARAMS = 5
PLAN_N_SAMPLES = 6
PLAN_BATCH = 7
PLAN_WORK = 8  # workspace length
PLAN_GRAD = 9  # where the gradient is left in the workspace
PLAN_PARTS = 10  # BLAS kernel: sample ranges computed in parallel
PLAN_BLOCK = 11  # BLAS kernel: rows per block within a range
PLAN_GATHER = 12  # BLAS kernel: 1 when batches are gathered rows, 0 for all rows
PLAN_HEADER = 13

# Workspace blocks of the fused kernel: the batch inputs (feature-major and
# sample-major), the gradient, two error buffers, a block of zeros, then per
# layer the preactivations and activations (feature-major) and the activations
# (sample-major).
WS_XT, WS_XS, WS_GRAD, WS_D0, WS_D1, WS_ZEROS, WS_LAYERS = range(7)
WS_PER_LAYER = 3

# Workspace of the BLAS kernel: the gradient, then one region per part.  The
# plan holds the start of the first region and the distance between regions,
# then the offsets within a region of: the gathered rows, two error buffers,
# the part's gradient, a scratch block for weight gradients, and per layer the
# preactivations and activations.
BW_START, BW_STRIDE = 0, 1
BW_X, BW_Y, BW_D0, BW_D1, BW_GRAD, BW_SCRATCH, BW_LAYERS = range(2, 9)


@njit(**JIT)
def plan_length(depth):
    """Entries of the plan of a network of ``depth`` layers (either kernel)."""
    fused = WS_LAYERS + WS_PER_LAYER * depth
    blas = BW_LAYERS + 2 * depth
    return PLAN_HEADER + 3 * depth + 1 + max(fused, blas)


@njit(**JIT)
def _widths(plan, l):
    return plan[PLAN_HEADER + l]


@njit(**JIT)
def _w_off(plan, l):
    return plan[PLAN_HEADER + plan[PLAN_DEPTH] + 1 + l]


@njit(**JIT)
def _b_off(plan, l):
    return plan[PLAN_HEADER + 2 * plan[PLAN_DEPTH] + 1 + l]


@njit(**JIT)
def _ws(plan, block):
    # Offset of a workspace block (the kernel's block numbering).
    return plan[PLAN_HEADER + 3 * plan[PLAN_DEPTH] + 1 + block]


@njit(**JIT)
def padded(n):
    """``n`` rounded up to a multiple of :data:`LANES`."""
    return -(-n // LANES) * LANES


#: Bytes between the page offsets (addresses modulo 4 KiB) of consecutive
#: workspace blocks.  A load and an earlier store whose addresses agree modulo
#: 4 KiB are treated as dependent by the CPU until the store's full address is
#: known; loops that read one block and write another at the same index stall
#: on every iteration when the blocks start a multiple of 4 KiB apart.
STAGGER = 1088


def _layout(sizes, itemsize, first=0):
    # Offsets (entries) of consecutive blocks of the given sizes; block k
    # starts at a page offset of (first + k) STAGGER bytes, and on a vector
    # boundary.  Returns the offsets and the total length.
    offsets, pos = [], 0
    for k, size in enumerate(sizes):
        target = ((first + k) * STAGGER) % 4096
        pos += ((target - pos * itemsize) % 4096) // itemsize
        offsets.append(pos)
        pos += padded(size)
    return offsets, pos


def make_plan(
    widths,
    activation_code,
    loss_code,
    mean,
    update_kind,
    n_samples,
    batch,
    kernel="fused",
    parts=1,
    block=None,
    gather=True,
    itemsize=8,
):
    """The int64 plan of a step and the length of its workspace.

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
    kernel : {"fused", "blas"}
        The gradient kernel the workspace is laid out for.
    parts : int
        BLAS kernel: the batch is cut into this many ranges of samples, whose
        gradients are computed in parallel and summed in order.
    block : int, optional
        BLAS kernel: rows per block within a range (default: the whole range).
    gather : bool
        BLAS kernel: steps use gathered rows ``x[idx]`` (False: the first rows
        of ``x`` in order, full-batch descent without copies).
    itemsize : int
        Bytes per entry (8 or 4), for the placement of the workspace blocks.

    Returns
    -------
    plan : ndarray of int64
    work_size : int
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
    wmax = max(widths)

    if kernel == "fused":
        bp = padded(batch)
        sizes = [
            widths[0] * bp,
            bp * widths[0],
            n_params,
            wmax * bp,
            wmax * bp,
            wmax,
        ]
        for n in widths[1:]:
            sizes += [n * bp, n * bp, bp * n]
        offsets, size = _layout(sizes, itemsize)
        grad = offsets[WS_GRAD]
        parts, block = 1, batch
    else:
        parts = max(1, min(int(parts), batch))
        rows = -(-batch // parts)
        block = rows if block is None else max(1, min(int(block), rows))
        wsq = max(widths[l + 1] * widths[l] for l in range(depth))
        sizes = [
            block * widths[0],
            block * widths[-1],
            block * wmax,
            block * wmax,
            n_params,
            wsq,
        ]
        sizes += [block * n for n in widths[1:]] * 2
        grad = 0

        # one region per part, each starting on a page boundary (parts run on
        # different threads; what matters is the stagger within a part)
        page = 4096 // itemsize
        part_offsets, part_size = _layout(sizes, itemsize, 1)
        first = -(-n_params // page) * page
        stride = -(-part_size // page) * page
        offsets = [first, stride] + part_offsets
        size = first + parts * stride
    header = [
        depth,
        activation_code,
        loss_code,
        int(bool(mean)),
        update_kind,
        n_params,
        n_samples,
        batch,
        size,
        grad,
        parts,
        block,
        int(gather),
    ]
    plan = header + widths + w_off + b_off + offsets
    plan += [0] * (plan_length(depth) - len(plan))
    return np.array(plan, dtype=np.int64), size


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


def _splat(builder, value, vector_type):
    # A vector with every entry equal to ``value`` (of the vector's element type).
    zero = llir.Constant(llir.IntType(32), 0)
    v = builder.insert_element(llir.Constant(vector_type, llir.Undefined), value, zero)
    mask = llir.Constant(llir.VectorType(llir.IntType(32), LANES), [0] * LANES)
    return builder.shuffle_vector(v, llir.Constant(vector_type, llir.Undefined), mask)


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
        v = context.cast(builder, args[2], value, dt)
        v = _splat(builder, v, _vector_type(context, dt))
        builder.store(v, _tile_slot(context, builder, args[0], args[1], dt))
        return context.get_dummy_value()

    return types.void(tile, row, value), codegen


@intrinsic
def _tile_fma(typingctx, tile, row, cary, coff, ary, offset):
    """tile[row, :] += cary[coff] * ary[offset:offset + LANES] (fused multiply-add).

    Both operands are read at their offsets as given (no negative-index
    wrap-around, whose checks would cost more than the multiply-adds).
    """

    def codegen(context, builder, sig, args):
        dt = tile.dtype
        vt = _vector_type(context, dt)
        slot = _tile_slot(context, builder, args[0], args[1], dt)
        cdata = context.make_array(cary)(context, builder, args[2]).data
        coef = builder.load(builder.gep(cdata, [args[3]]))
        c = _splat(builder, context.cast(builder, coef, cary.dtype, dt), vt)
        ptr = _element_vector(context, builder, ary, args[4], args[5])
        v = builder.load(ptr, align=1)
        name = f"llvm.fma.v{LANES}{'f64' if dt.bitwidth == 64 else 'f32'}"
        fma = cgutils.get_or_insert_function(
            builder.module, llir.FunctionType(vt, [vt, vt, vt]), name
        )
        builder.store(builder.call(fma, [c, v, builder.load(slot)]), slot)
        return context.get_dummy_value()

    return types.void(tile, row, cary, coff, ary, offset), codegen


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


@intrinsic
def _tile_set(typingctx, tile, row, lane, value):
    """tile[row, lane] = value (assembles a vector from scalars)."""

    def codegen(context, builder, sig, args):
        dt = tile.dtype
        slot = _tile_slot(context, builder, args[0], args[1], dt)
        elem = builder.gep(builder.bitcast(slot, args[0].type), [args[2]])
        builder.store(context.cast(builder, args[3], value, dt), elem)
        return context.get_dummy_value()

    return types.void(tile, row, lane, value), codegen


def _relu_select(builder, test, value, vt):
    # value where test > 0, else 0 * value (NaN stays NaN, as in the reference)
    zero = llir.Constant(vt, [0.0] * LANES)
    positive = builder.fcmp_ordered(">", test, zero)
    return builder.select(positive, value, builder.fmul(zero, value))


@intrinsic
def _relu_lanes(typingctx, ary, dst, src):
    """ary[dst:dst + LANES] = relu(ary[src:src + LANES])."""

    def codegen(context, builder, sig, args):
        vt = _vector_type(context, ary.dtype)
        v = builder.load(
            _element_vector(context, builder, ary, args[0], args[2]), align=1
        )
        out = _relu_select(builder, v, v, vt)
        builder.store(
            out, _element_vector(context, builder, ary, args[0], args[1]), align=1
        )
        return context.get_dummy_value()

    return types.void(ary, dst, src), codegen


@intrinsic
def _relu_derivative_lanes(typingctx, ary, d, z):
    """ary[d:d + LANES] *= relu'(ary[z:z + LANES]) (1 where z > 0, else 0)."""

    def codegen(context, builder, sig, args):
        vt = _vector_type(context, ary.dtype)
        dp = _element_vector(context, builder, ary, args[0], args[1])
        dv = builder.load(dp, align=1)
        zv = builder.load(
            _element_vector(context, builder, ary, args[0], args[2]), align=1
        )
        builder.store(_relu_select(builder, zv, dv, vt), dp, align=1)
        return context.get_dummy_value()

    return types.void(ary, d, z), codegen


@intrinsic
def _copy_lanes(typingctx, dst_ary, dst, src_ary, src):
    """dst_ary[dst:dst + LANES] = src_ary[src:src + LANES], one vector."""

    def codegen(context, builder, sig, args):
        v = builder.load(
            _element_vector(context, builder, src_ary, args[2], args[3]), align=1
        )
        ptr = _element_vector(context, builder, dst_ary, args[0], args[1])
        builder.store(v, ptr, align=1)
        return context.get_dummy_value()

    return types.void(dst_ary, dst, src_ary, src), codegen


@intrinsic
def _step_lanes(typingctx, new, theta, grad, coef, rate, offset, diagonal):
    """new[o:o+LANES] = theta[o:o+LANES] - r * grad[o:o+LANES], o = offset.

    r is ``rate[o:o+LANES]`` when ``diagonal`` (a literal bool), else ``coef``.
    """
    diag = getattr(diagonal, "literal_value", None)
    if diag is None:
        return None

    def codegen(context, builder, sig, args):
        new_v, theta_v, grad_v, coef_v, rate_v, off_v, _ = args
        dt = new.dtype
        vt = _vector_type(context, dt)
        t = builder.load(
            _element_vector(context, builder, theta, theta_v, off_v), align=1
        )
        g = builder.load(
            _element_vector(context, builder, grad, grad_v, off_v), align=1
        )
        if diag:
            r = builder.load(
                _element_vector(context, builder, rate, rate_v, off_v), align=1
            )
        else:
            r = _splat(builder, context.cast(builder, coef_v, coef, dt), vt)
        out = builder.fsub(t, builder.fmul(r, g))
        builder.store(
            out, _element_vector(context, builder, new, new_v, off_v), align=1
        )
        return context.get_dummy_value()

    sig = types.void(new, theta, grad, coef, rate, offset, diagonal)
    return sig, codegen


def _interleave_masks(width):
    # Shuffle masks (LLVM constants) that interleave blocks of ``width``
    # entries of two vectors: (a0 b0 a2 b2 ..., a1 b1 a3 b3 ...) for blocks
    # a0 a1 ... and b0 b1 ...
    low, high = [], []
    for start in range(0, LANES, 2 * width):
        low += [start + k for k in range(width)]
        low += [LANES + start + k for k in range(width)]
        high += [start + width + k for k in range(width)]
        high += [LANES + start + width + k for k in range(width)]
    mask = llir.VectorType(llir.IntType(32), LANES)
    return llir.Constant(mask, low), llir.Constant(mask, high)


def _load_rows(context, builder, aryty, ary, start, ld):
    # The LANES rows of a LANES x LANES block, row r starting at start + r ld.
    rows = []
    for r in range(LANES):
        off = builder.add(start, builder.mul(ld, llir.Constant(ld.type, r)))
        ptr = _element_vector(context, builder, aryty, ary, off)
        rows.append(builder.load(ptr, align=1))
    return rows


@intrinsic
def _transpose_block(typingctx, dst_ary, dst, dst_ld, src_ary, src, src_ld):
    """dst[c, r] = src[r, c] for an 8 x 8 block (LANES x LANES), in registers.

    Row r of the source block starts at ``src + r src_ld``, row c of the
    destination at ``dst + c dst_ld``.  Three rounds of shuffles interleave
    pairs of rows by single entries, pairs and quadruples.
    """

    def codegen(context, builder, sig, args):
        d_ary, d_v, d_ld, s_ary, s_v, s_ld = args
        rows = _load_rows(context, builder, src_ary, s_ary, s_v, s_ld)
        width = 1
        while width < LANES:
            lo_m, hi_m = _interleave_masks(width)
            out = list(rows)
            for r in range(LANES):
                if r & width:
                    continue
                a, b = rows[r], rows[r + width]
                out[r] = builder.shuffle_vector(a, b, lo_m)
                out[r + width] = builder.shuffle_vector(a, b, hi_m)
            rows = out
            width *= 2
        for c in range(LANES):
            off = builder.add(d_v, builder.mul(d_ld, llir.Constant(d_ld.type, c)))
            ptr = _element_vector(context, builder, dst_ary, d_ary, off)
            builder.store(rows[c], ptr, align=1)
        return context.get_dummy_value()

    sig = types.void(dst_ary, dst, dst_ld, src_ary, src, src_ld)
    return sig, codegen


@intrinsic
def _row_sums_add(typingctx, tile, row, src_ary, src, src_ld):
    """tile[row, u] += sum_c src[u, c] over an 8 x 8 block (LANES x LANES).

    Row u of the block starts at ``src + u src_ld``.  Pairs of rows are
    interleaved and added three times (entries, pairs, quadruples), which
    leaves the sum of row u in lane u; each row is summed pairwise.
    """

    def codegen(context, builder, sig, args):
        dt = tile.dtype
        t_v, r_v, s_ary, s_v, s_ld = args
        vecs = _load_rows(context, builder, src_ary, s_ary, s_v, s_ld)
        width = 1
        while len(vecs) > 1:
            lo_m, hi_m = _interleave_masks(width)
            pairs = zip(vecs[0::2], vecs[1::2])
            vecs = [
                builder.fadd(
                    builder.shuffle_vector(a, b, lo_m),
                    builder.shuffle_vector(a, b, hi_m),
                )
                for a, b in pairs
            ]
            width *= 2
        slot = _tile_slot(context, builder, t_v, r_v, dt)
        builder.store(builder.fadd(builder.load(slot), vecs[0]), slot)
        return context.get_dummy_value()

    return types.void(tile, row, src_ary, src, src_ld), codegen


# -- small matrix products -------------------------------------------------------
# Operands are tuples: out = (array, offset, row stride), C = (array, offset,
# row stride, column stride), V = (array, offset, row stride), init = (array,
# offset); rows of out and V are contiguous.


@njit(**JIT_INLINE)
def _tile8(out, r, c, init, C, V, nj):
    # Rows r..r+7, columns c..c+LANES-1 of out = init + C V.
    o, oo, ld = out
    ca, co, cr, cj = C
    va = V[0]
    tile = _tile_new(o)
    for u in range(8):
        _tile_fill(tile, u, init[0][init[1] + r + u])
    for j in range(nj):
        cp = co + r * cr + j * cj
        vp = V[1] + j * V[2] + c
        _tile_fma(tile, 0, ca, cp, va, vp)
        _tile_fma(tile, 1, ca, cp + cr, va, vp)
        _tile_fma(tile, 2, ca, cp + 2 * cr, va, vp)
        _tile_fma(tile, 3, ca, cp + 3 * cr, va, vp)
        _tile_fma(tile, 4, ca, cp + 4 * cr, va, vp)
        _tile_fma(tile, 5, ca, cp + 5 * cr, va, vp)
        _tile_fma(tile, 6, ca, cp + 6 * cr, va, vp)
        _tile_fma(tile, 7, ca, cp + 7 * cr, va, vp)
    base = oo + r * ld + c
    for u in range(8):
        _tile_store(tile, u, o, base + u * ld)


@njit(**JIT_INLINE)
def _tile4(out, r, c, init, C, V, nj):
    # Rows r..r+3, columns c..c+LANES-1 of out = init + C V.
    o, oo, ld = out
    ca, co, cr, cj = C
    va = V[0]
    tile = _tile_new(o)
    _tile_fill(tile, 0, init[0][init[1] + r])
    _tile_fill(tile, 1, init[0][init[1] + r + 1])
    _tile_fill(tile, 2, init[0][init[1] + r + 2])
    _tile_fill(tile, 3, init[0][init[1] + r + 3])
    for j in range(nj):
        cp = co + r * cr + j * cj
        vp = V[1] + j * V[2] + c
        _tile_fma(tile, 0, ca, cp, va, vp)
        _tile_fma(tile, 1, ca, cp + cr, va, vp)
        _tile_fma(tile, 2, ca, cp + 2 * cr, va, vp)
        _tile_fma(tile, 3, ca, cp + 3 * cr, va, vp)
    base = oo + r * ld + c
    _tile_store(tile, 0, o, base)
    _tile_store(tile, 1, o, base + ld)
    _tile_store(tile, 2, o, base + 2 * ld)
    _tile_store(tile, 3, o, base + 3 * ld)


@njit(**JIT_INLINE)
def _tile1(out, r, c, init, C, V, nj):
    # Row r, columns c..c+LANES-1 of out = init + C V.
    o, oo, ld = out
    ca, co, cr, cj = C
    tile = _tile_new(o)
    _tile_fill(tile, 0, init[0][init[1] + r])
    for j in range(nj):
        _tile_fma(tile, 0, ca, co + r * cr + j * cj, V[0], V[1] + j * V[2] + c)
    _tile_store(tile, 0, o, oo + r * ld + c)


@njit(**JIT_INLINE)
def matmul_rows(out, init, C, V, rows, cols, nj):
    """Small matrix product by register tiles: out = init + C V.

    out[r, c] = init[r] + sum_{j < nj} C[r, j] V[j, c] for r < rows, c < cols,
    operands as described above.  ``C`` may have any strides (its entries are
    broadcast).
    Columns beyond the last multiple of :data:`LANES` are summed one by one.

    Rows go by tiles of 8 rows where 8 rows of accumulators fit in the vector
    registers (float32, or any dtype with 512-bit registers), else by tiles of
    4 rows; then 4 and 1.
    """
    full = cols - cols % LANES
    r = 0
    if WIDE_REGISTERS or out[0].itemsize <= 4:
        while r + 8 <= rows:
            for c in range(0, full, LANES):
                _tile8(out, r, c, init, C, V, nj)
            r += 8
    while r + 4 <= rows:
        for c in range(0, full, LANES):
            _tile4(out, r, c, init, C, V, nj)
        r += 4
    while r < rows:
        for c in range(0, full, LANES):
            _tile1(out, r, c, init, C, V, nj)
        r += 1

    # columns left over: plain sums
    o, oo, ld = out
    ca, co, cr, cj = C
    for r in range(rows):
        for c in range(full, cols):
            s = init[0][init[1] + r]
            for j in range(nj):
                s += ca[co + r * cr + j * cj] * V[0][V[1] + j * V[2] + c]
            o[oo + r * ld + c] = s


# -- fused step ------------------------------------------------------------------


@njit(**JIT)
def _activate(work, z, a, count, code, slope):
    # a = sigma(z) over ``count`` entries (a multiple of LANES), stored a vector
    # at a time so that later vector loads of ``a`` read them without stalls.
    if code == RELU:
        for m in range(0, count, LANES):
            _relu_lanes(work, a + m, z + m)
    else:
        tile = _tile_new(work)
        for m in range(0, count, LANES):
            for lane in range(LANES):
                _tile_set(tile, 0, lane, act(code, work[z + m + lane], slope))
            _tile_store(tile, 0, work, a + m)


@njit(**JIT)
def _derivative(work, d, z, count, code, slope):
    # d *= sigma'(z) over ``count`` entries (a multiple of LANES), by vectors.
    if code == RELU:
        for m in range(0, count, LANES):
            _relu_derivative_lanes(work, d + m, z + m)
    else:
        tile = _tile_new(work)
        for m in range(0, count, LANES):
            for lane in range(LANES):
                v = work[d + m + lane] * dact(code, work[z + m + lane], slope)
                _tile_set(tile, 0, lane, v)
            _tile_store(tile, 0, work, d + m)


@njit(**JIT)
def _transpose(dst_ary, dst, dst_ld, src_ary, src, src_ld, rows, cols):
    # dst[c, r] = src[r, c] for r < rows, c < cols (rows of src ``src_ld``
    # apart, rows of dst ``dst_ld`` apart): 8 x 8 blocks in registers, then
    # the edges entry by entry.
    rfull = rows - rows % LANES
    cfull = cols - cols % LANES
    for r0 in range(0, rfull, LANES):
        for c0 in range(0, cfull, LANES):
            d, s = dst + c0 * dst_ld + r0, src + r0 * src_ld + c0
            _transpose_block(dst_ary, d, dst_ld, src_ary, s, src_ld)
    for r in range(rows):
        for c in range(cfull if r < rfull else 0, cols):
            dst_ary[dst + c * dst_ld + r] = src_ary[src + r * src_ld + c]


@njit(**JIT)
def _row_sums(work, out, src, ld, rows, cols):
    # out[r] = sum_c src[r, c] for r < rows, c < cols (a multiple of LANES;
    # rows of src ``ld`` apart): 8 rows at a time by vectors, the rows left
    # over entry by entry.
    tile = _tile_new(work)
    full = rows - rows % LANES
    for r0 in range(0, full, LANES):
        _tile_fill(tile, 0, 0.0)
        for c0 in range(0, cols, LANES):
            _row_sums_add(tile, 0, work, src + r0 * ld + c0, ld)
        _tile_store(tile, 0, work, out + r0)
    zero = work.dtype.type(0.0)
    for r in range(full, rows):
        s = zero
        for c in range(cols):
            s += work[src + r * ld + c]
        work[out + r] = s


@njit(**JIT)
def _loss_columns(work, z, bp, y, idx, nb, n_out, loss, scale, d):
    # Loss of the batch and error factor, feature-major: column b of the block
    # at z is sample idx[b]; the block at d receives scale * dL/dz, zero on the
    # padding columns.
    total = 0.0
    for b in range(nb):
        row = idx[b] * n_out
        if loss == MSE:
            s = 0.0
            for i in range(n_out):
                e = work[z + i * bp + b] - y[row + i]
                work[d + i * bp + b] = scale * e
                s += e * e
            total += 0.5 * s
        else:
            # softmax cross-entropy with the log-sum-exp shifted by the max logit
            zmax = work[z + b]
            for i in range(1, n_out):
                zmax = max(zmax, work[z + i * bp + b])
            se = 0.0
            for i in range(n_out):
                se += np.exp(work[z + i * bp + b] - zmax)
            lse = zmax + np.log(se)
            ysum = 0.0
            yz = 0.0
            for i in range(n_out):
                ysum += y[row + i]
                yz += y[row + i] * work[z + i * bp + b]
            for i in range(n_out):
                p = np.exp(work[z + i * bp + b] - lse)
                work[d + i * bp + b] = scale * (p * ysum - y[row + i])
            total += lse * ysum - yz
    for i in range(n_out):
        for b in range(nb, bp):
            work[d + i * bp + b] = 0.0
    return scale * total


@njit(**JIT)
def _fused_forward(theta, x, y, idx, nb, plan, fpar, work, scale):
    # Forward pass of the batch idx[:nb] and its loss (times ``scale``); leaves
    # the activations and the output error factor in the workspace.
    depth = plan[PLAN_DEPTH]
    code = plan[PLAN_ACTIVATION]
    slope = fpar[0]
    n0 = _widths(plan, 0)
    n_out = _widths(plan, depth)
    bp = padded(nb)
    xT = _ws(plan, WS_XT)
    xs = _ws(plan, WS_XS)

    # batch inputs: sample-major rows xs[b] = x[idx[b]], zero rows up to bp,
    # then feature-major xT[q, b] = xs[b, q] by transposed blocks
    full = n0 - n0 % LANES
    for b in range(nb):
        src = idx[b] * n0
        for q in range(0, full, LANES):
            _copy_lanes(work, xs + b * n0 + q, x, src + q)
        for q in range(full, n0):
            work[xs + b * n0 + q] = x[src + q]
    for q in range(nb * n0, bp * n0):
        work[xs + q] = 0.0
    _transpose(work, xT, bp, work, xs, n0, bp, n0)

    # forward pass: zT = W aT_prev + b, aT = sigma(zT), a_s = aT transposed
    prev = xT
    for l in range(depth):
        n, k = _widths(plan, l + 1), _widths(plan, l)
        zT = _ws(plan, WS_LAYERS + WS_PER_LAYER * l)
        W = (theta, _w_off(plan, l), k, 1)
        matmul_rows(
            (work, zT, bp), (theta, _b_off(plan, l)), W, (work, prev, bp), n, bp, k
        )
        if l < depth - 1:
            aT = _ws(plan, WS_LAYERS + WS_PER_LAYER * l + 1)
            a_s = _ws(plan, WS_LAYERS + WS_PER_LAYER * l + 2)
            _activate(work, zT, aT, n * bp, code, slope)
            _transpose(work, a_s, n, work, aT, bp, n, bp)
            prev = aT

    # loss and error factor of the output layer
    zL = _ws(plan, WS_LAYERS + WS_PER_LAYER * (depth - 1))
    return _loss_columns(
        work, zL, bp, y, idx, nb, n_out, plan[PLAN_LOSS], scale, _ws(plan, WS_D0)
    )


@njit(**JIT)
def fused_gradient(theta, x, y, idx, nb, plan, fpar, work):
    """Loss of the batch ``idx[:nb]`` and its gradient, in one pass.

    Returns the loss (with the plan's reduction over the batch) and leaves the
    gradient dL/dtheta in the workspace at :func:`gradient_offset`; when the
    loss is not finite the backward pass is skipped.  ``x`` (P, n_0) and ``y``
    (P, n_L) are flat; ``fpar[0]`` is the leaky-ReLU slope.

    Activations are feature-major, the batch padded with zero columns to
    ``bp``, a multiple of :data:`LANES`: zT[i, b] at ``zT + i bp + b``.
    """
    depth = plan[PLAN_DEPTH]
    code = plan[PLAN_ACTIVATION]
    slope = fpar[0]
    bp = padded(nb)
    xs = _ws(plan, WS_XS)
    grad = plan[PLAN_GRAD]
    zeros = (work, _ws(plan, WS_ZEROS))
    scale = 1.0 / nb if plan[PLAN_MEAN] else 1.0
    value = _fused_forward(theta, x, y, idx, nb, plan, fpar, work, scale)
    if not np.isfinite(value):
        return value
    dT = _ws(plan, WS_D0)

    # backward pass: weight and bias gradients, then the error one layer down
    for l in range(depth - 1, -1, -1):
        n, k = _widths(plan, l + 1), _widths(plan, l)

        # dL/dW = dT[:, :nb] a_prev, a_prev sample-major
        a_prev = xs if l == 0 else _ws(plan, WS_LAYERS + WS_PER_LAYER * (l - 1) + 2)
        matmul_rows(
            (work, grad + _w_off(plan, l), k),
            zeros,
            (work, dT, bp, 1),
            (work, a_prev, k),
            n,
            k,
            nb,
        )

        # dL/db = row sums of dT (its padding columns are zero)
        _row_sums(work, grad + _b_off(plan, l), dT, bp, n, bp)

        # dT_prev = (W^T dT) * sigma'(zT_prev)
        if l > 0:
            nxt = _ws(plan, WS_D1 if (depth - l) % 2 == 1 else WS_D0)
            zp = _ws(plan, WS_LAYERS + WS_PER_LAYER * (l - 1))
            WT = (theta, _w_off(plan, l), 1, k)
            matmul_rows((work, nxt, bp), zeros, WT, (work, dT, bp), k, bp, n)
            _derivative(work, nxt, zp, k * bp, code, slope)
            dT = nxt
    return value


@njit(**JIT)
def fused_loss(theta, x, y, n_rows, plan, fpar, work):
    """Summed loss over the ``n_rows`` rows of x and y (flat), by batches.

    Runs the forward pass of :func:`fused_gradient` on consecutive batches of
    ``plan[PLAN_BATCH]`` rows; the caller applies the mean reduction.
    """
    batch = plan[PLAN_BATCH]
    rows = np.arange(n_rows)
    total = 0.0
    for start in range(0, n_rows, batch):
        nb = min(batch, n_rows - start)
        total += _fused_forward(theta, x, y, rows[start:], nb, plan, fpar, work, 1.0)
    return total


def gradient_offset(plan):
    """Where the gradient kernels leave the gradient in their workspace."""
    return int(plan[PLAN_GRAD])


# -- elementwise kernels ----------------------------------------------------------


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
        # zero * v keeps NaN and the sign of zero; zero has a's dtype, so that
        # float32 stays float32 and the loop vectorizes
        zero = a.dtype.type(0.0)
        for p in range(m):
            for i in range(n):
                v = z[p * n + i] + b[i]
                z[p * n + i] = v
                a[p * n + i] = v if v > 0 else zero * v
    else:
        for p in range(m):
            for i in range(n):
                v = z[p * n + i] + b[i]
                z[p * n + i] = v
                a[p * n + i] = act(code, v, slope)


@njit(**JIT)
def _column_sums_start(out, n, accumulate):
    # Bias gradients start at zero unless they accumulate over blocks.
    if not accumulate:
        for i in range(n):
            out[i] = 0.0


@njit(**JIT)
def times_derivative(d, z, m, n, code, slope, gb, accumulate):
    """d *= sigma'(z) over (m, n) row-major blocks; gb[i] (+)= sum_p d[p, i].

    The column sums of the result are the bias gradients of the layer below.
    """
    _column_sums_start(gb, n, accumulate)
    zero = d.dtype.type(0.0)
    for p in range(m):
        r = p * n
        if code == RELU:
            for i in range(n):
                v = d[r + i] if z[r + i] > 0 else zero * d[r + i]
                d[r + i] = v
                gb[i] += v
        else:
            for i in range(n):
                v = d[r + i] * dact(code, z[r + i], slope)
                d[r + i] = v
                gb[i] += v


@njit(**JIT)
def loss_rows(z, y, eps, m, n, loss, scale, gb, accumulate):
    """Loss of m samples (rows of z, y) and eps = scale dL/dz; returns the loss.

    Also gb[i] (+)= sum_p eps[p, i], the bias gradient of the output layer.
    """
    _column_sums_start(gb, n, accumulate)
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
        for i in range(n):
            gb[i] += eps[r + i]
    return scale * total


@njit(**JIT)
def update(theta, new, grad, n, kind, rate):
    """new = theta - step: step = rate[0] grad, rate * grad, or ``new`` itself.

    For a dense tensor the caller has already written R grad into ``new``.
    Whole vectors first, then the entries left over.
    """
    full = n - n % LANES
    if kind == UPDATE_SCALAR:
        c = rate[0]
        for m in range(0, full, LANES):
            _step_lanes(new, theta, grad, c, rate, m, False)
        for m in range(full, n):
            new[m] = theta[m] - c * grad[m]
    elif kind == UPDATE_DIAGONAL:
        for m in range(0, full, LANES):
            _step_lanes(new, theta, grad, 0.0, rate, m, True)
        for m in range(full, n):
            new[m] = theta[m] - rate[m] * grad[m]
    else:
        for m in range(n):
            new[m] = theta[m] - new[m]


# -- BLAS gradient ---------------------------------------------------------------


@njit(**JIT)
def _blas_rows(theta, xb, yb, m, plan, slope, scale, work, part, first):
    """Loss of m rows and their gradient, added to the part's gradient.

    ``scale`` is the reduction's factor (1 or one over the batch size).

    ``xb`` (m, n_0) and ``yb`` (m, n_L) are the rows; matrix products go to
    BLAS (single-threaded inside a part), elementwise work to the kernels
    above.  ``first`` starts the part's gradient instead of adding to it.
    """
    depth = plan[PLAN_DEPTH]
    code = plan[PLAN_ACTIVATION]
    n_out = _widths(plan, depth)
    gpart = part + _ws(plan, BW_GRAD)
    scratch = part + _ws(plan, BW_SCRATCH)

    # forward pass: z = a_prev W^T (BLAS), then bias and sigma
    a_prev = xb
    for l in range(depth):
        n, k = _widths(plan, l + 1), _widths(plan, l)
        w0, b0 = _w_off(plan, l), _b_off(plan, l)
        W = theta[w0 : w0 + n * k].reshape((n, k))
        zo = part + _ws(plan, BW_LAYERS + l)
        ao = part + _ws(plan, BW_LAYERS + depth + l)
        z = work[zo : zo + m * n].reshape((m, n))
        np.dot(a_prev, W.T, z)
        bias_activate(
            work[zo:], theta[b0:], work[ao:], m, n, code, slope, l < depth - 1
        )
        a_prev = work[ao : ao + m * n].reshape((m, n))

    # loss and error factor of the output layer
    zL = part + _ws(plan, BW_LAYERS + depth - 1)
    d = part + _ws(plan, BW_D0)
    other = part + _ws(plan, BW_D1)
    gbL = gpart + _b_off(plan, depth - 1)
    value = loss_rows(
        work[zL:],
        yb,
        work[d:],
        m,
        n_out,
        plan[PLAN_LOSS],
        scale,
        work[gbL:],
        not first,
    )

    # backward pass: dW = delta^T a_prev, then delta_prev = (delta W) *
    # sigma'(z_prev), whose column sums are the bias gradient db of layer l-1
    for l in range(depth - 1, -1, -1):
        n, k = _widths(plan, l + 1), _widths(plan, l)
        w0 = _w_off(plan, l)
        delta = work[d : d + m * n].reshape((m, n))
        if l == 0:
            a_prev = xb
        else:
            ao = part + _ws(plan, BW_LAYERS + depth + l - 1)
            a_prev = work[ao : ao + m * k].reshape((m, k))
        gW = work[gpart + w0 : gpart + w0 + n * k]
        if first:
            np.dot(delta.T, a_prev, gW.reshape((n, k)))
        else:
            tmp = work[scratch : scratch + n * k]
            np.dot(delta.T, a_prev, tmp.reshape((n, k)))
            for q in range(n * k):
                gW[q] += tmp[q]
        if l > 0:
            W = theta[w0 : w0 + n * k].reshape((n, k))
            np.dot(delta, W, work[other : other + m * k].reshape((m, k)))
            zp = part + _ws(plan, BW_LAYERS + l - 1)
            gb = gpart + _b_off(plan, l - 1)
            times_derivative(
                work[other:], work[zp:], m, k, code, slope, work[gb:], not first
            )
            d, other = other, d
    return value


@njit(**JIT)
def blas_part(theta, x, y, idx, nb, plan, fpar, work, p, parts):
    """Loss of part ``p`` of ``parts`` of the batch ``idx[:nb]``, and its gradient.

    Part ``p`` is the range of samples ``p nb // parts .. (p + 1) nb // parts``
    of the batch, computed on one thread (single-threaded BLAS) in blocks of
    at most ``plan[PLAN_BLOCK]`` rows; its gradient is left in the part's
    region of the workspace.  With ``plan[PLAN_GATHER] == 0`` the batch is the
    first ``nb`` rows of ``x``.
    """
    depth = plan[PLAN_DEPTH]
    n0 = _widths(plan, 0)
    n_out = _widths(plan, depth)
    block = plan[PLAN_BLOCK]
    gather = plan[PLAN_GATHER] != 0
    slope = fpar[0]
    scale = 1.0 / nb if plan[PLAN_MEAN] else 1.0
    part = _ws(plan, BW_START) + p * _ws(plan, BW_STRIDE)
    xo = part + _ws(plan, BW_X)
    yo = part + _ws(plan, BW_Y)
    lo = p * nb // parts
    hi = (p + 1) * nb // parts
    value = 0.0
    start = lo
    while start < hi:
        m = min(block, hi - start)

        # the block's rows: gathered, or rows of x in place
        if gather:
            for r in range(m):
                src = idx[start + r]
                for q in range(n0):
                    work[xo + r * n0 + q] = x[src * n0 + q]
                for q in range(n_out):
                    work[yo + r * n_out + q] = y[src * n_out + q]
            xb = work[xo : xo + m * n0].reshape((m, n0))
            yb = work[yo : yo + m * n_out]
        else:
            xb = x[start * n0 : (start + m) * n0].reshape((m, n0))
            yb = y[start * n_out : (start + m) * n_out]
        value += _blas_rows(
            theta, xb, yb, m, plan, slope, scale, work, part, start == lo
        )
        start += m
    return value


def part_gradient_offsets(plan):
    """Workspace offset of part 0's gradient and the distance between parts."""
    return (
        int(plan[PLAN_HEADER + 3 * plan[PLAN_DEPTH] + 1 + BW_START])
        + int(plan[PLAN_HEADER + 3 * plan[PLAN_DEPTH] + 1 + BW_GRAD]),
        int(plan[PLAN_HEADER + 3 * plan[PLAN_DEPTH] + 1 + BW_STRIDE]),
    )


# -- C entry points --------------------------------------------------------------
# Each kernel above has a C entry point taking raw pointers and sizes, compiled
# as a cfunc once per dtype on first use; the Cython loop calls them through
# their addresses (see :func:`addresses`).


def _c_fused_gradient(theta_p, x_p, y_p, idx_p, nb, plan_p, fpar_p, work_p):
    depth = carray(plan_p, (PLAN_HEADER,))[PLAN_DEPTH]
    plan = carray(plan_p, (plan_length(depth),))
    n_samples = plan[PLAN_N_SAMPLES]
    theta = carray(theta_p, (plan[PLAN_N_PARAMS],))
    x = carray(x_p, (n_samples * plan[PLAN_HEADER],))
    y = carray(y_p, (n_samples * plan[PLAN_HEADER + depth],))
    idx = carray(idx_p, (nb,))
    fpar = carray(fpar_p, (1,))
    work = carray(work_p, (plan[PLAN_WORK],))
    return fused_gradient(theta, x, y, idx, nb, plan, fpar, work)


def _c_blas_part(theta_p, x_p, y_p, idx_p, nb, plan_p, fpar_p, work_p, p, parts):
    depth = carray(plan_p, (PLAN_HEADER,))[PLAN_DEPTH]
    plan = carray(plan_p, (plan_length(depth),))
    n_samples = plan[PLAN_N_SAMPLES]
    theta = carray(theta_p, (plan[PLAN_N_PARAMS],))
    x = carray(x_p, (n_samples * plan[PLAN_HEADER],))
    y = carray(y_p, (n_samples * plan[PLAN_HEADER + depth],))
    idx = carray(idx_p, (nb,))
    fpar = carray(fpar_p, (1,))
    work = carray(work_p, (plan[PLAN_WORK],))
    return blas_part(theta, x, y, idx, nb, plan, fpar, work, p, parts)


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
    gradient = f64(ptr, ptr, ptr, iptr, i64, iptr, dptr, ptr)
    return {
        "fused": (_c_fused_gradient, gradient),
        "blas": (
            _c_blas_part,
            f64(ptr, ptr, ptr, iptr, i64, iptr, dptr, ptr, i64, i64),
        ),
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
