"""Options of the command line: one table, read from flags and TOML files.

Every option is declared once in :data:`OPTIONS` with its default, the commands it
applies to, the parser that turns a flag's text into a value, and its help.  The
same parser checks values read from a ``--config`` TOML file, so a value is
accepted or rejected identically wherever it comes from.  Precedence: flags, then
the file, then the defaults.

A TOML file may set options at its top level (for every command) and in a table
named after a command (``[run]``, ``[ntk]``, ``[bench]``), which wins; dashes and
underscores in keys are interchangeable::

    seed = 1
    [run]
    hidden = [128, 128]
    steps = 200
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from pathlib import Path

from fastntk.kernels.activations import NAMES as ACTIVATIONS


class ConfigError(ValueError):
    """A bad option value or configuration file (reported in one line)."""


# -- value parsers: text (a flag) or a TOML value -> checked value -------------------


def _integer(minimum):
    def parse(name, value):
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ConfigError(
                    f"{name}: expected an integer >= {minimum}, received {value!r}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"{name}: expected an integer >= {minimum}, received {value!r}"
            )
        if value < minimum:
            raise ConfigError(
                f"{name}: expected an integer >= {minimum}, received {value}"
            )
        return value

    parse.kind = f"integer >= {minimum}"
    return parse


def _real(minimum, strict=False):
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"

    def parse(name, value):
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(
                    f"{name}: expected a number {bound}, received {value!r}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number {bound}, received {value!r}")
        value = float(value)
        if not math.isfinite(value) or value < minimum or (strict and value <= minimum):
            raise ConfigError(f"{name}: expected a number {bound}, received {value}")
        return value

    parse.kind = f"number {bound}"
    return parse


def _optional(inner, word="auto"):
    # ``word`` (or None in TOML) means "decide automatically".
    def parse(name, value):
        if value is None or (isinstance(value, str) and value.strip() == word):
            return None
        return inner(name, value)

    parse.kind = f"{word} or {inner.kind}"
    parse.word = word
    return parse


def _choice(*choices):
    def parse(name, value):
        if value not in choices:
            raise ConfigError(
                f"{name}: expected one of {', '.join(choices)}, received {value!r}"
            )
        return value

    parse.kind = "one of " + ", ".join(choices)
    parse.choices = choices
    return parse


def _text(name, value):
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: expected a non-empty string, received {value!r}")
    return value


_text.kind = "text"


def _flag(name, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ConfigError(f"{name}: expected true or false, received {value!r}")


_flag.kind = "true or false"


def _widths(name, value):
    # Hidden widths: "256,256", "" (no hidden layer) or a TOML list.
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"{name}: expected comma-separated positive integers such as "
                f"256,256, received {value!r}"
            ) from None
    if not isinstance(value, (list, tuple)) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value
    ):
        raise ConfigError(
            f"{name}: expected a list of positive integers, received {value!r}"
        )
    return list(value)


_widths.kind = "comma-separated widths"

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bytes(name, value):
    # A memory size: bytes, or a number with K, M, G or T (powers of 1024).
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)i?B?\s*", str(value), re.I)
    if match is None:
        raise ConfigError(
            f"{name}: expected a memory size such as 512M or 2G, received {value!r}"
        )
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"{name}: expected a positive size, received {value!r}")
    return size


_bytes.kind = "memory size"


# -- the table of options ------------------------------------------------------------

ALL = ("run", "ntk", "bench")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: its name, default, parser, commands and help."""

    name: str
    default: object
    parse: object
    commands: tuple
    help: str
    short: str | None = None
    metavar: str | None = None
    is_switch: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS = (
    # shared by every command
    Option("seed", 0, _integer(0), ALL, "seed of the data split and the network"),
    Option(
        "dtype",
        "float64",
        _choice("float64", "float32"),
        ALL,
        "floating dtype of data and parameters",
    ),
    Option(
        "threads",
        None,
        _optional(_integer(1)),
        ALL,
        "threads for numba and BLAS; auto: the cores left idle by the 1-minute "
        "load average (all cores on an idle machine, at least one)",
        metavar="N",
    ),
    # data
    Option(
        "data",
        "digits",
        _text,
        ("run", "ntk"),
        "'digits' (embedded 8x8 digits), 'teacher' (synthetic teacher-student) or "
        "a .npz (arrays x, y), .npy or .csv file (targets in the last columns)",
        metavar="SOURCE",
    ),
    Option(
        "target_columns",
        1,
        _integer(1),
        ("run", "ntk"),
        "number of target columns in a .npy or .csv file",
        metavar="K",
    ),
    Option(
        "task",
        "auto",
        _choice("auto", "classification", "regression"),
        ("run",),
        "classification turns integer labels into one-hot targets; auto decides "
        "from the targets",
    ),
    Option("n_train", 256, _integer(1), ("run",), "training samples", metavar="P"),
    Option("n_test", 512, _integer(1), ("run",), "test samples", metavar="P"),
    Option(
        "noise",
        0.0,
        _real(0.0),
        ("run", "ntk"),
        "label noise of the teacher-student data",
    ),
    # network
    Option(
        "hidden",
        [256, 256],
        _widths,
        ALL,
        "hidden widths, comma separated",
        metavar="W,W",
    ),
    Option(
        "activation",
        "relu",
        _choice(*ACTIVATIONS),
        ("run", "ntk"),
        "activation of the hidden layers: " + ", ".join(ACTIVATIONS),
        metavar="NAME",
    ),
    Option("slope", 0.01, _real(0.0), ("run", "ntk"), "slope of leaky_relu"),
    Option("C_b", 0.0, _real(0.0), ("run", "ntk"), "initialization variance of biases"),
    Option(
        "C_W",
        2.0,
        _real(0.0),
        ("run", "ntk"),
        "initialization variance of weights, times the fan-in",
    ),
    Option(
        "lambda_b",
        1.0,
        _real(0.0),
        ("run", "ntk"),
        "layerwise learning rate of the biases",
    ),
    Option(
        "lambda_W",
        1.0,
        _real(0.0),
        ("run", "ntk"),
        "layerwise learning rate of the weights (divided by the fan-in)",
    ),
    # training
    Option(
        "loss",
        "mse",
        _choice("mse", "cross_entropy"),
        ("run",),
        "training loss",
    ),
    Option(
        "reduction",
        "sum",
        _choice("sum", "mean"),
        ("run",),
        "sum or mean of the per-sample losses",
    ),
    Option(
        "lr",
        None,
        _optional(_real(0.0, strict=True)),
        ("run",),
        "global learning rate; auto: 1 / the largest eigenvalue of the NTK on the "
        "training set (scaled by the loss's reduction)",
        metavar="LR",
    ),
    Option("steps", 1000, _integer(1), ("run", "bench"), "training steps", metavar="T"),
    Option(
        "batch_size",
        None,
        _optional(_integer(1), "full"),
        ("run",),
        "mini-batch size for SGD; full: full-batch gradient descent",
        metavar="B",
    ),
    Option(
        "record_every",
        25,
        _integer(1),
        ("run",),
        "record losses every this many steps",
        metavar="K",
    ),
    Option(
        "drift_every",
        None,
        _optional(_integer(1)),
        ("run",),
        "NTK snapshot every this many steps (auto: 10 snapshots)",
        metavar="K",
    ),
    Option(
        "drift_samples",
        128,
        _integer(1),
        ("run",),
        "training samples on which the kernel's drift is measured",
        metavar="P",
    ),
    Option(
        "plots",
        True,
        _flag,
        ("run",),
        "write PNG plots (needs matplotlib: pip install 'fastntk[report]')",
    ),
    # kernel command
    Option("n", 1024, _integer(1), ("ntk",), "samples of the kernel", metavar="P"),
    Option(
        "n2",
        0,
        _integer(0),
        ("ntk",),
        "samples of a second set (0: the kernel of the first set with itself)",
        metavar="P",
    ),
    Option(
        "n_out",
        None,
        _optional(_integer(1)),
        ("ntk",),
        "network outputs (auto: from the data's targets)",
        metavar="K",
    ),
    Option(
        "outputs",
        "trace",
        _choice("full", "trace", "diagonal"),
        ("ntk",),
        "full (P1, P2, K, K), trace over outputs (P1, P2), or diagonal (P1, P2, K)",
    ),
    Option(
        "memmap",
        False,
        _flag,
        ("ntk",),
        "write the kernel through a memory map (for kernels larger than memory)",
        is_switch=True,
    ),
    Option(
        "memory_limit",
        None,
        _optional(_bytes),
        ("ntk",),
        "working memory of the kernel engine, e.g. 512M or 2G",
        metavar="SIZE",
    ),
    Option(
        "cluster",
        None,
        _optional(_text, "none"),
        ("ntk",),
        "address of a Dask scheduler (tcp://host:port) to tile the kernel over",
        metavar="ADDRESS",
    ),
    Option(
        "workers",
        None,
        _optional(_integer(1), "none"),
        ("ntk",),
        "start a local Dask cluster of N workers to tile the kernel over",
        metavar="N",
    ),
    Option(
        "resume",
        False,
        _flag,
        ("ntk",),
        "with --cluster/--workers: continue an interrupted run in --out, computing "
        "only its missing tiles",
        is_switch=True,
    ),
    # benchmark command
    Option(
        "samples",
        128,
        _integer(1),
        ("bench",),
        "samples of the benchmarked network",
        metavar="P",
    ),
    Option(
        "repeat",
        5,
        _integer(1),
        ("bench",),
        "timings per measurement (the median is reported)",
        metavar="R",
    ),
    Option(
        "full",
        False,
        _flag,
        ("bench",),
        "also run the side-by-side scripts benchmarks/compare_ntk.py and "
        "compare_train.py of a source checkout",
        is_switch=True,
    ),
)

#: Output location default per command.
OUT_DEFAULTS = {"run": "fastntk-report", "ntk": "ntk.npy", "bench": None}

#: Defaults that differ from an option's own for one command.
COMMAND_DEFAULTS = {"bench": {"hidden": [128, 128], "steps": 10}}


def auto_threads() -> int:
    """Threads for ``--threads auto``: the cores that the load leaves idle.

    Multi-threaded BLAS and numba loops synchronize their threads at every
    step; on cores already busy with other processes each synchronization
    waits for a descheduled thread, and a two-thread run can be several times
    slower than a one-thread run.  So the default takes the cores minus the
    whole part of the 1-minute load average, at least one.
    """
    from fastntk._config import max_threads

    cores = max_threads()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return cores
    return max(1, min(cores, cores - int(load)))


def options_for(command):
    """The options of ``command``, in declaration order."""
    return [o for o in OPTIONS if command in o.commands]


def default_of(command, option):
    """Default value of ``option`` for ``command``."""
    return COMMAND_DEFAULTS.get(command, {}).get(option.name, option.default)


def read_toml(path) -> dict:
    """Read a TOML file into a dict, with one-line errors."""
    path = Path(path)
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(
                f"--config: reading TOML needs Python >= 3.11 or the tomli package "
                f"(pip install tomli), cannot read {str(path)!r}"
            ) from None
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {str(path)!r}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {str(path)!r} is not valid TOML: {exc}") from None


def resolve(command, given: dict, config_path=None) -> dict:
    """Merge defaults, the TOML file and the given flags for ``command``.

    Parameters
    ----------
    command : {'run', 'ntk', 'bench'}
    given : dict
        Options set on the command line (already parsed).
    config_path : path, optional
        A TOML file.

    Returns
    -------
    dict
        Every option of the command, plus ``out``, ``quiet`` and ``verbose``.
    """
    known = {o.name: o for o in options_for(command)}
    settings = {name: default_of(command, o) for name, o in known.items()}
    settings["out"] = OUT_DEFAULTS[command]

    # the file: top-level keys (options of any command; those of other commands
    # are skipped), then the command's own table (options of this command)
    if config_path is not None:
        table = read_toml(config_path)
        top = {k: v for k, v in table.items() if not isinstance(v, dict)}
        own = table.get(command, {})
        everything = {o.name for o in OPTIONS} | {"out"}
        for layer, allowed in ((top, everything), (own, {*known, "out"})):
            for key, value in layer.items():
                name = key.replace("-", "_")
                if name not in allowed:
                    raise ConfigError(
                        f"--config: unknown option {key!r} for 'fastntk {command}' "
                        f"in {str(config_path)!r}; known: "
                        f"{', '.join(['out', *known])}"
                    )
                if name == "out":
                    settings["out"] = _text("out", value)
                elif name in known:
                    settings[name] = known[name].parse(name, value)

    # flags win over the file
    settings.update(given)
    return settings
