"""Numba options and thread control, in one place.

Every compiled kernel of fastntk takes its options from the dictionaries below, so
that fastmath, caching and parallelism are decided here and nowhere else.

Compiled kernels are cached on disk (``cache=True``).  When the installed package
folder is not writable, set ``NUMBA_CACHE_DIR`` to a writable folder before
importing fastntk; if it is unset and the package folder is read-only, fastntk
points it at a folder under the system's temporary directory.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import tempfile

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
if "NUMBA_CACHE_DIR" not in os.environ and not os.access(_PACKAGE_DIR, os.W_OK):
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), "fastntk-numba-cache"
    )

# Idle OpenMP threads sleep instead of spinning: the compiled kernels alternate
# parallel loops with BLAS calls that run their own threads, and spinning OpenMP
# workers would take the cores those BLAS threads need.  Set before numba starts
# its OpenMP pool; a value chosen by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402

# fastmath stays off: the kernels must propagate NaN and inf faithfully, and the
# tests compare them with a plain NumPy reference to near machine precision.
FASTMATH = False

#: Options of drivers and serial kernels.  Drivers loop over layers and blocks and
#: call BLAS and the parallel kernels below; they have no ``prange`` of their own.
JIT = {"nogil": True, "cache": True, "fastmath": FASTMATH}

#: Options of the parallel kernels (``prange`` loops over samples or tiles).
JIT_PARALLEL = dict(JIT, parallel=True)

#: Options of small helpers inlined into their caller at Numba's level (the
#: register tiles of the training step), so that no call boundary remains.
JIT_INLINE = dict(JIT, inline="always")

#: Options of the CUDA kernels (``numba.cuda.jit``); kernels built per tile
#: configuration at run time are not cached on disk.
CUDA_JIT = {"fastmath": FASTMATH}

#: Samples processed together by the blocked forward and backward passes.
SAMPLE_BLOCK = 256

# The OpenMP threading layer is safe to call from several Python threads at once
# (the work-queue layer aborts the process in that case).
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "omp"


def max_threads() -> int:
    """Largest thread count the compiled kernels can use (numba's pool size)."""
    return int(numba.config.NUMBA_NUM_THREADS)


def check_threads(threads) -> int | None:
    """Validate a ``threads`` argument: None (leave as is) or an integer >= 1."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise TypeError(
            f"threads: expected None or an integer >= 1, received "
            f"{type(threads).__name__} {threads!r}"
        )
    if threads < 1:
        raise ValueError(
            f"threads: expected None or an integer >= 1, received {threads}"
        )
    return int(threads)


@contextlib.contextmanager
def thread_limit(threads):
    """Run a block with ``threads`` numba threads and BLAS threads.

    Numba's thread count is local to the calling Python thread; the BLAS limit is
    process-wide and restored when the block exits, even on an exception.
    ``threads=None`` changes nothing.
    """
    threads = check_threads(threads)
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    n = min(threads, max_threads())
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(previous)
