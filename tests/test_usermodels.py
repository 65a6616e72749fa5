"""User residual steps with state under layer-parallel propagation: frozen
parameters, dropout, batch norm and train/eval mode, against the serial
network with the same weights and the same per-layer random draws
(layerpar.models' policy), on 1, 2 and 4 ranks."""
import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar import DenseClosing, DenseOpening, DenseStep, Network
from layerpar.engine.policy import layer_rng
from conftest import gathered, network_name
from userblocks import Block, NormBlock

F64 = torch.float64
WORLD = MPI.COMM_WORLD
N, WIDTH, SEED = 8, 6, 4
CONVERGED = dict(max_levels=3, cfactor=2, min_coarse=1, fwd_iters=40, bwd_iters=40,
                 fwd_tol=1e-13, bwd_tol=1e-13)
INEXACT = dict(max_levels=3, cfactor=2, min_coarse=1, fwd_iters=2, bwd_iters=1)


def net(comm, step=lambda n: Block(WIDTH, p=0.3), **opts):
    return Network(lambda: DenseOpening(2, WIDTH), step, lambda: DenseClosing(WIDTH, 3),
                   nlayers=N, T=2.0, comm=comm, seed=SEED, **opts).double()


def batch(size=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 2, generator=g, dtype=F64), torch.randint(0, 3, (size,), generator=g)


def serial_forward(seq, x, pass_index):
    """The serial network (opening, N residual layers, closing), each layer
    drawing its random numbers from layer_rng(SEED, pass_index, n)."""
    u = seq[0](x)
    for n in range(N):
        with layer_rng(SEED, pass_index, n):
            u = seq[n + 1](u)
    return seq[-1](u)


def serial_names(seq):
    """serial_equivalent()'s parameter names -> the Network's."""
    return {name: network_name(name, N) for name, _ in seq.named_parameters()}


@pytest.mark.mpi
@pytest.mark.parametrize("opts", [{}, CONVERGED], ids=["exact", "converged-multilevel"])
def test_frozen_parameters_and_dropout_gradients_equal_serial(opts):
    # training mode, dropout p=0.3, frozen V and c in every layer: loss and
    # gradients of the trained parameters equal serial autograd with the same
    # masks; frozen parameters get no gradient
    m = net(WORLD, **opts)
    x, y = batch()
    seq = m.serial_equivalent()
    p = m.body.passes
    loss = m.loss(x, y, Fn.cross_entropy)
    loss.backward()
    ref = Fn.cross_entropy(serial_forward(seq, x, p), y)
    ref.backward()
    assert abs(m.reduce(loss) - float(ref.detach())) <= 1e-13 * float(ref.detach())
    frozen = [k for k, q in m.named_parameters() if not q.requires_grad]
    assert len(frozen) == 2 * len(m.body.layer_indices)
    assert all(q.grad is None for q in m.parameters() if not q.requires_grad)
    grads = gathered(WORLD, ((k, q.grad) for k, q in m.named_parameters()
                             if q.requires_grad))
    names = serial_names(seq)
    sgrads = {names[k]: q.grad for k, q in seq.named_parameters() if q.requires_grad}
    assert grads.keys() == sgrads.keys() and len(grads) == 2 * N + 4
    for k, g in grads.items():
        assert torch.allclose(g, sgrads[k], rtol=1e-12, atol=1e-15), k


@pytest.mark.mpi
def test_pipelined_micro_batches_draw_their_own_masks_on_any_number_of_ranks():
    # the exact pipeline with 3 micro-batches (sizes 4, 3, 3), dropout and
    # frozen parameters: micro-batch i of layer n draws from
    # layer_rng(SEED, pass, n, part=i) on any number of ranks, so the loss and
    # gradients equal the serial network's run micro-batch by micro-batch
    m = net(WORLD, microbatches=3)
    x, y = batch()
    seq = m.serial_equivalent()
    p = m.body.passes
    loss = m.loss(x, y, Fn.cross_entropy)
    loss.backward()
    outs = []
    for i, xi in enumerate(x.tensor_split(3)):
        u = seq[0](xi)
        for n in range(N):
            with layer_rng(SEED, p, n, part=i):
                u = seq[n + 1](u)
        outs.append(seq[-1](u))
    ref = Fn.cross_entropy(torch.cat(outs), y)
    ref.backward()
    assert abs(m.reduce(loss) - float(ref.detach())) <= 1e-13 * float(ref.detach())
    assert all(q.grad is None for q in m.parameters() if not q.requires_grad)
    grads = gathered(WORLD, ((k, q.grad) for k, q in m.named_parameters() if q.requires_grad))
    names = serial_names(seq)
    sgrads = {names[k]: q.grad for k, q in seq.named_parameters() if q.requires_grad}
    assert grads.keys() == sgrads.keys() and len(grads) == 2 * N + 4
    for k, g in grads.items():
        assert torch.allclose(g, sgrads[k], rtol=1e-12, atol=1e-15), k


def _change_layers(layers):
    """The same changes on both networks: layer 2 replaced, layer 3's weight
    replaced by a new Parameter, layer 4's bias frozen, layer 5's linear map
    replaced by a new module (values seeded per layer).  ``layers``: {n:
    set(module=None) -> the module of layer n} for the layers to change."""
    def make(n, shape):
        g = torch.Generator().manual_seed(100 + n)
        return torch.randn(shape, generator=g, dtype=F64) * 0.5

    def filled(module, n):
        with torch.no_grad():
            for q in module.parameters():
                q.copy_(make(n, q.shape))
        return module
    if 2 in layers:
        layers[2](filled(DenseStep(WIDTH, "tanh").double(), 2))
    if 3 in layers:
        layers[3]().linear.weight = torch.nn.Parameter(make(3, (WIDTH, WIDTH)))
    if 4 in layers:
        layers[4]().linear.bias.requires_grad_(False)
    if 5 in layers:
        layers[5]().linear = filled(torch.nn.Linear(WIDTH, WIDTH).double(), 5)


@pytest.mark.mpi
@pytest.mark.parametrize("micro", [1, 3])
def test_layers_changed_between_passes_are_seen(micro):
    # the engine keeps its walk of the layers (modules, parameters, call plan)
    # between passes; a layer replaced, a parameter replaced, a bias frozen
    # and a submodule replaced after a pass are seen by the next one: loss and
    # gradients equal serial autograd with the same changes
    m = net(WORLD, step=lambda n: DenseStep(WIDTH, "tanh"), microbatches=micro)
    x, y = batch()
    m.loss(x, y, Fn.cross_entropy).backward()  # a first pass fills the caches
    seq = m.serial_equivalent()

    def setter(n):
        def set_layer(module=None):
            if module is not None:
                m.body.layers[str(n)] = module
            return m.body.layer(n)
        return set_layer

    def serial_setter(n):
        def set_layer(module=None):
            if module is not None:
                seq[n + 1].F = module
            return seq[n + 1].F
        return set_layer

    local = m.body.layer_indices
    _change_layers({n: setter(n) for n in range(N) if n in local})
    _change_layers({n: serial_setter(n) for n in range(N)})
    m.zero_grad()
    loss = m.loss(x, y, Fn.cross_entropy)
    loss.backward()
    ref = Fn.cross_entropy(seq(x), y)
    ref.backward()
    assert abs(m.reduce(loss) - float(ref.detach())) <= 1e-13 * float(ref.detach())
    grads = gathered(WORLD, ((k, q.grad) for k, q in m.named_parameters() if q.requires_grad))
    names = serial_names(seq)
    sgrads = {names[k]: q.grad for k, q in seq.named_parameters() if q.requires_grad}
    assert grads.keys() == sgrads.keys() and len(grads) == 2 * N + 4 - 1
    for k, gk in grads.items():
        assert torch.allclose(gk, sgrads[k], rtol=1e-12, atol=1e-15), k
    assert all(q.grad is None for q in m.parameters() if not q.requires_grad)


@pytest.mark.mpi
def test_frozen_parameters_stay_fixed_in_training():
    m = net(WORLD, **INEXACT)
    before = {k: q.detach().clone() for k, q in m.named_parameters()}
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    for s in range(3):
        x, y = batch(seed=s)
        opt.zero_grad()
        m.loss(x, y, Fn.cross_entropy).backward()
        opt.step()
    for k, q in m.named_parameters():
        assert torch.equal(q, before[k]) != q.requires_grad, k


@pytest.mark.mpi
@pytest.mark.parametrize("opts", [INEXACT, dict(INEXACT, fwd_iters=1, cfactor=4, max_levels=2)])
def test_dropout_masks_do_not_depend_on_the_number_of_ranks(opts):
    # inexact MGRIT in training mode: every call of layer n in a pass (owner,
    # ghost copy on another rank, coarse grid) draws the same mask, so the
    # result on WORLD is the one-rank result up to round-off
    x, y = batch(seed=3)
    outs = []
    for comm in (WORLD, MPI.COMM_SELF):
        m = net(comm, **opts)
        for _ in range(2):  # the second pass draws other masks than the first
            out = m(x)
        value = m.reduce(Fn.cross_entropy(out, y) if m.is_last else 0.0)
        outs.append(value)
    assert abs(outs[0] - outs[1]) <= 1e-13 * abs(outs[1])


def _norm_net(comm, **opts):
    return net(comm, step=lambda n: NormBlock(WIDTH), **opts)


def _running(m, comm):
    return gathered(comm, ((k, b) for k, b in m.named_buffers()))


@pytest.mark.mpi
@pytest.mark.parametrize("opts", [{}, CONVERGED], ids=["exact", "converged-multilevel"])
def test_batch_norm_statistics_updated_once_per_forward(opts):
    m = _norm_net(WORLD, **opts)
    seq = m.serial_equivalent()
    x, y = batch(size=16)
    for s in range(2):
        xs = x + s
        loss = m.loss(xs, y, Fn.cross_entropy)
        loss.backward()
        ref = Fn.cross_entropy(seq(xs), y)
        ref.backward()
        assert abs(m.reduce(loss) - float(ref.detach())) <= 1e-12 * float(ref.detach())
    bufs = _running(m, WORLD)
    names = {k: v for k, v in serial_names_buffers(seq).items()}
    assert len(bufs) == 3 * N
    for k, b in bufs.items():
        sref = names[k]
        if k.endswith("num_batches_tracked"):
            assert int(b) == 2  # two forward passes, one update each
        else:
            assert torch.allclose(b, sref, rtol=1e-12, atol=1e-14), k


def serial_names_buffers(seq):
    out = {}
    for name, b in seq.named_buffers():
        idx, rest = name.split(".", 1)
        out[f"body.layers.{int(idx) - 1}.{rest.removeprefix('F.')}"] = b
    return out


@pytest.mark.mpi
def test_eval_mode_batch_norm_and_ghosts_follow_the_owner():
    # after training steps the running statistics differ from their initial
    # values; in eval mode the exact network equals the serial one, and the
    # inexact one (coarse steps on ghost copies, which must be in eval mode
    # too) gives the one-rank result
    x, y = batch(size=16)
    values = []
    for comm in (WORLD, MPI.COMM_SELF):
        m = _norm_net(comm, **INEXACT)
        for s in range(2):
            m.loss(x + s, y, Fn.cross_entropy).backward()
        m.eval()
        with torch.no_grad():
            before = _running(m, comm)
            out = m(x)
            after = _running(m, comm)
        assert all(torch.equal(before[k], after[k]) for k in before)  # eval: no update
        values.append(m.reduce(Fn.cross_entropy(out, y) if m.is_last else 0.0))
        if comm is WORLD:
            exact = _norm_net(WORLD)
            exact.load_state_dict(m.state_dict())
            exact.eval()
            seq = exact.serial_equivalent()
            seq.eval()
            with torch.no_grad():
                out = exact(x)  # collective
                got = exact.reduce(Fn.cross_entropy(out, y) if exact.is_last else 0.0)
                ref = float(Fn.cross_entropy(seq(x), y))
            assert abs(got - ref) <= 1e-13 * ref
    assert abs(values[0] - values[1]) <= 1e-13 * abs(values[1])


@pytest.mark.mpi
def test_eval_outputs_identical_on_sub_communicators():
    # the same trained weights evaluated on 1, 2, 4 ranks (as many as WORLD
    # has): identical outputs in exact mode, and equal to the serial network
    x, _ = batch(size=12, seed=8)
    ref = net(MPI.COMM_SELF)
    state = None
    if WORLD.rank == 0:
        opt = torch.optim.SGD(ref.parameters(), lr=0.2)
        for s in range(3):
            xb, yb = batch(seed=s)
            opt.zero_grad()
            ref.loss(xb, yb, Fn.cross_entropy).backward()
            opt.step()
        state = ref.serial_equivalent().state_dict()
    state = WORLD.bcast(state, root=0)
    seq = ref.serial_equivalent()
    seq.load_state_dict(state)
    seq.eval()
    with torch.no_grad():
        expected = seq(x)
    for size in (1, 2, 4):
        if size > WORLD.size:
            continue
        sub = WORLD.Split(0 if WORLD.rank < size else MPI.UNDEFINED, WORLD.rank)
        out = None
        if sub != MPI.COMM_NULL:
            m = net(sub)
            m.opening.load_state_dict(_part(state, "0.")) if m.is_first else None
            m.closing.load_state_dict(_part(state, f"{N + 1}.")) if m.is_last else None
            for n in m.body.layer_indices:
                m.body.layer(n).load_state_dict(_part(state, f"{n + 1}.F."))
            m.eval()
            with torch.no_grad():
                out = m(x)
            out = out if m.is_last else None
            sub.Free()
        outs = [o for o in WORLD.allgather(out) if o is not None]
        assert len(outs) == 1
        assert torch.allclose(outs[0], expected, rtol=1e-14, atol=1e-15)
        if size == 1:
            first = outs[0]
        assert torch.equal(outs[0], first)


def _part(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
