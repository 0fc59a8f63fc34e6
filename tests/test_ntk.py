"""The NTK engine against the NumPy reference, and its two algorithms pairwise."""

import numpy as np
import pytest

import fastntk
from fastntk import rates as R
from fastntk.kernels import activations

from tolerances import assert_close

DTYPES = [np.float64, np.float32]


def _net(rng, activation, depth, n_out, n_in=None):
    # random widths between 1 and 9, C_b > 0 so that biases matter
    n_in = n_in or int(rng.integers(1, 7))
    hidden = [int(w) for w in rng.integers(1, 10, size=depth - 1)]
    return fastntk.MLP([n_in, *hidden, n_out], activation=activation, C_b=0.3)


def _rates(kind, net, rng):
    if kind == "none":
        return None
    if kind == "identity":
        return R.identity()
    if kind == "layerwise":
        return R.layerwise(
            net, rng.uniform(0.1, 2, net.depth), rng.uniform(0.1, 2, net.depth)
        )
    if kind == "diagonal":
        return R.diagonal(rng.uniform(0, 2, net.n_params))
    M = rng.standard_normal((net.n_params, net.n_params))
    return R.dense(M @ M.T / net.n_params)


def _grid():
    # a sample of (activation, depth, n_out) covering every activation and each
    # depth 1-5 and output count 1-10, instead of the full product
    rng = np.random.default_rng(7)
    cases = []
    for k, act in enumerate(activations.NAMES):
        cases.append((act, 1 + k % 5, [1, 3, 10, 2, 5, 8, 4, 7, 9, 6][k]))
    cases.append(("relu", int(rng.integers(1, 6)), 6))
    return cases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation,depth,n_out", _grid())
def test_structured_jacobian_reference(activation, depth, n_out, dtype, rng):
    net = _net(rng, activation, depth, n_out)
    params = net.init(seed=rng, dtype=dtype)
    x1 = rng.standard_normal((5, net.n_in)).astype(dtype)
    x2 = rng.standard_normal((3, net.n_in)).astype(dtype)
    for kind in ("none", "identity", "layerwise"):
        rates = _rates(kind, net, rng)
        ref = fastntk.reference.ntk(net, params, x1, x2, rates)
        hs = fastntk.ntk(net, params, x1, x2, rates, method="structured")
        hj = fastntk.ntk(net, params, x1, x2, rates, method="jacobian")
        assert hs.dtype == dtype and hs.shape == (5, 3, n_out, n_out)
        what = f"{net!r} {kind}"
        assert_close(hs, ref, "reference", dtype, f"structured vs reference, {what}")
        assert_close(hj, ref, "reference", dtype, f"jacobian vs reference, {what}")
        assert_close(hs, hj, "algorithms", dtype, f"structured vs jacobian, {what}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["diagonal", "dense"])
def test_general_rates_against_reference(kind, dtype, rng):
    net = _net(rng, "tanh", 3, 3)
    params = net.init(seed=rng, dtype=dtype)
    x1 = rng.standard_normal((6, net.n_in)).astype(dtype)
    x2 = rng.standard_normal((4, net.n_in)).astype(dtype)
    rates = _rates(kind, net, rng)
    for xx in (x2, None):
        ref = fastntk.reference.ntk(net, params, x1, xx, rates)
        got = fastntk.ntk(net, params, x1, xx, rates)
        assert_close(got, ref, "reference", dtype, f"jacobian, {kind} rates")


def test_symmetry_and_psd(rng):
    net = fastntk.MLP([4, 9, 7, 3], activation="gelu", C_b=0.2)
    params = net.init(seed=3)
    x1 = rng.standard_normal((7, 4))
    x2 = rng.standard_normal((5, 4))
    h12 = fastntk.ntk(net, params, x1, x2)
    h21 = fastntk.ntk(net, params, x2, x1)
    assert_close(h12, h21.transpose(1, 0, 3, 2), "algorithms", np.float64, "swap")
    h11 = fastntk.ntk(net, params, x1)
    flat = h11.transpose(0, 2, 1, 3).reshape(7 * 3, 7 * 3)
    assert_close(flat, flat.T, "algorithms", np.float64, "symmetric on one set")
    eig = np.linalg.eigvalsh(flat)
    assert eig[0] >= -1e-12 * eig[-1], f"not PSD: smallest eigenvalue {eig[0]}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_outputs_and_per_layer(method, dtype, rng):
    net = fastntk.MLP([3, 6, 5, 4], activation="tanh", C_b=0.1)
    params = net.init(seed=4, dtype=dtype)
    x1 = rng.standard_normal((6, 3)).astype(dtype)
    x2 = rng.standard_normal((5, 3)).astype(dtype)
    for xx in (x2, None):
        full = fastntk.ntk(net, params, x1, xx, method=method)
        trace = fastntk.ntk(net, params, x1, xx, method=method, outputs="trace")
        diag = fastntk.ntk(net, params, x1, xx, method=method, outputs="diagonal")
        assert_close(trace, np.einsum("abii->ab", full), "algorithms", dtype, "trace")
        assert_close(diag, np.einsum("abii->abi", full), "algorithms", dtype, "diag")
        for outputs, whole in (("full", full), ("trace", trace), ("diagonal", diag)):
            layers = fastntk.ntk(
                net, params, x1, xx, method=method, outputs=outputs, per_layer=True
            )
            assert layers.shape == (net.depth, *whole.shape)
            assert_close(layers.sum(0), whole, "algorithms", dtype, f"{outputs} sum")


def test_bad_inputs(rng):
    net = fastntk.MLP([3, 5, 2])
    params = net.init(seed=0)
    x = rng.standard_normal((4, 3))
    other = fastntk.MLP([3, 6, 2])
    dense = R.dense(np.eye(net.n_params))
    cases = [
        (ValueError, "x2: expected shape", dict(x2=rng.standard_normal((4, 2)))),
        (ValueError, "x1: expected shape", dict(x1=rng.standard_normal((4, 2)))),
        (ValueError, "rates: expected", dict(rates=R.layerwise(other))),
        (
            ValueError,
            "rates: expected a diagonal",
            dict(rates=R.diagonal(np.ones(other.n_params))),
        ),
        (ValueError, "outputs: expected", dict(outputs="sum")),
        (ValueError, "method: expected", dict(method="fast")),
        (
            ValueError,
            "method: 'structured' needs",
            dict(rates=R.diagonal(np.ones(net.n_params)), method="structured"),
        ),
        (ValueError, "per_layer: per-layer kernels", dict(rates=dense, per_layer=True)),
        (ValueError, "memory_limit: expected at least", dict(memory_limit=100)),
        (ValueError, "memory_limit: expected an integer", dict(memory_limit=0)),
        (ValueError, "block_size: expected an integer", dict(block_size=0)),
        (TypeError, "x1: expected dtype float64", dict(x1=x.astype(np.float32))),
        (ValueError, "x1: expected finite", dict(x1=np.full((2, 3), np.nan))),
        (ValueError, "backend: expected", dict(backend="tpu")),
        (TypeError, "threads: expected", dict(threads=1.5)),
    ]
    sentinel = np.full((4, 4, 2, 2), 7.0)
    for error, message, change in cases:
        kw = dict(x1=x, out=sentinel)
        kw.update(change)
        with pytest.raises(error, match=message):
            fastntk.ntk(net, params, **kw)
        # nothing was written before the error
        assert np.all(sentinel == 7.0), message
    with pytest.raises(ValueError, match="out: expected shape"):
        fastntk.ntk(net, params, x, out=np.empty((4, 4)))
    with pytest.raises(TypeError, match="out: expected dtype"):
        fastntk.ntk(net, params, x, out=np.empty((4, 4, 2, 2), np.float32))
    with pytest.raises(ValueError, match="out: expected a C-contiguous"):
        fastntk.ntk(net, params, x, out=np.empty((4, 4, 2, 4))[..., ::2])
    with pytest.raises(TypeError, match="net: expected fastntk.MLP"):
        fastntk.ntk("mlp", params, x)
    with pytest.raises(TypeError, match="params: expected"):
        fastntk.ntk(net, params.theta, x)


def test_refuses_a_result_larger_than_memory(monkeypatch, rng):
    from fastntk.engines import ntk as engine

    net = fastntk.MLP([3, 5, 2])
    params = net.init(seed=0)
    monkeypatch.setattr(engine, "available_memory", lambda: 1000)
    with pytest.raises(MemoryError, match="out=np.memmap"):
        fastntk.ntk(net, params, rng.standard_normal((40, 3)))
    # a caller-supplied result is not checked against available memory
    out = np.empty((40, 40))
    fastntk.ntk(net, params, rng.standard_normal((40, 3)), outputs="trace", out=out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_diagonal_rates_of_layerwise_values_match_structured(dtype, rng):
    # the same tensor given as a per-parameter diagonal takes the Jacobian path
    net = fastntk.MLP([4, 7, 6, 3], activation="swish", C_b=0.2)
    params = net.init(seed=5, dtype=dtype)
    x1 = rng.standard_normal((6, 4)).astype(dtype)
    x2 = rng.standard_normal((9, 4)).astype(dtype)
    layerwise = R.layerwise(net, [0.5, 1.0, 2.0], [1.5, 0.3, 1.0])
    diagonal = R.diagonal(layerwise.diagonal_vector(net))
    for outputs in ("full", "trace", "diagonal"):
        hs = fastntk.ntk(net, params, x1, x2, layerwise, outputs=outputs)
        hj = fastntk.ntk(net, params, x1, x2, diagonal, outputs=outputs)
        assert_close(hj, hs, "algorithms", dtype, f"jacobian vs structured {outputs}")


def test_one_step_change_of_outputs(rng):
    # Delta z_{i;d} = -eta sum_{j, a} H[d, a, i, j] eps_{j;a} + O(eta^2)
    net = fastntk.MLP([3, 16, 12, 2], activation="tanh", C_b=0.1)
    params = net.init(seed=6)
    x, xt = rng.standard_normal((8, 3)), rng.standard_normal((5, 3))
    y = rng.standard_normal((8, 2))
    rates = R.layerwise(net, 0.7, 1.3)
    H = fastntk.ntk(net, params, xt, x, rates)
    eps = net.apply(params, x) - y
    predicted = -np.einsum("daij,aj->di", H, eps)
    g = fastntk.gradient(net, params, x, y, loss=fastntk.MSE())
    gaps = []
    for eta in (1e-3, 5e-4):
        moved = net.params(params.theta - eta * rates.apply(net, g))
        actual = (net.apply(moved, xt) - net.apply(params, xt)) / eta
        gaps.append(np.abs(actual - predicted).max())
    # the gap is O(eta): halving eta halves it
    assert gaps[0] < 1e-2 * np.abs(predicted).max()
    assert 1.6 < gaps[0] / gaps[1] < 2.4, gaps


@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_blocked_chunked_and_memmap_equal_unblocked(method, rng, tmp_path):
    net = fastntk.MLP([5, 9, 8, 3], activation="relu", C_b=0.3)
    params = net.init(seed=7)
    x1 = rng.standard_normal((37, 5))
    x2 = rng.standard_normal((23, 5))
    for xx in (None, x2):
        for outputs in ("full", "trace", "diagonal"):
            whole = fastntk.ntk(net, params, x1, xx, outputs=outputs, method=method)
            for block_size in (1, 5, 16):
                blocked = fastntk.ntk(
                    net,
                    params,
                    x1,
                    xx,
                    outputs=outputs,
                    method=method,
                    block_size=block_size,
                )
                assert_close(
                    blocked,
                    whole,
                    "algorithms",
                    np.float64,
                    f"block_size={block_size} {outputs}",
                )
            # per-layer kernels of blocked runs, every tile a different layer slot
            layers = fastntk.ntk(
                net, params, x1, xx, outputs=outputs, method=method, block_size=7,
                per_layer=True,
            )  # fmt: skip
            assert_close(layers.sum(0), whole, "algorithms", np.float64, "per layer")
            # a memory limit small enough that features are recomputed per block
            small = fastntk.ntk(
                net,
                params,
                x1,
                xx,
                outputs=outputs,
                method=method,
                memory_limit=40_000,
            )
            assert_close(small, whole, "algorithms", np.float64, "memory_limit")
    path = tmp_path / "kernel.dat"
    shape = (net.depth, 37, 37, 3)
    mm = np.memmap(path, dtype=np.float64, mode="w+", shape=shape)
    got = fastntk.ntk(
        net,
        params,
        x1,
        outputs="diagonal",
        per_layer=True,
        method=method,
        block_size=8,
        out=mm,
    )
    assert got is mm
    mm.flush()
    del mm, got
    back = np.memmap(path, dtype=np.float64, mode="r", shape=shape)
    whole = fastntk.ntk(net, params, x1, outputs="diagonal", per_layer=True)
    assert_close(np.asarray(back), whole, "algorithms", np.float64, "memmap")


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_and_two_threads_agree(dtype, rng):
    net = fastntk.MLP([6, 40, 30, 2], activation="gelu", C_b=0.1)
    params = net.init(seed=8, dtype=dtype)
    x = rng.standard_normal((300, 6)).astype(dtype)
    h1 = fastntk.ntk(net, params, x, outputs="trace", threads=1)
    h2 = fastntk.ntk(net, params, x, outputs="trace", threads=2)
    assert_close(h1, h2, "algorithms", dtype, "1 vs 2 threads")


def test_concurrent_calls_from_python_threads(rng):
    from concurrent.futures import ThreadPoolExecutor

    net = fastntk.MLP([4, 20, 3], activation="tanh")
    params = net.init(seed=9)
    xs = [rng.standard_normal((60 + 7 * k, 4)) for k in range(4)]
    expected = [fastntk.ntk(net, params, x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: fastntk.ntk(net, params, x, block_size=16), xs))
    for g, e in zip(got, expected):
        assert_close(g, e, "algorithms", np.float64, "concurrent call")


def test_odd_shapes_and_noncontiguous_input(rng):
    net = fastntk.MLP([3, 1, 1], activation="leaky_relu", slope=0.2, C_b=0.5)
    params = net.init(seed=10)
    wide = rng.standard_normal((4, 6))
    x = wide[:, ::2]  # not contiguous
    one = rng.standard_normal((1, 3))
    for x1, x2 in ((x, one), (one, None), (x, None)):
        ref = fastntk.reference.ntk(net, params, np.ascontiguousarray(x1), x2)
        got = fastntk.ntk(net, params, x1, x2)
        assert_close(got, ref, "reference", np.float64, "odd shapes")


def test_flop_count():
    net = fastntk.MLP([64, 256, 256, 1])
    sym = fastntk.ntk_flops(net, 1000, outputs="trace")
    cross = fastntk.ntk_flops(net, 1000, 1000, outputs="trace")
    jac = fastntk.ntk_flops(net, 1000, 1000, outputs="trace", method="jacobian")
    assert 0.5 * cross < sym < 0.6 * cross
    assert jac > 50 * cross


def test_documentation_examples_run(tmp_path, monkeypatch):
    # the Python blocks of docs/ntk.md, in order, in one namespace
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "ntk.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/ntk.md has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for k, block in enumerate(blocks):
        exec(compile(block, f"docs/ntk.md, python block {k + 1}", "exec"), namespace)
