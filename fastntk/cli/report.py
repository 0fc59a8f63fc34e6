"""The report folder of ``fastntk run``: ``report.json``, ``arrays.npz``, plots.

``report.json`` holds every number of the run with its configuration and the
versions of the software; ``arrays.npz`` the arrays behind the plots (kernel,
eigenvalues, predicted and actual output changes, histories).  The PNG plots are
drawn with matplotlib's Agg canvas (no display, no pyplot state), an optional
dependency: ``pip install "fastntk[report]"``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path

import numpy as np

PLOTS = {
    "loss": "loss_curves.png",
    "one_step": "one_step_prediction.png",
    "heatmap": "ntk_heatmap.png",
    "spectrum": "ntk_spectrum.png",
    "drift": "kernel_drift.png",
    "linearized": "linearized_vs_network.png",
}


def check_output_folder(path) -> Path:
    """Create ``path`` if needed and make sure files can be written in it.

    Raises
    ------
    OSError
        With a message naming the folder, when it cannot be created or written.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".fastntk-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OSError(
            f"--out: cannot write the report folder {str(folder)!r}: {reason}; "
            f"choose another folder with --out"
        ) from None
    return folder


def versions() -> dict:
    """Versions of Python, fastntk and the libraries it ran with."""
    import numba
    import scipy

    import fastntk

    out = {
        "fastntk": fastntk.__version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "numba": numba.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
    }
    try:
        import matplotlib

        out["matplotlib"] = matplotlib.__version__
    except ImportError:
        out["matplotlib"] = None
    return out


def to_json(value):
    """``value`` with NumPy scalars and arrays as plain Python (NaN/inf as None)."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, np.generic):
        return to_json(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path, report) -> Path:
    """Write ``report`` as indented JSON (atomically: temporary file, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_json(report), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def write_arrays(path, arrays) -> Path:
    """Write the arrays of the run (those that are not None) to ``.npz``."""
    np.savez_compressed(
        path, **{k: np.asarray(v) for k, v in arrays.items() if v is not None}
    )
    return Path(path)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# -- plots ----------------------------------------------------------------------------


def _figure(ncols=1, width=6.4):
    # A figure on the Agg canvas, independent of pyplot and of the display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols if ncols > 1 else width, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_plots(folder, report, arrays) -> list:
    """Draw every plot the run's results allow; return the file names written."""
    folder = Path(folder)
    title = _network_title(report)
    written = [
        _plot_losses(folder / PLOTS["loss"], report, arrays, title),
        _plot_one_step(folder / PLOTS["one_step"], report, arrays, title),
        _plot_heatmap(folder / PLOTS["heatmap"], report, arrays, title),
    ]
    if arrays.get("eigenvalues") is not None and len(arrays["eigenvalues"]):
        written.append(
            _plot_spectrum(folder / PLOTS["spectrum"], report, arrays, title)
        )
    if len(arrays.get("kernel_drift", [])):
        written.append(_plot_drift(folder / PLOTS["drift"], report, arrays, title))
    if report.get("linearized", {}).get("available"):
        written.append(
            _plot_linearized(folder / PLOTS["linearized"], report, arrays, title)
        )
    return [p.name for p in written]


def _network_title(report):
    net, data = report["network"], report["data"]
    return f"{data['name']}, MLP {net['widths']} {net['activation']}"


def _per_sample(report):
    # Divide summed losses by the set sizes so that train and test compare.
    if report["config"]["reduction"] == "sum":
        return report["data"]["n_train"], report["data"]["n_test"], "loss per sample"
    return 1, 1, "loss (mean over samples)"


def _plot_losses(path, report, arrays, title):
    classify = "test_accuracy" in arrays
    fig, axes = _figure(2 if classify else 1)
    n_tr, n_te, ylabel = _per_sample(report)
    ax = axes[0]
    ax.plot(
        arrays["step"],
        arrays["train_loss"] / n_tr,
        label=f"train ({n_tr} samples)" if n_tr > 1 else "train",
    )
    ax.plot(
        arrays["step"],
        arrays["test_loss"] / n_te,
        label=f"test ({n_te} samples)" if n_te > 1 else "test",
    )
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{report['config']['loss']} {ylabel}")
    ax.set_title(f"Loss during training\n{title}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    if classify:
        ax = axes[1]
        ax.plot(arrays["step"], 100 * arrays["train_accuracy"], label="train")
        ax.plot(arrays["step"], 100 * arrays["test_accuracy"], label="test")
        ax.set_xlabel("training step")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Classification accuracy")
        ax.legend()
        ax.grid(True, alpha=0.3)
    return _save(fig, path)


def _plot_one_step(path, report, arrays, title):
    fig, (ax,) = _figure()
    one = report["one_step"]
    pred = np.concatenate([arrays["pred_train"], arrays["pred_test"]], axis=None)
    act = np.concatenate([arrays["actual_train"], arrays["actual_test"]], axis=None)
    ax.scatter(
        arrays["pred_test"].ravel(),
        arrays["actual_test"].ravel(),
        s=6,
        alpha=0.5,
        label=f"test outputs (rel. error {one['relative_error_test']:.2g})",
    )
    ax.scatter(
        arrays["pred_train"].ravel(),
        arrays["actual_train"].ravel(),
        s=6,
        alpha=0.5,
        label=f"training outputs (rel. error {one['relative_error_train']:.2g})",
    )
    lo = float(min(pred.min(), act.min()))
    hi = float(max(pred.max(), act.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="diagonal: actual = predicted")
    ax.set_xlabel("predicted change of the outputs, -lr H eps")
    ax.set_ylabel("actual change after one gradient step")
    ax.set_title(
        f"One gradient step: NTK prediction vs actual (lr = {one['lr']:.3g})\n{title}"
    )
    fits = one.get("orders", {})
    lines = [
        "residual ~ lr^p over lr, lr/2, lr/4:",
        f"  test outputs, order 1: p = {one['residual_order']:.2f}",
    ] + [
        f"  training outputs, order {k}: p = {v['exponent']:.2f}"
        for k, v in fits.items()
    ]
    ax.text(
        0.98,
        0.02,
        "\n".join(lines),
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=8,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8},
    )
    ax.legend(loc="upper left")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def _plot_heatmap(path, report, arrays, title):
    fig, (ax,) = _figure(width=6.8)
    order = arrays["order"]
    H = arrays["ntk_trace"][np.ix_(order, order)]
    image = ax.imshow(H, cmap="viridis", interpolation="nearest")
    cbar = fig.colorbar(image, ax=ax)
    cbar.set_label("NTK, summed over outputs")
    key = arrays["sorted_key"]
    if report["data"]["task"] == "classification":
        # class boundaries as lines, class labels at their centres
        edges = np.flatnonzero(np.diff(key)) + 0.5
        for e in edges:
            ax.axhline(e, color="w", lw=0.6)
            ax.axvline(e, color="w", lw=0.6)
        bounds = np.concatenate([[-0.5], edges, [len(key) - 0.5]])
        centres = 0.5 * (bounds[:-1] + bounds[1:])
        labels = [str(int(v)) for v in np.unique(key)]
        ax.set_xticks(centres, labels)
        ax.set_yticks(centres, labels)
        ax.set_xlabel("training sample, sorted by class (class label)")
        ax.set_ylabel("training sample, sorted by class (class label)")
    else:
        ax.set_xlabel("training sample, sorted by target")
        ax.set_ylabel("training sample, sorted by target")
    ax.set_title(f"NTK at initialization on the training set\n{title}")
    return _save(fig, path)


def _plot_spectrum(path, report, arrays, title):
    fig, (ax,) = _figure()
    eig = np.sort(arrays["eigenvalues"])[::-1]
    rank = np.arange(1, eig.size + 1)
    positive = eig > 0
    ax.loglog(
        rank[positive],
        eig[positive],
        ".",
        ms=3,
        label=f"eigenvalues of H ({eig.size} x {eig.size})",
    )
    lr = report["lr"]["value"] * report["lr"]["loss_scale"]
    ax.axhline(
        1.0 / lr,
        color="k",
        ls="--",
        lw=1,
        label=f"1 / (lr x loss scale) = {1.0 / lr:.3g}",
    )
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"NTK eigenvalue spectrum at initialization\n{title}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def _plot_drift(path, report, arrays, title):
    fig, (ax,) = _figure()
    n = report["training"]["drift_samples"]
    ax.plot(
        arrays["drift_step"],
        arrays["kernel_drift"],
        "o-",
        label=f"NTK on {n} training samples",
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("relative drift |H(t) - H(0)| / |H(0)|")
    ax.set_title(f"Drift of the NTK during training\n{title}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def _plot_linearized(path, report, arrays, title):
    classify = "lin_test_accuracy" in arrays
    fig, axes = _figure(2 if classify else 1)
    n_tr, n_te, ylabel = _per_sample(report)
    ax = axes[0]
    step = arrays["step"]
    for kind, n, color in (("train", n_tr, "C0"), ("test", n_te, "C1")):
        ax.plot(step, arrays[f"{kind}_loss"] / n, color=color, label=f"network, {kind}")
        ax.plot(
            step,
            arrays[f"lin_{kind}_loss"] / n,
            "--",
            color=color,
            label=f"linearized (frozen NTK), {kind}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{report['config']['loss']} {ylabel}")
    ax.set_title(f"Network vs its linearized model\n{title}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    if classify:
        ax = axes[1]
        ax.plot(step, 100 * arrays["test_accuracy"], label="network, test")
        ax.plot(step, 100 * arrays["lin_test_accuracy"], "--", label="linearized, test")
        ax.set_xlabel("training step")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Test accuracy: network vs linearized")
        ax.legend()
        ax.grid(True, alpha=0.3)
    return _save(fig, path)
