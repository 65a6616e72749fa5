"""The 2-D process grid (data-parallel groups x layer-parallel ranks):
training on every grid shape that fits in the ranks against a serial
reference on the full global batches, gradient averaging against autograd of
the global batch's mean loss, evaluation, argument checks; and one run of
the command on 4 ranks resumed on another grid shape."""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar import checkpoint as ckpt
from layerpar.config import ConfigError, check_grid, resolve
from layerpar.data import from_arrays
from layerpar.grid import ProcessGrid, share_bounds
from layerpar.optim import LBFGS
from layerpar.training.build import build_network, make_loaders
from layerpar.training.level import Level
from layerpar.training.report import batch_len

WORLD = MPI.COMM_WORLD
NLAYERS = 4  # a group of up to 4 layer ranks holds a layer each


def config(optim="adam", **sets):
    overrides = ['mgrit.mode="serial"', f"model.nlayers={NLAYERS}", "model.width=3",
                 'data.dtype="float64"', "data.batch_size=10", f'optim.name="{optim}"',
                 "optim.lr=0.05", "run.plot=false", 'run.dir="unused"']
    return resolve(None, overrides + [f"{k}={v}" for k, v in sets.items()])


def dataset(n=23, nval=9):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n + nval, 2))
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int64) + (x[:, 0] > 1).astype(np.int64)
    return from_arrays(x[:n], y[:n], val_inputs=x[n:], val_labels=y[n:], num_classes=3,
                       dtype=torch.float64)


def sub_grids(comm):
    """(communicator of s ranks, D) for every group size s in 1, 2, 4 that
    divides the ranks and every D dividing s: the world split into blocks of
    s ranks, each block running the same grid."""
    P = comm.Get_size()
    for s in (1, 2, 4):
        if s > P or P % s:
            continue
        sub = comm.Split(comm.Get_rank() // s, comm.Get_rank())
        for D in [d for d in range(1, s + 1) if s % d == 0]:
            yield sub, D
        sub.Free()


def serial_reference(cfg, data):
    """The configured network's initial weights as a plain nn.Sequential on
    this process (no MPI beyond COMM_SELF)."""
    net = build_network(cfg, data.input_shape, data.num_classes, MPI.COMM_SELF)
    seq = net.serial_equivalent()
    net.close()
    return seq


def flat(module):
    return torch.cat([v.detach().reshape(-1) for v in module.state_dict().values()])


def reference_training(cfg, data, steps):
    """Plain PyTorch on the full global batches of the configured order."""
    seq = serial_reference(cfg, data)
    o = cfg["optim"]
    if o["name"] == "sgd":
        opt = torch.optim.SGD(seq.parameters(), lr=o["lr"], momentum=o["momentum"])
    elif o["name"] == "adam":
        opt = torch.optim.Adam(seq.parameters(), lr=o["lr"])
    else:
        opt = LBFGS(seq.parameters(), MPI.COMM_SELF, lr=o["lr"], history=o["lbfgs_history"],
                    line_search=o["line_search"], reuse_evaluation=True)
    batch = len(data.train) if o["name"] == "lbfgs" else cfg["data"]["batch_size"]
    loader = data.train.loader(batch_size=batch, seed=cfg["data"]["seed"],
                               shuffle=o["name"] != "lbfgs")
    done, epoch = 0, 0
    while done < steps:
        for x, y in loader.epoch(epoch):
            def closure():
                opt.zero_grad()
                loss = Fn.cross_entropy(seq(x), y)
                loss.backward()
                return float(loss.detach())
            if o["name"] == "lbfgs":
                opt.step(closure)
            else:
                closure()
                opt.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    return seq


def grid_training(cfg, data, comm, D, steps):
    """``steps`` Level steps on a D x L grid over ``comm``; the trained
    network's weights as one vector on every rank, and whether the groups
    hold bitwise the same weights."""
    with ProcessGrid(comm, data=D) as grid:
        lbfgs = cfg["optim"]["name"] == "lbfgs"
        train, _ = make_loaders(cfg, data, grid.layer_rank, grid.layers, grid=grid)
        level = Level(cfg, data, grid.layer_comm, grid=grid)
        done, epoch = 0, 0
        while done < steps:
            for b, (x, y) in enumerate(train.epoch(epoch)):
                level.step(x, y, batch_len(train, b))
                done += 1
                if done == steps:
                    break
            epoch += 1
        w = flat(level.net.serial_equivalent())
        mine = torch.cat([p.detach().reshape(-1) for p in level.net.parameters()])
        same = grid.data_comm.allgather(mine)
        level.close()
        assert lbfgs or len(train) == 3
    return w, all(torch.equal(s, same[0]) for s in same)


@pytest.mark.mpi
@pytest.mark.parametrize("optim", ["adam", "sgd", "lbfgs"])
def test_grid_shapes_train_like_serial_reference(optim):
    # 23 samples in batches of 10: the last batch of an epoch has 3 rows, so
    # on 4 x 1 one group's share is empty; L-BFGS takes the whole set
    cfg = config(optim, **({"optim.lr": 1.0} if optim == "lbfgs" else {}))
    data = dataset()
    steps = 5
    ref = flat(reference_training(cfg, data, steps))
    for sub, D in sub_grids(WORLD):
        w, same = grid_training(cfg, data, sub, D, steps)
        shape = f"{D} x {sub.Get_size() // D}"
        err = float((w - ref).abs().max() / ref.abs().max())
        assert err <= 1e-10, (shape, err)
        assert same, f"{shape}: the groups' weights differ"


def _local_pairs(level, seq):
    """(parameter of this rank, the reference's parameter of the same name)."""
    body = level.net.body
    pairs = []
    if level.net.is_first:
        pairs += list(zip(level.net.opening.parameters(), seq[0].parameters()))
    for n in body.layer_indices:
        pairs += list(zip(body.layer(n).parameters(), seq[1 + n].F.parameters()))
    if level.net.is_last:
        pairs += list(zip(level.net.closing.parameters(), seq[-1].parameters()))
    return pairs


@pytest.mark.mpi
@pytest.mark.parametrize("B", [7, 3])
def test_averaged_gradient_is_the_global_batch_gradient(B):
    # uneven shares (7 = 4 + 3 on two groups, 2 + 2 + 2 + 1 on four) and
    # empty ones (3 rows on four groups)
    cfg = config("sgd")
    data = dataset()
    x, y = data.train.inputs[:B], data.train.labels[:B]
    seq = serial_reference(cfg, data)
    loss = Fn.cross_entropy(seq(x), y)
    loss.backward()
    loss = float(loss.detach())
    for sub, D in sub_grids(WORLD):
        with ProcessGrid(sub, data=D) as grid:
            level = Level(cfg, data, grid.layer_comm, grid=grid)
            start, stop = grid.share(B)
            xs = x[start:stop] if level.first else None
            ys = y[start:stop] if level.last else None
            value = level.loss_and_grad(xs, ys, B)
            assert abs(value - loss) <= 1e-12 * abs(loss)
            for p, q in _local_pairs(level, seq):
                scale = max(float(q.grad.abs().max()), 1e-300)
                assert float((p.grad - q.grad).abs().max()) <= 1e-12 * scale, (D, B)
            level.close()


@pytest.mark.mpi
def test_average_gradients_buckets_and_missing_gradients():
    # small buckets (one allreduce each), a frozen parameter, a missing .grad
    with ProcessGrid(WORLD, data=WORLD.Get_size()) as grid:
        d = grid.data_rank
        ps = [torch.nn.Parameter(torch.full((5,), float(d + 1), dtype=torch.float64)),
              torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)),
              torch.nn.Parameter(torch.zeros(2, dtype=torch.float64), requires_grad=False),
              torch.nn.Parameter(torch.zeros(4, dtype=torch.float32))]
        ps[0].grad = torch.full((5,), float(d + 1), dtype=torch.float64)
        ps[3].grad = torch.full((4,), float(d), dtype=torch.float32)
        if d == 0:
            ps[1].grad = torch.ones(3, dtype=torch.float64)
        weights = [k + 1.0 for k in range(grid.data)]
        grid.average_gradients(ps, weights[d], bucket_bytes=16)
        D = grid.data
        assert torch.equal(ps[0].grad, torch.full((5,), float(sum((k + 1) ** 2
                                                             for k in range(D))),
                                                   dtype=torch.float64))
        assert torch.equal(ps[1].grad, torch.ones(3, dtype=torch.float64))
        assert ps[2].grad is None
        assert torch.allclose(ps[3].grad, torch.full((4,), float(sum(k * (k + 1)
                                                                     for k in range(D)))))


def test_shares_are_those_of_tensor_split():
    for B in range(0, 12):
        for D in range(1, 6):
            t = torch.arange(B)
            parts = torch.tensor_split(t, D)
            for d in range(D):
                start, stop = share_bounds(B, D, d)
                assert torch.equal(t[start:stop], parts[d])


@pytest.mark.mpi
def test_evaluation_is_the_same_on_every_grid():
    cfg = config("adam")
    data = dataset(n=23, nval=9)
    results = []
    for sub, D in sub_grids(WORLD):
        with ProcessGrid(sub, data=D) as grid:
            # batches of 4 validation samples: 4 + 4 + 1 (empty shares on 2 and 4 groups)
            val = grid.loader(data.val, batch_size=4, shuffle=False,
                              need_inputs=grid.layer_rank == 0,
                              need_labels=grid.layer_rank == grid.layers - 1)
            level = Level(cfg, data, grid.layer_comm, grid=grid)
            results.append(level.evaluate(val))
            level.close()
    seq = serial_reference(cfg, data)
    with torch.no_grad():
        out = seq(data.val.inputs)
    loss = float(Fn.cross_entropy(out, data.val.labels))
    acc = float((out.argmax(1) == data.val.labels).sum()) / len(data.val)
    for value, accuracy in results:
        assert accuracy == acc
        assert abs(value - loss) <= 1e-12 * loss


@pytest.mark.mpi
def test_bad_data_is_refused_on_every_rank():
    P = WORLD.Get_size()
    bad = [0, -1, P + 1, "2", True, 2.0] + ([3] if P == 4 else [])
    if P > 1:
        bad.append(1 if WORLD.Get_rank() == 0 else P)  # the ranks disagree
    for value in bad:
        with pytest.raises(ValueError, match="data") as info:
            ProcessGrid(WORLD, data=value)
        texts = WORLD.allgather(str(info.value))
        assert len(set(texts)) == 1, texts
    with pytest.raises(ConfigError, match="parallel.data"):
        check_grid(config(**{"parallel.data": 3}), 4)
    with pytest.raises(ConfigError, match="parallel.data"):
        resolve(None, ["parallel.data=0"])
    # multilevel training runs on a grid too
    assert resolve(None, ["parallel.data=2", 'multilevel.method="nested"'])["parallel"]["data"] == 2


@pytest.mark.mpi
def test_grid_attributes():
    P = WORLD.Get_size()
    for D in [d for d in range(1, P + 1) if P % d == 0]:
        with ProcessGrid(WORLD, data=D) as grid:
            L = P // D
            assert (grid.data, grid.layers) == (D, L)
            assert WORLD.Get_rank() == grid.data_rank * L + grid.layer_rank
            assert grid.layer_comm.Get_size() == L and grid.data_comm.Get_size() == D
            assert grid.layer_comm.Get_rank() == grid.layer_rank
            assert grid.data_comm.Get_rank() == grid.data_rank
            # the column holds the same layer rank in every group
            assert set(grid.data_comm.allgather(grid.layer_rank)) == {grid.layer_rank}
            assert grid.layer_comm.allgather(WORLD.Get_rank()) == \
                list(range(grid.data_rank * L, grid.data_rank * L + L))
        assert grid.closed
        grid.close()  # twice: nothing


# ---- the command: a 2 x 2 run and a resume from 1 x 4 on 2 x 2 ------------------------------
def _layerpar(mpiexec, n, *args):
    from conftest import clean_mpi_env
    cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "layerpar", *args]
    return subprocess.run(cmd, env=clean_mpi_env(), capture_output=True, text=True, timeout=300)


def _weights(path):
    st = ckpt.load_checkpoint(path, MPI.COMM_SELF, layer_indices=None)
    out = {f"layers.{n}.{k}": v for n, d in st["layers"].items() for k, v in d.items()}
    for sec in ("opening", "closing"):
        out.update({f"{sec}.{k}": v for k, v in st[sec].items()})
    return out, st


def _last_row(run_dir):
    import csv
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))[-1]


def test_cli_grid_run_and_resume_on_another_grid(tmp_path, mpiexec):
    # two epochs on 1 x 4; the first epoch's checkpoint (kept as the previous
    # one) resumed on 2 x 2 for the second: the same weights and validation
    args = ["--set", "model.nlayers=8", "--set", "model.width=4", "--set", "run.plot=false",
            "--set", 'mgrit.mode="serial"', "--set", "data.batch_size=500",
            "--set", 'optim.name="sgd"', "--set", "optim.lr=0.05",
            "--set", "optim.epochs=2", "-q"]
    full, part = tmp_path / "full", tmp_path / "part"
    r = _layerpar(mpiexec, 4, "train", "--run-dir", str(full), "--data-parallel", "1", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    first = full / "checkpoint.prev.h5"
    assert ckpt.verify_checkpoint(str(first))["epoch"] == 1
    r = _layerpar(mpiexec, 4, "train", "--run-dir", str(part), "--resume-from", str(first),
                  "--data-parallel", "2", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(2 x 2 grid)" in r.stdout
    wf, stf = _weights(str(full / "checkpoint.h5"))
    wp, stp = _weights(str(part / "checkpoint.h5"))
    assert (stf["epoch"], stf["step"]) == (stp["epoch"], stp["step"]) == (2, 20)
    assert (stf["config"]["parallel"]["data"], stp["config"]["parallel"]["data"]) == (1, 2)
    for k in wf:
        scale = float(wf[k].abs().max())
        assert float((wf[k] - wp[k]).abs().max()) <= 1e-12 * max(scale, 1.0), k
    # the training loss of the epoch and the validation, measured on each grid
    rf, rp = _last_row(full), _last_row(part)
    assert rf["val_acc"] == rp["val_acc"]
    for key in ("train_loss", "val_loss"):
        assert abs(float(rf[key]) - float(rp[key])) <= 1e-12 * float(rf[key]), key


def test_grid_step_model():
    from layerpar import perfmodel as pm
    costs = {k: (1e-4 * (i + 1), 1e-6 * (i + 1)) for i, k in enumerate(pm.KINDS)}
    cal = pm.Calibration(costs, latency=2e-6, bandwidth=1e9, batch=64, row_bytes=256)
    # an allreduce by hand: 2 log2(D) latencies and 2 (D-1)/D of the bytes
    assert pm.allreduce(1000, 1, latency=1.0, bandwidth=1.0) == 0.0
    assert pm.allreduce(8e6, 16, latency=2e-6, bandwidth=1e9) == \
        pytest.approx(2 * 4 * 2e-6 + 2 * 15 / 16 * 8e6 / 1e9, rel=1e-14)
    assert pm.allreduce(100, 3, latency=1.0, bandwidth=100.0) == pytest.approx(4 + 4 / 3)
    opts = dict(max_levels=2, cfactor=4, relax="F", skip=True)
    one = pm.grid_step(cal, 32, 1, 4, "layer-parallel", layer_bytes=4096, **opts)
    plain = pm.training_step(cal, 32, 4, "layer-parallel", **opts)["time"]
    assert one["time"] == plain and one["allreduce"] == 0.0
    # 16 x 16 with a batch of 1000: groups of 63 rows (the largest share),
    # 2 layers per rank in the allreduce
    big = pm.grid_step(cal, 32, 16, 16, "layer-parallel", layer_bytes=4096, batch=1000,
                       **opts)
    assert big["group"] == pm.training_step(cal, 32, 16, "layer-parallel", batch=63,
                                            **opts)["time"]
    # the default reducer sums in group order (an allgather of every
    # group's buckets); MPI's allreduce is the other choice
    assert big["allreduce"] == pm.ordered_sum(2 * 4096, 16, latency=2e-6, bandwidth=1e9)
    assert big["time"] == big["group"] + big["allreduce"]
    mpi = pm.grid_step(cal, 32, 16, 16, "layer-parallel", layer_bytes=4096, batch=1000,
                       reducer="allreduce", **opts)
    assert mpi["allreduce"] == pm.allreduce(2 * 4096, 16, latency=2e-6, bandwidth=1e9)
    assert mpi["time"] == mpi["group"] + mpi["allreduce"]
    with pytest.raises(ValueError, match="batch"):
        pm.grid_step(cal, 32, 16, 2, "serial", layer_bytes=1, batch=8)


@pytest.mark.mpi
def test_trainer_on_a_grid_writes_once_and_fails_everywhere(tmp_path):
    # the in-process trainer on D = P groups of one rank: the metrics and the
    # checkpoint of group 0; a checkpoint that cannot be written raises on
    # every rank (group 0 tells the others)
    from layerpar.training import Trainer
    P = WORLD.Get_size()
    run_dir = WORLD.bcast(str(tmp_path) if WORLD.Get_rank() == 0 else None, root=0)
    cfg = config("sgd", **{"parallel.data": P, "optim.epochs": 1, "data.batch_size": 500,
                           "run.dir": f'"{run_dir}"'})
    t = Trainer(cfg, WORLD)
    assert t.grid.shape == (P, 1)
    summary = t.run()
    assert summary["epoch"] == 1 and 0 < summary["val_acc"] <= 1
    st = ckpt.load_checkpoint(os.path.join(run_dir, "checkpoint.h5"), MPI.COMM_SELF)
    assert st["config"]["parallel"]["data"] == P and st["step"] == 10
    # the command's evaluation loader: the same validation as the run's
    assert t.evaluate(t.loader(t.data.val, batch_size=1000)) == \
        (summary["val_loss"], summary["val_acc"])
    if WORLD.Get_rank() == 0:
        with open(os.path.join(run_dir, "a-file"), "w"):
            pass
    WORLD.Barrier()
    t.run_dir = os.path.join(run_dir, "a-file", "run")  # a folder that cannot be made
    with pytest.raises(ckpt.CheckpointError):
        t.save()
    t.close()
    assert t.grid.closed


@pytest.mark.mpi
def test_a_stop_asked_in_one_group_stops_every_group(tmp_path):
    from layerpar.training import Trainer
    P = WORLD.Get_size()
    run_dir = WORLD.bcast(str(tmp_path) if WORLD.Get_rank() == 0 else None, root=0)
    cfg = config("sgd", **{"parallel.data": P, "optim.epochs": 1, "data.batch_size": 500,
                           "run.dir": f'"{run_dir}"'})
    last = WORLD.Get_rank() == P - 1  # the last rank of the last group
    t = Trainer(cfg, WORLD, should_stop=lambda: last and t.step >= 2)
    summary = t.run()
    assert summary["stopped"] and t.step == 2
    assert ckpt.load_checkpoint(os.path.join(run_dir, "checkpoint.h5"),
                                MPI.COMM_SELF)["step"] == 2
    t.close()
