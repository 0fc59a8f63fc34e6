"""The NTK engine: fastntk.ntk against the reference and the plain-NumPy formula.

- ``NTKReference``: a small network (widths [16, 32, 32, 2], P = 64), where the
  reference Jacobian contraction with its dense learning-rate matrix is
  affordable: the design's baseline.
- ``NTKWorkloads``: workloads A, B, C of ``compare_ntk.py`` against the
  plain-NumPy per-layer formula, with the numerical error on the pairs of 64
  samples against a float64 Jacobian contraction and the achieved GFLOP/s.
- ``NTKColdCompile``: the first call's JIT compilation, with an empty cache.

JIT compilation happens in ``setup``.
"""

import numpy as np

import fastntk
from fastntk import reference as ref

from ._common import cold_compile_seconds, problem, rel_error
from .compare_ntk import WORKLOADS, exact_block, numpy_ntk


class NTKReference:
    params = (["float32", "float64"], ["full", "trace"])
    param_names = ["dtype", "outputs"]

    def setup(self, dtype, outputs):
        self.net, self.p, self.x, _ = problem([16, 32, 32, 2], 64, dtype)
        fastntk.ntk(self.net, self.p, self.x, outputs=outputs)

    def time_fast(self, dtype, outputs):
        fastntk.ntk(self.net, self.p, self.x, outputs=outputs)

    def time_reference(self, dtype, outputs):
        ref.ntk(self.net, self.p, self.x)

    def track_rel_error(self, dtype, outputs):
        exact = ref.ntk(self.net, self.p.astype("float64"), self.x.astype(np.float64))
        if outputs == "trace":
            exact = np.einsum("abii->ab", exact)
        return rel_error(fastntk.ntk(self.net, self.p, self.x, outputs=outputs), exact)

    track_rel_error.unit = "relative error"


class NTKWorkloads:
    params = (["A", "B", "C"], ["float32", "float64"])
    param_names = ["workload", "dtype"]
    timeout = 300

    def setup(self, workload, dtype):
        spec = WORKLOADS[workload]
        self.outputs = spec["outputs"]
        self.net, self.p, self.x, _ = problem(spec["widths"], spec["P"], dtype)
        fastntk.ntk(self.net, self.p, self.x[:64], outputs=self.outputs)

    def time_fast(self, workload, dtype):
        fastntk.ntk(self.net, self.p, self.x, outputs=self.outputs)

    def time_numpy_formula(self, workload, dtype):
        numpy_ntk(self.net, self.p, self.x, self.outputs)

    def track_gflops(self, workload, dtype):
        import time

        t0 = time.perf_counter()
        fastntk.ntk(self.net, self.p, self.x, outputs=self.outputs)
        seconds = time.perf_counter() - t0
        P = self.x.shape[0]
        return fastntk.ntk_flops(self.net, P, outputs=self.outputs) / seconds / 1e9

    track_gflops.unit = "GFLOP/s"

    def track_rel_error(self, workload, dtype):
        rows = np.arange(64)
        exact = exact_block(self.net, self.p, self.x, rows, self.outputs)
        got = fastntk.ntk(self.net, self.p, self.x[:64], outputs=self.outputs)
        return rel_error(got, exact)

    track_rel_error.unit = "relative error"


class NTKColdCompile:
    """First-call cost with an empty numba cache (JIT compilation)."""

    timeout = 600
    number = 1
    repeat = 1

    def track_ntk_compile(self):
        setup = (
            "import numpy as np, fastntk\n"
            "net = fastntk.MLP([8, 16, 16, 2])\n"
            "p = net.init(dtype='float64')\n"
            "x = np.ones((5, 8))"
        )
        return cold_compile_seconds("fastntk.ntk(net, p, x)", setup)

    track_ntk_compile.unit = "seconds"
