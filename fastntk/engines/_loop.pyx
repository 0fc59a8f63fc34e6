"""The training step loop, without the GIL.

The module also draws the shuffles of stochastic gradient descent
(:func:`permutations`).

Python hands a run of steps to :func:`run_steps` (one thread) or
:func:`run_parts` (a team of threads), with the parameters in two buffers:
each step reads one and writes the other, so the parameters before the last
step stay available when a loss turns out not to be finite.  Each step calls
compiled kernels through their C addresses (see
:mod:`fastntk.kernels.cpu_step`): a gradient kernel, which returns the loss of
the step's batch (or of one part of it) and leaves its gradient in the
workspace, and the update theta - lr lambda g; a dense learning-rate tensor is
applied by BLAS first.

:func:`run_parts` starts its threads once per run of steps, not once per
step: waking sleeping threads costs tens of microseconds on some machines,
as much as a whole step of a small network.  Within the run the threads meet
at barriers that spin briefly before yielding the processor.
"""

cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_GetPointer
from cython.parallel cimport parallel, threadid
from libc.math cimport NAN, isfinite
from libc.stdint cimport int64_t, uintptr_t
from libc.stdlib cimport free, malloc
from numpy.random cimport bitgen_t
from numpy.random.c_distributions cimport random_interval
from scipy.linalg cimport cython_blas as blas

import numpy as np

from cython cimport floating

cdef extern from *:
    """
    #include <sched.h>
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTNTK_TEAM_SIZE() omp_get_num_threads()
    #else
    #define FASTNTK_TEAM_SIZE() 1
    #endif
    #if defined(__x86_64__) || defined(__i386__)
    #include <immintrin.h>
    #define FASTNTK_RELAX() _mm_pause()
    #else
    #define FASTNTK_RELAX() ((void)0)
    #endif

    /* A reusable barrier for a team of `size` threads: the last thread to
       arrive resets the count and advances the generation the others wait
       on.  Waiting spins for a few microseconds, then yields the processor
       at each check, so that an oversubscribed machine still makes progress. */
    typedef struct { int count; int generation; } fastntk_barrier;

    static void fastntk_barrier_wait(fastntk_barrier *b, int size) {
        int gen = __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE);
        long spins = 0;
        if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == size) {
            __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&b->generation, gen + 1, __ATOMIC_RELEASE);
            return;
        }
        while (__atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) == gen) {
            if (++spins < 20000) FASTNTK_RELAX(); else sched_yield();
        }
    }
    """
    ctypedef struct fastntk_barrier:
        int count
        int generation
    void fastntk_barrier_wait(fastntk_barrier* b, int size) noexcept nogil
    int FASTNTK_TEAM_SIZE() noexcept nogil

# C signatures of the kernels; floating arrays travel as void pointers, so one
# signature serves float32 and float64.
ctypedef double (*gradient_t)(
    void*, const void*, const void*, const int64_t*, int64_t, const int64_t*,
    const double*, void*) noexcept nogil
ctypedef double (*part_t)(
    void*, const void*, const void*, const int64_t*, int64_t, const int64_t*,
    const double*, void*, int64_t, int64_t) noexcept nogil
ctypedef void (*update_t)(
    void*, void*, void*, int64_t, int64_t, void*, int64_t) noexcept nogil

# Plan entries and update kinds (see fastntk.kernels.cpu_step.make_plan).
cdef enum:
    PLAN_UPDATE = 4
    PLAN_N_PARAMS = 5
    PLAN_GRAD = 9
    UPDATE_DENSE = 2


cdef inline void _dense_rows(floating* rate, floating* grad, floating* out,
                             int n, int lo, int hi) noexcept nogil:
    # out[lo:hi] = (R grad)[lo:hi] for a symmetric n x n R, by BLAS.  Read
    # column-major, the rows of R are its columns: rows lo..hi-1 of R grad are
    # the product of the m x n block that starts at entry lo, leading
    # dimension n, with grad.
    cdef char trans = c"N"
    cdef int inc = 1, m = hi - lo
    cdef floating one = 1.0, zero = 0.0
    if m <= 0:
        return
    if floating is double:
        blas.dgemv(&trans, &m, &n, &one, rate + lo, &n, grad, &inc, &zero,
                   out + lo, &inc)
    else:
        blas.sgemv(&trans, &m, &n, &one, rate + lo, &n, grad, &inc, &zero,
                   out + lo, &inc)


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
                _dense_rows(&rate[0], grad, b, <int>n, 0, <int>n)
            update(a, b, grad, n, kind, &rate[0], rate.shape[0])
            tmp = a
            a = b
            b = tmp
            last = value
    return done, last, (bad if stopped else None), done % 2 == 1


cdef inline int64_t _split(int64_t n, int64_t t, int64_t size) noexcept nogil:
    # Start of thread t's range of n entries, on a multiple of 16 entries.
    if t >= size:
        return n
    return min(n, ((n * t // size) // 16) * 16)


cdef void _member(int t, int size, part_t kernel, update_t update,
                  floating* a, floating* b, const floating* x,
                  const floating* y, const int64_t* order,
                  const int64_t* starts, const int64_t* sizes, int64_t n_steps,
                  const int64_t* plan, const double* fpar, floating* rate,
                  int64_t n_rate, floating* work, int64_t parts,
                  int64_t part_grad, int64_t part_stride,
                  fastntk_barrier* barrier, double* losses,
                  int64_t* done, double* values) noexcept nogil:
    # The steps as seen by thread t of a team of `size` threads.
    cdef int64_t n = plan[PLAN_N_PARAMS]
    cdef int64_t kind = plan[PLAN_UPDATE]
    cdef floating* grad = work + plan[PLAN_GRAD]
    cdef int64_t lo = _split(n, t, size), hi = _split(n, t + 1, size)
    cdef int64_t s, p, q, used, nb, k = 0
    cdef double total
    cdef floating* g
    cdef floating* tmp
    if n_rate > 1:
        k = lo
    for s in range(n_steps):
        # the parts of the batch, part p on thread p modulo the team size
        nb = sizes[s]
        used = min(parts, nb)
        p = t
        while p < used:
            losses[p] = kernel(a, x, y, order + starts[s], nb, plan, fpar,
                               work, p, used)
            p += size
        fastntk_barrier_wait(barrier, size)

        # every thread adds the losses in the same order: one decision
        total = 0.0
        for p in range(used):
            total += losses[p]
        if not isfinite(total):
            if t == 0:
                done[0] = s
                values[1] = total
            return

        # the gradient over this thread's range, summed in part order
        for q in range(lo, hi):
            grad[q] = work[part_grad + q]
        for p in range(1, used):
            g = work + part_grad + p * part_stride
            for q in range(lo, hi):
                grad[q] += g[q]

        # the update of the range, into the other buffer
        if kind == UPDATE_DENSE:
            fastntk_barrier_wait(barrier, size)
            _dense_rows(rate, grad, b, <int>n, <int>lo, <int>hi)
        if hi > lo:
            update(a + lo, b + lo, grad + lo, hi - lo, kind, rate + k,
                   n_rate - k)
        fastntk_barrier_wait(barrier, size)
        tmp = a
        a = b
        b = tmp
        if t == 0:
            values[0] = total


def run_parts(uintptr_t part_kernel, uintptr_t update_kernel,
              floating[::1] cur, floating[::1] nxt, const floating[::1] x,
              const floating[::1] y, const int64_t[::1] order,
              const int64_t[::1] starts, const int64_t[::1] sizes,
              const int64_t[::1] plan, const double[::1] fpar,
              floating[::1] rate, floating[::1] work, int64_t parts,
              int64_t part_grad, int64_t part_stride, int threads):
    """:func:`run_steps` with each batch cut into parts computed in parallel.

    ``part_kernel`` computes the loss of part p of ``parts`` of a batch and
    leaves its gradient at ``part_grad + p * part_stride`` in ``work``.  A
    team of at most ``threads`` threads runs the whole run of steps: in each
    step the threads compute the parts (part p on thread p modulo the team
    size), then each thread sums the parts' gradients, in part order, over its
    own range of parameters into the gradient at ``plan[PLAN_GRAD]`` and
    updates that range.  The sums do not depend on the team size, so the
    result depends only on ``parts``.

    Returns what :func:`run_steps` returns.
    """
    cdef int64_t n_steps = starts.shape[0]
    cdef int64_t done = n_steps
    cdef double values[2]
    cdef fastntk_barrier barrier
    cdef double* losses = <double*>malloc(max(parts, 1) * sizeof(double))
    if losses == NULL:
        raise MemoryError("run_parts: could not allocate the losses of the parts")
    barrier.count = 0
    barrier.generation = 0
    values[0] = NAN
    values[1] = 0.0
    with nogil, parallel(num_threads=max(threads, 1)):
        _member(threadid(), FASTNTK_TEAM_SIZE(), <part_t>part_kernel,
                <update_t>update_kernel, &cur[0], &nxt[0], &x[0], &y[0],
                &order[0], &starts[0], &sizes[0], n_steps, &plan[0], &fpar[0],
                &rate[0], rate.shape[0], &work[0], parts, part_grad,
                part_stride, &barrier, losses, &done, values)
    free(losses)
    return done, values[0], (values[1] if done < n_steps else None), done % 2 == 1


def permutations(bit_generator, int64_t n, int64_t count):
    """``count`` successive shuffles of ``range(n)`` drawn from ``bit_generator``.

    Row e of the (count, n) int64 result is what
    ``numpy.random.Generator(bit_generator).permutation(n)`` would return as
    its e-th call: the same Fisher-Yates shuffle (the entry swapped into place
    i, for i = n - 1 down to 1, drawn by numpy's ``random_interval``), run in
    C instead of one NumPy call per shuffle.  The caller holds the bit
    generator's lock.
    """
    cdef bitgen_t* rng = <bitgen_t*>PyCapsule_GetPointer(
        bit_generator.capsule, "BitGenerator")
    out = np.empty((count, n), dtype=np.int64)
    cdef int64_t[:, ::1] perm = out
    cdef int64_t e, i, j, t
    with nogil:
        for e in range(count):
            for i in range(n):
                perm[e, i] = i
            for i in range(n - 1, 0, -1):
                j = <int64_t>random_interval(rng, <cnp.uint64_t>i)
                t = perm[e, j]
                perm[e, j] = perm[e, i]
                perm[e, i] = t
    return out
