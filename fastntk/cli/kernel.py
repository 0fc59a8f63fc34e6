"""``fastntk ntk``: one kernel to a ``.npy`` file, with its shape, time and memory.

The samples are the first ``--n`` rows (and the next ``--n2`` rows for a cross
kernel) of a seeded permutation of the data.  The result is written with
``numpy.save``, or computed straight into a ``.npy`` memory map with ``--memmap``
(for kernels larger than memory; readable with ``numpy.load(path,
mmap_mode="r")``), or tiled over a Dask cluster with ``--cluster`` or
``--workers``.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

import fastntk
from fastntk import data as datasets
from fastntk.cli.progress import Progress

logger = logging.getLogger(__name__)


def kernel_samples(cfg):
    """(x1, x2 or None, n_out) of the ``ntk`` command's options."""
    n, n2, seed, dtype = cfg["n"], cfg["n2"], cfg["seed"], cfg["dtype"]
    source = cfg["data"]
    if source == "teacher":
        x, y = datasets.teacher_student(
            n + n2, noise=cfg["noise"], seed=seed, dtype=dtype
        )
    elif source == "digits":
        x, y = datasets.digits(dtype=dtype)
    else:
        x, y = datasets.load(source, target_columns=cfg["target_columns"], dtype=dtype)
    if n + n2 > x.shape[0]:
        raise ValueError(
            f"--n, --n2: expected n + n2 <= {x.shape[0]} (the samples of "
            f"{source!r}), received {n} + {n2}"
        )

    # outputs: one per class for labels, one per target column otherwise
    if cfg["n_out"] is not None:
        n_out = cfg["n_out"]
    elif y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        n_out = int(y.max()) + 1
    else:
        n_out = 1 if y.ndim == 1 else int(y.shape[1])

    # a seeded choice of samples
    order = np.random.default_rng(seed).permutation(x.shape[0])
    x1 = np.ascontiguousarray(x[order[:n]])
    x2 = np.ascontiguousarray(x[order[n : n + n2]]) if n2 else None
    return x1, x2, n_out


def _peak_rss_bytes() -> int:
    # Peak resident memory of this process (ru_maxrss: KiB on Linux, B on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _mib(n) -> str:
    # A byte count in the largest binary unit that keeps it >= 1.
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def command(cfg) -> int:
    """``fastntk ntk``: compute the kernel, write it, print one line about it."""
    from fastntk._config import thread_limit
    from fastntk.engines.ntk import ntk_shape

    out = Path(cfg["out"])
    if out.suffix != ".npy":
        raise ValueError(f"--out: expected a .npy file name, received {str(out)!r}")
    x1, x2, n_out = kernel_samples(cfg)
    widths = [x1.shape[1], *cfg["hidden"], n_out]
    net = fastntk.MLP(
        widths,
        activation=cfg["activation"],
        C_b=cfg["C_b"],
        C_W=cfg["C_W"],
        slope=cfg["slope"],
    )
    params = net.init(seed=cfg["seed"], dtype=cfg["dtype"])
    rates = fastntk.rates.layerwise(net, cfg["lambda_b"], cfg["lambda_W"])
    P2 = x1.shape[0] if x2 is None else x2.shape[0]
    shape = ntk_shape(net, x1.shape[0], P2, outputs=cfg["outputs"])
    nbytes = int(np.prod(shape)) * params.dtype.itemsize

    # the destination: opened before the work, so that a bad path fails early
    on_cluster = cfg["cluster"] is not None or cfg["workers"] is not None
    target = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if on_cluster:
            if not os.access(out.parent, os.W_OK):
                raise PermissionError(errno.EACCES, "Permission denied")
        elif cfg["memmap"]:
            target = np.lib.format.open_memmap(
                out, mode="w+", dtype=params.dtype, shape=shape
            )
        else:
            with open(out, "ab"):
                pass
    except OSError as exc:
        raise OSError(
            f"--out: cannot write {str(out)!r}: {exc.strerror or exc}; choose "
            f"another path with --out"
        ) from None
    logger.info(
        "fastntk ntk: %s, kernel of shape %s (%s) -> %s", net, shape, _mib(nbytes), out
    )

    # the kernel: tiled over a cluster (written to ``out`` tile by tile), or here
    start = time.perf_counter()
    if on_cluster:
        _distributed(cfg, net, params, x1, x2, rates, out)
    else:
        options = dict(
            rates=rates,
            outputs=cfg["outputs"],
            memory_limit=cfg["memory_limit"],
            threads=cfg["threads"],
        )
        bar = Progress(
            100, "kernel, % of pairs", enabled=None if not cfg["quiet"] else False
        )
        with thread_limit(cfg["threads"]):
            if bar.enabled and x1.shape[0] >= STRIPE_MIN_ROWS:
                if target is None:
                    target = np.empty(shape, dtype=params.dtype)
                H = striped_ntk(net, params, x1, x2, target, bar, **options)
            else:
                H = fastntk.ntk(net, params, x1, x2, out=target, **options)
    seconds = time.perf_counter() - start

    # write (or flush the memory map)
    if isinstance(target, np.memmap):
        target.flush()
        del target
    elif not on_cluster:
        np.save(out, np.asarray(H))
    print(
        f"fastntk ntk: shape {shape} {params.dtype} ({cfg['outputs']}) in "
        f"{seconds:.3f} s, output {_mib(nbytes)}, peak memory "
        f"{_mib(_peak_rss_bytes())}, written to {out}"
    )
    return 0


#: Kernels with at least this many rows are computed in stripes of rows when a
#: progress bar is drawn (one call of the engine per stripe).
STRIPE_MIN_ROWS = 4096

#: Stripes of a striped kernel (at least; more when a stripe would exceed
#: STRIPE_BYTES).
STRIPES = 20
STRIPE_BYTES = 256 << 20


def striped_ntk(net, params, x1, x2, out, bar, **options):
    """The kernel computed in stripes of rows of ``x1``, reporting progress.

    For a symmetric kernel (``x2`` None) each stripe of rows r0:r1 is computed
    against the samples r0: only, and mirrored into the columns r0:r1 of the
    rows below, so that every pair of samples is computed once, as the engine
    itself does.  Each stripe is one :func:`fastntk.ntk` call.

    Parameters
    ----------
    net, params, x1, x2
        As in :func:`fastntk.ntk`.
    out : ndarray or numpy.memmap
        The result, of the kernel's full shape.
    bar : Progress
        Advanced to ``bar.total`` in proportion to the sample pairs done.
    **options
        Passed to :func:`fastntk.ntk` (``rates``, ``outputs``, ...).

    Returns
    -------
    out
    """
    P1 = x1.shape[0]
    P2 = P1 if x2 is None else x2.shape[0]
    row_bytes = out.itemsize * int(np.prod(out.shape[1:], dtype=np.int64))
    rows = max(1, min(-(-P1 // STRIPES), STRIPE_BYTES // max(row_bytes, 1)))
    outputs = options.get("outputs", "full")
    # axes of H(x1, x2)[a, b, ...] that give H(x2, x1)[b, a, ...]
    swap = {"full": (1, 0, 3, 2), "trace": (1, 0), "diagonal": (1, 0, 2)}[outputs]

    # sample pairs to compute: the upper triangle, or the whole rectangle
    total = P1 * (P1 + 1) // 2 if x2 is None else P1 * P2
    done = 0
    with bar:
        for r0 in range(0, P1, rows):
            r1 = min(r0 + rows, P1)
            if x2 is None:
                # this stripe against the samples from r0 on, then its mirror
                block = fastntk.ntk(net, params, x1[r0:r1], x1[r0:], **options)
                out[r0:r1, r0:] = block
                out[r1:, r0:r1] = block[:, r1 - r0 :].transpose(swap)
            else:
                out[r0:r1] = fastntk.ntk(net, params, x1[r0:r1], x2, **options)
            done += (r1 - r0) * (P1 - r0 if x2 is None else P2)
            bar.update(bar.total * min(done, total) // total)
    logger.debug("kernel of %d x %d samples in stripes of %d rows", P1, P2, rows)
    return out


def _distributed(cfg, net, params, x1, x2, rates, out):
    """The kernel tiled over a Dask cluster, written into ``out`` tile by tile."""
    try:
        from fastntk import distributed
    except ImportError as exc:
        raise ImportError(f"--cluster/--workers: {exc}") from None
    bar = []

    def progress(done, total):
        # one bar over the tiles, drawn only on a terminal and without --quiet
        if not bar:
            bar.append(
                Progress(total, "tiles", enabled=None if not cfg["quiet"] else False)
            )
        bar[0].update(done)

    try:
        distributed.ntk(
            net,
            params,
            x1,
            x2,
            rates=rates,
            outputs=cfg["outputs"],
            store=out,
            resume=cfg["resume"],
            address=cfg["cluster"],
            n_workers=cfg["workers"],
            threads_per_worker=cfg["threads"] or 1,
            progress=progress,
        )
    finally:
        if bar:
            bar[0].close()
