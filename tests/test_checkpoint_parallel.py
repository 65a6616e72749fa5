"""Checkpoints written in parallel: each rank its own part, a manifest as the
commit point.  Written on all ranks and read on fewer (any layout), damaged
parts refused on every rank, a failure on one rank during a save raised on
every rank with nothing changed, replicas stored once, version-1 files, and
rank 0's memory during a save independent of the number of layers."""
import errno
import os
import shutil
import tracemalloc

import h5py
import pytest
import torch
from mpi4py import MPI

from layerpar.checkpoint import (CheckpointError, find_latest_checkpoint, load_checkpoint,
                                 previous_path, save_checkpoint, verify_checkpoint)
from layerpar.checkpoint import atomic
from layerpar.checkpoint import load as load_module
from test_checkpoint import (CONFIG, N, block, layer_opt, layer_params, listing,
                             part_files, rank_state, same_bits, shared_dir)  # noqa: F401

WORLD = MPI.COMM_WORLD
V1_FIXTURE = os.path.join(os.path.dirname(__file__), "data", "checkpoint_v1.h5")


def world_state(comm=WORLD, **kw):
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = {"torch": torch.Generator().manual_seed(rank).get_state(), "rank": rank}
    return rank_state(block(rank, size), first=rank == 0, last=rank == size - 1, rng=rng, **kw)


def one_error(group, fn, *args, **kw):
    """Call fn, which must raise CheckpointError on every rank of group with
    the same one line; return the line."""
    with pytest.raises(CheckpointError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    assert group.allgather(msg) == [msg] * group.Get_size()
    return msg


class _Opened:
    """Records the part files a load opens."""

    def __init__(self, monkeypatch):
        self.paths = []
        real = load_module.PartReader

        def reader(path, *a, **kw):
            self.paths.append(os.path.basename(path))
            return real(path, *a, **kw)
        monkeypatch.setattr(load_module, "PartReader", reader)


@pytest.mark.mpi
def test_written_on_all_ranks_resumed_on_fewer(shared_dir, monkeypatch):
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    path = os.path.join(shared_dir, "latest.h5")
    save_checkpoint(path, WORLD, world_state())
    header = verify_checkpoint(path, comm=WORLD)
    assert header["format_version"] == 2 and header["num_ranks"] == size
    with h5py.File(path, "r") as f:   # the manifest holds no weights
        assert list(f.keys()) == ["parts"]
    for k in range(1, size + 1):   # read on the first k ranks (4 ranks: on 1, 2, 3 and 4)
        sub = WORLD.Split(0 if rank < k else MPI.UNDEFINED, rank)
        if sub != MPI.COMM_NULL:
            mine = block(rank, k)
            opened = _Opened(monkeypatch)
            out = load_checkpoint(path, sub, layer_indices=mine, num_layers=N, config=CONFIG)
            monkeypatch.undo()
            assert sorted(out["layers"]) == mine
            assert all(same_bits(out["layers"][n], layer_params(n)) for n in mine)
            assert all(same_bits(out["optimizer"]["layers"][n], layer_opt(n)) for n in mine)
            assert out["optimizer"]["hyper"] == [{"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8}]
            assert torch.equal(out["opening"]["weight"], torch.full((3, 2), 0.5))
            assert torch.equal(out["closing"]["bias"], torch.zeros(5))
            assert out["rng"]["rank"] == rank
            assert torch.equal(out["rng"]["torch"], torch.Generator().manual_seed(rank).get_state())
            # only the parts that hold its layers, the shared pieces
            # (opening: part 0, closing: the last part) and its RNG state
            holders = {r for r in range(size) if set(block(r, size)) & set(mine)}
            allowed = {f"part-{r:05d}.h5" for r in holders | {0, size - 1, rank}}
            assert set(opened.paths) <= allowed, (opened.paths, allowed)
            sub.Free()
    WORLD.Barrier()


@pytest.mark.mpi
def test_written_by_fewer_ranks_read_by_all(shared_dir):
    # a split writes (the first half of the ranks), the world reads
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    k = max(1, size // 2)
    path = os.path.join(shared_dir, "half.h5")
    sub = WORLD.Split(0 if rank < k else MPI.UNDEFINED, rank)
    if sub != MPI.COMM_NULL:
        save_checkpoint(path, sub, world_state(sub))
        sub.Free()
    WORLD.Barrier()
    mine = block(size - 1 - rank, size)   # another layout: reversed
    out = load_checkpoint(path, WORLD, layer_indices=mine, num_layers=N)
    assert all(same_bits(out["layers"][n], layer_params(n)) for n in mine)
    assert all(same_bits(out["optimizer"]["layers"][n], layer_opt(n)) for n in mine)
    assert (out["rng"] is None) == (rank >= k)


@pytest.mark.mpi
def test_replicas_are_stored_once_and_must_agree(shared_dir):
    # a data x layer grid: D replicas of L layer ranks give the same layers
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    layer_ranks = size // 2 if size % 2 == 0 else size
    lrank = rank % layer_ranks
    path = os.path.join(shared_dir, "grid.h5")
    st = rank_state(block(lrank, layer_ranks), first=lrank == 0, last=lrank == layer_ranks - 1)
    save_checkpoint(path, WORLD, st)
    if rank == 0:
        sizes = []
        for p in part_files(path):
            with h5py.File(p, "r") as f:
                sizes.append(sorted(k for k in f.keys() if k.startswith("layer.")))
        held = [k for s in sizes for k in s]
        assert sorted(held) == sorted(f"layer.{n}" for n in range(N))  # each layer once
    out = load_checkpoint(path, WORLD, layer_indices=range(N))
    assert all(same_bits(out["layers"][n], layer_params(n)) for n in range(N))
    if size > 1 and layer_ranks < size:
        # one replica's copy of a layer differs: refused on every rank
        if rank == size - 1:
            n = block(lrank, layer_ranks)[0]
            st["layers"][n]["weight"] = st["layers"][n]["weight"] + 1
        msg = one_error(WORLD, save_checkpoint, path, WORLD, st)
        assert "give different values for layer" in msg


@pytest.mark.mpi
def test_damaged_part_refused_everywhere_and_the_previous_found(shared_dir):
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    path = os.path.join(shared_dir, "latest.h5")
    save_checkpoint(path, WORLD, world_state(epoch=1, step=10))
    save_checkpoint(path, WORLD, world_state(epoch=2, step=20))
    part = part_files(path)[-1]
    n = block(size - 1, size)[0]
    if rank == 0:   # a byte of the last part's first layer flipped
        with h5py.File(part, "r") as f:
            offset = f[f"layer.{n}/data"].id.get_offset()  # weight first
        data = bytearray(open(part, "rb").read())
        data[offset + 7] ^= 0x01
        open(part, "wb").write(data)
    WORLD.Barrier()
    msg = one_error(WORLD, load_checkpoint, path, WORLD, layer_indices=block(rank, size))
    assert os.path.basename(part) in msg and f"checksum mismatch in layer.{n}" in msg
    msg = one_error(WORLD, verify_checkpoint, path, comm=WORLD)
    assert os.path.basename(part) in msg
    assert find_latest_checkpoint(shared_dir, WORLD) == previous_path(path)
    # a missing part: the same
    WORLD.Barrier()
    if rank == 0:
        os.unlink(part)
    WORLD.Barrier()
    msg = one_error(WORLD, load_checkpoint, path, WORLD, layer_indices=[])
    assert os.path.basename(part) in msg and "not found" in msg
    prev = find_latest_checkpoint(shared_dir, WORLD)
    assert prev == previous_path(path)
    out = load_checkpoint(prev, WORLD, layer_indices=block(rank, size))
    assert out["epoch"] == 1
    assert all(same_bits(out["layers"][k], layer_params(k)) for k in block(rank, size))


@pytest.mark.mpi
@pytest.mark.parametrize("failure", ["disk-full", "bad-leaf", "interrupt"])
def test_failure_on_one_rank_during_a_save(shared_dir, monkeypatch, failure):
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    path = os.path.join(shared_dir, "latest.h5")
    save_checkpoint(path, WORLD, world_state(epoch=1, step=10))
    save_checkpoint(path, WORLD, world_state(epoch=2, step=20))
    WORLD.Barrier()
    before = WORLD.bcast(listing(shared_dir) if rank == 0 else None, root=0)
    bad = size - 1   # the last rank fails
    st = world_state(epoch=3, step=30)
    if rank == bad:
        if failure == "bad-leaf":
            st["extra"] = {"handle": object()}
        else:
            real, calls = atomic.write_at, []

            def write_at(fd, data, offset):
                calls.append(offset)
                if len(calls) > 2:   # part of the part is written first
                    if failure == "interrupt":
                        raise KeyboardInterrupt
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real(fd, data, offset)
            monkeypatch.setattr(atomic, "write_at", write_at)
    if failure == "interrupt":
        # the interrupted rank gets its interrupt, the others one error
        if rank == bad:
            with pytest.raises(KeyboardInterrupt):
                save_checkpoint(path, WORLD, st)
            msg = None
        else:
            with pytest.raises(CheckpointError) as e:
                save_checkpoint(path, WORLD, st)
            msg = str(e.value)
        msgs = [m for m in WORLD.allgather(msg) if m is not None]
        assert len(set(msgs)) <= 1 and all(f"part-{bad:05d}.h5" in m for m in msgs)
    else:
        msg = one_error(WORLD, save_checkpoint, path, WORLD, st)
        if failure == "disk-full":
            assert "disk full" in msg and f"part-{bad:05d}.h5" in msg
        else:
            assert f"rank {bad}" in msg and "extra/handle" in msg
    monkeypatch.undo()
    WORLD.Barrier()
    assert listing(shared_dir) == before   # nothing changed, nothing left behind
    out = load_checkpoint(path, WORLD, layer_indices=block(rank, size))
    assert out["epoch"] == 2
    assert load_checkpoint(previous_path(path), WORLD, layer_indices=[])["epoch"] == 1


@pytest.mark.mpi
def test_keep_previous(shared_dir):
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    path = os.path.join(shared_dir, "latest.h5")
    parts = os.path.join(shared_dir, "latest.parts")
    for e in (1, 2, 3):
        save_checkpoint(path, WORLD, world_state(epoch=e, step=10 * e))
    assert verify_checkpoint(previous_path(path))["epoch"] == 2
    assert len(os.listdir(parts)) == 2   # the parts of the checkpoint and of the previous one
    save_checkpoint(path, WORLD, world_state(epoch=4, step=40), keep_previous=False)
    assert verify_checkpoint(path)["epoch"] == 4
    assert verify_checkpoint(previous_path(path))["epoch"] == 2   # not replaced
    assert len(os.listdir(parts)) == 2   # epoch 3's parts are gone
    out = load_checkpoint(previous_path(path), WORLD, layer_indices=block(rank, size))
    assert out["epoch"] == 2
    assert all(same_bits(out["layers"][n], layer_params(n)) for n in block(rank, size))


@pytest.mark.mpi
def test_version_1_checkpoint_loads(shared_dir):
    # written by the single-file format of earlier versions on 2 ranks
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    mine = block(rank, size)
    header = verify_checkpoint(V1_FIXTURE)
    assert header["format_version"] == 1 and header["num_ranks"] == 2
    out = load_checkpoint(V1_FIXTURE, WORLD, layer_indices=mine, num_layers=N, config=CONFIG)
    assert all(same_bits(out["layers"][n], layer_params(n)) for n in mine)
    assert all(same_bits(out["optimizer"]["layers"][n], layer_opt(n)) for n in mine)
    assert torch.equal(out["closing"]["weight"], torch.full((5, 3), -0.25))
    assert out["extra"] == {"note": "v1", "counts": [1, 2, 3]}
    if rank < 2:
        assert out["rng"]["rank"] == rank
        assert torch.equal(out["rng"]["torch"], torch.Generator().manual_seed(rank).get_state())
    else:
        assert out["rng"] is None
    # a version-2 save over it keeps it as the previous checkpoint
    path = os.path.join(shared_dir, "latest.h5")
    if rank == 0:
        shutil.copy(V1_FIXTURE, path)
    WORLD.Barrier()
    save_checkpoint(path, WORLD, world_state(epoch=3, step=50))
    assert verify_checkpoint(previous_path(path), comm=WORLD)["format_version"] == 1
    assert find_latest_checkpoint(shared_dir, WORLD) == path
    assert load_checkpoint(previous_path(path), WORLD, layer_indices=mine)["epoch"] == 2


def wide_state(comm, n_layers, width):
    """This rank's block of ``n_layers`` layers of ``width`` x ``width``
    weights, with Adam-like optimiser state."""
    rank, size = comm.Get_rank(), comm.Get_size()
    lo, hi = rank * n_layers // size, (rank + 1) * n_layers // size
    layers, opt = {}, {}
    for n in range(lo, hi):
        g = torch.Generator().manual_seed(n)
        layers[n] = {"weight": torch.randn(width, width, generator=g, dtype=torch.float64),
                     "bias": torch.randn(width, generator=g, dtype=torch.float64)}
        opt[n] = {k: {"exp_avg": torch.randn_like(v), "step": torch.tensor(3.0)}
                  for k, v in layers[n].items()}
    return {"num_layers": n_layers, "epoch": 0, "step": 1, "config": {"width": width},
            "layers": layers, "opening": {"w": torch.ones(width, 2)} if rank == 0 else {},
            "closing": {"w": torch.ones(3, width)} if rank == size - 1 else {},
            "optimizer": {"layers": opt, "hyper": [{"lr": 0.01}]}}


def rank0_save_peak(comm, path, state):
    """Rank 0's peak of traced allocations during one save (bytes)."""
    comm.Barrier()
    if comm.Get_rank() == 0:
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    save_checkpoint(path, comm, state)
    peak = None
    if comm.Get_rank() == 0:
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    return comm.bcast(peak, root=0)


@pytest.mark.mpi
def test_rank0_memory_during_a_save_does_not_grow_with_the_layers(shared_dir):
    # (benchmarks/bench_checkpoint.py measures 32, 128 and 512 layers)
    width, small, large = 64, 24, 192
    rank0_save_peak(WORLD, os.path.join(shared_dir, "warm.h5"), wide_state(WORLD, 8, width))
    peaks = {n: rank0_save_peak(WORLD, os.path.join(shared_dir, f"m{n}.h5"),
                                wide_state(WORLD, n, width))
             for n in (small, large)}
    # rank 0's weights and optimiser state grow by this much (not traced:
    # torch's memory); what the save allocates on rank 0 must not follow
    per_layer = 2 * (width * width + width) * 8
    own_growth = (large - small) // WORLD.Get_size() * per_layer
    # (a few KiB move with the sizes of h5py's and Python's internal tables)
    assert peaks[large] - peaks[small] < min(64 * 1024, 0.05 * own_growth), (peaks, own_growth)
