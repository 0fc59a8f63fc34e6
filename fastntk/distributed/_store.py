"""Kernel stores written tile by tile, with a record of the finished tiles.

Two formats, chosen by the path:

- a path ending in ``.npy``: a NumPy ``.npy`` file opened as a memory map, plus a
  JSON sidecar ``<path>.tiles.json`` holding the description of the run and the
  list of finished tiles;
- any other path: a Zarr (v3) group holding the array ``kernel`` (one chunk per
  tile, uncompressed, missing tiles read as NaN) and the array ``done`` (one flag
  per tile); the description of the run is the group's attribute ``fastntk``.

Workers write the tiles; only the client writes the record, after a tile's task
has returned, i.e. after its data was handed to the operating system.  A tile
missing from the record is computed again on resumption, so a tile whose write
was interrupted is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

#: Name and version of the store layout, kept in every record.
FORMAT = "fastntk-tiled-kernel"
FORMAT_VERSION = 1


def fingerprint(net, theta, x1, x2, rates, options) -> str:
    """SHA-256 of everything the kernel depends on, to recognise a run again."""
    h = hashlib.sha256()
    h.update(repr((net.widths, net.activation, net.slope, options)).encode())
    for arr in (theta, x1, x2):
        if arr is None:
            h.update(b"none")
        else:
            h.update(repr((arr.shape, arr.dtype.str)).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    # the learning-rate tensor through its per-parameter values
    if rates.kind == "dense":
        h.update(b"dense" + rates.matrix(net).tobytes())
    else:
        h.update(rates.kind.encode() + rates.diagonal_vector(net).tobytes())
    return h.hexdigest()


class NpySink:
    """Writes tiles into a ``.npy`` file through a memory map (on a worker)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, writes):
        mm = np.lib.format.open_memmap(self.path, mode="r+")
        try:
            for index, block in writes:
                mm[index] = block
        finally:
            # unmapping hands the pages to the operating system's cache
            del mm


class ZarrSink:
    """Writes tiles into the ``kernel`` array of a Zarr group (on a worker)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, writes):
        import zarr

        arr = zarr.open_array(self.path, path="kernel", mode="r+")
        for index, block in writes:
            arr[index] = block


class KernelStore:
    """A kernel on disk and its record of finished tiles (client side).

    Parameters
    ----------
    path : str
        ``.npy`` file or Zarr directory.
    """

    def __init__(self, path: str):
        # absolute: the workers may run in another directory
        self.path = os.path.abspath(os.fspath(path))
        self.meta = None
        self.done = None

    # -- creation and resumption ---------------------------------------------

    @staticmethod
    def at(path) -> KernelStore:
        """The store class that fits ``path``."""
        path = os.fspath(path)
        return NpyStore(path) if path.endswith(".npy") else ZarrStore(path)

    def prepare(self, meta, shape, dtype, chunks, grid_shape, resume) -> int:
        """Create the store, or reopen it to resume; return the tiles already done.

        Raises ValueError when ``resume`` is True and the store on disk was
        written for another kernel (another network, data, rates or tiling).
        """
        if resume and self.exists():
            found = self.read_meta()
            if found != meta:
                diff = sorted(k for k in meta if found.get(k) != meta[k])
                raise ValueError(
                    f"store: {self.path!r} holds a kernel of another run (differs "
                    f"in {', '.join(diff) or 'its format'}); pass resume=False to "
                    f"overwrite it, or choose another path"
                )
            self.meta = found
            self.done = self.read_done(grid_shape)
            return int(self.done.sum())
        # start over: never remove anything this module did not write
        if os.path.lexists(self.path):
            if not self.owned():
                raise ValueError(
                    f"store: {self.path!r} exists and is not a kernel store written "
                    f"by fastntk.distributed.ntk; choose another path, or remove it "
                    f"yourself"
                )
            self.remove()
        self.create(meta, shape, dtype, chunks, grid_shape)
        self.meta = meta
        self.done = np.zeros(grid_shape, dtype=bool)
        return 0

    def mark_done(self, tiles):
        """Add finished tiles to the record, on disk."""
        for i, j in tiles:
            self.done[i, j] = True
        self.write_done()

    # -- format-specific --------------------------------------------------------

    def exists(self) -> bool:
        """Whether a complete store (record and kernel) is at the path."""
        raise NotImplementedError

    def owned(self) -> bool:
        """Whether what is at the path was written here (it may be partial)."""
        raise NotImplementedError

    def remove(self):
        raise NotImplementedError

    def create(self, meta, shape, dtype, chunks, grid_shape):
        raise NotImplementedError

    def read_meta(self) -> dict:
        raise NotImplementedError

    def read_done(self, grid_shape) -> np.ndarray:
        raise NotImplementedError

    def write_done(self):
        raise NotImplementedError

    def sink(self):
        """The picklable writer that workers use."""
        raise NotImplementedError

    def open(self):
        """The kernel, read-only (a memory map or a Zarr array)."""
        raise NotImplementedError


class NpyStore(KernelStore):
    """``.npy`` memory map plus a JSON record ``<path>.tiles.json``."""

    @property
    def record_path(self) -> str:
        return self.path + ".tiles.json"

    def exists(self):
        return os.path.exists(self.path) and self.owned()

    def owned(self):
        try:
            return self._read_record()["meta"]["format"] == FORMAT
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def remove(self):
        for p in (self.record_path, self.path):
            if os.path.exists(p):
                os.remove(p)

    def create(self, meta, shape, dtype, chunks, grid_shape):
        # the record first, which marks the file as this module's
        self.meta = meta
        self.done = np.zeros(grid_shape, dtype=bool)
        self.write_done()
        mm = np.lib.format.open_memmap(self.path, mode="w+", dtype=dtype, shape=shape)
        del mm

    def _read_record(self):
        with open(self.record_path) as fh:
            return json.load(fh)

    def read_meta(self):
        return self._read_record()["meta"]

    def read_done(self, grid_shape):
        done = np.zeros(grid_shape, dtype=bool)
        for i, j in self._read_record()["done"]:
            done[i, j] = True
        return done

    def write_done(self):
        # write a new file and rename it over the old one: never half a record
        record = {"meta": self.meta, "done": np.argwhere(self.done).tolist()}
        tmp = self.record_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(record, fh)
        os.replace(tmp, self.record_path)

    def sink(self):
        return NpySink(self.path)

    def open(self):
        return np.load(self.path, mmap_mode="r")


class ZarrStore(KernelStore):
    """Zarr group with arrays ``kernel`` and ``done`` and attribute ``fastntk``."""

    def _group(self):
        # the group at the path, or None when there is none
        import zarr

        if not os.path.isdir(self.path):
            return None
        try:
            return zarr.open_group(self.path, mode="r")
        except Exception:  # no group there, whatever zarr calls it
            return None

    def exists(self):
        group = self._group()
        return self.owned() and "done" in group and "kernel" in group

    def owned(self):
        group = self._group()
        if group is None:
            return False
        meta = group.attrs.get("fastntk")
        return isinstance(meta, dict) and meta.get("format") == FORMAT

    def remove(self):
        shutil.rmtree(self.path)

    def create(self, meta, shape, dtype, chunks, grid_shape):
        import zarr

        # the description first, which marks the directory as this module's;
        # the run is complete (resumable) once both arrays exist
        group = zarr.open_group(self.path, mode="w")
        group.attrs["fastntk"] = meta
        group.create_array(
            "kernel",
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            compressors=None,
            fill_value=np.nan,
        )
        group.create_array(
            "done", shape=grid_shape, dtype="uint8", chunks=grid_shape, fill_value=0
        )

    def read_meta(self):
        import zarr

        return dict(zarr.open_group(self.path, mode="r").attrs["fastntk"])

    def read_done(self, grid_shape):
        import zarr

        done = zarr.open_array(self.path, path="done", mode="r")[...]
        return np.asarray(done, dtype=bool).reshape(grid_shape)

    def write_done(self):
        import zarr

        arr = zarr.open_array(self.path, path="done", mode="r+")
        arr[...] = self.done.astype(np.uint8)

    def sink(self):
        return ZarrSink(self.path)

    def open(self):
        import zarr

        return zarr.open_array(self.path, path="kernel", mode="r")


def open_kernel(path, *, complete=True):
    """Open a kernel written by :func:`fastntk.distributed.ntk`, read-only.

    Parameters
    ----------
    path : str or os.PathLike
        The ``store`` given to :func:`fastntk.distributed.ntk`: a ``.npy`` file or
        a Zarr directory, on this machine or a shared file system.
    complete : bool
        Raise when the record shows tiles still missing (an interrupted run).

    Returns
    -------
    kernel : numpy.memmap or zarr.Array
        Shape (P1, P2, n_out, n_out), (P1, P2) or (P1, P2, n_out) (with a
        leading per-layer axis for per-layer kernels); the parameters' dtype.

    Examples
    --------
    >>> import numpy as np, fastntk, fastntk.distributed as fd
    >>> net = fastntk.MLP([2, 16, 1])
    >>> params = net.init(seed=0)
    >>> x = np.random.default_rng(0).standard_normal((10, 2))
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "kernel.npy")
    >>> _ = fd.ntk(net, params, x, outputs="trace", tile_size=4, store=path,
    ...            n_workers=1)  # doctest: +SKIP
    >>> fd.open_kernel(path).shape  # doctest: +SKIP
    (10, 10)
    """
    store = KernelStore.at(path)
    if not store.exists():
        raise FileNotFoundError(
            f"path: expected a kernel store written by fastntk.distributed.ntk, "
            f"found none at {store.path!r}"
        )
    meta = store.read_meta()
    if complete:
        grid_shape = tuple(meta["grid_shape"])
        done = store.read_done(grid_shape)
        needed = _needed_tiles(grid_shape, meta["symmetric"])
        missing = int((needed & ~done).sum())
        if missing:
            raise ValueError(
                f"path: the kernel at {store.path!r} misses {missing} of "
                f"{int(needed.sum())} tiles (an interrupted run); run "
                f"fastntk.distributed.ntk again with the same arguments and "
                f"resume=True to finish it, or pass complete=False to read it anyway"
            )
    return store.open()


def _needed_tiles(grid_shape, symmetric) -> np.ndarray:
    # flags of the tiles a complete run computes
    needed = np.ones(grid_shape, dtype=bool)
    return np.triu(needed) if symmetric else needed
