"""Device check of fastntk's CUDA backend: correctness against the CPU, then speed.

Run it as is on a machine with an NVIDIA GPU, numba-cuda (with its NVVM, e.g.
``numba-cuda[cu12]``) and, optionally, CuPy, torch and JAX; it installs nothing:

    python benchmarks/gpu_check.py

1. Checks every CUDA path against the CPU float64 result, in float32 and float64
   and with each available matrix-product implementation (cuBLAS through CuPy,
   the numba tiled kernel): the structured NTK (full, trace, diagonal, per
   layer, cross and symmetric, tiled with streaming to the host, device inputs
   and outputs, a memmap result), the Jacobian NTK (diagonal and dense rates)
   and training (GD, SGD, layerwise and dense rates, both losses).
2. Times a large matrix product (the card's ceiling), the NTK on workloads
   B ([64, 512, 512, 512, 1], P = 1024) and C ([64, 256, 256, 1], P = 4096, and
   P = 20,000), the NTK's matrix-product phase alone, a training run, and the
   torch.func and JAX Jacobian-contraction recipes of workload B when those
   libraries see the GPU.
3. Prints one table: seconds, GFLOP/s, fraction of the ceiling, relative error
   against the CPU float64 result, and the target where there is one.

The exit status is 1 when a correctness check misses its tolerance.  The whole
run takes under five minutes on a recent data-centre GPU (most of it the first
compilation of the kernels).  ``--simulate-tiny`` runs the same code under
numba's CUDA simulator on tiny sizes, to test the script without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

#: Workload sizes: the real ones, and tiny ones for the simulator.
SIZES = {
    "real": {
        "B": ([64, 512, 512, 512, 1], 1024),
        "C": ([64, 256, 256, 1], 4096),
        "C20k": ([64, 256, 256, 1], 20000),
        "gemm": 8192,
        "gemm_numba": 4096,
        "gd": ([64, 512, 512, 10], 4096, 100),
        "sgd": ([64, 256, 256, 1], 4096, 256, 200),
        "check_P": 150,
        "repeats": 5,
    },
    "tiny": {
        "B": ([4, 6, 6, 6, 1], 10),
        "C": ([4, 6, 6, 1], 12),
        "C20k": ([4, 6, 6, 1], 16),
        "gemm": 16,
        "gemm_numba": 8,
        "gd": ([4, 6, 6, 3], 12, 2),
        "sgd": ([4, 6, 6, 1], 12, 4, 3),
        "check_P": 7,
        "repeats": 1,
    },
}

#: Relative error targets against the CPU float64 result.
NTK_TARGET = {"float32": 1e-5, "float64": 1e-12}
TRAIN_TARGET = {"float32": 1e-4, "float64": 1e-11}

#: Seconds after which the optional timings are skipped (not under the simulator,
#: whose purpose is to run every line of this script).
TIME_BUDGET = 270.0


class Report:
    """Rows of the final table, and whether every check passed."""

    def __init__(self):
        self.rows = []
        self.failed = []
        self.start = time.perf_counter()

    def elapsed(self):
        if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            return 0.0
        return time.perf_counter() - self.start

    def add(
        self,
        section,
        case,
        dtype="",
        seconds=None,
        gflops=None,
        ceiling=None,
        error=None,
        target=None,
        note="",
    ):
        ok = ""
        if error is not None and target is not None:
            ok = "yes" if error <= target else "NO"
            if ok == "NO":
                self.failed.append(f"{section}: {case} [{dtype}]")
        frac = gflops / ceiling if gflops and ceiling else None
        self.rows.append(
            (section, case, dtype, seconds, gflops, frac, error, target, ok, note)
        )
        print(
            f"  {section:8s} {case:44s} {dtype:8s} "
            f"{_fmt(seconds, '.4g')} {_fmt(error, '.1e')} {ok} {note}",
            flush=True,
        )

    def table(self):
        head = (
            "section",
            "case",
            "dtype",
            "seconds",
            "GFLOP/s",
            "of ceiling",
            "rel. error",
            "target",
            "ok",
            "note",
        )
        body = [
            (
                s,
                c,
                d,
                _fmt(t, ".4g"),
                _fmt(g, ".1f"),
                _fmt(f, ".0%"),
                _fmt(e, ".1e"),
                _fmt(tg, ".0e"),
                ok,
                n,
            )
            for s, c, d, t, g, f, e, tg, ok, n in self.rows
        ]
        widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
        line = " | ".join(f"{{:{w}s}}" for w in widths)
        out = [line.format(*head), "-+-".join("-" * w for w in widths)]
        out += [line.format(*map(str, r)) for r in body]
        return "\n".join(out)


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def timed(fn, repeats, sync, *args):
    """Median seconds of ``fn(*args)`` over ``repeats`` calls after a warm-up."""
    import numpy as np

    result = fn(*args)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(*args)
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), result


def rel_error(fast, ref):
    import numpy as np

    fast = np.asarray(fast, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.abs(fast - ref).max() / max(np.abs(ref).max(), 1e-300))


def problem(widths, P, dtype, activation="relu", seed=0):
    """Network, parameters in ``dtype``, inputs, targets; and float64 twins."""
    import numpy as np

    import fastntk

    net = fastntk.MLP(widths, activation=activation, C_b=0.0, C_W=2.0)
    params = net.init(seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((P, widths[0])).astype(dtype)
    y = rng.standard_normal((P, widths[-1])).astype(dtype)
    # the same function in float64: the CPU reference of every comparison
    params64 = net.params(params.theta.astype(np.float64))
    return net, params, x, y, params64, x.astype(np.float64), y.astype(np.float64)


# -- correctness -------------------------------------------------------------------


def check_paths(report, size, blas_list):
    """Every CUDA path against the CPU float64 result."""
    from fastntk.kernels import cuda as kernels

    for dtype in ("float32", "float64"):
        for blas in blas_list:
            with kernels.launch_config(blas=blas):
                _ntk_checks(report, size["check_P"], dtype, f"[{blas}]")
                _train_checks(report, size["check_P"], dtype, f"[{blas}]")


def _run_check(report, label, dtype, target, fast, slow):
    # One comparison; an exception is reported as a failure, not raised.
    try:
        report.add(
            "check", label, dtype, error=rel_error(fast(), slow()), target=target
        )
    except Exception as exc:  # report and go on
        report.failed.append(f"{label}: {exc!r}")
        report.add("check", label, dtype, note=f"FAILED {type(exc).__name__}: {exc}")


def _ntk_checks(report, P, dtype, tag):
    import numpy as np
    from numba import cuda

    import fastntk
    from fastntk.engines.ntk_cuda import ntk_cuda

    net, p, x, _, p64, x64, _ = problem([6, 16, 12, 3], P, dtype, "tanh")
    x2, x264 = x[: P - P // 3] * 0.5, x64[: P - P // 3] * 0.5
    rates = fastntk.rates.layerwise(net, [0.5, 1.0, 2.0], 1.0)
    diag = fastntk.rates.diagonal(
        np.random.default_rng(2).uniform(0.1, 1.0, net.n_params)
    )
    block = max(2, P // 3)

    def ref(a, b=None, outputs="full", r=rates, per_layer=False):
        return fastntk.ntk(
            net, p64, a, b, r, outputs=outputs, per_layer=per_layer, backend="cpu"
        )

    cases = [
        (
            "structured full, cross",
            lambda: ntk_cuda(net, p, x, x2, rates),
            lambda: ref(x64, x264),
        ),
        (
            "structured trace, symmetric, tiled",
            lambda: ntk_cuda(net, p, x, None, rates, outputs="trace", block_size=block),
            lambda: ref(x64, outputs="trace"),
        ),
        (
            "structured diagonal, cross, per layer",
            lambda: ntk_cuda(net, p, x, x2, rates, outputs="diagonal", per_layer=True),
            lambda: ref(x64, x264, "diagonal", per_layer=True),
        ),
        (
            "structured full, device in/out, tiled",
            lambda: ntk_cuda(
                net, p, cuda.to_device(x), None, rates, block_size=block
            ).copy_to_host(),
            lambda: ref(x64),
        ),
        (
            "structured trace, memmap out, tiled",
            lambda: _memmap_case(ntk_cuda, net, p, x, x2, rates, block),
            lambda: ref(x64, x264, "trace"),
        ),
        (
            "jacobian full, diagonal rates, tiled",
            lambda: ntk_cuda(net, p, x, x2, diag, block_size=block),
            lambda: ref(x64, x264, r=diag),
        ),
    ]
    small, ps, xs, _, ps64, xs64, _ = problem([4, 6, 2], P, dtype, "gelu")
    M = np.random.default_rng(3).standard_normal((small.n_params, small.n_params))
    dense = fastntk.rates.dense(M @ M.T / small.n_params)
    cases.append(
        (
            "jacobian trace, dense rates",
            lambda: ntk_cuda(small, ps, xs, None, dense, outputs="trace"),
            lambda: fastntk.ntk(
                small, ps64, xs64, None, dense, outputs="trace", backend="cpu"
            ),
        )
    )
    for name, fast, slow in cases:
        _run_check(report, f"ntk {name} {tag}", dtype, NTK_TARGET[dtype], fast, slow)


def _train_checks(report, P, dtype, tag):
    import numpy as np

    import fastntk
    from fastntk.engines.train_cuda import train_cuda

    net, p, x, y, p64, x64, y64 = problem([6, 10, 3], P, dtype, "tanh")
    onehot = np.eye(3)[np.arange(P) % 3]
    runs = [
        ("GD identity MSE", dict(loss="mse", lr=0.01, steps=8), y64),
        (
            "SGD layerwise cross-entropy mean",
            dict(
                loss=fastntk.CrossEntropy("mean"),
                lr=0.1,
                epochs=2,
                batch_size=max(2, P // 4),
                rates=fastntk.rates.layerwise(net, 0.5, 2.0),
            ),
            onehot,
        ),
        (
            "GD dense rates",
            dict(
                loss="mse",
                lr=0.01,
                steps=4,
                rates=fastntk.rates.dense(np.eye(net.n_params) * 0.5),
            ),
            y64,
        ),
    ]
    for name, kw, target64 in runs:

        def fast(kw=kw, target64=target64):
            pg, hg = train_cuda(net, p, x, target64.astype(dtype), record_every=2, **kw)
            return np.concatenate([pg.theta, hg.train_loss])

        def slow(kw=kw, target64=target64):
            pc, hc = fastntk.train(
                net, p64, x64, target64, record_every=2, backend="cpu", **kw
            )
            return np.concatenate([pc.theta, hc.train_loss])

        _run_check(
            report, f"train {name} {tag}", dtype, TRAIN_TARGET[dtype], fast, slow
        )


def _memmap_case(ntk_cuda, net, p, x, x2, rates, block):
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        out = np.lib.format.open_memmap(
            os.path.join(folder, "H.npy"),
            mode="w+",
            dtype=p.dtype,
            shape=(x.shape[0], x2.shape[0]),
        )
        ntk_cuda(net, p, x, x2, rates, outputs="trace", block_size=block, out=out)
        out.flush()
        return np.array(out)


# -- speed -------------------------------------------------------------------------


def ceilings(report, size, repeats, blas_list):
    """GFLOP/s of a large matrix product per dtype: the card's ceiling.

    The ceiling is cuBLAS's rate when CuPy is present, otherwise the best rate
    of the numba tiled kernel over a few tile shapes.
    """
    import numpy as np
    from numba import cuda

    from fastntk.kernels import cuda as kernels

    ceiling = {}
    for dtype in ("float32", "float64"):
        for blas in blas_list:
            n = size["gemm"] if blas == "cublas" else size["gemm_numba"]
            if blas == "cublas":
                configs = [None]
            elif size is SIZES["tiny"]:
                configs = [(2, 2, 2, 2, 4)]
            else:
                configs = [(16, 16, 4, 4, 16), (16, 16, 8, 8, 8)]
            rng = np.random.default_rng(0)
            A = cuda.to_device(rng.standard_normal((n, n)).astype(dtype))
            B = cuda.to_device(rng.standard_normal((n, n)).astype(dtype))
            C = cuda.device_array((n, n), dtype)
            for config in configs:
                with kernels.launch_config(blas=blas, gemm=config):
                    t, _ = timed(kernels.gemm, repeats, cuda.synchronize, A, B, C)
                rate = 2.0 * n**3 / t / 1e9
                label = "cuBLAS (CuPy)" if blas == "cublas" else f"numba {config}"
                report.add("ceiling", f"GEMM {n}^3 {label}", dtype, t, rate)
                if "cublas" not in blas_list or blas == "cublas":
                    ceiling[dtype] = max(ceiling.get(dtype, 0.0), rate)
    return ceiling


def ntk_timings(report, size, repeats, ceiling, blas_list):
    """Workloads B and C on the GPU: whole call, matrix-product phase, error."""
    from numba import cuda

    import fastntk
    from fastntk.engines.ntk_cuda import ntk_cuda
    from fastntk.kernels import cuda as kernels

    results = {}
    for name in ("B", "C"):
        widths, P = size[name]
        for dtype in ("float32", "float64"):
            if report.elapsed() > TIME_BUDGET:
                report.add("ntk", f"{name} skipped (time budget)", dtype)
                continue
            net, p, x, _, p64, x64, _ = problem(widths, P, dtype)
            flops = fastntk.ntk_flops(net, P, outputs="trace") / 1e9
            ref = fastntk.ntk(net, p64, x64, backend="cpu")
            t, H = timed(ntk_cuda, repeats, cuda.synchronize, net, p, x)
            report.add(
                "ntk",
                f"{name} P={P} NumPy in/out",
                dtype,
                t,
                flops / t,
                ceiling.get(dtype),
                rel_error(H, ref),
                NTK_TARGET[dtype],
            )
            results[(name, dtype)] = t
            dx = cuda.to_device(x)
            t, _ = timed(ntk_cuda, repeats, cuda.synchronize, net, p, dx)
            report.add(
                "ntk",
                f"{name} P={P} device in/out",
                dtype,
                t,
                flops / t,
                ceiling.get(dtype),
            )
            with kernels.gemm_profile() as prof:
                ntk_cuda(net, p, dx)
            report.add(
                "ntk",
                f"{name} matrix-product phase ({prof.calls} GEMMs)",
                dtype,
                prof.seconds,
                prof.rate / 1e9,
                ceiling.get(dtype),
                note="target >= 50% of cuBLAS" if dtype == "float32" else "",
            )
            if "cublas" in blas_list and dtype == "float32":
                with kernels.launch_config(blas="numba"):
                    t, _ = timed(ntk_cuda, repeats, cuda.synchronize, net, p, dx)
                report.add(
                    "ntk",
                    f"{name} P={P} device, numba GEMM",
                    dtype,
                    t,
                    flops / t,
                    ceiling.get(dtype),
                )

    # workload C with 20,000 samples, float32: into host memory and on device
    widths, P = size["C20k"]
    if report.elapsed() > TIME_BUDGET:
        report.add("ntk", "C P=20000 skipped (time budget)", "float32")
        return results
    net, p, x, _, p64, x64, _ = problem(widths, P, "float32")
    flops = fastntk.ntk_flops(net, P, outputs="trace") / 1e9
    rows = min(512, P)
    ref = fastntk.ntk(net, p64, x64[:rows], x64, backend="cpu")
    t, H = timed(lambda: ntk_cuda(net, p, x), max(1, repeats // 2), cuda.synchronize)
    report.add(
        "ntk",
        f"C P={P} NumPy in/out ({H.nbytes / 2**30:.1f} GiB)",
        "float32",
        t,
        flops / t,
        ceiling.get("float32"),
        rel_error(H[:rows], ref),
        NTK_TARGET["float32"],
    )
    del H
    dx = cuda.to_device(x)
    t, _ = timed(lambda: ntk_cuda(net, p, dx), max(1, repeats // 2), cuda.synchronize)
    report.add(
        "ntk", f"C P={P} device in/out", "float32", t, flops / t, ceiling.get("float32")
    )
    return results


def train_timings(report, size):
    """A full-batch GD run and an SGD run on the GPU against the CPU in float64."""
    import numpy as np

    import fastntk
    from fastntk.engines.train_cuda import train_cuda

    widths, P, steps = size["gd"]
    cases = [("GD", widths, P, steps, None)]
    widths, P, batch, steps = size["sgd"]
    cases.append(("SGD", widths, P, steps, batch))
    for name, widths, P, steps, batch in cases:
        for dtype in ("float32", "float64"):
            if report.elapsed() > TIME_BUDGET:
                report.add("train", f"{name} skipped (time budget)", dtype)
                continue
            net, p, x, y, p64, x64, y64 = problem(widths, P, dtype)
            kw = dict(
                loss="mse",
                lr=1e-4 if batch is None else 1e-3,
                steps=steps,
                batch_size=batch,
                record_every=steps,
            )
            train_cuda(net, p, x, y, **dict(kw, steps=1))  # compile
            t0 = time.perf_counter()
            pg, hg = train_cuda(net, p, x, y, **kw)
            t = time.perf_counter() - t0
            t0 = time.perf_counter()
            pc, hc = fastntk.train(net, p64, x64, y64, backend="cpu", **kw)
            t_cpu = time.perf_counter() - t0
            flops = 6.0 * (P if batch is None else batch) * net.n_params * steps / 1e9
            err = max(
                rel_error(pg.theta, pc.theta), rel_error(hg.train_loss, hc.train_loss)
            )
            label = f"{name} {widths} P={P}" + (f" batch {batch}" if batch else "")
            report.add(
                "train",
                f"{label}, {steps} steps",
                dtype,
                t,
                flops / t,
                error=err,
                target=TRAIN_TARGET[dtype],
                note=f"{steps / t:.0f} steps/s; CPU float64 {t_cpu:.3g} s",
            )
    del np


def framework_timings(report, size, repeats, fastntk_b):
    """torch.func and JAX NTK recipes of workload B on the same GPU."""
    import numpy as np

    import fastntk

    widths, P = size["B"]
    net, p, x, _, p64, x64, _ = problem(widths, P, "float32")
    ref = fastntk.ntk(net, p64, x64, backend="cpu")
    flops = fastntk.ntk_flops(net, P, outputs="trace") / 1e9
    ours = fastntk_b.get(("B", "float32"))
    for name, build in (
        ("torch.func vmap(jacrev)+einsum", _torch_recipe),
        ("JAX vmap(jacrev)+einsum, jit", _jax_recipe),
    ):
        if report.elapsed() > TIME_BUDGET:
            report.add("compare", f"{name} skipped (time budget)", "float32")
            continue
        try:
            run = build(net, p, x)
        except Exception as exc:  # not installed, or no GPU for it
            report.add(
                "compare",
                f"{name} B",
                "float32",
                note=f"not run: {type(exc).__name__}: {exc}"[:90],
            )
            continue
        t, H = timed(run, repeats, lambda: None)
        H = np.asarray(H)
        note = f"fastntk is {t / ours:.1f}x faster (target >= 10x)" if ours else ""
        report.add(
            "compare",
            f"{name} B P={P}",
            "float32",
            t,
            flops / t,
            error=rel_error(H, ref),
            note=note,
        )


def _torch_recipe(net, params, x, dev="cuda"):
    # torch.func: per-sample Jacobians by vmap(jacrev), contracted by einsum
    import torch
    from torch.func import functional_call, jacrev, vmap

    if dev == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    layers = []
    for l in range(net.depth):
        layers.append(torch.nn.Linear(net.widths[l], net.widths[l + 1]))
        if l < net.depth - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).to(dev, torch.float32)
    values, scale = {}, {}
    for l in range(net.depth):
        values[f"{2 * l}.weight"] = torch.as_tensor(params.weights[l], device=dev)
        values[f"{2 * l}.bias"] = torch.as_tensor(params.biases[l], device=dev)
        # layerwise learning rates (1, 1): weights of layer l scaled by 1/n_{l-1}
        scale[f"{2 * l}.weight"] = 1.0 / net.widths[l]
        scale[f"{2 * l}.bias"] = 1.0
    X = torch.as_tensor(x, device=dev)

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), in_dims=(None, 0))

    def run():
        J = jac(values, X)
        H = None
        for k, Jk in J.items():
            Jk = Jk.flatten(2)
            term = scale[k] * torch.einsum("aim,bjm->abij", Jk, Jk)
            H = term if H is None else H + term
        if dev == "cuda":
            torch.cuda.synchronize()
        return H.cpu().numpy()

    return run


def _jax_recipe(net, params, x, platform="gpu"):
    # JAX: per-sample Jacobians by vmap(jacrev), contracted by einsum, jitted
    import jax
    import jax.numpy as jnp

    gpus = [d for d in jax.devices() if d.platform == platform]
    if not gpus:
        raise RuntimeError("JAX sees no GPU")
    ps = [
        (
            jax.device_put(jnp.asarray(W), gpus[0]),
            jax.device_put(jnp.asarray(b), gpus[0]),
        )
        for W, b in zip(params.weights, params.biases)
    ]
    X = jax.device_put(jnp.asarray(x), gpus[0])
    scales = [1.0 / w for w in net.widths[:-1]]
    depth = net.depth

    def f(p, xi):
        a = xi
        for l, (W, b) in enumerate(p):
            a = W @ a + b
            if l < depth - 1:
                a = jax.nn.relu(a)
        return a

    @jax.jit
    def ntk(p, X):
        J = jax.vmap(jax.jacrev(f), in_axes=(None, 0))(p, X)
        H = 0.0
        for l, (JW, Jb) in enumerate(J):
            JW = JW.reshape(JW.shape[0], JW.shape[1], -1)
            H = H + scales[l] * jnp.einsum("aim,bjm->abij", JW, JW)
            H = H + jnp.einsum("aim,bjm->abij", Jb, Jb)
        return H

    def run():
        return ntk(ps, X).block_until_ready()

    return run


# -- main ----------------------------------------------------------------------------


def _section(report, name, default, fn, *args):
    # Run one timing section; an exception is reported and the run goes on.
    try:
        return fn(*args)
    except Exception as exc:  # report and go on
        report.failed.append(f"{name}: {exc!r}")
        report.add(
            name, "section stopped", note=f"FAILED {type(exc).__name__}: {exc}"[:120]
        )
        return default


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--simulate-tiny",
        action="store_true",
        help="run under numba's CUDA simulator with tiny sizes (tests the script)",
    )
    parser.add_argument("--skip-checks", action="store_true", help="timings only")
    opts = parser.parse_args(argv)
    if opts.simulate_tiny:
        # must happen before numba is imported
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    size = SIZES["tiny" if opts.simulate_tiny else "real"]
    repeats = size["repeats"]

    import numba
    from numba import cuda

    import fastntk
    from fastntk.kernels import cuda as kernels
    from fastntk.kernels.dispatch import cuda_status

    usable, reason = cuda_status()
    if not usable:
        print(f"no usable GPU: {reason}")
        return 2
    report = Report()
    blas_list = ["cublas", "numba"] if kernels._cupy() is not None else ["numba"]
    if opts.simulate_tiny:
        device = "CUDA simulator"
        kernels.LAUNCH.threads, kernels.LAUNCH.gemm = 2, (2, 2, 2, 2, 8)
    else:
        dev = cuda.get_current_device()
        free, total = cuda.current_context().get_memory_info()
        device = f"{dev.name.decode() if isinstance(dev.name, bytes) else dev.name}"
        device += (
            f", {total / 2**30:.0f} GiB, compute capability {dev.compute_capability}"
        )
    print(f"device: {device}")
    print(
        f"fastntk {fastntk.__version__}, numba {numba.__version__}, matrix products: "
        f"{', '.join(blas_list)}"
    )

    if not opts.skip_checks:
        print("checks against the CPU float64 result:")
        check_paths(report, size, blas_list)
    print("timings:")
    ceiling = _section(
        report, "ceiling", {}, ceilings, report, size, repeats, blas_list
    )
    ours = _section(
        report, "ntk", {}, ntk_timings, report, size, repeats, ceiling, blas_list
    )
    _section(report, "train", None, train_timings, report, size)
    if not opts.simulate_tiny:
        _section(
            report, "compare", None, framework_timings, report, size, repeats, ours
        )

    print()
    seconds = time.perf_counter() - report.start
    print(f"fastntk GPU check on {device} ({seconds:.0f} s)")
    print(
        "ceiling: the GEMM rate of the same dtype (cuBLAS when CuPy is present); "
        "NTK GFLOP/s count the algorithm's operations (symmetric pairs once)"
    )
    print(report.table())
    if report.failed:
        print("\nFAILED:\n  " + "\n  ".join(report.failed))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
