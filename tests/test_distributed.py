"""The tiled NTK and ensembles on a real local Dask cluster of worker processes.

One cluster of two single-threaded worker processes serves the whole module.
Every kernel is compared with the single-machine engine and with the NumPy
reference; task counts come from the scheduler's task stream, not from the code
under test.
"""

import os
import signal
import time

import numpy as np
import pytest

import fastntk
from fastntk import rates as R

from tolerances import assert_close

distributed = pytest.importorskip("distributed")
pytest.importorskip("zarr")

import fastntk.distributed as fd  # noqa: E402
from fastntk.distributed._ntk import TILE_KEY  # noqa: E402
from fastntk.distributed._tiles import Grid  # noqa: E402

P1, P2, TILE = 23, 17, 5


class KillingMLP(fastntk.MLP):
    """An MLP whose first tile kills the worker process running it.

    The marker file, created atomically, makes the kill happen exactly once in
    the whole cluster, or once per worker name with ``per_worker`` (a worker
    restarted by its nanny keeps its name).
    """

    marker = None
    per_worker = False
    after = 1  # the tile of the process that kills it: 1 for its first
    calls = 0  # tiles started in this process

    def params(self, theta, *, copy=True):
        KillingMLP.calls += 1
        if _in_worker() and KillingMLP.calls >= self.after:
            path = self.marker
            if self.per_worker:
                path += f"-{distributed.get_worker().name}"
            try:
                fd_ = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd_, str(os.getpid()).encode())
                os.close(fd_)
                os.kill(os.getpid(), signal.SIGKILL)
        return super().params(theta, copy=copy)


def _make_killing(widths, activation, marker, per_worker=False, after=1):
    net = KillingMLP(widths, activation=activation, C_b=0.2)
    net.marker, net.per_worker, net.after = marker, per_worker, after
    return net


def _in_worker():
    try:
        distributed.get_worker()
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def client():
    # a real local cluster: two worker processes, one thread each
    with fd.connect(n_workers=2, threads_per_worker=1) as cl:
        yield cl


def _problem(dtype=np.float64, n_out=2, widths=(3, 8, 8)):
    net = fastntk.MLP([*widths, n_out], activation="tanh", C_b=0.2)
    params = net.init(seed=3, dtype=dtype)
    rng = np.random.default_rng(11)
    x1 = rng.standard_normal((P1, net.n_in)).astype(dtype)
    x2 = rng.standard_normal((P2, net.n_in)).astype(dtype)
    return net, params, x1, x2


def _reference(net, params, x1, x2, rates, outputs):
    # the NumPy reference in the requested output mode
    full = fastntk.reference.ntk(net, params, x1, x2, rates)
    if outputs == "trace":
        return np.trace(full, axis1=2, axis2=3)
    if outputs == "diagonal":
        return np.diagonal(full, axis1=2, axis2=3)
    return full


def _rates(kind, net):
    rng = np.random.default_rng(5)
    if kind == "layerwise":
        return R.layerwise(
            net, rng.uniform(0.1, 2, net.depth), rng.uniform(0.1, 2, net.depth)
        )
    if kind == "diagonal":
        return R.diagonal(rng.uniform(0, 2, net.n_params))
    M = rng.standard_normal((net.n_params, net.n_params))
    return R.dense(M @ M.T / net.n_params)


def _tile_keys(stream):
    return [t["key"] for t in stream.data if str(t["key"]).startswith(TILE_KEY)]


# -- tiled results equal the single-machine kernel ------------------------------------


@pytest.mark.parametrize(
    "outputs,kind,symmetric,dtype",
    [
        ("full", "layerwise", True, np.float64),
        ("full", "dense", False, np.float32),
        ("trace", "diagonal", True, np.float32),
        ("trace", "layerwise", False, np.float64),
        ("diagonal", "layerwise", True, np.float32),
        ("diagonal", "diagonal", False, np.float64),
    ],
)
def test_dask_array_equals_single_machine(client, outputs, kind, symmetric, dtype):
    net, params, x1, x2 = _problem(dtype)
    x2 = None if symmetric else x2
    rates = _rates(kind, net)
    H = fd.ntk(
        net,
        params,
        x1,
        x2,
        rates=rates,
        outputs=outputs,
        tile_size=TILE,
        client=client,
    )
    assert H.dtype == dtype and H.chunksize[:2] == (TILE, TILE)
    got = H.compute()
    single = fastntk.ntk(net, params, x1, x2, rates, outputs=outputs)
    ref = _reference(net, params, x1, x2, rates, outputs)
    what = f"{outputs}, {kind} rates, symmetric={symmetric}"
    assert_close(got, single, "algorithms", dtype, f"tiles vs fastntk.ntk, {what}")
    assert_close(got, ref, "reference", dtype, f"tiles vs reference, {what}")


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
@pytest.mark.parametrize("outputs", ["full", "trace"])
def test_store_equals_single_machine(client, tmp_path, suffix, outputs):
    net, params, x1, _ = _problem()
    path = str(tmp_path / f"kernel{suffix}")
    out = fd.ntk(
        net,
        params,
        x1,
        outputs=outputs,
        per_layer=True,
        tile_size=TILE,
        client=client,
        store=path,
    )
    single = fastntk.ntk(net, params, x1, outputs=outputs, per_layer=True)
    assert_close(out[...], single, "algorithms", np.float64, f"{suffix} store")
    # readable with plain NumPy or Zarr, e.g. from another machine
    if suffix == ".npy":
        plain = np.load(path, mmap_mode="r")
    else:
        import zarr

        plain = zarr.open_group(path, mode="r")["kernel"][...]
    assert_close(plain, single, "algorithms", np.float64, f"{suffix} read back")
    assert_close(fd.open_kernel(path)[...], single, "algorithms", np.float64, "open")


def test_local_cluster_of_the_call(tmp_path):
    # no client: a local cluster is started and closed, a NumPy array returned
    net, params, x1, x2 = _problem()
    seen = []
    H = fd.ntk(
        net,
        params,
        x1,
        x2,
        outputs="diagonal",
        tile_size=8,
        n_workers=1,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert isinstance(H, np.ndarray)
    ref = fastntk.ntk(net, params, x1, x2, outputs="diagonal")
    assert_close(H, ref, "algorithms", np.float64, "local cluster")
    # progress: from 0 to all 3 x 3 tiles, increasing
    assert seen[0] == (0, 9) and seen[-1] == (9, 9)
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:], strict=False))


# -- symmetric tiles computed once; data scattered once -----------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_tile_tasks_counted(client, tmp_path, symmetric, monkeypatch):
    net, params, x1, x2 = _problem()
    x2 = None if symmetric else x2
    scatters = []
    original = client.scatter

    def counting_scatter(data, **kwargs):
        scatters.append(kwargs)
        return original(data, **kwargs)

    monkeypatch.setattr(client, "scatter", counting_scatter)
    with distributed.get_task_stream(client) as stream:
        fd.ntk(
            net,
            params,
            x1,
            x2,
            outputs="trace",
            tile_size=TILE,
            client=client,
            store=str(tmp_path / "k.npy"),
        )
    keys = _tile_keys(stream)
    n1 = -(-P1 // TILE)
    n2 = n1 if symmetric else -(-P2 // TILE)
    expected = n1 * (n1 + 1) // 2 if symmetric else n1 * n2
    assert len(keys) == len(set(keys)) == expected
    counted = fd.plan(net, P1, None if symmetric else P2, tile_size=TILE)
    assert counted.tiles == expected and counted.grid == (n1, n2)
    # one scatter to every worker, and no transfer of it between workers
    assert len(scatters) == 1 and scatters[0].get("broadcast") is True
    transfers = [
        s for t in stream.data for s in t["startstops"] if s["action"] == "transfer"
    ]
    assert transfers == []


def test_worker_thread_pools(client):
    # the pools of each local worker are sized by threads_per_worker
    def pools():
        import numba

        return os.environ["OPENBLAS_NUM_THREADS"], numba.config.NUMBA_NUM_THREADS

    assert list(client.run(pools).values()) == [("1", 1), ("1", 1)]


# -- a worker dies mid-run -----------------------------------------------------------


def test_worker_killed_mid_run(client, tmp_path):
    # one worker dies on its third tile: that tile, and the two finished tiles
    # held in its memory, are computed again
    net, params, x1, _ = _problem()
    marker = str(tmp_path / "killed")
    killer = _make_killing(net.widths, net.activation, marker, after=3)
    before = set(client.run(os.getpid).values())
    H = fd.ntk(killer, params, x1, outputs="full", tile_size=TILE, client=client)
    got = H.compute()
    # exactly one worker process killed itself during the run
    with open(tmp_path / "killed") as fh:
        victim = int(fh.read())
    assert victim in before
    client.wait_for_workers(2, timeout=60)
    assert victim not in set(client.run(os.getpid).values())
    single = fastntk.ntk(net, params, x1, outputs="full")
    assert_close(got, single, "algorithms", np.float64, "after a worker died")


def test_every_worker_killed_mid_run(client, tmp_path, caplog):
    # both workers die on their first tile, taking the scattered inputs with
    # them: the inputs are sent again and the missing tiles computed
    net, params, x1, _ = _problem()
    marker = str(tmp_path / "killed")
    killer = _make_killing(net.widths, net.activation, marker, per_worker=True)
    before = set(client.run(os.getpid).values())
    with caplog.at_level("WARNING", logger="fastntk.distributed"):
        out = fd.ntk(
            killer,
            params,
            x1,
            outputs="trace",
            tile_size=TILE,
            client=client,
            store=str(tmp_path / "k.zarr"),
        )
    victims = {int(open(p).read()) for p in tmp_path.glob("killed-*")}
    assert victims == before
    assert "sending them again" in caplog.text
    single = fastntk.ntk(net, params, x1, outputs="trace")
    assert_close(out[...], single, "algorithms", np.float64, "after all workers died")
    client.wait_for_workers(2, timeout=60)


# -- resumption of an interrupted run ----------------------------------------------


class Interrupt(Exception):
    pass


def _wait_idle(client, timeout=60):
    # cancelled tasks already running finish on their workers: wait for them
    def executing(dask_worker):
        return dask_worker.state.executing_count

    deadline = time.monotonic() + timeout
    while any(client.run(executing).values()):
        assert time.monotonic() < deadline, "workers still busy"
        time.sleep(0.05)


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_resume_computes_only_missing_tiles(client, tmp_path, suffix):
    net, params, x1, _ = _problem()
    path = str(tmp_path / f"k{suffix}")
    total = len(Grid(P1, P1, TILE, True).tiles())

    def stop_after_4(done, n):
        if done >= 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        fd.ntk(
            net,
            params,
            x1,
            outputs="trace",
            tile_size=TILE,
            client=client,
            store=path,
            progress=stop_after_4,
        )
    with pytest.raises(ValueError, match="misses"):
        fd.open_kernel(path)
    _wait_idle(client)
    store = fd._store.KernelStore.at(path)
    done_before = int(store.read_done((5, 5)).sum())
    assert 4 <= done_before < total

    # the same run again: only the missing tiles are computed
    with distributed.get_task_stream(client) as stream:
        out = fd.ntk(
            net,
            params,
            x1,
            outputs="trace",
            tile_size=TILE,
            client=client,
            store=path,
        )
    assert len(_tile_keys(stream)) == total - done_before
    single = fastntk.ntk(net, params, x1, outputs="trace")
    assert_close(out[...], single, "algorithms", np.float64, "resumed")
    assert_close(fd.open_kernel(path)[...], single, "algorithms", np.float64, "open")

    # another kernel in the same store is refused, unless starting over
    other = net.init(seed=4)
    with pytest.raises(ValueError, match="another run.*fingerprint"):
        fd.ntk(
            net, other, x1, outputs="trace", tile_size=TILE, client=client, store=path
        )
    with distributed.get_task_stream(client) as stream:
        fd.ntk(
            net,
            other,
            x1,
            outputs="trace",
            tile_size=TILE,
            client=client,
            store=path,
            resume=False,
        )
    assert len(_tile_keys(stream)) == total


# -- ensembles ---------------------------------------------------------------------


def _local_kernels(nets, seeds, x, outputs="trace", params_of=None):
    return np.stack(
        [
            np.stack(
                [
                    fastntk.ntk(
                        net,
                        (params_of or (lambda n, s: n.init(seed=s)))(net, int(s)),
                        x,
                        outputs=outputs,
                    )
                    for s in seeds
                ]
            )
            for net in nets
        ]
    )


@pytest.mark.parametrize("ddof", [0, 1])
def test_ensemble_means_and_variances(client, ddof):
    nets = [fastntk.MLP([3, w, w, 2], activation="relu", C_b=0.1) for w in (4, 16)]
    x = np.random.default_rng(2).standard_normal((6, 3))
    seeds = [3, 1, 4, 15, 9]
    res = fd.ensemble(
        nets,
        x,
        seeds=seeds,
        outputs="diagonal",
        gather=True,
        ddof=ddof,
        fan_in=2,
        client=client,
    )
    local = _local_kernels(nets, seeds, x, outputs="diagonal")
    assert res.count.tolist() == [5, 5]
    assert_close(res.members, local, "algorithms", np.float64, "members")
    assert_close(res.mean, local.mean(axis=1), "algorithms", np.float64, "mean")
    assert_close(
        res.variance, local.var(axis=1, ddof=ddof), "algorithms", np.float64, "variance"
    )


def test_ensemble_of_training_runs(client):
    net = fastntk.MLP([3, 8, 1], activation="tanh", C_b=0.1)
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 1))
    train = {"x": x, "y": y, "loss": "mse", "lr": 0.05, "steps": 4}
    res = fd.ensemble(net, x, seeds=3, train=train, client=client)

    def trained(n, s):
        return fastntk.train(n, n.init(seed=s), **train)[0]

    local = _local_kernels([net], range(3), x, params_of=trained)
    assert res.members is None
    assert_close(res.mean[0], local[0].mean(0), "algorithms", np.float64, "mean")
    assert_close(
        res.variance[0], local[0].var(0, ddof=1), "algorithms", np.float64, "var"
    )
    losses = [h.train_loss[-1] for h in res.histories[0]]
    expected = [
        fastntk.train(net, net.init(seed=s), **train)[1].train_loss[-1]
        for s in range(3)
    ]
    assert losses == pytest.approx(expected, rel=1e-12)


# -- errors ------------------------------------------------------------------------


def test_unreachable_address_fails_within_timeout():
    net, params, x1, _ = _problem()
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"tcp://127\.0\.0\.1:1.*within 1\.5 s"):
        fd.ntk(net, params, x1, address="tcp://127.0.0.1:1", timeout=1.5)
    assert time.perf_counter() - start < 1.5 + 5


def test_arguments_checked_before_any_work(client, tmp_path):
    net, params, x1, _ = _problem()
    cases = [
        (dict(client=client, n_workers=2), ValueError, "at most one"),
        (dict(address=8786), TypeError, "address"),
        (dict(client=client, outputs="trac"), ValueError, "outputs"),
        (dict(client=client, tile_size=0), ValueError, "tile_size"),
        (dict(client=client, store=3), TypeError, "store"),
        (dict(client=client, threads_per_worker=0), ValueError, "threads_per_worker"),
        (dict(client=client, timeout=-1), ValueError, "timeout"),
        (dict(client=client, progress="yes"), TypeError, "progress"),
        (
            dict(
                client=client,
                rates=R.diagonal(np.ones(net.n_params)),
                method="structured",
            ),
            ValueError,
            "method",
        ),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            fd.ntk(net, params, x1, **kwargs)
    with pytest.raises(ValueError, match="x1"):
        fd.ntk(net, params, x1[:, :2], client=client)
    with pytest.raises(FileNotFoundError, match="found none"):
        fd.open_kernel(str(tmp_path / "nothing.zarr"))
    # files and folders it did not write are never overwritten
    np.save(tmp_path / "mine.npy", np.arange(3))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("keep")
    for name in ("mine.npy", "folder"):
        for resume in (True, False):
            with pytest.raises(ValueError, match="not a kernel store"):
                fd.ntk(
                    net,
                    params,
                    x1,
                    client=client,
                    store=str(tmp_path / name),
                    resume=resume,
                )
    assert np.load(tmp_path / "mine.npy").tolist() == [0, 1, 2]
    assert (tmp_path / "folder" / "notes.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="distinct"):
        fd.ensemble(net, x1, seeds=[1, 1], client=client)
    with pytest.raises(ValueError, match="train: missing"):
        fd.ensemble(net, x1, seeds=2, train={"x": x1}, client=client)


def test_progress_bar():
    import io

    out = io.StringIO()
    bar = fd.ProgressBar("tiles", stream=out, width=4)
    for k in range(5):
        bar(k, 4)
    lines = out.getvalue().split("\r")
    assert lines[-1].startswith("tiles [####] 4/4") and lines[-1].endswith("\n")
    assert lines[3].startswith("tiles [##..] 2/4")


def test_docs_examples_run(client, tmp_path, monkeypatch):
    # the Python blocks of docs/distributed.md, in one namespace, in order; the
    # client they open is this module's, which they leave open
    import re
    from pathlib import Path

    opening = "client = Client(n_workers=2, threads_per_worker=1)"
    monkeypatch.setattr(client, "close", lambda *args, **kwargs: None)

    text = (Path(__file__).parent.parent / "docs" / "distributed.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4 and opening in blocks[0]
    blocks[0] = blocks[0].replace(opening, "client = module_client")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__", "module_client": client}
    for k, block in enumerate(blocks):
        exec(compile(block, f"docs/distributed.md, block {k + 1}", "exec"), namespace)
    spread = namespace["spread"]
    assert spread[0] > spread[-1]  # the relative variance falls with the width
    assert namespace["p"].tiles == 10


def test_docstring_examples():
    # the examples in the docstrings (those not starting a cluster run here)
    import doctest
    import importlib

    for name in ("_ntk", "_ensemble", "_store", "_cluster", "_progress"):
        module = importlib.import_module(f"fastntk.distributed.{name}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"{result.failed} examples failed in {name}"
