"""fastntk.data: embedded digits, teacher-student data, the user's files."""

import numpy as np
import pytest

import fastntk
from fastntk import data


def test_digits_embedded():
    x, labels = data.digits()
    assert x.shape == (1797, 64) and x.dtype == np.float64
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    # every value is a count 0..16 divided by 16
    np.testing.assert_array_equal(x * 16, np.round(x * 16))
    assert np.bincount(labels).tolist() == [
        178,
        182,
        177,
        183,
        181,
        182,
        181,
        179,
        174,
        180,
    ]
    x32, _ = data.digits(dtype="float32")
    assert x32.dtype == np.float32
    np.testing.assert_array_equal(x32, x.astype(np.float32))


def test_digits_equal_scikit_learn_copy():
    datasets = pytest.importorskip("sklearn.datasets")
    ref = datasets.load_digits()
    x, labels = data.digits()
    np.testing.assert_array_equal(x * 16, ref.data)
    np.testing.assert_array_equal(labels, ref.target)


def test_one_hot():
    y = data.one_hot([2, 0, 1, 2])
    np.testing.assert_array_equal(y, np.eye(3)[[2, 0, 1, 2]])
    assert data.one_hot([0, 1], n_classes=4).shape == (2, 4)
    with pytest.raises(ValueError, match="labels below n_classes=2"):
        data.one_hot([0, 3], n_classes=2)
    with pytest.raises(ValueError, match="integer class labels"):
        data.one_hot([0.5, 1.0])
    with pytest.raises(ValueError, match=">= 0"):
        data.one_hot([-1, 1])


def test_teacher_student_is_seeded_and_is_a_network():
    x, y = data.teacher_student(50, n_in=3, n_out=2, hidden=(7,), seed=5)
    x2, y2 = data.teacher_student(50, n_in=3, n_out=2, hidden=(7,), seed=5)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = data.teacher_student(50, n_in=3, n_out=2, hidden=(7,), seed=6)
    assert not np.array_equal(x, x3)

    # the targets are a smooth function of the inputs: the teacher's outputs,
    # reproduced by the same seeded construction
    rng = np.random.default_rng(5)
    teacher = fastntk.MLP([3, 7, 2], activation="tanh", C_W=1.0)
    params = teacher.init(seed=rng)
    np.testing.assert_array_equal(x, rng.standard_normal((50, 3)))
    np.testing.assert_allclose(y, teacher.apply(params, x), rtol=1e-14)

    # label noise of the requested size
    _, noisy = data.teacher_student(4000, n_in=3, noise=0.5, seed=1)
    _, clean = data.teacher_student(4000, n_in=3, noise=0.0, seed=1)
    assert abs(float(np.std(noisy - clean)) - 0.5) < 0.03


def test_load_npz_npy_csv(tmp_path, rng):
    x = rng.standard_normal((9, 4))
    labels = rng.integers(0, 3, 9)

    # .npz with x and integer labels
    np.savez(tmp_path / "a.npz", x=x, y=labels)
    xa, ya = data.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(xa, x)
    np.testing.assert_array_equal(ya, labels)
    assert ya.dtype == np.int64

    # .npz with upper-case names and 2-D float targets, float32
    np.savez(tmp_path / "b.npz", X=x, Y=x[:, :2])
    xb, yb = data.load(tmp_path / "b.npz", dtype="float32")
    assert xb.dtype == yb.dtype == np.float32 and yb.shape == (9, 2)

    # .npy: targets in the last two columns
    np.save(tmp_path / "c.npy", x)
    xc, yc = data.load(tmp_path / "c.npy", target_columns=2)
    np.testing.assert_array_equal(xc, x[:, :2])
    np.testing.assert_array_equal(yc, x[:, 2:])

    # .csv with and without a header
    np.savetxt(tmp_path / "d.csv", x, delimiter=",", header="p,q,r,s", comments="")
    np.savetxt(tmp_path / "e.csv", x, delimiter=",")
    for name in ("d.csv", "e.csv"):
        xd, yd = data.load(tmp_path / name)
        np.testing.assert_allclose(xd, x[:, :3], rtol=1e-15)
        np.testing.assert_allclose(yd[:, 0], x[:, 3], rtol=1e-15)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found"):
        data.load(tmp_path / "none.npz")
    (tmp_path / "f.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"expected a \.npz, \.npy or \.csv"):
        data.load(tmp_path / "f.txt")
    np.savez(tmp_path / "k.npz", inputs=np.ones((3, 2)), y=np.ones(3))
    with pytest.raises(ValueError, match="arrays named 'x' and 'y'"):
        data.load(tmp_path / "k.npz")
    np.savez(tmp_path / "r.npz", x=np.ones((5, 2)), y=np.ones(4))
    with pytest.raises(ValueError, match="5 rows and y with 4"):
        data.load(tmp_path / "r.npz")
    np.savez(tmp_path / "d.npz", x=np.ones((2, 2, 2)), y=np.ones(2))
    with pytest.raises(ValueError, match=r"expected x of shape \(P, n_in\)"):
        data.load(tmp_path / "d.npz")
    np.savez(tmp_path / "n.npz", x=np.array([[1.0, np.nan]] * 3), y=np.ones(3))
    with pytest.raises(ValueError, match="finite values in x"):
        data.load(tmp_path / "n.npz")
    np.save(tmp_path / "v.npy", np.ones(5))
    with pytest.raises(ValueError, match="2-D table"):
        data.load(tmp_path / "v.npy")
    np.save(tmp_path / "w.npy", np.ones((5, 1)))
    with pytest.raises(ValueError, match="more than 1 column"):
        data.load(tmp_path / "w.npy")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(ValueError, match="comma-separated numbers"):
        data.load(tmp_path / "bad.csv")


def test_split_is_seeded_and_disjoint():
    x = np.arange(20.0).reshape(10, 2)
    y = np.arange(10)
    a = data.split(x, y, 6, 3, seed=2)
    b = data.split(x, y, 6, 3, seed=2)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    x_tr, y_tr, x_te, y_te = a
    assert x_tr.shape == (6, 2) and x_te.shape == (3, 2)
    assert not set(y_tr) & set(y_te)
    np.testing.assert_array_equal(x_tr[:, 0], 2 * y_tr)
    with pytest.raises(ValueError, match="n_train \\+ n_test <= 10"):
        data.split(x, y, 8, 3)
    with pytest.raises(ValueError, match="one test sample remains"):
        data.split(x, y, 10)


def test_prepare_classification_and_regression(rng):
    x, labels = data.digits()
    ds = data.prepare(x, labels, n_train=100, n_test=50, seed=1)
    assert ds.task == "classification" and ds.n_classes == 10
    np.testing.assert_array_equal(ds.y_train.argmax(1), ds.labels_train)
    assert ds.y_train.sum() == 100
    assert ds.describe()["n_test"] == 50

    xr = rng.standard_normal((30, 2))
    ds = data.prepare(xr, xr[:, 0], n_train=20)
    assert ds.task == "regression" and ds.y_train.shape == (20, 1)
    assert ds.n_classes is None
    # integer-valued targets may still be a regression on request
    ds = data.prepare(x, labels, n_train=10, n_test=5, task="regression")
    assert ds.y_train.shape == (10, 1)
    with pytest.raises(ValueError, match="one column of class labels"):
        data.prepare(xr, xr, task="classification")
    with pytest.raises(ValueError, match="task: expected one of"):
        data.prepare(xr, xr, task="clustering")
