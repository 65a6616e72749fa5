"""LayerParallel and Network against the serial PyTorch network with the same
weights: outputs and gradients, exact (one level) and converged multilevel
MGRIT, inexact iterations, training, rank invariance and errors.

MPI tests run on COMM_WORLD (1, 2 and 4 ranks) and compare with the serial
network each rank builds by itself from the gathered weights."""
import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from braid_ext import Solver
from layerpar import (ConvClosing, ConvOpening, ConvStep, DenseClosing, DenseOpening,
                      DenseStep, LayerParallel, Network)
from layerpar import partition

F64 = torch.float64
WORLD = MPI.COMM_WORLD


def dense_net(comm, nlayers=12, width=5, **opts):
    return Network(lambda: DenseOpening(2, width), lambda n: DenseStep(width, "tanh"),
                   lambda: DenseClosing(width, 3), nlayers=nlayers, T=2.0, comm=comm,
                   seed=7, **opts).double()


def conv_net(comm, nlayers=8, channels=3, **opts):
    return Network(lambda: ConvOpening(1, channels), lambda n: ConvStep(channels, 3, "relu"),
                   lambda: ConvClosing(channels, 4, pool=2), nlayers=nlayers, T=1.0,
                   comm=comm, seed=3, **opts).double()


def data(kind, batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "dense":
        x, ncls = torch.randn(batch, 2, generator=g, dtype=F64), 3
    else:
        x, ncls = torch.randn(batch, 1, 6, 6, generator=g, dtype=F64), 4
    y = torch.randint(0, ncls, (batch,), generator=g)
    return x, y


def run_parallel(net, x, y):
    """Loss, logits (last rank) and all gradients by name (gathered)."""
    loss = net.loss(x, y, Fn.cross_entropy)
    loss.backward()
    grads = {}
    for name, p in net.named_parameters():
        grads[name] = p.grad.detach().clone()
    all_grads = {}
    for part in net.comm.allgather(grads):
        all_grads.update(part)
    return net.reduce(loss), all_grads


def serial_grads(seq, nlayers):
    """The gradients of serial_equivalent()'s parameters under the Network's
    parameter names."""
    grads = {}
    for name, p in seq.named_parameters():
        idx, rest = name.split(".", 1)
        idx = int(idx)
        if idx == 0:
            key = "opening." + rest
        elif idx == nlayers + 1:
            key = "closing." + rest
        else:
            key = f"body.layers.{idx - 1}.{rest.removeprefix('F.')}"
        grads[key] = p.grad.detach().clone()
    return grads


def run_serial(net, x, y):
    """The serial network with the same weights, ordinary autograd."""
    seq = net.serial_equivalent()
    loss = Fn.cross_entropy(seq(x), y)
    loss.backward()
    return float(loss.detach()), serial_grads(seq, net.body.nlayers)


def rel_err(a, b):
    return float((a - b).abs().max() / max(b.abs().max(), 1e-300))


def compare(net, kind, tol_loss, tol_grad):
    x, y = data(kind)
    loss, grads = run_parallel(net, x, y)
    sloss, sgrads = run_serial(net, x, y)
    assert abs(loss - sloss) <= tol_loss * abs(sloss)
    assert grads.keys() == sgrads.keys()
    worst = max(rel_err(grads[k], sgrads[k]) for k in grads)
    assert worst <= tol_grad, worst
    return worst


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_exact_mode_equals_serial(kind):
    # max_levels=1: sequential propagation across ranks, same operations as
    # the serial network
    net = dense_net(WORLD) if kind == "dense" else conv_net(WORLD)
    compare(net, kind, 1e-14, 1e-14)
    assert net.body.last_forward["iterations"] == 1


@pytest.mark.mpi
@pytest.mark.parametrize("levels,cfactor", [(2, 2), (3, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_converged_multilevel_equals_serial(kind, levels, cfactor):
    # converged MGRIT (residual <= 1e-12) reproduces serial propagation and
    # back-propagation: 1e-10 relative
    opts = dict(max_levels=levels, cfactor=cfactor, fwd_iters=60, bwd_iters=60,
                fwd_tol=1e-12, bwd_tol=1e-12, min_coarse=1)
    net = dense_net(WORLD, nlayers=16, **opts) if kind == "dense" \
        else conv_net(WORLD, nlayers=12, **opts)
    compare(net, kind, 1e-10, 1e-10)
    assert net.body.last_forward["residual_norms"][-1] <= 1e-12
    assert net.body.last_backward["residual_norms"][-1] <= 1e-12
    assert len(net.body.last_forward["residual_norms"]) > 1


def test_gradcheck_through_layer_parallel_path():
    # finite differences against the adjoint-MGRIT gradient, input and weights
    body = LayerParallel(lambda n: DenseStep(3, "tanh"), 8, 1.0, MPI.COMM_SELF, max_levels=3,
                         cfactor=2, min_coarse=1, fwd_iters=50, bwd_iters=50, fwd_tol=1e-14,
                         bwd_tol=1e-14, retain_graphs=True).double()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    params = tuple(body.parameters())

    def f(x, *ps):
        return body(x)

    assert torch.autograd.gradcheck(f, (x,) + params, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.mpi
def test_inexact_gradient_error_is_bounded_and_rank_invariant():
    # the inexact layer-parallel setting: 2 forward and 1 backward iteration
    opts = dict(max_levels=3, cfactor=2, fwd_iters=2, bwd_iters=1, min_coarse=1)
    x, y = data("dense", seed=5)
    net = dense_net(WORLD, nlayers=16, **opts)
    loss, grads = run_parallel(net, x, y)
    sloss, sgrads = run_serial(net, x, y)
    flat = torch.cat([grads[k].flatten() for k in sorted(grads)])
    sflat = torch.cat([sgrads[k].flatten() for k in sorted(grads)])
    err = float((flat - sflat).norm() / sflat.norm())
    if WORLD.rank == 0:
        print(f"\ninexact (2 fwd / 1 bwd iterations) relative gradient error {err:.3e}, "
              f"loss error {abs(loss - sloss) / abs(sloss):.3e}")
    # measured 1.56e-1 on this seed (16 layers, 3 levels, cfactor 2); an
    # error near 1 would mean a broken adjoint
    assert 0 < err < 0.25
    assert net.body.last_forward["iterations"] == 2
    assert net.body.last_backward["iterations"] == 1
    # and it is truncation error: three iterations each cut it by > 100x
    more = dense_net(WORLD, nlayers=16, **dict(opts, fwd_iters=3, bwd_iters=3))
    _, grads3 = run_parallel(more, x, y)
    flat3 = torch.cat([grads3[k].flatten() for k in sorted(grads3)])
    assert float((flat3 - sflat).norm() / sflat.norm()) < err / 100
    # the same inexact gradient on one rank: rank count changes round-off only
    single = dense_net(MPI.COMM_SELF, nlayers=16, **opts)
    loss1, grads1 = run_parallel(single, x, y)
    assert abs(loss - loss1) <= 1e-12 * abs(loss1)
    assert max(rel_err(grads[k], grads1[k]) for k in grads) <= 1e-10


@pytest.mark.mpi
@pytest.mark.parametrize("levels", [1, 3])
def test_training_losses_independent_of_ranks(levels):
    # a few SGD steps: the same losses on COMM_WORLD as on one rank
    opts = dict(max_levels=levels, cfactor=2, min_coarse=1, fwd_iters=2, bwd_iters=1)

    def train(comm):
        torch.manual_seed(0)
        net = dense_net(comm, nlayers=12, **opts)
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
        losses = []
        for step in range(5):
            x, y = data("dense", batch=8, seed=step)
            opt.zero_grad()
            loss = net.loss(x, y, Fn.cross_entropy)
            loss.backward()
            opt.step()
            losses.append(net.reduce(loss))
        return losses

    world, single = train(WORLD), train(MPI.COMM_SELF)
    tol = 1e-12 if levels == 1 else 1e-10
    for a, b in zip(world, single):
        assert abs(a - b) <= tol * abs(b)
    assert world[-1] < world[0]


@pytest.mark.mpi
def test_layer_ownership_matches_solver_layout():
    size = WORLD.size
    for N in (size, size + 1, 7 * size + 3, 64):
        solver = Solver(_Probe(), WORLD, 0.0, 1.0, N, max_levels=1)
        solver.solve()
        lo, hi = solver.local_range(0)
        assert (lo, hi) == partition.fine_block(N, size, WORLD.rank)
        layers = partition.local_layers(N, size, WORLD.rank)
        assert layers == range(max(lo, 1) - 1, hi)
        for n in layers:
            assert partition.layer_owner(N, size, n) == WORLD.rank
        solver.close()


class _Probe:
    """A one-number app to read the solver's layout."""
    def init(self, t, i): return 0.0
    def step(self, u, st): return u
    def clone(self, u): return u
    def sum(self, a, x, b, y): return a * x + b * y
    def norm(self, u): return abs(u)
    def bufsize(self): return 8
    def pack(self, u, buf):
        import struct
        buf[:8] = struct.pack("d", u)
    def unpack(self, buf):
        import struct
        return struct.unpack("d", bytes(buf[:8]))[0]


def test_hierarchy_matches_solver():
    for N, L, cf, mc in [(64, 4, 2, 2), (37, 5, 3, 1), (10, 3, 4, 2), (5, 3, 2, 3)]:
        solver = Solver(_Probe(), MPI.COMM_SELF, 0.0, 1.0, N, max_levels=L, cfactor=cf,
                        min_coarse=mc, max_iter=1)
        solver.solve()
        levels = partition.hierarchy(N, L, cf, mc)
        assert len(levels) == solver.nlevels
        for l, (n, stride) in enumerate(levels):
            assert solver.level_size(l) == (n, stride)
        solver.close()


@pytest.mark.mpi
def test_bad_configuration_fails_everywhere():
    step = lambda n: DenseStep(4)
    with pytest.raises(ValueError, match="nlayers"):
        LayerParallel(step, 0, 1.0, WORLD)
    with pytest.raises(ValueError, match="T="):
        LayerParallel(step, 4, -1.0, WORLD)
    with pytest.raises(ValueError, match="cfactor"):
        LayerParallel(step, 8, 1.0, WORLD, max_levels=2, cfactor=1)
    with pytest.raises(TypeError, match="comm"):
        LayerParallel(step, 8, 1.0, None)
    if WORLD.size > 1:
        with pytest.raises(ValueError, match="nlayers=.*number of ranks"):
            LayerParallel(step, WORLD.size - 1, 1.0, WORLD)


class _Shrink(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, u):
        return self.lin(u)


@pytest.mark.mpi
def test_shape_changing_step_fails_on_every_rank():
    N = 2 * WORLD.size + 1
    bad = N - 1  # a layer of the last rank
    body = LayerParallel(lambda n: _Shrink() if n == bad else DenseStep(4), N, 1.0, WORLD)
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=f"layer {bad}.*keep the shape"):
        body(x if WORLD.rank == 0 else None)


@pytest.mark.mpi
def test_dtype_mismatch_fails_on_every_rank():
    body = LayerParallel(lambda n: DenseStep(4), 2 * WORLD.size, 1.0, WORLD)  # float32
    x = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="dtype mismatch"):
        body(x if WORLD.rank == 0 else None)


@pytest.mark.mpi
def test_nonfinite_state_reports_layer_everywhere():
    N = 2 * WORLD.size
    bad = N - 1

    class Blowup(torch.nn.Module):
        def forward(self, u):
            return u * float("inf")

    body = LayerParallel(lambda n: Blowup() if n == bad else DenseStep(4), N, 1.0, WORLD)
    x = torch.randn(3, 4)
    with pytest.raises(Exception, match=f"layer {bad} produced NaN or Inf"):
        body(x if WORLD.rank == 0 else None)


class _NaNAt(torch.nn.Module):
    """A dense step whose output is NaN (always, or only in a call recorded
    for back-propagation: the final sweep of a layer-parallel solve)."""

    def __init__(self, poisoned, only_recorded):
        super().__init__()
        self.inner = DenseStep(4)
        self.poisoned, self.only_recorded = poisoned, only_recorded

    def forward(self, u):
        out = self.inner(u)
        recorded = torch.is_grad_enabled() and u.requires_grad
        if self.poisoned and (recorded or not self.only_recorded):
            return out * float("nan")
        return out


@pytest.mark.mpi
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("only_recorded", [False, True])
@pytest.mark.parametrize("relax", ["F", "FCF"])
def test_nonfinite_layer_named_exactly_in_every_layer_parallel_path(relax, only_recorded, grad):
    """NaN made by layer `bad`: found by the core's residual (forward solve,
    point bad + 1 -> layer bad) or by the final sweep's check (with or
    without autograd, also when only the recorded final sweep turns NaN):
    every rank raises a FloatingPointError naming layer `bad`."""
    if only_recorded and not grad:
        pytest.skip("nothing is recorded without autograd: no NaN")
    N = 4 * WORLD.size
    for bad in sorted({1, N // 2, N - 1}):
        body = LayerParallel(lambda n: _NaNAt(n == bad, only_recorded), N, 1.0, WORLD,
                             max_levels=2, cfactor=2, relax=relax, fwd_iters=2)
        x = torch.randn(3, 4)
        try:
            with torch.set_grad_enabled(grad):
                body(x if WORLD.rank == 0 else None)
            got = None
        except FloatingPointError as e:
            got = str(e)
        body.close()
        got = WORLD.allgather(got)
        assert all(g is not None and f"layer {bad}" in g and "NaN or Inf" in g for g in got), \
            (bad, got)


@pytest.mark.mpi
def test_two_forwards_then_one_backward():
    # each forward keeps its own layer graphs: the gradient of a sum of two
    # passes is the sum of the gradients (exact mode, against serial autograd)
    net = dense_net(WORLD, nlayers=10)
    x1, y1 = data("dense", seed=1)
    x2, y2 = data("dense", seed=2)
    loss = net.loss(x1, y1, Fn.cross_entropy) + net.loss(x2, y2, Fn.cross_entropy)
    loss.backward()
    grads = {}
    for part in net.comm.allgather({k: p.grad.clone() for k, p in net.named_parameters()}):
        grads.update(part)
    seq = net.serial_equivalent()
    (Fn.cross_entropy(seq(x1), y1) + Fn.cross_entropy(seq(x2), y2)).backward()
    ref = serial_grads(seq, net.body.nlayers)
    assert max(rel_err(grads[k], ref[k]) for k in ref) <= 1e-13
