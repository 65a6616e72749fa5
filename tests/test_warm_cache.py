"""One-shot (warm-started) solves keep their warm states across passes with
other options or another batch size: LayerParallel keeps a bounded cache of
solver pairs, so an exact evaluation pass between two training passes leaves
the training solves exactly as without it.  Runs on 1, 2 and 4 ranks."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar import DenseClosing, DenseOpening, DenseStep, Network

from conftest import gathered

F64 = torch.float64
WORLD = MPI.COMM_WORLD


def dense_net(**opts):
    opts = dict(dict(max_levels=2, cfactor=2, fwd_iters=1, bwd_iters=1, warm_start=True), **opts)
    return Network(lambda: DenseOpening(2, 4), lambda n: DenseStep(4, "tanh"),
                   lambda: DenseClosing(4, 3), nlayers=8, T=4.0, comm=WORLD, seed=5,
                   **opts).double()


def batch(size, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 2, generator=g, dtype=F64),
            torch.randint(0, 3, (size,), generator=g))


def train_pass(net, x, y):
    """A training pass (forward and adjoint solve, gradients) and one plain
    gradient step; the solves' histories and the loss."""
    net.zero_grad()
    loss = net.loss(x, y, Fn.cross_entropy)
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.5 * p.grad
    body = net.body
    return (list(body.last_forward["residual_norms"]),
            list(body.last_backward["residual_norms"]), net.reduce(loss))


def exact_eval(net, x):
    """What a validation pass does: exact network, another batch size, no
    autograd; then back to the training options."""
    levels = (net.body.fwd_options["max_levels"], net.body.bwd_options["max_levels"])
    net.body.reconfigure(max_levels=1)
    net.eval()
    with torch.no_grad():
        out = net(x)
    net.train()
    net.body.reconfigure(max_levels=levels[0], bwd_max_levels=levels[1])
    return out


def run(interleave, **opts):
    x1, y1 = batch(6, 1)
    x2, y2 = batch(6, 2)
    xv, _ = batch(5, 3)
    with dense_net(**opts) as net:
        histories = [train_pass(net, x1, y1)]
        if interleave:
            exact_eval(net, xv)
            exact_eval(net, xv[:3])  # a smaller last batch: a third shape
        histories.append(train_pass(net, x2, y2))
        histories.append(train_pass(net, x1, y1))
        return histories


@pytest.mark.mpi
def test_exact_evaluation_of_other_batch_sizes_keeps_warm_states():
    plain = run(False)
    mixed = run(True)
    assert mixed == plain  # residual histories and losses, bit for bit
    # the comparison is not vacuous: a cold start gives other histories
    cold = run(False, warm_start=False)
    assert cold[1][0] != plain[1][0]


@pytest.mark.mpi
def test_exact_evaluation_matches_serial_network():
    xv, _ = batch(5, 3)
    with dense_net() as net:
        train_pass(net, *batch(6, 1))
        out = exact_eval(net, xv)
        seq = net.serial_equivalent()
        if net.is_last:
            with torch.no_grad():
                ref = seq.eval()(xv)
            assert torch.allclose(out, ref, rtol=0, atol=1e-12)


@pytest.mark.mpi
def test_cache_is_bounded_and_closed():
    x, y = batch(6, 1)
    with dense_net(solver_cache=2) as net:
        body = net.body
        train_pass(net, x, y)
        for size in (2, 3, 4):
            with torch.no_grad():
                net(batch(size, 9)[0])
            assert len(body.solvers.cached()) <= 1  # the pair in use and one more
        kept = body.solvers.cached() + [(body.solvers.fwd, body.solvers.bwd)]
    assert all(s.closed for pair in kept for s in pair)


def test_bad_solver_cache_is_refused():
    with pytest.raises(ValueError, match="solver_cache"):
        dense_net(solver_cache=0)


def _one_shot_trainer(run_dir):
    from layerpar.config import resolve
    from layerpar.training import Trainer
    # FCF without the skipped down-cycle: every solve's history starts at r_0
    sets = ['mgrit.mode="one-shot"', "mgrit.max_levels=2", "mgrit.cfactor=2", "model.nlayers=8",
            'mgrit.relax="FCF"', "mgrit.skip=false", "model.width=4", "data.batch_size=50", 'data.dtype="float64"', "run.plot=false",
            f'run.dir="{run_dir}"']
    return Trainer(resolve(None, sets), WORLD, metrics=False)


@pytest.mark.mpi
def test_training_validation_pass_keeps_one_shot_warm(tmp_path):
    # Level.evaluate (the exact network on the validation batches) between two
    # training steps: the second step's solves are those without it
    run_dir = WORLD.bcast(str(tmp_path), root=0)
    runs = []
    for validate in (False, True):
        tr = _one_shot_trainer(run_dir)
        batches = list(tr.train_loader.epoch(0))[:3]
        history = []
        for i, (x, y) in enumerate(batches):
            stats = tr.level.step(x, y, 50)
            history.append((stats["loss"], list(tr.body.last_forward["residual_norms"]),
                            list(tr.body.last_backward["residual_norms"])))
            if validate and i == 0:
                tr.level.evaluate(tr.val_loader)
        runs.append(history)
        tr.level.close()
    assert runs[0] == runs[1]
    assert all(len(h[1]) == 2 for h in runs[0])  # one iteration: r_0, r_1


@pytest.mark.mpi
def test_saved_warm_states_restore_the_solves_bit_for_bit():
    # a network's solver states and weights, installed in a new network on
    # the same ranks: its next training passes are the first one's
    x1, y1 = batch(6, 1)
    x2, y2 = batch(6, 2)
    xv, _ = batch(5, 3)
    with dense_net() as a, dense_net() as b, dense_net() as cold:
        train_pass(a, x1, y1)
        exact_eval(a, xv)
        train_pass(a, x2, y2)
        states = a.body.warm_states()
        assert [s[0][0] for s in states] == [(5, 4), (6, 4)]  # eval pair, training pair
        b.load_state_dict(a.state_dict())
        b.body.load_warm_states(states)
        cold.load_state_dict(a.state_dict())
        expected = [train_pass(a, x1, y1), train_pass(a, x2, y2)]
        assert [train_pass(b, x1, y1), train_pass(b, x2, y2)] == expected
        assert train_pass(cold, x1, y1)[0] != expected[0][0]  # not vacuous: cold differs
        with pytest.raises(ValueError, match="index=-1"):
            b.body.solvers.fwd.set(-1, x1)


def _shared_dir():
    import tempfile
    return WORLD.bcast(tempfile.mkdtemp(prefix="lp-warm-") if WORLD.rank == 0 else None, root=0)


def _one_shot_run(run_dir, stop_after=None, resume=False, epochs=2, data=1, cold=False):
    from layerpar.config import resolve
    from layerpar.training import Trainer
    # one iteration per solve throughout (no monitor): far from exact, so a
    # cold start after the resume would show
    sets = ['mgrit.mode="one-shot"', "mgrit.max_levels=2", "mgrit.cfactor=2", "model.nlayers=16",
            "mgrit.monitor=false", "model.width=4", "data.batch_size=100",
            'data.dtype="float64"', "run.plot=false", f"optim.epochs={epochs}",
            f'run.dir="{run_dir}"', f"parallel.data={data}"]
    steps = [0]

    def should_stop():
        steps[0] += 1
        return stop_after is not None and steps[0] >= stop_after

    tr = Trainer(resolve(None, sets), WORLD, should_stop=should_stop)
    if resume:
        assert tr.resume()
    if cold:
        tr.body.load_warm_states([])  # the solves of the resumed run start cold
    tr.run()
    out = gathered(WORLD, tr.net.named_parameters())
    rows = WORLD.bcast(tr.metrics.rows(), root=0)
    tr.close()
    return out, [(r["train_loss"], r["val_loss"]) for r in rows]


@pytest.mark.mpi
# bit for bit on the same ranks (each group's warm states on 4 ranks: the grid test)
@pytest.mark.max_ranks(
    2, invariance="test_resumed_one_shot_run_on_a_grid_equals_the_uninterrupted_one")
@pytest.mark.parametrize("stop", ["mid-epoch", "epoch-end"])
def test_resumed_one_shot_run_equals_the_uninterrupted_one(stop):
    full = _one_shot_run(_shared_dir())
    part = _shared_dir()
    if stop == "mid-epoch":
        _one_shot_run(part, stop_after=17)
    else:
        _one_shot_run(part, epochs=1)
    resumed = _one_shot_run(part, resume=True)
    for k in full[0]:
        assert torch.equal(full[0][k], resumed[0][k]), k  # bit for bit on the same ranks
    assert full[1] == resumed[1]


@pytest.mark.mpi
@pytest.mark.parametrize("data", [2])
def test_resumed_one_shot_run_on_a_grid_equals_the_uninterrupted_one(data):
    # D groups of P/D ranks (2 x 1 on 2 ranks, 2 x 2 on 4): each group's warm states (those of its share of
    # the batches) are in the checkpoint and restored in the same group
    P = WORLD.Get_size()
    if P % data:
        pytest.skip(f"a grid of {data} groups needs a multiple of {data} ranks")
    full = _one_shot_run(_shared_dir(), epochs=1, data=data)
    part = _shared_dir()
    _one_shot_run(part, stop_after=4, epochs=1, data=data)
    copy = os.path.join(_shared_dir(), "run")
    if WORLD.rank == 0:
        shutil.copytree(part, copy)
    WORLD.Barrier()
    resumed = _one_shot_run(part, resume=True, epochs=1, data=data)
    for k in full[0]:
        assert torch.allclose(full[0][k], resumed[0][k], rtol=0, atol=1e-12), k
    assert sum(full[1], ()) == pytest.approx(sum(resumed[1], ()), rel=1e-12)
    # not vacuous: a resume that starts the solves cold ends elsewhere
    cold = _one_shot_run(copy, resume=True, epochs=1, data=data, cold=True)
    assert any(not torch.allclose(full[0][k], cold[0][k], rtol=0, atol=1e-8) for k in full[0])


@pytest.mark.mpi
def test_more_iterations_keep_the_warm_states():
    # the first residual of a solve depends on its initial guess only: after
    # a change of the iteration count (what the residual monitor does) it is
    # the one the solve would have had with the old count, not a cold one's
    x1, y1 = batch(6, 1)
    x2, y2 = batch(6, 2)
    firsts = []
    for change in (False, True, "cold"):
        with dense_net(warm_start=change != "cold") as net:
            train_pass(net, x1, y1)
            if change:
                net.body.reconfigure(fwd_iters=2, bwd_iters=2)
            fwd, bwd, _ = train_pass(net, x2, y2)
            firsts.append(fwd[0])  # (the adjoint's depends on the forward's iterations)
            if change is True:
                assert len(fwd) == 3 and len(bwd) == 3
    assert firsts[1] == firsts[0]
    assert firsts[2] != firsts[0]
