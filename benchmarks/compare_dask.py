"""The tiled NTK on a local Dask cluster against the single-process engine.

Both write the same kernel to disk:

- *single*: ``fastntk.ntk(net, params, x, outputs=..., out=memmap, threads=W)``
  in this process, into a ``.npy`` memory map;
- *dask*: ``fastntk.distributed.ntk(..., store=PATH)`` on a ``LocalCluster`` of W
  single-threaded worker processes, into a ``.npy`` memory map or a Zarr store.

The cluster is started once (its start-up time is reported apart) and warmed
with a small kernel, so that both sides run with compiled kernels; each
measurement then covers the whole call: creating the output, scattering the
inputs, computing and writing every tile.  Runs alternate (single, dask,
single, dask, ...) and the medians are compared: the overhead of Dask is
``median(dask) / median(single) - 1``.  Peak memory is the high-water mark of
resident memory of each process during a run (reset before it), and the two
kernels are compared entry by entry.  The outputs are deleted at the end.

Default workload: P = 20,000 samples, widths [64, 256, 256, 1], float32, the
trace over outputs (a 1.6 GB kernel), 2 workers.  Run from the repository root::

    flock /tmp/fastntk-bench.lock python benchmarks/compare_dask.py
    flock /tmp/fastntk-bench.lock python benchmarks/compare_dask.py \\
        --store npy zarr --repeat 3 --dir /tmp

``--samples 4000`` gives a quick check.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

import fastntk


def peak_reset():
    """Reset this process's high-water mark of resident memory (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def memory(field="VmHWM") -> float:
    """Resident memory of this process, MiB: its peak since the reset (VmHWM) or
    its current value (VmRSS)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    """User and system CPU time of this process, all its threads, so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def compare(a, b, rows=1000) -> float:
    """Max-norm relative difference of two stored kernels, read in row blocks."""
    err, scale = 0.0, 0.0
    for r0 in range(0, a.shape[0], rows):
        x = np.asarray(a[r0 : r0 + rows], dtype=np.float64)
        y = np.asarray(b[r0 : r0 + rows], dtype=np.float64)
        err = max(err, float(np.abs(x - y).max()))
        scale = max(scale, float(np.abs(y).max()))
    return err / max(scale, 1e-300)


def run_single(net, params, x, outputs, threads, path):
    # the single-process blocked engine writing into a memory map
    shape = (x.shape[0],) * 2 + {"full": (net.n_out,) * 2, "trace": ()}.get(
        outputs, (net.n_out,)
    )
    base = memory("VmRSS")
    peak_reset()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    out = np.lib.format.open_memmap(path, mode="w+", dtype=params.dtype, shape=shape)
    fastntk.ntk(net, params, x, outputs=outputs, out=out, threads=threads)
    out.flush()
    del out
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return seconds, cpu, (memory() - base, memory())


def run_dask(fd, client, net, params, x, outputs, tile_size, path):
    # the tiled kernel on the cluster, written tile by tile into the store
    base = client.run(memory, "VmRSS")
    client.run(peak_reset)
    cpu0 = client.run(cpu_seconds)
    cpu0[None] = cpu_seconds()
    t0 = time.perf_counter()
    fd.ntk(
        net,
        params,
        x,
        outputs=outputs,
        tile_size=tile_size,
        client=client,
        store=path,
        resume=False,
    )
    seconds = time.perf_counter() - t0
    # CPU time of the workers and of this process (the client)
    cpu1 = client.run(cpu_seconds)
    cpu1[None] = cpu_seconds()
    cpu = sum(cpu1[w] - cpu0[w] for w in cpu1)
    peaks = client.run(memory)
    # the largest worker: (peak above its resident memory before, peak)
    worst = max(peaks, key=lambda w: peaks[w] - base[w])
    return seconds, cpu, (peaks[worst] - base[worst], peaks[worst])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 256, 1])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--outputs", default="trace")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tile-size", type=int, default=None)
    parser.add_argument("--store", nargs="+", default=["npy"], choices=["npy", "zarr"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args(argv)

    import fastntk.distributed as fd
    from fastntk.distributed._ntk import default_tile_size

    net = fastntk.MLP(args.widths, activation="relu", C_b=0.0, C_W=2.0)
    params = net.init(seed=0, dtype=args.dtype)
    x = np.random.default_rng(1).standard_normal((args.samples, net.n_in))
    x = x.astype(args.dtype)

    # room for the two kernels on disk
    per_pair = {"full": net.n_out**2, "trace": 1}.get(args.outputs, net.n_out)
    kernel_bytes = args.samples**2 * per_pair * params.dtype.itemsize
    free = shutil.disk_usage(args.dir).free
    if free < 2.2 * kernel_bytes:
        sys.exit(
            f"--dir: {args.dir} has {free / 1e9:.1f} GB free, the two kernels need "
            f"{2 * kernel_bytes / 1e9:.1f} GB; choose another --dir"
        )
    work = tempfile.mkdtemp(prefix="fastntk-dask-", dir=args.dir)
    single_path = os.path.join(work, "single.npy")
    print(
        f"P = {args.samples}, widths {args.widths}, {args.dtype}, outputs="
        f"{args.outputs}, kernel {kernel_bytes / 1e9:.2f} GB, {args.workers} "
        f"workers, outputs under {work}"
    )
    try:
        # compile (or load) the single-process kernels
        fastntk.ntk(net, params, x[:64], outputs=args.outputs, threads=args.workers)

        t0 = time.perf_counter()
        with fd.connect(n_workers=args.workers, threads_per_worker=1) as client:
            started = time.perf_counter() - t0
            t0 = time.perf_counter()
            fd.ntk(
                net,
                params,
                x[:512],
                outputs=args.outputs,
                tile_size=128,
                client=client,
            )
            warm = time.perf_counter() - t0
            tile = args.tile_size or default_tile_size(
                args.samples,
                args.samples,
                True,
                args.workers,
                per_pair * params.dtype.itemsize,
                max(args.widths[1:-1], default=1),
            )
            plan = fd.plan(
                net,
                args.samples,
                tile_size=tile,
                outputs=args.outputs,
                dtype=args.dtype,
            )
            print(
                f"cluster start {started:.2f} s, warm-up {warm:.2f} s; tiles of "
                f"{tile} samples: {plan.tiles} tasks on a {plan.grid} grid, "
                f"{plan.written_per_tile / 1e6:.0f} MB written per tile, "
                f"{plan.scattered_bytes / 1e6:.1f} MB scattered per worker, "
                f"{plan.flops / 1e9:.0f} GFLOP"
            )

            # wall seconds, CPU seconds and peak memory of every run
            single, dask = [], {s: [] for s in args.store}
            for r in range(args.repeat):
                single.append(
                    run_single(net, params, x, args.outputs, args.workers, single_path)
                )
                print(f"  run {r}: single {single[-1][0]:.2f} s", end="", flush=True)
                for kind in args.store:
                    path = os.path.join(work, f"dask.{kind}")
                    dask[kind].append(
                        run_dask(fd, client, net, params, x, args.outputs, tile, path)
                    )
                    print(
                        f", dask/{kind} {dask[kind][-1][0]:.2f} s", end="", flush=True
                    )
                print()

            # the results, entry by entry
            ref = np.load(single_path, mmap_mode="r")
            errors = {
                kind: compare(fd.open_kernel(os.path.join(work, f"dask.{kind}")), ref)
                for kind in args.store
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def medians(runs):
        return statistics.median(r[0] for r in runs), statistics.median(
            r[1] for r in runs
        )

    gflops = plan.flops / 1e9
    t_single, c_single = medians(single)
    print()
    print(
        f"{'engine':<22}{'wall s':>8}{'GFLOP/s':>9}{'overhead':>10}{'CPU s':>8}"
        f"{'overhead':>10}{'peak MiB (+run)':>17}{'rel. diff':>11}"
    )
    grow, peak = max(r[2] for r in single)
    print(
        f"{'single, ' + str(args.workers) + ' threads':<22}{t_single:>8.2f}"
        f"{gflops / t_single:>9.1f}{'':>10}{c_single:>8.2f}{'':>10}"
        f"{f'{peak:.0f} (+{grow:.0f})':>17}"
    )
    for kind in args.store:
        t, c = medians(dask[kind])
        grow, peak = max(r[2] for r in dask[kind])
        print(
            f"{'dask ' + kind + ', ' + str(args.workers) + ' workers':<22}{t:>8.2f}"
            f"{gflops / t:>9.1f}{t / t_single - 1:>+10.1%}{c:>8.2f}"
            f"{c / c_single - 1:>+10.1%}{f'{peak:.0f} (+{grow:.0f})':>17}"
            f"{errors[kind]:>11.1e}"
        )
    print(
        "Medians over the runs.  CPU s: CPU time of all processes involved (the "
        "workers and the client for dask), less sensitive to other load than wall "
        "time.  peak MiB: high-water mark of resident memory of the process during "
        "a run (+ its growth over the run); dask rows: the worker that grew most.  "
        "GFLOP/s: the tiled kernel's operations (fastntk.distributed.plan) per "
        "second of wall time."
    )


if __name__ == "__main__":
    main()
