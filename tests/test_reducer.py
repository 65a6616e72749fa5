"""The overlapped, bucketed gradient reducer: the same weights, bitwise, as
the reducer that starts after backward (grids 2x1, 2x2, 4x1), and bitwise
the same weights in every data-parallel group after every step.

MPI tests on COMM_WORLD, for the grids its size allows; outcomes are
gathered before any assertion."""
import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar import DenseClosing, DenseOpening, DenseStep, Network, ProcessGrid
from layerpar.reducer import GradientReducer

WORLD = MPI.COMM_WORLD
GRIDS = [(2, 1), (2, 2), (4, 1)]  # (data groups, layer ranks)


def train(grid, overlap, steps=3, mode=None, dtype=torch.float64):
    """A few SGD steps on the grid; this rank's weights afterwards."""
    mode = mode or dict(max_levels=2 if grid.layers > 1 else 1, cfactor=2, min_coarse=1)
    net = Network(lambda: DenseOpening(3, 5), lambda n: DenseStep(5, "tanh"),
                  lambda: DenseClosing(5, 3), nlayers=6, T=1.0, comm=grid.layer_comm,
                  seed=9, **mode).to(dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    reducer = grid.reducer(net.parameters(), bucket_bytes=64, overlap=overlap)
    g = torch.Generator().manual_seed(3)
    try:
        for _ in range(steps):
            x = torch.randn(8, 3, generator=g).to(dtype)
            y = torch.randint(0, 3, (8,), generator=g)
            xs, ys = grid.shard(x, 8), grid.shard(y, 8)
            opt.zero_grad()
            if overlap:
                reducer.start(grid.weight(8))
                net.loss(xs, ys, Fn.cross_entropy).backward()
                reducer.finish()
            else:
                net.loss(xs, ys, Fn.cross_entropy).backward()
                grid.average_gradients(net.parameters(), grid.weight(8))
            opt.step()
        return [p.detach().clone() for p in net.parameters()]
    finally:
        reducer.close()
        net.close()


@pytest.mark.mpi
@pytest.mark.parametrize("shape", GRIDS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_overlapped_reducer_gives_the_same_weights_bitwise(shape, dtype):
    D, L = shape
    if WORLD.Get_size() != D * L:
        pytest.skip(f"grid {D}x{L} needs {D * L} ranks")
    with ProcessGrid(WORLD, data=D) as grid:
        a = train(grid, overlap=True, dtype=dtype)
        b = train(grid, overlap=False, dtype=dtype)
        same = all(torch.equal(p, q) for p, q in zip(a, b))
        # every group holds bitwise the same weights as group 0
        column = grid.data_comm.allgather(a)
        groups = all(torch.equal(p, q) for other in column for p, q in zip(other, column[0]))
    assert WORLD.allgather((same, groups)) == [(True, True)] * WORLD.Get_size()


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
