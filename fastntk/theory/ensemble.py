"""Statistics of the empirical NTK over random initializations.

At initialization the NTK of a finite network is random: it fluctuates from seed
to seed around a mean that tends to the infinite-width kernel Theta^(L), and at
fixed depth its variance falls like 1/width.  :func:`ntk_ensemble` draws the
parameters for many seeds, computes each kernel with :func:`fastntk.ntk`, and
accumulates the mean and the variance of every entry (or of the trace over
outputs) in one pass, with the infinite-width kernel alongside for comparison.

Memory is bounded: nothing is kept per seed.  Each worker holds a running mean
and a running sum of squared deviations (Welford's update); the workers'
accumulators are merged at the end (Chan's pairwise formula).  The work is
spread over the cores by running one seed per worker thread at a time, each
kernel computed single-threaded; with one worker, each kernel uses all cores
instead.  Results of different worker counts agree to rounding (the order of
the sums differs).
"""

from __future__ import annotations

import logging
import numbers
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

from fastntk import _config
from fastntk._validation import as_array, check_dtype, check_int

logger = logging.getLogger(__name__)


@dataclass
class EnsembleStats:
    """Mean and variance of the NTK over seeds.

    Attributes
    ----------
    mean : ndarray, float64
        Mean kernel, in the layout of ``fastntk.ntk(..., outputs=outputs)``.
    variance : ndarray, float64
        Unbiased sample variance of each entry (ddof = 1); zeros for one seed.
    n_seeds : int
    outputs : str
    infinite : ndarray or None
        The infinite-width kernel in the same layout (Theta^(L) delta_ij for
        ``"full"``, n_out Theta^(L) for ``"trace"``), when it exists for the
        learning-rate tensor (layerwise or identity).
    """

    mean: np.ndarray
    variance: np.ndarray
    n_seeds: int
    outputs: str
    infinite: np.ndarray | None = None

    @property
    def std_error(self) -> np.ndarray:
        """Standard error of the mean, sqrt(variance / n_seeds)."""
        return np.sqrt(self.variance / self.n_seeds)

    def relative_spread(self) -> float:
        """Root-mean-square standard deviation over the root-mean-square mean."""
        return float(np.sqrt(np.mean(self.variance)) / np.sqrt(np.mean(self.mean**2)))


class _Welford:
    # Running mean and sum of squared deviations of arrays of one shape.

    def __init__(self, shape):
        self.n = 0
        self.mean = np.zeros(shape)
        self.m2 = np.zeros(shape)
        self._delta = np.empty(shape)

    def add(self, sample):
        # mean += (x - mean) / n ; m2 += (x - mean_old) (x - mean_new)
        self.n += 1
        np.subtract(sample, self.mean, out=self._delta)
        self.mean += self._delta / self.n
        self._delta *= sample - self.mean
        self.m2 += self._delta

    def merge(self, other):
        # Chan et al.: combine two accumulators of disjoint samples
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.mean, self.m2 = other.n, other.mean, other.m2
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        self.mean += delta * (other.n / n)
        self.m2 += other.m2 + delta * delta * (self.n * other.n / n)
        self.n = n
        return self


def _check_seeds(seeds):
    # An integer count (seeds 0..count-1) or a sequence of integer seeds.
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        return list(range(check_int("seeds", seeds, 1)))
    try:
        seq = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise TypeError(
            f"seeds: expected a count >= 1 or a sequence of integer seeds, received "
            f"{seeds!r}"
        ) from None
    if not seq:
        raise ValueError("seeds: expected at least one seed, received none")
    return seq


def ntk_ensemble(
    net,
    x1,
    x2=None,
    rates=None,
    *,
    seeds=32,
    outputs="full",
    dtype="float64",
    workers=None,
    infinite=True,
    method="auto",
):
    """Mean and variance of the empirical NTK over random initializations.

    Parameters
    ----------
    net : MLP
        Architecture and initialization variances (C_b, C_W).
    x1 : array_like, shape (P1, n_0)
    x2 : array_like, shape (P2, n_0), optional
    rates : Rates, optional
        Learning-rate tensor (``None``: layerwise, lambda_b = lambda_W = 1).
    seeds : int or sequence of int
        Number of initializations (seeds 0 .. seeds-1) or the seeds themselves,
        passed to ``net.init``.
    outputs : {"full", "trace", "diagonal"}
        Which kernel's statistics: as in :func:`fastntk.ntk`.
    dtype : {"float64", "float32"}
        Dtype of the parameters and kernels; the statistics are float64.
    workers : int, optional
        Worker threads (default: all cores), each computing one seed's kernel
        at a time single-threaded.  ``workers=1`` computes the kernels one after
        the other, each with all cores.
    infinite : bool
        Also compute the infinite-width kernel (layerwise or identity tensors).
    method : str
        Passed to :func:`fastntk.theory.infinite_ntk` for the infinite-width
        kernel.

    Returns
    -------
    EnsembleStats

    Examples
    --------
    >>> import numpy as np, fastntk
    >>> from fastntk.theory import ntk_ensemble
    >>> net = fastntk.MLP([2, 64, 1], activation="erf", C_W=1.0)
    >>> stats = ntk_ensemble(net, np.eye(2), seeds=16, outputs="trace")
    >>> stats.mean.shape, stats.n_seeds
    ((2, 2), 16)
    """
    import fastntk
    from fastntk.engines.backprop import _check_net
    from fastntk.model.rates import check_rates

    net = _check_net(net)
    rates = check_rates(rates, net)
    seed_list = _check_seeds(seeds)
    workers = (
        _config.max_threads() if workers is None else check_int("workers", workers, 1)
    )
    workers = min(workers, len(seed_list))
    dtype = check_dtype("dtype", dtype)

    # samples in the requested dtype; the rest is validated by the first kernel
    x1 = as_array("x1", x1, ndim=2).astype(dtype, copy=False)
    if x2 is not None:
        x2 = as_array("x2", x2, ndim=2).astype(dtype, copy=False)
    params0 = net.init(seed=seed_list[0], dtype=dtype)
    first = fastntk.ntk(net, params0, x1, x2, rates, outputs=outputs)
    shape = first.shape

    def kernel(seed, threads):
        params = net.init(seed=seed, dtype=dtype)
        return fastntk.ntk(net, params, x1, x2, rates, outputs=outputs, threads=threads)

    # accumulate: the first seed here, the others striped over the workers
    total = _Welford(shape)
    total.add(first)
    rest = seed_list[1:]
    if workers == 1:
        for seed in rest:
            total.add(kernel(seed, None))
    else:

        def run(worker):
            # one numba thread in this worker (numba's count is per thread)
            numba.set_num_threads(1)
            acc = _Welford(shape)
            for seed in rest[worker::workers]:
                acc.add(kernel(seed, None))
            return acc

        # BLAS limited to one thread for all workers, restored afterwards
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for acc in pool.map(run, range(workers)):
                    total.merge(acc)
    logger.debug("NTK ensemble: %d seeds over %d workers", total.n, workers)

    variance = total.m2 / (total.n - 1) if total.n > 1 else np.zeros(shape)
    inf = None
    if infinite and rates.structured:
        inf = _infinite_layout(net, x1, x2, rates, outputs, method)
    return EnsembleStats(
        mean=total.mean,
        variance=variance,
        n_seeds=total.n,
        outputs=outputs,
        infinite=inf,
    )


def _infinite_layout(net, x1, x2, rates, outputs, method):
    # Theta^(L) in the layout of fastntk.ntk's ``outputs``.
    from fastntk.theory.infinite import infinite_ntk

    kern = infinite_ntk(net, x1, x2, rates, method=method)
    if outputs == "full":
        return kern.full(net.n_out)
    if outputs == "trace":
        return net.n_out * kern.ntk
    return np.repeat(kern.ntk[:, :, None], net.n_out, axis=2)
