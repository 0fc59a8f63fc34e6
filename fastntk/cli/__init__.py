"""The ``fastntk`` command line.

Commands:

- ``fastntk run``: the main job on the embedded digits (or the user's data):
  kernel, one-step predictions, training, kernel drift, linearized model, and a
  report folder with ``report.json`` and PNG plots;
- ``fastntk ntk``: one kernel to a ``.npy`` file (optionally through a memory
  map, or tiled over a Dask cluster);
- ``fastntk bench``: fastntk against the NumPy reference on this machine.

Every option can also come from a TOML file (``--config``); see
:mod:`fastntk.cli.config`.  Errors are reported in one line with a non-zero exit
status; ``--verbose`` adds the traceback and the library's debug log.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings

from fastntk.cli import config

logger = logging.getLogger("fastntk.cli")

DESCRIPTION = (
    "fastntk: exact neural tangent kernels and training of multilayer perceptrons"
)

COMMAND_HELP = {
    "run": "the main job: NTK, one-step predictions, training, report with plots",
    "ntk": "compute one NTK to a .npy file and print its shape, time and memory",
    "bench": "time fastntk against the NumPy reference on this machine",
}


class UsageError(Exception):
    """A command line that argparse could not read."""


class _Parser(argparse.ArgumentParser):
    # argparse prints usage and exits on errors; report them in one line instead.
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fastntk`` and its commands."""
    parser = _Parser(prog="fastntk", description=DESCRIPTION)
    from fastntk import __version__

    parser.add_argument("--version", action="version", version=f"fastntk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, text in COMMAND_HELP.items():
        p = sub.add_parser(command, help=text, description=text)
        p.add_argument(
            "--config", metavar="FILE", default=None, help="TOML file of options"
        )
        p.add_argument(
            "--out",
            metavar="PATH",
            default=argparse.SUPPRESS,
            help=f"output (default: {config.OUT_DEFAULTS[command]})",
        )
        p.add_argument(
            "-q", "--quiet", action="store_true", help="no progress or status lines"
        )
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="debug log, and tracebacks on errors",
        )
        for opt in config.options_for(command):
            default = config.default_of(command, opt)
            word = getattr(opt.parse, "word", "auto")
            default_text = word if default is None else default
            if isinstance(default_text, list):
                default_text = ",".join(map(str, default_text))
            help_text = f"{opt.help} (default: {default_text})"
            if opt.is_switch:
                p.add_argument(
                    opt.flag,
                    action="store_true",
                    default=argparse.SUPPRESS,
                    help=opt.help,
                )
            elif opt.parse is config._flag:
                p.add_argument(
                    opt.flag,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
            else:
                choices = getattr(opt.parse, "choices", None)
                metavar = "{" + ",".join(choices) + "}" if choices else "X"
                p.add_argument(
                    opt.flag,
                    dest=opt.name,
                    metavar=opt.metavar or metavar,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
    return parser


def main(argv=None) -> int:
    """Entry point of the ``fastntk`` console script.

    Parameters
    ----------
    argv : list of str, optional
        Arguments after the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        Exit status: 0 on success, 1 on a failed command, 2 on a bad command line.

    Examples
    --------
    >>> import os, tempfile
    >>> from fastntk.cli import main
    >>> path = os.path.join(tempfile.mkdtemp(), "k.npy")
    >>> main(["ntk", "--n", "8", "--hidden", "16", "--quiet", "--out", path])
    ... # doctest: +ELLIPSIS
    fastntk ntk: shape (8, 8) float64 (trace) in ... s, output ..., written to ...
    0
    """
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except UsageError as exc:
        print(f"fastntk: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        # --help and --version
        return int(exc.code or 0)
    if ns.command is None:
        parser.print_help()
        return 0

    handler = _setup_logging(verbose=ns.verbose, quiet=ns.quiet)
    try:
        # options from flags (as typed), checked by the same parsers as TOML
        given = {}
        for opt in config.options_for(ns.command):
            if hasattr(ns, opt.name):
                value = getattr(ns, opt.name)
                given[opt.name] = (
                    value if isinstance(value, bool) else opt.parse(opt.flag, value)
                )
        if hasattr(ns, "out"):
            given["out"] = ns.out
        settings = config.resolve(ns.command, given, ns.config)
        settings.update(quiet=ns.quiet, verbose=ns.verbose, config=ns.config)
        if settings.get("threads", 0) is None:
            settings["threads"] = config.auto_threads()
            logger.debug("--threads auto: %d", settings["threads"])
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return _commands()[ns.command](settings)
    except KeyboardInterrupt:
        print(f"fastntk {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if ns.verbose:
            traceback.print_exc()
        print(f"fastntk {ns.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        _restore_logging(handler)


def _commands():
    from fastntk.cli import bench, kernel, run

    return {"run": run.command, "ntk": kernel.command, "bench": bench.command}


def _one_line(exc) -> str:
    # The exception's message on one line; its type when it says nothing.
    text = " ".join(str(exc).split())
    plain = (ValueError, TypeError, OSError, ImportError, config.ConfigError)
    if isinstance(exc, plain) and text:
        return text
    if isinstance(exc, MemoryError):
        return text or "out of memory; use fewer samples"
    kind = type(exc).__name__
    return (
        f"{kind}: {text} (run with --verbose for the traceback)"
        if text
        else (f"{kind} (run with --verbose for the traceback)")
    )


class _StatusFormatter(logging.Formatter):
    # Status lines of the CLI as they are; library records with their origin.
    def format(self, record):
        if record.name.startswith("fastntk.cli") and record.levelno == logging.INFO:
            return record.getMessage()
        return f"fastntk: {record.levelname.lower()}: {record.getMessage()}"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # Python warnings (e.g. a diverging run) as one line each.
    print(f"fastntk: warning: {message}", file=sys.stderr)


def _setup_logging(verbose, quiet):
    # Status lines (INFO of fastntk.cli) on stderr unless --quiet; the library's
    # warnings always; everything with --verbose.  Returns the handler added.
    root = logging.getLogger("fastntk")
    cli = logging.getLogger("fastntk.cli")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StatusFormatter())
    handler.previous_levels = (root.level, cli.level)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    cli.setLevel(
        logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    )
    return handler


def _restore_logging(handler):
    # Undo _setup_logging (main may be called several times in one process).
    root = logging.getLogger("fastntk")
    root.removeHandler(handler)
    root.setLevel(handler.previous_levels[0])
    logging.getLogger("fastntk.cli").setLevel(handler.previous_levels[1])
