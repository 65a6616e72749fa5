"""The training engine in-process: rank invariance of serial training,
checkpoint/resume (same and different rank counts), the residual monitor."""
import errno
import math
import os
import shutil
import tempfile

import pytest
import torch
from mpi4py import MPI

from layerpar.config import resolve
from layerpar.training import ResidualMonitor, Trainer

WORLD = MPI.COMM_WORLD


def small_config(run_dir, **sets):
    overrides = ['mgrit.mode="serial"', "model.nlayers=8", "model.width=4", "optim.epochs=2",
                 "data.batch_size=500", 'data.dtype="float64"', "run.plot=false",
                 f'run.dir="{run_dir}"']
    overrides += [f"{k}={v}" for k, v in sets.items()]
    return resolve(None, overrides)


def shared_dir(comm):
    d = tempfile.mkdtemp(prefix="lp-") if comm.Get_rank() == 0 else None
    return comm.bcast(d, root=0)


@pytest.fixture
def run_dirs():
    """make(shared=True): a new directory, the same one on every rank, or
    (shared=False) this rank's own; all removed after the test."""
    made = []

    def make(shared=True):
        d = shared_dir(WORLD) if shared else tempfile.mkdtemp(prefix="lp-own-")
        made.append((d, shared))
        return d

    yield make
    WORLD.Barrier()
    for d, shared in made:
        if not shared or WORLD.rank == 0:
            shutil.rmtree(d, ignore_errors=True)


def weights(trainer):
    """All parameters by global name, gathered on every rank."""
    mine = {k: v.detach().clone() for k, v in trainer.net.named_parameters()}
    out = {}
    for part in trainer.comm.allgather(mine):
        out.update(part)
    return out


def train(comm, run_dir, **sets):
    t = Trainer(small_config(run_dir, **sets), comm)
    t.run()
    return t


@pytest.mark.mpi
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_serial_mode_losses_independent_of_ranks(optimizer, run_dirs):
    sets = {"optim.name": f'"{optimizer}"', "optim.lr": 0.05}
    tw = train(WORLD, run_dirs(), **sets)
    ts = train(MPI.COMM_SELF, run_dirs(shared=False), **sets)
    rows_w = WORLD.bcast(tw.metrics.rows(), root=0)
    rows_s = ts.metrics.rows()
    assert len(rows_w) == len(rows_s) == 2
    for a, b in zip(rows_w, rows_s):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert math.isclose(a[key], b[key], rel_tol=1e-10, abs_tol=1e-14), key
    ww, ws = weights(tw), weights(ts)
    assert ww.keys() == ws.keys()
    for k in ww:
        assert torch.allclose(ww[k], ws[k], rtol=1e-10, atol=1e-13), k


PAPER_SETS = {"optim.name": '"lbfgs"', "optim.lr": 1.0, "optim.schedule": '"constant"',
              "model.bias": '"scalar"', "model.init_scale": 1e-3,
              "model.activation": '"smoothrelu"', "optim.tikhonov": 1e-7,
              "optim.tikhonov_ends": "true"}


@pytest.mark.mpi
@pytest.mark.parametrize("line_search", ["armijo", "strong-wolfe"])
def test_lbfgs_paper_setting_independent_of_ranks(line_search, run_dirs):
    sets = dict(PAPER_SETS, **{"optim.line_search": f'"{line_search}"', "optim.epochs": 3})
    fresh = Trainer(small_config(run_dirs(), **sets), WORLD)
    for k, v in weights(fresh).items():  # uniform in [0, 1e-3), a scalar bias per layer
        assert float(v.min()) >= 0 and float(v.max()) < 1e-3, k
        if k.startswith("body.") and k.endswith("bias"):
            assert v.shape == (1,), k
    tw = train(WORLD, run_dirs(), **sets)
    ts = train(MPI.COMM_SELF, run_dirs(shared=False), **sets)
    assert tw.optimizer.param_groups[0]["line_search"] == line_search
    rows_w = WORLD.bcast(tw.metrics.rows(), root=0)
    rows_s = ts.metrics.rows()
    assert len(rows_w) == len(rows_s) == 3
    for a, b in zip(rows_w, rows_s):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert math.isclose(a[key], b[key], rel_tol=1e-10, abs_tol=1e-14), key
    assert rows_w[-1]["train_loss"] < rows_w[0]["train_loss"]
    ww, ws = weights(tw), weights(ts)
    for k in ww:
        assert torch.allclose(ww[k], ws[k], rtol=1e-10, atol=1e-13), k


@pytest.mark.mpi
@pytest.mark.max_ranks(2, invariance="test_resume_on_another_number_of_ranks")
@pytest.mark.parametrize("mode", ["serial", "layer-parallel"])
def test_resume_gives_the_uninterrupted_weights(mode, run_dirs):
    sets = {"mgrit.mode": f'"{mode}"', "optim.epochs": 3, "run.checkpoint_every": 7}
    part_dir = run_dirs()
    full = train(WORLD, run_dirs(), **sets)
    # stop after the first epoch, then resume in a new trainer
    train(WORLD, part_dir, **dict(sets, **{"optim.epochs": 1}))
    resumed = Trainer(small_config(part_dir, **sets), WORLD)
    assert resumed.resume()
    assert resumed.epoch == 1
    resumed.run()
    wf, wr = weights(full), weights(resumed)
    for k in wf:
        assert torch.equal(wf[k], wr[k]), k  # bit for bit on the same ranks
    rows_f = WORLD.bcast(full.metrics.rows(), root=0)
    rows_r = WORLD.bcast(resumed.metrics.rows(), root=0)
    assert [r["val_loss"] for r in rows_f] == [r["val_loss"] for r in rows_r]


@pytest.mark.mpi
def test_resume_on_another_number_of_ranks(run_dirs):
    # checkpoint written by COMM_WORLD, resumed on one rank (each rank resumes
    # its own copy): equal to the uninterrupted run to round-off
    sets = {"optim.epochs": 2, "optim.name": '"sgd"', "optim.lr": 0.05}
    part_dir, own = run_dirs(), run_dirs(shared=False)
    full = train(WORLD, run_dirs(), **sets)
    train(WORLD, part_dir, **dict(sets, **{"optim.epochs": 1}))
    WORLD.Barrier()
    shutil.copy(f"{part_dir}/checkpoint.h5", f"{own}/checkpoint.h5")
    shutil.copytree(f"{part_dir}/checkpoint.parts", f"{own}/checkpoint.parts")  # its parts
    single = Trainer(small_config(own, **sets), MPI.COMM_SELF)
    assert single.resume()
    single.run()
    wf, ws = weights(full), weights(single)
    for k in wf:
        assert torch.allclose(wf[k], ws[k], rtol=1e-12, atol=1e-14), k


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["serial", "layer-parallel"])
def test_bfloat16_run_keeps_float32_master_weights_and_resumes_on_one_rank(mode, run_dirs):
    # bfloat16 weights stepped through float32 copies (optim.master_weights,
    # the default); the copies and Adam's float32 moments are in the
    # checkpoint: a run resumed on one rank ends bit for bit where the
    # uninterrupted one on every rank does
    sets = {"mgrit.mode": f'"{mode}"', "data.dtype": '"bfloat16"', "optim.name": '"adam"',
            "optim.epochs": 2}
    part_dir, own = run_dirs(), run_dirs(shared=False)
    full = train(WORLD, run_dirs(), **sets)
    for p in full.net.parameters():
        st = full.optimizer.state[p]
        assert p.dtype == torch.bfloat16 and st["master"].dtype == torch.float32
        assert st["exp_avg"].dtype == torch.float32
        assert torch.equal(st["master"].to(torch.bfloat16), p.detach())
    train(WORLD, part_dir, **dict(sets, **{"optim.epochs": 1}))
    WORLD.Barrier()
    shutil.copy(f"{part_dir}/checkpoint.h5", f"{own}/checkpoint.h5")
    shutil.copytree(f"{part_dir}/checkpoint.parts", f"{own}/checkpoint.parts")
    single = Trainer(small_config(own, **sets), MPI.COMM_SELF)
    assert single.resume()
    single.run()
    wf, ws = weights(full), weights(single)
    assert all(torch.equal(wf[k], ws[k]) for k in wf)
    # not vacuous: without the copies the same run ends elsewhere
    plain = train(WORLD, run_dirs(), **dict(sets, **{"optim.master_weights": "false"}))
    wp = weights(plain)
    assert any(not torch.equal(wf[k], wp[k]) for k in wf)


def outcome_everywhere(fn):
    """fn() on every rank; [(exception type name, errno or message) or None]
    of every rank, gathered after each rank has finished."""
    try:
        fn()
        mine = None
    except OSError as e:
        mine = (type(e).__name__, e.errno)
    except Exception as e:  # noqa: BLE001 - compared below, on every rank
        mine = (type(e).__name__, str(e))
    return WORLD.allgather(mine)


@pytest.mark.mpi
@pytest.mark.parametrize("error,seen", [
    (ValueError("metrics row refused"), ("ValueError", "metrics row refused")),
    (OSError(errno.ENOSPC, "No space left on device", "metrics.h5"), ("OSError", errno.ENOSPC))])
def test_a_failed_metrics_write_on_rank_0_is_raised_on_every_rank(error, seen, run_dirs):
    # rank 0 writes the metrics files; whatever fails there is raised on
    # every rank, an OSError with its errno (the other ranks used to wait
    # for rank 0 when it was anything but an OSError).  The run's timeout
    # goes on a communicator of the test's own.
    comm = WORLD.Dup()
    t = Trainer(small_config(run_dirs(), **{"optim.epochs": 1, "run.timeout": 30}), comm)
    if WORLD.rank == 0:
        def refuse(row):
            raise error
        t.metrics.append = refuse
    assert outcome_everywhere(t.run) == [seen] * WORLD.size
    t.close()
    comm.Free()


@pytest.mark.mpi
def test_a_failed_move_of_a_damaged_checkpoint_is_raised_on_every_rank(run_dirs, monkeypatch):
    # resuming from a damaged checkpoint moves it aside on rank 0 and takes
    # the previous one; a refused rename there is raised on every rank, the
    # same PermissionError with its errno (the other ranks used to wait)
    run, comm = run_dirs(), WORLD.Dup()  # the run's timeout on a communicator of our own
    sets = {"optim.epochs": 2, "run.timeout": 30}
    train(comm, run, **sets).close()  # two epochs: checkpoint.h5 and checkpoint.prev.h5
    if WORLD.rank == 0:
        with open(os.path.join(run, "checkpoint.h5"), "r+b") as fh:
            fh.truncate(100)
    WORLD.Barrier()
    t = Trainer(small_config(run, **sets), comm)
    if WORLD.rank == 0:
        def refuse(src, dst):
            raise PermissionError(errno.EACCES, "Permission denied", src)
        monkeypatch.setattr(os, "replace", refuse)
    seen = outcome_everywhere(t.resume)
    monkeypatch.undo()
    assert seen == [("PermissionError", errno.EACCES)] * WORLD.size
    # without the refusal the previous checkpoint is taken
    assert t.resume() and t.epoch == 1
    t.close()
    comm.Free()


class _Body:
    def __init__(self):
        self.last_forward = {"residual_norms": []}
        self.last_backward = {"residual_norms": []}
        self.calls = []

    def reconfigure(self, **kw):
        self.calls.append(kw)


def test_residual_monitor_raises_iterations_then_falls_back():
    body = _Body()
    mon = ResidualMonitor(0.5, 2, 3, 1, 1)
    good, bad = [1.0, 0.1], [1.0, 0.9]
    body.last_forward["residual_norms"], body.last_backward["residual_norms"] = good, good
    assert mon.update(body) is None and mon.update(body) is None
    body.last_forward["residual_norms"] = bad
    assert mon.update(body) is None          # one stall: patience 2
    assert "fwd_iters -> 2" in mon.update(body)
    assert body.calls[-1] == {"fwd_iters": 2}
    for _ in range(2):
        mon.update(body)
    assert mon.iters["fwd"] == 3 and not mon.serial
    mon.update(body), mon.update(body)
    assert mon.serial and body.calls[-1] == {"max_levels": 1}
    assert mon.update(body) is None  # nothing more to do
    assert ResidualMonitor.rate([1.0, float("nan")]) == math.inf
    assert ResidualMonitor.rate([0.0, 0.0]) == 0.0
    assert ResidualMonitor.rate([1.0, 0.25, 0.0625]) == pytest.approx(0.25)


def test_residual_monitor_escalates_after_failed_line_search():
    body = _Body()
    mon = ResidualMonitor(0.5, 3, 3, 1, 2)
    assert "2 forward, 3 adjoint" in mon.escalate(body, "no decrease")
    assert body.calls[-1] == {"fwd_iters": 2, "bwd_iters": 3}
    assert "serial" in mon.escalate(body, "no decrease")
    assert body.calls[-1] == {"max_levels": 1} and mon.serial
    assert mon.escalate(body, "no decrease") is None
