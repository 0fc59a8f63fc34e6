"""``fastntk run``: the main job, from data to a report folder.

The job, step by step:

1. data: the embedded digits (default), teacher-student data or the user's file,
   split into training and test sets;
2. network: an MLP at initialization and a layerwise learning-rate tensor;
3. kernel: the NTK on the training set and between test and training sets, its
   eigenvalues (which also give the automatic learning rate 1 / lambda_max);
4. one step (:class:`fastntk.theory.OneStep`): the output change predicted by
   the kernel, -lr H eps, against the actual change after one gradient step, on
   training and test inputs, and the order of the residual (halving lr should
   divide it by about four), also with the second- and third-order terms;
5. training: gradient descent (or SGD) with train/test losses, accuracies, and
   snapshots of the kernel to measure its relative drift;
6. linearized model (MSE with full-batch descent,
   :class:`fastntk.theory.Linearized`): the outputs of gradient descent with the
   kernel frozen at initialization, on the same steps;
7. the report: ``report.json``, ``arrays.npz`` and PNG plots.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import numpy as np

import fastntk
from fastntk import data as datasets
from fastntk.cli.progress import NullProgress, Progress

logger = logging.getLogger(__name__)

#: Largest kernel matrix (P * n_out rows) that is diagonalized for the spectrum,
#: the automatic learning rate and the linearized model.
MAX_EIGEN_ROWS = 6000


class Timer:
    """Wall-clock seconds of the job's phases, in order."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start


def load_dataset(cfg) -> datasets.Dataset:
    """The :class:`fastntk.data.Dataset` described by the options."""
    source, seed, dtype = cfg["data"], cfg["seed"], cfg["dtype"]
    n_train, n_test = cfg["n_train"], cfg["n_test"]
    if source == "digits":
        x, labels = datasets.digits(dtype=dtype)
        task = "classification" if cfg["task"] == "auto" else cfg["task"]
        return datasets.prepare(
            x,
            labels,
            name="digits",
            n_train=n_train,
            n_test=n_test,
            task=task,
            seed=seed,
            dtype=dtype,
        )
    if source == "teacher":
        x, y = datasets.teacher_student(
            n_train + n_test, noise=cfg["noise"], seed=seed, dtype=dtype
        )
        return datasets.prepare(
            x,
            y,
            name="teacher-student",
            n_train=n_train,
            n_test=n_test,
            task="regression",
            seed=seed,
            dtype=dtype,
        )
    x, y = datasets.load(source, target_columns=cfg["target_columns"], dtype=dtype)
    n_test = min(n_test, x.shape[0] - min(n_train, x.shape[0] - 1))
    n_train = min(n_train, x.shape[0] - 1)
    if (n_train, n_test) != (cfg["n_train"], cfg["n_test"]):
        logger.warning(
            "%s has %d samples: using %d for training and %d for testing",
            source,
            x.shape[0],
            n_train,
            n_test,
        )
    return datasets.prepare(
        x,
        y,
        name=str(source),
        n_train=n_train,
        n_test=n_test,
        task=cfg["task"],
        seed=seed,
        dtype=dtype,
    )


def run_job(cfg, *, show_progress=False) -> dict:
    """Run the main job and return every result (numbers and arrays).

    Parameters
    ----------
    cfg : dict
        Resolved options of ``fastntk run`` (see :mod:`fastntk.cli.config`).
    show_progress : bool
        Draw progress bars on standard error.

    Returns
    -------
    dict
        ``"report"``: JSON-ready numbers; ``"arrays"``: arrays for the plots.
    """
    timer = Timer()
    report, arrays = {}, {}

    # 1. data
    with timer("data"):
        ds = load_dataset(cfg)
    report["data"] = ds.describe()
    if cfg["loss"] == "cross_entropy" and ds.task != "classification":
        raise ValueError(
            "--loss: cross_entropy needs class labels (classification data), "
            f"received regression targets from {ds.name!r}; use --loss mse"
        )
    logger.debug("data %s", report["data"])

    # 2. network, learning-rate tensor, loss
    widths = [ds.n_in, *cfg["hidden"], ds.n_out]
    net = fastntk.MLP(
        widths,
        activation=cfg["activation"],
        C_b=cfg["C_b"],
        C_W=cfg["C_W"],
        slope=cfg["slope"],
    )
    params0 = net.init(seed=cfg["seed"], dtype=cfg["dtype"])
    rates = fastntk.rates.layerwise(net, cfg["lambda_b"], cfg["lambda_W"])
    loss_cls = fastntk.MSE if cfg["loss"] == "mse" else fastntk.CrossEntropy
    loss = loss_cls(reduction=cfg["reduction"])
    report["network"] = {
        "widths": widths,
        "activation": net.activation,
        "slope": net.slope,
        "C_b": net.C_b.tolist(),
        "C_W": net.C_W.tolist(),
        "n_params": net.n_params,
        "rates": {
            "kind": "layerwise",
            "lambda_b": cfg["lambda_b"],
            "lambda_W": cfg["lambda_W"],
        },
    }

    # 3. the kernel at initialization: train x train (through the one-step
    # toolkit, which keeps it for its predictions) and test x train
    from fastntk.theory import OneStep

    with timer("ntk"):
        step = OneStep(
            net,
            params0,
            ds.x_train,
            ds.y_train,
            loss=loss,
            rates=rates,
            threads=cfg["threads"],
        )
        H_AA = step.kernel()
        H_BA = fastntk.ntk(
            net, params0, ds.x_test, ds.x_train, rates=rates, threads=cfg["threads"]
        )
    P = ds.x_train.shape[0]
    scale = loss.scale(P)
    H_mat = _as_matrix(H_AA)
    linearizable = cfg["loss"] == "mse" and cfg["batch_size"] is None
    small = H_mat.shape[0] <= MAX_EIGEN_ROWS

    # learning rate: 1 / largest eigenvalue of the kernel under the loss's scale
    if cfg["lr"] is None:
        lr = 1.0 / (_largest_eigenvalue(H_mat) * scale)
        lr_source = "auto: 1 / (largest NTK eigenvalue x loss scale)"
    else:
        lr, lr_source = cfg["lr"], "given"
    report["lr"] = {"value": lr, "source": lr_source, "loss_scale": scale}

    # the linearized model (fastntk.theory.Linearized) diagonalizes the kernel;
    # its eigenvalues are the spectrum, else the spectrum is computed here
    lin = None
    with timer("eigendecomposition"):
        if linearizable and small:
            from fastntk.theory import Linearized

            lin = Linearized(
                net,
                params0,
                ds.x_train,
                ds.y_train,
                lr=lr,
                loss=loss,
                rates=rates,
                x_test=ds.x_test,
                threads=cfg["threads"],
            )
            eig = lin.eigenvalues / scale
        else:
            eig = _eigenvalues(H_mat) if small else None
    H_trace = np.einsum("abii->ab", H_AA)
    report["ntk"] = _kernel_stats(H_AA, H_trace, eig)
    arrays["ntk_trace"] = H_trace
    arrays["eigenvalues"] = eig if eig is not None else np.zeros(0)

    # 4. one step predicted through the kernel vs the actual step
    with timer("one_step"):
        step_report, step_arrays = _one_step_check(step, ds, lr, H_BA)
    report["one_step"] = step_report
    arrays.update(step_arrays)

    # 5. training with losses, accuracies and kernel snapshots
    with timer("train"):
        trained, history, train_info = _train(
            cfg, net, params0, ds, loss, rates, lr, show_progress
        )
    report["training"] = train_info
    arrays["step"] = history.step
    arrays["train_loss"] = history.train_loss
    arrays["test_loss"] = history.test_loss
    arrays["drift_step"] = history.ntk_step
    arrays["kernel_drift"] = history.kernel_drift
    for name, values in history.observables.items():
        arrays[name] = np.asarray(values, dtype=np.float64)

    # 6. the linearized model on the same steps
    with timer("linearized"):
        lin_report, lin_arrays = _linearized(cfg, lin, ds, loss, history.step)
    report["linearized"] = lin_report
    arrays.update(lin_arrays)

    # sorting key of the heatmap: class label, else the first target
    key = ds.labels_train if ds.labels_train is not None else ds.y_train[:, 0]
    arrays["order"] = np.argsort(key, kind="stable")
    arrays["sorted_key"] = np.asarray(key)[arrays["order"]]
    report["timings_s"] = timer.seconds
    return {"report": report, "arrays": arrays, "params": trained, "net": net}


# -- the pieces of the job -----------------------------------------------------------


def _as_matrix(H):
    # (P1, P2, k, k) kernel as the (P1 k, P2 k) matrix acting on flat outputs.
    P1, P2, k, _ = H.shape
    return np.ascontiguousarray(H.transpose(0, 2, 1, 3)).reshape(P1 * k, P2 * k)


def _eigenvalues(H_mat):
    # Ascending eigenvalues of the kernel matrix.  One BLAS thread: the
    # reduction to tridiagonal form gains little from more, and loses several
    # times over when the cores are shared with other work.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return np.linalg.eigvalsh(H_mat.astype(np.float64))


def _largest_eigenvalue(H_mat):
    # Largest eigenvalue of the symmetric PSD kernel matrix, by Lanczos.
    from scipy.sparse.linalg import eigsh

    if H_mat.shape[0] <= 2:
        return float(np.linalg.eigvalsh(H_mat.astype(np.float64))[-1])
    value = eigsh(
        H_mat.astype(np.float64), k=1, which="LA", tol=0, return_eigenvectors=False
    )
    return float(value[0])


def _kernel_stats(H, H_trace, eig):
    stats = {
        "shape": list(H.shape),
        "trace_mean_diagonal": float(np.mean(np.diag(H_trace))),
        "trace_mean_offdiagonal": float(
            (H_trace.sum() - np.trace(H_trace))
            / max(H_trace.size - H_trace.shape[0], 1)
        ),
        "symmetry_error": float(
            np.abs(H - H.transpose(1, 0, 3, 2)).max() / max(np.abs(H).max(), 1e-300)
        ),
    }
    if eig is not None:
        stats.update(
            eigenvalue_max=float(eig[-1]),
            eigenvalue_min=float(eig[0]),
            condition_number=float(eig[-1] / eig[0]) if eig[0] > 0 else math.inf,
            effective_rank=float(eig.sum() ** 2 / np.sum(eig**2)),
        )
    return stats


#: Activations smooth enough for the second- and third-order terms of a step
#: (relu-like ones have no curvature between their kinks).
SMOOTH = ("tanh", "sigmoid", "sin", "erf", "gelu", "swish", "softplus")


def _one_step_check(step, ds, lr, H_BA):
    """One real step against the kernel's predictions (fastntk.theory.OneStep).

    First order: the loss change -lr eps^T H eps (and -lr g^T lambda g), the
    output change -lr H eps on training inputs and, through the cross kernel
    ``H_BA``, on test inputs, each with the exponent of its residual over lr,
    lr/2, lr/4 (about 2).  For smooth activations the predictions of order 2
    and 3 (Taylor-mode terms) on the training inputs too (exponents about 3
    and 4).
    """
    net = step.net

    # training outputs at lr, lr/2, lr/4; the prediction at lr is the first
    fit = step.residual_order("outputs", lr)
    out_tr = fit.predictions[0]
    loss_change = step.loss_change(lr)
    fits = {"1": fit}
    if net.activation in SMOOTH:
        for order in (2, 3):
            fits[str(order)] = step.residual_order("outputs", lr, order=order)

    # test outputs: -eta H_BA eps against the same real steps (eta = lr, lr/2,
    # lr/4, taken once by OneStep), and the exponent of the residual
    eps = step.eps.astype(np.float64)
    unit_te = -np.einsum("dajk,ak->dj", H_BA.astype(np.float64), eps)
    z0_te = net.apply(step.params, ds.x_test).astype(np.float64)
    residuals_te = []
    for eta in fit.lrs:
        actual = net.apply(step.step(float(eta)), ds.x_test).astype(np.float64)
        residuals_te.append(float(np.linalg.norm(actual - z0_te - eta * unit_te)))
        if eta == fit.lrs[0]:
            pred_te, actual_te = eta * unit_te, actual - z0_te
    exponent_te = _fit_exponent(fit.lrs, residuals_te)
    scale_te = max(float(np.linalg.norm(actual_te)), 1e-300)

    report = {
        "lr": lr,
        "relative_error_train": out_tr.relative_residual,
        "relative_error_test": residuals_te[0] / scale_te,
        "residual_order": exponent_te,
        "residual_order_train": fit.exponent,
        "residual_norms_test": residuals_te,
        "loss_change_actual": float(loss_change.actual),
        "loss_change_predicted_kernel": float(loss_change.predicted),
        "loss_change_predicted_gradient": float(loss_change.extra["gradient_form"]),
        "orders": {
            k: {
                "exponent": f.exponent,
                "lrs": f.lrs.tolist(),
                "residual_norms": f.residuals.tolist(),
                "relative_residual": f.predictions[0].relative_residual,
            }
            for k, f in fits.items()
        },
        "source": "fastntk.theory.OneStep: -lr H eps against one step of "
        "fastntk.train; residual_order: test outputs, over lr, lr/2, lr/4; "
        "orders: training outputs, with the Taylor-mode terms of order 2 and 3",
    }
    rows = {
        "pred_train": out_tr.predicted,
        "actual_train": out_tr.actual,
        "pred_test": pred_te,
        "actual_test": actual_te,
    }
    return report, rows


def _fit_exponent(lrs, residuals):
    # Least-squares slope of log(residual) against log(lr).
    residuals = np.asarray(residuals, dtype=np.float64)
    if np.any(residuals <= 0) or not np.all(np.isfinite(residuals)):
        return math.nan
    return float(np.polyfit(np.log(lrs), np.log(residuals), 1)[0])


def _accuracy_observables(net, ds):
    # Train and test accuracy on recorded steps (classification only).
    if ds.labels_train is None:
        return None

    def accuracy(x, labels):
        return lambda p: float(np.mean(np.argmax(net.apply(p, x), axis=1) == labels))

    return {
        "train_accuracy": accuracy(ds.x_train, ds.labels_train),
        "test_accuracy": accuracy(ds.x_test, ds.labels_test),
    }


def _train(cfg, net, params0, ds, loss, rates, lr, show_progress):
    """Train with fastntk.train: losses, accuracies, kernel snapshots."""
    steps = cfg["steps"]
    drift_every = cfg["drift_every"] or max(steps // 10, 1)
    drift_samples = ds.x_train[: cfg["drift_samples"]]
    bar = Progress(steps, "training") if show_progress else NullProgress()

    def callback(step, params, history):
        bar.update(step)
        return False

    with bar:
        trained, history = fastntk.train(
            net,
            params0,
            ds.x_train,
            ds.y_train,
            loss=loss,
            lr=lr,
            rates=rates,
            steps=steps,
            batch_size=cfg["batch_size"],
            seed=cfg["seed"],
            test=(ds.x_test, ds.y_test),
            record_every=cfg["record_every"],
            observables=_accuracy_observables(net, ds),
            threads=cfg["threads"],
            ntk_every=drift_every,
            ntk_samples=drift_samples,
            callback=callback,
        )
    history.ntk.clear()
    info = {
        "optimizer": "gd" if cfg["batch_size"] is None else "sgd",
        "batch_size": cfg["batch_size"],
        "steps": int(history.step[-1]),
        "diverged": bool(history.diverged),
        "diverged_step": history.diverged_step,
        "train_loss_initial": float(history.train_loss[0]),
        "train_loss_final": float(history.train_loss[-1]),
        "test_loss_initial": float(history.test_loss[0]),
        "test_loss_final": float(history.test_loss[-1]),
        "kernel_drift_final": float(history.kernel_drift[-1]),
        "drift_samples": int(drift_samples.shape[0]),
        "drift_every": drift_every,
        "history": {
            "step": history.step.tolist(),
            "train_loss": history.train_loss.tolist(),
            "test_loss": history.test_loss.tolist(),
            "drift_step": history.ntk_step.tolist(),
            "kernel_drift": history.kernel_drift.tolist(),
        },
    }
    for name, values in history.observables.items():
        info["history"][name] = np.asarray(values, dtype=np.float64).tolist()
        info[f"{name}_final"] = float(np.asarray(values)[-1])
    return trained, history, info


def _linearized(cfg, lin, ds, loss, steps):
    """Losses (and accuracies) of the frozen-kernel model on the recorded steps.

    ``lin`` is a :class:`fastntk.theory.Linearized`: gradient descent on the
    squared error with the kernel frozen at initialization, solved through the
    kernel's eigendecomposition, on the training inputs and, through the cross
    kernel, on the test inputs.
    """
    if lin is None:
        reason = (
            "needs --loss mse and full-batch gradient descent"
            if cfg["loss"] != "mse" or cfg["batch_size"] is not None
            else f"kernel too large to diagonalize (more than {MAX_EIGEN_ROWS} rows)"
        )
        return {"available": False, "reason": reason}, {}
    traj = lin.trajectory(np.asarray(steps, dtype=np.int64))
    y_tr = ds.y_train.astype(np.float64)
    y_te = ds.y_test.astype(np.float64)
    train_loss = [loss.value(z, y_tr) for z in traj.train]
    test_loss = [loss.value(z, y_te) for z in traj.test]

    report = {
        "available": True,
        "source": "fastntk.theory.Linearized (eigendecomposition of the NTK at "
        "initialization)",
        "train_loss_final": float(train_loss[-1]),
        "test_loss_final": float(test_loss[-1]),
        "history": {"train_loss": train_loss, "test_loss": test_loss},
    }
    arrays = {
        "lin_train_loss": np.asarray(train_loss),
        "lin_test_loss": np.asarray(test_loss),
    }
    if ds.labels_train is not None:
        train_acc = [float(np.mean(z.argmax(1) == ds.labels_train)) for z in traj.train]
        test_acc = [float(np.mean(z.argmax(1) == ds.labels_test)) for z in traj.test]
        report["history"].update(train_accuracy=train_acc, test_accuracy=test_acc)
        report["test_accuracy_final"] = test_acc[-1]
        arrays["lin_test_accuracy"] = np.asarray(test_acc)
    return report, arrays


# -- the command ----------------------------------------------------------------------


def command(cfg) -> int:
    """``fastntk run``: run the job, write the report folder, print the summary."""
    from fastntk._config import thread_limit
    from fastntk.cli import report as reporting
    from fastntk.model.io import save_params

    # fail early on an output folder that cannot be written
    folder = reporting.check_output_folder(cfg["out"])
    plots = cfg["plots"]
    if plots and not reporting.have_matplotlib():
        logger.warning(
            "matplotlib is not installed: writing report.json without plots; "
            "install it with pip install 'fastntk[report]'"
        )
        plots = False

    # the job itself
    start = time.perf_counter()
    logger.info(
        "fastntk run: %s data, %d steps, report in %s",
        cfg["data"],
        cfg["steps"],
        folder,
    )
    with thread_limit(cfg["threads"]):
        result = run_job(cfg, show_progress=not cfg["quiet"])
    report = result["report"]
    report["config"] = {k: v for k, v in cfg.items() if k not in ("quiet", "verbose")}
    report["versions"] = reporting.versions()

    # files: trained parameters, arrays, plots, then report.json last
    save_params(folder / "params.npz", result["net"], result["params"])
    reporting.write_arrays(folder / "arrays.npz", result["arrays"])
    written = []
    if plots:
        written = reporting.write_plots(folder, report, result["arrays"])
    elapsed = time.perf_counter() - start
    report["timings_s"]["total"] = elapsed
    report["files"] = {
        "report": "report.json",
        "arrays": "arrays.npz",
        "params": "params.npz",
        "plots": written,
    }
    report["summary"] = summary_line(report, folder, elapsed)
    reporting.write_json(folder / "report.json", report)
    print(report["summary"])
    return 0


def summary_line(report, folder, elapsed) -> str:
    """One line with the run's main results."""
    data, net, tr = report["data"], report["network"], report["training"]
    one, lin = report["one_step"], report["linearized"]
    per = report["config"]["reduction"] == "sum"
    n_tr = data["n_train"] if per else 1
    n_te = data["n_test"] if per else 1
    parts = [
        f"fastntk run: {data['name']}, MLP {net['widths']} {net['activation']}, "
        f"{data['n_train']} train / {data['n_test']} test, {tr['steps']} "
        f"{tr['optimizer'].upper()} steps (lr {report['lr']['value']:.3g})",
        f"loss per sample train {tr['train_loss_initial'] / n_tr:.3g} -> "
        f"{tr['train_loss_final'] / n_tr:.3g}, test "
        f"{tr['test_loss_initial'] / n_te:.3g} -> {tr['test_loss_final'] / n_te:.3g}",
    ]
    if "test_accuracy_final" in tr:
        acc = f"test accuracy {100 * tr['test_accuracy_final']:.1f}%"
        if lin.get("test_accuracy_final") is not None:
            acc += f" (linearized model {100 * lin['test_accuracy_final']:.1f}%)"
        parts.append(acc)
    elif lin.get("available"):
        parts.append(f"linearized test loss {lin['test_loss_final'] / n_te:.3g}")
    parts.append(
        f"one-step NTK prediction error {one['relative_error_test']:.2g} on test "
        f"outputs (residual ~ lr^{one['residual_order']:.2f})"
    )
    parts.append(f"kernel drift {tr['kernel_drift_final']:.3g}")
    if tr["diverged"]:
        parts.append(f"DIVERGED at step {tr['diverged_step']}")
    parts.append(f"{elapsed:.1f} s, report in {folder}")
    return " | ".join(parts)
