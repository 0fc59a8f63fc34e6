"""Every CUDA kernel compiles to PTX for a real GPU, in float32 and float64.

The CUDA simulator runs kernels as Python, so it cannot catch what only the CUDA
compiler rejects (types it cannot unify, shared-array shapes that are not
constants).  This test compiles each kernel for compute capability 9.0 in a
fresh interpreter without the simulator.  It needs numba-cuda's compiler
(NVVM, e.g. ``pip install "numba-cuda[cu12]"``) but no GPU, and is skipped
where NVVM is missing.  Run as a script, this file does the compilation.
"""

import os
import subprocess
import sys

import pytest

#: Compute capability the kernels are compiled for.
CC = (9, 0)


def _signatures():
    # (name, kernel, argument types) of every kernel, per dtype.
    import numpy as np
    from numba import types

    from fastntk.kernels import cuda as kernels

    def arr(dt, nd, layout="A"):
        return types.Array(dt, nd, layout)

    i64, f64, b1 = types.int64, types.float64, types.boolean
    flag = arr(types.int32, 1)
    out = []
    for dt in (types.float32, types.float64):
        A1, A2, A3, A4 = (arr(dt, n) for n in (1, 2, 3, 4))
        C2 = arr(dt, 2, "C")
        code = np.dtype(str(dt)).str
        out += [
            ("activation", kernels._activation_k, (A1, i64, f64, A1, b1)),
            (
                "gemm 64x64",
                kernels._gemm_kernel(code, *kernels.GEMM_SMALL),
                (A2, A2, A2, b1, b1),
            ),
            (
                "gemm 128x128",
                kernels._gemm_kernel(code, *kernels.GEMM_LARGE),
                (C2, C2, C2, b1, b1),
            ),
            ("bias_activate", kernels._bias_activate_k, (A2, A1, A2, i64, f64, b1)),
            ("scale_dact", kernels._scale_dact_k, (A3, A2, i64, f64)),
            ("eye", kernels._eye_k, (A3,)),
            (
                "combine_full",
                kernels._combine_full_k,
                (A4, A2, A2, f64, f64, b1, b1, b1),
            ),
            (
                "combine_diagonal",
                kernels._combine_diagonal_k,
                (A3, A2, A2, f64, f64, b1, b1, b1),
            ),
            (
                "combine_trace",
                kernels._combine_trace_k,
                (A2, A2, A2, f64, f64, b1, b1, f64, b1),
            ),
            ("mirror_full", kernels._mirror_full_k, (A4, A4)),
            ("mirror_diagonal", kernels._mirror_diagonal_k, (A3, A3)),
            ("mirror_trace", kernels._mirror_trace_k, (A2, A2)),
            ("fill_jacobian", kernels._fill_jacobian_k, (A2, A3, A2, i64, i64)),
            ("scale_columns", kernels._scale_columns_k, (A2, A1, A2)),
            ("loss_error", kernels._loss_error_k, (A2, A2, i64, f64, A2, arr(f64, 1))),
            ("column_sums", kernels._column_sums_k, (A2, A1)),
            ("update", kernels._update_k, (A1, A1, A1, A1, flag)),
            ("update_dense", kernels._update_dense_k, (A1, A1, A1, flag)),
            ("gather_rows", kernels._gather_rows_k, (A2, arr(i64, 1), A2)),
            ("count_nonfinite", kernels._count_nonfinite_k, (A2, arr(i64, 1))),
        ]
    out.append(
        (
            "reduce_loss",
            kernels._reduce_kernel(256),
            (arr(f64, 1), arr(f64, 1), i64, flag),
        )
    )
    return out


def _compile_all():
    # Compile every kernel; print one line per failure.  Exit 3 without NVVM.
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda

    class Device:
        compute_capability = CC

    # device functions are compiled for "the current device": name one
    dispatcher.get_current_device = Device

    def probe(a):
        a[0] = 1.0

    try:
        cuda.compile_ptx(probe, "void(float64[::1])", cc=CC)
    except Exception as exc:  # no NVVM in this installation
        print(f"NVVM unavailable: {exc}")
        return 3
    failures = 0
    for name, kernel, sig in _signatures():
        try:
            cuda.compile_ptx(kernel.py_func, sig, cc=CC)
        except Exception as exc:  # report every kernel, not just the first
            failures += 1
            print(f"FAILED {name} {sig}: {type(exc).__name__}: {exc}")
    print(f"compiled {len(_signatures()) - failures} kernels, {failures} failed")
    return 1 if failures else 0


def test_every_kernel_compiles_to_ptx():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    run = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    if run.returncode == 3:
        pytest.skip("numba-cuda's compiler (NVVM) is not installed")
    assert run.returncode == 0, run.stdout + run.stderr


if __name__ == "__main__":
    sys.exit(_compile_all())
