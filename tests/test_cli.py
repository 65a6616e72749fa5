"""The `layerpar` command: digits in every mode, evaluation on another
number of ranks, damaged checkpoints, the one-line errors (NaN/Inf in a
layer among them), --version.

Most tests run the command in this process, on the ranks of the test
session (``command``: ``layerpar.cli.main(argv, comm=...)``); the tests
that need a launcher start it as a child job under mpiexec and are marked
``e2e`` (the end-to-end tier).  The helpers here are shared with the other
command tests (test_cli_failures.py, test_user_cli.py)."""
import contextlib
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from mpi4py import MPI
from torch import nn

from conftest import clean_mpi_env
from layerpar import checkpoint as ckpt

# A run of the command in this process waits for every rank; a child job
# runs under its own time limit (a hang ends as that test's failure); pytest's
# limit, which ends the whole session, lies beyond them.
pytestmark = pytest.mark.timeout(1200)

WORLD = MPI.COMM_WORLD
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "layerpar", "configs")
SMALL = ["--set", "model.nlayers=8", "--set", "model.width=4", "--set", "run.plot=false",
         "--set", 'mgrit.mode="serial"', "--set", "data.batch_size=500"]


# ---- the command in this process ------------------------------------------------------

class CommandAborted(AssertionError):
    """The command ended the job (MPI_Abort) on a one-rank communicator: the
    test fails instead of the session ending."""


class Result:
    """What a run of the command gave on every rank that ran it: ``status``
    (the same on every rank, else the test fails), rank 0's ``out`` and
    ``err``, and ``text``: every rank's output, as a launcher shows it."""

    def __init__(self, told):
        self.statuses = [status for status, _, _ in told]
        assert self.statuses == [self.statuses[0]] * len(told), told
        self.status = self.statuses[0]
        _, self.out, self.err = told[0]
        self.text = "".join(out + err for _, out, err in told)
        self.quiet_elsewhere = all(not (out or err) for _, out, err in told[1:])


def _main_here(argv, comm):
    """(status, stdout, stderr) of ``layerpar.cli.main(argv)`` on ``comm``
    in this process.  What it changes in the process is put back: torch's
    threads, the run folder's lock (the command holds it until its process
    ends), and an abort of a one-rank communicator raises CommandAborted."""
    from layerpar import cli, rundir
    threads = torch.get_num_threads()
    job = comm.Dup()  # a timeout the run sets stays on this copy
    abort = cli._abort

    def no_abort(c, code):
        if c.Get_size() == 1:
            raise CommandAborted(f"the command ended the job with status {code}")
        abort(c, code)
    cli._abort = no_abort
    locks = len(rundir._held_locks)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main([str(a) for a in argv], comm=job)
    finally:
        cli._abort = abort
        job.Free()
        torch.set_num_threads(threads)
        while len(rundir._held_locks) > locks:  # the locks this run took
            rundir._held_locks.pop().close()
    return status, out.getvalue(), err.getvalue()


def command(*argv, ranks=None):
    """Collective over the test session's ranks: ``layerpar *argv`` in this
    process on the first ``ranks`` of them (default: all); the Result on
    every rank."""
    n = WORLD.size if ranks is None else ranks
    comm = WORLD.Split(0 if WORLD.rank < n else MPI.UNDEFINED, WORLD.rank)
    mine = error = None
    if comm != MPI.COMM_NULL:
        try:
            mine = _main_here(argv, comm)
        except Exception as e:  # noqa: BLE001 - raised below, on every rank
            error = e
        finally:
            comm.Free()
    # every rank -> every rank: what the command gave here, or how it failed
    told = WORLD.allgather((mine, None if error is None else f"{type(error).__name__}: {error}"))
    failed = [(rank, e) for rank, (_, e) in enumerate(told) if e is not None]
    if error is not None:
        raise error
    if failed:
        raise AssertionError(f"the command failed on rank {failed[0][0]}: {failed[0][1]}")
    return Result([t for t, _ in told if t is not None])


def error_line(r):
    """The one `layerpar: error:` line of a run, printed by rank 0 on
    stderr, with no traceback anywhere."""
    assert "Traceback" not in r.text, r.text
    lines = [ln for ln in r.text.splitlines() if ln.startswith("layerpar: error:")]
    assert len(lines) == 1 and lines[0] in r.err.splitlines(), r.text
    return lines[0]


def shared_dir(tmp_path_factory, name):
    """A new folder that every rank of the session names (made by rank 0)."""
    path = str(tmp_path_factory.mktemp(name)) if WORLD.rank == 0 else None
    return WORLD.bcast(path, root=0)


def on_rank0(fn, *args):
    """Collective: fn(*args) on rank 0 (file work in a shared folder); its
    result, or its exception, on every rank."""
    from layerpar._collective import on_root
    return on_root(WORLD, lambda: fn(*args))


def last_row(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as fh:
        return list(csv.DictReader(fh))[-1]


def final_weights(path):
    st = ckpt.load_checkpoint(path, MPI.COMM_SELF, layer_indices=None)
    out = {f"layers.{n}.{k}": v for n, d in st["layers"].items() for k, v in d.items()}
    out.update({f"opening.{k}": v for k, v in st["opening"].items()})
    out.update({f"closing.{k}": v for k, v in st["closing"].items()})
    return out, st


# ---- the command as a child job (the end-to-end tier) ---------------------------------

def layerpar(mpiexec, n, *args, timeout=300):
    cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "layerpar", *args]
    return subprocess.run(cmd, env=clean_mpi_env(), capture_output=True, text=True,
                          timeout=timeout)


def error_lines(r):
    text = r.stdout + r.stderr
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.startswith("layerpar: error:")]
    assert len(lines) == 1, text
    return lines[0]


# ---- training and evaluation ------------------------------------------------------------

def test_digits_conv_all_modes(tmp_path_factory):
    # 6 of the configuration's 15 epochs (cosine schedule over 6): each mode
    # reaches about 96.7% already.  Once, on one process (the accuracy does
    # not depend on the number of ranks: tests/test_training.py)
    base = shared_dir(tmp_path_factory, "digits")
    acc = {}
    for mode in ("serial", "layer-parallel", "one-shot"):
        run_dir = os.path.join(base, mode)
        r = command("train", "--config", os.path.join(CONFIGS, "digits-conv.toml"),
                    "--run-dir", run_dir, "--set", f'mgrit.mode="{mode}"',
                    "--set", "run.plot=false", "--set", "optim.epochs=6", "-q")
        assert r.status == 0, r.text
        acc[mode] = float(last_row(run_dir)["val_acc"])
    print(f"\ndigits conv, {WORLD.size} ranks, validation accuracy: " +
          ", ".join(f"{m} {100 * a:.2f}%" for m, a in acc.items()))
    assert acc["serial"] >= 0.95
    for mode in ("layer-parallel", "one-shot"):
        assert acc[mode] >= 0.95
        assert abs(acc[mode] - acc["serial"]) <= 0.02


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small run of 2 epochs on the session's ranks, shared by the tests
    that read it (or copy it before they change it)."""
    run_dir = os.path.join(shared_dir(tmp_path_factory, "trained"), "run")
    r = command("train", "--run-dir", run_dir, *SMALL, "--set", "optim.epochs=2", "-q")
    assert r.status == 0, r.text
    return run_dir


@pytest.mark.mpi
def test_eval_on_one_rank_matches_training(trained):
    acc = float(last_row(trained)["val_acc"])
    for n in sorted({1, WORLD.size}):
        r = command("eval", "--checkpoint", os.path.join(trained, "checkpoint.h5"), ranks=n)
        assert r.status == 0, r.text
        assert r.quiet_elsewhere, r.text  # rank 0 alone prints
        line = r.out.strip().splitlines()[-1]
        assert f"accuracy {100 * acc:.2f}%" in line, line
        assert f", {n} rank{'' if n == 1 else 's'}, " in line, line


@pytest.mark.mpi
def test_one_rank_is_named_in_the_singular(tmp_path_factory):
    run_dir = os.path.join(shared_dir(tmp_path_factory, "one"), "run")
    r = command("train", "--run-dir", run_dir, *SMALL, "--set", "optim.epochs=1", ranks=1)
    assert r.status == 0, r.text
    assert "on 1 rank (1 x 1 grid)" in r.out.splitlines()[-1], r.out
    assert "1 ranks" not in r.text


def weight_offset(path):
    """File offset of the first byte of the largest contiguous dataset."""
    import h5py
    best = (0, None)
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            nonlocal best
            if isinstance(obj, h5py.Dataset) and obj.id.get_offset() is not None \
                    and obj.id.get_storage_size() > best[0]:
                best = (obj.id.get_storage_size(), obj.id.get_offset())
        f.visititems(visit)
    assert best[1] is not None
    return best[1]


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def copy_run(trained, tmp_path_factory, name):
    """A copy of the trained run (its parts with it), in a shared folder."""
    from pathlib import Path
    run = os.path.join(shared_dir(tmp_path_factory, name), "run")
    on_rank0(shutil.copytree, trained, run)
    return Path(run)


@pytest.mark.mpi
@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_checkpoint_falls_back_to_the_previous(trained, tmp_path_factory, damage):
    run = copy_run(trained, tmp_path_factory, damage)
    path, prev = run / "checkpoint.h5", run / "checkpoint.prev.h5"

    def damage_it():
        digest = hashlib.sha256(prev.read_bytes()).hexdigest()
        step = ckpt.verify_checkpoint(str(prev))["step"]
        if damage == "truncate":   # the manifest
            truncate(path)
        else:   # one bit of one stored weight, in the first rank's part
            import h5py
            with h5py.File(path, "r") as f:
                part = run / f.attrs["parts_dir"] / "part-00000.h5"
            data = bytearray(part.read_bytes())
            data[weight_offset(part)] ^= 0x01
            part.write_bytes(bytes(data))
        return digest, step
    prev_digest, prev_step = on_rank0(damage_it)
    r = command("eval", "--checkpoint", path, ranks=1)
    assert r.status != 0
    assert "checkpoint.h5" in error_line(r)
    # --resume continues from checkpoint.prev.h5 (as --help says), with a warning
    r = command("train", "--run-dir", run, "--resume", "--set", "optim.epochs=3")
    assert r.status == 0, r.text
    assert "checkpoint.prev.h5" in r.out and f"step {prev_step}" in r.out, r.out
    damaged = [f for f in os.listdir(run) if ".damaged-" in f]
    assert len(damaged) == 1
    assert hashlib.sha256((run / damaged[0]).read_bytes()).hexdigest() != prev_digest
    assert ckpt.verify_checkpoint(str(path))["epoch"] == 3
    # the good previous checkpoint also resumes explicitly, without repeating the settings
    other = run.parent / "other"

    def copy_prev():
        other.mkdir()
        (other / "base.h5").write_bytes(prev.read_bytes())   # with its parts
        shutil.copytree(run / "checkpoint.parts", other / "checkpoint.parts")
    on_rank0(copy_prev)
    r = command("train", "--resume-from", other / "base.h5", "-q")
    assert r.status == 0, r.text


@pytest.mark.mpi
def test_both_checkpoints_damaged_sends_the_user_to_neither(trained, tmp_path_factory):
    run = copy_run(trained, tmp_path_factory, "both")
    on_rank0(truncate, run / "checkpoint.h5")
    on_rank0(truncate, run / "checkpoint.prev.h5")
    r = command("train", "--run-dir", run, "--resume", "--set", "optim.epochs=3")
    assert r.status == 1
    line = error_line(r)
    assert "checkpoint.h5" in line
    assert "--resume-from" not in line and "checkpoint.prev.h5" not in line, line


@pytest.mark.mpi
def test_resume_from_a_missing_checkpoint_leaves_no_folder(tmp_path_factory):
    base = shared_dir(tmp_path_factory, "missing")
    missing = os.path.join(base, "nothing", "checkpoint.h5")
    for where in ([], ["--run-dir", os.path.join(base, "run")]):
        r = command("train", "--resume-from", missing, *where, *SMALL)
        assert r.status == 1
        assert missing in error_line(r)
        assert os.listdir(base) == []  # no run folder, no lock


# ---- one-line errors ------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("setting,named", [
    ("optim.lr=-0.5", "optim.lr"),
    ('data.name="imagenet"', "data.name"),
    ("mgrit.cfactor=1", "mgrit.cfactor"),
    ('mgrit.mode="fast"', "mgrit.mode"),
])
def test_invalid_configuration_one_line_error(tmp_path_factory, setting, named):
    run_dir = shared_dir(tmp_path_factory, "invalid")
    r = command("train", "--run-dir", run_dir, "--set", setting, "-q")
    assert r.status != 0
    assert named in error_line(r)
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.h5"))


@pytest.mark.mpi
def test_missing_data_directory_one_line_error(tmp_path_factory):
    base = shared_dir(tmp_path_factory, "nodata")
    r = command("train", "--run-dir", os.path.join(base, "run"),
                "--set", 'data.name="mnist"', "--set", f'data.root="{base}/nothing"', "-q")
    assert r.status != 0
    line = error_line(r)
    assert "nothing" in line and "train-images-idx3-ubyte" in line


# NaN/Inf: with ReLU, T = 1e4 (a step of h = 312) and float32 the states
# overflow within the first forward pass
NONFINITE = ["--set", 'model.activation="relu"', "--set", "model.T=1e4",
             "--set", 'data.dtype="float32"', "--set", "run.plot=false",
             "--set", "optim.epochs=1", "-q"]


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["layer-parallel", "one-shot", "serial"])
def test_nan_in_a_layer_is_one_line_naming_the_layer(tmp_path_factory, mode):
    # layer-parallel and one-shot: the MGRIT solve's NonFiniteResidualError
    # (an MGRITError, a RuntimeError); serial: the pipeline's FloatingPointError
    run_dir = os.path.join(shared_dir(tmp_path_factory, "nan"), "run")
    r = command("train", "--run-dir", run_dir, *NONFINITE, "--set", f'mgrit.mode="{mode}"')
    assert r.status == 1, r.text
    line = error_line(r)
    assert "NaN or Inf" in line and re.search(r"\blayer \d+\b", line), line


class NaNOnLastRank(nn.Module):
    """tanh(W u + b); but on the last rank of COMM_WORLD a call recorded for
    back-propagation (the final sweep of a layer-parallel solve) finds NaN
    and raises FloatingPointError naming its layer, as the engine's checks
    do: the solve fails there, and the other ranks are told (an MGRITError
    naming the last rank)."""

    def __init__(self, width=4):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.poisoned = WORLD.rank == WORLD.size - 1

    def forward(self, u):
        if self.poisoned and torch.is_grad_enabled() and u.requires_grad:
            raise FloatingPointError("layer 7 produced NaN or Inf")
        return torch.tanh(self.linear(u))


@pytest.mark.mpi
def test_nan_on_one_rank_is_reported_as_it_happened_there(tmp_path_factory):
    # rank 0 prints the line of the rank where the layer failed, not the
    # MGRITError that tells the other ranks of it
    run_dir = os.path.join(shared_dir(tmp_path_factory, "nan1"), "run")
    r = command("train", "--run-dir", run_dir, "--set", "model.nlayers=8",
                "--set", "model.width=4", "--set", "data.batch_size=500",
                "--set", 'mgrit.mode="layer-parallel"', "--set", "mgrit.cfactor=2",
                "--set", 'model.step="test_cli:NaNOnLastRank"',
                "--set", "model.step_kwargs={width = 4}", "--set", "optim.epochs=1", "-q")
    assert r.status == 1, r.text
    line = error_line(r)
    assert line.startswith("layerpar: error: layer 7 produced NaN or Inf"), line
    assert "abandoned" not in line and "rank" not in line, line


@pytest.mark.mpi
def test_info():
    r = command("info")
    assert r.status == 0, r.text
    assert f"ranks: {WORLD.size}" in r.out and "MPI library" in r.out and "torch" in r.out


@pytest.mark.e2e
def test_version(mpiexec):
    import layerpar
    r = subprocess.run([sys.executable, "-m", "layerpar", "--version"], env=clean_mpi_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"layerpar {layerpar.__version__}\n"
    r = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "layerpar", "--version"],
                       env=clean_mpi_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"layerpar {layerpar.__version__}\n"  # once, not once per rank
