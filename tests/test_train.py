"""Training engine: trajectories against the NumPy reference step, schedules,
checkpoints, divergence and input validation."""

import os
import warnings

import numpy as np
import pytest

import fastntk
from fastntk import rates as R
from fastntk import reference
from fastntk.engines import train as train_mod

from tolerances import assert_close

WIDTHS = [3, 7, 5, 2]


def _problem(rng, P=10, widths=WIDTHS, loss="mse", dtype=np.float64, activation="tanh"):
    net = fastntk.MLP(widths, activation=activation, C_W=1.5, C_b=0.1)
    params = net.init(seed=3, dtype=dtype)
    x = rng.standard_normal((P, widths[0])).astype(dtype)
    if loss == "mse":
        y = rng.standard_normal((P, widths[-1])).astype(dtype)
    else:
        y = np.eye(widths[-1], dtype=dtype)[rng.integers(0, widths[-1], P)]
    return net, params, x, y


def _rates_of(kind, net, rng):
    if kind is None:
        return None
    if kind == "identity":
        return R.identity()
    if kind == "layerwise":
        depth = net.depth
        return R.layerwise(
            net, rng.uniform(0.5, 2.0, depth), rng.uniform(0.5, 2.0, depth)
        )
    if kind == "diagonal":
        return R.diagonal(rng.uniform(0.1, 2.0, net.n_params))
    A = rng.standard_normal((net.n_params, net.n_params))
    return R.dense(A @ A.T / net.n_params)


def _trajectory(net, params, x, y, **kw):
    # Parameters after every step, captured through the callback.
    thetas = []

    def keep(step, p, history):
        thetas.append(p.theta.copy())

    out, hist = fastntk.train(net, params, x, y, record_every=1, callback=keep, **kw)
    return thetas, out, hist


def _check_steps(net, thetas, batches, x, y, loss, lr, rates, what):
    # Each recorded step equals the reference step from the previous parameters.
    lam = rates if rates is not None else R.identity()
    for t in range(len(thetas) - 1):
        idx = batches(t)
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])
        ref = reference.gd_step(net, net.params(thetas[t]), xb, yb, loss, lr, lam)
        assert_close(
            thetas[t + 1], ref, "reference", thetas[t].dtype, f"{what}, step {t}"
        )


# -- trajectories ----------------------------------------------------------------


KERNELS = ["fused", "blas"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", [None, "identity", "layerwise", "diagonal", "dense"])
def test_gd_matches_reference_every_rate_tensor(rng, kind, kernel):
    net, params, x, y = _problem(rng)
    rates = _rates_of(kind, net, rng)
    loss = fastntk.MSE()
    thetas, out, _ = _trajectory(
        net, params, x, y, loss=loss, lr=0.02, rates=rates, steps=6, kernel=kernel
    )
    assert len(thetas) == 7
    np.testing.assert_array_equal(thetas[-1], out.theta)
    _check_steps(
        net, thetas, lambda t: None, x, y, loss, 0.02, rates, f"GD rates={kind}"
    )


@pytest.mark.parametrize(
    "loss",
    [
        fastntk.MSE("sum"),
        fastntk.MSE("mean"),
        fastntk.CrossEntropy("sum"),
        fastntk.CrossEntropy("mean"),
    ],
)
@pytest.mark.parametrize("batch_size", [None, 1, 3, 4, 10])
@pytest.mark.parametrize("kernel", KERNELS)
def test_sgd_matches_reference_batches(rng, loss, batch_size, kernel):
    net, params, x, y = _problem(rng, loss=loss.name)
    P = x.shape[0]
    thetas, _, _ = _trajectory(
        net,
        params,
        x,
        y,
        loss=loss,
        lr=0.05,
        batch_size=batch_size,
        steps=8,
        seed=11,
        kernel=kernel,
    )
    per_epoch = 1 if batch_size is None else -(-P // batch_size)
    schedule = train_mod._Schedule(P, batch_size, per_epoch, 11)
    _check_steps(
        net,
        thetas,
        schedule.batch,
        x,
        y,
        loss,
        0.05,
        None,
        f"{loss!r} batch_size={batch_size}",
    )


@pytest.mark.parametrize("kernel", KERNELS)
def test_sgd_layerwise_rates_float32(rng, kernel):
    net, params, x, y = _problem(rng, dtype=np.float32)
    rates = _rates_of("layerwise", net, rng)
    loss = fastntk.MSE()
    thetas, out, _ = _trajectory(
        net,
        params,
        x,
        y,
        loss=loss,
        lr=0.05,
        rates=rates,
        batch_size=4,
        steps=5,
        kernel=kernel,
    )
    assert out.dtype == np.float32
    schedule = train_mod._Schedule(x.shape[0], 4, 3, 0)
    _check_steps(
        net, thetas, schedule.batch, x, y, loss, 0.05, rates, "SGD float32 layerwise"
    )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "widths,activation",
    [
        ([11, 20, 3], "leaky_relu"),
        ([4, 3], "tanh"),
        ([9, 17, 8, 1], "relu"),
        ([2, 33, 5], "gelu"),
        ([6, 12, 12, 4], "linear"),
    ],
)
def test_odd_shapes_and_activations(rng, widths, activation, kernel):
    net, params, x, y = _problem(rng, P=13, widths=widths, activation=activation)
    loss = fastntk.MSE("mean")
    thetas, _, _ = _trajectory(
        net, params, x, y, loss=loss, lr=0.05, batch_size=5, steps=4, kernel=kernel
    )
    schedule = train_mod._Schedule(13, 5, 3, 0)
    _check_steps(
        net, thetas, schedule.batch, x, y, loss, 0.05, None, f"{widths} {activation}"
    )


@pytest.mark.parametrize("batch_size", [None, 7])
def test_blas_blocks_match_reference(rng, monkeypatch, batch_size):
    # batches split into blocks of 3 rows, gradients accumulated over blocks
    monkeypatch.setattr(train_mod, "BLAS_BLOCK", 3)
    net, params, x, y = _problem(rng, loss="cross_entropy")
    loss = fastntk.CrossEntropy("mean")
    thetas, _, _ = _trajectory(
        net,
        params,
        x,
        y,
        loss=loss,
        lr=0.1,
        batch_size=batch_size,
        steps=4,
        kernel="blas",
    )
    per_epoch = 1 if batch_size is None else 2
    schedule = train_mod._Schedule(10, batch_size, per_epoch, 0)
    _check_steps(net, thetas, schedule.batch, x, y, loss, 0.1, None, "blocks")


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_agree_on_longer_run(rng, kernel):
    net, params, x, y = _problem(rng, P=40, widths=[6, 24, 24, 3])
    kw = dict(loss="mse", lr=0.01, batch_size=8, steps=60, record_every=60)
    ref, _ = fastntk.train(net, params, x, y, kernel="fused", **kw)
    out, _ = fastntk.train(net, params, x, y, kernel=kernel, **kw)
    assert_close(out.theta, ref.theta, "algorithms", np.float64, f"{kernel} vs fused")


@pytest.mark.parametrize("threads", [1, 2])
def test_blas_thread_ranges_match_reference(rng, threads):
    # one range of samples per thread, gradients summed over the ranges
    net, params, x, y = _problem(rng)
    loss = fastntk.MSE("sum")
    thetas, _, _ = _trajectory(
        net,
        params,
        x,
        y,
        loss=loss,
        lr=0.02,
        steps=3,
        kernel="blas",
        threads=threads,
    )
    _check_steps(net, thetas, lambda t: None, x, y, loss, 0.02, None, "ranges")


@pytest.mark.parametrize("kind", ["identity", "diagonal", "dense"])
@pytest.mark.parametrize("batch_size", [None, 1, 4])
def test_thread_team_matches_reference(rng, kind, batch_size):
    # two threads split each batch and then the parameters between them (a
    # batch of one leaves the second thread without samples)
    net, params, x, y = _problem(rng)
    rates = _rates_of(kind, net, rng)
    loss = fastntk.MSE("mean")
    kw = dict(loss=loss, lr=0.02, rates=rates, batch_size=batch_size, seed=4)
    thetas, out, _ = _trajectory(
        net, params, x, y, steps=5, kernel="blas", threads=2, **kw
    )
    per_epoch = 1 if batch_size is None else -(-x.shape[0] // batch_size)
    schedule = train_mod._Schedule(x.shape[0], batch_size, per_epoch, 4)
    _check_steps(net, thetas, schedule.batch, x, y, loss, 0.02, rates, kind)
    again, _ = fastntk.train(net, params, x, y, steps=5, kernel="blas", threads=2, **kw)
    np.testing.assert_array_equal(again.theta, out.theta)


def test_thread_team_stops_at_divergence(rng):
    net, params, x, y = _problem(rng, activation="relu")
    kw = dict(loss="mse", lr=3.0, record_every=1000, kernel="blas", threads=2)
    with pytest.warns(RuntimeWarning, match="diverged"):
        out, hist = fastntk.train(net, params, x, y * 100, steps=500, **kw)
    before, _ = fastntk.train(
        net, params, x, y * 100, steps=hist.diverged_step - 1, **kw
    )
    np.testing.assert_array_equal(out.theta, before.theta)


@pytest.mark.parametrize("kernel", KERNELS)
def test_chunking_does_not_change_results(rng, monkeypatch, kernel):
    # the same run cut into steps between records, or capped chunks
    net, params, x, y = _problem(rng)
    kw = dict(loss="mse", lr=0.05, batch_size=3, steps=23, kernel=kernel)
    ref, _ = fastntk.train(net, params, x, y, record_every=1000, **kw)
    for every in (1, 4, 7):
        out, _ = fastntk.train(net, params, x, y, record_every=every, **kw)
        np.testing.assert_array_equal(out.theta, ref.theta)
    monkeypatch.setattr(train_mod, "MAX_CHUNK_SAMPLES", 5)
    out, _ = fastntk.train(net, params, x, y, record_every=1000, **kw)
    np.testing.assert_array_equal(out.theta, ref.theta)


@pytest.mark.parametrize(
    "P,batch_size,policy",
    [(10, 3, "keep"), (10, 5, "keep"), (10, 3, "drop"), (7, 7, "keep")],
)
def test_every_sample_once_per_epoch(P, batch_size, policy):
    per_epoch = -(-P // batch_size) if policy == "keep" else P // batch_size
    schedule = train_mod._Schedule(P, batch_size, per_epoch, 5)
    epochs = []
    for epoch in range(4):
        seen = np.concatenate(
            [schedule.batch(epoch * per_epoch + s) for s in range(per_epoch)]
        )
        epochs.append(seen)
        if policy == "keep":
            np.testing.assert_array_equal(np.sort(seen), np.arange(P))
        else:
            assert len(seen) == per_epoch * batch_size
            assert len(np.unique(seen)) == len(seen)
    # the shuffle changes from one epoch to the next
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("P,batch_size", [(1, 1), (2, 1), (37, 5), (512, 8)])
def test_shuffles_are_numpys_permutations(P, batch_size):
    # epoch e's order is the e-th Generator.permutation(P) of the seeded
    # generator, whether the steps are asked for one run or in pieces, and the
    # recorded state is the generator's state at the start of the epoch
    per_epoch = -(-P // batch_size)
    numpy_rng = np.random.default_rng(9)
    perms, states = [], []
    for _ in range(7):
        states.append(numpy_rng.bit_generator.state)
        perms.append(numpy_rng.permutation(P))
    schedule = train_mod._Schedule(P, batch_size, per_epoch, 9)
    cuts = [0, 1, 3 * per_epoch + 1, 3 * per_epoch + 2, 7 * per_epoch]
    for t0, t1 in zip(cuts[:-1], cuts[1:]):
        if t1 <= t0:
            continue
        order, starts, sizes = schedule.batches(t0, t1)
        for t in range(t0, t1):
            epoch, pos = divmod(t, per_epoch)
            want = perms[epoch][pos * batch_size : (pos + 1) * batch_size]
            s = t - t0
            np.testing.assert_array_equal(order[starts[s] : starts[s] + sizes[s]], want)
        epoch, state = schedule.state_at(t1 - 1)
        assert epoch == (t1 - 1) // per_epoch
        assert state == states[epoch]
    with pytest.raises(RuntimeError, match="in order"):
        schedule.batches(0, 1)


def test_epochs_count_steps(rng):
    net, params, x, y = _problem(rng)
    _, hist = fastntk.train(
        net, params, x, y, loss="mse", lr=0.01, epochs=3, batch_size=4, record_every=100
    )
    assert hist.step.tolist() == [0, 9]
    assert hist.epoch.tolist() == [0.0, 3.0]
    _, hist = fastntk.train(
        net,
        params,
        x,
        y,
        loss="mse",
        lr=0.01,
        epochs=3,
        batch_size=4,
        last_batch="drop",
        record_every=100,
    )
    assert hist.step.tolist() == [0, 6]


def test_small_lr_gd_decreases_monotonically(rng):
    net, params, x, y = _problem(rng, P=16)
    _, hist = fastntk.train(
        net, params, x, y, loss="mse", lr=1e-3, steps=200, record_every=1
    )
    assert np.all(np.diff(hist.train_loss) < 0)


def test_history_test_loss_and_observables(rng):
    net, params, x, y = _problem(rng)
    xt, yt = x[:4] + 0.5, y[:4]
    loss = fastntk.MSE("mean")
    out, hist = fastntk.train(
        net,
        params,
        x,
        y,
        loss=loss,
        lr=0.05,
        steps=7,
        record_every=3,
        test=(xt, yt),
        observables={"z0": lambda p: net.apply(p, x[:1])[0]},
    )
    assert hist.step.tolist() == [0, 3, 6, 7]
    assert_close(
        hist.train_loss[-1],
        reference.loss_value(loss, reference.apply(net, out, x), y),
        "reference",
        np.float64,
        "final train loss",
    )
    assert_close(
        hist.test_loss[-1],
        reference.loss_value(loss, reference.apply(net, out, xt), yt),
        "reference",
        np.float64,
        "final test loss",
    )
    assert hist.observables["z0"].shape == (4, 2)
    assert_close(
        hist.observables["z0"][0],
        reference.apply(net, params, x[:1])[0],
        "reference",
        np.float64,
        "observable at step 0",
    )


def test_ntk_snapshots_and_drift(rng):
    net, params, x, y = _problem(rng, P=5)
    out, hist = fastntk.train(
        net, params, x, y, loss="mse", lr=0.05, steps=6, ntk_every=3, rates=R.identity()
    )
    assert hist.ntk_step.tolist() == [0, 3, 6]
    assert hist.kernel_drift[0] == 0.0
    assert np.all(hist.kernel_drift[1:] > 0)
    H6 = np.asarray(hist.ntk[-1], dtype=np.float64)
    H0 = np.asarray(hist.ntk[0], dtype=np.float64)
    assert_close(
        hist.kernel_drift[-1],
        np.linalg.norm(H6 - H0) / np.linalg.norm(H0),
        "reference",
        np.float64,
        "kernel drift",
    )


def test_input_params_untouched_unless_inplace(rng):
    net, params, x, y = _problem(rng)
    before = params.theta.copy()
    out, _ = fastntk.train(net, params, x, y, loss="mse", lr=0.05, steps=3)
    np.testing.assert_array_equal(params.theta, before)
    assert out is not params
    out2, _ = fastntk.train(
        net, params, x, y, loss="mse", lr=0.05, steps=3, inplace=True
    )
    assert out2 is params
    np.testing.assert_array_equal(params.theta, out.theta)


def test_progress_and_exports(rng, capsys):
    net, params, x, y = _problem(rng)
    _, hist = fastntk.train(
        net,
        params,
        x,
        y,
        loss="mse",
        lr=0.01,
        steps=6,
        record_every=3,
        progress=True,
    )
    err = capsys.readouterr().err
    assert "step 6/6" in err and "loss" in err
    assert isinstance(hist, fastntk.History)
    assert fastntk.TrainingDiverged is train_mod.TrainingDiverged


def test_callback_stops_training(rng):
    net, params, x, y = _problem(rng)
    _, hist = fastntk.train(
        net,
        params,
        x,
        y,
        loss="mse",
        lr=0.01,
        steps=50,
        record_every=5,
        callback=lambda s, p, h: s >= 10,
    )
    assert hist.step.tolist() == [0, 5, 10]


# -- determinism and checkpoints -------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("batch_size", [None, 3])
def test_same_seed_bit_identical(rng, batch_size, kernel):
    net, params, x, y = _problem(rng)
    kw = dict(
        loss="mse", lr=0.05, steps=13, batch_size=batch_size, seed=4, kernel=kernel
    )
    a, _ = fastntk.train(net, params, x, y, **kw)
    b, _ = fastntk.train(net, params, x, y, **kw)
    np.testing.assert_array_equal(a.theta, b.theta)
    if batch_size is not None:
        c, _ = fastntk.train(net, params, x, y, **dict(kw, seed=5))
        assert not np.array_equal(a.theta, c.theta)


@pytest.mark.parametrize(
    "batch_size,stop,kernel",
    [
        (None, 7, "fused"),
        (3, 7, "fused"),
        (3, 8, "blas"),
        (4, 12, "fused"),
        (None, 5, "blas"),
    ],
)
def test_checkpoint_resume_bit_identical(rng, tmp_path, batch_size, stop, kernel):
    net, params, x, y = _problem(rng)
    path = tmp_path / "run.npz"
    kw = dict(
        kernel=kernel,
        loss="mse",
        lr=0.05,
        batch_size=batch_size,
        seed=9,
        record_every=2,
        test=(x[:3], y[:3]),
    )
    full, hist_full = fastntk.train(net, params, x, y, steps=20, **kw)

    # interrupted at ``stop``, then resumed from the file
    fastntk.train(net, params, x, y, steps=stop, checkpoint=path, **kw)
    ck = fastntk.load_checkpoint(path)
    assert ck.step == stop
    assert ck.epoch == (stop if batch_size is None else stop // -(-10 // batch_size))
    resumed, hist = fastntk.train(
        net, params, x, y, steps=20, checkpoint=path, resume=True, **kw
    )
    np.testing.assert_array_equal(resumed.theta, full.theta)
    np.testing.assert_array_equal(hist.step, hist_full.step)
    np.testing.assert_array_equal(hist.train_loss, hist_full.train_loss)
    np.testing.assert_array_equal(hist.test_loss, hist_full.test_loss)
    assert fastntk.load_checkpoint(path).step == 20


def test_periodic_checkpoints_atomic(rng, tmp_path):
    net, params, x, y = _problem(rng)
    path = tmp_path / "run.npz"
    seen = []

    def look(step, p, h):
        if path.exists():
            seen.append(fastntk.load_checkpoint(path).step)

    fastntk.train(
        net,
        params,
        x,
        y,
        loss="mse",
        lr=0.05,
        steps=9,
        batch_size=2,
        checkpoint=path,
        checkpoint_every=4,
        record_every=1,
        callback=look,
    )
    assert seen[-1] == 8 and 4 in seen
    assert fastntk.load_checkpoint(path).step == 9
    assert sorted(os.listdir(tmp_path)) == ["run.npz"]


def test_resume_rejects_other_settings(rng, tmp_path):
    net, params, x, y = _problem(rng)
    path = tmp_path / "run.npz"
    fastntk.train(
        net, params, x, y, loss="mse", lr=0.05, steps=3, batch_size=2, checkpoint=path
    )
    with pytest.raises(ValueError, match="batch_size"):
        fastntk.train(
            net,
            params,
            x,
            y,
            loss="mse",
            lr=0.05,
            steps=6,
            batch_size=3,
            checkpoint=path,
            resume=True,
        )
    with pytest.raises(ValueError, match="past the 2 steps"):
        fastntk.train(
            net,
            params,
            x,
            y,
            loss="mse",
            lr=0.05,
            steps=2,
            batch_size=2,
            checkpoint=path,
            resume=True,
        )


# -- divergence ------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [None, 2])
def test_divergence_warns_and_returns_last_finite(rng, batch_size):
    net, params, x, y = _problem(rng, activation="relu")
    kw = dict(loss="mse", lr=3.0, batch_size=batch_size, record_every=1000)
    with pytest.warns(RuntimeWarning, match=r"diverged at step \d+.*lr=3"):
        out, hist = fastntk.train(net, params, x, y * 100, steps=500, **kw)
    assert hist.diverged
    step = hist.diverged_step
    assert np.all(np.isfinite(out.theta))

    # the returned parameters are those of the step before the divergence
    before, _ = fastntk.train(net, params, x, y * 100, steps=step - 1, **kw)
    np.testing.assert_array_equal(out.theta, before.theta)
    assert np.isfinite(hist.last_finite_loss)


def test_divergence_can_raise(rng):
    net, params, x, y = _problem(rng, activation="relu")
    with pytest.raises(train_mod.TrainingDiverged, match="diverged") as info:
        fastntk.train(
            net,
            params,
            x,
            y * 100,
            loss="mse",
            lr=3.0,
            steps=500,
            on_divergence="raise",
        )
    assert np.all(np.isfinite(info.value.params.theta))
    assert info.value.history.diverged


# -- bad inputs ------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(batch_size=11), ValueError, "batch_size.*at most"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size=2.5), TypeError, "batch_size"),
        (dict(steps=None), ValueError, "exactly one"),
        (dict(epochs=2), ValueError, "exactly one"),
        (dict(steps=-1), ValueError, "steps"),
        (dict(test=(np.zeros((4, 2)), np.zeros((4, 2)))), ValueError, "x_test"),
        (dict(test=(np.zeros((4, 3)), np.zeros((3, 2)))), ValueError, "y_test"),
        (dict(test=np.zeros((4, 3))), TypeError, "pair"),
        (dict(loss="hinge"), TypeError, "loss"),
        (dict(rates="layerwise"), TypeError, "rates"),
        (dict(record_every=0), ValueError, "record_every"),
        (dict(last_batch="pad"), ValueError, "last_batch"),
        (dict(on_divergence="ignore"), ValueError, "on_divergence"),
        (dict(resume=True), ValueError, "checkpoint"),
        (dict(checkpoint_every=3), ValueError, "checkpoint"),
        (dict(threads=0), ValueError, "threads"),
        (dict(backend="tpu"), ValueError, "backend"),
        (dict(observables={"a": 3}), TypeError, "observables"),
        (dict(callback=5), TypeError, "callback"),
        (dict(seed=-1), TypeError, "seed"),
        (dict(kernel="gpu"), ValueError, "kernel"),
    ],
)
def test_bad_arguments_raise(rng, change, error, match):
    net, params, x, y = _problem(rng)
    kw = dict(loss="mse", lr=0.1, steps=3)
    kw.update(change)
    with pytest.raises(error, match=match):
        fastntk.train(net, params, x, y, **kw)


@pytest.mark.parametrize(
    "which", ["x_nan", "y_nan", "x_shape", "y_shape", "x_dtype", "params"]
)
def test_bad_arrays_raise(rng, which):
    net, params, x, y = _problem(rng)
    if which == "x_nan":
        x[2, 1] = np.nan
    elif which == "y_nan":
        y[0, 0] = np.inf
    elif which == "x_shape":
        x = x[:, :2]
    elif which == "y_shape":
        y = y[:5]
    elif which == "x_dtype":
        x = x.astype(np.float32)
    else:
        params = params.theta
    with pytest.raises((ValueError, TypeError)):
        fastntk.train(net, params, x, y, loss="mse", lr=0.1, steps=3)


def test_bad_rates_for_network(rng):
    net, params, x, y = _problem(rng)
    with pytest.raises(ValueError, match="rates"):
        fastntk.train(
            net,
            params,
            x,
            y,
            loss="mse",
            lr=0.1,
            steps=3,
            rates=R.diagonal(np.ones(net.n_params + 1)),
        )


def test_validation_before_any_work(rng, tmp_path):
    # a bad late argument leaves no checkpoint behind
    net, params, x, y = _problem(rng)
    path = tmp_path / "run.npz"
    with pytest.raises(ValueError):
        fastntk.train(
            net,
            params,
            x,
            y,
            loss="mse",
            lr=0.1,
            steps=3,
            checkpoint=path,
            last_batch="pad",
        )
    assert not path.exists()


def test_zero_steps_returns_copy(rng):
    net, params, x, y = _problem(rng)
    out, hist = fastntk.train(net, params, x, y, loss="mse", lr=0.1, steps=0)
    np.testing.assert_array_equal(out.theta, params.theta)
    assert hist.step.tolist() == [0]


def test_no_warning_when_converging(rng):
    net, params, x, y = _problem(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastntk.train(net, params, x, y, loss="mse", lr=0.01, steps=20)
