"""braid_ext.Layout: the one distribution of layers over ranks, computed by
the core.  Checked against the block formulas written out here
independently, against the points a solver actually owns, and against the
layers LayerParallel builds; bad arguments name themselves."""
import pytest
from mpi4py import MPI

from braid_ext import Layout, Solver
from braid_ext.examples.dahlquist import Dahlquist
from layerpar import DenseStep, LayerParallel, partition

WORLD = MPI.COMM_WORLD


def reference_block(N, P, q):
    """Fine points [lo, hi] of rank q: points 1..N in P nearly equal
    contiguous blocks, point 0 with the first."""
    return (0 if q == 0 else 1 + q * N // P), (q + 1) * N // P


def reference_owners(N, P):
    """The rank owning fine point n+1 (the end of layer n), for every n."""
    owners = []
    for q in range(P):
        lo, hi = reference_block(N, P, q)
        owners += [q] * (hi - max(lo, 1) + 1)
    return owners


SIZES = [(N, P) for N in list(range(1, 18)) + [31, 64, 100, 1000, 1023]
         for P in sorted({1, 2, 3, 4, 5, 7, 8, N // 2 or 1, N - 1 or 1, N}) if 1 <= P <= N]


@pytest.mark.parametrize("N,P", SIZES)
def test_blocks_and_owners_are_the_block_formulas(N, P):
    lay = Layout(N, P)
    assert (lay.nlayers, lay.size) == (N, P)
    covered = []
    for q in range(P):
        assert lay.block(q) == reference_block(N, P, q)
        layers = lay.layers(q)
        assert isinstance(layers, range) and len(layers) >= 1
        lo, hi = reference_block(N, P, q)
        assert layers == range(max(lo, 1) - 1, hi)
        covered += list(layers)
        for n in layers:
            assert lay.owner(n) == q
    assert covered == list(range(N))  # every layer once, in rank order
    assert [lay.owner(n) for n in range(N)] == reference_owners(N, P)


def test_huge_layouts_do_not_overflow():
    N, P = 2**62 + 11, 2**31 - 1
    lay = Layout(N, P)
    q = P - 1
    assert lay.block(q) == reference_block(N, P, q)
    assert lay.block(P // 2) == reference_block(N, P, P // 2)
    assert lay.owner(N - 1) == P - 1 and lay.owner(0) == 0


def test_partition_functions_are_the_layout():
    for N, P in [(7, 3), (15, 4), (64, 5), (5, 5)]:
        lay = Layout(N, P)
        for q in range(P):
            assert partition.fine_block(N, P, q) == lay.block(q)
            assert partition.local_layers(N, P, q) == lay.layers(q)
        assert [partition.layer_owner(N, P, n) for n in range(N)] == \
            [lay.owner(n) for n in range(N)]


def test_value_semantics():
    assert Layout(10, 3) == Layout(10, 3) and Layout(10, 3) != Layout(10, 2)
    assert hash(Layout(10, 3)) == hash(Layout(10, 3))
    assert repr(Layout(10, 3)) == "Layout(nlayers=10, size=3)"
    import pickle
    assert pickle.loads(pickle.dumps(Layout(9, 4))) == Layout(9, 4)


@pytest.mark.parametrize("args,name", [
    ((0, 1), "nlayers"), ((-3, 1), "nlayers"), ((2.0, 1), "nlayers"), ((True, 1), "nlayers"),
    ((4, 0), "size"), ((4, -1), "size"), ((4, 1.5), "size"), ((3, 4), "size=4"),
])
def test_bad_arguments_name_themselves(args, name):
    with pytest.raises(ValueError, match=name):
        Layout(*args)


def test_out_of_range_rank_and_layer():
    lay = Layout(6, 3)
    for q in (-1, 3):
        with pytest.raises(IndexError, match="rank"):
            lay.block(q)
        with pytest.raises(IndexError, match="rank"):
            lay.layers(q)
    for n in (-1, 6):
        with pytest.raises(IndexError, match="layer"):
            lay.owner(n)


@pytest.mark.mpi
@pytest.mark.parametrize("reverse", [False, True])
def test_solver_layout_is_the_layout_it_uses(reverse):
    size = WORLD.size
    for N in (size, size + 1, 3 * size + 2, 17 * size + 5):
        t0, t1 = (1.0, 0.0) if reverse else (0.0, 1.0)
        with Solver(Dahlquist(-1.0), WORLD, t0, t1, N, max_levels=1, reverse=reverse) as s:
            lay = s.layout()
            assert lay == Layout(N, size)
            lo, hi = s.local_range(0)
            if not reverse:
                assert (lo, hi) == lay.block(WORLD.rank)
            else:
                # a reversed solve mirrors the forward layout: its step a-1 -> a
                # is the forward layer N-a, held by the same rank
                mine = set(lay.layers(WORLD.rank))
                assert {N - a for a in range(max(lo, 1), hi + 1)} == mine


@pytest.mark.mpi
def test_layer_parallel_holds_its_layout_layers():
    size = WORLD.size
    for N in (size, 2 * size + 1):
        body = LayerParallel(lambda n: DenseStep(3), N, 1.0, WORLD)
        assert body.layout == Layout(N, size)
        assert body.layer_indices == body.layout.layers(WORLD.rank)
        assert sorted(int(k) for k in body.layers) == list(body.layout.layers(WORLD.rank))
        owners = WORLD.allgather(list(body.layer_indices))
        for q, layers in enumerate(owners):
            assert all(body.layout.owner(n) == q for n in layers)
