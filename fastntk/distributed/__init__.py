"""fastntk on a Dask cluster: tiled kernels, ensembles and sweeps.

Kernels too large for one machine and ensembles of many networks run on Dask's
distributed scheduler: a cluster you already have (``address=`` or
``client=``) or a local cluster of worker processes started for the call.

- :func:`ntk`: the (P1 x P2) NTK as tiles, each one Dask task; returned as a
  dask array, or written tile by tile into a Zarr store or a ``.npy`` file,
  resumable after an interruption.
- :func:`ensemble`: kernels (optionally after training) of many networks, seeds
  x architectures, with means and variances reduced on the cluster.
- :func:`open_kernel`: read a stored kernel, from any machine that sees it.
- :func:`plan`: count the tiles, operations and bytes of a tiled kernel.
- :func:`connect`: a client for a ``with`` block (given, remote or local).
- :class:`ProgressBar`: a text progress bar for the ``progress`` arguments.

This module needs the optional dependencies ``dask[array]``, ``distributed`` and
``zarr``: ``pip install 'fastntk[dask]'``.  See ``docs/distributed.md``.
"""

from __future__ import annotations

try:
    import dask  # noqa: F401
    import distributed  # noqa: F401
except ImportError as exc:  # the optional extra is missing
    raise ImportError(
        f"fastntk.distributed needs dask and distributed ({exc}); install them "
        f"with pip install 'fastntk[dask]'"
    ) from exc

from fastntk.distributed._cluster import connect
from fastntk.distributed._ensemble import EnsembleResult, ensemble
from fastntk.distributed._ntk import TilePlan, ntk, plan
from fastntk.distributed._progress import ProgressBar
from fastntk.distributed._store import open_kernel

__all__ = [
    "EnsembleResult",
    "ProgressBar",
    "TilePlan",
    "connect",
    "ensemble",
    "ntk",
    "open_kernel",
    "plan",
]
