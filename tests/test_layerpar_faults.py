"""Fault injection into LayerParallel: an exception in a layer on one chosen
rank at a chosen call, in the forward solve, the backward solve and a
training step; every rank raises (the original exception there, an error
naming that rank elsewhere) and the same operation then works again.  The
cases are those of scripts/fault_matrix.py (which also runs the solver
callback kinds of test_braid_failures.py on 1, 2 and 4 ranks and writes
the counts to a CSV).
"""
import importlib.util
import json
import os

import pytest
from mpi4py import MPI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "fault_matrix", os.path.join(ROOT, "scripts", "fault_matrix.py"))
fm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fm)

TARGETS = ["forward", "backward", "train-forward", "train-backward"]


@pytest.mark.mpi
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("at", [1, 3])
@pytest.mark.parametrize("target", TARGETS)
def test_a_layer_failing_on_one_rank_raises_everywhere_then_works(target, at, where):
    comm = MPI.COMM_WORLD
    rank = 0 if where == "first" else comm.size - 1
    case = (target, "layer", rank, at)
    first, second = fm.run_network_case(comm, case)
    passed, _, detail = fm.judge(comm, case, first, second)
    assert passed, detail


@pytest.mark.mpi
@pytest.mark.parametrize("case", fm.solver_cases(MPI.COMM_WORLD.size),
                         ids=lambda c: f"{c[1]}-rank{c[2]}-at{c[3]}")
def test_a_solver_callback_failing_on_one_rank_raises_everywhere_then_works(case):
    comm = MPI.COMM_WORLD
    first, second = fm.run_solver_case(comm, case)
    passed, _, detail = fm.judge(comm, case, first, second)
    assert passed, detail


def test_a_loss_failing_on_one_rank_raises_on_every_rank_and_the_network_goes_on():
    """The loss raises on the last rank only, outside any solve: every rank
    raises at once (the others naming the last rank), none waits for the
    timeout, and the next step runs on every rank."""
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("starts a child mpiexec: run it on one process")
    env = fm.child_env()
    env["LAYERPAR_TIMEOUT"] = "60"  # armed (the agreement's guarded path), never reached
    out, err, hung = fm.run_job(2, ["--loss-case"], 120, env)
    assert not hung, out + err
    res = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("LOSS ")]
    assert len(res) == 2 and all(r["good"] for r in res), out + err[-1000:]
