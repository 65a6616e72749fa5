"""The `layerpar` command when things go wrong: signals and the time limit,
run folders that hold results or are in use, resuming with the run's own
configuration, one-line errors for what a user can cause, a full disk."""
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
from test_cli import SMALL, error_lines, final_weights, last_row, layerpar

# Each test runs child jobs, each under its own time limit (a hang ends as that
# test's failure); pytest's limit, which ends the whole session, lies beyond them.
pytestmark = pytest.mark.timeout(1200)

STEPS = [*SMALL, "--set", "data.batch_size=100", "-q"]  # 50 steps per epoch
# long enough that a launcher which passes the signal on late (Open MPI's mpirun
# took about a second) still finds the run training
SIGNALLED_EPOCHS = 10
SIGNALLED = [*STEPS, "--set", f"optim.epochs={SIGNALLED_EPOCHS}",
             "--set", "run.checkpoint_every=10"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mpiexec):
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


def wait_for_checkpoint(p, path, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(path):
            try:
                ckpt.verify_checkpoint(path)
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
    assert "Traceback" not in text, text
    stopped = [ln for ln in text.splitlines() if ln.startswith("layerpar: stopped by")]
    assert len(stopped) == 1 and signal.Signals(sig).name in stopped[0], text
    assert "--resume" in stopped[0]
    header = ckpt.verify_checkpoint(str(part / "checkpoint.h5"))
    assert header["epoch"] < SIGNALLED_EPOCHS, "the run finished before the signal"
    assert not glob.glob(str(part / ".*.tmp.*"))
    assert not glob.glob(str(part / "checkpoint.parts" / ".tmp.*"))

    r = layerpar(mpiexec, 2, "train", "--run-dir", str(part), "--resume", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    wf, stf = final_weights(str(full / "checkpoint.h5"))
    wp, stp = final_weights(str(part / "checkpoint.h5"))
    assert stf["step"] == stp["step"]
    for k in wf:
        assert torch.equal(wf[k], wp[k]), k
    assert last_row(full)["train_loss"] == last_row(part)["train_loss"]


# ---- in-process runs of the command (one rank) ---------------------------------------

TINY = ["--set", "model.nlayers=8", "--set", "model.width=4", "--set", "run.plot=false",
        "--set", "data.batch_size=500", "--set", "optim.epochs=1", "-q"]


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (exit status, stdout, stderr) of `layerpar` run in this
    process (its signal handlers are put back afterwards)."""
    from layerpar import cli as command
    from layerpar import rundir

    def run(*argv):
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = command.main(list(argv))
        finally:
            for s, h in saved.items():
                signal.signal(s, h)
            while rundir._held_locks:  # the command would hold them until it exits
                rundir._held_locks.pop().close()
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def one_error(out, err):
    assert "Traceback" not in out + err, out + err
    lines = [ln for ln in (out + err).splitlines() if ln.startswith("layerpar: error:")]
    assert len(lines) == 1 and lines[0] in err.splitlines(), out + err
    return lines[0]


def rows(run_dir):
    import csv
    with open(os.path.join(run_dir, "metrics.csv")) as fh:
        return list(csv.DictReader(fh))


def test_fresh_runs_get_new_numbered_folders(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    for k in (1, 2):
        code, out, err = cli("train", *TINY)
        assert code == 0, out + err
        assert f"runs/peaks-{k}" in out
    for k in (1, 2):
        assert len(rows(tmp_path / "runs" / f"peaks-{k}")) == 1


def test_folder_with_results_is_refused_unless_resume_or_overwrite(tmp_path, cli):
    run_dir = str(tmp_path / "run")
    assert cli("train", "--run-dir", run_dir, *TINY)[0] == 0
    before = (tmp_path / "run" / "checkpoint.h5").read_bytes()
    code, out, err = cli("train", "--run-dir", run_dir, *TINY)
    assert code == 2
    line = one_error(out, err)
    assert "--resume" in line and "--overwrite" in line
    assert (tmp_path / "run" / "checkpoint.h5").read_bytes() == before
    code, out, err = cli("train", "--run-dir", run_dir, "--overwrite", *TINY)
    assert code == 0, out + err
    assert len(rows(run_dir)) == 1  # replaced, not appended to


def test_a_second_live_run_in_the_same_folder_is_refused(tmp_path):
    from mpi4py import MPI
    from layerpar import rundir
    run_dir = str(tmp_path / "run")
    assert rundir.prepare(MPI.COMM_SELF, run_dir, default=("runs", "x")) == run_dir
    try:
        cmd = [sys.executable, "-m", "layerpar", "train", "--run-dir", run_dir, *TINY]
        r = subprocess.run(cmd, env=clean_mpi_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 2
        assert "in use by a live run" in error_lines(r)
        assert not os.path.exists(os.path.join(run_dir, "metrics.csv"))
    finally:
        rundir._held_locks.pop().close()


def test_temporary_files_of_dead_runs_are_removed(tmp_path, cli):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = run_dir / ".checkpoint.h5.tmp.4242.0badf00d"
    stale.write_bytes(b"half a checkpoint")
    stale_parts = run_dir / "checkpoint.parts" / ".tmp.20260101-000000-0badf00d"
    stale_parts.mkdir(parents=True)
    (stale_parts / "part-00000.h5").write_bytes(b"half a part")
    code, out, err = cli("train", "--run-dir", str(run_dir), *TINY)
    assert code == 0, out + err
    assert not stale.exists() and not stale_parts.exists()
    # the parts of the run's own checkpoint (and no others) are there
    assert len(os.listdir(run_dir / "checkpoint.parts")) == len(
        [p for p in ("checkpoint.h5", "checkpoint.prev.h5") if (run_dir / p).exists()])


def test_resume_uses_the_run_configuration(tmp_path, cli):
    run_dir = str(tmp_path / "run")
    code, out, err = cli("train", "--run-dir", run_dir, *TINY, "--set", "model.nlayers=12",
                         "--set", 'mgrit.mode="serial"')
    assert code == 0, out + err
    # nothing repeated but the change: the stored model (12 layers) is used
    code, out, err = cli("train", "--run-dir", run_dir, "--resume", "--set", "optim.epochs=2",
                         "-q")
    assert code == 0, out + err
    assert ckpt.verify_checkpoint(os.path.join(run_dir, "checkpoint.h5"))["epoch"] == 2
    assert len(rows(run_dir)) == 2
    code, out, err = cli("train", "--run-dir", run_dir, "--resume", "--set", "model.width=6",
                         "--set", "optim.epochs=3", "-q")
    assert code == 2
    assert "model.width" in one_error(out, err)
    # --resume-from with the checkpoint's own configuration
    code, out, err = cli("train", "--resume-from", os.path.join(run_dir, "checkpoint.prev.h5"),
                         "--run-dir", str(tmp_path / "branch"), "-q")
    assert code == 0, out + err


@pytest.mark.parametrize("case,named", [
    ("dir-is-file", "is a file"),
    ("config-is-dir", "is a directory"),
    ("width-too-large", "model.width"),
    ("root-with-peaks", "data.root"),
    ("diverging-lr", "optim.lr"),
])
def test_user_errors_are_one_line_on_stderr(tmp_path, cli, case, named):
    run_dir = tmp_path / "run"
    args = {"dir-is-file": [], "config-is-dir": ["--config", str(tmp_path)],
            "width-too-large": ["--set", "model.width=3000000"],
            "root-with-peaks": ["--set", f'data.root="{tmp_path}"'],
            "diverging-lr": ["--set", "optim.lr=1e6"]}[case]
    if case == "dir-is-file":
        run_dir.write_text("not a folder")
    code, out, err = cli("train", "--run-dir", str(run_dir), *TINY, *args)
    assert code in (1, 2)
    assert named in one_error(out, err)


@pytest.fixture
def read_only_folder(tmp_path):
    """An empty folder this process cannot write into: mode 0555, and for
    root (who ignores the mode) a read-only bind mount of it."""
    folder = tmp_path / "run"
    folder.mkdir(mode=0o555)
    mounted = False
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"root writes into folders of any mode, and cannot mount here: "
                        f"{r.stderr.strip()}")
        mounted = True
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_run_folder_is_one_line(read_only_folder, cli):
    code, out, err = cli("train", "--run-dir", str(read_only_folder), *TINY)
    assert code == 2
    assert "not writable" in one_error(out, err)


def test_lbfgs_takes_its_own_learning_rate_and_schedule(tmp_path, cli):
    code, out, err = cli("train", "--run-dir", str(tmp_path / "a"), *TINY[:-1],
                         "--set", 'optim.name="lbfgs"', "--set", 'mgrit.mode="serial"')
    assert code == 0, out + err
    assert "optim.lr = 1.0" in out and 'optim.schedule = "constant"' in out
    from layerpar.config import resolve
    # an explicit choice is kept
    c = resolve(None, ['optim.name="lbfgs"', "optim.lr=0.5"])
    assert c["optim"]["lr"] == 0.5 and c["optim"]["schedule"] == "constant"


def test_no_periodic_checkpoints(tmp_path, cli):
    run_dir = tmp_path / "run"
    code, out, err = cli("train", "--run-dir", str(run_dir), *TINY, "--set", "optim.epochs=2",
                         "--set", "run.checkpoint_every=-1")
    assert code == 0, out + err
    assert ckpt.verify_checkpoint(str(run_dir / "checkpoint.h5"))["epoch"] == 2
    assert not (run_dir / "checkpoint.prev.h5").exists()  # no earlier save was replaced


def test_full_disk_during_a_save_is_one_line_and_leaves_nothing(tmp_path, mpiexec):
    run_dir = tmp_path / "run"
    script = (
        "import errno, os, sys\n"
        "from mpi4py import MPI\n"
        "import layerpar.checkpoint.atomic as c\n"
        "real = c.write_at\n"
        "def full(fd, data, offset):\n"
        "    if offset > 2000:\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "    real(fd, data, offset)\n"
        "if MPI.COMM_WORLD.Get_rank() == 1:  # the disk of one rank's part is full\n"
        "    c.write_at = full\n"
        "from layerpar.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    cmd = [mpiexec, "-n", "2", sys.executable, "-c", script, "train", "--run-dir", str(run_dir),
           *TINY]
    r = subprocess.run(cmd, env=clean_mpi_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "disk full" in error_lines(r)
    assert not glob.glob(str(run_dir / ".*tmp*"))
    assert not (run_dir / "checkpoint.h5").exists()
    assert not (run_dir / "checkpoint.parts").exists()


def test_full_disk_while_writing_metrics_is_one_line_on_every_rank(tmp_path, mpiexec):
    run_dir = tmp_path / "run"
    script = (
        "import errno, os, sys\n"
        "import layerpar.metrics as m\n"
        "def full(self, row):\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.csv_path)\n"
        "m.MetricsWriter.append = full\n"
        "from layerpar.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    cmd = [mpiexec, "-n", "2", sys.executable, "-c", script, "train", "--run-dir", str(run_dir),
           *TINY]
    r = subprocess.run(cmd, env=clean_mpi_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    line = error_lines(r)
    assert "disk full" in line and "metrics.csv" in line
    assert "error on rank" not in r.stderr  # every rank agreed: no abort of one rank
