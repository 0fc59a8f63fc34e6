"""The worked examples under examples/, run on small sizes."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kernel_predictions():
    return _load("kernel_predictions")


@pytest.fixture(scope="module")
def small_run(kernel_predictions):
    return kernel_predictions.run(small=True)


def test_one_step_predictions(small_run):
    loss = small_run["loss"]
    # the two forms of the first-order loss change, and the real change
    assert abs(loss["kernel_form"] - loss["gradient_form"]) <= 1e-10 * abs(
        loss["gradient_form"]
    )
    assert loss["actual"] < 0 and loss["gradient_form"] < 0
    assert loss["relative_residual"] < 0.2
    # the output change on test images, better with every order
    test = small_run["test_outputs"]
    assert test[1]["relative_residual"] < 0.01
    assert (
        test[3]["relative_residual"]
        < test[2]["relative_residual"]
        < test[1]["relative_residual"]
    )


def test_residual_orders(small_run):
    for name, exponent in small_run["orders"].items():
        expected = int(name[-1]) + 1
        assert abs(exponent - expected) <= 0.2, (name, exponent)


def test_kernel_regime_with_width(small_run):
    narrow, wide = small_run["regime"]
    assert narrow["width"] < wide["width"]
    for key in ("infinite_width_error", "kernel_drift", "train_gap", "test_gap"):
        assert wide[key] < narrow[key], (key, narrow[key], wide[key])


def test_command_line_prints_the_table(kernel_predictions, capsys):
    kernel_predictions.main(
        ["--widths", "8", "32", "--train", "12", "--test", "6", "--steps", "5"]
    )
    out = capsys.readouterr().out
    assert "Residual order" in out and "Kernel regime" in out
    rows = [line.split() for line in out.splitlines()]
    widths = [row[0] for row in rows if len(row) == 7 and row[0].isdigit()]
    assert widths == ["8", "32"]


def test_scikit_learn_fallback_gives_the_same_digits(kernel_predictions):
    sklearn = pytest.importorskip("sklearn.datasets")
    import numpy as np

    x, labels = kernel_predictions.load_digits()
    bunch = sklearn.load_digits()
    np.testing.assert_allclose(x, bunch.data / 16.0)
    np.testing.assert_array_equal(labels, bunch.target)
