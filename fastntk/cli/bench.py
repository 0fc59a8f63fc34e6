"""``fastntk bench``: fastntk against the NumPy reference, on this machine.

Three measurements on one small network (by default widths [32, 128, 128, 4],
128 samples, relu, layerwise rates), each the median of ``--repeat`` timings
after a first call that compiles the kernels (its time is reported apart):

- the NTK (full outputs): :func:`fastntk.ntk` against the reference Jacobian
  contraction (``fastntk.reference.jacobian``, then J lambda J^T with the
  diagonal learning-rate tensor);
- the gradient of the MSE loss: :func:`fastntk.gradient` against
  ``fastntk.reference.gradient``;
- ``--steps`` steps (default 10) of full-batch gradient descent:
  :func:`fastntk.train` against a NumPy loop of reference gradients.

Each row also gives the largest relative difference from the reference.  With
``--full`` and a source checkout, the side-by-side scripts
``benchmarks/compare_ntk.py`` (workload A, float64, one round) and
``benchmarks/compare_train.py`` (float64, one round) run after it.
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import fastntk
from fastntk.kernels import reference

logger = logging.getLogger(__name__)

#: Input and output widths of the benchmarked network.
N_IN, N_OUT = 32, 4

#: Side-by-side scripts of a source checkout and their quick options.
SCRIPTS = {
    "compare_ntk.py": ["--workloads", "A", "--dtypes", "float64", "--repeat", "1"],
    "compare_train.py": ["--dtype", "float64", "--repeat", "1"],
}


def _median_time(fn, repeat):
    # First call apart (compilation), then the median of ``repeat`` calls.
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), first, result


def _relative(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def measure(
    dtype="float64",
    repeat=5,
    seed=0,
    threads=None,
    hidden=(128, 128),
    samples=128,
    steps=10,
) -> list:
    """Time fastntk and the reference; one dict per measured operation.

    Parameters
    ----------
    dtype : {'float64', 'float32'}
    repeat : int
        Timings per measurement (the median is kept).
    seed : int
    threads : int, optional
    hidden : sequence of int
        Hidden widths (inputs 32, outputs 4).
    samples : int
        Samples P.
    steps : int
        Gradient-descent steps of the training measurement.

    Returns
    -------
    list of dict
        Keys ``task``, ``fastntk_s``, ``reference_s``, ``speedup``,
        ``first_call_s`` (fastntk's first call, compilation included) and
        ``max_rel_error``; the NTK row also ``fastntk_gflops``, the engine's
        operation count (:func:`fastntk.ntk_flops`) over its time.
    """
    net = fastntk.MLP([N_IN, *hidden, N_OUT], activation="relu")
    params = net.init(seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, N_IN)).astype(dtype)
    y = rng.standard_normal((samples, N_OUT)).astype(dtype)
    rates = fastntk.rates.layerwise(net)
    diag = rates.diagonal_vector(net)
    loss = fastntk.MSE()
    rows = []

    # the NTK: structured engine vs Jacobian contraction J lambda J^T
    def ref_ntk():
        J = reference.jacobian(net, params, x).astype(np.float64)
        flat = J.reshape(-1, net.n_params)
        H = (flat * diag) @ flat.T
        return H.reshape(samples, N_OUT, samples, N_OUT).transpose(0, 2, 1, 3)

    fast, first, H = _median_time(
        lambda: fastntk.ntk(net, params, x, rates=rates, threads=threads), repeat
    )
    ref, _, H_ref = _median_time(ref_ntk, repeat)
    rows.append(_row(f"ntk P={samples} full", fast, ref, first, _relative(H, H_ref)))
    rows[-1]["fastntk_gflops"] = fastntk.ntk_flops(net, samples) / fast / 1e9

    # the gradient of the summed MSE
    fast, first, g = _median_time(
        lambda: fastntk.gradient(net, params, x, y, loss=loss, threads=threads),
        repeat,
    )
    ref, _, g_ref = _median_time(
        lambda: reference.gradient(net, params, x, y, loss), repeat
    )
    rows.append(_row(f"gradient P={samples}", fast, ref, first, _relative(g, g_ref)))

    # full-batch gradient descent
    lr = 1e-3

    def ref_train():
        theta = params.theta.astype(np.float64).copy()
        for _ in range(steps):
            p = net.params(theta.astype(params.dtype))
            theta -= lr * diag * reference.gradient(net, p, x, y, loss)
        return theta

    fast, first, (trained, _) = _median_time(
        lambda: fastntk.train(
            net,
            params,
            x,
            y,
            loss=loss,
            lr=lr,
            rates=rates,
            steps=steps,
            record_every=steps,
            threads=threads,
        ),
        repeat,
    )
    ref, _, theta_ref = _median_time(ref_train, 1)
    rows.append(
        _row(
            f"train {steps} GD steps",
            fast,
            ref,
            first,
            _relative(trained.theta, theta_ref),
        )
    )
    return rows


def _row(task, fast, ref, first, err):
    return {
        "task": task,
        "fastntk_s": fast,
        "reference_s": ref,
        "speedup": ref / fast if fast > 0 else float("inf"),
        "first_call_s": first,
        "max_rel_error": err,
    }


def format_table(rows, dtype, widths, threads=None) -> str:
    """The measurements as a fixed-width text table."""
    head = (
        f"{'task':<24} {'fastntk':>10} {'reference':>10} {'speed-up':>9} "
        f"{'1st call':>9} {'max rel err':>12} {'GFLOP/s':>8}"
    )
    lines = [
        f"fastntk bench: MLP {widths} relu, {dtype}, "
        f"{'default' if threads is None else threads} thread(s), median times",
        head,
        "-" * len(head),
    ]
    for r in rows:
        rate = r.get("fastntk_gflops")
        lines.append(
            f"{r['task']:<24} {_ms(r['fastntk_s']):>10} {_ms(r['reference_s']):>10} "
            f"{r['speedup']:>8.1f}x {_ms(r['first_call_s']):>9} "
            f"{r['max_rel_error']:>12.2e} {'-' if rate is None else f'{rate:.1f}':>8}"
        )
    return "\n".join(lines)


def _ms(seconds):
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def checkout_benchmarks() -> Path | None:
    """The ``benchmarks`` folder of a source checkout, when fastntk runs from one."""
    folder = Path(fastntk.__file__).resolve().parent.parent / "benchmarks"
    return folder if any((folder / s).is_file() for s in SCRIPTS) else None


def command(cfg) -> int:
    """``fastntk bench``: print the table; run the checkout's scripts if --full."""
    from fastntk._config import thread_limit

    logger.info(
        "fastntk bench: timing fastntk and the NumPy reference (%s)", cfg["dtype"]
    )
    with thread_limit(cfg["threads"]):
        rows = measure(
            cfg["dtype"],
            cfg["repeat"],
            cfg["seed"],
            cfg["threads"],
            hidden=cfg["hidden"],
            samples=cfg["samples"],
            steps=cfg["steps"],
        )
    widths = [N_IN, *cfg["hidden"], N_OUT]
    print(format_table(rows, cfg["dtype"], widths, cfg["threads"]))
    if cfg["out"] is not None:
        from fastntk.cli.report import versions, write_json

        write_json(
            cfg["out"],
            {
                "rows": rows,
                "versions": versions(),
                "widths": widths,
                "samples": cfg["samples"],
            },
        )
    if not cfg["full"]:
        return 0

    # the side-by-side scripts of a source checkout
    folder = checkout_benchmarks()
    if folder is None:
        raise FileNotFoundError(
            "--full: the side-by-side scripts benchmarks/compare_ntk.py and "
            "compare_train.py come with a source checkout of fastntk, and none "
            "was found beside this installation; run them from the checkout"
        )
    status = 0
    for script, args in SCRIPTS.items():
        path = folder / script
        if not path.is_file():
            logger.warning("%s not found in %s; skipped", script, folder)
            continue
        logger.info("running %s %s", path, " ".join(args))
        done = subprocess.run(
            [sys.executable, str(path), *args], cwd=folder.parent, check=False
        )
        status = status or done.returncode
    return status
