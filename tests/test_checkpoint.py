"""Tests of layerpar.checkpoint: bit-exact round trips, resuming on another
number of ranks, refusal of bad files on every rank, atomic saves, metrics."""
import csv
import glob
import hashlib
import math
import os
import shutil
import tempfile
import zlib

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

import layerpar.checkpoint as ckpt
from layerpar.checkpoint import (CheckpointError, find_latest_checkpoint, load_checkpoint,
                                 previous_path, rng_state, save_checkpoint, verify_checkpoint)
from layerpar.checkpoint import atomic
from layerpar.checkpoint.optimizer import _named_leaves
from layerpar.metrics import MetricsWriter

torch.set_num_threads(1)
N = 7            # layers in the test network
CONFIG = {"model": {"width": 3, "T": 1.0, "act": "tanh"}, "train": {"lr": 0.01}}


# ------------------------------------------------------------------ helpers

def layer_params(n):
    """Parameters of layer n, computable by any rank on its own."""
    g = torch.Generator().manual_seed(1000 + n)
    return {"weight": torch.randn(3, 3, generator=g),
            "bias": torch.randn(3, generator=g, dtype=torch.float64)}


def layer_opt(n):
    g = torch.Generator().manual_seed(2000 + n)
    return {"weight": {"exp_avg": torch.randn(3, 3, generator=g), "step": n + 1},
            "bias": {"exp_avg": torch.randn(3, generator=g, dtype=torch.float64), "step": n + 1}}


def block(rank, size, n=N):
    """Contiguous block of layers of a rank (the test's own partition)."""
    lo = rank * n // size
    return list(range(lo, (rank + 1) * n // size))


def rank_state(layers, *, first, last, epoch=2, step=40, rng=None):
    return {"num_layers": N, "epoch": epoch, "step": step, "config": CONFIG,
            "layers": {n: layer_params(n) for n in layers},
            "opening": {"weight": torch.full((3, 2), 0.5)} if first else {},
            "closing": {"weight": torch.full((5, 3), -0.25), "bias": torch.zeros(5)} if last else {},
            "optimizer": {"layers": {n: layer_opt(n) for n in layers},
                          "hyper": [{"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8}]},
            "rng": rng}


def same_bits(a, b):
    """Equal type, dtype, shape and bytes, recursively."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and
                a.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                == b.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(a, (np.ndarray, np.generic)):
        return (type(a) is type(b) and a.dtype == b.dtype and np.shape(a) == np.shape(b)
                and np.asarray(a).tobytes() == np.asarray(b).tobytes())
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(same_bits(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def file_sha(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def listing(directory):
    """Every file under ``directory`` (relative path -> SHA-256)."""
    out = {}
    for base, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(base, f)
            out[os.path.relpath(p, directory)] = file_sha(p)
    return out


def copy_checkpoint(src, directory, name=None):
    """Copy a checkpoint (the manifest and its parts folder) into ``directory``."""
    dst = os.path.join(directory, name or os.path.basename(src))
    shutil.copy(src, dst)
    with h5py.File(src, "r") as f:
        rel = f.attrs.get("parts_dir")
    if rel is not None and not os.path.samefile(os.path.dirname(src), directory):
        shutil.copytree(os.path.join(os.path.dirname(src), rel), os.path.join(directory, rel),
                        dirs_exist_ok=True)
    return dst


def part_files(path):
    """The part files of a version-2 checkpoint, in rank order."""
    with h5py.File(path, "r") as f:
        rel = f.attrs["parts_dir"]
    folder = os.path.join(os.path.dirname(path), rel)
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))]


@pytest.fixture
def shared_dir():
    """A directory every rank of COMM_WORLD sees (rank 0 makes it)."""
    comm = MPI.COMM_WORLD
    d = tempfile.mkdtemp(prefix="lp-ckpt-") if comm.Get_rank() == 0 else None
    d = comm.bcast(d, root=0)
    yield d
    comm.Barrier()
    if comm.Get_rank() == 0:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------- single process

def test_round_trip_bit_exact(tmp_path):
    comm = MPI.COMM_SELF
    np.random.seed(3)
    torch.manual_seed(3)
    state = rank_state(range(N), first=True, last=True, rng=rng_state())
    state["layers"][0]["bf16"] = torch.randn(4, 2).to(torch.bfloat16)
    state["layers"][1]["mask"] = torch.tensor([[True, False], [False, True]])
    state["layers"][2]["index"] = torch.arange(6, dtype=torch.int64).reshape(2, 3)[:, ::2]  # non-contiguous
    state["layers"][3]["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    state["layers"][4]["empty"] = torch.zeros(0, 3)
    state["layers"][5]["special"] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-45])
    state["optimizer"]["hyper"][0].update({"nesterov": False, "name": "adam", "none": None,
                                        "nan": float("nan"), "big": 2 ** 70, "nested": [1, (2.5, "x")]})
    state["extra"] = {"np_scalar": np.float32(0.1), "np_array": np.arange(5, dtype=np.int16),
                      "generator": np.random.default_rng(9).bit_generator.state}
    path = tmp_path / "latest.h5"
    save_checkpoint(path, comm, state)
    out = load_checkpoint(path, comm, num_layers=N, config=CONFIG)
    for key in ("layers", "opening", "closing", "optimizer", "extra"):
        assert same_bits(state[key], out[key]), key
    assert same_bits(state["rng"], out["rng"])
    assert (out["epoch"], out["step"], out["num_layers"], out["config"]) == (2, 40, N, CONFIG)
    # The restored RNG state continues the same streams.
    ckpt.set_rng_state(out["rng"])
    a = (torch.rand(3), np.random.rand(3))
    ckpt.set_rng_state(state["rng"])
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    header = verify_checkpoint(path)
    assert header["num_layers"] == N and header["num_ranks"] == 1


def test_subset_and_like(tmp_path):
    comm = MPI.COMM_SELF
    path = tmp_path / "c.h5"
    save_checkpoint(path, comm, rank_state(range(N), first=True, last=True))
    out = load_checkpoint(path, comm, layer_indices=[5, 2])
    assert sorted(out["layers"]) == [2, 5] and sorted(out["optimizer"]["layers"]) == [2, 5]
    assert same_bits(out["layers"][5], layer_params(5))
    like = rank_state([3, 4], first=False, last=True)
    out = load_checkpoint(path, comm, like=like)
    assert sorted(out["layers"]) == [3, 4]
    like["layers"][4]["weight"] = torch.zeros(3, 4)
    with pytest.raises(CheckpointError, match=r"layer 4 parameter 'weight'.*\[3, 3\].*\[3, 4\]"):
        load_checkpoint(path, comm, like=like)
    like = rank_state([3], first=False, last=True)
    like["closing"]["weight"] = torch.zeros(5, 3, dtype=torch.float64)
    with pytest.raises(CheckpointError, match="closing layer parameter 'weight' is float32"):
        load_checkpoint(path, comm, like=like)
    with pytest.raises(CheckpointError, match="asked for layers 7-9"):
        load_checkpoint(path, comm, layer_indices=[1, 7, 8, 9])
    with pytest.raises(CheckpointError, match="for 7 layers, this run has 8"):
        load_checkpoint(path, comm, num_layers=8)
    with pytest.raises(CheckpointError, match="model.width = 3 in the checkpoint, 4 in this run"):
        load_checkpoint(path, comm, config={"model": {"width": 4}})


def test_save_refuses_incomplete_or_invalid_state(tmp_path):
    comm = MPI.COMM_SELF
    path = tmp_path / "c.h5"
    with pytest.raises(CheckpointError, match="layers 2,5-6"):
        save_checkpoint(path, comm, rank_state([0, 1, 3, 4], first=True, last=True))
    bad = rank_state(range(N), first=True, last=True)
    bad["extra"] = {"f": lambda x: x}
    with pytest.raises(CheckpointError):
        save_checkpoint(path, comm, bad)
    bad = rank_state(range(N), first=True, last=True)
    bad["extra"] = {"obj": object()}
    with pytest.raises(CheckpointError, match="extra/obj"):
        save_checkpoint(path, comm, bad)
    bad = rank_state(range(N), first=True, last=True)
    bad["epochs"] = 3
    with pytest.raises(CheckpointError, match="unknown state keys"):
        save_checkpoint(path, comm, bad)
    assert os.listdir(tmp_path) == []   # nothing left behind, not even a temporary file


def test_atomic_save_keeps_previous_on_crash(tmp_path, monkeypatch):
    comm = MPI.COMM_SELF
    path = tmp_path / "latest.h5"
    save_checkpoint(path, comm, rank_state(range(N), first=True, last=True, epoch=1, step=10))
    before = listing(tmp_path)

    def crash(tmp, final, keep_previous):
        assert os.path.getsize(tmp) > 0 and verify_checkpoint(tmp)["epoch"] == 2
        raise RuntimeError("node died")
    monkeypatch.setattr(atomic, "install", crash)
    with pytest.raises(CheckpointError, match="node died"):
        save_checkpoint(path, comm, rank_state(range(N), first=True, last=True, epoch=2, step=20))
    monkeypatch.undo()
    assert listing(tmp_path) == before   # the new parts are gone too
    assert load_checkpoint(path, comm, num_layers=N)["epoch"] == 1
    # A crash that killed the process leaves stale temporary files: ignored,
    # and removed by the run folder's cleanup.
    (tmp_path / ".latest.h5.tmp.123.abcd").write_bytes(b"\x89HDF half written")
    (tmp_path / "latest.parts" / ".tmp.20260101-000000-abc").mkdir()
    (tmp_path / "latest.parts" / ".tmp.20260101-000000-abc" / "part-00000.h5").write_bytes(b"x")
    assert find_latest_checkpoint(tmp_path, comm) == str(path)
    atomic.remove_stale(str(tmp_path))
    assert listing(tmp_path) == before


@pytest.mark.parametrize("stage", ["part", "manifest"])
@pytest.mark.parametrize("failure", ["disk-full", "interrupt"])
def test_failed_write_is_one_error_and_leaves_nothing(tmp_path, monkeypatch, failure, stage):
    import errno
    comm = MPI.COMM_SELF
    path = tmp_path / "latest.h5"
    save_checkpoint(path, comm, rank_state(range(N), first=True, last=True, epoch=1, step=10))
    before = listing(tmp_path)

    def fail(*args):
        if failure == "disk-full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise KeyboardInterrupt
    if stage == "part":   # some of the part is written, then the disk is full
        real, calls = atomic.write_at, []

        def write_at(fd, data, offset):
            calls.append(offset)
            if len(calls) > 3:
                fail()
            real(fd, data, offset)
        monkeypatch.setattr(atomic, "write_at", write_at)
    else:
        def write_bytes(p, data):
            with open(p, "xb") as fh:
                fh.write(bytes(data[:64]))  # part of the manifest, then the failure
            fail()
        monkeypatch.setattr(atomic, "write_bytes", write_bytes)
    state = rank_state(range(N), first=True, last=True, epoch=2, step=20)
    if failure == "disk-full":
        with pytest.raises(CheckpointError, match="disk full") as info:
            save_checkpoint(path, comm, state)
        assert "\n" not in str(info.value)
        if stage == "part":
            assert "part-00000.h5" in str(info.value)
    else:  # an interrupt passes through (after the other ranks are told)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(path, comm, state)
    monkeypatch.undo()
    assert listing(tmp_path) == before
    # and a first save that fails leaves nothing at all
    monkeypatch.setattr(atomic, "write_at", lambda *a: fail())
    other = tmp_path / "sub"
    other.mkdir()
    with pytest.raises((CheckpointError, KeyboardInterrupt)):
        save_checkpoint(other / "c.h5", comm, state)
    assert os.listdir(other) == []


def test_previous_checkpoint_kept_and_found(tmp_path):
    comm = MPI.COMM_SELF
    path = tmp_path / "latest.h5"
    for epoch in (1, 2, 3):
        save_checkpoint(path, comm, rank_state(range(N), first=True, last=True,
                                               epoch=epoch, step=10 * epoch))
    prev = previous_path(path)
    assert prev == str(tmp_path / "latest.prev.h5")
    assert verify_checkpoint(path)["epoch"] == 3 and verify_checkpoint(prev)["epoch"] == 2
    # the parts of the two checkpoints kept, no others
    assert len(os.listdir(tmp_path / "latest.parts")) == 2
    assert find_latest_checkpoint(tmp_path, comm) == str(path)
    # Metrics files and other HDF5 files in the run directory are not checkpoints.
    MetricsWriter(tmp_path, comm).append({"epoch": 1, "loss": 0.5})
    # The newest is damaged: the previous one is the newest valid checkpoint.
    raw = bytearray(open(path, "rb").read())
    open(path, "wb").write(raw[: len(raw) // 2])
    assert find_latest_checkpoint(tmp_path, comm) == prev
    assert find_latest_checkpoint(tmp_path / "nothing-here", comm) is None


def test_corrupted_files_refused(tmp_path):
    comm = MPI.COMM_SELF
    path = tmp_path / "c.h5"
    save_checkpoint(path, comm, rank_state(range(N), first=True, last=True))
    for kind, (bad, reason, named) in corrupt_copies(str(path), str(tmp_path)).items():
        before = listing(os.path.dirname(bad))
        with pytest.raises(CheckpointError, match=reason) as e:
            load_checkpoint(bad, comm)
        assert "\n" not in str(e.value) and named in str(e.value), kind
        assert listing(os.path.dirname(bad)) == before   # a load never writes
        with pytest.raises(CheckpointError, match=reason):
            verify_checkpoint(bad)


def corrupt_copies(path, directory):
    """Damaged versions of a good checkpoint (rank 0's work in MPI tests):
    {kind: (path, reason, name in the message)}."""
    raw = open(path, "rb").read()
    out = {}
    bad = os.path.join(directory, "truncated.h5")
    open(bad, "wb").write(raw[: int(len(raw) * 0.7)])
    out["truncated"] = (bad, "unreadable", "truncated.h5")
    bad = os.path.join(directory, "text.h5")
    open(bad, "w").write("hello\n")
    out["not_hdf5"] = (bad, "unreadable", "text.h5")
    out["missing"] = (os.path.join(directory, "missing.h5"), "not found", "missing.h5")
    # the manifest's own header changed: its checksum no longer matches
    bad = copy_checkpoint(path, directory, "header.h5")
    with h5py.File(bad, "r+") as f:
        f.attrs["epoch"] = 99
    out["header"] = (bad, "checksum mismatch", "header.h5")
    # a byte of layer 4's weights flipped in the part that holds it (first or last byte)
    for name, at in (("flipped", 5), ("flipped_last", 3 * 3 * 4 - 1)):
        folder = os.path.join(directory, name)
        os.makedirs(folder, exist_ok=True)
        bad = copy_checkpoint(path, folder)
        for part in part_files(bad):
            with h5py.File(part, "r") as f:
                if "layer.4" in f:
                    offset = f["layer.4/data"].id.get_offset()  # weight first
                    break
        data = bytearray(open(part, "rb").read())
        data[offset + at] ^= 0x10
        open(part, "wb").write(data)
        out[name] = (bad, "checksum mismatch in layer.4", os.path.basename(part))
    # a part file missing
    folder = os.path.join(directory, "lost")
    os.makedirs(folder, exist_ok=True)
    bad = copy_checkpoint(path, folder)
    part = part_files(bad)[-1]
    os.unlink(part)
    out["lost_part"] = (bad, "not found", os.path.basename(part))
    return out


# ------------------------------------------------------------------- MPI

@pytest.mark.mpi
def test_resume_on_other_rank_counts(shared_dir):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = block(rank, size)
    rng = {"torch": torch.Generator().manual_seed(rank).get_state(), "rank": rank}
    path = os.path.join(shared_dir, "latest.h5")
    save_checkpoint(path, comm, rank_state(mine, first=rank == 0, last=rank == size - 1, rng=rng))
    # Same split: each rank gets its own layers back, bit for bit.
    out = load_checkpoint(path, comm, layer_indices=mine, num_layers=N, config=CONFIG)
    assert sorted(out["layers"]) == mine
    assert all(same_bits(out["layers"][n], layer_params(n)) for n in mine)
    assert all(same_bits(out["optimizer"]["layers"][n], layer_opt(n)) for n in mine)
    assert out["rng"]["rank"] == rank and torch.equal(out["rng"]["torch"], rng["torch"])
    # The opening and closing layers came from the first and last rank; everyone gets them.
    assert torch.equal(out["opening"]["weight"], torch.full((3, 2), 0.5))
    assert torch.equal(out["closing"]["weight"], torch.full((5, 3), -0.25))
    # Reversed split on the same ranks.
    rev = block(size - 1 - rank, size)
    out = load_checkpoint(path, comm, layer_indices=rev)
    assert sorted(out["layers"]) == rev
    assert all(same_bits(out["layers"][n], layer_params(n)) for n in rev)
    # One rank alone (COMM_SELF of rank 0) holds the whole network.
    if rank == 0:
        one = load_checkpoint(path, MPI.COMM_SELF, num_layers=N)
        assert sorted(one["layers"]) == list(range(N))
        assert all(same_bits(one["layers"][n], layer_params(n)) for n in range(N))
        assert one["rng"]["rank"] == 0
        assert verify_checkpoint(path)["num_ranks"] == size
        # ... and saves it again from one rank; the world loads that with its split.
        save_checkpoint(os.path.join(shared_dir, "single.h5"), MPI.COMM_SELF, one)
    comm.Barrier()
    out = load_checkpoint(os.path.join(shared_dir, "single.h5"), comm, layer_indices=mine)
    assert all(same_bits(out["layers"][n], layer_params(n)) for n in mine)
    assert out["rng"] is None or rank == 0   # saved by one rank: only rank 0 has an RNG state


@pytest.mark.mpi
def test_bad_checkpoints_refused_on_every_rank(shared_dir):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = block(rank, size)
    path = os.path.join(shared_dir, "good.h5")
    save_checkpoint(path, comm, rank_state(mine, first=rank == 0, last=rank == size - 1))
    bad = corrupt_copies(path, shared_dir) if rank == 0 else None
    bad = comm.bcast(bad, root=0)
    good_sha = comm.bcast(listing(os.path.join(shared_dir, "good.parts")) if rank == 0 else None,
                          root=0)
    cases = [(bad[k][0], {}) for k in sorted(bad)]
    cases += [(path, {"num_layers": N + 1}),
              (path, {"config": {"model": {"act": "relu"}}}),
              (path, {"layer_indices": [N + rank]})]
    # Only the last rank's model has a different shape: still refused everywhere.
    like = rank_state(mine, first=rank == 0, last=rank == size - 1)
    if rank == size - 1:
        like["closing"]["bias"] = torch.zeros(6)
    cases.append((path, {"like": like}))
    for p, kw in cases:
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(p, comm, **kw)
        msg = str(e.value)
        assert "\n" not in msg
        assert comm.allgather(msg) == [msg] * size   # the same error on every rank
    # The good checkpoint is untouched by the failed loads and still loads.
    assert listing(os.path.join(shared_dir, "good.parts")) == good_sha
    assert sorted(load_checkpoint(path, comm, layer_indices=mine)["layers"]) == mine


@pytest.mark.mpi
def test_bad_saves_fail_on_every_rank(shared_dir):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    path = os.path.join(shared_dir, "latest.h5")
    save_checkpoint(path, comm, rank_state(block(rank, size), first=rank == 0, last=rank == size - 1))
    comm.Barrier()
    good = comm.bcast(listing(shared_dir) if rank == 0 else None, root=0)
    mine = block(rank, size)

    def attempt(state):
        with pytest.raises(CheckpointError) as e:
            save_checkpoint(path, comm, state)
        assert comm.allgather(str(e.value)) == [str(e.value)] * size
        return str(e.value)

    # The last rank forgets its layers.
    missing = [] if rank == size - 1 else mine
    msg = attempt(rank_state(missing, first=rank == 0, last=rank == size - 1))
    assert "no rank gave layers" in msg or "layers 0" in msg
    # The last rank cannot pickle its state.
    st = rank_state(mine, first=rank == 0, last=rank == size - 1)
    if rank == size - 1:
        st["extra"] = {"f": lambda: 0}
    msg = attempt(st)
    assert f"rank {size - 1}" in msg
    # The ranks disagree on the epoch (only possible with several ranks).
    if size > 1:
        msg = attempt(rank_state(mine, first=rank == 0, last=rank == size - 1, epoch=rank))
        assert "disagree on epoch" in msg
    comm.Barrier()
    assert listing(shared_dir) == good   # nothing changed, nothing left behind


@pytest.mark.mpi
def test_metrics_written_by_rank_zero_only(shared_dir):
    comm = MPI.COMM_WORLD
    w = MetricsWriter(shared_dir, comm)
    w.append({"epoch": 0, "loss": 1.0})
    comm.Barrier()
    if comm.Get_rank() == 0:
        assert w.rows() == [{"epoch": 0, "loss": 1.0}]
    else:
        assert w.rows() is None and w.num_rows is None
    assert os.path.exists(os.path.join(shared_dir, "metrics.csv"))
    comm.Barrier()


# ---------------------------------------------------------------- metrics

def test_metrics_append_reopen_truncate(tmp_path):
    comm = MPI.COMM_SELF
    rows = [{"epoch": e, "loss": 1.0 / (e + 3), "train_acc": 0.5 + e / 10, "fwd_iters": 2,
             "residuals": [10.0 ** -k for k in range(e + 1)], "phase": "nested" if e else "coarse",
             "wall_time": 0.1 * e, "virtual_time": 1e-3 * e}
            for e in range(5)]
    w = MetricsWriter(tmp_path, comm)
    for r in rows[:2]:
        w.append(r)
    w = MetricsWriter(tmp_path, comm)     # a resumed run reopens and appends
    assert w.num_rows == 2 and w.columns == list(rows[0])
    for r in rows[2:]:
        w.append(r)
    assert w.rows() == rows
    with open(tmp_path / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [int(t["epoch"]) for t in table] == list(range(5))
    assert [float(t["loss"]) for t in table] == [r["loss"] for r in rows]   # exact round trip
    assert table[3]["phase"] == "nested"
    with h5py.File(tmp_path / "metrics.h5", "r") as f:
        np.testing.assert_array_equal(f["train_acc"][:], [r["train_acc"] for r in rows])
        assert f["epoch"].dtype == np.int64 and len(f["residuals"][4]) == 5
    with pytest.raises(ValueError, match="missing"):
        w.append({"epoch": 5, "loss": 0.1})
    with pytest.raises(ValueError, match="integers"):
        w.append(dict(rows[0], fwd_iters=2.5))
    # Resuming from an earlier checkpoint: drop the rows after it.
    w.truncate(3)
    w.append(rows[4])
    assert MetricsWriter(tmp_path, comm).rows() == rows[:3] + [rows[4]]
    with open(tmp_path / "metrics.csv", newline="") as fh:
        assert [int(t["epoch"]) for t in csv.DictReader(fh)] == [0, 1, 2, 4]


def test_metrics_csv_repaired_from_hdf5(tmp_path):
    comm = MPI.COMM_SELF
    w = MetricsWriter(tmp_path, comm)
    for e in range(3):
        w.append({"epoch": e, "loss": 0.5 ** e})
    # A crash in the middle of writing the CSV line.
    text = (tmp_path / "metrics.csv").read_text()
    (tmp_path / "metrics.csv").write_text(text[:-4])
    w = MetricsWriter(tmp_path, comm)
    w.append({"epoch": 3, "loss": 0.125})
    with open(tmp_path / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(int(t["epoch"]), float(t["loss"])) for t in table] == [(e, 0.5 ** e) for e in range(4)]
    (tmp_path / "metrics.h5").unlink()
    with pytest.raises(ValueError, match="metrics.h5"):
        MetricsWriter(tmp_path, comm)
    assert glob.glob(str(tmp_path / "*.tmp")) == []


def test_metrics_survive_a_write_killed_half_way(tmp_path):
    """A kill -9 in the middle of writing the HDF5 record leaves it
    unreadable (here: cut in half, as the write left it before writes went
    through a copy): reopening rebuilds it from the CSV, keeps the damaged
    copy, and appending goes on; a write in progress never touches the
    record itself."""
    comm = MPI.COMM_SELF
    rows = [{"epoch": e, "loss": 0.5 ** e, "phase": "fine", "residuals": [0.1 * e, 0.01]}
            for e in range(3)]
    w = MetricsWriter(tmp_path, comm)
    for r in rows:
        w.append(r)
    raw = (tmp_path / "metrics.h5").read_bytes()
    (tmp_path / "metrics.h5").write_bytes(raw[: len(raw) // 2])
    w = MetricsWriter(tmp_path, comm)
    assert w.rows() == rows and (tmp_path / "metrics.h5.damaged").exists()
    w.append({"epoch": 3, "loss": 0.125, "phase": "fine", "residuals": [0.3]})
    assert MetricsWriter(tmp_path, comm).num_rows == 4
    # a change that fails half way leaves the record as it was
    with pytest.raises(ValueError):
        w.append({"epoch": 4.5, "loss": 0.1, "phase": "fine", "residuals": []})
    assert MetricsWriter(tmp_path, comm).num_rows == 4
    assert not (tmp_path / "metrics.h5.tmp").exists()


@pytest.mark.mpi
def test_metrics_that_cannot_be_opened_raise_on_every_rank(shared_dir):
    comm = MPI.COMM_WORLD
    if comm.rank == 0:
        with open(os.path.join(shared_dir, "metrics.csv"), "w") as fh:
            fh.write("epoch\n1\n")
    try:
        MetricsWriter(shared_dir, comm)
        got = None
    except ValueError as e:
        got = str(e)
    got = comm.allgather(got)
    assert all(g is not None and "metrics.h5" in g for g in got), got


# ------------------------------------------------------ optimiser by name

def make_params(layers, *, first, last):
    """Parameters of a rank's part of a small network, in the state layout."""
    def p(t):
        return torch.nn.Parameter(t.clone())
    return {"layers": {n: {k: p(v) for k, v in layer_params(n).items()} for n in layers},
            "opening": {"weight": p(torch.full((3, 2), 0.5))} if first else {},
            "closing": {"weight": p(torch.full((5, 3), -0.25))} if last else {}}


def leaves(params):
    return list(_named_leaves(params))


def fake_step(opt, params, k):
    """One optimiser step with a gradient that depends only on the
    parameter's name and the step number (so any partition gives the same)."""
    for path, p in leaves(params):
        g = torch.Generator().manual_seed(zlib.crc32(f"{path}:{k}".encode()))
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    opt.step()


def test_optimizer_state_by_name_resumes_exactly(tmp_path):
    comm = MPI.COMM_SELF
    params = make_params(range(N), first=True, last=True)
    opt = torch.optim.Adam([p for _, p in leaves(params)], lr=0.01, betas=(0.8, 0.99))
    for k in range(3):
        fake_step(opt, params, k)
    state = {"num_layers": N, "epoch": 0, "step": 3,
             "layers": {n: {k: v.detach() for k, v in d.items()} for n, d in params["layers"].items()},
             "opening": {k: v.detach() for k, v in params["opening"].items()},
             "closing": {k: v.detach() for k, v in params["closing"].items()},
             "optimizer": ckpt.optimizer_state(opt, params)}
    save_checkpoint(tmp_path / "c.h5", comm, state)
    # A new run: fresh parameters and optimiser with other hyper-parameters.
    st = load_checkpoint(tmp_path / "c.h5", comm)
    params2 = make_params(range(N), first=True, last=True)
    # The network's parameters are declared in another order: names, not positions, match.
    params2["layers"] = dict(reversed(list(params2["layers"].items())))
    with torch.no_grad():
        for path, p in leaves(params2):
            src = st
            for key in path:
                src = src[key]
            p.copy_(src)
    opt2 = torch.optim.Adam([p for _, p in leaves(params2)], lr=0.5)
    ckpt.restore_optimizer_state(opt2, params2, st["optimizer"])
    assert opt2.param_groups[0]["lr"] == 0.01 and opt2.param_groups[0]["betas"] == (0.8, 0.99)
    fake_step(opt, params, 3)
    fake_step(opt2, params2, 3)
    for (path, a), (path2, b) in zip(sorted(leaves(params), key=lambda x: str(x[0])),
                                     sorted(leaves(params2), key=lambda x: str(x[0]))):
        assert path == path2 and torch.equal(a, b), path


@pytest.mark.mpi
def test_optimizer_resume_on_one_rank(shared_dir):
    """Train 3 steps on COMM_WORLD's split, save; continue one step on every
    rank and, from the checkpoint, on rank 0 alone: the same weights."""
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = block(rank, size)
    params = make_params(mine, first=rank == 0, last=rank == size - 1)
    opt = torch.optim.Adam([p for _, p in leaves(params)], lr=0.01)
    for k in range(3):
        fake_step(opt, params, k)
    state = {"num_layers": N, "epoch": 0, "step": 3,
             "layers": {n: {k: v.detach() for k, v in d.items()} for n, d in params["layers"].items()},
             "opening": {k: v.detach() for k, v in params["opening"].items()},
             "closing": {k: v.detach() for k, v in params["closing"].items()},
             "optimizer": ckpt.optimizer_state(opt, params)}
    path = os.path.join(shared_dir, "latest.h5")
    save_checkpoint(path, comm, state)
    fake_step(opt, params, 3)
    continued = comm.gather({str(p): t.detach() for p, t in leaves(params)}, root=0)
    if rank == 0:
        st = load_checkpoint(path, MPI.COMM_SELF)
        alone = make_params(range(N), first=True, last=True)
        with torch.no_grad():
            for p_path, p in leaves(alone):
                src = st
                for key in p_path:
                    src = src[key]
                p.copy_(src)
        opt1 = torch.optim.Adam([p for _, p in leaves(alone)], lr=0.01)
        ckpt.restore_optimizer_state(opt1, alone, st["optimizer"])
        fake_step(opt1, alone, 3)
        merged = {}
        for part in continued:
            merged.update(part)
        got = {str(p): t.detach() for p, t in leaves(alone)}
        assert sorted(got) == sorted(merged)
        assert all(torch.equal(got[k], merged[k]) for k in got)
    comm.Barrier()


def test_keys_added_after_a_checkpoint_take_their_defaults(tmp_path):
    # a checkpoint written before model.bias and model.step_kwargs existed:
    # a run with their default values resumes it, one with other values not
    comm = MPI.COMM_SELF
    path = tmp_path / "c.h5"
    save_checkpoint(path, comm, rank_state(range(N), first=True, last=True))
    defaults = {"model": {"bias": "vector", "step_kwargs": {}, "width": 8}}
    now = {"model": dict(CONFIG["model"], bias="vector", step_kwargs={})}
    load_checkpoint(path, comm, layer_indices=[], config=now, defaults=defaults)
    with pytest.raises(CheckpointError, match="model.bias is not in the checkpoint"):
        load_checkpoint(path, comm, layer_indices=[], config=now)
    with pytest.raises(CheckpointError, match="model.bias = 'vector' in the checkpoint, 'scalar'"):
        load_checkpoint(path, comm, layer_indices=[], defaults=defaults,
                        config={"model": dict(now["model"], bias="scalar")})
    with pytest.raises(CheckpointError, match="model.width = 3 in the checkpoint, 8"):
        load_checkpoint(path, comm, layer_indices=[], defaults=defaults,
                        config={"model": dict(now["model"], width=8)})
