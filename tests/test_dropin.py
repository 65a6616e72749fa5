"""The drop-in form: a ResNet written as plain PyTorch (an nn.Sequential of a
stem, conv blocks with batch norm and a head) made layer-parallel by
``layerpar.parallelize``, and trained by ``Network.step``: against the
original module and serial PyTorch training (float64, 1e-12), against the
factory form (bit for bit), against the long form of a step (bit for bit,
every mode, grids); rank 0's weights; the global gradient norm; the
arguments; memory (no reference to other ranks' blocks); the example."""
import copy
import gc
import importlib.util
import itertools
import math
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import layerpar
from layerpar import Network, ProcessGrid, parallelize
from layerpar.dropin import BlockStep, BranchStep
from layerpar.stepping import _STEP_REDUCERS

from conftest import clean_mpi_env

F64 = torch.float64
WORLD = MPI.COMM_WORLD
SEED, C, N, CLASSES = 5, 2, 4, 3
TOL = 1e-12
LAYER_PARALLEL = dict(max_levels=3, cfactor=2, min_coarse=1, fwd_iters=2, bwd_iters=1)
MODES = {
    "exact": {},
    "gpipe": dict(microbatches=3),
    "1f1b": dict(microbatches=3, schedule="1f1b"),
    "layer-parallel": LAYER_PARALLEL,
    "one-shot": dict(LAYER_PARALLEL, fwd_iters=1, warm_start=True),
}


# ---- a ResNet as a PyTorch user writes it: the example's block ---------------------------

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                       "dropin_resnet.py")
_spec = importlib.util.spec_from_file_location("dropin_resnet", EXAMPLE)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)
BasicBlock = example.BasicBlock


class Residual(nn.Module):
    """x -> x + f(x)."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x)


def branch(channels):
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
                         nn.Tanh(), nn.Conv2d(channels, channels, 3, padding=1))


def resnet(seed=SEED, *, form="blocks", blocks=N, channels=C, perturb=False):
    """stem, blocks, head in one nn.Sequential (float64); ``form='branches'``:
    blocks x + f(x) of Residual; ``perturb``: buffers moved off their
    initial values (drawn from the seed too)."""
    torch.manual_seed(seed)
    stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU())
    body = [BasicBlock(channels) if form == "blocks" else Residual(branch(channels))
            for _ in range(blocks)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, CLASSES))
    model = nn.Sequential(stem, *body, head).double()
    if perturb:
        with torch.no_grad():
            for b in model.buffers():
                if b.is_floating_point():
                    b.add_(torch.rand(b.shape, dtype=b.dtype))
    return model


def dropin(model, *, form="blocks", comm=None, grid=None, **opts):
    if comm is None and grid is None:
        comm = WORLD
    inner = model[1:-1]
    pieces = {"blocks": inner} if form == "blocks" else {"branches": [m.f for m in inner]}
    return parallelize(model[0], head=model[-1], comm=comm, grid=grid, **pieces, **opts)


def data(n=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 4, 4, generator=g, dtype=F64),
            torch.randint(0, CLASSES, (n,), generator=g))


def agreed(comm, ok, detail=""):
    """Every rank's (ok, detail), on every rank: assert on all of them alike."""
    outcomes = comm.allgather((bool(ok), detail))
    bad = [(r, d) for r, (o, d) in enumerate(outcomes) if not o]
    assert not bad, bad


def relative(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def compare_local(net, model, ref, *, grads=False, buffers=False):
    """(largest relative difference, number compared) between the tensors of
    ``model`` that this rank's ``net`` holds and the same-named ones of
    ``ref`` (their values, or gradients)."""
    held = {id(t) for t in itertools.chain(net.parameters(), net.buffers())}
    named = model.named_buffers() if buffers else model.named_parameters()
    theirs = dict(ref.named_buffers() if buffers else ref.named_parameters())
    worst, count = 0.0, 0
    for name, t in named:
        if id(t) not in held:
            continue
        a, b = (t.grad, theirs[name].grad) if grads else (t, theirs[name])
        if not t.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(a, b) else math.inf)
        else:
            worst = max(worst, relative(a, b))
        count += 1
    return worst, count


def check_all_compared(comm, net, model, ref, **kw):
    worst, count = compare_local(net, model, ref, **kw)
    parts = comm.allgather((worst, count))
    total = len(list(ref.named_buffers() if kw.get("buffers") else ref.parameters()))
    assert sum(c for _, c in parts) == total, parts
    assert max(w for w, _ in parts) <= TOL, parts


# ---- the original module, exactly -----------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("form", ["blocks", "branches"])
def test_exact_outputs_gradients_and_statistics_equal_the_original_module(form):
    model, ref = resnet(form=form), resnet(form=form)
    net = dropin(model, form=form)
    x, y = data(6)
    out = net(x)
    want = ref(x)
    agreed(WORLD, not net.is_last or relative(out, want) <= TOL)
    loss = net.loss(x, y, Fn.cross_entropy)
    loss.backward()
    ref_loss = Fn.cross_entropy(ref(x), y)
    ref_loss.backward()
    assert abs(net.reduce(loss) - float(ref_loss)) <= TOL * float(ref_loss)
    check_all_compared(WORLD, net, model, ref, grads=True)
    check_all_compared(WORLD, net, model, ref, buffers=True)  # two passes: two updates
    net.close()


# ---- the factory form, bit for bit ----------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("form, h", [("blocks", 1.0), ("branches", 0.25)])
def test_layer_parallel_gradient_is_the_factory_forms_bit_for_bit(form, h):
    # two inexact steps (coarse grids step with ghost copies of other ranks'
    # blocks): loss and gradients equal those of Network(opening, step,
    # closing, nlayers=N, T=N*h) with the same modules, bit for bit
    opts = dict(LAYER_PARALLEL, fwd_iters=1)
    blocks = N  # on 2 and 4 ranks, some rank steps with another's block on a coarse grid
    model, src = resnet(form=form, blocks=blocks), resnet(form=form, blocks=blocks)
    net = dropin(model, form=form, h=h, **opts)
    wrap = BlockStep if form == "blocks" else BranchStep

    def step(n):
        m = copy.deepcopy(src[1 + n])
        return wrap(m if form == "blocks" else m.f, f"{form}[{n}]")

    fac = Network(lambda: copy.deepcopy(src[0]), step, lambda: copy.deepcopy(src[-1]),
                  nlayers=blocks, T=blocks * h, comm=WORLD, **opts)
    ok = [net.body.h == fac.body.h == h and net.body.nlayers == blocks,
          net.body.layer_indices == fac.body.layer_indices,
          WORLD.size == 1 or any(WORLD.allgather(bool(net.body._ghosts.receives)))]
    for s in range(2):
        x, y = data(6, seed=s)
        losses = []
        for m in (net, fac):
            m.zero_grad()
            losses.append(m.step(x, y, Fn.cross_entropy))
        grads = {k: p.grad for k, p in net.named_parameters()}
        other = {k: p.grad for k, p in fac.named_parameters()}
        ok.append(losses[0] == losses[1] and grads.keys() == other.keys()
                  and all(torch.equal(grads[k], other[k]) for k in grads))
        for m in (net, fac):
            with torch.no_grad():
                for p in m.parameters():
                    p.sub_(0.1 * p.grad)
    ok.append(all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                     fac.state_dict().values())))
    agreed(WORLD, all(ok), str(ok))
    net.close()
    fac.close()


# ---- net.step against the long form, on grids ---------------------------------------

def layouts(comm):
    """(label, comm, grid) for the network on all of ``comm`` and on grids
    D x L (1x2, 2x2, 2x1) where they fit: ``comm`` split into blocks of
    D*L ranks, each running the same grid.  Yields; frees what it made."""
    yield "world", comm, None
    P = comm.Get_size()
    for D, L in ((1, 2), (2, 2), (2, 1)):
        s = D * L
        if s > P or P % s:
            continue
        sub = comm.Split(comm.Get_rank() // s, comm.Get_rank())
        grid = ProcessGrid(sub, data=D)
        yield f"{D}x{L}", None, grid
        grid.close()
        sub.Free()


def long_form(net, grid, x, y, schedule):
    """One step as it is written without net.step: loss and backward, and
    on a grid the shares, the averaging and the global loss by hand."""
    def loss_backward(x, y):
        if schedule == "1f1b":
            loss, _ = net.loss_and_backward(x, y, Fn.cross_entropy)
        else:
            loss = net.loss(x, y, Fn.cross_entropy)
            loss.backward()
        return net.reduce(loss)

    if grid is None or grid.data == 1:
        return loss_backward(x, y)
    B = len(x)
    if grid.share_size(B) > 0:
        value = loss_backward(grid.shard(x), grid.shard(y))
    else:
        net.body.passes += 1  # as net.step counts a pass that runs nowhere
        value = 0.0
    (value,) = grid.sum_values([grid.weight(B) * value])
    grid.average_gradients(net.parameters(), grid.weight(B))
    return value


def serial_step(ref, grid, x, y, reduction="mean"):
    """Serial PyTorch on one process: the loss of the global batch, as the
    grid's groups see it (each share's batch statistics)."""
    if grid is None or grid.data == 1:
        loss = Fn.cross_entropy(ref(x), y, reduction=reduction)
    else:
        B = len(x)
        loss = 0.0
        for d in range(grid.data):
            lo, hi = layerpar.grid.share_bounds(B, grid.data, d)
            if hi > lo:
                part = Fn.cross_entropy(ref(x[lo:hi]), y[lo:hi], reduction=reduction)
                loss = loss + ((hi - lo) / B * part if reduction == "mean" else part)
    loss.backward()
    return float(loss)


def train(comm, grid, opts, how, steps=5):
    """``steps`` steps of SGD with momentum, a StepLR schedule and a
    DataLoader (21 samples in batches of 5: the last of 1, an empty share
    for a second group), by ``how``: 'step', 'long' or 'serial' (plain
    PyTorch).  (losses, model, net or None)."""
    model = resnet()
    net = dropin(model, comm=comm, grid=grid, **opts) if how != "serial" else None
    opt = torch.optim.SGD((net or model).parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    loader = DataLoader(TensorDataset(*data()), batch_size=5, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    losses = []
    for x, y in itertools.islice(loader, steps):
        opt.zero_grad()
        if how == "step":
            losses.append(net.step(x, y, Fn.cross_entropy))
        elif how == "long":
            losses.append(long_form(net, grid, x, y, opts.get("schedule")))
        else:
            losses.append(serial_step(model, grid, x, y))
        opt.step()
        sched.step()
    return losses, model, net


@pytest.mark.mpi
@pytest.mark.parametrize("mode", list(MODES))
def test_step_equals_the_long_form_in_every_mode_and_on_grids(mode):
    ok = []
    for label, comm, grid in layouts(WORLD):
        (l1, m1, n1), (l2, m2, n2) = (train(comm, grid, MODES[mode], how)
                                      for how in ("step", "long"))
        same = l1 == l2 and all(
            torch.equal(a, b) for a, b in zip(itertools.chain(n1.parameters(), n1.buffers()),
                                              itertools.chain(n2.parameters(), n2.buffers())))
        ok.append((label, same, len(l1)))
        if grid is not None and grid.data > 1:  # the groups hold the same weights
            mine = torch.cat([p.detach().reshape(-1) for p in n1.parameters()])
            ok.append((label, all(torch.equal(mine, w) for w in grid.data_comm.allgather(mine))))
            # and the step's sums started during backward to the end (micro-batches too)
            ok.append((label, _STEP_REDUCERS[n1][1].early_gradients, "early"))
        n1.close()
        n2.close()
    agreed(WORLD, all(o[1] for o in ok), str(ok))


@pytest.mark.mpi
def test_exact_step_trains_like_serial_pytorch():
    # exact mode, plain PyTorch on one process as the reference (on a grid,
    # the batch statistics are each share's, so the reference runs the shares)
    for label, comm, grid in layouts(WORLD):
        losses, model, net = train(comm, grid, {}, "step")
        ref_losses, ref, _ = train(None, grid, {}, "serial")
        assert len(losses) == 5
        errors = [abs(a - b) / b for a, b in zip(losses, ref_losses)]
        check_all_compared(net.comm, net, model, ref)
        worst = max(errors)
        if grid is None or grid.data == 1:  # the running statistics too, and evaluation
            check_all_compared(net.comm, net, model, ref, buffers=True)
            net.eval()
            ref.eval()
            x, _ = data(7, seed=9)
            with torch.no_grad():
                out = net(x)
                want = ref(x)
            if net.is_last:
                worst = max(worst, relative(out, want))
        agreed(WORLD, worst <= TOL, f"{label}: {worst}")
        net.close()


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["exact", "1f1b"])
def test_step_with_a_summed_loss(mode):
    # reduction='sum': B times the mean's loss and gradients; in exact mode
    # the serial model's summed loss and its gradients
    ok = []
    x, y = data(7)
    for label, comm, grid in layouts(WORLD):
        model, ref, other = resnet(), resnet(), resnet()
        net = dropin(model, comm=comm, grid=grid, **MODES[mode])
        loss = net.step(x, y, lambda o, t: Fn.cross_entropy(o, t, reduction="sum"),
                        reduction="sum")
        mean_net = dropin(other, comm=comm, grid=grid, **MODES[mode])
        mean = mean_net.step(x, y, Fn.cross_entropy)
        scaled = max(relative(p.grad, 7 * q.grad)
                     for p, q in zip(net.parameters(), mean_net.parameters()))
        ok.append((label, abs(loss - 7 * mean) <= TOL * loss, scaled <= TOL))
        if mode == "exact":
            want = serial_step(ref, grid, x, y, reduction="sum")
            worst, _ = compare_local(net, model, ref, grads=True)
            ok.append((label, abs(loss - want) <= TOL * want, worst <= TOL))
        net.close()
        mean_net.close()
    agreed(WORLD, all(all(o[1:]) for o in ok), str(ok))


# ---- rank 0's weights ---------------------------------------------------------------

@pytest.mark.mpi
def test_ranks_with_other_seeds_end_with_rank_0s_weights():
    for label, comm, grid in layouts(WORLD):
        model = resnet(SEED + WORLD.rank, perturb=True)   # a seed per rank
        root = WORLD.rank - (comm or grid.comm).rank      # (in WORLD) rank 0 of the call
        ref = resnet(SEED + root, perturb=True)           # its model
        net = dropin(model, comm=comm, grid=grid, **LAYER_PARALLEL)
        count = 0
        same = True
        for mine, theirs in ((model.named_parameters(), ref.named_parameters()),
                             (model.named_buffers(), ref.named_buffers())):
            theirs = dict(theirs)
            held = {id(t) for t in itertools.chain(net.parameters(), net.buffers())}
            for name, t in mine:
                if id(t) in held:
                    same &= torch.equal(t, theirs[name])
                    count += 1
        counts = net.comm.allgather(count)
        expected = len(list(ref.parameters())) + len(list(ref.buffers()))
        # the serial equivalent (built from the structures) has them too
        seq = net.serial_equivalent().eval()
        rebuilt = resnet(SEED + root, perturb=True).eval()
        x, y = data(6)
        with torch.no_grad():
            serial_ok = relative(seq(x), rebuilt(x)) <= TOL
        serial_ok = serial_ok and math.isfinite(net.step(x, y, Fn.cross_entropy))
        agreed(WORLD, same and sum(counts) == expected and serial_ok,
               f"{label}: {same} {counts} {expected} {serial_ok}")
        net.close()


# ---- the global gradient norm -------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
def test_clip_grad_norm_is_the_serial_models(norm_type):
    ok = []
    for label, comm, grid in layouts(WORLD):
        model, ref = resnet(), resnet()
        net = dropin(model, comm=comm, grid=grid)
        x, y = data(9)
        net.step(x, y, Fn.cross_entropy)
        serial_step(ref, grid, x, y)
        full = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()], norm_type)
        norm = net.clip_grad_norm_(float(full) / 3, norm_type)   # clips
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), float(full) / 3, norm_type)
        worst, _ = compare_local(net, model, ref, grads=True)
        norms = WORLD.allgather(float(norm))
        ok.append((label, abs(float(norm) - float(want)) <= TOL * float(want), worst <= TOL,
                   len(set(norms)) == 1))
        # far above the norm: nothing changes
        before = [p.grad.clone() for p in net.parameters()]
        again = net.clip_grad_norm_(1e6, norm_type)
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e6, norm_type)
        ok.append((label, abs(float(again) - float(want)) <= TOL * float(want),
                   all(torch.equal(a, p.grad) for a, p in zip(before, net.parameters()))))
        net.close()
    agreed(WORLD, all(all(o[1:]) for o in ok), str(ok))


@pytest.mark.mpi
def test_clip_grad_norm_arguments_and_nonfinite_norms_fail_on_every_rank():
    net = dropin(resnet())
    x, y = data(6)
    net.step(x, y, Fn.cross_entropy)
    got = []
    for kw in (dict(max_norm=-1.0), dict(max_norm="1"), dict(max_norm=1.0, norm_type=0),
               dict(max_norm=1.0, norm_type="2")):
        try:
            net.clip_grad_norm_(**kw)
            got.append(None)
        except ValueError as e:
            got.append(str(e).split("=")[0])
    if net.is_last:
        next(net.closing.parameters()).grad[0, 0] = math.nan
    for norm_type in (2.0, math.inf):  # a NaN on one rank: NaN on every rank
        try:
            net.clip_grad_norm_(1.0, norm_type, error_if_nonfinite=True)
            got.append(None)
        except RuntimeError as e:
            got.append("nonfinite" if "non-finite" in str(e) else str(e))
    agreed(WORLD, got == ["max_norm", "max_norm", "norm_type", "norm_type", "nonfinite",
                          "nonfinite"], str(got))
    net.close()


# ---- bad arguments --------------------------------------------------------------------

def outcome(call):
    """(exception type name, message) of call(), or None when it passed."""
    try:
        result = call()
    except Exception as e:  # noqa: BLE001 - the outcome is what is tested
        return type(e), str(e)
    if isinstance(result, Network):
        result.close()
    return None


class Shrink(nn.Module):
    """A block that halves the image: not residual."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.mpi
def test_bad_arguments_fail_on_every_rank_naming_the_argument():
    model = resnet()
    stem, blocks, head = model[0], model[1:-1], model[-1]
    P = WORLD.size
    cases = {
        "both": (lambda: parallelize(stem, blocks=blocks, branches=list(blocks), head=head,
                                     comm=WORLD), ValueError, "blocks, branches"),
        "neither": (lambda: parallelize(stem, head=head, comm=WORLD), ValueError,
                    "blocks, branches"),
        "empty": (lambda: parallelize(stem, blocks=[], head=head, comm=WORLD), ValueError,
                  "blocks: empty"),
        "empty branches": (lambda: parallelize(stem, branches=nn.Sequential(), head=head,
                                               comm=WORLD), ValueError, "branches: empty"),
        "not a module": (lambda: parallelize(stem, blocks=[blocks[0], torch.relu], head=head,
                                             comm=WORLD), TypeError, "blocks[1]"),
        "not a sequence": (lambda: parallelize(stem, blocks=blocks[0], head=head, comm=WORLD),
                           TypeError, "blocks must be"),
        "stem": (lambda: parallelize("conv", blocks=blocks, head=head, comm=WORLD), TypeError,
                 "stem"),
        "h = 0": (lambda: parallelize(stem, blocks=blocks, head=head, comm=WORLD, h=0),
                  ValueError, "h=0"),
        "h < 0": (lambda: parallelize(stem, blocks=blocks, head=head, comm=WORLD, h=-1.0),
                  ValueError, "h=-1.0"),
        "h nan": (lambda: parallelize(stem, blocks=blocks, head=head, comm=WORLD,
                                      h=math.nan), ValueError, "h=nan"),
        "nlayers": (lambda: parallelize(stem, blocks=blocks, head=head, comm=WORLD,
                                        nlayers=4), TypeError, "nlayers"),
        "tied": (lambda: parallelize(stem, blocks=[blocks[0], blocks[0]] * N, head=head,
                                     comm=WORLD), ValueError, "blocks[0] and blocks[1]"),
        "option": (lambda: parallelize(stem, blocks=blocks, head=head, comm=WORLD,
                                       relax="X"), ValueError, "relax"),
        "comm": (lambda: parallelize(stem, blocks=blocks, head=head, comm=3), TypeError,
                 "comm"),
    }
    if P > 1:
        cases["blocks differ"] = (
            lambda: parallelize(stem, blocks=blocks if WORLD.rank else blocks[:-1], head=head,
                                comm=WORLD), ValueError, "blocks: the ranks give")
        cases["h differs"] = (
            lambda: parallelize(stem, blocks=blocks, head=head, comm=WORLD,
                                h=1.0 + WORLD.rank), ValueError, "h: the ranks give")
        cases["options differ"] = (
            lambda: parallelize(stem, blocks=blocks, head=head, comm=WORLD,
                                fwd_iters=1 + WORLD.rank), ValueError,
            "options: the ranks give different options")
        cases["fewer blocks than ranks"] = (
            lambda: parallelize(stem, blocks=blocks[:1], head=head, comm=WORLD), ValueError,
            f"blocks: 1 for {P}")
        other = resnet(channels=C + (WORLD.rank == P - 1))
        cases["structure"] = (
            lambda: parallelize(other[0], blocks=other[1:-1], head=other[-1], comm=WORLD),
            RuntimeError, f"on rank {P - 1} does not have rank 0's structure")
    shrinking = list(resnet()[1:-1])
    shrinking[N - 1] = Shrink(C).double()
    shaped = parallelize(stem, blocks=shrinking, head=head, comm=WORLD)
    x, y = data(6)
    cases["shape"] = (lambda: shaped.step(x, y, Fn.cross_entropy), ValueError,
                      f"blocks[{N - 1}] maps a state of shape (6, {C}, 4, 4) to (6, {C}, 2, 2)")
    cases["reduction"] = (lambda: shaped.step(x, y, Fn.cross_entropy, reduction="max"),
                          ValueError, "reduction")
    got = {}
    for name, (call, kind, text) in cases.items():
        r = outcome(call)
        got[name] = r is not None and issubclass(r[0], kind) and text in r[1], r
    shaped.close()
    bad = {k: v[1] for k, v in got.items() if not v[0]}
    agreed(WORLD, not bad, str(bad))


@pytest.mark.mpi
def test_a_loss_that_is_not_one_number_fails_on_every_rank():
    # cross_entropy(reduction='none') on the last rank: backward cannot start
    # there; every rank raises ValueError instead of waiting in the adjoint
    # pass for the last rank (the timeout makes a wait fail, not hang)
    got = []
    for opts in (dict(timeout=30), dict(LAYER_PARALLEL, timeout=30)):
        net = dropin(resnet(), **opts)
        x, y = data(6)
        for fn in (lambda o, t: Fn.cross_entropy(o, t, reduction="none"),
                   lambda o, t: Fn.cross_entropy(o, t).detach()):
            r = outcome(lambda: net.loss_and_backward(x, y, fn))
            got.append(r is not None and issubclass(r[0], ValueError) and "loss_fn" in r[1])
        # the network is usable afterwards
        got.append(math.isfinite(net.step(x, y, Fn.cross_entropy)))
        net.close()
    agreed(WORLD, all(got), str(got))


@pytest.mark.mpi
def test_missing_or_unequal_batches_on_a_grid_fail_on_every_rank():
    P = WORLD.size
    if P % 2:
        pytest.skip("a grid of two groups needs an even number of ranks")
    with ProcessGrid(WORLD, data=2) as grid:
        net = dropin(resnet(), grid=grid)
        x, y = data(6)
        last_group = grid.data_rank == 1
        got = [outcome(lambda: net.step(None if last_group else x, y, Fn.cross_entropy)),
               outcome(lambda: net.step(x[:5] if last_group else x, y[:5] if last_group else y,
                                        Fn.cross_entropy))]
        ok = (got[0] is not None and issubclass(got[0][0], TypeError) and "x on rank" in got[0][1]
              and got[1] is not None and issubclass(got[1][0], ValueError)
              and "[5, 6] rows" in got[1][1])
        # and then a step runs
        ok = ok and math.isfinite(net.step(x, y, Fn.cross_entropy))
        net.close()
    agreed(WORLD, ok, str(got))


@pytest.mark.mpi
@pytest.mark.parametrize("opts", [{}, LAYER_PARALLEL, MODES["1f1b"]],
                         ids=["exact", "layer-parallel", "1f1b"])
def test_a_step_failing_in_one_group_leaves_the_gradient_sums_in_step(opts):
    # the loss fails in the second data group only: the first group's backward
    # pass has started its gradient sums; every rank raises, and the steps after
    # it give bitwise the weights of a run that never had the failed step (the
    # sums of the failed step were all completed and dropped, so the next
    # step's gathers meet their own)
    P = WORLD.size
    if P % 2:
        pytest.skip("a grid of two groups needs an even number of ranks")
    with ProcessGrid(WORLD, data=2) as grid:
        nets = [dropin(resnet(), grid=grid, **opts) for _ in range(2)]
        opts_ = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
        x, y = data(6)

        def failing(o, t):
            if grid.data_rank == 1:
                raise RuntimeError("a loss failing in one group")
            return Fn.cross_entropy(o, t)

        got = outcome(lambda: nets[0].step(x, y, failing))
        failed = got is not None and issubclass(got[0], RuntimeError) and "one group" in got[1]
        same_grads = all(p.grad is None for p in nets[0].parameters())
        for k in range(3):
            xs, ys = data(6, seed=k + 1)
            for n, o in zip(nets, opts_):
                o.zero_grad()
                n.step(xs, ys, Fn.cross_entropy)
                o.step()
        same = all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))
        mine = torch.cat([p.detach().reshape(-1) for p in nets[0].parameters()])
        groups = all(torch.equal(mine, w) for w in grid.data_comm.allgather(mine))
        for n in nets:
            n.close()
    agreed(WORLD, failed and same_grads and same and groups,
           str((got, same_grads, same, groups)))


# ---- memory, dtypes ---------------------------------------------------------------------

@pytest.mark.mpi
def test_each_rank_keeps_only_its_own_blocks():
    model = resnet()
    blocks = [weakref.ref(b) for b in model[1:-1]]
    stem, head = weakref.ref(model[0]), weakref.ref(model[-1])
    net = dropin(model, **LAYER_PARALLEL)
    x, y = data(6)
    net.step(x, y, Fn.cross_entropy)  # coarse grids step with ghost copies
    own = [n for n in net.body.layer_indices]
    uses_given = all(net.body.layer(n).block is blocks[n]() for n in own)
    del model
    gc.collect()
    alive = [r() is not None for r in blocks]
    ok = (uses_given and alive == [n in own for n in range(N)]
          and (stem() is not None) == net.is_first and (head() is not None) == net.is_last)
    # ghost copies (on 2 and 4 ranks some rank has one): built from the
    # blocks' structures, on the blocks' device and dtype
    ghosts = net.body.stage.ghosts
    ok = ok and sorted(ghosts) == net.body._ghosts.receives
    ok = ok and (WORLD.size == 1 or any(WORLD.allgather(bool(ghosts)))) and all(
        p.device.type == "cpu" and p.dtype == F64 for g in ghosts.values() for p in g.parameters())
    ok = ok and math.isfinite(net.step(x, y, Fn.cross_entropy))
    agreed(WORLD, ok, f"{alive} {own}")
    net.close()


@pytest.mark.mpi
def test_dtype_follows_the_modules():
    model = resnet().float()
    net = dropin(model, **LAYER_PARALLEL)
    x, y = data(6)
    loss = net.step(x.float(), y, Fn.cross_entropy)
    ok = math.isfinite(loss) and all(p.dtype == torch.float32 for p in net.parameters())
    ok = ok and all(p.grad.dtype == torch.float32 for p in net.parameters())
    agreed(WORLD, ok)
    net.close()


# ---- the example ----------------------------------------------------------------------

@pytest.mark.e2e
def test_dropin_example_trains_on_two_ranks(mpiexec):
    # the end-to-end tier (a child job under mpiexec): -m 'not e2e' leaves it out
    env = clean_mpi_env()
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(layerpar.__file__)), env.get("PYTHONPATH", "")])
    r = subprocess.run([mpiexec, "-n", "2", sys.executable, EXAMPLE, "--steps", "20"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    losses = [float(ln.split("loss ")[1]) for ln in lines if ln.startswith("step")]
    assert [ln.split(":")[0] for ln in lines[:-1]] == ["step 1", "step 10", "step 20"], lines
    assert losses[-1] < losses[0]
    assert lines[-1].startswith("validation accuracy")
