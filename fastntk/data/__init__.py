"""Data sets: the embedded 8x8 digits, teacher-student data, the user's files.

Everything here returns plain NumPy arrays with samples as rows, ready for
:meth:`fastntk.MLP.apply`, :func:`fastntk.ntk` and :func:`fastntk.train`:

- :func:`digits`: the 1,797 handwritten 8x8 digits shipped inside fastntk
  (``digits.npz``, CC BY 4.0, see ``DIGITS-LICENSE.txt`` beside it), pixels
  scaled to [0, 1]; no download and no scikit-learn needed.
- :func:`teacher_student`: inputs drawn from a standard normal and targets given
  by a randomly initialized "teacher" MLP, seeded and reproducible.
- :func:`load`: the user's own ``.npz`` (arrays ``x`` and ``y``), ``.npy`` or
  ``.csv`` (targets in the last columns), with errors that say what is wrong.
- :func:`split` / :func:`prepare`: a seeded train/test split into a
  :class:`Dataset`, with one-hot targets for class labels.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from fastntk._validation import check_dtype, check_int, check_nonnegative

logger = logging.getLogger(__name__)

_DIGITS_FILE = Path(__file__).with_name("digits.npz")

#: Largest number of distinct integer targets that ``task="auto"`` reads as
#: class labels; more distinct values are taken as a regression target.
MAX_AUTO_CLASSES = 256

TASKS = ("auto", "classification", "regression")


@dataclasses.dataclass
class Dataset:
    """A train/test split with targets ready for a network.

    Attributes
    ----------
    name : str
        Where the data came from (``"digits"``, ``"teacher-student"``, a path).
    x_train, x_test : ndarray, shape (P_train, n_in), (P_test, n_in)
    y_train, y_test : ndarray, shape (P_train, n_out), (P_test, n_out)
        Targets: one-hot rows for classification, values for regression.
    labels_train, labels_test : ndarray of int64 or None
        Class labels (classification only).
    n_classes : int or None
        Number of classes (classification only).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels_train: np.ndarray | None = None
    labels_test: np.ndarray | None = None
    n_classes: int | None = None

    @property
    def task(self) -> str:
        return "classification" if self.n_classes is not None else "regression"

    @property
    def n_in(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_out(self) -> int:
        return int(self.y_train.shape[1])

    def describe(self) -> dict:
        """Sizes and kind of the split, as plain Python values (for reports)."""
        return {
            "name": self.name,
            "task": self.task,
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "n_in": self.n_in,
            "n_out": self.n_out,
            "n_classes": self.n_classes,
            "dtype": str(self.x_train.dtype),
        }


def digits(dtype="float64"):
    """The embedded 8x8 handwritten digits.

    Parameters
    ----------
    dtype : {'float64', 'float32'}
        Dtype of the pixels.

    Returns
    -------
    x : ndarray, shape (1797, 64)
        Pixels scaled from 0..16 to [0, 1], rows are images read row by row.
    labels : ndarray of int64, shape (1797,)
        The digit shown, 0..9.

    Examples
    --------
    >>> import fastntk
    >>> x, labels = fastntk.data.digits()
    >>> x.shape, labels.shape, float(x.max())
    ((1797, 64), (1797,), 1.0)
    """
    dt = check_dtype("dtype", dtype)

    # read the two uint8 arrays stored with the package
    with np.load(_DIGITS_FILE) as f:
        images, labels = f["images"], f["labels"]

    # pixel counts 0..16 to [0, 1]
    x = images.astype(dt) / dt.type(16.0)
    return x, labels.astype(np.int64)


def one_hot(labels, n_classes=None, dtype="float64") -> np.ndarray:
    """Rows of the identity matrix picked by integer class labels.

    Parameters
    ----------
    labels : array_like of int, shape (P,)
        Non-negative class labels.
    n_classes : int, optional
        Number of columns; default ``labels.max() + 1``.
    dtype : {'float64', 'float32'}

    Returns
    -------
    y : ndarray, shape (P, n_classes)

    Examples
    --------
    >>> import fastntk
    >>> fastntk.data.one_hot([0, 2, 1]).tolist()
    [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    """
    labels = _as_labels("labels", labels)
    dt = check_dtype("dtype", dtype)
    top = int(labels.max()) + 1 if labels.size else 0
    if n_classes is None:
        n_classes = top
    n_classes = check_int("n_classes", n_classes, 1)
    if top > n_classes:
        raise ValueError(
            f"labels: expected labels below n_classes={n_classes}, received "
            f"label {top - 1}"
        )
    y = np.zeros((labels.size, n_classes), dtype=dt)
    y[np.arange(labels.size), labels] = 1
    return y


def teacher_student(
    n_samples,
    n_in=8,
    n_out=1,
    hidden=(32,),
    activation="tanh",
    noise=0.0,
    seed=0,
    dtype="float64",
):
    """Synthetic regression data labelled by a random "teacher" network.

    Inputs are standard normal; targets are the outputs of an MLP with widths
    ``[n_in, *hidden, n_out]`` initialized at criticality for ``activation``
    (C_b = 0, C_W = 2 for relu-like activations, 1 otherwise), plus Gaussian
    noise of standard deviation ``noise``.

    Parameters
    ----------
    n_samples, n_in, n_out : int
        Sample count and the teacher's input and output widths, each >= 1.
    hidden : sequence of int
        The teacher's hidden widths (may be empty: a linear teacher).
    activation : str
        The teacher's activation (any of :class:`fastntk.MLP`'s).
    noise : float
        Standard deviation of the label noise, >= 0.
    seed : int
        Seeds the inputs, the teacher and the noise.
    dtype : {'float64', 'float32'}

    Returns
    -------
    x : ndarray, shape (n_samples, n_in)
    y : ndarray, shape (n_samples, n_out)

    Examples
    --------
    >>> import fastntk
    >>> x, y = fastntk.data.teacher_student(100, n_in=4, n_out=2, seed=3)
    >>> x.shape, y.shape
    ((100, 4), (100, 2))
    """
    from fastntk.model.mlp import MLP

    n_samples = check_int("n_samples", n_samples, 1)
    n_in = check_int("n_in", n_in, 1)
    n_out = check_int("n_out", n_out, 1)
    noise = check_nonnegative("noise", noise)
    dt = check_dtype("dtype", dtype)
    seed = check_int("seed", seed, 0)

    # the teacher, at the critical initialization of its activation
    c_w = 2.0 if activation in ("relu", "leaky_relu") else 1.0
    teacher = MLP([n_in, *hidden, n_out], activation=activation, C_b=0.0, C_W=c_w)
    rng = np.random.default_rng(seed)
    params = teacher.init(seed=rng, dtype=dt)

    # standard normal inputs, teacher outputs plus label noise
    x = rng.standard_normal((n_samples, n_in)).astype(dt)
    y = teacher.apply(params, x)
    if noise > 0:
        y = y + (noise * rng.standard_normal(y.shape)).astype(dt)
    return x, y


def load(path, *, target_columns=1, dtype="float64"):
    """Read x and y from the user's ``.npz``, ``.npy`` or ``.csv`` file.

    - ``.npz``: arrays named ``x`` and ``y`` (or ``X`` and ``Y``); x of shape
      (P, n_in); y of shape (P,) or (P, n_out).
    - ``.npy``: one 2-D array, samples as rows; its last ``target_columns``
      columns are y, the others x.
    - ``.csv``: the same layout as ``.npy``, comma separated; a first row that
      is not numeric is taken as a header and skipped.

    Integer class labels are returned as a 1-D integer array (see
    :func:`prepare` to turn them into one-hot targets); other targets as a
    2-D floating array.

    Parameters
    ----------
    path : str or os.PathLike
    target_columns : int
        Number of target columns in ``.npy`` / ``.csv`` files (>= 1).
    dtype : {'float64', 'float32'}
        Dtype of x (and of floating targets).

    Returns
    -------
    x : ndarray, shape (P, n_in)
    y : ndarray, shape (P,) of int64, or (P, n_out) of ``dtype``

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        On an unknown extension, missing arrays, wrong dimensions, mismatched
        sample counts or non-finite values.

    Examples
    --------
    >>> import numpy as np, fastntk, tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> np.savez(os.path.join(folder, "d.npz"), x=np.ones((5, 3)), y=np.arange(5))
    >>> x, y = fastntk.data.load(os.path.join(folder, "d.npz"))
    >>> x.shape, y.shape, y.dtype
    ((5, 3), (5,), dtype('int64'))
    """
    target_columns = check_int("target_columns", target_columns, 1)
    dt = check_dtype("dtype", dtype)
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(
            f"data: file not found: {str(path)!r}; give the path of a .npz, .npy "
            f"or .csv file"
        )

    # read the raw arrays according to the file's kind
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y = _read_npz(path)
    elif suffix in (".npy", ".csv"):
        table = _read_npy(path) if suffix == ".npy" else _read_csv(path)
        x, y = _split_columns(path, table, target_columns)
    else:
        raise ValueError(
            f"data: expected a .npz, .npy or .csv file, received {str(path)!r}"
        )

    # check shapes, then give x and floating targets the requested dtype
    return _finish(path, x, y, dt)


def split(x, y, n_train=None, n_test=None, *, seed=0):
    """Seeded random split of (x, y) into training and test samples.

    Parameters
    ----------
    x : ndarray, shape (P, n_in)
    y : ndarray, shape (P,) or (P, n_out)
    n_train : int, optional
        Training samples (default: 80% of P).
    n_test : int, optional
        Test samples (default: all that remain).
    seed : int

    Returns
    -------
    x_train, y_train, x_test, y_test : ndarray

    Examples
    --------
    >>> import numpy as np, fastntk
    >>> x, y = np.arange(20.0).reshape(10, 2), np.arange(10)
    >>> x_tr, y_tr, x_te, y_te = fastntk.data.split(x, y, 6, 4, seed=0)
    >>> sorted(np.concatenate([y_tr, y_te]).tolist()) == list(range(10))
    True
    """
    x = np.asarray(x)
    y = np.asarray(y)
    P = x.shape[0]
    if y.shape[0] != P:
        raise ValueError(
            f"y: expected {P} rows (one per sample of x), received {y.shape[0]}"
        )
    n_train = int(0.8 * P) if n_train is None else check_int("n_train", n_train, 1)
    n_test = P - n_train if n_test is None else check_int("n_test", n_test, 1)
    if n_train + n_test > P:
        raise ValueError(
            f"n_train, n_test: expected n_train + n_test <= {P} (the samples "
            f"available), received {n_train} + {n_test}; lower one of them"
        )
    if n_test < 1:
        raise ValueError(
            f"n_train: expected at most {P - 1} so that one test sample remains, "
            f"received {n_train}"
        )

    # one seeded permutation, training samples first
    order = np.random.default_rng(check_int("seed", seed, 0)).permutation(P)
    tr, te = order[:n_train], order[n_train : n_train + n_test]
    return x[tr], y[tr], x[te], y[te]


def prepare(
    x,
    y,
    *,
    name="data",
    n_train=None,
    n_test=None,
    task="auto",
    seed=0,
    dtype="float64",
) -> Dataset:
    """Split (x, y) and shape the targets for training.

    Parameters
    ----------
    x : ndarray, shape (P, n_in)
    y : ndarray, shape (P,) or (P, n_out)
    name : str
        Recorded in the :class:`Dataset`.
    n_train, n_test : int, optional
        See :func:`split`.
    task : {'auto', 'classification', 'regression'}
        ``classification`` turns one column of non-negative integer labels
        into one-hot targets; ``regression`` keeps y as values; ``auto`` picks
        classification when y is one column of non-negative integers with at
        most 256 distinct values.
    seed : int
        Seeds the split.
    dtype : {'float64', 'float32'}

    Returns
    -------
    Dataset

    Examples
    --------
    >>> import fastntk
    >>> x, labels = fastntk.data.digits()
    >>> ds = fastntk.data.prepare(x, labels, n_train=100, n_test=50)
    >>> ds.y_train.shape, ds.n_classes
    ((100, 10), 10)
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, received {task!r}")
    dt = check_dtype("dtype", dtype)
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2:
        raise ValueError(
            f"x: expected a 2-D array (samples as rows), received shape {x.shape}"
        )
    if y.ndim not in (1, 2):
        raise ValueError(
            f"y: expected shape (P,) or (P, n_out), received shape {y.shape}"
        )

    # decide whether y holds class labels
    labels = _labels_if_classification(y, task)
    x_tr, y_tr, x_te, y_te = split(x, y, n_train, n_test, seed=seed)
    x_tr, x_te = x_tr.astype(dt), x_te.astype(dt)
    if labels is None:
        col = (lambda v: v.reshape(-1, 1)) if y.ndim == 1 else (lambda v: v)
        return Dataset(name, x_tr, col(y_tr).astype(dt), x_te, col(y_te).astype(dt))

    # one-hot targets over the classes seen anywhere in y
    n_classes = int(labels.max()) + 1
    lab_tr = _as_labels("y", y_tr.reshape(-1))
    lab_te = _as_labels("y", y_te.reshape(-1))
    return Dataset(
        name,
        x_tr,
        one_hot(lab_tr, n_classes, dt),
        x_te,
        one_hot(lab_te, n_classes, dt),
        labels_train=lab_tr,
        labels_test=lab_te,
        n_classes=n_classes,
    )


# -- helpers -----------------------------------------------------------------------


def _as_labels(name, labels) -> np.ndarray:
    # Integer-valued, non-negative, 1-D labels as int64.
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected 1-D class labels, received {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (
            np.issubdtype(arr.dtype, np.floating)
            and np.all(np.isfinite(arr))
            and np.all(arr == np.round(arr))
        ):
            raise ValueError(
                f"{name}: expected integer class labels, received dtype {arr.dtype} "
                f"with non-integer values"
            )
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(
            f"{name}: expected class labels >= 0, received {int(arr.min())}"
        )
    return arr


def _labels_if_classification(y, task):
    # Class labels of y as int64 when the task is (or looks like) classification.
    column = y.reshape(-1) if (y.ndim == 1 or y.shape[1] == 1) else None
    if task == "regression":
        return None
    if task == "classification":
        if column is None:
            raise ValueError(
                f"y: expected one column of class labels for task='classification', "
                f"received shape {y.shape}; use task='regression' for "
                f"multi-column targets"
            )
        return _as_labels("y", column)
    if column is None or column.size == 0:
        return None
    try:
        labels = _as_labels("y", column)
    except ValueError:
        return None
    if np.unique(labels).size > MAX_AUTO_CLASSES:
        return None
    return labels


def _read_npz(path):
    with np.load(path, allow_pickle=False) as f:
        names = list(f.files)
        x_key = "x" if "x" in names else ("X" if "X" in names else None)
        y_key = "y" if "y" in names else ("Y" if "Y" in names else None)
        if x_key is None or y_key is None:
            raise ValueError(
                f"data: expected arrays named 'x' and 'y' in {str(path)!r}, found "
                f"{names}; save with np.savez(path, x=x, y=y)"
            )
        return f[x_key], f[y_key]


def _read_npy(path):
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"data: cannot read {str(path)!r} as .npy: {exc}") from None


def _read_csv(path):
    # A first line that does not parse as numbers is a header.
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    try:
        [float(v) for v in first.split(",") if v.strip()]
        skip = 0
    except ValueError:
        skip = 1
    try:
        return np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
    except ValueError as exc:
        raise ValueError(
            f"data: cannot read {str(path)!r} as comma-separated numbers: {exc}"
        ) from None


def _split_columns(path, table, target_columns):
    if table.ndim != 2:
        raise ValueError(
            f"data: expected a 2-D table (samples as rows, targets in the last "
            f"{target_columns} column(s)) in {str(path)!r}, received shape "
            f"{table.shape}"
        )
    if table.shape[1] <= target_columns:
        raise ValueError(
            f"data: expected more than {target_columns} column(s) in "
            f"{str(path)!r} (inputs, then {target_columns} target column(s)), "
            f"received {table.shape[1]}"
        )
    x, y = table[:, :-target_columns], table[:, -target_columns:]
    return x, (y[:, 0] if target_columns == 1 else y)


def _finish(path, x, y, dt):
    where = f"in {str(path)!r}"
    for name, arr in (("x", x), ("y", y)):
        if not (np.issubdtype(arr.dtype, np.number)) or np.iscomplexobj(arr):
            raise ValueError(
                f"data: expected real numbers in {name} {where}, received dtype "
                f"{arr.dtype}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(
                f"data: expected finite values in {name} {where}, received "
                f"{int(np.count_nonzero(~np.isfinite(arr)))} NaN or inf"
            )
    if x.ndim != 2:
        raise ValueError(
            f"data: expected x of shape (P, n_in) {where}, received shape {x.shape}"
        )
    if y.ndim not in (1, 2):
        raise ValueError(
            f"data: expected y of shape (P,) or (P, n_out) {where}, received shape "
            f"{y.shape}"
        )
    if y.shape[0] != x.shape[0]:
        raise ValueError(
            f"data: expected one row of y per sample of x {where}, received x with "
            f"{x.shape[0]} rows and y with {y.shape[0]}"
        )
    if x.shape[0] < 2:
        raise ValueError(
            f"data: expected at least 2 samples {where} (one to train, one to "
            f"test), received {x.shape[0]}"
        )
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        y = y.astype(np.int64)
    else:
        y = y.astype(dt).reshape(y.shape[0], -1)
    logger.debug("loaded %s: x %s, y %s", path, x.shape, y.shape)
    return x.astype(dt), y
