"""Ensembles and sweeps of networks on a Dask cluster.

Each member is one network drawn with one seed: a Dask task initializes it,
optionally trains it, and computes its kernel.  The members of each network
(architecture) are reduced on the cluster to their count, mean and sum of
squared deviations (M2) by a tree of merge tasks, so that only the statistics
travel back to the client, never every kernel (unless asked).

Two partial results (n_a, mean_a, M2_a) and (n_b, mean_b, M2_b) merge exactly
(Chan, Golub and LeVeque's pairwise update):

    n = n_a + n_b,   delta = mean_b - mean_a,
    mean = mean_a + delta n_b / n,
    M2 = M2_a + M2_b + delta^2 n_a n_b / n,

and the variance is M2 / (n - ddof).  The arithmetic is that of
:func:`fastntk.theory.ntk_ensemble`, which does the same on one machine.
"""

from __future__ import annotations

import inspect
import logging
import numbers
import uuid
from dataclasses import dataclass

import numpy as np

from fastntk._validation import as_samples, check_dtype, check_int
from fastntk.distributed import _cluster
from fastntk.distributed._ntk import MAX_SCATTERS, _drain, _lost, check_kernel_options
from fastntk.distributed._progress import progress_callback

logger = logging.getLogger(__name__)

#: Prefix of the keys of member tasks on the scheduler.
MEMBER_KEY = "fastntk-member"


@dataclass
class EnsembleResult:
    """Statistics of an ensemble, one row per network.

    Attributes
    ----------
    nets : list of MLP
        The networks (architectures), in the order given.
    seeds : ndarray of int64, shape (S,)
        Seeds of the members of each network.
    count : ndarray of int64, shape (N,)
        Members reduced per network (S each).
    mean : ndarray of float64, shape (N, *K)
        Mean kernel of each network; K is the kernel's shape, e.g. (P1, P2).
    variance : ndarray of float64, shape (N, *K)
        Variance of the kernel entries over the seeds, ``M2 / (count - ddof)``.
    ddof : int
        Delta degrees of freedom of ``var``.
    members : ndarray, shape (N, S, *K), or None
        Every member's kernel, when gathered (``gather=True``).
    histories : list of list of History, or None
        Training history of every member, ``histories[n][s]``, when trained.
    """

    nets: list
    seeds: np.ndarray
    count: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    ddof: int
    members: np.ndarray | None = None
    histories: list | None = None


@dataclass
class Spec:
    """What every member task needs, scattered once to every worker."""

    nets: list
    rates: list
    x1: np.ndarray
    x2: np.ndarray | None
    dtype: str
    outputs: str
    per_layer: bool
    methods: list
    train: dict | None
    threads: int


# -- tasks (run on the workers) ---------------------------------------------------


def member(spec: Spec, k: int, seed: int):
    """Dask task: (kernel, history) of network ``k`` drawn with ``seed``."""
    from fastntk.engines.ntk import ntk

    net = spec.nets[k]
    params = net.init(seed=int(seed), dtype=spec.dtype)
    history = None
    if spec.train is not None:
        # training run from this initialization, then the kernel at its end
        from fastntk.engines.train import train

        params, history = train(net, params, threads=spec.threads, **spec.train)
    kernel = ntk(
        net,
        params,
        spec.x1,
        spec.x2,
        spec.rates[k],
        outputs=spec.outputs,
        per_layer=spec.per_layer,
        method=spec.methods[k],
        threads=spec.threads,
    )
    return kernel, history


def _accumulator(part):
    # a running accumulator holding the partial result (count, mean, M2)
    from fastntk.theory.ensemble import _Welford

    n, mean, m2 = part
    acc = _Welford(mean.shape)
    acc.n, acc.mean, acc.m2 = n, mean.copy(), m2.copy()
    return acc


def moments(*members):
    """Dask task: (count, mean, M2) of the members' kernels, in float64."""
    from fastntk.theory.ensemble import _Welford

    acc = None
    for kernel, _ in members:
        if acc is None:
            acc = _Welford(np.shape(kernel))
        # Welford's update with one more member
        acc.add(np.asarray(kernel, dtype=np.float64))
    return acc.n, acc.mean, acc.m2


def merge(*parts):
    """Dask task: (count, mean, M2) of the union of disjoint partial results."""
    acc = _accumulator(parts[0])
    for part in parts[1:]:
        # pairwise update of two disjoint groups
        acc.merge(_accumulator(part))
    return acc.n, acc.mean, acc.m2


def history_of(result):
    """Dask task: the training history of a member."""
    return result[1]


# -- validation ---------------------------------------------------------------------


def _check_nets(nets):
    from fastntk.model.mlp import MLP

    if isinstance(nets, MLP):
        nets = [nets]
    try:
        nets = list(nets)
    except TypeError:
        raise TypeError(
            f"nets: expected a fastntk.MLP or a sequence of them, received "
            f"{type(nets).__name__}"
        ) from None
    if not nets:
        raise ValueError("nets: expected at least one network, received none")
    for k, net in enumerate(nets):
        if not isinstance(net, MLP):
            raise TypeError(
                f"nets[{k}]: expected fastntk.MLP, received {type(net).__name__}"
            )
        if (net.n_in, net.n_out) != (nets[0].n_in, nets[0].n_out):
            raise ValueError(
                f"nets[{k}]: expected input and output widths "
                f"({nets[0].n_in}, {nets[0].n_out}) like nets[0], so that the "
                f"kernels share one shape; received ({net.n_in}, {net.n_out})"
            )
    return nets


def _check_seeds(seeds):
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        return np.arange(check_int("seeds", seeds, 1), dtype=np.int64)
    arr = np.asarray(seeds)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"seeds: expected a number of seeds or a non-empty sequence of "
            f"integers, received {seeds!r}"
        )
    if np.unique(arr).size != arr.size:
        raise ValueError(
            f"seeds: expected distinct seeds (repeated ones draw the same "
            f"network), received {arr.tolist()}"
        )
    return arr.astype(np.int64)


def _check_train(train):
    if train is None:
        return None
    if not isinstance(train, dict):
        raise TypeError(
            f"train: expected None or a dict of keyword arguments of "
            f"fastntk.train (x, y, loss, lr, steps, ...), received "
            f"{type(train).__name__}"
        )
    from fastntk.engines.train import train as train_fn

    names = set(inspect.signature(train_fn).parameters)
    # the network, its parameters and the threads are set per member
    allowed = names - {"net", "params", "threads", "inplace"}
    unknown = sorted(set(train) - allowed)
    if unknown:
        raise ValueError(
            f"train: unknown or reserved keys {unknown}; expected keyword "
            f"arguments of fastntk.train among {sorted(allowed)}"
        )
    missing = sorted({"x", "y", "loss", "lr"} - set(train))
    if missing:
        raise ValueError(
            f"train: missing keys {missing}; fastntk.train needs x, y, loss, lr "
            f"and steps or epochs"
        )
    return dict(train)


# -- public function -----------------------------------------------------------------


def ensemble(
    nets,
    x1,
    x2=None,
    *,
    seeds=8,
    dtype="float64",
    rates=None,
    outputs="trace",
    per_layer=False,
    method="auto",
    train=None,
    gather=False,
    ddof=1,
    fan_in=8,
    client=None,
    address=None,
    n_workers=None,
    threads_per_worker=1,
    timeout=_cluster.DEFAULT_TIMEOUT,
    progress=None,
):
    """Kernels of an ensemble of networks, reduced to means and variances.

    Every network of ``nets`` (a sweep over widths and depths, say) is drawn
    once per seed; each member is a Dask task that initializes the network,
    optionally trains it (``train``), and computes its NTK on ``x1`` (and
    ``x2``).  Per network, the members reduce on the cluster to the mean and the
    variance of every kernel entry.

    Parameters
    ----------
    nets : MLP or sequence of MLP
        Networks sharing their input and output widths.
    x1 : array_like, shape (P1, n_0)
    x2 : array_like, shape (P2, n_0), optional
        None means ``x1``.
    seeds : int or sequence of int
        Number of members per network (seeds 0, 1, ...), or their seeds.
    dtype : {"float64", "float32"}
        Dtype of the parameters drawn (and of ``x1``, ``x2``).
    rates : Rates or callable, optional
        Learning-rate tensor of the kernel: None (layerwise, lambda = 1), one
        tensor (for a single network), or ``rates(net) -> Rates``.
    outputs : {"full", "trace", "diagonal"}
    per_layer : bool
    method : {"auto", "structured", "jacobian"}
    train : dict, optional
        Keyword arguments of :func:`fastntk.train` (``x``, ``y``, ``loss``,
        ``lr``, ``steps`` or ``epochs``, ...): each member is trained from its
        initialization and its kernel taken at the end of training.
    gather : bool
        Also return every member's kernel (``members``).
    ddof : int
        The variance is ``M2 / (count - ddof)``: 1 (default) for the unbiased
        estimate, 0 for the plain mean of squared deviations.
    fan_in : int
        Partial results merged per reduction task (the tree's branching).
    client, address, n_workers, threads_per_worker, timeout
        The cluster, as in :func:`fastntk.distributed.ntk`.
    progress : callable or bool, optional
        ``progress(done, total)`` as members finish; True draws a bar.

    Returns
    -------
    EnsembleResult
        ``mean`` and ``variance`` of shape (N, *K) in float64, for N networks and
        the kernel shape K.

    Examples
    --------
    >>> import numpy as np, fastntk, fastntk.distributed as fd
    >>> nets = [fastntk.MLP([3, w, 1]) for w in (16, 64)]
    >>> x = np.random.default_rng(0).standard_normal((10, 3))
    >>> res = fd.ensemble(nets, x, seeds=20, n_workers=2)  # doctest: +SKIP
    >>> res.mean.shape, res.variance.shape  # doctest: +SKIP
    ((2, 10, 10), (2, 10, 10))
    """
    # validate everything before starting anything
    nets = _check_nets(nets)
    seeds = _check_seeds(seeds)
    dt = check_dtype("dtype", dtype)
    x1 = as_samples("x1", x1, nets[0].n_in, dt)
    x2 = None if x2 is None else as_samples("x2", x2, nets[0].n_in, dt)
    if callable(rates):
        per_net = [rates(net) for net in nets]
    else:
        per_net = [rates] * len(nets)
    checked = [
        check_kernel_options(net, r, outputs, per_layer, method)
        for net, r in zip(nets, per_net, strict=True)
    ]
    train = _check_train(train)
    if isinstance(ddof, bool) or not isinstance(ddof, numbers.Integral) or ddof < 0:
        raise TypeError(f"ddof: expected an integer >= 0, received {ddof!r}")
    if ddof >= seeds.size:
        raise ValueError(
            f"ddof: expected fewer than the {seeds.size} members per network, "
            f"received {ddof}; use more seeds or ddof=0"
        )
    if not isinstance(gather, (bool, np.bool_)):
        raise TypeError(f"gather: expected True or False, received {gather!r}")
    fan_in = check_int("fan_in", fan_in, 2)
    client, address, n_workers, threads_per_worker, timeout = (
        _cluster.check_cluster_args(
            client, address, n_workers, threads_per_worker, timeout
        )
    )
    report = progress_callback(progress, "members")
    spec = Spec(
        nets=nets,
        rates=[r for r, _ in checked],
        x1=x1,
        x2=x2,
        dtype=dt.name,
        outputs=outputs,
        per_layer=bool(per_layer),
        methods=[m for _, m in checked],
        train=train,
        threads=threads_per_worker,
    )
    with _cluster.connect(
        client, address, n_workers, threads_per_worker, timeout, set_as_default=False
    ) as cl:
        return _run(cl, spec, seeds, gather, ddof, fan_in, report)


def _run(client, spec, seeds, gather, ddof, fan_in, report):
    # the inputs scattered once; everything again if they are lost with workers
    attempt = 1
    while True:
        spec_future = client.scatter(spec, broadcast=True, hash=False)
        try:
            return _attempt(
                client, spec_future, spec, seeds, gather, ddof, fan_in, report
            )
        except Exception:
            if attempt == MAX_SCATTERS or not _lost(client, spec_future):
                raise
            logger.warning(
                "the ensemble's inputs were lost with the workers holding them; "
                "sending them again and starting its members over"
            )
        finally:
            client.cancel([spec_future])
        attempt += 1


def _attempt(client, spec_future, spec, seeds, gather, ddof, fan_in, report):
    # members as tasks, a reduction tree per network, then the statistics
    run = uuid.uuid4().hex[:12]
    members = {}
    stats = []
    for k in range(len(spec.nets)):
        futs = [
            client.submit(
                member, spec_future, k, int(s), key=f"{MEMBER_KEY}-{run}-{k}-{s}"
            )
            for s in seeds
        ]
        members.update({f: (k, s) for s, f in enumerate(futs)})

        # leaves: moments of fan_in members; then merges of fan_in partials
        level = [
            client.submit(moments, *futs[a : a + fan_in], pure=False)
            for a in range(0, len(futs), fan_in)
        ]
        while len(level) > 1:
            level = [
                client.submit(merge, *level[a : a + fan_in], pure=False)
                for a in range(0, len(level), fan_in)
            ]
        stats.append(level[0])
    logger.info(
        "ensemble: %d networks x %d seeds on %d workers",
        len(spec.nets),
        seeds.size,
        len(client.nthreads()),
    )

    # wait for the members; those not needed later are let go as they land (the
    # reduction tasks still hold on to them until they are merged)
    keep = gather or spec.train is not None
    done = 0
    if report is not None:
        report(0, len(members))

    def land(batch):
        nonlocal done
        if not keep:
            for fut in batch:
                fut.release()
        done += len(batch)
        if report is not None:
            report(done, len(members))

    try:
        _drain(client, members, land)
        reduced = client.gather(stats)
    except BaseException:
        client.cancel(stats)
        raise
    count = np.array([n for n, _, _ in reduced], dtype=np.int64)
    mean = np.stack([m for _, m, _ in reduced])
    variance = np.stack([m2 / (n - ddof) for n, _, m2 in reduced])

    # optional: every member's kernel, and the training histories
    order = sorted(members, key=members.get)
    kernels, histories = None, None
    if gather:
        results = client.gather(order)
        kernels = np.stack([kernel for kernel, _ in results])
        kernels = kernels.reshape(len(spec.nets), seeds.size, *kernels.shape[1:])
        flat = [history for _, history in results]
    elif spec.train is not None:
        flat = client.gather(client.map(history_of, order, pure=False))
    if spec.train is not None:
        histories = [
            flat[k * seeds.size : (k + 1) * seeds.size] for k in range(len(spec.nets))
        ]
    return EnsembleResult(
        nets=list(spec.nets),
        seeds=seeds,
        count=count,
        mean=mean,
        variance=variance,
        ddof=int(ddof),
        members=kernels,
        histories=histories,
    )
