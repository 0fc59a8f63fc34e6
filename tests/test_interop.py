"""Parameter files (fastntk.save_params / load_params) and PyTorch interop."""

import sys

import numpy as np
import pytest

import fastntk
from fastntk import interop

from tolerances import assert_close


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_save_load_round_trip(tmp_path, rng, dtype):
    net = fastntk.MLP(
        [3, 5, 4, 2], activation="leaky_relu", slope=0.3, C_b=[0.1, 0.2, 0.0], C_W=1.5
    )
    params = net.init(seed=7, dtype=dtype)
    path = fastntk.save_params(
        tmp_path / "net", net, params, step=12, losses=np.array([3.0, 2.0])
    )
    assert path.name == "net.npz"
    net2, params2, extra = fastntk.load_params(path)
    assert net2 == net and net2.slope == 0.3
    np.testing.assert_array_equal(net2.C_b, [0.1, 0.2, 0.0])
    assert params2.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(params2.theta, params.theta)
    assert int(extra["step"]) == 12
    np.testing.assert_array_equal(extra["losses"], [3.0, 2.0])
    x = rng.standard_normal((4, 3)).astype(dtype)
    np.testing.assert_array_equal(net2.apply(params2, x), net.apply(params, x))


def test_save_load_errors(tmp_path):
    net = fastntk.MLP([2, 3, 1])
    params = net.init()
    with pytest.raises(ValueError, match="names other than"):
        fastntk.save_params(tmp_path / "a.npz", net, params, theta=1)
    with pytest.raises(TypeError, match="fastntk.Params"):
        fastntk.save_params(tmp_path / "a.npz", net, params.theta)
    with pytest.raises(ValueError, match="expected 13 parameters"):
        fastntk.save_params(tmp_path / "a.npz", net, fastntk.MLP([2, 4, 1]).init())
    with pytest.raises(FileNotFoundError):
        fastntk.load_params(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.ones(3))
    with pytest.raises(ValueError, match="written by fastntk.save_params"):
        fastntk.load_params(tmp_path / "other.npz")
    # no temporary file is left behind
    fastntk.save_params(tmp_path / "ok.npz", net, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.npz", "other.npz"]


def test_interop_without_torch_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="needs PyTorch"):
        interop.from_torch(object())
    net = fastntk.MLP([2, 3, 1])
    with pytest.raises(ImportError, match="needs PyTorch"):
        interop.to_torch(net, net.init())


# -- PyTorch round trip (skipped when torch is not installed) ----------------------

ACTIVATIONS = [
    ("ReLU", {}, "relu"),
    ("LeakyReLU", {"negative_slope": 0.2}, "leaky_relu"),
    ("Tanh", {}, "tanh"),
    ("Sigmoid", {}, "sigmoid"),
    ("GELU", {"approximate": "none"}, "gelu"),
    ("SiLU", {}, "swish"),
    ("Softplus", {"beta": 1.0}, "softplus"),
    ("Identity", {}, "linear"),
]


@pytest.mark.parametrize("module, kwargs, name", ACTIVATIONS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_round_trip(module, kwargs, name, dtype, rng):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    tdt = getattr(torch, dtype)
    act = getattr(nn, module)
    seq = nn.Sequential(
        nn.Linear(5, 16),
        act(**kwargs),
        nn.Linear(16, 8),
        act(**kwargs),
        nn.Linear(8, 3),
    ).to(tdt)

    # PyTorch -> fastntk: same architecture, same function
    net, params = interop.from_torch(seq)
    assert net.widths == (5, 16, 8, 3) and net.activation == name
    assert params.dtype == np.dtype(dtype)
    if name == "leaky_relu":
        assert net.slope == pytest.approx(0.2)
    x = rng.standard_normal((7, 5)).astype(dtype)
    with torch.no_grad():
        z_torch = seq(torch.from_numpy(x)).numpy()
    assert_close(
        net.apply(params, x), z_torch, "interop", dtype, f"fastntk vs torch, {module}"
    )

    # fastntk -> PyTorch: parameters equal, same function
    back = interop.to_torch(net, params)
    linears = [m for m in back if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for l, lin in enumerate(linears):
        np.testing.assert_array_equal(lin.weight.detach().numpy(), params.weights[l])
        np.testing.assert_array_equal(lin.bias.detach().numpy(), params.biases[l])
    with torch.no_grad():
        z_back = back(torch.from_numpy(x)).numpy()
    assert_close(z_back, z_torch, "interop", dtype, f"round trip, {module}")


def test_torch_errors():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    cases = [
        (
            nn.Sequential(nn.Linear(3, 4), nn.Dropout(), nn.Linear(4, 1)),
            TypeError,
            r"module\[1\]: unsupported layer Dropout",
        ),
        (
            nn.Sequential(
                nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)
            ),
            ValueError,
            "same activation",
        ),
        (
            nn.Sequential(nn.Linear(3, 4), nn.ReLU()),
            ValueError,
            "last module to be a Linear",
        ),
        (nn.Sequential(nn.ReLU(), nn.Linear(3, 4)), ValueError, "found it first"),
        (
            nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.ReLU(), nn.Linear(4, 1)),
            ValueError,
            "after another activation",
        ),
        (
            nn.Sequential(
                nn.Linear(3, 4), nn.GELU(approximate="tanh"), nn.Linear(4, 1)
            ),
            ValueError,
            "approximate='none'",
        ),
        (
            nn.Sequential(nn.Linear(3, 4), nn.Softplus(beta=2.0), nn.Linear(4, 1)),
            ValueError,
            "beta=1",
        ),
        (
            nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 1)),
            ValueError,
            "in_features=4",
        ),
        (nn.Sequential(nn.Identity()), ValueError, "at least one Linear"),
        (nn.Linear(3, 4), TypeError, "torch.nn.Sequential"),
    ]
    for module, error, message in cases:
        with pytest.raises(error, match=message):
            interop.from_torch(module)
    net = fastntk.MLP([2, 3, 1], activation="sin")
    with pytest.raises(ValueError, match="'sin' has no PyTorch module"):
        interop.to_torch(net, net.init())


def test_torch_linear_network_without_activation(rng):
    torch = pytest.importorskip("torch")
    seq = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False)).double()
    net, params = interop.from_torch(seq)
    assert net.widths == (4, 2) and net.activation == "linear"
    np.testing.assert_array_equal(params.biases[0], 0.0)
    x = rng.standard_normal((3, 4))
    with torch.no_grad():
        expected = seq(torch.from_numpy(x)).numpy()
    assert_close(net.apply(params, x), expected, "interop", "float64", "linear")
