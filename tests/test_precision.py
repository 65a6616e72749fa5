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


# ---- float32 master weights (layerpar.optim.SGD, layerpar.optim.Adam) --------------------

OPTIMIZERS = {"sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
              "adam": (torch.optim.Adam, dict(lr=1e-3))}


def master_optimizer(name, params):
    import layerpar.optim as lo
    cls, kw = OPTIMIZERS[name]
    return getattr(lo, cls.__name__)(params, **kw)


def gradients(step, shapes, dtype):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def stepped_side_by_side(name, ours, ref, shapes, dtype, steps, check=None):
    """``steps`` steps of the master optimiser over ``ours`` and of the torch
    optimiser over ``ref``, fed the same gradients (of ``dtype``; ref's in
    its own dtype); ``check(optimizer)`` after each.  The master optimiser."""
    a, b = master_optimizer(name, ours), OPTIMIZERS[name][0](ref, **OPTIMIZERS[name][1])
    for k in range(steps):
        for p, q, g in zip(ours, ref, gradients(k, shapes, dtype)):
            p.grad, q.grad = g.clone(), g.clone().to(q.dtype)
        a.step()
        b.step()
        if check is not None:
            check(a)
    return a


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_master_optimizer_steps_other_dtypes_as_torch(name, dtype):
    # no copy for float32/float64 parameters: the torch optimiser's steps, bit for bit
    shapes = [(4, 3), (3,)]
    ours = [torch.nn.Parameter(g) for g in gradients(-1, shapes, dtype)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = stepped_side_by_side(name, ours, ref, shapes, dtype, steps=4)
    assert all(torch.equal(p, q) for p, q in zip(ours, ref))
    assert all("master" not in a.state[p] for p in ours)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_master_weights_are_a_float32_run_rounded(name):
    # independent computation: the torch optimiser on float32 parameters,
    # fed the bfloat16 gradients; the bfloat16 weights are its rounding
    shapes = [(5, 4), (4,)]
    g0 = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=g0).to(BF16) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    ref = [torch.nn.Parameter(t.float()) for t in start]

    def check(a):
        for p, q in zip(ours, ref):
            assert p.dtype == BF16 and p.grad.dtype == BF16
            assert a.state[p]["master"].dtype == torch.float32
            assert torch.equal(a.state[p]["master"], q.detach())
            assert torch.equal(p.detach(), q.detach().to(BF16))
            assert all(v.dtype == torch.float32 for k2, v in a.state[p].items()
                       if k2 != "step" and isinstance(v, torch.Tensor))

    stepped_side_by_side(name, ours, ref, shapes, BF16, steps=6, check=check)


def test_master_weights_keep_updates_that_bfloat16_rounds_away():
    # 1 + 1e-4 is 1 in bfloat16 (u = 2^-8): plain bfloat16 SGD never moves,
    # the master weight accumulates 200 such steps and the weight follows
    w0 = torch.ones(3, dtype=BF16)
    plain, kept = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    import layerpar.optim as lo
    a, b = torch.optim.SGD([plain], lr=1e-4), lo.SGD([kept], lr=1e-4)
    for _ in range(200):
        plain.grad = torch.full((3,), -1.0, dtype=BF16)
        kept.grad = plain.grad.clone()
        a.step()
        b.step()
    assert torch.equal(plain.detach(), w0)
    assert torch.allclose(b.state[kept]["master"], torch.full((3,), 1.02), rtol=0, atol=1e-5)
    assert torch.equal(kept.detach(), torch.full((3,), 1.02).to(BF16))


def test_master_weight_restarts_when_the_parameter_is_changed_elsewhere():
    import layerpar.optim as lo
    p = torch.nn.Parameter(torch.ones(4, dtype=BF16))
    opt = lo.Adam([p], lr=1e-3)
    p.grad = torch.ones(4, dtype=BF16)
    opt.step()
    with torch.no_grad():
        p.fill_(2.0)  # e.g. loaded or transferred
    p.grad = torch.zeros(4, dtype=BF16)
    moments = opt.state[p]["exp_avg"].clone()
    opt.step()
    # Adam with a zero gradient: the update is -lr * m_hat / (sqrt(v_hat) + eps),
    # from the new value 2, not from the old master near 1
    ref = torch.nn.Parameter(torch.full((4,), 2.0))
    r = torch.optim.Adam([ref], lr=1e-3)
    ref.grad = torch.ones(4)
    r.step()
    with torch.no_grad():
        ref.fill_(2.0)
    ref.grad = torch.zeros(4)
    r.step()
    assert torch.equal(opt.state[p]["master"], ref.detach())
    assert torch.equal(r.state[ref]["exp_avg"], opt.state[p]["exp_avg"])
    assert not torch.equal(moments, opt.state[p]["exp_avg"])


def test_master_state_survives_a_checkpoint_round_trip():
    # optimizer_state / restore_optimizer_state keep the float32 master and
    # moments of a bfloat16 parameter: the resumed steps equal the uninterrupted ones
    import layerpar.optim as lo
    from layerpar.checkpoint import optimizer_state, restore_optimizer_state

    def steps(p, opt, ks):
        for k in ks:
            p.grad = gradients(k, [(6,)], BF16)[0]
            opt.step()

    full = torch.nn.Parameter(torch.linspace(-1, 1, 6).to(BF16))
    part = torch.nn.Parameter(full.detach().clone())
    a, b = lo.Adam([full], lr=1e-2), lo.Adam([part], lr=1e-2)
    steps(full, a, range(6))
    steps(part, b, range(3))
    saved = optimizer_state(b, {"layers": {0: {"w": part}}})
    assert saved["layers"][0]["w"]["master"].dtype == torch.float32
    again = torch.nn.Parameter(part.detach().clone())
    c = lo.Adam([again], lr=1e-2)
    restore_optimizer_state(c, {"layers": {0: {"w": again}}}, saved)
    assert c.state[again]["master"].dtype == torch.float32
    assert c.state[again]["exp_avg"].dtype == torch.float32
    steps(again, c, range(3, 6))
    assert torch.equal(again.detach(), full.detach())
    assert torch.equal(c.state[again]["master"], a.state[full]["master"])
