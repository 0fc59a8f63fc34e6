"""The training step loop, without the GIL.

Python hands a run of steps to one of the two loops below, with the parameters
in two buffers: each step reads one and writes the other, so the parameters
before the last step stay available when a loss turns out not to be finite.
The per-step arithmetic is done by compiled kernels called through their C
addresses (see :mod:`fastntk.kernels.cpu_step`) and, in :func:`run_blas`, by
direct BLAS calls.

Both loops stop at the first step whose loss is not finite, before updating
the parameters, and return ``(done, last_loss, bad_loss, swapped)``: the number
of steps completed, the loss of the last completed step (NaN if none), the
non-finite loss that stopped the loop (None if none) and whether the current
parameters ended in the second buffer.
"""

from cython cimport floating
from libc.math cimport NAN, isfinite
from libc.stdint cimport int64_t, uintptr_t
from libc.string cimport memcpy
from scipy.linalg cimport cython_blas as blas

# C signatures of the kernels; floating arrays travel as void pointers, so one
# signature serves float32 and float64.
ctypedef double (*fused_gradient_t)(
    void*, void*, void*, const int64_t*, int64_t, const int64_t*, const double*,
    void*) noexcept nogil
ctypedef void (*bias_activate_t)(
    void*, void*, void*, int64_t, int64_t, int64_t, double, int64_t) noexcept nogil
ctypedef void (*times_derivative_t)(
    void*, void*, int64_t, int64_t, double) noexcept nogil
ctypedef double (*loss_rows_t)(
    void*, void*, void*, int64_t, int64_t, int64_t, double) noexcept nogil
ctypedef void (*column_sums_t)(void*, int64_t, int64_t, void*, int64_t) noexcept nogil
ctypedef void (*update_t)(
    void*, void*, void*, int64_t, int64_t, void*, int64_t) noexcept nogil

# Plan entries and update kinds (see fastntk.kernels.cpu_step.make_plan).
cdef enum:
    PLAN_DEPTH = 0
    PLAN_ACTIVATION = 1
    PLAN_LOSS = 2
    PLAN_MEAN = 3
    PLAN_UPDATE = 4
    PLAN_N_PARAMS = 5
    PLAN_HEADER = 9
    UPDATE_DENSE = 2
    MAX_DEPTH = 64


cdef struct Kernels:
    fused_gradient_t fused_gradient
    bias_activate_t bias_activate
    times_derivative_t times_derivative
    loss_rows_t loss_rows
    column_sums_t column_sums
    update_t update


cdef Kernels _kernels(dict addresses):
    # Function pointers from the addresses of fastntk.kernels.cpu_step.
    cdef Kernels k
    k.fused_gradient = <fused_gradient_t><uintptr_t>addresses["fused_gradient"]
    k.bias_activate = <bias_activate_t><uintptr_t>addresses["bias_activate"]
    k.times_derivative = (
        <times_derivative_t><uintptr_t>addresses["times_derivative"])
    k.loss_rows = <loss_rows_t><uintptr_t>addresses["loss_rows"]
    k.column_sums = <column_sums_t><uintptr_t>addresses["column_sums"]
    k.update = <update_t><uintptr_t>addresses["update"]
    return k


cdef inline void _gemm(char ta, char tb, int m, int n, int k, floating* a,
                       int lda, floating* b, int ldb, floating beta,
                       floating* c, int ldc) noexcept nogil:
    # Column-major C = op(A) op(B) + beta C, float32 or float64.
    cdef floating one = 1.0
    if floating is double:
        blas.dgemm(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc)
    else:
        blas.sgemm(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc)


cdef inline void _dense_step(floating* rate, floating* grad, floating* out,
                             int n) noexcept nogil:
    # out = R grad for a symmetric R (so row- and column-major agree).
    cdef char trans = c"N"
    cdef int inc = 1
    cdef floating one = 1.0, zero = 0.0
    if floating is double:
        blas.dgemv(&trans, &n, &n, &one, rate, &n, grad, &inc, &zero, out, &inc)
    else:
        blas.sgemv(&trans, &n, &n, &one, rate, &n, grad, &inc, &zero, out, &inc)


cdef inline void _update(Kernels* ker, const int64_t* plan, floating* theta,
                         floating* new, floating* grad, floating* rate,
                         int64_t n_rate) noexcept nogil:
    # new = theta - lr lambda grad, through the learning-rate tensor.
    cdef int64_t n = plan[PLAN_N_PARAMS]
    cdef int64_t kind = plan[PLAN_UPDATE]
    if kind == UPDATE_DENSE:
        _dense_step(rate, grad, new, <int>n)
    ker.update(theta, new, grad, n, kind, rate, n_rate)


def run_fused(dict addresses, floating[::1] cur, floating[::1] nxt,
              const floating[::1] x, const floating[::1] y,
              const int64_t[::1] order, const int64_t[::1] starts,
              const int64_t[::1] sizes, const int64_t[::1] plan,
              const double[::1] fpar, floating[::1] rate, floating[::1] work,
              int64_t grad_offset):
    """Steps on the fused kernel: one call per step, then the update.

    Step s uses the samples ``order[starts[s]:starts[s] + sizes[s]]``.
    """
    cdef Kernels ker = _kernels(addresses)
    cdef int64_t n_steps = starts.shape[0]
    cdef int64_t s, done = n_steps
    cdef double value, last = NAN, bad = 0.0
    cdef floating* a = &cur[0]
    cdef floating* b = &nxt[0]
    cdef floating* tmp
    cdef floating* grad = &work[grad_offset]
    cdef bint stopped = False
    with nogil:
        for s in range(n_steps):
            # loss and gradient of the batch
            value = ker.fused_gradient(a, <void*>&x[0], <void*>&y[0],
                                       &order[starts[s]], sizes[s], &plan[0],
                                       &fpar[0], &work[0])
            if not isfinite(value):
                done, bad, stopped = s, value, True
                break

            # update into the other buffer, which becomes the current one
            _update(&ker, &plan[0], a, b, grad, &rate[0], rate.shape[0])
            tmp = a
            a = b
            b = tmp
            last = value
    return done, last, (bad if stopped else None), done % 2 == 1


cdef int64_t _layer_rows(const int64_t* widths, int64_t depth,
                         int64_t* z_off, int64_t* a_off, int64_t block) noexcept:
    # Offsets of each layer's (block, n_l) preactivations and activations.
    cdef int64_t layer, pos = 0
    for layer in range(depth):
        z_off[layer] = pos
        pos += block * widths[layer + 1]
    for layer in range(depth):
        a_off[layer] = pos
        pos += block * widths[layer + 1]
    return pos


def blas_buffer_size(const int64_t[::1] plan, int64_t block):
    """Entries of the buffer :func:`run_blas` needs for blocks of ``block`` rows."""
    cdef int64_t depth = plan[PLAN_DEPTH]
    cdef const int64_t* widths = &plan[PLAN_HEADER]
    cdef int64_t layer, wmax = 0, total = 0
    for layer in range(depth + 1):
        wmax = max(wmax, widths[layer])
        total += widths[layer]
    # preactivations and activations of every layer, the gathered batch, and
    # two error buffers
    return 2 * block * total + 2 * block * wmax + block * widths[0] \
        + block * widths[depth]


def run_blas(dict addresses, floating[::1] cur, floating[::1] nxt,
             const floating[::1] x, const floating[::1] y,
             const int64_t[::1] order, const int64_t[::1] starts,
             const int64_t[::1] sizes, const int64_t[::1] plan,
             const double[::1] fpar, floating[::1] rate, floating[::1] grad,
             floating[::1] buf, int64_t block):
    """Steps on BLAS products and elementwise kernels, ``block`` rows at a time.

    Step s uses the samples ``order[starts[s]:starts[s] + sizes[s]]``, or, when
    ``order`` is empty, the first ``sizes[s]`` rows of ``x`` in order.
    """
    cdef Kernels ker = _kernels(addresses)
    cdef int64_t n_steps = starts.shape[0]
    cdef int64_t depth = plan[PLAN_DEPTH]
    cdef int64_t code = plan[PLAN_ACTIVATION]
    cdef int64_t loss = plan[PLAN_LOSS]
    cdef bint mean = plan[PLAN_MEAN] != 0
    cdef const int64_t* widths = &plan[PLAN_HEADER]
    cdef const int64_t* w_off = &plan[PLAN_HEADER + depth + 1]
    cdef const int64_t* b_off = &plan[PLAN_HEADER + 2 * depth + 1]
    cdef int64_t n0 = widths[0]
    cdef int64_t n_out = widths[depth]
    cdef double slope = fpar[0]
    cdef bint gather = order.shape[0] > 0
    cdef int64_t z_off[MAX_DEPTH]
    cdef int64_t a_off[MAX_DEPTH]
    cdef int64_t s, layer, p, pos, start, m, nb, n, k, wmax = 0, done = n_steps
    cdef double total, scale, last = NAN, bad = 0.0
    cdef floating* a = &cur[0]
    cdef floating* b = &nxt[0]
    cdef floating* tmp
    cdef floating* xb
    cdef floating* yb
    cdef floating* prev
    cdef floating* delta
    cdef floating* other
    cdef floating* base = &buf[0]
    cdef floating* xbuf
    cdef floating* ybuf
    cdef floating* dbuf0
    cdef floating* dbuf1
    cdef floating beta
    cdef bint stopped = False
    if depth > MAX_DEPTH:
        raise ValueError(
            f"depth: at most {MAX_DEPTH} layers are supported, received {depth}")
    for layer in range(depth + 1):
        wmax = max(wmax, widths[layer])
    pos = _layer_rows(widths, depth, z_off, a_off, block)
    xbuf = base + pos
    ybuf = xbuf + block * n0
    dbuf0 = ybuf + block * n_out
    dbuf1 = dbuf0 + block * wmax

    with nogil:
        for s in range(n_steps):
            nb = sizes[s]
            scale = 1.0 / nb if mean else 1.0
            total = 0.0
            start = 0
            while start < nb:
                m = min(block, nb - start)

                # the block's samples: gathered rows, or rows of x in place
                if gather:
                    for p in range(m):
                        memcpy(xbuf + p * n0, &x[order[starts[s] + start + p] * n0],
                               n0 * sizeof(floating))
                        memcpy(ybuf + p * n_out,
                               &y[order[starts[s] + start + p] * n_out],
                               n_out * sizeof(floating))
                    xb = xbuf
                    yb = ybuf
                else:
                    xb = <floating*>&x[start * n0]
                    yb = <floating*>&y[start * n_out]

                # forward pass: z = a_prev W^T (BLAS), then bias and sigma
                prev = xb
                for layer in range(depth):
                    n, k = widths[layer + 1], widths[layer]
                    _gemm(c"T", c"N", <int>n, <int>m, <int>k, a + w_off[layer], <int>k,
                          prev, <int>k, 0.0, base + z_off[layer], <int>n)
                    ker.bias_activate(base + z_off[layer], a + b_off[layer],
                                      base + a_off[layer], m, n, code, slope,
                                      layer < depth - 1)
                    prev = base + a_off[layer]

                # loss and error factor of the output layer
                delta = dbuf0
                other = dbuf1
                total += ker.loss_rows(base + z_off[depth - 1], yb, delta, m,
                                       n_out, loss, scale)

                # backward pass: dW = delta^T a_prev, db = column sums of delta,
                # delta_prev = (delta W) * sigma'(z_prev)
                beta = 0.0 if start == 0 else 1.0
                for layer in range(depth - 1, -1, -1):
                    n, k = widths[layer + 1], widths[layer]
                    prev = xb if layer == 0 else base + a_off[layer - 1]
                    _gemm(c"N", c"T", <int>k, <int>n, <int>m, prev, <int>k, delta,
                          <int>n, beta, &grad[w_off[layer]], <int>k)
                    ker.column_sums(delta, m, n, &grad[b_off[layer]], start > 0)
                    if layer > 0:
                        _gemm(c"N", c"N", <int>k, <int>m, <int>n, a + w_off[layer],
                              <int>k, delta, <int>n, 0.0, other, <int>k)
                        ker.times_derivative(other, base + z_off[layer - 1], m * k,
                                             code, slope)
                        tmp = delta
                        delta = other
                        other = tmp
                start += block
            if not isfinite(total):
                done, bad, stopped = s, total, True
                break

            # update into the other buffer, which becomes the current one
            _update(&ker, &plan[0], a, b, &grad[0], &rate[0], rate.shape[0])
            tmp = a
            a = b
            b = tmp
            last = total
    return done, last, (bad if stopped else None), done % 2 == 1
