"""Side-by-side timing of fastntk.ntk against the usual ways of computing an NTK.

Run from the repository root::

    python benchmarks/compare_ntk.py --workloads A,B,C,D --repeat 5

Contenders, on the same network, parameters and samples:

- ``fastntk``: :func:`fastntk.ntk` (structured algorithm).
- ``numpy``: a careful plain-NumPy implementation of the same per-layer formula
  (:func:`numpy_ntk` below): one forward pass, backpropagated output
  derivatives, per layer the input Gram ``a @ a.T`` (NumPy runs it as a
  symmetric rank-k update) and the derivative Gram, combined in place.
- ``reference``: the Jacobian contraction of :mod:`fastntk.reference` (full
  per-sample Jacobians by NumPy backpropagation, then ``J lambda J^T``).
- ``torch.func``: ``vmap(jacrev)`` Jacobians and an ``einsum`` contraction, when
  PyTorch is installed (optional; ``pip install torch``).

Workloads (64 inputs, relu, C_b = 0, C_W = 2, layerwise rates lambda_b =
lambda_W = 1; the kernel of one sample set with itself):

- A: widths [64, 256, 256, 10], P = 256, full outputs
- B: widths [64, 512, 512, 512, 1], P = 1024
- C: widths [64, 256, 256, 1], P = 4096
- D: as C with P = 50,000, float32, trace, into a ``numpy.memmap`` on disk
  (time and peak resident memory; fastntk only)

Reported per workload and dtype: median wall time over ``--repeat`` rounds (the
contenders take turns within each round, so that load on a shared machine
falls on all of them alike), the ratio of each median to fastntk's, GFLOP/s from
the operation count of the algorithm each contender runs
(:func:`fastntk.ntk_flops`, symmetric products counted once), that rate as a
fraction of the machine's BLAS GEMM rate (square matrix product of the same
dtype, measured in the same rounds), and the max relative error against a
float64 reference Jacobian contraction on the pairs of up to ``--check``
samples.  The slow Jacobian contenders run ``--slow-repeat`` times.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import fastntk
from fastntk import reference

WORKLOADS = {
    "A": dict(widths=[64, 256, 256, 10], P=256, outputs="full"),
    "B": dict(widths=[64, 512, 512, 512, 1], P=1024, outputs="full"),
    "C": dict(widths=[64, 256, 256, 1], P=4096, outputs="full"),
    "D": dict(widths=[64, 256, 256, 1], P=50_000, outputs="trace"),
}


# -- contenders ------------------------------------------------------------------------


def numpy_ntk(net, params, x, outputs="full"):
    """The per-layer NTK formula in plain NumPy, x2 = x1, layerwise rates (1, 1).

    H = sum_l (1 + A_l / n_{l-1}) * G_l with A_l = a^(l-1) a^(l-1)^T and G_l the
    Gram of the output derivatives (the identity on the last layer), computed
    in the input's dtype; a relu network.  Returns (P, P, n_out, n_out) for
    ``outputs="full"`` and (P, P) for ``"trace"``.
    """
    depth, n_out = net.depth, net.n_out
    P = x.shape[0]
    one = x.dtype.type(1)

    # forward pass: every layer's input and the relu masks
    inputs, masks = [x], []
    a = x
    for W, b in zip(params.weights[:-1], params.biases[:-1]):
        z = a @ W.T
        z += b
        masks.append(z > 0)
        a = np.maximum(z, 0, out=z)
        inputs.append(a)

    # layers from the top: g holds the output derivatives g^(l), (P, n_out, n_l)
    H = np.zeros((P, P) if outputs == "trace" else (P, n_out, P, n_out), x.dtype)
    g = None
    for l in range(depth - 1, -1, -1):
        # input Gram and its layer factor, in place: 1 + A / n_{l-1}
        A = inputs[l] @ inputs[l].T
        A *= x.dtype.type(1.0 / net.widths[l])
        A += one
        if g is None:
            # last layer: the derivatives are the identity
            if outputs == "trace":
                A *= x.dtype.type(n_out)
                H += A
            else:
                for i in range(n_out):
                    H[:, i, :, i] += A
            g = params.weights[l][None, :, :] * masks[l - 1][:, None, :] if l else None
            continue
        if outputs == "trace":
            flat = g.reshape(P, -1)
            G = flat @ flat.T
            G *= A
        else:
            flat = g.reshape(P * n_out, -1)
            G = (flat @ flat.T).reshape(P, n_out, P, n_out)
            G *= A[:, None, :, None]
        H += G
        del G, A
        if l:
            g = g @ params.weights[l]
            g *= masks[l - 1][:, None, :]
    return H if outputs == "trace" else H.transpose(0, 2, 1, 3)


def layer_rates(net):
    """Per-parameter rates of layerwise(1, 1): 1 / n_{l-1} on weights, 1 on biases."""
    d = np.empty(net.n_params)
    for l, (ws, bs) in enumerate(net.layer_slices()):
        d[ws] = 1.0 / net.widths[l]
        d[bs] = 1.0
    return d


def reference_ntk(net, params, x, outputs="full"):
    """Jacobian contraction with fastntk.reference's Jacobian, in x's dtype."""
    J = reference.jacobian(net, params, x)
    d = layer_rates(net).astype(x.dtype)
    P, n_out, _ = J.shape
    if outputs == "trace":
        flat = J.reshape(P, -1)
        return (flat * np.tile(d, n_out)) @ flat.T
    flat = J.reshape(P * n_out, -1)
    H = (flat * d) @ flat.T
    return H.reshape(P, n_out, P, n_out).transpose(0, 2, 1, 3)


def torch_ntk_function(net, params, x, outputs="full"):
    """A callable computing the NTK by torch.func (vmap(jacrev) + einsum)."""
    import torch
    from torch.func import jacrev, vmap

    dt = torch.float64 if x.dtype == np.float64 else torch.float32
    weights = [torch.tensor(W, dtype=dt) for W in params.weights]
    biases = [torch.tensor(b, dtype=dt) for b in params.biases]
    X = torch.tensor(x, dtype=dt)
    depth = net.depth

    def f(ws, bs, xa):
        a = xa
        for l in range(depth):
            z = ws[l] @ a + bs[l]
            a = torch.relu(z) if l < depth - 1 else z
        return a

    spec = "aimn,bimn->ab" if outputs == "trace" else "aimn,bjmn->abij"
    spec_b = "aim,bim->ab" if outputs == "trace" else "aim,bjm->abij"

    def run():
        with torch.no_grad():
            jw, jb = vmap(jacrev(f, argnums=(0, 1)), in_dims=(None, None, 0))(
                weights, biases, X
            )
            H = None
            for l in range(depth):
                term = torch.einsum(spec, jw[l], jw[l]) / net.widths[l]
                term += torch.einsum(spec_b, jb[l], jb[l])
                H = term if H is None else H + term
            return H.numpy()

    return run


# -- measurement -----------------------------------------------------------------------


def gemm_function(dtype, n=2048, seed=0):
    """A square matrix product of the dtype, and its operation count."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype)
    return (lambda: np.matmul(a, b, out=out)), 2.0 * n**3


def timed(fn):
    gc.collect()
    settle()
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


#: Seconds of waiting before each timing (see :func:`settle`).
SETTLE_SECONDS = 0.25


def settle():
    """Wait before a timing, for the previous one's worker threads to go idle.

    BLAS, OpenMP and XLA worker threads poll for new work for up to about
    0.1 s after each call, slowing whatever runs next.  The wait spins rather
    than sleeps: on virtual machines a processor left idle comes back slowly
    (a 15 ms single-threaded run measured 2.8 us per step after a spin, 4.3
    after a sleep).
    """
    end = time.perf_counter() + SETTLE_SECONDS
    while time.perf_counter() < end:
        pass


def rel_error(fast, exact):
    fast = np.asarray(fast, np.float64)
    return float(np.abs(fast - exact).max() / np.abs(exact).max())


def jacobian_bytes(net, P, dtype):
    return P * net.n_out * net.n_params * np.dtype(dtype).itemsize


def check_rows(P, count, seed=7):
    """Sorted sample indices on whose pairs the error is measured."""
    if count >= P:
        return np.arange(P)
    return np.sort(np.random.default_rng(seed).choice(P, count, replace=False))


def exact_block(net, params, x, rows, outputs):
    """Float64 reference kernel on the pairs of ``rows``."""
    p64 = params.astype("float64")
    return reference_ntk(net, p64, x[rows].astype(np.float64), outputs)


def restrict(H, rows, P, outputs):
    return H[np.ix_(rows, rows)] if len(rows) < P else H


def bench(name, dtype, opts):
    """Rows of the table for one in-memory workload and dtype."""
    spec = WORKLOADS[name]
    widths, P, outputs = spec["widths"], spec["P"], spec["outputs"]
    net = fastntk.MLP(widths, activation="relu", C_b=0.0, C_W=2.0)
    params = net.init(seed=0, dtype=dtype)
    x = np.random.default_rng(1).standard_normal((P, widths[0])).astype(dtype)
    threads = opts.threads

    contenders = {
        "fastntk": (
            lambda: fastntk.ntk(net, params, x, outputs=outputs, threads=threads),
            fastntk.ntk_flops(net, P, outputs=outputs),
        ),
        "numpy": (
            lambda: numpy_ntk(net, params, x, outputs),
            fastntk.ntk_flops(net, P, outputs=outputs),
        ),
    }
    slow = {}
    jac_flops = fastntk.ntk_flops(net, P, P, outputs=outputs, method="jacobian")
    fits = jacobian_bytes(net, P, dtype) <= opts.max_jacobian_gb * 2**30
    skipped = {}
    for label, wanted in (("reference", opts.reference), ("torch.func", opts.torch)):
        if not wanted:
            continue
        if not fits:
            skipped[label] = (
                f"Jacobian of {jacobian_bytes(net, P, dtype) / 2**30:.1f} GiB "
                f"> --max-jacobian-gb"
            )
            continue
        if label == "reference":
            slow[label] = (lambda: reference_ntk(net, params, x, outputs), jac_flops)
        else:
            try:
                slow[label] = (torch_ntk_function(net, params, x, outputs), jac_flops)
            except ImportError:
                skipped[label] = "PyTorch is not installed"
    gemm, gemm_flops = gemm_function(dtype)

    # warm-up (compilation, caches), then rounds in which everyone takes a turn
    results = {}
    for label, (fn, _) in {**contenders, **slow}.items():
        results[label] = fn()
    gemm()
    times = {label: [] for label in [*contenders, *slow, "gemm"]}
    for r in range(opts.repeat):
        for label, (fn, _) in contenders.items():
            times[label].append(timed(fn)[0])
        times["gemm"].append(timed(gemm)[0])
        if r < opts.slow_repeat:
            for label, (fn, _) in slow.items():
                times[label].append(timed(fn)[0])

    # errors against the float64 reference on the pairs of some samples
    rows = check_rows(P, opts.check)
    exact = exact_block(net, params, x, rows, outputs)
    gemm_rate = gemm_flops / statistics.median(times["gemm"])
    base = statistics.median(times["fastntk"])
    table = []
    for label, (_, flops) in {**contenders, **slow}.items():
        t = statistics.median(times[label])
        table.append(
            dict(
                workload=name, dtype=np.dtype(dtype).name, method=label,
                median_s=t, runs=len(times[label]), ratio=t / base,
                gflops=flops / t / 1e9, gemm_fraction=flops / t / gemm_rate,
                rel_error=rel_error(restrict(results[label], rows, P, outputs),
                                    exact),
                checked_samples=len(rows),
            )
        )  # fmt: skip
    for label, why in skipped.items():
        table.append(
            dict(workload=name, dtype=np.dtype(dtype).name, method=label, skipped=why)
        )
    table.append(
        dict(
            workload=name, dtype=np.dtype(dtype).name, method="GEMM",
            median_s=statistics.median(times["gemm"]), runs=len(times["gemm"]),
            gflops=gemm_rate / 1e9,
        )
    )  # fmt: skip
    return table


# -- workload D: a kernel larger than comfortable, into a file -------------------------

_D_CHILD = r"""
import json, logging, sys, time
import numpy as np
import fastntk
from fastntk import reference
P, path, threads, check = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
threads = None if threads == "None" else int(threads)
logging.basicConfig(level=logging.WARNING)
def peak_rss():
    # this process's high-water mark (VmHWM; getrusage's maxrss would include
    # the parent's, inherited across fork and exec)
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
net = fastntk.MLP([64, 256, 256, 1], activation="relu", C_b=0.0, C_W=2.0)
params = net.init(seed=0, dtype="float32")
x = np.random.default_rng(1).standard_normal((P, 64)).astype(np.float32)
fastntk.ntk(net, params, x[:512], outputs="trace")  # compile or load kernels
out = np.memmap(path, dtype=np.float32, mode="w+", shape=(P, P))
t0 = time.perf_counter()
fastntk.ntk(net, params, x, outputs="trace", out=out, threads=threads)
rss = peak_rss()
out.flush()
elapsed = time.perf_counter() - t0
rss_flush = peak_rss()
rows = np.sort(np.random.default_rng(7).choice(P, check, replace=False))
J = reference.jacobian(net, params.astype("float64"), x[rows].astype(np.float64))
d = np.empty(net.n_params)
for l, (ws, bs) in enumerate(net.layer_slices()):
    d[ws], d[bs] = 1.0 / net.widths[l], 1.0
flat = J.reshape(len(rows), -1)
exact = (flat * d) @ flat.T
got = np.asarray(out[np.ix_(rows, rows)], np.float64)
err = float(np.abs(got - exact).max() / np.abs(exact).max())
print(json.dumps(dict(seconds=elapsed, peak_rss=rss, peak_rss_flush=rss_flush,
                     rel_error=err)))
"""


def bench_d(opts):
    """Workload D in a child process: wall time, peak RSS, error on some pairs."""
    P = opts.d_samples
    need = P * P * 4
    folder = opts.d_dir or tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    row = dict(workload="D", dtype="float32", method="fastntk (memmap)")
    if free < need * 1.1:
        row["skipped"] = (
            f"{need / 2**30:.1f} GiB needed in {folder}, {free / 2**30:.1f} GiB free; "
            f"pass --d-dir"
        )
        return [row]
    path = os.path.join(folder, f"fastntk-ntk-D-{os.getpid()}.f32")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _D_CHILD, str(P), path, str(opts.threads),
             str(opts.check)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    finally:
        if os.path.exists(path):
            os.remove(path)
    if proc.stderr.strip():
        print(proc.stderr, file=sys.stderr)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    net = fastntk.MLP(WORKLOADS["D"]["widths"])
    flops = fastntk.ntk_flops(net, P, outputs="trace")
    row.update(
        median_s=res["seconds"], runs=1, gflops=flops / res["seconds"] / 1e9,
        peak_rss_gib=res["peak_rss"] / 2**30, rel_error=res["rel_error"],
        peak_rss_after_flush_gib=res["peak_rss_flush"] / 2**30,
        checked_samples=opts.check, kernel_gib=need / 2**30,
    )  # fmt: skip
    return [row]


# -- report ----------------------------------------------------------------------------


def format_table(rows):
    head = (
        f"{'wl':2} {'dtype':7} {'method':17} {'median s':>9} {'runs':>4} "
        f"{'x fastntk':>9} {'GFLOP/s':>8} {'of GEMM':>7} {'rel err':>8}  notes"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"{r['workload']:2} {r['dtype']:7} {r['method']:17} skipped: "
                f"{r['skipped']}"
            )
            continue
        ratio = f"{r['ratio']:9.2f}" if "ratio" in r else " " * 9
        frac = f"{r['gemm_fraction']:7.0%}" if "gemm_fraction" in r else " " * 7
        err = f"{r['rel_error']:8.1e}" if "rel_error" in r else " " * 8
        notes = []
        if "checked_samples" in r:
            notes.append(f"error on {r['checked_samples']}^2 pairs")
        if "peak_rss_gib" in r:
            notes.append(
                f"peak RSS {r['peak_rss_gib']:.2f} GiB "
                f"({r['peak_rss_after_flush_gib']:.2f} after flush), "
                f"kernel {r['kernel_gib']:.1f} GiB"
            )
        lines.append(
            f"{r['workload']:2} {r['dtype']:7} {r['method']:17} "
            f"{r['median_s']:9.4f} {r['runs']:4d} {ratio} {r['gflops']:8.1f} "
            f"{frac} {err}  {'; '.join(notes)}"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="A,B,C,D")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--slow-repeat",
        type=int,
        default=1,
        help="rounds of the Jacobian contenders (slow)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--check",
        type=int,
        default=256,
        help="samples whose pairs are checked against float64",
    )
    parser.add_argument("--max-jacobian-gb", type=float, default=6.0)
    parser.add_argument("--no-reference", dest="reference", action="store_false")
    parser.add_argument("--no-torch", dest="torch", action="store_false")
    parser.add_argument(
        "--d-dir",
        default=None,
        help="folder for workload D's 10 GB file (default: temp)",
    )
    parser.add_argument("--d-samples", type=int, default=WORKLOADS["D"]["P"])
    parser.add_argument("--json", default=None, help="also write the rows here")
    opts = parser.parse_args(argv)

    if opts.torch and opts.threads is not None:
        try:
            import torch

            torch.set_num_threads(opts.threads)
        except ImportError:
            pass
    limits = contextlib.nullcontext()
    if opts.threads is not None:
        # every contender and the GEMM rate with the same thread count
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(opts.threads)
    with limits:
        rows = run(opts)
    print(format_table(rows))
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"\npeak RSS of this process: {peak:.2f} GiB; numpy {np.__version__}, "
        f"fastntk {fastntk.__version__}, threads {opts.threads or 'default'}"
    )


def run(opts):
    rows = []
    for name in opts.workloads.split(","):
        if name == "D":
            rows += bench_d(opts)
        else:
            for dtype in opts.dtypes.split(","):
                rows += bench(name, np.dtype(dtype), opts)
        print(format_table(rows), file=sys.stderr, flush=True)
        print(file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
