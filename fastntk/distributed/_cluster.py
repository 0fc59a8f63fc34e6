"""Getting a Dask client: a given one, a scheduler address, or a local cluster."""

from __future__ import annotations

import contextlib
import logging
import numbers
import os

from fastntk._validation import check_int, check_positive

logger = logging.getLogger(__name__)

#: Seconds to wait for a scheduler to answer before giving up.
DEFAULT_TIMEOUT = 30.0


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_cluster_args(client, address, n_workers, threads_per_worker, timeout):
    """Validate the arguments that choose the cluster; return them cleaned."""
    if client is not None:
        from distributed.client import Client

        if not isinstance(client, Client):
            raise TypeError(
                f"client: expected a distributed.Client or None, received "
                f"{type(client).__name__}"
            )
    if address is not None and not isinstance(address, str):
        raise TypeError(
            f"address: expected a scheduler address such as "
            f"'tcp://10.0.0.5:8786', received {type(address).__name__}"
        )
    given = [
        name
        for name, value in (
            ("client", client),
            ("address", address),
            ("n_workers", n_workers),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(
            f"client, address, n_workers: expected at most one of them, received "
            f"{' and '.join(given)}; pass a client, or an address to connect to, "
            f"or a number of local workers"
        )
    if n_workers is not None:
        n_workers = check_int("n_workers", n_workers, 1)
    threads_per_worker = check_int("threads_per_worker", threads_per_worker, 1)
    if isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
        timeout = check_positive("timeout", timeout)
    else:
        raise TypeError(
            f"timeout: expected a number of seconds > 0, received {timeout!r}"
        )
    return client, address, n_workers, threads_per_worker, timeout


def thread_environment(threads: int) -> dict:
    """Environment variables that size the thread pools of a worker process."""
    n = str(threads)
    return {
        "NUMBA_NUM_THREADS": n,
        "OMP_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
    }


def open_client(address: str, timeout: float, set_as_default: bool = False):
    """A client of the scheduler at ``address``; ConnectionError after ``timeout``."""
    from distributed import Client

    try:
        return Client(address, timeout=timeout, set_as_default=set_as_default)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(
            f"address: could not reach a Dask scheduler at {address!r} within "
            f"{timeout:g} s ({exc}); check that the scheduler runs and that the "
            f"address and port are right (e.g. 'tcp://HOST:8786'), or pass "
            f"n_workers=N to start a local cluster instead"
        ) from exc
    except ValueError as exc:
        raise ValueError(
            f"address: expected a scheduler address such as 'tcp://HOST:PORT', "
            f"received {address!r} ({exc})"
        ) from exc


@contextlib.contextmanager
def connect(
    client=None,
    address=None,
    n_workers=None,
    threads_per_worker=1,
    timeout=DEFAULT_TIMEOUT,
    *,
    set_as_default=True,
):
    """A Dask client for the duration of a ``with`` block.

    Parameters
    ----------
    client : distributed.Client, optional
        Used as it is and left open.
    address : str, optional
        Scheduler of a running cluster, e.g. ``"tcp://10.0.0.5:8786"``; the
        client opened for it is closed at the end of the block.
    n_workers : int, optional
        Start a local cluster of this many worker processes (default when
        nothing is given: one per ``threads_per_worker`` usable cores), each
        running one task at a time; closed at the end of the block.
    threads_per_worker : int
        Threads of each local worker process (numba and BLAS pools).
    timeout : float
        Seconds to wait for the scheduler at ``address``.
    set_as_default : bool
        Make a client opened here the default one of Dask (so that
        ``dask.array.Array.compute`` runs on it) for the block.

    Yields
    ------
    client : distributed.Client

    Raises
    ------
    ConnectionError
        When no scheduler answers at ``address`` within ``timeout`` seconds.

    Examples
    --------
    >>> import fastntk.distributed as fd
    >>> with fd.connect(n_workers=2) as client:  # doctest: +SKIP
    ...     len(client.scheduler_info()["workers"])
    2
    """
    client, address, n_workers, threads_per_worker, timeout = check_cluster_args(
        client, address, n_workers, threads_per_worker, timeout
    )
    if client is not None:
        yield client
        return
    if address is not None:
        own = open_client(address, timeout, set_as_default)
        try:
            yield own
        finally:
            own.close()
        return

    # a local cluster of single-task worker processes, thread pools sized
    from distributed import Client, LocalCluster

    if n_workers is None:
        n_workers = max(1, usable_cores() // threads_per_worker)
    logger.info(
        "starting a local Dask cluster: %d worker processes x %d threads",
        n_workers,
        threads_per_worker,
    )
    import dask

    # the workers' statistical profiler samples every thread's stack all the
    # time; it is a diagnostic of Dask itself, left off in clusters started here
    with dask.config.set({"distributed.worker.profile.enabled": False}):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            # no dashboard; the scheduler's small HTTP server (health checks)
            # listens on a free local port rather than on the dashboard's
            # usual 8787, which another cluster may hold
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            env=thread_environment(threads_per_worker),
        )
    try:
        own = Client(cluster, set_as_default=set_as_default)
        try:
            yield own
        finally:
            own.close()
    finally:
        cluster.close()
