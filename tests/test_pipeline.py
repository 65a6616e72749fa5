"""The exact pipeline (max_levels=1: exact mode; one micro-batch, the
default, or several) against the serial PyTorch network with the same weights: outputs, input and weight gradients
(float64, to 1e-12: only the order of the micro-batches' weight-gradient sums
differs), training, failures and option checks.  MPI tests run on
COMM_WORLD (1, 2 and 4 ranks)."""
import math
import shutil
import tempfile

import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar import (ConvClosing, ConvOpening, ConvStep, DenseClosing, DenseOpening,
                      DenseStep, LayerParallel, Network)
from layerpar.config import resolve
from hypothesis import given, settings

from conftest import network_name
from hypothesis import strategies as st

from layerpar.engine.pipeline import (SCHEDULES, Action, PipelineFailure, check_schedule,
                                     gpipe_step, one_f_one_b, register_schedule)
from layerpar.training import Trainer

F64 = torch.float64
WORLD = MPI.COMM_WORLD
TOL = 1e-12


def make_net(kind, comm=WORLD, **opts):
    if kind == "dense":
        return Network(lambda: DenseOpening(2, 5), lambda n: DenseStep(5, "tanh"),
                       lambda: DenseClosing(5, 3), nlayers=12, T=2.0, comm=comm, seed=7,
                       **opts).double()
    return Network(lambda: ConvOpening(1, 3), lambda n: ConvStep(3, 3, "relu"),
                   lambda: ConvClosing(3, 4, pool=2), nlayers=8, T=1.0, comm=comm, seed=3,
                   **opts).double()


def batch(kind, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "dense":
        return torch.randn(size, 2, generator=g, dtype=F64), torch.randint(0, 3, (size,), generator=g)
    return torch.randn(size, 1, 6, 6, generator=g, dtype=F64), torch.randint(0, 4, (size,), generator=g)


def rel_err(a, b):
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-300))


@pytest.mark.mpi
@pytest.mark.parametrize("microbatches", [1, 2, 3, 8])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_pipeline_equals_serial_autograd(kind, microbatches):
    net = make_net(kind, microbatches=microbatches)
    assert net.body.pipelined  # one level: the exact pipeline, with any micro-batch count
    x, y = batch(kind, 10)  # 10 = 4+3+3 with 3 micro-batches, 2+2+1+1+1+1+1+1 with 8
    logits = net(x)
    loss = Fn.cross_entropy(logits, y) if net.is_last else logits.sum() * 0.0
    loss.backward()
    grads = {k: p.grad for k, p in net.named_parameters()}
    grads = {k: v for part in WORLD.allgather(grads) for k, v in part.items()}
    out = WORLD.bcast(logits.detach() if net.is_last else None, root=net.body.last_rank)

    seq = net.serial_equivalent()
    ref = seq(x)
    Fn.cross_entropy(ref, y).backward()
    assert rel_err(out, ref.detach()) <= TOL
    n = 8 if kind == "conv" else 12
    sgrads = {network_name(k, n): p.grad for k, p in seq.named_parameters()}
    assert grads.keys() == sgrads.keys()
    worst = max(rel_err(grads[k], sgrads[k]) for k in grads)
    assert worst <= TOL, worst


@pytest.mark.mpi
@pytest.mark.parametrize("size,microbatches", [(10, 3), (10, 8), (3, 8), (1, 2)])
def test_input_gradient_of_the_body(size, microbatches):
    """LayerParallel alone: dloss/du_0 on the first rank and the layers'
    gradients against the serial layers, also when the batch has fewer
    samples than micro-batches."""
    body = LayerParallel(lambda n: DenseStep(4, "tanh"), 9, 1.5, WORLD, seed=2,
                         microbatches=microbatches).double()
    g = torch.Generator().manual_seed(1)
    u0 = torch.randn(size, 4, generator=g, dtype=F64)
    w = torch.randn(size, 4, generator=g, dtype=F64)
    x = u0.clone().requires_grad_(True)
    uN = body(x if body.rank == 0 else None)
    loss = (torch.tanh(uN) * w).sum() if body.rank == body.last_rank else uN.sum() * 0.0
    loss.backward()
    grads = {n: [p.grad for p in body.layer(n).parameters()] for n in body.layer_indices}
    grads = {n: v for part in WORLD.allgather(grads) for n, v in part.items()}
    gx = WORLD.bcast(x.grad if body.rank == 0 else None, root=0)

    seq = body.serial_equivalent()
    xs = u0.clone().requires_grad_(True)
    (torch.tanh(seq(xs)) * w).sum().backward()
    assert rel_err(gx, xs.grad) <= TOL
    for n, layer in enumerate(seq):
        for a, b in zip(grads[n], layer.F.parameters()):
            assert rel_err(a, b.grad) <= TOL


@pytest.mark.mpi
def test_sgd_steps_give_the_serial_losses():
    """A few SGD steps with 3 micro-batches (uneven: batch 8) give the losses
    of the serial network trained alike, so the same on any rank count."""
    net = make_net("dense", microbatches=3)
    seq = net.serial_equivalent()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    sopt = torch.optim.SGD(seq.parameters(), lr=0.2)
    for step in range(4):
        x, y = batch("dense", 8, seed=step)
        opt.zero_grad()
        loss = net.loss(x, y, Fn.cross_entropy)
        loss.backward()
        opt.step()
        sopt.zero_grad()
        sloss = Fn.cross_entropy(seq(x), y)
        sloss.backward()
        sopt.step()
        value = net.reduce(loss)
        assert abs(value - float(sloss.detach())) <= TOL * abs(float(sloss.detach()))


@pytest.mark.mpi
def test_evaluation_without_autograd_and_two_forwards():
    net = make_net("conv", microbatches=4)
    x, y = batch("conv", 7)
    with torch.no_grad():
        out = net(x)
    l1 = net.loss(x, y, Fn.cross_entropy)
    l2 = net.loss(x, y, Fn.cross_entropy)
    (l1 + l2).backward()   # two forwards, one backward through both
    grads = {k: p.grad for k, p in net.named_parameters()}
    grads = {k: v for part in WORLD.allgather(grads) for k, v in part.items()}
    seq = net.serial_equivalent()
    ref = seq(x)
    if net.is_last:
        assert rel_err(out, ref.detach()) <= TOL
    (2 * Fn.cross_entropy(ref, y)).backward()
    for k, p in seq.named_parameters():
        assert rel_err(grads[network_name(k, 8)], p.grad) <= TOL


@pytest.mark.mpi
@pytest.mark.parametrize("microbatches", [1, 3, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_later_passes_leave_the_saved_inputs_of_earlier_ones(schedule, microbatches):
    """Two pipelined forward passes of different inputs, then one backward
    through both: the second pass's micro-batches arrive in the message
    buffers of the first's, whose block inputs autograd saved, and must not
    overwrite them.  Then two steps of ``loss_and_backward`` (1F1B: a
    buffer serves several micro-batches of one pass) accumulating.  Batch
    10: 4+3+3 with 3 micro-batches, 3+3+2+2 with 4.  Gradients against
    serial autograd (float64, 1e-12)."""
    net = make_net("dense", microbatches=microbatches, schedule=schedule)
    (a, ya), (b, yb) = batch("dense", 10, seed=1), batch("dense", 10, seed=2)
    w = torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    out_a, out_b = net(a), net(b)
    if net.is_last:
        loss = (out_a * w).sum() + Fn.cross_entropy(out_b, yb)
    else:
        loss = (out_a.sum() + out_b.sum()) * 0.0
    loss.backward()
    grads = gathered_grads(net)
    seq = net.serial_equivalent()
    ((seq(a) * w).sum() + Fn.cross_entropy(seq(b), yb)).backward()
    sgrads = {network_name(k, 12): p.grad.clone() for k, p in seq.named_parameters()}
    assert grads.keys() == sgrads.keys()
    worst = max(rel_err(grads[k], sgrads[k]) for k in grads)
    assert worst <= TOL, worst

    net.zero_grad()
    seq.zero_grad()
    for x, y in ((a, ya), (b, yb)):
        net.loss_and_backward(x, y, Fn.cross_entropy)
        Fn.cross_entropy(seq(x), y).backward()
    grads = gathered_grads(net)
    sgrads = {network_name(k, 12): p.grad for k, p in seq.named_parameters()}
    worst = max(rel_err(grads[k], sgrads[k]) for k in grads)
    assert worst <= TOL, worst
    net.close()


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4", None])
def test_bad_microbatches_raise_naming_the_argument(bad):
    with pytest.raises(ValueError, match="microbatches"):
        make_net("dense", comm=MPI.COMM_SELF, microbatches=bad)


class Failing(torch.nn.Module):
    """A residual step that raises, or returns NaN, on one layer."""

    def __init__(self, n, bad, how):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()
        self.fail = n == bad
        self.how = how

    def forward(self, u):
        if self.fail and u.shape[0] < 6:   # only on micro-batches, not the shape probe
            if self.how == "raise":
                raise RuntimeError("step failed")
            return u * float("nan")
        return torch.tanh(self.lin(u))


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["raise", "nan"])
def test_a_failing_layer_raises_on_every_rank(how):
    bad = 5
    body = LayerParallel(lambda n: Failing(n, bad, how), 8, 1.0, WORLD, microbatches=3)
    u0 = torch.ones(6, 3, dtype=F64)
    expected = (RuntimeError if how == "raise" else FloatingPointError)
    with pytest.raises(expected) as info:
        body(u0 if body.rank == 0 else None)
    if how == "nan":
        assert f"layer {bad}" in str(info.value)
    elif bad not in body.layer_indices:
        assert isinstance(info.value, PipelineFailure)
    # the communicator is usable afterwards: no message is left pending
    assert WORLD.allreduce(1) == WORLD.size


@pytest.mark.mpi
def test_serial_mode_with_microbatches_trains_like_one_rank():
    """The command's serial mode with mgrit.microbatches = 3 (the pipeline
    on 2 and 4 ranks) gives the metrics of plain serial training on one rank."""
    def config(run_dir, microbatches):
        return resolve(None, ['mgrit.mode="serial"', "model.nlayers=8", "model.width=4",
                              "optim.epochs=2", "data.batch_size=250", 'data.dtype="float64"',
                              "run.plot=false", f'run.dir="{run_dir}"',
                              f"mgrit.microbatches={microbatches}", 'optim.name="sgd"',
                              "optim.lr=0.05"])
    shared = WORLD.bcast(tempfile.mkdtemp(prefix="lp-pipe-") if WORLD.rank == 0 else None)
    own = tempfile.mkdtemp(prefix="lp-pipe-own-")
    try:
        piped = Trainer(config(shared, 3), WORLD)
        assert piped.net.body.pipelined
        piped.run()
        plain = Trainer(config(own, 1), MPI.COMM_SELF)
        plain.run()
        rows = WORLD.bcast(piped.metrics.rows(), root=0)
        for a, b in zip(rows, plain.metrics.rows(), strict=True):
            for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
                assert math.isclose(a[key], b[key], rel_tol=1e-10, abs_tol=1e-14), key
    finally:
        WORLD.Barrier()
        shutil.rmtree(own, ignore_errors=True)
        if WORLD.rank == 0:
            shutil.rmtree(shared, ignore_errors=True)


# ---- the 1F1B schedule ------------------------------------------------------

def gathered_grads(net):
    grads = {k: p.grad for k, p in net.named_parameters()}
    return {k: v for part in WORLD.allgather(grads) for k, v in part.items()}


@pytest.mark.mpi
@pytest.mark.parametrize("microbatches", [1, 2, 3, 8])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_1f1b_equals_serial_autograd(kind, microbatches):
    """Loss, class scores and every gradient of a 1F1B step against the
    serial network's loss.backward(), batch 10 (uneven micro-batches)."""
    net = make_net(kind, microbatches=microbatches, schedule="1f1b")
    x, y = batch(kind, 10)
    loss, out = net.loss_and_backward(x, y, Fn.cross_entropy)
    grads = gathered_grads(net)
    loss, out = WORLD.bcast((loss, out) if net.is_last else None, root=net.body.last_rank)
    held = WORLD.allgather(net.body.pipeline.peak_held)

    seq = net.serial_equivalent()
    ref = seq(x)
    sloss = Fn.cross_entropy(ref, y)
    sloss.backward()
    assert rel_err(out, ref.detach()) <= TOL
    assert abs(float(loss) - float(sloss)) <= TOL * abs(float(sloss))
    n = 8 if kind == "conv" else 12
    sgrads = {network_name(k, n): p.grad for k, p in seq.named_parameters()}
    assert grads.keys() == sgrads.keys()
    worst = max(rel_err(grads[k], sgrads[k]) for k in grads)
    assert worst <= TOL, worst
    if net.body.pipelined:
        # rank r holds at most P - r micro-batches' graphs (the warm-up plus one)
        assert held == [min(WORLD.size - r, microbatches) for r in range(WORLD.size)]


@pytest.mark.mpi
@pytest.mark.parametrize("schedule,microbatches", [("gpipe", 1), ("gpipe", 3), ("1f1b", 3)])
def test_a_layer_shared_by_two_positions_takes_both_gradients(schedule, microbatches):
    """Layers 2k and 2k+1 are one module (on the same rank on 1, 2 and 4
    ranks): its gradient is the sum of both positions' gradients, against
    serial autograd through the same modules, batch 10 (uneven
    micro-batches)."""
    pairs = {}

    def step(n):
        if n // 2 not in pairs:
            pairs[n // 2] = DenseStep(5, "tanh")
        return pairs[n // 2]
    net = Network(lambda: DenseOpening(2, 5), step, lambda: DenseClosing(5, 3), nlayers=8,
                  T=2.0, comm=WORLD, seed=7, microbatches=microbatches,
                  schedule=schedule).double()
    x, y = batch("dense", 10)
    net.loss_and_backward(x, y, Fn.cross_entropy)
    body = net.body
    mine = {n // 2: body.layer(n) for n in body.layer_indices}
    assert all(body.layer(n) is mine[n // 2] for n in body.layer_indices)
    ends = WORLD.allgather((net.opening if net.is_first else None,
                            net.closing if net.is_last else None))
    modules = {k: m for part in WORLD.allgather(mine) for k, m in part.items()}

    # the serial network on one process: u <- u + h F_(n // 2)(u), copies of the modules
    opening, closing = ends[body.first_rank][0], ends[body.last_rank][1]
    for m in [opening, closing, *modules.values()]:
        m.zero_grad()
    u = opening(x)
    for n in range(8):
        u = u + (2.0 / 8) * modules[n // 2](u)
    Fn.cross_entropy(closing(u), y).backward()
    worst = max(rel_err(p.grad, q.grad) for k, m in mine.items()
                for p, q in zip(m.parameters(), modules[k].parameters()))
    if net.is_first:
        worst = max(worst, max(rel_err(p.grad, q.grad)
                               for p, q in zip(net.opening.parameters(), opening.parameters())))
    assert worst <= TOL, worst
    net.close()


@pytest.mark.mpi
@pytest.mark.parametrize("microbatches", [2, 3, 8])
def test_1f1b_holds_at_most_P_microbatches_where_gpipe_holds_all(microbatches):
    """The instrumented count of micro-batch graphs held at once: 1F1B at
    most P per rank (P - rank), GPipe all of them; same gradients."""
    P = WORLD.size
    nets = {s: make_net("dense", microbatches=microbatches, schedule=s)
            for s in ("gpipe", "1f1b")}
    x, y = batch("dense", 16, seed=3)
    held, grads = {}, {}
    for s, net in nets.items():
        net.loss_and_backward(x, y, Fn.cross_entropy)
        held[s] = net.body.pipeline.peak_held
        grads[s] = gathered_grads(net)
    assert held["gpipe"] == microbatches
    assert held["1f1b"] <= P and held["1f1b"] == min(P - WORLD.rank, microbatches)
    for k in grads["gpipe"]:
        assert rel_err(grads["1f1b"][k], grads["gpipe"][k]) <= TOL


@pytest.mark.mpi
def test_1f1b_sum_reduction_and_accumulation():
    """reduction='sum' with a summed loss, and a second step without
    zero_grad: the gradients add up as loss.backward() twice would."""
    net = make_net("conv", microbatches=3, schedule="1f1b")
    x, y = batch("conv", 7)
    for _ in range(2):
        net.loss_and_backward(x, y, lambda o, t: Fn.cross_entropy(o, t, reduction="sum"),
                              reduction="sum")
    grads = gathered_grads(net)
    seq = net.serial_equivalent()
    for _ in range(2):
        Fn.cross_entropy(seq(x), y, reduction="sum").backward()
    for k, p in seq.named_parameters():
        assert rel_err(grads[network_name(k, 8)], p.grad) <= TOL


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["raise", "nan"])
def test_1f1b_failing_layer_raises_on_every_rank(how):
    bad = 5
    net = Network(lambda: torch.nn.Linear(2, 3).double(), lambda n: Failing(n, bad, how),
                  lambda: torch.nn.Linear(3, 2).double(), nlayers=8, T=1.0, comm=WORLD,
                  microbatches=3, schedule="1f1b")
    x, y = torch.ones(6, 2, dtype=F64), torch.zeros(6, dtype=torch.long)
    expected = (RuntimeError if how == "raise" else FloatingPointError)
    with pytest.raises(expected) as info:
        net.loss_and_backward(x, y, Fn.cross_entropy)
    if how == "nan":
        assert f"layer {bad}" in str(info.value)
    elif bad not in net.body.layer_indices:
        assert isinstance(info.value, PipelineFailure)
    assert WORLD.allreduce(1) == WORLD.size


@pytest.mark.parametrize("kw,name", [(dict(schedule="2f2b"), "schedule"),
                                     (dict(schedule=None), "schedule")])
def test_bad_schedule_raises_naming_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        make_net("dense", comm=MPI.COMM_SELF, microbatches=2, **kw)
    with pytest.raises(ValueError, match="reduction"):
        make_net("dense", comm=MPI.COMM_SELF).loss_and_backward(
            *batch("dense", 4), Fn.cross_entropy, reduction="none")


@pytest.mark.mpi
def test_serial_mode_with_1f1b_trains_like_gpipe():
    """The command's serial mode with mgrit.schedule = "1f1b" gives the
    metrics of the GPipe schedule (both exact)."""
    def config(run_dir, schedule):
        return resolve(None, ['mgrit.mode="serial"', "model.nlayers=8", "model.width=4",
                              "optim.epochs=1", "data.batch_size=250", 'data.dtype="float64"',
                              "run.plot=false", f'run.dir="{run_dir}"', "mgrit.microbatches=3",
                              f'mgrit.schedule="{schedule}"', 'optim.name="sgd"', "optim.lr=0.05"])
    dirs = [WORLD.bcast(tempfile.mkdtemp(prefix="lp-1f1b-") if WORLD.rank == 0 else None)
            for _ in range(2)]
    try:
        runs = [Trainer(config(d, s), WORLD) for d, s in zip(dirs, ("gpipe", "1f1b"))]
        assert runs[1].net.body.schedule == "1f1b"
        for t in runs:
            t.run()
        rows = [WORLD.bcast(t.metrics.rows(), root=0) for t in runs]
        for a, b in zip(*rows, strict=True):
            for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
                assert math.isclose(a[key], b[key], rel_tol=1e-10, abs_tol=1e-14), key
    finally:
        WORLD.Barrier()
        if WORLD.rank == 0:
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# schedules as data: generators of actions, one interpreter

@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 8), m=st.integers(1, 12))
def test_built_in_schedules_are_complete_and_never_deadlock(size, m):
    for generate in (gpipe_step, one_f_one_b):
        assert check_schedule(generate, size, m) is None
    # 1F1B: rank r holds at most P - r micro-batches' graphs at once
    for r in range(size):
        held = peak = 0
        for a in one_f_one_b(r, size, m):
            held += 1 if a.kind == "F" else -1
            peak = max(peak, held)
        assert peak == min(size - r, m)


def test_check_schedule_finds_bad_orders():
    def missing(rank, size, m):
        return [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m - 1)]

    def backward_first(rank, size, m):
        return [Action("B", 0), Action("F", 0)]

    def crossed(rank, size, m):
        # rank 0 waits for a backward that rank 1 runs only after a forward
        # rank 0 has not sent yet
        if rank == 0:
            return [Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1)]
        return [Action("F", 1), Action("F", 0), Action("B", 0), Action("B", 1)]

    assert "B actions for micro-batches [0, 1]" in check_schedule(missing, 1, 3)
    assert "backward before forward" in check_schedule(backward_first, 1, 1)
    assert "wait for each other" in check_schedule(crossed, 2, 2)
    with pytest.raises(ValueError, match="lookahead"):
        register_schedule("x", gpipe_step, lookahead=0)
    with pytest.raises(TypeError, match="generate must be callable"):
        register_schedule("x", None)


def _interleaved_reverse(rank, size, m):
    """A schedule only this test knows: warm-up forwards as 1F1B, then the
    backwards of the held micro-batches newest first."""
    warm = min(size - rank, m)
    order = [Action("F", i) for i in range(warm)]
    for i in range(warm, m):
        order += [Action("B", i - warm), Action("F", i)]
    order += [Action("B", i) for i in range(m - warm, m)]
    return order


@pytest.mark.mpi
@pytest.mark.parametrize("name,generate,lookahead", [("gpipe-step", gpipe_step, None),
                                                      ("test-interleaved", _interleaved_reverse, 2)])
def test_a_registered_schedule_trains_through_the_one_interpreter(name, generate, lookahead):
    """A new schedule is a generator of actions: registered, it runs in
    loss_and_backward through the same interpreter as 1F1B, and its loss,
    scores and gradients are the serial network's (float64, 1e-12)."""
    assert check_schedule(generate, WORLD.size, 3) is None
    register_schedule(name, generate, lookahead=lookahead)
    try:
        net = make_net("dense", microbatches=3, schedule=name)
        x, y = batch("dense", 10)
        loss, out = net.loss_and_backward(x, y, Fn.cross_entropy)
        grads = gathered_grads(net)
        loss, out = WORLD.bcast((loss, out) if net.is_last else None, root=net.body.last_rank)
        seq = net.serial_equivalent()
        ref = seq(x)
        sloss = Fn.cross_entropy(ref, y)
        sloss.backward()
        assert rel_err(out, ref.detach()) <= TOL
        assert abs(float(loss) - float(sloss)) <= TOL * abs(float(sloss))
        sgrads = {network_name(k, 12): p.grad for k, p in seq.named_parameters()}
        assert grads.keys() == sgrads.keys()
        assert max(rel_err(grads[k], sgrads[k]) for k in grads) <= TOL
        net.close()
    finally:
        del SCHEDULES[name]
