"""Progress reports over tiles or ensemble members."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """A one-line text progress bar, callable as ``bar(done, total)``.

    Pass it (or ``progress=True``) to :func:`fastntk.distributed.ntk` or
    :func:`fastntk.distributed.ensemble`; the line is redrawn in place on
    ``stream`` and ended with a newline when ``done == total``.

    Parameters
    ----------
    label : str
        What is counted, e.g. ``"tiles"``.
    stream : file, optional
        Where to draw (default ``sys.stderr``).
    width : int
        Characters of the bar itself.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> bar = ProgressBar("tiles", stream=out, width=10)
    >>> bar(5, 10); bar(10, 10)
    >>> out.getvalue().split("\\r")[-1][:19]
    'tiles [##########] '
    """

    def __init__(self, label="tiles", stream=None, width=30):
        self.label = label
        self.stream = stream
        self.width = width
        self.start = None

    def __call__(self, done: int, total: int):
        stream = self.stream if self.stream is not None else sys.stderr
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        elapsed = now - self.start

        # filled part of the bar and the time left at the rate so far
        frac = done / total if total else 1.0
        filled = int(round(self.width * frac))
        eta = elapsed * (total - done) / done if done else float("nan")
        line = (
            f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{done}/{total}  {elapsed:6.1f} s elapsed"
        )
        if done < total and done:
            line += f", ~{eta:.0f} s left"
        stream.write(line + ("\n" if done >= total else ""))
        stream.flush()


def progress_callback(progress, label):
    """``progress`` as a callable ``f(done, total)``, or None."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return ProgressBar(label)
    if not callable(progress):
        raise TypeError(
            f"progress: expected None, True (a bar on stderr) or a callable "
            f"f(done, total), received {type(progress).__name__}"
        )
    return progress
