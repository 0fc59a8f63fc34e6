"""Checks of user input at the public boundary.

Every public function of fastntk validates and coerces its arguments here, once,
before any work starts; the compiled kernels behind it assume clean input: a
floating dtype shared by all arrays, C-contiguous layout, finite values and
consistent shapes.  Each message names the argument, what was expected, what was
received and, where it helps, how to fix it.
"""

from __future__ import annotations

import numbers

import numpy as np

from fastntk._checks import all_finite

#: The floating dtypes the kernels are compiled for.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_dtype(name: str, dtype) -> np.dtype:
    """Return ``dtype`` as a NumPy dtype if it is float32 or float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"{name}: expected 'float32' or 'float64', received {dtype!r}"
        ) from None
    if dt not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: expected dtype float32 or float64, received {dt}; "
            f"convert with .astype(np.float64) (or float32)"
        )
    return dt


def as_array(
    name: str,
    value,
    *,
    ndim: int | None = None,
    dtype=None,
    finite: bool = True,
) -> np.ndarray:
    """Coerce ``value`` to a C-contiguous floating array after checking it.

    Parameters
    ----------
    name : str
        Argument name used in error messages.
    value : array_like
        The user's input.  Lists are accepted; integer, boolean, complex and
        float16 arrays are rejected rather than silently converted.
    ndim : int, optional
        Required number of dimensions.
    dtype : dtype, optional
        Required dtype (that of the parameters, say).  Without it the array's own
        dtype must be float32 or float64.
    finite : bool
        Reject NaN and inf.
    """
    arr = np.asarray(value)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(
            f"{name}: expected a float32 or float64 array, received dtype {arr.dtype}"
        )
    if isinstance(value, (list, tuple)) and np.issubdtype(arr.dtype, np.integer):
        # Plain Python numbers: take them as the requested floating type.
        arr = arr.astype(dtype if dtype is not None else np.float64)
    if arr.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: expected dtype float32 or float64, received {arr.dtype}; "
            f"convert with .astype(np.float64) (or float32)"
        )
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise TypeError(
            f"{name}: expected dtype {np.dtype(dtype)} (the parameters' dtype), "
            f"received {arr.dtype}; mixing float32 and float64 is not supported, "
            f"convert with .astype(np.{np.dtype(dtype)})"
        )
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-D array, received {arr.ndim}-D array "
            f"with shape {arr.shape}"
        )
    arr = np.ascontiguousarray(arr)
    if finite and arr.size and not all_finite(arr.reshape(-1)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(
            f"{name}: expected finite values, received {bad} NaN or inf "
            f"entr{'y' if bad == 1 else 'ies'} in an array of shape {arr.shape}"
        )
    return arr


def as_samples(name: str, x, n_in: int, dtype) -> np.ndarray:
    """Validate a sample matrix of shape (P, n_in) with P >= 1."""
    x = as_array(name, x, ndim=2, dtype=dtype)
    if x.shape[1] != n_in:
        raise ValueError(
            f"{name}: expected shape (P, {n_in}) to match the network's input "
            f"width {n_in}, received shape {x.shape}"
        )
    if x.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one sample, received 0")
    return x


def as_targets(name: str, y, n_samples: int, n_out: int, dtype) -> np.ndarray:
    """Validate targets of shape (P, n_out) matching the samples."""
    y = as_array(name, y, ndim=2, dtype=dtype)
    if y.shape != (n_samples, n_out):
        raise ValueError(
            f"{name}: expected shape ({n_samples}, {n_out}) (one row per sample, "
            f"one column per network output), received shape {y.shape}"
        )
    return y


def check_nonnegative(name: str, value) -> float:
    """A finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number >= 0, received {value!r}")
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, received {value}")
    return value


def check_positive(name: str, value) -> float:
    """A finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number > 0, received {value!r}")
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, received {value}")
    return value


def check_int(name: str, value, minimum: int) -> int:
    """An integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name}: expected an integer >= {minimum}, received "
            f"{type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, received {value}")
    return int(value)


def per_layer(name: str, value, depth: int, *, positive: bool = False) -> np.ndarray:
    """A scalar or one value per layer, as a float64 array of length ``depth``."""
    check = check_positive if positive else check_nonnegative
    if np.ndim(value) == 0:
        return np.full(
            depth,
            check(name, value if not isinstance(value, np.generic) else value.item()),
        )
    seq = list(np.asarray(value, dtype=object).reshape(-1))
    if np.ndim(value) != 1 or len(seq) != depth:
        raise ValueError(
            f"{name}: expected a scalar or a sequence of {depth} values (one per "
            f"layer), received shape {np.shape(value)}"
        )
    return np.array(
        [
            check(f"{name}[{i}]", v.item() if isinstance(v, np.generic) else v)
            for i, v in enumerate(seq)
        ],
        dtype=np.float64,
    )
