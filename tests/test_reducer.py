"""The overlapped, bucketed gradient reducer: the same weights, bitwise, as
the reducer that starts after backward (grids 2x1, 2x2, 4x1; exact,
layer-parallel and one-shot passes; the exact pipeline with GPipe and 1F1B
micro-batches), and bitwise the same weights in every data-parallel group
after every step; in a layer-parallel backward pass the buckets start while
the adjoint solve's final sweep still makes gradients, with micro-batches
during the backward pass too.

MPI tests on COMM_WORLD, for the grids its size allows; outcomes are
gathered before any assertion."""
import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar import DenseClosing, DenseOpening, DenseStep, Network, ProcessGrid
from layerpar.engine import gradhooks
from layerpar.engine.mgrit import MGRITPasses
from layerpar.reducer import GradientReducer

WORLD = MPI.COMM_WORLD
GRIDS = [(2, 1), (2, 2), (4, 1)]  # (data groups, layer ranks)
MODES = {  # the passes of the network in each group
    "exact": dict(max_levels=1),
    "layer-parallel": dict(max_levels=2, cfactor=2, min_coarse=1, fwd_iters=2, bwd_iters=1),
    "one-shot": dict(max_levels=2, cfactor=2, min_coarse=1, fwd_iters=1, bwd_iters=1,
                     warm_start=True),
}
# the exact pipeline with 3 micro-batches (batches of 11 rows: uneven micro-batches,
# and fewer of them in a group with fewer rows)
PIPELINES = {"gpipe": dict(max_levels=1, microbatches=3),
             "1f1b": dict(max_levels=1, microbatches=3, schedule="1f1b")}


def train(grid, overlap, steps=3, mode=None, dtype=torch.float64, twice=False, log=None,
          batch=8, shared=False):
    """A few SGD steps on the grid, batches of ``batch`` rows; this rank's
    weights afterwards, and per step the reducer's number of buckets
    started during backward, whether it still takes gradients from the
    final sweep and its number of buckets (None without overlap); ``log``
    (a list): cleared at the start of every step.  ``twice``: the loss of
    two batches, each through the network (every parameter takes two
    gradients in one backward pass; with 1F1B two steps' passes before one
    sum).  ``shared``: layers 0 and 1 are one module (on the first layer
    rank)."""
    mode = mode or dict(max_levels=2 if grid.layers > 1 else 1, cfactor=2, min_coarse=1)
    first = []

    def step(n):
        if shared and n < 2:
            if not first:
                first.append(DenseStep(5, "tanh"))
            return first[0]
        return DenseStep(5, "tanh")
    net = Network(lambda: DenseOpening(3, 5), step, lambda: DenseClosing(5, 3), nlayers=6,
                  T=1.0, comm=grid.layer_comm, seed=9, **mode).to(dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    reducer = grid.reducer(net.parameters(), bucket_bytes=64, overlap=overlap)
    g = torch.Generator().manual_seed(3)
    stats = []

    def backward(xs, ys):
        if not twice:
            net.loss_and_backward(xs, ys, Fn.cross_entropy)
            return
        half = len(ys) // 2
        if mode.get("schedule") == "1f1b":  # forward and backward in one call per half
            net.loss_and_backward(xs[:half], ys[:half], Fn.cross_entropy)
            net.loss_and_backward(xs[half:], ys[half:], Fn.cross_entropy)
            return
        (net.loss(xs[:half], ys[:half], Fn.cross_entropy)
         + net.loss(xs[half:], ys[half:], Fn.cross_entropy)).backward()
    try:
        for _ in range(steps):
            if log is not None:
                log.clear()  # the events of the last step
            x = torch.randn(batch, 3, generator=g).to(dtype)
            y = torch.randint(0, 3, (batch,), generator=g)
            xs, ys = grid.shard(x, batch), grid.shard(y, batch)
            opt.zero_grad()
            if overlap:
                reducer.start(grid.weight(batch))
                backward(xs, ys)
                if log is not None:
                    log.append(("backward returned",))
                reducer.finish()
                stats.append((reducer.early, reducer.early_gradients, len(reducer.buckets)))
            else:
                backward(xs, ys)
                grid.average_gradients(net.parameters(), grid.weight(batch))
                stats.append(None)
            opt.step()
        return [p.detach().clone() for p in net.parameters()], stats
    finally:
        reducer.close()
        net.close()


def same_everywhere(grid, a, b):
    """Whether a and b are bitwise equal, and a the same in every group."""
    same = all(torch.equal(p, q) for p, q in zip(a, b))
    # every group holds bitwise the same weights as group 0
    column = grid.data_comm.allgather(a)
    groups = all(torch.equal(p, q) for other in column for p, q in zip(other, column[0]))
    return same, groups


@pytest.mark.mpi
@pytest.mark.parametrize("shape", GRIDS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_overlapped_reducer_gives_the_same_weights_bitwise(shape, dtype):
    D, L = shape
    if WORLD.Get_size() != D * L:
        pytest.skip(f"grid {D}x{L} needs {D * L} ranks")
    with ProcessGrid(WORLD, data=D) as grid:
        a, _ = train(grid, overlap=True, dtype=dtype)
        b, _ = train(grid, overlap=False, dtype=dtype)
        result = same_everywhere(grid, a, b)
    assert WORLD.allgather(result) == [(True, True)] * WORLD.Get_size()


@pytest.mark.mpi
@pytest.mark.parametrize("shape", GRIDS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", list(MODES))
def test_gradients_from_the_final_sweep_give_the_same_weights_bitwise(shape, mode):
    """Layer-parallel and one-shot passes: the buckets of the residual
    layers start from the adjoint solve's final sweep; the weights after
    every step are those of the reducer that starts after backward, in
    every group, and no step needed the check's fallback."""
    assert_overlap_is_early_and_bitwise(shape, MODES[mode])


def assert_overlap_is_early_and_bitwise(shape, mode, **kw):
    """4 steps on grid ``shape`` with and without overlap: the same weights
    bitwise in every group, no fallback, and every bucket from the second
    step on started during backward; on every rank."""
    D, L = shape
    if WORLD.Get_size() != D * L:
        pytest.skip(f"grid {D}x{L} needs {D * L} ranks")
    with ProcessGrid(WORLD, data=D) as grid:
        a, stats = train(grid, overlap=True, steps=4, mode=mode, **kw)
        b, _ = train(grid, overlap=False, steps=4, mode=mode, **kw)
        result = same_everywhere(grid, a, b)
        kept = all(sweep for _, sweep, _ in stats)
        early = all(n == buckets for n, _, buckets in stats[1:])
    assert WORLD.allgather((result, kept, early)) == [((True, True), True, True)] * WORLD.size


@pytest.mark.mpi
@pytest.mark.parametrize("shape", GRIDS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("schedule", list(PIPELINES))
def test_micro_batches_overlap_and_give_the_same_weights_bitwise(shape, schedule):
    """The exact pipeline with 3 micro-batches of uneven sizes (GPipe: the
    pipeline's function sums them; 1F1B: one backward call per
    micro-batch, all but the last partial sums): every bucket from the
    second step on starts during backward, no step needs the check's
    fallback, and the weights after every step are bitwise those of the
    reducer that starts after backward, in every group."""
    assert_overlap_is_early_and_bitwise(shape, PIPELINES[schedule], batch=11)


@pytest.mark.mpi
@pytest.mark.parametrize("shape", GRIDS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case,falls_back", [
    ("layer-parallel, a layer used twice", True), ("1f1b, a layer used twice", False),
    ("gpipe, a layer used twice", False), ("1f1b, two passes", True)])
def test_a_parameter_used_twice(shape, case, falls_back):
    """A module shared by layers 0 and 1 (its parameters take two layers'
    gradients) or two passes before one sum: where the engine announces no
    more than autograd's last accumulation (the final sweep makes the
    module's gradient once per layer) the check finds the early bucket
    incomplete and every rank of the column sends its buckets again from
    .grad (the shared module's column: the first layer rank's); the
    pipelines announce theirs and need no fallback.  Either way the
    weights are bitwise those of the reducer that starts after backward,
    in every group (batches of 11 rows)."""
    D, L = shape
    if WORLD.Get_size() != D * L:
        pytest.skip(f"grid {D}x{L} needs {D * L} ranks")
    kind, how = case.split(", ")
    mode = MODES[kind] if kind in MODES else PIPELINES[kind]
    opts = dict(steps=3, mode=mode, batch=11, shared=how != "two passes",
                twice=how == "two passes")
    with ProcessGrid(WORLD, data=D) as grid:
        a, stats = train(grid, overlap=True, **opts)
        b, _ = train(grid, overlap=False, **opts)
        result = same_everywhere(grid, a, b)
        fell_back = not stats[-1][1]
        early = all(n == buckets for n, _, buckets in stats[1:])
        falls_back = falls_back and (how == "two passes" or grid.layer_rank == 0)
    want = ((True, True), falls_back, not falls_back)
    assert WORLD.allgather((result, fell_back, early)) == WORLD.allgather(want)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["layer-parallel", "one-shot"])
def test_buckets_start_while_the_final_sweep_still_makes_gradients(mode, monkeypatch):
    """The order of events on each rank in a layer-parallel backward pass:
    a bucket of residual layers starts before the final sweep has made its
    last layer's gradient (on the ranks holding the last layers of each
    group; on the others, before the solve returns), and every bucket of
    the residual layers before backward has returned."""
    size = WORLD.Get_size()
    if size not in (2, 4):
        pytest.skip("needs 2 or 4 ranks")
    log = []
    post = GradientReducer._post

    def logged_post(self, b):
        log.append(("post", b, self._armed))
        post(self, b)
    solve = MGRITPasses.backward

    def logged_solve(self, ctx, grad_out):
        out = solve(self, ctx, grad_out)
        log.append(("solved",))
        return out
    made = gradhooks.made

    def logged_made(params, grads):
        log.append(("grad",))
        made(params, grads)
    monkeypatch.setattr(GradientReducer, "_post", logged_post)
    monkeypatch.setattr(MGRITPasses, "backward", logged_solve)
    monkeypatch.setattr(gradhooks, "made", logged_made)
    D = 2
    with ProcessGrid(WORLD, data=D) as grid:
        # the second step: the buckets follow the order of readiness of the first
        train(grid, overlap=True, steps=2, mode=MODES[mode], log=log)
        last_ranks = grid.layer_rank == grid.layers - 1
    kinds = [e[0] for e in log]
    grads = [i for i, k in enumerate(kinds) if k == "grad"]
    posts = [i for i, k in enumerate(kinds) if k == "post" and log[i][2]]
    solved, returned = kinds.index("solved"), kinds.index("backward returned")
    before_last_grad = bool(posts) and posts[0] < grads[-1]
    before_solved = bool(posts) and posts[0] < solved
    # every bucket (the opening's and closing's too) started before backward returned
    all_early = kinds.count("post") == len(posts) and all(i < returned for i in posts)
    outcome = (before_last_grad or not last_ranks, before_solved, all_early)
    assert WORLD.allgather(outcome) == [(True, True, True)] * size


@pytest.mark.mpi
def test_two_gradients_in_one_pass_fall_back_to_grad():
    """Two passes through the network in one backward pass: a gradient
    made by the first pass's final sweep is not the final .grad; the check
    finds it, every rank sends its buckets again from .grad, and the
    weights are still bitwise those of the reducer that starts after
    backward."""
    size = WORLD.Get_size()
    if size not in (2, 4):
        pytest.skip("needs 2 or 4 ranks")
    with ProcessGrid(WORLD, data=2) as grid:
        a, stats = train(grid, overlap=True, mode=MODES["layer-parallel"], twice=True)
        b, _ = train(grid, overlap=False, mode=MODES["layer-parallel"], twice=True)
        result = same_everywhere(grid, a, b)
        fell_back = not any(sweep for _, sweep, _ in stats)
    assert WORLD.allgather((result, fell_back)) == [((True, True), True)] * size


def test_gradient_hooks_see_the_gradients_autograd_then_accumulates():
    """One rank, layer-parallel: each residual layer's parameters' hooks are
    called once per backward pass, before autograd accumulates, with
    bitwise the gradient that lands in .grad; removed hooks are not
    called."""
    net = Network(lambda: DenseOpening(3, 4), lambda n: DenseStep(4, "tanh"),
                  lambda: DenseClosing(4, 2), nlayers=4, T=1.0, comm=MPI.COMM_SELF,
                  max_levels=2, cfactor=2, min_coarse=1, seed=1).double()
    seen = {}
    body = [p for n in range(4) for p in net.body.layer(n).parameters()]

    def hook(p, grad):
        assert p.grad is None  # not accumulated yet
        seen.setdefault(id(p), []).append(grad.clone())
    handles = [gradhooks.register_gradient_hook(p, hook) for p in body]
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    net.loss(x, y, Fn.cross_entropy).backward()
    assert all(len(seen[id(p)]) == 1 and torch.equal(seen[id(p)][0], p.grad) for p in body)
    for h in handles:
        h.remove()
        h.remove()  # twice does nothing
    net.zero_grad()
    net.loss(x, y, Fn.cross_entropy).backward()
    assert all(len(seen[id(p)]) == 1 for p in body)
    with pytest.raises(TypeError, match="fn must be callable"):
        gradhooks.register_gradient_hook(body[0], None)
    net.close()


def test_partial_sums_mark_the_accumulations_within():
    """Accumulations within partial_sums() (nested too) are marked, those
    after it not, also after an exception left it; a post-accumulate hook
    sees the mark that held when autograd accumulated."""
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    seen = []
    handle = p.register_post_accumulate_grad_hook(
        lambda q: seen.append(gradhooks.in_partial_sums()))
    with gradhooks.partial_sums():
        (2 * p).sum().backward()
        with gradhooks.partial_sums():
            assert gradhooks.in_partial_sums()
        assert gradhooks.in_partial_sums()
    with pytest.raises(ValueError, match="inside"):
        with gradhooks.partial_sums():
            raise ValueError("inside")
    assert not gradhooks.in_partial_sums()
    (3 * p).sum().backward()
    handle.remove()
    assert seen == [True, False] and torch.equal(p.grad, torch.full((2,), 5.0, dtype=torch.float64))


@pytest.mark.mpi
def test_reducer_on_one_group_leaves_gradients_alone():
    p = torch.nn.Parameter(torch.ones(3))
    r = GradientReducer(MPI.COMM_SELF, [p])
    p.grad = torch.full((3,), 2.0)
    r.reduce(0.5)  # one group: its gradient is the batch's (weight 1 by construction)
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    r.close()


@pytest.mark.mpi
def test_finish_without_start_is_an_error():
    if WORLD.Get_size() < 2:
        pytest.skip("needs two groups")
    p = torch.nn.Parameter(torch.ones(3))
    with ProcessGrid(WORLD, data=WORLD.Get_size()) as grid:
        r = grid.reducer([p])
        with pytest.raises(RuntimeError, match="without start"):
            r.finish()
        r.close()
