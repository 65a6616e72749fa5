"""The C core driven from C alone (braid_ext/examples/c/scalar_driver.c):
built with the MPI compiler wrapper, run under mpiexec on 1, 2 and 4 ranks,
checked against sequential stepping, against itself across rank counts, and
against the Python binding solving the same problem."""
import os
import re
import shutil
import subprocess
import sys
from glob import glob
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from braid_ext import Solver
from braid_ext.examples.dahlquist import Dahlquist
from conftest import clean_mpi_env

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "braid_ext" / "src"
DRIVER = ROOT / "braid_ext" / "examples" / "c" / "scalar_driver.c"
RANKS = (1, 2, 4)

# one build of the driver: the tests run in one pytest-xdist worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("c_driver")


def tool(name, env_var=None):
    if env_var and os.environ.get(env_var):
        return os.environ[env_var].split()
    found = shutil.which(name) or shutil.which(name, path=os.path.join(sys.prefix, "bin"))
    return [found] if found else None


def clean_env():
    """The environment without the variables of the MPI job this process
    runs in (see conftest.clean_mpi_env: the user's Open MPI settings stay)."""
    return clean_mpi_env()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if MPI.COMM_WORLD.Get_size() > 1:
        pytest.skip("a serial test (it starts mpiexec itself): run it on one process")
    mpicc, mpiexec = tool("mpicc", "MPICC"), tool("mpiexec")
    if not mpicc or not mpiexec:
        pytest.skip("the C driver needs an MPI compiler wrapper (mpicc or $MPICC) and mpiexec")
    exe = tmp_path_factory.mktemp("c_driver") / "scalar_driver"
    cmd = mpicc + ["-O2", "-Wall", f"-I{SRC}", str(DRIVER)] + sorted(glob(str(SRC / "*.c"))) + \
        ["-lm", "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=120)
    assert build.returncode == 0, f"build failed:\n{' '.join(cmd)}\n{build.stderr}"
    return mpiexec, exe


def run(driver, ranks, *args):
    """Run the driver; returns (residual norms, summary dict)."""
    mpiexec, exe = driver
    cmd = mpiexec + ["-n", str(ranks), str(exe)] + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    norms = {}
    summary = None
    for line in proc.stdout.splitlines():
        words = line.split()
        if words[:1] == ["rnorm"]:
            norms[int(words[1])] = float(words[2])
        elif words[:1] == ["summary"]:
            summary = {k: float(v) for k, v in zip(words[1::2], words[2::2])}
    assert summary is not None, f"no summary line in:\n{proc.stdout}"
    assert sorted(norms) == list(range(len(norms)))
    return [norms[k] for k in range(len(norms))], summary


# (N, levels, cfactor, nrelax, cycle, extra flags)
CASES = [
    (1000, 3, 4, 1, "V", ()),
    (777, 4, 2, 0, "F", ()),
    (513, 2, 8, 2, "V", ("-forward", "-lambda", "-4")),
]


@pytest.mark.parametrize("nsteps,levels,cf,nrelax,cycle,extra", CASES,
                         ids=[f"N{c[0]}-L{c[1]}-m{c[2]}" for c in CASES])
def test_c_driver_against_sequential_ranks_and_python(driver, nsteps, levels, cf, nrelax,
                                                       cycle, extra):
    tol = 1e-14  # the residual is an absolute norm; 1e-14 keeps the relative error < 1e-12
    args = ["-n", nsteps, "-levels", levels, "-cf", cf, "-nrelax", nrelax, "-cycle", cycle,
            "-tol", tol, "-maxiter", 50] + list(extra)
    runs = {p: run(driver, p, *args) for p in RANKS}

    for p, (norms, summary) in runs.items():
        assert summary["ranks"] == p
        assert summary["error"] < 1e-12, f"{p} ranks: error {summary['error']:.2e}"
        assert summary["iters"] == len(norms) - 1 < 50
        assert norms[-1] <= tol
        if p == 1:
            assert summary["messages"] == 0
    # the same history and the same work on every rank count
    ref_norms, ref_summary = runs[1]
    for p in RANKS[1:]:
        norms, summary = runs[p]
        np.testing.assert_allclose(norms, ref_norms, rtol=1e-12, atol=0)
        assert summary["steps0"] == ref_summary["steps0"]
        assert summary["levels"] == ref_summary["levels"]
    # the modelled parallel time shrinks as ranks are added
    vtimes = [runs[p][1]["vtime"] for p in RANKS]
    assert vtimes == sorted(vtimes, reverse=True) and len(set(vtimes)) == len(vtimes)

    # the Python binding on the same problem: the same history
    lam = float(extra[extra.index("-lambda") + 1]) if "-lambda" in extra else -1.0
    scheme = "forward" if "-forward" in extra else "backward"
    relax = "F" + "CF" * nrelax
    with Solver(Dahlquist(lam=lam, scheme=scheme), MPI.COMM_SELF, 0.0, 1.0, nsteps,
                max_levels=levels, cfactor=cf, relax=relax, cycle=cycle, abs_tol=tol,
                max_iter=50) as solver:
        py_norms = solver.solve()
        py_steps0 = solver.stats()["steps"][0]
        assert solver.nlevels == ref_summary["levels"]
    np.testing.assert_allclose(py_norms, ref_norms, rtol=1e-12, atol=0)
    assert py_steps0 == ref_summary["steps0"]


def test_c_driver_one_level_is_sequential(driver):
    """One level: sequential stepping across ranks, no residual, error at
    round-off and a virtual time of exactly N unit steps."""
    for p in RANKS:
        norms, summary = run(driver, p, "-n", 300, "-levels", 1)
        assert norms == [] and summary["levels"] == 1
        assert summary["error"] < 1e-13
        assert summary["vtime"] == 300 and summary["messages"] == p - 1


def test_c_driver_rejects_unknown_option(driver):
    mpiexec, exe = driver
    proc = subprocess.run(mpiexec + ["-n", "1", str(exe), "-bogus"], capture_output=True,
                          text=True, env=clean_env(), timeout=60)
    assert proc.returncode != 0
    assert re.search(r"unknown option -bogus", proc.stderr)
