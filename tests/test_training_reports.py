"""What training reports: the validation accuracy of the exact network, the
MGRIT work of every solve of a step, TensorBoard event files (the metrics
rows; a resumed run's epochs once; one line from the command without the
package), the plot's title, threads per rank, a fast --help (in a child
process: the end-to-end tier)."""
import csv
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar.events import TensorBoardEvents
from layerpar.training import Trainer
from test_training import run_dirs, small_config  # noqa: F401 (fixture)

WORLD = MPI.COMM_WORLD


@pytest.mark.mpi
def test_validation_accuracy_is_the_exact_networks(run_dirs):  # noqa: F811
    # layer-parallel training with one inexact forward iteration; the
    # reported validation numbers are those of the serial network
    cfg = small_config(run_dirs(), **{"mgrit.mode": '"layer-parallel"', "mgrit.max_levels": 2,
                                      "mgrit.cfactor": 2, "mgrit.fwd_iters": 1,
                                      "mgrit.monitor": "false", "optim.epochs": 1})
    t = Trainer(cfg, WORLD)
    t.run()
    row = WORLD.bcast(t.metrics.rows(), root=0)[-1]
    serial = t.net.serial_equivalent(root=0)
    x = WORLD.bcast(t.data.val.inputs if t.first else None, root=0)
    y = WORLD.bcast(t.data.val.labels if t.last else None, root=WORLD.size - 1)
    if WORLD.rank == 0:
        with torch.no_grad():
            out = serial(x)
        acc = float((out.argmax(1) == y).double().mean())
        loss = float(Fn.cross_entropy(out, y))
        assert row["val_acc"] == acc
        assert math.isclose(row["val_loss"], loss, rel_tol=1e-12)
    assert t.body.fwd_options["max_levels"] == 2  # training continues layer-parallel


@pytest.mark.mpi
def test_metrics_count_every_solve_of_a_step(run_dirs):  # noqa: F811
    cfg = small_config(run_dirs(), **{"optim.name": '"lbfgs"', "mgrit.mode": '"layer-parallel"',
                                      "mgrit.max_levels": 2, "mgrit.cfactor": 2,
                                      "mgrit.fwd_iters": 2, "mgrit.monitor": "false",
                                      "optim.epochs": 2})
    t = Trainer(cfg, WORLD)
    calls = []
    t.net.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    t.run()
    rows = WORLD.bcast(t.metrics.rows(), root=0)
    training_solves = sum(calls)  # forwards with autograd: the line search's evaluations
    steps = rows[-1]["step"]
    assert training_solves > steps  # L-BFGS evaluates more than once per step
    fwd_total = sum(r["fwd_iters"] * (r["step"] - p) for r, p in
                    zip(rows, [0] + [r["step"] for r in rows[:-1]]))
    assert math.isclose(fwd_total, 2 * training_solves, rel_tol=1e-12)


# ---- TensorBoard and the plot -------------------------------------------------------------

def scalars(directory):
    """{tag: [(step, value)]} of the TensorBoard event files in ``directory``,
    as TensorBoard's reader sees them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(directory)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def as_float32(value):
    return float(torch.tensor(float(value), dtype=torch.float32))


@pytest.mark.mpi
def test_tensorboard_events_and_the_plot_title_of_a_run(run_dirs):  # noqa: F811
    # run.tensorboard = true: every number of every metrics row, at its
    # epoch, as TensorBoard reads it back (float32); the plot names the run
    pytest.importorskip("tensorboard")
    from PIL import Image
    run_dir = os.path.join(run_dirs(), "tiny-run")
    cfg = small_config(run_dir, **{"run.tensorboard": "true", "run.plot": "true"})
    lines = []
    t = Trainer(cfg, WORLD, log=lines.append)
    t.run()
    t.close()
    ok, detail = True, ""
    if WORLD.rank == 0:
        with open(os.path.join(run_dir, "metrics.csv")) as fh:
            rows = list(csv.DictReader(fh))
        got = scalars(os.path.join(run_dir, "tensorboard"))
        want = {k: [(int(r["epoch"]), as_float32(r[k])) for r in rows]
                for k in rows[0] if k != "epoch"}
        title = Image.open(os.path.join(run_dir, "curves.png")).text.get("Title")
        ranks = f"{WORLD.size} rank{'s' * (WORLD.size != 1)}"
        ok = (len(rows) == 2 and got == want and not [ln for ln in lines if "warning" in ln]
              and title == f"tiny-run: peaks, serial, {ranks}")
        detail = f"{sorted(got)} {sorted(want)} {title!r} {lines}"
    ok, detail = WORLD.bcast((ok, detail), root=0)
    assert ok, detail


def test_a_resumed_run_shows_each_epoch_once(tmp_path):
    # events of epochs 1-3, then a run resumed after epoch 1 writes epoch 2
    # again: TensorBoard shows epochs 1 and 2, the second run's value at 2
    pytest.importorskip("tensorboard")
    first = TensorBoardEvents(tmp_path, MPI.COMM_SELF)
    for epoch in (1, 2, 3):
        first.append({"epoch": epoch, "train_loss": 1.0 / epoch, "note": "x", "flag": True,
                      "history": [1.0, 2.0]})
    first.close()
    again = TensorBoardEvents(tmp_path, MPI.COMM_SELF)
    again.append({"epoch": 2, "train_loss": 0.25, "note": "x", "flag": True,
                  "history": [1.0]})
    again.close()
    assert first.missing is None
    assert scalars(str(tmp_path)) == {"train_loss": [(1, 1.0), (2, 0.25)]}


@pytest.mark.mpi
def test_the_command_says_in_one_line_that_tensorboard_is_missing(monkeypatch,
                                                                  tmp_path_factory):
    # without the package (hidden here on every rank): the run trains and
    # writes its metrics; one line says why there are no event files
    from test_cli import SMALL, command, shared_dir
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run_dir = os.path.join(shared_dir(tmp_path_factory, "notb"), "run")
    r = command("train", "--run-dir", run_dir, *SMALL, "--set", "optim.epochs=1",
                "--set", "run.tensorboard=true")
    lines = [ln for ln in r.text.splitlines() if "tensorboard package" in ln]
    assert r.status == 0, r.text
    assert lines == ["warning: run.tensorboard = true, but the tensorboard package is not "
                     "installed (pip install tensorboard): no TensorBoard event files are "
                     "written (the metrics files are)"], r.text
    assert r.quiet_elsewhere
    made = WORLD.bcast(sorted(os.listdir(run_dir)) if WORLD.rank == 0 else None, root=0)
    assert "metrics.csv" in made and "tensorboard" not in made, made


def test_threads_follow_the_layer_width(monkeypatch):
    from layerpar.cli import SMALL_WIDTH, _threads_per_rank
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _threads_per_rank(MPI.COMM_SELF, width=8) == 1
    assert _threads_per_rank(MPI.COMM_SELF, width=SMALL_WIDTH) == 1
    cores = len(os.sched_getaffinity(0))
    assert _threads_per_rank(MPI.COMM_SELF, width=512) == max(1, cores)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _threads_per_rank(MPI.COMM_SELF, width=8) == 3


@pytest.mark.e2e
def test_help_does_not_import_torch():
    code = ("import sys\n"
            "from layerpar.cli import main\n"
            "try:\n"
            "    main(['--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('torch' in sys.modules, 'mpi4py.MPI' in sys.modules)\n")
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "layer-parallel training" in r.stdout.lower()
    assert r.stdout.strip().splitlines()[-1] == "False False"
