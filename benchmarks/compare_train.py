"""Training speed of fastntk against plain loops of other frameworks.

Times, in one run, the microseconds per step of ``fastntk.train`` and of

- a plain NumPy loop with manual backpropagation (always),
- a PyTorch eager loop (autograd), when torch is installed,
- a JAX ``jit`` step inside ``lax.scan``, when jax is installed,

on two workloads (ReLU networks, mean squared error with the mean reduction):

- ``gd``: widths [64, 128, 128, 10], P = 512, full-batch gradient descent,
  500 steps;
- ``sgd``: widths [64, 16, 16, 1], P = 512, mini-batches of 8, 5000 steps.

Every framework starts from the same parameters and, for SGD, visits the same
mini-batches (fastntk's seeded schedule); the final training loss of each is
compared with the NumPy loop's.  Each timing is the median over ``--repeat``
runs of a whole training, after one warm-up run (compilation); the runs go in
rounds, every framework once per round, each after a short pause
(``compare_ntk.settle``).  The table gives microseconds per step, steps per
second, the speed-up of fastntk over each framework, the relative difference
of the final loss, and GFLOP/s from the operation count of a step (matrix
products only: forward, weight gradients, and input gradients of every layer
but the first) with their fraction of the machine's BLAS GEMM rate, measured
in the same rounds.  A step made of matrix products cannot run faster than
that rate, which bounds any framework's lead on the full-batch workload.

Run from the repository root (after ``python setup.py build_ext --inplace``)::

    python benchmarks/compare_train.py --repeat 5
    python benchmarks/compare_train.py --workload sgd --dtype float64 --repeat 9

On a shared machine, serialize timings with ``flock /tmp/fastntk-bench.lock``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import fastntk
from fastntk.engines.train import _Schedule

try:  # imported by the asv suite as part of the benchmarks package
    from .compare_ntk import gemm_function, settle
except ImportError:  # run as a script from the repository root
    from compare_ntk import gemm_function, settle

WORKLOADS = {
    "gd": dict(widths=[64, 128, 128, 10], P=512, batch=None, steps=500, lr=0.05),
    "sgd": dict(widths=[64, 16, 16, 1], P=512, batch=8, steps=5000, lr=0.01),
}
SEED = 0


def problem(name, dtype):
    """Network, parameters, data and the per-step sample indices of a workload."""
    w = WORKLOADS[name]
    net = fastntk.MLP(w["widths"], activation="relu", C_W=2.0, C_b=0.05)
    params = net.init(seed=SEED, dtype=dtype)
    rng = np.random.default_rng(SEED + 1)
    x = rng.standard_normal((w["P"], w["widths"][0])).astype(dtype)
    teacher = fastntk.MLP(w["widths"], activation="tanh", C_W=1.0).init(seed=7)
    y = np.tanh(
        fastntk.MLP(w["widths"], activation="tanh", C_W=1.0).apply(
            teacher, x.astype(np.float64)
        )
    ).astype(dtype)
    if w["batch"] is None:
        batches = None
    else:
        per_epoch = -(-w["P"] // w["batch"])
        order, starts, sizes = _Schedule(w["P"], w["batch"], per_epoch, SEED).batches(
            0, w["steps"]
        )
        batches = np.stack([order[s : s + w["batch"]] for s in starts])
        assert np.all(sizes == w["batch"])
    return net, params, x, y, batches


def step_flops(name):
    """Floating-point operations of the matrix products of one training step."""
    w = WORKLOADS[name]
    rows = w["P"] if w["batch"] is None else w["batch"]
    pairs = list(zip(w["widths"][:-1], w["widths"][1:]))
    forward = sum(k * n for k, n in pairs)
    backward = forward + sum(k * n for k, n in pairs[1:])
    return 2.0 * rows * (forward + backward)


def final_loss(net, weights, biases, x, y):
    """Training loss (MSE, mean over samples) in float64 at the given parameters."""
    a = x.astype(np.float64)
    for i, (W, b) in enumerate(zip(weights, biases)):
        a = a @ np.asarray(W, np.float64).T + np.asarray(b, np.float64)
        if i < len(weights) - 1:
            a = np.maximum(a, 0.0)
    return 0.5 * float(np.sum((a - y) ** 2)) / len(x)


# -- contestants -----------------------------------------------------------------
# Each returns (seconds for the whole run, final loss).


def run_fastntk(net, params, x, y, batches, w):
    t0 = time.perf_counter()
    out, _ = fastntk.train(
        net,
        params,
        x,
        y,
        loss=fastntk.MSE("mean"),
        lr=w["lr"],
        steps=w["steps"],
        batch_size=w["batch"],
        seed=SEED,
        record_every=w["steps"],
    )
    seconds = time.perf_counter() - t0
    return seconds, final_loss(net, out.weights, out.biases, x, y)


def run_numpy(net, params, x, y, batches, w):
    Ws = [W.copy() for W in params.weights]
    bs = [b.copy() for b in params.biases]
    lr = params.dtype.type(w["lr"])
    depth = len(Ws)
    t0 = time.perf_counter()
    for t in range(w["steps"]):
        if batches is None:
            xb, yb = x, y
        else:
            xb, yb = x[batches[t]], y[batches[t]]

        # forward pass, keeping preactivations and activations
        acts, zs = [xb], []
        for i in range(depth):
            z = acts[-1] @ Ws[i].T
            z += bs[i]
            zs.append(z)
            if i < depth - 1:
                acts.append(np.maximum(z, 0))

        # error factor of the mean squared error, then backpropagation
        d = (zs[-1] - yb) * params.dtype.type(1.0 / len(xb))
        for i in range(depth - 1, -1, -1):
            gW = d.T @ acts[i]
            gb = d.sum(axis=0)
            if i > 0:
                d = (d @ Ws[i]) * (zs[i - 1] > 0)
            Ws[i] -= lr * gW
            bs[i] -= lr * gb
    seconds = time.perf_counter() - t0
    return seconds, final_loss(net, Ws, bs, x, y)


def run_torch(net, params, x, y, batches, w):
    import torch

    torch.set_num_threads(2)
    dt = torch.float64 if params.dtype == np.float64 else torch.float32
    Ws = [torch.tensor(W, dtype=dt, requires_grad=True) for W in params.weights]
    bs = [torch.tensor(b, dtype=dt, requires_grad=True) for b in params.biases]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    bt = None if batches is None else torch.from_numpy(batches)
    depth = len(Ws)
    t0 = time.perf_counter()
    for t in range(w["steps"]):
        xb, yb = (xt, yt) if bt is None else (xt[bt[t]], yt[bt[t]])
        a = xb
        for i in range(depth):
            a = torch.addmm(bs[i], a, Ws[i].T)
            if i < depth - 1:
                a = torch.relu(a)
        loss = 0.5 * ((a - yb) ** 2).sum() / len(xb)
        loss.backward()
        with torch.no_grad():
            for p in (*Ws, *bs):
                p -= w["lr"] * p.grad
                p.grad = None
    seconds = time.perf_counter() - t0
    weights = [W.detach().numpy() for W in Ws]
    biases = [b.detach().numpy() for b in bs]
    return seconds, final_loss(net, weights, biases, x, y)


_JAX_CACHE = {}


def run_jax(net, params, x, y, batches, w):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    key = (id(w), params.dtype.str)
    if key not in _JAX_CACHE:
        depth = net.depth

        def loss_fn(p, xb, yb):
            a = xb
            for i in range(depth):
                a = a @ p[2 * i].T + p[2 * i + 1]
                if i < depth - 1:
                    a = jax.nn.relu(a)
            return 0.5 * jnp.sum((a - yb) ** 2) / xb.shape[0]

        grad_fn = jax.grad(loss_fn)

        def step(p, idx):
            xb, yb = (xj, yj) if idx is None else (xj[idx], yj[idx])
            g = grad_fn(p, xb, yb)
            return [pi - w["lr"] * gi for pi, gi in zip(p, g)], None

        xj, yj = jnp.asarray(x), jnp.asarray(y)
        if batches is None:
            run = jax.jit(
                lambda p: jax.lax.scan(
                    lambda c, _: step(c, None), p, None, length=w["steps"]
                )[0]
            )
        else:
            run = jax.jit(lambda p, b: jax.lax.scan(step, p, b)[0])
        _JAX_CACHE[key] = run
    run = _JAX_CACHE[key]
    p0 = [jnp.asarray(v) for pair in zip(params.weights, params.biases) for v in pair]
    args = (p0,) if batches is None else (p0, jnp.asarray(batches))
    t0 = time.perf_counter()
    out = run(*args)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - t0
    weights = [np.asarray(v) for v in out[0::2]]
    biases = [np.asarray(v) for v in out[1::2]]
    return seconds, final_loss(net, weights, biases, x, y)


CONTESTANTS = {
    "fastntk": run_fastntk,
    "numpy": run_numpy,
    "torch": run_torch,
    "jax": run_jax,
}


def available(name):
    if name in ("fastntk", "numpy"):
        return True
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="timed runs per measurement (median reported)",
    )
    parser.add_argument(
        "--workload", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS)
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=["float32", "float64"],
        choices=["float32", "float64"],
    )
    parser.add_argument(
        "--frameworks", nargs="+", default=list(CONTESTANTS), choices=list(CONTESTANTS)
    )
    args = parser.parse_args(argv)

    rows = []
    for name in args.workload:
        w = WORKLOADS[name]
        for dtype in args.dtype:
            net, params, x, y, batches = problem(name, np.dtype(dtype))
            present = []
            for fw in args.frameworks:
                if available(fw):
                    present.append(fw)
                else:
                    print(f"# {fw}: not installed, skipped", file=sys.stderr)
            # warm-up (compilation), then rounds in which every framework takes
            # a turn, so that a change of the machine's speed during the run
            # affects all of them alike
            for fw in present:
                CONTESTANTS[fw](net, params, x, y, batches, w)
            gemm, gemm_flops = gemm_function(dtype)
            gemm()
            times = {fw: [] for fw in present}
            gemm_times = []
            losses = {}
            for _ in range(args.repeat):
                for fw in present:
                    settle()
                    seconds, losses[fw] = CONTESTANTS[fw](net, params, x, y, batches, w)
                    times[fw].append(seconds)
                settle()
                t0 = time.perf_counter()
                gemm()
                gemm_times.append(time.perf_counter() - t0)
            results = {
                fw: (statistics.median(times[fw]) / w["steps"] * 1e6, losses[fw])
                for fw in present
            }
            gemm_rate = gemm_flops / statistics.median(gemm_times) / 1e9
            rows.append((name, dtype, results, gemm_rate))

    # table: us/step, steps/s, fastntk speed-up, final loss vs the NumPy loop
    print(
        f"{'workload':8} {'dtype':8} {'framework':10} {'us/step':>10} "
        f"{'steps/s':>10} {'fastntk x':>10} {'loss rel. diff':>15} "
        f"{'GFLOP/s':>8} {'of GEMM':>7}"
    )
    for name, dtype, results, gemm_rate in rows:
        base = results.get("numpy", (None, None))[1]
        ours = results.get("fastntk", (None, None))[0]
        flops = step_flops(name)
        for fw, (us, loss) in results.items():
            speedup = f"{us / ours:10.2f}" if ours else f"{'-':>10}"
            diff = abs(loss - base) / abs(base) if base else float("nan")
            rate = flops / us / 1e3
            print(
                f"{name:8} {dtype:8} {fw:10} {us:10.2f} {1e6 / us:10.0f} "
                f"{speedup} {diff:15.2e} {rate:8.1f} {rate / gemm_rate:7.0%}"
            )
        print(f"{name:8} {dtype:8} {'GEMM':10} {'':>48} {gemm_rate:8.1f}")
        others = [us for fw, (us, _) in results.items() if fw != "fastntk"]
        if ours and others:
            print(
                f"{name:8} {dtype:8} {'best other / fastntk':>32} "
                f"{min(others) / ours:.2f}"
            )
    return rows


if __name__ == "__main__":
    main()
