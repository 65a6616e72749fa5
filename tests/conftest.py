import os
import shutil
import sys

import pytest
import torch

# one torch thread per rank: under mpiexec the ranks share the cores
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """A test marked ``max_ranks(n)`` is skipped on a COMM_WORLD of more
    than n ranks (on every rank alike)."""
    from mpi4py import MPI
    size = MPI.COMM_WORLD.Get_size()
    for item in items:
        mark = item.get_closest_marker("max_ranks")
        if mark is not None and size > mark.args[0]:
            item.add_marker(pytest.mark.skip(
                reason=f"checked on up to {mark.args[0]} ranks (its rank invariance: "
                       f"{mark.kwargs.get('invariance', 'another test')})"))


# Settings a user gives Open MPI (run as root, MCA parameters such as
# oversubscription) or MPICH (control variables, MPIR_CVAR_*) that a child
# mpiexec needs as much as this process.
KEPT_MPI_SETTINGS = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_MCA_", "PRTE_MCA_", "MPIR_CVAR_")


def clean_mpi_env():
    """The environment for a child `mpiexec`: without the variables through
    which this (possibly MPI-launched) process talks to its own launcher,
    keeping the user's Open MPI settings (KEPT_MPI_SETTINGS)."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith(KEPT_MPI_SETTINGS) or
           not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPI_", "OMPI_", "MPIR_", "I_MPI_"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="session")
def mpiexec():
    """Path of the mpiexec beside this Python (the MPICH wheel's), else the
    one on PATH (a system MPI that this Python's mpi4py was built against),
    or skip."""
    path = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(path):
        path = shutil.which("mpiexec")
    if not path:
        pytest.skip("no mpiexec found")
    return path


def network_name(serial_name, nlayers):
    """The Network's name of a parameter of its serial_equivalent()
    (module 0 the opening, 1..nlayers the layers, nlayers + 1 the closing)."""
    idx, rest = serial_name.split(".", 1)
    idx = int(idx)
    if idx == 0:
        return "opening." + rest
    if idx == nlayers + 1:
        return "closing." + rest
    return f"body.layers.{idx - 1}.{rest.removeprefix('F.')}"


def gathered(comm, named):
    """Collective: every rank's (name, tensor) pairs in one dict of detached
    copies, on every rank."""
    out = {}
    for part in comm.allgather({k: v.detach().clone() for k, v in named}):
        out.update(part)
    return out
