"""Reuse of evaluations (``multilevel.reuse``): a kept evaluation is returned
only at the same weights, batch and linear term, equals a fresh solve
(serial autograd), and MG/OPT with reuse follows the run without it to
round-off with less work."""
import math
import shutil
import tempfile

import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar.config import resolve
from layerpar.training import Trainer

WORLD = MPI.COMM_WORLD


def config(run_dir, **sets):
    overrides = ['mgrit.mode="serial"', "model.nlayers=8", "model.width=4", "optim.epochs=3",
                 "data.batch_size=5000", 'data.dtype="float64"', "run.plot=false",
                 'optim.schedule="constant"', 'multilevel.method="mgopt"', 'optim.name="sgd"',
                 "optim.lr=0.5", "optim.momentum=0.0", f'run.dir="{run_dir}"']
    return resolve(None, overrides + [f"{k}={v}" for k, v in sets.items()])


@pytest.fixture
def run_dir():
    d = WORLD.bcast(tempfile.mkdtemp(prefix="lp-reuse-") if WORLD.rank == 0 else None, root=0)
    yield d
    WORLD.Barrier()
    if WORLD.rank == 0:
        shutil.rmtree(d, ignore_errors=True)


def gathered(level, what):
    """{name: tensor} of every rank's parameters (what="data") or gradients."""
    mine = {}
    for name, p in level.net.named_parameters():
        t = p.detach() if what == "data" else p.grad
        mine[name] = torch.zeros_like(p) if t is None else t.detach().clone()
    out = {}
    for part in level.comm.allgather(mine):
        out.update(part)
    return out


def autograd_gradient(level, x, y):
    """The gradient by plain autograd through the gathered serial network,
    keyed by the residual layer's global index or the end's parameter name."""
    seq = level.net.serial_equivalent()
    names = list(seq.named_parameters())
    grads = torch.autograd.grad(Fn.cross_entropy(seq(x), y), [p for _, p in names])
    return {name: g for (name, _), g in zip(names, grads)}


def assert_matches_autograd(level, x, y):
    """The gradient in .grad (all ranks) equals serial autograd's to 1e-12."""
    mine = gathered(level, "grad")
    want = sorted(autograd_gradient(level, x, y).values(), key=lambda t: (t.shape, t.sum()))
    got = sorted(mine.values(), key=lambda t: (t.shape, t.sum()))
    assert len(got) == len(want)
    worst = max(float((g - w).abs().max()) for g, w in zip(got, want))
    assert worst < 1e-12, worst


def the_batch(trainer):
    x, y = next(iter(trainer.train_loader.epoch(0)))
    return x, y, trainer.train_loader.batch_size


@pytest.mark.mpi
def test_kept_evaluation_is_a_fresh_solve(run_dir):
    ml = Trainer(config(run_dir, **{"multilevel.reuse": "true"}), WORLD)
    fine = ml.levels[0]
    assert fine.reusing
    x, y, size = the_batch(ml)
    comm = fine.comm
    xa, ya = comm.bcast(x, root=0), comm.bcast(y, root=comm.Get_size() - 1)
    f1 = fine.loss_and_grad(x, y, size)
    w1 = fine.work_totals()
    assert w1 == {"fwd": 8, "bwd": 8}
    assert_matches_autograd(fine, xa, ya)
    g1 = gathered(fine, "grad")
    # the same weights and batch: the kept evaluation, no solve
    fine.optimizer.zero_grad()
    assert fine.loss_and_grad(x, y, size) == f1 and fine.loss(x, y, size) == f1
    assert fine.work_totals() == w1
    g2 = gathered(fine, "grad")
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    # one weight changed on the last rank only: every rank solves again
    last = comm.rank == comm.Get_size() - 1
    if last:
        w = next(fine.body.layer(max(fine.body.layer_indices)).parameters()).view(-1)
        before = w[0].clone()
        with torch.no_grad():
            w[0] += 1e-3
    f3 = fine.loss_and_grad(x, y, size)
    assert fine.work_totals() == {"fwd": 16, "bwd": 16} and f3 != f1
    assert_matches_autograd(fine, xa, ya)
    # the two last evaluations are kept: back at the first weights, no solve
    if last:
        with torch.no_grad():
            w[0] = before
    assert fine.loss_and_grad(x, y, size) == f1
    assert fine.work_totals() == {"fwd": 16, "bwd": 16}
    assert_matches_autograd(fine, xa, ya)
    # another batch (labels changed on the last rank), or a linear term: a solve
    y2 = None if y is None else (y + 1) % 5
    fine.loss_and_grad(x, y2, size)
    assert fine.work_totals() == {"fwd": 24, "bwd": 24}
    fine.set_linear_term({p: torch.ones_like(p) for p in fine.net.parameters()})
    fine.loss_and_grad(x, y2, size)
    assert fine.work_totals() == {"fwd": 32, "bwd": 32}
    ml.close()


@pytest.mark.mpi
def test_no_reuse_where_inexact(run_dir):
    # one-shot solves start from the previous ones' states: a new
    # evaluation at the same weights differs, so nothing is reused
    ml = Trainer(config(run_dir, **{"multilevel.reuse": "true",
                                              "mgrit.mode": '"one-shot"'}), WORLD)
    assert not any(lev.reusing for lev in ml.levels)
    x, y, size = the_batch(ml)
    ml.levels[0].loss_and_grad(x, y, size)
    ml.levels[0].loss_and_grad(x, y, size)
    assert ml.levels[0].work_totals()["bwd"] > 0 and ml.levels[0]._memo == []
    ml.close()


CASES = [{"multilevel.pre_steps": 0, "multilevel.post_steps": 1},
         {"multilevel.pre_steps": 1, "multilevel.post_steps": 1, "multilevel.levels": 3,
          "model.nlayers": 16},
         {"multilevel.pre_steps": 0, "multilevel.post_steps": 0, "multilevel.coarse_steps": 4},
         {"optim.name": '"lbfgs"', "optim.lr": 1.0, "multilevel.post_steps": 2},
         {"optim.name": '"adam"', "optim.lr": 0.01, "data.batch_size": 1000}]


@pytest.mark.mpi
@pytest.mark.parametrize("sets", CASES)
def test_reuse_changes_the_work_not_the_run(sets, run_dir):
    runs = {}
    for reuse in (False, True):
        cfg = config(f"{run_dir}/{reuse}", **dict(sets, **{"multilevel.reuse": str(reuse).lower()}))
        ml = Trainer(cfg, WORLD)
        ml.run()
        rows = WORLD.bcast(ml.metrics.rows(), root=0)
        runs[reuse] = (rows, gathered(ml.level, "data"))
        ml.close()
    (rows0, w0), (rows1, w1) = runs[False], runs[True]
    assert len(rows0) == len(rows1) == 3
    for a, b in zip(rows0, rows1):
        for key in ("train_loss", "val_loss", "val_acc", "accepted"):
            assert math.isclose(a[key], b[key], rel_tol=1e-12, abs_tol=1e-12), (key, a, b)
        # no more forward work on any level (an adjoint solve of a first
        # trial that is not accepted as it stands is spent in vain)
        for key in a:
            if key.startswith("fwd_work"):
                assert b[key] <= a[key], (key, a[key], b[key])
    for k in w0:
        assert torch.allclose(w0[k], w1[k], rtol=0, atol=1e-12), k
    work = [r[-1]["fwd_work"] + r[-1]["bwd_work"] for r in (rows0, rows1)]
    assert work[1] < work[0], work
