"""Forward pass and gradient: fast CPU kernels against the NumPy reference.

Workload: P = 1024 samples, widths [64, 512, 512, 10], relu, MSE, float32 and
float64.  JIT compilation happens in ``setup``; its cold cost is tracked apart.
"""

import numpy as np

import fastntk
from fastntk import reference as ref

from ._common import cold_compile_seconds, problem, rel_error

WIDTHS = [64, 512, 512, 10]
P = 1024


class Forward:
    params = (["float32", "float64"],)
    param_names = ["dtype"]

    def setup(self, dtype):
        self.net, self.params_, self.x, self.y = problem(WIDTHS, P, dtype)
        self.net.apply(self.params_, self.x)  # compile, or load from cache

    def time_fast(self, dtype):
        self.net.apply(self.params_, self.x)

    def time_reference(self, dtype):
        ref.apply(self.net, self.params_, self.x)

    def track_rel_error(self, dtype):
        exact = ref.apply(
            self.net, self.params_.astype("float64"), self.x.astype(np.float64)
        )
        return rel_error(self.net.apply(self.params_, self.x), exact)

    track_rel_error.unit = "relative error"


class Gradient:
    params = (["float32", "float64"],)
    param_names = ["dtype"]

    def setup(self, dtype):
        self.net, self.params_, self.x, self.y = problem(WIDTHS, P, dtype)
        self.loss = fastntk.MSE()
        fastntk.gradient(self.net, self.params_, self.x, self.y, self.loss)

    def time_fast(self, dtype):
        fastntk.gradient(self.net, self.params_, self.x, self.y, self.loss)

    def time_reference_backprop(self, dtype):
        # the reference gradient contracts a full Jacobian; this is the plain
        # NumPy backpropagation a user would write, the fair baseline
        _numpy_backprop(self.net, self.params_, self.x, self.y)

    def track_rel_error(self, dtype):
        exact = _numpy_backprop(
            self.net,
            self.params_.astype("float64"),
            self.x.astype(np.float64),
            self.y.astype(np.float64),
        )
        return rel_error(
            fastntk.gradient(self.net, self.params_, self.x, self.y, self.loss), exact
        )

    track_rel_error.unit = "relative error"


def _numpy_backprop(net, params, x, y):
    """MSE gradient by plain NumPy backpropagation (relu network)."""
    acts = [x]
    zs = []
    for W, b in zip(params.weights, params.biases):
        z = acts[-1] @ W.T + b
        zs.append(z)
        acts.append(np.maximum(z, 0))
    delta = zs[-1] - y
    grads = []
    for l in range(net.depth - 1, -1, -1):
        grads.append((delta.T @ acts[l]).ravel())
        grads.append(delta.sum(axis=0))
        if l:
            delta = (delta @ params.weights[l]) * (zs[l - 1] > 0)
    out = []
    for l in range(net.depth):
        out += [grads[2 * (net.depth - 1 - l)], grads[2 * (net.depth - 1 - l) + 1]]
    return np.concatenate(out)


class ColdCompile:
    """First-call cost with an empty numba cache (JIT compilation)."""

    timeout = 600
    number = 1
    repeat = 1

    def track_forward_and_gradient_compile(self):
        setup = (
            "import numpy as np, fastntk\n"
            "net = fastntk.MLP([8, 16, 4])\n"
            "p = net.init(dtype='float64')\n"
            "x = np.ones((5, 8)); y = np.zeros((5, 4))"
        )
        return cold_compile_seconds(
            "net.apply(p, x); fastntk.gradient(net, p, x, y)", setup
        )

    track_forward_and_gradient_compile.unit = "seconds"
