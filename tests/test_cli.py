"""The `layerpar` command under mpiexec: the default run, digits in every
mode, SIGKILL and resume, evaluation on another number of ranks, and the
one-line errors."""
import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import clean_mpi_env
from layerpar import checkpoint as ckpt

# Each test runs child jobs, each under its own time limit (a hang ends as that
# test's failure); pytest's limit, which ends the whole session, lies beyond them.
pytestmark = pytest.mark.timeout(1200)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "layerpar", "configs")
SMALL = ["--set", "model.nlayers=8", "--set", "model.width=4", "--set", "run.plot=false",
         "--set", 'mgrit.mode="serial"', "--set", "data.batch_size=500"]


def layerpar(mpiexec, n, *args, timeout=300):
    cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "layerpar", *args]
    return subprocess.run(cmd, env=clean_mpi_env(), capture_output=True, text=True,
                          timeout=timeout)


def last_row(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as fh:
        return list(csv.DictReader(fh))[-1]


def final_weights(path):
    st = ckpt.load_checkpoint(path, _self(), layer_indices=None)
    out = {f"layers.{n}.{k}": v for n, d in st["layers"].items() for k, v in d.items()}
    out.update({f"opening.{k}": v for k, v in st["opening"].items()})
    out.update({f"closing.{k}": v for k, v in st["closing"].items()})
    return out, st


def _self():
    from mpi4py import MPI
    return MPI.COMM_SELF


@pytest.mark.timeout(1800)
def test_peaks_default_on_two_ranks(tmp_path, mpiexec):
    # the README's main job: the default configuration (peaks, dense N=32,
    # layer-parallel, Adam, 40 epochs) on 2 ranks
    t = time.perf_counter()
    r = layerpar(mpiexec, 2, "train", "--run-dir", str(tmp_path), "-q", timeout=1500)
    elapsed = time.perf_counter() - t
    assert r.returncode == 0, r.stdout + r.stderr
    acc = float(last_row(tmp_path)["val_acc"])
    print(f"\npeaks default, 2 ranks: validation accuracy {100 * acc:.2f}% in {elapsed:.0f} s")
    assert acc >= 0.90  # README: at least 90% (chance is 20%)
    assert os.path.exists(tmp_path / "curves.png")
    assert os.path.exists(tmp_path / "metrics.h5")
    assert "validation accuracy" in r.stdout.splitlines()[-1]


def test_digits_conv_all_modes(tmp_path, mpiexec):
    # 6 of the configuration's 15 epochs (cosine schedule over 6): each mode
    # reaches about 96.7% already
    acc = {}
    for mode in ("serial", "layer-parallel", "one-shot"):
        run_dir = tmp_path / mode
        r = layerpar(mpiexec, 2, "train", "--config", os.path.join(CONFIGS, "digits-conv.toml"),
                     "--run-dir", str(run_dir), "--set", f'mgrit.mode="{mode}"',
                     "--set", "run.plot=false", "--set", "optim.epochs=6", "-q")
        assert r.returncode == 0, r.stdout + r.stderr
        acc[mode] = float(last_row(run_dir)["val_acc"])
    print("\ndigits conv, 2 ranks, validation accuracy: " +
          ", ".join(f"{m} {100 * a:.2f}%" for m, a in acc.items()))
    assert acc["serial"] >= 0.95
    for mode in ("layer-parallel", "one-shot"):
        assert acc[mode] >= 0.95
        assert abs(acc[mode] - acc["serial"]) <= 0.02


def test_sigkill_between_checkpoints_and_resume(tmp_path, mpiexec):
    args = [*SMALL, "--set", "optim.epochs=6", "--set", "run.checkpoint_every=20",
            "--set", "data.batch_size=50", "-q"]
    full = tmp_path / "full"
    r = layerpar(mpiexec, 2, "train", "--run-dir", str(full), *args)
    assert r.returncode == 0, r.stdout + r.stderr

    def killed_run(run_dir):
        cmd = [mpiexec, "-n", "2", sys.executable, "-m", "layerpar", "train",
               "--run-dir", str(run_dir), *args]
        p = subprocess.Popen(cmd, env=clean_mpi_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        path = run_dir / "checkpoint.h5"
        deadline = time.time() + 120
        while time.time() < deadline:
            if path.exists():
                try:
                    if ckpt.verify_checkpoint(str(path))["step"] >= 40:
                        break
                except ckpt.CheckpointError:
                    pass
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        epoch = ckpt.verify_checkpoint(str(path))["epoch"]
        assert epoch < 6, "the run finished before it could be killed"
        return epoch

    # resume on the same number of ranks: bit for bit
    part = tmp_path / "part"
    killed_run(part)
    r = layerpar(mpiexec, 2, "train", "--run-dir", str(part), "--resume", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    wf, stf = final_weights(str(full / "checkpoint.h5"))
    wp, stp = final_weights(str(part / "checkpoint.h5"))
    assert stf["step"] == stp["step"]
    for k in wf:
        assert torch.equal(wf[k], wp[k]), k

    # resume on another number of ranks: equal to round-off
    other = tmp_path / "other"
    killed_run(other)
    r = layerpar(mpiexec, 1, "train", "--run-dir", str(other), "--resume", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    wo, _ = final_weights(str(other / "checkpoint.h5"))
    for k in wf:
        assert torch.allclose(wf[k], wo[k], rtol=1e-12, atol=1e-14), k


def test_eval_on_one_rank_matches_training(tmp_path, mpiexec):
    r = layerpar(mpiexec, 2, "train", "--run-dir", str(tmp_path), *SMALL,
                 "--set", "optim.epochs=2", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    acc = float(last_row(tmp_path)["val_acc"])
    for n in (1, 2):
        r = layerpar(mpiexec, n, "eval", "--checkpoint", str(tmp_path / "checkpoint.h5"))
        assert r.returncode == 0, r.stdout + r.stderr
        line = r.stdout.strip().splitlines()[-1]
        assert f"accuracy {100 * acc:.2f}%" in line, line


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


def error_lines(r):
    text = r.stdout + r.stderr
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.startswith("layerpar: error:")]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("setting,named", [
    ("optim.lr=-0.5", "optim.lr"),
    ('data.name="imagenet"', "data.name"),
    ("mgrit.cfactor=1", "mgrit.cfactor"),
    ('mgrit.mode="fast"', "mgrit.mode"),
])
def test_invalid_configuration_one_line_error(tmp_path, mpiexec, setting, named):
    r = layerpar(mpiexec, 2, "train", "--run-dir", str(tmp_path), "--set", setting, "-q")
    assert r.returncode != 0
    assert named in error_lines(r)
    assert not os.path.exists(tmp_path / "checkpoint.h5")


def test_missing_data_directory_one_line_error(tmp_path, mpiexec):
    r = layerpar(mpiexec, 2, "train", "--run-dir", str(tmp_path / "run"),
                 "--set", 'data.name="mnist"', "--set", f'data.root="{tmp_path}/nothing"', "-q")
    assert r.returncode != 0
    line = error_lines(r)
    assert "nothing" in line and "train-images-idx3-ubyte" in line


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_checkpoint_falls_back_to_the_previous(tmp_path, mpiexec, damage):
    args = [*SMALL, "--set", "optim.epochs=2", "-q"]
    r = layerpar(mpiexec, 2, "train", "--run-dir", str(tmp_path), *args)
    assert r.returncode == 0, r.stdout + r.stderr
    path, prev = tmp_path / "checkpoint.h5", tmp_path / "checkpoint.prev.h5"
    prev_digest = hashlib.sha256(prev.read_bytes()).hexdigest()
    prev_step = ckpt.verify_checkpoint(str(prev))["step"]
    if damage == "truncate":   # the manifest
        data = bytearray(path.read_bytes())
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:   # one bit of one stored weight, in the first rank's part
        import h5py
        with h5py.File(path, "r") as f:
            part = tmp_path / f.attrs["parts_dir"] / "part-00000.h5"
        data = bytearray(part.read_bytes())
        data[weight_offset(part)] ^= 0x01
        part.write_bytes(bytes(data))
    r = layerpar(mpiexec, 1, "eval", "--checkpoint", str(path))
    assert r.returncode != 0
    assert "checkpoint.h5" in error_lines(r)
    # --resume continues from checkpoint.prev.h5 (as --help says), with a warning
    r = layerpar(mpiexec, 2, "train", "--run-dir", str(tmp_path), "--resume",
                 "--set", "optim.epochs=3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checkpoint.prev.h5" in r.stdout and f"step {prev_step}" in r.stdout, r.stdout
    damaged = [f for f in os.listdir(tmp_path) if ".damaged-" in f]
    assert len(damaged) == 1
    assert hashlib.sha256((tmp_path / damaged[0]).read_bytes()).hexdigest() != prev_digest
    assert ckpt.verify_checkpoint(str(path))["epoch"] == 3
    # the good previous checkpoint also resumes explicitly, without repeating the settings
    other = tmp_path / "other"
    other.mkdir()
    (other / "base.h5").write_bytes(prev.read_bytes())   # with its parts
    shutil.copytree(tmp_path / "checkpoint.parts", other / "checkpoint.parts")
    r = layerpar(mpiexec, 2, "train", "--resume-from", str(other / "base.h5"), "-q")
    assert r.returncode == 0, r.stdout + r.stderr


def test_info(mpiexec):
    r = layerpar(mpiexec, 2, "info")
    assert r.returncode == 0, r.stderr
    assert "ranks: 2" in r.stdout and "MPI library" in r.stdout and "torch" in r.stdout
