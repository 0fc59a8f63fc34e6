"""Tiles of a kernel and the work one tile task does on a worker.

A (P1 x P2) kernel is cut into square tiles of ``tile_size`` samples along each
sample axis.  Tile (i, j) covers rows ``i * tile_size`` up to the next multiple
(or P1) and columns likewise.  When x2 is x1 the kernel is symmetric,

    H[a, b, i1, i2] = H[b, a, i2, i1],

so only the tiles on and above the diagonal (i <= j) are computed; a tile below
it is the mirror of its partner: sample axes swapped, and for ``outputs="full"``
the two output axes swapped too.

Everything here is imported by the workers: the functions are module-level so
that Dask pickles them by reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """Tiling of a (P1 x P2) kernel into square tiles.

    Attributes
    ----------
    P1, P2 : int
        Samples along the rows (x1) and the columns (x2).
    tile_size : int
        Samples per tile along each axis (the last tiles may be smaller).
    symmetric : bool
        x2 is x1: only the tiles with i <= j are computed.
    """

    P1: int
    P2: int
    tile_size: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        """Tiles along the rows and the columns."""
        return (
            math.ceil(self.P1 / self.tile_size),
            math.ceil(self.P2 / self.tile_size),
        )

    def rows(self, i: int) -> tuple[int, int]:
        """Sample range [start, stop) of tile row i."""
        return i * self.tile_size, min((i + 1) * self.tile_size, self.P1)

    def cols(self, j: int) -> tuple[int, int]:
        """Sample range [start, stop) of tile column j."""
        return j * self.tile_size, min((j + 1) * self.tile_size, self.P2)

    def tiles(self) -> list[tuple[int, int]]:
        """The tiles to compute: all of them, or those with i <= j if symmetric."""
        n1, n2 = self.shape
        return [
            (i, j) for i in range(n1) for j in range(n2) if not self.symmetric or i <= j
        ]

    def cost(self, i: int, j: int) -> int:
        """Pairs of samples tile (i, j) computes (half of them on the diagonal
        of a symmetric kernel)."""
        (r0, r1), (c0, c1) = self.rows(i), self.cols(j)
        pairs = (r1 - r0) * (c1 - c0)
        return pairs // 2 if self.symmetric and i == j else pairs

    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Dask chunk sizes along the two sample axes."""
        n1, n2 = self.shape
        return (
            tuple(b - a for a, b in map(self.rows, range(n1))),
            tuple(b - a for a, b in map(self.cols, range(n2))),
        )


def kernel_layout(depth, n_out, P1, P2, outputs, per_layer):
    """(shape, lead) of a kernel: its full shape, and the axis of its rows.

    ``lead`` is 1 when a per-layer axis comes first, else 0; the sample axes are
    ``lead`` and ``lead + 1``, any output axes follow them.
    """
    tail = {"full": (n_out, n_out), "trace": (), "diagonal": (n_out,)}[outputs]
    lead = (depth,) if per_layer else ()
    return (*lead, P1, P2, *tail), len(lead)


def tile_index(lead, rows, cols):
    """Index of a tile in the whole kernel: ``[..., r0:r1, c0:c1, ...]``."""
    return (slice(None),) * lead + (slice(*rows), slice(*cols))


def mirror(block, outputs, lead):
    """The tile below the diagonal from its partner above it (a view)."""
    axes = list(range(block.ndim))
    # swap the two sample axes ...
    axes[lead], axes[lead + 1] = axes[lead + 1], axes[lead]
    # ... and for full kernels the two output axes as well
    if outputs == "full":
        axes[-2], axes[-1] = axes[-1], axes[-2]
    return block.transpose(axes)


#: Side of the square pieces in which :func:`mirror_copy` transposes a tile.
MIRROR_PIECE = 256


def mirror_copy(block, outputs, lead):
    """The mirror of a tile as a new C-contiguous array.

    Copied piece by piece, so that both the piece read and the piece written
    stay in cache (a transposed copy in one go reads memory with a large
    stride).
    """
    view = mirror(block, outputs, lead)
    out = np.empty(view.shape, dtype=view.dtype)
    n1, n2 = view.shape[lead], view.shape[lead + 1]
    for a in range(0, n1, MIRROR_PIECE):
        for b in range(0, n2, MIRROR_PIECE):
            piece = tile_index(lead, (a, a + MIRROR_PIECE), (b, b + MIRROR_PIECE))
            out[piece] = view[piece]
    return out


@dataclass
class Problem:
    """Everything a tile task needs, scattered once to every worker.

    The parameters travel as the flat vector ``theta`` and are wrapped again on
    the worker, so that the per-layer views share its memory there too.
    """

    net: object
    theta: np.ndarray
    x1: np.ndarray
    x2: np.ndarray | None
    rates: object
    outputs: str
    per_layer: bool
    method: str
    threads: int
    grid: Grid

    def compute(self, i: int, j: int) -> np.ndarray:
        """Tile (i, j) of the kernel, computed with ``threads`` threads."""
        from fastntk.engines.ntk import ntk

        # samples of this tile; a diagonal tile of a symmetric kernel is itself
        # symmetric, and the engine computes each of its pairs once
        r0, r1 = self.grid.rows(i)
        c0, c1 = self.grid.cols(j)
        x2 = self.x1 if self.x2 is None else self.x2
        on_diagonal = self.grid.symmetric and i == j
        params = self.net.params(self.theta, copy=False)
        return ntk(
            self.net,
            params,
            self.x1[r0:r1],
            None if on_diagonal else x2[c0:c1],
            self.rates,
            outputs=self.outputs,
            per_layer=self.per_layer,
            method=self.method,
            threads=self.threads,
        )


def tile_block(problem: Problem, i: int, j: int) -> np.ndarray:
    """Dask task: tile (i, j), returned as an array kept on the worker."""
    return problem.compute(i, j)


def first(value, *keep):
    """Dask task: ``value``; the other arguments are dependencies kept alive."""
    return value


def tile_to_store(problem: Problem, sink, i: int, j: int) -> tuple[int, int]:
    """Dask task: compute tile (i, j), write it (and its mirror) into ``sink``.

    Returns ``(i, j)`` once the data is written, so that only a few bytes travel
    back to the client.
    """
    block = problem.compute(i, j)
    grid, lead = problem.grid, int(problem.per_layer)
    rows, cols = grid.rows(i), grid.cols(j)
    writes = [(tile_index(lead, rows, cols), block)]
    if grid.symmetric and i != j:
        writes.append(
            (tile_index(lead, cols, rows), mirror_copy(block, problem.outputs, lead))
        )
    sink.write(writes)
    return i, j
