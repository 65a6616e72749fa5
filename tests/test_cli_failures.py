"""The `layerpar` command when things go wrong: signals (to the launcher or
to one rank) and SIGKILL, run folders that hold results or are in use,
resuming with the run's own configuration, one-line errors for what a user
can cause, a full disk.

The tests of signals and SIGKILL start the command as a child job under
mpiexec (marked ``e2e``); the others run it in this process on the ranks of
the test session (``command``, see test_cli.py)."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import clean_mpi_env
from layerpar import checkpoint as ckpt
from test_cli import (SMALL, WORLD, command, error_line, final_weights, last_row, layerpar,
                      on_rank0, shared_dir)

# Each test runs child jobs, each under its own time limit (a hang ends as that
# test's failure); pytest's limit, which ends the whole session, lies beyond them.
pytestmark = pytest.mark.timeout(1200)

STEPS = [*SMALL, "--set", "data.batch_size=100", "-q"]  # 50 steps per epoch
# long enough that a launcher which passes the signal on late (Open MPI's mpirun
# took about a second) still finds the run training: the signal follows the
# first checkpoint (step 10) by 190 steps, SIGKILL the one at step 60 by 140
SIGNALLED_EPOCHS = 4
SIGNALLED = [*STEPS, "--set", f"optim.epochs={SIGNALLED_EPOCHS}",
             "--set", "run.checkpoint_every=10"]


# ---- signals and SIGKILL: child jobs (the end-to-end tier) ----------------------------

# the tests that use it run in one pytest-xdist worker (--dist loadgroup)
SHARES_UNINTERRUPTED = pytest.mark.xdist_group("uninterrupted")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mpiexec):
    """The run that the stopped or killed runs continue, on 2 ranks."""
    run_dir = tmp_path_factory.mktemp("full")
    r = layerpar(mpiexec, 2, "train", "--run-dir", str(run_dir), *SIGNALLED)
    assert r.returncode == 0, r.stdout + r.stderr
    return run_dir


def open_mpi_launcher():
    """Whether the child mpiexec is Open MPI's (the MPI this Python's mpi4py
    is built against, whose mpiexec the fixture finds)."""
    from mpi4py import MPI
    return MPI.Get_library_version().startswith("Open MPI")


def start(mpiexec, n, *args):
    cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "layerpar", *args]
    return subprocess.Popen(cmd, env=clean_mpi_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_checkpoint(p, path, timeout=120, step=0):
    """Until ``path`` verifies (at ``step`` or later) while job ``p`` runs."""
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(path):
            try:
                if ckpt.verify_checkpoint(path)["step"] >= step:
                    return
            except ckpt.CheckpointError:
                pass
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def finish(p, timeout=60):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise AssertionError("the ranks did not exit after the signal") from None
    return p.returncode, out, err


def rank_pid(launcher, rank):
    """The process of rank ``rank`` in the job that process ``launcher``
    started: its descendant that runs layerpar with that rank in its
    environment (MPICH: PMI_RANK; Open MPI: OMPI_COMM_WORLD_RANK)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    wanted = {f"{name}={rank}".encode() for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK")}
    todo = [launcher]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmdline = fh.read()
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    environ = set(fh.read().split(b"\0"))
            except OSError:
                continue
            if b"layerpar" in cmdline and wanted & environ:
                return pid
    raise AssertionError(f"no process of rank {rank} under process {launcher}")


def stopped_line(text, sig):
    assert "Traceback" not in text, text
    stopped = [ln for ln in text.splitlines() if ln.startswith("layerpar: stopped by")]
    assert len(stopped) == 1 and signal.Signals(sig).name in stopped[0], text
    assert "--resume" in stopped[0]
    return stopped[0]


def assert_resumes_bit_for_bit(mpiexec, full, part):
    """Resume the stopped run in ``part`` on 2 ranks: its final weights and
    step equal the uninterrupted run's (``full``) bit for bit; those weights."""
    r = layerpar(mpiexec, 2, "train", "--run-dir", str(part), "--resume", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    wf, stf = final_weights(str(full / "checkpoint.h5"))
    wp, stp = final_weights(str(part / "checkpoint.h5"))
    assert stf["step"] == stp["step"]
    for k in wf:
        assert torch.equal(wf[k], wp[k]), k
    return wf


@pytest.mark.e2e
@SHARES_UNINTERRUPTED
@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_every_rank_saves_and_resume_continues(tmp_path, mpiexec, uninterrupted,
                                                            sig, status):
    full = uninterrupted
    part = tmp_path / "part"
    p = start(mpiexec, 2, "train", "--run-dir", str(part), *SIGNALLED)
    wait_for_checkpoint(p, str(part / "checkpoint.h5"))
    os.kill(p.pid, sig)  # to mpiexec, which passes it to the ranks
    code, out, err = finish(p)
    text = out + err
    if open_mpi_launcher():
        # Open MPI's mpirun ends the job by sending SIGTERM to the ranks, for
        # SIGINT and SIGTERM alike, and exits with 1 whatever their status
        sig, status = signal.SIGTERM, 1
    assert code == status, text
    stopped_line(text, sig)
    header = ckpt.verify_checkpoint(str(part / "checkpoint.h5"))
    assert header["epoch"] < SIGNALLED_EPOCHS, "the run finished before the signal"
    assert not glob.glob(str(part / ".*.tmp.*"))
    assert not glob.glob(str(part / "checkpoint.parts" / ".tmp.*"))

    assert_resumes_bit_for_bit(mpiexec, full, part)
    assert last_row(full)["train_loss"] == last_row(part)["train_loss"]


@pytest.mark.e2e
@pytest.mark.parametrize("sig,rank,status", [(signal.SIGTERM, 1, 143), (signal.SIGINT, 0, 130)])
def test_signal_to_one_rank_stops_every_rank_with_its_status(tmp_path, mpiexec, sig, rank,
                                                             status):
    # `kill -TERM` of one rank's process, or Ctrl-C reaching rank 0 alone: the
    # ranks agree on the signal with the stop, and every rank exits with its
    # status, so the launcher does too (the launcher is not signalled: Open
    # MPI's mpirun, like MPICH's, passes on the ranks' status)
    part = tmp_path / "part"
    p = start(mpiexec, 2, "train", "--run-dir", str(part), *SIGNALLED)
    wait_for_checkpoint(p, str(part / "checkpoint.h5"))
    os.kill(rank_pid(p.pid, rank), sig)
    code, out, err = finish(p)
    text = out + err
    assert code == status, text
    assert f"after step {ckpt.verify_checkpoint(str(part / 'checkpoint.h5'))['step']} " \
        in stopped_line(text, sig)
    header = ckpt.verify_checkpoint(str(part / "checkpoint.h5"))
    assert header["epoch"] < SIGNALLED_EPOCHS, "the run finished before the signal"


@pytest.mark.e2e
@SHARES_UNINTERRUPTED
def test_sigkill_between_checkpoints_and_resume(tmp_path, mpiexec, uninterrupted):
    full = uninterrupted

    def killed_run(run_dir):
        # killed in the second epoch, after a checkpoint and well before the
        # epoch's end (step 100), where rank 0 appends to metrics.h5
        p = start(mpiexec, 2, "train", "--run-dir", str(run_dir), *SIGNALLED)
        path = run_dir / "checkpoint.h5"
        try:
            wait_for_checkpoint(p, str(path), step=60)
        finally:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
        epoch = ckpt.verify_checkpoint(str(path))["epoch"]
        assert epoch < SIGNALLED_EPOCHS, "the run finished before it could be killed"
        return epoch

    # resume on the same number of ranks: bit for bit
    part = tmp_path / "part"
    killed_run(part)
    wf = assert_resumes_bit_for_bit(mpiexec, full, part)

    # resume on another number of ranks: equal to round-off
    other = tmp_path / "other"
    killed_run(other)
    r = layerpar(mpiexec, 1, "train", "--run-dir", str(other), "--resume", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    wo, _ = final_weights(str(other / "checkpoint.h5"))
    for k in wf:
        assert torch.allclose(wf[k], wo[k], rtol=1e-12, atol=1e-14), k


# ---- the command in this process, on the session's ranks -------------------------------

TINY = ["--set", "model.nlayers=8", "--set", "model.width=4", "--set", "run.plot=false",
        "--set", "data.batch_size=500", "--set", "optim.epochs=1", "-q"]


@pytest.fixture
def shared(tmp_path_factory):
    """A new folder in which every rank of the session works."""
    from pathlib import Path
    return Path(shared_dir(tmp_path_factory, "cli"))


def one_error(r):
    return error_line(r)


def rows(run_dir):
    import csv
    with open(os.path.join(run_dir, "metrics.csv")) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.mpi
def test_fresh_runs_get_new_numbered_folders(shared, monkeypatch):
    monkeypatch.chdir(shared)
    for k in (1, 2):
        r = command("train", *TINY)
        assert r.status == 0, r.text
        assert f"runs/peaks-{k}" in r.out
    for k in (1, 2):
        assert len(rows(shared / "runs" / f"peaks-{k}")) == 1


@pytest.mark.mpi
def test_folder_with_results_is_refused_unless_resume_or_overwrite(shared):
    run_dir = str(shared / "run")
    assert command("train", "--run-dir", run_dir, *TINY).status == 0
    before = (shared / "run" / "checkpoint.h5").read_bytes()
    r = command("train", "--run-dir", run_dir, *TINY)
    assert r.status == 2
    line = one_error(r)
    assert "--resume" in line and "--overwrite" in line
    assert (shared / "run" / "checkpoint.h5").read_bytes() == before
    r = command("train", "--run-dir", run_dir, "--overwrite", *TINY)
    assert r.status == 0, r.text
    assert len(rows(run_dir)) == 1  # replaced, not appended to


@pytest.mark.mpi
def test_a_second_live_run_in_the_same_folder_is_refused(shared):
    # the lock (flock) of another open of the folder's lock file: refused as
    # another process's would be
    from mpi4py import MPI
    from layerpar import rundir
    run_dir = str(shared / "run")
    if WORLD.rank == 0:
        assert rundir.prepare(MPI.COMM_SELF, run_dir, default=("runs", "x")) == run_dir
    try:
        r = command("train", "--run-dir", run_dir, *TINY)
        assert r.status == 2
        assert "in use by a live run" in error_line(r)
        assert not os.path.exists(os.path.join(run_dir, "metrics.csv"))
    finally:
        if WORLD.rank == 0:
            rundir._held_locks.pop().close()


@pytest.mark.mpi
def test_temporary_files_of_dead_runs_are_removed(shared):
    run_dir = shared / "run"
    stale = run_dir / ".checkpoint.h5.tmp.4242.0badf00d"
    stale_parts = run_dir / "checkpoint.parts" / ".tmp.20260101-000000-0badf00d"

    def leave_stale_files():
        stale_parts.mkdir(parents=True)
        stale.write_bytes(b"half a checkpoint")
        (stale_parts / "part-00000.h5").write_bytes(b"half a part")
    on_rank0(leave_stale_files)
    r = command("train", "--run-dir", run_dir, *TINY)
    assert r.status == 0, r.text
    assert not stale.exists() and not stale_parts.exists()
    # the parts of the run's own checkpoint (and no others) are there
    assert len(os.listdir(run_dir / "checkpoint.parts")) == len(
        [p for p in ("checkpoint.h5", "checkpoint.prev.h5") if (run_dir / p).exists()])


@pytest.mark.mpi
def test_resume_uses_the_run_configuration(shared):
    run_dir = str(shared / "run")
    r = command("train", "--run-dir", run_dir, *TINY, "--set", "model.nlayers=12",
                "--set", 'mgrit.mode="serial"')
    assert r.status == 0, r.text
    # nothing repeated but the change: the stored model (12 layers) is used
    r = command("train", "--run-dir", run_dir, "--resume", "--set", "optim.epochs=2", "-q")
    assert r.status == 0, r.text
    assert ckpt.verify_checkpoint(os.path.join(run_dir, "checkpoint.h5"))["epoch"] == 2
    assert len(rows(run_dir)) == 2
    r = command("train", "--run-dir", run_dir, "--resume", "--set", "model.width=6",
                "--set", "optim.epochs=3", "-q")
    assert r.status == 2
    assert "model.width" in one_error(r)
    # --resume-from with the checkpoint's own configuration
    r = command("train", "--resume-from", os.path.join(run_dir, "checkpoint.prev.h5"),
                "--run-dir", str(shared / "branch"), "-q")
    assert r.status == 0, r.text


@pytest.mark.mpi
@pytest.mark.parametrize("case,named", [
    ("dir-is-file", "is a file"),
    ("config-is-dir", "is a directory"),
    ("width-too-large", "model.width"),
    ("root-with-peaks", "data.root"),
    ("diverging-lr", "optim.lr"),
])
def test_user_errors_are_one_line_on_stderr(shared, case, named):
    run_dir = shared / "run"
    args = {"dir-is-file": [], "config-is-dir": ["--config", str(shared)],
            "width-too-large": ["--set", "model.width=3000000"],
            "root-with-peaks": ["--set", f'data.root="{shared}"'],
            "diverging-lr": ["--set", "optim.lr=1e6"]}[case]
    if case == "dir-is-file":
        on_rank0(run_dir.write_text, "not a folder")
    r = command("train", "--run-dir", str(run_dir), *TINY, *args)
    assert r.status in (1, 2)
    assert named in one_error(r)


@pytest.fixture
def read_only_folder(shared):
    """An empty folder that rank 0 cannot write into: mode 0555, and for
    root (who ignores the mode) a read-only bind mount of it."""
    folder = shared / "run"

    def make():
        folder.mkdir(mode=0o555)
        if os.geteuid() != 0:
            return False
        r = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return (f"root writes into folders of any mode, and cannot mount here: "
                    f"{r.stderr.strip()}")
        return True
    mounted = on_rank0(make)
    if isinstance(mounted, str):
        pytest.skip(mounted)
    yield folder
    WORLD.Barrier()
    if mounted and WORLD.rank == 0:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.mpi
def test_read_only_run_folder_is_one_line(read_only_folder):
    r = command("train", "--run-dir", str(read_only_folder), *TINY)
    assert r.status == 2
    assert "not writable" in one_error(r)


@pytest.mark.mpi
def test_lbfgs_takes_its_own_learning_rate_and_schedule(shared):
    r = command("train", "--run-dir", str(shared / "a"), *TINY[:-1],
                "--set", 'optim.name="lbfgs"', "--set", 'mgrit.mode="serial"')
    assert r.status == 0, r.text
    assert "optim.lr = 1.0" in r.out and 'optim.schedule = "constant"' in r.out
    from layerpar.config import resolve
    # an explicit choice is kept
    c = resolve(None, ['optim.name="lbfgs"', "optim.lr=0.5"])
    assert c["optim"]["lr"] == 0.5 and c["optim"]["schedule"] == "constant"


@pytest.mark.mpi
def test_no_periodic_checkpoints(shared):
    run_dir = shared / "run"
    r = command("train", "--run-dir", str(run_dir), *TINY, "--set", "optim.epochs=2",
                "--set", "run.checkpoint_every=-1")
    assert r.status == 0, r.text
    assert ckpt.verify_checkpoint(str(run_dir / "checkpoint.h5"))["epoch"] == 2
    assert not (run_dir / "checkpoint.prev.h5").exists()  # no earlier save was replaced


@pytest.mark.mpi
def test_full_disk_during_a_save_is_one_line_and_leaves_nothing(shared, monkeypatch):
    import errno
    import layerpar.checkpoint.atomic as c
    run_dir = shared / "run"
    real = c.write_at

    def full(fd, data, offset):
        if offset > 2000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data, offset)
    if WORLD.rank == min(1, WORLD.size - 1):  # the disk of one rank's part is full
        monkeypatch.setattr(c, "write_at", full)
    r = command("train", "--run-dir", str(run_dir), *TINY)
    assert r.status == 1, r.text
    assert "disk full" in error_line(r)
    assert not glob.glob(str(run_dir / ".*tmp*"))
    assert not (run_dir / "checkpoint.h5").exists()
    assert not (run_dir / "checkpoint.parts").exists()


@pytest.mark.mpi
def test_full_disk_while_writing_metrics_is_one_line_on_every_rank(shared, monkeypatch):
    import errno
    import layerpar.metrics as m

    def full(self, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.csv_path)
    monkeypatch.setattr(m.MetricsWriter, "append", full)
    r = command("train", "--run-dir", str(shared / "run"), *TINY)
    assert r.status == 1, r.text
    line = error_line(r)
    assert "disk full" in line and "metrics.csv" in line
    assert "error on rank" not in r.text  # every rank agreed: no abort of one rank
