"""Allocation-free scans used when validating arrays at the public boundary."""

from cython cimport floating


cdef bint _all_finite(const floating[::1] x) noexcept nogil:
    cdef Py_ssize_t i, n = x.shape[0]
    cdef floating v
    for i in range(n):
        v = x[i]
        # x - x is 0 for a finite number and NaN for NaN or +-inf.
        if v - v != 0:
            return False
    return True


def all_finite(const floating[::1] x):
    """True when every entry of the contiguous 1-D array ``x`` is finite.

    Equivalent to ``np.isfinite(x).all()`` without the temporary boolean array.
    """
    cdef bint ok
    with nogil:
        ok = _all_finite(x)
    return ok
