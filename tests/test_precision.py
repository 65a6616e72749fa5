"""Reduced precision: bfloat16 states and weights, exact and layer-parallel.

The rule: the state's dtype decides the forward states, the weights and the
messages; a half-precision state's adjoint is carried in float32 (summed and
sent in float32, each layer's vector-Jacobian product taken in the layer's
dtype); the norms the solver compares are computed in float32.

Tolerance (derived): serial autograd in bfloat16 differs from the exact
(float64) gradient of the same bfloat16-rounded weights by e_s, an
accumulation of one rounding (u = 2^-8) per operation along N layers.
layerpar's bfloat16 gradient is made of the same layer operations in the
same dtype; it differs only in where the adjoint is summed (float32: fewer
roundings) and, for MGRIT, in the coarse-grid corrections, which vanish once
the iterations are exact (fwd_iters/bwd_iters >= the fine points a coarse
interval holds).  So its error against float64 is at most that of serial
bfloat16 plus a rounding of the result:  |g - g64| <= 2 e_s + 4 u |g64|
(factor 2: the roundings of the two computations need not coincide).

Rank invariance: the same run on COMM_WORLD and alone on COMM_SELF gives
bitwise the same losses, gradients and residual histories.
"""
import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar import DenseClosing, DenseOpening, DenseStep, Network

from conftest import gathered, network_name

WORLD = MPI.COMM_WORLD
BF16 = torch.bfloat16
U = 2.0 ** -8  # unit round-off of bfloat16

MODES = {
    "exact": dict(max_levels=1),
    "mgrit": dict(max_levels=2, cfactor=2, fwd_iters=6, bwd_iters=6, min_coarse=1),
}


def make(comm, mode, dtype=BF16):
    return Network(lambda: DenseOpening(3, 6), lambda n: DenseStep(6, "tanh"),
                   lambda: DenseClosing(6, 3), nlayers=8, T=1.0, comm=comm, seed=11,
                   **MODES[mode]).to(dtype)


def batch(dtype):
    g = torch.Generator().manual_seed(4)
    return torch.randn(7, 3, generator=g).to(dtype), torch.randint(0, 3, (7,), generator=g)


def run(net, steps=1):
    """Losses, gathered gradients by name and residual histories of
    ``steps`` plain SGD steps."""
    x, y = batch(BF16)
    out = []
    for _ in range(steps):
        net.zero_grad()
        loss = net.loss(x, y, Fn.cross_entropy)
        loss.backward()
        grads = gathered(net.comm, ((k, p.grad) for k, p in net.named_parameters()))
        hist = (net.body.last_forward.get("residual_norms"),
                net.body.last_backward.get("residual_norms"))
        out.append((net.reduce(loss), grads, hist))
        with torch.no_grad():
            for p in net.parameters():
                p.sub_(0.1 * p.grad)
    return out


def serial(net, dtype):
    """Gradients of serial autograd in ``dtype`` from the network's
    (bfloat16) weights, by the Network's parameter names."""
    seq = net.serial_equivalent().to(dtype)
    x, y = batch(BF16)
    Fn.cross_entropy(seq(x.to(dtype)), y).backward()
    return {network_name(k, net.body.nlayers): p.grad.double()
            for k, p in seq.named_parameters()}


def flat(grads):
    return torch.cat([grads[k].double().flatten() for k in sorted(grads)])


@pytest.mark.mpi
@pytest.mark.parametrize("mode", sorted(MODES))
def test_bf16_gradients_within_the_derived_tolerance(mode):
    net = make(WORLD, mode)
    try:
        g64, gbf = flat(serial(net, torch.float64)), flat(serial(net, BF16))
        (_, grads, _), = run(net)
    finally:
        net.close()
    g = flat(grads)
    e_s = float((gbf - g64).norm())
    err = float((g - g64).norm())
    bound = 2 * e_s + 4 * U * float(g64.norm())
    ok = (err <= bound, err, bound, e_s)
    outcomes = WORLD.allgather(ok)
    assert all(o[0] for o in outcomes), outcomes
    # the bound is not vacuous: bfloat16 is far from float64 here
    assert e_s > 1e-4 * float(g64.norm())


@pytest.mark.mpi
@pytest.mark.parametrize("mode", sorted(MODES))
def test_bf16_rank_invariance_bitwise(mode):
    many, alone = make(WORLD, mode), make(MPI.COMM_SELF, mode)
    try:
        a, b = run(many, steps=2), run(alone, steps=2)
    finally:
        many.close()
        alone.close()
    same = all(x[0] == y[0] and x[2] == y[2] and x[1].keys() == y[1].keys()
               and all(torch.equal(x[1][k], y[1][k]) for k in x[1])
               for x, y in zip(a, b))
    assert WORLD.allgather(same) == [True] * WORLD.size


def test_half_norms_and_adjoint_dtype():
    from layerpar.engine.vectors import TorchVectors, adjoint_dtype
    v = TorchVectors()
    v.configure((3, 300), BF16, "cpu")
    u = torch.full((3, 300), 1.0 / 3.0, dtype=BF16)
    # float32 accumulation: the norm of 900 equal entries to float32 accuracy
    want = float(u[0, 0].double()) * 30.0
    assert abs(v.norm(u) - want) <= 1e-6 * want
    assert adjoint_dtype(BF16) == adjoint_dtype(torch.float16) == torch.float32
    assert adjoint_dtype(torch.float64) == torch.float64
    # a message round trip keeps every bit
    buf = bytearray(v.bufsize())
    v.pack(u, memoryview(buf))
    assert torch.equal(v.unpack(memoryview(bytes(buf))), u)
