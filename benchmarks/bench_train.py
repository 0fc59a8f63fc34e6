"""Training loop: fastntk.train against the NumPy reference step and loops.

Workloads (ReLU, MSE with the mean reduction, float32 and float64):

- ``StepVsReference``: widths [8, 32, 32, 2], P = 64, 10 full-batch steps of
  ``fastntk.train`` against 10 calls of ``fastntk.reference.gd_step``;
- ``TrainGD``: widths [64, 128, 128, 10], P = 512, 50 full-batch steps, each
  step kernel, against the plain NumPy loop with manual backpropagation;
- ``TrainSGD``: widths [64, 16, 16, 1], P = 512, batches of 8, 1000 steps.

Compilation happens in ``setup`` (or is loaded from the cache); its cold cost
is tracked apart.  The final loss is tracked against the NumPy loop's.
"""

import numpy as np

import fastntk
from fastntk import reference as ref

from ._common import cold_compile_seconds, rel_error
from .compare_train import WORKLOADS, final_loss, problem, run_numpy


class StepVsReference:
    params = (["float32", "float64"],)
    param_names = ["dtype"]
    steps = 10

    def setup(self, dtype):
        self.net = fastntk.MLP([8, 32, 32, 2], activation="relu")
        self.p0 = self.net.init(seed=0, dtype=dtype)
        rng = np.random.default_rng(1)
        self.x = rng.standard_normal((64, 8)).astype(dtype)
        self.y = rng.standard_normal((64, 2)).astype(dtype)
        self.loss = fastntk.MSE("mean")
        self.run()

    def run(self):
        return fastntk.train(
            self.net,
            self.p0,
            self.x,
            self.y,
            loss=self.loss,
            lr=0.05,
            steps=self.steps,
            record_every=self.steps,
        )[0]

    def reference(self):
        p = self.p0
        for _ in range(self.steps):
            p = self.net.params(
                ref.gd_step(
                    self.net,
                    p,
                    self.x,
                    self.y,
                    self.loss,
                    0.05,
                    fastntk.rates.identity(),
                )
            )
        return p

    def time_fastntk(self, dtype):
        self.run()

    def time_reference(self, dtype):
        self.reference()

    def track_rel_error(self, dtype):
        return rel_error(self.run().theta, self.reference().theta)

    track_rel_error.unit = "relative error"


class _Workload:
    params = (["float32", "float64"],)
    param_names = ["dtype"]
    name = ""
    steps = 0

    def setup(self, dtype):
        self.w = dict(WORKLOADS[self.name], steps=self.steps)
        self.net, self.p0, self.x, self.y, batches = problem(self.name, dtype)
        self.batches = None if batches is None else batches[: self.steps]
        self.train("auto")

    def train(self, kernel):
        return fastntk.train(
            self.net,
            self.p0,
            self.x,
            self.y,
            loss=fastntk.MSE("mean"),
            lr=self.w["lr"],
            steps=self.steps,
            batch_size=self.w["batch"],
            record_every=self.steps,
            kernel=kernel,
        )[0]

    def time_fastntk(self, dtype):
        self.train("auto")

    def time_numpy_loop(self, dtype):
        run_numpy(self.net, self.p0, self.x, self.y, self.batches, self.w)

    def track_final_loss_rel_error(self, dtype):
        out = self.train("auto")
        ours = final_loss(self.net, out.weights, out.biases, self.x, self.y)
        _, theirs = run_numpy(self.net, self.p0, self.x, self.y, self.batches, self.w)
        return abs(ours - theirs) / abs(theirs)

    track_final_loss_rel_error.unit = "relative error"


class TrainGD(_Workload):
    name = "gd"
    steps = 50

    def time_fastntk_fused_kernel(self, dtype):
        self.train("fused")


class TrainSGD(_Workload):
    name = "sgd"
    steps = 1000

    def time_fastntk_blas_kernel(self, dtype):
        self.train("blas")


def track_cold_compile_seconds():
    """First call of train in a fresh process with an empty numba cache."""
    setup = (
        "import numpy as np, fastntk\n"
        "net = fastntk.MLP([4, 8, 1])\n"
        "p = net.init(seed=0)\n"
        "x, y = np.ones((16, 4)), np.zeros((16, 1))"
    )
    statement = "fastntk.train(net, p, x, y, loss='mse', lr=0.1, steps=2, batch_size=4)"
    return cold_compile_seconds(statement, setup)


track_cold_compile_seconds.unit = "seconds"
track_cold_compile_seconds.timeout = 600
