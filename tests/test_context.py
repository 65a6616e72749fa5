"""Context for steps (a padding mask carried to every rank with the batch) and
the transformer kind: outputs and gradients of exact, pipelined (GPipe and
1F1B, uneven micro-batches, the mask sliced per micro-batch) and converged
layer-parallel passes equal serial autograd of the same module stack, with
padding that differs per sample; the random-draw and NaN policies; bad
settings refused on every rank, naming the key or array.

MPI tests run on COMM_WORLD (1, 2 and 4 ranks); each rank compares with the
serial stack it builds from the gathered weights."""
import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI
from torch import nn

from layerpar import LayerParallel, Network
from layerpar.engine.policy import layer_rng, takes_context
from layerpar.steps import ResidualLayer, SerialStack
from layerpar.transformer import PoolClosing, TokenOpening, TransformerBlock

from conftest import gathered, network_name

F64 = torch.float64
WORLD = MPI.COMM_WORLD
N, WIDTH, HEADS, TOKENS, LENGTH, CLASSES = 8, 8, 2, 9, 6, 3

MODES = {
    "exact": dict(),
    "gpipe-3": dict(microbatches=3),
    "1f1b-3": dict(microbatches=3, schedule="1f1b"),
    "mgrit": dict(max_levels=2, cfactor=2, fwd_iters=N, bwd_iters=N),
    "mgrit-3lv": dict(max_levels=3, cfactor=2, relax="FCF", fwd_iters=N, bwd_iters=N),
}


def tokens(batch=7, seed=0):
    """Token inputs whose padding (id 0 at the end) differs per sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, TOKENS, (batch, LENGTH), generator=g)
    lengths = torch.arange(batch) % (LENGTH - 1) + 2
    x[torch.arange(LENGTH)[None, :] >= lengths[:, None]] = 0
    return x, torch.randint(0, CLASSES, (batch,), generator=g)


def net(comm=WORLD, dropout=0.0, **opts):
    return Network(lambda: TokenOpening(TOKENS, WIDTH, LENGTH),
                   lambda n: TransformerBlock(WIDTH, HEADS, 2, dropout),
                   lambda: PoolClosing(WIDTH, CLASSES), nlayers=N, T=2.0, comm=comm,
                   seed=3, **opts).double()


def gathered_grads(network):
    return gathered(network.comm, ((k, p.grad) for k, p in network.named_parameters()))


def serial_grads(seq):
    return {network_name(k, N): p.grad.detach().clone() for k, p in seq.named_parameters()}


def outcomes(check):
    """Collective: run check() here, then raise on every rank the first
    rank's failure (no rank waits in the gather)."""
    try:
        check()
        mine = None
    except Exception as e:  # noqa: BLE001 - re-raised on every rank below
        mine = f"{type(e).__name__}: {e}"
    failed = [(r, m) for r, m in enumerate(WORLD.allgather(mine)) if m is not None]
    assert not failed, f"rank {failed[0][0]}: {failed[0][1]}"


@pytest.mark.mpi
@pytest.mark.parametrize("mode", list(MODES))
def test_transformer_with_padding_equals_serial_autograd(mode):
    network = net(**MODES[mode])
    x, y = tokens()
    loss, out = network.loss_and_backward(x if network.is_first else None, y, Fn.cross_entropy)
    value = network.reduce(loss)
    grads = gathered_grads(network)
    seq = network.serial_equivalent()
    network.close()

    def check():
        ref = Fn.cross_entropy(seq(x), y)
        ref.backward()
        assert abs(value - float(ref.detach())) < 1e-12
        expected = serial_grads(seq)
        assert expected.keys() == grads.keys()
        for k in expected:
            assert torch.allclose(grads[k], expected[k], rtol=0, atol=1e-12), k
        # the mask matters: without it the serial stack gives another loss
        with torch.no_grad():
            u = seq[0].embed(x) + seq[0].positions(torch.arange(LENGTH).expand(len(x), LENGTH))
            for layer in seq[1:N + 1]:
                u = layer(u)
            plain = Fn.cross_entropy(seq[N + 1](u), y)
        assert abs(float(plain) - value) > 1e-6
    outcomes(check)


class MaskedMix(nn.Module):
    """A user's step taking the context: F(u) = tanh(W u + mean of the kept
    tokens' W u), padded tokens left out of the mean."""

    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, u, *, context):
        v = self.linear(u)
        keep = context["mask"].to(u.dtype).unsqueeze(-1)
        mean = (v * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
        return torch.tanh(v + mean)


@pytest.mark.mpi
@pytest.mark.parametrize("opts", [dict(), dict(microbatches=3),
                                  dict(max_levels=2, cfactor=2, fwd_iters=N, bwd_iters=N)],
                         ids=["exact", "gpipe-3", "mgrit"])
def test_body_with_a_given_context_and_input_gradient(opts):
    """LayerParallel.forward(u0, context=...) with a context given on the
    first rank only; the input's gradient and the layers' match the serial
    layers called with the same context."""
    g = torch.Generator().manual_seed(1)
    B, L = 5, 4
    u0 = torch.randn(B, L, WIDTH, dtype=F64, generator=g, requires_grad=True)
    mask = torch.arange(L)[None, :] < torch.tensor([1, 2, 3, 4, 2])[:, None]
    w = torch.randn(B, L, WIDTH, dtype=F64, generator=g)
    body = LayerParallel(lambda n: MaskedMix(WIDTH), N, 1.0, WORLD, seed=2, **opts).double()
    first = body.rank == 0
    out = body(u0 if first else None, context={"mask": mask} if first else None)
    (out * w).sum().backward() if body.rank == body.size - 1 else out.sum().backward()
    outs = WORLD.allgather(out.detach() if body.rank == body.size - 1 else None)
    grads = {}
    for part in WORLD.allgather({n: [p.grad.clone() for p in body.layer(n).parameters()]
                                 for n in body.layer_indices}):
        grads.update(part)
    gu = WORLD.bcast(u0.grad if first else None, root=0)
    layers = body.serial_layers()
    body.close()

    def check():
        x = u0.detach().clone().requires_grad_(True)
        u = x
        for layer in layers:
            u = layer(u, context={"mask": mask})
        (u * w).sum().backward()
        assert torch.allclose(outs[-1], u.detach(), rtol=0, atol=1e-12)
        assert torch.allclose(gu, x.grad, rtol=0, atol=1e-12)
        for n, layer in enumerate(layers):
            for a, b in zip(grads[n], layer.F.parameters()):
                assert torch.allclose(a, b.grad, rtol=0, atol=1e-12), n
    outcomes(check)


@pytest.mark.mpi
def test_plain_steps_pay_nothing_and_only_users_receive():
    """A context given to a network whose layers do not take it is checked
    but sent nowhere; with every other layer taking it, only the ranks
    holding such a layer (exact mode) receive it."""
    from layerpar import DenseStep
    x = torch.randn(4, 3, WIDTH, dtype=F64)
    mask = torch.ones(4, 3, dtype=torch.bool)
    body = LayerParallel(lambda n: DenseStep(WIDTH), N, 1.0, WORLD).double()
    first = body.rank == 0
    body(x if first else None, context={"mask": mask} if first else None)
    plain = body._context_users[1], body.last_context
    body(x if first else None)  # no context: no agreement, nothing sent
    body.close()
    takes = [n % 4 == 0 for n in range(N)]  # layers 0 and 4
    body = LayerParallel(lambda n: MaskedMix(WIDTH) if takes[n] else DenseStep(WIDTH), N, 1.0,
                         WORLD).double()
    body(x if first else None, context={"mask": mask} if first else None)
    got = body.last_context is not None
    users = body._context_users[1]
    expected = [r for r in range(WORLD.size)
                if any(takes[n] for n in body.layout.layers(r))]
    body.close()

    def check():
        assert plain == ((), None)
        assert list(users) == expected
        assert got == (WORLD.rank in expected)
    outcomes(check)


@pytest.mark.mpi
def test_dropout_masks_do_not_depend_on_the_ranks():
    """Training-mode dropout in the blocks: exact and converged MGRIT
    passes equal the serial stack run under each layer's seeded RNG."""
    x, y = tokens(seed=2)
    results = {}
    for mode in ("exact", "mgrit"):
        network = net(dropout=0.2, **MODES[mode])
        loss, _ = network.loss_and_backward(x if network.is_first else None, y,
                                            Fn.cross_entropy)
        results[mode] = (network.reduce(loss), gathered_grads(network))
        seq = network.serial_equivalent()
        network.close()

    def check():
        p = 0  # the first pass of each network
        with layer_rng(3, p, -1):
            u, context = seq[0](x)
        for n in range(N):
            with layer_rng(3, p, n):
                u = seq[n + 1](u, context=context)
        ref = Fn.cross_entropy(seq[N + 1](u, context=context), y)
        ref.backward()
        expected = serial_grads(seq)
        for mode, (value, grads) in results.items():
            assert abs(value - float(ref.detach())) < 1e-12, mode
            for k in expected:
                assert torch.allclose(grads[k], expected[k], rtol=0, atol=1e-12), (mode, k)
    outcomes(check)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["exact", "mgrit"])
def test_nan_in_a_block_is_named_on_every_rank(mode):
    network = net(**MODES[mode])
    if 5 in network.body.layer_indices:
        with torch.no_grad():
            network.body.layer(5).mlp[0].weight.fill_(float("nan"))
    x, y = tokens()
    with pytest.raises(FloatingPointError, match="layer 5 produced NaN or Inf"):
        network.loss_and_backward(x if network.is_first else None, y, Fn.cross_entropy)
    network.close()


@pytest.mark.mpi
@pytest.mark.parametrize("case", ["heads", "mask-shape", "mask-batch", "length"])
def test_bad_settings_refused_on_every_rank_naming_the_key(case):
    x, y = tokens()
    if case == "heads":
        with pytest.raises(ValueError, match=r"model.heads = 3 does not divide model.width = 8"):
            LayerParallel(lambda n: TransformerBlock(8, 3), N, 1.0, WORLD)
        return
    network = net()
    first = network.is_first
    if case == "length":
        long = torch.ones(len(x), LENGTH + 2, dtype=torch.long)
        with pytest.raises(ValueError, match=r"longer than the positions: model.max_length = 6"):
            network(long if first else None)
    else:
        bad = torch.ones(len(x), LENGTH + 1, dtype=torch.bool) if case == "mask-shape" \
            else torch.ones(len(x) - 1, LENGTH, dtype=torch.bool)
        name = r"context\['mask'\] has shape"
        with pytest.raises(ValueError, match=name) as info:
            network(x if first else None, context={"mask": bad} if first else None)
        assert "\n" not in str(info.value)
    # the network stays usable
    out = network(x if first else None)
    network.close()
    assert out is not None


def test_context_keyword_is_what_makes_a_step_take_it():
    class Flagged(nn.Module):
        takes_context = True

        def forward(self, u, **kw):
            return u
    assert takes_context(TransformerBlock(4, 2))
    assert takes_context(MaskedMix(4)) and takes_context(Flagged())
    assert not takes_context(nn.Linear(2, 2)) and takes_context(TokenOpening(3, 4, 5))
    assert takes_context(PoolClosing(4, 2))


def test_serial_layers_see_a_step_put_in_place_of_another():
    # ResidualLayer and SerialStack read which modules take the context once
    # per module: a step replaced after a call, by one that takes the context
    # and back, is called as it needs
    class Seen(nn.Module):
        def forward(self, u, context=None):
            return u * context["scale"]
    u, ctx = torch.ones(2, 3), {"scale": torch.full((2, 1), 3.0)}
    layer = ResidualLayer(nn.Identity(), 0.5)
    stack = SerialStack(nn.Identity(), layer)
    assert torch.equal(stack(u, context=ctx), 1.5 * u)
    layer.F = Seen()
    stack[0] = Seen()
    assert torch.equal(stack(u, context=ctx), 3.0 * u + 0.5 * 9.0 * u)
    layer.F = nn.Identity()
    assert torch.equal(layer(u, context=ctx), 1.5 * u)


@pytest.mark.mpi
def test_transformer_prolonged_to_twice_the_depth_and_restricted_back():
    """A transformer of N/2 blocks prolonged to N (piecewise constant in
    layer-time: fine block k takes coarse block k // 2, every weight of the
    block together) and restricted back by injection gives the coarse
    weights again, bit for bit; the fine network then runs with the mask."""
    from layerpar.transfer import prolong_network, restrict_network

    def make(nlayers):
        return Network(lambda: TokenOpening(TOKENS, WIDTH, LENGTH),
                       lambda n: TransformerBlock(WIDTH, HEADS, 2),
                       lambda: PoolClosing(WIDTH, CLASSES), nlayers=nlayers, T=2.0,
                       comm=WORLD, seed=5 + nlayers).double()
    coarse, fine, back = make(N // 2), make(N), make(N // 2)
    prolong_network(coarse, fine)
    restrict_network(fine, back)
    layers = {}
    for part in WORLD.allgather({n: coarse.body.state_by_layer()[n]
                                 for n in coarse.body.layer_indices}):
        layers.update(part)
    fine_layers = {}
    for part in WORLD.allgather(fine.body.state_by_layer()):
        fine_layers.update(part)
    back_layers = {}
    for part in WORLD.allgather(back.body.state_by_layer()):
        back_layers.update(part)
    x, y = tokens()
    loss, _ = fine.loss_and_backward(x if fine.is_first else None, y, Fn.cross_entropy)
    value = fine.reduce(loss)
    seq = fine.serial_equivalent()
    for net_ in (coarse, fine, back):
        net_.close()

    def check():
        for k in range(N):
            for name, t in fine_layers[k].items():
                assert torch.equal(t, layers[k // 2][name]), (k, name)
        for j in range(N // 2):
            for name, t in back_layers[j].items():
                assert torch.equal(t, layers[j][name]), (j, name)
        with torch.no_grad():
            assert abs(float(Fn.cross_entropy(seq(x), y)) - value) < 1e-12
    outcomes(check)


def test_causal_attention_ignores_later_tokens():
    torch.manual_seed(0)
    block = TransformerBlock(WIDTH, HEADS, 2, causal=True).double()
    u = torch.randn(3, LENGTH, WIDTH, dtype=F64)
    v = u.clone()
    v[:, 4:] += torch.randn(3, LENGTH - 4, WIDTH, dtype=F64)  # later positions changed
    a, b = block(u), block(v)
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.allclose(a[:, 4:], b[:, 4:])
    closing = PoolClosing(WIDTH, CLASSES, pool="last").double()
    mask = torch.arange(LENGTH)[None, :] < torch.tensor([2, 5, 6])[:, None]
    out = closing(u, context={"mask": mask})
    ref = closing.linear(closing.ln(u)[torch.arange(3), torch.tensor([1, 4, 5])])
    assert torch.allclose(out, ref, rtol=0, atol=1e-15)
