"""Training of an MLP by gradient descent, SGD and tensorial gradient descent.

One step moves the flat parameters by

    theta <- theta - eta * lambda dL_S / dtheta,

with the global learning rate eta (``lr``), a learning-rate tensor lambda
(``rates``; the identity when omitted, i.e. plain gradient descent) and the loss
L_S over the step's samples S: the whole training set for full-batch gradient
descent, one mini-batch of a seeded shuffle for SGD.

The steps run in a compiled loop; Python is re-entered only on recorded steps
(every ``record_every`` steps, every ``ntk_every`` steps and on checkpoints), to
fill the :class:`History`, call the user's callback and write checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
import time
import warnings

import numpy as np

from fastntk import _config
from fastntk._validation import as_samples, as_targets, check_int, check_positive
from fastntk.kernels import cpu, cpu_step
from fastntk.kernels.cpu_step import UPDATE_DENSE, UPDATE_DIAGONAL, UPDATE_SCALAR
from fastntk.kernels.dispatch import is_device_array, resolve_backend
from fastntk.model.losses import check_loss
from fastntk.model.rates import Rates, identity

logger = logging.getLogger(__name__)

#: Policies for the last mini-batch of an epoch when ``batch_size`` does not
#: divide the number of samples.
LAST_BATCH_POLICIES = ("keep", "drop")

#: What to do when the loss becomes NaN or infinite.
DIVERGENCE_POLICIES = ("warn", "raise")

#: Version of the checkpoint file layout.
CHECKPOINT_VERSION = 1

#: Step kernels: "fused" (one compiled call per step, no BLAS; small widths and
#: batches), "blas" (BLAS products and elementwise kernels), "auto".
KERNELS = ("auto", "fused", "blas")

#: "auto" picks the fused kernel when no width exceeds FUSED_MAX_WIDTH and the
#: batch size times the parameter count is at most FUSED_MAX_WORK.
FUSED_MAX_WIDTH = 128
FUSED_MAX_WORK = 1 << 18

#: Rows per block of the BLAS kernel within one thread's range of samples
#: (bounds its buffers for large batches).
BLAS_BLOCK = 4096

#: Sample indices handed to the step loop at once (bounds the index arrays).
MAX_CHUNK_SAMPLES = 1 << 22


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite.

    Attributes
    ----------
    params : Params
        The last parameters whose loss was finite.
    history : History
        The history up to the divergence.
    step : int
        The step whose loss was not finite.
    """

    def __init__(self, message, params, history, step):
        super().__init__(message)
        self.params = params
        self.history = history
        self.step = step


class History:
    """What was recorded during training.

    Every array is indexed by record, in step order.

    Attributes
    ----------
    step : ndarray of int64, shape (R,)
        Steps at which the records were taken: 0, ``record_every``,
        2 ``record_every``, ... and the last step.  Step t means the parameters
        after t updates.
    epoch : ndarray of float64, shape (R,)
        ``step`` in epochs (steps divided by the steps per epoch).
    train_loss : ndarray of float64, shape (R,)
        Training loss L_A over the whole training set at each recorded step,
        with the loss's reduction.
    test_loss : ndarray of float64, shape (R,) or None
        Loss over the held-out set, when ``test`` was given.
    observables : dict of str to ndarray
        For each user observable, its values stacked along the first axis.
    ntk_step : ndarray of int64, shape (K,)
        Steps of the NTK snapshots.
    ntk : list of ndarray
        The snapshots H(t), as returned by the NTK engine.
    kernel_drift : ndarray of float64, shape (K,)
        Relative change of the kernel, |H(t) - H(0)| / |H(0)| (Frobenius norms).
    diverged : bool
        Whether training stopped on a non-finite loss.
    diverged_step : int or None
        The step whose loss was not finite.
    last_finite_loss : float or None
        The last finite loss seen before the divergence (a batch loss under SGD).
    """

    def __init__(self):
        self._step = []
        self._epoch = []
        self._train = []
        self._test = []
        self._obs = {}
        self._ntk_step = []
        self.ntk = []
        self._drift = []
        self.diverged = False
        self.diverged_step = None
        self.last_finite_loss = None

    def __len__(self):
        return len(self._step)

    def __repr__(self):
        last = f", last train_loss={self._train[-1]:.6g}" if self._train else ""
        return f"History(records={len(self)}{last}, diverged={self.diverged})"

    @property
    def step(self):
        return np.asarray(self._step, dtype=np.int64)

    @property
    def epoch(self):
        return np.asarray(self._epoch, dtype=np.float64)

    @property
    def train_loss(self):
        return np.asarray(self._train, dtype=np.float64)

    @property
    def test_loss(self):
        if not self._test:
            return None
        return np.asarray(self._test, dtype=np.float64)

    @property
    def observables(self):
        return {k: np.asarray(v) for k, v in self._obs.items()}

    @property
    def ntk_step(self):
        return np.asarray(self._ntk_step, dtype=np.int64)

    @property
    def kernel_drift(self):
        return np.asarray(self._drift, dtype=np.float64)

    # -- serialization (checkpoints) ---------------------------------------------

    def _to_arrays(self) -> dict:
        # Flat name -> array mapping for np.savez.
        out = {
            "h_step": self.step,
            "h_epoch": self.epoch,
            "h_train": self.train_loss,
            "h_test": np.asarray(self._test, dtype=np.float64),
            "h_ntk_step": self.ntk_step,
            "h_drift": self.kernel_drift,
        }
        for i, name in enumerate(self._obs):
            out[f"h_obs_{i}"] = np.asarray(self._obs[name])
        for i, h in enumerate(self.ntk):
            out[f"h_ntk_{i}"] = np.asarray(h)
        return out

    @classmethod
    def _from_arrays(cls, arrays, meta) -> History:
        h = cls()
        h._step = [int(v) for v in arrays["h_step"]]
        h._epoch = [float(v) for v in arrays["h_epoch"]]
        h._train = [float(v) for v in arrays["h_train"]]
        h._test = [float(v) for v in arrays["h_test"]]
        for i, name in enumerate(meta["observables"]):
            h._obs[name] = list(arrays[f"h_obs_{i}"])
        h._ntk_step = [int(v) for v in arrays["h_ntk_step"]]
        h._drift = [float(v) for v in arrays["h_drift"]]
        h.ntk = [np.asarray(arrays[f"h_ntk_{i}"]) for i in range(len(h._ntk_step))]
        return h

    def _drop_from(self, step, on_grid):
        # Forget records at or after ``step`` and those off their grid (the
        # extra records of a run's last step), before resuming at ``step``.
        rows = [i for i, s in enumerate(self._step) if s < step and on_grid(s)]
        self._step = [self._step[i] for i in rows]
        self._epoch = [self._epoch[i] for i in rows]
        self._train = [self._train[i] for i in rows]
        if self._test:
            self._test = [self._test[i] for i in rows]
        self._obs = {k: [v[i] for i in rows] for k, v in self._obs.items()}

    def _drop_ntk_from(self, step, on_grid):
        # Same for the NTK snapshots.
        rows = [i for i, s in enumerate(self._ntk_step) if s < step and on_grid(s)]
        self._ntk_step = [self._ntk_step[i] for i in rows]
        self._drift = [self._drift[i] for i in rows]
        self.ntk = [self.ntk[i] for i in rows]


class Checkpoint:
    """The content of a training checkpoint, as read by :func:`load_checkpoint`.

    Attributes
    ----------
    net : MLP
        The network, rebuilt from its description.
    params : Params
        The parameters at ``step``.
    step : int
        Updates done.
    epoch : int
        The epoch that ``step`` belongs to.
    rng_state : dict
        State of the shuffling generator at the start of that epoch.
    history : History
    settings : dict
        The settings of the run (seed, batch size, learning rate, ...).
    """

    def __init__(self, net, params, step, epoch, rng_state, history, settings):
        self.net = net
        self.params = params
        self.step = step
        self.epoch = epoch
        self.rng_state = rng_state
        self.history = history
        self.settings = settings

    def __repr__(self):
        return f"Checkpoint(step={self.step}, epoch={self.epoch}, net={self.net!r})"


# -- argument checks -------------------------------------------------------------


class _TrainArgs:
    """Validated arguments of :func:`train` (shared with the CUDA engine)."""

    __slots__ = (
        "net",
        "params",
        "x",
        "y",
        "loss",
        "lr",
        "rates",
        "steps",
        "epochs",
        "batch_size",
        "seed",
        "test",
        "record_every",
        "observables",
        "ntk_every",
        "ntk_samples",
        "callback",
        "checkpoint",
        "checkpoint_every",
        "resume",
        "threads",
        "backend",
        "progress",
        "last_batch",
        "on_divergence",
        "inplace",
        "kernel",
        "steps_per_epoch",
        "total_steps",
        "chunk_steps",
    )


def _check_train_args(
    net,
    params,
    x,
    y,
    *,
    loss,
    lr,
    rates=None,
    steps=None,
    epochs=None,
    batch_size=None,
    seed=0,
    test=None,
    record_every=1,
    observables=None,
    ntk_every=None,
    ntk_samples=None,
    callback=None,
    checkpoint=None,
    checkpoint_every=None,
    resume=False,
    threads=None,
    backend="cpu",
    progress=False,
    last_batch="keep",
    on_divergence="warn",
    inplace=False,
    kernel="auto",
) -> _TrainArgs:
    """Validate every argument of :func:`train` before any work.

    Returns a :class:`_TrainArgs` holding coerced arrays (C-contiguous, in the
    parameters' dtype), the loss and rate objects, and the derived step counts.
    """
    from fastntk.model.mlp import MLP

    a = _TrainArgs()
    if not isinstance(net, MLP):
        raise TypeError(f"net: expected fastntk.MLP, received {type(net).__name__}")
    a.net = net
    a.params = net.check_params(params)
    dtype = params.dtype
    a.x = as_samples("x", x, net.n_in, dtype)
    P = a.x.shape[0]
    a.y = as_targets("y", y, P, net.n_out, dtype)
    a.loss = check_loss(loss)
    a.lr = check_positive("lr", lr)

    # learning-rate tensor; None is the identity (plain gradient descent)
    if rates is None:
        a.rates = identity()
    elif isinstance(rates, Rates):
        a.rates = rates.check(net)
    else:
        raise TypeError(
            f"rates: expected None (plain gradient descent) or a tensor from "
            f"fastntk.rates (identity, layerwise, diagonal, dense), received "
            f"{type(rates).__name__}"
        )

    # mini-batches
    if batch_size is None:
        a.batch_size = None
    else:
        a.batch_size = check_int("batch_size", batch_size, 1)
        if a.batch_size > P:
            raise ValueError(
                f"batch_size: expected at most the number of samples P = {P}, "
                f"received {a.batch_size}; use batch_size=None for full-batch "
                f"gradient descent"
            )
    if last_batch not in LAST_BATCH_POLICIES:
        raise ValueError(
            f"last_batch: expected 'keep' or 'drop', received {last_batch!r}"
        )
    a.last_batch = last_batch
    if a.batch_size is None:
        a.steps_per_epoch = 1
    elif last_batch == "keep":
        a.steps_per_epoch = -(-P // a.batch_size)
    else:
        a.steps_per_epoch = P // a.batch_size

    # length of the run: steps or epochs, exactly one of them
    if (steps is None) == (epochs is None):
        raise ValueError(
            f"steps, epochs: expected exactly one of them, received steps={steps!r} "
            f"and epochs={epochs!r}"
        )
    a.steps = None if steps is None else check_int("steps", steps, 0)
    a.epochs = None if epochs is None else check_int("epochs", epochs, 0)
    a.total_steps = a.steps if a.steps is not None else a.epochs * a.steps_per_epoch

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise TypeError(f"seed: expected a non-negative integer, received {seed!r}")
    a.seed = int(seed)

    # held-out set
    if test is None:
        a.test = None
    else:
        if not isinstance(test, (tuple, list)) or len(test) != 2:
            raise TypeError(
                f"test: expected a pair (x_test, y_test), received "
                f"{type(test).__name__}"
            )
        xt = as_samples("test[0] (x_test)", test[0], net.n_in, dtype)
        yt = as_targets("test[1] (y_test)", test[1], xt.shape[0], net.n_out, dtype)
        a.test = (xt, yt)

    a.record_every = check_int("record_every", record_every, 1)
    if observables is None:
        a.observables = {}
    else:
        if not isinstance(observables, dict) or not all(
            isinstance(k, str) and callable(f) for k, f in observables.items()
        ):
            raise TypeError(
                "observables: expected a dict mapping names (str) to callables "
                "f(params) -> number or array"
            )
        a.observables = dict(observables)
    a.ntk_every = None if ntk_every is None else check_int("ntk_every", ntk_every, 1)
    a.ntk_samples = (
        None
        if ntk_samples is None
        else as_samples("ntk_samples", ntk_samples, net.n_in, dtype)
    )
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback: expected a callable f(step, params, history) or None, "
            f"received {type(callback).__name__}"
        )
    a.callback = callback

    # checkpoints
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint: expected a file path or None, received "
            f"{type(checkpoint).__name__}"
        )
    a.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
    if checkpoint_every is not None:
        a.checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1)
        if a.checkpoint is None:
            raise ValueError(
                "checkpoint_every: given without a checkpoint path; pass "
                "checkpoint='run.npz' as well"
            )
    else:
        a.checkpoint_every = None
    if not isinstance(resume, bool):
        raise TypeError(f"resume: expected True or False, received {resume!r}")
    if resume and a.checkpoint is None:
        raise ValueError(
            "resume: resume=True needs the checkpoint path to resume from; pass "
            "checkpoint='run.npz'"
        )
    a.resume = resume

    a.threads = _config.check_threads(threads)
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, received {backend!r}")
    a.backend = backend
    a.progress = bool(progress)
    if on_divergence not in DIVERGENCE_POLICIES:
        raise ValueError(
            f"on_divergence: expected 'warn' or 'raise', received {on_divergence!r}"
        )
    a.on_divergence = on_divergence
    a.inplace = bool(inplace)
    if kernel not in KERNELS:
        raise ValueError(
            f"kernel: expected one of {', '.join(KERNELS)}, received {kernel!r}"
        )
    a.kernel = kernel
    batch = P if a.batch_size is None else a.batch_size
    a.chunk_steps = max(1, MAX_CHUNK_SAMPLES // batch)
    return a


def _step_flops(a: _TrainArgs) -> float:
    # Forward (2 flops per weight and sample) plus backward (4): per step.
    batch = a.x.shape[0] if a.batch_size is None else a.batch_size
    return 6.0 * batch * a.net.n_params


# -- public function -------------------------------------------------------------


def train(
    net,
    params,
    x,
    y,
    *,
    loss,
    lr,
    rates=None,
    steps=None,
    epochs=None,
    batch_size=None,
    seed=0,
    test=None,
    record_every=1,
    observables=None,
    ntk_every=None,
    ntk_samples=None,
    callback=None,
    checkpoint=None,
    checkpoint_every=None,
    resume=False,
    threads=None,
    backend="cpu",
    progress=False,
    last_batch="keep",
    on_divergence="warn",
    inplace=False,
    kernel="auto",
):
    """Train an MLP by (stochastic, tensorial) gradient descent.

    Each step applies theta <- theta - lr * lambda dL_S/dtheta, where L_S is the
    loss over the step's samples S and lambda the learning-rate tensor.

    - Full-batch gradient descent (``batch_size=None``): S is the whole training
      set at every step; one step is one epoch.
    - SGD (``batch_size=B``): every epoch draws a seeded random permutation of
      the P samples and cuts it into consecutive mini-batches of B samples.  When
      B does not divide P, ``last_batch="keep"`` (default) makes the last batch
      of each epoch hold the remaining P mod B samples, so that every sample is
      used exactly once per epoch (ceil(P/B) steps per epoch);
      ``last_batch="drop"`` skips them (floor(P/B) steps per epoch; the
      dropped samples change from epoch to epoch).  Under the ``"mean"``
      reduction a batch's loss is divided by its own size.

    Parameters
    ----------
    net : MLP
    params : Params
        Starting parameters (float32 or float64); not modified unless
        ``inplace=True``.
    x : array_like, shape (P, n_0)
        Training inputs, in the parameters' dtype.
    y : array_like, shape (P, n_L)
        Training targets, in the parameters' dtype (one-hot or probability rows
        for the cross-entropy).
    loss : Loss or str
        ``fastntk.MSE()``, ``fastntk.CrossEntropy()`` (each with reduction
        ``"sum"`` or ``"mean"``), or ``"mse"`` / ``"cross_entropy"``.
    lr : float
        Global learning rate eta > 0.
    rates : Rates, optional
        Learning-rate tensor from :mod:`fastntk.rates`.  ``None`` (default) is
        the identity, i.e. plain gradient descent.  (The NTK engine's own
        default is the layerwise tensor; here the default is the identity.)
    steps, epochs : int
        Length of the run: exactly one of them.  With ``epochs``, the run has
        ``epochs`` times the steps per epoch.
    batch_size : int, optional
        Mini-batch size B, 1 <= B <= P; ``None`` for full-batch descent.
    seed : int
        Seed of the per-epoch shuffles.
    test : (x_test, y_test), optional
        Held-out set whose loss is recorded.
    record_every : int
        Record the losses (and observables, callback, progress) every this many
        steps, plus at the first and the last step.
    observables : dict of str to callable, optional
        ``f(params) -> float or ndarray`` evaluated on recorded steps.
    ntk_every : int, optional
        Take a snapshot of the NTK every this many steps (and at the end), with
        the training learning-rate tensor, on ``ntk_samples`` (default ``x``).
    ntk_samples : array_like, shape (Q, n_0), optional
    callback : callable, optional
        ``callback(step, params, history)`` on recorded steps; returning True
        stops training after that step.
    checkpoint : path, optional
        File (``.npz``) written at the end of the run and every
        ``checkpoint_every`` steps, atomically (written beside, then renamed).
    checkpoint_every : int, optional
    resume : bool
        Continue from ``checkpoint`` when the file exists (otherwise start
        afresh).  ``steps`` / ``epochs`` count from the original start.  A
        resumed run gives bit-identical parameters to an uninterrupted one with
        the same seed and thread count.
    threads : int, optional
        Threads of the compiled kernels and BLAS for this call (restored after).
    backend : {"cpu", "cuda", "auto"}
    progress : bool
        Write a progress line to standard error on recorded steps.
    last_batch : {"keep", "drop"}
        Policy for the last, smaller mini-batch of an epoch (see above).
    on_divergence : {"warn", "raise"}
        When the loss becomes NaN or infinite, training stops; ``"warn"``
        (default) issues a ``RuntimeWarning`` and returns the last parameters
        whose loss was finite; ``"raise"`` raises :class:`TrainingDiverged`,
        which carries them.
    inplace : bool
        Write the final parameters into ``params.theta`` and return ``params``.
    kernel : {"auto", "fused", "blas"}
        Step kernel of the CPU backend: ``"fused"`` runs forward pass, backward
        pass and update of a step in one compiled call without BLAS (fastest
        for narrow networks and small batches); ``"blas"`` uses BLAS matrix
        products (fastest for wide layers and large batches); ``"auto"``
        (default) picks by size.  Both give the same steps up to rounding.

    Returns
    -------
    params : Params
        Trained parameters (a new object unless ``inplace``), same dtype.
    history : History

    Examples
    --------
    >>> import numpy as np, fastntk
    >>> net = fastntk.MLP([2, 16, 1], activation="tanh", C_W=1.0)
    >>> params = net.init(seed=0)
    >>> x = np.random.default_rng(0).standard_normal((32, 2))
    >>> y = np.sin(x[:, :1])
    >>> trained, hist = fastntk.train(net, params, x, y, loss=fastntk.MSE(),
    ...                               lr=0.01, steps=200, record_every=50)
    >>> hist.step.tolist()
    [0, 50, 100, 150, 200]
    >>> bool(hist.train_loss[-1] < hist.train_loss[0])
    True
    """
    options = dict(
        loss=loss,
        lr=lr,
        rates=rates,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        test=test,
        record_every=record_every,
        observables=observables,
        ntk_every=ntk_every,
        ntk_samples=ntk_samples,
        callback=callback,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        threads=threads,
        backend=backend,
        progress=progress,
        last_batch=last_batch,
        on_divergence=on_divergence,
        inplace=inplace,
        kernel=kernel,
    )
    # Device arrays (numba.cuda, CuPy) stay where they are: the GPU engine takes
    # them as they are and validates them there.
    if backend != "cpu" and (is_device_array(x) or is_device_array(y)):
        from fastntk.engines.train_cuda import train_cuda

        return train_cuda(net, params, x, y, **options)
    args = _check_train_args(net, params, x, y, **options)
    flops = _step_flops(args) * args.total_steps
    if resolve_backend(args.backend, flops) == "cuda":
        from fastntk.engines.train_cuda import train_cuda

        return train_cuda(net, params, x, y, **options)
    with _config.thread_limit(args.threads):
        return _train_cpu(args)


# -- batch schedule --------------------------------------------------------------


class _Schedule:
    """Which samples each step uses.

    Full batch: every step uses all samples in order (``batches`` returns None).
    SGD: epoch e's shuffle is the e-th ``rng.permutation(P)`` of one PCG64
    generator seeded with ``seed`` (drawn in C by
    :func:`fastntk.engines._loop.permutations`, the same numbers as NumPy's);
    step t of the run is batch ``t % steps_per_epoch`` of epoch
    ``t // steps_per_epoch``.  The generator's state at the start of the current
    epoch is what checkpoints store.
    """

    def __init__(self, n_samples, batch_size, steps_per_epoch, seed):
        self.P = n_samples
        self.B = batch_size
        self.per_epoch = steps_per_epoch
        self.rng = np.random.default_rng(seed)
        self.epoch = -1
        self.epoch_state = self.rng.bit_generator.state
        self.perm = None

    def restore(self, epoch, rng_state):
        """Continue at ``epoch`` whose shuffle is drawn from ``rng_state``."""
        self.rng.bit_generator.state = rng_state
        self.epoch = epoch - 1
        self.epoch_state = rng_state
        self.perm = None

    def _shuffles(self, e0, e1):
        """The shuffles of epochs e0..e1 as rows of an int64 array.

        Shuffles are drawn in epoch order and only the current one is kept, so
        e0 is the current epoch or a later one.
        """
        if e0 < self.epoch or (e0 == self.epoch and self.perm is None):
            raise RuntimeError(
                f"schedule: epoch {e0} requested after epoch {self.epoch}; "
                f"shuffles are drawn in order only"
            )
        kept = [self.perm[None]] if e0 == self.epoch else []
        if e1 > self.epoch:
            from fastntk.engines import _loop

            bits = self.rng.bit_generator
            with bits.lock:
                # All new epochs in one call but the last, whose starting
                # state is the one a checkpoint records.
                head = _loop.permutations(bits, self.P, e1 - self.epoch - 1)
                self.epoch_state = bits.state
                last = _loop.permutations(bits, self.P, 1)
            start = max(e0 - self.epoch - 1, 0)
            kept += [head[start:], last]
            self.epoch, self.perm = e1, last[0]
        return np.concatenate(kept) if len(kept) > 1 else kept[0]

    def state_at(self, step):
        """(epoch, generator state at its start) for the step ``step``."""
        if self.B is None:
            return step, None
        epoch = step // self.per_epoch
        self._shuffles(epoch, epoch)
        return epoch, self.epoch_state

    def batch(self, step):
        """Sample indices of step ``step`` (int64), or None for full batch."""
        if self.B is None:
            return None
        epoch, pos = divmod(step, self.per_epoch)
        start = pos * self.B
        return self._shuffles(epoch, epoch)[0, start : min(start + self.B, self.P)]

    def batches(self, t0, t1):
        """Samples of the steps t0..t1-1 as (order, starts, sizes).

        Step t0 + s uses ``order[starts[s]:starts[s] + sizes[s]]``; ``order`` is
        None for full batch (every step uses all samples in order).
        """
        steps = np.arange(t0, t1, dtype=np.int64)
        if self.B is None:
            return (
                None,
                np.zeros(len(steps), np.int64),
                np.full(len(steps), self.P, np.int64),
            )
        e0 = t0 // self.per_epoch
        e1 = (t1 - 1) // self.per_epoch
        order = self._shuffles(e0, e1).reshape(-1)
        epoch, pos = np.divmod(steps, self.per_epoch)
        starts = (epoch - e0) * self.P + pos * self.B
        sizes = np.minimum(self.B, self.P - pos * self.B)
        return order, starts, sizes


# -- the step loop ---------------------------------------------------------------


def _update_operator(a: _TrainArgs):
    """(kind, scale) of the update theta -= scale * g in the parameters' dtype.

    Scale is lr (identity), lr * lambda as a vector (diagonal kinds) or lr *
    lambda as a matrix (dense).
    """
    dtype = a.params.dtype
    kind = a.rates.kind
    if kind == "identity":
        return UPDATE_SCALAR, np.array([a.lr], dtype=dtype)
    if kind in ("layerwise", "diagonal"):
        vec = a.lr * a.rates.diagonal_vector(a.net)
        return UPDATE_DIAGONAL, np.ascontiguousarray(vec, dtype=dtype)
    mat = a.lr * a.rates.matrix(a.net)
    return UPDATE_DENSE, np.ascontiguousarray(mat, dtype=dtype)


def _choose_kernel(a: _TrainArgs, kernel: str) -> str:
    """ "fused" for small steps, "blas" otherwise, unless ``kernel`` says which."""
    if kernel != "auto":
        return kernel
    batch = a.x.shape[0] if a.batch_size is None else a.batch_size
    small = max(a.net.widths) <= FUSED_MAX_WIDTH
    return "fused" if small and batch * a.net.n_params <= FUSED_MAX_WORK else "blas"


def _staggered(dtype, parts):
    """Views of one new array, each starting at a chosen address modulo 4 KiB.

    ``parts`` is a list of (length, residue, anchor): the entry ``anchor`` of the
    view lands at an address congruent to ``residue`` bytes modulo 4096, on a
    64-byte boundary.  Streams that read one buffer while writing another run
    at full speed only when their addresses differ modulo 4 KiB by more than a
    few cache lines; placing the buffers of the step loop this way makes its
    speed independent of where the allocator happens to put them.
    """
    item = np.dtype(dtype).itemsize
    page = 4096 // item
    sizes = [length + 2 * page for length, _, _ in parts]
    arena = np.zeros(sum(sizes) + page, dtype=dtype)
    base = arena.ctypes.data
    views, pos = [], 0
    for (length, residue, anchor), size in zip(parts, sizes):
        # smallest start >= pos with base + (start + anchor) item = residue mod 4096
        want = (residue - base - (pos + anchor) * item) % 4096
        start = pos + want // item
        views.append(arena[start : start + length])
        pos += size
    return views


class _Stepper:
    """The compiled step loop for one run: plan, buffers and kernel addresses.

    ``buffers`` are the two parameter vectors the steps alternate between.
    The BLAS kernel cuts each batch into one range of samples per thread
    (numba's thread count, set by ``threads``) and runs single-threaded BLAS
    inside each range.
    """

    def __init__(self, a: _TrainArgs, kernel: str):
        import numba

        from fastntk.engines import _loop

        net = a.net
        dtype = a.params.dtype
        n = net.n_params
        P = a.x.shape[0]
        batch = P if a.batch_size is None else a.batch_size
        kind, rate = _update_operator(a)
        self.rate = rate.reshape(-1)
        self.kernel = _choose_kernel(a, kernel)
        self.plan, work_size = cpu_step.make_plan(
            net.widths,
            net.activation_code,
            a.loss.code,
            a.loss.reduction == "mean",
            kind,
            P,
            batch,
            kernel=self.kernel,
            parts=numba.get_num_threads(),
            block=BLAS_BLOCK,
            gather=a.batch_size is not None,
            itemsize=dtype.itemsize,
        )
        grad = cpu_step.gradient_offset(self.plan)
        addresses = cpu_step.addresses(dtype)
        self.gradient = addresses[self.kernel]
        self.update = addresses["update"]
        if self.kernel != "fused":
            # parts, where their gradients lie, and the team's size
            first, stride = cpu_step.part_gradient_offsets(self.plan)
            parts = int(self.plan[cpu_step.PLAN_PARTS])
            self.parts = (parts, first, stride, parts)
        self.fpar = np.array([net.slope], dtype=np.float64)
        self.x = a.x.reshape(-1)
        self.y = a.y.reshape(-1)
        self.all_rows = np.arange(P, dtype=np.int64)
        self.loop = _loop

        # parameter buffers and gradient a quarter of a page apart (mod 4 KiB)
        theta_a, theta_b, self.work = _staggered(
            dtype, [(n, 0, 0), (n, 2048, 0), (work_size, 1024, grad)]
        )
        self.buffers = [theta_a, theta_b]

    def loss(self, a: _TrainArgs, theta, x, y) -> float:
        """Loss of the whole set (x, y) at ``theta``, with the loss's reduction."""
        if self.kernel != "fused":
            # single-threaded BLAS here too: BLAS worker threads, once woken,
            # poll for work for a while and would slow the steps that follow
            with _blas_controller().limit(limits=1, user_api="blas"):
                return _loss_on(a, theta, x, y)
        # forward passes of the fused kernel, batch after batch, serially
        P = x.shape[0]
        total = cpu_step.fused_loss(
            theta, x.reshape(-1), y.reshape(-1), P, self.plan, self.fpar, self.work
        )
        return float(total * a.loss.scale(P))

    def run(self, cur, nxt, order, starts, sizes):
        """Run the steps described by (order, starts, sizes) from ``cur``.

        Returns (done, last_loss, bad_loss, swapped), see
        :func:`fastntk.engines._loop.run_steps`.
        """
        order = self.all_rows if order is None else order
        args = (
            self.gradient,
            self.update,
            cur,
            nxt,
            self.x,
            self.y,
            order,
            starts,
            sizes,
            self.plan,
            self.fpar,
            self.rate,
            self.work,
        )
        if self.kernel == "fused":
            return self.loop.run_steps(*args)

        # one part of each batch per thread, BLAS single-threaded inside a part
        with _blas_controller().limit(limits=1, user_api="blas"):
            return self.loop.run_parts(*args, *self.parts)


_BLAS_CONTROLLER = []


def _blas_controller():
    """A threadpoolctl controller of the BLAS libraries, created once.

    Limiting threads through a kept controller costs microseconds, against a
    millisecond for ``threadpool_limits``, which inspects every loaded library.
    """
    if not _BLAS_CONTROLLER:
        from threadpoolctl import ThreadpoolController

        _BLAS_CONTROLLER.append(ThreadpoolController())
    return _BLAS_CONTROLLER[0]


# -- evaluation on recorded steps ------------------------------------------------


def _loss_on(a: _TrainArgs, theta, x, y) -> float:
    # Loss of the whole set (x, y) at parameters theta.
    net = a.net
    z = np.empty((x.shape[0], net.n_out), dtype=theta.dtype)
    cpu.forward_output(theta, net._widths, x, net.activation_code, net.slope, z)
    eps = np.empty_like(z)
    return float(cpu._loss_error(z, y, a.loss.code, a.loss.scale(x.shape[0]), eps))


def _ntk_snapshot(a: _TrainArgs, params):
    # The NTK with the training rates, through the NTK engine when present.
    samples = a.x if a.ntk_samples is None else a.ntk_samples
    try:
        from fastntk.engines.ntk import ntk as ntk_engine
    except ImportError:
        ntk_engine = None
    if ntk_engine is not None:
        return np.asarray(ntk_engine(a.net, params, samples, rates=a.rates))
    from fastntk.kernels import reference

    return reference.ntk(a.net, params, samples, rates=a.rates)


# -- checkpoints -----------------------------------------------------------------


def _net_description(net) -> dict:
    return {
        "widths": list(net.widths),
        "activation": net.activation,
        "C_b": net.C_b.tolist(),
        "C_W": net.C_W.tolist(),
        "slope": float(net.slope),
    }


def _save_checkpoint(path, a: _TrainArgs, theta, step, epoch, rng_state, history):
    """Write a checkpoint atomically: to a file beside ``path``, then rename."""
    meta = {
        "version": CHECKPOINT_VERSION,
        "net": _net_description(a.net),
        "dtype": str(theta.dtype),
        "step": int(step),
        "epoch": int(epoch),
        "rng_state": rng_state,
        "observables": list(history._obs),
        "settings": {
            "seed": a.seed,
            "batch_size": a.batch_size,
            "last_batch": a.last_batch,
            "lr": a.lr,
            "loss": a.loss.name,
            "reduction": a.loss.reduction,
            "rates": a.rates.kind,
            "record_every": a.record_every,
            "ntk_every": a.ntk_every,
        },
        "diverged": history.diverged,
    }
    arrays = history._to_arrays()
    arrays["theta"] = theta
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by :func:`train`.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    Checkpoint
        With the rebuilt network, the parameters, the step, the epoch, the
        shuffling generator's state, the history and the run's settings.

    Examples
    --------
    >>> import os, tempfile, numpy as np, fastntk
    >>> net = fastntk.MLP([2, 4, 1])
    >>> x, y = np.ones((3, 2)), np.zeros((3, 1))
    >>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
    >>> _ = fastntk.train(net, net.init(seed=0), x, y, loss="mse", lr=0.1,
    ...                   steps=5, checkpoint=path)
    >>> fastntk.load_checkpoint(path).step
    5
    """
    from fastntk.model.mlp import MLP

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint: no file at {path!r}")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if "meta" not in arrays or "theta" not in arrays:
        raise ValueError(
            f"checkpoint: {path!r} is not a fastntk training checkpoint (no "
            f"'meta' or 'theta' entry)"
        )
    meta = json.loads(arrays["meta"].tobytes().decode())
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint: expected layout version {CHECKPOINT_VERSION}, received "
            f"{meta.get('version')!r} in {path!r}"
        )
    d = meta["net"]
    net = MLP(
        d["widths"],
        activation=d["activation"],
        C_b=d["C_b"],
        C_W=d["C_W"],
        slope=d["slope"],
    )
    params = net.params(arrays["theta"])
    history = History._from_arrays(arrays, meta)
    history.diverged = bool(meta.get("diverged", False))
    return Checkpoint(
        net,
        params,
        meta["step"],
        meta["epoch"],
        meta["rng_state"],
        history,
        meta["settings"],
    )


def _check_resume(a: _TrainArgs, ck: Checkpoint):
    # The checkpoint must come from the same network, dtype and schedule.
    if ck.net != a.net:
        raise ValueError(
            f"checkpoint: it holds {ck.net!r}, but training was asked for "
            f"{a.net!r}; use another checkpoint path or resume=False"
        )
    if ck.params.dtype != a.params.dtype:
        raise ValueError(
            f"checkpoint: it holds {ck.params.dtype} parameters, but params are "
            f"{a.params.dtype}"
        )
    for name, value in (
        ("seed", a.seed),
        ("batch_size", a.batch_size),
        ("last_batch", a.last_batch),
    ):
        if ck.settings[name] != value:
            raise ValueError(
                f"checkpoint: it was written with {name}={ck.settings[name]!r}, "
                f"but {name}={value!r} was passed; resume with the same {name}"
            )


# -- driver ----------------------------------------------------------------------


def _next_multiple(t, every):
    return (t // every + 1) * every


def _train_cpu(a: _TrainArgs):
    """Run the schedule: compiled steps between recorded steps."""
    net = a.net
    T = a.total_steps
    history = History()
    schedule = _Schedule(a.x.shape[0], a.batch_size, a.steps_per_epoch, a.seed)

    # two parameter buffers: the step reads one and writes the other
    stepper = _Stepper(a, a.kernel)
    bufs = stepper.buffers
    bufs[0][:] = a.params.theta
    cur = 0
    have_previous = False
    t = 0

    # resume from a checkpoint when asked and present
    if a.resume and os.path.exists(a.checkpoint):
        ck = load_checkpoint(a.checkpoint)
        _check_resume(a, ck)
        if ck.step > T:
            raise ValueError(
                f"resume: the checkpoint {a.checkpoint!r} is at step {ck.step}, "
                f"past the {T} steps asked for; ask for more steps or epochs"
            )
        bufs[cur][:] = ck.params.theta
        t = ck.step
        if ck.rng_state is not None:
            schedule.restore(ck.epoch, ck.rng_state)
        history = ck.history
        history._drop_from(t, lambda s: s % a.record_every == 0)
        if a.ntk_every is not None:
            history._drop_ntk_from(t, lambda s: s % a.ntk_every == 0)
        logger.info("resuming from %s at step %d", a.checkpoint, t)

    start_time = time.perf_counter()
    h0 = [history.ntk[0]] if history.ntk else []
    last_loss, last_step = math.nan, -1
    stop = False

    def snapshot():
        return net.params(bufs[cur])

    def record(step):
        # losses, observables, callback and progress at ``step``
        theta = bufs[cur]
        value = stepper.loss(a, theta, a.x, a.y)
        history._step.append(step)
        history._epoch.append(step / a.steps_per_epoch)
        history._train.append(value)
        if a.test is not None:
            history._test.append(stepper.loss(a, theta, *a.test))
        if a.observables:
            params = snapshot()
            for name, f in a.observables.items():
                history._obs.setdefault(name, []).append(np.asarray(f(params)))
        if a.progress:
            elapsed = time.perf_counter() - start_time
            sys.stderr.write(
                f"\rstep {step}/{T}  loss {value:.6g}  {elapsed:.1f}s"
                + ("\n" if step >= T else "")
            )
            sys.stderr.flush()
        if a.callback is not None:
            return bool(a.callback(step, snapshot(), history))
        return False

    def ntk_record(step):
        H = _ntk_snapshot(a, snapshot())
        if not h0:
            h0.append(H)
        ref = np.linalg.norm(h0[0])
        history._ntk_step.append(step)
        history.ntk.append(H)
        history._drift.append(
            float(np.linalg.norm(H - h0[0]) / ref) if ref > 0 else 0.0
        )

    def save(step):
        # the next step's epoch and the generator state at its start
        epoch, state = schedule.state_at(step)
        _save_checkpoint(a.checkpoint, a, bufs[cur], step, epoch, state, history)

    def diverge(step, bad):
        # stop on a non-finite loss: keep the last finite parameters
        nonlocal cur
        history.diverged = True
        history.diverged_step = step
        history.last_finite_loss = None if math.isnan(last_loss) else last_loss
        if have_previous:
            cur = 1 - cur
            kept = step - 1
        else:
            kept = step
        return (
            f"training diverged at step {step}: the loss became {bad} with "
            f"lr={a.lr:g}; last finite loss "
            f"{'none' if math.isnan(last_loss) else f'{last_loss:.6g}'}"
            f"{f' at step {last_step}' if last_step >= 0 else ''}; returning the "
            f"parameters of step {kept}.  Lower the learning rate."
        )

    message = None
    while True:
        # recorded step: history, NTK snapshot, checkpoint
        if t % a.record_every == 0 or t == T:
            stop = record(t)
            if not math.isfinite(history._train[-1]):
                message = diverge(t, history._train[-1])
                break
            last_loss, last_step = history._train[-1], t
        if a.ntk_every is not None and (t % a.ntk_every == 0 or t == T):
            if not history._ntk_step or history._ntk_step[-1] != t:
                ntk_record(t)
        if a.checkpoint_every is not None and t % a.checkpoint_every == 0 and t > 0:
            save(t)
        if t >= T or stop:
            break

        # compiled steps up to the next recorded step
        t_next = min(_next_multiple(t, a.record_every), T, t + a.chunk_steps)
        if a.ntk_every is not None:
            t_next = min(t_next, _next_multiple(t, a.ntk_every))
        if a.checkpoint_every is not None:
            t_next = min(t_next, _next_multiple(t, a.checkpoint_every))
        order, starts, sizes = schedule.batches(t, t_next)
        done, step_loss, bad, swapped = stepper.run(
            bufs[cur], bufs[1 - cur], order, starts, sizes
        )
        if done > 0:
            have_previous = True
            last_loss, last_step = step_loss, t + done - 1
        if swapped:
            cur = 1 - cur
        if bad is not None:
            message = diverge(t + done, bad)
            t = t + done
            break
        t = t_next

    if a.checkpoint is not None and message is None:
        save(t)
    theta = bufs[cur]
    if a.inplace:
        a.params.theta[:] = theta
        result = a.params
    else:
        result = net.params(theta)
    if message is not None:
        if a.on_divergence == "raise":
            raise TrainingDiverged(message, result, history, history.diverged_step)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return result, history
