"""Transfers between layer layouts (layerpar.transfer), on COMM_WORLD (any
number of ranks, 1 to 4; 3 ranks exercise blocks that do not line up between
N and r*N layers) against references each rank computes by itself from the
global per-layer data: the defining formulas, exactness on weights linear in
layer-time, the transpose identity, rank invariance (bit for bit against
COMM_SELF), networks against their serial PyTorch equivalents with the O(h)
difference of the two depths, and optimiser state."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpi4py import MPI

from braid_ext import Layout
from layerpar import DenseClosing, DenseOpening, DenseStep, Network
from layerpar import set_timeout, transfer
from layerpar.transfer import (layer_grads, layer_params, prolong,
                               prolong_network, restrict, restrict_gradient, restrict_network)

F64 = torch.float64
WORLD = MPI.COMM_WORLD
SHAPES = {"weight": (3, 2), "bias": (3,), "scale": ()}

# (coarse N, r): blocks of N and r*N over 2, 3, 4 ranks do not line up
PAIRS = [(5, 3), (7, 2), (4, 2), (6, 3), (9, 2), (5, 1), (8, 4)]


def pairs(comm=WORLD):
    return [(N, r) for N, r in PAIRS if N >= comm.Get_size()]


def for_all_depths(check, comm=WORLD):
    """``check(N, r)`` for coarse depths N (at least the ranks) and factors r
    drawn by hypothesis: the same draws on every rank (derandomized), and an
    assertion's outcome agreed over the ranks before it is raised, so that
    every rank draws, fails and shrinks alike."""
    @settings(max_examples=25, deadline=None, derandomize=True, database=None)
    @given(N=st.integers(comm.Get_size(), 13), r=st.integers(1, 4))
    def run(N, r):
        try:
            check(N, r)
            error = None
        except AssertionError as e:
            error = f"N={N}, r={r}: {e}"
        errors = [e for e in comm.allgather(error) if e is not None]
        assert not errors, errors[0]
    run()


def layer_data(n, nlayers, seed=0):
    """Layer n's entries, a function of (seed, n) only: the same on every rank."""
    g = torch.Generator().manual_seed(1000 * seed + n + 7919 * nlayers)
    return {k: torch.randn(s, generator=g, dtype=F64) for k, s in SHAPES.items()}


def local_dict(lay, comm, make):
    return {n: make(n) for n in lay.layers(comm.Get_rank())}


def global_inner(a, b, comm):
    """sum over layers and entries of <a, b>, over the ranks of comm."""
    mine = sum(float((a[n][k] * b[n][k]).sum()) for n in a for k in a[n])
    return comm.allreduce(mine)


# ---- the operators against their definitions --------------------------------
@pytest.mark.mpi
def test_constant_prolongation_then_injection_is_the_identity():
    def check(N, r):
        src, dst = Layout(N, WORLD.size), Layout(r * N, WORLD.size)
        coarse = local_dict(src, WORLD, lambda n: layer_data(n, N))
        fine = prolong(coarse, src, dst, WORLD, kind="constant")
        assert sorted(fine) == list(dst.layers(WORLD.rank))
        for k, entry in fine.items():  # fine layer k is coarse layer k // r
            for name, v in layer_data(k // r, N).items():
                assert torch.equal(entry[name], v) and entry[name].dtype == F64
        back = restrict(fine, dst, src, WORLD, kind="injection")
        assert sorted(back) == sorted(coarse)
        for n in coarse:
            for name in SHAPES:
                assert torch.equal(back[n][name], coarse[n][name])
                assert back[n][name] is not coarse[n][name]  # new tensors

    for_all_depths(check)


@pytest.mark.mpi
def test_linear_prolongation_is_exact_on_weights_linear_in_time():
    def check(N, r):
        if N < 2:
            return  # one coarse layer: linear prolongation is constant (its definition)
        T = 2.5
        src, dst = Layout(N, WORLD.size), Layout(r * N, WORLD.size)
        a, b = layer_data(0, 0, seed=1), layer_data(1, 0, seed=1)

        def linear(n, nlayers):  # theta_n = a + b * t_n, t_n = n * T / nlayers
            return {k: a[k] + b[k] * (n * T / nlayers) for k in SHAPES}

        coarse = local_dict(src, WORLD, lambda n: linear(n, N))
        fine = prolong(coarse, src, dst, WORLD, kind="linear")
        for k, entry in fine.items():
            for name, v in linear(k, r * N).items():
                assert torch.allclose(entry[name], v, rtol=0, atol=1e-14), (k, name)

    for_all_depths(check)


@pytest.mark.mpi
def test_linear_prolongation_between_and_beyond_coarse_layers():
    """Independent of the implementation's formula: fine layer k at time
    k*h/r on the line through the two coarse layers around it, or through
    the last two for the last coarse interval; one coarse layer: constant."""
    size = WORLD.size
    for N, r in [(N, r) for N, r in [(5, 3), (4, 2), (1, 4)] if N >= size and N * r >= size]:
        src, dst = Layout(N, size), Layout(r * N, size)
        coarse = local_dict(src, WORLD, lambda n: layer_data(n, N))
        fine = prolong(coarse, src, dst, WORLD, kind="linear")
        for k, entry in fine.items():
            x = k / r  # the fine layer's time in coarse steps
            for name in SHAPES:
                if N == 1:
                    want = layer_data(0, N)[name]
                else:
                    j = min(math.floor(x), N - 2)
                    lo, hi = layer_data(j, N)[name], layer_data(j + 1, N)[name]
                    want = lo + (x - j) * (hi - lo)
                assert torch.allclose(entry[name], want, rtol=0, atol=1e-14)


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["constant", "linear"])
def test_restrict_gradient_is_the_transpose(kind):
    def check(N, r):
        src, dst = Layout(N, WORLD.size), Layout(r * N, WORLD.size)
        e = local_dict(src, WORLD, lambda n: layer_data(n, N, seed=2))
        g = local_dict(dst, WORLD, lambda k: layer_data(k, r * N, seed=3))
        Pe = prolong(e, src, dst, WORLD, kind=kind)
        PTg = restrict_gradient(g, dst, src, WORLD, kind=kind)
        lhs, rhs = global_inner(PTg, e, WORLD), global_inner(g, Pe, WORLD)
        assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(rhs))
        if kind == "constant":  # the sum of the r fine layers of each coarse layer
            for j, entry in PTg.items():
                for name in SHAPES:
                    want = sum(layer_data(k, r * N, seed=3)[name] for k in range(r * j, r * j + r))
                    assert torch.allclose(entry[name], want, rtol=0, atol=1e-13)

    for_all_depths(check)


@pytest.mark.mpi
def test_full_weighting_returns_a_prolonged_field():
    def check(N, r):
        src, dst = Layout(N, WORLD.size), Layout(r * N, WORLD.size)
        coarse = local_dict(src, WORLD, lambda n: layer_data(n, N))
        fine = prolong(coarse, src, dst, WORLD, kind="constant")
        back = restrict(fine, dst, src, WORLD, kind="full-weighting")
        steady = local_dict(src, WORLD, lambda n: layer_data(0, 0, seed=4))  # constant in time
        back_lin = restrict(prolong(steady, src, dst, WORLD, kind="linear"), dst, src, WORLD,
                            kind="full-weighting")
        for n in coarse:
            for name in SHAPES:
                assert torch.allclose(back[n][name], coarse[n][name], rtol=0, atol=1e-15)
                assert torch.allclose(back_lin[n][name], steady[n][name], rtol=0, atol=1e-15)
        # and its definition: the mean of fine layers r*j .. r*j+r-1
        g = local_dict(dst, WORLD, lambda k: layer_data(k, r * N, seed=5))
        mean = restrict(g, dst, src, WORLD, kind="full-weighting")
        for j, entry in mean.items():
            for name in SHAPES:
                want = sum(layer_data(k, r * N, seed=5)[name] for k in range(r * j, r * j + r)) / r
                assert torch.allclose(entry[name], want, rtol=0, atol=1e-15)

    for_all_depths(check)


@pytest.mark.mpi
@pytest.mark.parametrize("op,kind", [("prolong", "linear"), ("restrict", "full-weighting"),
                                     ("restrict_gradient", "linear")])
def test_same_result_bit_for_bit_on_any_number_of_ranks(op, kind):
    fn = getattr(transfer, op)

    def check(N, r):
        (nc, nf) = (N, r * N)
        ns, nd = (nc, nf) if op == "prolong" else (nf, nc)
        mine = fn(local_dict(Layout(ns, WORLD.size), WORLD, lambda n: layer_data(n, ns)),
                  Layout(ns, WORLD.size), Layout(nd, WORLD.size), WORLD, kind=kind)
        one = fn(local_dict(Layout(ns, 1), MPI.COMM_SELF, lambda n: layer_data(n, ns)),
                 Layout(ns, 1), Layout(nd, 1), MPI.COMM_SELF, kind=kind)
        for n, entry in mine.items():
            for name in SHAPES:
                assert torch.equal(entry[name], one[n][name])

    for_all_depths(check)


@pytest.mark.mpi
@pytest.mark.parametrize("op,kind", [("prolong", "constant"), ("prolong", "linear"),
                                     ("restrict", "injection"),
                                     ("restrict", "full-weighting"),
                                     ("restrict_gradient", "linear")])
def test_dtype_kept_and_sources_untouched(op, kind):
    fn = getattr(transfer, op)
    N, r = max(4, WORLD.size), 2
    ns, nd = (N, r * N) if op == "prolong" else (r * N, N)
    src, dst = Layout(ns, WORLD.size), Layout(nd, WORLD.size)

    def make(n):
        return {k: v.float().requires_grad_() for k, v in layer_data(n, ns).items()}

    local = local_dict(src, WORLD, make)
    before = {n: {k: v.detach().clone() for k, v in e.items()} for n, e in local.items()}
    out = fn(local, src, dst, WORLD, kind=kind)
    for entry in out.values():
        for name, v in entry.items():
            assert v.dtype == torch.float32 and not v.requires_grad
            assert v.shape == torch.Size(SHAPES[name])
    for n, entry in local.items():
        for k, v in entry.items():
            assert torch.equal(v.detach(), before[n][k])
            assert all(v is not w for e in out.values() for w in e.values())


@pytest.mark.mpi
@pytest.mark.parametrize("op,kind", [("restrict", "injection"), ("restrict", "full-weighting"),
                                     ("prolong", "constant"), ("prolong", "linear"),
                                     ("restrict_gradient", "constant")])
def test_a_timeout_on_the_communicator_changes_nothing(op, kind):
    """9 -> 3 layers and back (12 <-> 4 on four ranks) with a limit on the
    communicator, so that the watchdog serves its pings while the layers
    are in flight: the same layers, bit for bit, as without a limit."""
    fn = getattr(transfer, op)
    nc = max(3, WORLD.size)
    ns, nd = (nc, 3 * nc) if op == "prolong" else (3 * nc, nc)
    src, dst = Layout(ns, WORLD.size), Layout(nd, WORLD.size)
    local = local_dict(src, WORLD, lambda n: layer_data(n, ns))
    plain = fn(local, src, dst, WORLD, kind=kind)
    comm = WORLD.Dup()
    set_timeout(comm, 20)
    try:
        timed = fn(local, src, dst, comm, kind=kind)
        outcome = sorted(timed) == sorted(plain) and all(
            torch.equal(timed[n][k], plain[n][k]) for n in plain for k in SHAPES)
    except Exception as e:  # noqa: BLE001 - compared below, on every rank
        outcome = f"{type(e).__name__}: {e}"
    finally:
        outcomes = WORLD.allgather(outcome)
        comm.Free()
    assert outcomes == [True] * WORLD.size


class CountingComm(MPI.Intracomm):
    """The same communicator, counting the point-to-point messages sent and
    received per peer."""

    def __init__(self, comm):  # the handle itself is made by Intracomm.__new__
        self.sent, self.received = {}, {}

    def isend(self, obj, dest, tag=0):
        self.sent[dest] = self.sent.get(dest, 0) + 1
        return super().isend(obj, dest, tag)

    def recv(self, buf=None, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=None):
        self.received[source] = self.received.get(source, 0) + 1
        return super().recv(buf, source, tag, status)


@pytest.mark.mpi
@pytest.mark.parametrize("op", ["prolong", "restrict"])
def test_one_message_per_pair_of_owners(op):
    """Constant prolongation and injection: rank p sends to q != p exactly
    when a layer q receives is a copy of a layer p holds, once per call."""
    P, me = WORLD.size, WORLD.rank
    for N, r in pairs():
        ns, nd = (N, r * N) if op == "prolong" else (r * N, N)
        src, dst = Layout(ns, P), Layout(nd, P)
        comm = CountingComm(WORLD)
        local = local_dict(src, WORLD, lambda n: layer_data(n, ns))
        if op == "prolong":
            prolong(local, src, dst, comm, kind="constant")
            copied_from = lambda d: d // r  # noqa: E731
        else:
            restrict(local, src, dst, comm, kind="injection")
            copied_from = lambda d: r * d  # noqa: E731
        to = {q for q in range(P) if q != me and
              any(src.owner(copied_from(d)) == me for d in dst.layers(q))}
        frm = {src.owner(copied_from(d)) for d in dst.layers(me)} - {me}
        assert comm.sent == {q: 1 for q in to}
        assert comm.received == {q: 1 for q in frm}


def test_messages_go_only_between_owners():
    """The plan of every rank: what p sends to q is exactly what q expects
    from p, only layers p holds, only layers q's targets are made of."""
    for P in (2, 3, 4):
        for N, r in [(5, 3), (7, 2), (8, 4), (4, 1)]:
            if N < P:
                continue
            for op, kind, ns, nd in [("prolong", "linear", N, r * N),
                                     ("restrict", "full-weighting", r * N, N),
                                     ("restrict_gradient", "linear", r * N, N),
                                     ("prolong", "constant", N, r * N)]:
                src, dst = Layout(ns, P), Layout(nd, P)
                plans = [transfer._plan(op, kind, src, dst, q) for q in range(P)]
                for p in range(P):
                    rows, recv_from, send_to = plans[p]
                    assert sorted(rows) == list(dst.layers(p))
                    for q, layers in send_to.items():
                        assert plans[q][1].get(p) == layers
                        assert all(src.owner(s) == p for s in layers)
                        assert all(any(s in {t for t, _ in plans[q][0][d]}
                                       or s == transfer._nearest(op, ns, nd, d)
                                       for d in plans[q][0]) for s in layers)
                    for q, layers in recv_from.items():
                        assert plans[q][2].get(p) == layers
                    if r == 1:
                        assert not recv_from and not send_to


# ---- networks ------------------------------------------------------------------
WIDTH, T = 3, 2.0


def dense_net(nlayers, comm=WORLD, **opts):
    return Network(lambda: DenseOpening(2, WIDTH), lambda n: DenseStep(WIDTH, "tanh"),
                   lambda: DenseClosing(WIDTH, 3), nlayers=nlayers, T=T, comm=comm,
                   seed=11, **opts).double()


def smooth_weights(net):
    """Layer n's weights theta(t_n), t_n = n*h, of a fixed smooth theta(t)."""
    g = torch.Generator().manual_seed(5)
    A = {k: torch.randn(p.shape, generator=g, dtype=F64)
         for k, p in next(iter(layer_params(net).values())).items()}
    B = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in A.items()}
    with torch.no_grad():
        for n, entry in layer_params(net).items():
            t = n * net.body.h
            for k, p in entry.items():
                p.copy_(A[k] + B[k] * math.sin(2.0 * t))


def outputs(net, x):
    """The network's class scores on every rank, checked against its serial
    PyTorch equivalent (an independent forward pass)."""
    with torch.no_grad():
        out = net(x if net.is_first else None)
        out = net.comm.bcast(out if net.is_last else None, root=net.body.last_rank)
        serial = net.serial_equivalent()(x)
    assert torch.allclose(out, serial, rtol=0, atol=1e-12)
    return out


@pytest.mark.mpi
def test_prolonged_network_differs_by_order_h():
    """The N-layer network is forward Euler with step h = T/N for
    du/dt = F(u; theta_N(t)), theta_N piecewise constant on the coarse steps;
    its constant prolongation is forward Euler with step h/r for the same
    ODE.  Both are first order, so their outputs differ by
    (1 - 1/r) * C * h + O(h^2) with C independent of N (theta_N converges
    to a smooth theta): halving h halves the difference, and going from
    r = 2 to r = 3 multiplies it by (2/3) / (1/2) = 4/3."""
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=F64)

    def difference(N, r):
        coarse, fine = dense_net(N), dense_net(r * N)
        smooth_weights(coarse)
        prolong_network(coarse, fine, kind="constant")
        return float((outputs(fine, x) - outputs(coarse, x)).abs().max())

    diffs = [difference(N, 2) for N in (16, 32, 64)]
    rates = [diffs[i] / diffs[i + 1] for i in range(len(diffs) - 1)]
    assert all(1.6 <= q <= 2.4 for q in rates), (diffs, rates)
    assert abs(difference(64, 3) / diffs[-1] - 4 / 3) < 0.1
    assert diffs[-1] > 1e-6  # the two depths do differ: the test measures something

    same = dense_net(max(4, WORLD.size))
    other = Network(lambda: DenseOpening(2, WIDTH), lambda n: DenseStep(WIDTH, "tanh"),
                    lambda: DenseClosing(WIDTH, 3), nlayers=same.body.nlayers, T=T,
                    comm=WORLD, seed=99).double()
    prolong_network(same, other, kind="constant")  # r = 1: a copy
    assert torch.equal(outputs(same, x), outputs(other, x))


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["constant", "linear"])
def test_network_restriction_after_prolongation(kind):
    N = max(4, WORLD.size)
    coarse, fine, again = dense_net(N), dense_net(3 * N), dense_net(N)
    smooth_weights(fine)  # overwritten by the prolongation
    prolong_network(coarse, fine, kind=kind)
    restrict_network(fine, again, kind="injection")  # fine layer 3j is coarse layer j
    for n, entry in layer_params(again).items():
        for k, p in entry.items():
            assert torch.equal(p, layer_params(coarse)[n][k])
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert torch.equal(outputs(coarse, x), outputs(again, x))


@pytest.mark.mpi
def test_layer_grads_are_the_parameters_grads():
    net = dense_net(max(4, WORLD.size))
    zero = layer_grads(net)
    assert all(torch.equal(v, torch.zeros_like(v)) for e in zero.values() for v in e.values())
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    y = torch.tensor([0, 1, 2, 0, 1])
    net.loss(x if net.is_first else None, y if net.is_last else None,
             torch.nn.functional.cross_entropy).backward()
    for n, entry in layer_grads(net).items():
        for k, g in entry.items():
            assert g is layer_params(net)[n][k].grad


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["constant", "linear"])
def test_restricted_gradient_is_the_gradient_through_the_prolongation(kind):
    """For f_H(x_H) = f_h(P x_H), grad f_H = P^T grad f_h(P x_H): the
    layer-parallel fine gradient, restricted, against autograd through the
    prolongation written out in serial PyTorch (coarse weights as leaves,
    each fine layer's weights a function of them)."""
    N, r = max(3, WORLD.size), 2
    coarse, fine = dense_net(N), dense_net(r * N)
    smooth_weights(coarse)
    prolong_network(coarse, fine, kind=kind)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(7, 2, generator=g, dtype=F64), torch.randint(0, 3, (7,), generator=g)
    loss = fine.loss(x if fine.is_first else None, y if fine.is_last else None,
                     torch.nn.functional.cross_entropy)
    loss.backward()
    value = fine.reduce(loss)
    got = restrict_gradient(layer_grads(fine), fine.body.layout, coarse.body.layout, WORLD,
                            kind=kind)

    serial = coarse.serial_equivalent()
    opening, layers, closing = serial[0], list(serial)[1:-1], serial[-1]
    leaves = [dict(L.F.named_parameters()) for L in layers]
    u, h = opening(x), T / (r * N)
    for k in range(r * N):
        j, w = k // r, 0.0
        if kind == "linear" and N > 1:
            j = min(j, N - 2)
            w = k / r - j
        params = {name: a + w * (leaves[j + 1][name] - a) if w else a
                  for name, a in leaves[j].items()}
        u = u + h * torch.func.functional_call(layers[j].F, params, (u,))
    ref = torch.nn.functional.cross_entropy(closing(u), y)
    ref.backward()
    assert abs(float(ref.detach()) - value) <= 1e-12 * abs(value)
    assert sorted(got) == list(coarse.body.layer_indices)
    for j, entry in got.items():
        for name, grad in entry.items():
            assert torch.allclose(grad, leaves[j][name].grad, rtol=0, atol=1e-12), (j, name)


# ---- errors, raised on every rank -----------------------------------------------
@pytest.mark.mpi
def test_bad_arguments_fail_on_every_rank():
    P = WORLD.size
    src = Layout(max(5, P), P)
    local = local_dict(src, WORLD, lambda n: layer_data(n, src.nlayers))
    with pytest.raises(ValueError, match=r"dst.nlayers=\d+ is not an integer multiple "
                                         r"r\*src.nlayers of src.nlayers=\d+"):
        prolong(local, src, Layout(src.nlayers + 2, P), WORLD)
    if src.nlayers - 1 >= P:
        with pytest.raises(ValueError, match=r"src.nlayers=\d+ is not .* of dst.nlayers=\d+"):
            restrict(local, src, Layout(src.nlayers - 1, P), WORLD)
    with pytest.raises(ValueError, match=r"kind='cubic': expected one of 'constant', 'linear'"):
        prolong(local, src, Layout(2 * src.nlayers, P), WORLD, kind="cubic")
    with pytest.raises(ValueError, match=r"kind='constant': expected one of 'injection'"):
        restrict(local, src, src, WORLD, kind="constant")
    with pytest.raises(ValueError, match=r"dst.size=%d but comm has %d ranks" % (P + 1, P)):
        prolong(local, src, Layout(2 * src.nlayers, P + 1), WORLD)
    with pytest.raises(ValueError, match="src must be a braid_ext.Layout"):
        prolong(local, (5, P), src, WORLD)
    # a wrong local dict on one rank only: every rank raises
    bad = {} if WORLD.rank == P - 1 else local
    with pytest.raises(ValueError, match=f"local: rank {P - 1} holds layers"):
        prolong(bad, src, Layout(2 * src.nlayers, P), WORLD)
    # entries that cannot be combined, on some ranks only
    odd = {n: (dict(e, extra=e["bias"]) if n == src.layers(P - 1)[0] else e)
           for n, e in local.items()}
    with pytest.raises(ValueError, match="different entries"):
        prolong(odd, src, Layout(3 * src.nlayers, P), WORLD, kind="linear")
    # still collective afterwards
    assert WORLD.allreduce(1) == P


@pytest.mark.mpi
def test_bad_network_arguments_fail_on_every_rank():
    N = max(4, WORLD.size)
    coarse, fine = dense_net(N), dense_net(2 * N)
    with pytest.raises(ValueError, match=r"fine_net.nlayers=\d+ is not .* of coarse_net.nlayers"):
        prolong_network(coarse, dense_net(2 * N + 1), kind="constant")
    longer = Network(lambda: DenseOpening(2, WIDTH), lambda n: DenseStep(WIDTH, "tanh"),
                     lambda: DenseClosing(WIDTH, 3), nlayers=2 * N, T=2 * T, comm=WORLD,
                     seed=11).double()
    with pytest.raises(ValueError, match=r"fine_net.T=4.0 differs"):
        prolong_network(coarse, longer)
    with pytest.raises(ValueError, match="kind='nearest'"):
        restrict_network(fine, coarse, kind="nearest")
    with pytest.raises(TypeError, match="Network or LayerParallel"):
        prolong_network(coarse, torch.nn.Linear(2, 2))
