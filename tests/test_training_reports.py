"""What training reports: the validation accuracy of the exact network, the
MGRIT work of every solve of a step, threads per rank, a fast --help (in a
child process: the end-to-end tier)."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

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
