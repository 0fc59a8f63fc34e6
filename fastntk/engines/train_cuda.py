"""Training of an MLP on a CUDA GPU: the whole step loop on the device.

The GPU twin of :func:`fastntk.train`, with the same arguments, the same schedule
(full batch, or the seeded per-epoch shuffles of SGD, with the same batches as
the CPU engine for the same seed), the same history, divergence handling and
checkpoints.  The parameters, the training set and every buffer stay on the
device; each step is a handful of kernel launches (forward pass, loss and error
factor, backward pass, update through the learning-rate tensor) with no
transfer.  The host is re-entered only on recorded steps: the step losses of the
segment and, when something on the host needs them (observables, callback, NTK
snapshot, checkpoint, the end), the parameters are copied back.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings

import numpy as np

from fastntk.kernels.dispatch import is_device_array, resolve_backend

logger = logging.getLogger(__name__)


def train_cuda(
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
    backend="cuda",
    progress=False,
    last_batch="keep",
    on_divergence="warn",
    inplace=False,
    kernel="auto",
):
    """Train an MLP by (stochastic, tensorial) gradient descent on the GPU.

    Same contract as :func:`fastntk.train` (``backend="cuda"`` routes there);
    see it for every argument.  Differences:

    - ``x``, ``y`` and the test pair may be device arrays (numba.cuda or CuPy),
      used in place; NumPy arrays are copied to the device once.
    - ``threads`` and ``kernel`` (the CPU step kernel) are validated and
      otherwise ignored.
    - Results equal the CPU engine's within rounding (products are summed in
      another order), and are deterministic run to run on the same device.

    Returns
    -------
    params : Params
        Trained parameters, on the host, in the parameters' dtype.
    history : History

    Raises
    ------
    RuntimeError
        When no usable GPU is present (saying what is missing).

    Examples
    --------
    >>> import numpy as np, fastntk                          # doctest: +SKIP
    >>> net = fastntk.MLP([2, 256, 1], activation="tanh")    # doctest: +SKIP
    >>> x = np.random.default_rng(0).standard_normal((4096, 2))
    >>> y = np.sin(x[:, :1])
    >>> trained, hist = fastntk.train(net, net.init(seed=0), x, y, loss="mse",
    ...                               lr=1e-4, steps=100, record_every=50,
    ...                               backend="cuda")        # doctest: +SKIP
    >>> hist.step.tolist()                                   # doctest: +SKIP
    [0, 50, 100]
    """
    resolve_backend("cuda")
    a, arrays = _check_args(
        net,
        params,
        x,
        y,
        dict(
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
        ),
    )
    return _train_device(a, arrays)


# -- validation ------------------------------------------------------------------


def _stand_in(x, dtype):
    # A zero host array of the device array's shape, for the shape checks (its
    # pages are never written, so it costs address space, not memory).
    return np.zeros(tuple(x.shape), dtype=dtype)


def _check_args(net, params, x, y, kw):
    """Validate with the CPU engine's checks; device arrays are checked here."""
    from fastntk.engines.ntk_cuda import check_device_samples
    from fastntk.engines.train import _check_train_args

    dtype = getattr(getattr(params, "theta", None), "dtype", np.float64)
    device = {}
    host_x, host_y = x, y
    if is_device_array(x):
        device["x"], host_x = x, _stand_in(x, dtype)
    if is_device_array(y):
        device["y"], host_y = y, _stand_in(y, dtype)
    test = kw["test"]
    if isinstance(test, (tuple, list)) and len(test) == 2:
        parts = list(test)
        for k, name in enumerate(("x_test", "y_test")):
            if is_device_array(parts[k]):
                device[name], parts[k] = parts[k], _stand_in(parts[k], dtype)
        kw = dict(kw, test=tuple(parts))
    a = _check_train_args(net, params, host_x, host_y, **kw)

    # dtype and finiteness of the device arrays (shapes were checked above)
    n_out = a.net.n_out
    for name, value in device.items():
        width = a.net.n_in if name.startswith("x") else n_out
        label = {"x_test": "test[0] (x_test)", "y_test": "test[1] (y_test)"}.get(
            name, name
        )
        device[name] = check_device_samples(label, value, width, a.params.dtype)
    arrays = {
        "x": device.get("x", a.x),
        "y": device.get("y", a.y),
        "test": None,
    }
    if a.test is not None:
        arrays["test"] = (
            device.get("x_test", a.test[0]),
            device.get("y_test", a.test[1]),
        )
    return a, arrays


# -- device state and step loop -----------------------------------------------


class _DeviceStepper:
    """Parameters, data and buffers on the device, and the step loop over them.

    Two parameter buffers alternate: each step reads one and writes the other,
    so that the parameters before the last update stay available (divergence
    returns the last parameters whose loss was finite).
    """

    def __init__(self, a, arrays):
        from numba import cuda

        from fastntk.engines.train import UPDATE_DENSE, _update_operator
        from fastntk.kernels import cuda as kernels

        self.a = a
        net = a.net
        dt = a.params.dtype
        widths = [int(w) for w in net.widths]
        self.widths = widths
        self.code, self.slope = net.activation_code, float(net.slope)

        # parameters (two buffers), gradient, data
        self.theta = [
            cuda.to_device(a.params.theta),
            cuda.device_array_like(a.params.theta),
        ]
        self.views = [kernels.layer_views(t, widths) for t in self.theta]
        self.grad = cuda.device_array(net.n_params, dt)
        self.gWs, self.gbs = kernels.layer_views(self.grad, widths)
        self.x = _on_device(arrays["x"])
        self.y = _on_device(arrays["y"])
        self.test = None
        if arrays["test"] is not None:
            self.test = tuple(_on_device(v) for v in arrays["test"])
        P = self.x.shape[0]

        # the update: lr lambda as a vector (diagonal kinds) or a matrix
        kind, scale = _update_operator(a)
        self.dense = kind == UPDATE_DENSE
        if self.dense:
            self.scale = cuda.to_device(scale)
            self.step_buf = cuda.device_array((net.n_params, 1), dt)
        else:
            vec = np.broadcast_to(scale, (net.n_params,)) if scale.size == 1 else scale
            self.scale = cuda.to_device(np.ascontiguousarray(vec, dtype=dt))

        # buffers of one batch, and of the blocks of a whole-set evaluation
        self.B = P if a.batch_size is None else a.batch_size
        self.batch = _Buffers(widths, self.B, dt, with_backward=True)
        if a.batch_size is not None:
            self.xb = cuda.device_array((self.B, widths[0]), dt)
            self.yb = cuda.device_array((self.B, widths[-1]), dt)
        sizes = [P] + ([self.test[0].shape[0]] if self.test is not None else [])
        self.E = min(max(sizes), max(self.B, EVAL_BLOCK))
        self.eval = self.batch if self.E <= self.B else _Buffers(widths, self.E, dt)
        self.per_eval = cuda.device_array(max(sizes), np.float64)
        self.flag = cuda.to_device(np.zeros(1, np.int32))
        self.losses = cuda.device_array(1, np.float64)
        self.cur = 0

    # -- one segment of steps ------------------------------------------------------

    def run(self, order, starts, sizes):
        """Run one step per entry of ``sizes``.

        Step s uses the samples ``order[starts[s]:starts[s] + sizes[s]]``, or all
        of them in order when ``order`` is None (full batch).

        Returns (done, last_loss, bad_loss): steps completed before a
        non-finite loss (all of them when none), the last finite step loss, and
        the non-finite loss or None.  On a non-finite loss the current buffer
        holds the parameters of the failing step and the other one those of the
        step before.
        """
        from numba import cuda

        from fastntk.kernels import cuda as kernels

        a = self.a
        n_steps = len(sizes)
        if self.losses.shape[0] < n_steps:
            self.losses = cuda.device_array(n_steps, np.float64)
        self.flag.copy_to_device(np.zeros(1, np.int32))
        index = None if order is None else cuda.to_device(order)
        buf = self.batch
        start = self.cur
        for s in range(n_steps):
            # the step's batch
            if index is None:
                xb, yb, mb = self.x, self.y, self.B
            else:
                i0 = int(starts[s])
                mb = int(sizes[s])
                i1 = i0 + mb
                xb, yb = self.xb[:mb], self.yb[:mb]
                kernels.gather_rows(self.x, index[i0:i1], xb)
                kernels.gather_rows(self.y, index[i0:i1], yb)
            Ws, bs = self.views[self.cur]
            zs = [z[:mb] for z in buf.zs]
            acts = [h[:mb] for h in buf.acts] + [None]

            # forward pass, loss and error factor, backward pass
            kernels.forward_layers(Ws, bs, xb, self.code, self.slope, zs, acts)
            eps = buf.eps[:mb]
            per = buf.per[:mb]
            kernels.loss_error(zs[-1], yb, a.loss.code, a.loss.scale(mb), eps, per)
            kernels.reduce_loss(per, self.losses, s, self.flag)
            kernels.gradient(
                Ws,
                zs,
                [xb] + acts[:-1],
                eps,
                self.code,
                self.slope,
                self.gWs,
                self.gbs,
                [d[:mb] for d in buf.deltas],
            )

            # update through the learning-rate tensor, into the other buffer
            cur, nxt = self.theta[self.cur], self.theta[1 - self.cur]
            if self.dense:
                kernels.gemm(
                    self.scale, self.grad.reshape(self.grad.shape[0], 1), self.step_buf
                )
                kernels.update_dense(
                    cur, nxt, self.step_buf.reshape(self.grad.shape[0]), self.flag
                )
            else:
                kernels.update(cur, nxt, self.grad, self.scale, self.flag)
            self.cur = 1 - self.cur

        # the segment's step losses: stop at the first one that is not finite
        losses = self.losses[:n_steps].copy_to_host() if n_steps else np.zeros(0)
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size == 0:
            last = float(losses[-1]) if n_steps else math.nan
            return n_steps, last, None
        done = int(bad[0])
        # no buffer was written from the failing step on: the failing step's
        # parameters are in the buffer current at that step
        self.cur = (start + done) % 2
        last = float(losses[done - 1]) if done else math.nan
        return done, last, float(losses[done])

    # -- evaluation -------------------------------------------------------------------

    def loss_on(self, which="train", buffer=None) -> float:
        """Loss of the whole training (or test) set at the current parameters."""
        from fastntk.kernels import cuda as kernels

        x, y = (self.x, self.y) if which == "train" else self.test
        P = x.shape[0]
        scale = self.a.loss.scale(P)
        Ws, bs = self.views[self.cur if buffer is None else buffer]
        buf = self.eval
        per = self.per_eval[:P]
        for start in range(0, P, self.E):
            stop = min(P, start + self.E)
            m = stop - start
            zs = [z[:m] for z in buf.zs]
            acts = [h[:m] for h in buf.acts] + [None]
            kernels.forward_layers(
                Ws, bs, x[start:stop], self.code, self.slope, zs, acts
            )
            kernels.loss_error(
                zs[-1],
                y[start:stop],
                self.a.loss.code,
                scale,
                buf.eps[:m],
                per[start:stop],
            )
        return float(per.copy_to_host().sum())

    def theta_host(self, buffer=None) -> np.ndarray:
        """The current (or the given buffer's) parameters, copied to the host."""
        return self.theta[self.cur if buffer is None else buffer].copy_to_host()

    def load(self, theta):
        """Set the current parameters from a host vector."""
        self.theta[self.cur].copy_to_device(np.ascontiguousarray(theta))


#: Samples per block when the loss of a whole set is evaluated on recorded steps.
EVAL_BLOCK = 8192


class _Buffers:
    """Per-layer buffers of a block of m samples (forward, error, backward)."""

    def __init__(self, widths, m, dtype, with_backward=False):
        from numba import cuda

        depth = len(widths) - 1
        self.zs = [cuda.device_array((m, widths[l + 1]), dtype) for l in range(depth)]
        self.acts = [
            cuda.device_array((m, widths[l + 1]), dtype) for l in range(depth - 1)
        ]
        self.eps = cuda.device_array((m, widths[-1]), dtype)
        self.per = cuda.device_array(m, np.float64)
        self.deltas = []
        if with_backward:
            self.deltas = [
                cuda.device_array((m, 1, widths[l + 1]), dtype)
                for l in range(depth - 1)
            ]


def _on_device(x):
    # Device arrays in place (CuPy wrapped), NumPy arrays copied once.
    from numba import cuda

    from fastntk.kernels.dispatch import device_kind

    if device_kind(x) == "cupy":
        return cuda.as_cuda_array(x)
    if is_device_array(x):
        return x
    return cuda.to_device(np.ascontiguousarray(x))


# -- driver ------------------------------------------------------------------------


def _train_device(a, arrays):
    """Run the schedule with the steps on the device; same records as the CPU."""
    import os

    from fastntk.engines.train import (
        History,
        TrainingDiverged,
        _check_resume,
        _next_multiple,
        _save_checkpoint,
        _Schedule,
        load_checkpoint,
    )

    net = a.net
    T = a.total_steps
    P = arrays["x"].shape[0]
    history = History()
    schedule = _Schedule(P, a.batch_size, a.steps_per_epoch, a.seed)
    stepper = _DeviceStepper(a, arrays)
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
        stepper.load(ck.params.theta)
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
        return net.params(stepper.theta_host(), copy=False)

    def record(step):
        # losses, observables, callback and progress at ``step``
        value = stepper.loss_on("train")
        history._step.append(step)
        history._epoch.append(step / a.steps_per_epoch)
        history._train.append(value)
        if stepper.test is not None:
            history._test.append(stepper.loss_on("test"))
        params = snapshot() if (a.observables or a.callback is not None) else None
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
            return bool(a.callback(step, params, history))
        return False

    def ntk_record(step):
        # NTK snapshot with the training rates, on the device
        from fastntk.engines.ntk_cuda import ntk_cuda

        samples = a.x if a.ntk_samples is None else a.ntk_samples
        if is_device_array(arrays["x"]) and a.ntk_samples is None:
            samples = arrays["x"]
        H = ntk_cuda(net, snapshot(), samples, rates=a.rates)
        H = H if isinstance(H, np.ndarray) else H.copy_to_host()
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
        _save_checkpoint(
            a.checkpoint, a, stepper.theta_host(), step, epoch, state, history
        )

    def diverge(step, bad):
        # stop on a non-finite loss: keep the last finite parameters
        history.diverged = True
        history.diverged_step = step
        history.last_finite_loss = None if math.isnan(last_loss) else last_loss
        if have_previous:
            stepper.cur = 1 - stepper.cur
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

        # steps on the device up to the next recorded step
        t_next = min(_next_multiple(t, a.record_every), T)
        chunk = getattr(a, "chunk_steps", None)
        if chunk:
            t_next = min(t_next, t + chunk)
        if a.ntk_every is not None:
            t_next = min(t_next, _next_multiple(t, a.ntk_every))
        if a.checkpoint_every is not None:
            t_next = min(t_next, _next_multiple(t, a.checkpoint_every))
        order, starts, sizes = schedule.batches(t, t_next)
        done, step_loss, bad = stepper.run(order, starts, sizes)
        if done > 0:
            have_previous = True
            last_loss, last_step = step_loss, t + done - 1
        if bad is not None:
            message = diverge(t + done, bad)
            t = t + done
            break
        t = t_next

    if message is not None:
        final_step = history.diverged_step - (1 if have_previous else 0)
    else:
        final_step = t
    if a.checkpoint is not None and message is None:
        save(final_step)
    theta = stepper.theta_host()
    if a.inplace:
        a.params.theta[:] = theta
        result = a.params
    else:
        result = net.params(theta, copy=False)
    if message is not None:
        if a.on_divergence == "raise":
            raise TrainingDiverged(message, result, history, history.diverged_step)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return result, history


# -- one gradient ------------------------------------------------------------------


def loss_and_gradient_cuda(net, params, x, y, loss):
    """Loss and gradient dL/dtheta of validated host arrays, computed on the GPU.

    The engine behind ``fastntk.loss_and_gradient(..., backend="cuda")``: the
    whole set in one block on the device.

    Returns
    -------
    value : float
    grad : ndarray, shape (n_params,), the parameters' dtype
    """
    from numba import cuda

    from fastntk.kernels import cuda as kernels

    widths = [int(w) for w in net.widths]
    dt = params.dtype
    P = x.shape[0]
    theta = cuda.to_device(params.theta)
    Ws, bs = kernels.layer_views(theta, widths)
    grad = cuda.device_array(net.n_params, dt)
    gWs, gbs = kernels.layer_views(grad, widths)
    buf = _Buffers(widths, P, dt, with_backward=True)
    dx, dy = cuda.to_device(x), cuda.to_device(y)
    code, slope = net.activation_code, float(net.slope)

    # forward pass, loss and error factor, backward pass
    acts = buf.acts + [None]
    kernels.forward_layers(Ws, bs, dx, code, slope, buf.zs, acts)
    kernels.loss_error(buf.zs[-1], dy, loss.code, loss.scale(P), buf.eps, buf.per)
    kernels.gradient(
        Ws, buf.zs, [dx] + buf.acts, buf.eps, code, slope, gWs, gbs, buf.deltas
    )
    return float(buf.per.copy_to_host().sum()), grad.copy_to_host()
