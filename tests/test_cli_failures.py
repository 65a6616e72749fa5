"""The `layerpar` command when things go wrong: signals and the time limit,
run folders that hold results or are in use, resuming with the run's own
configuration, one-line errors for what a user can cause, a full disk."""
import errno
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

STEPS = [*SMALL, "--set", "data.batch_size=100", "-q"]  # 50 steps per epoch
SIGNALLED = [*STEPS, "--set", "optim.epochs=3", "--set", "run.checkpoint_every=10"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mpiexec_path):
    run_dir = tmp_path_factory.mktemp("full")
    r = layerpar(mpiexec_path, 2, "train", "--run-dir", str(run_dir), *SIGNALLED)
    assert r.returncode == 0, r.stdout + r.stderr
    return run_dir


@pytest.fixture(scope="module")
def mpiexec_path():
    path = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(path):
        pytest.skip("no mpiexec beside this Python")
    return path


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
    assert code == status, text
    assert "Traceback" not in text, text
    stopped = [ln for ln in text.splitlines() if ln.startswith("layerpar: stopped by")]
    assert len(stopped) == 1 and signal.Signals(sig).name in stopped[0], text
    assert "--resume" in stopped[0]
    header = ckpt.verify_checkpoint(str(part / "checkpoint.h5"))
    assert header["epoch"] < 3, "the run finished before the signal"
    assert not glob.glob(str(part / ".*.tmp.*"))

    r = layerpar(mpiexec, 2, "train", "--run-dir", str(part), "--resume", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    wf, stf = final_weights(str(full / "checkpoint.h5"))
    wp, stp = final_weights(str(part / "checkpoint.h5"))
    assert stf["step"] == stp["step"]
    for k in wf:
        assert torch.equal(wf[k], wp[k]), k
    assert last_row(full)["train_loss"] == last_row(part)["train_loss"]
