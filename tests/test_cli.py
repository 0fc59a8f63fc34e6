"""The ``fastntk`` command line: every command on tiny sizes, reports, bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastntk
from fastntk.cli import main
from fastntk.cli.kernel import kernel_samples
from fastntk.cli.report import PLOTS

from tolerances import assert_close

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# a run of a few seconds: tiny network, few samples and steps
TINY_RUN = [
    "--n-train",
    "24",
    "--n-test",
    "16",
    "--hidden",
    "8,8",
    "--steps",
    "6",
    "--record-every",
    "2",
    "--drift-samples",
    "8",
    "--drift-every",
    "3",
]


def _check_png(path):
    # A real PNG that matplotlib decodes into a non-empty RGB(A) image.
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, f"{path} lacks the PNG signature"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert float(image.std()) > 0.01, f"{path} is blank"


def _one_error_line(capsys):
    # The error output of a failed command: one line, no traceback.
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err), err
    return errors[0]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    # default outputs (fastntk-report/, ntk.npy) land in a temporary folder
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("run") / "report"
    status = main(["run", *TINY_RUN, "--out", str(out), "--quiet"])
    assert status == 0
    return out


def test_run_writes_report_and_plots(tiny_report):
    report = json.loads((tiny_report / "report.json").read_text())

    # configuration, versions, data, network and timings are recorded
    assert report["config"]["steps"] == 6
    assert report["config"]["hidden"] == [8, 8]
    assert report["versions"]["fastntk"] == fastntk.__version__
    assert report["versions"]["numpy"] == np.__version__
    assert report["data"]["name"] == "digits"
    assert report["data"]["n_train"] == 24 and report["data"]["n_test"] == 16
    assert report["network"]["widths"] == [64, 8, 8, 10]
    assert report["timings_s"]["total"] > 0

    # histories on the recorded steps
    hist = report["training"]["history"]
    assert hist["step"] == [0, 2, 4, 6]
    assert len(hist["train_loss"]) == len(hist["test_loss"]) == 4
    assert len(hist["test_accuracy"]) == 4
    assert hist["drift_step"] == [0, 3, 6] and hist["kernel_drift"][0] == 0.0
    assert report["linearized"]["available"]
    assert len(report["linearized"]["history"]["test_loss"]) == 4

    # the plots: all six, valid PNG images
    assert sorted(report["files"]["plots"]) == sorted(PLOTS.values())
    for name in report["files"]["plots"]:
        _check_png(tiny_report / name)

    # the arrays beside the report, and the trained parameters
    with np.load(tiny_report / "arrays.npz") as arrays:
        assert arrays["ntk_trace"].shape == (24, 24)
        assert arrays["eigenvalues"].shape == (240,)
        assert arrays["pred_test"].shape == arrays["actual_test"].shape == (16, 10)
    net, params, _ = fastntk.load_params(tiny_report / "params.npz")
    assert net.widths == (64, 8, 8, 10) and params.theta.shape == (net.n_params,)


def test_run_numbers_are_consistent(tiny_report):
    report = json.loads((tiny_report / "report.json").read_text())
    one = report["one_step"]

    # -lr g^T lambda g and -lr eps^T H eps are the same first-order change
    g_form = one["loss_change_predicted_gradient"]
    h_form = one["loss_change_predicted_kernel"]
    assert g_form < 0
    assert abs(g_form - h_form) <= 1e-9 * abs(g_form)

    # at initialization the linearized model equals the network
    lin = report["linearized"]["history"]
    hist = report["training"]["history"]
    assert lin["train_loss"][0] == pytest.approx(hist["train_loss"][0], rel=1e-10)
    assert lin["test_loss"][0] == pytest.approx(hist["test_loss"][0], rel=1e-10)

    # the automatic learning rate is 1 / largest eigenvalue
    with np.load(tiny_report / "arrays.npz") as arrays:
        lam_max = arrays["eigenvalues"].max()
    assert report["lr"]["value"] == pytest.approx(1.0 / lam_max, rel=1e-9)
    assert report["ntk"]["eigenvalue_max"] == pytest.approx(lam_max, rel=1e-12)

    # the summary line is in the report
    assert report["summary"].startswith("fastntk run: digits, MLP [64, 8, 8, 10]")


def test_run_without_eigendecomposition(tmp_path, monkeypatch):
    # Kernels above the size limit: no spectrum and no linearized model, the
    # learning rate from the largest eigenvalue alone, the other plots drawn.
    pytest.importorskip("matplotlib")
    import fastntk.cli.run

    monkeypatch.setattr(fastntk.cli.run, "MAX_EIGEN_ROWS", 50)
    out = tmp_path / "big"
    assert main(["run", *TINY_RUN, "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert not report["linearized"]["available"]
    assert "too large" in report["linearized"]["reason"]
    assert "eigenvalue_max" not in report["ntk"]
    assert sorted(report["files"]["plots"]) == sorted(
        PLOTS[k] for k in ("loss", "one_step", "heatmap", "drift")
    )

    # the same learning rate as with the full spectrum
    small = tmp_path / "small"
    assert main(["run", *TINY_RUN, "--out", str(small), "--no-plots", "-q"]) == 0
    full = json.loads((small / "report.json").read_text())
    assert report["lr"]["value"] == pytest.approx(full["lr"]["value"], rel=1e-9)


def test_run_one_step_prediction_orders(tmp_path):
    # A wide tanh network: the kernel's prediction of the output change is
    # accurate, its residual shrinks like lr^2 on test and training outputs,
    # and like lr^3 and lr^4 with the second- and third-order terms.
    out = tmp_path / "r"
    status = main(
        [
            "run",
            "--data",
            "teacher",
            "--n-train",
            "16",
            "--n-test",
            "8",
            "--hidden",
            "256",
            "--activation",
            "tanh",
            "--C-W",
            "1",
            "--lr",
            "1e-2",
            "--steps",
            "2",
            "--no-plots",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert status == 0
    one = json.loads((out / "report.json").read_text())["one_step"]
    assert one["relative_error_test"] < 1e-2
    assert 1.8 <= one["residual_order"] <= 2.2
    assert 1.8 <= one["residual_order_train"] <= 2.2
    assert 2.8 <= one["orders"]["2"]["exponent"] <= 3.2
    assert 3.8 <= one["orders"]["3"]["exponent"] <= 4.2
    # relu: first order only (no curvature between kinks)
    out = tmp_path / "relu"
    assert main(["run", *TINY_RUN, "--no-plots", "--out", str(out), "-q"]) == 0
    one = json.loads((out / "report.json").read_text())["one_step"]
    assert list(one["orders"]) == ["1"]


def test_run_config_file_and_flag_precedence(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cfg = tmp_path / "fastntk.toml"
    cfg.write_text(
        "seed = 3\nsteps = 999\n[run]\nhidden = [6]\nsteps = 4\nrecord-every = 4\n"
        'n_train = 20\nn_test = 10\nactivation = "tanh"\nC_W = 1.0\n'
        "drift_samples = 6\nplots = false\n"
    )
    out = tmp_path / "r"
    status = main(["run", "--config", str(cfg), "--steps", "2", "--out", str(out)])
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["seed"] == 3  # top level of the file
    assert report["config"]["hidden"] == [6]  # the [run] table wins over the top
    assert report["config"]["steps"] == 2  # the flag wins over the file
    assert report["network"]["activation"] == "tanh"
    assert report["files"]["plots"] == []
    captured = capsys.readouterr()
    assert captured.out.strip() == report["summary"]


def test_run_on_user_files_sgd_and_cross_entropy(tmp_path, rng):
    # a regression .npz trained by SGD: no linearized model, no linearized plot
    x = rng.standard_normal((40, 3))
    np.savez(tmp_path / "reg.npz", x=x, y=np.sin(x[:, :2]))
    out = tmp_path / "sgd"
    status = main(
        [
            "run",
            "--data",
            str(tmp_path / "reg.npz"),
            "--n-train",
            "30",
            "--n-test",
            "10",
            "--hidden",
            "8",
            "--steps",
            "5",
            "--batch-size",
            "10",
            "--drift-samples",
            "6",
            "--no-plots",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["task"] == "regression" and report["data"]["n_out"] == 2
    assert report["training"]["optimizer"] == "sgd"
    assert not report["linearized"]["available"]

    # a CSV of labelled samples with a header, cross-entropy loss
    labels = (x[:, 0] > 0).astype(int)
    table = np.column_stack([x, labels])
    np.savetxt(
        tmp_path / "cls.csv", table, delimiter=",", header="a,b,c,label", comments=""
    )
    out = tmp_path / "xent"
    status = main(
        [
            "run",
            "--data",
            str(tmp_path / "cls.csv"),
            "--n-train",
            "30",
            "--n-test",
            "10",
            "--hidden",
            "8",
            "--steps",
            "3",
            "--loss",
            "cross_entropy",
            "--drift-samples",
            "6",
            "--no-plots",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["task"] == "classification"
    assert report["data"]["n_classes"] == 2
    assert "test_accuracy_final" in report["training"]


def test_ntk_command_matches_library(tmp_path, capsys):
    out = tmp_path / "k.npy"
    args = [
        "ntk",
        "--n",
        "12",
        "--n2",
        "5",
        "--hidden",
        "16",
        "--outputs",
        "full",
        "--seed",
        "4",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("fastntk ntk: shape (12, 5, 10, 10) float64")
    assert "peak memory" in line

    # the same kernel from the library on the same samples
    cfg = {
        "n": 12,
        "n2": 5,
        "seed": 4,
        "dtype": "float64",
        "data": "digits",
        "noise": 0.0,
        "target_columns": 1,
        "n_out": None,
    }
    x1, x2, n_out = kernel_samples(cfg)
    net = fastntk.MLP([64, 16, n_out])
    H = fastntk.ntk(net, net.init(seed=4), x1, x2)
    assert_close(np.load(out), H, "algorithms", "float64", "command vs library")

    # through a memory map, trace of the symmetric kernel, float32
    out = tmp_path / "m.npy"
    assert (
        main(
            [
                "ntk",
                "--n",
                "10",
                "--hidden",
                "16",
                "--memmap",
                "--dtype",
                "float32",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    K = np.load(out, mmap_mode="r")
    assert K.shape == (10, 10) and K.dtype == np.float32
    np.testing.assert_allclose(K, np.asarray(K).T, rtol=1e-6)


@pytest.mark.parametrize("outputs", ["full", "trace", "diagonal"])
def test_striped_kernel_equals_one_call(outputs, rng):
    # the stripes behind the progress bar of large kernels
    import io

    from fastntk.cli.kernel import striped_ntk
    from fastntk.cli.progress import Progress

    net = fastntk.MLP([3, 16, 16, 2], activation="tanh", C_W=1.0)
    params = net.init(seed=1)
    x1 = rng.standard_normal((23, 3))
    x2 = rng.standard_normal((9, 3))
    for second in (None, x2):
        H = fastntk.ntk(net, params, x1, second, outputs=outputs)
        stream = io.StringIO()
        bar = Progress(100, "kernel", enabled=True, stream=stream)
        out = striped_ntk(
            net, params, x1, second, np.full_like(H, np.nan), bar, outputs=outputs
        )
        assert_close(out, H, "algorithms", "float64", f"striped {outputs}")
        assert "kernel [" in stream.getvalue() and "100/100" in stream.getvalue()


def test_ntk_command_on_a_local_dask_cluster(tmp_path, capsys):
    pytest.importorskip("distributed")
    out = tmp_path / "tiled.npy"
    args = [
        "ntk",
        "--workers",
        "1",
        "--n",
        "20",
        "--hidden",
        "8",
        "--outputs",
        "diagonal",
        "--seed",
        "2",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    assert "shape (20, 20, 10) float64 (diagonal)" in capsys.readouterr().out

    # equal to the kernel computed in this process
    cfg = {
        "n": 20,
        "n2": 0,
        "seed": 2,
        "dtype": "float64",
        "data": "digits",
        "noise": 0.0,
        "target_columns": 1,
        "n_out": None,
    }
    x1, _, n_out = kernel_samples(cfg)
    net = fastntk.MLP([64, 8, n_out])
    H = fastntk.ntk(net, net.init(seed=2), x1, outputs="diagonal")
    assert_close(np.load(out), H, "algorithms", "float64", "tiled vs in-process")


def test_bench_command(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--hidden",
        "8",
        "--samples",
        "6",
        "--steps",
        "2",
        "--repeat",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "ntk P=6 full" in table and "gradient P=6" in table
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3
    for row in rows:
        assert row["fastntk_s"] > 0 and row["reference_s"] > 0
        assert row["max_rel_error"] < 1e-10


def test_help_of_every_command(capsys):
    for command in ("run", "ntk", "bench"):
        assert main([command, "--help"]) == 0
        assert "--seed" in capsys.readouterr().out
    assert main([]) == 0
    assert "run" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "--data", "missing.npz"], "file not found"),
        (["run", "--activation", "swoosh"], "--activation: expected one of"),
        (["run", "--steps", "0"], "--steps: expected an integer >= 1"),
        (["ntk", "--n", "5000"], "expected n + n2 <= 1797"),
        (["ntk", "--out", "kernel.txt"], "expected a .npy file name"),
        (["run", "--config", "missing.toml"], "--config: file not found"),
    ],
)
def test_bad_input_is_one_line(args, expected, capsys):
    assert main(args) != 0
    assert expected in _one_error_line(capsys)


def test_bad_shapes_and_unwritable_output(tmp_path, capsys):
    # y with fewer rows than x
    np.savez(tmp_path / "bad.npz", x=np.ones((10, 3)), y=np.ones(7))
    assert (
        main(["run", "--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "r")])
        == 1
    )
    assert "one row of y per sample of x" in _one_error_line(capsys)

    # x with one dimension in a .npz
    np.savez(tmp_path / "flat.npz", x=np.ones(10), y=np.ones(10))
    assert (
        main(
            [
                "ntk",
                "--data",
                str(tmp_path / "flat.npz"),
                "--out",
                str(tmp_path / "k.npy"),
            ]
        )
        == 1
    )
    assert "expected x of shape (P, n_in)" in _one_error_line(capsys)

    # an output folder below a regular file cannot be created (even by root)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["run", "--out", str(blocker / "report")]) == 1
    assert "--out: cannot write the report folder" in _one_error_line(capsys)
    assert main(["ntk", "--n", "4", "--out", str(blocker / "k.npy")]) == 1
    assert "--out: cannot write" in _one_error_line(capsys)


def test_usage_errors_and_config_errors(tmp_path, capsys):
    assert main(["run", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in _one_error_line(capsys)
    assert main(["frobnicate"]) == 2
    _one_error_line(capsys)

    cfg = tmp_path / "c.toml"
    cfg.write_text("[run]\nstepz = 3\n")
    assert main(["run", "--config", str(cfg)]) == 1
    assert "unknown option 'stepz'" in _one_error_line(capsys)
    cfg.write_text("steps = [\n")
    assert main(["run", "--config", str(cfg)]) == 1
    assert "is not valid TOML" in _one_error_line(capsys)
    cfg.write_text('[run]\nhidden = "a,b"\n')
    assert main(["run", "--config", str(cfg)]) == 1
    assert "hidden: expected comma-separated positive integers" in _one_error_line(
        capsys
    )


def test_verbose_shows_the_traceback(tmp_path, capsys):
    assert main(["run", "--data", str(tmp_path / "none.npz"), "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "FileNotFoundError" in err


def test_console_script_subprocess(tmp_path):
    # the installed console script (or the module when it is not installed)
    script = shutil.which("fastntk")
    cmd = [script] if script else [sys.executable, "-m", "fastntk.cli"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [*cmd, "ntk", "--n", "6", "--hidden", "4", "--out", str(tmp_path / "k.npy")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "fastntk ntk: shape (6, 6) float64 (trace)" in done.stdout
    assert np.load(tmp_path / "k.npy").shape == (6, 6)

    done = subprocess.run(
        [*cmd, "run", "--activation", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "--activation: expected one of" in done.stderr
