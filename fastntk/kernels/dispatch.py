"""Choice of the backend that runs a computation: ``"cpu"``, ``"cuda"`` or ``"auto"``.

Every engine takes a ``backend`` argument and asks :func:`resolve_backend` which
kernels to run.  ``"auto"`` picks the GPU only when one is usable and the problem is
large enough for the transfers to pay off.
"""

from __future__ import annotations

import functools

import numpy as np

BACKENDS = ("cpu", "cuda", "auto")

#: Below this many floating-point operations, ``"auto"`` stays on the CPU.
AUTO_GPU_MIN_FLOPS = 1e9


@functools.lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    """(usable, reason): whether numba.cuda can launch kernels here, and why not."""
    try:
        from numba import cuda
    except ImportError as exc:  # numba-cuda missing
        return False, (
            f"numba.cuda could not be imported ({exc}); install the GPU extra with "
            f"pip install 'fastntk[cuda]'"
        )
    try:
        if cuda.is_available():
            return True, ""
    except Exception as exc:  # a broken driver reports itself by raising
        return False, f"numba.cuda found no usable GPU ({exc})"
    return False, (
        "numba.cuda found no usable GPU (no CUDA driver or device on this machine); "
        "use backend='cpu'"
    )


def is_device_array(x) -> bool:
    """Whether ``x`` is a GPU array (numba.cuda, CuPy, or the CUDA simulator's).

    Device arrays expose ``__cuda_array_interface__``; the simulator's stand-ins
    do not, and are recognised by their module.
    """
    if x is None or isinstance(x, np.ndarray):
        return False
    if hasattr(x, "__cuda_array_interface__"):
        return True
    return type(x).__module__.startswith("numba.cuda.simulator")


def device_kind(x) -> str | None:
    """``"cupy"``, ``"numba"`` for device arrays, ``None`` for anything else."""
    if not is_device_array(x):
        return None
    return "cupy" if type(x).__module__.startswith("cupy") else "numba"


def resolve_backend(backend: str, flops: float | None = None) -> str:
    """Return ``"cpu"`` or ``"cuda"`` for a requested backend.

    Parameters
    ----------
    backend : {"cpu", "cuda", "auto"}
    flops : float, optional
        Operation count of the computation, used by ``"auto"``.

    Raises
    ------
    ValueError
        For an unknown backend name.
    RuntimeError
        For ``"cuda"`` when no GPU is usable, saying what is missing.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"backend: expected one of {', '.join(BACKENDS)}, received {backend!r}"
        )
    if backend == "cpu":
        return "cpu"
    usable, reason = cuda_status()
    if backend == "cuda":
        if not usable:
            raise RuntimeError(f"backend='cuda' is not available: {reason}")
        return "cuda"
    if usable and (flops is None or flops >= AUTO_GPU_MIN_FLOPS):
        return "cuda"
    return "cpu"
