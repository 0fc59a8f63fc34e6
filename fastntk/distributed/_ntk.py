"""The NTK as tiles computed on a Dask cluster."""

from __future__ import annotations

import logging
import math
import os
import uuid
from dataclasses import dataclass

import numpy as np

from fastntk._validation import as_samples, check_dtype, check_int
from fastntk.distributed import _cluster, _store, _tiles
from fastntk.distributed._progress import progress_callback
from fastntk.model.rates import check_rates

logger = logging.getLogger(__name__)

OUTPUTS = ("full", "trace", "diagonal")
METHODS = ("auto", "structured", "jacobian")

#: Tiles per task slot of the cluster aimed at by the automatic tile size, so that
#: the work spreads evenly (the costliest tiles are scheduled first).
TILES_PER_SLOT = 4
#: Smallest tile side the automatic size picks, in multiples of the widest hidden
#: layer: a tile recomputes the forward and backward passes of its samples, which
#: cost about 2 N / side of its Gram products for width N.
MIN_TILE_PER_WIDTH = 16
#: Smallest tile side the automatic size picks (unless the kernel is smaller).
MIN_TILE = 256
#: Largest tile the automatic size picks, in bytes of kernel.
MAX_TILE_BYTES = 256 << 20

#: Prefix of the keys of tile tasks on the scheduler.
TILE_KEY = "fastntk-tile"
#: Times the inputs are scattered to the workers at most, when lost with them.
MAX_SCATTERS = 3


# -- validation -------------------------------------------------------------------


def check_kernel_options(net, rates, outputs, per_layer, method):
    """Validate the options of a kernel for ``net``; return rates and method."""
    from fastntk.model.mlp import MLP

    if not isinstance(net, MLP):
        raise TypeError(f"net: expected fastntk.MLP, received {type(net).__name__}")
    rates = check_rates(rates, net)
    if outputs not in OUTPUTS:
        raise ValueError(
            f"outputs: expected one of {', '.join(map(repr, OUTPUTS))}, received "
            f"{outputs!r}"
        )
    if not isinstance(per_layer, (bool, np.bool_)):
        raise TypeError(
            f"per_layer: expected True or False, received {type(per_layer).__name__}"
        )
    if method not in METHODS:
        raise ValueError(
            f"method: expected one of {', '.join(map(repr, METHODS))}, received "
            f"{method!r}"
        )
    if method == "auto":
        method = "structured" if rates.structured else "jacobian"
    elif method == "structured" and not rates.structured:
        raise ValueError(
            f"method: 'structured' needs an identity or layerwise learning-rate "
            f"tensor, received a {rates.kind} one; use method='jacobian' or 'auto'"
        )
    if per_layer and rates.kind == "dense":
        raise ValueError(
            "per_layer: per-layer kernels are not defined for a dense learning-rate "
            "tensor (its blocks couple layers); use per_layer=False"
        )
    return rates, method


def default_tile_size(P1, P2, symmetric, slots, bytes_per_pair, width=1) -> int:
    """Tile side for ``slots`` task slots and hidden layers up to ``width`` wide.

    About ``TILES_PER_SLOT`` tiles per slot, sides of at least ``MIN_TILE`` and
    ``MIN_TILE_PER_WIDTH * width`` samples, at most ``MAX_TILE_BYTES`` a tile.
    """
    target = TILES_PER_SLOT * slots
    if symmetric:
        # n (n + 1) / 2 tiles for n tiles along each axis
        side = math.ceil(P1 / math.ceil(math.sqrt(2 * target)))
    else:
        side = math.ceil(math.sqrt(P1 * P2 / target))
    side = max(side, MIN_TILE, MIN_TILE_PER_WIDTH * width)
    side = min(side, int(math.sqrt(MAX_TILE_BYTES / bytes_per_pair)), max(P1, P2))
    return max(side, 1)


def _check_store(store, resume):
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise TypeError(
            f"store: expected None or a path (a .npy file or a Zarr directory), "
            f"received {type(store).__name__}"
        )
    if not isinstance(resume, (bool, np.bool_)):
        raise TypeError(f"resume: expected True or False, received {resume!r}")
    return None if store is None else _store.KernelStore.at(store)


# -- public function -------------------------------------------------------------


def ntk(
    net,
    params,
    x1,
    x2=None,
    *,
    rates=None,
    outputs="full",
    per_layer=False,
    method="auto",
    tile_size=None,
    store=None,
    resume=True,
    client=None,
    address=None,
    n_workers=None,
    threads_per_worker=1,
    timeout=_cluster.DEFAULT_TIMEOUT,
    progress=None,
):
    """The empirical NTK computed tile by tile on a Dask cluster.

    The (P1 x P2) kernel is cut into square tiles of ``tile_size`` samples; each
    tile is one Dask task that calls :func:`fastntk.ntk` on its rows of ``x1``
    and its columns of ``x2``.  When ``x2`` is None (x2 = x1) only the tiles on
    and above the diagonal are computed, and the others are their mirrors.  The
    network, parameters, rates and data are sent to every worker once.

    Parameters
    ----------
    net : MLP
    params : Params
    x1 : array_like, shape (P1, n_0)
        Samples as rows, in the parameters' dtype.
    x2 : array_like, shape (P2, n_0), optional
        Second sample set; None means ``x1`` (symmetric kernel).
    rates : Rates, optional
        Learning-rate tensor (default layerwise with lambda_b = lambda_W = 1).
    outputs : {"full", "trace", "diagonal"}
        Kernel of shape (P1, P2, n_out, n_out), (P1, P2) or (P1, P2, n_out), as
        in :func:`fastntk.ntk`.
    per_layer : bool
        One kernel per layer, along a leading axis of length L.
    method : {"auto", "structured", "jacobian"}
        Algorithm of each tile, as in :func:`fastntk.ntk`.
    tile_size : int, optional
        Samples per tile along each axis.  By default about four tiles per task
        slot of the cluster, at least 16 times the widest hidden layer (each
        tile recomputes the forward and backward passes of its samples) and at
        most 256 MiB each.
    store : str or os.PathLike, optional
        Write the kernel to disk tile by tile: a path ending in ``.npy`` (a NumPy
        file written through a memory map) or any other path (a Zarr directory,
        one chunk per tile).  A relative path is taken from the current
        directory of this process; the workers must see the same path (on one
        machine, or a shared file system).
    resume : bool
        When ``store`` holds an interrupted run of the same kernel, compute only
        its missing tiles.  False starts over (overwriting the store).
    client : distributed.Client, optional
        Cluster to use; left open.
    address : str, optional
        Scheduler of a running cluster (e.g. ``"tcp://10.0.0.5:8786"``).
    n_workers : int, optional
        Start a local cluster of this many worker processes for this call.
        With none of ``client``, ``address``, ``n_workers``, a local cluster of
        one worker per ``threads_per_worker`` usable cores is started.
    threads_per_worker : int
        Threads each tile task uses (numba and BLAS).  A worker running k tasks
        at once uses k times as many: give ``cores / k``.
    timeout : float
        Seconds to wait for the scheduler at ``address``.
    progress : callable or bool, optional
        ``progress(done, total)`` after each tile lands (``total``: tiles this
        call computes); True draws a bar on stderr.

    Returns
    -------
    kernel : numpy.memmap, zarr.Array, dask.array.Array or numpy.ndarray
        With ``store``: the stored kernel, opened read-only.  Without: a dask
        array whose tiles stay on the cluster when ``client`` is given, else
        (the cluster ends with the call) a NumPy array.  The parameters' dtype.

    Raises
    ------
    ConnectionError
        When no scheduler answers at ``address`` within ``timeout`` seconds.
    ValueError
        When ``store`` holds a run of another kernel and ``resume`` is True.

    Examples
    --------
    >>> import numpy as np, fastntk, fastntk.distributed as fd
    >>> net = fastntk.MLP([3, 32, 1])
    >>> params = net.init(seed=0)
    >>> x = np.random.default_rng(0).standard_normal((100, 3))
    >>> H = fd.ntk(net, params, x, outputs="trace", tile_size=40,
    ...            n_workers=2)  # doctest: +SKIP
    >>> H.shape  # doctest: +SKIP
    (100, 100)
    """
    # validate everything before starting anything
    rates, method = check_kernel_options(net, rates, outputs, per_layer, method)
    params = net.check_params(params)
    x1 = as_samples("x1", x1, net.n_in, params.dtype)
    x2 = None if x2 is None else as_samples("x2", x2, net.n_in, params.dtype)
    if tile_size is not None:
        tile_size = check_int("tile_size", tile_size, 1)
    kstore = _check_store(store, resume)
    client, address, n_workers, threads_per_worker, timeout = (
        _cluster.check_cluster_args(
            client, address, n_workers, threads_per_worker, timeout
        )
    )
    report = progress_callback(progress, "tiles")
    P1 = x1.shape[0]
    P2 = P1 if x2 is None else x2.shape[0]
    shape, lead = _tiles.kernel_layout(
        net.depth, net.n_out, P1, P2, outputs, bool(per_layer)
    )
    own_result = store is None and client is None
    if own_result:
        _check_fits(shape, params.dtype)

    with _cluster.connect(
        client, address, n_workers, threads_per_worker, timeout, set_as_default=False
    ) as cl:
        # tiling: the stored one when resuming, else sized for this cluster
        if tile_size is None and resume and kstore is not None and kstore.exists():
            tile_size = int(kstore.read_meta().get("tile_size", 0)) or None
        if tile_size is None:
            slots = max(1, sum(cl.nthreads().values()))
            per_pair = int(np.prod(shape)) // (P1 * P2) * params.dtype.itemsize
            width = max(net.widths[1:-1], default=1)
            tile_size = default_tile_size(P1, P2, x2 is None, slots, per_pair, width)
        grid = _tiles.Grid(P1, P2, tile_size, x2 is None)
        problem = _tiles.Problem(
            net=net,
            theta=params.theta,
            x1=x1,
            x2=x2,
            rates=rates,
            outputs=outputs,
            per_layer=bool(per_layer),
            method=method,
            threads=threads_per_worker,
            grid=grid,
        )
        if kstore is not None:
            return _to_store(cl, problem, shape, lead, kstore, resume, report)
        return _to_array(cl, problem, shape, lead, own_result, report)


def _check_fits(shape, dtype):
    # a NumPy result must fit in this process's memory
    from fastntk.engines.ntk import available_memory

    need = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    avail = available_memory()
    if avail is not None and need > avail // 2:
        raise MemoryError(
            f"ntk: the kernel of shape {shape} ({np.dtype(dtype)}) needs "
            f"{need / 2**30:.2f} GiB, more than half of the {avail / 2**30:.2f} GiB "
            f"available here; pass store='kernel.zarr' (or a .npy path) to write "
            f"it to disk, or client=... to keep it on the cluster"
        )


@dataclass(frozen=True)
class TilePlan:
    """The task graph of a tiled kernel, counted: what moves and what is computed.

    Attributes
    ----------
    tile_size : int
    grid : tuple of int
        Tiles along the rows and the columns.
    tiles : int
        Tile tasks (only those on and above the diagonal when symmetric).
    flops : float
        Floating-point operations of all tiles (forward and backward passes of
        each tile's samples included, see :func:`fastntk.engines.ntk.ntk_flops`).
    flops_per_tile : float
        Of the largest tile task (an off-diagonal one).
    scattered_bytes : int
        Sent once to every worker: parameters, samples, learning-rate tensor.
    tile_bytes : int
        One full tile of the kernel.
    written_per_tile : int
        Bytes a tile task writes into a store (a tile and, off the diagonal of
        a symmetric kernel, its mirror).
    kernel_bytes : int
        The whole kernel.
    feature_passes : float
        Forward/backward passes over samples, relative to one pass over each
        sample set (tiles recompute the features of their rows and columns).
    """

    tile_size: int
    grid: tuple
    tiles: int
    flops: float
    flops_per_tile: float
    scattered_bytes: int
    tile_bytes: int
    written_per_tile: int
    kernel_bytes: int
    feature_passes: float


def plan(
    net,
    P1,
    P2=None,
    *,
    tile_size,
    outputs="full",
    per_layer=False,
    dtype="float64",
    rates=None,
):
    """Count the task graph of :func:`ntk` without running it.

    Parameters
    ----------
    net : MLP
    P1 : int
        Samples of x1.
    P2 : int, optional
        Samples of x2; None for the symmetric kernel (x2 = x1).
    tile_size : int
    outputs : {"full", "trace", "diagonal"}
    per_layer : bool
    dtype : {"float64", "float32"}
    rates : Rates, optional
        Only its size matters (a dense tensor is scattered too).

    Returns
    -------
    TilePlan

    Examples
    --------
    >>> import fastntk, fastntk.distributed as fd
    >>> net = fastntk.MLP([64, 256, 256, 1])
    >>> p = fd.plan(net, 20_000, tile_size=3334, outputs="trace", dtype="float32")
    >>> p.tiles, p.grid, round(p.kernel_bytes / 1e9, 1)
    (21, (6, 6), 1.6)
    """
    from fastntk.engines.ntk import ntk_flops

    rates, _ = check_kernel_options(net, rates, outputs, per_layer, "auto")
    P1 = check_int("P1", P1, 1)
    P2 = None if P2 is None else check_int("P2", P2, 1)
    tile_size = check_int("tile_size", tile_size, 1)
    itemsize = check_dtype("dtype", dtype).itemsize
    symmetric = P2 is None
    grid = _tiles.Grid(P1, P1 if symmetric else P2, tile_size, symmetric)
    shape, _ = _tiles.kernel_layout(
        net.depth, net.n_out, grid.P1, grid.P2, outputs, bool(per_layer)
    )
    per_pair = int(np.prod(shape)) // (grid.P1 * grid.P2) * itemsize

    # every tile: its operations and the samples whose features it computes
    flops, largest, passes = 0.0, 0.0, 0
    for i, j in grid.tiles():
        rows = grid.rows(i)[1] - grid.rows(i)[0]
        cols = grid.cols(j)[1] - grid.cols(j)[0]
        if symmetric and i == j:
            f = ntk_flops(net, rows, outputs=outputs)
            passes += rows
        else:
            f = ntk_flops(net, rows, cols, outputs=outputs)
            passes += rows + cols
        flops += f
        largest = max(largest, f)
    scattered = net.n_params + (grid.P1 + (0 if symmetric else grid.P2)) * net.n_in
    scattered *= itemsize
    if rates.kind == "dense":
        scattered += 8 * net.n_params**2
    tile_bytes = min(tile_size, grid.P1) * min(tile_size, grid.P2) * per_pair
    return TilePlan(
        tile_size=tile_size,
        grid=grid.shape,
        tiles=len(grid.tiles()),
        flops=flops,
        flops_per_tile=largest,
        scattered_bytes=int(scattered),
        tile_bytes=tile_bytes,
        written_per_tile=tile_bytes * (2 if symmetric and grid.shape[0] > 1 else 1),
        kernel_bytes=int(np.prod(shape)) * itemsize,
        feature_passes=passes / (grid.P1 + (0 if symmetric else grid.P2)),
    )


# -- drivers --------------------------------------------------------------------


def _submit_tiles(client, task, problem_future, grid, tiles, *extra):
    # one task per tile, named after the tile; returns future -> (i, j).  The
    # costliest tiles run first (Dask runs higher priorities first), so that the
    # last ones, which may leave workers idle, are the cheap ones.
    run = uuid.uuid4().hex[:12]
    return {
        client.submit(
            task,
            problem_future,
            *extra,
            i,
            j,
            key=f"{TILE_KEY}-{run}-{i}-{j}",
            priority=grid.cost(i, j),
        ): (i, j)
        for i, j in tiles
    }


def _drain(client, futures, on_batch):
    """Wait for ``futures``, calling ``on_batch(list_of_futures)`` as they land.

    On any error (including an exception from a callback or an interrupt) the
    tasks that have not landed are cancelled and the error propagates.
    """
    from distributed import as_completed

    landed = set()
    try:
        for batch in as_completed(futures, loop=client.loop).batches():
            for fut in batch:
                # a task that failed raises its exception here
                fut.result()
            on_batch(batch)
            landed.update(batch)
    except BaseException:
        client.cancel([f for f in futures if f not in landed])
        raise


def _scatter(client, problem):
    # the problem once to every worker, pushed by the client: tiles refer to it
    return client.scatter(problem, broadcast=True, hash=False)


def _lost(client, future) -> bool:
    # whether no worker holds the data of ``future`` any more
    try:
        return not client.who_has([future]).get(future.key)
    except Exception:  # a scheduler that cannot answer has lost it for us too
        return True


def _run_tiles(client, problem, tiles, task, extra, on_landed, report, keep):
    """Run one task per tile until each has landed; ``on_landed(tile, future)``.

    The problem is scattered to every worker once.  Dask recomputes the tiles of
    a worker that dies; but scattered data cannot be recomputed, so when every
    worker holding it has died, it is scattered again and the tiles that have
    not landed are submitted again (at most ``MAX_SCATTERS`` times).  With
    ``keep``, tiles whose results were lost after landing are redone too.
    Returns ``(problem_future, {tile: future})``.
    """
    total, landed, pending = len(tiles), {}, list(tiles)
    if report is not None:
        report(0, total)
    attempt = 1
    while True:
        problem_future = _scatter(client, problem)
        futures = _submit_tiles(
            client, task, problem_future, problem.grid, pending, *extra
        )

        def land(batch, futures=futures):
            for fut in batch:
                landed[futures[fut]] = fut
                on_landed(futures[fut], fut)
            if report is not None:
                report(len(landed), total)

        try:
            _drain(client, futures, land)
        except Exception:
            # only the loss of the scattered inputs is recovered from here
            if attempt == MAX_SCATTERS or not _lost(client, problem_future):
                raise
            pending = [t for t in pending if t not in landed]
            logger.warning(
                "the kernel's inputs were lost with the workers holding them; "
                "sending them again for the %d tiles left",
                len(pending),
            )
        else:
            # results kept on the cluster that were lost with their inputs
            pending = [t for t, f in landed.items() if keep and f.cancelled()]
            if not pending:
                return problem_future, landed
            if attempt == MAX_SCATTERS:
                raise RuntimeError(
                    f"ntk: the results of {len(pending)} tiles were lost with "
                    f"their workers {MAX_SCATTERS} times; check the workers' "
                    f"health (memory, restarts), or pass store=... to keep the "
                    f"tiles on disk as they land"
                )
            for t in pending:
                del landed[t]
            logger.warning(
                "the results of %d tiles were lost with their workers and inputs; "
                "sending the inputs again to compute them",
                len(pending),
            )
        attempt += 1


def _to_store(client, problem, shape, lead, kstore, resume, report):
    # write every missing tile into the store, recording each as it lands
    from fastntk.distributed._store import FORMAT, FORMAT_VERSION, fingerprint

    grid = problem.grid
    options = (problem.outputs, problem.per_layer, problem.method)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "shape": list(shape),
        "dtype": problem.theta.dtype.str,
        "tile_size": grid.tile_size,
        "grid_shape": list(grid.shape),
        "symmetric": grid.symmetric,
        "outputs": problem.outputs,
        "per_layer": problem.per_layer,
        "method": problem.method,
        "fingerprint": fingerprint(
            problem.net, problem.theta, problem.x1, problem.x2, problem.rates, options
        ),
    }
    chunks = list(shape)
    chunks[lead] = chunks[lead + 1] = grid.tile_size
    chunks = [min(c, s) for c, s in zip(chunks, shape, strict=True)]
    already = kstore.prepare(
        meta, shape, problem.theta.dtype, chunks, grid.shape, resume
    )
    todo = [t for t in grid.tiles() if not kstore.done[t]]
    logger.info(
        "kernel %s into %s: %d tiles of %d samples, %d done before, %d to compute",
        shape,
        kstore.path,
        len(grid.tiles()),
        grid.tile_size,
        already,
        len(todo),
    )
    if todo:

        def land(tile, future):
            # the tile is written: record it, drop its small result
            kstore.mark_done([tile])
            future.release()

        problem_future, _ = _run_tiles(
            client,
            problem,
            todo,
            _tiles.tile_to_store,
            (kstore.sink(),),
            land,
            report,
            keep=False,
        )
        client.cancel([problem_future])
    elif report is not None:
        report(0, 0)
    return kstore.open()


def _to_array(client, problem, shape, lead, own_result, report):
    # tiles kept on the cluster (dask array) or gathered here (NumPy array)
    import dask
    import dask.array as da

    grid = problem.grid
    if own_result:
        # copy each tile (and its mirror) into one array as it lands
        out = np.empty(shape, dtype=problem.theta.dtype)

        def land(tile, future):
            i, j = tile
            block = future.result()
            rows, cols = grid.rows(i), grid.cols(j)
            out[_tiles.tile_index(lead, rows, cols)] = block
            if grid.symmetric and i != j:
                out[_tiles.tile_index(lead, cols, rows)] = _tiles.mirror(
                    block, problem.outputs, lead
                )
            future.release()

        _run_tiles(
            client, problem, grid.tiles(), _tiles.tile_block, (), land, report, False
        )
        return out

    problem_future, by_tile = _run_tiles(
        client,
        problem,
        grid.tiles(),
        _tiles.tile_block,
        (),
        lambda tile, future: None,
        report,
        keep=True,
    )

    # a dask array over the tiles; those below the diagonal are lazy mirrors
    row_chunks, col_chunks = grid.chunks()
    dtype = problem.theta.dtype

    def block(i, j):
        a, b = (i, j) if (i, j) in by_tile else (j, i)
        tile_shape = list(shape)
        tile_shape[lead], tile_shape[lead + 1] = row_chunks[a], col_chunks[b]
        # the tile, holding on to the problem so that a lost tile can be redone
        held = dask.delayed(_tiles.first, pure=True)(by_tile[a, b], problem_future)
        arr = da.from_delayed(held, tuple(tile_shape), dtype)
        return arr if (a, b) == (i, j) else _tiles.mirror(arr, problem.outputs, lead)

    n1, n2 = grid.shape
    rows = [
        da.concatenate([block(i, j) for j in range(n2)], axis=lead + 1)
        for i in range(n1)
    ]
    return da.concatenate(rows, axis=lead)
