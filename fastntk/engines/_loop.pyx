"""The training step loop, without the GIL.

Python hands a run of steps to :func:`run_steps`, with the parameters in two
buffers: each step reads one and writes the other, so the parameters before
the last step stay available when a loss turns out not to be finite.  Each
step calls two compiled kernels through their C addresses (see
:mod:`fastntk.kernels.cpu_step`): a gradient kernel, which returns the loss of
the step's batch and leaves its gradient in the workspace, and the update
theta - lr lambda g; a dense learning-rate tensor is applied by BLAS first.
"""

from libc.math cimport NAN, isfinite
from libc.stdint cimport int64_t, uintptr_t
from scipy.linalg cimport cython_blas as blas

from cython cimport floating

# C signatures of the kernels; floating arrays travel as void pointers, so one
# signature serves float32 and float64.
ctypedef double (*gradient_t)(
    void*, const void*, const void*, const int64_t*, int64_t, const int64_t*,
    const double*, void*) noexcept nogil
ctypedef void (*update_t)(
    void*, void*, void*, int64_t, int64_t, void*, int64_t) noexcept nogil

# Plan entries and update kinds (see fastntk.kernels.cpu_step.make_plan).
cdef enum:
    PLAN_UPDATE = 4
    PLAN_N_PARAMS = 5
    PLAN_GRAD = 9
    UPDATE_DENSE = 2


cdef inline void _dense_step(floating* rate, floating* grad, floating* out,
                             int n) noexcept nogil:
    # out = R grad for a symmetric R (row- and column-major agree), by BLAS.
    cdef char trans = c"N"
    cdef int inc = 1
    cdef floating one = 1.0, zero = 0.0
    if floating is double:
        blas.dgemv(&trans, &n, &n, &one, rate, &n, grad, &inc, &zero, out, &inc)
    else:
        blas.sgemv(&trans, &n, &n, &one, rate, &n, grad, &inc, &zero, out, &inc)


def run_steps(uintptr_t gradient_kernel, uintptr_t update_kernel,
              floating[::1] cur, floating[::1] nxt, const floating[::1] x,
              const floating[::1] y, const int64_t[::1] order,
              const int64_t[::1] starts, const int64_t[::1] sizes,
              const int64_t[::1] plan, const double[::1] fpar,
              floating[::1] rate, floating[::1] work):
    """Run the steps s = 0 .. len(starts) - 1 from the parameters ``cur``.

    Step s uses the samples ``order[starts[s]:starts[s] + sizes[s]]`` (rows of
    ``x`` and ``y``, flat).  The loop stops at the first step whose loss is
    not finite, before its update.

    Returns
    -------
    done : int
        Steps completed.
    last_loss : float
        Loss of the last completed step (NaN if none).
    bad_loss : float or None
        The non-finite loss that stopped the loop, None if none did.
    swapped : bool
        Whether the current parameters ended in ``nxt``.
    """
    cdef gradient_t gradient = <gradient_t>gradient_kernel
    cdef update_t update = <update_t>update_kernel
    cdef int64_t n_steps = starts.shape[0]
    cdef int64_t n = plan[PLAN_N_PARAMS]
    cdef int64_t kind = plan[PLAN_UPDATE]
    cdef int64_t s, done = n_steps
    cdef double value, last = NAN, bad = 0.0
    cdef floating* a = &cur[0]
    cdef floating* b = &nxt[0]
    cdef floating* tmp
    cdef floating* grad = &work[plan[PLAN_GRAD]]
    cdef bint stopped = False
    with nogil:
        for s in range(n_steps):
            # loss and gradient of the step's batch
            value = gradient(a, &x[0], &y[0], &order[starts[s]], sizes[s],
                             &plan[0], &fpar[0], &work[0])
            if not isfinite(value):
                done, bad, stopped = s, value, True
                break

            # update into the other buffer, which becomes the current one
            if kind == UPDATE_DENSE:
                _dense_step(&rate[0], grad, b, <int>n)
            update(a, b, grad, n, kind, &rate[0], rate.shape[0])
            tmp = a
            a = b
            b = tmp
            last = value
    return done, last, (bad if stopped else None), done % 2 == 1
