"""A user's residual block (a frozen parameter and a dropout, from
tests/userblocks.py) trained by the `layerpar` command on an .npz file the
test writes; its evaluation outputs on 1, 2 and 4 ranks (as many as the
test session has); resumption with dropout; one-line errors for a bad data
file or import path.  The command runs in this process on the session's
ranks (``command``, see test_cli.py)."""
import csv
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from mpi4py import MPI

from layerpar import DenseClosing, DenseOpening
from layerpar import checkpoint as ckpt
from layerpar.config import check, resolve
from layerpar.data import load_files
from layerpar.training import Trainer, build_network
from test_cli import command, error_line, on_rank0, shared_dir
from userblocks import Block

WORLD = MPI.COMM_WORLD
N, WIDTH = 8, 6
USER = ['data.name="files"', 'data.dtype="float64"', "data.batch_size=40",
        'model.step="userblocks:Block"', f"model.step_kwargs={{width = {WIDTH}, p = 0.2}}",
        f"model.width={WIDTH}", f"model.nlayers={N}", "run.plot=false"]


def write_data(path, n=160, seed=0):
    """4 features; 3 classes from the signs of two linear functions."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] - x[:, 3] > 0.5)
    np.savez(path, x=x, y=y)
    return str(path)


def sets(*items):
    return [a for s in items for a in ("--set", s)]


def serial_eval(path, data):
    """The checkpoint's network built here from its stored weights as plain
    PyTorch modules, in eval mode, on the validation inputs."""
    st = ckpt.load_checkpoint(path, MPI.COMM_SELF, layer_indices=None)
    cfg = st["config"]["model"]
    opening = DenseOpening(4, WIDTH).double()
    closing = DenseClosing(WIDTH, data.num_classes).double()
    opening.load_state_dict(st["opening"])
    closing.load_state_dict(st["closing"])
    layers = []
    for n in range(N):
        F = Block(**cfg["step_kwargs"]).double()
        F.load_state_dict(st["layers"][n])
        layers.append(F)
    modules = torch.nn.ModuleList([opening, closing, *layers]).eval()
    h = cfg["T"] / N
    with torch.no_grad():
        u = opening(data.val.inputs)
        for F in layers:
            u = u + h * F(u)
        return closing(u), st, modules


def eval_outputs(path, out_dir, size):
    """Collective: the checkpoint evaluated in exact mode and model.eval()
    on the first ``size`` ranks of the session; the validation outputs (of
    the last of them) on every rank."""
    comm = WORLD.Split(0 if WORLD.rank < size else MPI.UNDEFINED, WORLD.rank)
    y = None
    if comm != MPI.COMM_NULL:
        config = ckpt.load_checkpoint(path, comm, layer_indices=[])["config"]
        config["mgrit"]["mode"] = "serial"
        config["run"].update(dir=os.path.join(out_dir, f"run{size}"), plot=False)
        trainer = Trainer(check(config), comm)
        trainer.resume(path)
        trainer.net.eval()
        with torch.no_grad():
            out = trainer.net(trainer.data.val.inputs if trainer.first else None)
        y = out if trainer.last else None
        trainer.close()
        comm.Free()
    return next(v for v in WORLD.allgather(y) if v is not None)


@pytest.mark.mpi
def test_user_block_trains_from_the_command_line_and_evaluates_on_any_ranks(tmp_path_factory):
    base = shared_dir(tmp_path_factory, "user")
    npz = os.path.join(base, "train.npz")
    on_rank0(write_data, npz)
    run = os.path.join(base, "run")
    r = command("train", "--run-dir", run, "-q",
                *sets(*USER, f'data.path="{npz}"', 'mgrit.mode="layer-parallel"',
                      "mgrit.max_levels=2", "mgrit.cfactor=2", "optim.epochs=2",
                      "optim.lr=0.02"))
    assert r.status == 0, r.text
    with open(os.path.join(run, "metrics.csv")) as fh:
        losses = [float(row["train_loss"]) for row in csv.DictReader(fh)]
    assert len(losses) == 2 and losses[-1] < losses[0]
    path = os.path.join(run, "checkpoint.h5")
    data = load_files(npz, dtype=torch.float64)
    expected, st, _ = serial_eval(path, data)

    # frozen parameters are those of the initialisation; trained ones moved
    cfg = resolve(None, [*USER, f'data.path="{npz}"'])
    init = build_network(cfg, (4,), data.num_classes, MPI.COMM_SELF)
    for n in range(N):
        for k, p in init.body.layer(n).named_parameters():
            assert torch.equal(st["layers"][n][k], p.detach()) != p.requires_grad, (n, k)

    outs = {size: eval_outputs(path, base, size) for size in (1, 2, 4) if size <= WORLD.size}
    assert outs[1].shape == (len(data.val), data.num_classes)
    for size, out in outs.items():
        assert torch.equal(outs[1], out), size
    assert torch.allclose(outs[1], expected, rtol=1e-14, atol=1e-14)


@pytest.mark.mpi
def test_bad_data_file_and_import_path_one_line_errors(tmp_path_factory):
    base = shared_dir(tmp_path_factory, "baddata")
    npz = os.path.join(base, "d.npz")
    on_rank0(lambda: np.savez(npz, x=np.zeros((10, 4)), labels=np.zeros(10, dtype=np.int64)))
    r = command("train", "--run-dir", os.path.join(base, "run"), "-q",
                *sets(*USER, f'data.path="{npz}"'))
    assert r.status != 0
    line = error_line(r)
    assert npz in line and "no array 'y'" in line and "labels" in line
    r = command("train", "--run-dir", os.path.join(base, "run"), "-q",
                *sets(*USER, f'data.path="{npz}"', 'data.labels="labels"',
                      'model.step="userblocks:Blok"'))
    assert r.status != 0
    line = error_line(r)
    assert "model.step" in line and "'Blok'" in line


def _shared_dir():
    d = tempfile.mkdtemp(prefix="lp-user-") if WORLD.rank == 0 else None
    return WORLD.bcast(d, root=0)


@pytest.mark.mpi
def test_resume_with_dropout_gives_the_uninterrupted_weights():
    # the forward-pass count that keys the dropout masks is checkpointed: a
    # run stopped after one epoch and resumed draws the masks it would have
    dirs = [_shared_dir() for _ in range(3)]
    try:
        npz = os.path.join(dirs[0], "train.npz")
        if WORLD.rank == 0:
            write_data(npz, n=80)
        WORLD.Barrier()
        base = [*USER, f'data.path="{npz}"', 'mgrit.mode="layer-parallel"',
                "mgrit.max_levels=2", "mgrit.cfactor=2", "model.nlayers=4",
                "run.checkpoint_every=3"]

        def config(run_dir, epochs):
            return resolve(None, base + [f"optim.epochs={epochs}", f'run.dir="{run_dir}"'])
        full = Trainer(config(dirs[1], 2), WORLD)
        full.run()
        Trainer(config(dirs[2], 1), WORLD).run()
        resumed = Trainer(config(dirs[2], 2), WORLD)
        assert resumed.resume() and resumed.epoch == 1
        resumed.run()
        assert resumed.body.passes == full.body.passes
        a = dict(full.net.named_parameters())
        for k, p in resumed.net.named_parameters():
            assert torch.equal(p, a[k]), k
    finally:
        WORLD.Barrier()
        if WORLD.rank == 0:
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)


@pytest.mark.mpi
def test_checkpoint_keeps_running_statistics():
    # batch-norm buffers are saved and resumed with the weights
    dirs = [_shared_dir() for _ in range(2)]
    try:
        npz = os.path.join(dirs[0], "train.npz")
        if WORLD.rank == 0:
            write_data(npz, n=60)
        WORLD.Barrier()
        config = resolve(None, [*USER, f'data.path="{npz}"', "model.nlayers=4",
                                'model.step="userblocks:NormBlock"',
                                f"model.step_kwargs={{width = {WIDTH}}}", "optim.epochs=1",
                                f'run.dir="{dirs[1]}"'])
        trained = Trainer(config, WORLD)
        trained.run()
        resumed = Trainer(config, WORLD)
        assert resumed.resume()
        saved = dict(trained.net.named_buffers())
        assert len(saved) == 3 * len(trained.body.layer_indices)
        for k, b in resumed.net.named_buffers():
            assert torch.equal(b, saved[k]), k
        assert all(int(b) == 2 for k, b in saved.items() if k.endswith("num_batches_tracked"))
    finally:
        WORLD.Barrier()
        if WORLD.rank == 0:
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
