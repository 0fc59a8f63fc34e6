"""A dependency-free progress bar for the command line.

The bar draws on a stream (standard error by default) only when that stream is a
terminal and the user did not ask for ``--quiet``; otherwise every call is a no-op,
so the library's output stays clean in logs, pipes and tests.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """A progress bar over ``total`` units of work.

    Parameters
    ----------
    total : int
        Units of work (steps, tiles, networks).
    label : str
        Shown before the bar.
    enabled : bool, optional
        Force the bar on or off; by default on when ``stream`` is a terminal.
    stream : file-like, optional
        Where to draw; standard error by default.
    min_interval : float
        Seconds between redraws (the last one always draws).

    Examples
    --------
    >>> from fastntk.cli.progress import Progress
    >>> with Progress(3, "demo", enabled=False) as bar:
    ...     for _ in range(3):
    ...         bar.advance()
    >>> bar.done
    3
    """

    WIDTH = 30

    def __init__(self, total, label="", *, enabled=None, stream=None, min_interval=0.1):
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            enabled = _is_terminal(self.stream)
        self.enabled = bool(enabled)
        self.total = max(int(total), 1)
        self.label = label
        self.done = 0
        self.min_interval = min_interval
        self._start = time.perf_counter()
        self._last_draw = -float("inf")
        self._shown = -1

    def __enter__(self):
        self._draw(force=True)
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def advance(self, n=1):
        """Record ``n`` more units of work done."""
        self.update(self.done + n)

    def update(self, done):
        """Set the units of work done so far."""
        self.done = min(int(done), self.total)
        self._draw(force=self.done >= self.total)

    def close(self):
        """Draw the final state and end the line."""
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False

    def _draw(self, force=False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < self.min_interval:
            return
        if self.done == self._shown and self.done >= self.total:
            return  # the final state is already on screen
        self._last_draw = now
        self._shown = self.done

        # filled part of the bar, counts, elapsed time and estimate of what is left
        frac = self.done / self.total
        filled = int(round(frac * self.WIDTH))
        elapsed = now - self._start
        left = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        eta = f" ~{left:.0f}s left" if frac > 0 and self.done < self.total else ""
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self.stream.write(
            f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:.1f}s{eta}  "
        )
        self.stream.flush()


class NullProgress(Progress):
    """A progress bar that never draws."""

    def __init__(self, total=1, label=""):
        super().__init__(total, label, enabled=False)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
