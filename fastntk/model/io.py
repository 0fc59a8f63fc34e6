"""Saving and loading a network and its parameters as one ``.npz`` file.

The file holds the flat parameter vector ``theta`` and the network's full
description (widths, activation, leaky-ReLU slope, C_b and C_W per layer), so
that :func:`load_params` rebuilds an identical :class:`~fastntk.MLP` and
:class:`~fastntk.Params` without any other information.  Extra arrays or numbers
(a training step, a loss) can be stored beside them and are returned as a dict.
Files are written to a temporary name and renamed, so a crash never leaves a
half-written file under the requested name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

#: Version of the file layout, stored in every file.
FORMAT_VERSION = 1

_RESERVED = ("theta", "network", "format")


def save_params(path, net, params, **extra) -> Path:
    """Write ``net`` and ``params`` to ``path`` (a ``.npz`` file).

    Parameters
    ----------
    path : str or os.PathLike
        Destination; ``.npz`` is appended when missing.
    net : MLP
    params : Params
        Parameters of ``net``.
    **extra : array_like
        More arrays or numbers to store (names other than ``theta``,
        ``network`` and ``format``).

    Returns
    -------
    pathlib.Path
        The file written.

    Examples
    --------
    >>> import fastntk, tempfile, os
    >>> net = fastntk.MLP([3, 8, 2], activation="tanh", C_W=1.0)
    >>> params = net.init(seed=0)
    >>> path = os.path.join(tempfile.mkdtemp(), "net.npz")
    >>> _ = fastntk.save_params(path, net, params, step=100)
    >>> net2, params2, extra = fastntk.load_params(path)
    >>> net2 == net, bool((params2.theta == params.theta).all()), int(extra["step"])
    (True, True, 100)
    """
    from fastntk.model.mlp import MLP

    if not isinstance(net, MLP):
        raise TypeError(f"net: expected fastntk.MLP, received {type(net).__name__}")
    params = net.check_params(params)
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(
            f"extra: expected names other than {', '.join(_RESERVED)}, received {clash}"
        )
    path = Path(os.fspath(path))
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")

    # the network's description as JSON text, beside the flat parameters
    description = {
        "widths": list(net.widths),
        "activation": net.activation,
        "slope": float(net.slope),
        "C_b": [float(v) for v in net.C_b],
        "C_W": [float(v) for v in net.C_W],
    }
    arrays = {
        "theta": params.theta,
        "network": np.array(json.dumps(description)),
        "format": np.array(FORMAT_VERSION),
    }
    arrays.update({k: np.asarray(v) for k, v in extra.items()})

    # write beside the destination, then rename over it
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        # the permissions of a plain new file (mkstemp makes it private)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_params(path):
    """Read a network, its parameters and any extra values saved with them.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save_params`.

    Returns
    -------
    net : MLP
    params : Params
        Parameters in the dtype they were saved in.
    extra : dict of str -> ndarray
        The extra values given to :func:`save_params`.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When the file is not one written by :func:`save_params`.
    """
    from fastntk.model.mlp import MLP

    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"path: file not found: {str(path)!r}")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in _RESERVED if k not in f.files]
        if missing:
            raise ValueError(
                f"path: expected a file written by fastntk.save_params (arrays "
                f"{', '.join(_RESERVED)}), {str(path)!r} lacks {missing}"
            )
        version = int(f["format"])
        if version > FORMAT_VERSION:
            raise ValueError(
                f"path: file format {version} is newer than this fastntk reads "
                f"({FORMAT_VERSION}); upgrade fastntk"
            )
        description = json.loads(str(f["network"]))
        theta = np.array(f["theta"])
        extra = {k: np.array(f[k]) for k in f.files if k not in _RESERVED}

    # rebuild the network, then wrap (and validate) its parameters
    net = MLP(
        description["widths"],
        activation=description["activation"],
        C_b=description["C_b"],
        C_W=description["C_W"],
        slope=description["slope"],
    )
    return net, net.params(theta, copy=False), extra
