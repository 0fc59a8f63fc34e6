"""Theory toolkit: infinite-width kernels, Taylor-mode derivatives, one-step
predictions, ensembles and linearized dynamics.

Each timed operation has its accuracy tracked beside it (quadrature against the
closed forms, Taylor-mode against the Jacobian-vector product, the two forms of
the loss change against each other).  JIT compilation happens in ``setup``; its
cold cost is tracked in :class:`TheoryColdCompile`.
"""

import numpy as np

import fastntk
from fastntk import reference as ref
from fastntk import theory

from ._common import cold_compile_seconds, rel_error


def _samples(P, n0, seed=0):
    return np.random.default_rng(seed).standard_normal((P, n0))


class InfiniteWidth:
    """K^(l), Theta^(l) for P = 128 samples (8256 pairs) and depth 4."""

    params = (["closed", "quadrature", "hermite"],)
    param_names = ["method"]

    def setup(self, method):
        self.x = _samples(128, 16)
        self.kw = dict(depth=4, activation="erf", C_b=0.1, C_W=1.5)
        theory.infinite_kernels(self.x[:4], method=method, **self.kw)  # compile

    def time_erf_kernels(self, method):
        theory.infinite_kernels(self.x, method=method, **self.kw)

    def track_rel_error_vs_closed_form(self, method):
        exact = theory.infinite_kernels(self.x, method="closed", **self.kw)
        got = theory.infinite_kernels(self.x, method=method, **self.kw)
        return rel_error(got.Theta, exact.Theta)

    track_rel_error_vs_closed_form.unit = "relative error"


class InfiniteWidthTanh:
    """Quadrature-only activation: tanh, P = 64, depth 4."""

    def setup(self):
        self.x = _samples(64, 16)
        theory.infinite_kernels(self.x[:2], depth=2, activation="tanh")

    def time_tanh_kernels(self):
        theory.infinite_kernels(self.x, depth=4, activation="tanh", C_W=1.5)

    def track_rel_change_12_to_20_points(self):
        a = theory.infinite_kernels(self.x, depth=4, activation="tanh", C_W=1.5)
        b = theory.infinite_kernels(
            self.x, depth=4, activation="tanh", C_W=1.5, points=20
        )
        return rel_error(a.Theta, b.Theta)

    track_rel_change_12_to_20_points.unit = "relative error"


class TaylorMode:
    """Outputs and three directional derivatives, widths [64, 512, 512, 10],
    P = 256, against one forward pass of the same network."""

    def setup(self):
        self.net = fastntk.MLP([64, 512, 512, 10], activation="tanh", C_W=1.0)
        self.params_ = self.net.init(seed=0)
        self.x = _samples(256, 64)
        self.v = np.random.default_rng(1).standard_normal(self.net.n_params) * 1e-2
        theory.directional_derivatives(self.net, self.params_, self.x, self.v)

    def time_order_3(self):
        theory.directional_derivatives(self.net, self.params_, self.x, self.v)

    def time_order_1(self):
        theory.directional_derivatives(self.net, self.params_, self.x, self.v, 1)

    def time_forward_pass(self):
        self.net.apply(self.params_, self.x)

    def track_rel_error_d1_vs_jacobian(self):
        x = self.x[:4]
        d = theory.directional_derivatives(self.net, self.params_, x, self.v, 1)
        jvp = fastntk.jacobian(self.net, self.params_, x) @ self.v
        return rel_error(d[1], jvp)

    track_rel_error_d1_vs_jacobian.unit = "relative error"


class OneStepPredictions:
    """Kernel, Taylor terms and the real step for P = 64 training and 32 test
    samples, widths [16, 256, 256, 4]."""

    def setup(self):
        rng = np.random.default_rng(0)
        self.net = fastntk.MLP([16, 256, 256, 4], activation="tanh", C_W=1.0)
        self.params_ = self.net.init(seed=0)
        self.x = rng.standard_normal((64, 16))
        self.y = rng.standard_normal((64, 4))
        self.x_test = rng.standard_normal((32, 16))
        self.step = theory.OneStep(self.net, self.params_, self.x, self.y, loss="mse")
        self.step.output_change(1e-3, self.x_test, order=3)

    def time_loss_change(self):
        step = theory.OneStep(self.net, self.params_, self.x, self.y, loss="mse")
        step.loss_change(1e-3)

    def time_test_outputs_order_3(self):
        self.step.output_change(1e-3, self.x_test, order=3)

    def time_residual_order(self):
        self.step.residual_order("outputs", 1e-3, x_eval=self.x_test, order=2)

    def track_loss_forms_rel_difference(self):
        change = self.step.loss_change(1e-3)
        return abs(change.predicted - change.extra["gradient_form"]) / abs(
            change.extra["gradient_form"]
        )

    track_loss_forms_rel_difference.unit = "relative error"

    def track_loss_change_vs_reference(self):
        g = ref.gradient(self.net, self.params_, self.x, self.y, fastntk.MSE())
        d = fastntk.rates.layerwise(self.net).diagonal_vector(self.net)
        want = -1e-3 * float(g @ (d * g))
        return abs(self.step.loss_change(1e-3).predicted - want) / abs(want)

    track_loss_change_vs_reference.unit = "relative error"


class Ensemble:
    """64 seeds of the NTK of 16 samples, widths [16, 256, 256, 1]."""

    params = ([1, None],)
    param_names = ["workers"]
    timeout = 300

    def setup(self, workers):
        self.net = fastntk.MLP([16, 256, 256, 1], activation="relu")
        self.x = _samples(16, 16)
        theory.ntk_ensemble(self.net, self.x, seeds=2, workers=workers)

    def time_64_seeds(self, workers):
        theory.ntk_ensemble(self.net, self.x, seeds=64, workers=workers, infinite=False)


class LinearizedDynamics:
    """Frozen-kernel trajectory: P = 128 samples, 10 outputs (1280 modes)."""

    def setup(self):
        rng = np.random.default_rng(0)
        self.net = fastntk.MLP([16, 128, 10], activation="erf")
        self.params_ = self.net.init(seed=0)
        self.x = rng.standard_normal((128, 16))
        self.y = rng.standard_normal((128, 10))
        self.x_test = rng.standard_normal((64, 16))
        self.lin = theory.Linearized(
            self.net, self.params_, self.x, self.y, lr=1e-3, x_test=self.x_test
        )

    def time_build(self):
        theory.Linearized(
            self.net, self.params_, self.x, self.y, lr=1e-3, x_test=self.x_test
        )

    def time_100_time_points(self):
        self.lin.trajectory(np.arange(0, 10_000, 100))


class TheoryColdCompile:
    """First-call cost with an empty numba cache (JIT compilation)."""

    timeout = 600
    number = 1
    repeat = 1

    def track_taylor_mode_compile(self):
        setup = (
            "import numpy as np, fastntk\n"
            "from fastntk import theory\n"
            "net = fastntk.MLP([4, 8, 2], activation='tanh')\n"
            "p = net.init()\n"
            "x = np.ones((3, 4)); v = np.ones(net.n_params)"
        )
        return cold_compile_seconds(
            "theory.directional_derivatives(net, p, x, v)", setup
        )

    track_taylor_mode_compile.unit = "seconds"

    def track_quadrature_compile(self):
        setup = "import numpy as np\nfrom fastntk import theory\nx = np.ones((2, 3))"
        return cold_compile_seconds(
            "theory.infinite_kernels(x, depth=2, activation='tanh')", setup
        )

    track_quadrature_compile.unit = "seconds"
