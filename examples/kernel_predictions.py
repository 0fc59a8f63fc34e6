"""What the neural tangent kernel predicts about training, checked on real digits.

On the 8x8 handwritten digits (64 pixels, 10 classes, regressed on centred
one-hot targets with the squared error), a tanh network is trained by
full-batch gradient descent with layerwise learning rates.  The script shows,
with numbers:

1. one gradient step: the loss change predicted by the kernel, both as
   -eta g^T lambda g and as -eta eps^T H eps, against the real change; the
   change of the outputs on held-out test images predicted through the cross
   kernel (and with the second- and third-order terms), against the real one;
2. the order of the residual: halving eta divides the gap between prediction
   and reality by about 4 (first order), 8 and 16 (second and third order);
3. the kernel regime: as the width grows, the empirical NTK at initialization
   approaches the infinite-width kernel, the kernel drifts less during
   training, and the linearized (frozen-kernel) model tracks the real network
   more closely.

Run ``python examples/kernel_predictions.py`` (about a minute) or with
``--small`` (a few seconds).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import fastntk
from fastntk import theory


def load_digits():
    """Pixels (1797, 64) in [0, 1] and labels, from fastntk or scikit-learn."""
    try:
        from fastntk import data
    except ImportError:
        data = None
    if data is not None and hasattr(data, "digits"):
        return data.digits()
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return bunch.data / 16.0, bunch.target.astype(np.int64)


def prepare(n_train, n_test, seed=0):
    """Standardized train/test images and centred one-hot targets."""
    x, labels = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(x.shape[0])
    x = (x - x.mean(axis=0)) / x.std()
    y = np.eye(10)[labels] - 0.1
    train, test = order[:n_train], order[n_train : n_train + n_test]
    return x[train], y[train], x[test], y[test]


def run(
    small=False,
    widths=None,
    n_train=None,
    n_test=None,
    steps=None,
    activation="tanh",
    seed=0,
    log=None,
):
    """Compute every number of the example; returns them in a dict.

    Parameters
    ----------
    small : bool
        Small sizes (for tests): widths (16, 64), 32 training and 16 test
        images, 40 steps.
    widths : sequence of int, optional
        Hidden widths to compare (two hidden layers each).
    n_train, n_test, steps : int, optional
    activation : str
        A smooth activation (the higher-order terms need sigma'' and sigma''').
    seed : int
    log : callable, optional
        Called with progress messages.
    """
    widths = tuple(widths or ((16, 64) if small else (64, 256, 1024)))
    n_train = n_train or (32 if small else 128)
    n_test = n_test or (16 if small else 64)
    steps = steps or (40 if small else 200)
    log = log or (lambda message: None)
    x, y, x_test, y_test = prepare(n_train, n_test, seed)
    loss = fastntk.MSE(reduction="mean")
    out = {
        "widths": widths,
        "n_train": n_train,
        "n_test": n_test,
        "steps": steps,
        "activation": activation,
    }

    def network(width):
        return fastntk.MLP(
            [64, width, width, 10], activation=activation, C_b=0.0, C_W=1.0
        )

    # the learning rate: a fraction of the stability limit 2 / lambda_max of the
    # middle network's kernel
    mid = widths[len(widths) // 2]
    net = network(mid)
    params = net.init(seed=seed)
    rates = fastntk.rates.layerwise(net)
    step = theory.OneStep(net, params, x, y, loss=loss, rates=rates)
    H = step.kernel()
    flat = H.transpose(0, 2, 1, 3).reshape(n_train * 10, n_train * 10)
    lam_max = np.linalg.eigvalsh(flat)[-1] * loss.scale(n_train)
    lr = 0.5 / lam_max
    out.update(step_width=mid, lr=lr, lam_max=lam_max)
    log(f"one step at width {mid}, eta = {lr:.4g}")

    # 1. one step: loss and test outputs, predicted against real
    change = step.loss_change(lr)
    out["loss"] = {
        "gradient_form": change.extra["gradient_form"],
        "kernel_form": change.predicted,
        "actual": change.actual,
        "relative_residual": change.relative_residual,
    }
    out["test_outputs"] = {}
    for order in (1, 2, 3):
        pred = step.output_change(lr, x_test, order=order)
        out["test_outputs"][order] = {
            "predicted_norm": float(np.linalg.norm(pred.predicted)),
            "actual_norm": float(np.linalg.norm(pred.actual)),
            "relative_residual": pred.relative_residual,
        }
    held_out = theory.test_loss(x_test, y_test, loss)
    pred = step.observable_change(lr, held_out)
    out["test_loss"] = {
        "predicted": pred.predicted,
        "actual": pred.actual,
        "relative_residual": pred.relative_residual,
    }

    # 2. residual orders from eta, eta/2, eta/4
    orders = {
        "training loss, order 1": step.residual_order("loss", lr),
        "test loss, order 1": step.residual_order(
            "observable", lr, observable=held_out
        ),
    }
    for order in (1, 2, 3):
        orders[f"test outputs, order {order}"] = step.residual_order(
            "outputs", lr, x_eval=x_test, order=order
        )
    out["orders"] = {name: r.exponent for name, r in orders.items()}

    # 3. the kernel regime across widths
    out["regime"] = []
    for width in widths:
        t0 = time.perf_counter()
        net = network(width)
        params = net.init(seed=seed)
        rates = fastntk.rates.layerwise(net)
        emp = fastntk.ntk(net, params, x_test, rates=rates)
        inf = theory.infinite_ntk(net, x_test, rates=rates).full(10)
        comp = theory.compare_with_training(
            net,
            params,
            x,
            y,
            lr=lr,
            loss=loss,
            rates=rates,
            steps=[steps],
            x_test=x_test,
        )
        out["regime"].append(
            {
                "width": width,
                "infinite_width_error": float(
                    np.linalg.norm(emp - inf) / np.linalg.norm(inf)
                ),
                "kernel_drift": float(comp.kernel_drift[-1]),
                "train_gap": float(comp.train_gap()[-1]),
                "test_gap": float(comp.test_gap()[-1]),
                "train_loss": float(loss.value(comp.train[-1], y)),
                "linear_train_loss": float(loss.value(comp.linear.train[-1], y)),
            }
        )
        log(f"width {width}: {time.perf_counter() - t0:.1f} s")
    return out


def format_table(res) -> str:
    """The example's results as a plain-text table."""
    lines = []
    add = lines.append
    add(
        f"8x8 digits: {res['n_train']} training and {res['n_test']} test images; "
        f"{res['activation']} MLP [64, n, n, 10], C_W = 1, C_b = 0;"
    )
    add(
        f"layerwise learning rates, squared error (mean), eta = {res['lr']:.4g} "
        f"(= 0.5 / lambda_max)"
    )
    add("")
    add(f"One gradient step, width {res['step_width']}")
    add(f"  {'quantity':<34}{'predicted':>13}{'actual':>13}{'rel. residual':>15}")
    loss = res["loss"]
    add(
        f"  {'training loss: -eta g^T lambda g':<34}{loss['gradient_form']:>13.5e}"
        f"{loss['actual']:>13.5e}{loss['relative_residual']:>15.2e}"
    )
    add(f"  {'training loss: -eta eps^T H eps':<34}{loss['kernel_form']:>13.5e}")
    rel = abs(loss["kernel_form"] - loss["gradient_form"]) / abs(loss["gradient_form"])
    add(f"  {'  (the two forms differ by)':<34}{rel:>13.1e}")
    tl = res["test_loss"]
    add(
        f"  {'test loss (observable)':<34}{tl['predicted']:>13.5e}"
        f"{tl['actual']:>13.5e}{tl['relative_residual']:>15.2e}"
    )
    for order, t in res["test_outputs"].items():
        add(
            f"  {f'test outputs |dz|, order {order}':<34}{t['predicted_norm']:>13.5e}"
            f"{t['actual_norm']:>13.5e}{t['relative_residual']:>15.2e}"
        )
    add("")
    add("Residual order (fitted over eta, eta/2, eta/4)")
    add(f"  {'prediction':<34}{'exponent':>10}{'expected':>10}")
    for name, exponent in res["orders"].items():
        expected = int(name[-1]) + 1
        add(f"  {name:<34}{exponent:>10.3f}{expected:>10d}")
    add("")
    add(f"Kernel regime: {res['steps']} steps of full-batch gradient descent")
    add(
        f"  {'width':>6}{'|H0 - Theta_inf|':>18}{'kernel drift':>17}"
        f"{'linear gap':>12}{'linear gap':>12}{'loss':>10}{'loss':>10}"
    )
    add(
        f"  {'':>6}{'/ |Theta_inf|':>18}{'|H(T)-H0|/|H0|':>17}"
        f"{'(train)':>12}{'(test)':>12}{'(real)':>10}{'(linear)':>10}"
    )
    for r in res["regime"]:
        add(
            f"  {r['width']:>6}{r['infinite_width_error']:>18.4f}"
            f"{r['kernel_drift']:>17.4f}{r['train_gap']:>12.4f}"
            f"{r['test_gap']:>12.4f}{r['train_loss']:>10.4f}"
            f"{r['linear_train_loss']:>10.4f}"
        )
    add("")
    add("H0 - Theta_inf on the test images, kernel drift on the training images;")
    add("linear gap: |z_real(T) - z_linear(T)| / |z_real(T) - z(0)|, relative to")
    add("the distance the outputs moved; loss: training loss at step T.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small", action="store_true", help="small sizes, a few seconds"
    )
    parser.add_argument("--widths", type=int, nargs="+")
    parser.add_argument("--train", type=int, dest="n_train")
    parser.add_argument("--test", type=int, dest="n_test")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    res = run(
        small=args.small,
        widths=args.widths,
        n_train=args.n_train,
        n_test=args.n_test,
        steps=args.steps,
        activation=args.activation,
        seed=args.seed,
        log=lambda m: print(f"[{m}]", file=sys.stderr),
    )
    print(format_table(res))
    return res


if __name__ == "__main__":
    main()
